"""Benchmark binderbox builds of an environment.yml repository beside the same packages
listed in a requirements.txt.

The environment.yml asks for numpy, pandas, matplotlib, bokeh and dask (conda-forge's
dask, which binderbox installs as PyPI's ``dask[complete]``); the requirements.txt
repository lists exactly the requirement lines binderbox derives from it, so the two
differ only in the file binderbox reads. Measured, as the median of ``--repeat``
repetitions (default 3; ``--quick`` is one):

(e) cold ``binderbox build`` of the environment.yml repository: the built images
    removed and ``docker builder prune -af`` run first (BuildKit's layer cache and its
    cache mounts, uv's wheel cache among them, are emptied; the base image is kept);
(f) ``binderbox build`` of the same repository after editing only its notebook;
(g) and (h): the same two builds for the requirements.txt repository.

Times are the wall clock around the ``binderbox build`` command. Images and temporary
folders the script made are removed at the end, also on failure.

Run from the repository root:  .venv/bin/python benchmarks/bench_environment_yml.py [--quick]

Exit status: 0 when every build succeeded, 2 on an error.
Note: ``docker builder prune -af`` empties the build cache of the whole daemon, so other
builds on the machine lose their cache too (and slow the measurements while they run).
"""

from __future__ import annotations

import datetime
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# After the path set-up above; bench_build also puts src/ on the path.
from bench_build import (
    BenchError,
    Run,
    Tools,
    machine_report,
    median_run,
    notebook,
    run_cli,
)

from binderbox.builder import conda

# Pinned to releases with wheels for Python 3.11 (the bookworm base) as of 2026-11-25;
# numpy, pandas and matplotlib as in bench_build.py.
ENVIRONMENT_YML = """\
name: bench
channels:
  - conda-forge
dependencies:
  - python=3.11
  - numpy=2.4.6
  - pandas=3.1.1
  - matplotlib=3.11.2
  - bokeh=3.9.2
  - dask=2026.8.0
"""
IMPORT_CHECK = "import numpy, pandas, matplotlib, bokeh, dask.dataframe, distributed"
CODE = [
    "import dask.dataframe as dd, pandas as pd",
    "df = dd.from_pandas(pd.DataFrame({'x': range(1000)}), npartitions=4)",
    "df.x.sum().compute()",
]

CASES = {
    "e": "(e) environment.yml, cold, empty caches",
    "f": "(f) environment.yml, rebuild after notebook edit",
    "g": "(g) requirements.txt, cold, empty caches",
    "h": "(h) requirements.txt, rebuild after notebook edit",
}


def derived_requirements() -> str:
    """The requirement lines binderbox installs for ENVIRONMENT_YML."""
    return conda.translate(ENVIRONMENT_YML, "environment.yml").requirements


def make_repo(folder: Path, config_name: str, config_text: str) -> Path:
    folder.mkdir(parents=True)
    (folder / config_name).write_text(config_text)
    (folder / "analysis.ipynb").write_text(notebook("Dask analysis", CODE))
    (folder / "README.md").write_text("# Dask analysis\n\nA binderbox benchmark fixture.\n")
    return folder


def edit_notebook(repo: Path, rep: int) -> None:
    code = [*CODE, f"df.x.mean().compute()  # edited in repetition {rep + 1}"]
    (repo / "analysis.ipynb").write_text(notebook("Dask analysis, edited", code))


def benchmark(tools: Tools, repeat: int, work: Path) -> dict[str, list[Run]]:
    base = tools.base_image()
    for line in machine_report(tools, base):
        print(line, flush=True)
    lines = derived_requirements().split()
    print(f"packages: {', '.join(lines)} (derived from environment.yml)", flush=True)
    print("", flush=True)

    runs: dict[str, list[Run]] = {key: [] for key in CASES}

    def record(key: str, run: Run, rep: int) -> None:
        runs[key].append(run)
        print(f"[{rep + 1}/{repeat}] {CASES[key]:<50} {run.seconds:7.1f} s", flush=True)

    for rep in range(repeat):
        rep_dir = work / f"rep{rep}"
        repos = {
            "e": make_repo(rep_dir / "conda-style", "environment.yml", ENVIRONMENT_YML),
            "g": make_repo(rep_dir / "pip-style", "requirements.txt", derived_requirements()),
        }
        packages = {}
        for cold, warm in (("e", "f"), ("g", "h")):
            # Cold: no image of ours, no build cache, no uv cache.
            tools.remove_images()
            tools.prune()
            first = tools.binderbox_build(repos[cold])
            record(cold, first, rep)
            edit_notebook(repos[cold], rep)
            edited = tools.binderbox_build(repos[cold])
            if edited.image == first.image:
                raise BenchError("editing the notebook did not give a new image name")
            record(warm, edited, rep)
            if rep == 0:
                packages[cold] = tools.freeze(first.image, IMPORT_CHECK)
        if rep == 0:
            same = packages["e"] == packages["g"]
            print(
                f"check:    the stack imports in both images; {len(packages['e'])} packages, "
                + ("the same in both" if same else f"DIFFERENT: {packages}"),
                flush=True,
            )
    return runs


def report(runs: dict[str, list[Run]], repeat: int) -> list[str]:
    lines = [
        "",
        f"Results: median of {repeat} run(s), wall clock seconds",
        "",
        f"{'case':<50} {'median s':>9} {'min s':>8} {'max s':>8} {'image MB':>9}",
        "-" * 88,
    ]
    medians = {}
    for key, title in CASES.items():
        times = [r.seconds for r in runs[key]]
        medians[key] = statistics.median(times)
        size = statistics.median(r.size_mb for r in runs[key])
        lines.append(
            f"{title:<50} {medians[key]:>9.1f} {min(times):>8.1f} {max(times):>8.1f} {size:>9.0f}"
        )
    lines += ["", f"cold ratio (e)/(g): {medians['e'] / medians['g']:.2f}", ""]
    lines.append("Slowest BuildKit steps of the median run (step seconds; steps overlap):")
    for key, title in CASES.items():
        run = median_run(runs[key])
        lines.append(f"  {title} — {run.seconds:.1f} s, {run.cached} step(s) cached")
        for name, seconds in run.steps[:4]:
            lines.append(f"    {seconds:>7.1f} s  {name}")
        if key in ("e", "g") and run.uv_lines:
            lines.append(f"    uv: {'; '.join(run.uv_lines)}")
    cold_cached = [key for key in ("e", "g") if any(r.cached for r in runs[key])]
    if cold_cached:
        lines += [
            "",
            f"Warning: cached steps in the cold case(s) {', '.join(cold_cached)}: another build "
            "on this machine refilled the cache after the prune, so those runs were not cold.",
        ]
    return lines


def finish(runs: dict[str, list[Run]], repeat: int, json_out: str | None) -> int:
    print("\n".join(report(runs, repeat)))
    if json_out:
        data = {
            "date": datetime.date.today().isoformat(),
            "repeat": repeat,
            "environment_yml": ENVIRONMENT_YML,
            "requirements": derived_requirements().splitlines(),
            "runs": {k: [r.__dict__ for r in v] for k, v in runs.items()},
        }
        Path(json_out).write_text(json.dumps(data, indent=1) + "\n")
    return 0


def main() -> int:
    return run_cli(__doc__.split("\n\n")[0], benchmark, finish, "binderbox-bench-env-")


if __name__ == "__main__":
    sys.exit(main())
