"""The official training code's checkpoints: a fabric container (or a bare state dict) in lit_gpt parameter names.

The file holds no config (spec 1.1), so the config comes from, in order: an explicit preset/config, a config file
beside the checkpoint (`<stem>.config.json`, a lit_gpt `config.json`, one `*.config.json`, or the `lit_gpt/config.py`
copy that training puts in its output folder), else the shapes (spec 1.8) plus the preset that matches them.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import torch

from gdn2.config import PRESETS, Config
from gdn2.formats.base import (
    CheckpointError,
    Source,
    build_config,
    fit_report,
    parse_config_arg,
    read_json,
    read_safetensors,
    read_torch_file,
    strip_wrapper_prefixes,
)

FORMAT = "lit_gpt"
CKPT_NAMES = ("final-model-ckpt.pth", "latest-model-ckpt.pth")  # final first: it is the finished run
D_TO_NH = {2304: 18, 768: 12, 1024: 16}  # the official presets' SWA head counts (attn.attn is (3d, d) for any nh)


def find_checkpoint_file(folder: Path) -> Path | None:
    """The weight file of a training output folder (final before latest), or a single .pth/.pt there."""
    for name in CKPT_NAMES:
        if (folder / name).is_file():
            return folder / name
    files = sorted(p for ext in ("*.pth", "*.pt") for p in folder.glob(ext) if not p.name.endswith("_ref.pt"))
    return files[0] if len(files) == 1 else None


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The flat parameter dict of a fabric container or bare state dict, and the top-level entries ignored."""
    obj = read_safetensors(path) if path.suffix == ".safetensors" else read_torch_file(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict: save model.state_dict() instead")
    ignored: list[str] = []
    for container_key in ("model", "state_dict"):
        if isinstance(obj.get(container_key), dict):
            ignored = [k for k in obj if k != container_key]
            obj = obj[container_key]
            break
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries {bad[:5]} are not tensors; expected a fabric checkpoint "
                              "{'model': state_dict, ...} or a bare state dict")
    return strip_wrapper_prefixes(obj), ignored


def _layer_pattern_to_per_layer(is_gdn2: list[bool]) -> int | None:
    """gdn2_per_layer k such that layer i is GDN-2 exactly when i % k == 0 (k = 1: all GDN-2)."""
    for k in range(1, len(is_gdn2) + 1):
        if all(flag == (i % k == 0) for i, flag in enumerate(is_gdn2)):
            return k
    return None


