"""Checkpoint A vs B, task by task: deltas, a paired BCa bootstrap CI over shared samples, and McNemar for 0/1 metrics.

Pairing is by ``doc_id`` within a task (and, for the NIAH tasks, per length metric, since each length has its own
docs); a pair whose two records carry different ``doc_hash`` values is dropped and counted, because then the runs
did not see the same document. Samples lacking the metric (or with lm-eval's -1 "no such length") are skipped.

The statistics are scipy's: ``scipy.stats.bootstrap`` (paired, BCa) resamples the paired docs and recomputes
each run's *aggregate* on the resample, so it fits perplexities too: lambada's ``perplexity`` is
exp(-mean loglik), wikitext's ``word_perplexity`` is exp(-sum loglik / sum words) with per-sample
``[loglik, words]``; ``scipy.stats.binomtest`` on the discordant pairs is the exact McNemar test.

Verdict: "win"/"loss" only when the 95% CI of B - A excludes 0 (in B's favour / against it; lower is better for
perplexities) AND, for 0/1 metrics, McNemar's p < 0.05; otherwise "tie" ("n/a" without paired samples). Under
MIN_N paired samples the output says the verdict is unreliable. Tasks only one side holds are listed as rows of
their own, with the other side's score empty, instead of being dropped.
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text
from scipy import stats

from evals.reports.results import LENGTH_METRIC_RE, MISSING_LENGTH_VALUE, CheckpointResult, display_scale, is_perplexity
from evals.reports.tables import COLUMNS

Outcome = Literal["win", "loss", "tie", "n/a"]
# Metrics compared for a task the tables do not know, first present wins.
FALLBACK_METRICS = ("acc", "acc_norm", "contains", "exact_match", "word_perplexity", "perplexity")
_BOOT_CHUNK_ELEMENTS = 2_000_000  # bounds the (resamples x docs) block scipy holds in memory at once
ALPHA = 0.05  # two-sided: 95% intervals, p < 0.05
MIN_N = 30  # fewer paired samples than this: the verdict is flagged as unreliable
FORMATS = ("rich", "md", "json", "csv")


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
    score_a: float | None  # None: that side lacks the task
    score_b: float | None
    delta: float | None  # score_b - score_a (full-run scores from the results files)
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
    """Two-sided exact McNemar p: scipy's binomial(n, 1/2) test on the discordant pairs."""
    n = only_b_right + only_a_right
    if n == 0:
        return 1.0
    return float(stats.binomtest(only_b_right, n, 0.5, alternative="two-sided").pvalue)


def verdict(ci_low: float | None, ci_high: float | None, p_value: float | None, lower_is_better: bool,
            alpha: float = ALPHA) -> Outcome:
    """"win"/"loss" when the CI excludes 0 and (where there is one) the test's p < alpha; else "tie".

    The README's example, CI [+5, +40] with McNemar p = 0.125, is a tie: the interval alone is not enough.
    """
    if ci_low is None or ci_high is None or not (math.isfinite(ci_low) and math.isfinite(ci_high)):
        return "n/a"
    up, down = ci_low > 0, ci_high < 0
    if not (up or down) or (p_value is not None and not p_value < alpha):
        return "tie"
    return "win" if up != lower_is_better else "loss"


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
    """Point difference and paired BCa 95% CI of stat(B) - stat(A) (``scipy.stats.bootstrap``).

    ``a`` and ``b`` are [n, 2] arrays of (numerator, denominator) per paired doc; stat = transform(sum num / sum
    den). Where BCa is undefined (every resample gives the same difference, e.g. identical runs) the interval is
    the percentile one, which is then the point itself. With fewer than two pairs there is no interval (NaN).
    """
    def statistic(an: np.ndarray, ad: np.ndarray, bn: np.ndarray, bd: np.ndarray, axis: int = -1) -> np.ndarray:
        return transform(bn.sum(axis=axis) / bd.sum(axis=axis)) - transform(an.sum(axis=axis) / ad.sum(axis=axis))

    data = (a[:, 0], a[:, 1], b[:, 0], b[:, 1])
    point = float(statistic(*data))
    if len(a) < 2:
        return point, math.nan, math.nan
    batch = max(1, _BOOT_CHUNK_ELEMENTS // len(a))
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (stats.DegenerateDataWarning, RuntimeWarning))
            res = stats.bootstrap(data, statistic, n_resamples=n_boot, paired=True, vectorized=True, batch=batch,
                                  confidence_level=1 - ALPHA, method=method, rng=np.random.default_rng(seed))
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if math.isfinite(low) and math.isfinite(high):
            # a degenerate resample distribution can round to just past the point: clamp to it
            return point, min(low, point), max(high, point)
    return point, point, point


# ----------------------------------------------------------------------------------------------- comparison

