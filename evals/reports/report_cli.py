"""``table``, ``compare``, ``report`` and ``plot`` subcommands; run_eval.py registers them with ``add_cli``.

    run_eval.py table OUT --layout table2 --format md --with-paper
    run_eval.py compare OUT/gdn2-a OUT/gdn2-b --format md
    run_eval.py compare ABLATION_OUT --baseline 'ckpt@gate=full'
    run_eval.py report OUT1 OUT2 --out report/
    run_eval.py plot OUT --kind niah-curves --out plots/

A RUN is an output folder (every checkpoint label in it) or one OUT/<label> folder. Bad input raises
ValueError/FileNotFoundError with a one-line message, which run_eval.py prints.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from evals.reports.compare import compare_all, compare_tables, render_compare
from evals.reports.plots import plot_niah_curves, plot_niah_heatmap, plot_recall_bars, safe_filename
from evals.reports.report import write_report
from evals.reports.results import CheckpointResult, load_runs
from evals.reports.tables import FORMATS, LAYOUTS, build_table, render_table, rich_table

PLOT_KINDS = ("niah-heatmap", "niah-curves", "recall-bars")


def _runs(args: argparse.Namespace) -> list[CheckpointResult]:
    results = load_runs(args.runs)
    baseline = getattr(args, "baseline", None)
    if baseline is None:
        return results
    first = [r for r in results if r.label == baseline]
    if not first:
        raise ValueError(f"--baseline {baseline!r} is not among the loaded labels: "
                         f"{', '.join(r.label for r in results)}")
    return first + [r for r in results if r.label != baseline]


def _console() -> Console:
    """A terminal console, or a wide one when output goes to a file or pipe (rich would squash to 80 columns)."""
    console = Console()
    if not console.is_terminal:
        console.width = 240
    return console


def cmd_table(args: argparse.Namespace) -> int:
    results = _runs(args)
    if args.format == "rich":
        _console().print(rich_table(build_table(results, args.layout, args.with_paper)))
    else:
        print(render_table(results, args.layout, args.format, args.with_paper), end="")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    comparisons = compare_all(_runs(args), n_boot=args.n_boot, seed=args.seed)
    if args.format == "rich":
        console = _console()
        for table in compare_tables(comparisons):
            console.print(table)
    else:
        print(render_compare(comparisons, args.format), end="")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    print(write_report(_runs(args), args.out, n_boot=args.n_boot, seed=args.seed))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    results, out = _runs(args), Path(args.out)
    if args.kind == "niah-heatmap":
        paths = [plot_niah_heatmap(r, out / f"niah_{safe_filename(r.label)}.png") for r in results]
    elif args.kind == "niah-curves":
        paths = [plot_niah_curves(results, out / "niah_curves.png")]
    else:
        paths = [plot_recall_bars(results, out / "recall_bars.png")]
    for p in paths:
        print(p)
    return 0


def _add(subparsers: argparse._SubParsersAction, name: str, help_text: str,
         func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help=help_text, description=help_text)
    p.add_argument("runs", nargs="+", metavar="RUN", help="an output folder (all labels in it) or OUT/<label>")
    p.set_defaults(func=func)
    return p


def _add_stats(p: argparse.ArgumentParser) -> None:
    p.add_argument("--baseline", help="label to compare the others against (default: the first loaded)")
    p.add_argument("--n-boot", type=int, default=10000, help="bootstrap resamples (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``table``, ``compare``, ``report`` and ``plot`` on run_eval.py's subparsers."""
    p = _add(subparsers, "table", "show results in the layout of one of the paper's tables", cmd_table)
    p.add_argument("--layout", choices=LAYOUTS, default="table2", help="which paper table (default table2)")
    p.add_argument("--format", choices=FORMATS, default="rich", help="output format (default rich)")
    p.add_argument("--with-paper", action="store_true", help="add the paper's own rows under ours")

    p = _add(subparsers, "compare", "per-task deltas of checkpoints against a baseline, with paired "
                                    "bootstrap CIs and McNemar tests", cmd_compare)
    p.add_argument("--format", choices=("rich", "md"), default="rich", help="output format (default rich)")
    _add_stats(p)

    p = _add(subparsers, "report", "write report.md with tables, comparisons and plots", cmd_report)
    p.add_argument("--out", required=True, help="folder for report.md and plots/ (or a .md file path)")
    _add_stats(p)

    p = _add(subparsers, "plot", "write one kind of plot as PNG", cmd_plot)
    p.add_argument("--kind", choices=PLOT_KINDS, required=True, help="which plot")
    p.add_argument("--out", required=True, help="folder for the PNG files")
