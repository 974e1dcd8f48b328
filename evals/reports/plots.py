"""PNG plots from stored results: the NIAH grid per checkpoint, accuracy-vs-length curves, recall bars.

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas directly, never pyplot, so nothing here
touches matplotlib's global backend or state. Each function writes one image and returns its path; with no data
to plot it raises ValueError naming what is missing.

Readability: colours from colour-blind-safe maps (cividis for the heatmap, with a labelled colour bar; the
Okabe-Ito palette for lines and bars), every checkpoint with its own marker and line style and a small offset
along the length axis (so equal curves stay visible side by side), error bars of one standard error (lm-eval's
``*_stderr`` where it computed one, else the binomial stderr from the logged samples), and panels named by what
the RULER variant hides (S-NIAH-1 (noise, number), ...).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from evals.reports.results import LENGTH_METRIC_RE, MISSING_LENGTH_VALUE, CheckpointResult
from evals.reports.tables import NIAH_HEADERS, NIAH_TASKS, TABLE4, average, cell_value, length_label, niah_name

DPI = 120
IMAGE_SUFFIXES = (".png", ".pdf", ".svg")
HEATMAP_CMAP = "cividis"  # colour-blind safe and monotone in lightness
# Okabe & Ito's colour-blind-safe palette (black last: it reads as "missing" next to grey cells otherwise).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")
OFFSET = 0.06  # each checkpoint's points shift by this fraction of an octave along the log2 length axis


def style(k: int) -> dict[str, object]:
    """Colour, marker and line style of the k-th checkpoint; the marker shifts every 8, so no two of the first 64
    share all three."""
    return {"color": PALETTE[k % len(PALETTE)], "marker": MARKERS[(k + k // len(PALETTE)) % len(MARKERS)],
            "linestyle": LINESTYLES[k % len(LINESTYLES)]}


_length_label = length_label


def safe_filename(label: str) -> str:
    """A label (which may hold '@', '=' or a 'folder/' prefix) as a plain file-name stem."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)


def niah_grid(result: CheckpointResult) -> tuple[list[str], list[int], np.ndarray]:
    """(tasks, lengths, percent grid with NaN for missing cells) over the ``ruler_*`` tasks this result has."""
    tasks = [f"ruler_{t}" for t in NIAH_TASKS if f"ruler_{t}" in result.scores]
    tasks += sorted(t for t in result.scores if t.startswith("ruler_") and t not in tasks)
    lengths = sorted({int(m) for t in tasks for m in result.scores[t] if LENGTH_METRIC_RE.match(m)})
    grid = np.full((len(tasks), len(lengths)), np.nan)
    for i, t in enumerate(tasks):
        for j, n in enumerate(lengths):
            value = result.score(t, str(n))
            if value is not None:
                grid[i, j] = 100 * value
    return tasks, lengths, grid


def _task_label(task: str) -> str:
    short = task.removeprefix("ruler_")
    return NIAH_HEADERS.get(short, short)


def haystack_of(result: CheckpointResult, task: str) -> str | None:
    """The haystack the run used for ``task``: its task metadata (config.json), else lm-eval's task config."""
    meta = (result.config.get("task_metadata") or {}).get(task) or {}
    if not meta.get("haystack"):
        meta = ((result.results.get("configs") or {}).get(task) or {}).get("metadata") or {}
    haystack = meta.get("haystack") if isinstance(meta, dict) else None
    return str(haystack) if haystack else None


def _task_name(task: str, results: Sequence[CheckpointResult] = ()) -> str:
    """The panel title: what the variant hides where, e.g. "S-NIAH-1 (noise, number)" (the runs' haystack when
    they all used one; "mixed haystacks" when they differ)."""
    haystacks = {haystack_of(r, task) for r in results if task in r.scores}
    haystacks.discard(None)
    haystack = haystacks.pop() if len(haystacks) == 1 else ("mixed haystacks" if haystacks else None)
    return niah_name(task, haystack)


def niah_stderr(result: CheckpointResult, task: str, length: int) -> float:
    """One standard error (percent) of the accuracy at ``length``: lm-eval's ``<length>_stderr`` when it computed
    one, else the binomial stderr sqrt(p(1-p)/(n-1)) over the logged samples of that length (lm-eval's own
    formula for a mean); NaN without either."""
    stderr = result.stderrs.get(task, {}).get(str(length))
    if stderr is not None:
        return 100 * stderr
    values = [r.get(str(length)) for r in result.samples(task)]
    hits = [float(v) for v in values if isinstance(v, (int, float)) and v != MISSING_LENGTH_VALUE]
    if len(hits) < 2:
        return float("nan")
    p = sum(hits) / len(hits)
    return 100 * float(np.sqrt(p * (1 - p) / (len(hits) - 1)))


def _check_suffix(path: Path) -> None:
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"plot file {path} has no image suffix; name it F.png (or {', '.join(IMAGE_SUFFIXES)})")


