"""End-to-end evaluation speed: our `gdn2` backend against lm-eval's `hf` model on fla's KDA class, same requests.

    python run_eval.py bench e2e                                   # gdn2_1.3B shapes on CUDA, anchor if fla is there
    python run_eval.py bench e2e --shape tiny --device cpu --no-anchor --counts mc=4,lambada=8,recall=2,niah=1 \\
        --length-scale 0.02 --out results/bench/e2e-tiny.md

One random-weight KDA-variant model is written as an fla KDA Hugging Face folder (config.json model_type kda, fla's
key names, a word-level tokenizer covering the whole vocabulary), so both harnesses evaluate the same function:
ours through load_checkpoint + GDN2LM, the anchor through fla's KDAForCausalLM under lm-eval's HFLM. Both get the
same lm-eval Instances (strings), so tokenisation, batching and scoring are all inside the timed region.

Sections (--sections):
  mixes   requests/s per mix (multiple choice, LAMBADA-style, 2K recall generation, NIAH), timed on a second pass
          (the first compiles and tunes kernels; its seconds are reported too); loglikelihood mixes also compare
          log-likelihoods and the argmax choice per document.
  decode  tokens/s against batch size: our model.step eager and replayed from a CUDA graph, the anchor under
          Hugging Face generate; memory floor = (weight bytes + state bytes read and written) / copy bandwidth.
  long    peak CUDA memory of prefilling one needle-length prompt (4K .. 128K) with our model: it should depend on
          the prefill chunk (--prefill-chunk), not on the length.
Targets (issue 8, one H200): loglikelihood mixes >= 3x the anchor with identical accuracies and |d ll| <= 1e-3;
decode at batch 64 within 2x of the floor; 128K peak within 10% of 4K. The report is rewritten after every
section, so a run stopped by a time limit keeps what it measured.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import io
import json
import platform
import random
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

LL_TARGET = 3.0  # x the anchor's requests/s on loglikelihood mixes
LL_DIFF_TARGET = 1e-3
DECODE_FLOOR_TARGET = 2.0  # x the memory floor at the largest batch
LONG_MEM_TARGET = 1.10  # peak at the longest prompt / peak at the shortest
# shapes beside gdn2's presets: the model the recorded anchors used (fla KDAConfig, 1.39B)
EXTRA_SHAPES = {"kda_1.3B": dict(vocab_size=32000, n_layer=24, n_embd=2048, n_head=16, intermediate_size=5632,
                                 gdn2_per_layer=1, gdn2_num_heads=16, gdn2_head_dim=128, norm_eps=1e-6)}
KDA_VARIANT = dict(beta="scalar", gate_act="sigmoid", decay_heads="value", out_gate="lowrank", decay="channel")
SPECIALS = ("<s>", "</s>", "<unk>")  # ids 0, 1, 2 of the word tokenizer
SECTIONS = ("mixes", "decode", "long")


# ---- the model both harnesses read -------------------------------------------------------------------------------
def kda_config(shape: str):
    """Our Config at a preset's sizes with fla KDA's layer variant (scalar beta, sigmoid gate, per-value-head decay)."""
    from gdn2.config import PRESETS, Config

    if shape not in PRESETS and shape not in EXTRA_SHAPES:
        raise ValueError(f"unknown --shape {shape!r}: choose one of {', '.join(shape_names())}")
    sizes = {**PRESETS.get(shape, {}), **EXTRA_SHAPES.get(shape, {})}
    cfg = Config(**{**sizes, **KDA_VARIANT, "name": shape, "padding_multiple": 1})  # fla: unpadded vocabulary
    if cfg.is_hybrid:
        raise ValueError(f"--shape {shape} is a hybrid; the KDA anchor has no SWA layers: use gdn2_1.3B or tiny")
    return cfg


def shape_names() -> list[str]:
    """Recurrent shapes the benchmark can build (gdn2's non-hybrid presets and EXTRA_SHAPES)."""
    from gdn2.config import PRESETS

    return [n for n, c in {**PRESETS, **EXTRA_SHAPES}.items() if c.get("gdn2_per_layer", 1) == 1]


def build_model(shape: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random KDA-variant GPT on the CPU whose weights are exact in `dtype` (decay parameters stay fp32)."""
    from gdn2.model import GPT

    model = GPT(kda_config(shape)).init_weights(seed=seed)
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
    import re

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

    Word-level keeps request lengths exact in tokens, makes any generated id decode to a word, and never yields
    "\\n", so generation mixes always run their full token budget in both harnesses (equal work).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

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


# ---- requests ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mix:
    """Requests shaped like one kind of task (lengths in tokens of the word tokenizer)."""

    name: str
    kind: str  # "loglikelihood" or "generate_until"
    docs: int
    context: tuple[int, int]
    choices: int = 1  # continuations per context
    continuation: tuple[int, int] = (1, 1)
    gen_tokens: int = 0
    anchor_batch: int = 32  # the batch size the recorded anchor used for this kind of task
    about: str = ""


MIXES = {m.name: m for m in (
    Mix("mc", "loglikelihood", 250, (100, 300), choices=4, continuation=(10, 30),
        about="multiple choice: 4 continuations of 10-30 tokens per 100-300 token context"),
    Mix("lambada", "loglikelihood", 500, (60, 100), about="LAMBADA-style: ~80 token context, one-word continuation"),
    Mix("recall", "generate_until", 32, (1500, 2000), gen_tokens=48, anchor_batch=16,
        about="2K recall: 1500-2000 token context, greedy up to 48 tokens, until newline"),
    Mix("niah", "generate_until", 4, (4096, 16384), gen_tokens=32, anchor_batch=4,
        about="needle prompts: 4K-16K tokens, 32 generated tokens"),
)}


def parse_counts(text: str) -> dict[str, int]:
    """'mc=250,lambada=500' -> {'mc': 250, 'lambada': 500} (docs per mix; 0 skips a mix)."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, value = item.partition("=")
        if name not in MIXES or not value.strip().isdigit():
            raise ValueError(f"--counts item {item!r}: write NAME=DOCS with NAME one of {', '.join(MIXES)}")
        out[name] = int(value)
    return out


def make_requests(mix: Mix, words: list[str], docs: int, length_scale: float = 1.0, seed: int = 0,
                  gen_cap: int | None = None) -> list:
    """lm-eval Instances for `docs` documents of `mix`; context lengths are scaled by length_scale (>= 2 tokens),
    generated tokens capped at gen_cap."""
    from lm_eval.api.instance import Instance

    rng = random.Random(f"{mix.name}-{seed}")
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    scaled = lambda lo_hi: max(2, round(rng.randint(*lo_hi) * length_scale))  # noqa: E731
    out = []
    for d in range(docs):
        ctx = text(scaled(mix.context))
        if mix.kind == "loglikelihood":
            for c in range(mix.choices):
                cont = " " + text(rng.randint(*mix.continuation))
                out.append(Instance("loglikelihood", {"doc": d}, (ctx, cont), c, (mix.name, d, 1)))
        else:
            kw = dict(until=["\n"], max_gen_toks=min(mix.gen_tokens, gen_cap or mix.gen_tokens), do_sample=False,
                      temperature=0.0)
            out.append(Instance("generate_until", {"doc": d}, (ctx, kw), 0, (mix.name, d, 1)))
    return out


# ---- timing helpers ---------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _gib(nbytes: float) -> float:
    return nbytes / 2**30


def copy_bandwidth(device: str) -> float:
    """Copy bandwidth in bytes/s (read + write) of one large copy on `device`."""
    if str(device).startswith("cuda"):
        from evals.tools.bench_kernels import copy_bandwidth as cuda_copy_bandwidth

        return cuda_copy_bandwidth()
    x = torch.randn(1 << 24)
    y = torch.empty_like(x)
    y.copy_(x)
    t0 = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    return 2 * 5 * x.numel() * x.element_size() / (time.perf_counter() - t0)


def _peak_reset(device: str) -> None:
    if str(device).startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> float | None:
    return _gib(torch.cuda.max_memory_allocated()) if str(device).startswith("cuda") else None


# ---- the two harnesses ----------------------------------------------------------------------------------------
@dataclass
class Harness:
    name: str
    lm: Any  # an lm-eval LM
    model: Any  # the torch module behind it, for decode timing
    note: str = ""
    warmup_s: float = 0.0  # the untimed first pass of the last mix


def load_ours(folder: Path, device: str, dtype: str, batch_size: int, max_batch_tokens: int,
              prefill_chunk: int) -> Harness:
    from evals.harness.backend import GDN2LM

    lm = GDN2LM(checkpoint=str(folder), device=device, dtype=dtype, bos="false", batch_size=batch_size,
                max_batch_tokens=max_batch_tokens, prefill_chunk=prefill_chunk)
    return Harness("ours", lm, lm.model, f"gdn2 backend, batch {batch_size} rows / {max_batch_tokens} tokens")


def anchor_available() -> str | None:
    """None when fla's KDA model class and transformers import, else why not."""
    try:
        import fla  # noqa: F401  registers fla's classes with transformers
        import transformers  # noqa: F401
        from fla.models import KDAForCausalLM  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (needs accelerate)
    except Exception as err:  # ImportError, or a broken install failing at import
        return f"not installed ({type(err).__name__}: {str(err)[:80]})"
    return None


def anchor_generate_warning(transformers: str | None, fla: str | None) -> str | None:
    """fla 0.6.0 reads the decoding cache from `past_key_values`; transformers 5.24 passes it as `cache`, so each
    cached step of Hugging Face generate sees only the newest token: the anchor's generations are then wrong."""
    def parse(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", v)[:2])

    if transformers and fla and parse(fla) <= (0, 6) and parse(transformers) >= (5, 24):
        return (f"WARNING: fla {fla} with transformers {transformers} decodes wrongly after the first token (cache "
                "passed as `cache=`): the anchor's generation and decode rows are not valid; use transformers < 5.24")
    return None


def load_anchor(folder: Path, device: str, dtype: torch.dtype, batch_size: int) -> Harness:
    """lm-eval's HFLM over fla's KDAForCausalLM read from the same folder."""
    import fla  # noqa: F401
    from fla.models import KDAForCausalLM
    from lm_eval.models.huggingface import HFLM
    from transformers import PreTrainedTokenizerFast

    try:
        model = KDAForCausalLM.from_pretrained(str(folder), dtype=dtype)
    except TypeError:  # transformers < 4.56 calls it torch_dtype
        model = KDAForCausalLM.from_pretrained(str(folder), torch_dtype=dtype)
    model = model.to(device).eval()
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    # max_length: the folder says 2^20 positions, said again so HFLM never truncates a needle prompt
    lm = HFLM(pretrained=model, backend="causal", tokenizer=tok, batch_size=batch_size, max_length=1 << 20,
              device=device)
    return Harness("anchor", lm, model, f"lm-eval hf (HFLM) on fla KDAForCausalLM, batch {batch_size}")


def run_requests(h: Harness, mix: Mix, requests: list, device: str,
                 profile: Path | None = None) -> tuple[list, float, float | None]:
    """(outputs, seconds, peak GiB) of one harness on a mix, timed on a second pass over the same requests.

    The untimed first pass compiles and autotunes every kernel shape the mix needs (fla tunes per shape), as the
    recorded anchor's warm rerun did; the cost of that first pass is reported separately (warm-up seconds).
    With `profile`, a third pass runs under torch.profiler and its busiest operators are written there.
    """
    call = h.lm.loglikelihood if mix.kind == "loglikelihood" else h.lm.generate_until
    if hasattr(h.lm, "batch_size_per_gpu"):  # HFLM: one fixed batch per mix, as the recorded anchor ran
        h.lm.batch_size_per_gpu = mix.anchor_batch
    _sync(device)
    t0 = time.perf_counter()
    call(requests, disable_tqdm=True)
    _sync(device)
    h.warmup_s = time.perf_counter() - t0
    _peak_reset(device)
    _sync(device)
    t0 = time.perf_counter()
    out = call(requests, disable_tqdm=True)
    _sync(device)
    seconds, peak = time.perf_counter() - t0, _peak(device)
    if profile is not None:
        write_profile(lambda: call(requests, disable_tqdm=True), device, profile)
    return out, seconds, peak


def write_profile(fn: Callable[[], Any], device: str, path: Path) -> None:
    """Run fn under torch.profiler, then under cProfile; write wall time, summed device time, the top operators
    and the Python functions that hold the host longest (time waiting on the device shows as sync calls)."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    _sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        fn()
        _sync(device)
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    kernels = [e for e in events if "CUDA" in str(getattr(e, "device_type", ""))]  # operators' rows repeat these
    busy = sum(e.self_device_time_total for e in kernels) / 1e6 if len(acts) > 1 else float("nan")
    sort = "self_device_time_total" if len(acts) > 1 else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    host = cProfile.Profile()
    host.runcall(fn)
    _sync(device)
    stats = io.StringIO()
    pstats.Stats(host, stream=stats).sort_stats("tottime").print_stats(30)
    path.write_text(f"wall {wall:.3f}s (profiled)  device busy {busy:.3f}s  kernels launched "
                    f"{sum(e.count for e in kernels)}\n"
                    + events.table(sort_by=sort, row_limit=45, max_name_column_width=70) + "\n"
                    + stats.getvalue())


def compare_loglikelihoods(mix: Mix, ours: list, anchor: list, requests: list) -> dict:
    """Max |d ll| (also relative to the anchor's |ll|: a sum of many tokens carries each token's rounding) and
    agreement of the per-document decision (argmax choice, or greedy match for one continuation)."""
    diff = max(abs(a[0] - b[0]) for a, b in zip(ours, anchor))
    rel = max(abs(a[0] - b[0]) / max(abs(b[0]), 1e-9) for a, b in zip(ours, anchor))
    return dict(max_abs_ll_diff=diff, max_rel_ll_diff=rel,
                **{f"acc_{k}": v for k, v in _accuracies(mix, ours, anchor, requests).items()})


def _accuracies(mix: Mix, ours: list, anchor: list, requests: list) -> dict:
    def decisions(res):
        if mix.choices == 1:
            return [bool(r[1]) for r in res]
        by_doc: dict[int, list[float]] = {}
        for req, r in zip(requests, res):
            by_doc.setdefault(req.doc["doc"], []).append(r[0])
        return [max(range(len(v)), key=v.__getitem__) for _, v in sorted(by_doc.items())]

    mine, theirs = decisions(ours), decisions(anchor)
    label = lambda d: d if mix.choices == 1 else d == 0  # noqa: E731  (choice 0 plays the gold answer)
    n = len(mine)
    return dict(ours=sum(map(bool, map(label, mine))) / n, anchor=sum(map(bool, map(label, theirs))) / n,
                agree=sum(a == b for a, b in zip(mine, theirs)) / n)


# ---- sections ---------------------------------------------------------------------------------------------------
@dataclass
class Report:
    env: dict
    setup: dict
    mixes: list[dict] = field(default_factory=list)
    decode: list[dict] = field(default_factory=list)
    long_context: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def bench_mixes(report: Report, ours: Harness, anchor: Harness | None, anchor_why: str | None, words: list[str],
                counts: dict[str, int], length_scale: float, gen_cap: int | None, device: str,
                log: Callable[[str], None], profile_dir: str | None = None) -> None:
    for name, docs in counts.items():
        if docs <= 0:
            continue
        mix = MIXES[name]
        requests = make_requests(mix, words, docs, length_scale, gen_cap=gen_cap)
        row: dict[str, Any] = dict(mix=name, kind=mix.kind, docs=docs, requests=len(requests), about=mix.about)
        prof = Path(profile_dir) / f"profile-{name}.txt" if profile_dir else None
        out_ours, dt, peak = run_requests(ours, mix, requests, device, prof)
        row.update(ours_s=dt, ours_req_s=len(requests) / dt, ours_peak_GiB=peak, ours_warmup_s=ours.warmup_s)
        log(f"{name}: ours {len(requests)} requests in {dt:.2f}s")
        if anchor is None:
            row["anchor"] = anchor_why.split(" (")[0]
        else:
            try:
                out_anchor, dt, peak = run_requests(anchor, mix, requests, device)
            except torch.OutOfMemoryError as err:
                row["anchor"] = "out of memory"
                report.notes.append(f"anchor {name}: {str(err)[:200]}")
                _peak_reset(device)
            else:
                row.update(anchor_s=dt, anchor_req_s=len(requests) / dt, anchor_peak_GiB=peak,
                           anchor_warmup_s=anchor.warmup_s,
                           ratio=row["ours_req_s"] * dt / len(requests))
                if mix.kind == "loglikelihood":
                    row.update(compare_loglikelihoods(mix, out_ours, out_anchor, requests))
                else:
                    row["same_text"] = sum(a == b for a, b in zip(out_ours, out_anchor)) / len(requests)
                log(f"{name}: anchor {len(requests)} requests in {dt:.2f}s")
        if mix.kind == "loglikelihood" and "acc_ours" not in row:
            row["acc_ours"] = _accuracies(mix, out_ours, out_ours, requests)["ours"]
        report.mixes.append(row)


def _weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def ours_decode(model, B: int, prompt: int, steps: int, device: str) -> dict:
    """ms per token of the backend's decode step (model.step + argmax) after a `prompt`-token prefill: eager, and
    replayed from its CUDA graph (gdn2.generate.Stepper, what generate_until runs on GPUs)."""
    from gdn2.generate import Stepper

    V = model.config.vocab_size
    tokens = torch.randint(len(SPECIALS), V, (B, prompt), device=device)
    logits, state = model.prefill(tokens, logits="last")

    def per_token(stepper: Stepper) -> float:
        stepper.load(state, logits)
        for _ in range(3):  # compile and warm up
            stepper.advance()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            stepper.advance()
        _sync(device)
        return (time.perf_counter() - t0) / steps * 1e3

    row = dict(B=B, ours_ms=per_token(Stepper(model, B, graph=False)), state_bytes=state.nbytes())
    if not str(device).startswith("cuda"):
        row["ours_graph_ms"] = None
        row["graph_note"] = "cuda only"
        return row
    try:
        row["ours_graph_ms"] = per_token(Stepper(model, B, graph=True))
    except Exception as err:  # a host sync inside the step makes capture fail; report it instead of stopping
        row["ours_graph_ms"] = None
        row["graph_note"] = f"capture failed: {type(err).__name__}: {str(err)[:80]}"
    return row


def anchor_decode(model, B: int, prompt: int, steps: int, device: str) -> float:
    """ms per new token under Hugging Face generate: (time of 1 + steps tokens - time of 1) / steps."""
    V = model.config.vocab_size
    tokens = torch.randint(len(SPECIALS), V, (B, prompt), device=device)
    kw = dict(do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)

    def gen(n: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(tokens, max_new_tokens=n, min_new_tokens=n, **kw)
        _sync(device)
        return time.perf_counter() - t0

    gen(8)  # compile and warm up
    return (gen(1 + steps) - gen(1)) / steps * 1e3


def bench_decode(report: Report, ours: Harness, anchor: Harness | None, batches: list[int], prompt: int, steps: int,
                 device: str, bw: float, log: Callable[[str], None]) -> None:
    weights = _weight_bytes(ours.model)
    for B in batches:
        row = ours_decode(ours.model, B, prompt, steps, device)
        row["floor_ms"] = (weights + 2 * row["state_bytes"]) / bw * 1e3
        best = min(x for x in (row["ours_ms"], row["ours_graph_ms"]) if x is not None)
        row.update(ours_tok_s=B / best * 1e3, ours_floor_ratio=best / row["floor_ms"])
        if anchor is not None:
            try:
                row["anchor_ms"] = anchor_decode(anchor.model, B, prompt, steps, device)
                row["anchor_tok_s"] = B / row["anchor_ms"] * 1e3
            except Exception as err:  # the anchor failing must not lose our rows
                row["anchor_note"] = f"{type(err).__name__}: {str(err)[:80]}"
        log(f"decode B={B}: ours {best:.3f} ms/token, floor {row['floor_ms']:.3f} ms")
        report.decode.append(row)


def bench_long(report: Report, model, lengths: list[int], chunks: list[int], device: str,
               log: Callable[[str], None]) -> None:
    """Peak memory of one prompt's prefill per prefill chunk and length (CUDA only: the CPU has no such counter)."""
    if not str(device).startswith("cuda"):
        report.long_context.append(dict(length=None, note="cuda only"))
        return
    V, kept = model.config.vocab_size, model.chunk_tokens
    try:
        for chunk in chunks:
            model.chunk_tokens = chunk
            rows = []
            for T in lengths:
                tokens = torch.randint(len(SPECIALS), V, (1, T), device=device)
                _peak_reset(device)
                base = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                model.prefill(tokens, logits="last")
                torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                peak = torch.cuda.max_memory_allocated()
                rows.append(dict(length=T, chunk=chunk, peak_GiB=_gib(peak), working_GiB=_gib(peak - base),
                                 prefill_s=dt, tok_s=T / dt))
                rows[-1]["peak_vs_first"] = peak / 2**30 / rows[0]["peak_GiB"]
                report.long_context.append(rows[-1])
                log(f"long T={T} chunk={chunk}: peak {_gib(peak):.2f} GiB in {dt:.2f}s")
                del tokens
    finally:
        model.chunk_tokens = kept


# ---- environment, rendering, files ------------------------------------------------------------------------------
def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:
        return None
    return str(getattr(mod, "__version__", "unknown"))


def environment(device: str, bw: float) -> dict:
    name = torch.cuda.get_device_name(0) if str(device).startswith("cuda") else f"CPU {platform.machine()}"
    return dict(device=name, torch=torch.__version__, triton=_version("triton"), lm_eval=_version("lm_eval"),
                fla=_version("fla"), transformers=_version("transformers"), python=platform.python_version(),
                copy_TBps=bw / 1e12, date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e-2 and x != 0 else f"{x:.{digits}f}"
    return str(x)


def _mix_target(r: dict) -> str:
    if "ratio" not in r:
        return "-"
    if r["kind"] != "loglikelihood":
        return f"{r['ratio']:.1f}x"
    met = r["ratio"] >= LL_TARGET and r["acc_agree"] == 1.0 and r["max_abs_ll_diff"] <= LL_DIFF_TARGET
    return "met" if met else "MISSED"


def render(report: Report) -> str:
    """The report as text tables (rich, markdown boxes), for the terminal and the README."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    env, s = report.env, report.setup
    console = Console(record=True, width=240, file=io.StringIO(), force_terminal=False)
    console.print(f"{env['device']}  torch {env['torch']}  triton {env['triton'] or '-'}  lm-eval {env['lm_eval']}  "
                  f"fla {env['fla'] or 'absent'}  transformers {env['transformers'] or 'absent'}  "
                  f"copy {env['copy_TBps']:.3f} TB/s  {env['date']}")
    console.print(f"model: {s['shape']} KDA variant, {s['params'] / 1e6:.1f}M params, {s['dtype']}, random weights; "
                  f"prefill chunk {s['prefill_chunk']}; length scale {s['length_scale']}")
    t = Table(title=f"Requests/s on identical lm-eval requests (target: loglikelihood mixes >= {LL_TARGET:.0f}x the "
                    f"anchor, same argmax decisions, |d ll| <= {LL_DIFF_TARGET:g})", box=box.MARKDOWN)
    for col in ("mix", "requests", "ours req/s", "anchor req/s", "ours/anchor", "max abs d ll", "max rel d ll",
                "acc ours", "acc anchor", "decisions agree", "same text", "ours peak GiB", "anchor peak GiB",
                "1st pass s ours", "1st pass s anchor", "target"):
        t.add_column(col, justify="right")
    for r in report.mixes:
        anchor_rate = _fmt(r.get("anchor_req_s"), 1) if "anchor_req_s" in r else r.get("anchor", "-")
        t.add_row(r["mix"], str(r["requests"]), _fmt(r["ours_req_s"], 1), anchor_rate, _fmt(r.get("ratio")),
                  _fmt(r.get("max_abs_ll_diff"), 3), _fmt(r.get("max_rel_ll_diff"), 4), _fmt(r.get("acc_ours"), 3),
                  _fmt(r.get("acc_anchor"), 3), _fmt(r.get("acc_agree"), 3), _fmt(r.get("same_text"), 3),
                  _fmt(r.get("ours_peak_GiB")), _fmt(r.get("anchor_peak_GiB")), _fmt(r.get("ours_warmup_s"), 1),
                  _fmt(r.get("anchor_warmup_s"), 1), _mix_target(r))
    console.print(t)
    t = Table(title=f"Decoding after a {s['decode_prompt']}-token prompt (target: largest batch within "
                    f"{DECODE_FLOOR_TARGET:.0f}x the memory floor = weights + 2 x state bytes over copy bandwidth)",
              box=box.MARKDOWN)
    for col in ("B", "ours ms/tok", "ours graph ms/tok", "ours tokens/s", "anchor ms/tok", "anchor tokens/s",
                "floor ms", "ours/floor", "note", "target"):
        t.add_column(col, justify="right")
    last = max((r["B"] for r in report.decode), default=None)
    for r in report.decode:
        target = "-" if r["B"] != last else ("met" if r["ours_floor_ratio"] <= DECODE_FLOOR_TARGET else "MISSED")
        note = "; ".join(x for x in (r.get("graph_note"), r.get("anchor_note")) if x)
        t.add_row(str(r["B"]), _fmt(r["ours_ms"], 3), _fmt(r["ours_graph_ms"], 3), _fmt(r["ours_tok_s"], 0),
                  _fmt(r.get("anchor_ms"), 3), _fmt(r.get("anchor_tok_s"), 0), _fmt(r["floor_ms"], 3),
                  _fmt(r["ours_floor_ratio"]), note or "-", target)
    console.print(t)
    t = Table(title=f"Long-context prefill, one prompt (target: per chunk, peak at the longest within "
                    f"{LONG_MEM_TARGET:.2f}x the shortest that fills a chunk)", box=box.MARKDOWN)
    for col in ("length", "peak GiB", "working GiB", "peak / first", "prefill s", "tokens/s", "chunk", "target"):
        t.add_column(col, justify="right")
    rows = report.long_context
    for r in rows:
        if r.get("length") is None:
            t.add_row("-", "-", "-", "-", "-", "-", "-", r["note"])
            continue
        last = r is rows[-1] or rows[rows.index(r) + 1]["chunk"] != r["chunk"]  # the longest prompt of its chunk
        # a prompt shorter than the chunk prefills in one smaller pass: compare with the first full-chunk prompt
        base = next((x for x in rows if x["chunk"] == r["chunk"] and x["length"] >= r["chunk"]), r)
        target = "-" if not last else ("met" if r["peak_GiB"] <= LONG_MEM_TARGET * base["peak_GiB"] else "MISSED")
        t.add_row(str(r["length"]), _fmt(r["peak_GiB"], 3), _fmt(r["working_GiB"], 3), _fmt(r["peak_vs_first"], 3),
                  _fmt(r["prefill_s"]), _fmt(r["tok_s"], 0), str(r["chunk"]), target)
    console.print(t)
    for n in report.notes:
        console.print(f"note: {n}")
    return console.export_text()


def write(report: Report, out: Path) -> None:
    """The tables to out (.md) and the numbers beside it (.json)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(asdict(report), indent=1, default=str))  # numbers first
    out.with_suffix(".md").write_text(render(report))


# ---- the command ------------------------------------------------------------------------------------------------
def read_report(path: Path) -> Report:
    """A report written by `write` (its .json), e.g. to render it again."""
    return Report(**json.loads(Path(path).with_suffix(".json").read_text()))


def _csv_ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of integers (e.g. 1,8,64)") from None


def _check_device(device: str) -> str:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA GPU is visible: run on a GPU machine or pass --device cpu")
    return device


def run(args: argparse.Namespace) -> Report:
    from evals.harness.backend import _dtype

    if args.render:
        report = read_report(Path(args.render))
        print(render(report))
        if args.out:
            write(report, Path(args.out))
        return report
    device = _check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise ValueError(f"--sections {','.join(bad)}: choose from {', '.join(SECTIONS)}")
    counts = {**{m.name: m.docs for m in MIXES.values()}, **parse_counts(args.counts)}
    dtype = _dtype(args.dtype, device)
    out = Path(args.out or f"results/bench/e2e-{args.shape}-{device.split(':')[0]}.md")
    started = time.perf_counter()
    report: Report | None = None

    def log(msg: str) -> None:
        """A progress line; each one also rewrites the report, so a run stopped by a time limit keeps its rows."""
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", file=sys.stderr, flush=True)
        if report is not None:
            write(report, out)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gdn2-bench-e2e-"))
    model = build_model(args.shape, seed=args.seed, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    folder = write_fla_kda_folder(model, workdir / f"kda-{args.shape}")
    del model
    log(f"wrote {folder} ({params / 1e6:.1f}M params)")
    bw = copy_bandwidth(device)
    prompt = max(2, round(args.decode_prompt * args.length_scale))
    report = Report(env=environment(device, bw), setup=dict(
        shape=args.shape, params=params, dtype=str(dtype).removeprefix("torch."), folder=str(folder),
        prefill_chunk=args.prefill_chunk, length_scale=args.length_scale, counts=counts, gen_cap=args.gen_cap,
        batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens, decode_prompt=prompt,
        decode_steps=args.decode_steps, sections=sections))
    ours = load_ours(folder, device, args.dtype, args.batch_size, args.max_batch_tokens, args.prefill_chunk)
    report.notes.append(ours.note)
    log(f"loaded ours on {device}")
    if "long" in sections:  # first, while only our weights are on the device
        bench_long(report, ours.model, _csv_ints(args.long_lengths), _csv_ints(args.long_chunks), device, log)
    anchor_why = anchor_available() if args.anchor else "off (--no-anchor)"
    anchor = None if anchor_why else load_anchor(folder, device, dtype, 32)
    report.notes.append(anchor.note if anchor else f"anchor: {anchor_why}")
    if anchor and (warning := anchor_generate_warning(_version("transformers"), _version("fla"))):
        report.notes.append(warning)
    log(f"anchor: {anchor_why or 'loaded'}")
    if "decode" in sections:  # before the mixes: the shortest section, kept if a time limit stops the run
        bench_decode(report, ours, anchor, _csv_ints(args.decode_batches), prompt, args.decode_steps, device, bw, log)
    if "mixes" in sections:
        words = word_list(ours.model.config.vocab_size - len(SPECIALS))
        bench_mixes(report, ours, anchor, anchor_why, words, counts, args.length_scale, args.gen_cap, device, log,
                    args.profile)
    log(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    print(render(report))
    return report


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default="gdn2_1.3B", choices=shape_names(),
                   help="model sizes (a preset, or kda_1.3B: the recorded anchors' model); the layer variant is KDA's")
    p.add_argument("--device", help="cuda (default when a GPU is visible) or cpu")
    p.add_argument("--dtype", default="auto", help="weights' dtype, both harnesses (auto: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--anchor", action=argparse.BooleanOptionalAction, default=True,
                   help="also run lm-eval's hf model on fla's KDAForCausalLM when fla and transformers import")
    p.add_argument("--out", help="report file: tables to .md and numbers to .json (default results/bench/e2e-...)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"any of {','.join(SECTIONS)}")
    p.add_argument("--counts", default="", help="documents per mix, e.g. mc=250,lambada=500,recall=32,niah=4 "
                   f"(defaults: {','.join(f'{m.name}={m.docs}' for m in MIXES.values())}; 0 skips a mix)")
    p.add_argument("--length-scale", type=float, default=1.0, help="multiply every context length (tests: 0.02)")
    p.add_argument("--gen-cap", type=int, help="cap on generated tokens per request (tests; default: the mix's)")
    p.add_argument("--batch-size", type=int, default=64, help="our rows per forward")
    p.add_argument("--max-batch-tokens", type=int, default=1 << 17, help="our rows x padded length per forward")
    p.add_argument("--prefill-chunk", type=int, default=16384, help="our prefill columns per pass")
    p.add_argument("--decode-batches", default="1,8,64")
    p.add_argument("--decode-prompt", type=int, default=512, help="prompt tokens before decoding (times length scale)")
    p.add_argument("--decode-steps", type=int, default=128, help="timed decode steps")
    p.add_argument("--long-lengths", default="4096,16384,32768,65536,131072")
    p.add_argument("--long-chunks", default="4096,16384", help="prefill chunks the long section runs at")
    p.add_argument("--workdir", help="where the fla folder is written (default: a new temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", metavar="DIR", help="also profile one more pass of ours per mix (torch.profiler); "
                   "the busiest operators go to DIR/profile-MIX.txt")
    p.add_argument("--render", metavar="REPORT.json", help="print (and with --out, rewrite) a saved report's tables "
                   "instead of measuring")


def add_cli(bench_subparsers) -> argparse.ArgumentParser:
    """Register `e2e` under the `bench` command of run_eval.py."""
    p = bench_subparsers.add_parser("e2e", help="end-to-end requests/s, decoding and long-context memory vs the "
                                    "lm-eval hf + fla anchor", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=lambda args: run(args) and 0)
    return p

