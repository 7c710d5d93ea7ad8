"""Git goes only where it was checked: real git servers on loopback addresses.

127.0.0.1 is allow-listed (the operator's own git server); 127.0.0.2 stands in for a
private host nobody allowed. Smart-HTTP servers run ``git http-backend`` behind a small
CGI runner that logs every request, so "nothing was fetched from there" is an empty log.
The DNS rebinding case runs the fetch in a mount namespace whose /etc/resolv.conf points
at a DNS stand-in this test runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import socketserver
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import docker
import pytest

from binderbox.errors import SourceError
from binderbox.providers.git import GitPolicy, GitSource
from conftest import commit_all, git

ALLOWED = ("127.0.0.1",)
PRIVATE = "127.0.0.2"


# --- servers -------------------------------------------------------------------------------


class GitHttp:
    """A smart-HTTP git server (``git http-backend``) on one address, logging requests."""

    def __init__(self, address: str, root: Path, port: int = 0) -> None:
        self.address = address
        self.root = root
        self.log: list[str] = []
        # Path prefix → absolute URL prefix it redirects to.
        self.redirects: dict[str, str] = {}
        # Bytes per second answers are sent at (0: as fast as they go), like a far server.
        self.rate = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.serve(self)

            def do_POST(self) -> None:
                owner.serve(self)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer((address, port), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://{self.address}:{self.port}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def serve(self, request: BaseHTTPRequestHandler) -> None:
        self.log.append(f"{request.command} {request.path}")
        path, _, query = request.path.partition("?")
        for prefix, target in self.redirects.items():
            if path.startswith(prefix):
                request.send_response(302)
                location = target + path[len(prefix) :] + (f"?{query}" if query else "")
                request.send_header("Location", location)
                request.send_header("Content-Length", "0")
                request.end_headers()
                return
        body = _request_body(request)
        env = {
            "PATH": os.environ["PATH"],
            "GIT_PROJECT_ROOT": str(self.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "REQUEST_METHOD": request.command,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "CONTENT_TYPE": request.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": request.client_address[0],
            "HTTP_GIT_PROTOCOL": request.headers.get("Git-Protocol", ""),
            "HTTP_CONTENT_ENCODING": request.headers.get("Content-Encoding", ""),
        }
        result = subprocess.run(
            ["git", "http-backend"], input=body, env=env, capture_output=True, check=False
        )
        head, _, payload = result.stdout.partition(b"\r\n\r\n")
        status = 200
        headers: list[tuple[str, str]] = []
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value.strip()))
        request.send_response(status)
        for name, value in headers:
            request.send_header(name, value)
        request.send_header("Content-Length", str(len(payload)))
        request.end_headers()
        if not self.rate:
            request.wfile.write(payload)
            return
        step = max(1, self.rate // 20)
        with contextlib.suppress(OSError):  # the client may hang up mid-way
            for start in range(0, len(payload), step):
                request.wfile.write(payload[start : start + step])
                time.sleep(0.05)


def _request_body(request: BaseHTTPRequestHandler) -> bytes:
    if request.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(request.rfile.readline().split(b";")[0], 16)
            if size == 0:
                request.rfile.readline()
                return b"".join(chunks)
            chunks.append(request.rfile.read(size))
            request.rfile.readline()
    length = int(request.headers.get("Content-Length") or 0)
    return request.rfile.read(length) if length else b""


def publish(root: Path, work: Path, name: str) -> None:
    """Push ``work``'s branches to the bare repository ``root/name`` (HEAD → main)."""
    bare = root / name
    if not bare.exists():
        subprocess.run(["git", "init", "--quiet", "--bare", str(bare)], check=True)
    git("push", "--quiet", "--all", "--force", str(bare), cwd=work)
    git("symbolic-ref", "HEAD", "refs/heads/main", cwd=bare)


def repo(work: Path, files: dict[str, str]) -> str:
    for rel, text in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(text)
    return commit_all(work, "files")


