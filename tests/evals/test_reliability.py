"""Reliability and safety: resume after SIGKILL/SIGINT, refused config changes, one-line errors with exit codes,
GPU out-of-memory retry, NaN/inf guards, no code from checkpoints or task YAMLs, nothing online unless asked.

The resume tests run `run_eval.py run` in a subprocess through a small driver that counts the requests the backend
computes (appending to a file) and can kill the process after N batches, so "recomputes only the unfinished
requests" is measured, not assumed.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import run_eval
from evals import guards
from evals.request_cache import RequestCache
from gdn2.config import Config
from gdn2.model import GPT

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = ROOT / "gdn2" / "demo" / "tokenizer"
FIXTURE_DATA = ROOT / "tests" / "fixtures" / "data"
NIAH = ["--tasks", "ruler_niah_single_1", "--lengths", "256", "--num-samples", "8", "--batch-size", "2",
        "--device", "cpu", "--dtype", "float32"]
N_REQUESTS = 8

# Runs run_eval.main with the backend's batch functions wrapped: each computed batch appends its size to
# $COUNT_FILE; after $KILL_AFTER batches the process sends itself $KILL_SIGNAL (after that batch is cached).
DRIVER = r'''
import os, signal, sys
sys.path.insert(0, os.environ["REPO"])
from evals import backend
counted = {"batches": 0}
def wrap(name):
    original = getattr(backend.GDN2LM, name)
    def run(self, *args, **kwargs):
        limit = int(os.environ.get("KILL_AFTER", "0"))
        if limit and counted["batches"] == limit:
            os.kill(os.getpid(), getattr(signal, os.environ.get("KILL_SIGNAL", "SIGKILL")))
        out = original(self, *args, **kwargs)
        counted["batches"] += 1
        with open(os.environ["COUNT_FILE"], "a") as f:
            f.write(f"{len(out)}\n")
        return out
    setattr(backend.GDN2LM, name, run)
for name in ("_greedy", "_score_batch", "_rolling_batch"):
    wrap(name)
import run_eval
sys.exit(run_eval.main(sys.argv[1:]))
'''


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


def drive(args: list[str], tmp: Path, kill_after: int = 0, sig: str = "SIGKILL") -> tuple[int, int, str]:
    """(exit code, requests computed, stderr) of one CLI run in a subprocess."""
    count = tmp / f"count-{os.urandom(4).hex()}"
    count.touch()
    env = {**os.environ, "REPO": str(ROOT), "COUNT_FILE": str(count), "KILL_AFTER": str(kill_after),
           "KILL_SIGNAL": sig, "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}  # tiny matrices: threads only add overhead
    proc = subprocess.run([sys.executable, "-c", DRIVER, *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp)
    computed = sum(int(line) for line in count.read_text().split())
    return proc.returncode, computed, proc.stderr


def stored(out: Path) -> tuple[dict, str, dict]:
    """results.json, the samples file and meta.json of the run's only label."""
    (label,) = [d for d in out.iterdir() if d.is_dir()]
    return (json.loads((label / "results.json").read_text()), (label / "samples" / "ruler_niah_single_1.jsonl")
            .read_text(), json.loads((label / "meta.json").read_text()))


@pytest.fixture(scope="module")
def uninterrupted(ckpt, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("whole")
    rc, computed, err = drive(["run", "--checkpoint", str(ckpt), *NIAH, "--output", str(tmp / "out")], tmp)
    assert rc == 0, err
    assert computed == N_REQUESTS
    return tmp / "out"


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGINT"])
def test_killed_run_resumes_computing_only_the_rest(ckpt, uninterrupted, tmp_path, sig):
    out = tmp_path / "out"
    args = ["run", "--checkpoint", str(ckpt), *NIAH, "--output", str(out)]
    rc, first, err = drive(args, tmp_path, kill_after=2, sig=sig)
    assert rc == (-signal.SIGKILL if sig == "SIGKILL" else 130), err
    assert first == 4  # two batches of two finished before the kill
    if sig == "SIGINT":
        assert "rerun the same command to resume" in err
    assert not (out / ckpt.name / "meta.json").exists()  # no task finished, so nothing is marked done
    rc, second, err = drive(args, tmp_path)
    assert rc == 0, err
    assert second == N_REQUESTS - first  # nothing that had finished ran again
    results, samples, meta = stored(out)
    ref_results, ref_samples, ref_meta = stored(uninterrupted)
    assert meta["complete"] and ref_meta["complete"]
    assert results == ref_results and samples == ref_samples
    rc, third, _ = drive(args, tmp_path)  # a finished run: nothing to do
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
    assert rc == 2 and "sha256" in capsys.readouterr().err


# ---- the request cache --------------------------------------------------------------------------------------------
def test_request_cache_round_trips_and_survives_sigkill(tmp_path):
    path = tmp_path / "c.db"
    code = (f"import sys, os, signal; sys.path.insert(0, {str(ROOT)!r}); from evals.request_cache import "
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
    assert not out.exists() or not any(out.rglob("results.json"))  # no scores from any of them


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
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("results.json"))
