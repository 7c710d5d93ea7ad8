"""Benchmark binderbox builds against a hand-written pip Dockerfile on the same base image.

Measures, as the median of ``--repeat`` repetitions (default 3; ``--quick`` is one):

(a) cold ``binderbox build``: the built images removed and ``docker builder prune -af``
    run first, which empties BuildKit's layer cache and its cache mounts (uv's wheel
    cache); the binderbox base image is kept;
(b) ``binderbox build`` of the same repository after editing only its notebook (warm);
(c) ``binderbox build`` of a different repository (other folder, other notebook, the same
    requirements.txt) (warm);
(d) baseline: a hand-written Dockerfile FROM the same base image (which holds the
    Jupyter server stack in /srv/venv, as binderbox's builds start from it too) that runs
    ``pip install --no-cache-dir -r requirements.txt`` into that venv and then
    ``COPY . .``, built with ``docker build --no-cache`` after the same prune.

Times are the wall clock (time.monotonic) around the ``binderbox build`` command, or
around ``docker build`` for (d). Images and temporary folders the script made are removed
at the end, also on failure; the build cache is left as the last build filled it.

Run from the repository root:  .venv/bin/python benchmarks/bench_build.py [--quick]

Exit status: 0 when every target is met, 1 when a target is missed, 2 on an error.
Note: ``docker builder prune -af`` empties the build cache of the whole daemon, so other
builds on the machine lose their cache too (and slow the measurements while they run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "src"))

from binderbox.builder import stack  # noqa: E402  (after the path set-up above)

# The stack under test, pinned to the newest releases that still ship wheels for
# Python 3.11 (the Python of the bookworm base) as of 2026-11-25: numpy 2.5 and scipy
# 1.18 need Python >= 3.12.
REQUIREMENTS = (
    "numpy==2.4.6",
    "scipy==1.17.1",
    "pandas==3.1.1",
    "matplotlib==3.11.2",
    "seaborn==0.13.2",
)
IMPORT_CHECK = "import numpy, scipy, pandas, matplotlib, seaborn, jupyterlab, notebook"

HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BUILD_TIMEOUT = 3600

# Targets: (b) and (c) at most this many seconds; (d)/(a) at least this ratio.
WARM_TARGET_S = 5.0
SPEEDUP_TARGET = 2.0

CASES = {
    "a": "(a) cold binderbox build, empty caches",
    "b": "(b) rebuild after editing the notebook",
    "c": "(c) other repository, same requirements",
    "d": "(d) baseline Dockerfile, pip --no-cache-dir",
}

BASELINE_DOCKERFILE = """\
FROM {base}
ENV VIRTUAL_ENV=/srv/venv \\
    PATH=/srv/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
COPY requirements.txt /tmp/requirements.txt
# The host CA bundle is mounted for this step only (it is not in the context or image).
RUN --mount=type=secret,id=ca,target=/tmp/ca.crt \\
    PIP_CERT=/tmp/ca.crt pip install --no-cache-dir --disable-pip-version-check \\
       -r /tmp/requirements.txt
