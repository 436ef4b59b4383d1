"""Plots and report files for quality analyses (e.g. guidance schedules): PNG charts, contact sheets, CSV, JSON.

Every writer is atomic: it writes a temporary file in the destination's folder and `os.replace`s it onto
the destination, so a crash or an exception leaves the old file (or none), never half of one, and no
temporary file behind. Parent folders are created.

matplotlib is imported lazily, through its object-oriented API on an Agg canvas (no pyplot, no global
backend switch), so importing this module costs nothing and works headless. Contact sheets use Pillow.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from weights.atomic import atomic_write

PathLike = str | os.PathLike

# contact sheet geometry, in pixels (see `contact_sheet`)
SHEET_PAD = 4
SHEET_HEADER = 16


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    if hasattr(o, "__array__"):  # jax arrays
        return np.asarray(o).tolist()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def write_json(path: PathLike, data: Any) -> Path:
    """Write `data` as indented JSON (numpy/jax values and paths converted; inf/nan as Infinity/NaN, like
    the parity reports). Serialisation happens before anything is written, so a bad value leaves no file."""
    text = json.dumps(data, indent=2, default=_json_default) + "\n"
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)


def write_csv(path: PathLike, rows: Sequence[Mapping[str, Any]], fieldnames: Sequence[str] | None = None) -> Path:
    """Write rows as CSV with a header. Columns: `fieldnames`, or every key in first-seen order; a row
    missing a column leaves it empty, a key outside `fieldnames` is an error. No rows and no fieldnames
    writes an empty file."""
    if fieldnames is None:
        fieldnames = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    if fieldnames:
        w = csv.DictWriter(buf, fieldnames=list(fieldnames), restval="", extrasaction="raise", lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow({k: _csv_value(v) for k, v in row.items()})
    with atomic_write(path, "w", encoding="utf-8", newline="") as f:
        f.write(buf.getvalue())
    return Path(path)


def _csv_value(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple, dict, np.ndarray)):
        return json.dumps(v, default=_json_default)
    return v


# ---------------------------------------------------------------------------------------------------------
# matplotlib charts


def _figure(figsize: tuple[float, float]):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # a test extra, not a runtime dependency
        raise ImportError("parity.plots needs matplotlib for charts: pip install 'wanport[test]'") from e
    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: PathLike) -> Path:
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    return Path(path)


def plot_series(path: PathLike, x: Sequence[float], series: Mapping[str, Sequence[float]], xlabel: str,
                ylabel: str, title: str, logy: bool = False) -> Path:
    """Line chart of named series over a shared x (e.g. PSNR per denoising step for each guidance scale)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"x must be 1-D, got shape {x.shape}")
    if not series:
        raise ValueError("series is empty: nothing to plot")
    ys = {}
    for name, y in series.items():
        y = np.asarray(y, dtype=np.float64)
        if y.shape != x.shape:
            raise ValueError(f"series {name!r} has {y.shape} values, x has {x.shape}")
        if logy and np.any(y[np.isfinite(y)] <= 0):
            raise ValueError(f"series {name!r} has values <= 0, which a log y axis cannot show")
        ys[name] = y
    fig = _figure((7, 4.5))
    ax = fig.add_subplot()
    for name, y in ys.items():
        ax.plot(x, y, marker="o" if len(x) <= 30 else None, markersize=3, label=str(name))
    if logy:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save_png(fig, path)


def pareto_front(points: Sequence[Mapping[str, Any]], x: str = "time_saved", y: str = "quality") -> list[int]:
    """Indices of the points no other point beats on both `x` and `y` (higher is better), sorted by `x`."""
    idx = sorted(range(len(points)), key=lambda i: (-float(points[i][x]), -float(points[i][y])))
    front, best = [], -math.inf
    for i in idx:
        if float(points[i][y]) > best:
            front.append(i)
            best = float(points[i][y])
    return sorted(front, key=lambda i: float(points[i][x]))


