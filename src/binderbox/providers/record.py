"""What every research-data record source shares (Zenodo, Figshare, Dataverse, Hydroshare,
CKAN): where a provider's sites are, the stable content id, and one way of fetching files
into a folder safely."""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import ClassVar
from urllib.parse import SplitResult, urlsplit

from binderbox.config import Settings
from binderbox.errors import SourceError
from binderbox.providers.archive import (
    Budget,
    ContentRefused,
    check_links,
    is_archive_name,
    safe_relative_path,
    unpack,
)
from binderbox.providers.base import Fetched
from binderbox.providers.http import Http, Pins, origin_of

_NOT_TAG = re.compile(r"[^A-Za-z0-9_.-]+")
# Image tags allow 128 characters; naming.image_name_for keeps the first 64 of a commit.
_MAX_ID = 64


@dataclass(frozen=True)
class RemoteFile:
    """One file of a record: where it goes in the repository and where it comes from."""

    path: PurePosixPath
    url: str
    size: int | None = None
    # Hex MD5 when the API lists one; the download is checked against it.
    md5: str = ""


@dataclass(frozen=True)
class Record:
    """A record at one version: what identifies its content, and its files."""

    content_id: str
    files: tuple[RemoteFile, ...]
    # True when the only file is an archive that must be unpacked (a Hydroshare bag).
    always_unpack: bool = False


def content_id(*parts: object) -> str:
    """A content id usable as an image tag: the parts joined with '-', at most 64 characters."""
    text = "-".join(str(p) for p in parts if str(p))
    clean = _NOT_TAG.sub("-", text).strip(".-")
    if not clean:
        clean = "record"
    if len(clean) > _MAX_ID:
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        clean = clean[: _MAX_ID - 13].rstrip(".-") + "-" + digest
    return clean


@dataclass(frozen=True)
class Site:
    """One installation of a provider, named by its base URL (which may have a path).

    A host written ``*.example.org`` matches every subdomain of example.org.
    """

    base: str

    @property
    def parts(self) -> SplitResult:
        return urlsplit(self.base)

    def rest(self, url: SplitResult) -> str | None:
        """The part of ``url``'s path below this site, or None when it is another site.

        The scheme is not compared: ``http://zenodo.org/…`` is still Zenodo, and the API
        is reached at the configured base (https).
        """
        mine = self.parts
        host = (mine.hostname or "").lower()
        theirs = (url.hostname or "").lower()
        if host.startswith("*."):
            if not theirs.endswith(host[1:]):
                return None
        elif theirs != host or _port(url) != _port(mine):
            return None
        prefix = mine.path.rstrip("/")
        if not url.path.startswith(prefix):
            return None
        rest = url.path[len(prefix) :]
        if rest and not rest.startswith("/"):
            return None
        return rest

    def at(self, url: SplitResult) -> str:
        """This site's base URL, with the concrete host when the site is a wildcard."""
        if (self.parts.hostname or "").startswith("*."):
            return f"{self.parts.scheme}://{url.netloc}{self.parts.path.rstrip('/')}"
        return self.base.rstrip("/")


def _port(url: SplitResult) -> int | None:
    """The explicit port, None for the default ones (so http:// and https:// both match)."""
    try:
        port = url.port
    except ValueError:
        return -1
    return None if port in {None, 80, 443} else port


def sites(*values: str) -> list[Site]:
    """Sites from settings values that hold one or more base URLs (comma or space separated)."""
    found: list[Site] = []
    for value in values:
        for item in re.split(r"[\s,]+", value or ""):
            if item:
                found.append(Site(item.rstrip("/")))
    return found


