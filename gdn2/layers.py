"""Layers of the GDN-2 language model, bottom-up: the layer ops, norms, MLP, short convolution, the GDN-2 mixer,
SWA attention.

Parameter names equal the official lit_gpt names (q_proj, q_conv1d, f_proj.0, A_log, o_norm, attn.attn, ...), so an
official state dict loads without renaming. Every layer works on packed sequences: x is [total, d] holding N
sequences back to back, delimited by cu_seqlens [N + 1]; the state keeps one row per sequence.

The small ops around the mixers (norms, short convolution, gates, SwiGLU) come as one `LayerOps` table chosen once
per forward pass or decode step (`layer_ops`): the torch versions below, or the Triton kernels of
gdn2/layer_kernels.py with the same signatures. Both mixers take (x, state, ctx) with ctx a `Pass`, so a block
never asks which mixer it holds.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from gdn2.config import Config
from gdn2.ops import (
    gated_delta_rule2,
    gated_delta_rule2_step,
    resolve_backend,
    sliding_window_attention,
    sliding_window_attention_step,
    sliding_window_write,
)
from gdn2.ops.utils import expand_heads, packing_memo
from gdn2.state import pad_slots


# ---- the layer ops: torch versions (any device and dtype, differentiable) -----------------------------------------
def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last axis, computed in fp32, returned in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def gated_rms_norm_torch(o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float,
                         swish: bool) -> torch.Tensor:
    """RMSNorm of each head of o [rows, HV, N] times act(gate [rows, HV * N]) (swish or sigmoid), in o's dtype."""
    g = gate.unflatten(-1, o.shape[-2:]).float()
    act = g * torch.sigmoid(g) if swish else torch.sigmoid(g)
    return (rms_norm_torch(o, weight, eps).float() * act).to(o.dtype)


def swiglu_torch(h: torch.Tensor) -> torch.Tensor:
    """silu(a) * u for h = [a | u] of shape [rows, 2N]."""
    a, u = h.chunk(2, dim=-1)
    return F.silu(a) * u


