"""Run suites or task lists on one or more checkpoints, task by task, into a resumable results folder.

For each checkpoint (and each gate mode when the suite ablates gates) the runner loads the model once, then for
every task not already finished in OUT/<label>/: sets the task's BOS policy, builds the task through our task
manager (offline data, per-task metadata such as NIAH lengths, the model's own tokenizer for sizing), runs
`lm_eval.simple_evaluate` with a request-level cache (lm-eval's CachingLM, written as each batch finishes), and
stores the result. Killing a run loses at most the batch in flight; the same command resumes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import platform
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from evals.results import RunStore


@dataclass
class RunSpec:
    checkpoints: list[str]
    tasks: list[str] = field(default_factory=list)
    suite: str | None = None
    limit: int | float | None = None
    batch_size: int = 32
    device: str | None = None
    dtype: str = "auto"
    output: str = "results/run"
    data_dir: str | None = None
    essay_dir: str | None = None
    seed: int = 0
    bos: str | None = None  # overrides the suite's per-task policy
    gate_modes: list[str] | None = None  # overrides the suite's
    lengths: list[int] | None = None  # NIAH max_seq_lengths override
    num_samples: int | None = None  # NIAH samples per length override
    backend: str = "auto"
    tokenizer: str | None = None
    preset: str | None = None


@dataclass
class Plan:
    tasks: list[str]
    bos_by_task: dict[str, str]
    metadata: dict[str, dict[str, Any]]
    config: dict[str, dict[str, Any]]
    gate_modes: list[str]
    suite: str | None


def make_plan(spec: RunSpec) -> Plan:
    from tasks import catalog

    if bool(spec.suite) == bool(spec.tasks):
        raise ValueError("give exactly one of --suite NAME or --tasks A,B (see `run_eval.py list`)")
    if spec.suite:
        suite = catalog.load_suite(spec.suite)
        tasks, bos, meta, cfg = suite.tasks, dict(suite.bos_by_task), dict(suite.metadata), dict(suite.config)
        gate_modes = suite.gate_modes or ["full"]
    else:
        known = catalog.list_tasks()
        for t in spec.tasks:
            if t not in known:
                raise catalog._closest(t, known, "task")
        tasks, bos, meta, cfg, gate_modes = list(spec.tasks), {}, {}, {}, ["full"]
    meta = {t: dict(meta.get(t, {})) for t in tasks}
    for t in tasks:
        if t.startswith("ruler_niah"):
            if spec.lengths:
                meta[t]["max_seq_lengths"] = list(spec.lengths)
            if spec.num_samples:
                meta[t]["num_samples"] = spec.num_samples
        if spec.essay_dir:
            meta[t]["essay_dir"] = spec.essay_dir
    if spec.bos:
        bos = {t: spec.bos for t in tasks}
    if spec.gate_modes:
        gate_modes = list(spec.gate_modes)
    return Plan(tasks, bos, meta, cfg, gate_modes, spec.suite)


def label_for(checkpoint: str, gate_mode: str, many_modes: bool) -> str:
    name = checkpoint.rstrip("/").split("/")[-1] or checkpoint
    name = re.sub(r"\.(pth|pt|bin|safetensors)$", "", name)
    if name in ("final-model-ckpt", "latest-model-ckpt"):
        parts = checkpoint.rstrip("/").split("/")
        name = f"{parts[-2]}-{name}" if len(parts) > 1 else name
    name = re.sub(r"[^A-Za-z0-9._+=-]+", "-", name.replace("hf:", "hf-").replace("demo:", "")).strip("-")
    return f"{name}@gate={gate_mode}" if many_modes else name


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "lm_eval", "triton", "datasets", "gdn2-eval"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def load_lm(checkpoint: str, spec: RunSpec, gate_mode: str):
    """Our backend for GDN-2 family checkpoints; lm-eval's own `hf` model for `hf:PATH` baselines."""
    if checkpoint.startswith("hf:"):
        try:
            from lm_eval.models.huggingface import HFLM
        except ImportError as err:
            raise ValueError(f"{checkpoint}: Hugging Face baselines need transformers "
                             f"(pip install 'gdn2-eval[hf]'): {err}") from err
        if gate_mode != "full":
            raise ValueError(f"{checkpoint}: gate modes apply to GDN-2 checkpoints only")
        return HFLM(pretrained=checkpoint[3:], device=spec.device or "cpu", batch_size=spec.batch_size,
                    dtype=spec.dtype, max_length=1 << 17)
    from evals.backend import GDN2LM

    return GDN2LM(checkpoint, device=spec.device, dtype=spec.dtype, batch_size=spec.batch_size,
                  gate_mode=gate_mode, backend=spec.backend, tokenizer=spec.tokenizer, preset=spec.preset)


