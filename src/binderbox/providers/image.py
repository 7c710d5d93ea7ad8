"""Prebuilt images as a launch source: a Docker image reference a user sends (pure).

``/v2/image/quay.io/jupyter/base-notebook:2024-12-02`` launches that image as it is. The
reference comes straight from the URL, so it is parsed against Docker's reference grammar
before anything else sees it (no option, no scheme, no path tricks, a length bound),
normalised the way dockerd reads it (``python`` is ``docker.io/library/python:latest``)
and matched in that form against the operator's ``prebuilt_images`` patterns.

Digests are accepted on purpose (``name@sha256:<64 hex digits>``, the way to pin an
image); a reference naming both a tag and a digest is refused, because dockerd would
ignore the tag that an allow-list might have matched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import unquote

from binderbox.errors import BinderboxError, SourceError, shortened
from binderbox.providers.base import Fetched

# The provider's name in /v2/<provider>/… and /build/<provider>/….
PROVIDER = "image"
# Characters of a whole reference; dockerd's own bound on a name is 255.
MAX_REFERENCE = 400
MAX_NAME = 255

_DOMAIN_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_DOMAIN = re.compile(rf"{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*(?::(?P<port>[0-9]{{1,5}}))?")
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# Docker Hub's other names, as dockerd normalises them.
_DOCKER_HUB = "docker.io"
_HUB_ALIASES = {"index.docker.io", "registry-1.docker.io"}

EXAMPLE = "quay.io/jupyter/base-notebook:latest"
OFF = "Launching prebuilt images is not enabled on this binderbox."


class ImageRefused(BinderboxError):
    """An image reference that cannot or may not be launched here."""


@dataclass(frozen=True)
class ImageReference:
    """A checked, normalised image reference: ``registry/path:tag`` or ``…@sha256:…``."""

    registry: str  # "docker.io", "quay.io", "127.0.0.1:5000"
    path: str  # "library/python", "jupyter/base-notebook"
    tag: str = ""  # "latest" when the reference named neither a tag nor a digest
    digest: str = ""  # "sha256:<64 hex digits>"

    @property
    def repository(self) -> str:
        """The image's repository, with its registry: ``docker.io/library/python``."""
        return f"{self.registry}/{self.path}"

    def __str__(self) -> str:
        return self.repository + (f"@{self.digest}" if self.digest else f":{self.tag}")

    def pinned(self, digest: str) -> ImageReference:
        """The same repository at ``digest`` (what a persistent link names)."""
        return replace(self, tag="", digest=digest)


def _refuse_grammar(text: str) -> ImageRefused:
    return ImageRefused(
        f"'{shortened(text, 120)}' is not a Docker image name; name one as "
        f"[registry/]path[:tag] in lowercase, such as {EXAMPLE}."
    )


def parse_image_reference(text: str) -> ImageReference:
    """Check ``text`` (already URL-decoded) as an image reference and normalise it.

    Raises ImageRefused with one sentence for anything else.
    """
    if not text:
        raise ImageRefused(f"Name an image after /image/, such as {EXAMPLE}.")
    if len(text) > MAX_REFERENCE:
        raise ImageRefused(
            f"An image name here is at most {MAX_REFERENCE} characters; this one has {len(text)}."
        )
    if "://" in text:
        raise ImageRefused(
            f"Name the image without a scheme, as Docker does ({EXAMPLE}, not https://…)."
        )
    name, at, digest = text.partition("@")
    if at and not _DIGEST.fullmatch(digest):
        raise ImageRefused(
            "An image is pinned here only by a sha256 digest: name@sha256: and 64 lowercase "
            "hexadecimal digits."
        )
    tag = ""
    head, colon, tail = name.rpartition(":")
    if colon and "/" not in tail:  # before the last '/', a colon is a registry's port
        name, tag = head, tail
        if not _TAG.fullmatch(tag):
            raise ImageRefused(
                f"'{shortened(tag, 140)}' is not an image tag (at most 128 letters, digits, "
                "'_', '.' or '-', not starting with '.' or '-')."
            )
    if tag and digest:
        raise ImageRefused(
            "Name an image by a tag or by a digest, not both: Docker would run the digest "
            "whatever the tag says."
        )
    parts = name.split("/")
    registry = ""
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        registry, parts = parts[0], parts[1:]
        found = _DOMAIN.fullmatch(registry)
        if not found or not (found["port"] is None or 0 < int(found["port"]) < 65536):
            raise _refuse_grammar(text)
    if not all(_PATH_COMPONENT.fullmatch(part) for part in parts):
        raise _refuse_grammar(text)
    if registry in _HUB_ALIASES or not registry:
        registry = _DOCKER_HUB
    if registry == _DOCKER_HUB and len(parts) == 1:
        parts = ["library", *parts]
    reference = ImageReference(
        registry, "/".join(parts), tag or ("" if digest else "latest"), digest
    )
    if len(reference.repository) > MAX_NAME:
        raise ImageRefused(f"An image's name is at most {MAX_NAME} characters without its tag.")
    return reference


