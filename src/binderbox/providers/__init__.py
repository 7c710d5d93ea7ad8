"""Where repositories come from: each source kind is one module with the same small interface."""

from __future__ import annotations

import re
from pathlib import Path

from binderbox.config import Settings
from binderbox.errors import UsageError
from binderbox.providers.base import Fetched, Source
from binderbox.providers.content import content_source, record_source_for
from binderbox.providers.git import GitPolicy, GitSource
from binderbox.providers.local import LocalSource
from binderbox.providers.record import RecordSource

# scheme://…, git's transport::address, and scp-like user@host:path.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*(://|::)|^[\w.-]+@[\w.-]+:")

__all__ = [
    "Fetched",
    "GitSource",
    "LocalSource",
    "RecordSource",
    "Source",
    "content_source",
    "source_for",
]


def source_for(repo: str, ref: str = "", settings: Settings | None = None) -> Source:
    """Pick the source for a command-line REPO argument: a DOI or a research-data record's
    address (Zenodo, Figshare, Dataverse, HydroShare, CKAN), a git URL, or a local folder."""
    settings = settings or Settings()
    if not Path(repo).exists():
        record = record_source_for(repo, settings)
        if record is not None:
            if ref:
                raise UsageError(
                    f"--ref only applies to git URLs; choose a version of {record.what} "
                    "by its DOI or address."
                )
            return record
    if _URL.match(repo):
        allowed = None
        if settings.check_remote_hosts:
            allowed = [h.strip() for h in settings.allowed_hosts.split(",") if h.strip()]
        return GitSource(repo, ref or "HEAD", policy=GitPolicy.from_settings(settings, allowed))
    return LocalSource(Path(repo), ref)
