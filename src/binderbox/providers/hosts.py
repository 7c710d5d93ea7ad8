"""Which remote hosts an anonymous user may make binderbox fetch from.

A public Binder fetches whatever URL a stranger types. Without these checks that URL
could read this machine's files (``file://``, local paths), run commands (``ext::``) or
reach services that only trust the local network (loopback, private ranges, cloud
metadata endpoints). Operators name exceptions in an allow-list; the tests use it for
their git daemon on 127.0.0.1.

A check only protects the connection that uses its answer: ``checked_address`` resolves a
host once, judges every address, and returns the one to connect to, so the caller pins
its connection there (a name answering a public address to the check and a private one
to the client is DNS rebinding). The name is checked in the form the client sends: IDNA
2008, as curl (libidn2) does, never Python's IDNA 2003 (which maps ``ß`` to ``ss``).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable
from typing import NamedTuple
from urllib.parse import urlsplit

import idna

from binderbox.errors import SourceError

ALLOWED_SCHEMES = ("https", "http", "git")
DEFAULT_PORTS = {"https": 443, "http": 80, "git": 9418}

Resolver = Callable[[str], list[str]]

_ASCII_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?$")
# Translated or tunnelled IPv6 whose real destination is an IPv4 address inside it.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: a local translator
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d


class CheckedAddress(NamedTuple):
    """A host in the ASCII form to connect with, and the checked address to connect to."""

    host: str
    address: str


def resolve_host(host: str) -> list[str]:
    """Every address ``host`` resolves to (A and AAAA), in the resolver's order."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        raise SourceError(f"The host '{host}' could not be found.") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def embedded_ipv4(address: str) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address really leads to (mapped, NAT64, 6to4, Teredo)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    if ip.ipv4_mapped:
        return [ip.ipv4_mapped]
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    if ip.sixtofour:
        return [ip.sixtofour]
    if ip.teredo:
        server, client = ip.teredo
        return [server, client]
    return []


