"""What every checkpoint reader shares: the error type, safe file readers, hashing, config overlays, fit checks."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gdn2.config import PRESETS, Config

WRAPPER_PREFIXES = ("_forward_module.", "module.", "_orig_mod.")
LIST_LIMIT = 10  # keys shown per category in a fit error


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: wrong keys/shapes, unsupported variant, unreadable file."""


@dataclass
class Source:
    """A checkpoint read into our parameter names, with the config it implies."""

    format: str
    path: Path
    weight_files: list[Path]
    state_dict: dict[str, torch.Tensor]
    config: Config
    inferred: dict[str, Any] = field(default_factory=dict)
    tokenizer_dir: Path | None = None  # where tokenizer files may lie
    meta: dict[str, Any] = field(default_factory=dict)  # format-specific extras (native: bos_policy, tokenizer)


# ---- reading files without running code ------------------------------------------------------------------------
def read_torch_file(path: Path) -> Any:
    """torch.load with weights_only (never unpickles code) and mmap when the file allows it."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) files cannot be mapped; everything else is a real failure
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            raise CheckpointError(
                f"{path} holds objects other than tensors and plain containers, and loading never runs code from a "
                f"checkpoint: re-save it with torch.save({{'model': model.state_dict()}}, path)"
            ) from None
        raise _corrupt(path) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, AttributeError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise _corrupt(path) from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception:  # safetensors raises its own error types for truncated or malformed headers
        raise _corrupt(path) from None


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is not valid JSON: fix or re-download it") from None


def _corrupt(path: Path) -> CheckpointError:
    size = path.stat().st_size if path.exists() else 0
    return CheckpointError(
        f"{path} ({size} bytes) is truncated or corrupt and cannot be read: re-download or re-save the checkpoint"
    )


def strip_wrapper_prefixes(sd: dict[str, Any]) -> dict[str, Any]:
    """Drop the names that fabric/DDP/torch.compile wrappers add (a hand-made save of a wrapped model has them)."""
    out = {}
    for key, value in sd.items():
        changed = True
        while changed:
            changed = False
            for p in WRAPPER_PREFIXES:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        out[key] = value
    return out


# ---- hashing ------------------------------------------------------------------------------------------------------
# Content hashes are remembered by (resolved path, size, mtime_ns): in this process, and across runs in a small JSON
# file, so a rerun (and the run identity computed before a checkpoint loads) never re-reads gigabytes of weights.
_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def hash_cache_path() -> Path:
    """$GDN2_HASH_CACHE, else ~/.cache/gdn2-eval/file-hashes.json (XDG_CACHE_HOME honoured)."""
    if os.environ.get("GDN2_HASH_CACHE"):
        return Path(os.environ["GDN2_HASH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gdn2-eval" / "file-hashes.json"


def _read_hash_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remember(path: Path, stamp: list[int], digest: str) -> None:
    """Add one entry to the cache file (re-read first: another process may have added entries); a cache that cannot
    be written only costs the time to hash again."""
    cache_file = hash_cache_path()
    cache = _read_hash_cache(cache_file)
    cache[str(path)] = [*stamp, digest]
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache), encoding="utf-8")
        os.replace(tmp, cache_file)
    except OSError:
        pass


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Streaming sha256 of a file's contents, cached by (resolved path, size, mtime_ns) (see hash_cache_path)."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns]
    key = (str(path), *stamp)
    if key not in _SHA_CACHE:
        hit = _read_hash_cache(hash_cache_path()).get(str(path))
        if isinstance(hit, list) and len(hit) == 3 and hit[:2] == stamp:
            _SHA_CACHE[key] = hit[2]
        else:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(chunk):
                    h.update(block)
            _SHA_CACHE[key] = h.hexdigest()
            _remember(path, stamp, _SHA_CACHE[key])
    return _SHA_CACHE[key]


def sha256_files(paths: list[Path]) -> str:
    """One file: its sha256. Several (shards): the sha256 of their sorted 'name digest' lines."""
    if len(paths) == 1:
        return sha256_file(paths[0])
    lines = sorted(f"{p.name} {sha256_file(p)}\n" for p in paths)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


# ---- configs ------------------------------------------------------------------------------------------------------
def parse_config_arg(config: dict | str | os.PathLike | None) -> tuple[dict, str | None]:
    """An explicit config: a dict, a JSON file path, or an inline JSON object. Returns (fields, description)."""
    if config is None:
        return {}, None
    if isinstance(config, dict):
        return dict(config), "the config passed in"
    text = str(config)
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text), "the inline config"
        except json.JSONDecodeError:
            raise ValueError(f"config {text[:60]!r} is not valid JSON: pass a JSON object or a .json file") from None
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path} (pass a .json file with the model's Config fields)")
    fields = read_json(path)
    if fields.get("format") == "gdn2-native":  # our own config.json: the fields sit under "config"
        fields = fields["config"]
    return fields, str(path)


def known_fields(d: dict) -> dict:
    names = set(Config.__dataclass_fields__)
    return {k: v for k, v in d.items() if k in names}


def build_config(fields: dict) -> Config:
    try:
        return Config(**known_fields(fields))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the assumed config is invalid ({e}): {summarise(fields)}") from None


def summarise(cfg: Config | dict) -> str:
    """The config fields that decide shapes and function, on one line."""
    d = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
    keys = ("name", "padded_vocab_size", "n_layer", "n_embd", "n_head", "intermediate_size", "gdn2_per_layer",
            "local_window", "gdn2_num_heads", "gdn2_head_dim", "gdn2_num_v_heads", "gdn2_expand_v", "conv_size",
            "norm_eps", "gate_act", "out_gate", "decay", "beta", "decay_heads", "allow_neg_eigval")
    return ", ".join(f"{k}={d[k]}" for k in keys if k in d)


# ---- fit check ----------------------------------------------------------------------------------------------------
def expected_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    from gdn2.model import GPT

    with torch.device("meta"):
        model = GPT(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def fit_report(sd: dict[str, torch.Tensor], cfg: Config) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, mismatched) of a state dict against the model a config builds."""
    want = expected_shapes(cfg)
    got = {k: tuple(v.shape) for k, v in sd.items()}
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    mismatched = [f"{k}: checkpoint {got[k]} vs model {want[k]}" for k in want if k in got and got[k] != want[k]]
    return missing, unexpected, mismatched


def fitting_presets(sd: dict[str, torch.Tensor]) -> list[str]:
    return [name for name in PRESETS if not any(fit_report(sd, Config.from_name(name)))]


def check_fit(sd: dict[str, torch.Tensor], cfg: Config, src: Source, hint: str = "") -> None:
    """Raise a CheckpointError naming missing/unexpected/mismatched keys, the assumed config and a fitting preset."""
    missing, unexpected, mismatched = fit_report(sd, cfg)
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{src.path} ({src.format}) does not fit the assumed model config: {len(missing)} missing, "
             f"{len(unexpected)} unexpected, {len(mismatched)} mismatched shapes"]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched)):
        if items:
            more = f" ... and {len(items) - LIST_LIMIT} more" if len(items) > LIST_LIMIT else ""
            lines.append(f"  {label} ({len(items)}): " + "; ".join(items[:LIST_LIMIT]) + more)
    origin = src.inferred.get("config_from", "defaults")
    lines.append(f"  assumed config (from {origin}): {summarise(cfg)}")
    fits = fitting_presets(sd)
    if fits:
        lines.append(f"  the preset that fits: {fits[0]} (pass --preset {fits[0]})")
    elif hint:
        lines.append(f"  {hint}")
    raise CheckpointError("\n".join(lines))
