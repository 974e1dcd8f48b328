"""Checkpoint A vs B, task by task: deltas, a paired bootstrap CI over shared samples, and McNemar for 0/1 metrics.

Pairing is by ``doc_id`` within a task (and, for the NIAH tasks, per length metric, since each length has its own
docs); a pair whose two records carry different ``doc_hash`` values is dropped and counted, because then the runs
did not see the same document. Samples lacking the metric (or with lm-eval's -1 "no such length") are skipped.

The bootstrap resamples the paired docs and recomputes each run's *aggregate* on the resample, so it fits
perplexities too: lambada's ``perplexity`` is exp(-mean loglik), wikitext's ``word_perplexity`` is
exp(-sum loglik / sum words) with per-sample ``[loglik, words]``. A result is a win/loss when the 95% CI of B - A
excludes 0 in B's favour/against it (lower is better for perplexities).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from evals.reports.results import LENGTH_METRIC_RE, MISSING_LENGTH_VALUE, CheckpointResult, display_scale, is_perplexity
from evals.reports.tables import COLUMNS

Outcome = Literal["win", "loss", "tie", "n/a"]
# Metrics compared for a task the tables do not know, first present wins.
FALLBACK_METRICS = ("acc", "acc_norm", "contains", "exact_match", "word_perplexity", "perplexity")
_BOOT_CHUNK_ELEMENTS = 2_000_000  # bounds the (resamples x docs) index block held in memory at once


def _table_metrics() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for layout in ("table2", "table4"):
        for col in COLUMNS[layout]:
            if col.task and col.metric not in out.setdefault(col.task, []):
                out[col.task].append(col.metric or "")
    return out


TABLE_METRICS = _table_metrics()
TASK_ORDER = list(dict.fromkeys(c.task for layout in ("table2", "table3", "table4") for c in COLUMNS[layout]
                                if c.task))


@dataclass
class TaskComparison:
    """B against the baseline A on one (task, metric). Scores are lm-eval's raw values (fractions, perplexities)."""

    task: str
    metric: str
    label_a: str
    label_b: str
    score_a: float
    score_b: float
    delta: float  # score_b - score_a (full-run scores from results.json)
    lower_is_better: bool
    n_paired: int = 0
    paired_delta: float | None = None  # the same difference over the paired samples only
    ci_low: float | None = None
    ci_high: float | None = None
    p_value: float | None = None  # exact McNemar (two-sided) for 0/1 metrics
    only_b_right: int = 0  # discordant pairs, 0/1 metrics only
    only_a_right: int = 0
    outcome: Outcome = "n/a"
    note: str = ""


# ----------------------------------------------------------------------------------------------- statistics

def mcnemar_exact(only_b_right: int, only_a_right: int) -> float:
    """Two-sided exact McNemar p: a binomial(n, 1/2) test on the discordant pairs."""
    n = only_b_right + only_a_right
    if n == 0:
        return 1.0
    k = min(only_b_right, only_a_right)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**n)  # big-int division stays exact until the final float


Transform = Callable[[np.ndarray], np.ndarray]  # statistic = transform(sum(num) / sum(den)) over samples


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _exp_neg(x: np.ndarray) -> np.ndarray:
    return np.exp(-x)


def _transform_for(metric: str) -> Transform:
    return _exp_neg if is_perplexity(metric) else _identity


def _sample_value(record: dict[str, Any], metric: str) -> tuple[float, float] | None:
    """(numerator, denominator) of one sample, or None if it lacks a usable value."""
    value = record.get(metric)
    if isinstance(value, (list, tuple)) and len(value) == 2:  # weighted perplexity: [loglik, words]
        num, den = value
    else:
        num, den = value, 1.0
    if isinstance(num, bool) or not isinstance(num, (int, float)) or not isinstance(den, (int, float)):
        return None
    if not (math.isfinite(num) and math.isfinite(den)) or den <= 0:
        return None
    if LENGTH_METRIC_RE.match(metric) and num == MISSING_LENGTH_VALUE:
        return None
    return float(num), float(den)


def _by_doc(records: list[dict[str, Any]], metric: str, filt: str) -> dict[Any, tuple[tuple[float, float], Any]]:
    out: dict[Any, tuple[tuple[float, float], Any]] = {}
    for r in records:
        if r.get("filter", filt) != filt or "doc_id" not in r:
            continue
        value = _sample_value(r, metric)
        if value is not None:
            out.setdefault(r["doc_id"], (value, r.get("doc_hash")))
    return out


