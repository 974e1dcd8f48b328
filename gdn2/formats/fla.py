"""fla Hugging Face folders (`model_type` kda or gated_deltanet) mapped onto our GDN-2 model (spec section 3).

Two declarative pieces: RENAMES (fla key -> our key, first match wins) and `translate_config` (fla config.json ->
our Config with the layer-variant fields). fla's softmax-attention layers (the `attn` field) become our SWA layers:
q/k/v_proj are fused into the interleaved `attn.attn.weight` and o_proj becomes `attn.proj.weight`.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from gdn2.formats.base import CheckpointError, Source, build_config, read_json, read_safetensors, read_torch_file
from gdn2.formats.lit_gpt import _layer_pattern_to_per_layer

MODEL_TYPES = ("kda", "gated_deltanet")
L = r"model\.layers\.(\d+)\."
RENAMES: list[tuple[str, str]] = [
    (r"model\.embeddings\.weight", "transformer.wte.weight"),
    (r"model\.norm\.weight", "transformer.ln_f.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (L + r"attn_norm\.weight", r"transformer.h.\1.norm_1.weight"),
    (L + r"mlp_norm\.weight", r"transformer.h.\1.norm_2.weight"),
    (L + r"mlp\.gate_proj\.weight", r"transformer.h.\1.mlp.swiglu.w1.weight"),
    (L + r"mlp\.up_proj\.weight", r"transformer.h.\1.mlp.swiglu.w2.weight"),
    (L + r"mlp\.down_proj\.weight", r"transformer.h.\1.mlp.swiglu.w3.weight"),
    (L + r"attn\.A", r"transformer.h.\1.attn.A_log"),  # first fla KDA release (spec 3.2, legacy naming)
    (L + r"attn\.f_proj\.1\.bias", r"transformer.h.\1.attn.dt_bias"),  # same
    (L + r"attn\.(.+)", r"transformer.h.\1.attn.\2"),  # mixer parameters share the official names
]
# Per family: (head_dim, expand_v, num_heads) defaults of its HF config class, and the fixed layer variant.
FAMILY = {
    "kda": (dict(head_dim=128, expand_v=1.0, num_heads=16),
            dict(gate_act="sigmoid", out_gate="lowrank", decay="channel", beta="scalar", decay_heads="value")),
    "gated_deltanet": (dict(head_dim=256, expand_v=2.0, num_heads=6),
                       dict(gate_act="swish", decay="scalar", beta="scalar", decay_heads="value")),
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """All tensors of a save_pretrained folder: single file or sharded index, safetensors preferred."""
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            files = sorted({folder / f for f in read_json(path).get("weight_map", {}).values()})
            absent = [f.name for f in files if not f.is_file()]
            if absent or not files:
                raise CheckpointError(f"{path} lists shards that are not there ({absent[:3]}): re-download the folder")
        else:
            files = [path]
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(read_safetensors(f) if f.suffix == ".safetensors" else read_torch_file(f))
        return sd, files
    raise CheckpointError(f"{folder} has a config.json but no weights ({', '.join(WEIGHT_FILES)}): "
                          "copy the weight files next to it")


def rename(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fla names -> ours; keys no rule knows keep their name, so the fit check reports them as unexpected."""
    rules = [(re.compile(pat), rep) for pat, rep in RENAMES]
    out = {}
    for key, value in sd.items():
        for pat, rep in rules:
            if pat.fullmatch(key):
                key = pat.sub(rep, key)
                break
        out[key] = value
    return out


def fuse_attention(sd: dict[str, torch.Tensor], layer: int, n_head: int) -> None:
    """fla q/k/v_proj + o_proj of one layer -> our per-head interleaved attn.attn.weight + attn.proj.weight."""
    p = f"transformer.h.{layer}.attn."
    if not all(p + f"{x}_proj.weight" in sd for x in "qkvo"):
        return  # the fit check lists what is missing
    q, k, v = (sd.pop(p + f"{x}_proj.weight") for x in "qkv")
    d = q.shape[1]
    sd[p + "attn.weight"] = torch.stack([t.reshape(n_head, -1, d) for t in (q, k, v)], dim=1).reshape(-1, d)
    sd[p + "proj.weight"] = sd.pop(p + "o_proj.weight")


