"""The gated delta rule-2 recurrence: one entry point, several backends.

    naive       token loop (naive.py): the executable spec, any dtype including float64
    torch       chunkwise torch (chunk_torch.py): exact, vectorised over chunks, runs anywhere
    triton      chunked prefill and fused decode kernels (chunk.py, recurrent.py): CUDA only
    auto        triton on CUDA when it is importable, torch elsewhere

Sliding-window attention over a ring buffer (swa.py, swa_triton.py) has the same backends: naive (a loop over
sequences), torch (vectorised, exact), triton (fused kernels); see sliding_window_attention below.

The tied special cases (KDA, Gated DeltaNet, no-delta) are the same function with particular gates; the helpers
below build those gates so that every model family runs on the same kernels.
"""
from __future__ import annotations

import torch

from gdn2.ops.chunk_torch import chunk_gdn2_torch
from gdn2.ops.naive import naive_recurrent_gdn2
from gdn2.ops.swa import swa_prefill_naive, swa_prefill_torch, swa_step_torch, swa_write_torch
from gdn2.ops.utils import check_inputs, expand_heads, l2norm, packing_memo

__all__ = [
    "gated_delta_rule2",
    "gated_delta_rule2_step",
    "naive_recurrent_gdn2",
    "chunk_gdn2_torch",
    "kda",
    "gated_deltanet",
    "no_delta",
    "triton_available",
    "describe_packing",
    "l2norm",
    "sliding_window_attention",
    "sliding_window_write",
    "sliding_window_attention_step",
]

BACKENDS = ("auto", "naive", "torch", "triton")


def triton_available(device: torch.device | str | None = None) -> bool:
    """True when the Triton kernels can run for tensors on `device` (CUDA and an importable triton)."""
    if device is not None and torch.device(device).type != "cuda":
        return False
    if not torch.cuda.is_available():
        return False
    try:
        from gdn2.ops import chunk  # noqa: F401  (the kernels; absent on machines without triton)
    except ImportError:
        return False
    return True


def describe_packing(cu_seqlens: torch.Tensor, offsets: list[int]) -> None:
    """Hand the kernels the host-side values of a packed batch's cu_seqlens, so that they need not read them back
    from the device (a read-back makes the host wait for every queued kernel). Optional: without it they read."""
    packing_memo(cu_seqlens)["offsets"] = list(offsets)


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if triton_available(device) else "torch"
    return backend


