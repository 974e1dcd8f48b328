"""The GDN-2 language model (recurrent and hybrid families) with an explicit recurrent state.

    x = wte(tokens)
    for block in h:  x = x + mixer(norm_1(x));  x = x + mlp(norm_2(x))      mixer = GDN-2 or SWA
    logits = lm_head(ln_f(x))

Two entry points, nothing else:
    logits, state = model.prefill(tokens, state=None, lengths=None)   tokens [B, T]; right-padded rows of `lengths`
    logits, state = model.step(tokens, state)                         tokens [B]: one new token per row
Padding never enters a state: ragged rows are packed into sequences delimited by cu_seqlens before any layer runs.
Long prompts are prefilled in chunks of `chunk_tokens` columns, so peak memory depends on the chunk, not the length.
`prefill(..., rows=parent)` continues state row parent[i] in batch row i, reading the SWA rings by reference (many
continuations of one context). The kernels (`backend`) and the chunk are arguments of every call, not model state.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from gdn2.config import Config
from gdn2.layers import CausalSelfAttention, GatedDeltaNet2, LLaMAMLP, Pass, RMSNorm, layer_ops
from gdn2.ops import describe_packing
from gdn2.state import State

CHUNK_TOKENS = 16384  # default columns per prefill pass


class Block(nn.Module):
    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        self.is_gdn2 = config.is_gdn2_layer(layer_idx)
        self.norm_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = GatedDeltaNet2(config) if self.is_gdn2 else CausalSelfAttention(config)
        self.norm_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = LLaMAMLP(config)

    def forward(self, x: torch.Tensor, state: dict[str, torch.Tensor], ctx: Pass) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x, ctx.ops), state, ctx)
        return x + self.mlp(self.norm_2(x, ctx.ops), ctx.ops)

    def step(self, x: torch.Tensor, state: dict[str, torch.Tensor], ctx: Pass) -> torch.Tensor:
        x = x + self.attn.step(self.norm_1(x, ctx.ops), state, ctx)
        return x + self.mlp(self.norm_2(x, ctx.ops), ctx.ops)


class GPT(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            ln_f=RMSNorm(config.n_embd, config.norm_eps),
        ))

    def __setattr__(self, name: str, value) -> None:
        if name in ("backend", "chunk_tokens"):  # they were model attributes once: fail loudly, not silently
            raise AttributeError(f"GPT.{name} is no model setting: pass {name}=... to prefill/step/forward_packed")
        super().__setattr__(name, value)

    # ---- weights -----------------------------------------------------------------------------------------------
    FP32_PARAMS = ("A_log", "dt_bias")

    def to_dtype(self, dtype: torch.dtype) -> "GPT":
        """Cast weights, keeping the decay parameters in fp32 (they feed an exp of an fp32 log-decay)."""
        self.to(dtype)
        for name, p in self.named_parameters():
            if name.rsplit(".", 1)[-1] in self.FP32_PARAMS:
                p.data = p.data.float()
        return self

    def init_weights(self, seed: int = 0, std: float = 0.02) -> "GPT":
        """A random initialisation for tests, demos and benchmarks (not the official recipe)."""
        gen = torch.Generator().manual_seed(seed)
        # every RMSNorm gain starts at 1 (ln_f included: a 0.02 gain there flattens every next-token distribution)
        norms = {f"{m}.weight" for m, mod in self.named_modules() if isinstance(mod, RMSNorm)}
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "A_log":
                val = torch.empty(p.shape).uniform_(0, 2.7, generator=gen)  # decay rates 1..16 (Mamba's range)
            elif leaf == "dt_bias":
                dt = torch.exp(torch.empty(p.shape).uniform_(-6.9, -2.3, generator=gen))  # dt in [1e-3, 0.1]
                val = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
            elif name in norms:
                val = torch.ones(p.shape)
            elif p.dim() == 3:  # short conv
                val = torch.randn(p.shape, generator=gen) * 0.3
            elif leaf == "bias":
                val = torch.zeros(p.shape)
            else:
                val = torch.randn(p.shape, generator=gen) * std
            p.data.copy_(val.to(p.dtype))
        return self

    # ---- state -------------------------------------------------------------------------------------------------
    def new_state(self, batch_size: int, device: torch.device | str | None = None, ring: int | None = None) -> State:
        """A zero state. ring: SWA ring slots per row (default window-1); rows that will see at most `ring` tokens
        need no more, and prefill/step grow a short ring when its rows go further (CausalSelfAttention.fit_state)."""
        device = device or self.lm_head.weight.device
        dtype = self.lm_head.weight.dtype
        layers = []
        for block in self.transformer.h:
            shapes = block.attn.state_shapes(ring)
            state_dtype = torch.promote_types(torch.float32, dtype)  # fp32 (fp64 for fp64 models)
            layers.append({k: torch.zeros(batch_size, *s, device=device,
                                          dtype=state_dtype if k == "S" else dtype) for k, s in shapes.items()})
        return State(layers, torch.zeros(batch_size, dtype=torch.long, device=device))

    # ---- forward -----------------------------------------------------------------------------------------------
    def forward_packed(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor, state: State, backend: str = "auto",
                       *, cache_rows: torch.Tensor | None = None, keep_cache: bool = True) -> torch.Tensor:
        """tokens [total] packed; advances `state` in place; returns final hidden states [total, d].

        backend: "auto" | "torch" | "naive" | "triton" for every layer op (chosen once here). cache_rows / keep_cache:
        see layers.Pass (the SWA rings of `state` are then indexed by cache_rows, its other entries by sequence).
        """
        x = self.transformer.wte(tokens)
        ctx = Pass(layer_ops(backend, x.device), state.pos.clone(), cu_seqlens, cache_rows, keep_cache)
        for block, layer_state in zip(self.transformer.h, state.layers):
            x = block(x, layer_state, ctx)
        state.pos += cu_seqlens[1:] - cu_seqlens[:-1]
        return self.transformer.ln_f(x, ctx.ops)

    @torch.no_grad()
    def prefill(
        self,
        tokens: torch.Tensor,
        state: State | None = None,
        lengths: torch.Tensor | None = None,
        logits: str = "all",
        *,
        rows: torch.Tensor | None = None,
        return_state: bool = True,
        backend: str = "auto",
        chunk_tokens: int = CHUNK_TOKENS,
    ) -> tuple[torch.Tensor | None, State | None]:
        """Consume tokens [B, T] (row i holds lengths[i] tokens, right-padded) and continue `state` (zeros if None).

        logits: "all" -> [B, T, V] (zeros at padding), "last" -> [B, V] at each row's last token, "none" -> None.
        rows: [B] int, row i continues state row rows[i] (indices may repeat: n continuations of one context). The
            matrix states are expanded (small); the SWA rings are read by reference, and copied per row only if the
            state is returned or a later chunk needs it.
        return_state: False returns None for the state (and spares building it).
        backend, chunk_tokens: the kernels (see forward_packed) and the columns per forward pass.
        Returns (logits, state); the input state is not modified.
        Row bookkeeping happens on the host (pass `lengths` as a CPU tensor to spare one read-back), so a forward
        pass never waits for the device: the host can queue the next pass while this one runs.
        """
        B, T = tokens.shape
        device = tokens.device
        host_lengths = torch.full((B,), T) if lengths is None else lengths.detach().cpu().long()
        if B and int(host_lengths.min()) < 1:
            raise ValueError("every row needs at least one token (lengths >= 1)")
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        longest = int(host_lengths.max()) if B else 0
        parent = None
        if rows is not None:
            if state is None or len(rows) != B:
                raise ValueError(f"rows= maps each of the {B} batch rows to a row of a given state")
            parent = torch.as_tensor(rows, dtype=torch.long).to(device, non_blocking=True)
            state = self._shared_rows(state, parent)
        elif state is not None:
            state = state.clone()
        if state is None:
            state = self.new_state(B, device, ring=longest)  # rings of the size these rows need
        elif return_state or longest > chunk_tokens:  # rings written in this call must take its tokens
            self._fit_rings(state, longest)
        V = self.config.padded_vocab_size
        ldt = torch.promote_types(torch.float32, self.lm_head.weight.dtype)  # fp32, or fp64 for fp64 models
        out = None
        if logits == "all":
            out = torch.zeros(B, T, V, device=device, dtype=ldt)
        elif logits == "last":
            out = torch.zeros(B, V, device=device, dtype=ldt)
        to_dev = lambda t: t.to(device, non_blocking=True)  # noqa: E731  (host-built indices)
        starts = list(range(0, longest, chunk_tokens))
        for c0 in starts:
            seg = (host_lengths - c0).clamp(0, chunk_tokens)
            active = (seg > 0).nonzero().squeeze(-1)  # the first chunk holds every row (lengths >= 1)
            seg_rows = seg[active]
            cu = torch.zeros(len(active) + 1, dtype=torch.long)
            cu[1:] = seg_rows.cumsum(0)
            cols = c0 + torch.arange(int(seg_rows.max()))
            valid = cols[None, :] < (c0 + seg_rows)[:, None]
            flat = (active[:, None] * T + cols[None, :])[valid]  # packed token -> position in tokens.view(-1)
            cu_dev = to_dev(cu)
            describe_packing(cu_dev, cu.tolist())
            active_dev, flat_dev = to_dev(active), to_dev(flat)
            sub = state.select(active_dev) if len(active) < B else state
            shared = parent if c0 == 0 else None  # after the first chunk every row owns its ring (if kept)
            hidden = self.forward_packed(tokens.reshape(-1)[flat_dev], cu_dev, sub, backend, cache_rows=shared,
                                         keep_cache=return_state or c0 != starts[-1])
            if len(active) < B:
                state.assign(active_dev, sub)
            if logits == "all":
                out.view(B * T, V)[flat_dev] = self.lm_head(hidden).to(ldt)
            elif logits == "last":
                done = host_lengths[active] <= c0 + chunk_tokens  # rows whose last token lies in this chunk
                out[to_dev(active[done])] = self.lm_head(hidden[to_dev((cu[1:] - 1)[done])]).to(ldt)
        return out, (state if return_state else None)

    def _fit_rings(self, state: State, tokens_ahead: int | None) -> None:
        """Grow short SWA rings of `state` (in place of its entries) to take tokens_ahead more tokens per row."""
        for block, layer in zip(self.transformer.h, state.layers):
            block.attn.fit_state(layer, tokens_ahead)

    def _shared_rows(self, state: State, parent: torch.Tensor) -> State:
        """A working state whose row i continues state row parent[i]: copies of the small entries, the SWA rings by
        reference (the layers index them through Pass.cache_rows and never write into them)."""
        layers = [{k: t if k in block.attn.by_reference else t.index_select(0, parent) for k, t in layer.items()}
                  for block, layer in zip(self.transformer.h, state.layers)]
        return State(layers, state.pos.index_select(0, parent))

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: State, *, backend: str = "auto") -> tuple[torch.Tensor, State]:
        """One token per row (tokens [B]); updates `state` in place and returns logits [B, V] (fp32)."""
        self._fit_rings(state, None)  # a decode step writes slot pos % (window-1): full rings (a no-op once full)
        x = self.transformer.wte(tokens)
        ctx = Pass(layer_ops(backend, x.device), state.pos)
        for block, layer_state in zip(self.transformer.h, state.layers):
            x = block.step(x, layer_state, ctx)
        state.pos += 1
        logits = self.lm_head(self.transformer.ln_f(x, ctx.ops))
        return logits.to(torch.promote_types(torch.float32, logits.dtype)), state

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """Logits [B, T, V] of full rows from a zero state (the official model's forward)."""
        return self.prefill(tokens, backend=backend, return_state=False)[0]
