"""compare: paired BCa bootstrap CI (scipy) and exact McNemar (scipy) on synthetic pairs with a known answer."""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from evals.reports.compare import (
    compare_all,
    compare_runs,
    compare_warnings,
    mcnemar_exact,
    paired_bootstrap,
    render_compare,
    verdict,
)
from evals.reports.report_cli import add_cli
from evals.reports.results import CheckpointResult, RunStore, load_run

N_DOCS = 200


def store_task(out: Path, label: str, task: str, records: list[dict], scores: dict[str, float],
               lower: tuple[str, ...] = ()) -> None:
    entry = {f"{m},none": v for m, v in scores.items()}
    RunStore(out).save_task(label, task, {"results": {task: entry}, "samples": {task: records},
                                          "higher_is_better": {task: {m: m not in lower for m in scores}}}, {})


def binary_run(out: Path, label: str, correct: list[int], task: str = "piqa", shuffle: bool = False) -> None:
    records = [{"doc_id": i, "filter": "none", "acc": float(c), "doc_hash": f"h{i}"} for i, c in enumerate(correct)]
    if shuffle:
        random.Random(1).shuffle(records)
    store_task(out, label, task, records, {"acc": sum(correct) / len(correct)})


def by_label(out: Path) -> dict[str, CheckpointResult]:
    return {r.label: r for r in load_run(out)}


def test_mcnemar_matches_hand_computed_binomial() -> None:
    # 8 discordant pairs for B, 2 for A: p = 2 * P(X <= 2), X ~ Bin(10, 1/2) = 2 * (1 + 10 + 45) / 1024
    assert mcnemar_exact(8, 2) == pytest.approx(112 / 1024)
    assert mcnemar_exact(2, 8) == mcnemar_exact(8, 2)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(3000, 2000) == pytest.approx(0.0, abs=1e-40)  # large n stays exact, no overflow


def test_b_right_on_k_more_docs(tmp_path: Path) -> None:
    k = 30
    a = [1] * 100 + [0] * 100
    b = [1] * (100 + k) + [0] * (100 - k)
    binary_run(tmp_path, "a", a)
    binary_run(tmp_path, "b", b, shuffle=True)  # pairing is by doc_id, not by line order
    runs = by_label(tmp_path)
    [c] = compare_runs(runs["a"], runs["b"], n_boot=4000, seed=3)
    true_delta = k / N_DOCS
    assert (c.task, c.metric, c.n_paired) == ("piqa", "acc", N_DOCS)
    assert c.delta == pytest.approx(true_delta) and c.paired_delta == pytest.approx(true_delta)
    assert (c.only_b_right, c.only_a_right) == (k, 0)
    assert c.p_value == pytest.approx(2 * 0.5**k)
    # The paired differences are k ones among N zeros: the CI is about delta +- 1.96 sqrt(p(1-p)/N).
    se = math.sqrt(true_delta * (1 - true_delta) / N_DOCS)
    assert c.ci_low < true_delta < c.ci_high
    assert c.ci_low == pytest.approx(true_delta - 1.96 * se, abs=0.012)
    assert c.ci_high == pytest.approx(true_delta + 1.96 * se, abs=0.012)
    assert c.outcome == "win"
    [back] = compare_runs(runs["b"], runs["a"], n_boot=4000, seed=3)
    assert back.outcome == "loss" and back.p_value == c.p_value


def test_discordant_both_ways_is_a_tie(tmp_path: Path) -> None:
    # B gains 6 docs and loses 4: delta 1%, p = 2 * P(X <= 4 | n=10) = 2 * 386 / 1024
    a = [1] * 4 + [0] * 6 + [1] * 90 + [0] * 100
    b = [0] * 4 + [1] * 6 + [1] * 90 + [0] * 100
    binary_run(tmp_path, "a", a)
    binary_run(tmp_path, "b", b)
    runs = by_label(tmp_path)
    [c] = compare_runs(runs["a"], runs["b"], n_boot=2000)
    assert c.delta == pytest.approx(0.01) and c.p_value == pytest.approx(2 * 386 / 1024)
    assert c.ci_low < 0 < c.ci_high and c.outcome == "tie"