def _save(fig: Figure, out_path: str | os.PathLike[str]) -> Path:
    path = Path(out_path)
    _check_suffix(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def plot_niah_heatmap(result: CheckpointResult, out_path: str | os.PathLike[str]) -> Path:
    """Task-by-length heatmap of NIAH accuracy (percent) for one checkpoint; missing cells grey."""
    tasks, lengths, grid = niah_grid(result)
    if not tasks or not lengths:
        raise ValueError(f"{result.label} has no NIAH results (ruler_* tasks with per-length metrics) to plot")
    fig = Figure(figsize=(1.2 + 1.1 * len(lengths), 0.9 + 0.55 * len(tasks)))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps[HEATMAP_CMAP].with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    for i in range(len(tasks)):
        for j in range(len(lengths)):
            value = grid[i, j]
            text = "not run" if np.isnan(value) else f"{value:.1f}"
            # cividis is dark at the low end: light text there, dark text on the light (high) end
            colour = "dimgrey" if np.isnan(value) else ("white" if value < 55 else "black")
            ax.text(j, i, text, ha="center", va="center", fontsize=9 if not np.isnan(value) else 7, color=colour)
    ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
    ax.set_yticks(range(len(tasks)), [_task_name(t, [result]) for t in tasks])
    ax.set_xlabel("context length (tokens)")
    ax.set_title(f"NIAH accuracy: {result.label}")
    bar = fig.colorbar(image, ax=ax, fraction=0.05)
    bar.set_label("accuracy (%)")
    return _save(fig, out_path)


def plot_niah_curves(results: Sequence[CheckpointResult], out_path: str | os.PathLike[str]) -> Path:
    """Accuracy against length: one panel per NIAH task, every checkpoint a line on it."""
    grids = [(r.label, *niah_grid(r)) for r in results]
    tasks = list(dict.fromkeys(t for _, ts, _, _ in grids for t in ts))
    if not tasks:
        raise ValueError("none of the given checkpoints has NIAH results (ruler_* tasks) to plot")
    fig = Figure(figsize=(3.4 * len(tasks), 3.8 + 0.2 * (len(results) // 4)), layout="constrained")
    axes = fig.subplots(1, len(tasks), sharey=True, squeeze=False)[0]
    centre = (len(grids) - 1) / 2
    for ax, task in zip(axes, tasks):
        for k, (r, (label, ts, lengths, grid)) in enumerate(zip(results, grids)):
            if task in ts:
                row = grid[ts.index(task)]
                shift = 2 ** ((k - centre) * OFFSET)  # a few percent along the log axis: overlaps stay visible
                errs = [niah_stderr(r, task, n) for n in lengths]
                # hollow markers of different shapes: two checkpoints on the same point both stay visible
                ax.errorbar([n * shift for n in lengths], row, yerr=errs, capsize=2, markersize=6, linewidth=1.4,
                            elinewidth=0.8, markerfacecolor="none", markeredgewidth=1.4, label=label,
                            **style(k))  # type: ignore[arg-type]
        ax.set_xscale("log", base=2)
        all_lengths = sorted({n for _, ts, ls, _ in grids if task in ts for n in ls})
        ax.set_xticks(all_lengths, [_length_label(n) for n in all_lengths])
        ax.minorticks_off()
        ax.set_ylim(-5, 105)
        ax.set_title(_task_name(task, results), fontsize=10)
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%), ±1 stderr")
    fig.suptitle("NIAH accuracy against context length; panels: RULER task (haystack, needle)", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:  # a checkpoint may lack the first task
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), fontsize=8)
    return _save(fig, out_path)


def plot_recall_bars(results: Sequence[CheckpointResult], out_path: str | os.PathLike[str]) -> Path:
    """Table 4 as grouped bars: one group per recall task plus Avg., one bar per checkpoint, stderr whiskers."""
    cols = [c for c in TABLE4 if c.task]
    cells = [[cell_value(r, c) for c in cols] for r in results]
    if all(v is None for row in cells for v in row):
        raise ValueError("none of the given checkpoints has recall results (jrt_* tasks) to plot")
    # The Avg. bar is the table's own average: absent when any of the six is missing.
    values = np.array([[np.nan if v is None else v for v in [*row, average(row)]] for row in cells], dtype=float)
    errs = np.array([[100 * r.stderrs.get(c.task or "", {}).get(c.metric or "", np.nan) for c in cols] + [np.nan]
                     for r in results], dtype=float)
    names = [*(c.header for c in cols), "Avg."]
    width = 0.8 / max(len(results), 1)
    fig = Figure(figsize=(2.4 + 1.0 * len(names) * max(1, len(results) / 3), 3.6), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(names))
    hatches = ("", "//", "..", "xx", "\\\\", "++", "--", "oo")
    for k, r in enumerate(results):
        ax.bar(x + (k - (len(results) - 1) / 2) * width, values[k], width, yerr=errs[k], capsize=2,
               color=PALETTE[k % len(PALETTE)], hatch=hatches[(k // len(PALETTE)) % len(hatches)],
               edgecolor="white", label=r.label)  # NaN bars and whiskers are simply not drawn
    ax.set_xticks(x, names)
    ax.set_ylabel("contains (%)")
    ax.set_title("Real-world recall (Table 4), ±1 stderr; missing bars = task not run")
    fig.legend(loc="outside right upper", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out_path)
