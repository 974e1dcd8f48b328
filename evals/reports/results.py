"""Results store: one folder per checkpoint label in lm-eval's own layout, written atomically, resumable, read back.

Layout of one run (an output folder ``OUT``), as ``lm_eval --output_path OUT --log_samples`` writes it for a model
named <label>, plus our additions beside it::

    OUT/<label>/results_<date_id>.json           lm-eval's aggregated results (every key it writes), merged over
                                                 the finished tasks
    OUT/<label>/samples_<task>_<date_id>.jsonl   lm-eval's per-sample records, one JSON object a line
    OUT/<label>/config.json                      ours: the resolved run config (``RunConfig``), with its identity
    OUT/<label>/meta.json                        ours: weights hash, versions, timings per task, tasks_done, complete
    OUT/<label>/cache/                           ours: the request caches that make a task resumable

so that lm-eval's readers (``lm_eval.utils.get_results_filenames``, ``get_latest_filename``, ``make_table``) work on
our folders unchanged, and our readers (``load_run``) work on plain lm-eval output folders too (and on folders of
the older layout, ``results.json`` + ``samples/<task>.jsonl``).

Every file is written to a temporary name and moved into place with ``os.replace``, so a crash leaves either the
old file or the new one, never half of one. Samples are written before results, and meta (which records
``tasks_done``) last, so a task counts as done only once all of its files are in place; superseded dated files
are removed after that (a crash in between leaves two, and readers take the latest).

Every JSON file is read through ``read_json``, which turns a truncated, empty or foreign file into a one-line
ValueError naming the file and the fix.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypedDict

from lm_eval.utils import get_file_datetime, get_file_task_name, hash_string, sanitize_list

# Sections of lm-eval's output that are dicts keyed by task name and so merge task by task.
MERGED_SECTIONS = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better",
                   "n-samples", "task_hashes")
# Keys of a results file that differ between two runs computing the same numbers (drop them to compare runs).
VOLATILE_RESULT_KEYS = ("date", "start_time", "end_time", "total_evaluation_time_seconds", "git_hash",
                        "upper_git_hash", "pretty_env_info")
ENV_KEYS = ("pretty_env_info", "transformers_version", "lm_eval_version", "upper_git_hash")  # lm-eval's add_env_info
LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@=+-]*$")
# lm-eval marks "no sample at this length" with -1 in the per-length metrics of its RULER tasks.
LENGTH_METRIC_RE = re.compile(r"^\d+$")
MISSING_LENGTH_VALUE = -1.0
RESULTS_RE = re.compile(r"^results_(.+)\.json$")
SAMPLES_RE = re.compile(r"^samples_(.+)_([^_]+)\.jsonl$")
LEGACY_RESULTS = "results.json"
_REQUIRED = object()


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


def _fix_for(path: Path) -> str:
    """What to do about a damaged file: ours are rewritten by rerunning; anything else is the user's."""
    if path.name in ("meta.json", "config.json") or RESULTS_RE.match(path.name) or SAMPLES_RE.match(path.name):
        return (f"it was cut short or edited by hand; delete the folder {path.parent} and rerun the evaluation "
                f"to recompute it (or restore the file from a backup)")
    return "it was cut short or edited by hand; restore or delete it"


def read_json(path: str | os.PathLike[str], default: Any = _REQUIRED, what: str | None = None,
              expect: type | tuple[type, ...] | None = dict) -> Any:
    """Read one JSON file; ``default`` when it does not exist (else FileNotFoundError).

    A file that exists but is empty, truncated, not UTF-8, or of the wrong shape (``expect``: the type of the
    top-level value) raises a one-line ValueError naming the file, what it should hold and the fix, instead of
    ``JSONDecodeError: Expecting value...`` from deep inside a reader.
    """
    p = Path(path)
    name = what or p.name
    if not p.is_file():
        if default is _REQUIRED:
            raise FileNotFoundError(f"{name} {p} does not exist; pass a results folder that holds it")
        return default
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{name} {p} is not UTF-8 text (byte {err.start}): {_fix_for(p)}") from None
    except OSError as err:
        raise ValueError(f"{name} {p} cannot be read ({err.strerror}): check its permissions") from None
    if not text.strip():
        raise ValueError(f"{name} {p} is empty: {_fix_for(p)}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{name} {p} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}): "
                         f"{_fix_for(p)}") from None
    if expect is not None and not isinstance(value, expect):
        want = expect.__name__ if isinstance(expect, type) else " or ".join(t.__name__ for t in expect)
        want = {"dict": "a JSON object", "list": "a JSON list"}.get(want, want)
        raise ValueError(f"{name} {p} holds {type(value).__name__ if value is not None else 'null'} where "
                         f"{want} belongs: {_fix_for(p)}")
    return value