def plot_tradeoff(path: PathLike, points: Sequence[Mapping[str, Any]], *, xlabel: str = "time saved (%)",
                  ylabel: str = "quality", title: str = "quality vs time saved") -> Path:
    """Scatter of quality against time saved, one labelled point per configuration, Pareto front drawn.

    Each point is a mapping with `label`, `time_saved` and `quality` (extra keys are ignored, so rows
    written with `write_csv` can be plotted as they are).
    """
    if not points:
        raise ValueError("points is empty: nothing to plot")
    for i, p in enumerate(points):
        missing = [k for k in ("label", "time_saved", "quality") if k not in p]
        if missing:
            raise ValueError(f"point {i} lacks {missing}; each needs 'label', 'time_saved', 'quality'")
    xs = np.array([float(p["time_saved"]) for p in points])
    ys = np.array([float(p["quality"]) for p in points])
    fig = _figure((7, 5))
    ax = fig.add_subplot()
    ax.scatter(xs, ys, s=25, zorder=3)
    front = pareto_front(points)
    if len(front) > 1:
        ax.plot(xs[front], ys[front], linestyle="--", color="tab:orange", zorder=2, label="Pareto front")
        ax.legend(fontsize="small")
    for p, px, py in zip(points, xs, ys):
        ax.annotate(str(p["label"]), (px, py), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(True, alpha=0.3)
    return _save_png(fig, path)


# ---------------------------------------------------------------------------------------------------------
# contact sheet (Pillow)


def _to_uint8(video: np.ndarray, value_range: tuple[float, float] | None, name: str) -> np.ndarray:
    if video.dtype == np.uint8:
        return video
    if value_range is None:
        raise ValueError(f"video {name!r} is {video.dtype}: pass value_range, e.g. (-1, 1) or (0, 1) "
                         f"(only uint8 videos need none)")
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range!r}")
    v = (np.asarray(video, np.float64) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(np.nan_to_num(v, nan=0.0)), 0, 255).astype(np.uint8)


def frame_indices(num_frames: int, frames: int | Sequence[int]) -> list[int]:
    """`frames` evenly spaced indices from first to last (fewer if the video is shorter), or the given ones."""
    if isinstance(frames, (int, np.integer)):
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        n = min(int(frames), num_frames)
        return [int(i) for i in np.rint(np.linspace(0, num_frames - 1, n))] if n > 1 else [0]
    idx = [int(i) for i in frames]
    bad = [i for i in idx if not -num_frames <= i < num_frames]
    if not idx or bad:
        raise ValueError(f"frame indices {bad or idx} invalid for a video of {num_frames} frames")
    return [i % num_frames for i in idx]


def contact_sheet(path: PathLike, videos: Mapping[str, Any], frames: int | Sequence[int] = 5, *,
                  value_range: tuple[float, float] | None = None, scale: int = 1, label_width: int = 120) -> Path:
    """PNG grid: one row per named video [F, H, W, 3] (or C=1), one column per sampled frame.

    `frames`: how many evenly spaced frames per video (first and last included), or explicit indices.
    Float videos need `value_range` (e.g. (-1, 1)); uint8 videos are used as they are. `scale` enlarges
    frames (nearest neighbour) for tiny videos. Rows are labelled with the name, cells with the frame index.
    Cells are max(H)*scale x max(W)*scale; the image is
    (label_width + cols * (cell_w + SHEET_PAD) + SHEET_PAD) wide and
    (rows * (SHEET_HEADER + cell_h + SHEET_PAD) + SHEET_PAD) high, where cols is the most frames in a row.
    """
    from PIL import Image, ImageDraw

    if not videos:
        raise ValueError("videos is empty: nothing to draw")
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    rows = []
    for name, v in videos.items():
        v = np.asarray(v)
        if v.ndim != 4 or v.shape[-1] not in (1, 3):
            raise ValueError(f"video {name!r}: expected [F, H, W, 3] (or C=1, channels-last), got shape {v.shape}")
        if v.shape[0] == 0:
            raise ValueError(f"video {name!r} has no frames")
        v = _to_uint8(v, value_range, name)
        if v.shape[-1] == 1:
            v = np.repeat(v, 3, axis=-1)
        idx = frame_indices(v.shape[0], frames)
        rows.append((str(name), v, idx))
    cell_h = max(v.shape[1] for _, v, _ in rows) * scale
    cell_w = max(v.shape[2] for _, v, _ in rows) * scale
    cols = max(len(idx) for _, _, idx in rows)
    width = label_width + cols * (cell_w + SHEET_PAD) + SHEET_PAD
    row_h = SHEET_HEADER + cell_h + SHEET_PAD
    height = len(rows) * row_h + SHEET_PAD
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (name, v, idx) in enumerate(rows):
        top = SHEET_PAD + r * row_h
        draw.text((SHEET_PAD, top + SHEET_HEADER + cell_h // 2 - 6), name[: max(1, label_width // 7)], fill=(0, 0, 0))
        for c, f in enumerate(idx):
            left = label_width + SHEET_PAD + c * (cell_w + SHEET_PAD)
            draw.text((left, top + 2), f"f{f}", fill=(80, 80, 80))
            img = v[f]
            if scale > 1:
                img = img.repeat(scale, axis=0).repeat(scale, axis=1)
            dx, dy = (cell_w - img.shape[1]) // 2, (cell_h - img.shape[0]) // 2
            sheet.paste(Image.fromarray(np.ascontiguousarray(img), "RGB"), (left + dx, top + SHEET_HEADER + dy))
    with atomic_write(path, "wb") as f:
        sheet.save(f, format="PNG")
    return Path(path)
