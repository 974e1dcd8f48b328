"""Triton decode step for the gated delta rule-2: one token per sequence, the fp32 state updated in place.

Each program owns a [dk, BV] slice of one sequence's state for one value head: it reads the slice once, decays,
erases, writes, reads the output out of it and stores it back. The step is bandwidth-bound on the state (8 bytes
per state element per token), so the kernel does nothing else: no allocations besides the output, no host syncs,
fixed addresses, which makes it capturable in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gdn2.ops.triton_utils import block_size, check_device, head_groups

MAX_KEY_DIM = 256  # the whole key axis of a state slice sits in registers
# Launch settings (state columns per program for large / small batches, warps); a dict so a sweep can override.
LAUNCH = dict(bv_large=64, bv_small=32, warps=4)

__all__ = ["fused_recurrent_step_triton"]


@triton.jit
def _decode_step_kernel(
    q, k, v, g, b, w, S, o, scale,
    H, HV, HG, HB, sq, sk, sv,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_L2NORM: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // HV
    hv = i_bh % HV
    hk = hv // (HV // H)
    hg = hv // (HV // HG)
    hb = hv // (HV // HB)
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    mk = ck < DK
    mv = cv < DV
    s_off = (i_bh * DK + ck)[:, None] * DV + cv[None, :]
    s_mask = mk[:, None] & mv[None, :]
    state = tl.load(S + s_off, mask=s_mask, other=0.0)  # issued first: it is the only large read
    kk = tl.load(k + i_b * sk + hk * DK + ck, mask=mk, other=0.0).to(tl.float32)
    qq = tl.load(q + i_b * sq + hk * DK + ck, mask=mk, other=0.0).to(tl.float32)
    gg = tl.load(g + (i_b * HG + hg) * DK + ck, mask=mk, other=0.0).to(tl.float32)
    bb = tl.load(b + (i_b * HB + hb) * DK + ck, mask=mk, other=0.0).to(tl.float32)
    vv = tl.load(v + i_b * sv + hv * DV + cv, mask=mv, other=0.0).to(tl.float32)
    ww = tl.load(w + i_bh * DV + cv, mask=mv, other=0.0).to(tl.float32)
    if USE_L2NORM:
        kk = kk * tl.rsqrt(tl.sum(kk * kk) + 1e-6)
        qq = qq * tl.rsqrt(tl.sum(qq * qq) + 1e-6)
    state = state * tl.exp(gg)[:, None]
    erase = tl.sum((bb * kk)[:, None] * state, 0)
    state = state + kk[:, None] * (ww * vv - erase)[None, :]
    out = tl.sum((qq * scale)[:, None] * state, 0)
    tl.store(S + s_off, state, mask=s_mask)
    tl.store(o + i_bh * DV + cv, out.to(o.dtype.element_ty), mask=mv)


def _value_block(batch_heads: int, dv: int) -> int:
    """Columns of state per program: narrow slices when there are few sequences, so every SM gets work."""
    if batch_heads * triton.cdiv(dv, 32) >= 1024:
        return min(block_size(dv), LAUNCH["bv_large"])
    return min(block_size(dv), LAUNCH["bv_small"])


def fused_recurrent_step_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    state: torch.Tensor,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token of the recurrence for B sequences; `state` [B, HV, dk, dv] fp32 (contiguous) is updated in place.

    Args:
        q, k: [B, H, dk]; g, b: [B, H or HV, dk] (g fp32 log-decay); v, w: [B, HV, dv]. g, b and w are
            contiguous; q, k and v may have strided rows (slices of one packed tensor), their heads contiguous.
        scale: query scale, default dk ** -0.5.
        use_qk_l2norm: L2-normalise q and k (eps 1e-6) in the kernel.
        out: optional preallocated [B, HV, dv] output (v's dtype), for CUDA graphs.

    Returns:
        o: [B, HV, dv] in v's dtype.
    """
    B, H, DK = q.shape
    HV, DV = v.shape[1], v.shape[2]
    check_device(q)
    if DK > MAX_KEY_DIM:
        raise ValueError(f"the Triton decode step holds dk up to {MAX_KEY_DIM} (got {DK}): use backend='torch'")
    if state.shape != (B, HV, DK, DV) or state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"state must be a contiguous fp32 [B={B}, HV={HV}, dk={DK}, dv={DV}] tensor, got "
                         f"{state.dtype} {tuple(state.shape)}")
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("b", b), ("w", w)):
        if not (x.is_contiguous() or (name in "qkv" and x[0].is_contiguous())):
            raise ValueError(f"{name} must be contiguous for the decode step (call .contiguous() first)")
    HG = HV // head_groups(H, HV, "g", g.shape[1])
    HB = HV // head_groups(H, HV, "b", b.shape[1])
    if out is None:
        out = torch.empty(B, HV, DV, dtype=v.dtype, device=v.device)
    BV = _value_block(B * HV, DV)
    _decode_step_kernel[(triton.cdiv(DV, BV), B * HV)](
        q, k, v, g, b, w, state, out, DK**-0.5 if scale is None else scale,
        H=H, HV=HV, HG=HG, HB=HB, sq=q.stride(0), sk=k.stride(0), sv=v.stride(0),
        DK=DK, DV=DV, BK=block_size(DK), BV=BV, USE_L2NORM=use_qk_l2norm,
        num_warps=LAUNCH["warps"] if BV * block_size(DK) >= 4096 else 2,
    )
    return out
