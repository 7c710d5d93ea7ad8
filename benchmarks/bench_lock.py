"""What the lock of a build costs: the same builds with and without it.

A small repository (requirements.txt with two pure-Python packages, apt.txt with one
Debian package, a notebook) is built once to fill the caches, then ``--repeat`` times
(default 5) after editing its notebook, alternately with the lock (binderbox as it is)
and without it (the recording step left out of the Dockerfile and the lock not read: the
builder as it was before locks). An edit re-runs every step after the repository's copy,
the recording step included, which is what a new commit of a repository costs.

Reported: the median wall time of ``build_repository`` in both cases and their
difference; the recording step's own time as BuildKit states it; the time to read the
lock out of the image (a container created and removed, never started); the lock's
size. Images the script built are removed at the end; the build cache is left as the
builds filled it (nothing is pruned).

Run from the repository root:  .venv/bin/python benchmarks/bench_lock.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "src"))

from binderbox.builder import pipeline  # noqa: E402  (after the path set-up above)
from binderbox.builder.engine import DockerEngine  # noqa: E402
from binderbox.builder.render import ImageOptions  # noqa: E402
from binderbox.config import load_settings  # noqa: E402
from binderbox.events import Event  # noqa: E402
from binderbox.providers import LocalSource  # noqa: E402

FILES = {"requirements.txt": "six\ntoolz\n", "apt.txt": "tree\n"}
_STEP = re.compile(r"^#(\d+) \[[^\]]*\] RUN .*collect-environment\.py")
_DONE = re.compile(r"^#(\d+) DONE (\d+\.\d+)s")


def build_once(folder: Path, settings, with_lock: bool) -> tuple[float, float | None, str]:
    """One build: (seconds, the recording step's seconds or None, image)."""
    lines: list[str] = []

    def emit(event: Event) -> None:
        if event.log:
            lines.append(event.message)

    original_options, original_record = pipeline.ImageOptions, pipeline.record_lock
    if not with_lock:
        pipeline.ImageOptions = lambda **kw: replace(ImageOptions(**kw), record_environment=False)
        pipeline.record_lock = lambda *args, **kw: None
    try:
        started = time.monotonic()
        result = pipeline.build_repository(
            pipeline.BuildRequest(source=LocalSource(folder)), settings, emit
        )
        seconds = time.monotonic() - started
    finally:
        pipeline.ImageOptions, pipeline.record_lock = original_options, original_record
    vertex = next((m[1] for line in lines if (m := _STEP.match(line))), None)
    step = next(
        (float(m[2]) for line in lines if (m := _DONE.match(line)) and m[1] == vertex), None
    )
    return seconds, step, result.image


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args()

    settings = load_settings().with_overrides(image_prefix=f"bench-lock-{uuid.uuid4().hex[:6]}-")
    engine = DockerEngine.connect(settings.docker_cli)
    images: set[str] = set()
    timings: dict[bool, list[float]] = {True: [], False: []}
    steps: list[float] = []
    reads: list[float] = []
    size = 0
    with tempfile.TemporaryDirectory(prefix="bench-lock-") as tmp:
        folder = Path(tmp) / "repo"
        folder.mkdir()
        for name, text in FILES.items():
            (folder / name).write_text(text)
        try:
            for i in range(-1, 2 * args.repeat):
                # The first build fills the caches and is not counted.
                (folder / "analysis.ipynb").write_text(json.dumps({"cells": [], "run": i}))
                with_lock = i % 2 == 0
                seconds, step, image = build_once(folder, settings, with_lock)
                images.add(image)
                if i < 0:
                    continue
                timings[with_lock].append(seconds)
                if with_lock:
                    if step is not None:
                        steps.append(step)
                    started = time.monotonic()
                    lock = pipeline.image_lock(engine, image)
                    reads.append(time.monotonic() - started)
                    size = len(lock.text())
        finally:
            for image in images:
                engine.remove_image(image)

    with_lock, without = statistics.median(timings[True]), statistics.median(timings[False])
    results = {
        "repeat": args.repeat,
        "build_with_lock_s": round(with_lock, 2),
        "build_without_lock_s": round(without, 2),
        "difference_s": round(with_lock - without, 2),
        "recording_step_s": round(statistics.median(steps), 2) if steps else None,
        "reading_the_lock_s": round(statistics.median(reads), 3),
        "lock_bytes": size,
        "all_with_lock_s": [round(s, 2) for s in timings[True]],
        "all_without_lock_s": [round(s, 2) for s in timings[False]],
    }
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
