"""The one HTTP client content providers use: timeouts, a User-Agent naming binderbox, the
extra CA bundle, and failures turned into sentences for the user.

Every request is pinned: its host is resolved once, the address is checked (when the
settings ask for it), and the connection goes to that address while the Host header and
TLS (SNI and the certificate check) keep the name. Redirects are requests of their own and
are checked and pinned the same way. Answers are decoded here, in bounded pieces, so a
small compressed body cannot grow into gigabytes in memory.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from binderbox import __version__
from binderbox.config import Settings
from binderbox.errors import SourceError, UsageError
from binderbox.providers.archive import Budget, human_size
from binderbox.providers.hosts import checked_address, resolve_host

USER_AGENT = f"binderbox/{__version__} (repository-to-image builder)"
# Connecting should be quick; a slow server may pause a while between chunks.
TIMEOUT = httpx.Timeout(60.0, connect=20.0)
MAX_REDIRECTS = 10
_CHUNK = 1 << 20
# Compressed bytes read at a time; each piece is inflated in steps of at most _CHUNK.
_RAW_CHUNK = 1 << 16
# Only encodings decoded here are asked for (httpx would add br/zstd when installed).
ACCEPT_ENCODING = "gzip, deflate"
_ZLIB_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": 32 + 15}
_DEFAULT_PORTS = {"http": 80, "https": 443}


class NotReady(SourceError):
    """The server accepted the request but has not prepared the file yet (HTTP 202)."""


class AnswerTooLarge(SourceError):
    """A JSON answer went over record_metadata_max_bytes."""


def _tls(settings: Settings) -> ssl.SSLContext | bool:
    """The system's CAs plus the configured extra bundle (a TLS-intercepting proxy's CA)."""
    if not settings.ca_bundle:
        return True
    context = ssl.create_default_context()
    try:
        context.load_verify_locations(cafile=settings.ca_bundle)
    except (OSError, ssl.SSLError) as err:
        raise UsageError(f"The CA bundle '{settings.ca_bundle}' cannot be used: {err}.") from None
    return context


# (host in its ASCII form, port) → the address every connection to it goes to.
Pins = dict[tuple[str, int], str]


class PinnedTransport(httpx.BaseTransport):
    """Connects each request to the one address its host was resolved (and checked) to.

    A name is resolved once per ``pins`` (one record, or this transport): a record that
    asks the same host many times sees one answer, and a name that answers differently
    later (DNS rebinding) is never asked again. Without checks the address is still
    pinned, which costs the one lookup the connection would make anyway. Each name has its
    own connection pool, so a TLS connection made for one name is never reused for another
    that shares its address.
    """

    def __init__(
        self,
        verify: ssl.SSLContext | bool,
        check: bool,
        allowed: list[str] | None = None,
        pins: Pins | None = None,
    ) -> None:
        """``pins``: addresses already chosen, shared by every client of one record."""
        self._verify = verify
        self._check = check
        self._allowed = allowed or []
        self._addresses: Pins = {} if pins is None else pins
        self._pools: dict[str, httpx.HTTPTransport] = {}
        self._lock = threading.Lock()

    def address_for(self, host: str, port: int) -> str:
        """The address requests to ``host``:``port`` go to (resolved and checked once)."""
        with self._lock:
            known = self._addresses.get((host, port))
        if known:
            return known
        if self._check:
            address = checked_address(host, port, self._allowed).address
        else:
            address = resolve_host(host.rstrip(".") or host)[0]
        with self._lock:
            return self._addresses.setdefault((host, port), address)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        # raw_host is the IDNA 2008 form httpx would connect to: resolve exactly that.
        host = url.raw_host.decode("ascii")
        port = url.port or _DEFAULT_PORTS.get(url.scheme, 80)
        address = self.address_for(host, port)
        extensions = dict(request.extensions)
        if url.scheme == "https" and address != host:
            extensions["sni_hostname"] = host  # TLS checks the certificate for the name
        pinned = httpx.Request(
            request.method,
            url.copy_with(host=address),
            headers=request.headers,  # keeps Host: the name, not the address
            stream=request.stream,
            extensions=extensions,
        )
        return self._pool(host).handle_request(pinned)

    def _pool(self, host: str) -> httpx.HTTPTransport:
        with self._lock:
            pool = self._pools.get(host)
            if pool is None:
                pool = self._pools[host] = httpx.HTTPTransport(verify=self._verify)
            return pool

    def close(self) -> None:
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()


def decoded(response: httpx.Response, chunk: int = _CHUNK) -> Iterator[bytes]:
    """The body of a streamed response, decoded (gzip, deflate) in pieces of at most
    ``chunk`` bytes, however much a compressed piece expands."""
    codings = [
        c.strip().lower()
        for c in response.headers.get("content-encoding", "").split(",")
        if c.strip() and c.strip().lower() != "identity"
    ]
    if not codings:
        yield from response.iter_raw(chunk)
        return
    if len(codings) > 1 or codings[0] not in _ZLIB_WBITS:
        raise SourceError(
            f"{_show(response.url)} answered in an encoding binderbox does not read "
            f"({', '.join(codings)})."
        )
    inflate = zlib.decompressobj(_ZLIB_WBITS[codings[0]])
    try:
        for raw in response.iter_raw(_RAW_CHUNK):
            data = raw
            while data and not inflate.eof:
                block = inflate.decompress(data, chunk)
                if block:
                    yield block
                data = inflate.unconsumed_tail
            if inflate.eof:
                break  # whatever follows the compressed stream is not part of the answer
        while not inflate.eof and (block := inflate.decompress(b"", chunk)):
            yield block
    except zlib.error:
        raise SourceError(f"{_show(response.url)} sent a damaged compressed answer.") from None


def parse_json(body: bytes, where: httpx.URL | str, what: str) -> Any:
    """``body`` as JSON; SourceError naming ``what`` when it is not JSON or nests too deep."""
    try:
        return json.loads(body)
    except RecursionError:
        # The C parser gives up at Python's recursion limit; no record API nests that deep.
        raise SourceError(
            f"Could not fetch {what}: {_show(where)} answered with JSON nested too deeply."
        ) from None
    except ValueError:
        raise SourceError(
            f"Could not fetch {what}: {_show(where)} did not answer with JSON."
        ) from None


class Http:
    """A small synchronous client; ``what`` arguments name the thing being fetched in
    messages ("the Zenodo record 3242074")."""

    def __init__(
        self,
        settings: Settings,
        credentials: tuple[set[str], dict[str, str]] | None = None,
        pins: Pins | None = None,
    ) -> None:
        """``credentials``: (origins, headers) — headers sent to those origins only
        (``https://zenodo.org``), never to where they redirect (downloads often redirect
        to storage elsewhere). ``pins``: share it between the clients of one record, so
        its metadata and its files come from the same addresses."""
        hooks: dict[str, list] = {"request": []}
        allowed = [h.strip() for h in settings.allowed_hosts.split(",") if h.strip()]
        if credentials:
            origins, headers = credentials

            def authorize(request: httpx.Request) -> None:
                mine = origin_of(request.url) in origins
                for name, value in headers.items():
                    if mine:
                        request.headers[name] = value
                    else:
                        request.headers.pop(name, None)

            hooks["request"].append(authorize)
        self.max_json = settings.record_metadata_max_bytes
        self._client = httpx.Client(
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": ACCEPT_ENCODING},
            timeout=TIMEOUT,
            follow_redirects=True,
            max_redirects=MAX_REDIRECTS,
            event_hooks=hooks,
            # Every request, redirects included, is checked (when the service asks: anonymous
            # users choose these URLs) and connected where it was checked. No proxies or
            # .netrc from the environment: the operator's setup is not the user's.
            transport=PinnedTransport(_tls(settings), settings.check_remote_hosts, allowed, pins),
            trust_env=False,
        )

    def __enter__(self) -> Http:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def get_json(self, url: str, what: str, params: dict[str, str] | None = None) -> Any:
        """GET a JSON document (at most record_metadata_max_bytes once decoded);
        SourceError naming ``what`` when that fails."""
        try:
            with self._client.stream(
                "GET", url, params=params, headers={"Accept": "application/json"}
            ) as response:
                _check_status(response, what)
                body = self._read_json_body(response, what)
                where = response.url
        except httpx.HTTPError as err:
            raise SourceError(f"Could not fetch {what}: {_transport_problem(err, url)}.") from None
        return parse_json(body, where, what)

    def answers_json(self, url: str) -> Any:
        """The JSON at ``url``, or None for any failure (used to probe unknown hosts).

        A host that may not be fetched from is still an error (SourceError), not a None.
        """
        try:
            with self._client.stream(
                "GET", url, headers={"Accept": "application/json"}
            ) as response:
                if response.status_code != 200:
                    return None
                try:
                    body = self._read_json_body(response, url)
                except SourceError:  # too large, damaged: not an answer
                    return None
            return json.loads(body)
        except (httpx.HTTPError, ValueError, RecursionError):
            return None

    def _read_json_body(self, response: httpx.Response, what: str) -> bytes:
        """The decoded body, refused as soon as it passes max_json (counted decoded)."""
        body = bytearray()
        for block in decoded(response, min(_CHUNK, self.max_json + 1)):
            body += block
            if len(body) > self.max_json:
                raise AnswerTooLarge(
                    f"Could not fetch {what}: {_show(response.url)} answered with more than "
                    f"{human_size(self.max_json)} (setting record_metadata_max_bytes)."
                )
        return bytes(body)

    def next_hop(self, url: str, what: str) -> tuple[int, str]:
        """One request without following redirects: the status and the next URL (or "")."""
        try:
            with self._client.stream("GET", url, follow_redirects=False) as response:
                location = response.headers.get("location", "")
                status = response.status_code
                if response.is_redirect and location:
                    return status, str(response.url.join(location))
                return status, ""
        except httpx.HTTPError as err:
            raise SourceError(
                f"Could not resolve {what}: {_transport_problem(err, url)}."
            ) from None

    def download(
        self,
        url: str,
        target: Path,
        budget: Budget,
        what: str,
        md5: str = "",
        params: dict[str, str] | None = None,
    ) -> None:
        """Stream ``url`` into the new file ``target``, counting bytes against ``budget``
        and checking ``md5`` when the API gave one.

        NotReady when the server answers 202 (it is still preparing the file).
        """
        digest = hashlib.md5(usedforsecurity=False)
        try:
            with self._client.stream("GET", url, params=params) as response:
                _check_status(response, what)
                if response.status_code == 202:
                    raise NotReady(f"{_capital(what)} is still being prepared by the server.")
                with open(target, "xb") as out:
                    for block in decoded(response):
                        budget.add_bytes(len(block))
                        digest.update(block)
                        out.write(block)
        except httpx.HTTPError as err:
            raise SourceError(
                f"Could not download {what}: {_transport_problem(err, url)}."
            ) from None
        if md5 and digest.hexdigest() != md5.lower():
            raise SourceError(
                f"Could not download {what}: its content does not match the checksum the "
                "API lists (the download was damaged or the record changed meanwhile)."
            )


def origin_of(url: httpx.URL | str) -> str:
    """``scheme://host[:port]`` of a URL, as compared for sending tokens (default ports
    left out, host in its IDNA form)."""
    parts = httpx.URL(url) if isinstance(url, str) else url
    return f"{parts.scheme}://{parts.netloc.decode('ascii').lower()}"


def _check_status(response: httpx.Response, what: str) -> None:
    if response.is_success:
        return
    code = response.status_code
    where = _show(response.url)
    if code in {404, 410}:
        raise SourceError(f"{_capital(what)} was not found ({where} answered {code}).")
    if code in {401, 403}:
        raise SourceError(f"{_capital(what)} is not public ({where} answered {code}).")
    if code == 429:
        raise SourceError(
            f"Could not fetch {what}: {where} is rate-limiting requests (429); try again later."
        )
    reason = response.reason_phrase or "error"
    raise SourceError(f"Could not fetch {what}: {where} answered {code} {reason}.")


def _transport_problem(err: httpx.HTTPError, url: str) -> str:
    host = urlsplit(url).netloc or url
    if isinstance(err, httpx.TooManyRedirects):
        return f"{host} redirected more than {MAX_REDIRECTS} times"
    if isinstance(err, httpx.TimeoutException):
        return f"{host} did not answer in time"
    if isinstance(err, httpx.ConnectError):
        detail = str(err) or "connection failed"
        if "CERTIFICATE_VERIFY_FAILED" in detail:
            return f"the TLS certificate of {host} is not trusted (see the ca_bundle setting)"
        return f"could not connect to {host} ({detail})"
    return f"{host}: {err or type(err).__name__}"


def _show(url: httpx.URL | str) -> str:
    text = str(url)
    return text if len(text) <= 200 else text[:197] + "..."


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]