WORKDIR /srv/repo
COPY . .
EXPOSE 8888
CMD ["jupyter", "lab", "--ip=0.0.0.0", "--port=8888"]
"""

_STEP_DONE = re.compile(r"^#(?P<id>\d+) DONE (?P<s>\d+(?:\.\d+)?)s$")
_STEP_CACHED = re.compile(r"^#(?P<id>\d+) CACHED$")
_STEP_LINE = re.compile(r"^#(?P<id>\d+) (?P<text>.+)$")
_UV_SUMMARY = re.compile(r"(?:Resolved|Prepared|Installed) \d+ packages? in \S+")


class BenchError(Exception):
    """A build or docker command failed; the benchmark cannot go on."""


@dataclass
class Run:
    seconds: float
    image: str
    size_mb: float
    # (step, seconds) from the BuildKit log, slowest first; and the number of cached steps.
    steps: list[tuple[str, float]] = field(default_factory=list)
    cached: int = 0
    # uv's summary lines ("Prepared 11 packages in 801ms"), to tell downloads from installs.
    uv_lines: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------
# Docker and binderbox commands


class Tools:
    def __init__(self, docker_cli: str, binderbox_cli: str) -> None:
        self.docker_cli = docker_cli
        self.binderbox_cli = binderbox_cli
        self.env = {**os.environ, "DOCKER_BUILDKIT": "1", "BINDERBOX_DOCKER_CLI": docker_cli}
        self.built: list[str] = []

    def docker(self, *args: str, timeout: float = 600, check: bool = True) -> str:
        proc = subprocess.run(
            [self.docker_cli, *args],
            capture_output=True,
            text=True,
            env=self.env,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise BenchError(f"docker {' '.join(args)} failed: {proc.stderr.strip()[-2000:]}")
        return proc.stdout.strip()

    def prune(self) -> None:
        """Empty BuildKit's cache: layers and cache mounts (uv's wheel cache) alike."""
        self.docker("builder", "prune", "-af")

    def remove_images(self) -> None:
        for image in self.built:
            self.docker("image", "rm", "-f", image, check=False)
        self.built.clear()

    def size_mb(self, image: str) -> float:
        return int(self.docker("image", "inspect", "--format", "{{.Size}}", image)) / 1e6

    def base_image(self) -> str:
        proc = subprocess.run(
            [self.binderbox_cli, "base"],
            capture_output=True,
            text=True,
            env=self.env,
            stdin=subprocess.DEVNULL,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
        if proc.returncode != 0 or not proc.stdout.strip():
            raise BenchError(f"binderbox base failed: {proc.stderr.strip()[-2000:]}")
        return proc.stdout.strip().splitlines()[-1]

    def binderbox_build(self, repo: Path) -> Run:
        """Time ``binderbox build --json-logs REPO``; return the run and its image."""
        started = time.monotonic()
        proc = subprocess.run(
            [self.binderbox_cli, "build", "--json-logs", str(repo)],
            capture_output=True,
            text=True,
            env=self.env,
            stdin=subprocess.DEVNULL,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
        seconds = time.monotonic() - started
        events = []
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        built = [e["image"] for e in events if e.get("phase") == "built" and e.get("image")]
        if built:
            self.built.append(built[-1])
        if proc.returncode != 0 or not built:
            failed = [e for e in events if e.get("phase") == "failed"]
            detail = failed[-1] if failed else {"stderr": proc.stderr[-2000:]}
            raise BenchError(f"binderbox build {repo} failed: {json.dumps(detail, indent=1)}")
        if any("already exists; reusing it" in e.get("message", "") for e in events):
            raise BenchError(f"binderbox reused {built[-1]} instead of building it")
        log = [e.get("message", "") for e in events if e.get("phase") == "building"]
        steps, cached = buildkit_steps(log)
        uv_lines = [m[0] for line in log if (m := _UV_SUMMARY.search(line))]
        return Run(seconds, built[-1], self.size_mb(built[-1]), steps, cached, uv_lines)

    def baseline_build(self, repo: Path, base: str, work: Path) -> Run:
        """Time ``docker build --no-cache`` of the hand-written Dockerfile for ``repo``."""
        dockerfile = work / "Dockerfile.baseline"
        dockerfile.write_text(
            BASELINE_DOCKERFILE.format(base=base, server_stack=" ".join(stack.SERVER_STACK))
        )
        image = f"binderbox-bench-baseline:{uuid.uuid4().hex[:12]}"
        self.built.append(image)
        command = [
            self.docker_cli,
            "build",
            "--no-cache",
            "--progress=plain",
            "--secret",
            f"id=ca,src={HOST_CA_BUNDLE}",
            "-f",
            str(dockerfile),
            "-t",
            image,
            str(repo),
        ]
        started = time.monotonic()
        proc = subprocess.run(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
            stdin=subprocess.DEVNULL,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
        seconds = time.monotonic() - started
        if proc.returncode != 0:
            raise BenchError(f"baseline docker build failed:\n{proc.stdout[-3000:]}")
        steps, cached = buildkit_steps(proc.stdout.splitlines())
        return Run(seconds, image, self.size_mb(image), steps, cached)

    def freeze(self, image: str, import_check: str = IMPORT_CHECK) -> dict[str, str]:
        """The packages in the image's /srv/venv, after checking that ``import_check`` runs."""
        out = self.docker(
            "run",
            "--rm",
            "--network=none",
            "--entrypoint=/bin/sh",
            image,
            "-c",
            f'/srv/venv/bin/python -c "{import_check}" && '
            "/srv/venv/bin/python -m pip list --format=freeze --disable-pip-version-check",
        )
        pairs = (line.split("==", 1) for line in out.splitlines() if "==" in line)
        return {name.lower().replace("_", "-"): version for name, version in pairs}


