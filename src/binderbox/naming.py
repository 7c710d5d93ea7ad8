"""Image identity: the one place that decides what an image is called.

The service (to find an image before building) and the builder (to tag what it built)
both call ``image_name_for``, so a setting that changes the image can never make them
disagree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping

from binderbox.builder import package_index
from binderbox.config import Settings

_NOT_NAME = re.compile(r"[^a-z0-9]+")

# Operator settings that change what an image holds. A value other than the default is
# part of the image's name, so changing one builds new images instead of reusing images
# built the old way. (tests/test_naming_config.py lists the settings that do not.)
IMAGE_SETTINGS = ("base_suite", "base_image", "cran_mirror", "compile_bytecode", "index_url")


def escape_slug(text: str, limit: int = 96) -> str:
    """Turn any repository identifier into a valid, collision-resistant image name part."""
    cleaned = _NOT_NAME.sub("-", text.lower()).strip("-")[:limit].strip("-") or "repo"
    if cleaned != text:
        cleaned += "-" + hashlib.sha256(text.encode()).hexdigest()[:6]
    return cleaned


def options_digest(options: Mapping[str, object]) -> str:
    """A short digest of the build options that change the image's content."""
    text = json.dumps(dict(options), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def image_settings(settings: Settings) -> dict[str, object]:
    """The operator settings among IMAGE_SETTINGS that differ from their defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
    chosen: dict[str, object] = {}
    for name in IMAGE_SETTINGS:
        value = getattr(settings, name)
        if name == "index_url":
            # Any address of PyPI itself is the default index.
            if not package_index.is_default(value):
                chosen[name] = value
        elif value != defaults[name]:
            chosen[name] = value
    return chosen


def image_name_for(
    settings: Settings, slug: str, commit: str, options: Mapping[str, object] | None = None
) -> str:
    """``<prefix><escaped slug>:<commit or content id>``, with a digest of the non-default
    choices (the operator's IMAGE_SETTINGS and the request's ``options``, e.g. --user-id).

    Default builds add no digest, so their names stay short and stable.
    """
    chosen = {**image_settings(settings), **(options or {})}
    tag = commit[:64]
    if chosen:
        tag += "-o" + options_digest(chosen)
    return f"{settings.image_prefix}{escape_slug(slug)}:{tag}"


def prebuilt_image_name(settings: Settings, reference: str, image_id: str) -> str:
    """The local name of a prebuilt image (``/v2/image/…``): ``<prefix>image-<escaped
    reference>:<its content id>``. Sessions run this name, so what they run is exactly the
    content that was checked, whatever the reference's tag points to later; and it lies
    under the prefix, the only images the spawner starts."""
    content = image_id.removeprefix("sha256:")
    return f"{settings.image_prefix}image-{escape_slug(reference)}:{content}"