def test_identical_runs_give_zero_interval(tmp_path: Path) -> None:
    same = [i % 2 for i in range(50)]
    binary_run(tmp_path, "a", same)
    binary_run(tmp_path, "b", same)
    runs = by_label(tmp_path)
    [c] = compare_runs(runs["a"], runs["b"], n_boot=500)
    assert (c.ci_low, c.ci_high, c.p_value, c.outcome) == (0.0, 0.0, 1.0, "tie")


def test_pairs_only_shared_docs_with_equal_content(tmp_path: Path) -> None:
    records_a = [{"doc_id": i, "acc": 1.0, "doc_hash": f"h{i}"} for i in range(10)]
    records_b = [{"doc_id": i, "acc": 0.0, "doc_hash": "other" if i == 2 else f"h{i}"} for i in range(5, 15)]
    records_b.append({"doc_id": 99, "doc_hash": "x"})  # lacks the metric: skipped, not an error
    store_task(tmp_path, "a", "piqa", records_a, {"acc": 1.0})
    store_task(tmp_path, "b", "piqa", records_b, {"acc": 0.0})
    runs = by_label(tmp_path)
    [c] = compare_runs(runs["a"], runs["b"], n_boot=200)
    assert c.n_paired == 5 and c.only_a_right == 5 and c.ci_high < 0
    assert c.p_value == pytest.approx(0.0625) and c.outcome == "tie"  # 5 pairs cannot reach p < 0.05
    assert compare_warnings([c]) == ["A = a, B = b: fewer than 30 paired samples (n = 5) in all 1 compared rows: "
                                     "too few for a reliable verdict; run more samples (--num-samples, --limit)"]
    [c] = compare_runs(runs["b"], runs["a"], n_boot=200)
    assert c.n_paired == 5  # doc 2 is outside the overlap; now check a hash clash inside it
    records_b[0]["doc_hash"] = "clash"  # doc 5
    store_task(tmp_path, "b", "piqa", records_b, {"acc": 0.0})
    [c] = compare_runs(by_label(tmp_path)["a"], by_label(tmp_path)["b"], n_boot=200)
    assert c.n_paired == 4 and "1 doc_ids hold different docs" in c.note


def test_niah_pairs_per_length(tmp_path: Path) -> None:
    lengths = (1024, 4096)

    def records(hit_at_4k: int) -> list[dict]:
        out = []
        for li, n in enumerate(lengths):
            for i in range(20):
                hit = 1.0 if (n == 1024 or i < hit_at_4k) else 0.0
                out.append({"doc_id": li * 20 + i, **{str(m): (hit if m == n else -1.0) for m in lengths}})
        return out

    store_task(tmp_path, "a", "ruler_niah_single_1", records(5), {"1024": 1.0, "4096": 0.25})
    store_task(tmp_path, "b", "ruler_niah_single_1", records(15), {"1024": 1.0, "4096": 0.75})
    runs = by_label(tmp_path)
    c1k, c4k = compare_runs(runs["a"], runs["b"], n_boot=1000)
    assert (c1k.metric, c1k.n_paired, c1k.delta, c1k.outcome) == ("1024", 20, 0.0, "tie")
    assert (c4k.metric, c4k.n_paired, c4k.only_b_right) == ("4096", 20, 10)
    assert c4k.p_value == pytest.approx(2 * 0.5**10) and c4k.outcome == "win"


