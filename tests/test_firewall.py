"""The session firewall: sessions cannot open connections to this machine's services or
to blocked networks, while DNS and everything else still work.

The real tests need root (iptables) and build their targets on this machine only: a
listener on the sessions' bridge address (the host itself), and a small network
namespace behind a veth pair standing in for a private network. No packet leaves the
machine; the test process itself talks to 127.0.0.1 only."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
import requests
from tests.conftest import firewall_possible, free_port
from tests.test_launch import hub_settings, proxy_command  # noqa: F401 (fixture)

from binderbox.config import Settings, parse_networks
from binderbox.errors import UsageError
from binderbox.launch import ManagedHub
from binderbox.launch.firewall import (
    FORWARD_CHAIN,
    HOST_CHAIN,
    IPV6_CHAIN,
    bridge_name,
    chain_rules,
    guard,
    hooks,
    nameservers,
    remove,
)
from binderbox.launch.hub import build_bridge, hub_id_for

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
    # Each binderbox's hooks carry its hub id, so stopping one leaves another's.
    tagged = hooks("docker0", "0123abcd")["DOCKER-USER"]
    assert tagged == [
        *("-i", "docker0", "-m", "comment", "--comment", "binderbox-0123abcd"),
        *("-j", FORWARD_CHAIN),
    ]


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
    owner = guarded_hub.hub_id
    network = docker_client.networks.get(guarded_hub.settings.session_network)
    bridge = bridge_name(network.attrs)
    ours = {chain: " ".join(["-A", chain, *rule]) for chain, rule in hooks(bridge, owner).items()}
    assert ours["DOCKER-USER"] in iptables_rules("DOCKER-USER")
    assert ours["INPUT"] in iptables_rules("INPUT")
    assert any("198.18.0.0/15" in rule for rule in iptables_rules(FORWARD_CHAIN))
    # Starting again replaces the rules instead of adding a second copy.
    guarded_hub.stop()
    guarded_hub.start()
    assert iptables_rules("DOCKER-USER").count(ours["DOCKER-USER"]) == 1


@pytest.fixture
def open_network(docker_client: docker.DockerClient) -> Iterator[str]:
    """A Docker network without our rules, for the probes that must succeed."""
    network = docker_client.networks.create(f"binderbox-test-open-{uuid.uuid4().hex[:6]}")
    try:
        yield network.name
    finally:
        network.remove()


def bridge_address(interface: str) -> str:
    """The host's IPv4 address on a bridge (dockerd does not always list the default
    bridge's gateway in its IPAM config)."""
    shown = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "dev", interface],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return shown.split(" inet ", 1)[1].split("/", 1)[0]


@pytest.fixture
def host_listener(docker_client: docker.DockerClient) -> Iterator[tuple[str, int]]:
    """A service of the host on Docker's default bridge address (docker0's)."""
    gateway = bridge_address(build_bridge())
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
    # Its own rules are gone (another binderbox serving here keeps its own).
    assert f"-A DOCKER-USER -i {bridge} -j {FORWARD_CHAIN}" not in iptables_rules("DOCKER-USER")


# --- public deployments: the firewalls fail closed ------------------------------------

# Runs binderbox as "nobody" (uid 65534): imports happen as root (the interpreter lives
# under /root), then the process drops to nobody for good and runs the given code.
AS_NOBODY = """
import json, os, sys
import binderbox.cli, binderbox.service.serve, binderbox.launch.firewall
os.setgroups([]); os.setgid(65534); os.setuid(65534)
assert os.geteuid() == 65534
"""


def run_as_nobody(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", AS_NOBODY + code],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )


needs_root_only = pytest.mark.skipif(os.geteuid() != 0, reason="dropping to nobody needs root")


@needs_root_only
def test_a_public_serve_that_cannot_set_its_firewalls_refuses_to_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o777)
    state.chmod(0o777)
    port = free_port()
    env = {
        "BINDERBOX_STATE_DIR": str(state),
        "BINDERBOX_SERVICE_HOST": "0.0.0.0",
        "BINDERBOX_SERVICE_PORT": str(port),
        "BINDERBOX_CONFIG": "",
    }
    code = "sys.argv = ['binderbox', 'serve']; binderbox.cli.main()"
    result = run_as_nobody(code, env)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    assert "reachable from other machines (at 0.0.0.0)" in output, output
    assert "run binderbox serve as root" in output, output
    assert "session_firewall = off and build_firewall = off" in output, output
    # Nothing was started: the port is free and the state directory empty.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
    assert list(state.iterdir()) == []


