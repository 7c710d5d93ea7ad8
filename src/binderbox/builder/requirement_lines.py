"""What a pip requirement line says about the repository it comes from (pure)."""

from __future__ import annotations

import re

# Requirement lines that name files in the repository.
_LOCAL_REQUIREMENT = re.compile(
    r"^(-e|--editable|-r|--requirement|-c|--constraint)(\s|=|$)|^(\.|/|~|file:)|@\s*file:"
)
# --find-links with a folder rather than a URL also needs the repository's files.
_LOCAL_FIND_LINKS = re.compile(r"^(-f|--find-links)(\s+|=)(?![A-Za-z][A-Za-z0-9+.-]*://)")


def refers_to_repository(line: str) -> bool:
    """True when a requirement line (comment stripped) needs the repository's files."""
    return bool(_LOCAL_REQUIREMENT.search(line) or _LOCAL_FIND_LINKS.search(line))
