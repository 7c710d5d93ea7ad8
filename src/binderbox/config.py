"""One typed settings object, read from a TOML file, ``BINDERBOX_*`` variables and flags.

Precedence, lowest first: defaults, the TOML file, the environment, command-line flags.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_type_hints

from binderbox.errors import UsageError

HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def _default_docker_cli() -> str:
    # The docker.io CLI builds with BuildKit by itself; a newer CLI may insist on buildx.
    if Path("/usr/bin/docker").exists():
        return "/usr/bin/docker"
    return shutil.which("docker") or "docker"


def _default_ca_bundle() -> str:
    return str(HOST_CA_BUNDLE) if HOST_CA_BUNDLE.exists() else ""


@dataclass(frozen=True)
class Settings:
    """Everything an operator or user can configure."""

    # Docker CLI used for BuildKit builds (the SDK is used for everything else).
    docker_cli: str = dataclasses.field(default_factory=_default_docker_cli)
    # Debian suite of the base image built by `binderbox base`.
    base_suite: str = "bookworm"
    # Any Debian/Ubuntu image to use instead of the built base (needs registry access).
    base_image: str = ""
    # Debian mirror for mmdebstrap; empty means mmdebstrap's default.
    debian_mirror: str = ""
    # Extra CA bundle trusted by builds and by the running image; empty disables.
    ca_bundle: str = dataclasses.field(default_factory=_default_ca_bundle)
    # Prefix of every built image name; bump it to force rebuilds.
    image_prefix: str = "binderbox-"
    # Seconds a build may run before it is stopped.
    build_timeout: int = 3600
    # What to do when runtime.txt asks for a Python no base ships: "nearest" or "fail".
    python_fallback: str = "nearest"

    def with_overrides(self, **overrides: Any) -> Settings:
        """Return a copy with the given non-None values replaced."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        return _validated(dataclasses.replace(self, **changes))


def _convert(name: str, kind: type, raw: Any) -> Any:
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off"}:
                return False
            raise ValueError(text)
        return kind(raw)
    except (TypeError, ValueError):
        raise UsageError(f"Setting '{name}' must be a {kind.__name__}, not {raw!r}.") from None


def _validated(settings: Settings) -> Settings:
    if settings.python_fallback not in {"nearest", "fail"}:
        raise UsageError("Setting 'python_fallback' must be 'nearest' or 'fail'.")
    if settings.build_timeout <= 0:
        raise UsageError("Setting 'build_timeout' must be a positive number of seconds.")
    if settings.ca_bundle and not Path(settings.ca_bundle).is_file():
        raise UsageError(f"The CA bundle '{settings.ca_bundle}' does not exist.")
    return settings


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Read settings from an optional TOML file and ``BINDERBOX_*`` variables."""
    environ = os.environ if environ is None else environ
    hints = get_type_hints(Settings)
    known = {f.name for f in fields(Settings)}
    values: dict[str, Any] = {}

    path = config_file or environ.get("BINDERBOX_CONFIG")
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise UsageError(f"The settings file '{path}' does not exist.") from None
        except OSError as err:
            raise UsageError(
                f"The settings file '{path}' cannot be read: {err.strerror}."
            ) from None
        except tomllib.TOMLDecodeError as err:
            raise UsageError(f"The settings file '{path}' is not valid TOML: {err}.") from None
        for key, raw in data.items():
            name = key.replace("-", "_")
            if name not in known:
                raise UsageError(f"The settings file '{path}' has an unknown setting '{key}'.")
            kind = hints[name]
            # TOML is typed: take a value only when it already has the right type.
            if type(raw) is not kind and not (
                kind is int and type(raw) is float and raw.is_integer()
            ):
                raise UsageError(
                    f"The settings file '{path}': '{key}' must be a {kind.__name__}, not {raw!r}."
                )
            values[name] = kind(raw)

    for name in known:
        env_name = "BINDERBOX_" + name.upper()
        if env_name in environ:
            values[name] = _convert(name, hints[name], environ[env_name])

    return _validated(Settings(**values))