def short_conv_torch(x: torch.Tensor, tail: torch.Tensor, weight: torch.Tensor, seq: torch.Tensor,
                     cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU(causal depthwise conv) of packed x [total, C] whose sequences continue `tail` [N, W-1, C]; weight
    [C, W]; seq [total]: the sequence of every token. Returns (y [total, C], new tails [N, W-1, C])."""
    W = weight.shape[-1]
    N, total = tail.shape[0], x.shape[0]
    seq = seq.long()
    # Lay each sequence out after its own tail in one buffer, then read W consecutive rows per token.
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    start = cu_seqlens[:-1] + torch.arange(N, device=x.device) * (W - 1)
    ext = x.new_empty(total + N * (W - 1), x.shape[1])
    tail_rows = start[:, None] + torch.arange(W - 1, device=x.device)
    ext[tail_rows.reshape(-1)] = tail.reshape(-1, x.shape[1]).to(x.dtype)
    local = torch.arange(total, device=x.device) - cu_seqlens[:-1][seq]
    ext[start[seq] + local + (W - 1)] = x
    window = ext[(start[seq] + local)[:, None] + torch.arange(W, device=x.device)]  # [total, W, C]
    y = F.silu((window * weight.t().to(x.dtype)).sum(1))
    new_tail = ext[(start + lengths)[:, None] + torch.arange(W - 1, device=x.device)]
    return y, new_tail.to(tail.dtype)


def short_conv_step_torch(x: torch.Tensor, tail: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [B, C] one token per row; updates tail [B, W-1, C] in place; weight [C, W]."""
    window = torch.cat([tail.to(x.dtype), x[:, None]], dim=1)
    tail.copy_(window[:, 1:])
    return F.silu((window * weight.t().to(x.dtype)).sum(1))


def gdn2_gates_torch(f: torch.Tensor, b_raw: torch.Tensor, w_raw: torch.Tensor | None, A_log: torch.Tensor,
                     dt_bias: torch.Tensor, heads: tuple[int, int, int], K: int, V: int, neg_eigval: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decay, erase and write gates (contract: gdn2.layer_kernels.gdn2_gates): g [rows, HD, K] fp32 log-decay,
    b [rows, H_b, K], w [rows, HV, V]."""
    HD, _, HV = heads
    if f.shape[-1] != HD:  # one decay per channel
        pre = f.float().unflatten(-1, (HD, K)) + dt_bias.float().view(HD, K)
    else:  # one per head
        pre = (f.float() + dt_bias.float())[..., None].expand(*f.shape[:-1], HD, K)
    g = -A_log.float().exp()[:, None] * F.softplus(pre)
    if w_raw is not None:  # separate erase and write gates
        b = torch.sigmoid(b_raw).unflatten(-1, (heads[1], K))
        w = torch.sigmoid(w_raw).unflatten(-1, (HV, V))
        return g, 2 * b if neg_eigval else b, w
    beta = torch.sigmoid(b_raw)  # one beta per value head for both
    if neg_eigval:
        beta = 2 * beta
    return g, beta[..., None].expand(*beta.shape, K), beta[..., None].expand(*beta.shape, V)


@dataclass(frozen=True)
class LayerOps:
    """The ops of one forward pass or step: torch or Triton, one signature each. `backend` (the resolved name)
    goes on to the recurrence and the attention in gdn2.ops."""

    backend: str
    rms_norm: Callable
    gated_rms_norm: Callable
    swiglu: Callable
    short_conv: Callable
    short_conv_step: Callable
    gdn2_gates: Callable


TORCH_OPS = LayerOps("torch", rms_norm_torch, gated_rms_norm_torch, swiglu_torch, short_conv_torch,
                     short_conv_step_torch, gdn2_gates_torch)


def triton_ops() -> LayerOps:
    """The Triton layer kernels (imported on first use: triton is optional)."""
    from gdn2 import layer_kernels as K

    return LayerOps("triton", K.rms_norm, K.gated_rms_norm, K.swiglu, K.short_conv, K.short_conv_step, K.gdn2_gates)


def layer_ops(backend: str, device: torch.device | str) -> LayerOps:
    """The ops for `backend` ("auto", "naive", "torch", "triton") on `device`: chosen once per pass."""
    name = resolve_backend(backend, torch.device(device))
    return triton_ops() if name == "triton" else replace(TORCH_OPS, backend=name)


@dataclass
class Pass:
    """What every layer of one forward pass (or one decode step) shares.

    pos: [N] tokens each row had consumed before this pass (the absolute position of its first new token).
    cu_seqlens: the packed sequences of a forward pass; None in a decode step (one token per row).
    cache_rows: [N] the ring row each sequence continues when the rings are read by reference (continuations of a
        shared context: several sequences per row); None: row n. Then the SWA layers give each sequence a ring of
        its own only if keep_cache.
    keep_cache: False when the caller discards the state after this pass: the SWA layers then write no ring.
    """

    ops: LayerOps
    pos: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    cache_rows: torch.Tensor | None = None
    keep_cache: bool = True


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, ops: LayerOps = TORCH_OPS) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


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

    def forward(self, x: torch.Tensor, ops: LayerOps = TORCH_OPS) -> torch.Tensor:
        h = F.linear(x, self.w12.get())
        return self.w3(ops.swiglu(h.view(-1, h.shape[-1])).view(*h.shape[:-1], -1))


class LLaMAMLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.swiglu = SwiGLU(config.n_embd, config.intermediate_size)

    def forward(self, x: torch.Tensor, ops: LayerOps = TORCH_OPS) -> torch.Tensor:
        return self.swiglu(x, ops)


class ShortConv(nn.Module):
    """Weights [C, 1, W] of a depthwise causal convolution + SiLU:
    y[t] = silu(sum_j weight[:, 0, j] * x[t - W + 1 + j]). The mixer runs q, k and v's as one (ops.short_conv)."""

    def __init__(self, channels: int, width: int = 4):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels, 1, width))


