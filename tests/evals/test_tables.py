"""Paper tables: exact text per layout and format, averages against the paper's own, best marks, the CLI."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from rich.text import Text

from evals.reports.report_cli import add_cli
from evals.reports.results import CheckpointResult, load_run
from evals.reports.tables import (
    COLUMNS,
    TABLE2_ACCS,
    auto_layouts,
    build_table,
    layout_warnings,
    load_paper_tables,
    paper_average,
    render_table,
    rich_table,
)
from tests.fixtures.results.make_fixtures import EXPECTED_CASES, expected_path, make_fixture_runs, render_case


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_fixture_runs(tmp_path_factory.mktemp("runs"))


def result(label: str, scores: dict[str, dict[str, float]], **config: str) -> CheckpointResult:
    return CheckpointResult(label, Path(label), dict(config), {}, scores, {})


@pytest.mark.parametrize("layout,fmt,with_paper", EXPECTED_CASES,
                         ids=[f"{lay}-{fmt}{'-paper' if p else ''}" for lay, fmt, p in EXPECTED_CASES])
def test_rendered_text_matches_expected(runs: dict[str, Path], layout: str, fmt: str, with_paper: bool) -> None:
    expected = expected_path(layout, fmt, with_paper).read_text(encoding="utf-8")
    assert render_case(runs, layout, fmt, with_paper) == expected


PAPER_AVERAGES = [("table2", "avg_acc", 13), ("table4", "avg", 13)]


@pytest.mark.parametrize("layout,avg_key,n_rows", PAPER_AVERAGES)
def test_averages_reproduce_paper(layout: str, avg_key: str, n_rows: int) -> None:
    paper = load_paper_tables()
    key = {"table2": "table2_lm_commonsense", "table4": "table4_recall_2k"}[layout]
    col = next(c for c in COLUMNS[layout] if c.key == avg_key)
    rows = [(g, name, row) for g, grp in paper[key]["rows"].items() for name, row in grp.items()]
    assert len(rows) == n_rows
    for group, name, row in rows:
        assert abs(paper_average(row, col) - row[avg_key]) <= 0.005 + 1e-9, (group, name)


def test_eight_number_average_does_not_reproduce_paper() -> None:
    """The spec's check that LAMBADA acc belongs in Avg.: without it no row matches."""
    rows = [row for grp in load_paper_tables()["table2_lm_commonsense"]["rows"].values() for row in grp.values()]
    eight = [sum(row[k] for k in TABLE2_ACCS[1:]) / 8 for row in rows]
    assert all(abs(e - row["avg_acc"]) > 0.005 for e, row in zip(eight, rows))


def test_table5_averages_are_table2_and_table4_averages() -> None:
    paper = load_paper_tables()
    gdn2 = paper["table5_ablations"]["rows"]["recurrent"]["Gated DeltaNet-2 (b in [0,1])"]
    assert gdn2["commonsense_avg"] == paper["table2_lm_commonsense"]["rows"]["recurrent"]["Gated DeltaNet-2"]["avg_acc"]
    assert gdn2["recall_avg"] == paper["table4_recall_2k"]["rows"]["recurrent"]["Gated DeltaNet-2"]["avg"]


def test_average_recomputed_from_cells(runs: dict[str, Path]) -> None:
    a, b = load_run(runs["demo"])
    data = build_table([a, b], "table2")
    accs = [100 * a.scores[t][m] for t, m in [("lambada_openai", "acc"), ("piqa", "acc"), ("hellaswag", "acc_norm"),
                                              ("winogrande", "acc"), ("arc_easy", "acc"), ("arc_challenge", "acc"),
                                              ("openbookqa", "acc"), ("social_iqa", "acc"), ("boolq", "acc")]]
    assert data.blocks[0].rows[0][1][-1] == pytest.approx(sum(accs) / 9)
    recall = build_table([a, b], "table4").blocks[0].rows
    assert recall[0][1][-1] is not None and recall[1][1][-1] is None  # gdn2-b has no jrt_drop: no average