def gated_delta_rule2(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule-2 over a batch of sequences.

    Args:
        q, k: [B, T, H, dk] queries and keys (H key heads).
        v, w: [B, T, HV, dv] values and write gates (HV value heads, a multiple of H; value head hv reads
            key head hv // (HV / H)).
        g: [B, T, H or HV, dk] fp32 log-decay (<= 0), channel-wise on the key axis.
        b: [B, T, H or HV, dk] erase gate (in [0, 1], or [0, 2] with negative eigenvalues).
        scale: query scale, default dk ** -0.5.
        initial_state: [N, HV, dk, dv] fp32 state to start from (N = B, or the number of packed sequences).
        output_final_state: also return the [N, HV, dk, dv] fp32 state after the last token.
        cu_seqlens: int [N + 1] offsets of sequences packed along T (then B must be 1); the state resets at
            each boundary.
        use_qk_l2norm: L2-normalise q and k per head (eps 1e-6) inside the op.
        backend: "auto", "naive", "torch" or "triton".

    Returns:
        o: [B, T, HV, dv] in v's dtype, and the final state (or None).

    Example:
        >>> o, S = gated_delta_rule2(q, k, v, g, b, w, output_final_state=True)
        >>> o2, _ = gated_delta_rule2(q2, k2, v2, g2, b2, w2, initial_state=S)  # continue the sequence
    """
    check_inputs(q, k, v, g, b, w, initial_state, cu_seqlens)
    kwargs = dict(
        scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm,
    )
    name = resolve_backend(backend, q.device)
    if name == "naive":
        return naive_recurrent_gdn2(q, k, v, g, b, w, **kwargs)
    if name == "torch":
        return chunk_gdn2_torch(q, k, v, g, b, w, **kwargs)
    from gdn2.ops.chunk import chunk_gdn2_triton

    return chunk_gdn2_triton(q, k, v, g, b, w, **kwargs)


def gated_delta_rule2_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    state: torch.Tensor,
    *,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """One decoding step for a batch of sequences, updating `state` [B, HV, dk, dv] (fp32) in place.

    q, k, g, b: [B, H or HV, dk]; v, w: [B, HV, dv]. Returns o: [B, HV, dv] in v's dtype.
    The Triton path keeps fixed addresses and no host syncs, so it can be captured in a CUDA graph.
    """
    name = resolve_backend(backend, q.device)
    if name == "triton":
        from gdn2.ops.recurrent import fused_recurrent_step_triton

        return fused_recurrent_step_triton(q, k, v, g, b, w, state, scale=scale, use_qk_l2norm=use_qk_l2norm)
    return _step_torch(q, k, v, g, b, w, state, scale, use_qk_l2norm)


def _step_torch(q, k, v, g, b, w, state, scale, use_qk_l2norm) -> torch.Tensor:
    """The token update of naive.py for a whole batch at once (Eq. 9), in the state's precision."""
    HV, dk = v.shape[1], q.shape[-1]
    scale = dk**-0.5 if scale is None else scale
    acc = state.dtype
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q, k, g, b = (expand_heads(x.to(acc), HV, dim=1) for x in (q, k, g, b))
    S = state * g.exp()[..., None]
    erase = torch.einsum("bhk,bhkv->bhv", b * k, S)
    S = S + k[..., None] * (w.to(acc) * v.to(acc) - erase)[..., None, :]
    state.copy_(S)
    return torch.einsum("bhk,bhkv->bhv", q * scale, S).to(v.dtype)


def kda(q, k, v, g, beta, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kimi Delta Attention: channel-wise decay, one scalar beta per head for erase and write.

    beta: [B, T, HV]. It is broadcast to b = beta * 1 (dk) and w = beta * 1 (dv).
    """
    b = beta[..., None].expand(*beta.shape, k.shape[-1])
    w = beta[..., None].expand(*beta.shape, v.shape[-1])
    return gated_delta_rule2(q, k, v, g, b.contiguous(), w.contiguous(), **kwargs)


def gated_deltanet(q, k, v, g_scalar, beta, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated DeltaNet: one scalar log-decay and one scalar beta per head. g_scalar, beta: [B, T, HV]."""
    g = g_scalar[..., None].expand(*g_scalar.shape, k.shape[-1]).contiguous()
    return kda(q, k, v, g, beta, **kwargs)


def no_delta(q, k, v, g, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention (no delta correction): b = 0, w = 1."""
    g = expand_heads(g, v.shape[2])
    b = torch.zeros_like(g, dtype=k.dtype)
    w = torch.ones_like(v)
    return gated_delta_rule2(q, k, v, g, b, w, **kwargs)


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos0: torch.Tensor,
    cu_seqlens: torch.Tensor,
    window: int,
    *,
    cache_rows: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal sliding-window attention of packed sequences that continue a ring buffer (gdn2/ops/swa.py).

    Args:
        q, k, v: [total, nh, hs] packed queries, keys, values (rotary embedding applied), sequences delimited by
            cu_seqlens [N + 1].
        k_cache, v_cache: [M, R, nh, hs] ring buffers, R = window - 1: the key of absolute position p in slot
            p % R. Read only. A shorter ring (R < window - 1) is valid while its rows have seen at most R tokens.
        pos0: [N] int64 absolute position of each sequence's first token (= tokens its ring row has seen).
        window: query p sees keys max(0, p - window + 1) .. p.
        cache_rows: [N] ring row of each sequence (several sequences may share one: continuations of one context
            read it by reference); None: row n.
        backend: "auto", "naive", "torch" or "triton".

    Returns:
        o: [total, nh, hs] in q's dtype.
    """
    name = resolve_backend(backend, q.device)
    args = (q, k, v, k_cache, v_cache, pos0, cu_seqlens, window, cache_rows, scale)
    if name == "naive":
        return swa_prefill_naive(*args)
    if name == "torch":
        return swa_prefill_torch(*args)
    from gdn2.ops.swa_triton import swa_prefill_triton

    return swa_prefill_triton(*args)


def sliding_window_write(k, v, k_cache, v_cache, pos0, cu_seqlens, *, backend: str = "auto") -> None:
    """Store each packed sequence's last min(L, window - 1) keys and values into ring rows 0..N-1 (in place)."""
    if resolve_backend(backend, k.device) == "triton":
        from gdn2.ops.swa_triton import swa_write_triton

        return swa_write_triton(k, v, k_cache, v_cache, pos0, cu_seqlens)
    return swa_write_torch(k, v, k_cache, v_cache, pos0, cu_seqlens)


def sliding_window_attention_step(q, k, v, k_cache, v_cache, pos, window: int, *, scale: float | None = None,
                                  backend: str = "auto") -> torch.Tensor:
    """One query per row (q, k, v [B, nh, hs], absolute positions pos [B]) over its ring row and itself; the new
    key and value are then written to slot pos % (window - 1) in place. Returns o [B, nh, hs] in q's dtype.
    The Triton path reads the ring in its storage dtype, without host syncs (capturable in a CUDA graph)."""
    if resolve_backend(backend, q.device) == "triton":
        from gdn2.ops.swa_triton import swa_step_triton

        return swa_step_triton(q, k, v, k_cache, v_cache, pos, window, scale)
    return swa_step_torch(q, k, v, k_cache, v_cache, pos, window, scale)
