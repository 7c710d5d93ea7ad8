"""Record fetches go only where they were checked: against real servers on 127.0.0.1 (the
allow-listed "provider") and 127.0.0.2 (a private host that must see nothing), a DNS
stand-in that answers differently on successive queries (rebinding), a TLS server for a
name, literal addresses that embed a private IPv4 address, and answers built to exhaust
memory (a gzip bomb, deep nesting)."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import socket
import ssl
import struct
import subprocess
import sys
import threading
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.test_content_providers import (  # noqa: F401  (fixtures)
    REPO_FILES,
    ContentServer,
    Reply,
    content_server,
    serve_zenodo,
    server,
    settings_for,
    zip_bytes,
)

from binderbox.errors import SourceError
from binderbox.providers import source_for

DATASET = "/ckan/api/3/action/package_show?id=hostile"


def hostile_settings(records: ContentServer, **overrides: object):
    """The service's checks: every host checked, only 127.0.0.1 allowed."""
    values: dict[str, object] = {
        "check_remote_hosts": True,
        "allowed_hosts": "127.0.0.1",
        "ckan_hosts": f"{records.base}/ckan",
    }
    values.update(overrides)
    return settings_for(records, **values)


def one_sentence(message: str) -> bool:
    return "\n" not in message and "Traceback" not in message and message.endswith(".")


def serve_dataset(records: ContentServer, *urls: str) -> None:
    """A CKAN dataset (on ckan_hosts) whose uploaded files are at ``urls``."""
    resources = [
        {"url_type": "upload", "url": url, "name": f"file{i}"} for i, url in enumerate(urls)
    ]
    result = {"id": "hostile", "metadata_modified": "2024-01-01", "resources": resources}
    records.json(DATASET, {"success": True, "result": result})


@contextlib.contextmanager
def running(host: str, port: int = 0) -> Iterator[ContentServer]:
    other = ContentServer(host, port)
    other.thread.start()
    try:
        yield other
    finally:
        other.httpd.shutdown()
        other.httpd.server_close()


@pytest.fixture
def private_host() -> Iterator[ContentServer]:
    """A server on 127.0.0.2, standing in for a host on the operator's network."""
    with running("127.0.0.2") as other:
        other.file("/secret", "private data\n")
        yield other


# --- redirects and literal addresses ----------------------------------------------------------


def test_a_download_redirected_to_a_private_host_is_refused(server, private_host, tmp_path):  # noqa: F811
    serve_zenodo(server)
    content = "/zenodo/api/records/3242074/files/binder-demo-1.0.zip/content"
    server.redirect(content, f"{private_host.base}/secret")
    source = source_for(f"{server.base}/zenodo/records/3242074", settings=hostile_settings(server))
    with pytest.raises(SourceError) as caught:
        source.fetch(tmp_path / "checkout")
    message = caught.value.message
    assert "local or private network (127.0.0.2)" in message, message
    assert one_sentence(message)
    assert content in server.paths  # the provider was asked; its redirect was not followed
    assert private_host.requests == []
    assert not (tmp_path / "checkout").exists()
    assert list(tmp_path.iterdir()) == []  # no staging folder left either


# Each leads to 127.0.0.2 in its own way; ::ffff:… really does reach it on this machine.
EMBEDDING = {
    "ipv4-mapped": "::ffff:127.0.0.2",
    "ipv4-compatible": "::127.0.0.2",
    "nat64": "64:ff9b::7f00:2",
    "6to4": "2002:7f00:2::1",
    "teredo": "2001:0:4136:e378:8000:63bf:80ff:fffd",
}


@pytest.mark.parametrize("kind", sorted(EMBEDDING))
def test_a_file_on_an_address_that_embeds_a_private_one_is_refused(
    server,  # noqa: F811
    private_host,
    tmp_path,
    kind,
):
    address = EMBEDDING[kind]
    serve_dataset(server, f"http://[{address}]:{private_host.port}/secret")
    source = source_for(f"{server.base}/ckan/dataset/hostile", settings=hostile_settings(server))
    with pytest.raises(SourceError) as caught:
        source.fetch(tmp_path / "checkout")
    message = caught.value.message
    assert "local or private network" in message, message
    assert one_sentence(message)
    assert private_host.requests == []
    assert not (tmp_path / "checkout").exists()


