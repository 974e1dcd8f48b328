"""The `long` section: one prompt's prefill (4K .. 128K tokens) per prefill chunk: peak CUDA memory (it should
depend on the chunk, not the length) and tokens/s. Each chunk's first length is prefilled once untimed first, so
compilation is not timed."""
from __future__ import annotations

import time
from typing import Callable

import torch

from evals.tools.bench.common import gib, is_cuda, peak_reset, prefill_last
from evals.tools.bench.models import SPECIALS


def prefill_once(model, T: int, chunk: int, device: str) -> dict:
    """Peak and speed of prefilling one random T-token prompt in `chunk`-column passes (CUDA)."""
    tokens = torch.randint(len(SPECIALS), model.config.vocab_size, (1, T), device=device)
    base = peak_reset(device)
    t0 = time.perf_counter()
    prefill_last(model, tokens, chunk)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated()
    return dict(length=T, chunk=chunk, peak_GiB=gib(peak), working_GiB=gib(peak - base), prefill_s=dt, tok_s=T / dt)


def bench_long(report, model, lengths: list[int], chunks: list[int], device: str,
               log: Callable[[str], None]) -> None:
    """Peak memory of one prompt's prefill per prefill chunk and length (CUDA only: the CPU has no such counter)."""
    if not is_cuda(device):
        report.long_context.append(dict(length=None, note="cuda only"))
        return
    for chunk in chunks:
        prefill_once(model, min(lengths[0], chunk), chunk, device)  # compile and tune, untimed
        rows = []
        for T in lengths:
            rows.append(prefill_once(model, T, chunk, device))
            rows[-1]["peak_vs_first"] = rows[-1]["peak_GiB"] / rows[0]["peak_GiB"]
            report.long_context.append(rows[-1])
            log(f"long T={T} chunk={chunk}: peak {rows[-1]['peak_GiB']:.2f} GiB in {rows[-1]['prefill_s']:.2f}s")
