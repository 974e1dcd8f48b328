"""Plots are written as non-empty PNGs from the right data; the report gathers tables, comparisons and plots."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pytest

from evals.reports import plots
from evals.reports.plots import niah_grid, niah_stderr, plot_niah_curves, plot_niah_heatmap, plot_recall_bars
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


@pytest.fixture()
def figures(monkeypatch: pytest.MonkeyPatch) -> list:
    """The Figure objects the plot functions build (and still save)."""
    seen: list = []
    real = plots._save

    def keep(fig, out_path):
        seen.append(fig)
        return real(fig, out_path)

    monkeypatch.setattr(plots, "_save", keep)
    return seen


def test_heatmap_is_colour_blind_safe_with_a_labelled_bar(runs: dict[str, Path], tmp_path: Path,
                                                          figures: list) -> None:
    plot_niah_heatmap(load_run(runs["needle"])[0], tmp_path / "h.png")
    ax, bar_ax = figures[0].axes
    assert ax.images[0].cmap.name.startswith("cividis") and bar_ax.get_ylabel() == "accuracy (%)"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["S-NIAH-1 (noise, number)", "S-NIAH-2 (essay, number)"]
    run = load_run(runs["needle"])[0]
    run.config["task_metadata"] = {"ruler_niah_single_2": {"haystack": "noise"}}  # as the quick suite runs it
    plot_niah_heatmap(run, tmp_path / "h2.png")
    assert figures[1].axes[0].get_yticklabels()[1].get_text() == "S-NIAH-2 (noise, number)"


def test_curves_are_distinguishable_with_error_bars(runs: dict[str, Path], tmp_path: Path, figures: list) -> None:
    needle = load_run(runs["needle"])
    twin = load_run(runs["needle"] / "needle-a")[0]
    twin.label = "needle-a-again"  # the very same numbers: its line must not hide under needle-a's
    plot_niah_curves([*needle, twin], tmp_path / "c.png")
    ax = figures[0].axes[0]
    assert ax.get_title() == "S-NIAH-1 (noise, number)"
    lines = [c.lines[0] for c in ax.containers]  # errorbar containers: (data line, caps, bars)
    assert len({(ln.get_marker(), ln.get_linestyle(), ln.get_color()) for ln in lines}) == 3
    x_a, x_twin = (np.asarray(ln.get_xdata(), dtype=float) for ln in (lines[0], lines[2]))
    assert all(a != t for a, t in zip(x_a, x_twin)) and np.allclose(x_a, x_twin, rtol=0.1)  # offset, slightly
    assert list(lines[0].get_ydata()) == list(lines[2].get_ydata())
    bars = ax.containers[0].lines[2][0].get_segments()  # the vertical error bars of needle-a
    assert len(bars) == 3 and all(seg[1][1] > seg[0][1] for seg in bars)


def test_stderr_is_binomial_over_the_samples(runs: dict[str, Path]) -> None:
    a = load_run(runs["needle"])[0]
    p = a.scores["ruler_niah_single_1"]["256"]
    assert niah_stderr(a, "ruler_niah_single_1", 256) == pytest.approx(100 * np.sqrt(p * (1 - p) / 19))
    a.stderrs["ruler_niah_single_1"] = {"256": 0.05}  # lm-eval's own, where it computed one
    assert niah_stderr(a, "ruler_niah_single_1", 256) == pytest.approx(5.0)


def test_cli_plot_out_takes_a_file_name(runs: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command", required=True))

    def plot(*argv: str) -> int:
        args = parser.parse_args(["plot", *argv])
        return args.func(args)

    assert plot(str(runs["needle"]), "--kind", "niah-curves", "--out", str(tmp_path / "F.png")) == 0
    assert (tmp_path / "F.png").is_file()
    assert_png(tmp_path / "F.png")
    assert plot(str(runs["needle"]), "--kind", "niah-heatmap", "--out", str(tmp_path / "heat.png")) == 0
    assert sorted(p.name for p in tmp_path.glob("heat*")) == ["heat_needle-a.png", "heat_needle-b.png"]
    assert plot(str(runs["needle"]), "--kind", "niah-curves", "--out", str(tmp_path / "folder")) == 0
    assert (tmp_path / "folder" / "niah_curves.png").is_file()  # a folder still works
    with pytest.raises(ValueError, match="'.txt' is not an image type"):
        plot(str(runs["needle"]), "--kind", "niah-curves", "--out", str(tmp_path / "F.txt"))
    capsys.readouterr()
    assert plot(str(runs["demo"]), "--kind", "recall-bars", "--out", str(tmp_path / "bars.png")) == 0
    assert "warning: gdn2-b is incomplete: 1 of 20 task(s) missing (jrt_drop)" in capsys.readouterr().err


def test_report_runs_table_shows_the_runners_keys(runs: dict[str, Path], tmp_path: Path) -> None:
    text = write_report(load_run(runs["demo"]), tmp_path / "r.md", n_boot=100).read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| gdn2-b |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[1:6] == ["gdn2-b.safetensors", "gdn2", "full", "float32", "cpu"]
    assert len(cells[8]) == 16 and cells[8] != "-" and cells[9:] == ["19/20", "False"]
    assert "**Warning:** gdn2-b is incomplete: 1 of 20 task(s) missing (jrt_drop)" in text


def test_report_runs_table_on_a_real_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A real (tiny) run through run_eval.main: the Runs table shows its format, dtype, device and weights hash."""
    import json

    import run_eval

    out = tmp_path / "out"
    assert run_eval.main(["run", "--checkpoint", "demo:gdn2-demo", "--tasks", "ruler_niah_single_1", "--lengths",
                          "512", "--num-samples", "2", "--output", str(out)]) == 0
    capsys.readouterr()
    config = json.loads((out / "gdn2-demo" / "config.json").read_text())
    # a script written against lm-eval's output reads the folder unchanged
    from lm_eval.utils import get_latest_filename, get_results_filenames, make_table

    d = json.loads(Path(get_latest_filename(get_results_filenames([str(p) for p in out.rglob("*")]))).read_text())
    assert d["config"]["model_args"].startswith("pretrained=demo:gdn2-demo") and d["model_name"] == "demo:gdn2-demo"
    assert "ruler_niah_single_1" in make_table(d) and d["task_hashes"]["ruler_niah_single_1"]
    assert run_eval.main(["report", str(out), "--out", str(tmp_path / "rep"), "--n-boot", "100"]) == 0
    text = (tmp_path / "rep" / "report.md").read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| gdn2-demo |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    model = config["model"]
    assert cells[2] == model["format"] and cells[4:6] == [model["dtype"], model["device"]]
    assert cells[8] == model["sha256"][:16] and cells[10] == "True"
    assert "-" not in cells[1:7] and "Table 3:" in text and "S1 512" in text
    assert run_eval.main(["plot", str(out), "--kind", "niah-curves", "--out", str(tmp_path / "c.png")]) == 0
    assert_png(tmp_path / "c.png")