def _attn_fields(c: dict, n_layer: int, d: int, path: Path, explicit: dict) -> dict[str, Any]:
    attn = c.get("attn")
    if not attn:
        return dict(gdn2_per_layer=1, n_head=1)  # n_head unused without attention layers
    specs = attn if isinstance(attn, list) else [attn]
    layers = sorted({int(i) for s in specs for i in s.get("layers", [])})
    first = {k: v for k, v in specs[0].items() if k != "layers"}
    if any({k: v for k, v in s.items() if k != "layers"} != first for s in specs[1:]):
        raise CheckpointError(f"{path}: attention layers with different settings are not supported (one `attn` spec)")
    per_layer = _layer_pattern_to_per_layer([i not in layers for i in range(n_layer)])
    if per_layer is None:
        raise CheckpointError(f"{path}: attention on layers {layers} is not supported; supported: attention on every "
                              "layer except i % k == 0 (e.g. the odd layers)")
    nh = int(first.get("num_heads", 16))
    problems = []
    if (first.get("num_kv_heads") or nh) != nh:
        problems.append(f"num_kv_heads={first['num_kv_heads']} != num_heads={nh} (grouped-query attention)")
    if first.get("qkv_bias"):
        problems.append("qkv_bias=true")
    if d % nh:
        problems.append(f"hidden_size {d} not divisible by num_heads {nh}")
    window = first.get("window_size")
    if window is None and "local_window" not in explicit:
        problems.append("window_size=null (full causal attention: our attention keeps a window-1 key cache; pass "
                        "config={'local_window': N} with N >= your longest input to run it exactly up to N tokens)")
    if problems:
        raise CheckpointError(f"{path}: unsupported attention layers: {'; '.join(problems)}")
    return dict(gdn2_per_layer=per_layer, n_head=nh, local_window=window or 0,
                rope_base=float(first.get("rope_theta") or 10000.0))


def translate_config(c: dict, path: Path, explicit: dict | None = None) -> dict[str, Any]:
    """fla config.json -> our Config fields, refusing the variants our model does not compute."""
    mt = c.get("model_type")
    defaults, variant = FAMILY[mt]
    problems = []
    if not c.get("use_short_conv", True):
        problems.append("use_short_conv=false")
    if c.get("hidden_act", "swish") not in ("swish", "silu"):
        problems.append(f"hidden_act={c['hidden_act']!r}")
    if c.get("attnres_block_size") is not None:
        problems.append("attnres_block_size (a different residual scheme)")
    if c.get("safe_gate") or c.get("lower_bound") is not None:
        problems.append("safe_gate/lower_bound (a different decay function)")
    H = int(c.get("num_heads") or defaults["num_heads"])
    HV = int(c.get("num_v_heads") or H)
    if HV % H:
        problems.append(f"num_v_heads={HV} is not a multiple of num_heads={H}")
    if problems:
        raise CheckpointError(f"{path}: unsupported {mt} config: {'; '.join(problems)}")
    d, n_layer = int(c.get("hidden_size", 2048)), int(c.get("num_hidden_layers", 24))
    I = c.get("intermediate_size")
    if I is None:  # fla GatedMLP's rule (spec 3.1)
        I = 256 * math.ceil(int(d * c.get("hidden_ratio", 4) * 2 / 3) / 256)
    vocab = int(c.get("vocab_size", 32000))
    fields = dict(
        name=str(c.get("_name_or_path") or mt), vocab_size=vocab, padded_vocab_size=vocab, padding_multiple=1,
        n_layer=n_layer, n_embd=d, intermediate_size=int(I), norm_eps=float(c.get("norm_eps", 1e-6)),
        gdn2_num_heads=H, gdn2_head_dim=int(c.get("head_dim") or defaults["head_dim"]),
        gdn2_num_v_heads=HV if HV != H else None, gdn2_expand_v=float(c.get("expand_v", defaults["expand_v"])),
        conv_size=int(c.get("conv_size", 4)), allow_neg_eigval=bool(c.get("allow_neg_eigval", False)), **variant,
    )
    if mt == "gated_deltanet":
        fields["out_gate"] = "full" if c.get("use_gate", True) else "none"
    fields.update(_attn_fields(c, n_layer, d, path, explicit or {}))
    return fields


def read(folder: Path, config_json: dict, explicit: dict | None = None, explicit_origin: str | None = None) -> Source:
    explicit = explicit or {}
    fields = {**translate_config(config_json, folder, explicit), **explicit}
    cfg = build_config(fields)
    raw, files = read_weights(folder)
    sd = rename(raw)
    for i in range(cfg.n_layer):
        if not cfg.is_gdn2_layer(i):
            fuse_attention(sd, i, cfg.n_head)
    tied = "lm_head.weight" not in sd and config_json.get("tie_word_embeddings", False)
    if tied and "transformer.wte.weight" in sd:
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    origin = "config.json" + (f" + {explicit_origin}" if explicit else "")
    inferred = {"config_from": origin, "model_type": config_json["model_type"], "tied_lm_head": bool(tied),
                "variant": {k: fields[k] for k in ("gate_act", "out_gate", "decay", "beta", "decay_heads")}}
    bos = config_json.get("bos_token_id")
    return Source(f"fla-{config_json['model_type']}", folder, files, sd, cfg, inferred, tokenizer_dir=folder,
                  meta={"bos_token_id": bos} if bos is not None else {})
