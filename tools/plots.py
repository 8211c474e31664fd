"""A line chart written with Pillow alone (no plotting library among the dependencies)."""

from __future__ import annotations

import math
import os
from pathlib import Path

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow ≥ 10.1 with FreeType
    except TypeError:
        return ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    span = max(hi - lo, 1e-9)
    raw = span / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = step * (lo // step)
    ticks, t = [], start
    while t <= hi + 1e-9 * span:
        if t >= lo - 1e-9 * span:
            ticks.append(round(t, 10))
        t += step
    return ticks


def line_chart_png(
    path: str | Path,
    x_labels: list[str],
    series: dict[str, list[float | None]],
    *,
    title: str,
    y_label: str,
    x_label: str,
    hline: tuple[str, float] | None = None,
    size: tuple[int, int] = (900, 560),
) -> None:
    """One line with markers per series over categorical x positions; None values are gaps. Written
    atomically (temp file, then rename)."""
    from PIL import Image, ImageDraw

    values = [v for vs in series.values() for v in vs if v is not None] + ([hline[1]] if hline else [])
    if not values:
        raise ValueError("line chart: no values to plot")
    lo, hi = min(values), max(values)
    pad = 0.08 * max(hi - lo, 1e-6)
    lo, hi = max(lo - pad, 0.0) if lo >= 0 else lo - pad, hi + pad
    w, h = size
    left, right, top, bottom = 90, 210, 50, 70
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    small, big = _font(14), _font(18)

    def px(i: int, v: float) -> tuple[float, float]:
        x = left + (i + 0.5) * (w - left - right) / len(x_labels)
        return x, top + (hi - v) / (hi - lo) * (h - top - bottom)

    for t in _nice_ticks(lo, hi):
        _, y = px(0, t)
        d.line([(left, y), (w - right, y)], fill=(225, 225, 225))
        d.text((left - 8, y), f"{t:g}", fill="black", font=small, anchor="rm")
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for i, label in enumerate(x_labels):
        x, _ = px(i, lo)
        d.line([(x, h - bottom), (x, h - bottom + 5)], fill="black")
        d.text((x, h - bottom + 8), label, fill="black", font=small, anchor="mt")
    d.text(((left + w - right) / 2, h - 22), x_label, fill="black", font=small, anchor="mm")
    d.text((18, (top + h - bottom) / 2), y_label, fill="black", font=small, anchor="lm")
    d.text((w / 2, 22), title, fill="black", font=big, anchor="mm")
    legend_y = top + 10
    if hline is not None:
        _, y = px(0, hline[1])
        for x0 in range(left, w - right, 12):
            d.line([(x0, y), (min(x0 + 6, w - right), y)], fill=(90, 90, 90), width=2)
        d.line([(w - right + 15, legend_y), (w - right + 40, legend_y)], fill=(90, 90, 90), width=2)
        d.text((w - right + 48, legend_y), hline[0], fill="black", font=small, anchor="lm")
        legend_y += 24
    for k, (name, vs) in enumerate(series.items()):
        color = COLORS[k % len(COLORS)]
        points = [px(i, v) if v is not None else None for i, v in enumerate(vs)]
        for a, b in zip(points, points[1:], strict=False):
            if a is not None and b is not None:
                d.line([a, b], fill=color, width=3)
        for p in points:
            if p is not None:
                d.ellipse([p[0] - 5, p[1] - 5, p[0] + 5, p[1] + 5], fill=color)
        d.line([(w - right + 15, legend_y), (w - right + 40, legend_y)], fill=color, width=3)
        d.text((w - right + 48, legend_y), name, fill="black", font=small, anchor="lm")
        legend_y += 24
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