@needs_root_only
def test_auto_means_required_only_when_the_service_is_public() -> None:
    code = """
from binderbox.config import Settings
from binderbox.errors import BinderboxError
from binderbox.launch.firewall import guard
from binderbox.service.serve import firewalls_for
out = {}
out["loopback"] = firewalls_for(Settings()).session_firewall
out["off"] = firewalls_for(Settings(service_host="0.0.0.0", session_firewall="off",
                                    build_firewall="off")).build_firewall
for name, settings in [("public", Settings(service_host="0.0.0.0")),
                       ("proxied", Settings(sessions_public_url="https://hub.example.org/")),
                       ("builds", Settings(service_host="::", session_firewall="off"))]:
    try:
        firewalls_for(settings)
        out[name] = "started"
    except BinderboxError as error:
        out[name] = error.message
blocked = Settings().session_blocked_networks
out["auto"] = guard("bbx-none", blocked, "auto", who="sessions", setting="session_firewall").message
try:
    guard("bbx-none", blocked, "auto", who="builds", setting="build_firewall", public=True)
except BinderboxError as error:
    out["guard"] = error.message
print(json.dumps(out))
"""
    result = run_as_nobody(code)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["loopback"] == "auto" and out["off"] == "off"
    assert "(at 0.0.0.0)" in out["public"] and "run binderbox serve as root" in out["public"]
    assert "(at hub.example.org)" in out["proxied"]
    # Only the firewalls that are not off are named.
    assert "set build_firewall = off only if" in out["builds"], out["builds"]
    # On loopback, auto without root serves and says so (at start and on /status).
    assert out["auto"].startswith("Session firewall: off (setting firewall rules needs root)")
    assert "listens on this machine alone" in out["auto"]
    assert out["guard"].startswith("The build firewall is needed"), out["guard"]
    # Each refusal is one sentence.
    for name in ("public", "proxied", "builds", "guard"):
        assert out[name].count(". ") == 0 and out[name].endswith("."), out[name]


@needs_root
@pytest.mark.docker
def test_a_public_serve_as_root_sets_both_firewalls_with_auto(
    tmp_path_factory: pytest.TempPathFactory, base_image: str, docker_client: docker.DockerClient
) -> None:
    from tests.test_serve import serving

    with serving(
        tmp_path_factory,
        "fwpublic",
        BINDERBOX_SERVICE_HOST="0.0.0.0",
        BINDERBOX_SESSION_FIREWALL="auto",
        BINDERBOX_BUILD_FIREWALL="auto",
    ) as served:
        status = requests.get(served.url + "/status", timeout=30).text
        assert "Session firewall: on" in status and "Build firewall: on" in status, status
        network = docker_client.networks.get("binderbox-sessions")
        owner = hub_id_for(Path(served.env["BINDERBOX_STATE_DIR"]).resolve())
        rules = iptables_rules("DOCKER-USER")
        for bridge in (bridge_name(network.attrs), build_bridge()):
            hook = " ".join(["-A", "DOCKER-USER", *hooks(bridge, owner)["DOCKER-USER"]])
            assert hook in rules, rules
        build_hook = hook
    # Build rules last only while serve runs (the sessions' stay, for adopted sessions).
    assert build_hook not in iptables_rules("DOCKER-USER")


# --- IPv6: no session network with it, and a bridge that has it gets ip6tables rules ---


def create_ipv6_network(docker_client: docker.DockerClient, name: str, **kwargs):
    """A network with IPv6 on, or a skip where dockerd cannot make one: inside a container
    (Docker-in-Docker, as .ci/fresh-machine runs) /proc/sys is read-only for it."""
    try:
        return docker_client.networks.create(name, driver="bridge", enable_ipv6=True, **kwargs)
    except docker.errors.APIError as error:
        if "Unable to enable IPv6" in str(error):
            pytest.skip(f"dockerd cannot make IPv6 networks here: {error.explanation}")
        raise