class RecordSource:
    """A record of a research-data repository, fetched through its public API.

    Subclasses set the class attributes, build themselves from a URL or an id, and load
    the record's content id and file list in :meth:`_load`.
    """

    # The service's provider name ("zenodo") and the name people know ("Zenodo").
    provider: ClassVar[str] = ""
    label: ClassVar[str] = ""
    # What the provider calls one entry: record, article, dataset, resource.
    noun: ClassVar[str] = "record"
    # The setting with an optional API token, and the header the API wants it in.
    token_setting: ClassVar[str] = ""
    token_header: ClassVar[tuple[str, str]] = ("Authorization", "Bearer {token}")

    def __init__(self, settings: Settings, record_id: str, repo_url: str) -> None:
        self.settings = settings
        self.record_id = record_id
        # The record's landing page: its identity in labels and messages.
        self.repo_url = repo_url
        self.ref = ""
        self._record: Record | None = None
        # Each host is resolved (and checked) once for the record: fetch() connects where
        # resolve() did, even when the name answers something else by then.
        self._pins: Pins = {}

    @property
    def what(self) -> str:
        """The record in messages: "the Zenodo record 3242074"."""
        return f"the {self.label} {self.noun} {self.record_id}"

    def slug(self) -> str:
        return re.sub(r"^[a-z]+://", "", self.repo_url).rstrip("/")

    def resolve(self) -> str:
        return self.record().content_id

    def _http(self) -> Http:
        """A client that sends the provider's API token, if one is set, to the hosts the
        operator configured for this provider (:meth:`token_sites`) and nowhere else."""
        token = getattr(self.settings, self.token_setting, "") if self.token_setting else ""
        if not token:
            return Http(self.settings, pins=self._pins)
        origins = {
            origin_of(site.base)
            for site in self.token_sites(self.settings)
            # A wildcard names many hosts, some perhaps not the provider's: no token there.
            if not (site.parts.hostname or "").startswith("*.")
        }
        name, template = self.token_header
        return Http(self.settings, (origins, {name: template.format(token=token)}), self._pins)

    @classmethod
    def token_sites(cls, settings: Settings) -> list[Site]:
        """Where this provider's token may go: sites the operator set (not the built-in
        list, not hosts that merely answer like the provider)."""
        return []

    def record(self) -> Record:
        """The record's metadata, read once: fetch() uses exactly what resolve() saw."""
        if self._record is None:
            with self._http() as http:
                self._record = self._load(http)
        return self._record

    def _load(self, http: Http) -> Record:
        raise NotImplementedError

    def _download(self, http: Http, item: RemoteFile, target: Path, budget: Budget) -> None:
        http.download(item.url, target, budget, f"{item.path} from {self.what}", md5=item.md5)

    def _content_root(self, unpacked: Path) -> Path:
        """Where the repository is inside an unpacked archive (Hydroshare overrides)."""
        return unpacked

    def fetch(self, dest: Path) -> Fetched:
        record = self.record()
        try:
            with self._http() as http:
                self._materialize(record, dest, http)
        except ContentRefused as err:
            _remove(dest)
            raise SourceError(f"Could not use {self.what}: {err.message}.") from None
        except OSError as err:
            _remove(dest)
            raise SourceError(
                f"Could not save the files of {self.what}: {err.strerror or err}."
            ) from None
        except BaseException:
            _remove(dest)
            raise
        return Fetched(path=dest, commit=record.content_id)

    def _materialize(self, record: Record, dest: Path, http: Http) -> None:
        if not record.files:
            raise SourceError(f"{_capital(self.what)} has no files binderbox can download.")
        limits = self.settings
        budget = Budget(limits.content_max_bytes, limits.content_max_files, f"the {self.noun}")
        budget.check_files(len(record.files))
        # Refuse early when the API already says it is too big; counting continues anyway.
        declared = sum(item.size or 0 for item in record.files)
        if declared > budget.max_bytes:
            budget.add_bytes(declared)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
        try:
            downloads = staging / "files"
            downloads.mkdir()
            seen: set[PurePosixPath] = set()
            for item in record.files:
                path = safe_relative_path(item.path.as_posix(), "the file list")
                if not path.parts:
                    raise ContentRefused("the file list has an empty file name")
                if path in seen or any(p in seen for p in path.parents):
                    raise ContentRefused(f"the file list has {path} twice")
                seen.add(path)
                target = downloads.joinpath(*path.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                self._download(http, item, target, budget)
            only = record.files[0] if len(record.files) == 1 else None
            if only and (record.always_unpack or is_archive_name(only.path.name)):
                name = only.path.name
                root = unpack(
                    downloads.joinpath(*only.path.parts),
                    staging / "unpacked",
                    budget.fresh(f"the archive {name}"),
                    name,
                )
                content = self._content_root(root)
                if content != root:
                    check_links(content, f"the archive {name}")
                root = content
            else:
                root = downloads
            root.rename(dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # --- building sources -------------------------------------------------------------------

    @classmethod
    def sites(cls, settings: Settings) -> list[Site]:
        """The installations of this provider that binderbox knows or was configured with."""
        raise NotImplementedError

    @classmethod
    def on_site(cls, url: SplitResult, settings: Settings) -> bool:
        """Whether ``url`` is on one of this provider's sites (a record page or not)."""
        return any(site.rest(url) is not None for site in cls.sites(settings))

    @classmethod
    def from_url(cls, url: SplitResult, settings: Settings) -> RecordSource | None:
        """The source for a record page of this provider, or None (no network)."""
        for site in cls.sites(settings):
            rest = site.rest(url)
            if rest is not None:
                return cls._from_page(settings, site.at(url), rest, url)
        return None

    @classmethod
    def _from_page(
        cls, settings: Settings, base: str, path: str, url: SplitResult
    ) -> RecordSource | None:
        """The source for the page at ``path`` below the site ``base``, or None."""
        raise NotImplementedError

    @classmethod
    def from_id(cls, spec: str, settings: Settings) -> RecordSource | None:
        """The source for a provider-specific id (the service's spec), or None."""
        return None


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]