def buildkit_steps(lines: list[str]) -> tuple[list[tuple[str, float]], int]:
    """Step durations from BuildKit's plain log (slowest first) and the cached-step count."""
    names: dict[str, str] = {}
    done: dict[str, float] = {}
    cached = 0
    for line in lines:
        if m := _STEP_DONE.match(line):
            done[m["id"]] = float(m["s"])
        elif _STEP_CACHED.match(line):
            cached += 1
        elif (m := _STEP_LINE.match(line)) and m["id"] not in names:
            names[m["id"]] = m["text"]
    steps = [(short_step(names.get(i, f"#{i}")), s) for i, s in done.items()]
    return sorted(steps, key=lambda item: -item[1]), cached


def short_step(text: str, limit: int = 64) -> str:
    text = re.sub(r"--mount=\S+\s*", "", text)
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------
# Fixture repositories


def notebook(title: str, code: list[str]) -> str:
    cells = [
        {"cell_type": "markdown", "metadata": {}, "source": [f"# {title}\n"]},
        {
            "cell_type": "code",
            "execution_count": None,
            "metadata": {},
            "outputs": [],
            "source": [line + "\n" for line in code],
        },
    ]
    document = {
        "cells": cells,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    return json.dumps(document, indent=1) + "\n"


def make_repo(folder: Path, notebook_name: str, title: str, code: list[str]) -> Path:
    folder.mkdir(parents=True)
    (folder / "requirements.txt").write_text("\n".join(REQUIREMENTS) + "\n")
    (folder / notebook_name).write_text(notebook(title, code))
    (folder / "README.md").write_text(f"# {title}\n\nA binderbox benchmark fixture.\n")
    return folder


ANALYSIS_CODE = [
    "import numpy as np, pandas as pd, seaborn as sns",
    "df = pd.DataFrame(np.random.default_rng(0).normal(size=(100, 3)), columns=list('xyz'))",
    "sns.pairplot(df)",
]
OTHER_CODE = [
    "from scipy import stats",
    "import matplotlib.pyplot as plt",
    "plt.hist(stats.norm.rvs(size=1000, random_state=1), bins=30)",
]


# ---------------------------------------------------------------------------------------
# Reporting


def machine_report(tools: Tools, base: str) -> list[str]:
    meminfo = Path("/proc/meminfo").read_text()
    mem_kb = int(re.search(r"MemTotal:\s+(\d+)", meminfo)[1])
    os_name = platform.platform()
    os_release = Path("/etc/os-release")
    if os_release.exists() and (m := re.search(r'PRETTY_NAME="([^"]+)"', os_release.read_text())):
        os_name = m[1]
    server = tools.docker("version", "--format", "{{.Server.Version}}", check=False)
    client = tools.docker("version", "--format", "{{.Client.Version}}", check=False)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"date:     {datetime.date.today().isoformat()}",
        f"machine:  {os_name}, kernel {platform.release()}",
        f"cpus:     {len(os.sched_getaffinity(0))} (nproc), memory {mem_kb / 1024**2:.1f} GiB",
        f"docker:   server {server}, client {client} ({tools.docker_cli}, BuildKit)",
        f"base:     {base}",
        f"load avg: {load} (other builds on this machine slow the measurements)",
    ]