@pytest.fixture
def ipv6_network(docker_client: docker.DockerClient) -> Iterator[docker.models.networks.Network]:
    """A Docker network with IPv6 on (a ULA subnet of our own), as dockerd makes them
    when an operator turns IPv6 on."""
    tag = uuid.uuid4().hex[:4]
    ipam = docker.types.IPAMConfig(
        pool_configs=[
            docker.types.IPAMPool(subnet=f"fd42:{tag}:6::/64", gateway=f"fd42:{tag}:6::1")
        ]
    )
    network = create_ipv6_network(docker_client, f"binderbox-test-v6-{tag}", ipam=ipam)
    try:
        network.reload()
        yield network
    finally:
        network.remove()


@pytest.mark.docker
def test_a_session_network_with_ipv6_is_refused(docker_client: docker.DockerClient) -> None:
    from binderbox.errors import BinderboxError
    from binderbox.launch.hub import ensure_session_network

    # Isolated like binderbox's own in every other way.
    name = f"binderbox-test-v6icc-{uuid.uuid4().hex[:4]}"
    ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet="fd42:77:6::/64")])
    isolated = create_ipv6_network(
        docker_client,
        name,
        ipam=ipam,
        options={"com.docker.network.bridge.enable_icc": "false"},
    )
    try:
        with pytest.raises(BinderboxError, match="has IPv6 on"):
            ensure_session_network(docker_client, name)
    finally:
        isolated.remove()
    # One binderbox creates has no IPv6.
    fresh = f"binderbox-test-v4-{uuid.uuid4().hex[:4]}"
    try:
        attrs = ensure_session_network(docker_client, fresh)
        assert attrs["EnableIPv6"] is False
    finally:
        docker_client.networks.get(fresh).remove()


LISTEN_V6 = """
import socket, sys, time
deadline = time.monotonic() + 20
while True:
    try:
        server = socket.create_server((sys.argv[1], int(sys.argv[2])), family=socket.AF_INET6)
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(0.1)
print("listening", flush=True)
while True:
    server.accept()[0].close()
"""


def ip6tables_rules(chain: str) -> list[str]:
    return subprocess.run(
        ["ip6tables", "-w", "-S", chain], capture_output=True, text=True, check=True
    ).stdout.splitlines()


@needs_root
@pytest.mark.docker
def test_a_bridge_with_ipv6_gets_no_ipv6_through(
    docker_client: docker.DockerClient, base_image: str, ipv6_network
) -> None:
    bridge = bridge_name(ipv6_network.attrs)
    gateway = next(
        c["Gateway"] for c in ipv6_network.attrs["IPAM"]["Config"] if ":" in c.get("Gateway", "")
    )
    port = free_port()
    # The bridge's address is usable once the bridge is up (a container is on it) and
    # IPv6 duplicate address detection is done: the listener tries until it can bind.
    keeper = docker_client.containers.run(
        base_image, ["sleep", "300"], network=ipv6_network.name, detach=True, remove=True
    )
    listener = subprocess.Popen(
        [sys.executable, "-c", LISTEN_V6, gateway, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd="/",
    )
    try:
        assert listener.stdout.readline().strip() == "listening", "no IPv6 listener in 20 s"
        before = probe_from(docker_client, base_image, ipv6_network.name, gateway, port)
        assert before == "connected", before
        status = guard(
            bridge,
            Settings().session_blocked_networks,
            "required",
            who="builds",
            setting="build_firewall",
            ipv6=True,
        )
        try:
            assert status.active and "IPv6 refused" in status.message, status.message
            assert f"-A INPUT -i {bridge} -j {IPV6_CHAIN}" in ip6tables_rules("INPUT")
            forward = ip6tables_rules("FORWARD") + (
                ip6tables_rules("DOCKER-USER")
                if subprocess.run(
                    ["ip6tables", "-w", "-S", "DOCKER-USER"], capture_output=True
                ).returncode
                == 0
                else []
            )
            assert any(f"-i {bridge} -j {IPV6_CHAIN}" in rule for rule in forward), forward
            after = probe_from(docker_client, base_image, ipv6_network.name, gateway, port)
            assert after.startswith("refused:") and "timed out" not in after, after
        finally:
            remove(bridge)
        assert not any(f"-i {bridge} " in rule for rule in ip6tables_rules("INPUT"))
    finally:
        listener.kill()
        listener.wait()
        keeper.kill()