def with_submodule(work: Path, path: str, url: str, commit: str) -> str:
    """Record a submodule at ``path`` with ``url`` (nothing is fetched to make it)."""
    git("update-index", "--add", "--cacheinfo", f"160000,{commit},{path}", cwd=work)
    (work / ".gitmodules").write_text(f'[submodule "{path}"]\n\tpath = {path}\n\turl = {url}\n')
    git("add", ".gitmodules", cwd=work)
    git("commit", "--quiet", "-m", f"submodule {path}", cwd=work)
    return git("rev-parse", "HEAD", cwd=work)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[GitHttp, GitHttp]]:
    """The same repositories served on 127.0.0.1 (allowed) and 127.0.0.2 (private), on
    one port, so a client sent to the wrong address would find what it asked for."""
    root = tmp_path / "served"
    root.mkdir()
    for _ in range(20):
        allowed = GitHttp("127.0.0.1", root)
        try:
            private = GitHttp(PRIVATE, root, allowed.port)
            break
        except OSError:
            allowed.close()
    else:
        pytest.fail("no port free on both 127.0.0.1 and 127.0.0.2")
    try:
        yield allowed, private
    finally:
        allowed.close()
        private.close()


def service_policy(**limits: object) -> GitPolicy:
    return GitPolicy(allowed_hosts=ALLOWED, **limits)  # type: ignore[arg-type]


def fetch_refused(source: GitSource, dest: Path) -> str:
    with pytest.raises(SourceError) as refused:
        source.fetch(dest)
    message = refused.value.message
    assert message.strip() and "\n" not in message and "Traceback" not in message, message
    return message


# --- submodules ------------------------------------------------------------------------------


def test_a_submodule_on_a_private_host_is_refused_and_never_fetched(served, tmp_path):
    allowed, private = served
    sub = tmp_path / "sub"
    sub_commit = repo(sub, {"secret.txt": "internal data\n"})
    publish(allowed.root, sub, "sub.git")
    work = tmp_path / "work"
    repo(work, {"file": "top\n"})
    with_submodule(work, "inner", private.url("sub.git"), sub_commit)
    publish(allowed.root, work, "top.git")

    dest = tmp_path / "checkout"
    message = fetch_refused(GitSource(allowed.url("top.git"), policy=service_policy()), dest)
    assert "submodule 'inner'" in message, message
    assert private.url("sub.git") in message, message
    assert "local or private network" in message, message
    assert private.log == []
    assert not (dest / "inner" / "secret.txt").exists()
    assert not (dest / ".git" / "modules").exists()
    # The superproject itself came from the allowed host.
    assert any("top.git" in line for line in allowed.log)


def test_a_relative_submodule_is_fetched_from_the_checked_repository(served, tmp_path):
    allowed, private = served
    sub = tmp_path / "sub"
    sub_commit = repo(sub, {"subfile.txt": "from the submodule\n"})
    publish(allowed.root, sub, "group/sub.git")
    work = tmp_path / "work"
    repo(work, {"file": "top\n"})
    top_commit = with_submodule(work, "inner", "../sub.git", sub_commit)
    publish(allowed.root, work, "group/top.git")

    dest = tmp_path / "checkout"
    fetched = GitSource(allowed.url("group/top.git"), policy=service_policy()).fetch(dest)
    assert fetched.commit == top_commit
    assert (dest / "inner" / "subfile.txt").read_text() == "from the submodule\n"
    assert any(line.startswith("GET /group/sub.git/info/refs") for line in allowed.log)
    assert private.log == []


