"""Reliability and safety: resume after SIGKILL/SIGINT, refused config changes, one-line errors with exit codes,
GPU out-of-memory retry, NaN/inf guards, no code from checkpoints or task YAMLs, nothing online unless asked.

The resume tests run `run_eval.py run` in a subprocess through a small driver that counts the requests the backend
computes (appending to a file) and can kill the process after N batches, so "recomputes only the unfinished
requests" is measured, not assumed.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import run_eval
from evals.harness import guards
from evals.harness.request_cache import RequestCache
from gdn2.config import Config
from gdn2.model import GPT

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = ROOT / "gdn2" / "demo" / "tokenizer"
FIXTURE_DATA = ROOT / "tests" / "fixtures" / "data"
# sizing=tight: RULER's own sizing leaves no haystack at 256 tokens (and --metadata reaches the task this way)
NIAH = ["--tasks", "ruler_niah_single_1", "--lengths", "256", "--num-samples", "8", "--batch-size", "2",
        "--device", "cpu", "--dtype", "float32", "--metadata", "sizing=tight"]
N_REQUESTS = 8

BATCH_FUNCTIONS = ("_greedy", "_score_batch", "_rolling_batch")


def count_batches(count_file: Path, kill_after: int = 0, sig: str = "SIGKILL", patch=setattr,
                  pause: str | None = None) -> None:
    """Wrap the backend's batch functions: each computed batch appends its size to `count_file`; when
    `kill_after` batches are done the process sends itself `sig` (so those batches are cached, the next is not).
    With `pause`, after the first batch the process creates PAUSE.started and waits until PAUSE.go exists."""
    from evals.harness import backend

    done = {"batches": 0}

    def wrap(original):
        def run(self, *args, **kwargs):
            if kill_after and done["batches"] == kill_after:
                os.kill(os.getpid(), getattr(signal, sig))
            out = original(self, *args, **kwargs)
            done["batches"] += 1
            with open(count_file, "a") as f:
                f.write(f"{len(out)}\n")
            if pause and done["batches"] == 1:
                Path(pause + ".started").touch()
                while not Path(pause + ".go").exists():
                    time.sleep(0.05)
            return out
        return run

    for name in BATCH_FUNCTIONS:
        patch(backend.GDN2LM, name, wrap(getattr(backend.GDN2LM, name)))


# a subprocess for SIGKILL: the CLI with count_batches installed from the environment
DRIVER = """
import os, sys
sys.path.insert(0, os.environ["REPO"])
from tests.evals.test_reliability import count_batches
count_batches(os.environ["COUNT_FILE"], int(os.environ["KILL_AFTER"]), os.environ["KILL_SIGNAL"],
              pause=os.environ.get("PAUSE") or None)
import run_eval
sys.exit(run_eval.main(sys.argv[1:]))
"""


@pytest.fixture(autouse=True)
def hash_cache(tmp_path_factory, monkeypatch):
    """Content hashes are cached in a file: a test's own, not the user's ~/.cache."""
    monkeypatch.setenv("GDN2_HASH_CACHE", str(tmp_path_factory.getbasetemp() / "file-hashes.json"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: threads only add overhead here, and stall badly on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_checkpoint(folder: Path, seed: int = 0, **config) -> Path:
    """A tiny random GDN-2 in the native layout (model.safetensors, config.json, the demo tokenizer)."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    cfg = Config(name="tiny", vocab_size=1024, padding_multiple=64, n_layer=1, n_embd=32, n_head=2,
                 intermediate_size=64, gdn2_num_heads=2, gdn2_head_dim=16, local_window=64, **config)
    model = GPT(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / name, folder / name)
    (folder / "config.json").write_text(json.dumps({"format": "gdn2-native", "config": cfg.to_dict(), "bos": True}))
    return folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def start(args: list[str], tmp: Path, kill_after: int = 0, sig: str = "SIGKILL",
          pause: Path | None = None) -> tuple[subprocess.Popen, Path]:
    """One CLI run in a subprocess (cwd: `tmp`, outside any git checkout) and the file counting its requests."""
    count = tmp / f"count-{os.urandom(4).hex()}"
    count.touch()
    env = {**os.environ, "REPO": str(ROOT), "COUNT_FILE": str(count), "KILL_AFTER": str(kill_after),
           "KILL_SIGNAL": sig, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",  # tiny matrices: no threads
           "PAUSE": str(pause or "")}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp)
    return proc, count


