"""Sliding-window softmax attention over packed sequences that continue a ring buffer of keys and values.

Layout (gdn2/state.py): sequence n of a packed batch holds tokens at absolute positions pos0[n] .. pos0[n]+L_n-1;
the keys and values before them live in ring row cache_rows[n] (row n when cache_rows is None) of
k_cache/v_cache [M, Wc, heads, head_size], the key of absolute position p in slot p % Wc, Wc = window - 1.
Query position p sees the keys of positions max(0, p - window + 1) .. p (flash-attn's convention): the last Wc
positions before a sequence are exactly what its ring holds, and the slot a decode step is about to overwrite
(p % Wc holds p - Wc) is still inside p's window, so a step attends first and writes after.

Three implementations of one contract, as for the recurrence (naive.py / chunk_torch.py / chunk.py):
    naive   a loop over sequences, one masked SDPA per block of queries: the executable spec (any dtype)
    torch   vectorised over sequences (one batched masked SDPA over a [ring prefix | tokens] layout): exact,
            differentiable, any device; its number of torch operators does not depend on the number of sequences
    triton  fused flash-attention-style kernels (swa_triton.py): CUDA (or TRITON_INTERPRET=1 on CPU)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gdn2.ops.utils import packing_memo

__all__ = ["swa_prefill_naive", "swa_prefill_torch", "swa_write_torch", "swa_step_torch", "ring_positions"]

Q_BLOCK = 1024  # naive: queries per SDPA call
EXT_BLOCK = 64  # torch: queries per block of the [prefix | tokens] layout
_MAX_SCORES = 1 << 24  # torch: score-matrix elements per batched SDPA call (bounds memory on long prompts)


def ring_positions(n_seen: torch.Tensor, cache_len: int) -> torch.Tensor:
    """Absolute position held by every ring slot after n_seen [N] tokens (negative: still empty). [N, cache_len]"""
    slots = torch.arange(cache_len, device=n_seen.device)
    last = n_seen[:, None] - 1
    return last - torch.remainder(last - slots, cache_len)


def _rows(cache_rows: torch.Tensor | None, N: int, device) -> torch.Tensor:
    return torch.arange(N, device=device) if cache_rows is None else cache_rows


# ---- naive: the reference -----------------------------------------------------------------------------------------
def swa_prefill_naive(q, k, v, k_cache, v_cache, pos0, cu_seqlens, window, cache_rows=None, scale=None):
    """Attention output [total, nh, hs] (q's dtype) of packed q, k, v [total, nh, hs]; see the module docstring.

    One sequence at a time: keys = [its ring, its tokens], a boolean mask per block of Q_BLOCK queries.
    """
    cu = [int(c) for c in cu_seqlens.tolist()]
    Wc = k_cache.shape[1]
    rows = _rows(cache_rows, len(cu) - 1, q.device).tolist()
    cache_pos = ring_positions(pos0, Wc)
    outs = []
    for n in range(len(cu) - 1):
        L = cu[n + 1] - cu[n]
        p = int(pos0[n]) + torch.arange(L, device=q.device)
        keys = torch.cat([k_cache[rows[n]].to(k.dtype), k[cu[n]:cu[n + 1]]])
        vals = torch.cat([v_cache[rows[n]].to(v.dtype), v[cu[n]:cu[n + 1]]])
        kpos = torch.cat([cache_pos[n], p])
        kvalid = torch.cat([cache_pos[n] >= 0, torch.ones(L, dtype=torch.bool, device=q.device)])
        qn = q[cu[n]:cu[n + 1]]
        for s in range(0, L, Q_BLOCK):
            qp = p[s:s + Q_BLOCK]
            mask = kvalid & (kpos[None, :] <= qp[:, None]) & (kpos[None, :] > qp[:, None] - window)
            cols = mask.any(0).nonzero().squeeze(-1)  # only keys some query of the block can see
            lo, hi = int(cols.min()), int(cols.max()) + 1
            o = F.scaled_dot_product_attention(
                qn[s:s + Q_BLOCK].transpose(0, 1), keys[lo:hi].transpose(0, 1),
                vals[lo:hi].transpose(0, 1), attn_mask=mask[:, lo:hi], scale=scale)
            outs.append(o.transpose(0, 1))
    return torch.cat(outs) if outs else q.new_empty(q.shape)


# ---- torch: vectorised over sequences --------------------------------------------------------------------------
def _ext_layout(cu_seqlens: torch.Tensor, total: int, Wc: int) -> dict[str, torch.Tensor]:
    """Index maps of the [ring prefix (Wc slots, in position order) | tokens] layout of every sequence, laid back
    to back (sequence n starts at cu[n] + n * Wc), padded to whole blocks; derived once per pass (packing_memo)."""
    memo = packing_memo(cu_seqlens)
    key = ("swa_ext", total, Wc)
    if key not in memo:
        dev = cu_seqlens.device
        cu = cu_seqlens.long()
        N = cu.shape[0] - 1
        lengths = cu[1:] - cu[:-1]
        seq = torch.repeat_interleave(torch.arange(N, device=dev), lengths, output_size=total)
        start = cu[:-1] + torch.arange(N, device=dev) * Wc  # ext index of each sequence's first prefix slot
        tok_ext = start[seq] + Wc + torch.arange(total, device=dev) - cu[:-1][seq]  # [total]
        pre_ext = (start[:, None] + torch.arange(Wc, device=dev)).reshape(-1)  # [N * Wc]
        E = total + N * Wc
        E_pad = -(-max(E, 1) // EXT_BLOCK) * EXT_BLOCK
        ext_seq = torch.full((E_pad,), -1, dtype=torch.long, device=dev)  # -1: padding
        ext_seq[tok_ext] = seq
        ext_seq[pre_ext] = torch.arange(N, device=dev).repeat_interleave(Wc)
        is_query = torch.zeros(E_pad, dtype=torch.bool, device=dev)
        is_query[tok_ext] = True
        ext_local = torch.zeros(E_pad, dtype=torch.long, device=dev)  # position relative to the first token
        ext_local[tok_ext] = torch.arange(total, device=dev) - cu[:-1][seq]
        ext_local[pre_ext] = torch.arange(-Wc, 0, device=dev).repeat(N)
        memo[key] = dict(tok_ext=tok_ext, pre_ext=pre_ext, ext_seq=ext_seq, is_query=is_query, ext_local=ext_local)
    return memo[key]


def swa_prefill_torch(q, k, v, k_cache, v_cache, pos0, cu_seqlens, window, cache_rows=None, scale=None):
    """Same contract as swa_prefill_naive, vectorised over sequences.

    Every sequence is laid out as [its ring in position order | its tokens]; in that layout the keys of a query
    are the Wc entries before it and itself, so a block of EXT_BLOCK consecutive entries needs the EXT_BLOCK + Wc
    entries ending with it: all blocks are one batched SDPA over strided views of one buffer, masked by
    (same sequence, inside the window, position >= 0). Entries that are not queries (prefix slots, padding) attend
    to themselves only (so no row is fully masked) and are dropped.
    """
    total, nh, hs = q.shape
    N, Wc = pos0.shape[0], k_cache.shape[1]
    lay = _ext_layout(cu_seqlens, total, Wc)
    E_pad = lay["ext_seq"].shape[0]
    rows = _rows(cache_rows, N, q.device)
    # ring slots in position order: prefix entry i of sequence n holds position pos0[n] - Wc + i
    slots = torch.remainder(pos0[:, None] - Wc + torch.arange(Wc, device=q.device), Wc)

    def ext(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:  # [Wc + E_pad, nh, hs], Wc leading zeros
        prefix = cache[rows[:, None], slots].to(x.dtype).reshape(N * Wc, nh, hs)
        buf = x.new_zeros(Wc + E_pad, nh, hs)
        return buf.index_copy(0, Wc + lay["tok_ext"], x).index_copy(0, Wc + lay["pre_ext"], prefix)

    K, V = ext(k, k_cache), ext(v, v_cache)
    Q = q.new_zeros(E_pad, nh, hs).index_copy(0, lay["tok_ext"], q)
    abs_pos = lay["ext_local"] + torch.where(lay["ext_seq"] >= 0, pos0[lay["ext_seq"].clamp_min(0)], 0)
    seq_k = F.pad(lay["ext_seq"], (Wc, 0), value=-1)
    pos_k = F.pad(abs_pos, (Wc, 0), value=-1)
    B, W = EXT_BLOCK, EXT_BLOCK + Wc
    nb = E_pad // B
    out = torch.empty_like(Q)
    per_block = nh * B * W
    step = max(1, _MAX_SCORES // per_block)
    diag = torch.arange(B, device=q.device)[:, None] + Wc == torch.arange(W, device=q.device)[None, :]
    for b0 in range(0, nb, step):  # one group for short inputs; more only to bound the score matrix
        b1 = min(nb, b0 + step)
        e0, e1 = b0 * B, b1 * B
        qs = Q[e0:e1].view(b1 - b0, B, nh, hs).transpose(1, 2)  # [nb', nh, B, hs]
        ks = K[e0:e1 + Wc].unfold(0, W, B).permute(0, 1, 3, 2)  # [nb', nh, W, hs]: entries e-Wc .. e+B-1
        vs = V[e0:e1 + Wc].unfold(0, W, B).permute(0, 1, 3, 2)
        qseq, qpos = lay["ext_seq"][e0:e1].view(-1, B, 1), abs_pos[e0:e1].view(-1, B, 1)
        kseq, kpos = seq_k[e0:e1 + Wc].unfold(0, W, B)[:, None, :], pos_k[e0:e1 + Wc].unfold(0, W, B)[:, None, :]
        mask = (kseq == qseq) & (kpos <= qpos) & (kpos > qpos - window) & (kpos >= 0)
        mask = mask | (~lay["is_query"][e0:e1].view(-1, B, 1) & diag)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask[:, None], scale=scale)
        out[e0:e1] = o.transpose(1, 2).reshape(e1 - e0, nh, hs)
    return out[lay["tok_ext"]]


def swa_write_torch(k, v, k_cache, v_cache, pos0, cu_seqlens) -> None:
    """Store each sequence's last min(L, Wc) keys and values in their slots of ring rows 0..N-1, in place.

    Every slot is rewritten with what it holds after the pass (a new key, or its old one): no host sync, a fixed
    number of operators.
    """
    N, Wc = pos0.shape[0], k_cache.shape[1]
    cu = cu_seqlens.long()
    held = ring_positions(pos0 + (cu[1:] - cu[:-1]), Wc)  # [N, Wc] positions held after this pass
    new = held >= pos0[:, None]
    src = torch.where(new, cu[:-1, None] + held - pos0[:, None], 0)
    for x, cache in ((k, k_cache), (v, v_cache)):
        cache[:N] = torch.where(new[..., None, None], x[src].to(cache.dtype), cache[:N])


def swa_step_torch(q, k, v, k_cache, v_cache, pos, window, scale=None) -> torch.Tensor:
    """One query per row (q, k, v [B, nh, hs] at absolute positions pos [B]) over its ring and itself; then its
    key and value are written to slot pos % Wc, in place. No concatenation with the ring; it is upcast only when
    stored below fp32 (this is the CPU reference; the Triton step reads bf16 rings as stored)."""
    Wc, hs = k_cache.shape[1], q.shape[-1]
    scale = 1 / math.sqrt(hs) if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    held = ring_positions(pos, Wc)
    valid = (held >= 0) & (held > pos[:, None] - window)  # [B, Wc]
    qa = q.to(acc) * scale
    s_ring = torch.einsum("bhd,bjhd->bhj", qa, k_cache.to(acc)).masked_fill(~valid[:, None, :], float("-inf"))
    s_self = (qa * k.to(acc)).sum(-1, keepdim=True)  # [B, nh, 1]
    m = torch.maximum(s_ring.amax(-1, keepdim=True), s_self)
    p_ring, p_self = (s_ring - m).exp(), (s_self - m).exp()
    o = torch.einsum("bhj,bjhd->bhd", p_ring, v_cache.to(acc)) + p_self * v.to(acc)
    o = o / (p_ring.sum(-1, keepdim=True) + p_self)
    rows = torch.arange(q.shape[0], device=q.device)
    slot = torch.remainder(pos, Wc)
    k_cache[rows, slot] = k.to(k_cache.dtype)
    v_cache[rows, slot] = v.to(v_cache.dtype)
    return o.to(q.dtype)