def test_perplexity_bootstrap_uses_the_aggregate(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    words = rng.integers(100, 500, size=30)
    ll_a = -words * np.log(20.0)
    ll_b = -words * np.log(18.0)  # every page 10% less perplexing: word_perplexity 20 -> 18
    for label, ll in (("a", ll_a), ("b", ll_b)):
        recs = [{"doc_id": i, "word_perplexity": [float(x), int(w)]} for i, (x, w) in enumerate(zip(ll, words))]
        store_task(tmp_path, label, "wikitext", recs, {"word_perplexity": float(np.exp(-ll.sum() / words.sum()))},
                   lower=("word_perplexity",))
    runs = by_label(tmp_path)
    [c] = compare_runs(runs["a"], runs["b"], n_boot=500)
    assert c.paired_delta == pytest.approx(-2.0) and c.delta == pytest.approx(-2.0)
    assert c.ci_low == pytest.approx(-2.0) and c.ci_high == pytest.approx(-2.0)
    assert c.p_value is None and c.outcome == "win" and c.lower_is_better


def test_paired_bootstrap_is_seeded() -> None:
    a = np.column_stack([np.r_[np.ones(30), np.zeros(70)], np.ones(100)])
    b = np.column_stack([np.r_[np.ones(50), np.zeros(50)], np.ones(100)])
    assert paired_bootstrap(a, b, lambda x: x, 300, 7) == paired_bootstrap(a, b, lambda x: x, 300, 7)


def test_missing_samples_and_many_runs(tmp_path: Path) -> None:
    store_task(tmp_path, "a", "piqa", [], {"acc": 0.5})
    binary_run(tmp_path, "b", [1, 0])
    binary_run(tmp_path, "c", [1, 1])
    runs = load_run(tmp_path)
    comps = compare_all(runs, n_boot=100)
    assert [(c.label_a, c.label_b) for c in comps] == [("a", "b"), ("a", "c")]
    assert comps[0].outcome == "n/a" and "no paired samples" in comps[0].note and comps[0].delta == 0.0
    md = render_compare(comps, "md")
    assert "**A = a, B = b**" in md and "**A = a, B = c**" in md and "| piqa | acc | 50.00 | 100.00 | +50.00 |" in md
    assert "A = a, B = c" in render_compare(comps, "rich")
    with pytest.raises(ValueError, match="at least two checkpoints"):
        compare_all(runs[:1])
    with pytest.raises(ValueError, match="unknown compare format"):
        render_compare(comps, "html")


def test_cli_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    binary_run(tmp_path, "a", [1] * 10 + [0] * 30)
    binary_run(tmp_path, "b", [1] * 40)
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["compare", str(tmp_path), "--baseline", "b", "--format", "md", "--n-boot", "300"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "A = b, B = a" in out and "**loss**" in out


def test_readme_example_is_a_tie(tmp_path: Path) -> None:
    """The README's row: 80% -> 100% on 20 docs, CI [+5, +40] but McNemar p = 0.125: not a win."""
    assert verdict(0.05, 0.40, 0.125, lower_is_better=False) == "tie"
    assert verdict(0.05, 0.40, 0.01, lower_is_better=False) == "win"
    assert verdict(0.05, 0.40, 0.01, lower_is_better=True) == "loss"
    assert verdict(-0.40, -0.05, None, lower_is_better=True) == "win"  # perplexities: the interval alone
    binary_run(tmp_path, "a", [1] * 16 + [0] * 4, task="ruler_niah_single_2")
    binary_run(tmp_path, "b", [1] * 20, task="ruler_niah_single_2")
    runs = by_label(tmp_path)
    [c] = compare_runs(runs["a"], runs["b"], n_boot=2000)
    assert c.ci_low > 0 and c.p_value == pytest.approx(0.125) and c.outcome == "tie"
    md = render_compare([c], "md")
    assert "| 80.00 | 100.00 | +20.00 |" in md and "| 0.1250 | 20 | tie |" in md
    assert "**Warning:** A = a, B = b: fewer than 30 paired samples (n = 20)" in md  # said in the output


def test_mcnemar_is_scipys_binomtest() -> None:
    from scipy.stats import binomtest

    for b, a in ((7, 1), (0, 4), (13, 9)):
        assert mcnemar_exact(b, a) == binomtest(b, b + a, 0.5).pvalue


def test_tasks_one_side_lacks_are_listed(tmp_path: Path) -> None:
    binary_run(tmp_path, "a", [1, 0] * 20, task="piqa")
    binary_run(tmp_path, "a", [1, 0] * 20, task="boolq")
    binary_run(tmp_path, "b", [1, 1] * 20, task="piqa")
    binary_run(tmp_path, "b", [1, 1] * 20, task="arc_easy")
    runs = by_label(tmp_path)
    rows = compare_runs(runs["a"], runs["b"], n_boot=200)
    assert [(c.task, c.score_a is None, c.score_b is None) for c in rows] == [
        ("piqa", False, False), ("arc_easy", True, False), ("boolq", False, True)]
    assert rows[2].note == "b lacks this task" and rows[2].outcome == "n/a"
    assert compare_warnings(rows) == [
        "B = b lacks 1 task(s) the other has: boolq (not compared; finish or rerun that run)",
        "A = a lacks 1 task(s) the other has: arc_easy (not compared; finish or rerun that run)"]
    md = render_compare(rows, "md")
    assert "| boolq | acc | 50.00 | - | - | - | - | 0 | n/a |" in md and "**Warning:** B = b lacks" in md
    assert "Warning: B = b lacks 1 task(s)" in render_compare(rows, "rich")


def test_machine_readable_formats(tmp_path: Path) -> None:
    import csv
    import io
    import json

    binary_run(tmp_path, "a", [1] * 10 + [0] * 30)
    binary_run(tmp_path, "b", [1] * 40)
    runs = by_label(tmp_path)
    rows = compare_runs(runs["a"], runs["b"], n_boot=300)
    data = json.loads(render_compare(rows, "json"))
    [row] = data["comparisons"]
    assert row["task"] == "piqa" and row["score_a"] == 0.25 and row["score_b"] == 1.0 and row["outcome"] == "win"
    assert row["only_b_right"] == 30 and data["alpha"] == 0.05 and data["warnings"] == []
    [parsed] = list(csv.DictReader(io.StringIO(render_compare(rows, "csv"))))
    assert float(parsed["delta"]) == 0.75 and parsed["outcome"] == "win" and parsed["ci_low"] != ""
    assert float(parsed["p_value"]) == pytest.approx(2 * 0.5**30)


def test_cli_compare_reads_lm_eval_folders_and_flags_incomplete_runs(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from tests.fixtures.results.lm_eval_folder import make_lm_eval_output

    out = make_lm_eval_output(tmp_path / "lm", "org/tiny-a", 0.5, tmp_path / "work")
    make_lm_eval_output(out, "org/tiny-b", 0.95, tmp_path / "work")
    capsys.readouterr()  # lm-eval's own progress bars
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["compare", str(out), "--format", "json", "--n-boot", "300"])
    assert args.func(args) == 0
    captured = capsys.readouterr()
    [row] = json.loads(captured.out)["comparisons"]
    assert (row["label_a"], row["label_b"], row["task"], row["metric"]) == ("org__tiny-a", "org__tiny-b",
                                                                            "tiny_choice", "acc")
    assert row["n_paired"] == 40 and row["score_b"] > row["score_a"] and captured.err == ""

    ours = tmp_path / "ours"
    binary_run(ours, "a", [1, 0] * 20)
    binary_run(ours, "b", [1, 1] * 20)
    store = RunStore(ours)
    store.write_config("b", {"tasks": ["piqa", "boolq"]})
    store.mark_complete("b", ["piqa", "boolq"])
    args = parser.parse_args(["compare", str(ours), "--format", "md", "--n-boot", "100"])
    assert args.func(args) == 0
    assert "warning: b is incomplete: 1 of 2 task(s) missing (boolq)" in capsys.readouterr().err
