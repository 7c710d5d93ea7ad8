"""Memory and process limits for build steps while ``binderbox serve`` runs.

A repository's ``postBuild`` or Dockerfile ``RUN`` runs inside dockerd's BuildKit, which
ignores ``docker build --memory``: a hostile (or careless) build could take all of the
machine's memory or processes, and the service and every session with it. BuildKit puts
each step in a cgroup below ``docker/buildkit``; a limit on that parent holds all build
steps together. Setting it needs root and cgroupfs (dockerd's default outside systemd);
the limits are taken off again when serve stops, since they hold for every BuildKit build
on this dockerd.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from binderbox.config import size_in_bytes

CGROUP_ROOT = Path("/sys/fs/cgroup")
# Where dockerd (cgroupfs driver) puts BuildKit's steps, for cgroup v1 and v2.
_V1 = {"memory": "memory/docker/buildkit", "pids": "pids/docker/buildkit"}
_V2 = "docker/buildkit"


@dataclass(frozen=True)
class LimitFiles:
    """The files that hold the limits, and what they say when there is none."""

    memory: list[Path]
    pids: Path
    unlimited_memory: str
    unlimited_pids: str


@dataclass(frozen=True)
class BuildLimitStatus:
    active: bool
    message: str
    files: LimitFiles | None = None


def limit_files(root: Path = CGROUP_ROOT) -> LimitFiles | None:
    """The limit files of BuildKit's parent cgroup (made if missing), or None when this
    machine's cgroups are not laid out as dockerd's cgroupfs driver lays them out."""
    if (root / "cgroup.controllers").exists():  # v2, unified
        parent = root / _V2
        if not (root / "docker").is_dir():
            return None
        parent.mkdir(exist_ok=True)
        files = LimitFiles([parent / "memory.max"], parent / "pids.max", "max", "max")
        # Present only when dockerd's cgroup hands the memory and pids controllers down.
        return files if files.memory[0].exists() and files.pids.exists() else None
    memory, pids = root / _V1["memory"], root / _V1["pids"]
    if not (memory.parent.is_dir() and pids.parent.is_dir()):
        return None
    memory.mkdir(exist_ok=True)
    pids.mkdir(exist_ok=True)
    # memsw (memory + swap) when swap accounting is on, so a build cannot swap instead.
    files = [memory / "memory.limit_in_bytes", memory / "memory.memsw.limit_in_bytes"]
    found = LimitFiles([f for f in files if f.exists()], pids / "pids.max", "-1", "max")
    return found if files[0].exists() and found.pids.exists() else None


def apply_build_limits(memory: str, pids: int, root: Path = CGROUP_ROOT) -> BuildLimitStatus:
    """Hold all build steps together to ``memory`` (e.g. "4G"; "0": no limit) and ``pids``
    processes (0: no limit); say plainly when that cannot be done here."""
    amount = int(size_in_bytes(memory, "build_memory_limit"))
    if amount == 0 and pids == 0:
        return BuildLimitStatus(False, "Build limits: off (build_memory_limit = 0).")
    reason = ""
    files = None
    if os.geteuid() != 0:
        reason = "setting them needs root"
    else:
        try:
            files = limit_files(root)
            if files is None:
                reason = "dockerd does not keep BuildKit's steps in a docker/buildkit cgroup"
            else:
                # memsw must never be below memory: raise memory's first, lower it last.
                _write_all(files.memory, str(amount) if amount else files.unlimited_memory)
                files.pids.write_text(str(pids) if pids else files.unlimited_pids)
        except OSError as error:
            reason = f"the cgroup could not be written ({error.strerror})"
    if reason:
        return BuildLimitStatus(
            False,
            f"Build limits: off ({reason}); one build can use all of this machine's memory.",
        )
    shown = memory if amount else "no memory limit"
    return BuildLimitStatus(
        True,
        f"Build limits: on (all builds together: {shown}, {pids or 'any number of'} processes).",
        files,
    )


def lift_build_limits(status: BuildLimitStatus) -> None:
    """Take the limits off again (serve stops; other builds on this dockerd are not ours)."""
    if not status.active or status.files is None:
        return
    files = status.files
    _write_all(list(reversed(files.memory)), files.unlimited_memory)
    files.pids.write_text(files.unlimited_pids)


def _write_all(paths: list[Path], value: str) -> None:
    """Write ``value`` to each file; when lowering v1's memory and memsw together, the
    order that keeps memsw >= memory is tried after the other."""
    try:
        for path in paths:
            path.write_text(value)
    except OSError:
        for path in reversed(paths):
            path.write_text(value)