def paired_samples(a: list[dict[str, Any]], b: list[dict[str, Any]], metric: str
                   ) -> tuple[np.ndarray, np.ndarray, int]:
    """Arrays [n, 2] of (num, den) for A and B over the shared doc_ids, and how many doc_ids disagreed in content."""
    base, _, filt = metric.partition(",")
    filt = filt or "none"
    da, db = _by_doc(a, base, filt), _by_doc(b, base, filt)
    pa, pb, mismatched = [], [], 0
    for doc_id, (va, ha) in da.items():
        if doc_id not in db:
            continue
        vb, hb = db[doc_id]
        if ha is not None and hb is not None and ha != hb:
            mismatched += 1
            continue
        pa.append(va)
        pb.append(vb)
    shape = (len(pa), 2)
    return np.asarray(pa, dtype=float).reshape(shape), np.asarray(pb, dtype=float).reshape(shape), mismatched


def paired_bootstrap(a: np.ndarray, b: np.ndarray, transform: Transform, n_boot: int, seed: int
                     ) -> tuple[float, float, float]:
    """Point difference and percentile 95% CI of stat(B) - stat(A), resampling the paired rows together."""
    n = len(a)

    def stat(x: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
        num, den = (x[:, 0], x[:, 1]) if idx is None else (x[idx, 0], x[idx, 1])
        return transform(num.sum(axis=-1) / den.sum(axis=-1))

    point = float(stat(b) - stat(a))
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOT_CHUNK_ELEMENTS // n)
    diffs = []
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        diffs.append(stat(b, idx) - stat(a, idx))
    low, high = np.percentile(np.concatenate(diffs), [2.5, 97.5])
    return point, float(low), float(high)


# ----------------------------------------------------------------------------------------------- comparison

def main_metrics(task: str, a: CheckpointResult, b: CheckpointResult) -> list[str]:
    """Metrics compared for ``task``: the tables' metric(s), every length of a NIAH task, else a fallback."""
    common = [m for m in a.scores.get(task, {}) if m in b.scores.get(task, {})]
    lengths = sorted((m for m in common if LENGTH_METRIC_RE.match(m)), key=int)
    if lengths:
        return lengths
    if task in TABLE_METRICS:
        return [m for m in TABLE_METRICS[task] if m in common]
    return [m for m in FALLBACK_METRICS if m in common][:1]


def _lower_is_better(result: CheckpointResult, task: str, metric: str) -> bool:
    flag = result.higher_is_better.get(task, {}).get(metric.partition(",")[0])
    return (not flag) if isinstance(flag, bool) else is_perplexity(metric)


def _compare_metric(a: CheckpointResult, b: CheckpointResult, task: str, metric: str, n_boot: int,
                    seed: int) -> TaskComparison:
    score_a, score_b = a.scores[task][metric], b.scores[task][metric]
    cmp = TaskComparison(task, metric, a.label, b.label, score_a, score_b, score_b - score_a,
                         _lower_is_better(a, task, metric))
    xa, xb, mismatched = paired_samples(a.samples(task), b.samples(task), metric)
    cmp.n_paired = len(xa)
    if mismatched:
        cmp.note = f"{mismatched} doc_ids hold different docs and were not paired"
    if cmp.n_paired == 0:
        cmp.note = cmp.note or "no paired samples (log samples in both runs to test)"
        return cmp
    cmp.paired_delta, cmp.ci_low, cmp.ci_high = paired_bootstrap(xa, xb, _transform_for(metric), n_boot, seed)
    if not is_perplexity(metric) and np.isin(xa[:, 0], (0.0, 1.0)).all() and np.isin(xb[:, 0], (0.0, 1.0)).all():
        cmp.only_b_right = int(((xb[:, 0] == 1) & (xa[:, 0] == 0)).sum())
        cmp.only_a_right = int(((xa[:, 0] == 1) & (xb[:, 0] == 0)).sum())
        cmp.p_value = mcnemar_exact(cmp.only_b_right, cmp.only_a_right)
    b_up, b_down = cmp.ci_low > 0, cmp.ci_high < 0
    if b_up or b_down:
        cmp.outcome = "win" if b_up != cmp.lower_is_better else "loss"
    else:
        cmp.outcome = "tie"
    return cmp


def _ordered_tasks(a: CheckpointResult, b: CheckpointResult) -> list[str]:
    shared = [t for t in a.scores if t in b.scores]
    known = [t for t in TASK_ORDER if t in shared]
    return known + sorted(t for t in shared if t not in known)


def compare_runs(a: CheckpointResult, b: CheckpointResult, n_boot: int = 10000, seed: int = 0
                 ) -> list[TaskComparison]:
    """B against baseline A on every task both have, main metric(s) only, in the paper's task order."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    return [_compare_metric(a, b, task, metric, n_boot, seed)
            for task in _ordered_tasks(a, b) for metric in main_metrics(task, a, b)]


def compare_all(results: Sequence[CheckpointResult], n_boot: int = 10000, seed: int = 0) -> list[TaskComparison]:
    """Every result after the first against the first (the baseline)."""
    if len(results) < 2:
        raise ValueError(f"compare needs at least two checkpoints, got {len(results)}; pass two run folders "
                         f"or an OUT folder holding several labels")
    return [c for b in results[1:] for c in compare_runs(results[0], b, n_boot, seed)]


# ----------------------------------------------------------------------------------------------- rendering

def _metric_label(metric: str) -> str:
    if LENGTH_METRIC_RE.match(metric):
        n = int(metric)
        return f"acc@{n // 1024}K" if n % 1024 == 0 else f"acc@{n}"
    return metric


def _p_text(p: float | None) -> str:
    if p is None:
        return "-"
    return "<1e-4" if p < 1e-4 else f"{p:.4f}"


def _row_cells(c: TaskComparison) -> list[str]:
    s = display_scale(c.metric)
    ci = "-" if c.ci_low is None else f"[{c.ci_low * s:+.2f}, {c.ci_high * s:+.2f}]"  # type: ignore[operator]
    return [c.task, _metric_label(c.metric), f"{c.score_a * s:.2f}", f"{c.score_b * s:.2f}",
            f"{c.delta * s:+.2f}", ci, _p_text(c.p_value), str(c.n_paired), c.outcome]


HEADERS = ["Task", "Metric", "A", "B", "Δ (B−A)", "95% CI", "McNemar p", "n", "Result"]


def _groups(comparisons: Sequence[TaskComparison]) -> list[list[TaskComparison]]:
    groups: dict[tuple[str, str], list[TaskComparison]] = {}
    for c in comparisons:
        groups.setdefault((c.label_a, c.label_b), []).append(c)
    return list(groups.values())


def _caption(group: list[TaskComparison]) -> str:
    return f"A = {group[0].label_a}, B = {group[0].label_b}"


def compare_tables(comparisons: Sequence[TaskComparison]) -> list[Table]:
    """One rich table per (A, B) pair; wins green, losses red."""
    styles = {"win": "bold green", "loss": "bold red"}
    tables = []
    for group in _groups(comparisons):
        table = Table(title=_caption(group), caption="Percents except perplexities; CI: paired bootstrap of B−A")
        for i, h in enumerate(HEADERS):
            table.add_column(h, justify="left" if i < 2 else "right", no_wrap=True)
        for c in group:
            cells = _row_cells(c)
            table.add_row(*cells[:-1], Text(cells[-1], style=styles.get(c.outcome, "")))
        tables.append(table)
    return tables


def _to_md(comparisons: Sequence[TaskComparison]) -> str:
    parts = []
    for group in _groups(comparisons):
        lines = [f"**{_caption(group)}** (percents except perplexities; CI: paired bootstrap of B−A)", "",
                 "| " + " | ".join(HEADERS) + " |", "|---|---|" + "---:|" * (len(HEADERS) - 2)]
        for c in group:
            cells = _row_cells(c)
            if c.outcome in ("win", "loss"):
                cells[-1] = f"**{cells[-1]}**"
            lines.append("| " + " | ".join(cells) + " |")
        notes = [f"- {c.task} {_metric_label(c.metric)}: {c.note}" for c in group if c.note]
        parts.append("\n".join(lines + ([""] + notes if notes else [])) + "\n")
    return "\n".join(parts)


def render_compare(comparisons: Sequence[TaskComparison], fmt: str = "rich") -> str:
    """Comparisons as text: ``rich`` (plain-text box tables) or ``md``."""
    if fmt == "md":
        return _to_md(comparisons)
    if fmt != "rich":
        raise ValueError(f"unknown compare format {fmt!r}; choose rich or md")
    console = Console(file=io.StringIO(), width=200, color_system=None, force_terminal=False, emoji=False)
    for table in compare_tables(comparisons):
        console.print(table)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines()) + "\n"  # type: ignore[attr-defined]
