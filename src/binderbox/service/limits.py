"""Who may launch what, and how much: quotas, bans and a per-address rate limit.

Refusals use the words mybinder.org users already know.
"""

from __future__ import annotations

import ipaddress
import os
import re
import time
from collections import deque
from collections.abc import Iterable
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
