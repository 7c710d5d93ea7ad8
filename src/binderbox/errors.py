"""Errors a user can see: each carries one sentence written for them."""

from __future__ import annotations

import reprlib

# A message is one sentence; anything longer than this is cut, so that no repository can
# make a failure message (and with it the log, the status page, the database) large.
MAX_MESSAGE_CHARS = 4000
# Quotations of a repository's text inside a message are cut to about this.
MAX_QUOTED_CHARS = 200

_SHORT = reprlib.Repr()
_SHORT.maxstring = MAX_QUOTED_CHARS
_SHORT.maxother = MAX_QUOTED_CHARS
_SHORT.maxlevel = 3
_SHORT.maxlist = _SHORT.maxdict = _SHORT.maxtuple = _SHORT.maxset = 8


def quoted(value: object, limit: int = MAX_QUOTED_CHARS) -> str:
    """``value`` quoted for a message: one line, control characters escaped, at most about
    ``limit`` characters (a cut ends in "…").

    Strings are quoted as Python writes them ('numpy\\t1'); other values (a YAML mapping
    where a string belongs) are shown shortened.
    """
    if isinstance(value, str):
        cut = len(value) > limit
        text = repr(value[:limit])
    else:
        text = _SHORT.repr(value)
        cut = False
    if len(text) > limit + 2:
        text, cut = text[: limit + 2], True
    return text + ("…" if cut else "")


def shortened(text: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """``text`` (a parser's reason, say) made fit for a message without quoting it:
    control characters escaped, at most ``limit`` characters (a cut ends in "…")."""
    escaped = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text[: limit + 1])
    return escaped[:limit] + "…" if len(escaped) > limit else escaped


def _capped(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[:MAX_MESSAGE_CHARS] + "… (message cut)"


class BinderboxError(Exception):
    """Base for every error shown to a user as a plain message, never a traceback."""

    def __init__(self, message: str, *, log_tail: str = "") -> None:
        message = _capped(message)
        super().__init__(message)
        self.message = message
        self.log_tail = log_tail


class ConfigError(BinderboxError):
    """A repository's configuration files cannot be used as written."""


class SourceError(BinderboxError):
    """The repository could not be found or fetched."""


class RepositoryRefused(SourceError):
    """A fetched repository holds what binderbox will not build from: a link that leaves
    it, or a special file (a pipe, a device, a socket)."""


class DockerUnavailable(BinderboxError):
    """The Docker daemon cannot be reached."""


class BuildFailed(BinderboxError):
    """The image build ran and failed."""


class BaseImageUnavailable(BuildFailed):
    """A FROM image could not be pulled from its registry."""


class UsageError(BinderboxError):
    """A command-line argument or option is invalid."""
