"""Content providers: DOIs and record addresses of Zenodo, Figshare, Dataverse, HydroShare
and CKAN, served by a local HTTP server on 127.0.0.1 that answers like the real APIs
(recorded-style JSON in tests/fixtures/content)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import ssl
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

import pytest

from binderbox.config import Settings, load_settings
from binderbox.errors import SourceError, UsageError
from binderbox.providers import GitSource, LocalSource, content_source, source_for
from binderbox.providers import http as http_module
from binderbox.providers import hydroshare as hydroshare_module
from binderbox.providers.ckan import CkanSource
from binderbox.providers.dataverse import DataverseSource
from binderbox.providers.figshare import FigshareSource
from binderbox.providers.hydroshare import HydroshareSource
from binderbox.providers.zenodo import ZenodoSource
from conftest import binderbox, free_port, run_in_image

FIXTURES = Path(__file__).parent / "fixtures" / "content"
HS_ID = "b8f6eae9d89241cf8b5904033460af61"
CKAN_ID = "4fd7c9a6-3a0e-4b76-9e0b-5ad8a1f2d0c3"
CKAN_FILES = f"/ckan/dataset/{CKAN_ID}/resource"


# --- a local server that answers like the providers' APIs ---------------------------------


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _key(path_and_query: str) -> str:
    """Routes match on the decoded path and the query's pairs in any order."""
    parts = urlsplit(path_and_query)
    pairs = sorted(parse_qsl(parts.query, keep_blank_values=True))
    query = "&".join(f"{k}={v}" for k, v in pairs)
    return unquote(parts.path) + (f"?{query}" if query else "")


