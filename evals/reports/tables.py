"""The paper's Tables 2-5 from stored results, in rich, Markdown, LaTeX or CSV, optionally beside the paper's rows.

Conventions (all formats):
- cells are percents (lm-eval fractions x 100) except perplexities; decimals follow the paper (NIAH cells 1, else 2);
- values of 1e4 and more (diverged perplexities) in scientific notation, ``3.06e+25``;
- averages are recomputed from the unrounded cells, and are "-" when any of their cells is missing;
- missing cells are "-" (empty in CSV);
- the best value per column is marked within each block of rows (our rows; the paper's recurrent rows; its hybrid
  rows), comparing the values as displayed, only where one row holds it alone (no mark on a tie, on an all-equal
  column, or in a block with fewer than two values): bold in rich/md/latex; in CSV the numbers stay plain and a
  last column ``best`` lists the row's best columns.

Layouts: the paper's table2..table5, whose NIAH columns (table3) follow the lengths the runs hold, and ``all`` (every
task and metric the runs hold, for tasks outside the paper's tables). ``auto_layouts`` picks the ones that show
something; ``layout_warnings`` says when a chosen layout shows nothing, or leaves tasks out.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rich.console import Console
from rich.table import Table
from rich.text import Text

from evals.reports.results import LENGTH_METRIC_RE, CheckpointResult, display_scale, is_perplexity

Layout = Literal["table2", "table3", "table4", "table5", "all"]
Format = Literal["rich", "md", "latex", "csv"]
PAPER_LAYOUTS: tuple[str, ...] = ("table2", "table3", "table4", "table5")
LAYOUTS: tuple[str, ...] = (*PAPER_LAYOUTS, "all")
FORMATS: tuple[str, ...] = ("rich", "md", "latex", "csv")
PAPER_TABLES = Path(__file__).resolve().parents[2] / "results" / "reference" / "paper_tables.json"
PAPER_KEYS = {"table2": "table2_lm_commonsense", "table3": "table3_ruler_niah", "table4": "table4_recall_2k",
              "table5": "table5_ablations"}
TITLES = {"table2": "Table 2: language modelling and zero-shot commonsense reasoning",
          "table3": "Table 3: RULER needle-in-a-haystack",
          "table4": "Table 4: real-world recall (inputs truncated to 2K)",
          "table5": "Table 5: gate ablations (one checkpoint, gate modes)",
          "all": "All tasks and metrics"}
MISSING = "-"
SCIENTIFIC_FROM = 1e4  # |value| from which cells switch to 3.06e+25 style
# Table 5's rows in the paper: w-only = scalar_b, b-only = scalar_w, GDN-2 = full, expanded b in [0,2] = expanded_b.
GATE_MODE_ORDER = ("scalar_b", "scalar_w", "full", "expanded_b", "tied")


@dataclass(frozen=True)
class Column:
    """One table column: a stored (task, metric) cell, or an average over other columns of the same table."""

    key: str  # the column name in paper_tables.json
    header: str
    task: str | None = None
    metric: str | None = None
    average_of: tuple[str, ...] = ()
    decimals: int = 2
    lower_is_better: bool = False


def _acc(key: str, header: str, task: str, metric: str = "acc") -> Column:
    return Column(key, header, task, metric)


TABLE2_ACCS = ("lambada_acc", "piqa_acc", "hellaswag_acc_norm", "winogrande_acc", "arc_easy_acc",
               "arc_challenge_acc", "openbookqa_acc", "siqa_acc", "boolq_acc")
TABLE4_TASKS = ("swde", "squad", "fda", "triviaqa", "nq", "drop")
NIAH_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1")
NIAH_HEADERS = {"niah_single_1": "S1", "niah_single_2": "S2", "niah_single_3": "S3", "niah_multikey_1": "MK1",
                "niah_multikey_2": "MK2", "niah_multikey_3": "MK3", "niah_multivalue": "MV", "niah_multiquery": "MQ"}
# Each RULER variant's paper name, default haystack and needle (tasks/ruler/niah.py VARIANTS), for plot panels.
NIAH_VARIANTS = {"niah_single_1": ("S-NIAH-1", "noise", "number"),
                 "niah_single_2": ("S-NIAH-2", "essay", "number"),
                 "niah_single_3": ("S-NIAH-3", "essay", "UUID"),
                 "niah_multikey_1": ("MK-NIAH-1", "essay", "1 of 4 keys"),
                 "niah_multikey_2": ("MK-NIAH-2", "needles", "number"),
                 "niah_multikey_3": ("MK-NIAH-3", "needles", "UUID key and value"),
                 "niah_multivalue": ("MV-NIAH", "essay", "4 values"),
                 "niah_multiquery": ("MQ-NIAH", "essay", "4 queries")}


def niah_name(task: str, haystack: str | None = None) -> str:
    """"S-NIAH-1 (noise, number)": the paper's name, then the haystack (the run's, when it overrode the variant's
    default, e.g. the quick suite's noise) and what the needle is."""
    short = task.removeprefix("ruler_")
    if short not in NIAH_VARIANTS:
        return short
    name, default, needle = NIAH_VARIANTS[short]
    return f"{name} ({haystack or default}, {needle})"


