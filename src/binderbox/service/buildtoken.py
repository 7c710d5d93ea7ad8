"""Build tokens: the launch page's /build request goes past the per-address rate limit,
a few times; scripts' requests do not.

A token is ``<payload>.<signature>``: the payload names the spec, the address it was
handed to (an IPv6 client's /64, hashed), an expiry a few minutes away and a nonce; the
signature is an HMAC with a secret kept in the state directory (so tokens outlive a
restart of the service). A token is no pass for unlimited requests: ``TokenUses`` lets
each one past the rate limit only a few times (the page's first request and its
reconnects); after that, or once it expired, its requests count like anyone's.
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

VALID_SECONDS = 600


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


def _address_tag(address: str) -> str:
    # The page carries the token; no need for it to spell out the address.
    return hashlib.sha256(address.encode()).hexdigest()[:16]


def issue(
    secret: bytes,
    spec: str,
    address: str,
    now: float | None = None,
    seconds: float = VALID_SECONDS,
) -> str:
    """A token for ``<provider>/<spec>`` requested from ``address`` (a limits bucket)."""
    expires = int((time.time() if now is None else now) + seconds)
    body = json.dumps(
        {"spec": spec, "addr": _address_tag(address), "exp": expires, "n": secrets.token_hex(6)},
        separators=(",", ":"),
    )
    payload = base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")
    return f"{payload}.{_sign(secret, payload)}"


def expiry(secret: bytes, token: str, spec: str, address: str, now: float | None = None) -> float:
    """When a token issued for exactly this spec and address expires; 0 when it is not
    such a token or has expired."""
    payload, _, signature = token.partition(".")
    if not payload or not hmac.compare_digest(signature, _sign(secret, payload)):
        return 0
    try:
        body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, UnicodeDecodeError):
        return 0
    now = time.time() if now is None else now
    if not isinstance(body, dict) or body.get("spec") != spec:
        return 0
    if body.get("addr") != _address_tag(address):
        return 0
    expires = body.get("exp", 0)
    return float(expires) if isinstance(expires, int) and expires > now else 0


def valid(secret: bytes, token: str, spec: str, address: str, now: float | None = None) -> bool:
    """True for an unexpired token issued for exactly this spec and address."""
    return expiry(secret, token, spec, address, now) > 0


class TokenUses:
    """Lets each valid token past the rate limit at most ``uses`` times.

    Remembers at most ``max_tokens`` tokens until they expire; when that many are
    remembered, further tokens get no pass (their requests are rate limited as usual).
    """

    def __init__(self, uses: int, max_tokens: int = 100_000) -> None:
        self.uses = uses
        self.max_tokens = max_tokens
        self._used: dict[str, tuple[int, float]] = {}

    def take(self, token: str, expires: float, now: float | None = None) -> bool:
        """Count one use of ``token`` (valid until ``expires``); False once used up."""
        now = time.time() if now is None else now
        key = token.rpartition(".")[2]
        used, _ = self._used.get(key, (0, expires))
        if used >= self.uses:
            return False
        if key not in self._used and len(self._used) >= self.max_tokens:
            self._used = {k: v for k, v in self._used.items() if v[1] > now}
            if len(self._used) >= self.max_tokens:
                return False
        self._used[key] = (used + 1, expires)
        return True
