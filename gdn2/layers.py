"""Layers of the GDN-2 language model, bottom-up: norms, MLP, short convolution, the GDN-2 mixer, SWA attention.

Parameter names equal the official lit_gpt names (q_proj, q_conv1d, f_proj.0, A_log, o_norm, attn.attn, ...), so an
official state dict loads without renaming. Every layer works on packed sequences: x is [total, d] holding N
sequences back to back, delimited by cu_seqlens [N + 1]; the state keeps one row per sequence.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gdn2.config import Config
from gdn2.ops import gated_delta_rule2, gated_delta_rule2_step
from gdn2.ops.utils import expand_heads, packing_memo


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, kernels: bool = False) -> torch.Tensor:
        if kernels:
            return layer_kernels().rms_norm(x, self.weight, self.eps)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


def layer_kernels():
    """The Triton layer kernels (imported on first use: triton is optional)."""
    from gdn2 import layer_kernels as mod

    return mod


class Stacked:
    """Parameters of several layers as row blocks of one tensor, so that one kernel serves them all (the input
    projections that read the same x become one matmul).

    The first use without autograd rebases the parameters onto views of one stacked tensor: names, shapes and
    values stay, no memory is added. If they move later (model.to, a replaced parameter) that is noticed and they
    are stacked again. With autograd on, the stack is a differentiable torch.cat.
    """

    def __init__(self, owner: nn.Module, names: list[str]):
        self.owner, self.names = owner, names
        self._slots: list[tuple[nn.Module, str]] | None = None  # (module, parameter name), resolved on first use
        self._stack: torch.Tensor | None = None

    def params(self) -> list[torch.Tensor]:
        if self._slots is None:
            self._slots = [(self.owner.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]) for n in self.names]
        return [m._parameters[n] for m, n in self._slots]  # looked up each time: a replaced parameter is seen

    def sizes(self) -> list[int]:
        return [p.shape[0] for p in self.params()]

    def get(self) -> torch.Tensor:
        ps = self.params()
        if torch.is_grad_enabled():
            return torch.cat(ps)
        W = self._stack
        if W is None or not self._views_of(W, ps):
            W = torch.cat([p.detach() for p in ps])
            offset = 0
            for p in ps:
                p.data = W[offset: offset + p.shape[0]].view(p.shape)
                offset += p.shape[0]
            self._stack = W
        return W

    @staticmethod
    def _views_of(W: torch.Tensor, ps: list[torch.Tensor]) -> bool:
        row = W[0].numel() * W.element_size()
        offset = 0
        for p in ps:
            if p.dtype != W.dtype or p.device != W.device or p.data_ptr() != W.data_ptr() + offset * row:
                return False
            offset += p.shape[0]
        return offset == W.shape[0]


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d, hidden, bias=False)  # gate (SiLU)
        self.w2 = nn.Linear(d, hidden, bias=False)  # up
        self.w3 = nn.Linear(hidden, d, bias=False)  # down
        self.w12 = Stacked(self, ["w1.weight", "w2.weight"])

    def forward(self, x: torch.Tensor, kernels: bool = False) -> torch.Tensor:
        h = F.linear(x, self.w12.get())
        if kernels:
            return self.w3(layer_kernels().swiglu(h.view(-1, h.shape[-1])).view(*h.shape[:-1], -1))
        a, u = h.chunk(2, dim=-1)
        return self.w3(F.silu(a) * u)


class LLaMAMLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.swiglu = SwiGLU(config.n_embd, config.intermediate_size)

    def forward(self, x: torch.Tensor, kernels: bool = False) -> torch.Tensor:
        return self.swiglu(x, kernels)


class ShortConv(nn.Module):
    """Weights [C, 1, W] of a depthwise causal convolution + SiLU:
    y[t] = silu(sum_j weight[:, 0, j] * x[t - W + 1 + j]). The mixer runs q, k and v's as one (short_conv)."""

    def __init__(self, channels: int, width: int = 4):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels, 1, width))