def test_best_marks_direction_ties_and_single_rows() -> None:
    x = result("x", {"wikitext": {"word_perplexity": 15.0}, "piqa": {"acc": 0.70}, "boolq": {"acc": 0.6}})
    y = result("y", {"wikitext": {"word_perplexity": 16.0}, "piqa": {"acc": 0.75}, "boolq": {"acc": 0.6}})
    md = render_table([x, y], "table2", "md").splitlines()
    x_row, y_row = md[4].split(" | "), md[5].split(" | ")
    assert x_row[1] == "**15.00**" and y_row[1] == "16.00"  # perplexity: lower wins
    assert x_row[4] == "70.00" and y_row[4] == "**75.00**"  # accuracy: higher wins
    assert x_row[11] == "60.00" and y_row[11] == "60.00"  # a tie has no best
    assert "**" not in render_table([x], "table2", "md").splitlines()[4]  # nothing to beat in a single row
    csv = render_table([x, y], "table2", "csv").splitlines()
    assert csv[1].endswith(",wikitext_ppl") and csv[2].endswith(",piqa_acc")
    assert csv[1].split(",")[4] == ""  # a missing cell is empty in CSV, not "-"
    table = rich_table(build_table([x, y], "table2"))
    cell = table.columns[1]._cells[0]
    assert isinstance(cell, Text) and cell.plain == "15.00" and cell.style == "bold"


def test_table5_rows_by_gate_mode_in_paper_order() -> None:
    rows = [result(f"c@{m}", {"wikitext": {"word_perplexity": 1.0}}, gate_mode=m) for m in ("tied", "full", "scalar_b")]
    assert [name for name, _ in build_table(rows, "table5").blocks[0].rows] == ["scalar_b", "full", "tied"]
    twice = rows + [result("d@full", {}, gate_mode="full")]
    assert "d@full (full)" in [name for name, _ in build_table(twice, "table5").blocks[0].rows]


def test_latex_escapes_labels_and_bad_arguments() -> None:
    assert "my\\_ckpt\\&co" in render_table([result("my_ckpt&co", {})], "table4", "latex")
    with pytest.raises(ValueError, match="unknown layout"):
        render_table([], "table9", "md")
    with pytest.raises(ValueError, match="unknown table format"):
        render_table([], "table2", "html")
    with pytest.raises(ValueError, match="nothing to show"):
        render_table([], "table2", "md")


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_table(runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["table", str(runs["demo"]), "--layout", "table4", "--format", "md", "--with-paper"]) == 0
    assert capsys.readouterr().out == expected_path("table4", "md", True).read_text(encoding="utf-8")
    assert run_cli(["table", str(runs["demo"] / "gdn2-a"), "--layout", "table3"]) == 0
    assert "gdn2-a" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError):
        run_cli(["table", str(runs["demo"] / "nope")])


def test_all_equal_and_zero_columns_have_no_best() -> None:
    rows = [result(n, {"piqa": {"acc": 0.0}, "boolq": {"acc": 0.5 + 0.1 * i}}) for i, n in enumerate("xyz")]
    md = render_table(rows, "table2", "md")
    assert "**0.00**" not in md and md.count("**") == 4 and "**70.00**" in md  # the title's and 70's


def test_diverged_perplexity_in_scientific_notation() -> None:
    rows = [result("x", {"wikitext": {"word_perplexity": 30603102229402531443769344.0}}),
            result("y", {"wikitext": {"word_perplexity": 9999.5}})]
    md = render_table(rows, "table2", "md")
    assert "3.06e+25" in md and "30603102229402531443769344" not in md and "**9999.50**" in md
    assert "3.06e+25" in render_table(rows, "table2", "csv")


def test_niah_columns_follow_the_run_lengths(runs: dict[str, Path]) -> None:
    needle = load_run(runs["needle"])
    headers = [c.header for c in build_table(needle, "table3").columns]
    assert headers == ["S1 256", "S1 512", "S1 1K", "S2 256", "S2 512", "S2 1K"]
    with_paper = [c.header for c in build_table(needle, "table3", with_paper=True).columns]
    assert with_paper[:5] == ["S1 256", "S1 512", "S1 1K", "S1 2K", "S1 4K"] and "MK1 4K" in with_paper
    assert [c.header for c in build_table([], "table3", with_paper=True).columns] == [
        c.header for c in COLUMNS["table3"]]  # the paper's own columns when no run has lengths


