"""Triton chunked prefill for the gated delta rule-2: forward only, two kernels.

Pass 1 (`_intra_chunk_kernel`, one program per chunk of 64 tokens and value head, all in parallel) solves each
chunk on its own and writes what the state pass needs:
    Y  = A (e^G b k)            U  = A (w v)                        A = (I + T)^-1
    Qs = e^G q - Aqk Y          Oi = Aqk U                          Kt = e^(G_C - G) k,   gC = G_C
so that with the chunk's start state S the chunk's output and end state are (Eqs. 22-24 rearranged)
    O = Qs S + Oi               S' = Diag(e^gC) S + Kt^T (U - Y S).
It builds T and Aqk in 16 x 16 blocks (a loop over four sub-blocks of 16 rows) with decay ratios taken as
exponentials of sums of non-positive pieces (sub-block local cumulative sums, sub-block totals, the first row of the
later sub-block as reference point), so every factor is <= 1 and strong decays (g near -20 per token) stay finite
and accurate; inside a sub-block the pairs come from one small product when its decay is mild and channel by
channel otherwise. The blocks meet in a per-program scratch, (I + T) is inverted by nilpotent products at three
levels (4, 16, 64 rows) and the outputs are four 64-row matrix products.
Pass 2 (`_state_pass_kernel`, one program per sequence, value head and dv block) walks the chunks in order with S
in registers: three small matrix products per chunk and no per-chunk state written to memory.
Intermediates are bf16 for bf16 inputs and fp32 otherwise; the state and every accumulator are fp32.

Pass 1 has two kernels: `_intra_chunk_kernel` above (exact for any decay) and, for bf16 inputs (on GPUs at
dk = dv = 128), chunk_mild.py's `_mild_intra_chunk_kernel` (decay ratios anchored at half the chunk's total, two
64-row bf16 products) for every chunk whose total decay stays above e^-80; the other chunks reach the exact kernel
through a device-side worklist, so no host sync decides the split.

Speed (H200, 2026-12-03, evals/tools/bench_results/kernels_h200.txt, side by side with fla-core 0.6.0): 0.626 ms at
B8xT2048, H=16, dk=dv=128 (fla chunk_gdn2 1.029 ms, chunk_kda 1.349 ms), 0.43-0.65x chunk_gdn2 over the four
benchmark shapes; the exact kernel alone was 2.2x chunk_gdn2. Left: the mild kernel's register pressure (its
first version spilled at 4 warps) and, at batch 1, the state pass's serial walk over chunks (about 2.2 us each).
"""
from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from gdn2.ops.chunk_mild import MILD_RANGE, _mild_intra_chunk_kernel
from gdn2.ops.chunk_tiles import load_in, load_rows, locate_chunk, store_rows, unit_lower_inverse
from gdn2.ops.chunk_torch import chunk_gdn2_torch
from gdn2.ops.triton_utils import MAX_HEAD_DIM, block_size, check_device, fp32_dot_precision, head_groups, interpreting
from gdn2.ops.utils import packing_memo

CHUNK = 64  # tokens per chunk: four sub-blocks of 16 rows
# Launch settings, tuned on an H200 at H=16, dk=dv=128 (evals/bench_kernels.py); a dict so a sweep can override them.
# diag_dc: key channels per step of the exact (strong-decay) diagonal-block product.
# mild: 16-bit inputs take the bf16 mild-decay kernel (chunk_mild.py), strong chunks the exact one via a worklist.
# state_bv 0: chosen per call for about `state_programs` programs (_state_block); state_warps 0: 8 for [128, 128]
# state slices, else 4 (measured on an H200).
LAUNCH = dict(intra_warps=8, diag_dc=16, state_bv=0, state_warps=0, state_stages=3, state_programs=120,
              mild=True, mild_warps=4, mild_stages=1, worklist_programs=264, mild_head_dims=(128,))
# Largest log-decay across a 16-row sub-block for which its diagonal block comes from one product: the lifted keys
# carry factors up to e^20, whose rounding stays far below fp32 test tolerance; stronger decays go channel by channel.
SAFE_SUB_DECAY = 20.0

__all__ = ["chunk_gdn2_triton"]


