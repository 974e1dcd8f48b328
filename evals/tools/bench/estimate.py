"""How long each section of `bench e2e` will take on one H200, from the rates recorded there (2026-12-02/03,
gdn2_1.3B, bf16), scaled by the model's parameter count and the requested counts. Printed before a run (and alone
with --estimate-only) because device time is scarce; it is a planning figure, not a measurement.
"""
from __future__ import annotations

from evals.tools.bench.workload import MIXES

REF_PARAMS = 1.28e9  # gdn2_1.3B, the model the rates below were measured on
# requests/s at the best batch (ours: 2026-12-03 with the new prefill kernel where measured; anchor: its best of the
# 2026-12-03 sweep) and of the hybrid (2026-12-03, after issue 15's rewrite)
OURS_RATE = {"mc": 1933.0, "lambada": 1458.0, "recall": 55.5, "niah": 10.5}
ANCHOR_RATE = {"mc": 590.0, "lambada": 1226.0, "recall": 6.3, "niah": 0.8}
HYBRID_RATE = {"mc": 1781.0, "lambada": 1281.0, "recall": 50.6, "niah": 10.3}
SWEEP_SLOWDOWN = 0.6  # the sweep's mean rate over its best (batch 32 ran the anchor at 0.25-0.5x its best)
FP32_SLOWDOWN = {"ours": 0.1, "anchor": 0.25}  # the 2026-12-02 fp32 run against bf16
# The untimed first pass at each batch size compiles and tunes that batch's shapes. The anchor's is what decides
# whether a run fits a device call: 200 s (mc, batch 64, bf16, 2026-12-03), over 230 s in a second run, 195 s in
# fp32 (2026-12-02); over 50 s for 300 LAMBADA-style documents in fp32; 18 s and 16 s for recall and needles.
FIRST_PASS_S = {"ours": {"mc": 30.0, "lambada": 10.0, "recall": 1.0, "niah": 1.0},
                "anchor": {"mc": 230.0, "lambada": 60.0, "recall": 18.0, "niah": 16.0}}
SETUP_S = 60.0  # build the random model, write the fla folder (2.6 GB), load both harnesses, rates
OURS_DECODE_MS = (1.4, 0.012)  # graph-replayed ms per token at batch B: a + b * B (eager: about 11 ms)
OURS_EAGER_MS = 11.5
ANCHOR_DECODE_MS = (35.0, 0.16)
HYBRID_DECODE_MS = 5.1  # graph-replayed, at batch 64 (2026-12-03)
PREFILL_TOK_S = {"recurrent": 170_000.0, "hybrid": 147_000.0}


def _mix_passes(name: str, docs: int, rate: float, batches: int, scale: float, sweep: bool, who: str) -> float:
    """Seconds of a first (compiling) and a timed pass at each batch size."""
    mix = MIXES[name]
    requests = docs * mix.choices
    mean_rate = rate * (SWEEP_SLOWDOWN if sweep and batches > 1 else 1.0)
    return batches * (2 * requests / mean_rate * scale + FIRST_PASS_S[who][name] * max(scale, 0.05))


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
                    s = (_mix_passes(n, d, HYBRID_RATE[n], 1, scale, False, "ours")
                         + _mix_passes(n, d, OURS_RATE[n], 1, scale, False, "ours"))
                    rows.append((f"mixes: {n}", s, f"{d} docs, hybrid + recurrent"))
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
        for n, d in counts.items():
            if d <= 0:
                continue
            ob = len(a.batch_sizes) if ll(n) else 1
            s = _mix_passes(n, d, OURS_RATE[n] * (FP32_SLOWDOWN["ours"] if fp32 else 1), ob, scale, True, "ours")
            how = f"{d} docs, ours at {ob} batch size(s)"
            if a.anchor:
                ab = len(a.anchor_batches) if ll(n) else 1
                s += _mix_passes(n, d, ANCHOR_RATE[n] * (FP32_SLOWDOWN["anchor"] if fp32 else 1), ab, scale, True,
                                 "anchor")
                how += f", anchor at {ab} (its first pass at each: about {FIRST_PASS_S['anchor'][n]:.0f} s)"
            rows.append((f"mixes: {n}", s, how))
    return rows


def render_estimate(rows: list[tuple[str, float, str]]) -> str:
    width = max(len(r[0]) for r in rows)
    lines = [f"  {name:<{width}}  {s:7.0f} s  {how}" for name, s, how in rows]
    total = sum(r[1] for r in rows)
    return ("estimated H200 wall time (from recorded rates; a planning figure):\n" + "\n".join(lines)
            + f"\n  {'total':<{width}}  {total:7.0f} s  (~{total / 60:.1f} min)")
