"""What a session is started with, checked before anything runs (pure).

The same checks run twice: in the client before asking the hub, for a clear early message,
and in the spawner inside the hub, because anything holding the service token could send
the hub its own ``user_options``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from binderbox.errors import BinderboxError

# The Binder fields a launch carries, as the ready event names them, and the variables the
# session sees them as (what notebooks use to build links back to their Binder).
BINDER_FIELDS: dict[str, str] = {
    "binder_launch_host": "BINDER_LAUNCH_HOST",
    "repo_url": "BINDER_REPO_URL",
    "binder_ref_url": "BINDER_REF_URL",
    "binder_persistent_request": "BINDER_PERSISTENT_REQUEST",
    "binder_request": "BINDER_REQUEST",
}

# Labels on every session container: which hub owns it (see hub.hub_id_for), which user.
LABEL_SESSION = "binderbox.session"

# Said when an image cannot start a session because it has no Jupyter server; the client
# does not retry a start that failed with it.
NO_JUPYTER_SERVER = (
    "The image has no Jupyter server: sessions run 'jupyter server' as user 1000, so a "
    "Dockerfile must install jupyter-server on its PATH (pip install jupyterlab brings it)."
)
LABEL_HUB = "binderbox.hub"
LABEL_USER = "binderbox.user"

_TOKEN = re.compile(r"[0-9a-f]{32,128}")
# A docker repository path (lowercase components separated by one '.', '_', '__', '-' or
# '/') and an optional tag; no registry host is possible once a prefix without one is
# required, so the image can only come from this machine's image store.
_IMAGE_REST = re.compile(
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
)
_MAX_FIELD = 2048


class InvalidSessionOptions(BinderboxError):
    """The options of a session request cannot be used."""


@dataclass(frozen=True)
class SessionOptions:
    """A checked session request: the image, the server's token and the Binder fields."""

    image: str
    token: str
    binder: dict[str, str] = field(default_factory=dict)

    def as_user_options(self) -> dict[str, str]:
        """The JSON object sent to the hub as the server's ``user_options``."""
        return {"image": self.image, "token": self.token, **self.binder}

    def binder_environment(self) -> dict[str, str]:
        """``BINDER_*`` variables for the session (every one set, empty when unknown)."""
        return {env: self.binder.get(name, "") for name, env in BINDER_FIELDS.items()}


def check_image(image: object, prefix: str) -> str:
    """Return ``image`` when it names a local image with ``prefix``; raise otherwise."""
    if not isinstance(image, str) or not image:
        raise InvalidSessionOptions("A session needs an image name.")
    rest = image[len(prefix) :] if image.startswith(prefix) else None
    if rest is None or len(image) > 255 or not _IMAGE_REST.fullmatch(rest):
        raise InvalidSessionOptions(
            f"The image {image!r} cannot be launched here: only images built by this "
            f"binderbox (named '{prefix}…') can."
        )
    # The prefix itself must not smuggle in a registry ("host:5000/…" or "host.tld/…").
    first = image.split("/", 1)[0]
    if "/" in image and ("." in first or ":" in first or first == "localhost"):
        raise InvalidSessionOptions(f"The image {image!r} names a registry; use a local image.")
    return image


def check_token(token: object) -> str:
    """Return ``token`` when it is 32 to 128 lowercase hex digits; raise otherwise."""
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        raise InvalidSessionOptions(
            "A session token must be 32 to 128 lowercase hexadecimal digits."
        )
    return token


def check_binder_fields(fields: Mapping[str, Any]) -> dict[str, str]:
    """Keep the known Binder fields; each must be a short single-line string."""
    checked = {}
    for name, value in fields.items():
        if name not in BINDER_FIELDS:
            raise InvalidSessionOptions(
                f"Unknown session option {name!r}; known: image, token, "
                + ", ".join(BINDER_FIELDS)
                + "."
            )
        if not isinstance(value, str) or len(value) > _MAX_FIELD or _has_control(value):
            raise InvalidSessionOptions(
                f"The session option {name!r} must be one line of at most {_MAX_FIELD} characters."
            )
        checked[name] = value
    return checked


def parse_user_options(options: Mapping[str, Any], image_prefix: str) -> SessionOptions:
    """Check ``user_options`` as the hub received them and return the session's options."""
    if not isinstance(options, Mapping):
        raise InvalidSessionOptions("Session options must be a JSON object.")
    rest = {k: v for k, v in options.items() if k not in {"image", "token"}}
    return SessionOptions(
        image=check_image(options.get("image"), image_prefix),
        token=check_token(options.get("token")),
        binder=check_binder_fields(rest),
    )


def _has_control(text: str) -> bool:
    return any(ord(ch) < 32 or ord(ch) == 127 for ch in text)