def test_nested_submodules_are_checked_at_every_level(served, tmp_path):
    allowed, private = served
    deepest = tmp_path / "deepest"
    deepest_commit = repo(deepest, {"d.txt": "deep\n"})
    publish(allowed.root, deepest, "deepest.git")
    middle = tmp_path / "middle"
    repo(middle, {"m.txt": "middle\n"})
    middle_commit = with_submodule(middle, "deeper", private.url("deepest.git"), deepest_commit)
    publish(allowed.root, middle, "middle.git")
    work = tmp_path / "work"
    repo(work, {"file": "top\n"})
    with_submodule(work, "mid", "./../middle.git", middle_commit)
    publish(allowed.root, work, "top.git")

    dest = tmp_path / "checkout"
    message = fetch_refused(GitSource(allowed.url("top.git"), policy=service_policy()), dest)
    assert "submodule 'deeper'" in message, message
    assert (dest / "mid" / "m.txt").exists()  # the allowed level was fetched
    assert not (dest / "mid" / "deeper" / "d.txt").exists()
    assert private.log == []


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("file:///etc", "'file://'"),
        ("/srv/git/private.git", "a local path"),
        ("ssh://git@127.0.0.1/x.git", "'ssh://'"),
        ("ext::sh -c touch% /tmp/binderbox-ext-ran", "transport"),
        ("../../../../escape.git", "climb above the host"),
    ],
)
def test_submodule_urls_of_other_kinds_are_refused_with_their_name(served, tmp_path, url, words):
    allowed, _ = served
    sub = tmp_path / "sub"
    sub_commit = repo(sub, {"f": "f\n"})
    work = tmp_path / "work"
    repo(work, {"file": "top\n"})
    with_submodule(work, "odd", url, sub_commit)
    publish(allowed.root, work, "top.git")
    for policy in (service_policy(), GitPolicy()):  # the service and the CLI alike
        dest = tmp_path / f"checkout-{policy.checks_hosts}"
        message = fetch_refused(GitSource(allowed.url("top.git"), policy=policy), dest)
        assert "submodule 'odd'" in message and words in message, message


@pytest.mark.docker
def test_the_service_refuses_a_private_submodule_in_one_event(
    served, tmp_path, base_image, built_images
):
    """Through ``binderbox serve``'s /build stream: one failed event naming the
    submodule, nothing asked of the private host, no image built."""
    from tests.test_service_build import build_path, building_service

    allowed, private = served
    sub = tmp_path / "sub"
    sub_commit = repo(sub, {"secret.txt": "internal data\n"})
    publish(allowed.root, sub, "sub.git")
    work = tmp_path / "work"
    repo(work, {"requirements.txt": "\n"})
    with_submodule(work, "inner", private.url("sub.git"), sub_commit)
    publish(allowed.root, work, "top.git")

    with building_service(built_images, "hostile-sub") as svc:
        events, _ = svc.events(build_path(allowed.url("top.git"), build_only="true"))
    failed = events[-1]
    assert failed["phase"] == "failed", events
    message = failed["message"]
    assert "submodule 'inner'" in message and "local or private network" in message, message
    assert "\n" not in message and "Traceback" not in message, message
    assert not [e for e in events if e["phase"] in {"building", "built"}], events
    assert private.log == []
    tags = [tag for image in docker.from_env().images.list() for tag in image.tags]
    assert not [tag for tag in tags if tag.startswith("binderbox-hostile-sub-")], tags


# --- redirects -------------------------------------------------------------------------------


def test_a_redirect_to_a_private_host_is_refused_before_anything_is_fetched(served, tmp_path):
    allowed, private = served
    work = tmp_path / "work"
    repo(work, {"file": "internal\n"})
    publish(allowed.root, work, "internal.git")
    allowed.redirects["/moved.git"] = private.url("internal.git")

    source = GitSource(allowed.url("moved.git"), policy=service_policy())
    with pytest.raises(SourceError) as refused:
        source.resolve()
    message = refused.value.message
    assert "redirects to" in message and private.url("internal.git") in message, message
    assert "local or private network" in message, message
    assert private.log == []
    assert not (tmp_path / "checkout").exists()


