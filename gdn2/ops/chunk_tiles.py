"""Tile helpers shared by the intra-chunk kernels of the Triton prefill (chunk.py and chunk_mild.py).

Inputs are token-major [.., heads, D]; the intermediates the state pass reads are head-major [HV, TT, D].
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def locate_chunk(i_c, i_bh, NC, HV, T, cu_seqlens, chunk_indices, IS_VARLEN: tl.constexpr):
    """(first token of the sequence, its length, chunk index in it, global chunk id) of chunk i_c of batch-head i_bh:
    packed sequences read (sequence, chunk) from chunk_indices; a dense batch has NC chunks per row."""
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
        chunk_id = (i_bh // HV) * NC + i_c
    return bos, L, i_t, chunk_id


@triton.jit
def load_in(ptr, tok, rmask, head, NH, D: tl.constexpr, BD: tl.constexpr):
    """Rows `tok` of head `head` of a token-major [.., NH, D] input, in fp32 (zeros outside the sequence)."""
    c = tl.arange(0, BD)
    return tl.load(ptr + (tok * NH + head)[:, None] * D + c[None, :], mask=rmask[:, None] & (c < D)[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def rows_ptr(ptr, tok, hv, TT, D: tl.constexpr, BD: tl.constexpr):
    """Pointers and column mask of rows `tok` in a head-major [HV, TT, D] intermediate."""
    c = tl.arange(0, BD)
    return ptr + (hv * TT + tok)[:, None] * D + c[None, :], (c < D)[None, :]


@triton.jit
def store_rows(ptr, x, tok, rmask, hv, TT, D: tl.constexpr, BD: tl.constexpr):
    p, cm = rows_ptr(ptr, tok, hv, TT, D, BD)
    tl.store(p, x.to(ptr.dtype.element_ty), mask=rmask[:, None] & cm)


@triton.jit
def load_rows(ptr, tok, rmask, hv, TT, D: tl.constexpr, BD: tl.constexpr):
    p, cm = rows_ptr(ptr, tok, hv, TT, D, BD)
    return tl.load(p, mask=rmask[:, None] & cm, other=0.0).to(tl.float32)


@triton.jit
def inverse_nilpotent4(N, eye, PREC: tl.constexpr):
    """(I + N)^-1 = (I - N)(I + N^2) for N with N^4 = 0."""
    return tl.dot(eye - N, eye + tl.dot(N, N, input_precision=PREC), input_precision=PREC)


@triton.jit
def unit_lower_inverse(Tm, PREC: tl.constexpr, BT: tl.constexpr):
    """(I + Tm)^-1 for strictly lower Tm [64, 64] without a row loop: invert the 4 x 4 diagonal blocks, then grow
    to 16 x 16 and to 64 x 64, each step (I + D + F)^-1 = (I + N)^-1 (I + D)^-1 with N = (I + D)^-1 F nilpotent
    of index 4. Ten 64 x 64 products, each series four terms long."""
    rows = tl.arange(0, BT)
    eye = (rows[:, None] == rows[None, :]).to(tl.float32)
    in4 = (rows // 4)[:, None] == (rows // 4)[None, :]
    in16 = (rows // 16)[:, None] == (rows // 16)[None, :]
    inv = inverse_nilpotent4(tl.where(in4, Tm, 0.0), eye, PREC)
    N = tl.dot(inv, tl.where(in16 & ~in4, Tm, 0.0), input_precision=PREC)
    inv = tl.dot(inverse_nilpotent4(N, eye, PREC), inv, input_precision=PREC)
    N = tl.dot(inv, tl.where(in16, 0.0, Tm), input_precision=PREC)
    return tl.dot(inverse_nilpotent4(N, eye, PREC), inv, input_precision=PREC)
