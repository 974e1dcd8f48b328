"""Small helpers shared by every backend of the recurrence."""
from __future__ import annotations

import torch


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum x^2 + eps) over the last axis, in fp32 (or fp64) like the official kernels."""
    xf = x.double() if x.dtype == torch.float64 else x.float()
    return (xf * torch.rsqrt((xf * xf).sum(-1, keepdim=True) + eps)).to(x.dtype)


def expand_heads(x: torch.Tensor, num_v_heads: int, dim: int = 2) -> torch.Tensor:
    """Repeat key-head tensor x (heads on axis `dim`, e.g. [B, T, H, d]) onto the value heads: value head hv reads
    key head hv // (HV/H)."""
    H = x.shape[dim]
    if H == num_v_heads:
        return x
    if num_v_heads % H:
        raise ValueError(f"value heads ({num_v_heads}) must be a multiple of key heads ({H})")
    return x.repeat_interleave(num_v_heads // H, dim=dim)


# The layers of one forward pass share one cu_seqlens tensor: (that tensor, its _version, what was derived from it).
_PACKING: list = [None]


def packing_memo(cu_seqlens: torch.Tensor) -> dict:
    """A dict for values derived from `cu_seqlens` (host offsets, chunk layout, token -> sequence ids), kept while
    it is the last packing seen and unchanged: the layers of a forward pass derive them once, not once each, and a
    read-back of cu_seqlens (which makes the host wait for every queued kernel) happens at most once per pass."""
    last = _PACKING[0]
    if last is None or last[0] is not cu_seqlens or last[1] != cu_seqlens._version:
        last = _PACKING[0] = (cu_seqlens, cu_seqlens._version, {})
    return last[2]


def sequence_bounds(B: int, T: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """(batch row, start, end) of every sequence: the rows of a dense batch, or the packed segments of row 0."""
    if cu_seqlens is None:
        return [(row, 0, T) for row in range(B)]
    if B != 1:
        raise ValueError(f"cu_seqlens needs packed inputs with batch size 1, got B={B}")
    cu = [int(c) for c in cu_seqlens.tolist()]
    if cu[0] != 0 or cu[-1] != T or any(a > b for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to T={T}, got {cu}")
    return [(0, a, b) for a, b in zip(cu, cu[1:])]


def check_inputs(q, k, v, g, b, w, initial_state, cu_seqlens) -> None:
    """Shape contract of gated_delta_rule2; errors show what was expected and what came."""
    B, T, H, dk = q.shape
    HV, dv = v.shape[2], v.shape[3]
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:2] != (B, T) or HV % H:
        raise ValueError(f"v must be [B={B}, T={T}, HV (multiple of H={H}), dv], got {tuple(v.shape)}")
    if w.shape != v.shape:
        raise ValueError(f"w must have v's shape {tuple(v.shape)}, got {tuple(w.shape)}")
    for name, x in (("g", g), ("b", b)):
        if x.shape[:2] != (B, T) or x.shape[2] not in (H, HV) or x.shape[3] != dk:
            raise ValueError(f"{name} must be [B={B}, T={T}, H={H} or HV={HV}, dk={dk}], got {tuple(x.shape)}")
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    if initial_state is not None and tuple(initial_state.shape) != (N, HV, dk, dv):
        raise ValueError(f"initial_state must be [N={N}, HV={HV}, dk={dk}, dv={dv}], got {tuple(initial_state.shape)}")
