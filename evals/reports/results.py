"""Results store: one folder per checkpoint, written atomically, resumable, and read back for tables/reports.

Layout of one run (an output folder ``OUT``)::

    OUT/<label>/config.json          resolved config (whatever dict the runner passes)
    OUT/<label>/meta.json            checkpoint hash, versions, timings per task, tasks_done, complete
    OUT/<label>/results.json         lm-eval output merged over the finished tasks (no samples)
    OUT/<label>/samples/<task>.jsonl lm-eval per-sample records, one JSON object a line

Every file is written to a temporary name and moved into place with ``os.replace``, so a crash leaves either
the old file or the new one, never half of one. Samples are written before results, and meta (which records
``tasks_done``) last, so a task counts as done only once all of its files are in place.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

# Sections of lm-eval's output that are dicts keyed by task name and so merge task by task.
MERGED_SECTIONS = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better",
                   "n-samples")
LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@=+-]*$")
# lm-eval marks "no sample at this length" with -1 in the per-length metrics of its RULER tasks.
LENGTH_METRIC_RE = re.compile(r"^\d+$")
MISSING_LENGTH_VALUE = -1.0


class ModelInfo(TypedDict, total=False):
    """config.json["model"]: the LM's ``describe()`` (GDN2LM, or the hf: baseline wrapper). Readers take the
    checkpoint's format, dtype, device and content hash from here."""

    checkpoint: str
    format: str  # "gdn2", "fla", "hf", "demo", ...
    sha256: str | None  # content hash of the weight files
    dtype: str
    device: str
    bos: str
    tokenizer: str
    tokenizer_sha256: str | None
    gate_mode: str
    recurrence_backend: str
    batch_size: int | str
    max_batch_tokens: int
    model_config: dict[str, Any]
    num_parameters: int
    transformers_version: str


class RunConfig(TypedDict, total=False):
    """config.json: everything the runner resolved for one label (written by the runner, read by the reports).

    ``identity`` is the run identity (evals.harness.identity; what a resume must match), ``per_task`` each task's
    own part of it (metadata, config overrides, BOS policy), ``weight_files`` [path, size, mtime_ns] triples for
    the cheap change test on resume.
    """

    checkpoint: str  # the spec as given: a path, "demo:NAME" or "hf:PATH"
    label: str
    suite: str | None
    tasks: list[str]
    gate_mode: str
    limit: int | float | None
    seed: int
    data_dir: str | None
    task_metadata: dict[str, dict[str, Any]]
    task_config: dict[str, dict[str, Any]]
    bos_by_task: dict[str, str]
    model_args: str | dict[str, Any] | None  # lm-eval style "pretrained=...,dtype=..." (or its parsed dict)
    gen_kwargs: str | dict[str, Any] | None
    num_fewshot: int | None
    model: ModelInfo
    identity: dict[str, Any]
    per_task: dict[str, dict[str, Any]]
    weight_files: list[list[Any]]


class RunMeta(TypedDict, total=False):
    """meta.json. Keys beyond these come from the runner's ``meta_extra`` and are kept as given."""

    sha256: str | None  # weights content hash (same as config["model"]["sha256"]); older folders: checkpoint_hash
    versions: dict[str, str]
    timings: dict[str, float]  # task -> seconds
    finished: dict[str, str]  # task -> ISO time
    load_seconds: float
    tasks_done: list[str]
    complete: bool


class ResultsFile(TypedDict, total=False):
    """results.json: lm-eval's own sections, merged over tasks. Metric keys look like ``"acc,none"``."""

    results: dict[str, dict[str, Any]]
    groups: dict[str, dict[str, Any]]
    configs: dict[str, dict[str, Any]]
    versions: dict[str, Any]
    higher_is_better: dict[str, dict[str, bool | None]]
    # "n-samples" (task -> {"original": int, "effective": int}) is not a valid identifier, hence not listed.


# ----------------------------------------------------------------------------------------------- JSON helpers