def finish(proc: subprocess.Popen, count: Path) -> tuple[int, int, str]:
    _, err = proc.communicate(timeout=300)
    return proc.returncode, sum(int(n) for n in count.read_text().split()), err


def drive(args: list[str], tmp: Path, kill_after: int = 0, sig: str = "SIGKILL") -> tuple[int, int, str]:
    """(exit code, requests computed, stderr) of one CLI run in a subprocess."""
    return finish(*start(args, tmp, kill_after, sig))


def drive_here(args: list[str], tmp: Path, kill_after: int = 0) -> tuple[int, int, str]:
    """The same in this process (SIGINT arrives as KeyboardInterrupt); saves the CLI's start-up time."""
    count = tmp / f"count-{os.urandom(4).hex()}"
    count.touch()
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as m, contextlib.redirect_stderr(err):
        count_batches(count, kill_after, "SIGINT", patch=m.setattr)
        rc = run_eval.main(args)
    return rc, sum(int(n) for n in count.read_text().split()), err.getvalue()


def stored(out: Path) -> tuple[dict, str, dict]:
    """The results (without run dates and timings), the samples file and meta.json of the run's only label."""
    from evals.reports.results import RunStore

    (label,) = [d.name for d in out.iterdir() if d.is_dir()]
    store = RunStore(out)
    results = {k: v for k, v in store.read_results(label).items() if k in ("results", "configs", "n-samples",
                                                                            "higher_is_better", "versions")}
    return results, store.samples_path(label, "ruler_niah_single_1").read_text(), dict(store.read_meta(label))