def is_public(address: str) -> bool:
    """True for a globally routable unicast address, judging tunnels by what they embed."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip in _LOCAL_NAT64:
        return False
    inner = embedded_ipv4(address)
    if inner:
        return all(_is_global(v4) for v4 in inner)
    return _is_global(ip)


def _is_global(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return ip.is_global and not (ip.is_multicast or ip.is_reserved)


def ascii_host(host: str) -> str:
    """``host`` as a client connects to it: lower case, IDNA 2008 (``xn--``) labels.

    SourceError when the name is not a valid host name, or when IDNA 2003 (Python's
    resolver, older clients) would turn it into a different name than IDNA 2008 (curl).
    """
    name = host.strip()
    if _is_address(name.strip("[]")):
        return str(ipaddress.ip_address(name.strip("[]").split("%", 1)[0]))
    dot = "." if name.endswith(".") else ""
    bare = name[:-1] if dot else name
    if not bare:
        raise SourceError("The URL has no host name.")
    # curl hands ASCII names to the resolver as they are (no IDNA step).
    modern = bare.lower() if bare.isascii() else _idna_form(host, bare)
    if not all(_ASCII_LABEL.match(label) for label in modern.split(".")):
        raise SourceError(f"'{host}' is not a valid host name.")
    return modern + dot


def _idna_form(host: str, bare: str) -> str:
    """The IDNA 2008 form of a Unicode name, refused when IDNA 2003 differs."""
    try:
        modern = idna.encode(bare, uts46=True, transitional=False).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        raise SourceError(f"'{host}' is not a valid host name.") from None
    try:
        legacy = bare.encode("idna").decode("ascii").lower()
    except UnicodeError:
        legacy = ""
    if legacy != modern:
        raise SourceError(
            f"The host name '{host}' means '{modern}' to some programs and "
            f"'{legacy or 'nothing'}' to others; binderbox does not fetch from names "
            "that differ between IDNA 2003 and IDNA 2008."
        )
    return modern


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _split(url_or_host: str, port: int | None) -> tuple[str, int | None]:
    """The raw host and port of a URL (its form checked) or of a bare host name."""
    if "/" not in url_or_host:
        return url_or_host, port
    check_url_form(url_or_host)
    parts = urlsplit(url_or_host)
    try:
        explicit = parts.port
    except ValueError:
        raise SourceError(f"'{url_or_host}' has a port that is not a number.") from None
    host = parts.hostname or ""
    if not host:
        raise SourceError(f"'{url_or_host}' has no host name.")
    return host, explicit or port or DEFAULT_PORTS.get(parts.scheme.lower())


def checked_address(
    url_or_host: str,
    port: int | None = None,
    allowed: Iterable[str] = (),
    resolve: Resolver = resolve_host,
) -> CheckedAddress:
    """Resolve a URL's (or a bare host's) host once and judge every address it has.

    Returns the host in the ASCII form the client must use and the first address, which
    the caller connects to (and nowhere else). ``allowed`` holds host names or addresses,
    optionally ``host:port``, that an operator trusts although they are local or private.
    ``port`` is used when ``url_or_host`` names none (a URL's scheme gives a default).
    SourceError saying why when the host may not be fetched from.
    """
    raw, port = _split(url_or_host, port)
    host = ascii_host(raw)
    trusted = _allowed_set(allowed)
    named = host in trusted or (port is not None and f"{host}:{port}" in trusted)
    addresses = [host] if _is_address(host) else resolve(host.rstrip(".") or host)
    if not addresses:
        raise SourceError(f"The host '{host}' could not be found.")
    for address in addresses:
        if named or _address_allowed(address, port, trusted) or is_public(address):
            continue
        raise SourceError(
            f"The host '{host}' is on a local or private network ({address}); "
            "binderbox does not fetch from there unless the operator allows it."
        )
    return CheckedAddress(host, addresses[0])


def _allowed_set(allowed: Iterable[str]) -> set[str]:
    entries: set[str] = set()
    for entry in allowed:
        entry = entry.strip().lower()
        if not entry:
            continue
        entries.add(entry)
        name, colon, port = entry.rpartition(":")
        if not (colon and port.isdigit()) or ":" in name:
            name, port = entry, ""
        try:  # an operator may write a host name in Unicode
            entries.add(ascii_host(name) + (f":{port}" if port else ""))
        except SourceError:
            pass
    return entries


def _address_allowed(address: str, port: int | None, trusted: set[str]) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    forms = {str(ip)}
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        forms.add(str(ip.ipv4_mapped))  # the same host, written the IPv6 way
    for form in list(forms):
        if port is not None:
            forms |= {f"{form}:{port}", f"[{form}]:{port}"}
    return bool(forms & trusted)


def check_url_form(url: str) -> None:
    """SourceError unless ``url`` is an http(s) or git:// URL with a host (no lookups)."""
    if "\n" in url or "\r" in url or url.startswith("-"):
        raise SourceError("The repository URL contains characters a URL cannot have.")
    if "::" in url.split("/", 1)[0]:
        raise SourceError(f"'{url}' uses a git transport binderbox does not allow.")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        shown = f"'{scheme}://'" if scheme else "a local path"
        if not scheme and re.match(r"^[\w.-]+@[\w.-]+:", url):
            shown = "an ssh address"
        raise SourceError(
            f"'{url}' is {shown}; only {', '.join(s + '://' for s in ALLOWED_SCHEMES)} "
            "repository URLs can be launched."
        )
    if not parts.hostname:
        raise SourceError(f"'{url}' has no host name.")


def check_remote_url(
    url: str,
    allowed_hosts: Iterable[str] = (),
    resolve: Resolver = resolve_host,
) -> str:
    """Return ``url`` when binderbox may fetch it, else raise SourceError saying why.

    Checks only; a client that connects afterwards must pin its connection with
    ``checked_address`` instead, or it may reach a different address.
    """
    check_url_form(url)
    checked_address(url, None, allowed_hosts, resolve)
    return url
