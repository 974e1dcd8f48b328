"""Run suites or task lists on one or more checkpoints, task by task, into a resumable results folder.

For each checkpoint (and each gate mode when the suite ablates gates) the runner loads the model once, then for
every task not already finished in OUT/<label>/: sets the task's BOS policy, builds the task through our task
manager (offline data, per-task metadata such as NIAH lengths, the model's own tokenizer for sizing), runs
`lm_eval.simple_evaluate` with a request-level cache (evals.harness.request_cache: every finished request is committed to
SQLite before the next batch), and stores the result. Killing a run (SIGINT or SIGKILL) loses at most the batch in
flight; the same command resumes. A rerun whose settings change the numbers (RUN_KEYS, MODEL_KEYS, a task's
metadata or BOS policy) is refused with ConfigMismatchError instead of mixing results in one folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
import platform
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from evals.harness import distributed, guards
from evals.harness.request_cache import durable_cache
from evals.reports.results import RunStore, json_safe

# What decides a result (a change means different numbers); batch size, device and recurrence backend are
# execution settings that may change between a run and its resumption.
RUN_KEYS = ("gate_mode", "limit", "seed", "data_dir")
MODEL_KEYS = ("sha256", "dtype", "tokenizer", "model_config")
LOCAL_TASK_PREFIXES = ("ruler_",)  # tasks that generate their data and need nothing from the hub


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
        suite = _load_suite(spec.suite)
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


def _load_suite(name: str):
    """catalog.load_suite, with a suite file that parses but lacks or misshapes a field named clearly."""
    from tasks import catalog

    try:
        return catalog.load_suite(name)
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"suite file tasks/suites/{name}.yaml (or a suite it includes) is malformed "
                         f"({type(err).__name__}: {err}): it needs a `tasks:` list and a BOS policy per task "
                         f"(tasks/README.md, Suites)") from None


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
    from evals.harness.backend import GDN2LM

    try:
        return GDN2LM(checkpoint, device=distributed.local_device(spec.device), dtype=spec.dtype,
                      batch_size=spec.batch_size, gate_mode=gate_mode, backend=spec.backend,
                      tokenizer=spec.tokenizer, preset=spec.preset)
    except ValueError as err:
        if str(err).startswith("no tokenizer for"):  # the backend words it for --model_args; this is the CLI
            raise ValueError(f"no tokenizer for {checkpoint} (no tokenizer.json or tokenizer.model beside it): "
                             f"pass --tokenizer PATH, the tokenizer file or folder it was trained with") from None
        raise


def _sizing_tokenizer(lm, checkpoint: str) -> dict[str, str]:
    if checkpoint.startswith("hf:"):
        return {"hf_tokenizer": checkpoint[3:]}
    return {"tokenizer": lm.tok.name}


def _config_hash(config: Any) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ConfigMismatchError(ValueError):
    """The output folder holds results made under another configuration."""


class TasksFailedError(RuntimeError):
    """Some tasks could not produce a trustworthy score; the others are saved."""


def _run_identity(spec: RunSpec, gate_mode: str) -> dict[str, Any]:
    return json_safe({"gate_mode": gate_mode, "limit": spec.limit, "seed": spec.seed, "data_dir": spec.data_dir})


def _model_identity(model_info: dict[str, Any]) -> dict[str, Any]:
    return json_safe({k: model_info.get(k) for k in MODEL_KEYS})


def _task_identity(plan: Plan, task: str, bos: Any = None) -> dict[str, Any]:
    """What decides one task's numbers beyond the run: its metadata, config overrides and BOS policy."""
    return json_safe({"metadata": plan.metadata.get(task, {}), "config": plan.config.get(task, {}),
                      "bos": plan.bos_by_task.get(task), "effective_bos": bos})


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in new:
        if key in old and old[key] != new[key]:
            out.append(f"{prefix}{key} {json.dumps(old[key], sort_keys=True)[:80]} -> "
                       f"{json.dumps(new[key], sort_keys=True)[:80]}")
    return out


