"""Triton kernels for sliding-window attention over a ring buffer (contract: gdn2/ops/swa.py).

Why our own kernels rather than FlexAttention: a flex block mask is built per batch from the packing (document +
window + ring prefix), and flex_attention only runs fused under torch.compile, which specialises on the packed
length and the number of sequences; every new batch shape of an evaluation (they all differ) would recompile or
fall back to dynamic shapes, and the ring prefix would first have to be copied into a packed [prefix | tokens]
buffer. These kernels read the ring in place, take any packing without recompiling (the grid and the per-tile
sequence lookup come from tensors, not from host values), never wait for the host, and are capturable.

    prefill   one program per (tile of BM queries of one sequence, head): online softmax in fp32 over the keys
              max(0, p - window + 1) .. p, read from the ring (positions before the sequence) or from the new
              keys; the tile -> sequence map is a binary search over per-sequence tile counts (no host values)
    write     each sequence's last min(L, Wc) keys/values into their ring slots, in place
    step      flash-decoding: the ring is split into chunks of slots, one program per (row, head, chunk) reads its
              slots in the storage dtype and leaves (max, sum, weighted values) in fp32; a combine program per
              (row, head) merges them with the new key's own score, then stores the new key/value in its slot
              (after every chunk was read: the slot it overwrites is still inside the window)
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from gdn2.ops.triton_utils import block_size, check_device, fp32_dot_precision, interpreting
from gdn2.ops.utils import packing_memo

__all__ = ["swa_prefill_triton", "swa_write_triton", "swa_step_triton"]

# Launch settings; a dict so a sweep can override them. The interpreter gets small tiles (it runs numpy per program).
LAUNCH = dict(bm=64, bn=64, warps=4, stages=2, step_chunk=256, step_bn=64)
INTERPRETER = dict(bm=16, bn=16, warps=1, stages=1, step_chunk=32, step_bn=16)


def _launch() -> dict:
    return INTERPRETER if interpreting() else LAUNCH


@triton.jit
def _prefill_kernel(q, k, v, kc, vc, o, cu, pos0, crow, tiles, scale, N, STEPS, window, Wc,
                    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h,
                    skc_r, skc_s, skc_h, svc_r, svc_s, svc_h,
                    HS: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    if pid >= tl.load(tiles + N):
        return
    lo = pid * 0
    hi = lo + N
    for _ in range(STEPS):  # the sequence n with tiles[n] <= pid < tiles[n + 1]
        mid = (lo + hi) // 2
        go = tl.load(tiles + mid) <= pid
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    n = lo
    j = pid - tl.load(tiles + n)
    t0 = tl.load(cu + n).to(tl.int32)
    L = tl.load(cu + n + 1).to(tl.int32) - t0
    p0 = tl.load(pos0 + n).to(tl.int32)
    r = tl.load(crow + n).to(tl.int64)

    i = j * BM + tl.arange(0, BM)
    mi = i < L
    d = tl.arange(0, D)
    md = d < HS
    qp = p0 + i
    tq = (t0 + i).to(tl.int64)
    qv = tl.load(q + tq[:, None] * sq_t + h * sq_h + d[None, :], mask=mi[:, None] & md[None, :], other=0.0)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    klo = tl.maximum(p0 + j * BM - window + 1, 0)
    khi = p0 + tl.minimum(j * BM + BM, L)
    for ks in range(klo, khi, BN):
        kp = ks + tl.arange(0, BN)
        mk = kp < khi
        ring = kp < p0
        slot = (kp % Wc).to(tl.int64)
        tk = (t0 + kp - p0).to(tl.int64)
        mr = (mk & ring)[:, None] & md[None, :]
        mn = (mk & ~ring)[:, None] & md[None, :]
        kt = (tl.load(kc + r * skc_r + slot[:, None] * skc_s + h * skc_h + d[None, :], mask=mr, other=0.0)
              .to(qv.dtype)
              + tl.load(k + tk[:, None] * sk_t + h * sk_h + d[None, :], mask=mn, other=0.0))
        vt = (tl.load(vc + r * svc_r + slot[:, None] * svc_s + h * svc_h + d[None, :], mask=mr, other=0.0)
              .to(qv.dtype)
              + tl.load(v + tk[:, None] * sv_t + h * sv_h + d[None, :], mask=mn, other=0.0))
        s = tl.dot(qv, tl.trans(kt), input_precision=PREC) * scale
        ok = mk[None, :] & (kp[None, :] <= qp[:, None]) & (kp[None, :] > qp[:, None] - window)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
        alpha = tl.exp(m_i - m_use)
        p = tl.exp(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o + tq[:, None] * so_t + h * so_h + d[None, :], out.to(o.dtype.element_ty),
             mask=mi[:, None] & md[None, :])


def _tile_table(cu_seqlens: torch.Tensor, BM: int) -> torch.Tensor:
    """int32 [N + 1]: cumulative count of BM-query tiles per sequence (device ops only; once per pass)."""
    memo = packing_memo(cu_seqlens)
    key = ("swa_tiles", BM)
    if key not in memo:
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        table = torch.zeros(cu_seqlens.shape[0], dtype=torch.int32, device=cu_seqlens.device)
        table[1:] = torch.cumsum(torch.div(lengths + BM - 1, BM, rounding_mode="floor"), 0)
        memo[key] = table
    return memo[key]


def _prec(dtype: torch.dtype) -> str:
    return fp32_dot_precision(dtype) if dtype == torch.float32 else "tf32"


def _check(q: torch.Tensor, k_cache: torch.Tensor) -> None:
    check_device(q)
    if q.dtype == torch.float64:
        raise ValueError("the Triton SWA kernels take fp32/bf16/fp16 inputs: use backend='torch' for float64")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError("the head axis of q/k/v and of the ring buffer must be contiguous")


def swa_prefill_triton(q, k, v, k_cache, v_cache, pos0, cu_seqlens, window, cache_rows=None, scale=None):
    """Same contract as gdn2.ops.swa.swa_prefill_naive; CUDA tensors (or the interpreter)."""
    _check(q, k_cache)
    total, nh, hs = q.shape
    N = pos0.shape[0]
    cfg = _launch()
    BM, BN = cfg["bm"], cfg["bn"]
    o = torch.empty_like(q)
    rows = torch.arange(N, device=q.device) if cache_rows is None else cache_rows
    scale = 1 / math.sqrt(hs) if scale is None else scale
    if total and N:
        tiles = _tile_table(cu_seqlens, BM)
        grid = (triton.cdiv(total, BM) + N, nh)
        _prefill_kernel[grid](
            q, k, v, k_cache, v_cache, o, cu_seqlens, pos0, rows, tiles, scale, N, max(1, N.bit_length()),
            window, k_cache.shape[1],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
            v_cache.stride(2),
            HS=hs, D=block_size(hs), BM=BM, BN=BN, PREC=_prec(q.dtype), num_warps=cfg["warps"],
            num_stages=cfg["stages"])
    return o


@triton.jit
def _write_kernel(x, cache, cu, pos0, Wc, sx_t, sx_h, sc_r, sc_s, sc_h,
                  HS: tl.constexpr, D: tl.constexpr, BI: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)  # row offsets pass 2**31 elements at a few hundred rows of a long ring
    h = tl.program_id(2)
    t0 = tl.load(cu + n).to(tl.int32)
    L = tl.load(cu + n + 1).to(tl.int32) - t0
    keep = tl.minimum(L, Wc)
    i = tl.program_id(1) * BI + tl.arange(0, BI)
    mi = i < keep
    local = L - keep + i
    slot = ((tl.load(pos0 + n).to(tl.int32) + local) % Wc).to(tl.int64)
    d = tl.arange(0, D)
    m = mi[:, None] & (d < HS)[None, :]
    val = tl.load(x + (t0 + local).to(tl.int64)[:, None] * sx_t + h * sx_h + d[None, :], mask=m, other=0.0)
    tl.store(cache + n * sc_r + slot[:, None] * sc_s + h * sc_h + d[None, :], val.to(cache.dtype.element_ty), mask=m)


def swa_write_triton(k, v, k_cache, v_cache, pos0, cu_seqlens) -> None:
    """Same contract as gdn2.ops.swa.swa_write_torch: only the kept keys are written, in place."""
    _check(k, k_cache)
    N, Wc = pos0.shape[0], k_cache.shape[1]
    nh, hs = k.shape[1], k.shape[2]
    BI = 16 if interpreting() else 64
    if not N:
        return
    for x, cache in ((k, k_cache), (v, v_cache)):
        _write_kernel[(N, triton.cdiv(Wc, BI), nh)](
            x, cache, cu_seqlens, pos0, Wc, x.stride(0), x.stride(1), cache.stride(0), cache.stride(1),
            cache.stride(2), HS=hs, D=block_size(hs), BI=BI)


@triton.jit
def _step_split_kernel(q, kc, vc, pos, part_m, part_l, part_o, scale, window, Wc, nh, NS,
                       sq_b, sq_h, skc_r, skc_s, skc_h, svc_r, svc_s, svc_h,
                       HS: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, BN: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)  # 64-bit row offsets (large batches of long rings)
    h = tl.program_id(1)
    c = tl.program_id(2)
    p = tl.load(pos + b).to(tl.int32)
    d = tl.arange(0, D)
    md = d < HS
    qv = tl.load(q + b * sq_b + h * sq_h + d, mask=md, other=0.0).to(tl.float32) * scale
    m_i = tl.max(tl.full([BN], float("-inf"), tl.float32), 0)  # scalars, as the loop carries them
    l_i = tl.sum(tl.zeros([BN], tl.float32), 0)
    acc = tl.zeros([D], tl.float32)
    last = p - 1
    for s0 in range(c * CHUNK, tl.minimum(c * CHUNK + CHUNK, Wc), BN):
        slot = s0 + tl.arange(0, BN)
        ms = slot < Wc
        held = last - ((last - slot) % Wc + Wc) % Wc  # the position a slot holds (negative: empty)
        ok = ms & (held >= 0) & (held > p - window)
        mk = ok[:, None] & md[None, :]
        kt = tl.load(kc + b * skc_r + slot.to(tl.int64)[:, None] * skc_s + h * skc_h + d[None, :], mask=mk,
                     other=0.0).to(tl.float32)
        s = tl.where(ok, tl.sum(kt * qv[None, :], 1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_use)
        pr = tl.exp(s - m_use)
        vt = tl.load(vc + b * svc_r + slot.to(tl.int64)[:, None] * svc_s + h * svc_h + d[None, :], mask=mk,
                     other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(pr, 0)
        acc = acc * alpha + tl.sum(pr[:, None] * vt, 0)
        m_i = m_new
    slot_id = (b * nh + h) * NS + c
    tl.store(part_m + slot_id, m_i)
    tl.store(part_l + slot_id, l_i)
    tl.store(part_o + slot_id * D + d, acc)


@triton.jit
def _step_combine_kernel(q, k, v, kc, vc, o, pos, part_m, part_l, part_o, scale, Wc, nh, NS,
                         sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, so_b, so_h, skc_r, skc_s, skc_h, svc_r, svc_s, svc_h,
                         HS: tl.constexpr, D: tl.constexpr, NSP: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)  # 64-bit row offsets (large batches of long rings)
    h = tl.program_id(1)
    d = tl.arange(0, D)
    md = d < HS
    qv = tl.load(q + b * sq_b + h * sq_h + d, mask=md, other=0.0).to(tl.float32)
    kn = tl.load(k + b * sk_b + h * sk_h + d, mask=md, other=0.0)
    vn = tl.load(v + b * sv_b + h * sv_h + d, mask=md, other=0.0)
    s_self = tl.sum(qv * kn.to(tl.float32), 0) * scale
    cs = tl.arange(0, NSP)
    mc = cs < NS
    base = (b * nh + h) * NS
    pm = tl.load(part_m + base + cs, mask=mc, other=float("-inf"))
    pl = tl.load(part_l + base + cs, mask=mc, other=0.0)
    po = tl.load(part_o + (base + cs)[:, None] * D + d[None, :], mask=mc[:, None], other=0.0)
    m = tl.maximum(tl.max(pm, 0), s_self)  # finite: the new key always counts
    w = tl.where(mc, tl.exp(pm - m), 0.0)
    e_self = tl.exp(s_self - m)
    num = tl.sum(w[:, None] * po, 0) + e_self * vn.to(tl.float32)
    den = tl.sum(w * pl, 0) + e_self
    tl.store(o + b * so_b + h * so_h + d, (num / den).to(o.dtype.element_ty), mask=md)
    slot = (tl.load(pos + b) % Wc).to(tl.int64)
    tl.store(kc + b * skc_r + slot * skc_s + h * skc_h + d, kn.to(kc.dtype.element_ty), mask=md)
    tl.store(vc + b * svc_r + slot * svc_s + h * svc_h + d, vn.to(vc.dtype.element_ty), mask=md)


def swa_step_triton(q, k, v, k_cache, v_cache, pos, window, scale=None) -> torch.Tensor:
    """Same contract as gdn2.ops.swa.swa_step_torch: no host syncs, fixed shapes (capturable in a CUDA graph)."""
    _check(q, k_cache)
    B, nh, hs = q.shape
    Wc = k_cache.shape[1]
    cfg = _launch()
    CH = min(cfg["step_chunk"], max(cfg["step_bn"], triton.next_power_of_2(Wc)))
    NS = triton.cdiv(Wc, CH)
    D = block_size(hs)
    scale = 1 / math.sqrt(hs) if scale is None else scale
    o = torch.empty(B, nh, hs, dtype=q.dtype, device=q.device)
    if not B:
        return o
    part_m = torch.empty(B, nh, NS, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    part_o = torch.empty(B, nh, NS, D, dtype=torch.float32, device=q.device)
    cache_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                     v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))
    _step_split_kernel[(B, nh, NS)](
        q, k_cache, v_cache, pos, part_m, part_l, part_o, scale, window, Wc, nh, NS, q.stride(0), q.stride(1),
        *cache_strides, HS=hs, D=D, CHUNK=CH, BN=min(cfg["step_bn"], CH))
    _step_combine_kernel[(B, nh)](
        q, k, v, k_cache, v_cache, o, pos, part_m, part_l, part_o, scale, Wc, nh, NS,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        *cache_strides, HS=hs, D=D, NSP=triton.next_power_of_2(NS))
    return o