def short_conv(x: torch.Tensor, tail: torch.Tensor, weight: torch.Tensor, cu_seqlens: torch.Tensor,
               kernels: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [total, C] packed; tail [N, W-1, C] the inputs before each sequence; weight [C, 1, W].
    Returns (y, new tail)."""
    W = weight.shape[-1]
    N, total = tail.shape[0], x.shape[0]
    seq = _sequence_ids(cu_seqlens, total)
    if kernels:
        return layer_kernels().short_conv(x, tail, weight.view(-1, W), seq, cu_seqlens)
    # Lay each sequence out after its own tail in one buffer, then read W consecutive rows per token.
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    start = cu_seqlens[:-1] + torch.arange(N, device=x.device) * (W - 1)
    ext = x.new_empty(total + N * (W - 1), x.shape[1])
    tail_rows = start[:, None] + torch.arange(W - 1, device=x.device)
    ext[tail_rows.reshape(-1)] = tail.reshape(-1, x.shape[1]).to(x.dtype)
    local = torch.arange(total, device=x.device) - cu_seqlens[:-1][seq]
    ext[start[seq] + local + (W - 1)] = x
    window = ext[(start[seq] + local)[:, None] + torch.arange(W, device=x.device)]  # [total, W, C]
    y = F.silu((window * weight[:, 0, :].t().to(x.dtype)).sum(1))
    new_tail = ext[(start + lengths)[:, None] + torch.arange(W - 1, device=x.device)]
    return y, new_tail.to(tail.dtype)


def _sequence_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """int32 [total]: the packed sequence every token belongs to (once per forward pass: packing_memo)."""
    memo = packing_memo(cu_seqlens)
    key = ("sequence_ids", total)
    if key not in memo:
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        memo[key] = torch.repeat_interleave(
            torch.arange(len(lengths), device=cu_seqlens.device, dtype=torch.int32), lengths, output_size=total)
    return memo[key]


def short_conv_step(x: torch.Tensor, tail: torch.Tensor, weight: torch.Tensor, kernels: bool = False) -> torch.Tensor:
    """x [B, C] one token per row; updates tail [B, W-1, C] in place; weight [C, 1, W]."""
    if kernels:
        return layer_kernels().short_conv_step(x, tail, weight.view(weight.shape[0], -1))
    window = torch.cat([tail.to(x.dtype), x[:, None]], dim=1)
    tail.copy_(window[:, 1:])
    return F.silu((window * weight[:, 0, :].t().to(x.dtype)).sum(1))


def apply_gate_mode(b: torch.Tensor, w: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Table 5 ablations as run-time transforms of trained gates (b, w already on the value heads).

    scalar_b / scalar_w: the gate's mean over its channels, broadcast back. tied: b = w = the mean of the two
    scalars (a KDA-style shared beta). expanded_b: b * 2 (erase range [0, 2]).
    """
    if mode == "full":
        return b, w
    if mode == "scalar_b":
        return b.mean(-1, keepdim=True).expand_as(b), w
    if mode == "scalar_w":
        return b, w.mean(-1, keepdim=True).expand_as(w)
    if mode == "tied":
        s = 0.5 * (b.mean(-1, keepdim=True) + w.mean(-1, keepdim=True))
        return s.expand_as(b), s.expand_as(w)
    if mode == "expanded_b":
        return 2 * b, w
    raise ValueError(f"unknown gate_mode {mode!r}")


class GatedDeltaNet2(nn.Module):
    """The GDN-2 token mixer (paper section 3.5, official `lit_gpt/gdn2.py` parameter layout)."""

    def __init__(self, config: Config):
        super().__init__()
        c = config
        self.config = c
        d, H, K, V, HV = c.n_embd, c.gdn2_num_heads, c.head_k, c.head_v, c.num_v_heads
        self.H, self.K, self.V, self.HV = H, K, V, HV
        HD = c.num_decay_heads
        self.q_proj = nn.Linear(d, H * K, bias=False)
        self.k_proj = nn.Linear(d, H * K, bias=False)
        self.v_proj = nn.Linear(d, HV * V, bias=False)
        self.q_conv1d = ShortConv(H * K, c.conv_size)
        self.k_conv1d = ShortConv(H * K, c.conv_size)
        self.v_conv1d = ShortConv(HV * V, c.conv_size)
        if c.decay == "channel":
            self.f_proj = nn.Sequential(nn.Linear(d, V, bias=False), nn.Linear(V, HD * K, bias=False))
            self.dt_bias = nn.Parameter(torch.zeros(HD * K))
        else:  # scalar decay per head (fla Gated DeltaNet)
            self.a_proj = nn.Linear(d, HD, bias=False)
            self.dt_bias = nn.Parameter(torch.zeros(HD))
        self.A_log = nn.Parameter(torch.zeros(HD))
        if c.beta == "channel":
            self.b_proj = nn.Linear(d, H * K, bias=False)
            self.w_proj = nn.Linear(d, HV * V, bias=False)
        else:  # one beta per value head for erase and write (KDA, Gated DeltaNet)
            self.b_proj = nn.Linear(d, HV, bias=False)
        if c.out_gate == "lowrank":
            self.g_proj = nn.Sequential(nn.Linear(d, V, bias=False), nn.Linear(V, HV * V, bias=True))
        elif c.out_gate == "full":
            self.g_proj = nn.Linear(d, HV * V, bias=False)
        self.o_norm = RMSNorm(V, eps=c.norm_eps)
        self.o_proj = nn.Linear(HV * V, d, bias=False)

        # Everything that reads the layer input x is one matmul; q, k and v are one convolution.
        first = {"channel": "f_proj.0", "scalar": "a_proj"}[c.decay]
        gate_in = {"lowrank": ["g_proj.0"], "full": ["g_proj"], "none": []}[c.out_gate]
        self.in_names = ["q_proj", "k_proj", "v_proj", first, "b_proj"] + (["w_proj"] * (c.beta == "channel")) + gate_in
        self.in_proj = Stacked(self, [f"{n}.weight" for n in self.in_names])
        self.conv = Stacked(self, [f"{n}_conv1d.weight" for n in "qkv"])

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        W = self.config.conv_size
        return {"S": (self.HV, self.K, self.V), "conv": (W - 1, 2 * self.H * self.K + self.HV * self.V)}

    def _project(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every input projection of x [rows, d], as column slices of one matmul's output."""
        y = F.linear(x, self.in_proj.get())
        parts = dict(zip(self.in_names, y.split(self.in_proj.sizes(), dim=-1)))
        parts["qkv"] = y[..., : 2 * self.H * self.K + self.HV * self.V]  # q, k, v side by side: the conv's input
        return parts

    def _qkv(self, conv_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k [rows, H, K] and v [rows, HV, V]: column slices of the convolution's output."""
        KD = self.H * self.K
        q, k, v = conv_out.split([KD, KD, self.HV * self.V], dim=-1)
        return q.unflatten(-1, (self.H, self.K)), k.unflatten(-1, (self.H, self.K)), v.unflatten(-1, (self.HV, self.V))

    def _gates(self, p: dict[str, torch.Tensor], kernels: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-decay g [rows, HD, K] fp32, erase b [rows, H|HV, K], write w [rows, HV, V] from the projections."""
        c, K, V, HV = self.config, self.K, self.V, self.HV
        HD = c.num_decay_heads
        f = self.f_proj[1](p["f_proj.0"]) if c.decay == "channel" else p["a_proj"]
        w_raw = p["w_proj"] if c.beta == "channel" else None
        if kernels:
            g, b, w = layer_kernels().gdn2_gates(
                f, p["b_proj"], w_raw, self.A_log, self.dt_bias, (HD, self.H if c.beta == "channel" else HV, HV),
                K, V, c.allow_neg_eigval)
        else:
            if c.decay == "channel":
                pre = f.float().unflatten(-1, (HD, K)) + self.dt_bias.float().view(HD, K)
            else:
                pre = (f.float() + self.dt_bias.float())[..., None].expand(*f.shape[:-1], HD, K)
            g = -self.A_log.float().exp()[:, None] * F.softplus(pre)
            if c.beta == "channel":
                b = torch.sigmoid(p["b_proj"]).unflatten(-1, (self.H, K))
                w = torch.sigmoid(w_raw).unflatten(-1, (HV, V))
                if c.allow_neg_eigval:
                    b = 2 * b
            else:
                beta = torch.sigmoid(p["b_proj"])
                if c.allow_neg_eigval:
                    beta = 2 * beta
                b = beta[..., None].expand(*beta.shape, K)
                w = beta[..., None].expand(*beta.shape, V)
        if c.gate_mode != "full":
            b, w = apply_gate_mode(expand_heads(b, HV, dim=-2), w, c.gate_mode)
        return g, b.contiguous(), w.contiguous()

    def _output(self, o: torch.Tensor, p: dict[str, torch.Tensor], kernels: bool) -> torch.Tensor:
        """Per-head RMSNorm, times the activated output gate, then o_proj. o [rows, HV, V]."""
        c = self.config
        if c.out_gate == "none":
            return self.o_proj(self.o_norm(o, kernels).flatten(-2))
        gate = self.g_proj[1](p["g_proj.0"]) if c.out_gate == "lowrank" else p["g_proj"]
        if kernels:
            o = layer_kernels().gated_rms_norm(o, gate, self.o_norm.weight, self.o_norm.eps, c.gate_act == "swish")
        else:
            gate = gate.unflatten(-1, (self.HV, self.V)).float()
            act = gate * torch.sigmoid(gate) if c.gate_act == "swish" else torch.sigmoid(gate)
            o = (self.o_norm(o).float() * act).to(o.dtype)
        return self.o_proj(o.flatten(-2))

    def forward(self, x: torch.Tensor, state: dict[str, torch.Tensor], cu_seqlens: torch.Tensor,
                backend: str = "auto") -> torch.Tensor:
        """x [total, d] packed; updates state["S"] and state["conv"] to the end of every sequence."""
        kernels = backend == "triton"
        p = self._project(x)
        mixed, state["conv"] = short_conv(p["qkv"], state["conv"], self.conv.get(), cu_seqlens, kernels)
        q, k, v = self._qkv(mixed)
        g, b, w = self._gates(p, kernels)
        o, state["S"] = gated_delta_rule2(
            q[None], k[None], v[None], g[None], b[None], w[None],
            initial_state=state["S"], output_final_state=True, cu_seqlens=cu_seqlens,
            use_qk_l2norm=True, backend=backend,
        )
        return self._output(o[0], p, kernels)

    def step(self, x: torch.Tensor, state: dict[str, torch.Tensor], backend: str = "auto") -> torch.Tensor:
        """x [B, d], one token per row; updates the state in place."""
        kernels = backend == "triton"
        p = self._project(x)
        mixed = short_conv_step(p["qkv"], state["conv"], self.conv.get(), kernels)
        q, k, v = self._qkv(mixed)
        g, b, w = self._gates(p, kernels)
        o = gated_delta_rule2_step(q, k, v, g, b, w, state["S"], use_qk_l2norm=True, backend=backend)
        return self._output(o, p, kernels)


def rotate(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """GPT-NeoX half-split rotary embedding over the whole head. x [.., T, nh, hs], pos [.., T] absolute."""
    hs = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, hs // 2, device=x.device, dtype=torch.float32) * 2 / hs)
    ang = pos.float()[..., None] * inv_freq  # [.., T, hs/2]
    cos, sin = ang.cos()[..., None, :], ang.sin()[..., None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Sliding-window softmax attention with RoPE; query i sees keys i - window + 1 .. i (flash-attn convention)."""

    Q_BLOCK = 1024  # queries per attention call in prefill: bounds the score matrix for long prompts

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.nh, self.hs = config.n_head, config.n_embd // config.n_head
        self.attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)  # interleaved per head: q, k, v
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.window = config.local_window
        self.cache_len = max(1, config.local_window - 1)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"k": (self.cache_len, self.nh, self.hs), "v": (self.cache_len, self.nh, self.hs)}

    def _qkv(self, x: torch.Tensor, pos: torch.Tensor):
        qkv = self.attn(x).unflatten(-1, (self.nh, 3, self.hs))
        q, k, v = qkv.unbind(-2)
        base = self.config.rope_base
        return rotate(q, pos, base), rotate(k, pos, base), v

    def _cached_positions(self, n_seen: torch.Tensor) -> torch.Tensor:
        """Absolute position held by every ring slot (negative when the slot is still empty). [N, cache_len]"""
        Wc = self.cache_len
        slots = torch.arange(Wc, device=n_seen.device)
        last = n_seen[:, None] - 1
        return last - torch.remainder(last - slots, Wc)

    def forward(self, x: torch.Tensor, state: dict[str, torch.Tensor], cu_seqlens: torch.Tensor,
                pos0: torch.Tensor) -> torch.Tensor:
        """x [total, d] packed; pos0 [N] tokens each row had consumed before; updates the ring buffers."""
        cu = cu_seqlens.tolist()
        outs = []
        Wc = self.cache_len
        cache_pos = self._cached_positions(pos0)
        for n in range(len(cu) - 1):
            L = cu[n + 1] - cu[n]
            p = int(pos0[n]) + torch.arange(L, device=x.device)
            q, k, v = self._qkv(x[cu[n]:cu[n + 1]], p)
            keys = torch.cat([state["k"][n].to(k.dtype), k])
            vals = torch.cat([state["v"][n].to(v.dtype), v])
            kpos = torch.cat([cache_pos[n], p])
            kvalid = torch.cat([cache_pos[n] >= 0, torch.ones(L, dtype=torch.bool, device=x.device)])
            outs.append(self._attend_blocks(q, keys, vals, p, kpos, kvalid))
            keep = min(L, Wc)  # only the last window-1 keys can be seen by later tokens
            slots = torch.remainder(p[L - keep:], Wc)
            state["k"][n].index_copy_(0, slots, k[L - keep:].to(state["k"].dtype))
            state["v"][n].index_copy_(0, slots, v[L - keep:].to(state["v"].dtype))
        return self.proj(torch.cat(outs).flatten(-2))

    def _attend_blocks(self, q, keys, vals, qpos, kpos, kvalid):
        out = []
        for s in range(0, q.shape[0], self.Q_BLOCK):
            qp = qpos[s:s + self.Q_BLOCK]
            mask = kvalid & (kpos[None, :] <= qp[:, None]) & (kpos[None, :] > qp[:, None] - self.window)
            cols = mask.any(0).nonzero().squeeze(-1)  # only keys some query of the block can see
            lo, hi = int(cols.min()), int(cols.max()) + 1
            o = F.scaled_dot_product_attention(
                q[s:s + self.Q_BLOCK].transpose(0, 1), keys[lo:hi].transpose(0, 1), vals[lo:hi].transpose(0, 1),
                attn_mask=mask[:, lo:hi],
            )
            out.append(o.transpose(0, 1))
        return torch.cat(out)

    def step(self, x: torch.Tensor, state: dict[str, torch.Tensor], pos: torch.Tensor) -> torch.Tensor:
        """x [B, d] at absolute positions pos [B]; attends to the ring buffer plus itself, then stores itself."""
        q, k, v = self._qkv(x[:, None], pos[:, None])  # [B, 1, nh, hs]
        cache_pos = self._cached_positions(pos)
        valid = (cache_pos >= 0) & (cache_pos > pos[:, None] - self.window)
        keys = torch.cat([state["k"].to(k.dtype), k], dim=1)  # [B, Wc + 1, nh, hs]
        vals = torch.cat([state["v"].to(v.dtype), v], dim=1)
        mask = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)  # [B, Wc + 1]
        acc = torch.promote_types(q.dtype, torch.float32)
        scores = torch.einsum("bhd,bjhd->bhj", q[:, 0].to(acc), keys.to(acc)) / math.sqrt(self.hs)
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        o = torch.einsum("bhj,bjhd->bhd", scores.softmax(-1), vals.to(acc)).to(x.dtype)
        rows = torch.arange(x.shape[0], device=x.device)
        slot = torch.remainder(pos, self.cache_len)
        state["k"][rows, slot] = k[:, 0].to(state["k"].dtype)
        state["v"][rows, slot] = v[:, 0].to(state["v"].dtype)
        return self.proj(o.flatten(-2))
