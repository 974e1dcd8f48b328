"""Device rates (copy bandwidth, matmul FLOP/s), memory counters, and the one prefill call every section makes."""
from __future__ import annotations

import datetime
import gc
import platform
import time

import torch


def is_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def sync(device: str) -> None:
    if is_cuda(device):
        torch.cuda.synchronize()


def gib(nbytes: float) -> float:
    return nbytes / 2**30


def peak_reset(device: str) -> int:
    """Reset the peak counter; returns the bytes allocated now (0 on the CPU, which has no counter)."""
    if not is_cuda(device):
        return 0
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def working_peak(device: str, base: int) -> int | None:
    """Bytes allocated at the peak since peak_reset, beyond the `base` it returned (None on the CPU)."""
    return torch.cuda.max_memory_allocated() - base if is_cuda(device) else None


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _best_seconds(fn, device: str, reps: int) -> float:
    fn()  # warm up (cuBLAS heuristics, allocator)
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def copy_bandwidth(device: str) -> float:
    """Copy bandwidth in bytes/s (read + write) of one large copy on `device` (1 GiB on CUDA)."""
    n = 1 << 29 if is_cuda(device) else 1 << 24
    x = torch.randn(n, device=device, dtype=torch.bfloat16 if is_cuda(device) else torch.float32)
    y = torch.empty_like(x)
    seconds = _best_seconds(lambda: y.copy_(x), device, reps=10)
    return 2 * x.numel() * x.element_size() / seconds


def matmul_rate(device: str, dtype: torch.dtype) -> float:
    """Dense matmul FLOP/s in `dtype` on `device`: the best of ten [8192 x 8192] @ [8192 x 8192] products on CUDA
    (1024 on the CPU), under the fp32 precision torch is set to (tf32 or exact)."""
    n = 8192 if is_cuda(device) else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    seconds = _best_seconds(lambda: torch.mm(a, b, out=out), device, reps=10)
    return 2 * n**3 / seconds


def prefill_last(model, tokens: torch.Tensor, chunk_tokens: int, backend: str = "auto"):
    """model.prefill(tokens, logits="last") in passes of `chunk_tokens` columns: (last logits [B, V], state).

    The benchmark's only prefill call (decode's prompt, the long-prompt section); `backend` as GDN2LM's default.
    """
    return model.prefill(tokens, logits="last", backend=backend, chunk_tokens=chunk_tokens)


def version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:
        return None
    return str(getattr(mod, "__version__", "unknown"))


def environment(device: str, bw: float, matmul: float) -> dict:
    name = torch.cuda.get_device_name(0) if is_cuda(device) else f"CPU {platform.machine()}"
    return dict(device=name, torch=torch.__version__, triton=version("triton"), lm_eval=version("lm_eval"),
                fla=version("fla"), transformers=version("transformers"), python=platform.python_version(),
                copy_TBps=bw / 1e12, matmul_TFLOPs=matmul / 1e12,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def csv_ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of integers (e.g. 1,8,64)") from None