def test_a_redirect_to_a_checked_host_is_followed_and_pinned(served, tmp_path):
    """A renamed repository (GitHub redirects those) still works: each hop is checked."""
    allowed, private = served
    work = tmp_path / "work"
    commit = repo(work, {"file": "renamed\n"})
    publish(allowed.root, work, "new-name.git")
    allowed.redirects["/old-name.git"] = allowed.url("new-name.git")

    source = GitSource(allowed.url("old-name.git"), policy=service_policy())
    assert source.resolve() == commit
    fetched = source.fetch(tmp_path / "checkout")
    assert (fetched.path / "file").read_text() == "renamed\n"
    # Only the first request met the redirect; git itself went to the new name.
    assert len([line for line in allowed.log if "old-name" in line]) == 1
    assert private.log == []


SELF_SIGNED = (
    "openssl",
    "req",
    "-x509",
    "-newkey",
    "rsa:2048",
    "-nodes",
    "-days",
    "2",
    "-subj",
    "/CN=localhost",
    "-addext",
    "subjectAltName=DNS:localhost",
)


@pytest.fixture
def tls_served(served, tmp_path):
    """The allowed server again over TLS, with a certificate for 'localhost' that only
    the ca_bundle setting makes trusted."""
    allowed, private = served
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [*SELF_SIGNED, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    secure = GitHttp("127.0.0.1", allowed.root)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    secure.httpd.socket = context.wrap_socket(secure.httpd.socket, server_side=True)
    try:
        yield secure, private, str(cert)
    finally:
        secure.close()


def test_https_is_pinned_and_its_certificate_checked_for_the_name(tls_served, tmp_path):
    secure, private, ca_bundle = tls_served
    work = tmp_path / "work"
    commit = repo(work, {"file": "over TLS\n"})
    publish(secure.root, work, "tls.git")
    url = f"https://localhost:{secure.port}/tls.git"
    # 'localhost' may also resolve to ::1 (a fresh Debian's /etc/hosts): allowed by name,
    # it is still pinned to one checked address, 127.0.0.1 (the server listens there).
    allow_localhost = {"allowed_hosts": (*ALLOWED, "localhost")}

    # Connected to 127.0.0.1, the certificate checked for 'localhost': trusted only
    # through the extra CA bundle, for the redirect check and for git alike.
    untrusted = GitSource(url, policy=GitPolicy(**allow_localhost))
    with pytest.raises(SourceError, match="TLS certificate is not trusted"):
        untrusted.resolve()
    source = GitSource(url, policy=GitPolicy(**allow_localhost, ca_bundle=ca_bundle))
    assert source.resolve() == commit
    assert (source.fetch(tmp_path / "checkout").path / "file").read_text() == "over TLS\n"

    secure.redirects["/moved.git"] = private.url("tls.git")
    moved = GitSource(f"https://localhost:{secure.port}/moved.git", policy=source.policy)
    with pytest.raises(SourceError, match=r"redirects to .* local or private network"):
        moved.resolve()
    assert private.log == []


# --- host names ------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["ß.localhost", "faß.localhost"])
def test_a_name_idna_2003_and_2008_read_differently_is_refused(served, tmp_path, host):
    allowed, _ = served
    url = f"http://{host}:{allowed.port}/top.git"
    for policy in (GitPolicy(allowed_hosts=(*ALLOWED, host)), service_policy()):
        with pytest.raises(SourceError, match="differ between IDNA 2003 and IDNA 2008"):
            GitSource(url, policy=policy).resolve()
    assert allowed.log == []


# --- the operator's own configuration --------------------------------------------------------

FETCH_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from binderbox.errors import SourceError
    from binderbox.providers.git import GitPolicy, GitSource
    url, dest, allowed = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    policy = GitPolicy(allowed_hosts=None if allowed is None else tuple(allowed))
    try:
        fetched = GitSource(url, policy=policy).fetch(dest)
    except SourceError as error:
        print(json.dumps({"error": error.message}))
    else:
        print(json.dumps({"commit": fetched.commit}))
    """
)


def run_fetch(
    url: str, dest: Path, allowed: tuple[str, ...] | None, env: dict[str, str], prefix=()
) -> dict[str, str]:
    result = subprocess.run(
        [*prefix, sys.executable, "-c", FETCH_SCRIPT, url, str(dest), json.dumps(allowed)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_operators_gitconfig_does_not_apply(served, tmp_path):
    """An ``insteadOf`` rule and a credential helper in the operator's ~/.gitconfig (and
    GIT_CONFIG_* in the environment) must not reach anonymous users' clones."""
    allowed, _ = served
    public = tmp_path / "public"
    public_commit = repo(public, {"file": "public\n"})
    publish(allowed.root, public, "public.git")
    private = tmp_path / "private"
    repo(private, {"file": "the operator's private repository\n"})
    publish(allowed.root, private, "operator-only.git")

    home = tmp_path / "home"
    marker = tmp_path / "credential-helper-ran"
    rule = textwrap.dedent(
        f"""
        [url "{allowed.url("operator-only.git")}"]
        \tinsteadOf = {allowed.url("public.git")}
        [credential]
        \thelper = "!touch {marker}; echo"
        """
    )
    (home / ".config" / "git").mkdir(parents=True)
    (home / ".gitconfig").write_text(rule)
    (home / ".config" / "git" / "config").write_text(rule)
    extra = tmp_path / "extra.gitconfig"
    extra.write_text(rule)
    env = {
        **os.environ,
        "HOME": str(home),
        "GIT_CONFIG_GLOBAL": str(extra),
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": f"url.{allowed.url('operator-only.git')}.insteadOf",
        "GIT_CONFIG_VALUE_0": allowed.url("public.git"),
    }
    # The rule is real: plain git with this HOME fetches the operator's repository.
    plain = subprocess.run(
        ["git", "ls-remote", "--get-url", allowed.url("public.git")],
        env={**env, "GIT_CONFIG_GLOBAL": str(home / ".gitconfig")},
        capture_output=True,
        text=True,
        check=True,
    )
    assert "operator-only" in plain.stdout

    for allowed_hosts in (None, ALLOWED):  # the CLI and the service
        dest = tmp_path / f"checkout-{allowed_hosts is None}"
        answer = run_fetch(allowed.url("public.git"), dest, allowed_hosts, env)
        assert answer == {"commit": public_commit}, answer
        assert (dest / "file").read_text() == "public\n"
    assert not any("operator-only" in line for line in allowed.log), allowed.log
    assert not marker.exists()


