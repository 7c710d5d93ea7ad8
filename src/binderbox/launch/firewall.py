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
root; without it the sessions run unguarded and binderbox says so.
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
RESOLV_CONF_FILES = (Path("/etc/resolv.conf"), Path("/run/systemd/resolve/resolv.conf"))
_NAMESERVER = re.compile(r"^\s*nameserver\s+(\S+)", re.MULTILINE)
# A refused connection fails at once, instead of hanging until a timeout.
_REJECT = ["-j", "REJECT", "--reject-with", "icmp-admin-prohibited"]


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
    established = ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "RETURN"]
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


def hooks(bridge: str) -> dict[str, list[str]]:
    """Where our chains are entered: Docker's chain for forwarded traffic, and INPUT."""
    return {
        "DOCKER-USER": ["-i", bridge, "-j", FORWARD_CHAIN],
        "INPUT": ["-i", bridge, "-j", HOST_CHAIN],
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
                f"'iptables {' '.join(args)}' failed: {detail[-1] if detail else result.returncode}"
            )
        return result

    def chain_exists(self, chain: str) -> bool:
        return self.run("-S", chain, check=False).returncode == 0

    def unhook(self, chain: str, target: str, bridge: str) -> None:
        """Remove the rules of ``chain`` that jump to ``target`` for ``bridge`` or for a
        bridge that is gone (a removed network); other networks' rules stay."""
        if not self.chain_exists(chain):
            return
        for line in self.run("-S", chain).stdout.splitlines():
            parts = line.split()
            if parts[:2] != ["-A", chain] or parts[-2:] != ["-j", target]:
                continue
            interface = parts[parts.index("-i") + 1] if "-i" in parts else ""
            if interface == bridge or not Path("/sys/class/net", interface).exists():
                self.run("-D", chain, *parts[2:])


def apply(
    bridge: str, blocked: list[str], resolvers: list[str], iptables: Iptables | None = None
) -> None:
    """Put the rules in place for ``bridge``, replacing any earlier ones of ours."""
    iptables = iptables or Iptables()
    if not iptables.chain_exists("DOCKER-USER"):
        raise FirewallError("Docker's DOCKER-USER chain is missing: is dockerd managing iptables?")
    for chain, rules in chain_rules(blocked, resolvers).items():
        if not iptables.chain_exists(chain):
            iptables.run("-N", chain)
        iptables.run("-F", chain)
        for rule in rules:
            iptables.run("-A", chain, *rule)
    for chain, rule in hooks(bridge).items():
        iptables.unhook(chain, rule[-1], bridge)
        iptables.run("-I", chain, "1", *rule)


def remove(bridge: str, iptables: Iptables | None = None) -> None:
    """Take our rules off ``bridge`` (the chains stay, for other session networks)."""
    iptables = iptables or Iptables()
    for chain, rule in hooks(bridge).items():
        iptables.unhook(chain, rule[-1], bridge)


def guard(bridge: str, blocked_text: str, mode: str, *, who: str, setting: str) -> FirewallStatus:
    """Apply the rules to ``bridge`` per ``mode`` ("auto": when root, "required": or fail,
    "off": take them off). ``who`` ("sessions", "builds") and ``setting`` (the mode's
    setting) are for the messages."""
    title = f"{who[0].upper()}{who[1:-1]} firewall"  # "Session firewall", "Build firewall"
    if mode == "off":
        if os.geteuid() == 0 and shutil.which("iptables"):
            remove(bridge)  # rules left from an earlier start
        return FirewallStatus(False, f"{title}: off ({setting} = off).")
    blocked = parse_networks(blocked_text)
    reason = ""
    if os.geteuid() != 0:
        reason = "setting firewall rules needs root"
    elif shutil.which("iptables") is None:
        reason = "iptables is not installed"
    if not reason:
        try:
            apply(bridge, blocked, nameservers())
        except (FirewallError, OSError, subprocess.TimeoutExpired) as error:
            reason = str(error)
    if reason:
        if mode == "required":
            raise FirewallError(f"The {title.lower()} cannot be set up: {reason}.")
        return FirewallStatus(
            False,
            f"{title}: off ({reason}); {who} can reach this machine's services and private "
            f"networks. Run binderbox serve as root, or set {setting} = required to refuse "
            "to start without it.",
        )
    what = f"{len(blocked)} blocked network{'s' if len(blocked) != 1 else ''}"
    return FirewallStatus(
        True, f"{title}: on ({who} cannot reach this machine or {what}; bridge {bridge})."
    )
