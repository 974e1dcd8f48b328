"""Offline datasets: every task reads DIR/<dataset id, "/" -> "__">/<config or "default">/ instead of the hub.

Inside that folder, any of:
  <split>.jsonl | <split>.json | <split>.parquet     one file per split (e.g. test.jsonl)
  dataset_dict.json + split folders                  `DatasetDict.save_to_disk(folder)`
  <split>/ with dataset_info.json                    `Dataset.save_to_disk(folder/<split>)`
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

DEFAULT_CONFIG = "default"


def dataset_folder(data_dir: str | Path, dataset_id: str, config: str | None) -> Path:
    return Path(data_dir) / dataset_id.replace("/", "__") / (config or DEFAULT_CONFIG)


def _missing(dataset_id: str, config: str | None, folder: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"offline dataset {dataset_id} (config {config or DEFAULT_CONFIG}) not found: expected "
        f"{folder}/<split>.jsonl|.parquet or a save_to_disk folder there (layout in tasks/README.md)"
    )


def _read_jsonl(path: Path) -> datasets.Dataset:
    text = path.read_text(encoding="utf-8")
    rows = json.loads(text) if path.suffix == ".json" else [json.loads(l) for l in text.splitlines() if l.strip()]
    return datasets.Dataset.from_list(rows)


def _read_split(path: Path) -> datasets.Dataset | None:
    if path.is_dir():
        return datasets.load_from_disk(str(path)) if (path / "dataset_info.json").exists() else None
    if path.suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return datasets.Dataset(pq.read_table(path))
    return None


def load_local(dataset_id: str, config: str | None, data_dir: str | Path) -> datasets.DatasetDict:
    """The splits of one dataset from its folder under `data_dir`; a one-line error when it is missing."""
    folder = dataset_folder(data_dir, dataset_id, config)
    if (folder / "dataset_dict.json").exists():
        return datasets.load_from_disk(str(folder))
    splits: dict[str, datasets.Dataset] = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        split = _read_split(path)
        if split is not None:
            splits[path.name.split(".")[0]] = split
    if not splits:
        raise _missing(dataset_id, config, folder)
    return datasets.DatasetDict(splits)


def load_dataset(dataset_id: str, config: str | None, data_dir: str | Path | None) -> datasets.DatasetDict:
    """From `data_dir` when given, else from the Hugging Face hub (or its local cache)."""
    if data_dir:
        return load_local(dataset_id, config, data_dir)
    return datasets.load_dataset(dataset_id, config)


def local_custom_dataset(hf_dataset: str, hf_config: str | None = None, **metadata: Any) -> datasets.DatasetDict:
    """`custom_dataset` for an lm-eval task redirected to `data_dir` (see `redirect_config`)."""
    return load_local(hf_dataset, hf_config, metadata["data_dir"])


def redirect_config(cfg: dict[str, Any], data_dir: str | Path) -> dict[str, Any]:
    """A task config that reads its `dataset_path`/`dataset_name` from `data_dir` instead of the hub.

    lm-eval calls `custom_dataset(**metadata, **dataset_kwargs)`; `data_dir` travels in the metadata.
    """
    out = dict(cfg)
    out["custom_dataset"] = local_custom_dataset
    out["dataset_kwargs"] = {"hf_dataset": cfg["dataset_path"], "hf_config": cfg.get("dataset_name")}
    out["metadata"] = {**(cfg.get("metadata") or {}), "data_dir": str(data_dir)}
    return out
