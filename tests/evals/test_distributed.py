"""Data-parallel evaluation: `torchrun --nproc-per-node 2 run_eval.py run` on the CPU (gloo) writes the same
results folder as one process; the request split is balanced, whole-context and deterministic."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evals.harness.distributed import DataParallelLM, data_parallel, dist_env, local_device, split_by_cost
from gdn2.config import Config
from gdn2.model import GPT

ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = ROOT / "tests" / "fixtures" / "data"
TOKENIZER_DIR = ROOT / "gdn2" / "demo" / "tokenizer"
TASKS = "ruler_niah_single_1,piqa"
LABEL = "tiny"
# the sections of a results file that the numbers decide (the rest: dates, durations, the environment)
WRITTEN_BY_THE_RUN = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better",
                      "n-samples", "task_hashes", "model_name")


def _tiny_checkpoint(out: Path) -> Path:
    """A random GDN-2 in the native layout (see evals/train_demo.py::save) with the demo BPE tokenizer."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    config = Config(name="tiny", vocab_size=1024, n_layer=2, n_embd=64, n_head=2, intermediate_size=128,
                    gdn2_num_heads=2, gdn2_head_dim=32)
    model = GPT(config)
    out.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / name, out / name)
    (out / "config.json").write_text(json.dumps({"format": "gdn2-native", "config": config.to_dict(), "bos": True}))
    return out


def _launch(launcher: list[str], checkpoint: Path, output: Path) -> tuple[list[str], subprocess.Popen]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", GDN2_DEBUG="1", PYTHONPATH=str(ROOT),
               GDN2_HASH_CACHE=str(output.parent / "file-hashes.json"))  # the test's own, not ~/.cache
    cmd = [*launcher, str(ROOT / "run_eval.py"), "run", "--checkpoint", str(checkpoint), "--tasks", TASKS,
           "--lengths", "256", "--num-samples", "6", "--data-dir", str(DATA_DIR), "--device", "cpu",
           "--batch-size", "4", "--output", str(output), "--metadata", "sizing=tight"]
    return cmd, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _folder(path: Path) -> dict[str, object]:
    """Everything a run writes except wall-clock data (timings, dates, environment) and the per-rank request
    caches; lm-eval's date-stamped file names (results_<date>.json, samples_<task>_<date>.jsonl) without the date."""
    files = {}
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path).as_posix()
        if f.is_dir() or rel.startswith("cache/") or rel == ".lock":
            continue
        rel = re.sub(r"_\d{4}-\d{2}-\d{2}T[\d.-]+(?=\.jsonl?$)", "", rel)
        if f.suffix == ".jsonl":
            files[rel] = [json.loads(line) for line in f.read_text().splitlines()]
        else:
            files[rel] = json.loads(f.read_text())
    meta = files["meta.json"]
    for key in ("timings", "load_seconds", "finished"):
        meta.pop(key)
    files["results.json"] = {k: v for k, v in files.pop("results.json").items() if k in WRITTEN_BY_THE_RUN}
    return files


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict]:
    tmp = tmp_path_factory.mktemp("dp")
    checkpoint = _tiny_checkpoint(tmp / "ckpt")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    # both at once: most of each run is lm-eval indexing its task YAMLs, one core per process is enough
    launches = [_launch([sys.executable], checkpoint, tmp / "single"), _launch(torchrun, checkpoint, tmp / "dp")]
    for cmd, proc in launches:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{out[-4000:]}"
    assert list((tmp / "dp" / "ckpt" / "cache").glob("*_rank1.db")), "rank 1 never evaluated"
    return _folder(tmp / "single" / "ckpt"), _folder(tmp / "dp" / "ckpt")


def test_two_ranks_write_the_single_process_results(runs):
    single, dp = runs
    assert sorted(dp) == sorted(single)
    assert {"results.json", "config.json", "meta.json", "samples_piqa.jsonl",
            "samples_ruler_niah_single_1.jsonl"} <= set(single)
    for name in single:
        assert dp[name] == single[name], name
    results = single["results.json"]["results"]
    assert "acc,none" in results["piqa"] and "256,none" in results["ruler_niah_single_1"]
    assert len(single["samples_ruler_niah_single_1.jsonl"]) == 6
    assert single["meta.json"]["complete"] is True