def _sizing_tokenizer(lm, checkpoint: str) -> dict[str, str]:
    if checkpoint.startswith("hf:"):
        return {"hf_tokenizer": checkpoint[3:]}
    return {"tokenizer": lm.tok.name if lm.tok.name != "byte" else "byte"}


def _config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run(spec: RunSpec, on_task: Callable[[str, str, Any], Any] | None = None) -> list[str]:
    """Evaluate every checkpoint x gate mode x task of the plan; returns the labels written."""
    import lm_eval

    from tasks import catalog

    plan = make_plan(spec)
    store = RunStore(spec.output)
    labels = []
    many_modes = len(plan.gate_modes) > 1
    for checkpoint in spec.checkpoints:
        for mode in plan.gate_modes:
            label = label_for(checkpoint, mode, many_modes)
            labels.append(label)
            if all(store.task_done(label, t) for t in plan.tasks):
                store.mark_complete(label, plan.tasks)
                continue
            t0 = time.time()
            lm = load_lm(checkpoint, spec, mode)
            load_s = time.time() - t0
            for task in plan.tasks:
                if store.task_done(label, task):
                    continue
                bos = plan.bos_by_task.get(task)
                if bos and hasattr(lm, "set_bos"):
                    lm.set_bos(bos)
                model_info = lm.describe() if hasattr(lm, "describe") else {"checkpoint": checkpoint}
                config = {
                    "checkpoint": checkpoint, "label": label, "suite": plan.suite, "tasks": plan.tasks,
                    "gate_mode": mode, "limit": spec.limit, "seed": spec.seed, "data_dir": spec.data_dir,
                    "task_metadata": plan.metadata, "task_config": plan.config, "bos_by_task": plan.bos_by_task,
                    "model": model_info,
                }
                cache = store.label_dir(label) / "cache" / f"{task}-{_config_hash([config, task])}"
                cache.parent.mkdir(parents=True, exist_ok=True)
                tm = catalog.task_manager(spec.data_dir, _sizing_tokenizer(lm, checkpoint),
                                          {task: plan.metadata.get(task, {})}, plan.config)
                started = time.time()
                ctx = on_task(label, task, lm) if on_task else None
                with ctx if ctx is not None else _null():
                    out = lm_eval.simple_evaluate(
                        model=lm, tasks=[task], task_manager=tm, limit=spec.limit, log_samples=True,
                        use_cache=str(cache), random_seed=spec.seed, numpy_random_seed=spec.seed,
                        torch_random_seed=spec.seed, fewshot_random_seed=spec.seed, bootstrap_iters=1000,
                    )
                meta = {
                    "timings": {task: round(time.time() - started, 3)}, "load_seconds": round(load_s, 3),
                    "versions": _versions(), "sha256": model_info.get("sha256"),
                    "finished": {task: datetime.now(timezone.utc).isoformat(timespec="seconds")},
                }
                store.save_task(label, task, dict(out), config, meta)
            store.mark_complete(label, plan.tasks)
    return labels


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def quiet_lm_eval() -> None:
    """lm-eval logs every step at INFO; the CLI shows its own progress instead."""
    for name in ("lm-eval", "lm_eval", "lm_eval.evaluator", "lm_eval.api.task", "lm_eval.tasks"):
        logging.getLogger(name).setLevel(logging.ERROR)
