"""The index_url setting: every build installs from the operator's package index, and
sources that name PyPI itself mean that index. Pure tests first, then real builds against
a PEP 503 index this test serves (of a wheel it writes) where build steps reach it."""

from __future__ import annotations

import base64
import hashlib
import http.server
import ipaddress
import json
import threading
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from tests.conftest import binderbox, run_in_image
from tests.test_service_build import build_path, building_service, phases, served_repo

from binderbox.builder import base, package_index, pipfile
from binderbox.builder.plan import BuildPlan, Requirements
from binderbox.builder.render import ImageOptions, render
from binderbox.config import HOST_CA_BUNDLE, load_settings
from binderbox.errors import UsageError

MIRROR = "https://pypi.example.org/mirror/simple"


# --- which addresses are PyPI -----------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://pypi.org/simple",
        "https://pypi.org/simple/",
        "http://pypi.org/simple",
        "https://pypi.org",
        "https://pypi.python.org/simple",
        "http://pypi.python.org/simple/",
        "https://pypi.python.org",
        "https://files.pythonhosted.org",
        "https://files.pythonhosted.org/simple",
        "HTTPS://PyPI.org/simple",
    ],
)
def test_addresses_of_pypi_itself(url):
    assert package_index.names_pypi(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://test.pypi.org/simple",
        "https://pypi.org.example.com/simple",
        "https://download.pytorch.org/whl/cpu",
        "https://pypi.org/project/six",
        "https://pypi.org:8443/simple",
        "https://user:token@pypi.org/simple",
        "ftp://pypi.org/simple",
        "",
    ],
)
def test_addresses_that_are_not_pypi(url):
    assert not package_index.names_pypi(url)


# --- the setting ------------------------------------------------------------------------------


def test_the_default_is_pypi():
    assert load_settings(environ={"BINDERBOX_CA_BUNDLE": ""}).index_url == (
        "https://pypi.org/simple"
    )
    settings = load_settings(environ={"BINDERBOX_CA_BUNDLE": "", "BINDERBOX_INDEX_URL": MIRROR})
    assert settings.index_url == MIRROR


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("https://alice:secret@mirror.example.org/simple", "user name or password"),
        ("mirror.example.org/simple", "http(s) address"),
        ('https://mirror.example.org/"simple', "http(s) address"),
        ("https://mirror.example.org/sim ple", "http(s) address"),
        ("https://mirror.example.org/$HOME", "http(s) address"),
    ],
)
def test_an_unusable_index_is_refused_with_one_sentence(value, words):
    with pytest.raises(UsageError) as info:
        load_settings(environ={"BINDERBOX_CA_BUNDLE": "", "BINDERBOX_INDEX_URL": value})
    assert "index_url" in info.value.message and words in info.value.message
    assert "secret" not in info.value.message


# --- Pipfile and Pipfile.lock sources ---------------------------------------------------------


def pipfile_with_sources(*urls: str) -> str:
    sources = "".join(f'[[source]]\nurl = "{url}"\nname = "s{i}"\n\n' for i, url in enumerate(urls))
    return sources + '[packages]\nsix = "*"\n'


@pytest.mark.parametrize(
    "url",
    [
        "https://pypi.python.org/simple",
        "https://pypi.org/simple",
        "http://pypi.python.org/simple/",
        "https://files.pythonhosted.org",
    ],
)
def test_a_pipfile_source_naming_pypi_means_the_configured_index(url):
    derived = pipfile.from_pipfile(pipfile_with_sources(url), "Pipfile")
    assert derived.text.splitlines() == ["six"]


def test_other_pipfile_sources_stay_as_written():
    derived = pipfile.from_pipfile(
        pipfile_with_sources("https://pypi.python.org/simple", "https://extra.example.org/simple"),
        "Pipfile",
    )
    assert derived.text.splitlines() == [
        "--extra-index-url https://extra.example.org/simple",
        "six",
    ]