def test_a_password_protected_repository_asks_no_helper(tmp_path):
    """A 401 gets no credentials from anywhere: the fetch fails with one sentence."""

    class Locked(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="x"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Locked) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{httpd.server_address[1]}/private.git"
        started = time.monotonic()
        with pytest.raises(SourceError, match="Could not fetch the git repository"):
            GitSource(url, policy=service_policy()).resolve()
        httpd.shutdown()
    assert time.monotonic() - started < 30


# --- limits ----------------------------------------------------------------------------------


def test_a_repository_over_the_size_limit_is_refused_in_one_sentence(served, tmp_path):
    allowed, _ = served
    work = tmp_path / "work"
    work.mkdir()
    (work / "big.bin").write_bytes(os.urandom(3_000_000))
    repo(work, {"small.txt": "x\n"})
    publish(allowed.root, work, "big.git")

    dest = tmp_path / "checkout"
    source = GitSource(allowed.url("big.git"), policy=service_policy(max_bytes=1_000_000))
    message = fetch_refused(source, dest)
    assert "larger than the 1 MB binderbox fetches" in message, message
    assert "git_max_bytes" in message, message
    assert not (dest / "big.bin").exists()


def test_a_repository_over_the_file_limit_is_refused_before_checkout(served, tmp_path):
    allowed, _ = served
    work = tmp_path / "work"
    repo(work, {f"many/{n}.txt": f"{n}\n" for n in range(60)})
    publish(allowed.root, work, "many.git")

    dest = tmp_path / "checkout"
    source = GitSource(allowed.url("many.git"), policy=service_policy(max_files=50))
    message = fetch_refused(source, dest)
    assert "more than 50 files" in message and "git_max_files" in message, message
    assert not (dest / "many").exists()


