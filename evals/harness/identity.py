"""The run identity: everything that decides one results label's numbers, as one object built once per label.

A results folder is reused (a finished task skipped, a partial one resumed) only when its stored identity matches
the one built for the new command, and the comparison runs before any model loads, for finished and partial
folders alike. The identity is made of contents, not paths: the weights and the tokenizer enter as content hashes
(cached by path, size and mtime in a small file, so a rerun does not re-read gigabytes), so a folder made in one
clone resumes from another clone, after the repository moved, or with `--tokenizer` pointing at an identical copy.

What is left out, and why:
  - batch size, device, recurrence backend, prefill chunk, CUDA graphs: execution settings; they may change
    between a run and its resumption (EXECUTION_ARGS).
  - the --data-dir path: it holds an offline copy of the hub dataset that the task's own config names
    (dataset_path / dataset_name, part of the task's identity through its name and overrides); where that copy
    lies says nothing about the numbers, and hashing a whole data folder (most of it other tasks' data) on every
    rerun would be slow and would refuse resumes for unrelated files. Only "hub or offline copy" is recorded.
  - --essay-dir: the essays are the NIAH haystack, so they do change the numbers; they enter as a digest of their
    contents (small text files), again not as a path.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from gdn2.formats.base import sha256_file, sha256_files

VERSION = 2  # of this identity's layout; folders written by an older layout are refused with the fix named

# Model arguments that do not change the numbers (execution settings), left out of the identity.
EXECUTION_ARGS = frozenset({"batch_size", "max_batch_size", "device", "max_batch_tokens", "backend",
                            "prefill_chunk", "cuda_graphs", "parallelize", "trust_remote_code"})
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16", "half": "float16", "float64": "float64", "fp64": "float64"}
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "merges.txt",
                      "special_tokens_map.json", "added_tokens.json")


@dataclass(frozen=True)
class RunIdentity:
    """What a resume must match (stored in config.json["identity"]; compare with `diff`)."""

    weights: str  # sha256 of the weight files; "hub:NAME" for a Hugging Face hub model until it is loaded
    checkpoint_config: str | None  # sha256 of the config files beside the weights (shapes, BOS default, tokenizer)
    tokenizer: str | None  # content hash of the tokenizer files (gdn2.tokenizer.Tokenizer.sha256)
    dtype: str  # as resolved: "auto" is bf16 on a GPU, fp32 on the CPU for GDN-2 checkpoints
    gate_mode: str
    preset: str | None
    model_args: dict[str, Any]  # --model_args that change the numbers (not EXECUTION_ARGS)
    limit: int | float | None
    seed: int
    num_fewshot: int | None
    gen_kwargs: dict[str, Any] | None
    data: str  # "hub" or "offline copy" (see the module docstring)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> metadata, config, bos
    version: int = VERSION

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), sort_keys=True, default=str))

    def with_loaded(self, info: Mapping[str, Any]) -> "RunIdentity":
        """Fill what only the loaded model knows (a hub model's weights and tokenizer) from its describe()."""
        weights, tok = self.weights, self.tokenizer
        if weights.startswith("hub:") and info.get("sha256"):
            weights = str(info["sha256"])
        if tok is None and info.get("tokenizer_sha256"):
            tok = str(info["tokenizer_sha256"])
        if (weights, tok) == (self.weights, self.tokenizer):
            return self
        return RunIdentity(**{**asdict(self), "weights": weights, "tokenizer": tok})

    def digest(self, task: str) -> str:
        """A short hash of what decides one task's numbers: names its request cache, so a changed setting never
        reads responses computed under another."""
        whole = self.to_json()
        whole["tasks"] = {task: whole["tasks"].get(task)}
        return hashlib.sha256(json.dumps([whole, task], sort_keys=True).encode()).hexdigest()[:16]


def diff(old: Mapping[str, Any] | None, new: RunIdentity | Mapping[str, Any],
         done: Iterable[str] | None = None) -> list[str]:
    """'field old -> new' for every difference that matters; only the tasks in `done` (those the folder already
    holds) are compared task by task: a task not yet run may join the folder freely."""
    new_json = new.to_json() if isinstance(new, RunIdentity) else dict(new)
    if not isinstance(old, Mapping) or old.get("version") != VERSION:
        found = old.get("version") if isinstance(old, Mapping) else None
        return [f"identity layout {found!r} -> {VERSION} (written by an older gdn2-eval)"]
    out = []
    for key, value in new_json.items():
        if key in ("weights", "tokenizer") and (value is None or str(value).startswith("hub:")):
            continue  # a hub model's hashes are known once it is loaded: compared then (with_loaded)
        if key not in ("tasks", "version") and old.get(key) != value:
            out.append(f"{key} {_short(old.get(key))} -> {_short(value)}")
    old_tasks, new_tasks = old.get("tasks") or {}, new_json.get("tasks") or {}
    for task in done if done is not None else new_tasks:
        if task in new_tasks and old_tasks.get(task) != new_tasks[task]:
            for key in sorted(set(old_tasks.get(task) or {}) | set(new_tasks[task])):
                a, b = (old_tasks.get(task) or {}).get(key), new_tasks[task].get(key)
                if a != b:
                    out.append(f"{task} {key} {_short(a)} -> {_short(b)}")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 40 else text[:20] + "..." + text[-16:]


# ---- content hashes: gdn2's one hasher (cached by path, size and mtime, in-process and on disk) ---------------
file_sha256 = sha256_file
files_sha256 = sha256_files


def _named_digest(files: Iterable[Path]) -> str | None:
    """Contents of files by name (not path): the same files elsewhere give the same digest; None when none exist."""
    lines = sorted(f"{p.name} {file_sha256(p)}\n" for p in files if p.is_file())
    return hashlib.sha256("".join(lines).encode()).hexdigest() if lines else None


def folder_digest(folder: str | os.PathLike[str], pattern: str = "*") -> str:
    """Contents of a folder's files by relative name (e.g. the essays of --essay-dir)."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder: pass a folder of .txt files")
    lines = sorted(f"{p.relative_to(root)} {file_sha256(p)}\n" for p in root.rglob(pattern) if p.is_file())
    return "sha256:" + hashlib.sha256("".join(lines).encode()).hexdigest()


# ---- the checkpoint's files, found without loading it --------------------------------------------------------------
@dataclass
class CheckpointFiles:
    weights: list[Path]  # empty for a hub model
    configs: list[Path]  # files beside the weights that decide shapes or defaults
    tokenizer: str | None  # content hash, None when unknown before loading


def checkpoint_files(checkpoint: str, tokenizer: str | None = None) -> CheckpointFiles:
    """The files that the loader will read for `checkpoint`, as the readers in gdn2.formats choose them."""
    from gdn2.tokenizer import ByteTokenizer, tokenizer_sha256

    explicit_tok = tokenizer_sha256(tokenizer) if tokenizer else None
    if checkpoint.startswith("hf:"):
        folder = Path(checkpoint[3:]).expanduser()
        if not folder.is_dir():  # a hub name: hashed once loaded (describe()["sha256"])
            return CheckpointFiles([], [], explicit_tok)
        configs = [folder / n for n in ("config.json", "generation_config.json")]
        return CheckpointFiles(hf_weight_files(folder), configs,
                               explicit_tok or _named_digest(folder / n for n in HF_TOKENIZER_FILES))
    from gdn2.checkpoint import resolve_spec
    from gdn2.formats import lit_gpt, native

    fmt, path, meta = resolve_spec(checkpoint)
    if fmt == lit_gpt.FORMAT:
        weight = lit_gpt.find_checkpoint_file(path) if path.is_dir() else path
        if weight is None:
            raise ValueError(f"{path} has no {' or '.join(lit_gpt.CKPT_NAMES)}: point at the .pth file itself")
        folder = weight.parent
        configs = [folder / "config.json", *sorted(folder.glob("*.config.json")), folder / "lit_gpt" / "config.py"]
        weights = [weight]
    else:
        folder = path
        configs = [folder / "config.json"]
        weights = [folder / native.WEIGHTS] if fmt == native.FORMAT else hf_weight_files(folder)
    if explicit_tok is None:
        if meta.get("tokenizer") == "byte":
            explicit_tok = ByteTokenizer.sha256
        else:
            found = [folder / n for n in ("tokenizer.model", "tokenizer.json") if (folder / n).is_file()]
            explicit_tok = tokenizer_sha256(found[0]) if found else None
    return CheckpointFiles(weights, configs, explicit_tok)


def hf_weight_files(folder: Path) -> list[Path]:
    """The weight files transformers loads from a model folder: the first of HF_WEIGHT_FILES present, or the
    shards its index names."""
    for name in HF_WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            try:
                shards = json.loads(path.read_text(encoding="utf-8")).get("weight_map", {}).values()
            except (ValueError, AttributeError):
                raise ValueError(f"{path} is not a valid shard index: re-download the checkpoint folder") from None
            return sorted({folder / s for s in shards if (folder / s).is_file()}) or [path]
        return [path]
    return []


def resolve_dtype(dtype: str | None, device: str | None, hf: bool = False) -> str:
    """The dtype a run computes in: "auto" is bf16 on a GPU and fp32 on the CPU for our backend (its rule);
    for hf: baselines "auto" is the checkpoint's own torch_dtype, decided by its (hashed) config."""
    name = str(dtype or "auto").lower()
    if name == "auto":
        if hf:
            return "auto"
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        return "bfloat16" if str(device).startswith("cuda") else "float32"
    if name not in DTYPE_NAMES:
        raise ValueError(f"--dtype {dtype}: use auto, float32, bfloat16, float16 or float64")
    return DTYPE_NAMES[name]


def build(*, checkpoint: str, tokenizer: str | None, dtype: str, device: str | None, gate_mode: str,
          preset: str | None, model_args: Mapping[str, Any], limit: int | float | None, seed: int,
          num_fewshot: int | None, gen_kwargs: Mapping[str, Any] | None, data_dir: str | None,
          tasks: Mapping[str, Mapping[str, Any]]) -> tuple[RunIdentity, CheckpointFiles]:
    """The identity of one label, from the checkpoint's files (never loading the model)."""
    files = checkpoint_files(checkpoint, tokenizer)
    hf = checkpoint.startswith("hf:")
    weights = files_sha256(files.weights) if files.weights else f"hub:{checkpoint[3:]}"
    ident = RunIdentity(
        weights=weights, checkpoint_config=_named_digest(files.configs), tokenizer=files.tokenizer,
        dtype=resolve_dtype(dtype, device, hf), gate_mode=gate_mode, preset=preset,
        model_args={k: v for k, v in sorted(model_args.items()) if k not in EXECUTION_ARGS},
        limit=limit, seed=seed, num_fewshot=num_fewshot, gen_kwargs=dict(gen_kwargs) if gen_kwargs else None,
        data="offline copy" if data_dir else "hub", tasks={t: dict(v) for t, v in tasks.items()},
    )
    return RunIdentity(**json.loads(json.dumps(asdict(ident), default=str))), files
