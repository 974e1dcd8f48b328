"""Chunkwise gated delta rule-2 in plain torch (chunk length C = 64; the paper's Eqs. 18-25, Appendix A).

Inside a chunk with start state S0 and local cumulative log-decay G_r = sum_{i<=r} g_i:
    T_rs  = sum_j b_r[j] k_r[j] k_s[j] exp(G_r[j] - G_s[j])    s < r
    A     = (I + T)^-1                                        unit lower triangular
    Y     = A (exp(G) * b * k)        U = A (w * v)           one A, two right-hand sides
    R     = U - Y S0                                          the chunk's delta rows
    O     = (exp(G) * q) S0 + Aqk R   Aqk_rs = sum_j q_r[j] k_s[j] exp(G_r[j] - G_s[j]),  s <= r
    S_end = Diag(exp(G_C)) S0 + (exp(G_C - G) * k)^T R
Decay ratios are always exp of a difference (never exp(G) / exp(G')), so chunks with strong decay
(g near -20 per token, G near -1300) stay finite and exact. Everything intra-chunk is batched over chunks;
only the S0 -> S_end hand-off is a loop over chunks.
"""
from __future__ import annotations

import torch

from gdn2.ops.utils import expand_heads, l2norm

CHUNK = 64
_MAX_PAIRWISE_ELEMENTS = 1 << 25  # bounds the [.., C, C, dk] decay tensor built per group of chunks