@triton.jit
def _l2_factor(x, scale, USE_L2NORM: tl.constexpr):
    """Per-row factor that L2-normalises x (eps 1e-6) and applies `scale`."""
    if USE_L2NORM:
        return tl.rsqrt(tl.sum(x * x, 1) + 1e-6) * scale
    return tl.full([x.shape[0]], 1.0, tl.float32) * scale


@triton.jit
def _load_qkbg(q, k, g, b, tok, rmask, hk, hg, hb, scale, H, HG, HB,
               DK: tl.constexpr, BK: tl.constexpr, USE_L2NORM: tl.constexpr):
    """Rows of q (normalised and scaled), k (normalised), b and g in fp32, and the per-row normalising factors."""
    kk = load_in(k, tok, rmask, hk, H, DK, BK)
    qq = load_in(q, tok, rmask, hk, H, DK, BK)
    nk = _l2_factor(kk, 1.0, USE_L2NORM)
    nq = _l2_factor(qq, scale, USE_L2NORM)
    return (qq * nq[:, None], kk * nk[:, None], load_in(b, tok, rmask, hb, HB, DK, BK),
            load_in(g, tok, rmask, hg, HG, DK, BK), nq, nk)


@triton.jit
def _row(x, i, BC: tl.constexpr):
    """Row i of a [BC, N] tile as an [N] vector."""
    return tl.sum(tl.where(tl.arange(0, BC)[:, None] == i, x, 0.0), 0)


@triton.jit
def _diag_exact(q, k, g, b, tok, rmask, hk, hg, hb, nq, nk, H, HG, HB,
                DK: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, DC: tl.constexpr):
    """Strictly lower T and causal Aqk inside one sub-block with every pair's decay exp(G_r - G_s) formed
    channel by channel (DC key channels at a time, inputs re-read from cache): exact for any decay."""
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
def _diag_fast(E, Qe, kk, G, first, PREC: tl.constexpr, BC: tl.constexpr):
    """The same two blocks from one product each, keys lifted to the sub-block's first row by exp(first - G):
    valid while that stays below e^SAFE_SUB_DECAY."""
    Kf = kk * tl.exp(first[None, :] - G)
    rows = tl.arange(0, BC)
    Tm = tl.where(rows[:, None] > rows[None, :], tl.dot(E, tl.trans(Kf), input_precision=PREC), 0.0)
    Am = tl.where(rows[:, None] >= rows[None, :], tl.dot(Qe, tl.trans(Kf), input_precision=PREC), 0.0)
    return Tm, Am


@triton.jit
def _pair(E, Qe, k_to_end, lift, PREC: tl.constexpr):
    """T and Aqk blocks between a later sub-block (E, Qe) and an earlier one; `lift` <= 0 bridges the gap."""
    Kr = k_to_end * tl.exp(lift)[None, :]
    return (tl.dot(E, tl.trans(Kr), input_precision=PREC),
            tl.dot(Qe, tl.trans(Kr), input_precision=PREC))


@triton.jit
def _block_ptr(ptr, i, j, BC: tl.constexpr, BT: tl.constexpr):
    """Pointers of block (i, j) of a [BT, BT] scratch matrix."""
    r = tl.arange(0, BC)
    return ptr + (i * BC + r)[:, None] * BT + (j * BC + r)[None, :]


