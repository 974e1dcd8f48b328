"""Turn an exception into the one line the CLI prints (the traceback only comes with --debug).

Our own errors (ValueError, FileNotFoundError and their subclasses such as CheckpointError) already name the
problem and the fix; this adds the fix for errors raised by libraries (YAML, out of memory, missing packages).
"""
from __future__ import annotations

from pathlib import Path

DEBUG_HINT = "rerun with --debug for the traceback"


def explain(err: BaseException) -> str:
    name = type(err).__name__
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    text = lines[0] if lines else name
    if name == "OutOfMemoryError":  # raised outside the backend's batch retry (e.g. while loading the weights)
        return "GPU out of memory: use --dtype bfloat16, a smaller --batch-size or a GPU with more memory"
    if name == "GPUOutOfMemoryError":
        return text
    yaml_problem = _yaml_problem(err)
    if yaml_problem:
        return yaml_problem
    if name in _OURS_OR_PLAIN:
        return _with_details(text, lines[1:])
    if isinstance(err, ModuleNotFoundError) and (err.name or "").split(".")[0] == "triton":
        return TRITON_NEEDS
    if isinstance(err, ModuleNotFoundError):
        return f"{text}: install the project with `pip install -e .` (README, Install)"
    if isinstance(err, PermissionError):
        return f"{text}: choose a folder you can write to (--output)"
    return f"{name}: {text} ({DEBUG_HINT})"


# errors whose message is written for the user (ours, and the plain built-ins we raise with such a message)
_OURS_OR_PLAIN = {"ValueError", "FileNotFoundError", "CheckpointError", "ConfigMismatchError",
                  "TasksFailedError", "NonFiniteError", "LabelBusyError", "UsageError"}
TRITON_NEEDS = ("the triton recurrence backend needs a CUDA GPU and the [triton] extra "
                "(pip install -e '.[triton]'); on the CPU use --backend torch (or auto)")


def _with_details(first: str, rest: list[str]) -> str:
    """A multi-line message (e.g. a checkpoint fit report) shortened to its first line and its fix."""
    if not rest:
        return first
    fix = next((line for line in rest if "pass --" in line or "(pass" in line), None)
    if fix:
        return f"{first}; {fix}"
    return f"{first} ({DEBUG_HINT} and the full report)"


def _yaml_problem(err: BaseException) -> str | None:
    """A YAML syntax error named by file and line, wherever in the stack it came from."""
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml is a dependency
        return None
    if not isinstance(err, yaml.YAMLError):
        return None
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if mark is not None and mark.name and not mark.name.startswith("<"):
        return f"malformed YAML in {mark.name} line {mark.line + 1}: {problem}; fix that file"
    bad = broken_yaml_files()
    if bad:
        path, line = bad[0]
        return f"malformed YAML in {path} line {line}: {problem}; fix that file (tasks/README.md has the format)"
    return f"malformed YAML: {problem}; fix the task or suite file ({DEBUG_HINT})"


def broken_yaml_files(roots: list[Path] | None = None) -> list[tuple[Path, int]]:
    """(file, line) of every task or suite YAML under `roots` (default: tasks/ and its suites) that does not parse."""
    import yaml

    if roots is None:
        from tasks import catalog

        roots = [catalog.TASKS_DIR, catalog.SUITES_DIR]
    out = []
    for path in sorted({p for root in roots for p in Path(root).rglob("*.yaml")}):
        try:
            yaml.safe_load(path.read_text(encoding="utf-8").replace("!function", ""))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            out.append((path, mark.line + 1 if mark is not None else 0))
    return out
