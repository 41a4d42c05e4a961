"""A few hand-written SVG drawing pieces for report.html: axes, lines, bars, heat-map cells, legends.

Report figures are text, not rendered pixels: a chart costs about a millisecond (matplotlib took
0.2-1 s per figure, most of a report's render time) and stays sharp when printed. Coordinates are
pixels of the SVG's own canvas; a page scales the <img> to its width. Text widths are estimated
(0.6 em per character): margins are generous rather than measured.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

# matplotlib's tab10, so series colours look as they did in the PNG figures.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


def num(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


def text(x: float, y: float, s: str, size: float = 11, anchor: str = "middle", **attrs) -> str:
    """A text element; `rotate` (degrees) turns it about (x, y); other attrs are written as given."""
    rot = attrs.pop("rotate", None)
    extra = "".join(f' {k.replace("_", "-")}="{v}"' for k, v in attrs.items())
    if rot is not None:
        extra += f' transform="rotate({num(rot)} {num(x)} {num(y)})"'
    return f'<text x="{num(x)}" y="{num(y)}" font-size="{num(size)}" text-anchor="{anchor}"{extra}>{escape(str(s))}</text>'


def rect(x: float, y: float, w: float, h: float, fill: str, **attrs) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{v}"' for k, v in attrs.items())
    return f'<rect x="{num(x)}" y="{num(y)}" width="{num(w)}" height="{num(h)}" fill="{fill}"{extra}/>'


def line(x1: float, y1: float, x2: float, y2: float, stroke: str = "#000", width: float = 1, **attrs) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{v}"' for k, v in attrs.items())
    return (f'<line x1="{num(x1)}" y1="{num(y1)}" x2="{num(x2)}" y2="{num(y2)}" stroke="{stroke}" '
            f'stroke-width="{num(width)}"{extra}/>')


def polyline(points: Sequence[tuple[float, float]], stroke: str, width: float = 1.6, **attrs) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{v}"' for k, v in attrs.items())
    pts = " ".join(f"{num(x)},{num(y)}" for x, y in points)
    return f'<polyline points="{pts}" fill="none" stroke="{stroke}" stroke-width="{num(width)}"{extra}/>'


def viridis(t: float) -> str:
    """t in [0, 1] -> a viridis-like hex colour (linear between five of viridis' colours)."""
    t = min(max(float(t), 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(t), len(VIRIDIS) - 2)
    f = t - i
    r, g, b = (round(a + f * (c - a)) for a, c in zip(VIRIDIS[i], VIRIDIS[i + 1]))
    return f"#{r:02x}{g:02x}{b:02x}"


def text_width(s: str, size: float) -> float:
    return 0.6 * size * len(str(s))


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


@dataclass
class Axes:
    """A plot rectangle (x0, y0, w, h in canvas pixels) mapping data limits onto it."""

    x0: float
    y0: float
    w: float
    h: float
    xlim: tuple[float, float]
    ylim: tuple[float, float]

    def px(self, x: float) -> float:
        a, b = self.xlim
        return self.x0 + (x - a) / ((b - a) or 1.0) * self.w

    def py(self, y: float) -> float:
        a, b = self.ylim
        return self.y0 + self.h - (y - a) / ((b - a) or 1.0) * self.h

    def frame(self, xlabel: str = "", ylabel: str = "", title: str = "", xticks=None, yticks=None,
              xticklabels=None, grid: bool = True, ylabel_gap: float = 40) -> list[str]:
        """Box, ticks with labels, light grid lines at the y ticks, axis labels and title."""
        out = [rect(self.x0, self.y0, self.w, self.h, "none", stroke="#444")]
        xticks = nice_ticks(*self.xlim) if xticks is None else xticks
        yticks = nice_ticks(*self.ylim) if yticks is None else yticks
        labels = xticklabels or [f"{v:g}" for v in xticks]
        bottom = self.y0 + self.h
        for v, lab in zip(xticks, labels):
            x = self.px(v)
            out += [line(x, bottom, x, bottom + 4, "#444"), text(x, bottom + 16, lab, 10)]
        for v in yticks:
            y = self.py(v)
            out.append(line(self.x0 - 4, y, self.x0, y, "#444"))
            if grid:
                out.append(line(self.x0, y, self.x0 + self.w, y, "#ddd"))
            out.append(text(self.x0 - 7, y + 3.5, f"{v:g}", 10, "end"))
        if xlabel:
            out.append(text(self.x0 + self.w / 2, bottom + 32, xlabel, 11))
        if ylabel:
            out.append(text(self.x0 - ylabel_gap, self.y0 + self.h / 2, ylabel, 11, rotate=-90))
        if title:
            out.append(text(self.x0 + self.w / 2, self.y0 - 8, title, 12))
        return out


def legend(x: float, y: float, names: Sequence[str], colours: Sequence[str], width: float,
           dashed: Sequence[bool] = ()) -> tuple[list[str], float]:
    """Entries left to right, wrapping at `width`; returns (parts, height used)."""
    out, cx, cy = [], x, y
    for i, (name, colour) in enumerate(zip(names, colours)):
        w = 26 + text_width(name, 10) + 14
        if cx > x and cx + w > x + width:
            cx, cy = x, cy + 16
        dash = {"stroke_dasharray": "4 3"} if i < len(dashed) and dashed[i] else {}
        out += [line(cx, cy, cx + 20, cy, colour, 2, **dash), text(cx + 25, cy + 3.5, name, 10, "start")]
        cx += w
    return out, cy - y + 16


def colour_bar(x: float, y: float, h: float, lo: float, hi: float, label: str, ident: str) -> list[str]:
    """A vertical viridis bar from lo (bottom) to hi (top) with ticks; `ident` names its gradient."""
    stops = "".join(f'<stop offset="{i / 10:.1f}" stop-color="{viridis(1 - i / 10)}"/>' for i in range(11))
    out = [f'<defs><linearGradient id="{ident}" x1="0" y1="0" x2="0" y2="1">{stops}</linearGradient></defs>',
           rect(x, y, 14, h, f"url(#{ident})", stroke="#444")]
    for v in nice_ticks(lo, hi, 4):
        ty = y + h - (v - lo) / ((hi - lo) or 1.0) * h
        out += [line(x + 14, ty, x + 18, ty, "#444"), text(x + 21, ty + 3.5, f"{v:g}", 10, "start")]
    out.append(text(x + 62, y + h / 2, label, 11, rotate=90))
    return out


def document(width: float, height: float, parts: Sequence[str], title: str = "") -> str:
    """A standalone SVG of `parts` on a white canvas (`title` is the figure's heading)."""
    head = text(width / 2, 18, title, 13, font_weight="bold") if title else ""
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{num(width)}" height="{num(height)}" '
            f'viewBox="0 0 {num(width)} {num(height)}" font-family="DejaVu Sans, Arial, sans-serif">'
            + rect(0, 0, width, height, "#fff") + head + "".join(parts) + "</svg>")


def data_uri(svg: str) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")
