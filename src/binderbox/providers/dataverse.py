"""Dataverse datasets, through the native API: ``GET /api/datasets/:persistentId?persistentId=``
(its ``latestVersion``) or ``…/versions/{x.y}``, whose ``files`` hold ``label``,
``directoryLabel``, ``restricted`` and a ``dataFile`` (``id``, ``md5``, and for ingested
tables ``originalFileName``); files come from ``GET /api/access/datafile/{id}``."""

from __future__ import annotations

import re
from urllib.parse import SplitResult, parse_qs, quote

from binderbox.config import Settings
from binderbox.errors import SourceError, UsageError
from binderbox.providers.archive import safe_file_name, safe_relative_path
from binderbox.providers.http import Http
from binderbox.providers.record import (
    Record,
    RecordSource,
    RemoteFile,
    Site,
    content_id,
    sites,
)

# Well-known installations; others go in the dataverse_hosts setting.
KNOWN = (
    "https://dataverse.harvard.edu",
    "https://demo.dataverse.org",
    "https://dataverse.nl",
    "https://dataverse.no",
    "https://borealisdata.ca",
    "https://data.aussda.at",
    "https://dataverse.unc.edu",
    "https://dataverse.tdl.org",
    "https://data.qdr.syr.edu",
    "https://recherche.data.gouv.fr",
)
# The dataset page, the citation page doi.org leads to, and the API's own address.
_DATASET_PAGES = {"/dataset.xhtml", "/citation", "/api/datasets/:persistentId"}
_PID = re.compile(r"^(?:doi|hdl|perma):\S+$", re.IGNORECASE)
_VERSION = re.compile(r"^\d+(?:\.\d+)?$")


class DataverseSource(RecordSource):
    provider = "dataverse"
    token_setting = "dataverse_token"
    token_header = ("X-Dataverse-key", "{token}")
    label = "Dataverse"
    noun = "dataset"

    def __init__(self, settings: Settings, base: str, pid: str, version: str = "") -> None:
        page = f"{base}/dataset.xhtml?persistentId={quote(pid, safe=':/')}"
        if version:
            page += f"&version={version}"
        super().__init__(settings, pid + (f" version {version}" if version else ""), page)
        self.pid = pid
        self.version = version
        self.api = f"{base}/api"

    def slug(self) -> str:
        return f"{self.api.removesuffix('/api').split('://', 1)[-1]}/dataset/{self.pid}"

    @classmethod
    def sites(cls, settings: Settings) -> list[Site]:
        return sites(*KNOWN, settings.dataverse_hosts)

    @classmethod
    def token_sites(cls, settings: Settings) -> list[Site]:
        # A token belongs to one installation: the well-known others never get it.
        return sites(settings.dataverse_hosts)

    @classmethod
    def _from_page(
        cls, settings: Settings, base: str, path: str, url: SplitResult
    ) -> DataverseSource | None:
        query = parse_qs(url.query)
        pid = (query.get("persistentId") or [""])[0]
        if path.rstrip("/") == "/file.xhtml" and pid:
            raise UsageError(
                f"'{pid}' is one file of a Dataverse dataset; give the dataset's DOI or "
                "address instead."
            )
        if path.rstrip("/") not in _DATASET_PAGES or not _PID.match(pid):
            return None
        version = (query.get("version") or [""])[0]
        # A draft needs an account; without one the latest published version is what exists.
        return cls(settings, base, pid, version if _VERSION.match(version) else "")

    def _load(self, http: Http) -> Record:
        params = {"persistentId": self.pid}
        if self.version:
            data = (
                http.get_json(
                    f"{self.api}/datasets/:persistentId/versions/{self.version}", self.what, params
                ).get("data")
                or {}
            )
            version, dataset_id = data, data.get("datasetId")
        else:
            data = (
                http.get_json(f"{self.api}/datasets/:persistentId", self.what, params).get("data")
                or {}
            )
            version, dataset_id = data.get("latestVersion") or {}, data.get("id")
        files: list[RemoteFile] = []
        restricted = 0
        for entry in version.get("files") or []:
            if entry.get("restricted"):
                restricted += 1
                continue
            files.append(self._file(entry))
        if restricted and not files:
            raise SourceError(f"Every file of {self.what} is restricted; none can be downloaded.")
        number = version.get("versionNumber")
        if number is None:
            label = str(version.get("lastUpdateTime") or "draft")
        else:
            label = f"v{number}.{version.get('versionMinorNumber') or 0}"
        return Record(content_id(dataset_id or self.pid, label), tuple(files))

    def _file(self, entry: dict) -> RemoteFile:
        data_file = entry.get("dataFile") or {}
        file_id = data_file.get("id")
        if not isinstance(file_id, int):
            raise SourceError(f"The file list of {self.what} has a file without an id.")
        url = f"{self.api}/access/datafile/{file_id}"
        checksum = data_file.get("checksum") or {}
        md5 = str(data_file.get("md5") or "")
        if not md5 and str(checksum.get("type", "")).upper() == "MD5":
            md5 = str(checksum.get("value") or "")
        if data_file.get("originalFileName"):
            # An ingested table: fetch the file as uploaded, not Dataverse's .tab rendering.
            name = str(data_file["originalFileName"])
            url += "?format=original"
            md5 = ""
        else:
            name = str(entry.get("label") or data_file.get("filename") or "")
        name = safe_file_name(name, "the file list")
        folder = safe_relative_path(str(entry.get("directoryLabel") or ""), "the file list")
        return RemoteFile(
            path=folder / name,
            url=url,
            size=data_file.get("originalFileSize") or data_file.get("filesize"),
            md5=md5,
        )