def test_a_clone_is_stopped_while_it_outgrows_the_limit(tmp_path):
    """A pack far over the limit: git is stopped during the transfer, long before the
    whole pack has arrived (the watcher counts the growing pack file)."""
    root = tmp_path / "served"
    root.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    with open(work / "huge.bin", "wb") as out:
        for _ in range(40):
            out.write(os.urandom(1_000_000))
    repo(work, {"small.txt": "x\n"})
    publish(root, work, "huge.git")
    server = GitHttp("127.0.0.1", root)
    server.rate = 5_000_000
    try:
        dest = tmp_path / "checkout"
        source = GitSource(server.url("huge.git"), policy=service_policy(max_bytes=2_000_000))
        message = fetch_refused(source, dest)
    finally:
        server.close()
    assert "larger than the 2 MB" in message, message
    pack_bytes = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    assert pack_bytes < 15_000_000, pack_bytes


def test_a_server_that_never_answers_is_given_up_on(tmp_path):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"git://127.0.0.1:{silent.getsockname()[1]}/never.git"
        started = time.monotonic()
        with pytest.raises(SourceError, match="did not finish within 3 seconds"):
            GitSource(url, policy=service_policy(timeout=3)).resolve()
    assert time.monotonic() - started < 15


def test_a_transfer_slower_than_the_low_speed_limit_is_given_up_on(tmp_path):
    """An HTTP server that trickles its answer: git stops after git_low_speed_seconds."""

    class Trickle(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.recv(65536)
            self.request.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/x-git-upload-pack-advertisement"
                b"\r\nContent-Length: 100000\r\n\r\n"
            )
            with contextlib.suppress(OSError):
                for _ in range(60):
                    self.request.sendall(b"0")
                    time.sleep(0.5)

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    with Server(("127.0.0.1", 0), Trickle) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/slow.git"
        started = time.monotonic()
        with pytest.raises(SourceError, match="Could not fetch the git repository"):
            GitSource(url, policy=service_policy(low_speed_seconds=2, timeout=60)).resolve()
        seconds = time.monotonic() - started
        server.shutdown()
    assert seconds < 20, seconds


# --- DNS rebinding ---------------------------------------------------------------------------


class RebindingDns:
    """A DNS stand-in: the first A query for any name gets 127.0.0.1, later ones get
    127.0.0.2 (TTL 0), as a name that rebinds after the check would."""

    def __init__(self) -> None:
        self.queries: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for third in range(53, 80):
            try:
                self.sock.bind((f"127.0.{third}.53", 53))
                break
            except OSError:
                continue
        else:
            pytest.skip("no loopback address with port 53 free for the DNS stand-in")
        self.address = self.sock.getsockname()[0]
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                packet, client = self.sock.recvfrom(4096)
            except OSError:
                return
            reply = self.answer(packet)
            if reply:
                self.sock.sendto(reply, client)

    def answer(self, packet: bytes) -> bytes:
        end = 12
        labels = []
        while end < len(packet) and packet[end]:
            labels.append(packet[end + 1 : end + 1 + packet[end]].decode("ascii", "replace"))
            end += packet[end] + 1
        question = packet[12 : end + 5]
        qtype = int.from_bytes(packet[end + 1 : end + 3], "big")
        self.queries.append(f"{'A' if qtype == 1 else qtype} {'.'.join(labels)}")
        answers = b""
        count = 0
        if qtype == 1:
            first = sum(q.startswith("A ") for q in self.queries) == 1
            address = socket.inet_aton("127.0.0.1" if first else PRIVATE)
            answers = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x00\x00\x04" + address
            count = 1
        header = packet[:2] + b"\x81\x80\x00\x01" + count.to_bytes(2, "big") + b"\x00\x00" * 2
        return header + question + answers

    def close(self) -> None:
        self.sock.close()


