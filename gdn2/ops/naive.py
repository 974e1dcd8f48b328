"""Reference gated delta rule-2, one token at a time (the paper's Eq. 9/10).

Per head, with state S in R^{dk x dv}:
    Sbar_t = Diag(exp g_t) S_{t-1}                       decay the key axis
    S_t    = Sbar_t + k_t (w_t * v_t - Sbar_t^T (b_t * k_t))^T
    o_t    = scale * S_t^T q_t
i.e. S_t = (I - k_t (b_t*k_t)^T) Diag(exp g_t) S_{t-1} + k_t (w_t*v_t)^T.

Computes in float64 when the inputs are float64 and in float32 otherwise; it is the ground truth that every
fast path is tested against, so it stays a plain loop.
"""
from __future__ import annotations

import torch

from gdn2.ops.utils import expand_heads, l2norm, sequence_bounds


def naive_recurrent_gdn2(
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
    B, T, H, dk = q.shape
    HV, dv = v.shape[2], v.shape[3]
    scale = dk**-0.5 if scale is None else scale
    acc = torch.float64 if v.dtype == torch.float64 else torch.float32
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q, k, g, b = (expand_heads(x.to(acc), HV) for x in (q, k, g, b))
    v, w = v.to(acc), w.to(acc)

    bounds = sequence_bounds(B, T, cu_seqlens)
    o = torch.zeros(B, T, HV, dv, dtype=acc, device=v.device)
    finals = []
    for n, (row, start, end) in enumerate(bounds):
        if initial_state is not None:
            S = initial_state[n].to(acc).clone()
        else:
            S = torch.zeros(HV, dk, dv, dtype=acc, device=v.device)
        for t in range(start, end):
            S = S * g[row, t].exp()[..., None]
            erase = torch.einsum("hk,hkv->hv", b[row, t] * k[row, t], S)
            S = S + k[row, t][..., None] * (w[row, t] * v[row, t] - erase)[:, None, :]
            o[row, t] = torch.einsum("hk,hkv->hv", q[row, t] * scale, S)
        finals.append(S)
    final = torch.stack(finals) if output_final_state else None  # fp32, or fp64 for fp64 inputs
    return o.to(v.dtype), final
