"""The session firewall: sessions cannot open connections to this machine's services or
to blocked networks, while DNS and everything else still work.

The real tests need root (iptables) and build their targets on this machine only: a
listener on the sessions' bridge address (the host itself), and a small network
namespace behind a veth pair standing in for a private network. No packet leaves the
machine; the test process itself talks to 127.0.0.1 only."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from tests.conftest import firewall_possible, free_port
from tests.test_launch import hub_settings, proxy_command  # noqa: F401 (fixture)

from binderbox.config import Settings, parse_networks
from binderbox.errors import UsageError
from binderbox.launch import ManagedHub
from binderbox.launch.firewall import (
    FORWARD_CHAIN,
    HOST_CHAIN,
    bridge_name,
    chain_rules,
    guard,
    hooks,
    nameservers,
    remove,
)
from binderbox.launch.hub import build_bridge

# --- pure ------------------------------------------------------------------------------


def test_the_rules_reject_blocked_networks_after_dns_and_replies() -> None:
    rules = chain_rules(["10.0.0.0/8", "169.254.0.0/16"], ["10.255.255.53"])
    forward = [" ".join(rule) for rule in rules[FORWARD_CHAIN]]
    assert forward[0] == "-m conntrack --ctstate ESTABLISHED,RELATED -j RETURN"
    assert forward[1:3] == [
        "-d 10.255.255.53/32 -p udp --dport 53 -j RETURN",
        "-d 10.255.255.53/32 -p tcp --dport 53 -j RETURN",
    ]
    assert forward[3:5] == [
        "-d 10.0.0.0/8 -j REJECT --reject-with icmp-admin-prohibited",
        "-d 169.254.0.0/16 -j REJECT --reject-with icmp-admin-prohibited",
    ]
    assert forward[-1] == "-j RETURN"
    host = [" ".join(rule) for rule in rules[HOST_CHAIN]]
    assert host[0].endswith("ESTABLISHED,RELATED -j RETURN")
    assert host[-1] == "-j REJECT --reject-with icmp-admin-prohibited"
    assert hooks("br-0123456789ab") == {
        "DOCKER-USER": ["-i", "br-0123456789ab", "-j", FORWARD_CHAIN],
        "INPUT": ["-i", "br-0123456789ab", "-j", HOST_CHAIN],
    }


def test_bridge_names_and_resolvers(tmp_path: Path) -> None:
    assert bridge_name({"Id": "b4651a3c05f7e63c", "Options": {}}) == "br-b4651a3c05f7"
    named = {"Id": "x", "Options": {"com.docker.network.bridge.name": "bbx0"}}
    assert bridge_name(named) == "bbx0"
    conf = tmp_path / "resolv.conf"
    conf.write_text(
        "# comment\nnameserver 10.255.255.53\nnameserver 127.0.0.53\n"
        "nameserver fd00::1\nnameserver 10.255.255.53\nsearch example.org\n"
    )
    assert nameservers((conf, tmp_path / "missing")) == ["10.255.255.53"]


def test_firewall_settings_are_checked() -> None:
    assert parse_networks("10.0.0.0/8, 192.168.1.7") == ["10.0.0.0/8", "192.168.1.7/32"]
    for bad, message in [
        ({"session_firewall": "on"}, "auto, required or off"),
        ({"session_blocked_networks": "10.0.0.0/8,nope"}, "'nope' is not a network"),
        ({"session_blocked_networks": "fd00::/8"}, "IPv6"),
    ]:
        with pytest.raises(UsageError, match=message):
            Settings().with_overrides(**bad)


# --- real: iptables, a hub and containers ---------------------------------------------

needs_root = pytest.mark.skipif(
    not firewall_possible() or shutil.which("ip") is None,
    reason="the session firewall needs root, iptables (dockerd's backend) and iproute2",
)


def iptables_rules(chain: str) -> list[str]:
    return subprocess.run(
        ["iptables", "-w", "-S", chain], capture_output=True, text=True, check=True
    ).stdout.splitlines()


@pytest.fixture(scope="module")
def guarded_hub(
    tmp_path_factory: pytest.TempPathFactory,
    proxy_command: Path,  # noqa: F811 (fixture)
) -> Iterator[ManagedHub]:
    # A private range of our own making is blocked too (see private_server).
    settings = hub_settings(
        tmp_path_factory.mktemp("hub"),
        proxy_command,
        session_firewall="required",
        session_blocked_networks=Settings().session_blocked_networks + ",198.18.0.0/15",
    )
    hub = ManagedHub(settings)
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()


@pytest.fixture
def private_server(tmp_path: Path) -> Iterator[str]:
    """An HTTP server at 198.18.x.2:8000 in a network namespace of its own, reached from
    the host through a veth pair: a stand-in for a private network next to the machine."""
    tag = uuid.uuid4().hex[:6]
    namespace, outer, inner = f"bbx-{tag}", f"bbx{tag}a", f"bbx{tag}b"
    octet = int(tag[:2], 16)
    host_ip, server_ip = f"198.18.{octet}.1", f"198.18.{octet}.2"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    server = None
    try:
        ip("netns", "add", namespace)
        ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        ip("link", "set", inner, "netns", namespace)
        ip("addr", "add", f"{host_ip}/30", "dev", outer)
        ip("link", "set", outer, "up")
        ip("-n", namespace, "addr", "add", f"{server_ip}/30", "dev", inner)
        ip("-n", namespace, "link", "set", inner, "up")
        ip("-n", namespace, "link", "set", "lo", "up")
        ip("-n", namespace, "route", "add", "default", "via", host_ip)
        server = subprocess.Popen(
            [
                *("ip", "netns", "exec", namespace, "python3", "-m", "http.server", "8000"),
                *("--bind", server_ip, "--directory", str(tmp_path)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        probe = f"import socket; socket.create_connection(('{server_ip}', 8000), 1).close()"
        deadline = time.monotonic() + 20
        while subprocess.run(
            ["ip", "netns", "exec", namespace, "python3", "-c", probe], capture_output=True
        ).returncode:
            if server.poll() is not None:
                raise AssertionError(f"the stand-in server stopped: {server.stderr.read()}")
            assert time.monotonic() < deadline, "the stand-in server did not answer in 20 s"
            time.sleep(0.1)
        yield server_ip
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "del", outer], capture_output=True)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


PROBE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
    print("connected")
except OSError as error:
    print("refused:", type(error).__name__, error)
"""


