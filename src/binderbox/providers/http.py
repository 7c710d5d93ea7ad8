"""The one HTTP client content providers use: timeouts, a User-Agent naming binderbox, the
extra CA bundle, and failures turned into sentences for the user."""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from binderbox import __version__
from binderbox.config import Settings
from binderbox.errors import SourceError, UsageError
from binderbox.providers.archive import Budget
from binderbox.providers.hosts import check_remote_url

USER_AGENT = f"binderbox/{__version__} (repository-to-image builder)"
# Connecting should be quick; a slow server may pause a while between chunks.
TIMEOUT = httpx.Timeout(60.0, connect=20.0)
MAX_REDIRECTS = 10
_CHUNK = 1 << 20


class NotReady(SourceError):
    """The server accepted the request but has not prepared the file yet (HTTP 202)."""


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


class Http:
    """A small synchronous client; ``what`` arguments name the thing being fetched in
    messages ("the Zenodo record 3242074")."""

    def __init__(
        self, settings: Settings, credentials: tuple[set[str], dict[str, str]] | None = None
    ) -> None:
        """``credentials``: (hosts, headers) — headers sent to those hosts only, never to
        where they redirect (downloads often redirect to storage elsewhere)."""
        hooks: dict[str, list] = {"request": []}
        if settings.check_remote_hosts:
            allowed = [h.strip() for h in settings.allowed_hosts.split(",") if h.strip()]

            def check(request: httpx.Request) -> None:
                # Every request, redirects included: a public record may not lead us into
                # this machine's own network.
                check_remote_url(str(request.url), allowed)

            hooks["request"].append(check)
        if credentials:
            hosts, headers = credentials

            def authorize(request: httpx.Request) -> None:
                for name, value in headers.items():
                    if request.url.netloc.decode() in hosts:
                        request.headers[name] = value
                    else:
                        request.headers.pop(name, None)

            hooks["request"].append(authorize)
        self._client = httpx.Client(
            headers={"User-Agent": USER_AGENT},
            timeout=TIMEOUT,
            verify=_tls(settings),
            follow_redirects=True,
            max_redirects=MAX_REDIRECTS,
            event_hooks=hooks,
        )

    def __enter__(self) -> Http:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def get_json(self, url: str, what: str, params: dict[str, str] | None = None) -> Any:
        """GET a JSON document; SourceError naming ``what`` when that fails."""
        try:
            response = self._client.get(url, params=params, headers={"Accept": "application/json"})
        except httpx.HTTPError as err:
            raise SourceError(f"Could not fetch {what}: {_transport_problem(err, url)}.") from None
        _check_status(response, what)
        try:
            return response.json()
        except ValueError:
            raise SourceError(
                f"Could not fetch {what}: {_show(response.url)} did not answer with JSON."
            ) from None

    def answers_json(self, url: str) -> Any:
        """The JSON at ``url``, or None for any failure (used to probe unknown hosts)."""
        try:
            response = self._client.get(url, headers={"Accept": "application/json"})
            if response.status_code != 200:
                return None
            return response.json()
        except (httpx.HTTPError, ValueError):
            return None

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
                    for block in response.iter_bytes(_CHUNK):
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