def test_split_keeps_groups_whole_and_balances_cost():
    costs = [100, 1, 1, 50, 50, 10, 10]
    groups = [[0], [1, 2], [3], [4], [5, 6]]
    shares = split_by_cost(costs, groups, 2)
    assert sorted(i for s in shares for i in s) == list(range(7))
    for g in groups:
        assert sum(set(g) <= set(s) for s in shares) == 1  # each group on exactly one rank
    loads = [sum(costs[i] for i in s) for s in shares]
    assert sorted(loads) == [102, 120]  # greedy: 100+2 against 50+50+20
    assert split_by_cost(costs, groups, 2) == shares  # every rank computes the same split


def test_single_process_is_left_alone(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    lm = object()
    assert data_parallel(lm) is lm
    assert dist_env().is_main and local_device(None) is None and local_device("cpu") == "cpu"


def test_bad_launch_environment_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="torchrun"):
        dist_env()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ValueError, match="integers"):
        dist_env()


def test_wrapper_reports_one_process_to_lm_eval(monkeypatch):
    # lm-eval must not shard documents itself: the wrapper is rank 0 of 1 and forwards the rest
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")

    class Inner:
        device = "cpu"
        tok = "tokenizer"

    lm = DataParallelLM(Inner())
    assert (lm.rank, lm.world_size, lm.env.rank, lm.tok, lm.device) == (0, 1, 1, "tokenizer", "cpu")


class _EchoLM:
    """Answers each request with its own text and records what this rank was asked."""

    device = "cpu"

    def __init__(self, fail: bool = False) -> None:
        self.seen: list[str] = []
        self.fail = fail

    def set_cache_hook(self, hook) -> None:
        pass

    def generate_until(self, requests):
        if self.fail:
            raise MemoryError("out of memory on this rank")
        self.seen += [r.args[0] for r in requests]
        return [r.args[0].upper() for r in requests]

    def loglikelihood(self, requests):
        self.seen += [r.args[0] + r.args[1] for r in requests]
        return [(float(len(r.args[1])), True) for r in requests]


def _rank_worker(rank: int, port: int, out_dir: str) -> None:
    from types import SimpleNamespace

    from evals.harness import distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    distributed.init("cpu")
    texts = [f"doc{i}" * (i + 1) for i in range(7)]
    inner = _EchoLM()
    lm = DataParallelLM(inner)
    gen = lm.generate_until([SimpleNamespace(args=(t, {})) for t in texts])
    pairs = [("ctxA", " x"), ("ctxB", " yy"), ("ctxA", " zzz"), ("ctxC", " w")]
    ll = lm.loglikelihood([SimpleNamespace(args=p) for p in pairs])
    try:
        DataParallelLM(_EchoLM(fail=rank == 1)).generate_until([SimpleNamespace(args=(t, {})) for t in texts])
        error = ""
    except MemoryError as err:
        error = str(err)
    report = {"gen": gen, "ll": ll, "seen": inner.seen, "error": error}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    torch.distributed.destroy_process_group()


def test_each_rank_computes_its_share_and_all_get_every_response(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_rank_worker, args=(port, str(tmp_path)), nprocs=2)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    texts = [f"doc{i}" * (i + 1) for i in range(7)]
    for rep in reports:
        assert rep["gen"] == [t.upper() for t in texts]  # request order, on every rank
        assert rep["ll"] == [[2.0, True], [3.0, True], [4.0, True], [2.0, True]]
        assert rep["error"] == "out of memory on this rank"  # rank 0 raises rank 1's error instead of hanging
    gen_seen = [[s for s in rep["seen"] if s.startswith("doc")] for rep in reports]
    assert sorted(gen_seen[0] + gen_seen[1]) == sorted(texts) and all(gen_seen)  # split, nothing twice
    ll_seen = [[s for s in rep["seen"] if s.startswith("ctx")] for rep in reports]
    assert sorted(ll_seen[0] + ll_seen[1]) == sorted(a + b for a, b in [("ctxA", " x"), ("ctxB", " yy"),
                                                                        ("ctxA", " zzz"), ("ctxC", " w")])
    assert any({"ctxA x", "ctxA zzz"} <= set(seen) for seen in ll_seen)  # a shared context stays on one rank
