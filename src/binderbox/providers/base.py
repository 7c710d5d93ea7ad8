"""The interface every repository source implements."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class Fetched:
    """A repository checked out into a folder, with what identifies its content."""

    path: Path
    # The commit, or for a plain folder a hash of its content.
    commit: str


class Source(Protocol):
    """A place a repository comes from."""

    # Human-readable identity of the repository (URL or folder), for labels and messages.
    repo_url: str
    ref: str

    def slug(self) -> str:
        """A stable name for the repository, used in image names."""
        ...

    def resolve(self) -> str:
        """The commit (or content id) the ref points to, fetching as little as possible.

        Returns "" when the commit can only be known after fetching.
        """
        ...

    def fetch(self, dest: Path) -> Fetched:
        """Place the repository's files in ``dest`` (which must not exist yet)."""
        ...
