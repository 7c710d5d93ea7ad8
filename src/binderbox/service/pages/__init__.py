"""The service's web pages: HTML templates, one stylesheet and one script, no build step.

Templates are filled by ``render``: ``{{name}}`` inserts a value HTML-escaped,
``{{!name}}`` inserts it as it is (only for markup built here, never for user text).
Data the page script needs goes in a JSON ``<script>`` that no value can close.
"""

from __future__ import annotations

import html
import json
import re
from functools import cache
from pathlib import Path

HERE = Path(__file__).parent
STATIC = HERE / "static"
_FIELD = re.compile(r"\{\{(!?)(\w+)\}\}")


@cache
def template(name: str) -> str:
    return (HERE / name).read_text(encoding="utf-8")


def fill(text: str, values: dict[str, object]) -> str:
    def one(match: re.Match[str]) -> str:
        raw, key = match.groups()
        value = str(values[key])
        return value if raw else html.escape(value)

    return _FIELD.sub(one, text)


def json_script(data: object) -> str:
    """JSON for an inline ``<script>``: ``<``, ``>`` and ``&`` escaped so nothing ends it."""
    text = json.dumps(data)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render(
    template_name: str,
    *,
    title: str,
    description: str,
    page: str,
    data: object = None,
    version: str = "",
    **values: object,
) -> str:
    """A whole page: the ``layout.html`` frame around ``template_name``."""
    body = fill(template(template_name), values)
    return fill(
        template("layout.html"),
        {
            "title": title,
            "description": description,
            "page": page,
            "body": body,
            "data": json_script(data if data is not None else {}),
            "version": version,
        },
    )
