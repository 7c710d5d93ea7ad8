"""Whether this binderbox is reachable from other machines, and the address it is known by.

Links the service hands out (log links, ``binder_launch_host``, the launch events'
origin) are built from ``public_url``, never from a request's ``Host`` header: anyone can
send any Host, and a link built from it would send the next reader of the status page
wherever they chose.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from binderbox.config import Settings

# Names that always mean this machine only.
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
# Addresses that mean "every interface".
_EVERYWHERE = {"", "0.0.0.0", "::", "*"}


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name, IPv6 with or without brackets) can only be
    reached from this machine. Names other than localhost count as public: they are what
    other machines use."""
    host = host.strip().strip("[]").lower().rstrip(".")
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def public_hosts(settings: Settings) -> list[str]:
    """The hosts people reach this binderbox at that are not loopback: the service's
    listening address, and the hosts of ``public_url`` and ``sessions_public_url``."""
    hosts = [settings.service_host]
    for url in (settings.public_url, settings.sessions_public_url):
        if url:
            hosts.append(urlsplit(url).hostname or "")
    return [host for host in hosts if not is_loopback(host)]


def is_public(settings: Settings) -> bool:
    """Whether other machines may reach the service or its sessions (then the firewalls
    are required, not optional)."""
    return bool(public_hosts(settings))


def base_url(settings: Settings) -> str:
    """The service's address for links, ending in ``/``: ``public_url``, else where it
    listens (this machine's name when it listens on every interface)."""
    if settings.public_url:
        return settings.public_url.rstrip("/") + "/"
    host = settings.service_host
    if host in _EVERYWHERE:
        host = socket.getfqdn()
    if ":" in host:
        host = f"[{host.strip('[]')}]"
    return f"http://{host}:{settings.service_port}/"
