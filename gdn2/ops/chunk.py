"""Triton chunked prefill for the gated delta rule-2: forward only, two fused kernels.

Pass 1 (`_intra_chunk_kernel`, one program per chunk of 64 tokens and value head, all in parallel) solves each
chunk on its own in registers, in four sub-blocks of 16 rows, and writes what the state pass needs:
    Y  = A (e^G b k)            U  = A (w v)                        A = (I + T)^-1
    Qs = e^G q - Aqk Y          Oi = Aqk U                          Kt = e^(G_C - G) k,   gC = G_C
so that with the chunk's start state S the chunk's output and end state are (Eqs. 22-24 rearranged)
    O = Qs S + Oi               S' = Diag(e^gC) S + Kt^T (U - Y S).
Pass 2 (`_state_pass_kernel`, one program per sequence, value head and dv block) walks the chunks in order with S
in registers: three small matrix products per chunk and no per-chunk state ever written to memory.

Decay ratios are exponentials of sums of non-positive pieces (per sub-block local cumulative sums, sub-block totals
and the first row of the later sub-block as reference point), so every factor is <= 1 and strong decays
(g near -20 per token) stay finite and accurate. Intermediates are bf16 for bf16 inputs and fp32 otherwise; the
state and every accumulator are fp32.
"""
from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from gdn2.ops.chunk_torch import chunk_gdn2_torch
from gdn2.ops.triton_utils import (
    MAX_HEAD_DIM, block_size, check_device, fp32_dot_precision, head_groups, interpreting,
)

CHUNK = 64  # tokens per chunk: four sub-blocks of 16 rows
# Launch settings, tuned on an H200 at H=16, dk=dv=128 (evals/bench_kernels.py); a dict so a sweep can override them.
# diag_dc: key channels per step of the all-pairs diagonal-block product (0: a loop over the 16 rows instead).
# inv_poly: invert the 16x16 diagonal blocks by nilpotent products (else forward substitution row by row).
LAUNCH = dict(intra_warps=8, diag_dc=16, inv_poly=True, state_bv=64, state_warps=8, state_stages=2)

__all__ = ["chunk_gdn2_triton"]


@triton.jit
def _load_block(q, k, v, g, b, w, tok, rmask, hk, hg, hb, hv, scale,
                H, HV, HG, HB,
                DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_L2NORM: tl.constexpr):
    """One 16-row sub-block of inputs in fp32: scaled q, k, b*k, the local cumulative log-decay, w*v, and the
    per-row factors that normalised q (with the scale) and k."""
    ck = tl.arange(0, BK)
    cv = tl.arange(0, BV)
    mk = rmask[:, None] & (ck < DK)[None, :]
    mv = rmask[:, None] & (cv < DV)[None, :]
    kk = tl.load(k + (tok * H + hk)[:, None] * DK + ck[None, :], mask=mk, other=0.0).to(tl.float32)
    qq = tl.load(q + (tok * H + hk)[:, None] * DK + ck[None, :], mask=mk, other=0.0).to(tl.float32)
    gg = tl.load(g + (tok * HG + hg)[:, None] * DK + ck[None, :], mask=mk, other=0.0).to(tl.float32)
    bb = tl.load(b + (tok * HB + hb)[:, None] * DK + ck[None, :], mask=mk, other=0.0).to(tl.float32)
    vv = tl.load(v + (tok * HV + hv)[:, None] * DV + cv[None, :], mask=mv, other=0.0).to(tl.float32)
    ww = tl.load(w + (tok * HV + hv)[:, None] * DV + cv[None, :], mask=mv, other=0.0).to(tl.float32)
    if USE_L2NORM:
        nk = tl.rsqrt(tl.sum(kk * kk, 1) + 1e-6)
        nq = tl.rsqrt(tl.sum(qq * qq, 1) + 1e-6) * scale
    else:
        nk = tl.full([tok.shape[0]], 1.0, tl.float32)
        nq = tl.full([tok.shape[0]], 1.0, tl.float32) * scale
    kk = kk * nk[:, None]
    return qq * nq[:, None], kk, bb * kk, tl.cumsum(gg, 0), vv * ww, nq, nk


