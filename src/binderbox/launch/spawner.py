"""The hub's spawner: one locked-down Docker container per session, from a built image.

The container runs plain ``jupyter server`` with the session's token, not
``jupyterhub-singleuser``: Binder sessions are anonymous, so there is no hub login to
check against, and the token handed to the browser is the only credential. It also means
the container never talks to the hub, whose API stays on 127.0.0.1 out of the
container's reach. Activity for the idle culler is what the proxy sees (HTTP and
websocket traffic), which the hub reads from the proxy every ``last_activity_interval``.

``BinderSpawnerMixin`` holds everything binderbox adds to a spawner (the image and token
from ``user_options``, the server command, limits, lock-down, ``BINDER_*`` variables,
waiting for Jupyter); ``BinderSpawner`` puts it over DockerSpawner for one machine, and a
cluster's spawner is the same mixin over SwarmSpawner (or KubeSpawner).

Loaded by the JupyterHub process as ``binderbox.launch.spawner.BinderSpawner``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import docker.errors
import httpx
from dockerspawner import DockerSpawner
from jupyterhub.spawner import SpawnException
from traitlets import Integer, Unicode, default
from traitlets.config import LoggingConfigurable

from binderbox.launch.kernel_oom import config_archive, config_path
from binderbox.launch.options import (
    LABEL_HUB,
    LABEL_SESSION,
    LABEL_USER,
    NO_JUPYTER_SERVER,
    InvalidSessionOptions,
    SessionOptions,
    parse_user_options,
)

JUPYTER_PORT = 8888
# Lines of a failed container's output shown in the spawn error.
_LOG_TAIL = 20


class BinderSpawnerMixin(LoggingConfigurable):
    """What binderbox adds to a container spawner (put it first among the bases).

    Starts ``user_options["image"]`` with ``user_options["token"]`` as the server token.
    ``user_options`` also carries the Binder fields (``repo_url``, ``binder_ref_url``, …),
    given to the session as ``BINDER_*`` variables. The session runs as ``uid`` (never
    root) with ``pids_limit``; the spawner below it adds the rest of the lock-down
    (capabilities, ``no-new-privileges``, memory and CPU) in its own terms, and overrides
    ``check_image``, ``start_container``, ``_fail_if_stopped`` and ``_output_tail``.
    """

    image_prefix = Unicode(
        "binderbox-", config=True, help="Only local images whose names start with this run."
    )
    uid = Integer(1000, min=1, config=True, help="User and group id of the session (not 0).")
    pids_limit = Integer(1024, min=16, config=True, help="Processes and threads per session.")
    hub_label = Unicode(
        "", config=True, help="Value of the binderbox.hub label, to find this hub's containers."
    )
    allow_origin = Unicode(
        "", config=True, help="The server's allow_origin ('' = same origin only)."
    )
    kernel_oom_score_adj = Integer(
        1000,
        min=0,
        max=1000,
        config=True,
        help="oom_score_adj of kernels, so a session over its memory limit loses (and "
        "restarts) a kernel, not its server (0: leave kernels as they are).",
    )
    # The image's own JUPYTER_CONFIG_PATH, kept after binderbox's directory.
    image_config_path = ""
    # Whether this spawner puts kernel_oom.config_archive into its containers; only then
    # does the server get binderbox's config directory on JUPYTER_CONFIG_PATH.
    places_kernel_config = False

    session: SessionOptions | None = None
    _progress_log: list[dict[str, Any]]

    @default("cmd")
    def _cmd_default(self) -> list[str]:
        return ["jupyter", "server"]

    @default("prefix")
    def _prefix_default(self) -> str:
        return "binderbox-session"

    @default("remove")
    def _remove_default(self) -> bool:
        return True

    @default("apply_user_options")
    def _apply_user_options_default(self) -> Any:
        # Through the instance, so a subclass's _apply_session_options is the one used.
        return lambda spawner, options: spawner._apply_session_options(options)

    async def _apply_session_options(self, user_options: dict[str, Any]) -> None:
        """Check the request (JupyterHub answers 400 with the message) and take its image."""
        try:
            session = parse_user_options(user_options, self.image_prefix)
        except InvalidSessionOptions as error:
            raise _spawn_error(error.message, reason="options", status=400) from None
        await self.check_image(session.image)
        self.session = session
        self.image = session.image

    async def check_image(self, image: str) -> None:
        """Raise a 400 spawn error when ``image`` cannot run here (before anything starts)."""

    async def check_allowed(self, image: str) -> str:
        # DockerSpawner asks before starting; only the image checked above may run.
        if self.session is None or image != self.session.image:
            raise _spawn_error(f"The image {image} was not checked.", reason="image", status=400)
        return image

    def get_args(self) -> list[str]:
        if self.session is None:
            raise _spawn_error("The session has no options.", reason="options", status=400)
        return [
            f"--ServerApp.base_url={self.server.base_url}",
            f"--ServerApp.token={self.session.token}",
            "--ip=0.0.0.0",
            f"--port={self.port}",
            "--ServerApp.default_url=/lab",
            *([f"--ServerApp.allow_origin={self.allow_origin}"] if self.allow_origin else []),
            *self.args,
        ]

    def get_env(self) -> dict[str, str]:
        env = super().get_env()
        # The server never calls the hub (it cannot reach it): it needs no hub credential.
        for name in ("JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN"):
            env.pop(name, None)
        if self.session is not None:
            env.update(self.session.binder_environment())
        if self.kernel_oom_score_adj and self.places_kernel_config:
            # Where the server finds the config that puts kernels first for the OOM killer
            # (see kernel_oom.py); start_object puts the file into the container.
            env["JUPYTER_CONFIG_PATH"] = config_path(self.image_config_path)
        return env

    def _progress(self, progress: int, message: str) -> None:
        self._progress_log.append({"progress": progress, "message": message})

    async def progress(self):  # type: ignore[override]
        """The steps of start(), as they happen (the hub stops asking once it is done)."""
        sent = 0
        while True:
            log = getattr(self, "_progress_log", [])
            while sent < len(log):
                yield log[sent]
                sent += 1
            await asyncio.sleep(0.1)

    async def start(self) -> tuple[str, int]:
        self._progress_log = []
        if any(getattr(self, name, None) for name in ("volumes", "read_only_volumes", "mounts")):
            # Never the Docker socket, never anything else from the host.
            raise _spawn_error("Sessions mount nothing from the host.", reason="config")
        self._progress(20, f"Starting a container from {self.image}")
        ip, port = await self.start_container()
        self._progress(60, "Waiting for Jupyter to answer")
        began = time.monotonic()
        await self._wait_for_jupyter(ip, port)
        self._progress(90, f"Jupyter answered after {time.monotonic() - began:.1f} s")
        return ip, port

    async def _wait_for_jupyter(self, ip: str, port: int) -> None:
        """Return once the server answers; fail at once, with its output, if it exits."""
        url = f"http://{ip}:{port}{self.server.base_url}api"
        # Leave the hub's own start_timeout the last word only if this one is missed.
        deadline = time.monotonic() + max(5.0, self.start_timeout - 5)
        async with httpx.AsyncClient(timeout=2, trust_env=False) as http:
            while True:
                try:
                    if (await http.get(url)).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await self._fail_if_stopped()
                if time.monotonic() > deadline:
                    tail = await self._output_tail()
                    raise _spawn_error(
                        f"Jupyter did not answer within {self.start_timeout} s. "
                        f"Its last output:\n{tail}",
                        reason="timeout",
                        status=500,
                    )
                await asyncio.sleep(0.2)

    async def start_container(self) -> tuple[str, int]:
        """Start the session's container (the spawner below's ``start``); its address."""
        return await super().start()

    async def _fail_if_stopped(self) -> None:
        """Raise a spawn error with the session's last output when it is no longer running."""

    async def _output_tail(self) -> str:
        """The session's last lines of output, for errors."""
        return "(no output)"


