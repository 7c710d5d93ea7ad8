"""The Python package index builds install from (pure).

An operator may point every build at a PyPI mirror (devpi, Artifactory, Nexus) with the
``index_url`` setting. Repositories that name PyPI itself, under any of its addresses,
then get the mirror: on a network that reaches PyPI only through it, that is the only
index that works.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

DEFAULT_INDEX = "https://pypi.org/simple"

# PyPI's own addresses: the current one, the old one many Pipfiles still name, and the
# host its files are served from.
_PYPI_HOSTS = {"pypi.org", "www.pypi.org", "pypi.python.org", "files.pythonhosted.org"}
_PYPI_PATHS = {"", "/", "/simple", "/simple/"}

# What may go into a Dockerfile ENV line unquoted: no spaces, quotes, backslashes or $.
_INDEX_URL = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+(/[A-Za-z0-9._~%+/=&?,;:!*()@-]*)?")


def names_pypi(url: str) -> bool:
    """True when ``url`` is PyPI itself (pypi.org, pypi.python.org, files.pythonhosted.org,
    with or without /simple, over http or https)."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return False
    return (
        parts.scheme in {"http", "https"}
        and (parts.hostname or "") in _PYPI_HOSTS
        and parts.port is None
        and not parts.username
        and parts.path in _PYPI_PATHS
        and not parts.query
    )


def is_default(index_url: str) -> bool:
    """True when the configured index is PyPI, so builds need not be told about it."""
    return not index_url or names_pypi(index_url)


def check_index_url(index_url: str) -> str:
    """Why ``index_url`` cannot be used, or "" when it can."""
    if "@" in urlsplit(index_url).netloc:
        # It becomes part of every image's environment, where every session could read it.
        return (
            "Setting 'index_url' must not contain a user name or password: every image, "
            "and so every session, would show them."
        )
    if not _INDEX_URL.fullmatch(index_url):
        return (
            f"Setting 'index_url' must be the http(s) address of a package index without "
            f"spaces, quotes or backslashes, such as {DEFAULT_INDEX}, not {index_url!r}."
        )
    return ""


def environment(index_url: str) -> str:
    """``KEY=VALUE`` pairs (for a Dockerfile ENV line) that send pip and uv to the index, or
    "" for PyPI. Set in the image, so ``pip install`` in a session uses it as well."""
    if is_default(index_url):
        return ""
    # UV_DEFAULT_INDEX is uv's name (UV_INDEX_URL is deprecated); pip reads PIP_INDEX_URL.
    pairs = f"UV_DEFAULT_INDEX={index_url} PIP_INDEX_URL={index_url}"
    parts = urlsplit(index_url)
    if parts.scheme == "http":
        # pip refuses a plain-http index unless its host is trusted; the operator chose it.
        pairs += f" PIP_TRUSTED_HOST={parts.netloc}"
    return pairs
