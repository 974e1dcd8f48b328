"""A crash-safe request cache for lm-eval: every finished request is on disk before the next one starts.

lm-eval's CachingLM keeps responses in a SqliteDict whose autocommit runs on a background thread, so a SIGKILL can
lose the last responses the backend reported, and it stores them pickled. `RequestCache` is a drop-in for that
dict: SQLite in WAL mode with one commit per write (a WAL commit is an append, cheap enough per request, and it
survives the process being killed), values stored as JSON (never unpickled). `durable_cache()` makes
`simple_evaluate(use_cache=...)` use it.
"""
from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TABLE = "responses"


def _encode(value: Any) -> str:
    # lm-eval compares and stores loglikelihood responses as (float, bool) tuples: keep tuples tuples
    if isinstance(value, tuple):
        return json.dumps({"tuple": list(value)})
    return json.dumps({"value": value})


def _decode(text: str) -> Any:
    doc = json.loads(text)
    return tuple(doc["tuple"]) if "tuple" in doc else doc["value"]


class RequestCache:
    """Dict-like (hash -> response) over one SQLite file; each assignment is committed before it returns."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(str(self.path), isolation_level=None)  # autocommit: one write, one commit
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # durable across process kills; fsync at checkpoints
            self._db.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        except sqlite3.DatabaseError as err:
            raise ValueError(f"request cache {self.path} is unreadable ({err}): delete it (finished tasks in the "
                             f"results folder are kept) and rerun") from None

    def __contains__(self, key: object) -> bool:
        return self._db.execute(f"SELECT 1 FROM {TABLE} WHERE key = ?", (key,)).fetchone() is not None

    def __getitem__(self, key: str) -> Any:
        row = self._db.execute(f"SELECT value FROM {TABLE} WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise KeyError(key)
        return _decode(row[0])

    def __setitem__(self, key: str, value: Any) -> None:
        self._db.execute(f"INSERT OR REPLACE INTO {TABLE} (key, value) VALUES (?, ?)", (key, _encode(value)))

    def __len__(self) -> int:
        return self._db.execute(f"SELECT COUNT(*) FROM {TABLE}").fetchone()[0]

    def keys(self) -> list[str]:
        return [r[0] for r in self._db.execute(f"SELECT key FROM {TABLE}")]

    def commit(self, blocking: bool = True) -> None:
        """Every write is already committed; kept for SqliteDict's interface."""

    def close(self) -> None:
        self._db.close()


@contextmanager
def durable_cache() -> Iterator[None]:
    """Within the block, lm-eval's CachingLM (simple_evaluate's use_cache) keeps its responses in a RequestCache."""
    from evals.harness.lm_eval_compat import caching_lm_replaced

    with caching_lm_replaced(durable_caching_lm):
        yield


def durable_caching_lm(original: type) -> type:
    """lm-eval's CachingLM with its SqliteDict swapped for a RequestCache (lookup and hashing stay lm-eval's)."""

    class DurableCachingLM(original):  # type: ignore[misc, valid-type]
        def __init__(self, lm, cache_db: str) -> None:
            self.lm = lm
            self.cache_db = cache_db
            self.dbdict = RequestCache(cache_db)
            lm.set_cache_hook(self.get_cache_hook())

    return DurableCachingLM
