"""lm-eval's TaskFactory plus three run-time rewrites of each task config before the task is built.

1. per-task metadata (a suite's lengths, samples, windows) merged over the task's own metadata;
2. per-task config overrides (e.g. the demo's shorter generation);
3. with `data_dir` in the metadata, hub datasets redirected to that folder (tasks.offline).
The rewrite has to happen here: lm-eval loads a task's dataset while constructing it.
"""
from __future__ import annotations

from typing import Any

from evals.harness.lm_eval_compat import task_factory_class
from tasks.offline import redirect_config


class SuiteTaskFactory(task_factory_class()):  # type: ignore[misc]  # lm-eval's TaskFactory, its shape checked
    def __init__(
        self,
        *,
        meta: dict[str, Any] | None = None,
        task_metadata: dict[str, dict[str, Any]] | None = None,
        task_config: dict[str, dict[str, Any]] | None = None,
    ):
        super().__init__(meta=meta)
        self.task_metadata = task_metadata or {}
        self.task_config = task_config or {}

    def _load_full_config(self, entry, overrides=None) -> dict[str, Any]:
        cfg = super()._load_full_config(entry, overrides)
        name = cfg.get("task")
        if not isinstance(name, str):  # a group
            return cfg
        cfg.update(self.task_config.get(name, {}))
        cfg["metadata"] = {**cfg["metadata"], **self.task_metadata.get(name, {})}
        data_dir = self._meta.get("data_dir")
        if data_dir and cfg.get("dataset_path") and not cfg.get("custom_dataset"):
            cfg = redirect_config(cfg, data_dir)
        return cfg