def check_resumable(store: RunStore, label: str, plan: Plan, run_id: dict[str, Any],
                    model_id: dict[str, Any] | None = None) -> None:
    """Refuse to add to OUT/<label> results made under a different configuration (see RUN_KEYS, MODEL_KEYS).

    Compared against config.json for the tasks already done there; a task not yet done may join freely.
    """
    done = [t for t in plan.tasks if store.task_done(label, t)]
    stored = store.read_config(label)
    if not done or not stored:
        return
    identity = stored.get("identity") or {k: stored.get(k) for k in RUN_KEYS}
    diffs = _differences(identity, run_id)
    if model_id is not None and isinstance(identity.get("model"), dict):
        diffs += _differences(identity["model"], model_id, "model ")
    per_task = stored.get("per_task") or {}
    for task in done:
        if task in per_task:
            new = _task_identity(plan, task, per_task[task].get("effective_bos"))  # follows from the rest
            diffs += _differences(per_task[task], new, f"{task} ")
    if diffs:
        raise ConfigMismatchError(
            f"{store.out_dir / label} holds results made with a different configuration ({'; '.join(diffs[:3])}"
            f"{' ...' if len(diffs) > 3 else ''}): pass a new --output, or delete that folder to recompute")


def _weight_files(lm) -> list[list[Any]]:
    """[path, size, mtime_ns] of the checkpoint's weight files: a cheap test that a rerun reads the same weights."""
    files = getattr(getattr(lm, "loaded", None), "weight_files", None) or []
    return [[str(Path(f).resolve()), Path(f).stat().st_size, Path(f).stat().st_mtime_ns] for f in files]


def _same_weights(store: RunStore, label: str, checkpoint: str) -> bool:
    """True when OUT/<label> was made from this checkpoint spec and its weight files are unchanged on disk.

    Otherwise the runner loads the model, so that check_resumable compares the weights' sha256.
    """
    stored = store.read_config(label)
    if stored.get("checkpoint") != checkpoint:
        return False
    for name, size, mtime in stored.get("weight_files", []):
        p = Path(name)
        if not p.is_file() or p.stat().st_size != size or p.stat().st_mtime_ns != mtime:
            return False
    return True


def _needs_online(spec: RunSpec, plan: Plan) -> dict[str, bool]:
    """Which hub access the run asked for: models for hf: checkpoints, datasets for hub tasks without --data-dir."""
    hub_data = spec.data_dir is None and any(not t.startswith(LOCAL_TASK_PREFIXES) for t in plan.tasks)
    return {"models": any(c.startswith("hf:") for c in spec.checkpoints) or hub_data, "datasets": hub_data}


def run(spec: RunSpec, on_task: Callable[[str, str, Any], Any] | None = None) -> list[str]:
    """Evaluate every checkpoint x gate mode x task of the plan; returns the labels written.

    Resumes what OUT holds (refusing a changed configuration), keeps every finished request in a crash-safe cache,
    stays offline unless a hub model or dataset is asked for, and raises TasksFailedError at the end when a task
    produced NaN/inf (the other tasks are saved; the label is not marked complete).
    """
    plan = make_plan(spec)
    main = distributed.init(spec.device).is_main  # under torchrun only rank 0 writes
    store = RunStore(spec.output)
    guards.guard_yaml_functions(guards.default_yaml_roots())
    online = _needs_online(spec, plan)
    labels: list[str] = []
    failed: list[str] = []
    many_modes = len(plan.gate_modes) > 1
    with guards.hf_offline(hub=not online["models"], datasets=not online["datasets"]), durable_cache():
        for checkpoint in spec.checkpoints:
            for mode in plan.gate_modes:
                label = label_for(checkpoint, mode, many_modes)
                labels.append(label)
                check_resumable(store, label, plan, _run_identity(spec, mode))
                if all(store.task_done(label, t) for t in plan.tasks) and _same_weights(store, label, checkpoint):
                    if main:
                        store.mark_complete(label, plan.tasks)
                    continue
                failed += _run_label(spec, plan, store, checkpoint, mode, label, main, on_task)
                if main:
                    store.mark_complete(label, plan.tasks)
    if failed:
        raise TasksFailedError(f"{len(failed)} task(s) failed, the rest are saved: {' | '.join(failed)}")
    return labels