@pytest.mark.parametrize("kind", ["ipv4-mapped", "nat64", "6to4"])
def test_a_record_address_that_embeds_a_private_one_is_refused(server, private_host, kind):  # noqa: F811
    # Typed directly: an unknown host with /dataset/ is asked whether it is CKAN.
    url = f"http://[{EMBEDDING[kind]}]:{private_host.port}/dataset/x"
    with pytest.raises(SourceError, match="local or private network") as caught:
        source_for(url, settings=hostile_settings(server))
    assert one_sentence(caught.value.message)
    # Reached through a DOI: the resolver's redirect is refused before it is followed.
    server.redirect("/doi/10.1234/hostile", url)
    with pytest.raises(SourceError, match="local or private network"):
        source_for("10.1234/hostile", settings=hostile_settings(server))
    assert "/doi/10.1234/hostile" in server.paths
    assert private_host.requests == []


def test_without_checks_the_same_redirect_is_followed(server, private_host, tmp_path):  # noqa: F811
    # The command line (check_remote_hosts off) fetches what its user asked for: the
    # refusal above comes from the check, not from a broken redirect.
    private_host.file("/demo.zip", zip_bytes(REPO_FILES))
    serve_dataset(server, f"{server.base}/ckan/files/demo.zip")
    server.redirect("/ckan/files/demo.zip", f"{private_host.base}/demo.zip")
    settings = hostile_settings(server, check_remote_hosts=False)
    fetched = source_for(f"{server.base}/ckan/dataset/hostile", settings=settings).fetch(
        tmp_path / "checkout"
    )
    assert (fetched.path / "requirements.txt").read_text() == "six\n"
    assert [path for path, _ in private_host.requests] == ["/demo.zip"]


# --- answers built to exhaust memory ------------------------------------------------------------


