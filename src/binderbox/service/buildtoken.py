"""Build tokens: the launch page's /build request is not rate-limited; scripts' are.

A token is ``<payload>.<signature>``: the payload names the spec and an expiry, the
signature is an HMAC with a secret kept in the state directory (so tokens outlive a
restart of the service).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path

VALID_SECONDS = 3600


def load_secret(state_dir: Path) -> bytes:
    """The signing secret, created (readable by this user only) on first use."""
    path = state_dir / "build-token-secret"
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        state_dir.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secret.hex())
        return secret


def _sign(secret: bytes, payload: str) -> str:
    return hmac.new(secret, payload.encode(), hashlib.sha256).hexdigest()


def issue(secret: bytes, spec: str, now: float | None = None) -> str:
    """A token for ``<provider>/<spec>``, valid for an hour."""
    expires = int((time.time() if now is None else now) + VALID_SECONDS)
    body = json.dumps({"spec": spec, "exp": expires}, separators=(",", ":"))
    payload = base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")
    return f"{payload}.{_sign(secret, payload)}"


def valid(secret: bytes, token: str, spec: str, now: float | None = None) -> bool:
    """True for an unexpired token issued for exactly this spec."""
    payload, _, signature = token.partition(".")
    if not payload or not hmac.compare_digest(signature, _sign(secret, payload)):
        return False
    try:
        body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, UnicodeDecodeError):
        return False
    now = time.time() if now is None else now
    return isinstance(body, dict) and body.get("spec") == spec and body.get("exp", 0) > now