@triton.jit
def _diag_block_3d(q, k, g, b, tok, rmask, hk, hg, hb, nq, nk, H, HG, HB,
                   DK: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, DC: tl.constexpr):
    """Same as _diag_block, all 16 x 16 pairs at once over DC key channels at a time (inputs re-read from cache)."""
    Tm = tl.zeros([BC, BC], dtype=tl.float32)
    Am = tl.zeros([BC, BC], dtype=tl.float32)
    for c0 in range(0, BK, DC):
        cc = c0 + tl.arange(0, DC)
        mk = rmask[:, None] & (cc < DK)[None, :]
        kc = tl.load(k + (tok * H + hk)[:, None] * DK + cc[None, :], mask=mk, other=0.0).to(tl.float32)
        qc = tl.load(q + (tok * H + hk)[:, None] * DK + cc[None, :], mask=mk, other=0.0).to(tl.float32)
        gc = tl.load(g + (tok * HG + hg)[:, None] * DK + cc[None, :], mask=mk, other=0.0).to(tl.float32)
        bc = tl.load(b + (tok * HB + hb)[:, None] * DK + cc[None, :], mask=mk, other=0.0).to(tl.float32)
        Gc = tl.cumsum(gc, 0)
        # [r, s, channel]: k_s decayed to row r; pairs r < s are clamped here and masked below
        ks = kc[None, :, :] * tl.exp(tl.minimum(Gc[:, None, :] - Gc[None, :, :], 0.0))
        Tm += tl.sum((bc * kc)[:, None, :] * ks, 2)
        Am += tl.sum(qc[:, None, :] * ks, 2)
    rows = tl.arange(0, BC)
    Tm = tl.where(rows[:, None] > rows[None, :], Tm * nk[:, None] * nk[None, :], 0.0)
    Am = tl.where(rows[:, None] >= rows[None, :], Am * nq[:, None] * nk[None, :], 0.0)
    return Tm, Am


@triton.jit
def _row(x, i, BC: tl.constexpr):
    """Row i of a [BC, N] tile as an [N] vector."""
    return tl.sum(tl.where(tl.arange(0, BC)[:, None] == i, x, 0.0), 0)


@triton.jit
def _prep_block(qq, kk, bk, G, BC: tl.constexpr):
    """Reference-point factors of a sub-block: its first-row and total log-decay, decayed rows for the pairs."""
    first = _row(G, 0, BC)
    total = _row(G, BC - 1, BC)
    to_first = tl.exp(G - first[None, :])  # <= 1: rows decayed back to the sub-block's first row
    k_to_end = kk * tl.exp(tl.minimum(total[None, :] - G, 0.0))  # <= 1: keys decayed to the sub-block's end
    return first, total, bk * to_first, qq * to_first, k_to_end


@triton.jit
def _diag_block(qq, kk, bk, G, BC: tl.constexpr):
    """Exact pairwise decays inside one sub-block: strictly lower T and causal (incl. diagonal) Aqk."""
    rows = tl.arange(0, BC)
    Tm = tl.zeros([BC, BC], dtype=tl.float32)
    Am = tl.zeros([BC, BC], dtype=tl.float32)
    for j in range(BC):
        kj = _row(kk, j, BC)
        Gj = _row(G, j, BC)
        # rows r >= j decay by exp(G_r - G_j) <= 1; rows before j are masked out below
        kd = kj[None, :] * tl.exp(tl.minimum(G - Gj[None, :], 0.0))
        col = rows[None, :] == j
        Tm = tl.where(col & (rows[:, None] > j), tl.sum(bk * kd, 1)[:, None], Tm)
        Am = tl.where(col & (rows[:, None] >= j), tl.sum(qq * kd, 1)[:, None], Am)
    return Tm, Am


