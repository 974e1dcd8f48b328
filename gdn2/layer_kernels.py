"""Triton kernels for the work around the recurrence: norms, the short convolution, gate activations, SwiGLU.

Each replaces a chain of small torch ops with one launch (layers.py holds the torch twin of each, with the same
signature, in the LayerOps table chosen once per pass); in a decode step, where every tensor is a few kilobytes,
the number of launches is what costs time. All arithmetic is fp32; results are stored in the output's dtype. Rows
may be strided (slices of one packed projection); the last axis must be contiguous.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gdn2.ops.triton_utils import check_device

__all__ = ["rms_norm", "gated_rms_norm", "short_conv", "short_conv_step", "gdn2_gates", "swiglu"]

COLS = 1024  # columns per program in the elementwise kernels


@triton.jit
def _rms_norm_kernel(x, w, y, sx, sy, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    xv = tl.load(x + row * sx + cols, mask=m, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(xv * xv) / N + eps)
    wv = tl.load(w + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(y + row * sy + cols, (xv * r * wv).to(y.dtype.element_ty), mask=m)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis of x [..., N]."""
    check_device(x)
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = triton.next_power_of_2(N)
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, y, x2.stride(0), y.stride(0), N, eps, BLOCK=block,
                                         num_warps=8 if block >= 2048 else 4)
    return y.view(x.shape)


@triton.jit
def _gated_rms_norm_kernel(o, gate, w, y, sg, HV, N, eps, SWISH: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)  # one (row, head)
    row = pid // HV
    head = pid % HV
    cols = tl.arange(0, BLOCK)
    m = cols < N
    ov = tl.load(o + pid * N + cols, mask=m, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(ov * ov) / N + eps)
    wv = tl.load(w + cols, mask=m, other=0.0).to(tl.float32)
    normed = (ov * r * wv).to(y.dtype.element_ty).to(tl.float32)  # the norm's output is rounded, as in torch
    gv = tl.load(gate + row * sg + head * N + cols, mask=m, other=0.0).to(tl.float32)
    act = tl.sigmoid(gv)
    if SWISH:
        act = gv * act
    tl.store(y + pid * N + cols, (normed * act).to(y.dtype.element_ty), mask=m)


def gated_rms_norm(o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float,
                   swish: bool) -> torch.Tensor:
    """RMSNorm of each head of o [rows, HV, N] times act(gate [rows, HV * N]) (swish or sigmoid), in o's dtype."""
    check_device(o)
    rows, HV, N = o.shape
    o = o.contiguous()
    y = torch.empty_like(o)
    if rows:
        _gated_rms_norm_kernel[(rows * HV,)](o, gate, weight, y, gate.stride(0), HV, N, eps, SWISH=swish,
                                              BLOCK=triton.next_power_of_2(N))
    return y


