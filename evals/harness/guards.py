"""Guards that keep an evaluation from producing a silent wrong number or doing something it was not asked to.

    run_batch(run, batch, on_shrink)   run(batch); on GPU out-of-memory split the batch in halves and retry
    require_finite(value, what)        raise NonFiniteError naming the request when a score is NaN or inf
    hf_offline(hub, datasets)          HF_HUB_OFFLINE / HF_DATASETS_OFFLINE for what a run does not need online
    guard_yaml_functions(roots)        task YAML `!function` may only load code inside the task folders
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")


class NonFiniteError(ValueError):
    """The model produced NaN or inf for a request: its score would be meaningless."""

    def __init__(self, message: str, row: int | None = None) -> None:
        super().__init__(message)
        self.row = row  # row of the batch passed to run_batch's `run`, when the raiser only knows that
        self.item: Any = None  # the batch item of that row, filled in by run_batch


class GPUOutOfMemoryError(RuntimeError):
    """Out of memory even for a single request: nothing smaller to retry with."""


# ---- out of memory -------------------------------------------------------------------------------------------------
def run_batch(run: Callable[[Sequence[T]], list], batch: Sequence[T],
              on_shrink: Callable[[int], None] | None = None, describe: Callable[[T], str] = str) -> list:
    """run(batch), retried on halves of the batch after torch.OutOfMemoryError; results keep the batch order.

    on_shrink(n) is told the batch size that fitted so the caller can lower its budget for later batches.
    A single item that does not fit raises GPUOutOfMemoryError naming it (describe(item)).
    """
    oom = False
    try:
        return run(batch)
    except NonFiniteError as err:
        if err.item is None and err.row is not None:
            err.item = batch[err.row]
        raise
    except torch.OutOfMemoryError:
        oom = True  # handled below, outside the except block, so the failed attempt's tensors can be freed
    assert oom
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if len(batch) == 1:
        raise GPUOutOfMemoryError(
            f"GPU out of memory even at batch size 1 ({describe(batch[0])}): use --dtype bfloat16, a GPU with more "
            f"memory, or a smaller prefill_chunk (--model_args prefill_chunk=4096)")
    half = len(batch) // 2
    if on_shrink is not None:
        on_shrink(half)
    return run_batch(run, batch[:half], on_shrink, describe) + run_batch(run, batch[half:], on_shrink, describe)


# ---- NaN / inf -------------------------------------------------------------------------------------------------------
def nonfinite_message(value: object, what: str) -> str:
    return (f"the model produced {value} for {what}: the checkpoint or dtype overflows "
            f"(try --dtype float32; check the weights for NaN)")


def require_finite(value: float, what: str) -> float:
    """`value` unless it is NaN or inf; then a NonFiniteError naming `what` (the task and request)."""
    if not math.isfinite(value):
        raise NonFiniteError(nonfinite_message(value, what))
    return value


def describe_request(request: Any, index: int) -> str:
    """A request as a person finds it again: task and doc id for lm-eval Instances, else index and text."""
    doc_id = getattr(request, "doc_id", None)
    if doc_id is not None:
        return f"task {getattr(request, 'task_name', '?')} doc {doc_id} (request {getattr(request, 'idx', index)})"
    args = request[0] if isinstance(request, tuple) and isinstance(request[0], tuple) else request
    tail = repr(args[-1])[:60] if isinstance(args, tuple) and args else ""
    return f"request {index}" + (f" (continuation {tail})" if tail else "")


# ---- network -------------------------------------------------------------------------------------------------------
HUB_VARS = {"HF_HUB_OFFLINE": [("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE")],
            "TRANSFORMERS_OFFLINE": []}
DATASET_VARS = {"HF_DATASETS_OFFLINE": [("datasets.config", "HF_DATASETS_OFFLINE")]}


@contextmanager
def hf_offline(hub: bool, datasets: bool) -> Iterator[None]:
    """Make the Hugging Face libraries refuse the network (hub: models and everything; datasets: datasets only).

    The libraries read these variables at import time, so the flags of modules already imported are set too.
    """
    import sys

    wanted = {**(HUB_VARS if hub else {}), **(DATASET_VARS if datasets or hub else {})}
    saved_env = {k: os.environ.get(k) for k in wanted}
    saved_flags = []
    for var, flags in wanted.items():
        os.environ[var] = "1"
        for module, name in flags:
            mod = sys.modules.get(module)
            if mod is not None and hasattr(mod, name):
                saved_flags.append((mod, name, getattr(mod, name)))
                setattr(mod, name, True)
    try:
        yield
    finally:
        for mod, name, value in saved_flags:
            setattr(mod, name, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---- task YAML functions ---------------------------------------------------------------------------------------------
def _inside(path: Path, roots: Sequence[Path]) -> bool:
    path = path.resolve()
    return any(path == r or r in path.parents for r in roots)


def _function_file(qual: str, base_dir: Path) -> Path | None:
    """The .py file lm-eval would load for `!function qual` in a YAML of base_dir, without running it."""
    import importlib.util

    mod_path, _, _ = qual.rpartition(".")
    if not mod_path:
        return None
    local = (base_dir / f"{mod_path.replace('.', '/')}.py").resolve()  # lm-eval's first choice: a file
    if local.exists():
        return local
    top = mod_path.split(".")[0]
    try:  # an importable module: find_spec imports its parent packages, so vet the top package first
        top_spec = importlib.util.find_spec(top)
        if top_spec is None or not top_spec.origin:
            return None
        top_dir = Path(top_spec.origin).resolve().parent
        if top == mod_path or not any(r == top_dir or top_dir in r.parents or r in top_dir.parents
                                      for r in _YAML_ROOTS):
            return Path(top_spec.origin)
        spec = importlib.util.find_spec(mod_path)
        return Path(spec.origin) if spec is not None and spec.origin else None
    except (ImportError, ValueError):
        return None


_YAML_ROOTS: list[Path] = []


def guard_yaml_functions(roots: Sequence[str | os.PathLike[str]]) -> None:
    """Let task YAMLs' `!function` load code only from files inside `roots` (idempotent; roots accumulate).

    lm-eval 0.4.13 resolves `!function a.b.f` to a .py file beside the YAML, else to any importable module, and a
    leading dot-path can reach any absolute file: a task file could run arbitrary code. This wraps its resolver.
    """
    from evals.harness import lm_eval_compat

    for r in roots:
        p = Path(r).resolve()
        if p not in _YAML_ROOTS:
            _YAML_ROOTS.append(p)
    original = lm_eval_compat.yaml_function_resolver()
    if getattr(original, "_gdn2_guard", False):
        return

    def guarded(qual: str, base_dir: Path):
        target = _function_file(qual, Path(base_dir))
        if target is None or not target.is_absolute() or not _inside(target, _YAML_ROOTS):
            where = target or "an unknown module"
            raise ValueError(
                f"task YAML in {base_dir} asks for `!function {qual}`, which resolves to {where}: only code inside "
                f"the task folders ({', '.join(str(r) for r in _YAML_ROOTS)}) may run; move the function into tasks/")
        return original(qual, base_dir)

    guarded._gdn2_guard = True  # type: ignore[attr-defined]
    guarded.__wrapped__ = original  # type: ignore[attr-defined]
    lm_eval_compat.set_yaml_function_resolver(guarded)


def default_yaml_roots() -> list[Path]:
    """lm-eval's own task folder and ours."""
    import lm_eval.tasks

    from tasks.catalog import TASKS_DIR

    return [Path(lm_eval.tasks.__file__).resolve().parent, TASKS_DIR]
