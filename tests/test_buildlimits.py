"""Memory and process limits for build steps: on cgroup trees laid out in a temporary
folder, then for real on this dockerd (root only)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from binderbox.config import Settings
from binderbox.errors import UsageError
from binderbox.service.buildlimits import (
    CGROUP_ROOT,
    apply_build_limits,
    lift_build_limits,
    limit_files,
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="cgroup limits need root")


def v1_tree(root: Path) -> Path:
    for controller in ("memory", "pids"):
        (root / controller / "docker").mkdir(parents=True)
    return root


def test_no_docker_cgroup_means_no_limits_and_says_why(tmp_path: Path) -> None:
    assert limit_files(tmp_path) is None
    if os.geteuid() == 0:
        status = apply_build_limits("2G", 100, tmp_path)
        assert not status.active
        assert "does not keep BuildKit's steps" in status.message


@needs_root
def test_limits_on_a_cgroup_v1_tree_and_taken_off_again(tmp_path: Path) -> None:
    root = v1_tree(tmp_path)
    buildkit = root / "memory" / "docker" / "buildkit"
    buildkit.mkdir()
    # The kernel makes these files; here they are plain files with the kernel's defaults.
    for name in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"):
        (buildkit / name).write_text("9223372036854771712")
    (root / "pids" / "docker" / "buildkit").mkdir()
    (root / "pids" / "docker" / "buildkit" / "pids.max").write_text("max")
    status = apply_build_limits("2G", 100, root)
    assert status.active, status.message
    assert status.message == ("Build limits: on (all builds together: 2G, 100 processes).")
    assert (buildkit / "memory.limit_in_bytes").read_text() == str(2 * 1024**3)
    assert (buildkit / "memory.memsw.limit_in_bytes").read_text() == str(2 * 1024**3)
    assert (root / "pids" / "docker" / "buildkit" / "pids.max").read_text() == "100"
    lift_build_limits(status)
    assert (buildkit / "memory.limit_in_bytes").read_text() == "-1"
    assert (root / "pids" / "docker" / "buildkit" / "pids.max").read_text() == "max"


@needs_root
def test_limits_on_a_cgroup_v2_tree(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("memory pids\n")
    (tmp_path / "docker").mkdir()
    # Without the controllers handed down to docker/buildkit there is nothing to write.
    assert limit_files(tmp_path) is None
    for name in ("memory.max", "pids.max"):
        (tmp_path / "docker" / "buildkit" / name).write_text("max")
    status = apply_build_limits("512M", 0, tmp_path)
    assert status.active
    assert (tmp_path / "docker" / "buildkit" / "memory.max").read_text() == str(512 * 1024**2)
    assert (tmp_path / "docker" / "buildkit" / "pids.max").read_text() == "max"


def test_build_limit_settings_are_checked() -> None:
    assert apply_build_limits("0", 0).message.startswith("Build limits: off")
    with pytest.raises(UsageError, match="build_memory_limit"):
        Settings().with_overrides(build_memory_limit="lots")
    with pytest.raises(UsageError, match="build_pids_limit"):
        Settings().with_overrides(build_pids_limit=-1)


@needs_root
@pytest.mark.docker
def test_a_build_over_the_memory_limit_fails_and_says_so(
    make_repo: Callable[..., Path], build: Callable
) -> None:
    if limit_files(CGROUP_ROOT) is None:
        pytest.skip("dockerd does not use a docker/buildkit cgroup here")
    hog = "python3 -c \"b = b'x' * (700 * 1024 * 1024); print('allocated', len(b))\"\n"
    repo = make_repo({"postBuild": "#!/bin/sh\necho before\n" + hog})
    status = apply_build_limits("256M", 0)
    try:
        assert status.active, status.message
        result = build(str(repo))
    finally:
        lift_build_limits(status)
    assert result.code != 0
    failure = result.failure
    assert failure["message"] == (
        "The build failed while running postBuild: a process was killed, most likely for "
        "using more memory than builds may use here."
    )
    assert failure["log_tail"].splitlines()[-2:] == ["before", "Killed"]
    unlimited = limit_files(CGROUP_ROOT)
    assert unlimited is not None
    assert int(unlimited.memory[0].read_text().replace("max", "-1")) in (-1, 9223372036854771712)
