"""One writer per results label: an OS file lock (fcntl.flock) on OUT/<label>/.lock.

Two runs of one command into one folder would otherwise both compute every request. The lock is held for as long
as the run works on the label and is released by the OS when the process ends, however it ends (kill -9
included), so a stale lock never blocks a rerun. The lock file records who holds it (pid, command, start time)
so the second run can name the first.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".lock"


class LabelBusyError(ValueError):
    """Another process is writing this results label."""


@contextmanager
def label_lock(folder: Path) -> Iterator[None]:
    """Hold the label's lock for the block, or raise LabelBusyError naming the process that holds it."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LabelBusyError(f"{folder} is being written by another run ({holder(path)}): wait for it to "
                                 f"finish and rerun to reuse its results, or pass another --output") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "command": " ".join(sys.argv),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def holder(path: Path) -> str:
    """'pid N: COMMAND, since TIME' from a lock file (as far as it can be read)."""
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "a process that has not written its name yet"
    command = str(info.get("command", "?"))
    command = command if len(command) <= 100 else command[:97] + "..."
    return f"pid {info['pid']}: {command}, since {info.get('started', '?')}"
