"""The session firewall on every Swarm node sessions run on.

On one machine ``serve`` puts the firewall rules (firewall.py) on the sessions' bridge.
On a Swarm, sessions sit on overlay networks of their own, and what leaves an overlay
network for anywhere else goes through the node's ``docker_gwbridge``: out of the node
(forwarded, Docker's DOCKER-USER chain) or to the node's own services (INPUT). So each
node gets the same rules on its ``docker_gwbridge``, set by a Swarm global service that
runs this module in the node's network namespace with NET_ADMIN, and takes them off again
when it is stopped (the service is removed).

Without it, a session could open connections to the node's services, to private
networks (cloud metadata, the registry, the database) and, since an address of another
overlay network is not on its link, to other sessions through the node's default route.

With a third argument, the bridge of the node's dockerd (``docker0``), it puts the build
firewall there too: BuildKit's steps on a build node (builder/nodes.py) run on that
bridge, and must not reach the node, the registry or private networks either. With two
more, the build memory and process limits, it holds the node's BuildKit steps to them
(the node's cgroup tree mounted at /host-cgroup) and lifts them again when it stops.

Run: ``python -m binderbox.launch.nodeguard OWNER BLOCKED [BRIDGE [MEMORY PIDS]]``.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from pathlib import Path

from binderbox.config import parse_networks
from binderbox.launch.firewall import FirewallError, Iptables, apply, nameservers, remove
from binderbox.service.buildlimits import apply_build_limits, lift_build_limits

# Where the node's cgroup tree is mounted into the guard (for the build limits).
HOST_CGROUP = Path("/host-cgroup")
# The bridge of a node that carries overlay networks' traffic to everywhere else.
GATEWAY_BRIDGE = "docker_gwbridge"
# What the guard prints, and the file it makes, once its rules are in place: the service's
# health check looks for the file, and Swarm calls the task running only once it is healthy.
READY = "binderbox node guard: rules in place"
READY_FILE = Path("/tmp/binderbox-node-guard-ready")


def node_iptables() -> Iptables:
    """The iptables the node's dockerd uses: its DOCKER-USER chain is in the nf_tables
    or in the legacy tables, whichever this image's default is."""
    for command in ("iptables-nft", "iptables-legacy"):
        candidate = Iptables(command)
        try:
            if candidate.chain_exists("DOCKER-USER"):
                return candidate
        except OSError:  # that variant is not installed
            continue
    return Iptables()


def build_owner(owner: str) -> str:
    """The tag of the build rules a guard sets (serve's own on the manager stay apart)."""
    return f"{owner}-b"


USAGE = (
    "usage: python -m binderbox.launch.nodeguard OWNER BLOCKED_NETWORKS "
    "[BUILD_BRIDGE [BUILD_MEMORY BUILD_PIDS]]"
)


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3, 5):
        print(USAGE, file=sys.stderr)
        return 2
    owner, blocked_text = argv[:2]
    bridges = [(GATEWAY_BRIDGE, owner)]
    if len(argv) >= 3:
        bridges.append((argv[2], build_owner(owner)))
    limits = None
    if len(argv) == 5:
        # The node's BuildKit steps held together, as serve holds the manager's.
        try:
            limits = apply_build_limits(argv[3], int(argv[4]), root=HOST_CGROUP)
        except ValueError as error:
            print(f"binderbox node guard: {error}", file=sys.stderr)
            return 2
        print(f"binderbox node guard: {limits.message}", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        # The overlay networks carry no IPv6 here (sessions get none), nor does dockerd's
        # bridge unless the node's dockerd is told to: IPv4 rules.
        iptables = node_iptables()
        blocked = parse_networks(blocked_text)
        for bridge, tag in bridges:
            if not Path("/sys/class/net", bridge).exists():
                raise FirewallError(f"the node has no network interface {bridge}")
            apply(bridge, blocked, nameservers(), iptables, owner=tag)
    except (FirewallError, OSError, ValueError) as error:
        print(f"binderbox node guard: the rules cannot be set: {error}", file=sys.stderr)
        return 1
    READY_FILE.touch()
    print(READY, flush=True)
    stop.wait()
    READY_FILE.unlink(missing_ok=True)
    if limits is not None:
        with contextlib.suppress(OSError):
            lift_build_limits(limits)
    try:
        for bridge, tag in bridges:
            remove(bridge, iptables, owner=tag)
    except (FirewallError, OSError) as error:
        print(f"binderbox node guard: the rules could not be taken off: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