class BinderSpawner(BinderSpawnerMixin, DockerSpawner):
    """A Binder session as one Docker container on this machine.

    On top of the mixin: every capability dropped, ``no-new-privileges``, the memory
    guarantee as a reservation, no host mounts, and the port published on 127.0.0.1 only.
    """

    places_kernel_config = True

    @default("pull_policy")
    def _pull_policy_default(self) -> str:
        # Images come from this machine's builds; there is no registry to pull from.
        return "never"

    @default("host_ip")
    def _host_ip_default(self) -> str:
        return "127.0.0.1"

    @default("use_internal_ip")
    def _use_internal_ip_default(self) -> bool:
        return False

    @default("extra_host_config")
    def _extra_host_config_default(self) -> Any:
        return BinderSpawner._host_config

    @default("extra_create_kwargs")
    def _extra_create_kwargs_default(self) -> Any:
        return BinderSpawner._create_kwargs

    async def check_image(self, image: str) -> None:
        try:
            info = await self.docker("inspect_image", image)
        except docker.errors.NotFound:
            raise _spawn_error(
                f"The image {image} is not on this machine; build it first.",
                reason="image",
                status=400,
            ) from None
        for item in (info.get("Config") or {}).get("Env") or []:
            if item.startswith("JUPYTER_CONFIG_PATH="):
                self.image_config_path = item.split("=", 1)[1]

    async def start_object(self) -> None:
        if self.kernel_oom_score_adj:
            # Copied into the created container (never mounted from the host), as root.
            await self.docker(
                "put_archive", self.container_id, "/", config_archive(self.kernel_oom_score_adj)
            )
        await super().start_object()

    def _host_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "security_opt": ["no-new-privileges"],
            "cap_drop": ["ALL"],
            "pids_limit": self.pids_limit,
            "privileged": False,
            # Keep a crashed container until poll() or stop() removes it, for its output.
            "auto_remove": False,
        }
        if self.mem_guarantee:
            config["mem_reservation"] = self.mem_guarantee
        return config

    def _create_kwargs(self) -> dict[str, Any]:
        return {
            "user": f"{self.uid}:{self.uid}",
            "labels": {
                LABEL_SESSION: "1",
                LABEL_HUB: self.hub_label,
                LABEL_USER: self.user.name,
            },
        }

    async def start_container(self) -> tuple[str, int]:
        try:
            return await super().start_container()
        except docker.errors.APIError as error:
            # dockerd cannot exec the command: the image has no `jupyter` on its PATH.
            if "executable file not found" in str(error) or "no such file" in str(error):
                raise _spawn_error(NO_JUPYTER_SERVER, reason="image", status=400) from None
            raise
        except RuntimeError:
            # DockerSpawner finds no published port when the container exited at once.
            if self.container_id:
                await self._fail_if_stopped()
            raise

    async def poll(self) -> int | str | None:
        status = await super().poll()
        if status is not None and self.remove and self.object_id:
            # Exited containers are kept for their output (auto_remove is off), and the hub
            # does not call stop() on a server it finds stopped: remove it here.
            await self.remove_object()
        return status

    async def _fail_if_stopped(self) -> None:
        """Raise with the container's last output when it is no longer running."""
        try:
            info = await self.docker("inspect_container", self.container_id)
        except docker.errors.NotFound:
            info = {"State": {"Running": False, "ExitCode": "unknown"}}
        state = info["State"]
        if not state["Running"]:
            tail = await self._output_tail()
            # 127: a shell entrypoint did not find `jupyter`; or jupyter without its server.
            if state.get("ExitCode") == 127 or "Jupyter command `jupyter-server` not found" in tail:
                raise _spawn_error(NO_JUPYTER_SERVER, reason="image", status=400)
            raise _spawn_error(
                f"The session stopped before Jupyter answered (exit code "
                f"{state.get('ExitCode')}). Its last output:\n{tail}",
                reason="exited",
                status=500,
            )

    async def _output_tail(self) -> str:
        try:
            raw = await self.docker("logs", self.container_id, tail=_LOG_TAIL)
        except docker.errors.APIError:
            return "(no output)"
        return raw.decode(errors="replace").strip() or "(no output)"


def _spawn_error(message: str, *, reason: str, status: int = 500) -> SpawnException:
    error = SpawnException(message, reason=reason, status_code=status)
    # What the hub's progress stream shows as "Spawn failed: <message>".
    error.jupyterhub_message = message
    return error
