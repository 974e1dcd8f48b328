"""RunStore: atomic writes, merging, resume semantics; load_run parsing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from evals.reports.results import RunStore, incomplete_warnings, json_safe, load_run, load_runs, read_json, run_facts


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


def test_save_task_writes_lm_eval_layout_and_merges(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.save_task("ckpt-a", "piqa", output("piqa", 0.6), CONFIG, {"timings": {"piqa": 2.0}, "sha256": "h"})
    store.save_task("ckpt-a", "boolq", output("boolq", 0.7), CONFIG, {"timings": {"boolq": 3.0}})
    d = tmp_path / "ckpt-a"
    [results_file] = d.glob("results_*.json")  # the superseded file is gone
    assert store.results_path("ckpt-a") == results_file
    results = json.loads(results_file.read_text())
    assert set(results["results"]) == {"piqa", "boolq"}
    assert results["results"]["piqa"]["acc,none"] == 0.6
    assert set(results["configs"]) == {"piqa", "boolq"} and "samples" not in results
    # lm-eval's own keys, filled where the evaluate output lacked them
    assert results["config"]["model"] == "gdn2" and results["config"]["model_args"] == "pretrained=x.pt"
    assert results["model_name"] == "x.pt" and results["model_name_sanitized"] == "ckpt-a"
    for key in ("date", "git_hash", "lm_eval_version", "pretty_env_info", "transformers_version", "task_hashes",
                "model_source", "start_time", "end_time", "total_evaluation_time_seconds"):
        assert key in results, key
    assert float(results["total_evaluation_time_seconds"]) == 5.0
    meta = json.loads((d / "meta.json").read_text())
    assert meta["timings"] == {"piqa": 2.0, "boolq": 3.0} and meta["sha256"] == "h"
    assert meta["tasks_done"] == ["piqa", "boolq"] and meta["complete"] is False
    assert json.loads((d / "config.json").read_text()) == CONFIG
    samples_file = store.samples_path("ckpt-a", "piqa")
    assert samples_file is not None and samples_file.name.startswith("samples_piqa_")
    lines = samples_file.read_text().splitlines()
    assert json.loads(lines[0]) == {"doc_id": 0, "arguments": {"gen_args_0": {"arg_0": "ctx", "arg_1": " cont"}},
                                    "acc": 1.0}
    assert not [p for p in d.rglob("*") if p.name.endswith(".tmp")]


def test_lm_eval_script_reads_our_folder_unchanged(tmp_path: Path) -> None:
    """What a script written against lm-eval's output finds in a folder our writer made."""
    from lm_eval.utils import (
        get_file_task_name,
        get_latest_filename,
        get_results_filenames,
        get_sample_results_filenames,
        make_table,
    )

    store = RunStore(tmp_path)
    evaluated = output("piqa", 0.6, [{"doc_id": 0, "arguments": [("ctx", " a"), ("ctx", " b")], "acc": 1.0,
                                      "resps": [[(-1.0, False)], [(-2.0, False)]], "target": 0,
                                      "doc_hash": "d", "prompt_hash": "p", "target_hash": "t"}])
    evaluated["config"] = {"model": "gdn2", "model_args": "pretrained=demo:gdn2-demo,dtype=float32"}
    store.save_task("gdn2-demo", "piqa", evaluated, CONFIG)
    store.save_task("gdn2-demo", "boolq", output("boolq", 0.7), CONFIG)
    files = [str(p) for p in tmp_path.rglob("*")]
    latest = get_latest_filename(get_results_filenames(files))
    d = json.loads(Path(latest).read_text())
    assert d["config"]["model_args"] == "pretrained=demo:gdn2-demo,dtype=float32"
    assert d["model_name_sanitized"] == Path(latest).parent.name == "gdn2-demo"
    table = make_table(d)
    assert "piqa" in table and "boolq" in table and "0.6" in table
    samples = get_sample_results_filenames(files)
    assert sorted(get_file_task_name(Path(f).name) for f in samples) == ["boolq", "piqa"]
    [piqa] = [f for f in samples if get_file_task_name(Path(f).name) == "piqa"]
    record = json.loads(Path(piqa).read_text().splitlines()[0])
    assert record["arguments"]["gen_args_1"] == {"arg_0": "ctx", "arg_1": " b"}
    assert record["resps"] == [[["-1.0", "False"]], [["-2.0", "False"]]] and record["target"] == "0"
    from lm_eval.utils import hash_string
    assert d["task_hashes"]["piqa"] == hash_string("dpt")


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
    before = store.results_path("a").read_text()
    real_replace = os.replace

    def crash_on_results(src: str, dst: str | os.PathLike[str]) -> None:
        if Path(dst).name.startswith("results_"):
            raise OSError("disk died")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_results)
    with pytest.raises(OSError, match="disk died"):
        store.save_task("a", "boolq", output("boolq", 0.9), CONFIG)
    monkeypatch.setattr(os, "replace", real_replace)
    assert store.results_path("a").read_text() == before
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


def test_load_run_reads_an_lm_eval_output_folder(tmp_path: Path) -> None:
    from tests.fixtures.results.lm_eval_folder import TASK, make_lm_eval_output

    out = make_lm_eval_output(tmp_path / "out", "org/tiny-a", 0.5, tmp_path / "work")
    make_lm_eval_output(out, "org/tiny-b", 0.9, tmp_path / "work")
    a, b = load_run(out)
    assert (a.label, b.label, a.source) == ("org__tiny-a", "org__tiny-b", "lm-eval")
    raw = json.loads(next((out / "org__tiny-a").glob("results_*.json")).read_text())
    assert a.scores[TASK]["acc"] == raw["results"][TASK]["acc,none"] and a.complete and not a.missing_tasks
    assert len(a.samples(TASK)) == 40 and a.samples(TASK)[0]["acc"] in (0.0, 1.0)
    assert run_facts(a)["checkpoint"] == "org/tiny-a"
    [one] = load_run(out / "org__tiny-b")
    assert one.scores == b.scores


