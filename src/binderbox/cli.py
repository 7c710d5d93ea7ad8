"""The ``binderbox`` command: base, build, run."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click

from binderbox import __version__
from binderbox.builder import base as base_image
from binderbox.builder.detect import detect
from binderbox.builder.engine import DockerEngine, docker_client
from binderbox.builder.lock import MAX_LOCK_BYTES, Lock, parse_lock
from binderbox.builder.pipeline import BuildRequest, build_repository, checked_subdir, record_lock
from binderbox.builder.render import ImageOptions, render
from binderbox.config import Settings, load_settings
from binderbox.errors import BinderboxError, BuildFailed, UsageError
from binderbox.events import Event
from binderbox.providers import LocalSource, source_for
from binderbox.runner import RunOptions, parse_env, parse_ports, parse_volumes, serve_jupyter
from binderbox.runner import run_command as run_in_container


@dataclass
class Output:
    """Prints events for people, or as one JSON object per line with --json-logs."""

    json_logs: bool = False
    quiet_log: bool = False

    def __call__(self, event: Event) -> None:
        if self.json_logs:
            click.echo(json.dumps(event.as_json()), err=False)
            return
        if event.log:
            if not self.quiet_log:
                click.echo("    " + event.message, err=True)
        elif event.phase == "failed":
            click.echo(click.style("Error: ", fg="red", bold=True) + event.message, err=True)
        else:
            click.echo(click.style("==> ", fg="blue", bold=True) + event.message, err=True)

    def fail(self, error: BinderboxError) -> None:
        fields: dict[str, Any] = {}
        if error.log_tail:
            fields["log_tail"] = error.log_tail
        if self.json_logs:
            self(Event("failed", error.message, fields))
            return
        self(Event("failed", error.message))
        if error.log_tail:
            click.echo("The last lines of the build log:", err=True)
            for line in error.log_tail.splitlines():
                click.echo("    " + line, err=True)


def _guarded(out: Output, action: Callable[[], int | None]) -> None:
    """Run ``action``; show user errors as one sentence and never as a traceback."""
    try:
        code = action() or 0
    except BinderboxError as error:
        out.fail(error)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    except Exception as error:  # the last line of defence against tracebacks
        out.fail(BinderboxError(f"binderbox failed unexpectedly: {type(error).__name__}: {error}"))
        sys.exit(1)
    sys.exit(code)


def build_options(func: Callable[..., Any], repo_required: bool = True) -> Callable[..., Any]:
    """The build flags shared by ``build`` and ``run`` (repo2docker's names)."""
    decorators = [
        click.argument("repo", required=repo_required, default=None if repo_required else ""),
        click.option("--ref", default="", help="Branch, tag or commit (git URLs only)."),
        click.option("--image-name", default="", help="Name the image instead of deriving it."),
        click.option("--subdir", default="", help="Build from this folder of the repository."),
        click.option("--user-id", type=int, default=1000, show_default=True),
        click.option("--user-name", default="jovyan", show_default=True),
        click.option("--target-repo-dir", default="", help="Where the repository goes."),
        click.option("--appendix", default="", help="Dockerfile lines appended to the build."),
        click.option("--base-image", default=None, help="Use this Debian/Ubuntu image as base."),
        click.option("--json-logs", is_flag=True, help="One JSON object per line."),
        click.option("--no-cache", is_flag=True, help="Rebuild every layer."),
        click.option("--label", "labels", multiple=True, help="KEY=VALUE label on the image."),
        click.option(
            "--build-arg", "build_args", multiple=True, help="KEY=VALUE for a Dockerfile's ARG."
        ),
        click.option("--config", "config_file", default=None, help="Settings TOML file."),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def _settings(config_file: str | None, **overrides: Any) -> Settings:
    return load_settings(config_file).with_overrides(**overrides)


def _request(repo: str, ref: str, settings: Settings, **kw: Any) -> BuildRequest:
    kw["labels"] = _pairs("--label", kw.get("labels", ()))
    kw["build_args"] = _pairs("--build-arg", kw.get("build_args", ()))
    return BuildRequest(source=source_for(repo, ref, settings), **kw)


def _pairs(flag: str, values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key or any(c.isspace() for c in key) or "\n" in val:
            raise UsageError(f"{flag} {value!r} is not KEY=VALUE.")
        pairs.append((key, val))
    return tuple(pairs)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="binderbox")
def main() -> None:
    """Turn a code repository into a live Jupyter environment."""


@main.command()
@click.option("--suite", default=None, help="Debian suite: bookworm (default) or trixie.")
@click.option("--rebuild", is_flag=True, help="Build even if a current base exists.")
@click.option("--config", "config_file", default=None, help="Settings TOML file.")
def base(suite: str | None, rebuild: bool, config_file: str | None) -> None:
    """Build the Debian base image from Debian packages (once; reused afterwards)."""
    out = Output()

    def action() -> None:
        settings = _settings(config_file)
        chosen = suite or settings.base_suite
        base_image.check_suite(chosen)
        engine = DockerEngine.connect(settings.docker_cli)
        found = "" if rebuild else base_image.find_base(engine, chosen)
        if found:
            out(Event("built", f"Base image {found} is present and current"))
            click.echo(found)
            return
        out(Event("building", f"Bootstrapping {chosen} with mmdebstrap"))
        name = base_image.build_base(
            engine,
            chosen,
            mirror=settings.debian_mirror,
            ca_bundle=settings.ca_bundle,
            index_url=settings.index_url,
            on_line=lambda line: out(Event("building", line, log=True)),
        )
        out(Event("built", f"Built {name}"))
        click.echo(name)

    _guarded(out, action)


@main.command()
@functools.partial(build_options, repo_required=False)
@click.option("--no-build", is_flag=True, help="Print the generated Dockerfile and stop.")
@click.option(
    "--lock-out",
    default=None,
    metavar="FILE",
    help="Write the build's lock here (default: locks/ in the state directory).",
)
@click.option(
    "--from-lock",
    default=None,
    metavar="FILE",
    help="Rebuild exactly the environment of this lock (REPO: where the repository is now).",
)
def build(
    repo: str,
    ref: str,
    json_logs: bool,
    config_file: str | None,
    base_image: str | None,
    no_build: bool,
    lock_out: str | None,
    from_lock: str | None,
    **options: Any,
) -> None:
    """Build an image from REPO (a folder, a git URL, a DOI or a data record's address).

    With --from-lock FILE, rebuild the environment that lock records (the same base
    image, Debian and Python packages at their versions, the repository at its commit);
    REPO is then optional and says where the repository is now.
    """
    out = Output(json_logs=json_logs)

    def action() -> None:
        settings = _settings(config_file, base_image=base_image)
        if from_lock:
            for flag, given in (
                ("--no-build", no_build),
                ("--ref", ref),
                ("--base-image", base_image),
            ):
                if given:
                    raise UsageError(
                        f"{flag} does not go with --from-lock: the lock decides the commit and "
                        "the base image."
                    )
            request = _locked_request(repo, read_lock_file(from_lock), settings, options)
        elif not repo:
            raise UsageError("Give REPO (a folder or a git URL) or --from-lock FILE.")
        elif no_build:
            _print_dockerfile(repo, ref, settings, options)
            return
        else:
            request = _request(repo, ref, settings, **options)
        result = build_repository(request, settings, out)
        text = result.lock
        if not text and result.reused:
            # The image says what it holds; a warning when it cannot (an older image).
            found = record_lock(DockerEngine.connect(settings.docker_cli), result.image, None, out)
            text = found.text() if found else ""
        if text:
            path = _write_lock(text, lock_out, settings, result.image)
            out(Event("built", f"Wrote the lock of {result.image} to {path}", {"lock": str(path)}))
        if not json_logs:
            click.echo(result.image)

    _guarded(out, action)


def read_lock_file(path: str) -> Lock:
    """A lock file, read (bounded) and checked; one sentence when it cannot be used."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_LOCK_BYTES + 1)
    except OSError as error:
        raise UsageError(f"The lock file {path} cannot be read: {error.strerror}.") from None
    return parse_lock(raw, f"The lock file {path}")


def _locked_request(
    repo: str, wanted: Lock, settings: Settings, options: dict[str, Any]
) -> BuildRequest:
    """The request that rebuilds ``wanted``: its commit and build options, the repository
    from REPO when given (a clone, a copy, a mirror), else from where the lock says."""
    locked = wanted.repository
    chosen = {
        "subdir": locked.subdir,
        "user_id": wanted.user.id,
        "user_name": wanted.user.name,
        "target_repo_dir": wanted.user.target_repo_dir,
    }
    defaults = {"subdir": "", "user_id": 1000, "user_name": "jovyan", "target_repo_dir": ""}
    for key, value in chosen.items():
        if options[key] != defaults[key] and options[key] != value:
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"{flag} differs from the lock's ({value!r}); leave it out.")
        options[key] = value
    where = repo or locked.url
    if locked.provider == "local" and not repo and not Path(where).is_dir():
        raise UsageError(
            f"The lock's repository is the folder {where}, which is not on this machine; "
            "give the folder it is in now as REPO."
        )
    ref = locked.commit if locked.provider == "git" and not Path(where).exists() else ""
    request = _request(where, ref, settings, **options)
    if locked.provider == "git" and isinstance(request.source, LocalSource):
        _check_folder_commit(request.source.path, locked.commit)
    return replace(request, lock=wanted)


def _check_folder_commit(folder: Path, commit: str) -> None:
    """A git lock rebuilt from a folder: when the folder is a git checkout, it must be
    at the locked commit."""
    head = subprocess.run(
        ["git", "-C", str(folder), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if head.returncode == 0 and head.stdout.strip() != commit:
        raise UsageError(
            f"The folder {folder} is at commit {head.stdout.strip()[:12]}, not at the locked "
            f"{commit[:12]}; check it out there first (git checkout {commit[:12]})."
        )


def _write_lock(text: str, lock_out: str | None, settings: Settings, image: str) -> Path:
    if lock_out:
        path = Path(lock_out)
    else:
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", image).strip("-")
        path = Path(settings.state_dir).expanduser() / "locks" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.write_text(text)
    except OSError as error:
        raise UsageError(f"The lock cannot be written to {path}: {error.strerror}.") from None
    return path


def _print_dockerfile(repo: str, ref: str, settings: Settings, options: dict[str, Any]) -> None:
    source = source_for(repo, ref, settings)
    if not isinstance(source, LocalSource):
        raise BinderboxError("--no-build works on a local folder; clone the repository first.")
    subdir = checked_subdir(options["subdir"])
    repo = source.path / subdir if subdir else source.path
    if not repo.is_dir():
        raise UsageError(f"--subdir '{subdir}' is not a folder in the repository.")
    plan = detect(repo)
    if plan.dockerfile:
        click.echo((repo / plan.dockerfile).read_text(), nl=False)
        return
    recipe = render(
        plan,
        ImageOptions(
            base_image=settings.base_image
            or f"{base_image.BASE_REPOSITORY}:<{settings.base_suite}>",
            foreign_base=bool(settings.base_image),
            user_id=options["user_id"],
            user_name=options["user_name"],
            target_repo_dir=options["target_repo_dir"],
            appendix=options["appendix"],
            with_ca_bundle=bool(settings.ca_bundle),
            cran_mirror=settings.cran_mirror,
            compile_bytecode=settings.compile_bytecode,
            index_url=settings.index_url,
        ),
    )
    click.echo(recipe.dockerfile, nl=False)


@main.command(context_settings={"allow_interspersed_args": False})
@build_options
@click.option("-p", "--publish", "ports", multiple=True, help="HOST:CONTAINER port.")
@click.option("-e", "--env", "env", multiple=True, help="KEY=VALUE in the container.")
@click.option("-v", "--volume", "volumes", multiple=True, help="SOURCE:DEST mount.")
@click.option("--editable", is_flag=True, help="Mount the local folder over the repository.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(
    repo: str,
    ref: str,
    json_logs: bool,
    config_file: str | None,
    base_image: str | None,
    ports: tuple[str, ...],
    env: tuple[str, ...],
    volumes: tuple[str, ...],
    editable: bool,
    command: tuple[str, ...],
    **options: Any,
) -> None:
    """Build REPO if needed, then serve JupyterLab on 127.0.0.1 or run COMMAND in it."""
    out = Output(json_logs=json_logs)
    if command[:1] == ("--",):
        command = command[1:]
    elif command and command[0].startswith("-"):
        # As with repo2docker, options come before REPO; after it, everything is CMD.
        out.fail(
            UsageError(
                f"Options go before REPO (binderbox run [OPTIONS] REPO [-- CMD]); "
                f"'{command[0]}' came after it."
            )
        )
        sys.exit(2)

    def action() -> int:
        settings = _settings(config_file, base_image=base_image)
        run_options = RunOptions(
            ports=parse_ports(ports),
            environment=parse_env(env),
            volumes=parse_volumes(volumes),
            command=command,
        )
        request = _request(repo, ref, settings, **options)
        if editable and not isinstance(request.source, LocalSource):
            raise BinderboxError("--editable needs a local folder, not a URL.")
        client = docker_client()
        result = build_repository(request, settings, out)
        if editable:
            assert isinstance(request.source, LocalSource)
            repo_dir = _image_env(client, result.image).get("REPO_DIR", "/home/jovyan")
            folder = request.source.path / request.subdir if request.subdir else request.source.path
            run_options.volumes[str(folder)] = repo_dir
        if command:
            return run_in_container(client, result.image, run_options)
        out(Event("built", "Starting JupyterLab (Ctrl-C stops and removes the container)"))

        def announce(url: str) -> None:
            if json_logs:
                out(Event("ready", "JupyterLab is running", {"url": url}))
            else:
                click.echo(f"\n    JupyterLab is running at:\n    {url}\n", err=True)
                click.echo(url)

        return serve_jupyter(client, result.image, run_options, announce)

    _guarded(out, action)


@main.command()
@click.option("--host", default=None, help="Address to listen on (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port to listen on (default 8585).")
@click.option("--config", "config_file", default=None, help="Settings TOML file.")
def serve(host: str | None, port: int | None, config_file: str | None) -> None:
    """Run the Binder service: share links, /build, and sessions in JupyterHub."""
    out = Output()

    def action() -> None:
        from binderbox.service.serve import serve as run_service

        settings = _settings(config_file, service_host=host, service_port=port)
        run_service(settings, lambda message: out(Event("built", message)))

    _guarded(out, action)


def _image_env(client: Any, image: str) -> dict[str, str]:
    config = client.images.get(image).attrs.get("Config") or {}
    return dict(item.split("=", 1) for item in config.get("Env") or [] if "=" in item)


__all__ = ["BuildFailed", "main"]
