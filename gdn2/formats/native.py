"""Our native folder: model.safetensors + config.json {"format": "gdn2-native", "config": Config fields, ...} +
the tokenizer files (or "tokenizer": "byte"). Written by `save_native`, read back without any inference."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from gdn2.config import Config
from gdn2.formats.base import CheckpointError, Source, build_config, read_safetensors

FORMAT = "native"
MARKER = "gdn2-native"
WEIGHTS = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def is_native(meta: dict) -> bool:
    return meta.get("format") == MARKER


def read(folder: Path, meta: dict, explicit: dict | None = None, explicit_origin: str | None = None) -> Source:
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{folder / 'config.json'} has no 'config' object: re-save it with `convert`")
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{folder} has no {WEIGHTS}: re-save it with `convert`")
    cfg = build_config({**meta["config"], **(explicit or {})})
    origin = "config.json" + (f" + {explicit_origin}" if explicit else "")
    keep = {k: meta[k] for k in ("tokenizer", "bos_policy") if k in meta}
    return Source(FORMAT, folder, [weights], read_safetensors(weights), cfg, {"config_from": origin},
                  tokenizer_dir=folder, meta=keep)


def _unshared(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors with no storage shared between entries (safetensors refuses aliases, e.g. tied heads)."""
    seen: set[int] = set()
    out = {}
    for k, t in sd.items():
        t = t.detach().contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def write(model: torch.nn.Module, config: Config, tokenizer_src: str | os.PathLike | None, out_dir: Path,
          meta: dict[str, Any]) -> Path:
    """Write model.safetensors, config.json and the tokenizer files into out_dir (created; files replaced)."""
    from safetensors.torch import save_file

    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output {out_dir} is a file: pass a folder path for the native checkpoint")
    out_dir.mkdir(parents=True, exist_ok=True)
    tok_entry: str | None = None
    if tokenizer_src is not None:
        tok_entry = _copy_tokenizer(str(tokenizer_src), out_dir)
    cfg = config.to_dict()
    cfg["gate_mode"] = "full"  # a run-time ablation, not a property of the weights
    doc = {"format": MARKER, "format_version": 1, "config": cfg, "tokenizer": tok_entry, **meta}
    tmp = out_dir / (WEIGHTS + ".tmp")
    save_file(_unshared(model.state_dict()), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out_dir / WEIGHTS)  # a half-written file never carries the final name
    (out_dir / "config.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return out_dir


def _copy_tokenizer(src: str, out_dir: Path) -> str:
    if src == "byte":
        return "byte"
    path = Path(src)
    folder = path if path.is_dir() else path.parent
    names = [n for n in TOKENIZER_FILES if (folder / n).is_file()]
    if not path.is_dir() and path.name not in names:
        names.append(path.name)
    if not any(n in names for n in ("tokenizer.model", "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in {folder}: pass --tokenizer PATH or 'byte'")
    for name in names:
        if (folder / name).resolve() != (out_dir / name).resolve():
            shutil.copyfile(folder / name, out_dir / name)
    return "files"
