"""The catalogue: our tasks, the lm-eval tasks we reuse, the paper's suites, and a task manager for them.

    from tasks.catalog import load_suite, task_manager
    suite = load_suite("table3")
    tm = task_manager(data_dir=None, metadata={"tokenizer": "byte"}, task_metadata=suite.metadata)
    lm_eval.simple_evaluate(model=lm, tasks=suite.tasks, task_manager=tm)
"""
from __future__ import annotations

import copy
import difflib
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TASKS_DIR = Path(__file__).resolve().parent
SUITES_DIR = TASKS_DIR / "suites"

# lm-eval 0.4.13's own task definitions that the paper's Table 2 uses (reused as they are)
LM_EVAL_TASKS = [
    "wikitext", "lambada_openai", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa",
    "social_iqa", "boolq",
]
BOS_POLICIES = ("bos", "none")


def _read_task_yaml(path: Path) -> dict[str, Any]:
    """A task YAML with its `include:` chain merged in as lm-eval does (top-level keys of the includer win)."""
    cfg = yaml.safe_load(path.read_text().replace("!function", "")) or {}
    included = cfg.pop("include", None)
    if not included:
        return cfg
    return {**_read_task_yaml(path.parent / included), **cfg}


@functools.lru_cache(maxsize=1)
def _task_configs() -> dict[str, dict[str, Any]]:
    configs = {}
    for path in sorted(TASKS_DIR.glob("*/*.yaml")):
        if path.parent != SUITES_DIR:
            cfg = _read_task_yaml(path)
            if isinstance(cfg.get("task"), str):
                configs[cfg["task"]] = cfg
    return configs


def _our_tasks() -> list[str]:
    return sorted(_task_configs())


def task_bos(task: str) -> str | None:
    """The BOS policy our task declares in its YAML metadata: "bos" (one BOS before every context, as RULER's
    Hugging Face client) or "none" (the JRT harness); None for lm-eval's own tasks, whose policy is the suite's
    or the backend's default. A suite's `bos`/`bos_by_task` overrides it."""
    cfg = _task_configs().get(task)
    if cfg is None:
        return None
    policy = (cfg.get("metadata") or {}).get("bos")
    if policy not in BOS_POLICIES:
        raise ValueError(f"task {task}: metadata bos {policy!r}; expected one of {', '.join(BOS_POLICIES)}")
    return policy


def task_needs_hub(task: str, metadata: dict[str, Any] | None = None, data_dir: str | Path | None = None) -> bool:
    """Whether `task` reads a Hugging Face dataset with this run's metadata (so the run must allow the network).

    RULER tasks generate their data: only an essay haystack with neither `essay_dir` nor `data_dir` reads the
    hub (lm-eval's `baber/paul_graham_essays`). Every other task reads the hub unless `data_dir` is given.
    """
    meta = metadata or {}
    if data_dir or meta.get("data_dir"):
        return False
    cfg = _task_configs().get(task)
    if cfg is None or not task.startswith("ruler_"):
        return True
    from tasks.ruler.niah import VARIANTS

    variant = VARIANTS[(cfg.get("dataset_kwargs") or {})["variant"]]
    return (meta.get("haystack") or variant.haystack) == "essay" and not meta.get("essay_dir")


def list_tasks() -> list[str]:
    """Our tasks (RULER NIAH, JRT recall) and the lm-eval tasks we use."""
    return _our_tasks() + LM_EVAL_TASKS


def list_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def _closest(name: str, options: list[str], kind: str) -> ValueError:
    near = difflib.get_close_matches(name, options, n=3, cutoff=0.4)
    hint = f"did you mean {', '.join(near)}?" if near else f"choose from {', '.join(options)}"
    return ValueError(f"unknown {kind} {name!r}: {hint}")


@dataclass
class Column:
    """One paper column: which task's which metric, and whether the paper shows it in percent."""

    task: str
    metric: str
    percent: bool = True


@dataclass
class Suite:
    name: str
    tasks: list[str]
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-task lm-eval metadata
    config: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-task task-config overrides
    bos: str | None = None  # "bos" (one BOS before every context) | "none"; None: see bos_by_task
    bos_by_task: dict[str, str] = field(default_factory=dict)
    gate_modes: list[str] | None = None
    gate_mode_rows: dict[str, str | None] = field(default_factory=dict)
    paper_table: str | None = None  # key in results/reference/paper_tables.json
    columns: dict[str, Column] = field(default_factory=dict)
    table_columns: list[str] = field(default_factory=list)  # the paper's column order
    averages: dict[str, list[str]] = field(default_factory=dict)  # average name -> its columns
    options: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def cell(self, column: str, results: dict[str, dict[str, Any]]) -> float | None:
        """A paper cell from lm-eval `results["results"]`, in the paper's unit; None when missing."""
        if column in self.averages:
            parts = [self.cell(c, results) for c in self.averages[column]]
            return None if any(p is None for p in parts) else paper_average_of(parts)
        col = self.columns[column]
        value = results.get(col.task, {}).get(f"{col.metric},none")
        if not isinstance(value, (int, float)):
            return None
        return 100.0 * value if col.percent else float(value)