@dataclass(frozen=True)
class ImagePattern:
    """One of the operator's ``prebuilt_images`` patterns, normalised like a reference.

    ``*`` stands for any characters (also '/' and ':'); everything else is literal. A
    pattern without a tag or digest (``quay.io/jupyter/base-notebook``) allows every tag
    and digest of that repository; one with a tag allows that tag only.
    """

    text: str  # as the operator wrote it
    normalised: str
    regex: re.Pattern[str]
    any_tag: bool

    def matches(self, reference: ImageReference) -> bool:
        if self.regex.fullmatch(str(reference)):
            return True
        return self.any_tag and bool(self.regex.fullmatch(reference.repository))


_PATTERN_CHARS = re.compile(r"[A-Za-z0-9._/:@*-]+")
_PATTERN_HOST = re.compile(rf"\*|(?:\*\.)?{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*(?::[0-9*]+)?")


def parse_pattern(text: str) -> ImagePattern:
    """Check and normalise one allow-list pattern; raises ImageRefused with the reason."""
    if not _PATTERN_CHARS.fullmatch(text) or "://" in text:
        raise ImageRefused(
            f"'{shortened(text, 120)}' is not an image pattern: write image names such as "
            "quay.io/jupyter/* or registry.example.org/*, without a scheme or spaces."
        )
    first, slash, rest = text.partition("/")
    if slash and ("." in first or ":" in first or "*" in first or first == "localhost"):
        if not _PATTERN_HOST.fullmatch(first):
            raise ImageRefused(
                f"'{shortened(text, 120)}': a '*' in a registry's name may only stand for "
                "the whole name or its leading labels (*.example.org/*)."
            )
        registry = _DOCKER_HUB if first in _HUB_ALIASES else first
        normalised = f"{registry}/{rest}"
        if registry == _DOCKER_HUB and "/" not in rest and "*" not in rest.split(":")[0]:
            normalised = f"{_DOCKER_HUB}/library/{rest}"
    elif text == "*":
        normalised = "*"
    elif not slash:
        if "." in text.split(":")[0] or text.endswith(":"):
            raise ImageRefused(
                f"'{shortened(text, 120)}' names no image; write {text.rstrip(':')}/* to "
                "allow every image of a registry."
            )
        normalised = f"{_DOCKER_HUB}/library/{text}"  # a Docker Hub library image
    else:
        normalised = f"{_DOCKER_HUB}/{text}"
    last = normalised.rsplit("/", 1)[-1]
    regex = re.compile("".join(".*" if ch == "*" else re.escape(ch) for ch in normalised))
    return ImagePattern(text, normalised, regex, any_tag=":" not in last and "@" not in last)


def parse_patterns(setting: str) -> list[ImagePattern]:
    """The patterns of a ``prebuilt_images`` setting (comma- or space-separated)."""
    return [parse_pattern(part) for part in setting.replace(",", " ").split()]


def allowed(reference: ImageReference, patterns: list[ImagePattern]) -> bool:
    """Whether any pattern allows ``reference``."""
    return any(pattern.matches(reference) for pattern in patterns)


def check_allowed(reference: ImageReference, patterns: list[ImagePattern]) -> None:
    """Refuse, in one sentence, a reference no pattern allows (or every one, when none)."""
    if not patterns:
        raise ImageRefused(OFF)
    if not allowed(reference, patterns):
        shown = ", ".join(p.text for p in patterns[:5]) + (", …" if len(patterns) > 5 else "")
        raise ImageRefused(
            f"The image {reference} is not one this binderbox launches (it launches {shown})."
        )


def pinned_reference(reference: ImageReference, repo_digests: list[str]) -> ImageReference:
    """``reference`` pinned to the digest its registry gave (dockerd's ``RepoDigests``),
    or as it is when the image came from no registry."""
    if reference.digest:
        return reference
    for entry in repo_digests:
        try:
            known = parse_image_reference(entry)
        except ImageRefused:
            continue
        if known.repository == reference.repository and known.digest:
            return reference.pinned(known.digest)
    return reference


def binder_fields(
    launch_host: str, reference: ImageReference, pinned: ImageReference
) -> dict[str, str]:
    """The ready event's binder_* fields for a prebuilt image (also BINDER_* in the session):
    the image as asked for, and pinned to its digest for the persistent link."""
    return {
        "repo_url": str(reference),
        "binder_ref_url": str(pinned),
        "binder_launch_host": launch_host,
        "binder_request": f"v2/{PROVIDER}/{reference}",
        "binder_persistent_request": f"v2/{PROVIDER}/{pinned}",
    }


def spec_for_records(spec: str) -> str:
    """What the store, /status, /usage and the launch events name a launch by: the
    normalised reference, so ``python`` and ``docker.io/library/python:latest`` count as
    one image; a spec that is no reference stays as it was sent."""
    try:
        return str(parse_image_reference(unquote(spec)))
    except ImageRefused:
        return spec


class ImageSource:
    """A prebuilt image as a launch's source (the Source interface): nothing to fetch."""

    def __init__(self, reference: ImageReference) -> None:
        self.reference = reference
        self.repo_url = str(reference)
        self.ref = reference.digest or reference.tag

    def slug(self) -> str:
        return f"{PROVIDER}-{self.reference}"

    def resolve(self) -> str:
        return self.reference.digest

    def fetch(self, dest: Path) -> Fetched:
        raise SourceError("A prebuilt image has no files to fetch; it is launched as it is.")
