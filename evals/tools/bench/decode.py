"""The `decode` section: ms per token of our decode step (eager and from its CUDA graph) against the memory floor,
and the anchor under Hugging Face generate.

Memory floor per step = (weight bytes + state bytes read + state bytes written) / measured copy bandwidth. The
matrix state and the conv tail are read and written whole every step; the SWA key/value ring (hybrids) is read
whole and written one slot per step (counted as read only).
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from evals.tools.bench.common import is_cuda, prefill_last, sync, weight_bytes
from evals.tools.bench.harnesses import Harness
from evals.tools.bench.models import SPECIALS

RING_KEYS = ("k", "v")  # state keys of the SWA layers' key/value ring (gdn2.layers.CausalSelfAttention)


def state_traffic_bytes(state) -> int:
    """Bytes one decode step must move for `state`: the ring read, everything else read and written."""
    return sum(t.numel() * t.element_size() * (1 if k in RING_KEYS else 2)
               for layer in state.layers for k, t in layer.items())


def ours_decode(h: Harness, B: int, prompt: int, steps: int, device: str) -> dict:
    """ms per token of the backend's decode step (model.step + argmax) after a `prompt`-token prefill: eager, and
    replayed from its CUDA graph (gdn2.generate.Stepper, what generate_until runs on GPUs)."""
    from gdn2.generate import Stepper

    model = h.model
    tokens = torch.randint(len(SPECIALS), model.config.vocab_size, (B, prompt), device=device)
    logits, state = prefill_last(model, tokens, h.prefill_chunk, h.backend)

    def per_token(stepper: Stepper) -> float:
        stepper.load(state, logits)
        for _ in range(3):  # compile and warm up
            stepper.advance()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            stepper.advance()
        sync(device)
        return (time.perf_counter() - t0) / steps * 1e3

    eager = Stepper(model, B, graph=False, backend=h.backend)
    # The floor counts the state the step reads: the stepper's, whose SWA rings are full size (window-1 slots),
    # not the prefill's, whose rings are cut to the prompt (gdn2.layers.CausalSelfAttention.fit_state).
    row = dict(B=B, ours_ms=per_token(eager), state_bytes=eager.state.nbytes(),
               traffic_bytes=state_traffic_bytes(eager.state))
    if not is_cuda(device):
        row["ours_graph_ms"] = None
        row["graph_note"] = "cuda only"
        return row
    try:
        row["ours_graph_ms"] = per_token(Stepper(model, B, graph=True, backend=h.backend))
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
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(tokens, max_new_tokens=n, min_new_tokens=n, **kw)
        sync(device)
        return time.perf_counter() - t0

    gen(8)  # compile and warm up
    return (gen(1 + steps) - gen(1)) / steps * 1e3


def decode_row(h: Harness, B: int, prompt: int, steps: int, device: str, bw: float) -> dict:
    """Our decode at batch B with its floor and the ratio of the faster of eager and graph to it."""
    row = ours_decode(h, B, prompt, steps, device)
    row["floor_ms"] = (weight_bytes(h.model) + row["traffic_bytes"]) / bw * 1e3
    best = min(x for x in (row["ours_ms"], row["ours_graph_ms"]) if x is not None)
    row.update(ours_best_ms=best, ours_tok_s=B / best * 1e3, ours_floor_ratio=best / row["floor_ms"])
    return row


def bench_decode(report, ours: Harness, anchor: Harness | None, batches: list[int], prompt: int, steps: int,
                 device: str, bw: float, log: Callable[[str], None]) -> None:
    for B in batches:
        row = decode_row(ours, B, prompt, steps, device, bw)
        if anchor is not None:
            try:
                row["anchor_ms"] = anchor_decode(anchor.model, B, prompt, steps, device)
                row["anchor_tok_s"] = B / row["anchor_ms"] * 1e3
            except Exception as err:  # the anchor failing must not lose our rows
                row["anchor_note"] = f"{type(err).__name__}: {str(err)[:80]}"
        report.decode.append(row)  # before log: each log line rewrites the report
        log(f"decode B={B}: ours {row['ours_best_ms']:.3f} ms/token, floor {row['floor_ms']:.3f} ms")