def json_safe(obj: Any) -> Any:
    """Turn lm-eval output (tuples, numpy scalars/arrays, sets, NaN, arbitrary objects) into plain JSON values."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in obj]
    tolist = getattr(obj, "tolist", None)  # numpy scalars and arrays, torch tensors
    if callable(tolist):
        try:
            return json_safe(tolist())
        except (TypeError, ValueError):
            pass
    return str(obj)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2) + "\n")


def _read_json(path: Path, default: Any) -> Any:
    if not path.is_file():
        return default
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _check_label(label: str) -> str:
    if not LABEL_RE.match(label) or label in (".", ".."):
        raise ValueError(f"checkpoint label {label!r} is not filesystem-safe; use letters, digits and ._@=+- "
                         f"(e.g. 'gdn2-demo' or 'ckpt@gate=tied')")
    return label


def _check_task(task: str) -> str:
    if not task or "/" in task or "\\" in task or task.startswith("."):
        raise ValueError(f"task name {task!r} cannot be a file name; lm-eval task names have no slashes")
    return task


# ----------------------------------------------------------------------------------------------- writing

class RunStore:
    """Writes one run folder. ``save_task`` per finished task, ``mark_complete`` at the end; reruns resume."""

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.out_dir = Path(out_dir)

    def label_dir(self, label: str) -> Path:
        d = self.out_dir / _check_label(label)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def write_config(self, label: str, config: Mapping[str, Any]) -> None:
        atomic_write_json(self.label_dir(label) / "config.json", config)

    def read_config(self, label: str) -> dict[str, Any]:
        return _read_json(self.out_dir / _check_label(label) / "config.json", {})

    def read_meta(self, label: str) -> RunMeta:
        return _read_json(self.out_dir / _check_label(label) / "meta.json", {})

    def read_results(self, label: str) -> dict[str, Any]:
        return _read_json(self.out_dir / _check_label(label) / "results.json", {})

    def save_task(self, label: str, task: str, evaluate_output: Mapping[str, Any], config: Mapping[str, Any],
                  meta_extra: Mapping[str, Any] | None = None) -> None:
        """Store one task's ``simple_evaluate`` output and merge it into the label's results and meta.

        ``meta_extra`` is merged into meta.json; its dict values (e.g. ``{"timings": {task: secs}}``) merge one
        level deep so per-task entries accumulate. Subtasks of a group get their own samples file and all count
        as done. Saving a task clears ``complete`` until ``mark_complete`` confirms the full task list again.
        """
        _check_task(task)
        if not isinstance(evaluate_output.get("results"), Mapping):
            raise ValueError(f"evaluate output for task {task!r} has no 'results' dict; pass what "
                             f"lm_eval.simple_evaluate returned")
        d = self.label_dir(label)
        samples = evaluate_output.get("samples") or {}
        for name, records in samples.items():
            lines = (json.dumps(json_safe(r)) for r in records)  # ASCII escapes survive lone surrogates
            atomic_write_text(d / "samples" / f"{_check_task(name)}.jsonl", "".join(line + "\n" for line in lines))

        merged = self.read_results(label)
        for section in MERGED_SECTIONS:
            new = evaluate_output.get(section)
            if isinstance(new, Mapping):
                merged.setdefault(section, {}).update(json_safe(new))
        atomic_write_json(d / "results.json", merged)
        self.write_config(label, config)

        meta: dict[str, Any] = dict(self.read_meta(label))
        for key, value in json_safe(dict(meta_extra or {})).items():
            if isinstance(value, dict) and isinstance(meta.get(key), dict):
                meta[key].update(value)
            else:
                meta[key] = value
        done = list(meta.get("tasks_done", []))
        for name in [task, *evaluate_output["results"].keys(), *samples.keys()]:
            if name not in done:
                done.append(name)
        meta["tasks_done"] = done
        meta["complete"] = False
        atomic_write_json(d / "meta.json", meta)

    def task_done(self, label: str, task: str) -> bool:
        """True when ``task`` was saved completely (meta lists it and results.json holds its scores)."""
        if task not in self.read_meta(label).get("tasks_done", []):
            return False
        results = self.read_results(label)
        return task in results.get("results", {}) or task in results.get("groups", {})

    def mark_complete(self, label: str, expected_tasks: Iterable[str]) -> bool:
        """Set ``complete`` in meta.json iff every expected task is done; return the flag."""
        complete = all(self.task_done(label, t) for t in expected_tasks)
        meta = dict(self.read_meta(label))
        meta["complete"] = complete
        atomic_write_json(self.label_dir(label) / "meta.json", meta)
        return complete


# ----------------------------------------------------------------------------------------------- reading

def is_perplexity(metric: str) -> bool:
    return "perplexity" in metric


def display_scale(metric: str) -> float:
    """lm-eval reports fractions, the paper percents; perplexities stay as they are."""
    return 1.0 if is_perplexity(metric) else 100.0


def split_metric_key(key: str) -> tuple[str, str] | None:
    """``"acc,none"`` -> ("acc", "none"); ``"acc_stderr,none"`` -> ("acc_stderr", "none"); other keys -> None."""
    if "," not in key:
        return None
    metric, filt = key.split(",", 1)
    return metric, filt


def metric_name(metric: str, filt: str) -> str:
    """The name used in ``CheckpointResult.scores``: the bare metric for the default filter, else ``m,filter``."""
    return metric if filt == "none" else f"{metric},{filt}"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _parse_task_metrics(entry: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    scores: dict[str, float] = {}
    stderrs: dict[str, float] = {}
    for key, raw in entry.items():
        parts = split_metric_key(key)
        value = _number(raw)
        if parts is None or value is None:
            continue
        metric, filt = parts
        if metric.endswith("_stderr"):
            stderrs[metric_name(metric[: -len("_stderr")], filt)] = value
        elif not (LENGTH_METRIC_RE.match(metric) and value == MISSING_LENGTH_VALUE):
            scores[metric_name(metric, filt)] = value
    return scores, stderrs


@dataclass
class CheckpointResult:
    """One checkpoint's results as read from ``OUT/<label>``. Scores are lm-eval's raw values (fractions)."""

    label: str
    path: Path
    config: dict[str, Any]
    meta: dict[str, Any]
    scores: dict[str, dict[str, float]]  # task -> metric -> value ("acc", "word_perplexity", "4096", ...)
    stderrs: dict[str, dict[str, float]]
    higher_is_better: dict[str, dict[str, bool | None]] = field(default_factory=dict)
    _samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)

    def score(self, task: str, metric: str) -> float | None:
        return self.scores.get(task, {}).get(metric)

    def has_samples(self, task: str) -> bool:
        return (self.path / "samples" / f"{task}.jsonl").is_file()

    def samples(self, task: str) -> list[dict[str, Any]]:
        """Per-sample records of ``task`` (read on first use; [] when the run logged none)."""
        if task not in self._samples:
            path = self.path / "samples" / f"{_check_task(task)}.jsonl"
            records: list[dict[str, Any]] = []
            if path.is_file():
                with path.open(encoding="utf-8") as f:
                    records = [json.loads(line) for line in f if line.strip()]
            self._samples[task] = records
        return self._samples[task]


def _load_label(path: Path) -> CheckpointResult:
    results = _read_json(path / "results.json", {})
    scores: dict[str, dict[str, float]] = {}
    stderrs: dict[str, dict[str, float]] = {}
    for section in ("results", "groups"):
        for task, entry in results.get(section, {}).items():
            if isinstance(entry, Mapping):
                scores[task], stderrs[task] = _parse_task_metrics(entry)
    return CheckpointResult(label=path.name, path=path, config=_read_json(path / "config.json", {}),
                            meta=_read_json(path / "meta.json", {}), scores=scores, stderrs=stderrs,
                            higher_is_better=results.get("higher_is_better", {}))


def load_run(path: str | os.PathLike[str]) -> list[CheckpointResult]:
    """Read ``OUT`` (every label in it, sorted by name) or one ``OUT/<label>`` folder."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"run folder {str(p)!r} does not exist; pass an output folder of run_eval.py "
                                f"or one of its OUT/<label> folders")
    if (p / "results.json").is_file():
        return [_load_label(p)]
    labels = sorted(d for d in p.iterdir() if d.is_dir() and (d / "results.json").is_file())
    if not labels:
        raise ValueError(f"no results in {str(p)!r}: neither {p}/results.json nor {p}/<label>/results.json "
                         f"exists; run an evaluation into it first")
    return [_load_label(d) for d in labels]


def load_runs(paths: Sequence[str | os.PathLike[str]]) -> list[CheckpointResult]:
    """``load_run`` over several paths; equal labels from different folders get their parent folder prepended."""
    results = [r for p in paths for r in load_run(p)]
    counts: dict[str, int] = {}
    for r in results:
        counts[r.label] = counts.get(r.label, 0) + 1
    for r in results:
        if counts[r.label] > 1:
            r.label = f"{r.path.parent.name}/{r.path.name}"
    return results
