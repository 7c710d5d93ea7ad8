"""Shared fixtures: a real dockerd, the real base image, fixture repositories on disk,
and a git daemon on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docker
import pytest

# The Swarm cluster: one for the whole test session. Defined once here — a session-scoped
# fixture imported into two test modules is two fixtures, and two clusters in one swarm
# placed one's sessions on the other's workers.
from tests.cluster import cluster  # noqa: F401

BINDERBOX = [sys.executable, "-m", "binderbox"]


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str
    events: list[dict] = field(default_factory=list)

    @property
    def image(self) -> str:
        built = [e for e in self.events if e.get("phase") == "built" and e.get("image")]
        return built[-1]["image"] if built else ""

    @property
    def failure(self) -> dict:
        failed = [e for e in self.events if e.get("phase") == "failed"]
        return failed[-1] if failed else {}


def binderbox(*args: str, timeout: float = 900, env: dict | None = None) -> CliResult:
    """Run the real ``binderbox`` command and parse JSON log lines when present."""
    proc = subprocess.run(
        [*BINDERBOX, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )
    events = []
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return CliResult(proc.returncode, proc.stdout, proc.stderr, events)


@pytest.fixture(scope="session")
def docker_client() -> docker.DockerClient:
    client = docker.from_env()
    client.ping()  # fails loudly: these tests need a running dockerd
    return client


@pytest.fixture(scope="session")
def base_image(docker_client: docker.DockerClient) -> str:
    """The bookworm base image, bootstrapped once if this machine has none."""
    result = binderbox("base", timeout=1200)
    assert result.code == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def built_images(docker_client: docker.DockerClient) -> Iterator[set[str]]:
    """Names of images the tests built; removed at the end (layers stay in the cache)."""
    names: set[str] = set()
    yield names
    # The shared base stays for the next run, even when a test's image is the base itself
    # (a Dockerfile that adds nothing to it) and removing it would remove the base.
    bases = {image.id for image in docker_client.images.list("binderbox/base")}
    for name in names:
        try:
            if name.startswith("binderbox/base") or docker_client.images.get(name).id in bases:
                continue
        except docker.errors.APIError:
            continue
        try:
            docker_client.images.remove(name, force=True)
        except docker.errors.APIError:
            pass


RepoFiles = dict[str, "str | tuple[str, int]"]


@pytest.fixture
def make_repo(tmp_path: Path) -> Callable[..., Path]:
    """Write a fixture repository: ``{"binder/apt.txt": "...", "postBuild": (text, 0o755)}``."""
    counter = iter(range(1000))

    def make(files: RepoFiles, name: str = "") -> Path:
        root = tmp_path / (name or f"repo{next(counter)}")
        root.mkdir(parents=True)
        for rel, content in files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            mode = None
            if isinstance(content, tuple):
                content, mode = content
            path.write_text(content)
            if mode is not None:
                path.chmod(mode)
        return root

    return make


@pytest.fixture
def build(base_image: str, built_images: set[str]) -> Callable[..., CliResult]:
    """``binderbox build --json-logs ...``; the built image is cleaned up after the session."""

    def run(*args: str) -> CliResult:
        result = binderbox("build", "--json-logs", *args)
        if result.image:
            built_images.add(result.image)
        return result

    return run


def run_in_image(image: str, *command: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a command in a built image (through its entrypoint and `start`)."""
    return subprocess.run(
        ["docker", "run", "--rm", image, *command],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout} s")


def git(*args: str, cwd: Path) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "Test",
        "GIT_AUTHOR_EMAIL": "test@example.org",
        "GIT_COMMITTER_NAME": "Test",
        "GIT_COMMITTER_EMAIL": "test@example.org",
    }
    return subprocess.run(
        ["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True
    ).stdout.strip()


@dataclass
class GitServer:
    root: Path
    port: int

    def url(self, name: str) -> str:
        return f"git://127.0.0.1:{self.port}/{name}"

    def publish(self, work: Path, name: str) -> str:
        """Push a work tree's commits to a bare repository served as ``name``."""
        bare = self.root / name
        if not bare.exists():
            subprocess.run(
                ["git", "init", "--quiet", "--bare", str(bare)], check=True, capture_output=True
            )
        git("push", "--quiet", "--all", "--force", str(bare), cwd=work)
        git("push", "--quiet", "--tags", "--force", str(bare), cwd=work)
        # Serve the work tree's branch as HEAD, whatever init.defaultBranch says.
        branch = git("symbolic-ref", "--short", "HEAD", cwd=work)
        git("symbolic-ref", "HEAD", f"refs/heads/{branch}", cwd=bare)
        return self.url(name)


@pytest.fixture(scope="session")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitServer]:
    """``git daemon`` on 127.0.0.1 serving bare repositories from a temp dir."""
    root = tmp_path_factory.mktemp("git-served")
    port = free_port()
    proc = subprocess.Popen(
        [
            "git",
            "daemon",
            "--reuseaddr",
            "--export-all",
            "--listen=127.0.0.1",
            f"--port={port}",
            f"--base-path={root}",
            str(root),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield GitServer(root, port)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def commit_all(work: Path, message: str = "change") -> str:
    """Commit everything in ``work`` (initialising it on first use); return the commit."""
    if not (work / ".git").exists():
        git("init", "--quiet", "--initial-branch=main", cwd=work)
    git("add", "-A", cwd=work)
    git("commit", "--quiet", "--allow-empty", "-m", message, cwd=work)
    return git("rev-parse", "HEAD", cwd=work)


# ---------- A real browser: Debian's chromium driven by Playwright ----------

CHROMIUM = "/usr/bin/chromium"
# Screenshots of each page, kept per run as test artefacts (ignored by git).
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser() -> Iterator:
    """A headless chromium per test module (Playwright cannot download browsers here).
    Not per session: Playwright's sync API keeps an event loop running in the main thread
    while it is open, and later tests call asyncio.run()."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("needs chromium (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A fresh browser page, for a test that fails on JavaScript errors in it."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors: {errors}"


def shot(page, name: str, full_page: bool = False) -> None:
    """Keep a screenshot of ``page`` as artifacts/<name>.png."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=full_page)


def firewall_possible() -> bool:
    """Whether binderbox can set its firewall rules here: root, and iptables showing the
    DOCKER-USER chain that dockerd made (same iptables backend as dockerd's)."""
    if os.geteuid() != 0 or shutil.which("iptables") is None:
        return False
    shown = subprocess.run(["iptables", "-w", "-S", "DOCKER-USER"], capture_output=True)
    return shown.returncode == 0
