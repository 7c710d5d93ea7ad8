"""Where repositories come from: each source kind is one module with the same small interface."""

from __future__ import annotations

import re
from pathlib import Path

from binderbox.providers.base import Fetched, Source
from binderbox.providers.git import GitSource
from binderbox.providers.local import LocalSource

# scheme://…, git's transport::address, and scp-like user@host:path.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*(://|::)|^[\w.-]+@[\w.-]+:")

__all__ = ["Fetched", "GitSource", "LocalSource", "Source", "source_for"]


def source_for(repo: str, ref: str = "") -> Source:
    """Pick the source for a command-line REPO argument: a git URL or a local folder."""
    if _URL.match(repo):
        return GitSource(repo, ref or "HEAD")
    return LocalSource(Path(repo), ref)