def test_lock_sources_are_read_like_the_pipfiles():
    lock = {
        "_meta": {
            "sources": [
                {"name": "pypi", "url": "https://pypi.python.org/simple", "verify_ssl": True},
                {"name": "own", "url": "https://extra.example.org/simple", "verify_ssl": True},
            ]
        },
        "default": {"six": {"version": "==1.16.0"}},
    }
    derived = pipfile.from_lock(json.dumps(lock), "Pipfile.lock")
    assert derived.text.splitlines() == [
        "--extra-index-url https://extra.example.org/simple",
        "six==1.16.0",
    ]


# --- the Dockerfile ---------------------------------------------------------------------------

PLAN = BuildPlan(requirements=Requirements(path="requirements.txt", local=False))


def dockerfile(**options) -> list[str]:
    return render(PLAN, ImageOptions(base_image="binderbox/base:x", **options)).dockerfile.split(
        "\n"
    )


def test_pypi_adds_nothing_to_the_dockerfile():
    plain = dockerfile()
    assert not [line for line in plain if "UV_DEFAULT_INDEX" in line or "PIP_INDEX_URL" in line]
    assert dockerfile(index_url="https://pypi.python.org/simple") == plain
    assert dockerfile(index_url=package_index.DEFAULT_INDEX) == plain


@pytest.mark.parametrize("foreign", [False, True])
def test_the_index_is_set_before_anything_is_installed(foreign):
    lines = dockerfile(index_url=MIRROR, foreign_base=foreign)
    env = [i for i, line in enumerate(lines) if line.startswith("ENV UV_DEFAULT_INDEX=")]
    assert len(env) == 1
    assert lines[env[0]] == f"ENV UV_DEFAULT_INDEX={MIRROR} PIP_INDEX_URL={MIRROR}"
    installs = [i for i, line in enumerate(lines) if "install" in line and line.startswith("RUN")]
    assert installs and env[0] < min(installs)


def test_an_unusable_index_never_reaches_the_dockerfile():
    with pytest.raises(UsageError, match="index_url"):
        dockerfile(index_url="https://mirror.example.org/x\nRUN rm -rf /")


def test_the_base_gets_the_index_as_build_arguments_only():
    plain = base._finishing_dockerfile("ROOTFS")
    assert "INDEX" not in plain
    mirrored = base._finishing_dockerfile("ROOTFS", MIRROR)
    assert f"ARG UV_DEFAULT_INDEX={MIRROR}\nARG PIP_INDEX_URL={MIRROR}\n" in mirrored
    # Not in the base's environment, which images built on it would inherit.
    assert not [
        line for line in mirrored.splitlines() if line.startswith("ENV") and "INDEX" in line
    ]
    assert base._finishing_dockerfile("ROOTFS", "https://pypi.org/simple/") == plain


# --- real builds through a package index the test serves --------------------------------------

PROBE = "binderbox-index-probe"
PROBE_MODULE = "binderbox_index_probe"