def chunk_gdn2_torch(
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
    """Same contract as `gdn2.ops.gated_delta_rule2`; see its docstring."""
    if cu_seqlens is not None:
        return _varlen(q, k, v, g, b, w, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm)
    B, T, H, dk = q.shape
    HV, dv = v.shape[2], v.shape[3]
    scale = dk**-0.5 if scale is None else scale
    out_dtype = v.dtype
    acc = torch.float64 if v.dtype == torch.float64 else torch.float32
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q, k, g, b = (expand_heads(x.to(acc), HV) for x in (q, k, g, b))
    v, w = v.to(acc), w.to(acc)
    q = q * scale

    NC = max(1, -(-T // CHUNK))
    pad = NC * CHUNK - T  # zero k and zero g leave the state untouched, so padding is exact

    def chunks(x: torch.Tensor) -> torch.Tensor:  # [B, T, HV, d] -> [B, HV, NC, C, d]
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
        return x.transpose(1, 2).reshape(B, HV, NC, CHUNK, x.shape[-1])

    q, k, v, g, b, w = map(chunks, (q, k, v, g, b, w))
    G = g.cumsum(-2)

    Y, U, Aqk = _intra_chunk(q, k, b, v * w, G)
    Qg = q * G.exp()
    Ktail = k * (G[..., -1:, :] - G).exp()
    decay_end = G[..., -1, :].exp()  # [B, HV, NC, dk]

    S = torch.zeros(B, HV, dk, dv, dtype=acc, device=v.device)
    if initial_state is not None:
        S = initial_state.to(acc).clone()
    o = torch.empty(B, HV, NC, CHUNK, dv, dtype=acc, device=v.device)
    for c in range(NC):
        R = U[:, :, c] - Y[:, :, c] @ S
        o[:, :, c] = Qg[:, :, c] @ S + Aqk[:, :, c] @ R
        S = decay_end[:, :, c, :, None] * S + Ktail[:, :, c].transpose(-1, -2) @ R
    o = o.reshape(B, HV, NC * CHUNK, dv)[:, :, :T].transpose(1, 2)
    final = S if output_final_state else None
    if final is not None and acc != torch.float64:
        final = final.float()
    return o.to(out_dtype), final


def _decay_scores(xs: list[torch.Tensor], k: torch.Tensor, G: torch.Tensor, sub: int = 16) -> list[torch.Tensor]:
    """For each x in xs: sum_j x_r[j] k_s[j] exp(G_r[j] - G_s[j]) for s <= r, per chunk: [.., NC, C, C].

    Pairs inside a sub-block of `sub` rows take the exact pairwise form; a pair across sub-blocks splits its
    ratio at the row just before the query's sub-block: exp(G_r - G_ref) * exp(G_ref - G_s), both factors <= 1,
    so nothing overflows, and the cross-block part is a matmul instead of a [C, C, dk] tensor. The decay
    factors are built once and shared by every x (the erase rows for T and the queries for Aqk).
    """
    *lead, NC, C, dk = k.shape
    sub = min(sub, C)
    nb = C // sub
    kb, Gb = (t.reshape(*lead, NC, nb, sub, dk) for t in (k, G))
    tri = torch.ones(sub, sub, dtype=torch.bool, device=k.device).tril()
    pair_k = (Gb[..., :, None, :] - Gb[..., None, :, :]).masked_fill(~tri[:, :, None], float("-inf")).exp()
    pair_k = pair_k * kb[..., None, :, :]  # [.., NC, nb, sub(r), sub(s), dk]
    blocks = torch.arange(nb, device=k.device)
    if nb > 1:
        ref = Gb[..., :-1, -1, :]  # [.., NC, nb-1, dk]: G at the last row before query blocks 1..nb-1
        q_decay = (Gb[..., 1:, :, :] - ref[..., None, :]).exp()
        before = torch.arange(C, device=k.device)[None, :] < (torch.arange(1, nb, device=k.device) * sub)[:, None]
        expo = (ref[..., :, None, :] - G[..., None, :, :]).masked_fill(~before[:, :, None], float("-inf"))
        k_decay = (k[..., None, :, :] * expo.exp()).transpose(-1, -2)  # [.., NC, nb-1, dk, C]
    out = []
    for x in xs:
        xb = x.reshape(*lead, NC, nb, sub, dk)
        intra = torch.einsum("...rj,...rsj->...rs", xb, pair_k)  # [.., NC, nb, sub, sub]
        scores = torch.zeros(*lead, NC, nb, sub, nb, sub, dtype=k.dtype, device=k.device)
        scores[..., blocks, :, blocks, :] = intra.movedim(-3, 0)
        if nb > 1:
            inter = (xb[..., 1:, :, :] * q_decay) @ k_decay  # [.., NC, nb-1, sub, C]
            scores[..., 1:, :, :, :] += inter.unflatten(-1, (nb, sub))
        out.append(scores.reshape(*lead, NC, C, C))
    return out


def _mild_decay_scores(xs: list[torch.Tensor], k: torch.Tensor, G: torch.Tensor) -> list[torch.Tensor]:
    """The same scores as `_decay_scores` when every chunk's total decay is mild (see SAFE_LOG_RANGE): the ratio
    factorises around the chunk's middle row, exp(G_r - G_m) * exp(G_m - G_s), and the scores are one matmul."""
    C = k.shape[-2]
    mid = G[..., C // 2 - 1 : C // 2, :]
    k_scaled = (k * (mid - G).exp()).transpose(-1, -2)
    causal = torch.ones(C, C, dtype=torch.bool, device=k.device).tril()
    return [((x * (G - mid).exp()) @ k_scaled).masked_fill(~causal, 0.0) for x in xs]


# Largest per-chunk total log-decay for which the factorised form stays far from overflow (both factors are
# bounded by exp(range / 2): e^40 in fp32, whose limit is e^88; e^300 in fp64).
SAFE_LOG_RANGE = {torch.float32: 80.0, torch.float64: 600.0}


def _intra_chunk(q, k, b, z, G):
    """Y = A (e^G b k), U = A z and the causal q-k decay matrix for every chunk.

    Chunks whose total decay is mild take the one-matmul scores, the others the exact pairwise form in groups
    that bound the [.., C, C, dk]-sized intermediates; each chunk's result is the same either way.
    """
    *lead, NC, C, dk = k.shape
    worst = (-G[..., -1, :]).amax(-1).reshape(-1, NC).amax(0)  # [NC]: the strongest channel's decay per chunk
    mild = worst < SAFE_LOG_RANGE.get(k.dtype, 80.0)
    per_chunk = C * C * dk * max(1, int(torch.tensor(lead).prod()))
    step = max(1, 4 * _MAX_PAIRWISE_ELEMENTS // per_chunk)
    Y = torch.empty_like(k)
    U = torch.empty_like(z)
    Aqk = k.new_empty(*lead, NC, C, C)
    mild_idx, strong_idx = mild.nonzero().squeeze(-1), (~mild).nonzero().squeeze(-1)
    groups = [(mild_idx, _mild_decay_scores)] if len(mild_idx) else []
    groups += [(strong_idx[i:i + step], _decay_scores) for i in range(0, len(strong_idx), step)]
    eye = torch.eye(C, dtype=k.dtype, device=k.device)
    strict = torch.ones(C, C, dtype=torch.bool, device=k.device).tril(-1)
    for idx, scores in groups:
        pick = lambda t: t.index_select(-3, idx)  # noqa: E731
        Gc, kc = pick(G), pick(k)
        erase = pick(b) * kc
        Tm, A = scores([erase, pick(q)], kc, Gc)
        rhs = torch.cat([Gc.exp() * erase, pick(z)], dim=-1)
        sol = torch.linalg.solve_triangular(eye + Tm * strict, rhs, upper=False, unitriangular=True)
        Y.index_copy_(-3, idx, sol[..., :dk])
        U.index_copy_(-3, idx, sol[..., dk:])
        Aqk.index_copy_(-3, idx, A)
    return Y, U, Aqk


def _varlen(q, k, v, g, b, w, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm):
    """Packed sequences -> a zero-padded dense batch (exact, see above) -> packed outputs."""
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens needs packed inputs with batch size 1, got B={q.shape[0]}")
    cu = cu_seqlens.to(device=q.device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    Tmax = int(lengths.max()) if len(lengths) else 0
    cols = torch.arange(Tmax, device=q.device)
    valid = cols[None, :] < lengths[:, None]
    idx = torch.where(valid, cu[:-1, None] + cols[None, :], 0)

    def dense(x: torch.Tensor) -> torch.Tensor:
        return x[0][idx] * valid[..., None, None].to(x.dtype)

    o, final = chunk_gdn2_torch(
        *map(dense, (q, k, v, g, b, w)), scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm,
    )
    out = torch.empty(1, q.shape[1], *o.shape[2:], dtype=o.dtype, device=o.device)
    out[0][idx[valid]] = o[valid]
    return out, final