def read_jsonl(path: str | os.PathLike[str], what: str | None = None) -> list[dict[str, Any]]:
    """Read one JSON-lines file of objects, naming the file and line of a damaged record."""
    p = Path(path)
    records: list[dict[str, Any]] = []
    try:
        with p.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{what or 'samples file'} {p} line {i} is not valid JSON ({err.msg}): "
                                     f"{_fix_for(p)}") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{what or 'samples file'} {p} line {i} is not a JSON object: {_fix_for(p)}")
                records.append(record)
    except UnicodeDecodeError as err:
        raise ValueError(f"{what or 'samples file'} {p} is not UTF-8 text (byte {err.start}): {_fix_for(p)}") \
            from None
    return records


def warn(message: str) -> None:
    """The readers' warning line (stderr), for a skipped label or an incomplete run."""
    print(f"warning: {message}", file=sys.stderr)


def _check_label(label: str) -> str:
    if not LABEL_RE.match(label) or label in (".", ".."):
        raise ValueError(f"checkpoint label {label!r} is not filesystem-safe; use letters, digits and ._@=+- "
                         f"(e.g. 'gdn2-demo' or 'ckpt@gate=tied')")
    return label


def _check_task(task: str) -> str:
    if not task or "/" in task or "\\" in task or task.startswith("."):
        raise ValueError(f"task name {task!r} cannot be a file name; lm-eval task names have no slashes")
    return task


# ----------------------------------------------------------------------------------------------- lm-eval's files

def new_date_id() -> str:
    """lm-eval's file-name timestamp (EvaluationTracker.date_id)."""
    return datetime.now().isoformat().replace(":", "-")


def results_files(folder: Path) -> list[Path]:
    """The dated results files of one label folder, oldest first (lm-eval's own date order)."""
    if not folder.is_dir():
        return []
    files = [f for f in folder.iterdir() if RESULTS_RE.match(f.name) and f.is_file()]
    return sorted(files, key=lambda f: get_file_datetime(f.name.removesuffix(".json")))


def samples_files(folder: Path) -> dict[str, list[Path]]:
    """task -> its dated samples files in one label folder, oldest first."""
    out: dict[str, list[Path]] = {}
    if not folder.is_dir():
        return out
    for f in folder.iterdir():
        if SAMPLES_RE.match(f.name) and f.is_file():
            out.setdefault(get_file_task_name(f.name), []).append(f)
    return {t: sorted(fs, key=lambda f: get_file_datetime(f.name)) for t, fs in out.items()}


def is_results_folder(folder: Path) -> bool:
    return bool(results_files(folder)) or (folder / LEGACY_RESULTS).is_file()


def read_results_folder(folder: Path) -> dict[str, Any]:
    """The folder's results merged over its results files in date order (a later file wins task by task).

    Ours holds one file (older ones are removed once superseded); a plain lm-eval folder holds one per
    ``lm_eval`` invocation, each with the tasks of that call.
    """
    merged: dict[str, Any] = {}
    files = results_files(folder) or ([folder / LEGACY_RESULTS] if (folder / LEGACY_RESULTS).is_file() else [])
    for f in files:
        data = read_json(f, what="results file")
        for key, value in data.items():
            if key in MERGED_SECTIONS and isinstance(value, Mapping):
                merged.setdefault(key, {}).update(value)
            elif key not in MERGED_SECTIONS:
                merged[key] = value
    return merged


def lm_eval_sample(record: Mapping[str, Any]) -> dict[str, Any]:
    """One sample record as ``EvaluationTracker.save_results_samples`` writes it (arguments as gen_args_i/arg_j,
    responses as strings, target as a string), then made JSON-safe. Records already in that form pass unchanged."""
    out = dict(record)
    args = out.get("arguments")
    if isinstance(args, (list, tuple)):
        out["arguments"] = {f"gen_args_{i}": {f"arg_{j}": a for j, a in enumerate(arg)}
                            if isinstance(arg, (list, tuple)) else {"arg_0": arg} for i, arg in enumerate(args)}
    for key in ("resps", "filtered_resps"):
        if isinstance(out.get(key), (list, tuple)):
            out[key] = sanitize_list(list(out[key]))
    if "target" in out and not isinstance(out["target"], str):
        out["target"] = str(out["target"])
    return json_safe(out)