def gzip_bomb(size: int) -> bytes:
    """A gzip stream of ``size`` bytes of JSON (a string of spaces inside an object)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [packer.compress(b'{"entries": [], "pad": "')]
    block = b" " * (1 << 20)
    for _ in range(size >> 20):
        parts.append(packer.compress(block))
    parts.append(packer.compress(b'"}'))
    parts.append(packer.flush())
    return b"".join(parts)


def test_a_gzip_bomb_stops_at_the_cap_with_memory_bounded(server):  # noqa: F811
    bomb = gzip_bomb(512 << 20)  # 512 MiB once inflated, about 500 kB on the wire
    assert len(bomb) < 1 << 20
    server.add(
        "/zenodo/api/records/1",
        Reply(200, bomb, {"Content-Type": "application/json", "Content-Encoding": "gzip"}),
    )
    settings = hostile_settings(server, record_metadata_max_bytes=2_000_000)
    source = source_for(f"{server.base}/zenodo/records/1", settings=settings)
    tracemalloc.start()
    try:
        with pytest.raises(SourceError) as caught:
            source.resolve()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = caught.value.message
    assert message == (
        f"Could not fetch the Zenodo record 1: {server.base}/zenodo/api/records/1 answered "
        "with more than 2 MB (setting record_metadata_max_bytes)."
    )
    # The cap, a piece being inflated and a bit: never the 512 MiB the bomb holds.
    assert peak < 12_000_000, peak


def test_a_compressed_download_counts_what_it_inflates_to(server, tmp_path):  # noqa: F811
    serve_dataset(server, f"{server.base}/ckan/files/data.csv")
    server.add(
        "/ckan/files/data.csv", Reply(200, gzip_bomb(512 << 20), {"Content-Encoding": "gzip"})
    )
    settings = hostile_settings(server, content_max_bytes=5_000_000)
    source = source_for(f"{server.base}/ckan/dataset/hostile", settings=settings)
    tracemalloc.start()
    try:
        with pytest.raises(SourceError) as caught:
            source.fetch(tmp_path / "checkout")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.message == (
        "Could not use the CKAN dataset hostile: the dataset is larger than the limit of "
        "5 MB (setting content_max_bytes)."
    )
    assert peak < 12_000_000, peak
    assert list(tmp_path.iterdir()) == []


def test_json_under_the_cap_is_read_whether_compressed_or_not(server):  # noqa: F811
    serve_zenodo(server)
    path = "/zenodo/api/records/3242074"
    plain = server._body(path)
    server.add(
        path, Reply(200, gzip.compress(plain), {"Content-Encoding": "gzip"}), Reply(200, plain)
    )
    settings = hostile_settings(server)
    first = source_for(f"{server.base}/zenodo/records/3242074", settings=settings).resolve()
    second = source_for(f"{server.base}/zenodo/records/3242074", settings=settings).resolve()
    assert first == second and first.startswith("3242074-")


def test_deeply_nested_json_is_refused_in_one_sentence(server):  # noqa: F811
    server.add("/zenodo/api/records/1", Reply(200, b"[" * 200_000 + b"]" * 200_000))
    source = source_for(f"{server.base}/zenodo/records/1", settings=hostile_settings(server))
    with pytest.raises(SourceError, match="answered with JSON nested too deeply") as caught:
        source.resolve()
    assert one_sentence(caught.value.message)


def test_a_download_in_an_unknown_encoding_is_refused(server, tmp_path):  # noqa: F811
    serve_dataset(server, f"{server.base}/ckan/files/a.txt")
    server.add("/ckan/files/a.txt", Reply(200, b"x", {"Content-Encoding": "br"}))
    source = source_for(f"{server.base}/ckan/dataset/hostile", settings=hostile_settings(server))
    with pytest.raises(SourceError, match=r"in an encoding binderbox does not read \(br\)"):
        source.fetch(tmp_path / "checkout")
    assert not (tmp_path / "checkout").exists()


# --- names: a DNS stand-in and a TLS server ----------------------------------------------------


class DnsStandIn:
    """A tiny authoritative DNS server on a loopback address, port 53 (resolv.conf cannot
    name a port). Each name has A answers served in turn, the last repeating, with TTL 0;
    AAAA questions get no answer; other names do not exist. Every question is logged."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = {name.lower(): list(values) for name, values in answers.items()}
        self.questions: list[tuple[str, int]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # A loopback address of its own, so parallel test runs do not collide.
        for third in range(100, 250):
            try:
                self.sock.bind((f"127.0.{third}.53", 53))
                break
            except OSError:
                continue
        else:
            raise RuntimeError("no free loopback address for the DNS stand-in")
        self.address = self.sock.getsockname()[0]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def a_questions(self, name: str) -> int:
        return sum(1 for asked, kind in self.questions if asked == name and kind == 1)

    def _serve(self) -> None:
        while True:
            try:
                query, client = self.sock.recvfrom(512)
            except OSError:
                return
            with contextlib.suppress(Exception):
                self.sock.sendto(self._answer(query), client)

    def _answer(self, query: bytes) -> bytes:
        (ident,) = struct.unpack("!H", query[:2])
        labels, at = [], 12
        while query[at]:
            length = query[at]
            labels.append(query[at + 1 : at + 1 + length].decode("ascii").lower())
            at += 1 + length
        qtype, _ = struct.unpack("!HH", query[at + 1 : at + 5])
        question = query[12 : at + 5]
        name = ".".join(labels)
        self.questions.append((name, qtype))
        if name not in self.answers:
            return struct.pack("!HHHHHH", ident, 0x8183, 1, 0, 0, 0) + question
        records = b""
        count = 0
        if qtype == 1:
            values = self.answers[name]
            value = values.pop(0) if len(values) > 1 else values[0]
            records = struct.pack("!HHHIH", 0xC00C, 1, 1, 0, 4) + socket.inet_aton(value)
            count = 1
        return struct.pack("!HHHHHH", ident, 0x8580, 1, count, 0, 0) + question + records

    def close(self) -> None:
        self.sock.close()


def _can_unshare() -> bool:
    try:
        done = subprocess.run(["unshare", "--mount", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


needs_mount_namespace = pytest.mark.skipif(
    os.geteuid() != 0 or not _can_unshare(),
    reason="needs root and unshare --mount to give one process its own resolv.conf",
)

# Runs in a process whose /etc/resolv.conf names the DNS stand-in: fetch, report as JSON.
_FETCH = """
import json, sys
from binderbox.config import Settings
from binderbox.errors import BinderboxError
from binderbox.providers import source_for
args = json.loads(sys.argv[1])
try:
    fetched = source_for(args["url"], settings=Settings(**args["settings"])).fetch(
        __import__("pathlib").Path(args["dest"]))
    print(json.dumps({"ok": True, "commit": fetched.commit}))
except BinderboxError as err:
    print(json.dumps({"ok": False, "error": err.message}))
"""


def fetch_with_dns(dns: DnsStandIn, tmp_path: Path, url: str, settings: dict) -> dict:
    """Fetch ``url`` in a child process that resolves names through ``dns`` only."""
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver {dns.address}\noptions attempts:1 timeout:2\n")
    args = json.dumps({"url": url, "settings": settings, "dest": str(tmp_path / "checkout")})
    script = 'mount --bind "$1" /etc/resolv.conf && shift && exec "$@"'
    command = ["unshare", "--mount", "sh", "-c", script, "sh", str(resolv)]
    command += [sys.executable, "-c", _FETCH, args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def free_port_on_both(*hosts: str) -> int:
    """A TCP port free on every one of ``hosts`` (the same port, so one URL fits both)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = probe.getsockname()[1]
        ok = True
        for host in hosts[1:]:
            with socket.socket() as other:
                try:
                    other.bind((host, port))
                except OSError:
                    ok = False
        if ok:
            return port
    raise RuntimeError("no port free on all hosts")


@needs_mount_namespace
@pytest.mark.parametrize("checked", [True, False], ids=["checked", "unchecked"])
def test_a_name_that_rebinds_to_a_private_address_is_asked_once(tmp_path, checked):
    """The name first answers 127.0.0.1 (allowed), then 127.0.0.2 with TTL 0: every request
    of the fetch (record, file list, download) still goes to 127.0.0.1."""
    port = free_port_on_both("127.0.0.1", "127.0.0.2")
    name = "records.rebind.test"
    dns = DnsStandIn({name: ["127.0.0.1", "127.0.0.2"]})
    try:
        with running("127.0.0.1", port) as good, running("127.0.0.2", port) as evil:
            base = f"http://{name}:{port}"
            good.base = evil.base = base  # the API's links name the host as the user did
            serve_zenodo(good)
            serve_zenodo(evil)
            settings = {
                "ca_bundle": "",
                "zenodo_url": f"{base}/zenodo",
                "check_remote_hosts": checked,
                "allowed_hosts": "127.0.0.1",
            }
            result = fetch_with_dns(dns, tmp_path, f"{base}/zenodo/records/3242074", settings)
    finally:
        dns.close()
    assert result["ok"], result
    assert (tmp_path / "checkout" / "requirements.txt").read_text() == "six\n"
    assert len(good.requests) == 3  # record, file list, download
    assert all(headers["host"] == f"{name}:{port}" for _, headers in good.requests)
    assert evil.requests == []
    assert dns.a_questions(name) == 1


def make_certificates(folder: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA and a certificate for ``name`` it signed: (ca, certificate, key)."""
    ca_key, ca, key, request, cert = (
        folder / f for f in ("ca-key.pem", "ca.pem", "key.pem", "cert.csr", "cert.pem")
    )
    extensions = folder / "ext.cnf"
    extensions.write_text(
        f"subjectAltName=DNS:{name}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
    )

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", str(ca_key), "-out", str(ca), "-subj", "/CN=binderbox test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(request),
        "-subj", f"/CN={name}",
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", str(request), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "2", "-out", str(cert), "-extfile", str(extensions),
    )  # fmt: skip
    return ca, cert, key


@contextlib.contextmanager
def tls_server(host: str, port: int, cert: Path, key: Path) -> Iterator[tuple[ContentServer, list]]:
    """A ContentServer speaking TLS with ``cert``; also yields the SNI names it was sent."""
    names: list[str | None] = []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda _sock, sni, _ctx: names.append(sni)
    other = ContentServer(host, port)
    other.httpd.socket = context.wrap_socket(other.httpd.socket, server_side=True)
    other.base = f"https://{host}:{other.port}"
    other.thread.start()
    try:
        yield other, names
    finally:
        other.httpd.shutdown()
        other.httpd.server_close()


@needs_mount_namespace
def test_tls_keeps_the_name_while_the_connection_is_pinned(tmp_path):
    """A record on https://<name>: the connection goes to the checked 127.0.0.1, the TLS
    handshake names <name> (SNI) and its certificate is checked for <name>; a second name
    answering the same address is refused because the certificate is not its own."""
    name, other_name = "records.tls.test", "other.tls.test"
    ca, cert, key = make_certificates(tmp_path, name)
    dns = DnsStandIn({name: ["127.0.0.1"], other_name: ["127.0.0.1"]})
    try:
        with tls_server("127.0.0.1", 0, cert, key) as (tls, sni):
            tls.base = f"https://{name}:{tls.port}"  # what the API's links say
            serve_zenodo(tls)
            settings = {
                "ca_bundle": str(ca),
                "zenodo_url": f"{tls.base}/zenodo",
                "check_remote_hosts": True,
                "allowed_hosts": "127.0.0.1",
            }
            good = fetch_with_dns(dns, tmp_path, f"{tls.base}/zenodo/records/3242074", settings)
            served, named = list(tls.requests), list(sni)
            (tmp_path / "elsewhere").mkdir()
            settings["zenodo_url"] = f"https://{other_name}:{tls.port}/zenodo"
            bad = fetch_with_dns(
                dns, tmp_path / "elsewhere", f"{settings['zenodo_url']}/records/3242074", settings
            )
    finally:
        dns.close()
    assert good["ok"], good
    assert (tmp_path / "checkout" / "requirements.txt").read_text() == "six\n"
    assert len(served) == 3
    assert {headers["host"] for _, headers in served} == {f"{name}:{tls.port}"}
    assert named and set(named) == {name}
    assert set(sni[len(named) :]) == {other_name}  # the refused one named itself too
    assert not bad["ok"]
    assert bad["error"] == (
        f"Could not fetch the Zenodo record 3242074: the TLS certificate of "
        f"{other_name}:{tls.port} is not trusted (see the ca_bundle setting)."
    )
