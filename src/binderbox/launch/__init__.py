"""Sessions: JupyterHub (managed subprocess) + configurable-http-proxy + DockerSpawner.

- ``hub.ManagedHub``: writes the hub's config, starts and stops the hub (and with it the
  proxy, the idle culler and every session container), one per state directory.
- ``client.HubClient``: the hub's REST API as the binderbox service.
- ``session.launch``: one session from an image (throwaway user, fresh token, retries);
  ``session.HubLauncher`` turns it into the events the service streams.
- ``spawner.BinderSpawner``: runs inside the hub; the container and its limits.
- ``proxy``: find or npm-install configurable-http-proxy.

The spawner module imports JupyterHub and DockerSpawner; nothing here imports it, so
using the client does not load the hub.
"""

from binderbox.launch.client import (
    HubClient,
    HubError,
    HubUnavailable,
    SpawnFailed,
    SpawnProgress,
    SpawnRejected,
)
from binderbox.launch.hub import HubAlreadyRunning, ManagedHub
from binderbox.launch.options import InvalidSessionOptions, SessionOptions
from binderbox.launch.proxy import ProxyUnavailable, ensure_proxy, find_proxy, install_proxy
from binderbox.launch.session import HubLauncher, LaunchFailed, Session, launch

__all__ = [
    "HubAlreadyRunning",
    "HubClient",
    "HubError",
    "HubLauncher",
    "HubUnavailable",
    "InvalidSessionOptions",
    "LaunchFailed",
    "ManagedHub",
    "ProxyUnavailable",
    "Session",
    "SessionOptions",
    "SpawnFailed",
    "SpawnProgress",
    "SpawnRejected",
    "ensure_proxy",
    "find_proxy",
    "install_proxy",
    "launch",
]
