"""Run suites or task lists on one or more checkpoints, task by task, into a resumable results folder.

For each checkpoint (and each gate mode when the suite ablates gates) the runner loads the model once, then for
every task not already finished in OUT/<label>/: sets the task's BOS policy, builds the task through our task
manager (offline data, per-task metadata such as NIAH lengths, the model's own tokenizer for sizing), runs
`lm_eval.simple_evaluate` with a request-level cache (evals.harness.request_cache: every finished request is
committed to SQLite before the next batch), and stores the result. Killing a run (SIGINT or SIGKILL) loses at most
the batch in flight; the same command resumes. A rerun whose settings change the numbers (the run identity of
evals.harness.identity, checked before anything is reused) is refused with ConfigMismatchError instead of mixing
results in one folder, and one lock per label (evals.harness.lock) keeps a second run of the same folder out.
"""
from __future__ import annotations

import logging
import platform
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from lm_eval.utils import simple_parse_args_string

from evals.harness import distributed, guards, identity
from evals.harness.lock import label_lock
from evals.harness.request_cache import durable_cache
from evals.reports.results import RunStore, json_safe

# --model_args that set what the CLI has its own option for (lm-eval's habit: --model_args win over those options)
SPEC_ARGS = {"dtype": "dtype", "device": "device", "batch_size": "batch_size", "backend": "backend",
             "tokenizer": "tokenizer", "preset": "preset"}
CLI_ONLY_ARGS = {"checkpoint": "--checkpoint", "pretrained": "--checkpoint", "gate_mode": "--gate-modes"}


@dataclass
class RunSpec:
    checkpoints: list[str]
    tasks: list[str] = field(default_factory=list)
    suite: str | None = None
    limit: int | float | None = None
    batch_size: int | str = 32
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
    model_args: dict[str, Any] = field(default_factory=dict)  # passed to the backend (after split_model_args)
    model_args_text: str | None = None  # as given, lm-eval's "k=v,k2=v2"
    gen_kwargs: str | None = None  # lm-eval's --gen_kwargs "k=v,..." for generation tasks
    num_fewshot: int | None = None
    include_path: list[str] = field(default_factory=list)  # more task folders (lm-eval's --include_path)
    metadata: dict[str, Any] = field(default_factory=dict)  # handed to every task (lm-eval's --metadata)


@dataclass
class Plan:
    tasks: list[str]
    bos_by_task: dict[str, str]
    metadata: dict[str, dict[str, Any]]
    config: dict[str, dict[str, Any]]
    gate_modes: list[str]
    suite: str | None


def split_model_args(spec: RunSpec) -> RunSpec:
    """Move --model_args that have a CLI option of their own into the spec (they win, as in lm-eval), refuse the
    ones that only a CLI option may set, and leave the rest in spec.model_args for the backend."""
    rest = dict(spec.model_args)
    for key, option in CLI_ONLY_ARGS.items():
        if key in rest:
            raise ValueError(f"--model_args {key}=... is set by {option} in run_eval.py run; pass {option} instead")
    for key, attr in SPEC_ARGS.items():
        if key in rest:
            setattr(spec, attr, str(rest.pop(key)) if key != "batch_size" else rest.pop(key))
    if "bos" in rest:  # a model-wide BOS policy: the same as --bos
        value = str(rest.pop("bos")).lower()
        policy = {"true": "bos", "bos": "bos", "1": "bos", "yes": "bos",
                  "false": "none", "none": "none", "0": "none", "no": "none", "auto": None}
        if value not in policy:
            raise ValueError(f"--model_args bos={value}: use bos=true, bos=false or bos=auto")
        spec.bos = policy[value] or spec.bos
    spec.model_args = rest
    return spec


def known_tasks(include_path: list[str] | None = None) -> list[str]:
    """Every task, group and tag name lm-eval's task index holds (its own, ours, and --include_path folders)."""
    from tasks import catalog

    return sorted(catalog.indexed_task_manager(tuple(include_path or ())).all_tasks)


