"""CKAN datasets, through the Action API: ``GET /api/3/action/package_show?id=`` gives the
dataset (``id``, ``name``, ``metadata_modified``) and its ``resources``; the files are the
resources uploaded to the site (``url_type`` "upload"), fetched from their ``url``.

A host is CKAN when it is in the ckan_hosts setting or answers ``/api/3/action/status_show``.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from urllib.parse import SplitResult, unquote, urljoin, urlsplit

from binderbox.config import Settings
from binderbox.errors import SourceError
from binderbox.providers.archive import safe_file_name
from binderbox.providers.http import Http
from binderbox.providers.record import (
    Record,
    RecordSource,
    RemoteFile,
    Site,
    content_id,
    sites,
)

_DATASET_PATH = re.compile(r"^/dataset/([A-Za-z0-9_-]{1,100})(?:/.*)?$")


class CkanSource(RecordSource):
    provider = "ckan"
    token_setting = "ckan_token"
    token_header = ("Authorization", "{token}")
    label = "CKAN"
    noun = "dataset"

    def __init__(self, settings: Settings, base: str, dataset: str) -> None:
        super().__init__(settings, dataset, f"{base}/dataset/{dataset}")
        self.api = f"{base}/api/3/action"

    @classmethod
    def sites(cls, settings: Settings) -> list[Site]:
        return sites(settings.ckan_hosts)

    @classmethod
    def token_sites(cls, settings: Settings) -> list[Site]:
        # A host that answers status_show is anyone's; the token is for ckan_hosts only.
        return sites(settings.ckan_hosts)

    @classmethod
    def _from_page(
        cls, settings: Settings, base: str, path: str, url: SplitResult
    ) -> CkanSource | None:
        match = _DATASET_PATH.match(path)
        return cls(settings, base, match.group(1)) if match else None

    @classmethod
    def probe(cls, url: SplitResult, settings: Settings, http: Http) -> CkanSource | None:
        """The source for ``…/dataset/<name>`` on a host that answers as a CKAN site."""
        prefix, found, _ = url.path.partition("/dataset/")
        if not found or url.scheme not in {"http", "https"}:
            return None
        base = f"{url.scheme}://{url.netloc}{prefix}"
        status = http.answers_json(f"{base}/api/3/action/status_show")
        if not (isinstance(status, dict) and status.get("success")):
            return None
        return cls._from_page(settings, base, url.path[len(prefix) :], url)

    def _load(self, http: Http) -> Record:
        answer = http.get_json(f"{self.api}/package_show", self.what, {"id": self.record_id})
        if not isinstance(answer, dict) or not answer.get("success"):
            raise SourceError(f"{self.what[:1].upper()}{self.what[1:]} was not found.")
        dataset = answer.get("result") or {}
        files: list[RemoteFile] = []
        for resource in dataset.get("resources") or []:
            url = str(resource.get("url") or "")
            # Links to other sites are descriptions, not files of the dataset.
            if resource.get("url_type") != "upload" or not url:
                continue
            url = urljoin(self.api + "/", url)
            name = unquote(urlsplit(url).path.rsplit("/", 1)[-1]) or str(resource.get("name"))
            files.append(
                RemoteFile(
                    path=PurePosixPath(safe_file_name(name, "the file list")),
                    url=url,
                    size=resource.get("size") if isinstance(resource.get("size"), int) else None,
                )
            )
        modified = str(dataset.get("metadata_modified") or "")
        return Record(content_id(dataset.get("id") or self.record_id, modified), tuple(files))
