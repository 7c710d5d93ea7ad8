"""Firewall rules that keep sessions away from this machine and from private networks.

Sessions run anonymous, untrusted code. On their Docker network (see hub.py) they cannot
reach each other; these rules also stop them from opening connections to the host's own
services and to the networks in ``session_blocked_networks`` (by default the private and
link-local ranges, where cloud metadata services and internal services live), while the
internet stays reachable. DNS to the host's resolvers is let through, since Docker's
resolver asks them from inside the session's network.

The rules live in two chains of our own, hooked into Docker's DOCKER-USER chain (traffic
the host forwards for a session) and INPUT (traffic to the host itself) for the sessions'
bridge only. Applying them again replaces them, so they never pile up. Setting them needs
root; without it the sessions run unguarded and binderbox says so, and when binderbox is
reachable from other machines ``auto`` means ``required``: it refuses to start instead.

IPv6: the session network is created without it (containers on a network without IPv6
have it switched off inside), so the IPv4 rules are the whole story there. A bridge that
has IPv6 on (Docker's default bridge when dockerd runs with ``ipv6: true``) also gets
ip6tables rules that refuse every IPv6 connection from it, to the host and beyond.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from binderbox.config import parse_networks
from binderbox.errors import BinderboxError

FORWARD_CHAIN = "BINDERBOX-SESSIONS"
HOST_CHAIN = "BINDERBOX-SESSIONS-HOST"
# One IPv6 chain for both hooks: nothing but replies gets through.
IPV6_CHAIN = "BINDERBOX-NO-IPV6"
RESOLV_CONF_FILES = (Path("/etc/resolv.conf"), Path("/run/systemd/resolve/resolv.conf"))
_NAMESERVER = re.compile(r"^\s*nameserver\s+(\S+)", re.MULTILINE)
# A refused connection fails at once, instead of hanging until a timeout.
_REJECT = ["-j", "REJECT", "--reject-with", "icmp-admin-prohibited"]
_REJECT6 = ["-j", "REJECT", "--reject-with", "icmp6-adm-prohibited"]
_ESTABLISHED = ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "RETURN"]


class FirewallError(BinderboxError):
    """An iptables command failed; the message says which and why."""


@dataclass(frozen=True)
class FirewallStatus:
    """Whether the rules are in place, in one sentence for the operator."""

    active: bool
    message: str


def nameservers(files: tuple[Path, ...] = RESOLV_CONF_FILES) -> list[str]:
    """The IPv4 resolvers the host uses (what Docker's resolver forwards to)."""
    found: list[str] = []
    for file in files:
        try:
            text = file.read_text()
        except OSError:
            continue
        for address in _NAMESERVER.findall(text):
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                continue
            if ip.version == 4 and not ip.is_loopback and address not in found:
                found.append(address)
    return found


def chain_rules(blocked: list[str], resolvers: list[str]) -> dict[str, list[list[str]]]:
    """The rules of our two chains (iptables arguments after ``-A CHAIN``)."""
    established = _ESTABLISHED
    dns = [
        ["-d", f"{resolver}/32", "-p", protocol, "--dport", "53", "-j", "RETURN"]
        for resolver in resolvers
        for protocol in ("udp", "tcp")
    ]
    forward = [established, *dns, *(["-d", network, *_REJECT] for network in blocked)]
    host = [
        established,
        *(["-p", protocol, "--dport", "53", "-j", "RETURN"] for protocol in ("udp", "tcp")),
        _REJECT,
    ]
    return {FORWARD_CHAIN: [*forward, ["-j", "RETURN"]], HOST_CHAIN: host}


def _tag(owner: str) -> list[str]:
    # Each binderbox (``owner``: its hub id) hooks the chains with rules of its own, so
    # one that stops takes off only its own and another's builds stay guarded.
    return ["-m", "comment", "--comment", f"binderbox-{owner}"] if owner else []


def hooks(bridge: str, owner: str = "") -> dict[str, list[str]]:
    """Where our chains are entered: Docker's chain for forwarded traffic, and INPUT."""
    return {
        "DOCKER-USER": ["-i", bridge, *_tag(owner), "-j", FORWARD_CHAIN],
        "INPUT": ["-i", bridge, *_tag(owner), "-j", HOST_CHAIN],
    }


def ipv6_chain_rules() -> dict[str, list[list[str]]]:
    """The rules of our IPv6 chain (ip6tables arguments after ``-A CHAIN``)."""
    return {IPV6_CHAIN: [_ESTABLISHED, _REJECT6]}


def ipv6_hooks(bridge: str, forward_chain: str, owner: str = "") -> dict[str, list[str]]:
    """Where the IPv6 chain is entered: forwarded traffic (Docker's DOCKER-USER when
    dockerd manages ip6tables, else FORWARD) and INPUT, for ``bridge`` only."""
    return {
        forward_chain: ["-i", bridge, *_tag(owner), "-j", IPV6_CHAIN],
        "INPUT": ["-i", bridge, *_tag(owner), "-j", IPV6_CHAIN],
    }


def bridge_name(network_attrs: dict) -> str:
    """The host interface of a Docker bridge network."""
    options = network_attrs.get("Options") or {}
    return options.get("com.docker.network.bridge.name") or "br-" + network_attrs["Id"][:12]


class Iptables:
    """Runs iptables (waiting for its lock) and says plainly what failed."""

    def __init__(self, command: str = "iptables") -> None:
        self.command = command

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.command, "-w", *args], capture_output=True, text=True, timeout=60
        )
        if check and result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise FirewallError(
                f"'{self.command} {' '.join(args)}' failed: "
                f"{detail[-1] if detail else result.returncode}"
            )
        return result

    def chain_exists(self, chain: str) -> bool:
        return self.run("-S", chain, check=False).returncode == 0

    def unhook(self, chain: str, target: str, bridge: str, owner: str = "") -> None:
        """Remove the rules of ``chain`` that jump to ``target`` for ``bridge`` (those of
        ``owner``, and untagged ones) or for a bridge that is gone (a removed network);
        other networks' and other binderboxes' rules stay."""
        if not self.chain_exists(chain):
            return
        for line in self.run("-S", chain).stdout.splitlines():
            parts = line.split()
            if parts[:2] != ["-A", chain] or parts[-2:] != ["-j", target]:
                continue
            interface = parts[parts.index("-i") + 1] if "-i" in parts else ""
            comment = parts[parts.index("--comment") + 1] if "--comment" in parts else ""
            mine = comment in {"", f"binderbox-{owner}"}
            if (interface == bridge and mine) or not Path("/sys/class/net", interface).exists():
                self.run("-D", chain, *parts[2:])