def sequence_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """int32 [total]: the packed sequence every token belongs to (once per forward pass: packing_memo)."""
    memo = packing_memo(cu_seqlens)
    key = ("sequence_ids", total)
    if key not in memo:
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        memo[key] = torch.repeat_interleave(
            torch.arange(len(lengths), device=cu_seqlens.device, dtype=torch.int32), lengths, output_size=total)
    return memo[key]


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

    by_reference = ()  # its matrix state is small enough to copy per continuation

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

    def state_shapes(self, ring: int | None = None) -> dict[str, tuple[int, ...]]:
        W = self.config.conv_size
        return {"S": (self.HV, self.K, self.V), "conv": (W - 1, 2 * self.H * self.K + self.HV * self.V)}

    def fit_state(self, state: dict[str, torch.Tensor], tokens_ahead: int | None) -> None:
        """Nothing to fit: the matrix state has one size (see CausalSelfAttention.fit_state)."""

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

    def _gates(self, p: dict[str, torch.Tensor], ops: LayerOps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-decay g [rows, HD, K] fp32, erase b [rows, H|HV, K], write w [rows, HV, V] from the projections."""
        c, K, V, HV = self.config, self.K, self.V, self.HV
        f = self.f_proj[1](p["f_proj.0"]) if c.decay == "channel" else p["a_proj"]
        heads = (c.num_decay_heads, self.H if c.beta == "channel" else HV, HV)
        g, b, w = ops.gdn2_gates(f, p["b_proj"], p.get("w_proj"), self.A_log, self.dt_bias, heads, K, V,
                                 c.allow_neg_eigval)
        if c.gate_mode != "full":
            b, w = apply_gate_mode(expand_heads(b, HV, dim=-2), w, c.gate_mode)
        return g, b.contiguous(), w.contiguous()

    def _output(self, o: torch.Tensor, p: dict[str, torch.Tensor], ops: LayerOps) -> torch.Tensor:
        """Per-head RMSNorm, times the activated output gate, then o_proj. o [rows, HV, V]."""
        c = self.config
        if c.out_gate == "none":
            return self.o_proj(self.o_norm(o, ops).flatten(-2))
        gate = self.g_proj[1](p["g_proj.0"]) if c.out_gate == "lowrank" else p["g_proj"]
        o = ops.gated_rms_norm(o, gate, self.o_norm.weight, self.o_norm.eps, c.gate_act == "swish")
        return self.o_proj(o.flatten(-2))

    def _conv_weight(self) -> torch.Tensor:
        w = self.conv.get()
        return w.view(w.shape[0], -1)  # [C, W]

    def forward(self, x: torch.Tensor, state: dict[str, torch.Tensor], ctx: Pass) -> torch.Tensor:
        """x [total, d] packed; updates state["S"] and state["conv"] to the end of every sequence."""
        ops, cu = ctx.ops, ctx.cu_seqlens
        p = self._project(x)
        mixed, state["conv"] = ops.short_conv(p["qkv"], state["conv"], self._conv_weight(),
                                              sequence_ids(cu, x.shape[0]), cu)
        q, k, v = self._qkv(mixed)
        g, b, w = self._gates(p, ops)
        o, state["S"] = gated_delta_rule2(
            q[None], k[None], v[None], g[None], b[None], w[None],
            initial_state=state["S"], output_final_state=True, cu_seqlens=cu,
            use_qk_l2norm=True, backend=ops.backend,
        )
        return self._output(o[0], p, ops)

    def step(self, x: torch.Tensor, state: dict[str, torch.Tensor], ctx: Pass) -> torch.Tensor:
        """x [B, d], one token per row; updates the state in place."""
        ops = ctx.ops
        p = self._project(x)
        mixed = ops.short_conv_step(p["qkv"], state["conv"], self._conv_weight())
        q, k, v = self._qkv(mixed)
        g, b, w = self._gates(p, ops)
        o = gated_delta_rule2_step(q, k, v, g, b, w, state["S"], use_qk_l2norm=True, backend=ops.backend)
        return self._output(o, p, ops)


def rotate(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """GPT-NeoX half-split rotary embedding over the whole head. x [.., T, nh, hs], pos [.., T] absolute."""
    hs = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, hs // 2, device=x.device, dtype=torch.float32) * 2 / hs)
    ang = pos.float()[..., None] * inv_freq  # [.., T, hs/2]
    cos, sin = ang.cos()[..., None, :], ang.sin()[..., None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Sliding-window softmax attention with RoPE; query i sees keys i - window + 1 .. i (flash-attn convention).

    State: a ring of the last window-1 rotated keys and values per row (gdn2/state.py, gdn2/ops/swa.py)."""

    by_reference = ("k", "v")  # state entries that continuations of one context may read by reference

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.nh, self.hs = config.n_head, config.n_embd // config.n_head
        self.attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)  # interleaved per head: q, k, v
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.window = config.local_window
        self.cache_len = max(1, config.local_window - 1)

    def state_shapes(self, ring: int | None = None) -> dict[str, tuple[int, ...]]:
        """ring: slots per row (default and at most window-1); fewer suit rows that will see fewer tokens."""
        cap = self.cache_len if ring is None else max(1, min(self.cache_len, ring))
        return {"k": (cap, self.nh, self.hs), "v": (cap, self.nh, self.hs)}

    def fit_state(self, state: dict[str, torch.Tensor], tokens_ahead: int | None) -> None:
        """Grow a short ring (fewer than window-1 slots) so it can take `tokens_ahead` more tokens per row (None:
        to full size), in place of state's entries. A ring shorter than window-1 has never wrapped (every row has
        seen at most that many tokens), so the key of position p sits in slot p under either size and growing is
        appending empty slots. Short rings spare memory: a context of 200 tokens needs 200 slots, not 2047."""
        cap = state["k"].shape[1]
        want = self.cache_len if tokens_ahead is None else min(self.cache_len, cap + tokens_ahead)
        for name in ("k", "v"):
            state[name] = pad_slots(state[name], want)

    def _qkv(self, x: torch.Tensor, pos: torch.Tensor):
        qkv = self.attn(x).unflatten(-1, (self.nh, 3, self.hs))
        q, k, v = qkv.unbind(-2)
        base = self.config.rope_base
        return rotate(q, pos, base), rotate(k, pos, base), v

    def forward(self, x: torch.Tensor, state: dict[str, torch.Tensor], ctx: Pass) -> torch.Tensor:
        """x [total, d] packed, continuing each row's ring (ctx.pos: tokens it had seen); updates the rings.

        One attention call for all sequences (gdn2.ops.sliding_window_attention), then each sequence's last
        window-1 keys and values go to their slots. With ctx.cache_rows the rings are read by reference and this
        pass's rows get rings of their own only when ctx.keep_cache.
        """
        cu = ctx.cu_seqlens
        seq = sequence_ids(cu, x.shape[0]).long()
        pos = (ctx.pos - cu[:-1])[seq] + torch.arange(x.shape[0], device=x.device)  # absolute token positions
        q, k, v = self._qkv(x, pos)
        backend = ctx.ops.backend
        o = sliding_window_attention(q, k, v, state["k"], state["v"], ctx.pos, cu, self.window,
                                     cache_rows=ctx.cache_rows, backend=backend)
        if not ctx.keep_cache:  # the caller discards the state after this pass
            return self.proj(o.flatten(-2))
        if ctx.cache_rows is not None:
            state["k"], state["v"] = state["k"][ctx.cache_rows], state["v"][ctx.cache_rows]
        sliding_window_write(k, v, state["k"], state["v"], ctx.pos, cu, backend=backend)
        return self.proj(o.flatten(-2))

    def step(self, x: torch.Tensor, state: dict[str, torch.Tensor], ctx: Pass) -> torch.Tensor:
        """x [B, d] at absolute positions ctx.pos [B]: attends to the ring in place plus itself, then stores
        itself in its slot (gdn2.ops.sliding_window_attention_step)."""
        q, k, v = self._qkv(x, ctx.pos)
        o = sliding_window_attention_step(q, k, v, state["k"], state["v"], ctx.pos, self.window,
                                          backend=ctx.ops.backend)
        return self.proj(o.flatten(-2))
