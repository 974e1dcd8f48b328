"""Turn an exception into the one line the CLI prints (the traceback only comes with --debug)."""
from __future__ import annotations


def explain(err: BaseException) -> str:
    name = type(err).__name__
    text = str(err).strip().splitlines()[0] if str(err).strip() else name
    if name == "OutOfMemoryError":
        return "GPU out of memory even at batch size 1: use --dtype bfloat16 or a smaller --batch-size"
    if isinstance(err, (ValueError, FileNotFoundError, KeyError)):
        return text
    if isinstance(err, ModuleNotFoundError):
        return f"{text}: install the project with `pip install -e .` (README, Install)"
    return f"{name}: {text} (rerun with --debug for the traceback)"