def probe_from(client: docker.DockerClient, image: str, network: str, address: str, port: int):
    output = client.containers.run(
        image,
        ["python3", "-c", PROBE, address, str(port)],
        network=network,
        user="1000:1000",
        remove=True,
    )
    return output.decode().strip()


@needs_root
@pytest.mark.docker
def test_the_rules_are_in_place_for_the_sessions_bridge(
    guarded_hub: ManagedHub, docker_client: docker.DockerClient
) -> None:
    assert guarded_hub.firewall.active, guarded_hub.firewall.message
    assert "Session firewall: on" in guarded_hub.firewall.message
    network = docker_client.networks.get(guarded_hub.settings.session_network)
    bridge = bridge_name(network.attrs)
    assert f"-A DOCKER-USER -i {bridge} -j {FORWARD_CHAIN}" in iptables_rules("DOCKER-USER")
    assert f"-A INPUT -i {bridge} -j {HOST_CHAIN}" in iptables_rules("INPUT")
    assert any("198.18.0.0/15" in rule for rule in iptables_rules(FORWARD_CHAIN))
    # Starting again replaces the rules instead of adding a second copy.
    guarded_hub.stop()
    guarded_hub.start()
    hooked = [r for r in iptables_rules("DOCKER-USER") if r.endswith(f"-j {FORWARD_CHAIN}")]
    assert hooked.count(f"-A DOCKER-USER -i {bridge} -j {FORWARD_CHAIN}") == 1


@pytest.fixture
def open_network(docker_client: docker.DockerClient) -> Iterator[str]:
    """A Docker network without our rules, for the probes that must succeed."""
    network = docker_client.networks.create(f"binderbox-test-open-{uuid.uuid4().hex[:6]}")
    try:
        yield network.name
    finally:
        network.remove()


@pytest.fixture
def host_listener(docker_client: docker.DockerClient) -> Iterator[tuple[str, int]]:
    """A service of the host on Docker's default bridge address (docker0's)."""
    gateway = docker_client.networks.get("bridge").attrs["IPAM"]["Config"][0]["Gateway"]
    port = free_port()
    listener = subprocess.Popen(
        ["python3", "-m", "http.server", str(port), "--bind", gateway],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd="/",
    )
    try:
        yield gateway, port
    finally:
        listener.kill()
        listener.wait()


@needs_root
@pytest.mark.docker
def test_a_session_cannot_reach_the_host_or_a_blocked_network(
    guarded_hub: ManagedHub,
    docker_client: docker.DockerClient,
    base_image: str,
    private_server: str,
    open_network: str,
    host_listener: tuple[str, int],
) -> None:
    network = docker_client.networks.get(guarded_hub.settings.session_network)
    gateway, port = host_listener
    # From a network without the rules both answer: the probes can succeed.
    assert probe_from(docker_client, base_image, open_network, private_server, 8000) == (
        "connected"
    )
    assert probe_from(docker_client, base_image, open_network, gateway, port) == "connected"
    # From the sessions' network neither does, and the refusal is immediate.
    to_private = probe_from(docker_client, base_image, network.name, private_server, 8000)
    assert to_private.startswith("refused:") and "timed out" not in to_private, to_private
    to_host = probe_from(docker_client, base_image, network.name, gateway, port)
    assert to_host.startswith("refused:") and "timed out" not in to_host, to_host


@needs_root
@pytest.mark.docker
def test_a_build_step_cannot_reach_the_host_or_a_blocked_network(
    base_image: str, private_server: str, host_listener: tuple[str, int], tmp_path: Path
) -> None:
    gateway, port = host_listener
    bridge = build_bridge()
    blocked = Settings().session_blocked_networks + ",198.18.0.0/15"
    status = guard(bridge, blocked, "required", who="builds", setting="build_firewall")
    try:
        assert status.active and "Build firewall: on" in status.message, status.message
        (tmp_path / "probe.py").write_text(PROBE)
        (tmp_path / "Dockerfile").write_text(
            f"FROM {base_image}\nCOPY probe.py /probe.py\n"
            f"RUN python3 /probe.py {private_server} 8000 && python3 /probe.py {gateway} {port}"
            f" && echo {uuid.uuid4().hex}\n"
        )
        build = subprocess.run(
            ["/usr/bin/docker", "build", "--progress=plain", "--no-cache", str(tmp_path)],
            env={**os.environ, "DOCKER_BUILDKIT": "1"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert build.returncode == 0, build.stderr[-2000:]
        answers = [ln for ln in build.stderr.splitlines() if "refused:" in ln or "connected" in ln]
        assert len(answers) == 2 and all("refused:" in ln for ln in answers), answers
    finally:
        remove(bridge)
    assert not any(f"-i {bridge} " in rule for rule in iptables_rules("DOCKER-USER"))