NIAH_LENGTHS = {"1K": 1024, "2K": 2048, "4K": 4096, "8K": 8192}
# Table 3 has no 8K column for S-NIAH-3 and MK-NIAH-1.
NIAH_CELLS = [(t, n) for t in NIAH_TASKS for n in NIAH_LENGTHS if not (n == "8K" and t in NIAH_TASKS[2:])]


def length_label(n: int) -> str:
    """1024 -> "1K" (the paper's spelling); lengths that are not a whole K stay as numbers ("256")."""
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def niah_column(task: str, length: str | int) -> Column:
    """The NIAH cell of ``task`` (without ``ruler_``) at ``length`` (a token count, or the paper's "4K")."""
    n = NIAH_LENGTHS[length] if isinstance(length, str) else int(length)
    return Column(f"{task}@{length_label(n)}", f"{NIAH_HEADERS.get(task, task)} {length_label(n)}", f"ruler_{task}",
                  str(n), decimals=1)


WIKI_PPL = Column("wikitext_ppl", "Wiki. ppl", "wikitext", "word_perplexity", lower_is_better=True)
LMB_PPL = Column("lambada_ppl", "LMB. ppl", "lambada_openai", "perplexity", lower_is_better=True)
TABLE2 = (
    WIKI_PPL, LMB_PPL,
    _acc("lambada_acc", "LMB. acc", "lambada_openai"),
    _acc("piqa_acc", "PIQA acc", "piqa"),
    _acc("hellaswag_acc_norm", "Hella. acc_n", "hellaswag", "acc_norm"),
    _acc("winogrande_acc", "Wino. acc", "winogrande"),
    _acc("arc_easy_acc", "ARC-e acc", "arc_easy"),
    _acc("arc_challenge_acc", "ARC-c acc", "arc_challenge"),
    _acc("openbookqa_acc", "OBQA acc", "openbookqa"),
    _acc("siqa_acc", "SIQA acc", "social_iqa"),
    _acc("boolq_acc", "BoolQ acc", "boolq"),
    Column("avg_acc", "Avg.", average_of=TABLE2_ACCS),
)
TABLE3 = tuple(niah_column(t, n) for t, n in NIAH_CELLS)
TABLE4 = (*(_acc(t, {"swde": "SWDE", "squad": "SQD", "fda": "FDA", "triviaqa": "TQA", "nq": "NQ",
                     "drop": "DROP"}[t], f"jrt_{t}", "contains") for t in TABLE4_TASKS),
          Column("avg", "Avg.", average_of=TABLE4_TASKS))
# Table 5's averages are Table 2's and Table 4's, over the same checkpoint's cells (hidden helper columns).
TABLE5 = (WIKI_PPL, LMB_PPL,
          Column("commonsense_avg", "Common. avg", average_of=TABLE2_ACCS),
          niah_column("niah_single_2", "4K"), niah_column("niah_single_3", "2K"),
          niah_column("niah_multikey_1", "4K"),
          Column("recall_avg", "Recall avg", average_of=TABLE4_TASKS))
COLUMNS: dict[str, tuple[Column, ...]] = {"table2": TABLE2, "table3": TABLE3, "table4": TABLE4, "table5": TABLE5}
CELL_COLUMNS = {c.key: c for c in (*TABLE2, *TABLE3, *TABLE4) if c.task is not None}


def average(values: Sequence[float | None]) -> float | None:
    """The paper's Avg.: the plain mean of the cells (in percent), or None when any cell is missing."""
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)  # type: ignore[arg-type]


