"""HydroShare resources, through the HydroShare REST API: ``GET /hsapi/resource/{id}/sysmeta/``
(``date_last_updated``, ``bag_url``) and the resource's BagIt zip, whose ``data/contents``
folder is the repository. A bag still being prepared is answered with 202; binderbox waits."""

from __future__ import annotations

import re
import time
from pathlib import Path, PurePosixPath
from urllib.parse import SplitResult, urlsplit

from binderbox.config import Settings
from binderbox.errors import SourceError
from binderbox.providers.archive import Budget, ContentRefused
from binderbox.providers.http import Http, NotReady
from binderbox.providers.record import (
    Record,
    RecordSource,
    RemoteFile,
    Site,
    content_id,
    sites,
)

KNOWN = ("https://www.hydroshare.org", "https://hydroshare.org")
_RESOURCE_PATH = re.compile(r"^/(?:hsapi/)?resource/([0-9a-f]{32})(?:/.*)?$")
_ID = re.compile(r"^[0-9a-f]{32}$")
# How long to wait for HydroShare to prepare a bag: attempts x seconds apart.
BAG_ATTEMPTS = 20
BAG_WAIT_SECONDS = 6.0


class HydroshareSource(RecordSource):
    provider = "hydroshare"
    token_setting = "hydroshare_token"
    label = "HydroShare"
    noun = "resource"

    def __init__(self, settings: Settings, base: str, resource_id: str) -> None:
        super().__init__(settings, resource_id, f"{base}/resource/{resource_id}/")
        self.base = base

    @classmethod
    def sites(cls, settings: Settings) -> list[Site]:
        return sites(settings.hydroshare_url, *KNOWN)

    @classmethod
    def token_sites(cls, settings: Settings) -> list[Site]:
        return sites(settings.hydroshare_url)

    @classmethod
    def _from_page(
        cls, settings: Settings, base: str, path: str, url: SplitResult
    ) -> HydroshareSource | None:
        match = _RESOURCE_PATH.match(path.lower())
        return cls(settings, base, match.group(1)) if match else None

    @classmethod
    def from_id(cls, spec: str, settings: Settings) -> HydroshareSource | None:
        if _ID.match(spec.lower()):
            return cls(settings, settings.hydroshare_url.rstrip("/"), spec.lower())
        return None

    def _load(self, http: Http) -> Record:
        meta = http.get_json(f"{self.base}/hsapi/resource/{self.record_id}/sysmeta/", self.what)
        updated = str(meta.get("date_last_updated") or "")
        if not updated:
            raise SourceError(f"HydroShare did not say when {self.what} was last updated.")
        bag = str(meta.get("bag_url") or "")
        # Take the bag address HydroShare gives only when it is on the same site.
        if not bag or urlsplit(bag).netloc != urlsplit(self.base).netloc:
            bag = f"{self.base}/hsapi/resource/{self.record_id}/"
        bag_file = RemoteFile(path=PurePosixPath(f"{self.record_id}.zip"), url=bag)
        return Record(content_id(self.record_id, updated), (bag_file,), always_unpack=True)

    def _download(self, http: Http, item: RemoteFile, target: Path, budget: Budget) -> None:
        what = f"the bag of {self.what}"
        for attempt in range(BAG_ATTEMPTS):
            try:
                http.download(item.url, target, budget, what)
                return
            except NotReady:
                if attempt == BAG_ATTEMPTS - 1:
                    break
                time.sleep(BAG_WAIT_SECONDS)
        waited = BAG_ATTEMPTS * BAG_WAIT_SECONDS
        raise SourceError(
            f"HydroShare was still preparing {what} after {waited:g} seconds; try again later."
        )

    def _content_root(self, unpacked: Path) -> Path:
        contents = unpacked / "data" / "contents"
        if not contents.is_dir() or contents.is_symlink():
            raise ContentRefused("its bag has no data/contents folder")
        return contents