def make_plan(spec: RunSpec) -> Plan:
    from tasks import catalog

    if bool(spec.suite) == bool(spec.tasks):
        raise ValueError("give exactly one of --suite NAME or --tasks A,B (see `run_eval.py list`)")
    if spec.suite:
        suite = _load_suite(spec.suite)
        tasks, bos, meta, cfg = suite.tasks, dict(suite.bos_by_task), dict(suite.metadata), dict(suite.config)
        gate_modes = suite.gate_modes or ["full"]
    else:
        known = set(known_tasks(spec.include_path))
        for t in spec.tasks:
            if t not in known:
                _unknown_task(t, known, spec.include_path)
        tasks, meta, cfg, gate_modes = list(spec.tasks), {}, {}, ["full"]
        bos = {t: p for t in tasks if (p := catalog.task_bos(t))}  # the policy our task YAMLs declare
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


def _unknown_task(task: str, known: set[str], include_path: list[str]) -> None:
    """Raise for a task no index holds: a broken YAML in our task folders (lm-eval's index skips those
    silently) is the likelier cause, so it is named by file and line; else the closest names."""
    from evals.harness.errors import broken_yaml_files
    from tasks import catalog

    roots = [catalog.TASKS_DIR, *[Path(p) for p in include_path if Path(p).is_dir()]]
    broken = broken_yaml_files(roots)
    if broken:
        path, line = broken[0]
        raise ValueError(f"unknown task {task!r}, and malformed YAML in {path} line {line} (a task file lm-eval "
                         f"skips): fix that file, or see `run_eval.py list` for the task names")
    raise catalog._closest(task, sorted(known), "task")


def _load_suite(name: str):
    """catalog.load_suite: a name in tasks/suites/ or a path to a suite file."""
    from tasks import catalog

    return catalog.load_suite(name)


# ---- labels ----------------------------------------------------------------------------------------------------
def _label_name(checkpoint: str, depth: int = 1) -> str:
    """The last `depth` parts of the checkpoint's path (extension dropped), made filesystem-safe."""
    if checkpoint.startswith(("demo:", "hf:")) or depth == 1:
        parts = checkpoint.rstrip("/").split("/")
    else:
        parts = list(Path(checkpoint).expanduser().resolve().parts[1:])
    name = parts[-1] or checkpoint
    name = re.sub(r"\.(pth|pt|bin|safetensors)$", "", name)
    if name in ("final-model-ckpt", "latest-model-ckpt"):
        depth = max(depth, 2)  # training output folders all end alike: the folder names the run
    parts = parts[:-1] + [name]
    name = "-".join(parts[-depth:]) if depth > 1 else name
    return re.sub(r"[^A-Za-z0-9._+=-]+", "-", name.replace("hf:", "hf-").replace("demo:", "")).strip("-")


def label_for(checkpoint: str, gate_mode: str, many_modes: bool) -> str:
    name = _label_name(checkpoint)
    return f"{name}@gate={gate_mode}" if many_modes else name


def checkpoint_labels(checkpoints: list[str]) -> list[str]:
    """One label per checkpoint, unique within the run: checkpoints whose paths end alike (A/final, B/final) get
    more of their path (A-final, B-final); a checkpoint given twice, or names no path depth can tell apart, are
    refused before any work."""
    keys = [c if c.startswith(("demo:", "hf:")) else str(Path(c).expanduser().resolve()) for c in checkpoints]
    for i, key in enumerate(keys):
        if key in keys[:i]:
            raise ValueError(f"--checkpoint {checkpoints[i]} is given twice (as {checkpoints[keys.index(key)]}): "
                             f"drop one")
    labels = [_label_name(c) for c in checkpoints]
    for depth in range(2, 64):
        clash = {label for label in labels if labels.count(label) > 1}
        if not clash:
            return labels
        labels = [_label_name(c, depth) if label in clash else label for c, label in zip(checkpoints, labels)]
    first = next(c for c, label in zip(checkpoints, labels) if labels.count(label) > 1)
    others = [c for c, label in zip(checkpoints, labels) if label == _label_name(first) and c != first]
    raise ValueError(f"--checkpoint {first} and {others[0] if others else 'another'} would share the results "
                     f"label {_label_name(first)!r}: rename one of the folders, or run them into separate --output "
                     f"folders")


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "lm_eval", "triton", "datasets", "transformers", "gdn2-eval"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


