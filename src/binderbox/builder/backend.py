"""The Builder seam: a build request becomes events and, at the end, a result.

``LocalBuilder`` builds with this machine's BuildKit (``build_repository``), the
embedded default; a builder that runs the build on a cluster node is one more class
with the same method. The service's build queue calls ``build`` on a thread of its own.
"""

from __future__ import annotations

from typing import Protocol

from binderbox.builder.pipeline import BuildRequest, BuildResult, build_repository
from binderbox.config import Settings
from binderbox.events import Emit


class Builder(Protocol):
    """Builds one image (blocking), reporting progress through ``emit``; raises a
    BinderboxError with one sentence (and the log tail) when the build fails."""

    def build(self, request: BuildRequest, settings: Settings, emit: Emit) -> BuildResult: ...


class LocalBuilder:
    """Builds on this machine's dockerd with BuildKit."""

    def build(self, request: BuildRequest, settings: Settings, emit: Emit) -> BuildResult:
        return build_repository(request, settings, emit)
