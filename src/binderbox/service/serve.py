"""``binderbox serve``: JupyterHub, the proxy and the web service, started and stopped together."""

from __future__ import annotations

import socket
from collections.abc import Callable

import uvicorn

from binderbox.config import Settings
from binderbox.errors import BinderboxError
from binderbox.launch.hub import ManagedHub
from binderbox.launch.proxy import ensure_proxy
from binderbox.launch.session import HubLauncher
from binderbox.service.app import create_app


class PortInUse(BinderboxError):
    """The service's port is taken (often: binderbox serve already runs)."""


def check_port_free(host: str, port: int) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            raise PortInUse(
                f"{host}:{port} is already in use: is binderbox serve already running? "
                "Stop it, or choose another --port."
            ) from None


def serve(settings: Settings, say: Callable[[str], None]) -> None:
    """Run everything until Ctrl-C (or SIGTERM), then stop the hub and its sessions."""
    check_port_free(settings.service_host, settings.service_port)
    proxy = ensure_proxy(settings)  # installs configurable-http-proxy with npm once
    if not settings.proxy_command:
        settings = settings.with_overrides(proxy_command=str(proxy))
    hub = ManagedHub(settings)
    say("Starting JupyterHub and the proxy")
    hub.start()
    try:
        launcher = HubLauncher(hub.client())
        app = create_app(settings, launcher)
        base = f"http://{settings.service_host}:{settings.service_port}"
        say(f"binderbox is serving at {base}/ (sessions at {hub.public_url}); Ctrl-C stops it")
        uvicorn.run(
            app,
            host=settings.service_host,
            port=settings.service_port,
            log_level="warning",
            timeout_graceful_shutdown=5,
        )
    finally:
        say("Stopping JupyterHub, the proxy and every session")
        hub.stop()