def test_layout_chosen_from_the_runs_and_warned_when_empty(runs: dict[str, Path]) -> None:
    needle, demo, ablation = (load_run(runs[k]) for k in ("needle", "demo", "ablation"))
    assert auto_layouts(needle) == ["table2", "table3"]  # wikitext and NIAH
    assert auto_layouts(demo) == ["table2", "table3", "table4"]
    assert auto_layouts(ablation) == ["table2", "table3", "table4", "table5"]
    only_niah = [result("n", {"ruler_niah_single_1": {"256": 0.5}})]
    [warning] = layout_warnings(only_niah, ["table2"])
    assert warning.startswith("layout table2 shows none of these runs' scores (they hold ruler_niah_single_1)")
    assert "use --layout table3" in warning
    other = [result("o", {"lambada_standard": {"acc": 0.5}, "piqa": {"acc": 0.6}})]
    assert auto_layouts([result("o", {"lambada_standard": {"acc": 0.5}})]) == ["all"]
    assert layout_warnings(other, ["table2"]) == []  # asked for: no word about the rest
    assert layout_warnings(other, ["table2"], auto=True) == [
        "not in the table(s) shown: lambada_standard (--layout all shows every task)"]
    assert "| o | 50.00 | 60.00 |" in render_table(other, "all", "md") or "| o | 60.00 | 50.00 |" in render_table(
        other, "all", "md")


def test_cli_table_auto_layout_warnings_and_incomplete_runs(runs: dict[str, Path],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["table", str(runs["needle"]), "--format", "md"]) == 0
    captured = capsys.readouterr()
    assert captured.out == (expected_path("needle_table2", "md", False).read_text(encoding="utf-8") + "\n"
                            + expected_path("needle_table3", "md", False).read_text(encoding="utf-8"))
    assert captured.err == ""
    assert run_cli(["table", str(runs["needle"]), "--layout", "table4", "--format", "csv"]) == 0
    assert "warning: layout table4 shows none of these runs' scores" in capsys.readouterr().err
    assert run_cli(["table", str(runs["demo"]), "--layout", "table4", "--format", "md"]) == 0
    err = capsys.readouterr().err
    assert "not in the table(s) shown" not in err
    assert "warning: gdn2-b is incomplete: 1 of 20 task(s) missing (jrt_drop)" in err


def test_cli_table_reads_an_lm_eval_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.fixtures.results.lm_eval_folder import make_lm_eval_output

    out = make_lm_eval_output(tmp_path / "lm", "org/tiny-a", 0.5, tmp_path / "work")
    capsys.readouterr()
    assert run_cli(["table", str(out), "--format", "md"]) == 0
    captured = capsys.readouterr()
    assert "**All tasks and metrics**" in captured.out and "| org__tiny-a | 42.50 |" in captured.out
    assert captured.err == ""


@pytest.mark.parametrize("argv,says", [
    (["table", "{tmp}/nope"], "does not exist"),
    (["table", "{bad}"], "is not valid JSON"),
    (["compare", "{demo}", "--n-boot", "0"], "--n-boot must be at least 1"),
    (["compare", "{demo}", "--baseline", "zzz"], "--baseline 'zzz' is not among the loaded labels"),
    (["compare", "{demo}/gdn2-a"], "at least two checkpoints"),
    (["plot", "{demo}", "--kind", "niah-curves", "--out", "{tmp}/x.txt"], "is not an image type"),
    (["report", "{demo}", "--out", "{tmp}/r.txt"], "the report is Markdown"),
    (["table", "{demo}", "--layout", "all", "--with-paper"], "the paper has no rows for --layout all"),
])
def test_cli_bad_input_is_one_line_and_exit_2(runs: dict[str, Path], tmp_path: Path, argv: list[str], says: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    import run_eval

    bad = tmp_path / "bad"
    shutil.copytree(runs["needle"] / "needle-a", bad)
    next(bad.glob("results_*.json")).write_text('{"results": ')
    paths = {"tmp": str(tmp_path), "bad": str(bad), "demo": str(runs["demo"])}
    assert run_eval.main([a.format(**paths) for a in argv]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning:")]
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