# ---- models ----------------------------------------------------------------------------------------------------
def load_lm(checkpoint: str, spec: RunSpec, gate_mode: str):
    """Our backend for GDN-2 family checkpoints; a Hugging Face baseline for `hf:PATH`."""
    device = distributed.local_device(spec.device)
    if checkpoint.startswith("hf:"):
        if gate_mode != "full":
            raise ValueError(f"{checkpoint}: gate modes apply to GDN-2 checkpoints only")
        try:
            from evals.harness.baseline import load_hf_baseline
        except ImportError as err:
            if "baseline" not in str(err) and "transformers" in str(err):
                raise ValueError(f"{checkpoint}: Hugging Face baselines need transformers "
                                 f"(pip install 'gdn2-eval[hf]'): {err}") from err
            load_hf_baseline = None
        if load_hf_baseline is not None:
            return load_hf_baseline(checkpoint[3:], device=device or "cpu", dtype=spec.dtype,
                                    batch_size=spec.batch_size, model_args=dict(spec.model_args))
        try:  # until evals.harness.baseline lands: lm-eval's own hf model
            from lm_eval.models.huggingface import HFLM
        except ImportError as err:
            raise ValueError(f"{checkpoint}: Hugging Face baselines need transformers "
                             f"(pip install 'gdn2-eval[hf]'): {err}") from err
        return HFLM(pretrained=checkpoint[3:], device=device or "cpu", batch_size=spec.batch_size,
                    dtype=spec.dtype, max_length=1 << 17, **spec.model_args)
    from evals.harness.backend import GDN2LM

    try:
        return GDN2LM(checkpoint, device=device, dtype=spec.dtype, batch_size=spec.batch_size,
                      gate_mode=gate_mode, backend=spec.backend, tokenizer=spec.tokenizer, preset=spec.preset,
                      **spec.model_args)
    except ValueError as err:
        if str(err).startswith("no tokenizer for"):  # the backend words it for --model_args; this is the CLI
            raise ValueError(f"no tokenizer for {checkpoint} (no tokenizer.json or tokenizer.model beside it): "
                             f"pass --tokenizer PATH, the tokenizer file or folder it was trained with") from None
        raise


def model_arg_names() -> list[str]:
    """The names GDN2LM accepts in --model_args."""
    from evals.harness.backend import GDN2LM

    return sorted(GDN2LM.MODEL_ARGS)


def _describe(lm, checkpoint: str) -> dict[str, Any]:
    info = lm.describe() if hasattr(lm, "describe") else {"checkpoint": checkpoint, "format": "hf"}
    return json_safe(info)


def _policy(bos: Any) -> str:
    """describe()["bos"] (a bool for GDN2LM, a policy name for the baseline) as a policy name."""
    if isinstance(bos, bool):
        return "bos" if bos else "none"
    return str(bos) if bos in ("bos", "none") else "auto"


def _sizing_tokenizer(lm, checkpoint: str) -> dict[str, str]:
    if checkpoint.startswith("hf:"):
        return {"hf_tokenizer": checkpoint[3:]}
    return {"tokenizer": lm.tok.name}


