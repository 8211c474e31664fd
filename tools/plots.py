"""Charts written with Pillow alone (no plotting library among the dependencies)."""

from __future__ import annotations

import math
import os
from pathlib import Path

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207),
          (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (0, 0, 0)]  # fmt: skip


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
    _save(img, path)


def _save(img, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def group_map_png(
    path: str | Path,
    timesteps: list[int],
    groups: list[int],
    *,
    title: str,
    drawn: dict[int, int] | None = None,
    size: tuple[int, int] = (1000, 300),
) -> None:
    """The timestep→group map over the sampling steps: one coloured cell per step (step 0 = the first,
    noisiest), labelled with its group where it changes; ticks under steps that calibration drew from."""
    from PIL import Image, ImageDraw

    if not timesteps or len(timesteps) != len(groups):
        raise ValueError("group map: need one group per sampling step")
    w, h = size
    left, right, top, band = 60, 30, 60, 90
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    small, big = _font(13), _font(18)
    cell = (w - left - right) / len(timesteps)
    palette = COLORS[:-1]
    for i, (t, g) in enumerate(zip(timesteps, groups, strict=True)):
        x0 = left + i * cell
        d.rectangle([x0, top, x0 + cell, top + band], fill=palette[g % len(palette)])
        if i == 0 or groups[i - 1] != g:
            d.line([(x0, top), (x0, top + band)], fill="white", width=2)
            d.text((x0 + 3, top + band / 2), str(g), fill="white", font=small, anchor="lm")
        if drawn and drawn.get(int(t)):
            d.line([(x0 + cell / 2, top + band + 4), (x0 + cell / 2, top + band + 4 + 5 * drawn[int(t)])],
                   fill="black", width=2)  # fmt: skip
    for i in range(0, len(timesteps), max(1, len(timesteps) // 10)):
        x = left + (i + 0.5) * cell
        d.text((x, top + band + 40), f"{i}\nt={timesteps[i]}", fill="black", font=small, anchor="ma", align="center")
    d.text((left - 6, top + band + 40), "step", fill="black", font=small, anchor="ra")
    if drawn:
        d.text((w - right, top - 8), "ticks below: calibration batches drawn at that step", fill="black",
               font=small, anchor="rb")  # fmt: skip
    d.text((w / 2, 24), title, fill="black", font=big, anchor="mm")
    _save(img, path)


def sigma_evolution_png(path: str | Path, history: list[dict], assignment: dict, timesteps: list[int], *,
                        title: str) -> None:  # fmt: skip
    """σ during the group search: for each group g, the mean importance weight σ_g^t over the calibrated
    timesteps that end in g (1 = they chose g outright), with the mean entropy of σ, per snapshot."""
    rows = {t: i for i, t in enumerate(timesteps)}
    groups = sorted(set(assignment.values()))
    series = {}
    for g in groups:
        members = [rows[t] for t, a in assignment.items() if a == g and t in rows]
        series[f"sigma of group {g}"] = [
            sum(h["sigma"][r][g] for r in members) / len(members) if members else None for h in history
        ]
    series["entropy / ln G"] = [h["entropy"] / math.log(max(len(history[0]["sigma"][0]), 2)) for h in history]
    line_chart_png(path, [str(h["step"]) for h in history], series, title=title, y_label="sigma (mean)",
                   x_label="search iteration")  # fmt: skip