def _run_label(spec: RunSpec, plan: Plan, store: RunStore, checkpoint: str, mode: str, label: str, main: bool,
               on_task: Callable[[str, str, Any], Any] | None) -> list[str]:
    """The unfinished tasks of one checkpoint x gate mode; returns 'label/task: why' for each failed task."""
    import lm_eval

    from tasks import catalog

    t0 = time.time()
    lm = distributed.data_parallel(load_lm(checkpoint, spec, mode))
    load_s = time.time() - t0
    run_id = _run_identity(spec, mode)
    model_id = _model_identity(lm.describe() if hasattr(lm, "describe") else {"checkpoint": checkpoint})
    check_resumable(store, label, plan, run_id, model_id)
    per_task = store.read_config(label).get("per_task", {})
    failed = []
    for task in plan.tasks:
        if store.task_done(label, task):
            continue
        bos = plan.bos_by_task.get(task)
        if bos and hasattr(lm, "set_bos"):
            lm.set_bos(bos)
        model_info = lm.describe() if hasattr(lm, "describe") else {"checkpoint": checkpoint}
        per_task[task] = _task_identity(plan, task, model_info.get("bos"))
        config = {
            "checkpoint": checkpoint, "label": label, "suite": plan.suite, "tasks": plan.tasks,
            "gate_mode": mode, "limit": spec.limit, "seed": spec.seed, "data_dir": spec.data_dir,
            "task_metadata": plan.metadata, "task_config": plan.config, "bos_by_task": plan.bos_by_task,
            "model": model_info, "identity": {**run_id, "model": model_id}, "per_task": dict(per_task),
            "weight_files": _weight_files(lm),
        }
        # the cache file is named by what decides the numbers, so a changed setting never reads stale responses
        cache = store.label_dir(label) / "cache" / f"{task}-{_config_hash([run_id, model_id, per_task[task], task])}"
        cache.parent.mkdir(parents=True, exist_ok=True)
        tm = catalog.task_manager(spec.data_dir, _sizing_tokenizer(lm, checkpoint),
                                  {task: plan.metadata.get(task, {})}, plan.config)
        started = time.time()
        out = None
        try:
            with on_task(label, task, lm) if on_task else nullcontext():
                out = lm_eval.simple_evaluate(
                    model=lm, tasks=[task], task_manager=tm, limit=spec.limit, log_samples=True,
                    use_cache=str(cache), random_seed=spec.seed, numpy_random_seed=spec.seed,
                    torch_random_seed=spec.seed, fewshot_random_seed=spec.seed, bootstrap_iters=1000,
                )
        except guards.NonFiniteError as err:  # this task's numbers are meaningless; others may be fine
            failed.append(f"{label}/{task}: {err}")
        meta = {
            "timings": {task: round(time.time() - started, 3)}, "load_seconds": round(load_s, 3),
            "versions": _versions(), "sha256": model_info.get("sha256"),
            "finished": {task: datetime.now(timezone.utc).isoformat(timespec="seconds")},
        }
        if main and out is not None:
            store.save_task(label, task, dict(out), config, meta)
        distributed.barrier()  # the next task_done check reads what rank 0 wrote
    return failed


def quiet_lm_eval() -> None:
    """lm-eval logs every step at INFO; the CLI shows its own progress instead."""
    for name in ("lm-eval", "lm_eval", "lm_eval.evaluator", "lm_eval.api.task", "lm_eval.tasks"):
        logging.getLogger(name).setLevel(logging.ERROR)
