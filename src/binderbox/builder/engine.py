"""The Docker edge: BuildKit builds through the docker CLI, everything else via the SDK.

The SDK only speaks the classic builder, which lacks ``RUN --mount``; builds therefore go
through the ``docker`` CLI with ``DOCKER_BUILDKIT=1`` and plain progress output, which is
also what users see as the build log.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import secrets
import subprocess
import tarfile
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors

from binderbox.builder.render import Step
from binderbox.errors import BaseImageUnavailable, BuildFailed, DockerUnavailable

LOG_TAIL_LINES = 25

_VERTEX_HEADER = re.compile(r"^#(?P<id>\d+) \[[^\]]*\] (?P<instruction>.*)$")
_VERTEX_LINE = re.compile(r"^#(?P<id>\d+) (?:\d+\.\d+ )?(?P<text>.*)$")
_VERTEX_ERROR = re.compile(r"^#(?P<id>\d+) ERROR: (?P<text>.*)$")
_EXIT_CODE = re.compile(r"exit code: (?P<code>\d+)")
# BuildKit names each step's digest on a line of its own: nothing a reader can use.
_DIGEST_ONLY = re.compile(r"#\d+ sha256:[0-9a-f]{64}")

# Known failure causes in the log, turned into words for the user.
_CAUSES: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"Because (?P<x>[A-Za-z0-9._-]+) was not found in the package registry"),
        "'{x}' was not found on the package index",
    ),
    (
        re.compile(r"No matching distribution found for (?P<x>\S+)"),
        "'{x}' was not found on the package index",
    ),
    (
        re.compile(r"E: Unable to locate package (?P<x>\S+)"),
        "apt.txt: package '{x}' was not found in the Debian archive",
    ),
    (
        re.compile(r"E: Version '(?P<v>[^']+)' for '(?P<x>[^']+)' was not found"),
        "apt.txt: version '{v}' of '{x}' was not found in the Debian archive",
    ),
    (
        # binderbox's R runner: an R package that could not be installed (r_support.py).
        re.compile(r"binderbox: (?P<x>\S*(?:install\.R|DESCRIPTION): [^\n]+)"),
        "{x}",
    ),
    (
        # SIGKILL: nearly always the kernel's out-of-memory killer (binderbox serve holds
        # all builds to build_memory_limit).
        re.compile(r"exit code: 137\b"),
        "a process was killed, most likely for using more memory than builds may use here",
    ),
    (
        re.compile(
            r"(?:failed to resolve source metadata for|pull access denied for|"
            r"failed to do request: Head \"https?://)(?P<x>[^\s:\"]+)"
        ),
        "the base image could not be pulled ({x})",
    ),
)


def docker_client() -> docker.DockerClient:
    """A connected Docker SDK client, or DockerUnavailable with a plain explanation."""
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except docker.errors.DockerException:
        raise DockerUnavailable(
            "Docker is not running or not reachable (is dockerd started, and may this user "
            "use its socket?)."
        ) from None
    return client


@dataclass
class DockerEngine:
    """Builds and inspects images on the local Docker daemon."""

    docker_cli: str
    client: docker.DockerClient
    # What the docker CLI needs besides this process's environment to reach the daemon
    # (DOCKER_HOST and its TLS files, for a build node's dockerd).
    cli_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def connect(cls, docker_cli: str) -> DockerEngine:
        return cls(docker_cli=docker_cli, client=docker_client())

    def _env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, **self.cli_env, **extra}

    def image_labels(self, name: str) -> dict[str, str] | None:
        """The labels of a local image, or None when there is no such image."""
        try:
            image = self.client.images.get(name)
        except docker.errors.ImageNotFound:
            return None
        return dict(image.labels or {})

    def image_exists(self, name: str) -> bool:
        return self.image_labels(name) is not None

    def image_size(self, name: str) -> int:
        return int(self.client.images.get(name).attrs.get("Size", 0))

    def image_attrs(self, name: str) -> dict[str, Any] | None:
        """Docker's description of a local image (``Id``, ``RepoTags``, ``RepoDigests``,
        ``Config``, ``Created``), or None when there is no such image."""
        try:
            return dict(self.client.images.get(name).attrs)
        except docker.errors.APIError as error:
            if error.is_client_error():  # not found, or not a valid name
                return None
            raise

    def tag(self, image: str, name: str) -> None:
        """Give a local image (a name or id) one more name, ``repository:tag``."""
        repository, _, tag = name.rpartition(":")
        self.client.images.get(image).tag(repository, tag)

    def pull(self, reference: str) -> bool:
        """Pull ``reference`` (``name@sha256:…``); False when it cannot be got."""
        try:
            self.client.images.pull(reference)
        except docker.errors.APIError:
            return False
        return True

    def read_file(self, image: str, path: str, max_bytes: int) -> bytes | None:
        """The content of the regular file ``path`` in ``image``, read from a container
        that is created and removed but never started; None when there is no such file
        (or it is a link, or larger than ``max_bytes``)."""
        container = self.client.containers.create(
            image,
            command=["true"],
            network_disabled=True,
            name=f"binderbox-read-{secrets.token_hex(6)}",
        )
        try:
            try:
                chunks, stat = container.get_archive(path)
            except docker.errors.NotFound:
                return None
            if int(stat.get("size", 0)) > max_bytes:
                return None
            archive = bytearray()
            for chunk in chunks:
                archive += chunk
                if len(archive) > max_bytes + 65536:  # the tar headers around the file
                    return None
        finally:
            container.remove(force=True)
        with tarfile.open(fileobj=io.BytesIO(bytes(archive))) as tar:
            member = tar.next()
            if member is None or not member.isfile() or member.size > max_bytes:
                return None
            handle = tar.extractfile(member)
            return handle.read() if handle is not None else None

    def tags_of(self, repository: str) -> list[str]:
        """All local tags of an image repository such as ``binderbox/base``."""
        tags: list[str] = []
        for image in self.client.images.list(name=repository):
            tags += [t for t in image.tags if t.startswith(repository + ":")]
        return tags

    def build(
        self,
        context: Path,
        dockerfile: Path,
        tag: str,
        *,
        labels: dict[str, str] | None = None,
        build_args: dict[str, str] | None = None,
        no_cache: bool = False,
        timeout: float = 3600,
        steps: Iterable[Step] = (),
        on_line: Callable[[str], None] = lambda line: None,
        docker_config: Path | None = None,
        hidden: Iterable[str] = (),
    ) -> None:
        """Run one BuildKit build, streaming each log line to ``on_line``.

        ``docker_config`` replaces the CLI's configuration folder (an empty one: no
        registry credentials of this machine reach the build); every word in ``hidden``
        is replaced by ``…`` in the log. Raises BuildFailed with a sentence naming the
        failed step and the log tail.
        """
        secret_words = [word for word in hidden if word]
        command = [self.docker_cli, "build", "--progress=plain", "-f", str(dockerfile), "-t", tag]
        for key, value in (labels or {}).items():
            command += ["--label", f"{key}={value}"]
        for key, value in (build_args or {}).items():
            command += ["--build-arg", f"{key}={value}"]
        if no_cache:
            command.append("--no-cache")
        command.append(str(context))
        env = self._env(DOCKER_BUILDKIT="1")
        if docker_config is not None:
            env["DOCKER_CONFIG"] = str(docker_config)
        try:
            process = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                text=True,
                errors="replace",
                start_new_session=True,
            )
        except FileNotFoundError:
            raise DockerUnavailable(
                f"The docker command '{self.docker_cli}' was not found; install docker.io."
            ) from None

        timed_out = threading.Event()

        def stop() -> None:
            timed_out.set()
            process.kill()

        timer = threading.Timer(timeout, stop)
        timer.start()
        log = _BuildLog()
        try:
            assert process.stdout is not None
            for raw in process.stdout:
                line = raw.rstrip("\n")
                for word in secret_words:
                    line = line.replace(word, "…")
                log.add(line)
                if not _DIGEST_ONLY.fullmatch(line):
                    on_line(line)
            code = process.wait()
        finally:
            timer.cancel()
            if process.poll() is None:
                process.kill()
                process.wait()
        if timed_out.is_set():
            raise BuildFailed(
                f"The build took longer than the limit of {_duration(timeout)} and was stopped.",
                log_tail=log.tail(),
            )
        if code != 0:
            raise log.failure(tuple(steps))

    def has_jupyter_server(self, image: str, uid: int = 1000, timeout: float = 60) -> bool | None:
        """Whether ``jupyter server`` runs in ``image`` as ``uid`` (what sessions start).

        Asked first without the image's entrypoint, then through it (an entrypoint may set
        up the PATH). None when the answer did not come in time (an entrypoint that does
        not run its arguments): the session start will tell.
        """
        common = [
            self.docker_cli,
            "run",
            "--rm",
            "--network=none",
            f"--user={uid}:{uid}",
            "--cap-drop=ALL",
            "--security-opt=no-new-privileges",
            "--pids-limit=256",
            "--memory=1g",
        ]
        attempts = (
            [*common, "--entrypoint=jupyter", image, "server", "--version"],
            [*common, image, "jupyter", "server", "--version"],
        )
        unknown = False
        for command in attempts:
            name = f"binderbox-probe-{secrets.token_hex(6)}"
            command.insert(3, f"--name={name}")
            try:
                result = subprocess.run(
                    command,
                    capture_output=True,
                    text=True,
                    errors="replace",
                    stdin=subprocess.DEVNULL,
                    timeout=timeout,
                    check=False,
                    env=self._env(),
                )
            except subprocess.TimeoutExpired:
                # The container outlives the CLI that was killed: end it.
                subprocess.run(
                    [self.docker_cli, "rm", "--force", name],
                    capture_output=True,
                    check=False,
                    env=self._env(),
                )
                unknown = True
                continue
            if result.returncode == 0 and re.search(r"^\d+\.\d+", result.stdout.strip()):
                return True
        return None if unknown else False

    def import_tarball(self, tarball: Path, tag: str, changes: list[str]) -> None:
        """``docker import`` a root filesystem tarball as an image."""
        command = [self.docker_cli, "import"]
        for change in changes:
            command += ["--change", change]
        command += [str(tarball), tag]
        result = subprocess.run(
            command, capture_output=True, text=True, check=False, env=self._env()
        )
        if result.returncode != 0:
            raise BuildFailed(
                f"Importing the base image failed: {result.stderr.strip()}",
            )

    def remove_image(self, name: str) -> None:
        with contextlib.suppress(docker.errors.ImageNotFound):
            self.client.images.remove(name, noprune=False)


class _BuildLog:
    """Keeps what is needed to explain a failed BuildKit build."""

    def __init__(self) -> None:
        self.lines: deque[str] = deque(maxlen=2000)
        self.instructions: dict[str, str] = {}
        self.errors: list[tuple[str, str]] = []  # (vertex, error text), in order
        self.final_error = ""

    def add(self, line: str) -> None:
        self.lines.append(line)
        if header := _VERTEX_HEADER.match(line):
            self.instructions.setdefault(header["id"], header["instruction"])
        elif error := _VERTEX_ERROR.match(line):
            self.errors.append((error["id"], error["text"]))
        elif line.startswith("ERROR:"):
            self.final_error = line.removeprefix("ERROR:").strip()

    @property
    def failed(self) -> tuple[str, str]:
        """The vertex that failed the build and its error.

        A command that exits non-zero is the real cause; other vertex errors (a cancelled
        sibling, a cache record lost to a concurrent prune) only count when there is none.
        """
        for vertex, text in reversed(self.errors):
            if _EXIT_CODE.search(text):
                return vertex, text
        if self.errors:
            return self.errors[-1]
        return "", self.final_error

    def vertex_output(self, vertex: str) -> list[str]:
        out = []
        for line in self.lines:
            match = _VERTEX_LINE.match(line)
            if match and match["id"] == vertex and not _VERTEX_HEADER.match(line):
                text = match["text"]
                if text in {"DONE", "CACHED"} or text.startswith(("DONE ", "ERROR: ", "sha256:")):
                    continue
                out.append(text)
        return out

    def tail(self) -> str:
        vertex, _ = self.failed
        lines = self.vertex_output(vertex) if vertex else []
        if not lines:  # e.g. a pull that failed before any command ran
            lines = [ln for ln in self.lines if ln.strip() and not ln.startswith("#")]
        return "\n".join(lines[-LOG_TAIL_LINES:])

    def failure(self, steps: tuple[Step, ...]) -> BuildFailed:
        vertex, error_text = self.failed
        instruction = self.instructions.get(vertex, "")
        step = next((s for s in steps if s.marker and s.marker in instruction), None)
        text = "\n".join(self.lines)
        cause = ""
        for pattern, template in _CAUSES:
            if match := pattern.search(text):
                cause = template.format(**match.groupdict())
                break
        if not cause:
            code = _EXIT_CODE.search(error_text)
            cause = f"the command exited with code {code['code']}" if code else error_text
        where = f" while {step.description}" if step else ""
        if not step and instruction:
            where = f" at '{_short(instruction)}'"
        message = f"The build failed{where}: {cause or 'see the log'}."
        kind = BaseImageUnavailable if "base image could not be pulled" in cause else BuildFailed
        return kind(message, log_tail=self.tail())


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        hours = int(seconds // 3600)
        return f"{hours} hour" + ("s" if hours != 1 else "")
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)} minutes"
    return f"{seconds:g} seconds"