def task_hash(records: Sequence[Mapping[str, Any]]) -> str | None:
    """lm-eval's ``task_hashes`` entry: the hash of every record's doc/prompt/target hashes, in order."""
    keys = ("doc_hash", "prompt_hash", "target_hash")
    if not records or not all(all(isinstance(r.get(k), str) for k in keys) for r in records):
        return None
    return hash_string("".join(r["doc_hash"] + r["prompt_hash"] + r["target_hash"] for r in records))


@functools.lru_cache(maxsize=1)
def _env_info() -> dict[str, Any]:
    """lm-eval's environment keys (``add_env_info``: pretty_env_info, versions), once per process (it takes
    seconds), for an evaluate output that lacks them."""
    from lm_eval.loggers.utils import add_env_info

    info: dict[str, Any] = {}
    add_env_info(info)
    return info


def _git_hash() -> str | None:
    """lm-eval's ``git_hash`` read from the .git folder (no ``git`` subprocess, hence no noise outside a clone)."""
    from lm_eval.loggers.utils import get_commit_from_path

    here = Path.cwd()
    for folder in (here, *here.parents):
        if (folder / ".git").exists():
            return get_commit_from_path(folder)
    return None


def _model_type(config: Mapping[str, Any]) -> str:
    return "hf" if str(config.get("checkpoint", "")).startswith("hf:") else "gdn2"


def _fill_lm_eval_keys(results: dict[str, Any], label: str, config: Mapping[str, Any]) -> None:
    """Complete an evaluate output with the keys ``lm_eval --output_path`` writes that it may lack.

    simple_evaluate sets config/git_hash/date/env keys, EvaluationTracker the model_* and timing keys; the runner
    sets config["model"] ("gdn2"/"hf"), config["model_args"] and model_name. What is missing comes from the
    run config, so a script reading lm-eval's results (``d["config"]["model_args"]``) finds every key.
    """
    cfg = results.setdefault("config", {})
    model = cfg.get("model")
    if not isinstance(model, str) or not re.fullmatch(r"[a-z0-9_-]+", model):  # absent, or lm-eval's class name
        cfg["model"] = _model_type(config)
    if not cfg.get("model_args"):
        args = config.get("model_args")
        if not isinstance(args, str) or not args:
            checkpoint = str(config.get("checkpoint", ""))
            args = f"pretrained={checkpoint.removeprefix('hf:')}" if checkpoint else ""
        cfg["model_args"] = args
    for key in ("batch_size", "device", "limit", "gen_kwargs", "random_seed"):
        cfg.setdefault(key, {"limit": config.get("limit"), "random_seed": config.get("seed"),
                             "gen_kwargs": config.get("gen_kwargs")}.get(key))
    results.setdefault("git_hash", _git_hash())
    results.setdefault("date", time.time())
    if any(k not in results for k in ENV_KEYS):  # simple_evaluate's output has them; collecting takes seconds
        for key, value in _env_info().items():
            results.setdefault(key, value)
    results.setdefault("model_source", cfg["model"])
    results.setdefault("model_name", str(config.get("checkpoint") or label))
    results["model_name_sanitized"] = label  # the folder name, as lm-eval's own layout has it
    for key in ("system_instruction", "system_instruction_sha", "chat_template", "chat_template_sha"):
        results.setdefault(key, None)
    results.setdefault("fewshot_as_multiturn", False)


# ----------------------------------------------------------------------------------------------- writing

