"""Zenodo records (and other InvenioRDM sites), through the records REST API:
``GET /api/records/{id}`` for the record and ``GET /api/records/{id}/files`` for its files,
each entry with ``key``, ``size``, ``checksum`` ("md5:…") and ``links.content``."""

from __future__ import annotations

import hashlib
import re
from pathlib import PurePosixPath
from urllib.parse import SplitResult, quote, urljoin

from binderbox.config import Settings
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

KNOWN = ("https://zenodo.org", "https://sandbox.zenodo.org")
# /records/ID, the older /record/ID, the API form, and links to a file of the record.
_RECORD_PATH = re.compile(r"^/(?:api/)?records?/([A-Za-z0-9-]+)(?:/.*)?$")
_ID = re.compile(r"^[0-9]+$")


class ZenodoSource(RecordSource):
    provider = "zenodo"
    token_setting = "zenodo_token"
    label = "Zenodo"

    def __init__(self, settings: Settings, base: str, record_id: str) -> None:
        super().__init__(settings, record_id, f"{base}/records/{record_id}")
        self.api = f"{base}/api"

    @classmethod
    def sites(cls, settings: Settings) -> list[Site]:
        return sites(settings.zenodo_url, *KNOWN, settings.zenodo_hosts)

    @classmethod
    def token_sites(cls, settings: Settings) -> list[Site]:
        # The sandbox has accounts of its own; a zenodo.org token means nothing there.
        return sites(settings.zenodo_url, settings.zenodo_hosts)

    @classmethod
    def _from_page(
        cls, settings: Settings, base: str, path: str, url: SplitResult
    ) -> ZenodoSource | None:
        match = _RECORD_PATH.match(path)
        return cls(settings, base, match.group(1)) if match else None

    @classmethod
    def from_id(cls, spec: str, settings: Settings) -> ZenodoSource | None:
        if _ID.match(spec):
            return cls(settings, settings.zenodo_url.rstrip("/"), spec)
        return None

    def _load(self, http: Http) -> Record:
        data = http.get_json(f"{self.api}/records/{self.record_id}", self.what)
        # A concept id answers with its latest version: name the files of that one.
        version_id = str(data.get("id") or self.record_id)
        listing = http.get_json(
            f"{self.api}/records/{quote(version_id)}/files", f"the file list of {self.what}"
        )
        files: list[RemoteFile] = []
        fingerprint: list[str] = []
        for entry in listing.get("entries") or []:
            key = safe_file_name(str(entry.get("key", "")), "the file list")
            checksum = str(entry.get("checksum") or "")
            link = (entry.get("links") or {}).get("content") or (
                f"{self.api}/records/{quote(version_id)}/files/{quote(key)}/content"
            )
            algorithm, _, digest = checksum.partition(":")
            files.append(
                RemoteFile(
                    path=PurePosixPath(key),
                    url=urljoin(self.api + "/", link),
                    size=entry.get("size"),
                    md5=digest if algorithm == "md5" else "",
                )
            )
            fingerprint.append(f"{key}\0{checksum}\0{entry.get('size')}")
        # Published files never change; a new version is a new record id.
        digest = hashlib.sha256("\n".join(sorted(fingerprint)).encode()).hexdigest()[:12]
        return Record(content_id(version_id, digest), tuple(files))
