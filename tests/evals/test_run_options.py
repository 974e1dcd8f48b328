"""`run` as an lm-eval user types it: any lm-eval task, lm-eval's options and spellings, and bad input refused at
parse time with one line and exit code 2 (issues 18 and 19, item 5)."""
from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest
import torch

import run_eval
from evals.reports.results import RunStore

ROOT = Path(__file__).resolve().parents[2]
FIXTURE_DATA = ROOT / "tests" / "fixtures" / "data"


@pytest.fixture(autouse=True)
def hash_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("GDN2_HASH_CACHE", str(tmp_path_factory.getbasetemp() / "file-hashes.json"))


def one_line_error(args: list[str], capsys) -> str:
    rc = run_eval.main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err.strip()


no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")


@pytest.mark.parametrize("option, value, says", [
    ("--limit", "inf", "positive finite"), ("--limit", "0", "positive finite"), ("--limit", "-3", "positive"),
    ("--limit", "1.5", "whole"), ("--limit", "ten", "not a number"),
    ("--num-samples", "0", "not positive"), ("--num-samples", "-2", "not positive"),
    ("--batch-size", "0", "not positive"), ("--batch-size", "-4", "not positive"),
    ("--batch_size", "x", "whole number"), ("--lengths", ",", "holds no length"),
    ("--lengths", "256,-1", "positive"), ("--num_fewshot", "-1", "few-shot"), ("--metadata", "{oops", "not valid JSON"),
    ("--dtype", "fp8", "invalid choice"),
    pytest.param("--device", "cuda", "no CUDA GPU", marks=no_gpu),
    pytest.param("--device", "cuda:1", "no CUDA GPU", marks=no_gpu),
    ("--device", "gpu", "use cpu, cuda"),
    pytest.param("--backend", "triton", "needs a CUDA GPU and the [triton] extra", marks=no_gpu),
    ("--model_args", "dtpye=bfloat16", "did you mean dtype? valid: "),
    ("--model_args", "checkpoint=x", "pass --checkpoint"),
])
def test_bad_options_are_one_line_with_exit_code_2(option, value, says, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter lets Triton run on the CPU in tests
    err = one_line_error(["run", "--checkpoint", "demo:gdn2-demo", "--tasks", "ruler_niah_single_1",
                          option, value, "--output", str(tmp_path / "out")], capsys)
    assert says in err, err
    assert not (tmp_path / "out").exists()  # nothing started


def test_checkpoint_in_model_args_is_refused_with_the_option_named(capsys, tmp_path):
    err = one_line_error(["run", "--checkpoint", "demo:gdn2-demo", "--tasks", "ruler_niah_single_1",
                          "--model_args", "gate_mode=tied", "--output", str(tmp_path)], capsys)
    assert "--gate-modes" in err


def test_lm_eval_spellings_are_aliases():
    args = run_eval.build_parser().parse_args(
        ["run", "--batch_size", "4", "--output_path", "o", "--data_dir", "d", "--num_samples", "3", "--gate_modes",
         "full", "--model-args", "prefill_chunk=4096", "--num-fewshot", "2", "--include-path", "p"])
    assert (args.batch_size, args.output, args.data_dir, args.num_samples, args.gate_modes, args.model_args,
            args.num_fewshot, args.include_path) == (4, "o", "d", 3, "full", "prefill_chunk=4096", 2, ["p"])
    assert run_eval.build_parser().parse_args(["run", "--batch_size", "auto:4"]).batch_size == "auto:4"


def test_early_ctrl_c_is_one_line(monkeypatch, capsys):
    def interrupted():  # Ctrl-C while the CLI still imports its modules
        raise KeyboardInterrupt

    monkeypatch.setattr(run_eval, "build_parser", interrupted)
    assert run_eval.main(["list"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted" in err


def test_any_lm_eval_task_with_lm_eval_options(tmp_path, monkeypatch, capsys):
    """A task outside the paper's list (lm-eval's lambada_openai_cloze_yaml, on the lambada fixture), an
    --include_path task, --num_fewshot and --model_args, offline."""
    from evals.harness import backend

    seen = {}
    original = backend.GDN2LM.__init__

    @functools.wraps(original)  # keeps the signature (the valid --model_args names when MODEL_ARGS is absent)
    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        original(self, *args, **kwargs)

    monkeypatch.setattr(backend.GDN2LM, "__init__", spy)
    extra = tmp_path / "mytasks"
    extra.mkdir()
    yaml = (Path(__import__("lm_eval").__file__).parent / "tasks" / "lambada_cloze" / "lambada_openai_cloze.yaml")
    (extra / "mine.yaml").write_text(yaml.read_text().replace("task: lambada_openai_cloze_yaml", "task: my_cloze")
                                     .replace("  - lambada_cloze\n", "  - my_cloze_tag\n"))
    out = tmp_path / "out"
    rc = run_eval.main(["run", "--checkpoint", "demo:gdn2-demo", "--tasks", "lambada_openai_cloze_yaml,my_cloze",
                        "--include_path", str(extra), "--data_dir", str(FIXTURE_DATA), "--limit", "2",
                        "--num_fewshot", "1", "--model_args", "prefill_chunk=4096,max_gen_toks=8",
                        "--output_path", str(out), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert seen["prefill_chunk"] == 4096 and seen["max_gen_toks"] == 8  # the backend got them
    results = RunStore(out).read_results("gdn2-demo")
    assert {"lambada_openai_cloze_yaml", "my_cloze"} <= set(results["results"])
    assert results["n-shot"]["lambada_openai_cloze_yaml"] == 1
    assert results["config"]["model"] == "gdn2" and results["model_name"] == "demo:gdn2-demo"
    assert "prefill_chunk=4096" in results["config"]["model_args"]
    assert "pretrained=demo:gdn2-demo" in results["config"]["model_args"]
    config = RunStore(out).read_config("gdn2-demo")
    assert config["num_fewshot"] == 1 and config["identity"]["model_args"] == {"max_gen_toks": 8}
    assert config["model"]["sha256"] and config["model"]["dtype"] == "float32"


def test_unknown_lm_eval_task_gets_close_matches(capsys, tmp_path):
    err = one_line_error(["run", "--checkpoint", "demo:gdn2-demo", "--tasks", "lambada_openai_clozee_yaml",
                          "--output", str(tmp_path)], capsys)
    assert "did you mean lambada_openai_cloze_yaml" in err


def test_suites_by_path_and_malformed_suites_by_file_and_line(tmp_path, capsys):
    from evals.harness.runner import RunSpec, make_plan
    from tasks import catalog

    mine = tmp_path / "my_suite.yaml"
    shutil.copy(catalog.SUITES_DIR / "quick.yaml", mine)
    assert make_plan(RunSpec(checkpoints=["x"], suite=str(mine))).tasks == catalog.load_suite("quick").tasks
    assert catalog.load_suite(str(tmp_path / "my_suite")).tasks == catalog.load_suite("quick").tasks
    bad = tmp_path / "bad.yaml"
    bad.write_text("suite: bad\ntasks: [piqa,\n  bos: none\n")
    err = one_line_error(["run", "--suite", str(bad), "--output", str(tmp_path / "o")], capsys)
    assert f"malformed YAML in {bad} line" in err
    bad.write_text("suite: bad\nbos: none\ntasks: piqa\n")
    err = one_line_error(["run", "--suite", str(bad), "--output", str(tmp_path / "o")], capsys)
    assert f"suite file {bad} line 3 is malformed" in err and "`tasks` must be a list" in err
    err = one_line_error(["run", "--suite", str(tmp_path / "absent.yaml"), "--output", str(tmp_path / "o")], capsys)
    assert "suite file not found" in err


def test_list_survives_a_broken_suite_and_names_it(tmp_path, monkeypatch, capsys):
    from tasks import catalog

    suites = Path(shutil.copytree(catalog.SUITES_DIR, tmp_path / "suites"))
    (suites / "broken.yaml").write_text("suite: broken\ntasks: [piqa,\n")
    monkeypatch.setattr(catalog, "SUITES_DIR", suites)
    assert run_eval.main(["list"]) == 0
    out, err = capsys.readouterr()
    assert "quick" in out and "table2" in out and "broken" in out
    assert "broken.yaml line" in err and err.count("warning: ") == 1


def test_hf_baseline_recorded_and_resaved_weights_refused(tmp_path, capsys):
    """An hf: baseline runs like ours; weights re-saved at the same path are caught before the model loads."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from tests.evals.test_baseline import save_tiny_llama

    folder = tmp_path / "tiny-llama"
    save_tiny_llama(folder, seed=0)
    out = tmp_path / "out"
    args = ["run", "--checkpoint", f"hf:{folder}", "--tasks", "lambada_openai_cloze_yaml", "--bos", "none",
            "--data_dir", str(FIXTURE_DATA), "--limit", "2", "--batch_size", "2", "--dtype", "float32",
            "--output", str(out)]
    assert run_eval.main(args) == 0, capsys.readouterr().err
    config = RunStore(out).read_config("tiny-llama")
    assert config["model"]["format"] == "hf" and config["model"]["sha256"]
    assert config["per_task"]["lambada_openai_cloze_yaml"]["effective_bos"] in ("none", False)
    assert RunStore(out).read_results("tiny-llama")["config"]["model"] == "hf"
    assert run_eval.main(args) == 0  # unchanged: reused
    capsys.readouterr()
    save_tiny_llama(folder, seed=1)  # other weights, same path
    capsys.readouterr()  # (transformers' own save bar)
    err = one_line_error(args, capsys)
    assert "different configuration" in err and "weights" in err


def test_task_bos_policy_applies_under_tasks_and_yields_to_bos():
    """A task run with --tasks keeps the BOS policy its YAML declares (jrt_*: none, as the JRT harness; ruler_*:
    bos), lm-eval's own tasks have none of their own, and --bos overrides every task."""
    from evals.harness.runner import RunSpec, make_plan

    plan = make_plan(RunSpec(checkpoints=["demo:gdn2-demo"], tasks=["jrt_swde", "ruler_niah_single_1", "piqa"]))
    assert plan.bos_by_task == {"jrt_swde": "none", "ruler_niah_single_1": "bos"}
    forced = make_plan(RunSpec(checkpoints=["demo:gdn2-demo"], tasks=["jrt_swde", "piqa"], bos="bos"))
    assert forced.bos_by_task == {"jrt_swde": "bos", "piqa": "bos"}