def _model_args_text(checkpoint: str, spec: RunSpec, mode: str, ident: identity.RunIdentity) -> str:
    """lm-eval's config["model_args"]: what `lm_eval --model gdn2|hf --model_args ...` would need for this run."""
    name = checkpoint[3:] if checkpoint.startswith("hf:") else checkpoint
    args = {"pretrained": name, "dtype": ident.dtype}
    if not checkpoint.startswith("hf:"):
        args.update(gate_mode=mode, backend=spec.backend)
        if spec.tokenizer:
            args["tokenizer"] = spec.tokenizer
        if spec.preset:
            args["preset"] = spec.preset
    args.update(spec.model_args)
    return ",".join(f"{k}={v}" for k, v in args.items())


# ---- identity and resuming ---------------------------------------------------------------------------------------
class ConfigMismatchError(ValueError):
    """The output folder holds results made under another configuration."""


class TasksFailedError(RuntimeError):
    """Some tasks could not produce a trustworthy score; the others are saved."""


def build_identity(spec: RunSpec, plan: Plan, checkpoint: str, mode: str) -> tuple[identity.RunIdentity, list]:
    """The label's identity from the checkpoint's files (no model is loaded) and its weight files."""
    essays = identity.folder_digest(spec.essay_dir, "*.txt") if spec.essay_dir else None
    tasks = {}
    for t in plan.tasks:
        meta = dict(plan.metadata.get(t, {}))
        if "essay_dir" in meta:
            meta["essay_dir"] = essays if meta["essay_dir"] == spec.essay_dir else meta["essay_dir"]
        tasks[t] = json_safe({"metadata": meta, "run_metadata": spec.metadata, "config": plan.config.get(t, {}),
                              "bos": plan.bos_by_task.get(t) or "auto"})
    gen_kwargs = simple_parse_args_string(spec.gen_kwargs) if isinstance(spec.gen_kwargs, str) else spec.gen_kwargs
    ident, files = identity.build(
        checkpoint=checkpoint, tokenizer=spec.tokenizer, dtype=spec.dtype, device=spec.device, gate_mode=mode,
        preset=spec.preset, model_args=spec.model_args, limit=spec.limit, seed=spec.seed,
        num_fewshot=spec.num_fewshot, gen_kwargs=gen_kwargs, data_dir=spec.data_dir, tasks=tasks)
    return ident, files.weights


def check_resumable(store: RunStore, label: str, plan: Plan, ident: identity.RunIdentity) -> list[str]:
    """Refuse to reuse OUT/<label> when what it holds was made under another identity; returns the plan's tasks
    already done there. A task not done yet may join the folder freely."""
    done = [t for t in plan.tasks if store.task_done(label, t)]
    if not done:
        return done
    stored = store.read_config(label)
    diffs = identity.diff(stored.get("identity") if isinstance(stored, dict) else None, ident, done)
    if diffs:
        raise ConfigMismatchError(
            f"{store.out_dir / label} holds results made with a different configuration ({'; '.join(diffs[:3])}"
            f"{' ...' if len(diffs) > 3 else ''}): pass a new --output, or delete that folder to recompute")
    return done


def _weight_stamps(files: list[Path]) -> list[list[Any]]:
    """[path, size, mtime_ns] of the weight files (what the hash cache keys on; recorded for the reader)."""
    return [[str(Path(f).resolve()), Path(f).stat().st_size, Path(f).stat().st_mtime_ns] for f in files]


def _needs_online(spec: RunSpec, plan: Plan) -> dict[str, bool]:
    """Which hub access the run asked for: models for hf: checkpoints, datasets for hub tasks without --data-dir
    (every lm-eval task; of ours, essay-haystack NIAH tasks without essays: tasks.catalog.task_needs_hub)."""
    from tasks import catalog

    hub_data = any(catalog.task_needs_hub(t, plan.metadata.get(t), spec.data_dir) for t in plan.tasks)
    return {"models": any(c.startswith("hf:") for c in spec.checkpoints) or hub_data, "datasets": hub_data}


@dataclass
class Job:
    checkpoint: str
    mode: str
    label: str
    identity: identity.RunIdentity
    weight_files: list[Path]


