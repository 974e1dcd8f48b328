"""Plots are written as non-empty PNGs from the right data; the report gathers tables, comparisons and plots."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pytest

from evals.reports.plots import niah_grid, plot_niah_curves, plot_niah_heatmap, plot_recall_bars
from evals.reports.report import write_report
from evals.reports.report_cli import add_cli
from evals.reports.results import CheckpointResult, load_run
from tests.fixtures.results.make_fixtures import make_fixture_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_fixture_runs(tmp_path_factory.mktemp("runs"))


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000, path


def test_niah_grid_reads_scores(runs: dict[str, Path]) -> None:
    a = load_run(runs["demo"])[0]
    tasks, lengths, grid = niah_grid(a)
    assert tasks == ["ruler_niah_single_1", "ruler_niah_single_2", "ruler_niah_single_3", "ruler_niah_multikey_1"]
    assert lengths == [1024, 2048, 4096, 8192]
    assert grid[2, 1] == pytest.approx(100 * a.scores["ruler_niah_single_3"]["2048"])
    del a.scores["ruler_niah_single_3"]["2048"]
    assert np.isnan(niah_grid(a)[2][2, 1])


def test_plots_are_written(runs: dict[str, Path], tmp_path: Path) -> None:
    demo = load_run(runs["demo"])
    assert_png(plot_niah_heatmap(demo[0], tmp_path / "sub" / "heat.png"))
    assert_png(plot_niah_curves(demo + load_run(runs["ablation"]), tmp_path / "curves.png"))
    assert_png(plot_recall_bars(demo, tmp_path / "bars.png"))


def test_plots_without_data_say_so(tmp_path: Path) -> None:
    empty = CheckpointResult("empty", tmp_path, {}, {}, {"piqa": {"acc": 0.5}}, {})
    with pytest.raises(ValueError, match="no NIAH results"):
        plot_niah_heatmap(empty, tmp_path / "x.png")
    with pytest.raises(ValueError, match="NIAH"):
        plot_niah_curves([empty], tmp_path / "x.png")
    with pytest.raises(ValueError, match="recall"):
        plot_recall_bars([empty], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_report_gathers_everything(runs: dict[str, Path], tmp_path: Path) -> None:
    results = load_run(runs["demo"]) + load_run(runs["ablation"])
    report = write_report(results, tmp_path / "rep", n_boot=200)
    assert report == tmp_path / "rep" / "report.md"
    text = report.read_text(encoding="utf-8")
    for heading in ("## Runs", "## Tables", "## Comparisons", "## Plots"):
        assert heading in text
    for title in ("Table 2:", "Table 3:", "Table 4:", "Table 5:"):
        assert title in text
    assert "*Paper (hybrid)*" in text and "A = gdn2-a, B = ckpt@gate=tied" in text
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert len(links) == 7 + 2  # a heatmap per checkpoint, the curves, the recall bars
    for link in links:
        assert_png(report.parent / link)


def test_report_single_run_and_warnings(runs: dict[str, Path], tmp_path: Path) -> None:
    one = load_run(runs["demo"] / "gdn2-a")
    one[0].config["limit"] = 10
    text = write_report(one, tmp_path / "one.md").read_text(encoding="utf-8")
    assert "## Comparisons" not in text and "Table 5:" not in text
    assert "ran on a subset" in text
    with pytest.raises(ValueError, match="at least one run"):
        write_report([], tmp_path)


def test_cli_report_and_plot(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", str(runs["demo"]), "--out", str(tmp_path / "r"), "--n-boot", "100"])
    assert args.func(args) == 0 and (tmp_path / "r" / "report.md").is_file()
    args = parser.parse_args(["plot", str(runs["ablation"]), "--kind", "niah-heatmap", "--out", str(tmp_path / "p")])
    assert args.func(args) == 0
    assert sorted(p.name for p in (tmp_path / "p").iterdir())[0] == "niah_ckpt_gate_expanded_b.png"
    assert capsys.readouterr().out.count(".png") == 5