@triton.jit
def _unit_lower_inverse(Tm, BC: tl.constexpr):
    """(I + Tm)^-1 for strictly lower Tm by forward substitution, one row at a time."""
    rows = tl.arange(0, BC)
    eye = (rows[:, None] == rows[None, :]).to(tl.float32)
    A = eye
    for i in range(1, BC):
        ti = _row(Tm, i, BC)
        new = -tl.sum(ti[:, None] * A, 0)
        A = tl.where(rows[:, None] == i, eye + new[None, :], A)
    return A


@triton.jit
def _unit_lower_inverse_poly(Tm, BC: tl.constexpr):
    """(I + Tm)^-1 without a row loop: with D the 4x4 diagonal blocks of Tm and F the rest, both nilpotent of
    index 4, (I + Tm)^-1 = (I - N + N^2 - N^3) (I - D + D^2 - D^3) where N = (I + D)^-1 F. Six 16x16 products."""
    rows = tl.arange(0, BC)
    eye = (rows[:, None] == rows[None, :]).to(tl.float32)
    D = tl.where((rows // 4)[:, None] == (rows // 4)[None, :], Tm, 0.0)
    D2 = tl.dot(D, D, input_precision="ieee")
    Dinv = eye - D + D2 - tl.dot(D2, D, input_precision="ieee")
    N = tl.dot(Dinv, Tm - D, input_precision="ieee")
    N2 = tl.dot(N, N, input_precision="ieee")
    return tl.dot(eye - N + N2 - tl.dot(N2, N, input_precision="ieee"), Dinv, input_precision="ieee")


@triton.jit
def _pair(E, Qe, k_to_end, lift, PREC: tl.constexpr):
    """T and Aqk blocks between a later sub-block (E, Qe) and an earlier one; `lift` <= 0 bridges the gap."""
    Kr = k_to_end * tl.exp(lift)[None, :]
    return (tl.dot(E, tl.trans(Kr), input_precision=PREC),
            tl.dot(Qe, tl.trans(Kr), input_precision=PREC))


@triton.jit
def _solve_block(Tm, rhs_e, rhs_z, PREC: tl.constexpr, BC: tl.constexpr, INV_POLY: tl.constexpr):
    if INV_POLY:
        Ainv = _unit_lower_inverse_poly(Tm, BC)
    else:
        Ainv = _unit_lower_inverse(Tm, BC)
    return tl.dot(Ainv, rhs_e, input_precision=PREC), tl.dot(Ainv, rhs_z, input_precision=PREC)


@triton.jit
def _store_rows(ptr, x, tok, rmask, hv, TT, D: tl.constexpr, BD: tl.constexpr):
    """Store a [BC, BD] tile into a head-major [HV, TT, D] intermediate."""
    c = tl.arange(0, BD)
    tl.store(ptr + (hv * TT + tok)[:, None] * D + c[None, :], x.to(ptr.dtype.element_ty),
             mask=rmask[:, None] & (c < D)[None, :])


@triton.jit
def _load_rows(ptr, tok, rmask, hv, TT, D: tl.constexpr, BD: tl.constexpr):
    """Load back, in fp32, a [BC, BD] tile this program stored earlier (after a barrier)."""
    c = tl.arange(0, BD)
    return tl.load(ptr + (hv * TT + tok)[:, None] * D + c[None, :], mask=rmask[:, None] & (c < D)[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _intra_chunk_kernel(
    q, k, v, g, b, w, Qs, Y, Kt, U, Oi, gC, cu_seqlens, chunk_indices, scale, T, TT,
    H, HV, HG, HB,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, USE_L2NORM: tl.constexpr, PREC: tl.constexpr, DIAG_DC: tl.constexpr,
    INV_POLY: tl.constexpr,
):
    # Sub-blocks run in a loop (not unrolled) and earlier sub-blocks' Y, U, keys and log-decay totals are read back
    # from where they were stored (cache hits), so registers hold one sub-block at a time. Kt first holds keys
    # decayed to their own sub-block's end; they are rescaled to the chunk's end at the close.
    BC: tl.constexpr = 16
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1)
    hv = i_bh % HV
    if IS_VARLEN:
        n = tl.load(chunk_indices + 2 * i_c)
        i_t = tl.load(chunk_indices + 2 * i_c + 1)
        bos = tl.load(cu_seqlens + n).to(tl.int32)
        L = tl.load(cu_seqlens + n + 1).to(tl.int32) - bos
        chunk_id = i_c
    else:
        bos = (i_bh // HV) * T
        L = T
        i_t = i_c
        chunk_id = (i_bh // HV) * tl.num_programs(0) + i_c
    hk = hv // (HV // H)
    hg = hv // (HV // HG)
    hb = hv // (HV // HB)
    r = i_t * 64 + tl.arange(0, BC)
    ck = tl.arange(0, BK)
    dec = gC + (chunk_id * HV + hv) * 5 * DK + ck  # slots 0-3: sub-block totals, slot 4: chunk total
    prefix = tl.zeros([BK], dtype=tl.float32)  # log-decay from the chunk's start to this sub-block's start

    for i in range(4):
        m = r + i * BC < L
        t = bos + r + i * BC
        qi, ki, bki, Gi, zi, nq, nk = _load_block(q, k, v, g, b, w, t, m, hk, hg, hb, hv, scale,
                                                  H, HV, HG, HB, DK, DV, BK, BV, USE_L2NORM)
        if DIAG_DC > 0:
            Tii, Aii = _diag_block_3d(q, k, g, b, t, m, hk, hg, hb, nq, nk, H, HG, HB, DK, BK, BC, DIAG_DC)
        else:
            Tii, Aii = _diag_block(qi, ki, bki, Gi, BC)
        first, total, E, Qe, Ki = _prep_block(qi, ki, bki, Gi, BC)
        _store_rows(Kt, Ki, t, m, hv, TT, DK, BK)
        tl.store(dec + i * DK, total, mask=ck < DK)
        eG = tl.exp(prefix[None, :] + Gi)
        rhs_e = bki * eG
        rhs_z = zi
        acc_q = tl.zeros([BC, BK], dtype=tl.float32)
        acc_o = tl.zeros([BC, BV], dtype=tl.float32)
        lift = first  # log-decay from the end of sub-block j to the first row of sub-block i, all pieces <= 0
        for jj in range(i):
            j = i - 1 - jj
            mj = r + j * BC < L
            tj = bos + r + j * BC
            Tij, Aij = _pair(E, Qe, _load_rows(Kt, tj, mj, hv, TT, DK, BK), lift, PREC)
            Yj = _load_rows(Y, tj, mj, hv, TT, DK, BK)
            Uj = _load_rows(U, tj, mj, hv, TT, DV, BV)
            rhs_e -= tl.dot(Tij, Yj, input_precision=PREC)
            rhs_z -= tl.dot(Tij, Uj, input_precision=PREC)
            acc_q += tl.dot(Aij, Yj, input_precision=PREC)
            acc_o += tl.dot(Aij, Uj, input_precision=PREC)
            lift += tl.load(dec + j * DK, mask=ck < DK, other=0.0)
        Yi, Ui = _solve_block(Tii, rhs_e, rhs_z, PREC, BC, INV_POLY)
        _store_rows(Y, Yi, t, m, hv, TT, DK, BK)
        _store_rows(U, Ui, t, m, hv, TT, DV, BV)
        _store_rows(Qs, qi * eG - acc_q - tl.dot(Aii, Yi, input_precision=PREC), t, m, hv, TT, DK, BK)
        _store_rows(Oi, acc_o + tl.dot(Aii, Ui, input_precision=PREC), t, m, hv, TT, DV, BV)
        prefix += total
        tl.debug_barrier()

    # keys decayed to the chunk's end: sub-block j's by the totals of the sub-blocks after it
    suffix = tl.load(dec + 3 * DK, mask=ck < DK, other=0.0)
    for jj in range(3):
        j = 2 - jj
        mj = r + j * BC < L
        tj = bos + r + j * BC
        _store_rows(Kt, _load_rows(Kt, tj, mj, hv, TT, DK, BK) * tl.exp(suffix)[None, :], tj, mj, hv, TT, DK, BK)
        suffix += tl.load(dec + j * DK, mask=ck < DK, other=0.0)
    tl.store(dec + 4 * DK, prefix, mask=ck < DK)


@triton.jit
def _state_pass_kernel(
    Qs, Y, Kt, U, Oi, gC, o, h0, ht, cu_seqlens, chunk_offsets, T, TT,
    HV, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, PREC: tl.constexpr,
):
    i_v = tl.program_id(0)
    hv = tl.program_id(1)
    n = tl.program_id(2)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + n).to(tl.int32)
        L = tl.load(cu_seqlens + n + 1).to(tl.int32) - bos
        c0 = tl.load(chunk_offsets + n).to(tl.int32)
    else:
        bos = n * T
        L = T
        c0 = n * tl.cdiv(T, 64)
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    mk = ck < DK
    mv = cv < DV
    s_off = ((n * HV + hv) * DK + ck)[:, None] * DV + cv[None, :]
    s_mask = mk[:, None] & mv[None, :]
    if HAS_H0:
        S = tl.load(h0 + s_off, mask=s_mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    rows = tl.arange(0, 64)
    for i in range(tl.cdiv(L, 64)):
        rm = i * 64 + rows < L
        tok = bos + i * 64 + rows
        base = hv * TT + tok
        pk = base[:, None] * DK + ck[None, :]
        pv = base[:, None] * DV + cv[None, :]
        mrk = rm[:, None] & mk[None, :]
        mrv = rm[:, None] & mv[None, :]
        qs = tl.load(Qs + pk, mask=mrk, other=0.0)
        y = tl.load(Y + pk, mask=mrk, other=0.0)
        kt = tl.load(Kt + pk, mask=mrk, other=0.0)
        u = tl.load(U + pv, mask=mrv, other=0.0).to(tl.float32)
        oi = tl.load(Oi + pv, mask=mrv, other=0.0).to(tl.float32)
        decay = tl.exp(tl.load(gC + (((c0 + i) * HV + hv) * 5 + 4) * DK + ck, mask=mk, other=0.0))
        Sd = S.to(qs.dtype)
        out = oi + tl.dot(qs, Sd, input_precision=PREC)
        tl.store(o + (tok * HV + hv)[:, None] * DV + cv[None, :], out.to(o.dtype.element_ty), mask=mrv)
        R = u - tl.dot(y, Sd, input_precision=PREC)
        S = S * decay[:, None] + tl.dot(tl.trans(kt), R.to(kt.dtype), input_precision=PREC)
    if STORE_HT:
        tl.store(ht + s_off, S, mask=s_mask)


def _chunk_layout(cu_seqlens: torch.Tensor | None, B: int, T: int, device) -> tuple[int, torch.Tensor | None,
                                                                                    torch.Tensor | None]:
    """Number of chunks and, for packed sequences, (sequence, chunk) per chunk and each sequence's first chunk."""
    if cu_seqlens is None:
        return triton.cdiv(T, CHUNK), None, None
    if B != 1:
        raise ValueError(f"cu_seqlens needs packed inputs with batch size 1, got B={B}")
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()  # one host sync per prefill, none per token
    if any(L < 0 for L in lengths) or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T:
        raise ValueError(f"cu_seqlens must rise from 0 to T={T}, got {cu_seqlens.tolist()}")
    counts = [triton.cdiv(L, CHUNK) for L in lengths]
    offsets = [0]
    pairs = []
    for n, c in enumerate(counts):
        offsets.append(offsets[-1] + c)
        pairs.extend((n, i) for i in range(c))
    chunk_indices = torch.tensor(pairs or [(0, 0)], dtype=torch.int32).to(device, non_blocking=True)
    chunk_offsets = torch.tensor(offsets, dtype=torch.int32).to(device, non_blocking=True)
    return len(pairs), chunk_indices, chunk_offsets


def chunk_gdn2_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as `gdn2.ops.gated_delta_rule2` (see its docstring); CUDA tensors, head dims up to 128.

    Head dims above 128 fall back to the exact torch backend with a warning.
    """
    B, T, H, DK = q.shape
    HV, DV = v.shape[2], v.shape[3]
    check_device(q)
    if DK > MAX_HEAD_DIM or DV > MAX_HEAD_DIM:
        warnings.warn(f"Triton chunk kernel holds head dims up to {MAX_HEAD_DIM} (got dk={DK}, dv={DV}); "
                      "using the torch backend", stacklevel=2)
        return chunk_gdn2_torch(q, k, v, g, b, w, scale, initial_state, output_final_state, cu_seqlens,
                                use_qk_l2norm)
    HG = HV // head_groups(H, HV, "g", g.shape[2])
    HB = HV // head_groups(H, HV, "b", b.shape[2])
    scale = DK**-0.5 if scale is None else scale
    q, k, v, b, w = (x.contiguous() for x in (q, k, v, b, w))
    g = g.float().contiguous()
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    NC, chunk_indices, chunk_offsets = _chunk_layout(cu_seqlens, B, T, q.device)

    exact = v.dtype == torch.float32
    inter = torch.bfloat16 if v.dtype == torch.bfloat16 and not interpreting() else torch.float32
    prec = fp32_dot_precision(v.dtype) if exact else "tf32"
    BK, BV = block_size(DK), block_size(DV)
    TT = B * T
    dev = q.device
    Qs, Y, Kt = (torch.empty(HV, TT, DK, dtype=inter, device=dev) for _ in range(3))
    U, Oi = (torch.empty(HV, TT, DV, dtype=inter, device=dev) for _ in range(2))
    gC = torch.empty(max(1, NC * (B if cu_seqlens is None else 1)), HV, 5, DK, dtype=torch.float32, device=dev)
    o = torch.empty(B, T, HV, DV, dtype=v.dtype, device=dev)
    ht = torch.empty(N, HV, DK, DV, dtype=torch.float32, device=dev) if output_final_state else None
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    if TT > 0 and NC > 0:
        grid1 = (NC, B * HV) if cu_seqlens is None else (NC, HV)
        _intra_chunk_kernel[grid1](
            q, k, v, g, b, w, Qs, Y, Kt, U, Oi, gC, cu_seqlens, chunk_indices, scale, T, TT,
            H=H, HV=HV, HG=HG, HB=HB, DK=DK, DV=DV, BK=BK, BV=BV,
            IS_VARLEN=cu_seqlens is not None, USE_L2NORM=use_qk_l2norm, PREC=prec,
            DIAG_DC=min(LAUNCH["diag_dc"], BK), INV_POLY=LAUNCH["inv_poly"], num_warps=LAUNCH["intra_warps"] if BK * BV > 64 * 64 else 4,
        )
    BVS = min(BV, LAUNCH["state_bv"])
    grid2 = (triton.cdiv(DV, BVS), HV, N)
    if N > 0:
        _state_pass_kernel[grid2](
            Qs, Y, Kt, U, Oi, gC, o, h0, ht, cu_seqlens, chunk_offsets, T, TT,
            HV=HV, DK=DK, DV=DV, BK=BK, BV=BVS,
            IS_VARLEN=cu_seqlens is not None, HAS_H0=h0 is not None, STORE_HT=output_final_state,
            PREC=prec, num_warps=LAUNCH["state_warps"], num_stages=LAUNCH["state_stages"],
        )
    return o, ht