SUITE_FIELDS = {  # field -> (what it must be, an example) for the one-line errors of malformed suite files
    "suite": (str, "a name"), "description": (str, "a sentence"), "bos": (str, "bos or none"),
    "tasks": (list, "a list of task names"), "include_suites": (list, "a list of suite names"),
    "bos_from": (list, "a list of suite names"), "gate_modes": (list, "a list of gate modes"),
    "table_columns": (list, "a list of column names"), "metadata": (dict, "task -> metadata mapping"),
    "config": (dict, "task -> task-config overrides"), "bos_by_task": (dict, "task -> bos or none"),
    "gate_mode_rows": (dict, "gate mode -> row name"), "columns": (dict, "column -> {task, metric}"),
    "averages": (dict, "average -> list of columns"), "options": (dict, "a mapping"), "paper_table": (str, "a name"),
}


def _suite_path(name: str) -> Path:
    """A suite by name (tasks/suites/NAME.yaml) or by path (anything ending in .yaml/.yml or holding a slash)."""
    if name.endswith((".yaml", ".yml")) or "/" in name or "\\" in name:
        path = Path(name).expanduser()
        if not path.is_file() and path.with_name(path.name + ".yaml").is_file():  # path/to/suite, as before
            path = path.with_name(path.name + ".yaml")
        if not path.is_file():
            raise FileNotFoundError(f"suite file not found: {path} (pass a suite name from `run_eval.py list` or "
                                    f"the path of a suite .yaml)")
        return path
    path = SUITES_DIR / f"{name}.yaml"
    if not path.exists():
        raise _closest(name, list_suites(), "suite")
    return path


def _read_suite(name: str) -> dict[str, Any]:
    """The suite file's fields, checked for shape; a problem is named with its file and line."""
    path = _suite_path(name)
    with path.open(encoding="utf-8") as f:  # from a stream, YAML errors carry the file name
        raw = yaml.safe_load(f)
    node = yaml.compose(path.read_text(encoding="utf-8"))

    def bad(key: str | None, problem: str) -> ValueError:
        line = 1
        if key is not None and isinstance(node, yaml.MappingNode):
            line = next((k.start_mark.line + 1 for k, _ in node.value if k.value == key), 1)
        return ValueError(f"suite file {path} line {line} is malformed: {problem}; fix that file "
                          f"(tasks/README.md, Suites)")

    if not isinstance(raw, dict):
        raise bad(None, f"it holds a {type(raw).__name__}, not a mapping with a `tasks:` list")
    if "tasks" not in raw:
        raise bad(None, "it needs a `tasks:` list of task names")
    for key, value in raw.items():
        want = SUITE_FIELDS.get(key)
        if want is None:
            raise _closest(str(key), sorted(SUITE_FIELDS), f"field in suite file {path}")
        if value is not None and not isinstance(value, want[0]):
            raise bad(key, f"`{key}` must be {want[1]}, not {type(value).__name__}")
    if not all(isinstance(t, str) for t in raw["tasks"] or []):
        raise bad("tasks", "`tasks` must be a list of task names")
    for key, value in (raw.get("columns") or {}).items():
        if not isinstance(value, dict) or not {"task", "metric"} <= set(value) or set(value) - {"task", "metric",
                                                                                               "percent"}:
            raise bad("columns", f"column {key!r} needs {{task: NAME, metric: NAME}} (and optionally percent)")
    return raw


def load_suite(name: str) -> Suite:
    """A suite by name (tasks/suites/) or path; included suites are looked up beside the including file first."""
    raw = _read_suite(name)
    here = _suite_path(name).parent

    def sub_suite(ref: str) -> Suite:
        beside = here / (ref if ref.endswith((".yaml", ".yml")) else f"{ref}.yaml")
        return load_suite(str(beside) if here != SUITES_DIR and beside.is_file() else ref)

    tasks, metadata, config, bos_by_task = [], {}, {}, {}
    for included in raw.get("include_suites") or []:
        sub = sub_suite(included)
        tasks += sub.tasks
        metadata.update(sub.metadata)
        config.update(sub.config)
        bos_by_task.update(sub.bos_by_task)
    for source in raw.get("bos_from") or []:
        bos_by_task.update(sub_suite(source).bos_by_task)
    tasks += [t for t in raw["tasks"] or [] if t not in tasks]
    metadata.update(raw.get("metadata") or {})
    config.update(raw.get("config") or {})
    bos = raw.get("bos")
    bos_by_task.update({t: bos for t in raw["tasks"] or [] if bos})
    bos_by_task.update(raw.get("bos_by_task") or {})
    for task in tasks:  # what the suite leaves open, the task's own declaration decides
        if task not in bos_by_task and task_bos(task):
            bos_by_task[task] = task_bos(task)
    columns = {k: Column(**v) for k, v in (raw.get("columns") or {}).items()}
    suite = Suite(
        name=raw.get("suite", Path(name).stem),
        tasks=tasks,
        metadata=metadata,
        config=config,
        bos=bos,
        bos_by_task={t: bos_by_task[t] for t in tasks if t in bos_by_task},
        gate_modes=raw.get("gate_modes"),
        gate_mode_rows=raw.get("gate_mode_rows") or {},
        paper_table=raw.get("paper_table"),
        columns=columns,
        table_columns=raw.get("table_columns") or list(columns) + list(raw.get("averages") or {}),
        averages=raw.get("averages") or {},
        options=raw.get("options") or {},
        description=raw.get("description", ""),
    )
    _check(suite)
    return suite


