"""Progress events, the one vocabulary shared by the CLI and the service's event stream."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Phase = Literal["waiting", "fetching", "building", "built", "launching", "ready", "failed"]


@dataclass(frozen=True)
class Event:
    """One step of progress: a phase, a message for people, and optional fields."""

    phase: Phase
    message: str
    fields: dict[str, Any] = field(default_factory=dict)
    # True for raw build-log lines, as opposed to binderbox's own step messages.
    log: bool = False

    def as_json(self) -> dict[str, Any]:
        return {"phase": self.phase, "message": self.message, **self.fields}


Emit = Callable[[Event], None]
