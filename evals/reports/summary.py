"""The summary table printed at the end of `run_eval.py run`: checkpoints side by side, one column per cell."""
from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

from evals.reports.results import incomplete_warnings, load_run


def _columns(suite_name: str | None, results) -> list[tuple[str, str, str, bool]]:
    """(header, task, metric, percent) for every column to show."""
    if suite_name:
        from tasks import catalog

        suite = catalog.load_suite(suite_name)
        cols = [(name, c.task, c.metric, c.percent) for name, c in suite.columns.items()]
        if cols:
            return cols
    cols = []
    for r in results:
        for task, metrics in sorted(r.scores.items()):
            for metric in sorted(metrics):
                key = (f"{task} {metric}", task, metric, "perplexity" not in metric)
                if key not in cols:
                    cols.append(key)
    return cols


def _runs(out_dir: str, labels: list[str]) -> list:
    runs = [r for r in load_run(out_dir) if r.label in labels]
    return sorted(runs, key=lambda r: labels.index(r.label))


def summary_table(out_dir: str, labels: list[str], suite: str | None = None, runs: list | None = None) -> Table:
    runs = _runs(out_dir, labels) if runs is None else runs
    table = Table(title=f"{suite or 'run'}: {out_dir}")
    table.add_column("cell", style="bold")
    for r in runs:  # checkpoints side by side
        table.add_column(r.label, justify="right")
    for header, task, metric, percent in _columns(suite, runs):
        cells = []
        for r in runs:
            value = r.score(task, metric)
            cells.append("-" if value is None else f"{100 * value:.1f}" if percent
                         else f"{value:.2e}" if abs(value) >= 1e4 else f"{value:.2f}")  # diverged perplexities
        table.add_row(header, *cells)
    return table


def print_summary(out_dir: str, labels: list[str], suite: str | None = None) -> None:
    runs = _runs(out_dir, labels)
    Console().print(summary_table(out_dir, labels, suite, runs))
    for line in incomplete_warnings(runs):
        print(f"warning: {line}", file=sys.stderr)
