"""RunStore: atomic writes, merging, resume semantics; load_run parsing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from evals.reports.results import RunStore, json_safe, load_run, load_runs


def output(task: str, acc: float, samples: list[dict] | None = None) -> dict:
    """A minimal simple_evaluate() output for one task."""
    return {"results": {task: {"alias": task, "acc,none": np.float64(acc), "acc_stderr,none": 0.01}},
            "samples": {task: samples if samples is not None else
                        [{"doc_id": 0, "arguments": [("ctx", " cont")], "acc": np.float32(1.0)}]},
            "configs": {task: {"task": task, "fn": lambda x: x}}, "versions": {task: 1.0},
            "n-samples": {task: {"original": 1, "effective": 1}}, "higher_is_better": {task: {"acc": True}}}


CONFIG = {"checkpoint": "x.pt", "gate_mode": "full", "limit": None}


def test_json_safe_converts_lm_eval_values() -> None:
    value = {1: (np.float64(0.5), np.int64(3), np.bool_(True)), "s": {1, 2}, "nan": float("nan"),
             "arr": np.arange(2), "obj": object}
    safe = json_safe(value)
    assert safe["1"] == [0.5, 3, True]
    assert sorted(safe["s"]) == [1, 2] and safe["nan"] is None and safe["arr"] == [0, 1]
    assert safe["obj"] == str(object)
    json.dumps(safe, allow_nan=False)


def test_save_task_writes_and_merges(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.save_task("ckpt-a", "piqa", output("piqa", 0.6), CONFIG, {"timings": {"piqa": 2.0}, "checkpoint_hash": "h"})
    store.save_task("ckpt-a", "boolq", output("boolq", 0.7), CONFIG, {"timings": {"boolq": 3.0}})
    d = tmp_path / "ckpt-a"
    results = json.loads((d / "results.json").read_text())
    assert set(results["results"]) == {"piqa", "boolq"}
    assert results["results"]["piqa"]["acc,none"] == 0.6
    assert set(results["configs"]) == {"piqa", "boolq"} and "samples" not in results
    meta = json.loads((d / "meta.json").read_text())
    assert meta["timings"] == {"piqa": 2.0, "boolq": 3.0} and meta["checkpoint_hash"] == "h"
    assert meta["tasks_done"] == ["piqa", "boolq"] and meta["complete"] is False
    assert json.loads((d / "config.json").read_text()) == CONFIG
    lines = (d / "samples" / "piqa.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"doc_id": 0, "arguments": [["ctx", " cont"]], "acc": 1.0}
    assert not [p for p in d.rglob("*") if p.name.endswith(".tmp")]


def test_resume_and_complete(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    assert not store.task_done("a", "piqa")
    store.save_task("a", "piqa", output("piqa", 0.5), CONFIG)
    assert store.task_done("a", "piqa") and not store.task_done("a", "boolq")
    assert store.mark_complete("a", ["piqa", "boolq"]) is False
    assert store.read_meta("a")["complete"] is False
    store.save_task("a", "boolq", output("boolq", 0.5), CONFIG)
    assert store.mark_complete("a", ["piqa", "boolq"]) is True
    assert RunStore(tmp_path).read_meta("a")["complete"] is True  # a fresh store (a rerun) sees it
    store.save_task("a", "winogrande", output("winogrande", 0.5), CONFIG)
    assert store.read_meta("a")["complete"] is False  # new work clears the flag until checked again


def test_crash_mid_write_keeps_old_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = RunStore(tmp_path)
    store.save_task("a", "piqa", output("piqa", 0.5), CONFIG)
    before = (tmp_path / "a" / "results.json").read_text()
    real_replace = os.replace

    def crash_on_results(src: str, dst: str | os.PathLike[str]) -> None:
        if str(dst).endswith("results.json"):
            raise OSError("disk died")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_results)
    with pytest.raises(OSError, match="disk died"):
        store.save_task("a", "boolq", output("boolq", 0.9), CONFIG)
    monkeypatch.setattr(os, "replace", real_replace)
    assert (tmp_path / "a" / "results.json").read_text() == before
    assert not store.task_done("a", "boolq")
    assert not [p for p in (tmp_path / "a").rglob("*") if p.name.endswith(".tmp")]


def test_bad_input_is_rejected(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    with pytest.raises(ValueError, match="filesystem-safe"):
        store.label_dir("../evil")
    with pytest.raises(ValueError, match="no 'results' dict"):
        store.save_task("a", "piqa", {"samples": {}}, CONFIG)
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="task name"):
        store.save_task("a", "x/y", output("x/y", 0.5), CONFIG)


def test_load_run_out_or_label(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "out")
    store.save_task("b", "piqa", output("piqa", 0.25), CONFIG)
    niah = {"results": {"ruler_niah_single_1": {"1024,none": 0.9, "1024_stderr,none": "N/A", "8192,none": -1,
                                                "alias": "x"}}}
    store.save_task("a", "ruler_niah_single_1", niah, {"gate_mode": "tied"})
    both = load_run(tmp_path / "out")
    assert [r.label for r in both] == ["a", "b"]
    a, b = both
    assert a.scores == {"ruler_niah_single_1": {"1024": 0.9}} and a.stderrs == {"ruler_niah_single_1": {}}
    assert a.config == {"gate_mode": "tied"} and a.samples("ruler_niah_single_1") == []
    assert b.scores["piqa"] == {"acc": 0.25} and b.stderrs["piqa"] == {"acc": 0.01}
    assert b.samples("piqa")[0]["acc"] == 1.0 and b.has_samples("piqa")
    [one] = load_run(tmp_path / "out" / "b")
    assert one.label == "b" and one.scores == b.scores


def test_load_run_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run(tmp_path / "missing")
    with pytest.raises(ValueError, match="no results"):
        load_run(tmp_path)


def test_load_runs_disambiguates_labels(tmp_path: Path) -> None:
    for out in ("run1", "run2"):
        RunStore(tmp_path / out).save_task("ckpt", "piqa", output("piqa", 0.5), CONFIG)
    assert [r.label for r in load_runs([tmp_path / "run1", tmp_path / "run2"])] == ["run1/ckpt", "run2/ckpt"]


def test_generations_with_odd_characters_round_trip(tmp_path: Path) -> None:
    odd = "caf\u00e9 \ud800 \x00 end"  # a lone surrogate, as a byte-level tokenizer can decode
    RunStore(tmp_path).save_task("a", "jrt_nq", output("jrt_nq", 0.5, [{"doc_id": 0, "resps": [[odd]]}]), CONFIG)
    [r] = load_run(tmp_path)
    assert r.samples("jrt_nq")[0]["resps"] == [[odd]]