def summary(runs: dict[str, list[Run]]) -> dict[str, dict[str, float]]:
    result = {}
    for key, items in runs.items():
        times = [r.seconds for r in items]
        result[key] = {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "max_s": max(times),
            "size_mb": statistics.median(r.size_mb for r in items),
        }
    return result


def median_run(items: list[Run]) -> Run:
    return sorted(items, key=lambda r: r.seconds)[(len(items) - 1) // 2]


def report(runs: dict[str, list[Run]], repeat: int) -> tuple[list[str], bool]:
    stats = summary(runs)
    lines = [
        "",
        f"Results: median of {repeat} run(s), wall clock seconds",
        "",
        f"{'case':<46} {'median s':>9} {'min s':>8} {'max s':>8} {'image MB':>9}",
        "-" * 84,
    ]
    for key, title in CASES.items():
        s = stats[key]
        lines.append(
            f"{title:<46} {s['median_s']:>9.1f} {s['min_s']:>8.1f} {s['max_s']:>8.1f}"
            f" {s['size_mb']:>9.0f}"
        )
    ratio = stats["d"]["median_s"] / stats["a"]["median_s"]
    lines += ["", f"ratio (d)/(a): {ratio:.2f}", "", "Targets:"]
    checks = [
        (
            f"(b) <= {WARM_TARGET_S:g} s",
            stats["b"]["median_s"] <= WARM_TARGET_S,
            f"{stats['b']['median_s']:.1f} s",
        ),
        (
            f"(c) <= {WARM_TARGET_S:g} s",
            stats["c"]["median_s"] <= WARM_TARGET_S,
            f"{stats['c']['median_s']:.1f} s",
        ),
        (f"(a) >= {SPEEDUP_TARGET:g}x faster than (d)", ratio >= SPEEDUP_TARGET, f"{ratio:.2f}x"),
    ]
    for name, ok, value in checks:
        lines.append(f"  {name:<34} {value:>9}  {'PASS' if ok else 'MISS'}")
    lines += ["", "Slowest BuildKit steps of the median run (step seconds; steps overlap):"]
    for key, title in CASES.items():
        run = median_run(runs[key])
        lines.append(f"  {title} — {run.seconds:.1f} s, {run.cached} step(s) cached")
        for name, seconds in run.steps[:4]:
            lines.append(f"    {seconds:>7.1f} s  {name}")
        if key == "a" and run.uv_lines:
            lines.append(f"    uv: {'; '.join(run.uv_lines)}")
    cold_cached = [key for key in ("a", "d") if any(r.cached for r in runs[key])]
    if cold_cached:
        lines += [
            "",
            f"Warning: cached steps in the cold case(s) {', '.join(cold_cached)}: another build "
            "on this machine refilled the cache after the prune, so those runs were not cold.",
        ]
    return lines, all(ok for _, ok, _ in checks)


def compare_packages(tools: Tools, binderbox_image: str, baseline_image: str) -> str:
    ours, theirs = tools.freeze(binderbox_image), tools.freeze(baseline_image)
    differ = sorted(
        f"{name} {ours.get(name, '-')}/{theirs.get(name, '-')}"
        for name in ours.keys() | theirs.keys()
        if ours.get(name) != theirs.get(name)
    )
    text = f"stack imports in both images; {len(ours)} vs {len(theirs)} packages"
    return text + (f"; differing (binderbox/baseline): {', '.join(differ)}" if differ else "")


# ---------------------------------------------------------------------------------------


def benchmark(tools: Tools, repeat: int, work: Path) -> dict[str, list[Run]]:
    base = tools.base_image()
    for line in machine_report(tools, base):
        print(line, flush=True)
    print(f"stack:    {', '.join(REQUIREMENTS)} (pinned)", flush=True)
    print(f"server:   {', '.join(stack.SERVER_STACK)}", flush=True)
    print("", flush=True)

    runs: dict[str, list[Run]] = {key: [] for key in CASES}

    def record(key: str, run: Run, rep: int) -> None:
        runs[key].append(run)
        print(f"[{rep + 1}/{repeat}] {CASES[key]:<46} {run.seconds:7.1f} s", flush=True)

    for rep in range(repeat):
        rep_dir = work / f"rep{rep}"
        repo = make_repo(rep_dir / "analysis", "analysis.ipynb", "Analysis", ANALYSIS_CODE)

        # (a) cold: no image of ours, no build cache, no uv cache.
        tools.remove_images()
        tools.prune()
        cold = tools.binderbox_build(repo)
        record("a", cold, rep)

        # (b) edit only the notebook: a new content hash, so a new image is built.
        code = [*ANALYSIS_CODE, f"df.describe()  # edited in repetition {rep + 1}"]
        (repo / "analysis.ipynb").write_text(notebook("Analysis, edited", code))
        edited = tools.binderbox_build(repo)
        if edited.image == cold.image:
            raise BenchError("editing the notebook did not give a new image name")
        record("b", edited, rep)

        # (c) a different repository with the same requirements.txt.
        other = make_repo(rep_dir / "other-study", "exploration.ipynb", "Another study", OTHER_CODE)
        record("c", tools.binderbox_build(other), rep)

        # (d) the hand-written Dockerfile, after the same prune.
        tools.prune()
        baseline = tools.baseline_build(repo, base, rep_dir)
        record("d", baseline, rep)

        if rep == 0:
            print("check:    " + compare_packages(tools, cold.image, baseline.image), flush=True)
    return runs


def run_cli(
    description: str,
    benchmark_fn: Callable[[Tools, int, Path], dict[str, list[Run]]],
    finish: Callable[[dict[str, list[Run]], int, str | None], int],
    tmp_prefix: str,
) -> int:
    """The command line every build benchmark shares: options, a scratch folder, clean-up
    of the images built (also on Ctrl-C and SIGTERM), then ``finish(runs, repeat, json)``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--quick", action="store_true", help="one repetition (smoke run)")
    parser.add_argument("--docker", default="/usr/bin/docker", help="docker CLI (BuildKit)")
    parser.add_argument(
        "--binderbox",
        default=str(Path(sys.executable).with_name("binderbox")),
        help="binderbox command (default: beside this Python)",
    )
    parser.add_argument("--json", dest="json_out", help="also write the results to this file")
    args = parser.parse_args()
    repeat = 1 if args.quick else args.repeat
    if repeat < 1:
        parser.error("--repeat must be at least 1")
    binderbox_cli = args.binderbox
    if not Path(binderbox_cli).exists():
        binderbox_cli = shutil.which("binderbox") or str(REPO_ROOT / ".venv/bin/binderbox")
    if not HOST_CA_BUNDLE.is_file():
        print(f"error: {HOST_CA_BUNDLE} is missing; pip in the baseline builds needs it")
        return 2

    # SIGTERM runs the clean-up below, like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tools = Tools(args.docker, binderbox_cli)
    with tempfile.TemporaryDirectory(prefix=tmp_prefix) as tmp:
        try:
            runs = benchmark_fn(tools, repeat, Path(tmp))
        except (BenchError, subprocess.TimeoutExpired) as error:
            print(f"\nerror: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("\ninterrupted; removing the images built so far", file=sys.stderr)
            return 130
        finally:
            tools.remove_images()
    return finish(runs, repeat, args.json_out)


def finish(runs: dict[str, list[Run]], repeat: int, json_out: str | None) -> int:
    lines, all_met = report(runs, repeat)
    print("\n".join(lines))
    if json_out:
        data = {
            "date": datetime.date.today().isoformat(),
            "repeat": repeat,
            "requirements": list(REQUIREMENTS),
            "summary": summary(runs),
            "runs": {k: [r.__dict__ for r in v] for k, v in runs.items()},
        }
        Path(json_out).write_text(json.dumps(data, indent=1) + "\n")
    return 0 if all_met else 1


def main() -> int:
    return run_cli(__doc__.split("\n\n")[0], benchmark, finish, "binderbox-bench-")


if __name__ == "__main__":
    sys.exit(main())
