"""How long each section of `bench e2e` will take on one H200, from the rates recorded there (2026-12-02/03,
gdn2_1.3B, bf16), scaled by the model's parameter count and the requested counts. Printed before a run (and alone
with --estimate-only) because device time is scarce; it is a planning figure, not a measurement.
"""
from __future__ import annotations

from evals.tools.bench.workload import MIXES

REF_PARAMS = 1.28e9  # gdn2_1.3B, the model the rates below were measured on
# requests/s at the best batch (ours, anchor) and of the hybrid before issue 15's rewrite (an upper bound on time)
OURS_RATE = {"mc": 1474.0, "lambada": 1458.0, "recall": 55.5, "niah": 10.5}
ANCHOR_RATE = {"mc": 590.0, "lambada": 1226.0, "recall": 6.3, "niah": 0.8}
HYBRID_RATE = {"mc": 62.5, "lambada": 73.0, "recall": 10.9, "niah": 3.4}
SWEEP_SLOWDOWN = 0.6  # the sweep's mean rate over its best (batch 32 ran the anchor at 0.25-0.5x its best)
FP32_SLOWDOWN = {"ours": 0.1, "anchor": 0.25}  # the 2026-12-02 fp32 run against bf16
FIRST_COMPILE_S = {"ours": 10.0, "anchor": 100.0}  # the first pass of the first mix compiles (fla autotunes)
FIRST_COMPILE_FP32_S = {"ours": 30.0, "anchor": 200.0}  # the same in the fp32 run (2026-12-02: 32 s and 195 s)
SETUP_S = 60.0  # build the random model, write the fla folder (2.6 GB), load both harnesses, rates
OURS_DECODE_MS = (1.4, 0.012)  # graph-replayed ms per token at batch B: a + b * B (eager: about 11 ms)
OURS_EAGER_MS = 11.5
ANCHOR_DECODE_MS = (35.0, 0.16)
HYBRID_DECODE_MS = 70.0  # at batch 64, before the rewrite
PREFILL_TOK_S = {"recurrent": 130_000.0, "hybrid": 40_000.0}


def _mix_passes(name: str, docs: int, rate: float, batches: int, scale: float, sweep: bool) -> float:
    """Seconds of a warm-up and a timed pass at each batch size."""
    mix = MIXES[name]
    requests = docs * mix.choices
    mean_rate = rate * (SWEEP_SLOWDOWN if sweep and batches > 1 else 1.0)
    return 2 * batches * requests / mean_rate * scale


def estimate(a, params: float, hybrid: bool) -> list[tuple[str, float, str]]:
    """(section, seconds, what it counts) rows for the parsed arguments `a` of bench e2e."""
    scale = params / REF_PARAMS
    counts = {**{m.name: m.docs for m in MIXES.values()}, **a.counts}
    ll = lambda n: MIXES[n].kind == "loglikelihood"  # noqa: E731
    rows = [("setup", SETUP_S * max(scale, 0.05), "model, folder, loads, copy and matmul rates")]
    steps = a.decode_steps + 3
    if hybrid:
        if "decode" in a.sections:
            s = sum(steps * 2 * (HYBRID_DECODE_MS * B / 64 + OURS_EAGER_MS) / 1e3 + steps * 2 * OURS_EAGER_MS / 1e3
                    for B in a.decode_batches) * scale
            rows.append(("decode", s, f"batches {a.decode_batches}, both models, eager and graph"))
        if "long" in a.sections:
            tok = sum(a.long_lengths)
            s = (tok / PREFILL_TOK_S["hybrid"] + tok / PREFILL_TOK_S["recurrent"]) * scale + 20
            rows.append(("long", s, f"lengths {a.long_lengths}, both models"))
        if "mixes" in a.sections:
            for n, d in counts.items():
                if d > 0:
                    s = _mix_passes(n, d, HYBRID_RATE[n], 1, scale, False) + _mix_passes(n, d, OURS_RATE[n], 1,
                                                                                         scale, False)
                    rows.append((f"mixes: {n}", s, f"{d} docs, hybrid (pre-rewrite rate: an upper bound) + recurrent"))
        return rows
    fp32 = a.dtype in ("float32", "fp32")
    if "long" in a.sections:
        tok = sum(a.long_lengths) * len(a.long_chunks)
        rows.append(("long", tok / PREFILL_TOK_S["recurrent"] * scale + 10 * len(a.long_chunks),
                     f"lengths {a.long_lengths} x chunks {a.long_chunks}"))
    if "decode" in a.sections:
        s = sum(steps * (OURS_EAGER_MS + OURS_DECODE_MS[0] + OURS_DECODE_MS[1] * B) / 1e3 for B in a.decode_batches)
        if a.anchor:
            s += sum((2 * a.decode_steps + 10) * (ANCHOR_DECODE_MS[0] + ANCHOR_DECODE_MS[1] * B) / 1e3
                     for B in a.decode_batches)
        rows.append(("decode", s * scale, f"batches {a.decode_batches}{', with the anchor' if a.anchor else ''}"))
    if "mixes" in a.sections:
        first = True
        for n, d in counts.items():
            if d <= 0:
                continue
            ob = len(a.batch_sizes) if ll(n) else 1
            s = _mix_passes(n, d, OURS_RATE[n] * (FP32_SLOWDOWN["ours"] if fp32 else 1), ob, scale, True)
            how = f"{d} docs, ours at {ob} batch size(s)"
            if a.anchor:
                ab = len(a.anchor_batches) if ll(n) else 1
                s += _mix_passes(n, d, ANCHOR_RATE[n] * (FP32_SLOWDOWN["anchor"] if fp32 else 1), ab, scale, True)
                how += f", anchor at {ab}"
            if first:
                compile_s = FIRST_COMPILE_FP32_S if fp32 else FIRST_COMPILE_S
                s += (compile_s["ours"] + (compile_s["anchor"] if a.anchor else 0)) * max(scale, 0.05)
                first = False
            rows.append((f"mixes: {n}", s, how))
    return rows


def render_estimate(rows: list[tuple[str, float, str]]) -> str:
    width = max(len(r[0]) for r in rows)
    lines = [f"  {name:<{width}}  {s:7.0f} s  {how}" for name, s, how in rows]
    total = sum(r[1] for r in rows)
    return ("estimated H200 wall time (from recorded rates; a planning figure):\n" + "\n".join(lines)
            + f"\n  {'total':<{width}}  {total:7.0f} s  (~{total / 60:.1f} min)")