@triton.jit
def _short_conv_kernel(x, tail, w, y, seq, start, sx, total, C,
                       W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    mt = t < total
    mc = c < C
    n = tl.load(seq + t, mask=mt, other=0)
    s0 = tl.load(start + n, mask=mt, other=0)
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(W):
        p = t - (W - 1) + j  # the input this tap reads: inside the sequence, or one of its W-1 tail rows
        inside = p >= s0
        m = mt[:, None] & mc[None, :]
        xv = tl.load(x + p[:, None] * sx + c[None, :], mask=m & inside[:, None], other=0.0)
        tv = tl.load(tail + (n * (W - 1) + (W - 1) + p - s0)[:, None] * C + c[None, :], mask=m & ~inside[:, None],
                     other=0.0)
        wj = tl.load(w + c * W + j, mask=mc, other=0.0).to(tl.float32)
        acc += (xv.to(tl.float32) + tv.to(tl.float32)) * wj[None, :]
    out = acc * tl.sigmoid(acc)
    tl.store(y + t[:, None] * C + c[None, :], out.to(y.dtype.element_ty), mask=mt[:, None] & mc[None, :])


@triton.jit
def _conv_tail_kernel(x, tail, new, start, sx, C, W: tl.constexpr, BC: tl.constexpr):
    n = tl.program_id(0)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    mc = c < C
    s0 = tl.load(start + n)
    s1 = tl.load(start + n + 1)
    for j in tl.static_range(W - 1):
        p = s1 - (W - 1) + j  # a sequence shorter than W-1 reaches back into its old tail
        dst = new + (n * (W - 1) + j) * C + c
        if p >= s0:
            tl.store(dst, tl.load(x + p * sx + c, mask=mc, other=0.0).to(new.dtype.element_ty), mask=mc)
        else:
            src = tail + (n * (W - 1) + (W - 1) + p - s0) * C + c
            tl.store(dst, tl.load(src, mask=mc, other=0.0).to(new.dtype.element_ty), mask=mc)


def short_conv(x: torch.Tensor, tail: torch.Tensor, weight: torch.Tensor, seq: torch.Tensor,
               cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU(causal depthwise conv) of packed x [total, C] whose sequences continue `tail` [N, W-1, C].

    weight [C, W]; seq [total] int32: the sequence of every token. Returns y [total, C] in x's dtype and the new
    tails (each sequence's last W-1 inputs) [N, W-1, C] in tail's dtype.
    """
    check_device(x)
    total, C = x.shape
    W = weight.shape[-1]
    N = tail.shape[0]
    tail = tail.contiguous()
    y = torch.empty(total, C, dtype=x.dtype, device=x.device)
    new_tail = torch.empty_like(tail)
    BT, BC = 16, 128
    if total:
        _short_conv_kernel[(triton.cdiv(total, BT), triton.cdiv(C, BC))](
            x, tail, weight, y, seq, cu_seqlens, x.stride(0), total, C, W=W, BT=BT, BC=BC)
    if N and W > 1:
        _conv_tail_kernel[(N, triton.cdiv(C, 256))](x, tail, new_tail, cu_seqlens, x.stride(0), C, W=W, BC=256)
    return y, new_tail


@triton.jit
def _short_conv_step_kernel(x, tail, w, y, sx, C, W: tl.constexpr, BC: tl.constexpr):
    row = tl.program_id(0)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    mc = c < C
    xv = tl.load(x + row * sx + c, mask=mc, other=0.0)
    acc = xv.to(tl.float32) * tl.load(w + c * W + (W - 1), mask=mc, other=0.0).to(tl.float32)
    base = tail + row * (W - 1) * C
    prev = tl.load(base + c, mask=mc, other=0.0)
    for j in tl.static_range(W - 1):
        acc += prev.to(tl.float32) * tl.load(w + c * W + j, mask=mc, other=0.0).to(tl.float32)
        if j < W - 2:  # shift the window: row j takes row j + 1, the last row takes the new input
            nxt = tl.load(base + (j + 1) * C + c, mask=mc, other=0.0)
            tl.store(base + j * C + c, nxt, mask=mc)
            prev = nxt
        else:
            tl.store(base + j * C + c, xv.to(prev.dtype), mask=mc)
    tl.store(y + row * C + c, (acc * tl.sigmoid(acc)).to(y.dtype.element_ty), mask=mc)


def short_conv_step(x: torch.Tensor, tail: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One token per row: x [B, C] (rows may be strided), tail [B, W-1, C] contiguous, updated in place."""
    check_device(x)
    B, C = x.shape
    W = weight.shape[-1]
    if not tail.is_contiguous():
        raise ValueError("the conv tail must be contiguous for the in-place decode step")
    y = torch.empty(B, C, dtype=x.dtype, device=x.device)
    BC = 256
    _short_conv_step_kernel[(B, triton.cdiv(C, BC))](x, tail, weight, y, x.stride(0), C, W=W, BC=BC)
    return y


@triton.jit
def _gates_kernel(f, braw, wraw, A_log, dt_bias, g, b, w, sf, sb, sw,
                  NG, NB, NW, NMAX, K: tl.constexpr, V: tl.constexpr, PER_HEAD_DECAY: tl.constexpr,
                  PER_HEAD_BETA: tl.constexpr, NEG: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    part = tl.program_id(1)  # 0: decay, 1: erase, 2: write
    for c0 in range(0, NMAX, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        if part == 0:
            m = c < NG
            src = c // K if PER_HEAD_DECAY else c
            pre = (tl.load(f + row * sf + src, mask=m, other=0.0).to(tl.float32)
                   + tl.load(dt_bias + src, mask=m, other=0.0).to(tl.float32))
            sp = tl.where(pre > 20.0, pre, tl.log(1.0 + tl.exp(tl.minimum(pre, 20.0))))  # softplus, torch's threshold
            a = tl.exp(tl.load(A_log + c // K, mask=m, other=0.0))
            tl.store(g + row * NG + c, -a * sp, mask=m)
        elif part == 1:
            m = c < NB
            src = c // K if PER_HEAD_BETA else c
            beta = tl.sigmoid(tl.load(braw + row * sb + src, mask=m, other=0.0).to(tl.float32))
            if NEG:
                beta = 2.0 * beta
            tl.store(b + row * NB + c, beta.to(b.dtype.element_ty), mask=m)
        else:
            m = c < NW
            src = c // V if PER_HEAD_BETA else c
            ww = tl.sigmoid(tl.load(wraw + row * sw + src, mask=m, other=0.0).to(tl.float32))
            if NEG and PER_HEAD_BETA:  # a shared beta is doubled for both uses; a separate write gate is not
                ww = 2.0 * ww
            tl.store(w + row * NW + c, ww.to(w.dtype.element_ty), mask=m)


def gdn2_gates(f: torch.Tensor, b_raw: torch.Tensor, w_raw: torch.Tensor | None, A_log: torch.Tensor,
               dt_bias: torch.Tensor, heads: tuple[int, int, int], K: int, V: int, neg_eigval: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decay, erase and write gates from their projections, for `rows` tokens.

    f [rows, HD*K] pre-softplus decay, or [rows, HD] one per head (dt_bias of f's width and A_log [HD] applied
    here); b_raw [rows, H*K] and w_raw
    [rows, HV*V] gate logits, or b_raw [rows, HV] one shared beta per value head (w_raw None).
    heads = (HD, H_b, HV). Returns g [rows, HD, K] fp32, b [rows, H_b, K], w [rows, HV, V] in b_raw's dtype.
    """
    check_device(f)
    rows = f.shape[0]
    HD, HB, HV = heads
    per_head = w_raw is None
    g = torch.empty(rows, HD, K, dtype=torch.float32, device=f.device)
    b = torch.empty(rows, HB, K, dtype=b_raw.dtype, device=f.device)
    w = torch.empty(rows, HV, V, dtype=b_raw.dtype, device=f.device)
    wsrc = b_raw if per_head else w_raw
    if rows:
        _gates_kernel[(rows, 3)](
            f, b_raw, wsrc, A_log, dt_bias, g, b, w, f.stride(0), b_raw.stride(0), wsrc.stride(0),
            HD * K, HB * K, HV * V, max(HD * K, HB * K, HV * V), K=K, V=V, PER_HEAD_DECAY=f.shape[1] == HD,
            PER_HEAD_BETA=per_head, NEG=neg_eigval, BLOCK=COLS)
    return g, b, w


@triton.jit
def _swiglu_kernel(h, y, sh, N, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < N
    a = tl.load(h + row * sh + c, mask=m, other=0.0).to(tl.float32)
    u = tl.load(h + row * sh + N + c, mask=m, other=0.0)
    silu = (a * tl.sigmoid(a)).to(u.dtype).to(tl.float32)  # silu's output is rounded, as in torch
    tl.store(y + row * N + c, (silu * u.to(tl.float32)).to(y.dtype.element_ty), mask=m)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(a) * u for h = [a | u] of shape [rows, 2N]."""
    check_device(h)
    rows, N = h.shape[0], h.shape[1] // 2
    y = torch.empty(rows, N, dtype=h.dtype, device=h.device)
    if rows:
        _swiglu_kernel[(rows, triton.cdiv(N, COLS))](h, y, h.stride(0), N, BLOCK=COLS)
    return y