class RunStore:
    """Writes one run folder. ``save_task`` per finished task, ``mark_complete`` at the end; reruns resume."""

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.out_dir = Path(out_dir)

    def label_dir(self, label: str) -> Path:
        d = self.out_dir / _check_label(label)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _dir(self, label: str) -> Path:
        return self.out_dir / _check_label(label)

    def results_path(self, label: str) -> Path | None:
        """The label's latest results file (lm-eval's ``results_<date_id>.json``), or None."""
        files = results_files(self._dir(label))
        return files[-1] if files else None

    def samples_path(self, label: str, task: str) -> Path | None:
        """The label's latest samples file of ``task``, or None."""
        files = samples_files(self._dir(label)).get(_check_task(task))
        return files[-1] if files else None

    def write_config(self, label: str, config: Mapping[str, Any]) -> None:
        atomic_write_json(self.label_dir(label) / "config.json", config)

    def read_config(self, label: str) -> RunConfig:
        return read_json(self._dir(label) / "config.json", {}, "run config")

    def read_meta(self, label: str) -> RunMeta:
        return read_json(self._dir(label) / "meta.json", {}, "run meta")

    def read_results(self, label: str) -> dict[str, Any]:
        return read_results_folder(self._dir(label))

    def save_task(self, label: str, task: str, evaluate_output: Mapping[str, Any], config: Mapping[str, Any],
                  meta_extra: Mapping[str, Any] | None = None) -> None:
        """Store one task's ``simple_evaluate`` output and merge it into the label's results and meta.

        ``evaluate_output`` is what simple_evaluate returned (with "samples"); ``config`` the RunConfig.
        ``meta_extra`` is merged into meta.json; its dict values (e.g. ``{"timings": {task: secs}}``) merge one
        level deep so per-task entries accumulate. Subtasks of a group get their own samples file and all count
        as done. Saving a task clears ``complete`` until ``mark_complete`` confirms the full task list again.
        """
        _check_task(task)
        if not isinstance(evaluate_output.get("results"), Mapping):
            raise ValueError(f"evaluate output for task {task!r} has no 'results' dict; pass what "
                             f"lm_eval.simple_evaluate returned")
        d = self.label_dir(label)
        old_results = results_files(d)
        old_samples = samples_files(d)
        date_id = new_date_id()
        samples = evaluate_output.get("samples") or {}
        hashes: dict[str, str] = {}
        written: list[Path] = []
        for name, records in samples.items():
            lines = [json.dumps(lm_eval_sample(r)) for r in records]  # ASCII escapes survive lone surrogates
            path = d / f"samples_{_check_task(name)}_{date_id}.jsonl"
            atomic_write_text(path, "".join(line + "\n" for line in lines))
            written.append(path)
            if (h := task_hash(records)) is not None:
                hashes[name] = h

        merged = self.read_results(label)
        new = {k: v for k, v in evaluate_output.items() if k != "samples"}
        new["task_hashes"] = {**(new.get("task_hashes") or {}), **hashes}
        start = merged.get("start_time")
        for key, value in json_safe(new).items():
            if key in MERGED_SECTIONS and isinstance(value, Mapping):
                merged.setdefault(key, {}).update(value)
            elif key == "config" and isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
                merged[key] = {**merged[key], **{k: v for k, v in value.items() if v is not None}}
            elif key not in MERGED_SECTIONS:
                merged[key] = value
        _fill_lm_eval_keys(merged, label, config)

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

        now = time.time()
        merged["start_time"] = start if isinstance(start, (int, float)) else now
        merged["end_time"] = now
        timings = meta.get("timings")
        total = sum(timings.values()) if isinstance(timings, dict) and timings else now - merged["start_time"]
        merged["total_evaluation_time_seconds"] = str(total)
        results_path = d / f"results_{date_id}.json"
        atomic_write_json(results_path, merged)
        written.append(results_path)
        self.write_config(label, config)
        atomic_write_json(d / "meta.json", meta)
        # Only now are the superseded files dead: remove them (a crash before this leaves both; readers take
        # the newest results file and the newest samples file per task).
        stale = [f for f in old_results if f not in written]
        stale += [f for name in samples for f in old_samples.get(name, []) if f not in written]
        for f in stale:
            f.unlink(missing_ok=True)
        legacy = d / LEGACY_RESULTS  # an older layout's file, now merged into the new one
        if legacy.is_file():
            legacy.unlink()

    def task_done(self, label: str, task: str) -> bool:
        """True when ``task`` was saved completely (meta lists it and the results file holds its scores)."""
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
    """One checkpoint's results as read from ``OUT/<label>``. Scores are lm-eval's raw values (fractions).

    ``source`` is "gdn2-eval" for a folder our runner wrote (config.json beside the results) and "lm-eval" for
    a plain ``lm_eval --output_path`` folder; ``results`` is the merged results file as stored.
    """

    label: str
    path: Path
    config: dict[str, Any]
    meta: dict[str, Any]
    scores: dict[str, dict[str, float]]  # task -> metric -> value ("acc", "word_perplexity", "4096", ...)
    stderrs: dict[str, dict[str, float]]
    higher_is_better: dict[str, dict[str, bool | None]] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    source: str = "gdn2-eval"
    _samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)

    def score(self, task: str, metric: str) -> float | None:
        return self.scores.get(task, {}).get(metric)

    def _samples_file(self, task: str) -> Path | None:
        files = samples_files(self.path).get(task)
        if files:
            return files[-1]
        legacy = self.path / "samples" / f"{_check_task(task)}.jsonl"
        return legacy if legacy.is_file() else None

    def has_samples(self, task: str) -> bool:
        return self._samples_file(task) is not None

    def samples(self, task: str) -> list[dict[str, Any]]:
        """Per-sample records of ``task`` (read on first use; [] when the run logged none)."""
        if task not in self._samples:
            path = self._samples_file(task)
            self._samples[task] = read_jsonl(path) if path is not None else []
        return self._samples[task]

    @property
    def expected_tasks(self) -> list[str]:
        """The tasks the run was asked for (config.json ``tasks``); lm-eval folders: the tasks they hold."""
        tasks = self.config.get("tasks")
        return [str(t) for t in tasks] if isinstance(tasks, list) else list(self.scores)

    @property
    def missing_tasks(self) -> list[str]:
        """Tasks asked for that have no scores here (not run yet, failed, or interrupted)."""
        done = set(self.meta.get("tasks_done") or []) | set(self.scores)
        return [t for t in self.expected_tasks if t not in done]

    @property
    def complete(self) -> bool:
        """meta.json's ``complete`` flag and no task missing; a plain lm-eval folder is complete by construction
        (lm-eval writes its results file once, at the end)."""
        flag = self.meta.get("complete", self.source == "lm-eval")
        return flag is True and not self.missing_tasks