def cell_value(result: CheckpointResult, col: Column) -> float | None:
    """The displayed (scaled, unrounded) value of ``col`` for ``result``; averages are computed from cells."""
    if col.average_of:
        return average([cell_value(result, CELL_COLUMNS[k]) for k in col.average_of])
    value = result.score(col.task or "", col.metric or "")
    return None if value is None else value * display_scale(col.metric or "")


def paper_average(row: dict[str, float], col: Column) -> float | None:
    """``average`` over a paper row's own cells (reproduces the paper's Avg. columns)."""
    return average([row.get(k) for k in col.average_of])


# ----------------------------------------------------------------------------------------------- table model

@dataclass
class Block:
    title: str | None  # None for our own rows
    rows: list[tuple[str, list[float | None]]]


@dataclass
class TableData:
    layout: str
    title: str
    row_header: str
    columns: tuple[Column, ...]
    blocks: list[Block]

    warnings: list[str] = field(default_factory=list)

    def fmt(self, j: int, value: float | None, missing: str = MISSING) -> str:
        if value is None:
            return missing
        if abs(value) >= SCIENTIFIC_FROM:
            return f"{value:.2e}"
        return f"{value:.{self.columns[j].decimals}f}"

    def best(self, block: Block) -> list[set[int]]:
        """Per row, the column indices where it alone holds the block's best displayed value."""
        marks: list[set[int]] = [set() for _ in block.rows]
        for j, col in enumerate(self.columns):
            shown = [(i, float(self.fmt(j, v))) for i, (_, vals) in enumerate(block.rows)
                     if (v := vals[j]) is not None]
            if len(shown) < 2:
                continue
            target = (min if col.lower_is_better else max)(v for _, v in shown)
            winners = [i for i, v in shown if v == target]
            if len(winners) == 1:  # a tie (or an all-equal column) has no best
                marks[winners[0]].add(j)
        return marks


def load_paper_tables(path: Path = PAPER_TABLES) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"paper reference {path} is missing; copy shared/reference/paper_tables.json there")
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _gate_mode(result: CheckpointResult) -> str:
    return str(result.config.get("gate_mode") or result.label)


def _ordered(results: Sequence[CheckpointResult], layout: str) -> list[CheckpointResult]:
    """Table 5 rows follow the paper's order of gate modes (others after them); other tables keep input order."""
    if layout != "table5":
        return list(results)
    rank = {m: i for i, m in enumerate(GATE_MODE_ORDER)}
    return sorted(results, key=lambda r: rank.get(_gate_mode(r), len(rank)))


def _row_labels(results: Sequence[CheckpointResult], layout: str) -> list[str]:
    if layout != "table5":
        return [r.label for r in results]
    modes = [_gate_mode(r) for r in results]
    if len(set(modes)) == len(modes):
        return modes
    return [f"{r.label} ({m})" for r, m in zip(results, modes)]


def _niah_lengths(results: Sequence[CheckpointResult], task: str) -> set[int]:
    return {int(m) for r in results for m in r.scores.get(f"ruler_{task}", {}) if LENGTH_METRIC_RE.match(m)}


def table3_columns(results: Sequence[CheckpointResult], with_paper: bool = False) -> tuple[Column, ...]:
    """Table 3's NIAH cells at the lengths the runs hold (256, 512, ... as well as the paper's 1K-8K), plus the
    paper's own cells when its rows are shown or when no run holds any NIAH length; other RULER NIAH variants the
    runs hold come after the paper's four."""
    held = {t.removeprefix("ruler_") for r in results for t in r.scores if t.startswith("ruler_niah")}
    tasks = [*NIAH_TASKS, *sorted(held - set(NIAH_TASKS))]
    any_lengths = any(_niah_lengths(results, t) for t in tasks)
    cols = []
    for task in tasks:
        lengths = _niah_lengths(results, task)
        if with_paper or not any_lengths:
            lengths |= {NIAH_LENGTHS[n] for t, n in NIAH_CELLS if t == task}
        cols += [niah_column(task, n) for n in sorted(lengths)]
    return tuple(cols)


def _task_rank(task: str) -> tuple[int, str]:
    order = [c.task for layout in ("table2", "table3", "table4") for c in COLUMNS[layout] if c.task]
    return (order.index(task), task) if task in order else (len(order), task)


