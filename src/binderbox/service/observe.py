"""What operators watch: Prometheus metrics and the launch-events archive.

Launch events are one JSON object per line in the shape of the public mybinder.org events
archive, with the timestamp rounded down to the minute and no IP addresses.
"""

from __future__ import annotations

import datetime
import json
import threading
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# What the mybinder.org archive calls each provider.
PROVIDER_NAMES = {"gh": "GitHub", "gl": "GitLab", "gist": "Gist", "git": "Git"}

_BUILD_BUCKETS = (5, 10, 30, 60, 120, 300, 600, 1200, 3600, float("inf"))
_LAUNCH_BUCKETS = (0.5, 1, 2, 3, 5, 10, 20, 60, 120, float("inf"))


class Metrics:
    """The service's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.builds = Counter(
            "binderbox_builds", "Builds finished, by status.", ["status"], registry=self.registry
        )
        self.build_seconds = Histogram(
            "binderbox_build_duration_seconds",
            "Time from a build's start to its end.",
            ["status"],
            buckets=_BUILD_BUCKETS,
            registry=self.registry,
        )
        self.launches = Counter(
            "binderbox_launches",
            "Launch requests finished, by status.",
            ["status"],
            registry=self.registry,
        )
        self.launch_seconds = Histogram(
            "binderbox_launch_duration_seconds",
            "Time from a /build request to its ready or failed event.",
            ["status"],
            buckets=_LAUNCH_BUCKETS,
            registry=self.registry,
        )
        self.launches_in_progress = Gauge(
            "binderbox_launches_in_progress",
            "/build requests being answered now.",
            registry=self.registry,
        )
        self.builds_running = Gauge(
            "binderbox_builds_running", "Builds running now.", registry=self.registry
        )
        self.build_queue = Gauge(
            "binderbox_build_queue_length", "Builds waiting for a slot.", registry=self.registry
        )


class LaunchEventLog:
    """Appends one line per successful launch; safe to call from several threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def record(self, provider: str, spec: str, ref: str, origin: str) -> dict[str, object]:
        now = datetime.datetime.now(datetime.UTC).replace(second=0, microsecond=0)
        event = {
            "timestamp": now.strftime("%Y-%m-%dT%H:%M:%S"),
            "schema": "binderhub.jupyter.org/launch",
            "version": 3,
            "provider": PROVIDER_NAMES.get(provider, provider),
            "spec": spec,
            "ref": ref,
            "status": "success",
            "origin": origin,
        }
        line = json.dumps(event) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(line)
        return event


BADGE = """<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="20" role="img"
 aria-label="launch: binder"><title>launch: binder</title>
<linearGradient id="s" x2="0" y2="100%"><stop offset="0" stop-color="#fff" stop-opacity=".1"/>
<stop offset="1" stop-opacity=".1"/></linearGradient>
<clipPath id="r"><rect width="{width}" height="20" rx="3" fill="#fff"/></clipPath>
<g clip-path="url(#r)"><rect width="{left}" height="20" fill="#555"/>
<rect x="{left}" width="54" height="20" fill="#e66581"/>
<rect width="{width}" height="20" fill="url(#s)"/></g>
{logo}<g fill="#fff" text-anchor="middle" font-family="Verdana,DejaVu Sans,sans-serif"
 font-size="11"><text x="{text_x}" y="14">launch</text>
<text x="{binder_x}" y="14">binder</text></g></svg>
"""

# A small mark of our own: a box with a spark, drawn in the badge's left part.
LOGO = (
    '<g transform="translate(5 3)"><rect width="14" height="14" rx="3" fill="none" '
    'stroke="#f5a252" stroke-width="2"/><path d="M4 7h6M7 4v6" stroke="#579aca" '
    'stroke-width="2"/></g>'
)


def badge_svg(with_logo: bool) -> str:
    """The "launch | binder" badge that READMEs link to a launch."""
    left = 66 if with_logo else 48
    width = left + 54
    return BADGE.format(
        width=width,
        left=left,
        logo=LOGO if with_logo else "",
        text_x=(left + (20 if with_logo else 0)) / 2 + (2 if with_logo else 0),
        binder_x=left + 27,
    )