def _pick_metrics(task: str, metrics: list[str]) -> list[str]:
    lengths = sorted((m for m in metrics if LENGTH_METRIC_RE.match(m)), key=int)
    if lengths:
        return lengths
    if task in TABLE_METRICS:
        return [m for m in TABLE_METRICS[task] if m in metrics]
    return [m for m in FALLBACK_METRICS if m in metrics][:1] or sorted(metrics)[:1]


def main_metrics(task: str, a: CheckpointResult, b: CheckpointResult) -> list[str]:
    """Metrics compared for ``task``: the tables' metric(s), every length of a NIAH task, else a fallback."""
    return _pick_metrics(task, [m for m in a.scores.get(task, {}) if m in b.scores.get(task, {})])


def _lower_is_better(result: CheckpointResult, task: str, metric: str) -> bool:
    flag = result.higher_is_better.get(task, {}).get(metric.partition(",")[0])
    return (not flag) if isinstance(flag, bool) else is_perplexity(metric)


def _compare_metric(a: CheckpointResult, b: CheckpointResult, task: str, metric: str, n_boot: int,
                    seed: int) -> TaskComparison:
    score_a, score_b = a.scores[task][metric], b.scores[task][metric]
    assert score_a is not None and score_b is not None
    cmp = TaskComparison(task, metric, a.label, b.label, score_a, score_b, score_b - score_a,
                         _lower_is_better(a, task, metric))
    xa, xb, mismatched = paired_samples(a.samples(task), b.samples(task), metric)
    cmp.n_paired = len(xa)
    if mismatched:
        cmp.note = f"{mismatched} doc_ids hold different docs and were not paired"
    if cmp.n_paired == 0:
        cmp.note = cmp.note or "no paired samples (log samples in both runs to test)"
        return cmp
    cmp.paired_delta, low, high = paired_bootstrap(xa, xb, _transform_for(metric), n_boot, seed)
    cmp.ci_low, cmp.ci_high = (low, high) if math.isfinite(low) and math.isfinite(high) else (None, None)
    if not is_perplexity(metric) and np.isin(xa[:, 0], (0.0, 1.0)).all() and np.isin(xb[:, 0], (0.0, 1.0)).all():
        cmp.only_b_right = int(((xb[:, 0] == 1) & (xa[:, 0] == 0)).sum())
        cmp.only_a_right = int(((xa[:, 0] == 1) & (xb[:, 0] == 0)).sum())
        cmp.p_value = mcnemar_exact(cmp.only_b_right, cmp.only_a_right)
    cmp.outcome = verdict(cmp.ci_low, cmp.ci_high, cmp.p_value, cmp.lower_is_better)
    return cmp  # fewer than MIN_N pairs: compare_warnings says so once per (A, B), not on every row


def _one_sided(a: CheckpointResult, b: CheckpointResult, task: str) -> list[TaskComparison]:
    """Rows for a task only one of A and B holds (an incomplete run, or a task run on one side only)."""
    have, lacking = (a, b) if task in a.scores else (b, a)
    rows = []
    for metric in _pick_metrics(task, list(have.scores[task])):
        score = have.scores[task][metric]
        rows.append(TaskComparison(task, metric, a.label, b.label, score if have is a else None,
                                   score if have is b else None, None, _lower_is_better(have, task, metric),
                                   note=f"{lacking.label} lacks this task"))
    return rows


def _ordered_tasks(a: CheckpointResult, b: CheckpointResult) -> list[str]:
    shared = [t for t in a.scores if t in b.scores]
    known = [t for t in TASK_ORDER if t in shared]
    return known + sorted(t for t in shared if t not in known)


def _unshared_tasks(a: CheckpointResult, b: CheckpointResult) -> list[str]:
    tasks = [t for t in [*a.scores, *b.scores] if (t in a.scores) != (t in b.scores)]
    known = [t for t in TASK_ORDER if t in tasks]
    return known + sorted(t for t in dict.fromkeys(tasks) if t not in known)


def compare_runs(a: CheckpointResult, b: CheckpointResult, n_boot: int = 10000, seed: int = 0
                 ) -> list[TaskComparison]:
    """B against baseline A on every task both have, main metric(s) only, in the paper's task order; then a row
    (no statistics) for each task only one side holds."""
    if n_boot < 1:
        raise ValueError(f"--n-boot must be at least 1 (got {n_boot}); pass e.g. --n-boot 10000")
    shared = [_compare_metric(a, b, task, metric, n_boot, seed)
              for task in _ordered_tasks(a, b) for metric in main_metrics(task, a, b)]
    return shared + [row for task in _unshared_tasks(a, b) for row in _one_sided(a, b, task)]


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


def _num(value: float | None, scale: float, sign: str = "") -> str:
    if value is None:
        return "-"
    v = value * scale
    return f"{v:{sign}.2e}" if abs(v) >= 1e4 else f"{v:{sign}.2f}"