@triton.jit
def _intra_chunk_exact(
    i_c, i_bh, NC, q, k, v, g, b, w, Qs, Y, Kt, U, Oi, gC, TA, cu_seqlens, chunk_indices, scale, T, TT,
    H, HV, HG, HB,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, USE_L2NORM: tl.constexpr, PREC: tl.constexpr, DIAG_DC: tl.constexpr,
    SAFE: tl.constexpr,
):
    """Chunk i_c of batch-head i_bh (NC chunks per row when not varlen), exact for any decay."""
    BC: tl.constexpr = 16
    BT: tl.constexpr = 64
    hv = i_bh % HV
    bos, L, i_t, chunk_id = locate_chunk(i_c, i_bh, NC, HV, T, cu_seqlens, chunk_indices, IS_VARLEN)
    hk = hv // (HV // H)
    hg = hv // (HV // HG)
    hb = hv // (HV // HB)
    prog = chunk_id * HV + hv
    dec = gC + prog * 5 * DK + tl.arange(0, BK)  # slots 0-3: sub-block log-decay totals, 4: the chunk's
    dmask = tl.arange(0, BK) < DK
    Tbuf = TA + prog * 2 * BT * BT  # scratch: T, then Aqk
    Abuf = Tbuf + BT * BT
    r = i_t * BT + tl.arange(0, BC)

    # 1. T and Aqk in 16 x 16 blocks; Kt holds keys decayed to their own sub-block's end for the later pairs
    for i in range(4):
        m = r + i * BC < L
        t = bos + r + i * BC
        qi, ki, bi, gi, nq, nk = _load_qkbg(q, k, g, b, t, m, hk, hg, hb, scale, H, HG, HB, DK, BK, USE_L2NORM)
        G = tl.cumsum(gi, 0)
        first = _row(G, 0, BC)
        total = _row(G, BC - 1, BC)
        to_first = tl.exp(G - first[None, :])  # <= 1
        E = bi * ki * to_first
        Qe = qi * to_first
        store_rows(Kt, ki * tl.exp(tl.minimum(total[None, :] - G, 0.0)), t, m, hv, TT, DK, BK)
        tl.store(dec + i * DK, total, mask=dmask)
        if tl.max(first - total, 0) < SAFE:
            Tii, Aii = _diag_fast(E, Qe, ki, G, first, PREC, BC)
        else:
            Tii, Aii = _diag_exact(q, k, g, b, t, m, hk, hg, hb, nq, nk, H, HG, HB, DK, BK, BC, DIAG_DC)
        tl.store(_block_ptr(Tbuf, i, i, BC, BT), Tii)
        tl.store(_block_ptr(Abuf, i, i, BC, BT), Aii)
        tl.debug_barrier()
        lift = first  # log-decay from the end of sub-block j to the first row of sub-block i, all pieces <= 0
        for jj in range(i):
            j = i - 1 - jj
            Kj = load_rows(Kt, bos + r + j * BC, r + j * BC < L, hv, TT, DK, BK)
            Tij, Aij = _pair(E, Qe, Kj, lift, PREC)
            tl.store(_block_ptr(Tbuf, i, j, BC, BT), Tij)
            tl.store(_block_ptr(Abuf, i, j, BC, BT), Aij)
            lift += tl.load(dec + j * DK, mask=dmask, other=0.0)
    tl.debug_barrier()

    # 2. the whole chunk: A = (I + T)^-1, then Y, U, Qs, Oi as 64-row products
    rt = i_t * BT + tl.arange(0, BT)
    mt = rt < L
    tt = bos + rt
    rows = tl.arange(0, BT)
    lower = (rows // BC)[:, None] >= (rows // BC)[None, :]  # blocks above the diagonal were never written
    Tm = tl.where(lower, tl.load(Tbuf + rows[:, None] * BT + rows[None, :]), 0.0)
    Ainv = unit_lower_inverse(Tm, PREC, BT)
    # loads in the order of use keep few 64-row tiles alive at once
    kk = load_in(k, tt, mt, hk, H, DK, BK)
    kk = kk * _l2_factor(kk, 1.0, USE_L2NORM)[:, None]
    eG = tl.exp(tl.cumsum(load_in(g, tt, mt, hg, HG, DK, BK), 0))  # non-positive terms: no cancellation
    Yc = tl.dot(Ainv, load_in(b, tt, mt, hb, HB, DK, BK) * kk * eG, input_precision=PREC)
    store_rows(Y, Yc, tt, mt, hv, TT, DK, BK)
    vw = load_in(v, tt, mt, hv, HV, DV, BV) * load_in(w, tt, mt, hv, HV, DV, BV)
    Uc = tl.dot(Ainv, vw, input_precision=PREC)
    store_rows(U, Uc, tt, mt, hv, TT, DV, BV)
    Aqk = tl.where(lower, tl.load(Abuf + rows[:, None] * BT + rows[None, :]), 0.0)
    store_rows(Oi, tl.dot(Aqk, Uc, input_precision=PREC), tt, mt, hv, TT, DV, BV)
    qq = load_in(q, tt, mt, hk, H, DK, BK)
    qq = qq * _l2_factor(qq, scale, USE_L2NORM)[:, None]
    store_rows(Qs, qq * eG - tl.dot(Aqk, Yc, input_precision=PREC), tt, mt, hv, TT, DK, BK)

    # 3. keys decayed to the chunk's end: sub-block j's by the totals of the sub-blocks after it
    s1 = tl.load(dec + DK, mask=dmask, other=0.0)
    s2 = tl.load(dec + 2 * DK, mask=dmask, other=0.0)
    s3 = tl.load(dec + 3 * DK, mask=dmask, other=0.0)
    sub = (rows // BC)[:, None]
    lift = tl.where(sub == 0, (s1 + s2 + s3)[None, :], tl.where(sub == 1, (s2 + s3)[None, :],
                                                               tl.where(sub == 2, s3[None, :], 0.0)))
    Kend = load_rows(Kt, tt, mt, hv, TT, DK, BK) * tl.exp(lift)
    tl.debug_barrier()
    store_rows(Kt, Kend, tt, mt, hv, TT, DK, BK)
    tl.store(dec + 4 * DK, tl.load(dec, mask=dmask, other=0.0) + s1 + s2 + s3, mask=dmask)


@triton.jit
def _intra_chunk_kernel(
    q, k, v, g, b, w, Qs, Y, Kt, U, Oi, gC, TA, cu_seqlens, chunk_indices, scale, T, TT,
    H, HV, HG, HB,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, USE_L2NORM: tl.constexpr, PREC: tl.constexpr, DIAG_DC: tl.constexpr,
    SAFE: tl.constexpr,
):
    """One program per chunk and batch-head: every chunk the exact way (fp32 and fp16 inputs)."""
    _intra_chunk_exact(tl.program_id(0), tl.program_id(1), tl.num_programs(0), q, k, v, g, b, w, Qs, Y, Kt, U,
                       Oi, gC, TA, cu_seqlens, chunk_indices, scale, T, TT, H, HV, HG, HB, DK, DV, BK, BV,
                       IS_VARLEN, USE_L2NORM, PREC, DIAG_DC, SAFE)


@triton.jit
def _intra_chunk_worklist_kernel(
    work, work_count, NC, q, k, v, g, b, w, Qs, Y, Kt, U, Oi, gC, TA, cu_seqlens, chunk_indices, scale, T, TT,
    H, HV, HG, HB,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, USE_L2NORM: tl.constexpr, PREC: tl.constexpr, DIAG_DC: tl.constexpr,
    SAFE: tl.constexpr,
):
    """The chunks the mild kernel left (chunk_mild.py), read from its worklist on the device: a fixed grid of
    programs walks however many there are, so the host never waits to learn the count."""
    for item in range(tl.program_id(0), tl.load(work_count), tl.num_programs(0)):
        _intra_chunk_exact(tl.load(work + 2 * item), tl.load(work + 2 * item + 1), NC, q, k, v, g, b, w, Qs, Y, Kt,
                           U, Oi, gC, TA, cu_seqlens, chunk_indices, scale, T, TT, H, HV, HG, HB, DK, DV, BK, BV,
                           IS_VARLEN, USE_L2NORM, PREC, DIAG_DC, SAFE)


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


def _mild(dtype: torch.dtype, dk: int, dv: int) -> bool:
    """Whether the intra-chunk pass takes the bf16 mild-decay kernel (chunk_mild.py): bf16 inputs (whose range holds
    the anchored factors; fp16's does not), at the head dims it was checked at on an H200 (dk = dv = 128; 8 warps
    gave wrong results on 16-wide tiles there, so other sizes keep the exact kernel until checked). The interpreter
    runs it at any size, so the CPU tests cover the algorithm."""
    sizes = interpreting() or (dk in LAUNCH["mild_head_dims"] and dv in LAUNCH["mild_head_dims"])
    return dtype == torch.bfloat16 and LAUNCH["mild"] and sizes


def _state_block(sequence_heads: int, dv: int, bv: int) -> int:
    """State columns per program of the state pass: LAUNCH["state_bv"], or (0) the widest block that still gives
    about one wave of programs (one S slice per program walks the whole sequence, so programs are the
    parallelism)."""
    if LAUNCH["state_bv"]:
        return min(bv, LAUNCH["state_bv"])
    while bv > 16 and triton.cdiv(dv, bv) * sequence_heads < LAUNCH["state_programs"]:
        bv //= 2
    return bv


def _chunk_layout(cu_seqlens: torch.Tensor | None, B: int, T: int, device) -> tuple[int, torch.Tensor | None,
                                                                                    torch.Tensor | None]:
    """Number of chunks and, for packed sequences, (sequence, chunk) per chunk and each sequence's first chunk;
    once per forward pass (packing_memo), from host offsets read back once or handed over (describe_packing)."""
    if cu_seqlens is None:
        return triton.cdiv(T, CHUNK), None, None
    if B != 1:
        raise ValueError(f"cu_seqlens needs packed inputs with batch size 1, got B={B}")
    memo = packing_memo(cu_seqlens)
    if "offsets" not in memo:
        memo["offsets"] = cu_seqlens.tolist()
    key = ("chunk_layout", T, str(device))
    if key not in memo:
        memo[key] = _compute_layout(memo["offsets"], T, device)
    return memo[key]


def _compute_layout(cu: list[int], T: int, device) -> tuple[int, torch.Tensor, torch.Tensor]:
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    if any(L < 0 for L in lengths) or cu[0] != 0 or cu[-1] != T:
        raise ValueError(f"cu_seqlens must rise from 0 to T={T}, got {cu}")
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
    n_chunks = max(1, NC * (B if cu_seqlens is None else 1))
    gC = torch.empty(n_chunks, HV, 5, DK, dtype=torch.float32, device=dev)
    TA = torch.empty(n_chunks, HV, 2, CHUNK, CHUNK, dtype=torch.float32, device=dev)  # per-program scratch
    o = torch.empty(B, T, HV, DV, dtype=v.dtype, device=dev)
    ht = torch.empty(N, HV, DK, DV, dtype=torch.float32, device=dev) if output_final_state else None
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    common = dict(H=H, HV=HV, HG=HG, HB=HB, DK=DK, DV=DV, BK=BK, BV=BV, IS_VARLEN=cu_seqlens is not None,
                  USE_L2NORM=use_qk_l2norm)
    exact_args = dict(PREC=prec, DIAG_DC=min(LAUNCH["diag_dc"], BK), SAFE=SAFE_SUB_DECAY,
                      num_warps=LAUNCH["intra_warps"] if BK * BV > 64 * 64 else 4)
    if TT > 0 and NC > 0:
        grid1 = (NC, B * HV) if cu_seqlens is None else (NC, HV)
        if _mild(v.dtype, DK, DV):
            work = torch.empty(2 * grid1[0] * grid1[1], dtype=torch.int32, device=dev)
            count = torch.zeros(1, dtype=torch.int32, device=dev)
            _mild_intra_chunk_kernel[grid1](
                q, k, v, g, b, w, Qs, Y, Kt, U, Oi, gC, work, count, cu_seqlens, chunk_indices, scale, T, TT,
                MILD=MILD_RANGE, PREC=prec, num_warps=LAUNCH["mild_warps"] if BK * BV > 64 * 64 else 4,
                num_stages=LAUNCH["mild_stages"], **common)
            _intra_chunk_worklist_kernel[(min(grid1[0] * grid1[1], LAUNCH["worklist_programs"]),)](
                work, count, NC, q, k, v, g, b, w, Qs, Y, Kt, U, Oi, gC, TA, cu_seqlens, chunk_indices, scale, T,
                TT, **common, **exact_args)
        else:
            _intra_chunk_kernel[grid1](
                q, k, v, g, b, w, Qs, Y, Kt, U, Oi, gC, TA, cu_seqlens, chunk_indices, scale, T, TT,
                **common, **exact_args)
    BVS = _state_block(N * HV, DV, BV)
    grid2 = (triton.cdiv(DV, BVS), HV, N)
    if N > 0:
        _state_pass_kernel[grid2](
            Qs, Y, Kt, U, Oi, gC, o, h0, ht, cu_seqlens, chunk_offsets, T, TT,
            HV=HV, DK=DK, DV=DV, BK=BK, BV=BVS,
            IS_VARLEN=cu_seqlens is not None, HAS_H0=h0 is not None, STORE_HT=output_final_state,
            PREC=prec, num_warps=LAUNCH["state_warps"] or (8 if BVS * BK >= 128 * 128 else 4),
            num_stages=LAUNCH["state_stages"] if inter == torch.bfloat16 else 1,  # fp32 tiles: shared memory
        )
    return o, ht
