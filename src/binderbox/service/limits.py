"""Who may launch what, and how much: quotas, bans, a per-address rate limit, caps on
what one address has under way, and who the address is (behind trusted proxies).

Refusals use the words mybinder.org users already know. "Address" means the client's
IPv4 address or, for IPv6, its /64: one home or one cloud machine gets a whole /64, so
counting single IPv6 addresses would give it billions of rate limits.
"""

from __future__ import annotations

import ipaddress
import os
import re
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from binderbox.config import Settings, size_in_bytes
from binderbox.errors import BinderboxError, UsageError


class LaunchRefused(BinderboxError):
    """A launch this deployment will not do now (quota, ban)."""


def machine_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def total_quota(settings: Settings, memory: int | None = None) -> int:
    """The setting, or as many sessions as memory holds at their guarantee (2 GiB kept)."""
    if settings.total_quota > 0:
        return settings.total_quota
    memory = machine_memory() if memory is None else memory
    guarantee = size_in_bytes(settings.session_mem_guarantee, "session_mem_guarantee")
    return max(1, int((memory - 2 * 1024**3) // guarantee))


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


@dataclass
class Limits:
    per_repo: int
    total: int
    banned_specs: list[re.Pattern[str]] = field(default_factory=list)
    # When not empty, only specs matching one of these may launch.
    allowed_specs: list[re.Pattern[str]] = field(default_factory=list)
    banned_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(
        default_factory=list
    )

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        patterns = {}
        for name in ("banned_specs", "allowed_specs"):
            try:
                patterns[name] = [re.compile(p) for p in _split(getattr(settings, name))]
            except re.error as err:
                raise UsageError(f"Setting '{name}' has an invalid pattern: {err}.") from None
        try:
            networks = [
                ipaddress.ip_network(n, strict=False) for n in _split(settings.banned_networks)
            ]
        except ValueError as err:
            raise UsageError(f"Setting 'banned_networks': {err}.") from None
        return cls(
            per_repo=settings.per_repo_quota,
            total=total_quota(settings),
            banned_specs=patterns["banned_specs"],
            allowed_specs=patterns["allowed_specs"],
            banned_networks=networks,
        )

    def check_spec(self, provider: str, spec: str) -> None:
        """Refuse specs an operator banned, or did not allow when only some are."""
        full = f"{provider}/{spec}"
        if any(pattern.search(full) for pattern in self.banned_specs):
            raise LaunchRefused(
                f"Sorry, {full} has been temporarily disabled from launching. "
                "Please contact the admins of this binderbox for more info."
            )
        if self.allowed_specs and not any(p.search(full) for p in self.allowed_specs):
            raise LaunchRefused(
                f"Sorry, this binderbox only launches the repositories its admins chose, "
                f"and {full} is not one of them."
            )

    def address_banned(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.banned_networks)

    def check_quota(self, image: str, running: Iterable[str], spec: str) -> None:
        """Refuse a launch when the repository or the machine is full."""
        running = list(running)
        repository = image.rsplit(":", 1)[0]
        same = sum(1 for other in running if other.rsplit(":", 1)[0] == repository)
        if self.per_repo and same >= self.per_repo:
            raise LaunchRefused(f"Too many users running {spec}! Try again soon.")
        if self.total and len(running) >= self.total:
            raise LaunchRefused("Too many users on this binderbox! Try again soon.")


class RateLimiter:
    """At most ``limit`` events per ``period`` seconds for each key (a sliding window)."""

    def __init__(self, limit: int, period: float = 60.0) -> None:
        self.limit = limit
        self.period = period
        self._seen: dict[str, deque[float]] = {}

    def retry_after(self, key: str, now: float | None = None) -> float:
        """0 when ``key`` may go on (and counts it), else the seconds until it may."""
        if self.limit <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        times = self._seen.setdefault(key, deque())
        while times and times[0] <= now - self.period:
            times.popleft()
        if len(times) >= self.limit:
            return times[0] + self.period - now
        times.append(now)
        if len(self._seen) > 10_000:  # forget quiet addresses now and then
            self._seen = {k: v for k, v in self._seen.items() if v and v[-1] > now - self.period}
        return 0.0


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def address_bucket(address: str) -> str:
    """What limits count: an IPv4 address as is, an IPv6 one by its /64 (an IPv4-mapped
    IPv6 address as its IPv4 address); anything unparsable as given."""
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]"))
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def parse_trusted_proxies(text: str) -> list[Network]:
    """The ``trusted_proxies`` setting: addresses or networks, comma or space separated."""
    networks = []
    for item in re.split(r"[,\s]+", text.strip()):
        if item:
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise UsageError(
                    f"Setting 'trusted_proxies': '{item}' is not an address or network."
                ) from None
    return networks


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip().strip('"')
    if text.startswith("["):  # Forwarded's "[2001:db8::1]:4711"
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # "192.0.2.1:4711"
        text = text.partition(":")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


def _forwarded_for(value: str) -> list[str]:
    """The ``for=`` addresses of a ``Forwarded`` header (RFC 7239), in order."""
    found = []
    for element in value.split(","):
        for pair in element.split(";"):
            name, _, item = pair.strip().partition("=")
            if name.strip().lower() == "for":
                found.append(item.strip())
    return found


def client_address(peer: str, headers: Mapping[str, str], trusted: list[Network]) -> str:
    """The address a request came from.

    The proxy headers (``Forwarded``, ``X-Forwarded-For``, ``X-Real-IP``) count only when
    the connection itself comes from a trusted proxy; anyone else could write them. Then
    the right-most address that is not a trusted proxy is the client: every address left
    of it was written by the client and proves nothing.
    """
    peer_ip = _ip(peer)
    if peer_ip is None or not any(peer_ip in network for network in trusted):
        return str(peer_ip) if peer_ip else peer
    chain: list[str] = []
    if headers.get("forwarded"):
        chain = _forwarded_for(headers["forwarded"])
    elif headers.get("x-forwarded-for"):
        chain = [item for item in headers["x-forwarded-for"].split(",") if item.strip()]
    elif headers.get("x-real-ip"):
        chain = [headers["x-real-ip"]]
    client = peer_ip
    for item in reversed(chain):
        ip = _ip(item)
        if ip is None:
            # A trusted proxy wrote something that is no address ("unknown"): count the
            # request against that proxy rather than against a name anyone can choose.
            break
        client = ip
        if not any(ip in network for network in trusted):
            break
    return str(client)


class InFlight:
    """What each address has under way (launches, builds), at most ``cap`` each (0: no cap)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._count: Counter[str] = Counter()

    def acquire(self, key: str) -> bool:
        """Count one more for ``key``; False (and nothing counted) when it is at its cap."""
        if self.cap > 0 and self._count[key] >= self.cap:
            return False
        self._count[key] += 1
        return True

    def release(self, key: str) -> None:
        self._count[key] -= 1
        if self._count[key] <= 0:
            del self._count[key]

    def __getitem__(self, key: str) -> int:
        return self._count.get(key, 0)