def run(spec: RunSpec, on_task: Callable[[str, str, Any], Any] | None = None) -> list[str]:
    """Evaluate every checkpoint x gate mode x task of the plan; returns the labels written.

    Before any work: labels made unique, every label's identity built from file contents and checked against
    what OUT holds (finished and partial folders alike). Then per label, under its lock: load the model, run the
    unfinished tasks with a crash-safe request cache, offline unless a hub model or dataset is asked for. Raises
    TasksFailedError at the end when a task produced NaN/inf (the other tasks are saved; the label is not marked
    complete).
    """
    spec = split_model_args(spec)
    plan = make_plan(spec)
    main = distributed.init(spec.device).is_main  # under torchrun only rank 0 writes
    store = RunStore(spec.output)
    guards.guard_yaml_functions([*guards.default_yaml_roots(), *spec.include_path])
    online = _needs_online(spec, plan)
    many_modes = len(plan.gate_modes) > 1
    jobs = []
    for checkpoint, name in zip(spec.checkpoints, checkpoint_labels(spec.checkpoints)):
        for mode in plan.gate_modes:
            label = f"{name}@gate={mode}" if many_modes else name
            ident, weights = build_identity(spec, plan, checkpoint, mode)
            check_resumable(store, label, plan, ident)
            jobs.append(Job(checkpoint, mode, label, ident, weights))
    failed: list[str] = []
    attempted = 0
    with quiet_git(), guards.hf_offline(hub=not online["models"], datasets=not online["datasets"]), \
            durable_cache():
        for job in jobs:
            with label_lock(store.label_dir(job.label)) if main else nullcontext():
                done = check_resumable(store, job.label, plan, job.identity)  # again, now that the folder is ours
                if len(done) < len(plan.tasks):
                    attempted += len(plan.tasks) - len(done)
                    failed += _run_label(spec, plan, store, job, main, on_task)
                if main:
                    store.mark_complete(job.label, plan.tasks)
    if failed:
        saved = "none is saved" if len(failed) == attempted else "the rest are saved"
        raise TasksFailedError(f"{len(failed)} task(s) failed, {saved}: {' | '.join(failed)}")
    return [job.label for job in jobs]