def test_old_layout_is_still_read(tmp_path: Path) -> None:
    d = tmp_path / "old"
    (d / "samples").mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"results": {"piqa": {"acc,none": 0.5}}}))
    (d / "samples" / "piqa.jsonl").write_text(json.dumps({"doc_id": 0, "acc": 1.0}) + "\n")
    (d / "meta.json").write_text(json.dumps({"tasks_done": ["piqa"], "complete": True}))
    [r] = load_run(tmp_path)
    assert r.scores == {"piqa": {"acc": 0.5}} and r.samples("piqa") == [{"doc_id": 0, "acc": 1.0}] and r.complete
    RunStore(tmp_path).save_task("old", "boolq", output("boolq", 0.7), CONFIG)  # resuming rewrites it lm-eval's way
    assert not (d / "results.json").exists()
    assert set(RunStore(tmp_path).read_results("old")["results"]) == {"piqa", "boolq"}


@pytest.mark.parametrize("name,content,says", [
    ("results", '{"results": {"piqa": {"acc,none": 0.5', "is not valid JSON"),
    ("meta.json", "", "is empty"),
    ("config.json", "[1, 2]", "holds list where a JSON object belongs"),
    ("meta.json", b"\xff\xfe{}", "is not UTF-8"),
])
def test_corrupt_json_names_its_file(tmp_path: Path, name: str, content: str | bytes, says: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    store = RunStore(tmp_path)
    for label in ("bad", "good"):
        store.save_task(label, "piqa", output("piqa", 0.5), CONFIG)
    path = store.results_path("bad") if name == "results" else tmp_path / "bad" / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError) as err:
        load_run(tmp_path / "bad")  # asked for directly: an error
    message = str(err.value)
    assert str(path) in message and says in message and "rerun" in message and "\n" not in message
    [good] = load_run(tmp_path)  # inside OUT: skipped with a warning naming it, the rest still read
    assert good.label == "good"
    assert "warning: skipping bad: " in capsys.readouterr().err
    with pytest.raises(ValueError, match="is not valid JSON|is empty|holds list|is not UTF-8"):
        read_json(path, default={})  # the runner's resume reads through the same reader


def test_corrupt_samples_line_names_file_and_line(tmp_path: Path) -> None:
    RunStore(tmp_path).save_task("a", "piqa", output("piqa", 0.5), CONFIG)
    path = RunStore(tmp_path).samples_path("a", "piqa")
    path.write_text(path.read_text() + '{"doc_id": 1, "acc"\n')
    [r] = load_run(tmp_path)
    with pytest.raises(ValueError, match=f"{path} line 2 is not valid JSON"):
        r.samples("piqa")


def test_labels_with_nothing_finished_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "started" / "cache").mkdir(parents=True)  # the first task is still running (or was killed)
    with pytest.raises(ValueError, match="no task of started has finished; rerun the same command"):
        load_run(tmp_path)
    RunStore(tmp_path).save_task("done", "piqa", output("piqa", 0.5), CONFIG)
    assert [r.label for r in load_run(tmp_path)] == ["done"]
    assert "warning: started: no task finished yet, not shown" in capsys.readouterr().err


def test_incomplete_runs_are_named(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    config = {**CONFIG, "tasks": ["piqa", "boolq", "arc_easy"]}
    store.save_task("part", "piqa", output("piqa", 0.5), config)
    store.mark_complete("part", config["tasks"])
    store.save_task("whole", "piqa", output("piqa", 0.5), {**CONFIG, "tasks": ["piqa"]})
    store.mark_complete("whole", ["piqa"])
    part, whole = load_run(tmp_path)
    assert part.missing_tasks == ["boolq", "arc_easy"] and not part.complete and whole.complete
    assert incomplete_warnings([part, whole]) == [
        "part is incomplete: 2 of 3 task(s) missing (boolq, arc_easy); rerun the same command to finish it"]
    store.save_task("whole", "piqa", output("piqa", 0.5), {**CONFIG, "tasks": ["piqa"]})  # complete cleared
    assert "did not finish" in incomplete_warnings(load_run(tmp_path / "whole"))[0]


def test_run_facts_read_the_runners_keys(tmp_path: Path) -> None:
    config = {**CONFIG, "model": {"format": "gdn2", "dtype": "float32", "device": "cpu", "sha256": "ab" * 32}}
    RunStore(tmp_path).save_task("a", "piqa", output("piqa", 0.5), config, {"sha256": "ab" * 32})
    RunStore(tmp_path).save_task("b", "piqa", output("piqa", 0.5), CONFIG, {"sha256": "cd" * 32})
    a, b = load_run(tmp_path)
    assert run_facts(a) == {"checkpoint": "x.pt", "format": "gdn2", "dtype": "float32", "device": "cpu",
                            "sha256": "ab" * 32, "gate_mode": "full", "seed": None, "limit": None}
    assert run_facts(b)["sha256"] == "cd" * 32 and run_facts(b)["format"] == "gdn2"  # lm-eval's config.model
