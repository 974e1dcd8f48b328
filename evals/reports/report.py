"""One Markdown report for a set of runs: what was run, the paper's tables, comparisons and plots.

Reads stored results only (``load_run``); plots go to ``plots/`` beside the report and are linked relatively.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from evals.reports.compare import compare_all, render_compare
from evals.reports.plots import niah_grid, plot_niah_curves, plot_niah_heatmap, plot_recall_bars, safe_filename
from evals.reports.results import CheckpointResult, atomic_write_text, incomplete_warnings, run_facts
from evals.reports.tables import PAPER_LAYOUTS, auto_layouts, has_cells, render_table

SHOWN_CONFIG = ("checkpoint", "format", "gate_mode", "dtype", "device", "seed", "limit")


def _cell(value: object) -> str:
    return "-" if value is None else str(value).replace("|", "\\|")


def _runs_section(results: Sequence[CheckpointResult]) -> list[str]:
    lines = ["## Runs", "", "| Label | " + " | ".join(SHOWN_CONFIG) + " | weights sha256 | tasks | complete |",
             "|---|" + "---|" * (len(SHOWN_CONFIG) + 3)]
    for r in results:
        facts = run_facts(r)
        cfg = [_cell(facts[k]) for k in SHOWN_CONFIG]
        digest = _cell(facts["sha256"] and str(facts["sha256"]).removeprefix("sha256:")[:16])
        tasks = f"{len(r.scores)}/{len(r.expected_tasks)}"
        lines.append(f"| {_cell(r.label)} | " + " | ".join(cfg) + f" | {digest} | {tasks} | {r.complete} |")
    limited = [r.label for r in results if run_facts(r)["limit"] not in (None, 0)]
    if limited:
        lines += ["", f"**Warning:** {', '.join(limited)} ran on a subset (`limit`); their numbers are not "
                      f"comparable to the paper's."]
    incomplete = incomplete_warnings(results)
    if incomplete:
        lines += ["", *(f"**Warning:** {line}." for line in incomplete)]
    return lines + [""]


def _plots_section(results: Sequence[CheckpointResult], plot_dir: Path, rel: str) -> list[str]:
    lines: list[str] = []
    with_niah = [r for r in results if niah_grid(r)[0]]
    for r in with_niah:
        path = plot_niah_heatmap(r, plot_dir / f"niah_{safe_filename(r.label)}.png")
        lines += [f"![NIAH heatmap, {r.label}]({rel}/{path.name})", ""]
    if with_niah:
        path = plot_niah_curves(with_niah, plot_dir / "niah_curves.png")
        lines += [f"![NIAH accuracy against length]({rel}/{path.name})", ""]
    if has_cells(results, "table4"):
        path = plot_recall_bars([r for r in results if has_cells([r], "table4")], plot_dir / "recall_bars.png")
        lines += [f"![Recall bars]({rel}/{path.name})", ""]
    return ["## Plots", "", *lines] if lines else []


def write_report(runs: Sequence[CheckpointResult], out_path: str | os.PathLike[str], n_boot: int = 10000,
                 seed: int = 0) -> Path:
    """Write the report to ``out_path`` (a ``.md`` file, or a folder that gets ``report.md``); return its path.

    Tables 2-4 appear when any run fills them, with the paper's rows; Table 5 when the runs span two or more
    gate modes; comparisons (first run as baseline) when there are two or more runs.
    """
    if not runs:
        raise ValueError("report needs at least one run; pass run folders (OUT or OUT/<label>)")
    out = Path(out_path)
    report = out if out.suffix == ".md" else out / "report.md"
    report.parent.mkdir(parents=True, exist_ok=True)

    lines = ["# GDN-2 evaluation report", "", *_runs_section(runs), "## Tables", "",
             "Percent except perplexities; a column's best in bold where one row holds it alone (within our rows, "
             "and within each paper block); "
             "`-` = not run. Paper rows: Gated DeltaNet-2 paper, 1.3B/100B tokens.", ""]
    gate_modes = {r.config.get("gate_mode") for r in runs if r.config.get("gate_mode")}
    shown = [layout for layout in PAPER_LAYOUTS
             if (len(gate_modes) > 1 if layout == "table5" else has_cells(runs, layout))]
    lines += [render_table(runs, layout, "md", with_paper=True) for layout in shown]
    if auto_layouts(runs) == ["all"]:  # nothing of the paper's tables: every task the runs hold instead
        lines += ["No task of the paper's tables was run; every task and metric the runs hold:", "",
                  render_table(runs, "all", "md")]

    if len(runs) >= 2:
        lines += ["## Comparisons", "",
                  f"Baseline A = {runs[0].label}. Paired BCa bootstrap ({n_boot} resamples, seed {seed}) over the "
                  "docs both runs scored; exact McNemar test for 0/1 metrics; win/loss only when the 95% CI "
                  "excludes 0 and (0/1 metrics) McNemar p < 0.05.", "",
                  render_compare(compare_all(runs, n_boot=n_boot, seed=seed), "md")]
    lines += _plots_section(runs, report.parent / "plots", "plots")
    atomic_write_text(report, "\n".join(lines).rstrip() + "\n")
    return report