def in_namespace_with(resolv_conf: Path) -> list[str]:
    """A command prefix: a private mount namespace whose /etc/resolv.conf is ours."""
    return [
        "unshare",
        "--mount",
        "sh",
        "-c",
        f'mount --bind {resolv_conf} /etc/resolv.conf && exec "$@"',
        "sh",
    ]


DAEMON = ("git", "daemon", "--verbose", "--export-all", "--reuseaddr")


def _answers(address: str, port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((address, port)) == 0


@contextlib.contextmanager
def git_daemons(root: Path, log_dir: Path) -> Iterator[tuple[int, dict[str, Path]]]:
    """``git daemon`` on 127.0.0.1 and 127.0.0.2, one port, each logging connections."""
    for _ in range(20):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with socket.socket() as other:
            try:
                other.bind((PRIVATE, port))
            except OSError:
                continue
        break
    logs = {address: log_dir / f"daemon-{address}.log" for address in ("127.0.0.1", PRIVATE)}
    daemons = []
    for address, log in logs.items():
        with open(log, "ab") as out:  # appending: the truncation below is seen by git
            daemons.append(
                subprocess.Popen(
                    [
                        *DAEMON,
                        f"--listen={address}",
                        f"--port={port}",
                        f"--base-path={root}",
                        str(root),
                    ],
                    stderr=out,
                )
            )
    try:
        for address in logs:
            deadline = time.monotonic() + 20
            while not _answers(address, port):
                assert time.monotonic() < deadline, f"git daemon on {address} did not start"
                time.sleep(0.05)
        for log in logs.values():  # the probes above are not fetches: wait for their end
            deadline = time.monotonic() + 20
            while "Disconnected" not in log.read_text():
                assert time.monotonic() < deadline, f"git daemon did not log to {log}"
                time.sleep(0.05)
            log.write_bytes(b"")
        yield port, logs
    finally:
        for daemon in daemons:
            daemon.terminate()
            daemon.wait(timeout=10)


@pytest.mark.skipif(os.geteuid() != 0, reason="mount namespaces need root")
@pytest.mark.parametrize("scheme", ["http", "git"])
def test_git_connects_only_to_the_address_that_passed_the_check(served, tmp_path, scheme):
    allowed, private = served
    work = tmp_path / "work"
    commit = repo(work, {"file": "from the checked address\n"})
    publish(allowed.root, work, "r.git")
    dns = RebindingDns()
    try:
        with contextlib.ExitStack() as stack:
            port, daemon_logs = stack.enter_context(git_daemons(allowed.root, tmp_path))
            resolv = tmp_path / "resolv.conf"
            resolv.write_text(f"nameserver {dns.address}\noptions attempts:1 timeout:2\n")
            prefix = in_namespace_with(resolv)
            port = allowed.port if scheme == "http" else port
            url = f"{scheme}://rebind.binderbox.test:{port}/r.git"
            dest = tmp_path / "checkout"
            answer = run_fetch(url, dest, ALLOWED, dict(os.environ), prefix)
            assert answer == {"commit": commit}, answer
            assert (dest / "file").read_text() == "from the checked address\n"
            # One lookup (the check); git asked nobody and went to the checked address.
            assert [q for q in dns.queries if q.startswith("A ")] == ["A rebind.binderbox.test"]
            if scheme == "http":
                assert any("/r.git/" in line for line in allowed.log)
            else:
                assert "Connection from 127.0.0.1" in daemon_logs["127.0.0.1"].read_text()
                assert daemon_logs[PRIVATE].read_text() == ""
            assert private.log == []
        # The name really rebinds: the next lookup in that namespace says 127.0.0.2.
        again = subprocess.run(
            [*prefix, "getent", "ahostsv4", "rebind.binderbox.test"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert again.stdout.split()[:1] == [PRIVATE], (again.stdout, again.stderr)
    finally:
        dns.close()