def probe_wheel(folder: Path) -> Path:
    """A pure-Python wheel of PROBE, written by hand (a wheel is a zip with dist-info)."""
    dist_info = f"{PROBE_MODULE}-1.0.dist-info"
    files = {
        f"{PROBE_MODULE}/__init__.py": 'SERVED_BY = "the test index"\n',
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {PROBE}\nVersion: 1.0\n",
        f"{dist_info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: binderbox-tests\nRoot-Is-Purelib: true\n"
            "Tag: py3-none-any\n"
        ),
    }
    record = []
    for name, text in files.items():
        digest = hashlib.sha256(text.encode()).digest()
        encoded = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        record.append(f"{name},sha256={encoded},{len(text.encode())}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = "\n".join(record) + "\n"
    wheel = folder / f"{PROBE_MODULE}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return wheel


@dataclass
class ServedIndex:
    """The test's index: every build gets its own address on it (uv's cache is kept per
    index address, so each build really downloads), and every request is recorded."""

    root: str
    requests: list[str] = field(default_factory=list)
    # New for every run: BuildKit's layer cache never holds a step of an earlier run.
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def url(self, name: str) -> str:
        return f"{self.root}/{name}-{self.run}/simple"

    def asked(self, name: str) -> set[str]:
        """The paths asked for (GET) through ``name``'s address, without that prefix."""
        prefix = f"GET /{name}-{self.run}/"
        return {"/" + r[len(prefix) :] for r in self.requests if r.startswith(prefix)}

    def downloads(self, name: str) -> list[str]:
        """The wheels fetched through ``name``'s address."""
        return [path for path in self.asked(name) if path.endswith(".whl")]


def docker_gateway(docker_client) -> str:
    """The host's address on Docker's default bridge: where build steps reach the host."""
    config = docker_client.networks.get("bridge").attrs["IPAM"]["Config"][0]
    # dockerd leaves Gateway out when it chose the default, the subnet's first address.
    return config.get("Gateway") or str(next(ipaddress.ip_network(config["Subnet"]).hosts()))


@pytest.fixture(scope="module")
def served_index(docker_client, tmp_path_factory) -> Iterator[ServedIndex]:
    """A PEP 503 simple index of the probe wheel, listening on the docker0 gateway."""
    folder = tmp_path_factory.mktemp("index")
    wheel = probe_wheel(folder)
    data = wheel.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    project_page = (
        f'<!DOCTYPE html><html><body><a href="../../files/{wheel.name}#sha256={sha}">'
        f"{wheel.name}</a></body></html>"
    ).encode()
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.answer(with_body=True)

        def do_HEAD(self) -> None:  # uv asks first whether it may read wheels in ranges
            self.answer(with_body=False)

        def answer(self, with_body: bool) -> None:
            seen.append(f"{self.command} {self.path}")
            # /<build's own name>/simple/<project>/ and /<name>/files/<wheel>
            _, _, path = self.path.lstrip("/").partition("/")
            if path.rstrip("/") == f"simple/{PROBE}":
                body, kind = project_page, "text/html"
            elif path == f"files/{wheel.name}":
                body, kind = data, "application/octet-stream"
            elif path.startswith("simple/") and path.count("/") == 2:
                # Any other project: PyPI's own page, as a mirror would serve it (its links
                # point at files.pythonhosted.org, which builds reach themselves).
                body, kind = pypi_page(path.split("/")[1]), "text/html"
                if body is None:
                    self.send_error(404)
                    return
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer((docker_gateway(docker_client), 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        yield ServedIndex(f"http://{host}:{port}", seen)
    finally:
        server.shutdown()
        server.server_close()


def pypi_page(project: str) -> bytes | None:
    """PyPI's simple page of ``project`` (HTML), or None when PyPI does not know it."""
    answer = requests.get(
        f"https://pypi.org/simple/{project}/",
        headers={"Accept": "text/html"},
        timeout=60,
        verify=str(HOST_CA_BUNDLE) if HOST_CA_BUNDLE.exists() else True,
    )
    return answer.content if answer.status_code == 200 else None


def reachable_from_containers(url: str, image: str) -> bool:
    """Whether a container on Docker's default bridge (where build steps run) reaches
    ``url``: not while a root ``binderbox serve`` elsewhere holds its build firewall up."""
    probe = f"import urllib.request as u; u.urlopen({url + '/' + PROBE + '/'!r}, timeout=5)"
    return run_in_image(image, "python3", "-c", probe, timeout=60).returncode == 0


@pytest.fixture
def index_for(served_index, base_image):
    """``name`` → the test index's address for one build, once build steps can reach it."""

    def url(name: str) -> str:
        address = served_index.url(name)
        if not reachable_from_containers(address, base_image):
            pytest.skip("a binderbox serve running as root keeps build steps from this host now")
        return address

    return url


def build_with_index(repo: Path, index_url: str, built_images: set[str], *flags: str):
    # The CLI: no serve, so no build firewall between build steps and the host.
    result = binderbox(
        "build", "--json-logs", *flags, str(repo), env={"BINDERBOX_INDEX_URL": index_url}
    )
    if result.image:
        built_images.add(result.image)
    return result


def probe_in(image: str) -> str:
    shown = run_in_image(
        image, "python", "-c", f"import {PROBE_MODULE}; print({PROBE_MODULE}.SERVED_BY)"
    )
    assert shown.returncode == 0, shown.stderr
    return shown.stdout.strip()


@pytest.mark.docker
def test_a_pipfile_naming_old_pypi_installs_from_the_configured_index(
    base_image, built_images, make_repo, served_index, index_for
):
    repo = make_repo(
        {
            "Pipfile": (
                '[[source]]\nurl = "https://pypi.python.org/simple"\nverify_ssl = true\n'
                f'name = "pypi"\n\n[packages]\n{PROBE} = "*"\n'
            )
        }
    )
    index_url = index_for("pipfile")
    result = build_with_index(repo, index_url, built_images)
    assert result.code == 0, (result.stderr, result.failure)
    assert probe_in(result.image) == "the test index"
    wheel = f"/files/{PROBE_MODULE}-1.0-py3-none-any.whl"
    assert served_index.downloads("pipfile") and set(served_index.downloads("pipfile")) == {wheel}
    # Sessions' pip and uv use it too.
    shown = run_in_image(result.image, "sh", "-c", "echo $PIP_INDEX_URL $UV_DEFAULT_INDEX")
    assert shown.stdout.split() == [index_url, index_url]


@pytest.mark.docker
def test_requirements_txt_installs_from_the_configured_index(
    base_image, built_images, make_repo, served_index, index_for
):
    repo = make_repo({"requirements.txt": f"{PROBE}==1.0\n"})
    result = build_with_index(repo, index_for("requirements"), built_images)
    assert result.code == 0, (result.stderr, result.failure)
    assert probe_in(result.image) == "the test index"
    assert served_index.downloads("requirements")


@pytest.fixture
def bare_base(docker_client, base_image, built_images) -> str:
    """binderbox's base without uv and the server stack: an image like any other, for which
    the build must install both."""
    container = docker_client.containers.run(
        base_image, ["rm", "-rf", "/opt/binderbox-uv", "/srv/venv", "/usr/local/bin/uv"],
        detach=True,
    )  # fmt: skip
    try:
        assert container.wait(timeout=60)["StatusCode"] == 0
        name = f"binderbox-test-bare-base:{uuid.uuid4().hex[:8]}"
        container.commit(*name.split(":"))
    finally:
        container.remove(force=True)
    built_images.add(name)
    return name


@pytest.mark.docker
def test_another_base_gets_uv_and_the_server_stack_from_the_index(
    built_images, make_repo, served_index, index_for, bare_base
):
    repo = make_repo({"requirements.txt": f"{PROBE}\n"})
    flags = ("--base-image", bare_base)
    result = build_with_index(repo, index_for("foreign"), built_images, *flags)
    assert result.code == 0, (result.stderr, result.failure)
    assert probe_in(result.image) == "the test index"
    asked = served_index.asked("foreign")
    assert "/simple/uv/" in asked  # pip, installing uv
    assert "/simple/jupyter-server/" in asked  # uv, installing the server stack
    assert served_index.downloads("foreign")


@pytest.mark.docker
def test_a_launch_through_the_service_builds_from_the_index_and_finds_its_image(
    base_image, built_images, git_server, tmp_path, served_index, index_for
):
    url = served_repo(git_server, tmp_path, {"requirements.txt": f"{PROBE}\n"}, "indexed")
    index_url = index_for("service")
    # In-process service: no build firewall (that is serve's, as root) in front of the host.
    with building_service(built_images, "index", index_url=index_url) as svc:
        events, _ = svc.events(build_path(url, build_only="true"))
        assert phases(events)[-2:] == ["built", "ready"], events[-1]
        image = events[-1]["image"]
        assert probe_in(image) == "the test index"
        assert served_index.downloads("service")
        again, _ = svc.events(build_path(url, build_only="true"))
        assert phases(again) == ["fetching", "built", "ready"]
        assert again[-1]["image"] == image


def test_a_plain_http_mirror_is_trusted_by_pip():
    devpi = "http://devpi.example.org:3141/root/pypi/+simple/"
    env = [line for line in dockerfile(index_url=devpi) if line.startswith("ENV UV_DEFAULT")]
    assert env == [
        f"ENV UV_DEFAULT_INDEX={devpi} PIP_INDEX_URL={devpi}"
        " PIP_TRUSTED_HOST=devpi.example.org:3141"
    ]