def all_columns(results: Sequence[CheckpointResult]) -> tuple[Column, ...]:
    """One column per (task, metric) any run holds: the paper's tasks first in its order, then by name."""
    tasks = sorted({t for r in results for t in r.scores}, key=_task_rank)
    cols = []
    for task in tasks:
        metrics = {m for r in results for m in r.scores.get(task, {})}
        lengths = sorted((m for m in metrics if LENGTH_METRIC_RE.match(m)), key=int)
        for metric in [*lengths, *sorted(metrics - set(lengths))]:
            flags = [r.higher_is_better.get(task, {}).get(metric.partition(",")[0]) for r in results]
            flag = next((f for f in flags if isinstance(f, bool)), None)
            lower = (not flag) if flag is not None else is_perplexity(metric)
            label = length_label(int(metric)) if metric in lengths else metric
            cols.append(Column(f"{task}:{metric}", f"{task} {label}", task, metric,
                               decimals=1 if metric in lengths else 2, lower_is_better=lower))
    return tuple(cols)


def columns_for(layout: str, results: Sequence[CheckpointResult], with_paper: bool = False) -> tuple[Column, ...]:
    if layout == "table3":
        return table3_columns(results, with_paper)
    if layout == "all":
        return all_columns(results)
    if layout not in COLUMNS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    return COLUMNS[layout]


def _layout_tasks(layout: str, results: Sequence[CheckpointResult]) -> set[str]:
    cols = columns_for(layout, results)
    return {c.task for c in cols if c.task} | {CELL_COLUMNS[k].task for c in cols for k in c.average_of
                                               if CELL_COLUMNS[k].task}  # type: ignore[misc]


def _gate_modes(results: Sequence[CheckpointResult]) -> set[str]:
    return {str(r.config["gate_mode"]) for r in results if r.config.get("gate_mode")}


def auto_layouts(results: Sequence[CheckpointResult]) -> list[str]:
    """The layouts that show something of ``results``: the paper's tables 2-4 that have cells, table 5 when the
    runs span two or more gate modes, and ``all`` when none of those does."""
    shown = [layout for layout in ("table2", "table3", "table4") if has_cells(results, layout)]
    if len(_gate_modes(results)) > 1 and has_cells(results, "table5"):
        shown.append("table5")
    return shown or ["all"]


def layout_warnings(results: Sequence[CheckpointResult], layouts: Sequence[str], auto: bool = False) -> list[str]:
    """A line when a layout shows none of the runs' scores; for layouts chosen automatically (``auto``), one
    naming the tasks none of them shows."""
    held = sorted({t for r in results for t in r.scores}, key=_task_rank)
    if not results or not held:
        return []
    out = []
    for layout in layouts:
        if layout != "all" and not has_cells(results, layout):
            fits = auto_layouts(results)
            out.append(f"layout {layout} shows none of these runs' scores (they hold {', '.join(held[:5])}"
                       f"{' ...' if len(held) > 5 else ''}); use --layout {' or '.join(fits)}, or leave --layout "
                       f"out to choose from the runs")
    if auto and "all" not in layouts:
        shown = set().union(*(_layout_tasks(layout, results) for layout in layouts))
        left = [t for t in held if t not in shown]
        if left and any(has_cells(results, layout) for layout in layouts):
            out.append(f"not in the table(s) shown: {', '.join(left[:8])}{' ...' if len(left) > 8 else ''} "
                       f"(--layout all shows every task)")
    return out


def build_table(results: Sequence[CheckpointResult], layout: Layout, with_paper: bool = False) -> TableData:
    if with_paper and layout == "all":
        raise ValueError("the paper has no rows for --layout all; drop --with-paper, or choose one of "
                         f"{', '.join(PAPER_LAYOUTS)}")
    cols = columns_for(layout, results, with_paper)
    results = _ordered(results, layout)
    ours = Block(None, [(label, [cell_value(r, c) for c in cols])
                        for label, r in zip(_row_labels(results, layout), results)])
    blocks = [ours] if ours.rows else []
    if with_paper:
        paper = load_paper_tables()[PAPER_KEYS[layout]]["rows"]
        for group, rows in paper.items():
            blocks.append(Block(f"Paper ({group})", [(name, [row.get(c.key) for c in cols])
                                                     for name, row in rows.items()]))
    if not blocks:
        raise ValueError(f"nothing to show for {layout}: no results given; pass a run folder or --with-paper")
    row_header = "Gate mode" if layout == "table5" else "Model"
    return TableData(layout, TITLES[layout], row_header, cols, blocks, layout_warnings(results, [layout]))


