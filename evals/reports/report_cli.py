"""``table``, ``compare``, ``report`` and ``plot`` subcommands; run_eval.py registers them with ``add_cli``.

    run_eval.py table OUT                      # the paper's tables the runs fill (or --layout all)
    run_eval.py table OUT --layout table2 --format md --with-paper
    run_eval.py compare OUT/gdn2-a OUT/gdn2-b --format md     # or --format json / csv
    run_eval.py compare ABLATION_OUT --baseline 'ckpt@gate=full'
    run_eval.py report OUT1 OUT2 --out report/
    run_eval.py plot OUT --kind niah-curves --out niah.png      # a file name, or a folder

A RUN is an output folder (every checkpoint label in it; ours, or one written by ``lm_eval --output_path``) or
one OUT/<label> folder. Incomplete runs and skipped (damaged) labels are named on stderr as ``warning:`` lines.
Bad input raises ValueError/FileNotFoundError with a one-line message naming the fix, which run_eval.py prints
(exit code 2).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from evals.reports.compare import FORMATS as COMPARE_FORMATS
from evals.reports.compare import compare_all, compare_tables, compare_warnings, render_compare
from evals.reports.plots import IMAGE_SUFFIXES, plot_niah_curves, plot_niah_heatmap, plot_recall_bars, safe_filename
from evals.reports.report import write_report
from evals.reports.results import CheckpointResult, incomplete_warnings, load_runs, warn
from evals.reports.tables import FORMATS, LAYOUTS, auto_layouts, build_table, layout_warnings, render_table, rich_table

PLOT_KINDS = ("niah-heatmap", "niah-curves", "recall-bars")


def _runs(args: argparse.Namespace) -> list[CheckpointResult]:
    """The runs asked for (a damaged label inside a folder is skipped with a warning), each incomplete one named
    on stderr, the --baseline first."""
    results = load_runs(args.runs)
    for line in incomplete_warnings(results):
        warn(line)
    baseline = getattr(args, "baseline", None)
    if baseline is None:
        return results
    first = [r for r in results if r.label == baseline]
    if not first:
        raise ValueError(f"--baseline {baseline!r} is not among the loaded labels; choose one of: "
                         f"{', '.join(r.label for r in results)}")
    return first + [r for r in results if r.label != baseline]


def _console() -> Console:
    """A terminal console, or a wide one when output goes to a file or pipe (rich would squash to 80 columns)."""
    console = Console()
    if not console.is_terminal:
        console.width = 240
    return console


def _check_stats(args: argparse.Namespace) -> None:
    if args.n_boot < 1:
        raise ValueError(f"--n-boot must be at least 1 (got {args.n_boot}); pass e.g. --n-boot 10000")


def cmd_table(args: argparse.Namespace) -> int:
    results = _runs(args)
    layouts = [args.layout] if args.layout else auto_layouts(results)
    if args.with_paper and not args.layout:
        layouts = [layout for layout in layouts if layout != "all"] or ["table2", "table3", "table4"]
    for line in layout_warnings(results, layouts, auto=not args.layout):
        warn(line)
    for i, layout in enumerate(layouts):
        if args.format == "rich":
            _console().print(rich_table(build_table(results, layout, args.with_paper)))  # type: ignore[arg-type]
        else:
            print(("\n" if i else "") + render_table(results, layout, args.format, args.with_paper),  # type: ignore
                  end="")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    _check_stats(args)
    comparisons = compare_all(_runs(args), n_boot=args.n_boot, seed=args.seed)
    if args.format == "rich":
        console = _console()
        for table in compare_tables(comparisons):
            console.print(table)
        for line in compare_warnings(comparisons):
            console.print(f"[bold]Warning:[/bold] {line}", soft_wrap=True)
    else:
        print(render_compare(comparisons, args.format), end="")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    _check_stats(args)
    out = Path(args.out)
    if out.suffix and out.suffix != ".md" and not out.is_dir():
        raise ValueError(f"--out {args.out}: the report is Markdown; give a folder (it gets report.md and plots/) "
                         f"or a file name ending in .md")
    print(write_report(_runs(args), out, n_boot=args.n_boot, seed=args.seed))
    return 0


def plot_target(out: Path, default_name: str) -> tuple[Path, bool]:
    """(path, is_file): ``--out F.png`` names the file itself, anything else is a folder for ``default_name``."""
    if out.suffix.lower() in IMAGE_SUFFIXES and not out.is_dir():
        return out, True
    if out.suffix and not out.is_dir() and not out.suffix[1:].isdigit():
        raise ValueError(f"--out {out}: {out.suffix!r} is not an image type; give a file name ending in "
                         f"{', '.join(IMAGE_SUFFIXES)} or a folder for the plots")
    return out / default_name, False


def cmd_plot(args: argparse.Namespace) -> int:
    results = _runs(args)
    out = Path(args.out)
    if args.kind == "niah-heatmap":
        target, is_file = plot_target(out, "niah.png")
        paths = []
        for r in results:
            if is_file:
                path = target if len(results) == 1 else target.with_name(
                    f"{target.stem}_{safe_filename(r.label)}{target.suffix}")
            else:
                path = out / f"niah_{safe_filename(r.label)}.png"
            paths.append(plot_niah_heatmap(r, path))
    elif args.kind == "niah-curves":
        paths = [plot_niah_curves(results, plot_target(out, "niah_curves.png")[0])]
    else:
        paths = [plot_recall_bars(results, plot_target(out, "recall_bars.png")[0])]
    for p in paths:
        print(p)
    return 0


def _add(subparsers: argparse._SubParsersAction, name: str, help_text: str,
         func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help=help_text, description=help_text)
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="an output folder (all labels in it; ours or lm_eval --output_path's) or one OUT/<label>")
    p.set_defaults(func=func)
    return p


def _add_stats(p: argparse.ArgumentParser) -> None:
    p.add_argument("--baseline", help="label to compare the others against (default: the first loaded)")
    p.add_argument("--n-boot", "--bootstrap_iters", dest="n_boot", type=int, default=10000,
                   help="bootstrap resamples (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``table``, ``compare``, ``report`` and ``plot`` on run_eval.py's subparsers."""
    p = _add(subparsers, "table", "show results in the layout of one of the paper's tables", cmd_table)
    p.add_argument("--layout", choices=LAYOUTS, default=None,
                   help="which paper table, or 'all' (every task and metric); default: the tables the runs fill")
    p.add_argument("--format", choices=FORMATS, default="rich", help="output format (default rich)")
    p.add_argument("--with-paper", action="store_true", help="add the paper's own rows under ours")

    p = _add(subparsers, "compare", "per-task deltas of checkpoints against a baseline, with paired "
                                    "BCa bootstrap CIs and exact McNemar tests", cmd_compare)
    p.add_argument("--format", choices=COMPARE_FORMATS, default="rich",
                   help="output format: rich, md, or machine-readable json/csv (default rich)")
    _add_stats(p)

    p = _add(subparsers, "report", "write report.md with tables, comparisons and plots", cmd_report)
    p.add_argument("--out", required=True, help="folder for report.md and plots/ (or a .md file path)")
    _add_stats(p)

    p = _add(subparsers, "plot", "write one kind of plot as PNG", cmd_plot)
    p.add_argument("--kind", choices=PLOT_KINDS, required=True, help="which plot")
    p.add_argument("--out", required=True,
                   help="the image file (F.png; several heatmaps become F_<label>.png) or a folder for the PNGs")