def _load_label(path: Path) -> CheckpointResult:
    results = read_results_folder(path)
    scores: dict[str, dict[str, float]] = {}
    stderrs: dict[str, dict[str, float]] = {}
    for section in ("results", "groups"):
        entries = results.get(section, {})
        if not isinstance(entries, Mapping):
            raise ValueError(f"results file in {path} has {section!r} of type {type(entries).__name__}, not a "
                             f"JSON object of tasks: {_fix_for(path / 'results_.json')}")
        for task, entry in entries.items():
            if isinstance(entry, Mapping):
                scores[task], stderrs[task] = _parse_task_metrics(entry)
    ours = (path / "config.json").is_file() or (path / "meta.json").is_file()
    hib = results.get("higher_is_better", {})
    return CheckpointResult(label=path.name, path=path, config=read_json(path / "config.json", {}, "run config"),
                            meta=read_json(path / "meta.json", {}, "run meta"), scores=scores, stderrs=stderrs,
                            higher_is_better=hib if isinstance(hib, dict) else {}, results=results,
                            source="gdn2-eval" if ours else "lm-eval")


def load_run(path: str | os.PathLike[str], warn: Callable[[str], None] | None = warn) -> list[CheckpointResult]:
    """Read ``OUT`` (every label in it, sorted by name) or one ``OUT/<label>`` folder.

    ``OUT`` may be our output folder or a plain ``lm_eval --output_path OUT`` folder (one subfolder per model).
    A damaged label inside ``OUT`` is skipped with a warning naming it (``warn``; None raises instead); a label
    folder asked for directly raises.
    """
    p = Path(path)
    if p.is_file() and RESULTS_RE.match(p.name):  # lm-eval's results file itself: read its folder
        p = p.parent
    if not p.is_dir():
        raise FileNotFoundError(f"run folder {str(p)!r} does not exist; pass an output folder of run_eval.py "
                                f"(or of lm_eval --output_path) or one of its OUT/<label> folders")
    if is_results_folder(p):
        return [_load_label(p)]
    labels = sorted(d for d in p.iterdir() if d.is_dir() and is_results_folder(d))
    started = sorted(d.name for d in p.iterdir() if d.is_dir() and d not in labels
                     and any((d / n).exists() for n in ("config.json", "meta.json", "cache")))
    if started and labels and warn is not None:  # a label whose first task has not finished yet
        warn(f"{', '.join(started)}: no task finished yet, not shown; rerun the same command to finish it")
    if not labels and started:
        raise ValueError(f"no results in {str(p)!r} yet: no task of {', '.join(started)} has finished; rerun the "
                         f"same command to finish it")
    if not labels:
        raise ValueError(f"no results in {str(p)!r}: neither {p}/results_*.json nor {p}/<label>/results_*.json "
                         f"exists; run an evaluation into it first (run_eval.py run --output, or lm_eval "
                         f"--output_path)")
    out = []
    for d in labels:
        try:
            out.append(_load_label(d))
        except ValueError as err:
            if warn is None:
                raise
            warn(f"skipping {d.name}: {err}")
    if not out:
        raise ValueError(f"no readable results in {str(p)!r}: every label in it is damaged (see the warnings)")
    return out


