"""From what a user typed (a DOI, a record's address, or the service's provider + spec) to
the record source that fetches it.

A DOI goes through the DOI resolver (setting ``doi_resolver``); its redirects are followed
until one lands on a record page binderbox knows, and the page's host picks the provider.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote, urlsplit

from binderbox.config import Settings
from binderbox.errors import SourceError, UsageError
from binderbox.providers.ckan import CkanSource
from binderbox.providers.dataverse import DataverseSource
from binderbox.providers.figshare import FigshareSource
from binderbox.providers.http import MAX_REDIRECTS, Http
from binderbox.providers.hydroshare import HydroshareSource
from binderbox.providers.record import RecordSource
from binderbox.providers.zenodo import ZenodoSource

# In the order URLs are tried; CKAN also takes unknown hosts that answer as CKAN sites.
PROVIDERS: dict[str, type[RecordSource]] = {
    cls.provider: cls
    for cls in (ZenodoSource, FigshareSource, DataverseSource, HydroshareSource, CkanSource)
}
_DOI = re.compile(r"^10\.\d{4,9}/\S+$")
_DOI_PREFIXES = (
    "doi:",
    "https://doi.org/",
    "http://doi.org/",
    "https://dx.doi.org/",
    "http://dx.doi.org/",
)


def parse_doi(text: str, settings: Settings) -> str:
    """The DOI in ``10.5281/zenodo.1``, ``doi:10.…`` or ``https://doi.org/10.…``, else ""."""
    candidate = text.strip()
    resolver = settings.doi_resolver.rstrip("/") + "/"
    for prefix in (*_DOI_PREFIXES, resolver):
        if candidate.lower().startswith(prefix.lower()):
            candidate = candidate[len(prefix) :]
            if prefix != "doi:":
                candidate = unquote(candidate)
            break
    candidate = candidate.rstrip("/")
    return candidate if _DOI.match(candidate) else ""


def record_source_for(text: str, settings: Settings) -> RecordSource | None:
    """The record source for a DOI or a record URL, or None when ``text`` is neither
    (a git URL, a folder). Resolving a DOI asks the DOI resolver."""
    doi = parse_doi(text, settings)
    if doi:
        with Http(settings) as http:
            landing = resolve_doi(doi, settings, http)
            source = _for_url(landing, settings, http)
        if source is None:
            raise SourceError(
                f"The DOI {doi} leads to {landing}, which is not a record binderbox can fetch "
                f"({_provider_names()})."
            )
        return source
    if not re.match(r"^https?://", text, re.IGNORECASE):
        return None
    url = urlsplit(text)
    source = _for_url(text, settings, None)
    if source is not None:
        return source
    for cls in PROVIDERS.values():
        if cls.on_site(url, settings):
            raise UsageError(f"'{text}' is on {cls.label} but is not the address of a record.")
    if "/dataset/" in url.path:
        with Http(settings) as http:
            return CkanSource.probe(url, settings, http)
    return None


def content_source(provider: str, spec: str, settings: Settings) -> RecordSource:
    """The source for the service's ``/v2/<provider>/<spec>``: a DOI, a record URL (may be
    URL-escaped), or the provider's own id (Zenodo record, Figshare article[/version],
    HydroShare resource)."""
    cls = PROVIDERS.get(provider)
    if cls is None:
        raise UsageError(f"'{provider}' is not a content provider; use {_provider_names()}.")
    spec = spec.strip()
    if re.match(r"^https?%3a", spec, re.IGNORECASE):
        spec = unquote(spec)
    source = cls.from_id(spec, settings) or record_source_for(spec, settings)
    if source is None:
        raise UsageError(f"'{spec}' is not a {cls.label} DOI, address or id.")
    if source.provider != provider:
        raise UsageError(f"'{spec}' is a {source.label} {source.noun}, not a {cls.label} one.")
    return source


def resolve_doi(doi: str, settings: Settings, http: Http) -> str:
    """The address a DOI leads to: the first redirect that is a known record page, or
    where the redirects end."""
    resolver = settings.doi_resolver.rstrip("/")
    if not resolver:
        raise UsageError("DOIs cannot be resolved: the setting 'doi_resolver' is empty.")
    url = f"{resolver}/{quote(doi, safe='/:;()._-')}"
    what = f"the DOI {doi}"
    for _ in range(MAX_REDIRECTS + 1):
        status, next_url = http.next_hop(url, what)
        if next_url:
            url = next_url
            if _for_url(url, settings, None) is not None:
                return url
            continue
        if status in {404, 410}:
            raise SourceError(f"The DOI {doi} does not exist ({resolver} does not know it).")
        if status >= 400:
            raise SourceError(f"Could not resolve the DOI {doi}: {url} answered {status}.")
        return url
    raise SourceError(f"Could not resolve the DOI {doi}: more than {MAX_REDIRECTS} redirects.")


def _for_url(url: str, settings: Settings, http: Http | None) -> RecordSource | None:
    """A known provider's record at ``url``; with ``http``, also unknown CKAN sites."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in {"http", "https"}:
        return None
    for cls in PROVIDERS.values():
        source = cls.from_url(parts, settings)
        if source is not None:
            return source
    if http is not None:
        return CkanSource.probe(parts, settings, http)
    return None


def _provider_names() -> str:
    labels = [cls.label for cls in PROVIDERS.values()]
    return ", ".join(labels[:-1]) + " or " + labels[-1]
