"""The random-weight models the benchmark times, and the fla KDA Hugging Face folder both harnesses read.

One random-weight KDA-variant model is written as an fla KDA folder (config.json model_type kda, fla's key names, a
word-level tokenizer covering the whole vocabulary), so ours (load_checkpoint + GDN2LM) and the anchor (fla's
KDAForCausalLM under lm-eval's HFLM) evaluate the same function. Hybrid models have no fla twin: they are built
from our own Config and handed to the backend as modules.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import torch

# shapes beside gdn2's presets: the model the recorded anchors used (fla KDAConfig, 1.39B)
EXTRA_SHAPES = {"kda_1.3B": dict(vocab_size=32000, n_layer=24, n_embd=2048, n_head=16, intermediate_size=5632,
                                 gdn2_per_layer=1, gdn2_num_heads=16, gdn2_head_dim=128, norm_eps=1e-6)}
KDA_VARIANT = dict(beta="scalar", gate_act="sigmoid", decay_heads="value", out_gate="lowrank", decay="channel")
GATES = ("kda", "native")  # fla KDA's layer variant, or GDN-2's own gates (Config's defaults)
# each hybrid preset and its recurrent twin (same width, heads and depth; all layers GDN-2)
HYBRID_TWINS = {"swa_gdn2_1.3B": "gdn2_1.3B", "tiny_hybrid": "tiny"}
SPECIALS = ("<s>", "</s>", "<unk>")  # ids 0, 1, 2 of the word tokenizer


def model_config(shape: str, gates: str = "kda"):
    """Our Config at a preset's sizes with fla KDA's gates (or GDN-2's own, gates="native"); unpadded vocabulary,
    as fla's."""
    from gdn2.config import PRESETS, Config

    if shape not in PRESETS and shape not in EXTRA_SHAPES:
        raise ValueError(f"unknown --shape {shape!r}: choose one of {', '.join(shape_names())}")
    if gates not in GATES:
        raise ValueError(f"unknown --gates {gates!r}: choose one of {', '.join(GATES)}")
    sizes = {**PRESETS.get(shape, {}), **EXTRA_SHAPES.get(shape, {})}
    return Config(**{**sizes, **(KDA_VARIANT if gates == "kda" else {}), "name": shape, "padding_multiple": 1})


def kda_config(shape: str):
    """The KDA-variant Config of a recurrent shape (the one model both harnesses read)."""
    cfg = model_config(shape, "kda")
    if cfg.is_hybrid:
        raise ValueError(f"--shape {shape} is a hybrid; the KDA anchor has no SWA layers: use gdn2_1.3B or tiny")
    return cfg


def shape_names() -> list[str]:
    """Recurrent shapes (compared with the anchor) and hybrid shapes (compared with their recurrent twin)."""
    from gdn2.config import PRESETS

    recurrent = [n for n, c in {**PRESETS, **EXTRA_SHAPES}.items() if c.get("gdn2_per_layer", 1) == 1]
    return recurrent + list(HYBRID_TWINS)


def is_hybrid_shape(shape: str) -> bool:
    return shape in HYBRID_TWINS


def build_model(shape: str, seed: int = 0, dtype: torch.dtype = torch.float32, gates: str = "kda"):
    """A random GPT on the CPU whose weights are exact in `dtype` (decay parameters stay fp32)."""
    from gdn2.model import GPT

    model = GPT(model_config(shape, gates) if is_hybrid_shape(shape) or gates != "kda" else kda_config(shape))
    model = model.init_weights(seed=seed)
    model.to_dtype(dtype)
    for name, p in model.named_parameters():  # fp32 decay params rounded so a bf16 load of them loses nothing
        if name.rsplit(".", 1)[-1] in GPT.FP32_PARAMS:
            p.data = p.data.to(dtype).to(p.dtype)
    return model.eval()


# our key (regex) -> fla key; the inverse of gdn2.formats.fla.RENAMES for the layers a KDA model has
_TO_FLA = [
    (r"transformer\.wte\.weight", "model.embeddings.weight"),
    (r"transformer\.ln_f\.weight", "model.norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"transformer\.h\.(\d+)\.norm_1\.weight", r"model.layers.\1.attn_norm.weight"),
    (r"transformer\.h\.(\d+)\.norm_2\.weight", r"model.layers.\1.mlp_norm.weight"),
    (r"transformer\.h\.(\d+)\.mlp\.swiglu\.w1\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"transformer\.h\.(\d+)\.mlp\.swiglu\.w2\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"transformer\.h\.(\d+)\.mlp\.swiglu\.w3\.weight", r"model.layers.\1.mlp.down_proj.weight"),
    (r"transformer\.h\.(\d+)\.attn\.(.+)", r"model.layers.\1.attn.\2"),
]


def fla_state_dict(model) -> dict[str, torch.Tensor]:
    """Our parameters under fla KDA's key names (spec section 3.2), as contiguous CPU tensors."""
    rules = [(re.compile(p), r) for p, r in _TO_FLA]
    out = {}
    for key, t in model.state_dict().items():
        for pat, rep in rules:
            if pat.fullmatch(key):
                out[pat.sub(rep, key)] = t.detach().cpu().contiguous()
                break
        else:
            raise ValueError(f"{key} has no fla KDA name: only KDA-variant recurrent models can be written")
    return out


def fla_kda_config(cfg) -> dict[str, Any]:
    """config.json of fla's KDAConfig for our Config (no attention layers, untied head, unpadded vocabulary)."""
    return dict(
        model_type="kda", architectures=["KDAForCausalLM"], attn_mode="chunk", hidden_size=cfg.n_embd,
        num_hidden_layers=cfg.n_layer, num_heads=cfg.gdn2_num_heads, head_dim=cfg.gdn2_head_dim,
        expand_v=cfg.gdn2_expand_v, num_v_heads=None, use_short_conv=True, conv_size=cfg.conv_size,
        allow_neg_eigval=cfg.allow_neg_eigval, intermediate_size=cfg.intermediate_size, hidden_act="swish",
        norm_eps=cfg.norm_eps, vocab_size=cfg.vocab_size, max_position_embeddings=1 << 20,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=None, attn=None,
    )


def word_list(n: int, seed: int = 0) -> list[str]:
    """n distinct lowercase pseudo-words (deterministic)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    while len(seen) < n:
        seen.add("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))))
    return sorted(seen)


def write_word_tokenizer(folder: Path, vocab_size: int) -> list[str]:
    """A word-level tokenizer.json over the whole vocabulary (one token per space-separated word); returns the words.

    Word-level keeps request lengths exact in tokens (a text's token count is its word count, which the compute
    floor relies on), makes any generated id decode to a word, and never yields "\\n", so generation mixes always
    run their full token budget in every harness (equal work).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    words = word_list(vocab_size - len(SPECIALS))
    vocab = {w: i for i, w in enumerate([*SPECIALS, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="PreTrainedTokenizerFast", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        add_bos_token=False, model_max_length=1 << 20)))
    return words


def write_fla_kda_folder(model, folder: str | Path) -> Path:
    """Write `model` (a KDA-variant GPT) as an fla KDA Hugging Face folder with a word-level tokenizer."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(fla_kda_config(model.config), indent=1))
    save_file(fla_state_dict(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_word_tokenizer(folder, model.config.vocab_size)
    return folder


def param_split(model) -> dict[str, int]:
    """Parameter counts by what the compute floor does with them: `body` (the blocks: every token passes them),
    `head` (lm_head: only positions whose next token is scored), `embedding` (a lookup: no FLOPs)."""
    head = model.lm_head.weight.numel()
    tied = model.lm_head.weight is model.transformer.wte.weight  # one tensor: parameters() yields it once
    embedding = 0 if tied else model.transformer.wte.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    return dict(total=total, body=total - head - embedding, head=head, embedding=embedding)
