"""The intra-chunk pass of the Triton prefill for 16-bit inputs whose chunk decays are mild: 64-row bf16 products.

Inside a chunk (64 rows, local cumulative log-decay G per key channel, G_C its last row) every pairwise decay ratio
exp(G_r - G_s) factorises around the anchor m = G_C / 2:

    E~ = b k e^(G - m)      Q~ = q e^(G - m)      K~ = k e^(m - G)          (every factor <= e^(R/2))
    T  = strict_lower(E~ K~^T)                    Aqk = lower(Q~ K~^T)

with R = max over channels of -G_C. While R <= MILD_RANGE (80) no factor passes e^40 and no masked product e^80,
far inside the range of bf16 and fp32, so T and Aqk are two 64 x 64 x dk products with bf16 operands and fp32
accumulation, like fla's. The rest is the exact kernel's algebra (chunk.py), also as 64-row products:

    A = (I + T)^-1 (fp32, tf32 dots)   Y = A (b k e^G)   U = A (w v)   Oi = Aqk U
    Qs = q e^G - Aqk Y (rounded once)  Kt = k e^(G_C - G)              gC = G_C

A chunk with R > MILD_RANGE (a decay of more than e^-80 across 64 tokens on some channel) is not computed here: its
program appends it to a worklist that the exact kernel then walks (chunk.py), so every input gets the exact result
for strong decays and the fast one for everything else. One program per chunk and value head, 4 warps (fewer
spills than 8 measured faster on an H200 at dk = dv = 128, despite 255 registers).
"""
from __future__ import annotations

import triton
import triton.language as tl

from gdn2.ops.chunk_tiles import load_in, locate_chunk, store_rows, unit_lower_inverse

MILD_RANGE = 80.0


@triton.jit
def _scaled_q(q, tok, rmask, hk, H, scale, DK: tl.constexpr, BK: tl.constexpr, USE_L2NORM: tl.constexpr):
    """Query rows, L2-normalised (eps 1e-6) when asked, times the query scale, in fp32."""
    qq = load_in(q, tok, rmask, hk, H, DK, BK)
    if USE_L2NORM:
        return qq * (tl.rsqrt(tl.sum(qq * qq, 1) + 1e-6) * scale)[:, None]
    return qq * scale


@triton.jit
def _mild_intra_chunk_kernel(
    q, k, v, g, b, w, Qs, Y, Kt, U, Oi, gC, work, work_count, cu_seqlens, chunk_indices, scale, T, TT,
    H, HV, HG, HB,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, USE_L2NORM: tl.constexpr, MILD: tl.constexpr, PREC: tl.constexpr,
):
    BT: tl.constexpr = 64
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1)
    hv = i_bh % HV
    bos, L, i_t, chunk_id = locate_chunk(i_c, i_bh, tl.num_programs(0), HV, T, cu_seqlens, chunk_indices,
                                         IS_VARLEN)
    hk = hv // (HV // H)
    hg = hv // (HV // HG)
    hb = hv // (HV // HB)
    rows = tl.arange(0, BT)
    rt = i_t * BT + rows
    mt = rt < L
    tt = bos + rt
    ck = tl.arange(0, BK)

    G = tl.cumsum(load_in(g, tt, mt, hg, HG, DK, BK), 0)  # rows past the end add 0: the last row is G_C
    GC = tl.sum(tl.where(rows[:, None] == BT - 1, G, 0.0), 0)
    tl.store(gC + ((chunk_id * HV + hv) * 5 + 4) * DK + ck, GC, mask=ck < DK)
    if tl.max(-GC, 0) > MILD:  # a strong decay: leave this chunk to the exact kernel
        slot = tl.atomic_add(work_count, 1)
        tl.store(work + 2 * slot, i_c)
        tl.store(work + 2 * slot + 1, i_bh)
        return
    m = 0.5 * GC
    em = tl.exp(m)

    kk = load_in(k, tt, mt, hk, H, DK, BK)
    if USE_L2NORM:
        kk = kk * tl.rsqrt(tl.sum(kk * kk, 1) + 1e-6)[:, None]
    store_rows(Kt, kk * tl.exp(GC[None, :] - G), tt, mt, hv, TT, DK, BK)
    # separate exponentials rather than ratios of one (an exp is cheaper than an fp32 division); G is dead after
    # this block and E lives on in bf16 only, which keeps the live tiles, and the spills, down
    Kn = (kk * tl.exp(m[None, :] - G)).to(Kt.dtype.element_ty)
    up = tl.exp(G - m[None, :])
    E = (load_in(b, tt, mt, hb, HB, DK, BK) * kk * up).to(Kn.dtype)
    qq = _scaled_q(q, tt, mt, hk, H, scale, DK, BK, USE_L2NORM) * up  # q e^(G - m)
    Tm = tl.where(rows[:, None] > rows[None, :], tl.dot(E, tl.trans(Kn)), 0.0)
    Aqk = tl.dot(qq.to(Kn.dtype), tl.trans(Kn))
    Aqk = tl.where(rows[:, None] >= rows[None, :], Aqk, 0.0).to(Kn.dtype)

    A = unit_lower_inverse(Tm, PREC, BT).to(Kn.dtype)
    Yc = tl.dot(A, (E.to(tl.float32) * em[None, :]).to(Kn.dtype))  # A (b k e^G)
    store_rows(Y, Yc, tt, mt, hv, TT, DK, BK)
    store_rows(Qs, qq * em[None, :] - tl.dot(Aqk, Yc.to(Kn.dtype)), tt, mt, hv, TT, DK, BK)  # rounded once, here
    vw = load_in(v, tt, mt, hv, HV, DV, BV) * load_in(w, tt, mt, hv, HV, DV, BV)
    Uc = tl.dot(A, vw.to(Kn.dtype))
    store_rows(U, Uc, tt, mt, hv, TT, DV, BV)
    store_rows(Oi, tl.dot(Aqk, Uc.to(Kn.dtype)), tt, mt, hv, TT, DV, BV)