# ----------------------------------------------------------------------------------------------- renderers

def _arrow(col: Column) -> str:
    return "↓" if col.lower_is_better else "↑"


def rich_table(data: TableData) -> Table:
    """The table as a ``rich.table.Table`` (best values bold, paper blocks in their own sections)."""
    table = Table(title=data.title, show_lines=False)
    table.add_column(data.row_header, no_wrap=True)
    for col in data.columns:
        table.add_column(f"{col.header} {_arrow(col)}", justify="right", no_wrap=True)
    for block in data.blocks:
        if block.title is not None:
            table.add_section()
            table.add_row(Text(block.title, style="italic"), *[""] * len(data.columns))
        for (name, vals), marks in zip(block.rows, data.best(block)):
            table.add_row(name, *[Text(data.fmt(j, v), style="bold" if j in marks else "")
                                  for j, v in enumerate(vals)])
    return table


def _to_rich_text(data: TableData) -> str:
    console = Console(file=io.StringIO(), width=400, color_system=None, force_terminal=False,
                      legacy_windows=False, emoji=False)
    console.print(rich_table(data))
    lines = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _to_md(data: TableData) -> str:
    n = len(data.columns)
    lines = [f"**{data.title}**", "",
             "| " + " | ".join([data.row_header, *(f"{c.header} {_arrow(c)}" for c in data.columns)]) + " |",
             "|" + "---|" + "---:|" * n]
    for block in data.blocks:
        if block.title is not None:
            lines.append("| " + " | ".join([f"*{block.title}*", *[""] * n]) + " |")
        for (name, vals), marks in zip(block.rows, data.best(block)):
            cells = [f"**{data.fmt(j, v)}**" if j in marks else data.fmt(j, v) for j, v in enumerate(vals)]
            lines.append("| " + " | ".join([name.replace("|", "\\|"), *cells]) + " |")
    return "\n".join(lines) + "\n"


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in text)


def _to_latex(data: TableData) -> str:
    n = len(data.columns)
    arrows = {"↓": r"$\downarrow$", "↑": r"$\uparrow$"}
    header = [latex_escape(data.row_header),
              *(f"{latex_escape(c.header)} {arrows[_arrow(c)]}" for c in data.columns)]
    lines = [f"% {data.title}", r"\begin{tabular}{l" + "r" * n + "}", r"\toprule", " & ".join(header) + r" \\",
             r"\midrule"]
    for b, block in enumerate(data.blocks):
        if block.title is not None:
            if b > 0:
                lines.append(r"\midrule")
            lines.append(rf"\multicolumn{{{n + 1}}}{{l}}{{\textit{{{latex_escape(block.title)}}}}} \\")
        for (name, vals), marks in zip(block.rows, data.best(block)):
            cells = [rf"\textbf{{{data.fmt(j, v)}}}" if j in marks else data.fmt(j, v) for j, v in enumerate(vals)]
            lines.append(" & ".join([latex_escape(name), *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _to_csv(data: TableData) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["group", "model", *(c.key for c in data.columns), "best"])
    for block in data.blocks:
        group = block.title or "ours"
        for (name, vals), marks in zip(block.rows, data.best(block)):
            best = ";".join(data.columns[j].key for j in sorted(marks))
            writer.writerow([group, name, *(data.fmt(j, v, "") for j, v in enumerate(vals)), best])
    return buf.getvalue()


RENDERERS: dict[str, Callable[[TableData], str]] = {"rich": _to_rich_text, "md": _to_md, "latex": _to_latex,
                                                     "csv": _to_csv}


def render_table(results: Sequence[CheckpointResult], layout: Layout, fmt: Format = "rich",
                 with_paper: bool = False) -> str:
    """Render ``results`` in the paper's ``layout`` (table2..table5) as text in ``fmt`` (rich/md/latex/csv)."""
    if fmt not in RENDERERS:
        raise ValueError(f"unknown table format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return RENDERERS[fmt](build_table(results, layout, with_paper))


def has_cells(results: Sequence[CheckpointResult], layout: str) -> bool:
    """True when any result fills any cell of ``layout`` (the report skips empty tables)."""
    cols = columns_for(layout, results)
    return any(cell_value(r, c) is not None for r in results for c in cols)