def _check(suite: Suite) -> None:
    """Every task known (ours, the paper's, or anything in lm-eval's task index), a valid BOS policy for each."""
    known = set(list_tasks())
    unknown = [t for t in suite.tasks + [c.task for c in suite.columns.values()] if t not in known]
    if unknown:  # indexing lm-eval's ~10k YAMLs takes seconds: only when a suite names one of its other tasks
        known |= set(indexed_task_manager().all_tasks)
    for task in unknown:
        if task not in known:
            raise _closest(task, sorted(known), f"task in suite {suite.name}")
    for task, policy in suite.bos_by_task.items():
        if policy not in BOS_POLICIES:
            raise ValueError(f"suite {suite.name}: bos {policy!r} for {task}; expected one of {BOS_POLICIES}")
    missing = [t for t in suite.tasks if t not in suite.bos_by_task]
    if missing:
        raise ValueError(f"suite {suite.name} gives no BOS policy for {', '.join(missing)}")


def paper_average_of(values: list[float]) -> float:
    return math.fsum(values) / len(values)


def paper_average(table: str, row: dict[str, float], name: str | None = None) -> float:
    """The paper's average for one row of `table` ("table2", "table4", "table5", ...), by column name."""
    suite = load_suite(table)
    if not suite.averages:
        raise ValueError(f"suite {table} defines no average")
    if name is None:
        if len(suite.averages) > 1:
            raise ValueError(f"suite {table} has several averages ({', '.join(suite.averages)}): pass name=")
        name = next(iter(suite.averages))
    if name not in suite.averages:
        raise _closest(name, list(suite.averages), f"average of {table}")
    missing = [c for c in suite.averages[name] if c not in row]
    if missing:
        raise ValueError(f"{table} {name} needs columns {', '.join(missing)} in the row")
    return paper_average_of([float(row[c]) for c in suite.averages[name]])


def task_manager(
    data_dir: str | Path | None = None,
    metadata: dict[str, Any] | None = None,
    task_metadata: dict[str, dict[str, Any]] | None = None,
    task_config: dict[str, dict[str, Any]] | None = None,
    include_path: list[str] | tuple[str, ...] = (),
):
    """An lm-eval TaskManager over lm-eval's tasks and ours (and the `include_path` folders, lm-eval's option).

    data_dir: every task reads its dataset from this folder (layout in tasks/README.md) instead of the hub.
    metadata: handed to every task (lm-eval `metadata`), e.g. {"tokenizer": "byte"}.
    task_metadata / task_config: per-task metadata and task-config overrides (a suite's `metadata`/`config`).
    """
    from evals.harness.lm_eval_compat import install_task_factory
    from tasks.task_factory import SuiteTaskFactory

    meta = dict(metadata or {})
    if data_dir is not None:
        if not Path(data_dir).is_dir():
            raise FileNotFoundError(f"--data-dir {data_dir} is not a folder (layout in tasks/README.md)")
        meta["data_dir"] = str(Path(data_dir).resolve())
    tm = copy.copy(indexed_task_manager(tuple(include_path)))  # indexing ~10k YAMLs takes seconds: do it once
    tm.metadata = meta
    return install_task_factory(tm, SuiteTaskFactory(meta=meta, task_metadata=task_metadata, task_config=task_config))


@functools.lru_cache(maxsize=4)
def indexed_task_manager(include_path: tuple[str, ...] = ()):
    """lm-eval's task index over its tasks, ours and `include_path` (built once per set of folders)."""
    from lm_eval.tasks import TaskManager

    for p in include_path:
        if not Path(p).exists():
            raise FileNotFoundError(f"--include_path {p} does not exist: pass a folder (or file) of task YAMLs")
    return TaskManager(include_path=[str(TASKS_DIR), *map(str, include_path)])