def _install(
    iptables: Iptables,
    bridge: str,
    chains: dict[str, list[list[str]]],
    hooked: dict,
    owner: str,
) -> None:
    for chain, rules in chains.items():
        if not iptables.chain_exists(chain):
            iptables.run("-N", chain)
        iptables.run("-F", chain)
        for rule in rules:
            iptables.run("-A", chain, *rule)
    for chain, rule in hooked.items():
        iptables.unhook(chain, rule[-1], bridge, owner)
        iptables.run("-I", chain, "1", *rule)


def _ipv6_forward_chain(ip6tables: Iptables) -> str:
    return "DOCKER-USER" if ip6tables.chain_exists("DOCKER-USER") else "FORWARD"


def apply(
    bridge: str,
    blocked: list[str],
    resolvers: list[str],
    iptables: Iptables | None = None,
    *,
    ipv6: bool = False,
    owner: str = "",
) -> None:
    """Put the rules in place for ``bridge``, replacing any earlier ones of ``owner``;
    with ``ipv6`` (the bridge has IPv6 on) also refuse all IPv6 from it."""
    iptables = iptables or Iptables()
    if not iptables.chain_exists("DOCKER-USER"):
        raise FirewallError("Docker's DOCKER-USER chain is missing: is dockerd managing iptables?")
    if ipv6:
        ip6tables = Iptables("ip6tables")
        forward = _ipv6_forward_chain(ip6tables)
        hooked = ipv6_hooks(bridge, forward, owner)
        _install(ip6tables, bridge, ipv6_chain_rules(), hooked, owner)
    _install(iptables, bridge, chain_rules(blocked, resolvers), hooks(bridge, owner), owner)