def _run_label(spec: RunSpec, plan: Plan, store: RunStore, job: Job, main: bool,
               on_task: Callable[[str, str, Any], Any] | None) -> list[str]:
    """The unfinished tasks of one checkpoint x gate mode; returns 'label/task: why' for each failed task."""
    import lm_eval

    checkpoint, label = job.checkpoint, job.label
    t0 = time.time()
    lm = distributed.data_parallel(load_lm(checkpoint, spec, job.mode))
    load_s = time.time() - t0
    info = _describe(lm, checkpoint)
    ident = job.identity.with_loaded(info)
    if ident != job.identity:  # a hub model: its weights are known now
        check_resumable(store, label, plan, ident)
    default_bos = _policy(info.get("bos"))
    stored = store.read_config(label)
    per_task = dict(stored.get("per_task") or {})
    old_tasks = (stored.get("identity") or {}).get("tasks") or {}
    identity_json = ident.to_json()
    # tasks done here under an earlier plan keep their entries, so a later rerun of that plan still matches
    identity_json["tasks"] = {**{t: v for t, v in old_tasks.items() if store.task_done(label, t)},
                              **identity_json["tasks"]}
    is_hf = checkpoint.startswith("hf:")
    failed = []
    for task in plan.tasks:
        if store.task_done(label, task):
            continue
        if hasattr(lm, "set_bos"):  # every task gets its own policy, or the model's default back
            lm.set_bos(plan.bos_by_task.get(task) or default_bos)
        model_info = _describe(lm, checkpoint)
        per_task[task] = {**ident.tasks[task], "effective_bos": model_info.get("bos")}
        config = {
            "checkpoint": checkpoint, "label": label, "suite": plan.suite, "tasks": plan.tasks,
            "gate_mode": job.mode, "limit": spec.limit, "seed": spec.seed, "data_dir": spec.data_dir,
            "task_metadata": plan.metadata, "task_config": plan.config, "bos_by_task": plan.bos_by_task,
            "model_args": _model_args_text(checkpoint, spec, job.mode, ident), "gen_kwargs": spec.gen_kwargs,
            "num_fewshot": spec.num_fewshot, "model": model_info, "identity": identity_json,
            "per_task": dict(per_task), "weight_files": _weight_stamps(job.weight_files),
        }
        # the cache file is named by what decides the numbers, so a changed setting never reads stale responses
        cache = store.label_dir(label) / "cache" / f"{task}-{ident.digest(task)}"
        cache.parent.mkdir(parents=True, exist_ok=True)
        tm = _task_manager(spec, lm, checkpoint, plan, task)
        started = time.time()
        out = None
        try:
            with on_task(label, task, lm) if on_task else nullcontext():
                out = lm_eval.simple_evaluate(
                    model=lm, tasks=[task], task_manager=tm, limit=spec.limit, log_samples=True,
                    use_cache=str(cache), random_seed=spec.seed, numpy_random_seed=spec.seed,
                    torch_random_seed=spec.seed, fewshot_random_seed=spec.seed, bootstrap_iters=1000,
                    num_fewshot=spec.num_fewshot, gen_kwargs=spec.gen_kwargs,
                )
        except guards.NonFiniteError as err:  # this task's numbers are meaningless; others may be fine
            failed.append(f"{label}/{task}: {err}")
        meta = {
            "timings": {task: round(time.time() - started, 3)}, "load_seconds": round(load_s, 3),
            "versions": _versions(), "sha256": model_info.get("sha256"),
            "finished": {task: datetime.now(timezone.utc).isoformat(timespec="seconds")},
        }
        if main and out is not None:
            out = dict(out)
            out["config"] = {**(out.get("config") or {}), "model": "hf" if is_hf else "gdn2",
                             "model_args": config["model_args"]}
            out["model_name"] = checkpoint
            store.save_task(label, task, out, config, meta)
        distributed.barrier()  # the next task_done check reads what rank 0 wrote
    return failed


def _task_manager(spec: RunSpec, lm, checkpoint: str, plan: Plan, task: str):
    """catalog.task_manager for one task, over the --include_path folders too."""
    from tasks import catalog

    metadata = {**spec.metadata, **_sizing_tokenizer(lm, checkpoint)}
    return catalog.task_manager(spec.data_dir, metadata, {task: plan.metadata.get(task, {})}, plan.config,
                                include_path=spec.include_path)


# ---- quiet lm-eval ---------------------------------------------------------------------------------------------
def quiet_lm_eval() -> None:
    """lm-eval logs every step at INFO; the CLI shows its own progress instead."""
    for name in ("lm-eval", "lm_eval", "lm_eval.evaluator", "lm_eval.api.task", "lm_eval.tasks"):
        logging.getLogger(name).setLevel(logging.ERROR)


def git_hash() -> str | None:
    """The harness's own commit (`git describe --always` in the project folder), or None outside a checkout;
    git's complaints go nowhere (lm-eval's helper lets `fatal: not a git repository` reach the terminal)."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "describe", "--always"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@contextmanager
def quiet_git() -> Iterator[None]:
    """lm-eval's get_git_commit_hash replaced by git_hash for the block (it shells out with stderr showing)."""
    import lm_eval.evaluator
    import lm_eval.loggers.utils

    value = git_hash()
    saved = [(m, getattr(m, "get_git_commit_hash", None)) for m in (lm_eval.evaluator, lm_eval.loggers.utils)]
    for module, _ in saved:
        module.get_git_commit_hash = lambda: value
    try:
        yield
    finally:
        for module, original in saved:
            if original is not None:
                module.get_git_commit_hash = original
