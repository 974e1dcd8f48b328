"""Load any supported checkpoint into our GDN-2 model, and save the native format.

    loaded = load_checkpoint("runs/out/final-model-ckpt.pth")      # official lit_gpt container
    loaded = load_checkpoint("runs/out/")                           # training output folder (final before latest)
    loaded = load_checkpoint("fla-kda-340M/")                       # fla HF folder: model_type kda / gated_deltanet
    loaded = load_checkpoint("converted/")                          # native folder (config.json format gdn2-native)
    loaded = load_checkpoint("demo:tiny")                           # a built-in demo (gdn2/demo/<name>/, native)
    loaded.model(tokens)                                            # GPT in eval mode

Weights are checked against the model the config builds before anything runs; a mismatch raises CheckpointError
listing missing / unexpected keys and mismatched shapes, the assumed config and a preset that fits. Files are read
with torch.load(weights_only=True) or safetensors: loading never executes code from a checkpoint.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gdn2.config import Config
from gdn2.formats import fla, lit_gpt, native
from gdn2.formats.base import CheckpointError, Source, check_fit, parse_config_arg, read_json, sha256_files
from gdn2.model import GPT
from gdn2.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

__all__ = ["CheckpointError", "Loaded", "load_checkpoint", "save_native", "resolve_spec", "DEMO_DIR", "parse_dtype"]

DEMO_DIR = Path(__file__).resolve().parent / "demo"
BOS_POLICIES = ("bos", "none")  # one BOS before every context, or nothing
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "fp64": torch.float64}


@dataclass
class Loaded:
    model: GPT
    config: Config
    tokenizer: Tokenizer | None
    tokenizer_note: str  # where the tokenizer came from, or why there is none
    format: str  # lit_gpt | fla-kda | fla-gated_deltanet | native
    path: Path
    sha256: str  # of the weight file (of the sorted shard digests when sharded)
    weight_files: list[Path]
    bos_policy: str  # default BOS policy for this format: "bos" or "none" (see spec section 4)
    inferred: dict[str, Any] = field(default_factory=dict)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[str(dtype).lower()]


def _demo_names() -> list[str]:
    if not DEMO_DIR.is_dir():
        return []
    return sorted(p.name for p in DEMO_DIR.iterdir() if (p / "config.json").is_file())  # not the shared tokenizer/


def resolve_spec(spec: str | os.PathLike) -> tuple[str, Path, dict]:
    """(format, path, format-specific config.json or {}) of a checkpoint spec, or a clear error."""
    text = str(spec)
    if text.startswith("hf:"):
        raise ValueError(f"{text}: hf: checkpoints run through lm-eval's own hf model (the runner routes them), "
                         "not load_checkpoint; pass a lit_gpt .pth, a checkpoint folder or a demo name here")
    if text.startswith("demo:") or (not Path(text).expanduser().exists() and (DEMO_DIR / text).is_dir()):
        name = text.removeprefix("demo:")
        path = DEMO_DIR / name
        if not path.is_dir():
            raise FileNotFoundError(f"no demo checkpoint {name!r}: available demos are {_demo_names() or 'none'}")
    else:
        path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path} (pass a .pth file, a checkpoint folder, or a demo "
                                f"name: {', '.join(_demo_names()) or 'none installed'})")
    if path.is_file():
        if path.suffix not in (".pth", ".pt", ".bin", ".ckpt", ".safetensors"):
            raise CheckpointError(f"{path}: unknown checkpoint file type {path.suffix!r}; expected a lit_gpt .pth "
                                  "or a folder (fla HF, native, training output)")
        return lit_gpt.FORMAT, path, {}
    meta = read_json(path / "config.json") if (path / "config.json").is_file() else {}
    if native.is_native(meta):
        return native.FORMAT, path, meta
    if "model_type" in meta:
        if meta["model_type"] not in fla.MODEL_TYPES:
            raise CheckpointError(f"{path}: model_type {meta['model_type']!r} is not a GDN-family model "
                                  f"({', '.join(fla.MODEL_TYPES)}); run plain Hugging Face baselines as hf:{path}")
        return "fla", path, meta
    if lit_gpt.find_checkpoint_file(path) is not None:
        return lit_gpt.FORMAT, path, {}
    raise CheckpointError(f"{path} is not a checkpoint folder: expected config.json (native or fla) or "
                          f"{' / '.join(lit_gpt.CKPT_NAMES)}")


def _read_source(spec, preset, config) -> Source:
    fmt, path, meta = resolve_spec(spec)
    if fmt == lit_gpt.FORMAT:
        return lit_gpt.read(path, preset, config)
    if preset:
        raise ValueError(f"--preset applies to official lit_gpt checkpoints; {path} carries its own config.json "
                         "(use --config to override fields)")
    explicit, origin = parse_config_arg(config)
    reader = native.read if fmt == native.FORMAT else fla.read
    return reader(path, meta, explicit, origin)


def _cast(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Cast floating weights, keeping the decay parameters at fp32 or better (GPT.FP32_PARAMS)."""
    keep = torch.promote_types(dtype, torch.float32)
    out = {}
    for k, t in sd.items():
        want = keep if k.rsplit(".", 1)[-1] in GPT.FP32_PARAMS else dtype
        out[k] = t.to(want) if t.is_floating_point() and t.dtype != want else t
    return out