def remove(bridge: str, iptables: Iptables | None = None, *, owner: str = "") -> None:
    """Take the rules of ``owner`` off ``bridge`` (the chains stay, for other session
    networks and other binderboxes)."""
    iptables = iptables or Iptables()
    for chain, rule in hooks(bridge).items():
        iptables.unhook(chain, rule[-1], bridge, owner)
    if shutil.which("ip6tables"):
        ip6tables = Iptables("ip6tables")
        for chain in ("DOCKER-USER", "FORWARD", "INPUT"):
            ip6tables.unhook(chain, IPV6_CHAIN, bridge, owner)


def blocker(*, ipv6: bool = False) -> str:
    """Why the rules cannot be set here ("" when they can): root, iptables, dockerd's
    DOCKER-USER chain, and ip6tables for a bridge with IPv6."""
    if os.geteuid() != 0:
        return "setting firewall rules needs root"
    if shutil.which("iptables") is None:
        return "iptables is not installed"
    if ipv6 and shutil.which("ip6tables") is None:
        return "the bridge has IPv6 on and ip6tables is not installed"
    return ""


def guard(
    bridge: str,
    blocked_text: str,
    mode: str,
    *,
    who: str,
    setting: str,
    public: bool = False,
    ipv6: bool = False,
    owner: str = "",
) -> FirewallStatus:
    """Apply the rules to ``bridge`` per ``mode`` ("auto": when root, "required": or fail,
    "off": take them off). ``public`` (other machines can reach binderbox) makes "auto"
    mean "required"; ``ipv6``: the bridge has IPv6 on; ``owner``: whose hooks these are
    (the hub id). ``who`` ("sessions", "builds") and
    ``setting`` (the mode's setting) are for the messages."""
    title = f"{who[0].upper()}{who[1:-1]} firewall"  # "Session firewall", "Build firewall"
    if mode == "off":
        if os.geteuid() == 0 and shutil.which("iptables"):
            remove(bridge, owner=owner)  # rules left from an earlier start
        return FirewallStatus(False, f"{title}: off ({setting} = off).")
    blocked = parse_networks(blocked_text)
    reason = blocker(ipv6=ipv6)
    if not reason:
        try:
            apply(bridge, blocked, nameservers(), ipv6=ipv6, owner=owner)
        except (FirewallError, OSError, subprocess.TimeoutExpired) as error:
            reason = str(error).rstrip(".")
    if reason:
        if mode == "required" or public:
            why = (
                "binderbox is reachable from other machines"
                if mode == "auto"
                else f"{setting} = required"
            )
            raise FirewallError(
                f"The {title.lower()} is needed ({why}) but cannot be set up ({reason}): run "
                f"binderbox serve as root, or set {setting} = off if something else keeps "
                f"{who} from this machine and private networks."
            )
        return FirewallStatus(
            False,
            f"{title}: off ({reason}); {who} can reach this machine's services and private "
            f"networks, which is acceptable only while binderbox listens on this machine "
            f"alone. Run binderbox serve as root, or set {setting} = required to refuse to "
            "start without it.",
        )
    what = f"{len(blocked)} blocked network{'s' if len(blocked) != 1 else ''}"
    six = "; IPv6 refused" if ipv6 else "; no IPv6 on it"
    return FirewallStatus(
        True, f"{title}: on ({who} cannot reach this machine or {what}; bridge {bridge}{six})."
    )
