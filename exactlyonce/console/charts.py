"""Small SVG charts, drawn on the server: rates over time, lag over time, lag per partition.

Each function returns :class:`markupsafe.Markup` that is inserted into a
page as is, so every piece of text in it (labels, titles) goes through
:func:`markupsafe.escape` here. Colours come from CSS classes (``series-0``,
``series-applied``...) in the console's stylesheet: no inline style, which
the Content-Security-Policy would refuse.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from markupsafe import Markup, escape

WIDTH = 520
HEIGHT = 150
# Room for the axis labels.
LEFT, RIGHT, TOP, BOTTOM = 46, 8, 10, 22


@dataclass(frozen=True)
class Series:
    """One line of a chart."""

    name: str
    #: A CSS class giving its colour.
    css: str
    points: Sequence[tuple[datetime, float]]


def _number(value: float) -> str:
    if value >= 100 or value == int(value):
        return f"{value:,.0f}"
    return f"{value:.2g}" if value < 1 else f"{value:.1f}"


def _nice_max(value: float) -> float:
    """A round upper bound for the y axis."""
    if value <= 0:
        return 1.0
    magnitude = 10 ** (len(str(int(value))) - 1) if value >= 1 else 1
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * magnitude:
            return float(step * magnitude)
    return float(10 * magnitude)


def line_chart(
    series: Sequence[Series], *, start: datetime, end: datetime, title: str, unit: str,
    width: int = WIDTH, height: int = HEIGHT,
) -> Markup:
    """Lines over time from ``start`` to ``end``, with a legend; "no data yet" when there is none."""
    plot_w, plot_h = width - LEFT - RIGHT, height - TOP - BOTTOM
    span = max((end - start).total_seconds(), 1.0)
    top = _nice_max(max((v for s in series for _, v in s.points), default=0.0))

    def x(at: datetime) -> float:
        return LEFT + plot_w * min(max((at - start).total_seconds() / span, 0.0), 1.0)

    def y(value: float) -> float:
        return TOP + plot_h * (1 - min(max(value / top, 0.0), 1.0))

    parts = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height + 18}" '
        f'width="{width}" height="{height + 18}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<rect class="plot" x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}"/>',
        f'<line class="grid" x1="{LEFT}" y1="{y(top / 2):.1f}" x2="{LEFT + plot_w}" y2="{y(top / 2):.1f}"/>',
        f'<text class="axis" x="{LEFT - 4}" y="{TOP + 4}" text-anchor="end">{escape(_number(top))}</text>',
        f'<text class="axis" x="{LEFT - 4}" y="{y(top / 2) + 4:.1f}" text-anchor="end">'
        f"{escape(_number(top / 2))}</text>",
        f'<text class="axis" x="{LEFT - 4}" y="{TOP + plot_h + 4}" text-anchor="end">0</text>',
        f'<text class="axis" x="{LEFT}" y="{height - 6}">{escape(f"{start:%H:%M}")}</text>',
        f'<text class="axis" x="{LEFT + plot_w}" y="{height - 6}" text-anchor="end">'
        f'{escape(f"{end:%H:%M} UTC")}</text>',
        f'<text class="axis" x="{LEFT + plot_w / 2:.0f}" y="{height - 6}" text-anchor="middle">'
        f"{escape(unit)}</text>",
    ]
    drawn = False
    for s in series:
        points = [(x(at), y(value)) for at, value in s.points if start <= at <= end]
        if not points:
            continue
        drawn = True
        if len(points) == 1:
            px, py = points[0]
            parts.append(f'<circle class="line {escape(s.css)}" cx="{px:.1f}" cy="{py:.1f}" r="2.5">'
                         f"<title>{escape(s.name)}</title></circle>")
            continue
        coords = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
        parts.append(f'<polyline class="line {escape(s.css)}" points="{coords}">'
                     f"<title>{escape(s.name)}</title></polyline>")
    if not drawn:
        parts.append(f'<text class="empty" x="{LEFT + plot_w / 2:.0f}" y="{TOP + plot_h / 2:.0f}" '
                     'text-anchor="middle">no samples yet</text>')
    legend_x = LEFT
    for s in series:
        parts.append(f'<rect class="swatch {escape(s.css)}" x="{legend_x}" y="{height + 6}" width="10" height="10"/>')
        label = s.name if len(s.name) <= 28 else s.name[:27] + "…"
        parts.append(f'<text class="legend" x="{legend_x + 14}" y="{height + 15}">{escape(label)}</text>')
        legend_x += 24 + 7 * len(label)
    parts.append("</svg>")
    return Markup("".join(parts))


def bar_chart(bars: Sequence[tuple[str, int | None, bool]], *, title: str, width: int = WIDTH) -> Markup:
    """Horizontal bars (label, value, highlighted); a ``None`` value is drawn as "unknown"."""
    row = 18
    height = TOP + row * max(len(bars), 1) + 6
    label_w = 150
    plot_w = width - label_w - 60
    top = _nice_max(max((v for _, v, _ in bars if v is not None), default=0))
    parts = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
    ]
    for i, (label, value, highlight) in enumerate(bars):
        y = TOP + i * row
        short = label if len(label) <= 22 else "…" + label[-21:]
        parts.append(f'<text class="axis" x="{label_w - 6}" y="{y + 12}" text-anchor="end">{escape(short)}'
                     f"<title>{escape(label)}</title></text>")
        if value is None:
            parts.append(f'<text class="empty" x="{label_w}" y="{y + 12}">unknown</text>')
            continue
        w = plot_w * value / top if top else 0
        css = "bar problem" if highlight else "bar"
        parts.append(f'<rect class="{css}" x="{label_w}" y="{y + 2}" width="{max(w, 1):.1f}" height="{row - 5}"/>')
        parts.append(f'<text class="axis" x="{label_w + max(w, 1) + 4:.1f}" y="{y + 12}">'
                     f"{escape(_number(value))}</text>")
    parts.append("</svg>")
    return Markup("".join(parts))
