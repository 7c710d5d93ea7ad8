"""Names of the build caches that outlive a build, keyed by a secret of this deployment.

BuildKit shares a cache mount with every build on the daemon that names the same id, so
an id anyone can guess is an id a repository's Dockerfile could mount and fill with its
own files. binderbox's ids carry an HMAC of a secret kept in the state directory; they are
hidden from build logs, and repositories' Dockerfiles may not use cache mounts at all.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

SECRET_FILE = "build-cache-secret"


def load_cache_secret(state_dir: str | os.PathLike[str]) -> str:
    """This deployment's cache secret (hex), created readable by this user only."""
    folder = Path(state_dir)
    path = folder / SECRET_FILE
    try:
        text = path.read_text().strip()
        bytes.fromhex(text)
        if len(text) >= 32:
            return text
    except (OSError, ValueError):
        pass
    folder.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(32)
    temporary = path.with_name(f".{SECRET_FILE}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret)
    # Two processes starting at once: the first to link its file wins, both read it back.
    try:
        os.link(temporary, path)
    except FileExistsError:
        pass
    finally:
        temporary.unlink(missing_ok=True)
    return path.read_text().strip()


def cache_key(secret: str, *parts: str) -> str:
    """A short key for a cache id: the same secret and parts always give the same key."""
    message = "\0".join(("binderbox-cache", *parts)).encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()[:24]