def _tokenizer(src: Source, explicit: str | None) -> tuple[Tokenizer | None, str]:
    if explicit is not None:
        return load_tokenizer(explicit), f"from {explicit}"
    if src.meta.get("tokenizer") == "byte":
        return ByteTokenizer(), "byte (recorded in config.json)"
    folder = src.tokenizer_dir
    if folder is not None and any((folder / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
        tok = load_tokenizer(folder)
        return tok, f"from {tok.name}"
    return None, (f"no tokenizer.model or tokenizer.json beside {src.path}: pass tokenizer=PATH (--tokenizer); "
                  "the official models use the Llama-2 tokenizer of TinyLlama/TinyLlama_v1.1")


def _bos_policy(src: Source, tok: Tokenizer | None) -> tuple[str, str]:
    recorded = src.meta.get("bos_policy")
    if recorded in BOS_POLICIES:
        return recorded, "recorded in config.json"
    if tok is not None and hasattr(tok, "add_bos"):
        return ("bos" if tok.add_bos else "none"), "the tokenizer's default call (how the stream pipeline encoded)"
    if tok is not None:
        return ("bos" if tok.bos_id is not None else "none"), "the tokenizer has a BOS token"
    return "bos", "Llama-family default (BOS before each document); no tokenizer to ask"


def load_checkpoint(
    spec: str | os.PathLike,
    *,
    preset: str | None = None,
    config: dict | str | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    gate_mode: str = "full",
    tokenizer: str | None = None,
) -> Loaded:
    """Read, check and build a checkpoint (see the module docstring for accepted specs).

    preset / config: the model config for lit_gpt files (a preset name; a dict, .json path or inline JSON of
    Config fields); for other formats `config` overrides fields of their own config. dtype: weights' dtype
    (default: the file's); A_log and dt_bias stay fp32. gate_mode: a Table 5 ablation, see gdn2.config.
    """
    src = _read_source(spec, preset, config)
    cfg = src.config
    cfg.gate_mode = gate_mode
    cfg.__post_init__()  # validates gate_mode like a fresh Config would
    check_fit(src.state_dict, cfg, src)
    wte = src.state_dict["transformer.wte.weight"]
    want = parse_dtype(dtype) or wte.dtype
    with torch.device("meta"):
        model = GPT(cfg)
    # assign=True adopts the loaded (possibly memory-mapped) tensors instead of copying into fresh ones
    model.load_state_dict(_cast(src.state_dict, want), strict=True, assign=True)
    model.to(device).eval()
    tok, note = _tokenizer(src, tokenizer)
    if tok is not None and tok.vocab_size > cfg.padded_vocab_size:
        raise CheckpointError(f"tokenizer {tok.name} has {tok.vocab_size} tokens but {src.path} embeds only "
                              f"{cfg.padded_vocab_size}: pass the tokenizer the model was trained with (--tokenizer)")
    policy, why = _bos_policy(src, tok)
    inferred = {**src.inferred, "bos_policy": why, "dtype": str(want).removeprefix("torch.")}
    return Loaded(model, cfg, tok, note, src.format, src.path, sha256_files(src.weight_files), src.weight_files,
                  policy, inferred)


def save_native(
    loaded_or_model: Loaded | GPT,
    config: Config | None = None,
    tokenizer_src: str | os.PathLike | None = None,
    out_dir: str | os.PathLike = "",
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Write a native checkpoint folder (model.safetensors + config.json + tokenizer files); returns the folder.

    Given a Loaded, config, tokenizer source and BOS policy default to its own; given a GPT, pass `config`
    (default: model.config) and `tokenizer_src` ("byte", a folder or a tokenizer file, or None).
    """
    if not str(out_dir):
        raise ValueError("save_native needs out_dir: the folder to write the native checkpoint into")
    meta: dict[str, Any] = {}
    if isinstance(loaded_or_model, Loaded):
        ld = loaded_or_model
        model, config = ld.model, config or ld.config
        if tokenizer_src is None and ld.tokenizer is not None:
            tokenizer_src = ld.tokenizer.name
        meta = {"bos_policy": ld.bos_policy,
                "source": {"format": ld.format, "path": str(ld.path), "sha256": ld.sha256}}
    else:
        model, config = loaded_or_model, config or loaded_or_model.config
    return native.write(model, config, tokenizer_src, Path(out_dir), {**meta, **(extra_meta or {})})