def infer_fields(sd: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """The Config fields that the tensor shapes determine (spec 1.8)."""
    pre = "transformer.h."
    if "transformer.wte.weight" not in sd or not any(k.startswith(pre) for k in sd):
        raise CheckpointError(f"{path} is not an official lit_gpt GDN-2 state dict (no transformer.wte.weight / "
                              f"transformer.h.* keys; first keys: {list(sd)[:5]})")
    NV, d = sd["transformer.wte.weight"].shape
    n_layer = 1 + max(int(k[len(pre):].split(".", 1)[0]) for k in sd if k.startswith(pre))
    is_gdn2 = [f"{pre}{i}.attn.A_log" in sd for i in range(n_layer)]
    per_layer = _layer_pattern_to_per_layer(is_gdn2)
    if per_layer is None:
        layout = "".join("G" if f else "A" for f in is_gdn2)
        raise CheckpointError(f"{path}: layer pattern {layout} (G = GDN-2, A = attention) is not supported; "
                              "supported: GDN-2 on layers i % k == 0 and SWA elsewhere (gdn2_per_layer = k)")
    fields: dict[str, Any] = dict(vocab_size=NV, padded_vocab_size=NV, n_layer=n_layer, n_embd=d,
                                  gdn2_per_layer=per_layer)
    w1 = sd.get(f"{pre}0.mlp.swiglu.w1.weight")
    if w1 is not None:
        fields["intermediate_size"] = w1.shape[0]
    a = f"{pre}{is_gdn2.index(True)}.attn."
    try:
        H = sd[a + "A_log"].numel()
        K = sd[a + "dt_bias"].numel() // H
        V = sd[a + "o_norm.weight"].numel()
        fields.update(gdn2_num_heads=H, gdn2_head_dim=K, gdn2_expand_v=V / K,
                      conv_size=sd[a + "q_conv1d.weight"].shape[-1])
        HV = sd[a + "w_proj.weight"].shape[0] // V
        fields["gdn2_num_v_heads"] = HV if HV != H else None
    except KeyError:
        pass  # a key is missing: the fit check lists it with the config assumed so far
    return fields


def _matching_preset(fields: dict, sd: dict[str, torch.Tensor]) -> str | None:
    """A preset whose shapes equal the checkpoint's (vocab aside): it supplies what shapes cannot (SWA heads,
    window)."""
    for name in PRESETS:
        cfg = Config.from_name(name, vocab_size=fields["vocab_size"], padded_vocab_size=fields["padded_vocab_size"])
        if not any(fit_report(sd, cfg)):
            return name
    return None


def presets_from_config_py(path: Path) -> dict[str, dict]:
    """The preset dicts of a lit_gpt/config.py copy, read with ast (never executed): `dict(name=..., ...)` literals."""
    try:
        tree = ast.parse(path.read_text())
    except (SyntaxError, UnicodeDecodeError):
        return {}
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
            try:
                d = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
            except ValueError:
                continue
            if isinstance(d.get("name"), str):
                out[d["name"]] = d
    return out


def _fits(fields: dict, overlay: dict, sd: dict[str, torch.Tensor]) -> bool:
    try:
        return not any(fit_report(sd, build_config(_overlay(fields, overlay))))
    except CheckpointError:
        return False


def _overlay(base: dict, top: dict) -> dict:
    out = {**base, **{k: v for k, v in top.items() if v is not None or k == "gdn2_num_v_heads"}}
    if "vocab_size" in top and top.get("padded_vocab_size") is None:
        out.pop("padded_vocab_size", None)  # let the padding rule recompute it from the given vocab
    return out


def _config_beside(path: Path, fields: dict, sd: dict[str, torch.Tensor]) -> tuple[dict, str] | None:
    folder = path.parent
    candidates = [folder / f"{path.stem}.config.json", folder / "config.json"]
    others = sorted(folder.glob("*.config.json"))
    if len(others) == 1:
        candidates.append(others[0])
    for cand in candidates:
        if cand.is_file():
            d = read_json(cand)
            if "n_embd" in d:  # a lit_gpt Config (not some other tool's config.json)
                return d, cand.name
    config_py = folder / "lit_gpt" / "config.py"
    if config_py.is_file():
        presets = presets_from_config_py(config_py)
        fitting = [n for n, d in presets.items() if _fits(fields, d, sd)]
        # training names its folder {train_config}_{exp_name}: prefer the preset that prefixes it
        named = sorted((n for n in fitting if folder.name.startswith(n)), key=len, reverse=True)
        if named or fitting:
            name = (named or fitting)[0]
            return presets[name], f"lit_gpt/config.py preset {name}"
    return None


def _check_supported(fields: dict, path: Path) -> None:
    """Official Config switches our model does not implement: fail loudly rather than compute another function."""
    problems = []
    if fields.get("token_mixer", "gdn2") != "gdn2":
        problems.append(f"token_mixer={fields['token_mixer']!r} (only gdn2)")
    nq = fields.get("n_query_groups")
    if nq not in (None, fields.get("n_head")):
        problems.append(f"n_query_groups={nq} (only multi-head attention, n_query_groups = n_head)")
    hybrid = fields.get("gdn2_per_layer", 1) != 1
    for key, ok in (("parallel_residual", False), ("shared_attention_norm", False), ("bias", False)):
        if fields.get(key, ok) != ok:
            problems.append(f"{key}={fields[key]}")
    if hybrid and (fields.get("nope") or fields.get("rotary_percentage", 1.0) != 1.0):
        problems.append("attention without full rotary embedding (nope / rotary_percentage != 1)")
    if problems:
        raise CheckpointError(f"{path}: unsupported config: {'; '.join(problems)}")


def read(path: Path, preset: str | None = None, config: dict | str | None = None) -> Source:
    """Read an official checkpoint file (or training output folder) into a Source."""
    preset_cfg = Config.from_name(preset) if preset else None  # an unknown name fails before any file is read
    if path.is_dir():
        file = find_checkpoint_file(path)
        if file is None:
            raise CheckpointError(f"{path} has no {' or '.join(CKPT_NAMES)}: point at the .pth file itself")
        path = file
    sd, ignored = read_state_dict(path)
    fields = infer_fields(sd, path)
    origin = ["keys"]
    explicit, explicit_origin = parse_config_arg(config)
    if preset or explicit:
        if preset:
            fields = _overlay(fields, preset_cfg.to_dict())  # a preset is a whole config
            origin.append(f"preset {preset}")
        if explicit:
            fields = _overlay(fields, explicit)
            origin.append(explicit_origin)
    elif (beside := _config_beside(path, fields, sd)) is not None:
        fields = _overlay(fields, beside[0])
        origin.append(beside[1])
    elif (name := _matching_preset(fields, sd)) is not None:
        fields = _overlay(fields, {k: PRESETS[name][k] for k in ("n_head", "local_window")} | {"name": name})
        origin.append(f"shapes of preset {name}")
    else:
        d = fields["n_embd"]
        fields.setdefault("n_head", D_TO_NH.get(d, d // 64 if d % 64 == 0 else 1))
        fields.setdefault("local_window", 2048)
    _check_supported(fields, path)
    assumed = {k: fields.get(k, getattr(Config, k)) for k in ("n_head", "local_window", "norm_eps")}
    inferred = {"config_from": " + ".join(origin), "checkpoint_file": path.name, "ignored_entries": ignored,
                "not_in_shapes": assumed if fields.get("gdn2_per_layer", 1) != 1 else {"norm_eps": assumed["norm_eps"]}}
    return Source(FORMAT, path, [path], sd, build_config(fields), inferred, tokenizer_dir=path.parent)
