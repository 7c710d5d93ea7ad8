"""Figshare articles, through the public API v2: ``GET /articles/{id}`` (the latest version)
or ``GET /articles/{id}/versions/{n}``, whose ``files`` list ``name``, ``size``,
``download_url``, ``computed_md5`` and ``is_link_only``."""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from urllib.parse import SplitResult

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

# Institutional portals live on subdomains (but api. and ndownloader. are not pages).
KNOWN = ("https://figshare.com", "https://*.figshare.com")
_NOT_PAGES = {"api.figshare.com", "ndownloader.figshare.com"}
# A service spec: "9782777", "9782777/2" or "9782777.v2".
_SPEC = re.compile(r"^(\d+)(?:(?:/|\.v)(\d+))?$")


class FigshareSource(RecordSource):
    provider = "figshare"
    token_setting = "figshare_token"
    token_header = ("Authorization", "token {token}")
    label = "Figshare"
    noun = "article"

    def __init__(self, settings: Settings, base: str, article: str, version: str = "") -> None:
        page = f"{base}/articles/{article}" + (f"/{version}" if version else "")
        super().__init__(settings, article + (f" version {version}" if version else ""), page)
        self.article = article
        self.version = version
        self.api = settings.figshare_api_url.rstrip("/")

    def slug(self) -> str:
        # One name for every version; the version is in the content id (the image tag).
        return super().slug().rsplit("/articles/", 1)[0] + f"/articles/{self.article}"

    @classmethod
    def sites(cls, settings: Settings) -> list[Site]:
        return sites(settings.figshare_url, *KNOWN, settings.figshare_hosts)

    @classmethod
    def token_sites(cls, settings: Settings) -> list[Site]:
        # Every request goes to the API; portals and the download host never see the token.
        return sites(settings.figshare_api_url)

    @classmethod
    def _from_page(
        cls, settings: Settings, base: str, path: str, url: SplitResult
    ) -> FigshareSource | None:
        if (url.hostname or "").lower() in _NOT_PAGES:
            return None
        # /articles/<type>/<title>/<id>[/<version>], older /articles/<title>/<id>, or
        # /articles/<id>: the id is the last number, or the one before when two end the path.
        parts = [p for p in path.split("/") if p]
        if len(parts) < 2 or parts[0] != "articles" or not parts[-1].isdigit():
            return None
        if len(parts) >= 3 and parts[-2].isdigit():
            return cls(settings, base, parts[-2], parts[-1])
        return cls(settings, base, parts[-1])

    @classmethod
    def from_id(cls, spec: str, settings: Settings) -> FigshareSource | None:
        match = _SPEC.match(spec)
        if not match:
            return None
        return cls(settings, settings.figshare_url.rstrip("/"), match[1], match[2] or "")

    def _load(self, http: Http) -> Record:
        url = f"{self.api}/articles/{self.article}"
        if self.version:
            url += f"/versions/{self.version}"
        data = http.get_json(url, self.what)
        if data.get("is_embargoed") and "files" not in data:
            raise SourceError(f"The files of {self.what} are under embargo.")
        files: list[RemoteFile] = []
        for entry in data.get("files") or []:
            if entry.get("is_link_only") or not entry.get("download_url"):
                continue  # a link to another site, not a file Figshare holds
            name = safe_file_name(str(entry.get("name", "")), "the file list")
            files.append(
                RemoteFile(
                    path=PurePosixPath(name),
                    url=str(entry.get("download_url", "")),
                    size=entry.get("size"),
                    # supplied_md5 is whatever the uploader typed; only Figshare's own counts.
                    md5=str(entry.get("computed_md5") or ""),
                )
            )
        version = data.get("version") or self.version or "0"
        return Record(content_id(data.get("id") or self.article, f"v{version}"), tuple(files))