class ContentServer:
    """Routes are exact paths (with query); a list of replies is served in turn, the last
    one repeating. Every request is recorded."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.routes: dict[str, list[Reply]] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                replies = server.routes.get(_key(self.path))
                if not replies:
                    reply = Reply(404, b'{"status": 404, "message": "not found"}')
                else:
                    reply = replies.pop(0) if len(replies) > 1 else replies[0]
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.port = self.httpd.server_address[1]
        self.base = f"http://{host}:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def paths(self) -> list[str]:
        return [unquote(path) for path, _ in self.requests]

    def add(self, path: str, *replies: Reply) -> None:
        self.routes[_key(path)] = list(replies)

    def file(self, path: str, body: bytes | str) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.add(path, Reply(200, data, {"Content-Type": "application/octet-stream"}))

    def redirect(self, path: str, location: str, status: int = 302) -> None:
        self.add(path, Reply(status, b"", {"Location": location}))

    def json(self, path: str, fixture: str | dict, **tokens: str) -> None:
        """Serve a fixture file (or a dict), with @BASE@, @MD5:path@, @SIZE:path@ and
        @NAME@ tokens filled in from this server and the files already added."""
        text = (FIXTURES / fixture).read_text() if isinstance(fixture, str) else json.dumps(fixture)
        text = text.replace("@BASE@", self.base)
        text = re.sub(r"@MD5:([^@]+)@", lambda m: hashlib.md5(self._body(m[1])).hexdigest(), text)
        text = re.sub(r"@SIZE:([^@]+)@", lambda m: str(len(self._body(m[1]))), text)
        for name, value in tokens.items():
            text = text.replace(f"@{name}@", value)
        json.loads(text)  # the fixture must stay valid JSON
        self.add(path, Reply(200, text.encode(), {"Content-Type": "application/json"}))

    def _body(self, path: str) -> bytes:
        return self.routes[_key(path)][-1].body


@pytest.fixture(scope="module")
def content_server() -> Iterator[ContentServer]:
    server = ContentServer()
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture
def server(content_server: ContentServer) -> ContentServer:
    content_server.routes.clear()
    content_server.requests.clear()
    return content_server


def settings_for(server: ContentServer, **overrides: object) -> Settings:
    """Settings pointing every provider at the local server; only the base URLs differ."""
    values: dict[str, object] = {
        "doi_resolver": f"{server.base}/doi",
        "zenodo_url": f"{server.base}/zenodo",
        "figshare_url": f"{server.base}/figshare",
        "figshare_api_url": f"{server.base}/figshare-api/v2",
        "dataverse_hosts": f"{server.base}/dataverse",
        "hydroshare_url": f"{server.base}/hydroshare",
        "ca_bundle": "",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def env_for(server: ContentServer) -> dict[str, str]:
    """The same settings as BINDERBOX_* variables, for the real CLI."""
    settings = settings_for(server)
    names = ["doi_resolver", "zenodo_url", "figshare_url", "figshare_api_url"]
    names += ["dataverse_hosts", "hydroshare_url"]
    return {f"BINDERBOX_{name.upper()}": getattr(settings, name) for name in names}


def zip_bytes(files: dict[str, str], top: str = "") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in files.items():
            zf.writestr(f"{top}{name}", text)
    return buffer.getvalue()


def tar_gz_bytes(files: dict[str, str], top: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{top}{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


REPO_FILES = {
    "requirements.txt": "six\n",
    "README.md": "# binder demo\n",
    "notebooks/index.ipynb": '{"cells": [], "nbformat": 4, "nbformat_minor": 5}\n',
}


# --- Zenodo ---------------------------------------------------------------------------------


def serve_zenodo(server: ContentServer, files: dict[str, str] | None = None) -> None:
    """Record 3242074 (one zip of a repository) and 3242075, the newer version (two files);
    3242073 is the concept record, which the API answers with its latest version."""
    api = "/zenodo/api/records"
    server.file(
        f"{api}/3242074/files/binder-demo-1.0.zip/content",
        zip_bytes(files or REPO_FILES, top="binder-demo-1.0/"),
    )
    server.json(f"{api}/3242074", "zenodo/record-3242074.json")
    server.json(f"{api}/3242074/files", "zenodo/files-3242074.json")
    server.file(f"{api}/3242075/files/requirements.txt/content", "six\n")
    server.file(f"{api}/3242075/files/data.zip/content", zip_bytes({"a.csv": "x\n1\n"}))
    server.json(f"{api}/3242075", "zenodo/record-3242075.json")
    server.json(f"{api}/3242075/files", "zenodo/files-3242075.json")
    server.redirect(f"{api}/3242073", f"{server.base}{api}/3242075")
    # doi.org sends Zenodo DOIs to a /doi/ page that redirects to the record.
    server.redirect(
        "/doi/10.5281/zenodo.3242074", f"{server.base}/zenodo/doi/10.5281/zenodo.3242074"
    )
    server.redirect(
        "/zenodo/doi/10.5281/zenodo.3242074", f"{server.base}/zenodo/records/3242074", 301
    )


def test_zenodo_doi_goes_through_the_resolver_and_fetches_the_record(server, tmp_path):
    serve_zenodo(server)
    settings = settings_for(server)
    source = source_for("doi:10.5281/zenodo.3242074", settings=settings)
    assert isinstance(source, ZenodoSource)
    assert source.repo_url == f"{server.base}/zenodo/records/3242074"
    commit = source.resolve()
    assert re.fullmatch(r"3242074-[0-9a-f]{12}", commit)

    fetched = source.fetch(tmp_path / "checkout")
    assert fetched.commit == commit
    # The zip's single top folder is flattened into the repository.
    assert listing(fetched.path) == sorted(REPO_FILES)
    assert (fetched.path / "requirements.txt").read_text() == "six\n"
    # Redirects stop at the record page; the landing page itself is never loaded.
    assert "/zenodo/records/3242074" not in server.paths
    assert all(h.get("user-agent", "").startswith("binderbox/") for _, h in server.requests)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkout"]


@pytest.mark.parametrize(
    "spec",
    [
        "10.5281/zenodo.3242074",
        "doi:10.5281/zenodo.3242074",
        "DOI:10.5281/ZENODO.3242074",
        "https://doi.org/10.5281/zenodo.3242074",
        "https://dx.doi.org/10.5281/zenodo.3242074/",
        "{base}/doi/10.5281/zenodo.3242074",
        "{base}/zenodo/records/3242074",
        "{base}/zenodo/record/3242074",
        "{base}/zenodo/records/3242074/",
        "{base}/zenodo/api/records/3242074",
        "{base}/zenodo/records/3242074/files/binder-demo-1.0.zip?download=1",
    ],
)
def test_zenodo_doi_and_record_url_forms(server, spec):
    serve_zenodo(server)
    server.redirect("/doi/10.5281/ZENODO.3242074", f"{server.base}/zenodo/records/3242074")
    source = source_for(spec.format(base=server.base), settings=settings_for(server))
    assert isinstance(source, ZenodoSource)
    assert source.record_id == "3242074"
    assert source.repo_url == f"{server.base}/zenodo/records/3242074"
    assert source.ref == ""


def test_zenodo_versions_have_their_own_content_ids(server, tmp_path):
    serve_zenodo(server)
    settings = settings_for(server)
    first = source_for(f"{server.base}/zenodo/records/3242074", settings=settings)
    again = source_for(f"{server.base}/zenodo/records/3242074", settings=settings)
    concept = source_for(f"{server.base}/zenodo/records/3242073", settings=settings)
    assert first.resolve() == again.resolve()
    # The concept record answers with its latest version: a different content id.
    assert concept.resolve().startswith("3242075-")
    assert concept.resolve() != first.resolve()
    # Two files: saved as they are, the zip among them is not unpacked.
    fetched = concept.fetch(tmp_path / "checkout")
    assert listing(fetched.path) == ["data.zip", "requirements.txt"]


def test_zenodo_content_id_follows_the_files(server):
    serve_zenodo(server)
    url = f"{server.base}/zenodo/records/3242074"
    before = source_for(url, settings=settings_for(server)).resolve()
    serve_zenodo(server, {**REPO_FILES, "requirements.txt": "six==1.16.0\n"})
    assert source_for(url, settings=settings_for(server)).resolve() != before


def test_zenodo_bare_record_id_for_the_service(server):
    serve_zenodo(server)
    source = content_source("zenodo", "3242074", settings_for(server))
    assert isinstance(source, ZenodoSource)
    assert source.repo_url == f"{server.base}/zenodo/records/3242074"


def test_zenodo_sandbox_is_known_without_settings():
    source = source_for("https://sandbox.zenodo.org/records/123", settings=Settings(ca_bundle=""))
    assert isinstance(source, ZenodoSource)
    assert source.api == "https://sandbox.zenodo.org/api"
    # The API is reached at the configured base, whatever scheme the address was typed with.
    plain = source_for("http://ZENODO.org/record/7", settings=Settings(ca_bundle=""))
    assert plain.repo_url == "https://zenodo.org/records/7"


# --- Figshare -------------------------------------------------------------------------------


def serve_figshare(server: ContentServer) -> None:
    """Article 9782777: version 1 is a tar.gz of a repository, version 2 (the latest) has
    two files and a link to another site."""
    server.file("/figshare-files/17512200", tar_gz_bytes(REPO_FILES, top="binder-demo/"))
    server.file("/figshare-files/17512301", "six\n")
    server.file("/figshare-files/17512302", '{"cells": []}\n')
    server.json("/figshare-api/v2/articles/9782777", "figshare/article-9782777.json")
    server.json("/figshare-api/v2/articles/9782777/versions/1", "figshare/article-9782777-v1.json")
    server.redirect(
        "/doi/10.6084/m9.figshare.9782777.v1",
        f"{server.base}/figshare/articles/dataset/Binder_demo/9782777/1",
    )


def test_figshare_doi_of_a_version(server, tmp_path):
    serve_figshare(server)
    source = source_for("10.6084/m9.figshare.9782777.v1", settings=settings_for(server))
    assert isinstance(source, FigshareSource)
    assert (source.article, source.version) == ("9782777", "1")
    assert source.resolve() == "9782777-v1"
    fetched = source.fetch(tmp_path / "checkout")
    assert listing(fetched.path) == sorted(REPO_FILES)


def test_figshare_latest_version_saves_files_as_they_are(server, tmp_path):
    serve_figshare(server)
    url = f"{server.base}/figshare/articles/dataset/Binder_demo/9782777"
    source = source_for(url, settings=settings_for(server))
    assert source.resolve() == "9782777-v2"
    fetched = source.fetch(tmp_path / "checkout")
    assert listing(fetched.path) == ["analysis.ipynb", "requirements.txt"]
    assert not any("example.org" in p for p in server.paths)


@pytest.mark.parametrize(
    ("path", "article", "version"),
    [
        ("/figshare/articles/dataset/Binder_demo/9782777", "9782777", ""),
        ("/figshare/articles/dataset/Binder_demo/9782777/3", "9782777", "3"),
        ("/figshare/articles/Binder_demo/9782777", "9782777", ""),
        ("/figshare/articles/9782777", "9782777", ""),
        ("/figshare/articles/9782777/", "9782777", ""),
    ],
)
def test_figshare_article_url_forms(server, path, article, version):
    source = source_for(server.base + path, settings=settings_for(server))
    assert isinstance(source, FigshareSource)
    assert (source.article, source.version) == (article, version)
    assert source.slug().endswith(f"/figshare/articles/{article}")


def test_figshare_portals_and_service_ids():
    settings = Settings(ca_bundle="")
    portal = source_for("https://rdr.figshare.com/articles/dataset/x/123/2", settings=settings)
    assert isinstance(portal, FigshareSource)
    assert portal.repo_url == "https://rdr.figshare.com/articles/123/2"
    assert portal.api == "https://api.figshare.com/v2"
    for spec, version in [("123", ""), ("123/2", "2"), ("123.v2", "2")]:
        source = content_source("figshare", spec, settings)
        assert isinstance(source, FigshareSource)
        assert (source.article, source.version) == ("123", version)


# --- Dataverse ------------------------------------------------------------------------------

PID = "doi:10.7910/DVN/TJCLKP"


def serve_dataverse(server: ContentServer) -> None:
    server.file("/dataverse/api/access/datafile/3323461", "six\n")
    server.file("/dataverse/api/access/datafile/3323462", "print('hello')\n")
    server.file("/dataverse/api/access/datafile/3323463?format=original", "a,b\n1,2\n")
    server.json(
        f"/dataverse/api/datasets/:persistentId?persistentId={PID}", "dataverse/dataset-TJCLKP.json"
    )
    server.json(
        f"/dataverse/api/datasets/:persistentId/versions/1.0?persistentId={PID}",
        "dataverse/version-1.0.json",
    )
    server.redirect(
        "/doi/10.7910/DVN/TJCLKP", f"{server.base}/dataverse/citation?persistentId={PID}"
    )


def test_dataverse_doi_fetches_the_latest_published_version(server, tmp_path):
    serve_dataverse(server)
    source = source_for("https://doi.org/10.7910/DVN/TJCLKP", settings=settings_for(server))
    assert isinstance(source, DataverseSource)
    assert source.pid == PID
    assert source.resolve() == "3323458-v2.1"
    fetched = source.fetch(tmp_path / "checkout")
    # Folders come from directoryLabel, ingested tables as uploaded, restricted files skipped.
    assert listing(fetched.path) == [
        "code/analysis.py",
        "data/measurements.csv",
        "requirements.txt",
    ]
    assert (fetched.path / "data/measurements.csv").read_text() == "a,b\n1,2\n"
    assert not any("3323464" in p for p in server.paths)


def test_dataverse_dataset_url_with_a_version(server, tmp_path):
    serve_dataverse(server)
    url = f"{server.base}/dataverse/dataset.xhtml?persistentId={PID}&version=1.0"
    source = source_for(url, settings=settings_for(server))
    assert isinstance(source, DataverseSource)
    assert source.version == "1.0"
    assert source.resolve() == "3323458-v1.0"
    assert listing(source.fetch(tmp_path / "checkout").path) == ["requirements.txt"]
    latest = source_for(url.split("&")[0], settings=settings_for(server))
    assert latest.resolve() != source.resolve()


def test_dataverse_well_known_installations_and_file_pages():
    settings = Settings(ca_bundle="")
    url = "https://dataverse.harvard.edu/dataset.xhtml?persistentId=doi:10.7910/DVN/TJCLKP"
    source = source_for(url, settings=settings)
    assert isinstance(source, DataverseSource)
    assert source.api == "https://dataverse.harvard.edu/api"
    with pytest.raises(UsageError, match="one file of a Dataverse dataset"):
        source_for(
            "https://dataverse.harvard.edu/file.xhtml?persistentId=doi:10.7910/DVN/TJCLKP/ABC",
            settings=settings,
        )


# --- HydroShare -----------------------------------------------------------------------------


def serve_hydroshare(server: ContentServer, updated: str = "2019-05-01T16:18:32.589479Z") -> None:
    bag = zip_bytes(
        {
            "bagit.txt": "BagIt-Version: 0.97\n",
            "manifest-md5.txt": "",
            "data/resourcemap.xml": "<rdf/>\n",
            "data/resourcemetadata.xml": "<rdf/>\n",
            "data/contents/requirements.txt": "six\n",
            "data/contents/notebook.ipynb": '{"cells": []}\n',
        },
        top=f"{HS_ID}/",
    )
    # The bag is prepared on demand: the first request is answered 202.
    server.add(
        f"/hydroshare/django_irods/download/bags/{HS_ID}.zip",
        Reply(202, b'{"bag_status": "Not ready"}', {"Content-Type": "application/json"}),
        Reply(200, bag, {"Content-Type": "application/zip"}),
    )
    server.json(
        f"/hydroshare/hsapi/resource/{HS_ID}/sysmeta/", "hydroshare/sysmeta.json", UPDATED=updated
    )
    server.redirect(f"/doi/10.4211/hs.{HS_ID}", f"{server.base}/hydroshare/resource/{HS_ID}")


def test_hydroshare_doi_fetches_the_bag_contents(server, tmp_path, monkeypatch):
    monkeypatch.setattr(hydroshare_module, "BAG_WAIT_SECONDS", 0.01)
    serve_hydroshare(server)
    source = source_for(f"doi:10.4211/hs.{HS_ID}", settings=settings_for(server))
    assert isinstance(source, HydroshareSource)
    assert source.resolve() == f"{HS_ID}-2019-05-01T16-18-32.589479Z"
    fetched = source.fetch(tmp_path / "checkout")
    assert listing(fetched.path) == ["notebook.ipynb", "requirements.txt"]
    assert server.paths.count(f"/hydroshare/django_irods/download/bags/{HS_ID}.zip") == 2


def test_hydroshare_content_id_changes_when_the_resource_is_updated(server):
    serve_hydroshare(server)
    url = f"{server.base}/hydroshare/resource/{HS_ID}/"
    before = source_for(url, settings=settings_for(server)).resolve()
    serve_hydroshare(server, updated="2020-02-11T08:00:00.000000Z")
    after = source_for(url, settings=settings_for(server)).resolve()
    assert before != after
    assert content_source("hydroshare", HS_ID, settings_for(server)).resolve() == after


# --- CKAN -----------------------------------------------------------------------------------


def serve_ckan(server: ContentServer, modified: str = "2021-02-10T09:20:00.123456") -> None:
    server.file(
        f"{CKAN_FILES}/9b1e8a3c-6f0d-4a5e-8a63-0c7e2b1d4f55/download/requirements.txt", "six\n"
    )
    server.file(
        f"{CKAN_FILES}/1c2d3e4f-5a6b-4c7d-8e9f-a0b1c2d3e4f5/download/survey results.csv", "q,a\n"
    )
    server.json("/ckan/api/3/action/status_show", "ckan/status_show.json")
    server.json(
        "/ckan/api/3/action/package_show?id=binder-demo",
        "ckan/package_show.json",
        MODIFIED=modified,
    )


def test_ckan_dataset_on_a_host_that_answers_as_ckan(server, tmp_path):
    serve_ckan(server)
    source = source_for(f"{server.base}/ckan/dataset/binder-demo", settings=settings_for(server))
    assert isinstance(source, CkanSource)
    assert source.resolve() == f"{CKAN_ID}-2021-02-10T09-20-00.123456"
    fetched = source.fetch(tmp_path / "checkout")
    # Uploaded resources are the files; a link to another site is not fetched.
    assert listing(fetched.path) == ["requirements.txt", "survey results.csv"]
    assert "/ckan/api/3/action/status_show" in server.paths
    assert not any("example.org" in p for p in server.paths)


def test_ckan_configured_host_needs_no_probe_and_versions_follow_modification(server):
    serve_ckan(server)
    settings = settings_for(server, ckan_hosts=f"{server.base}/ckan")
    url = f"{server.base}/ckan/dataset/binder-demo"
    before = source_for(url, settings=settings).resolve()
    assert "/ckan/api/3/action/status_show" not in server.paths
    serve_ckan(server, modified="2022-06-01T10:00:00.000000")
    assert source_for(url, settings=settings).resolve() != before
    escaped = "http%3A%2F%2F" + url.removeprefix("http://").replace("/", "%2F")
    assert isinstance(content_source("ckan", escaped, settings), CkanSource)


def test_a_dataset_url_on_a_host_that_is_not_ckan_is_a_git_url(server):
    source = source_for(f"{server.base}/somewhere/dataset/thing", settings=settings_for(server))
    assert isinstance(source, GitSource)


# --- choosing a source, and failures ----------------------------------------------------------


def test_git_urls_and_folders_are_unchanged(server, tmp_path):
    settings = settings_for(server)
    assert isinstance(source_for("https://github.com/org/repo", settings=settings), GitSource)
    assert isinstance(source_for("git@github.com:org/repo.git", "main", settings), GitSource)
    assert isinstance(source_for(str(tmp_path), settings=settings), LocalSource)
    assert server.requests == []


def test_ref_is_refused_for_records(server):
    serve_zenodo(server)
    with pytest.raises(UsageError, match="--ref only applies to git URLs"):
        source_for(f"{server.base}/zenodo/records/3242074", "v1", settings_for(server))


def test_unknown_doi(server):
    with pytest.raises(SourceError, match=r"The DOI 10\.5281/zenodo\.1 does not exist"):
        source_for("10.5281/zenodo.1", settings=settings_for(server))


def test_doi_that_leads_to_no_known_provider(server):
    server.redirect("/doi/10.1234/paper", f"{server.base}/journal/paper.html")
    server.file("/journal/paper.html", "<html></html>")
    with pytest.raises(SourceError, match="which is not a record binderbox can fetch"):
        source_for("10.1234/paper", settings=settings_for(server))


def test_missing_record(server, tmp_path):
    source = source_for(f"{server.base}/zenodo/records/999", settings=settings_for(server))
    with pytest.raises(SourceError, match=r"The Zenodo record 999 was not found .*404"):
        source.resolve()


def test_page_on_a_provider_that_is_not_a_record(server):
    with pytest.raises(UsageError, match="is on Zenodo but is not the address of a record"):
        source_for(f"{server.base}/zenodo/communities/demo", settings=settings_for(server))


def test_service_spec_of_another_provider_is_refused(server):
    serve_figshare(server)
    with pytest.raises(UsageError, match="is a Figshare article, not a Zenodo one"):
        content_source("zenodo", "10.6084/m9.figshare.9782777.v1", settings_for(server))
    with pytest.raises(UsageError, match="not a content provider"):
        content_source("dropbox", "x", settings_for(server))


def test_archive_escaping_the_repository_is_refused_and_nothing_is_left(server, tmp_path):
    serve_zenodo(server, {"../../etc/passwd": "root:x:0:0\n", "requirements.txt": "six\n"})
    source = source_for(f"{server.base}/zenodo/records/3242074", settings=settings_for(server))
    with pytest.raises(SourceError) as caught:
        source.fetch(tmp_path / "checkout")
    assert caught.value.message == (
        "Could not use the Zenodo record 3242074: the archive binder-demo-1.0.zip contains "
        "a path outside the repository: binder-demo-1.0/../../etc/passwd."
    )
    assert list(tmp_path.iterdir()) == []


def test_download_over_the_size_limit_is_refused_whatever_the_api_says(server, tmp_path):
    serve_zenodo(server)
    api = "/zenodo/api/records/3242075"
    server.file(f"{api}/files/big.bin/content", b"\0" * 5000)
    entry = {"key": "big.bin", "size": 10, "links": {"content": f"{api}/files/big.bin/content"}}
    server.json(f"{api}/files", {"enabled": True, "entries": [entry]})
    settings = settings_for(server, content_max_bytes=1000)
    source = source_for(f"{server.base}/zenodo/records/3242075", settings=settings)
    with pytest.raises(SourceError, match="is larger than the limit of 1 kB"):
        source.fetch(tmp_path / "checkout")
    assert list(tmp_path.iterdir()) == []


def test_too_many_files_in_a_record(server, tmp_path):
    serve_zenodo(server)
    settings = settings_for(server, content_max_files=1)
    source = source_for(f"{server.base}/zenodo/records/3242075", settings=settings)
    with pytest.raises(SourceError, match="has more than 1 files"):
        source.fetch(tmp_path / "checkout")
    assert list(tmp_path.iterdir()) == []


def test_damaged_download_is_refused(server, tmp_path):
    serve_zenodo(server)
    server.file("/zenodo/api/records/3242075/files/requirements.txt/content", "numpy\n")
    source = source_for(f"{server.base}/zenodo/records/3242075", settings=settings_for(server))
    with pytest.raises(SourceError, match="does not match the checksum"):
        source.fetch(tmp_path / "checkout")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../evil.txt", "dir/evil.txt", "..", ""])
def test_file_names_from_the_api_are_checked(server, tmp_path, name):
    serve_zenodo(server)
    entry = {"key": name, "size": 1, "links": {"content": "/x"}}
    server.json("/zenodo/api/records/3242075/files", {"enabled": True, "entries": [entry]})
    source = source_for(f"{server.base}/zenodo/records/3242075", settings=settings_for(server))
    with pytest.raises(SourceError, match="not a plain file name"):
        source.resolve()


def test_unreachable_provider(tmp_path):

    settings = Settings(ca_bundle="", zenodo_url=f"http://127.0.0.1:{free_port()}")
    source = content_source("zenodo", "1", settings)
    with pytest.raises(SourceError, match="Could not fetch the Zenodo record 1: could not connect"):
        source.resolve()


def test_settings_for_content_providers_are_checked():
    base = {"BINDERBOX_CA_BUNDLE": ""}
    settings = load_settings(
        environ={**base, "BINDERBOX_DATAVERSE_HOSTS": "https://a.example, https://b.example/dv"}
    )
    assert [site.base for site in DataverseSource.sites(settings)][-2:] == [
        "https://a.example",
        "https://b.example/dv",
    ]
    with pytest.raises(UsageError, match="'ckan_hosts' must hold http"):
        load_settings(environ={**base, "BINDERBOX_CKAN_HOSTS": "ckan.example.org"})
    with pytest.raises(UsageError, match="'content_max_files' must be a positive"):
        load_settings(environ={**base, "BINDERBOX_CONTENT_MAX_FILES": "0"})


def test_the_extra_ca_bundle_is_trusted_next_to_the_system_ones(tmp_path):
    assert http_module._tls(Settings(ca_bundle="")) is True
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if not bundle.exists():
        pytest.skip("no CA bundle on this machine")
    context = http_module._tls(Settings(ca_bundle=str(bundle)))
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.cert_store_stats()["x509_ca"] > 0


# --- end to end: the real CLI builds an image from a record ----------------------------------


@pytest.mark.docker
def test_build_an_image_from_a_zenodo_record(server, base_image, built_images):
    serve_zenodo(
        server,
        {"requirements.txt": "six\n", "hello.txt": "hello from zenodo\n"},
    )
    result = binderbox(
        "build", "--json-logs", f"{server.base}/zenodo/records/3242074", env=env_for(server)
    )
    assert result.code == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.image
    built_images.add(result.image)
    assert result.image.split(":", 1)[1].startswith("3242074-")
    shown = run_in_image(result.image, "sh", "-c", "cat hello.txt && python -c 'import six'")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == "hello from zenodo\n"
    phases = [event["phase"] for event in result.events]
    assert phases[0] == "fetching" and phases[-1] == "built"
