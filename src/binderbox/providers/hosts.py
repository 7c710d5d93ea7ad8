"""Which remote hosts an anonymous user may make binderbox fetch from.

A public Binder fetches whatever URL a stranger types. Without these checks that URL
could read this machine's files (``file://``, local paths), run commands (``ext::``) or
reach services that only trust the local network (loopback, private ranges, cloud
metadata endpoints). Operators name exceptions in an allow-list; the tests use it for
their git daemon on 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from binderbox.errors import SourceError

ALLOWED_SCHEMES = ("https", "http", "git")

Resolver = Callable[[str], list[str]]


def resolve_host(host: str) -> list[str]:
    """Every address ``host`` resolves to (A and AAAA)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        raise SourceError(f"The host '{host}' could not be found.") from None
    return sorted({str(info[4][0]) for info in infos})


def is_public(address: str) -> bool:
    """True for a globally routable unicast address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved)


def check_remote_url(
    url: str,
    allowed_hosts: Iterable[str] = (),
    resolve: Resolver = resolve_host,
) -> str:
    """Return ``url`` when binderbox may fetch it, else raise SourceError saying why.

    ``allowed_hosts`` holds host names or addresses (optionally ``host:port``) an operator
    trusts even though they are local or private.
    """
    if "\n" in url or "\r" in url or url.startswith("-"):
        raise SourceError("The repository URL contains characters a URL cannot have.")
    if "::" in url.split("/", 1)[0]:
        raise SourceError(f"'{url}' uses a git transport binderbox does not allow.")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        shown = f"'{scheme}://'" if scheme else "a local path"
        raise SourceError(
            f"'{url}' is {shown}; only {', '.join(s + '://' for s in ALLOWED_SCHEMES)} "
            "repository URLs can be launched."
        )
    host = (parts.hostname or "").lower()
    if not host:
        raise SourceError(f"'{url}' has no host name.")
    allowed = {h.lower() for h in allowed_hosts}
    port = parts.port
    if host in allowed or (port is not None and f"{host}:{port}" in allowed):
        return url
    for address in resolve(host):
        if address in allowed:
            return url
        if not is_public(address):
            raise SourceError(
                f"The host '{host}' is on a local or private network ({address}); "
                "binderbox does not fetch from there unless the operator allows it."
            )
    return url
