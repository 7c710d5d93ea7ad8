"""Deterministic image names: the same repository, commit and options give the same name."""

from __future__ import annotations

import hashlib
import json
import re

_NOT_NAME = re.compile(r"[^a-z0-9]+")


def escape_slug(text: str, limit: int = 96) -> str:
    """Turn any repository identifier into a valid, collision-resistant image name part."""
    cleaned = _NOT_NAME.sub("-", text.lower()).strip("-")[:limit].strip("-") or "repo"
    if cleaned != text:
        cleaned += "-" + hashlib.sha256(text.encode()).hexdigest()[:6]
    return cleaned


def options_digest(options: dict[str, object]) -> str:
    """A short digest of the build options that change the image's content."""
    text = json.dumps(options, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def image_name_for(prefix: str, slug: str, commit: str, options: dict[str, object]) -> str:
    """``<prefix><escaped slug>:<commit>``, with an options digest when options differ.

    ``options`` holds only non-default choices, so default builds share names with the
    service's image cache.
    """
    tag = commit[:64]
    if options:
        tag += "-o" + options_digest(options)
    return f"{prefix}{escape_slug(slug)}:{tag}"