@pytest.fixture(scope="module")
def uninterrupted(ckpt, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("whole")
    rc, computed, err = drive_here(["run", "--checkpoint", str(ckpt), *NIAH, "--output", str(tmp / "out")], tmp)
    assert rc == 0, err
    assert computed == N_REQUESTS
    return tmp / "out"


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGINT"])
def test_killed_run_resumes_computing_only_the_rest(ckpt, uninterrupted, tmp_path, sig):
    out = tmp_path / "out"
    args = ["run", "--checkpoint", str(ckpt), *NIAH, "--output", str(out)]
    if sig == "SIGKILL":
        rc, first, err = drive(args, tmp_path, kill_after=2, sig=sig)
    else:
        rc, first, err = drive_here(args, tmp_path, kill_after=2)
    assert rc == (-signal.SIGKILL if sig == "SIGKILL" else 130), err
    assert first == 4  # two batches of two finished before the kill
    if sig == "SIGINT":
        assert "rerun the same command to resume" in err
    assert not (out / ckpt.name / "meta.json").exists()  # no task finished, so nothing is marked done
    rc, second, err = drive_here(args, tmp_path)
    assert rc == 0, err
    assert second == N_REQUESTS - first  # nothing that had finished ran again
    results, samples, meta = stored(out)
    ref_results, ref_samples, ref_meta = stored(uninterrupted)
    assert meta["complete"] and ref_meta["complete"]
    assert results == ref_results and samples == ref_samples
    rc, third, _ = drive_here(args, tmp_path)  # a finished run: nothing to do
    assert rc == 0 and third == 0


def test_changed_config_into_the_same_output_is_refused(ckpt, uninterrupted, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    base = ["run", "--checkpoint", str(ckpt), *NIAH, "--output", str(out)]
    for change in (["--bos", "none"], ["--limit", "4"], ["--seed", "1"], ["--lengths", "300"]):
        rc = run_eval.main(base + change)  # a repeated option overrides the earlier one
        err = capsys.readouterr().err
        assert rc == 2 and "different configuration" in err and "--output" in err, err
        assert err.count("\n") == 1
    other = write_checkpoint(tmp_path / "other" / "tiny", seed=1)  # same label, other weights
    rc = run_eval.main(["run", "--checkpoint", str(other), *NIAH, "--output", str(out)])
    assert rc == 2 and "weights" in capsys.readouterr().err


# ---- the request cache --------------------------------------------------------------------------------------------
def test_request_cache_round_trips_and_survives_sigkill(tmp_path):
    path = tmp_path / "c.db"
    code = (f"import sys, os, signal; sys.path.insert(0, {str(ROOT)!r}); from evals.harness.request_cache import "
            f"RequestCache; c = RequestCache({str(path)!r})\n"
            "for i in range(200): c[f'k{i}'] = (float(i) / 3, i % 2 == 0)\n"
            "c['text'] = 'caf\\u00e9 \\ud800'; os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    cache = RequestCache(path)
    assert len(cache) == 201 and cache["k199"] == (199 / 3, False) and cache["text"] == "caf\u00e9 \ud800"
    assert "missing" not in cache
    (tmp_path / "bad.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(ValueError, match="delete it"):
        len(RequestCache(tmp_path / "bad.db"))


# ---- one-line errors and exit codes -------------------------------------------------------------------------------
def run_cli(args: list[str], capsys) -> tuple[int, str]:
    rc = run_eval.main(args)
    err = capsys.readouterr().err.strip()
    return rc, err


def cli_error(args: list[str], capsys) -> str:
    rc, err = run_cli(args, capsys)
    assert rc == 2, err
    last = err.splitlines()[-1]  # progress bars may come first
    assert last.startswith("error: ") and err.count("error: ") == 1 and "Traceback" not in err, err
    return last


def copy_ckpt(ckpt: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(ckpt, tmp / "copy" / ckpt.name))


def niah(path: Path, out: Path) -> list[str]:
    return ["run", "--checkpoint", str(path), *NIAH, "--output", str(out)]


def test_checkpoint_errors_are_one_line(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    assert "checkpoint not found" in cli_error(niah(tmp_path / "nope", out), capsys)

    truncated = copy_ckpt(ckpt, tmp_path / "t")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in cli_error(niah(truncated, out), capsys)

    pth = tmp_path / "cut.pth"
    torch.save({"model": {"w": torch.zeros(1000)}}, pth)
    pth.write_bytes(pth.read_bytes()[:2000])
    assert "truncated or corrupt" in cli_error(niah(pth, out), capsys)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(4096))
    cli_error(niah(garbage, out), capsys)  # (worded by gdn2.formats as "holds objects other than tensors")

    from safetensors.torch import load_file, save_file

    keys = copy_ckpt(ckpt, tmp_path / "k")
    sd = load_file(str(keys / "model.safetensors"))
    sd.pop("lm_head.weight")
    save_file(sd, str(keys / "model.safetensors"))
    assert "1 missing" in cli_error(niah(keys, out), capsys)

    shapes = copy_ckpt(ckpt, tmp_path / "s")
    meta = json.loads((shapes / "config.json").read_text())
    meta["config"]["intermediate_size"] = 96
    (shapes / "config.json").write_text(json.dumps(meta))
    assert "mismatched shapes" in cli_error(niah(shapes, out), capsys)

    (shapes / "config.json").write_text('{"format": "gdn2-native", "config": {')
    assert "not valid JSON" in cli_error(niah(shapes, out), capsys)

    no_tok = copy_ckpt(ckpt, tmp_path / "n")
    (no_tok / "tokenizer.json").unlink()
    assert "--tokenizer" in cli_error(niah(no_tok, out), capsys)
    assert not out.exists() or not any(out.rglob("results*.json"))  # no scores from any of them


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError):
        run_eval.main(["--debug", *niah(tmp_path / "nope", tmp_path / "out")])


def test_unknown_and_malformed_tasks_and_suites(ckpt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    err = cli_error(["run", "--checkpoint", str(ckpt), "--tasks", "ruler_niah_singel_1", "--output", str(out)], capsys)
    assert "unknown task 'ruler_niah_singel_1'" in err and "did you mean ruler_niah_single_1" in err
    err = cli_error(["run", "--checkpoint", str(ckpt), "--suite", "tabel2", "--output", str(out)], capsys)
    assert "unknown suite 'tabel2'" in err and "table2" in err

    from tasks import catalog

    suites = tmp_path / "suites"
    shutil.copytree(catalog.SUITES_DIR, suites)
    (suites / "nolist.yaml").write_text("suite: nolist\ndescription: no task list\n")
    (suites / "broken.yaml").write_text("suite: broken\ntasks: [piqa,\n  bos: none\n")
    monkeypatch.setattr(catalog, "SUITES_DIR", suites)
    err = cli_error(["run", "--checkpoint", str(ckpt), "--suite", "nolist", "--output", str(out)], capsys)
    assert "nolist.yaml" in err and "malformed" in err and "tasks:" in err
    err = cli_error(["run", "--checkpoint", str(ckpt), "--suite", "broken", "--output", str(out)], capsys)
    assert "malformed YAML in" in err and "broken.yaml line" in err

    task_dir = tmp_path / "tasks"
    (task_dir / "mine").mkdir(parents=True)
    (task_dir / "mine" / "bad.yaml").write_text("task: bad\ndataset_path: [unclosed\n")
    monkeypatch.setattr(catalog, "TASKS_DIR", task_dir)
    monkeypatch.setattr(catalog, "SUITES_DIR", task_dir / "suites")
    err = cli_error(["run", "--checkpoint", str(ckpt), "--tasks", "bad", "--output", str(out)], capsys)
    assert "malformed YAML in" in err and "bad.yaml line 3" in err


def test_dataset_missing_offline(ckpt, tmp_path, capsys):
    empty = tmp_path / "data"
    empty.mkdir()
    err = cli_error(["run", "--checkpoint", str(ckpt), "--tasks", "lambada_openai", "--limit", "2", "--device", "cpu",
                     "--data-dir", str(empty), "--output", str(tmp_path / "out")], capsys)
    assert "offline dataset EleutherAI/lambada_openai" in err and str(empty) in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("results*.json"))


# ---- out of memory and NaN/inf ------------------------------------------------------------------------------------
def tiny_lm(batch_size: int = 8):
    from evals.harness.backend import GDN2LM
    from gdn2.tokenizer import load_tokenizer

    model = GPT(Config.from_name("tiny", vocab_size=1024)).init_weights(seed=3)
    return GDN2LM(model=model, tokenizer=load_tokenizer(TOKENIZER_DIR), bos="true", batch_size=batch_size)


def instances(kind: str, n: int = 6):
    from lm_eval.api.instance import Instance

    if kind == "loglikelihood":
        args = [(f"Context number {i} is here.", f" answer {i}") for i in range(n)]
    elif kind == "loglikelihood_rolling":
        args = [(f"A document {'with words ' * i}ends.",) for i in range(n)]
    else:
        args = [(f"Say {i}:", {"until": ["\n"], "max_gen_toks": 4}) for i in range(n)]
    return [Instance(kind, {}, a, i, ("mytask", 10 + i, 1)) for i, a in enumerate(args)]


def limit_rows(monkeypatch, lm, max_rows: int | None) -> list[int]:
    """Make the model raise CUDA out-of-memory for prefills of more than `max_rows` rows; returns the row counts."""
    original = lm.model.prefill
    seen = []

    def prefill(tokens, *args, **kwargs):
        seen.append(tokens.shape[0])
        if max_rows is None or tokens.shape[0] > max_rows:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(tokens, *args, **kwargs)

    monkeypatch.setattr(lm.model, "prefill", prefill)
    return seen


@pytest.mark.parametrize("kind", ["loglikelihood", "loglikelihood_rolling", "generate_until"])
def test_out_of_memory_halves_the_batch_and_gives_the_same_answers(kind, monkeypatch):
    reference = getattr(tiny_lm(), kind)(instances(kind))
    lm = tiny_lm(batch_size=8)
    seen = limit_rows(monkeypatch, lm, max_rows=2)
    got = getattr(lm, kind)(instances(kind))
    if kind == "generate_until":
        assert got == reference
    else:
        flat = lambda rs: [r[0] if isinstance(r, tuple) else r for r in rs]  # noqa: E731
        assert flat(got) == pytest.approx(flat(reference), rel=1e-5, abs=1e-5)
    assert max(seen) > 2 and lm.batching.batch_size <= 2  # it tried bigger, then kept the size that fits


def test_out_of_memory_at_batch_one_is_explained(monkeypatch):
    from evals.harness.errors import explain

    lm = tiny_lm()
    limit_rows(monkeypatch, lm, max_rows=None)
    with pytest.raises(guards.GPUOutOfMemoryError) as info:
        lm.generate_until(instances("generate_until"))
    assert "batch size 1" in explain(info.value) and "--dtype bfloat16" in explain(info.value)


def poison(monkeypatch, lm, row: int) -> None:
    """Every prefill returns NaN logits in `row` (when the batch has it)."""
    original = lm.model.prefill

    def prefill(*args, **kwargs):
        logits, state = original(*args, **kwargs)
        if logits.shape[0] > row:
            logits = logits.clone()
            logits[row] = float("nan")
        return logits, state

    monkeypatch.setattr(lm.model, "prefill", prefill)


@pytest.mark.parametrize("kind", ["loglikelihood", "loglikelihood_rolling", "generate_until"])
def test_nan_logits_fail_naming_the_request(kind, monkeypatch):
    lm = tiny_lm(batch_size=2)
    cached: list = []

    class Hook:
        def add_partial(self, attr, request, response):
            cached.append(response)

    lm.cache_hook = Hook()
    poison(monkeypatch, lm, row=1)
    with pytest.raises(guards.NonFiniteError, match="(?i)nan") as info:
        getattr(lm, kind)(instances(kind))
    text = str(info.value)
    named = r"task mytask doc 1\d \(request \d\)" if kind != "loglikelihood" else r"request \d \(continuation "
    assert re.search(named, text) and "--dtype float32" in text, text
    numbers = [r[0] if isinstance(r, tuple) else r for r in cached if not isinstance(r, str)]
    assert all(map(math.isfinite, numbers))  # nothing non-finite reached the cache


def test_nan_run_fails_the_task_and_is_not_complete(ckpt, tmp_path, capsys, monkeypatch):
    from gdn2.model import GPT as Model

    original = Model.prefill

    def nan_prefill(self, *args, **kwargs):
        logits, state = original(self, *args, **kwargs)
        return logits * float("nan"), state

    monkeypatch.setattr(Model, "prefill", nan_prefill)
    out = tmp_path / "out"
    args = niah(ckpt, out) + ["--limit", "1"]
    err = cli_error(args, capsys)
    assert "1 task(s) failed, none is saved" in err and "ruler_niah_single_1 doc 0" in err and "NaN" in err
    assert "the rest are saved" not in err  # every task failed: nothing else was saved
    assert not list((out / ckpt.name).glob("results*.json"))
    monkeypatch.setattr(Model, "prefill", original)  # fixed model: the same command now runs the task
    rc, err = run_cli(args, capsys)
    assert rc == 0, err
    assert json.loads((out / ckpt.name / "meta.json").read_text())["complete"]


# ---- safety -------------------------------------------------------------------------------------------------------
class RunsCode:
    """Unpickling this would run `touch MARKER` (weights_only loading must refuse it)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_pickled_code_is_refused_without_running_it(tmp_path, capsys):
    from gdn2.checkpoint import CheckpointError, load_checkpoint

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "payload": RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="never runs code"):
        load_checkpoint(path)
    err = cli_error(niah(path, tmp_path / "out"), capsys)
    assert "never runs code" in err
    assert not marker.exists()


def test_every_torch_load_is_weights_only():
    calls = []
    for path in [*ROOT.glob("gdn2/**/*.py"), *ROOT.glob("evals/**/*.py"), *ROOT.glob("tasks/**/*.py"),
                 ROOT / "run_eval.py"]:
        text = path.read_text()
        for start in [i for i in range(len(text)) if text.startswith("torch.load(", i)]:
            call = text[start: text.index(")", start) + 1]
            calls.append(call)
            assert "weights_only=True" in call, f"{path}: {call}"
    assert calls  # the checkpoint readers do call it


def test_task_yaml_functions_stay_inside_the_task_folders(tmp_path):
    from lm_eval.tasks._yaml_loader import load_yaml

    if "." in str(tmp_path):
        pytest.skip("the absolute dotted-path trick needs a tmp path without dots")
    guards.guard_yaml_functions(guards.default_yaml_roots())
    marker = tmp_path / "ran"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef run(x):\n    return x\n")
    dotted = str(tmp_path / "evil").replace("/", ".")  # lm-eval turns dots into slashes: an absolute path
    for ref in ("os.system", "subprocess.getoutput", f"{dotted}.run", "utils.run"):
        sub = tmp_path / "sub"
        sub.mkdir(exist_ok=True)
        (sub / "utils.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef run(x):\n    return x\n")
        (sub / "t.yaml").write_text(f"task: t\nprocess_docs: !function {ref}\n")
        with pytest.raises(ValueError, match="only code inside the task folders"):
            load_yaml(sub / "t.yaml")
    assert not marker.exists()
    ours = load_yaml(ROOT / "tasks" / "ruler" / "ruler_niah_single_1.yaml")  # our own tasks still load
    assert callable(ours["custom_dataset"])


def test_hf_offline_sets_and_restores_the_flags(monkeypatch):
    import datasets.config

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = datasets.config.HF_DATASETS_OFFLINE
    with guards.hf_offline(hub=False, datasets=True):
        assert os.environ["HF_DATASETS_OFFLINE"] == "1" and datasets.config.HF_DATASETS_OFFLINE is True
        assert "HF_HUB_OFFLINE" not in os.environ
    assert datasets.config.HF_DATASETS_OFFLINE == before and "HF_HUB_OFFLINE" not in os.environ


def test_a_local_run_never_opens_a_socket(ckpt, tmp_path, capsys, monkeypatch):
    from evals.harness.runner import RunSpec, _needs_online, make_plan

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    rc, err = run_cli(niah(ckpt, tmp_path / "out") + ["--limit", "1"], capsys)
    assert rc == 0, err
    spec = RunSpec(checkpoints=["x"], tasks=["ruler_niah_single_1", "piqa"])
    assert _needs_online(spec, make_plan(spec)) == {"models": True, "datasets": True}
    spec.data_dir = str(FIXTURE_DATA)
    assert _needs_online(spec, make_plan(spec)) == {"models": False, "datasets": False}
    spec.checkpoints = ["hf:EleutherAI/pythia-160m"]
    assert _needs_online(spec, make_plan(spec)) == {"models": True, "datasets": False}


# ---- identity before any reuse, from contents (issue 19: 1, 2) ------------------------------------------------
def test_finished_folder_with_a_changed_setting_is_refused_before_loading(ckpt, uninterrupted, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    before = stored(out)
    for change, named in ((["--dtype", "bfloat16"], "dtype"), (["--tokenizer", "byte"], "tokenizer")):
        rc, computed, err = drive_here(niah(ckpt, out) + change, tmp_path)
        assert rc == 2 and computed == 0, err  # refused: no stored table printed, nothing computed
        assert "different configuration" in err and named in err and "--output" in err, err
        assert err.count("\n") == 1 and "ruler_niah_single_1 256" not in err
    assert stored(out) == before


def test_partial_folder_with_a_changed_setting_is_refused(ckpt, uninterrupted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)  # holds ruler_niah_single_1; a two-task plan finds the folder partial
    two = ["--tasks", "ruler_niah_single_1,ruler_niah_single_2"]
    rc, computed, err = drive_here(niah(ckpt, out) + two + ["--dtype", "bfloat16"], tmp_path)
    assert rc == 2 and computed == 0 and "dtype" in err and "different configuration" in err, err
    assert stored(out) == stored(uninterrupted)  # untouched


def test_interrupted_run_resumes_after_the_repository_moved(ckpt, uninterrupted, tmp_path):
    first_place = tmp_path / "a"
    ck = Path(shutil.copytree(ckpt, first_place / "ckpt" / ckpt.name))
    out = first_place / "out"
    rc, first, err = drive_here(niah(ck, out), tmp_path, kill_after=2)
    assert rc == 130 and first == 4, err
    moved = tmp_path / "b"  # the whole tree elsewhere: another clone, or the repository moved
    shutil.move(str(first_place), str(moved))
    rc, second, err = drive_here(niah(moved / "ckpt" / ckpt.name, moved / "out"), tmp_path)
    assert rc == 0 and second == N_REQUESTS - first, err  # the cache was found: names come from contents
    (results, samples, _), (ref_results, ref_samples, _) = stored(moved / "out"), stored(uninterrupted)
    assert results["results"] == ref_results["results"] and samples == ref_samples
    # an identical tokenizer elsewhere (--tokenizer) is the same tokenizer
    tok = Path(shutil.copytree(TOKENIZER_DIR, tmp_path / "tok"))
    rc, third, err = drive_here(niah(moved / "ckpt" / ckpt.name, moved / "out") + ["--tokenizer", str(tok)], tmp_path)
    assert rc == 0 and third == 0, err


def test_identity_is_built_from_contents(ckpt, tmp_path):
    from evals.harness import identity

    def ident(path, **kw):
        args = dict(checkpoint=str(path), tokenizer=None, dtype="auto", device="cpu", gate_mode="full",
                    preset=None, model_args={"prefill_chunk": 4096}, limit=None, seed=0, num_fewshot=None,
                    gen_kwargs=None, data_dir=None, tasks={"t": {"bos": "auto"}})
        return identity.build(**{**args, **kw})[0]

    copy = Path(shutil.copytree(ckpt, tmp_path / "elsewhere" / "x"))
    a, b = ident(ckpt, data_dir=str(FIXTURE_DATA)), ident(copy, data_dir=str(tmp_path))
    assert a.to_json() == b.to_json() and not identity.diff(a.to_json(), b)  # paths, data_dir's too, left out
    assert a.data == "offline copy" and ident(ckpt).data == "hub"
    a = ident(ckpt)
    assert a.dtype == "float32" and a.model_args == {}  # "auto" resolved; prefill_chunk is an execution setting
    assert a.weights == identity.file_sha256(ckpt / "model.safetensors")
    c = ident(ckpt, tasks={"t": {"bos": "none"}}, dtype="bf16")
    assert sorted(d.split()[0] for d in identity.diff(a.to_json(), c, done=["t"])) == ["dtype", "t"]
    assert identity.diff(a.to_json(), c, done=[]) == ['dtype "float32" -> "bfloat16"']  # undone tasks may change
    assert identity.diff({"model": {}}, a)[0].startswith("identity layout")  # an older folder's layout
    hub = ident("hf:org/some-model")  # not a folder: nothing to hash before loading ...
    assert hub.weights == "hub:org/some-model" and hub.tokenizer is None
    stored = hub.with_loaded({"sha256": "abc", "tokenizer_sha256": "def"}).to_json()
    assert stored["weights"] == "abc" and not identity.diff(stored, hub)  # ... so compared once loaded
    assert identity.diff(stored, hub.with_loaded({"sha256": "xyz", "tokenizer_sha256": "def"}))[0].startswith(
        'weights "abc"')


# ---- JSON read through the one reader (issue 19: 3) -----------------------------------------------------------
def test_corrupt_json_in_the_results_folder_names_the_file(ckpt, uninterrupted, tmp_path, capsys):
    for name, text in (("config.json", '{"checkpoint": "x", "ident'), ("meta.json", "")):
        out = tmp_path / name
        shutil.copytree(uninterrupted, out)
        (out / ckpt.name / name).write_text(text)
        err = cli_error(niah(ckpt, out), capsys)
        assert str(out / ckpt.name / name) in err and "rerun" in err, err


# ---- labels unique within a run (issue 19: 6) -----------------------------------------------------------------
def test_checkpoints_whose_folders_end_alike_get_distinct_labels(ckpt, tmp_path, capsys):
    from evals.harness.runner import checkpoint_labels

    a = Path(shutil.copytree(ckpt, tmp_path / "A" / "final"))
    b = write_checkpoint(tmp_path / "B" / "final", seed=1)
    assert checkpoint_labels([str(a), str(b), "demo:gdn2-demo"]) == ["A-final", "B-final", "gdn2-demo"]
    assert checkpoint_labels([str(a)]) == ["final"]  # no clash: the short label
    out = tmp_path / "out"
    err = cli_error(["run", "--checkpoint", str(a), "--checkpoint", f"{tmp_path}/A/../A/final", *NIAH,
                     "--output", str(out)], capsys)
    assert "given twice" in err and not out.exists()  # refused before any work
    rc, computed, err = drive_here(["run", "--checkpoint", str(a), "--checkpoint", str(b), *NIAH, "--limit", "1",
                                    "--output", str(out)], tmp_path)
    assert rc == 0 and computed == 2, err
    configs = {d.name: json.loads((d / "config.json").read_text())["checkpoint"] for d in out.iterdir()}
    assert configs == {"A-final": str(a), "B-final": str(b)}


# ---- one writer per label (issue 19: 7) -----------------------------------------------------------------------
def test_two_runs_into_one_folder_compute_each_request_once(ckpt, tmp_path):
    out = tmp_path / "out"
    args = niah(ckpt, out)
    pause = tmp_path / "pause"
    first, first_count = start(args, tmp_path, pause=pause)
    try:
        while not Path(f"{pause}.started").exists():  # the first run holds the label and is mid-task
            assert first.poll() is None, first.communicate()[1]
            time.sleep(0.05)
        rc, computed, err = drive(args, tmp_path)  # the same command again, meanwhile
        assert rc == 2 and computed == 0, err
        line = err.strip().splitlines()[-1]
        assert "being written by another run" in line and f"pid {first.pid}" in line
    finally:
        Path(f"{pause}.go").touch()
    rc, computed, err = finish(first, first_count)
    assert rc == 0 and computed == N_REQUESTS, err
    assert "fatal" not in err and "not a git repository" not in err  # run outside a checkout: no git noise
    rc, computed, err = drive(args, tmp_path)  # after it: everything reused
    assert rc == 0 and computed == 0, err
