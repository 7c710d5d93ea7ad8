"""Bar charts as inline SVG, drawn on the server: no script, no library.

Horizontal positions are percentages of the chart's width and vertical ones pixels, and
the SVG has no viewBox: the bars stretch to any width while the text keeps the page's
size, so a chart stays readable on a phone. Colours come from the page's stylesheet
(``.chart`` in binderbox.css). A chart is one image to assistive technology, named by its
``<title>`` and described by its ``<desc>``; every bar also has a ``<title>`` (a tooltip)
and the page shows the same numbers in a table.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

HEIGHT = 200  # px: the whole chart
TOP = 14  # px above the plot, for the highest grid line's label
BOTTOM = 22  # px below it, for the day labels
GAP = 0.18  # of each bar's slot left empty
TIME_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400)


@dataclass(frozen=True)
class Bar:
    label: str  # under the bar, when there is room ("3 Nov")
    title: str  # the bar's tooltip: its values in words
    parts: Sequence[float] = ()  # stacked from the bottom, one per series
    marker: float | None = None  # a tick above the bar (e.g. a 95th percentile)


def nice_step(top: float, lines: int = 4, steps: Sequence[float] | None = None) -> float:
    """A round grid step so that about ``lines`` lines cover ``top``: 1, 2 or 5 times a
    power of ten, or the next of ``steps``."""
    if top <= 0:
        return 1.0
    rough = top / lines
    if steps:
        return next((float(s) for s in steps if s >= rough), float(steps[-1]))
    power = 10 ** math.floor(math.log10(rough))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= rough)


def _pct(value: float) -> str:
    return f"{value:.3f}%"


def bar_chart(
    chart_id: str,
    *,
    title: str,
    desc: str,
    bars: Sequence[Bar],
    classes: Sequence[str],
    marker_class: str = "marker",
    tick: Callable[[float], str] = lambda v: f"{v:g}",
    steps: Sequence[float] | None = None,
) -> str:
    """One bar per entry of ``bars``, its ``parts`` stacked in the CSS ``classes`` given
    (one per part), with grid lines labelled by ``tick``."""
    esc = html.escape
    plot = HEIGHT - TOP - BOTTOM
    top = max([sum(b.parts) for b in bars] + [b.marker or 0 for b in bars] + [0])
    step = nice_step(top, steps=steps)
    scale_top = max(step, math.ceil(top / step) * step)

    def y(value: float) -> float:
        return TOP + plot * (1 - value / scale_top)

    out = [
        f'<svg class="chart" id="{esc(chart_id)}" width="100%" height="{HEIGHT}" role="img"'
        f' aria-labelledby="{esc(chart_id)}-title {esc(chart_id)}-desc"'
        ' xmlns="http://www.w3.org/2000/svg">',
        f'<title id="{esc(chart_id)}-title">{esc(title)}</title>',
        f'<desc id="{esc(chart_id)}-desc">{esc(desc)}</desc>',
    ]
    lines = round(scale_top / step)
    for i in range(lines + 1):
        value = i * step
        out.append(f'<line class="grid" x1="0" x2="100%" y1="{y(value):.1f}" y2="{y(value):.1f}"/>')
    count = max(len(bars), 1)
    slot = 100 / count
    width = slot * (1 - GAP) if count > 1 else slot * 0.5
    labelled = _labelled(len(bars))
    for i, bar in enumerate(bars):
        left = i * slot + (slot - width) / 2
        out.append(f'<g class="bar"><title>{esc(bar.title)}</title>')
        # The whole slot answers the pointer, so a short bar's tooltip is easy to find.
        out.append(
            f'<rect class="hit" x="{_pct(i * slot)}" width="{_pct(slot)}" y="{TOP}"'
            f' height="{plot}"/>'
        )
        base = 0.0
        for part, css in zip(bar.parts, classes, strict=False):
            if part > 0:
                y0, y1 = y(base), y(base + part)
                out.append(
                    f'<rect class="{esc(css)}" x="{_pct(left)}" width="{_pct(width)}"'
                    f' y="{y1:.1f}" height="{max(y0 - y1, 1):.1f}"/>'
                )
            base += part
        if bar.marker is not None:
            middle = left + width / 2
            ym = y(bar.marker)
            out.append(
                f'<line class="{esc(marker_class)}" x1="{_pct(middle)}" x2="{_pct(middle)}"'
                f' y1="{y(base):.1f}" y2="{ym:.1f}"/>'
                f'<line class="{esc(marker_class)}" x1="{_pct(left)}" x2="{_pct(left + width)}"'
                f' y1="{ym:.1f}" y2="{ym:.1f}"/>'
            )
        out.append("</g>")
        if i in labelled:
            # The first and last labels sit inside the chart, the others under their bar.
            anchor, x = "middle", left + width / 2
            if count > 1 and i == 0:
                anchor, x = "start", 0.0
            elif count > 1 and i == count - 1:
                anchor, x = "end", 100.0
            out.append(
                f'<text class="day" x="{_pct(x)}" y="{HEIGHT - 6}" text-anchor="{anchor}">'
                f"{esc(bar.label)}</text>"
            )
    # The grid's labels last, over the bars (each with a halo of the card's colour).
    for i in range(1, lines + 1):
        value = i * step
        out.append(f'<text class="tick" x="2" y="{y(value) - 3:.1f}">{esc(tick(value))}</text>')
    out.append("</svg>")
    return "".join(out)


def _labelled(count: int) -> set[int]:
    """Which bars get a label underneath: all of a week, else five spread evenly (the
    first and the last among them), which fit a phone's width."""
    if count <= 8:
        return set(range(count))
    return {round(i * (count - 1) / 4) for i in range(5)}