def _row_cells(c: TaskComparison) -> list[str]:
    s = display_scale(c.metric)
    ci = "-" if c.ci_low is None or c.ci_high is None else f"[{_num(c.ci_low, s, '+')}, {_num(c.ci_high, s, '+')}]"
    return [c.task, _metric_label(c.metric), _num(c.score_a, s), _num(c.score_b, s), _num(c.delta, s, "+"), ci,
            _p_text(c.p_value), str(c.n_paired), c.outcome]


HEADERS = ["Task", "Metric", "A", "B", "Δ (B−A)", "95% CI", "McNemar p", "n", "Result"]
CAPTION = (f"percents except perplexities; CI: paired BCa bootstrap of B−A; win/loss needs the CI to exclude 0 "
           f"and, for 0/1 metrics, McNemar p < {ALPHA}")


def compare_warnings(comparisons: Sequence[TaskComparison]) -> list[str]:
    """Per (A, B): the tasks one side lacks, and the rows with fewer than MIN_N paired samples."""
    out = []
    for group in _groups(comparisons):
        a, b = group[0].label_a, group[0].label_b
        for side, lacking in (("B", b), ("A", a)):
            tasks = list(dict.fromkeys(c.task for c in group if c.note.startswith(f"{lacking} lacks")
                                       and (c.score_b if side == "B" else c.score_a) is None))
            if tasks:
                out.append(f"{side} = {lacking} lacks {len(tasks)} task(s) the other has: {', '.join(tasks)} "
                           f"(not compared; finish or rerun that run)")
        small = [c for c in group if 0 < c.n_paired < MIN_N]
        tested = [c for c in group if c.n_paired > 0]
        if small:
            cells = ", ".join(f"{c.task} {_metric_label(c.metric)}" for c in small[:6])
            where = (f"all {len(small)} compared rows" if len(small) == len(tested) else
                     f"{len(small)} of {len(tested)} rows ({cells}{' ...' if len(small) > 6 else ''})")
            n = sorted({c.n_paired for c in small})
            out.append(f"A = {a}, B = {b}: fewer than {MIN_N} paired samples (n = {', '.join(map(str, n[:4]))}) in "
                       f"{where}: too few for a reliable verdict; run more samples (--num-samples, --limit)")
    return out


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
        table = Table(title=_caption(group), caption=CAPTION[0].upper() + CAPTION[1:])
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
        lines = [f"**{_caption(group)}** ({CAPTION})", "",
                 "| " + " | ".join(HEADERS) + " |", "|---|---|" + "---:|" * (len(HEADERS) - 2)]
        for c in group:
            cells = _row_cells(c)
            if c.outcome in ("win", "loss"):
                cells[-1] = f"**{cells[-1]}**"
            lines.append("| " + " | ".join(cells) + " |")
        notes = [f"- {c.task} {_metric_label(c.metric)}: {c.note}" for c in group if c.note]
        parts.append("\n".join(lines + ([""] + notes if notes else [])) + "\n")
    warned = compare_warnings(comparisons)
    return "\n".join(parts) + ("\n" + "\n".join(f"**Warning:** {w}" for w in warned) + "\n" if warned else "")


FIELDS = [f for f in TaskComparison.__dataclass_fields__]


def _to_json(comparisons: Sequence[TaskComparison]) -> str:
    """Machine-readable: lm-eval's raw values (fractions, perplexities), null where a value is absent."""
    rows = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(c).items()}
            for c in comparisons]
    return json.dumps({"alpha": ALPHA, "min_n": MIN_N, "comparisons": rows,
                       "warnings": compare_warnings(comparisons)}, indent=2) + "\n"


def _to_csv(comparisons: Sequence[TaskComparison]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(FIELDS)
    for c in comparisons:
        writer.writerow(["" if v is None else repr(v) if isinstance(v, float) else v for v in asdict(c).values()])
    return buf.getvalue()


def render_compare(comparisons: Sequence[TaskComparison], fmt: str = "rich") -> str:
    """Comparisons as text: ``rich`` (plain-text box tables), ``md``, ``json`` or ``csv`` (raw values)."""
    if fmt == "md":
        return _to_md(comparisons)
    if fmt == "json":
        return _to_json(comparisons)
    if fmt == "csv":
        return _to_csv(comparisons)
    if fmt != "rich":
        raise ValueError(f"unknown compare format {fmt!r}; choose one of {', '.join(FORMATS)}")
    console = Console(file=io.StringIO(), width=200, color_system=None, force_terminal=False, emoji=False)
    for table in compare_tables(comparisons):
        console.print(table)
    for line in compare_warnings(comparisons):
        console.print(f"Warning: {line}", soft_wrap=True)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines()) + "\n"  # type: ignore[attr-defined]