def load_runs(paths: Sequence[str | os.PathLike[str]],
              warn: Callable[[str], None] | None = warn) -> list[CheckpointResult]:
    """``load_run`` over several paths; equal labels from different folders get their parent folder prepended."""
    results = [r for p in paths for r in load_run(p, warn)]
    counts: dict[str, int] = {}
    for r in results:
        counts[r.label] = counts.get(r.label, 0) + 1
    for r in results:
        if counts[r.label] > 1:
            r.label = f"{r.path.parent.name}/{r.path.name}"
    return results


def incomplete_warnings(results: Sequence[CheckpointResult]) -> list[str]:
    """One line per run that is not complete: which tasks are missing, or that meta.json says unfinished."""
    lines = []
    for r in results:
        if r.complete:
            continue
        missing = r.missing_tasks
        if missing:
            shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
            lines.append(f"{r.label} is incomplete: {len(missing)} of {len(r.expected_tasks)} task(s) missing "
                         f"({shown}); rerun the same command to finish it")
        else:
            lines.append(f"{r.label} is incomplete: its run did not finish (meta.json complete is not true); "
                         f"rerun the same command to finish it")
    return lines


def _parse_model_args(args: Any) -> dict[str, str]:
    if isinstance(args, Mapping):
        return {str(k): str(v) for k, v in args.items()}
    if not isinstance(args, str):
        return {}
    pairs = (kv.split("=", 1) for kv in args.split(",") if "=" in kv)
    return {k.strip(): v.strip() for k, v in pairs}


def run_facts(result: CheckpointResult) -> dict[str, Any]:
    """What was run, for the report's Runs table: checkpoint, format, dtype, device, sha256, gate_mode, seed, limit.

    From config.json["model"] (the LM's describe()), then config.json's top level, meta.json (sha256, or the older
    checkpoint_hash), and last the results file's lm-eval ``config`` (model_args, model_dtype, model_sha, ...),
    so plain lm-eval folders fill what they can.
    """
    cfg = result.config
    model = cfg.get("model") if isinstance(cfg.get("model"), Mapping) else {}
    lm_cfg = result.results.get("config") if isinstance(result.results.get("config"), Mapping) else {}
    args = _parse_model_args(lm_cfg.get("model_args"))

    def first(*values: Any) -> Any:
        return next((v for v in values if v not in (None, "")), None)

    return {
        "checkpoint": first(cfg.get("checkpoint"), model.get("checkpoint"), result.results.get("model_name"),
                            args.get("pretrained"), args.get("checkpoint")),
        "format": first(model.get("format"), cfg.get("format"), lm_cfg.get("model")),
        "dtype": first(model.get("dtype"), cfg.get("dtype"), lm_cfg.get("model_dtype"), args.get("dtype")),
        "device": first(model.get("device"), cfg.get("device"), lm_cfg.get("device"), args.get("device")),
        "sha256": first(model.get("sha256"), result.meta.get("sha256"), result.meta.get("checkpoint_hash"),
                        lm_cfg.get("model_sha")),
        "gate_mode": first(cfg.get("gate_mode"), model.get("gate_mode"), args.get("gate_mode")),
        "seed": first(cfg.get("seed"), lm_cfg.get("random_seed")),
        "limit": first(cfg.get("limit"), lm_cfg.get("limit")),
    }
