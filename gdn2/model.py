"""The GDN-2 language model (recurrent and hybrid families) with an explicit recurrent state.

    x = wte(tokens)
    for block in h:  x = x + mixer(norm_1(x));  x = x + mlp(norm_2(x))      mixer = GDN-2 or SWA
    logits = lm_head(ln_f(x))

Two entry points, nothing else:
    logits, state = model.prefill(tokens, state=None, lengths=None)   tokens [B, T]; right-padded rows of `lengths`
    logits, state = model.step(tokens, state)                         tokens [B]: one new token per row
Padding never enters a state: ragged rows are packed into sequences delimited by cu_seqlens before any layer runs.
Long prompts are prefilled in chunks of `chunk_tokens` columns, so peak memory depends on the chunk, not the length.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from gdn2.config import Config
from gdn2.layers import CausalSelfAttention, GatedDeltaNet2, LLaMAMLP, RMSNorm
from gdn2.ops import describe_packing, resolve_backend
from gdn2.state import State


class Block(nn.Module):
    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        self.is_gdn2 = config.is_gdn2_layer(layer_idx)
        self.norm_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = GatedDeltaNet2(config) if self.is_gdn2 else CausalSelfAttention(config)
        self.norm_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = LLaMAMLP(config)

    def forward(self, x, state, cu_seqlens, pos0, backend):
        kernels = backend == "triton"  # Triton kernels for the layers around the recurrence too
        h = self.norm_1(x, kernels)
        x = x + (self.attn(h, state, cu_seqlens, backend) if self.is_gdn2 else self.attn(h, state, cu_seqlens, pos0))
        return x + self.mlp(self.norm_2(x, kernels), kernels)

    def step(self, x, state, pos, backend):
        kernels = backend == "triton"
        h = self.norm_1(x, kernels)
        x = x + (self.attn.step(h, state, backend) if self.is_gdn2 else self.attn.step(h, state, pos))
        return x + self.mlp(self.norm_2(x, kernels), kernels)


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
        self.backend = "auto"  # recurrence backend: auto | torch | naive | triton
        self.chunk_tokens = 16384  # columns per prefill pass

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
    def new_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        device = device or self.lm_head.weight.device
        dtype = self.lm_head.weight.dtype
        layers = []
        for block in self.transformer.h:
            shapes = block.attn.state_shapes()
            state_dtype = torch.promote_types(torch.float32, dtype)  # fp32 (fp64 for fp64 models)
            layers.append({k: torch.zeros(batch_size, *s, device=device,
                                          dtype=state_dtype if k == "S" else dtype) for k, s in shapes.items()})
        return State(layers, torch.zeros(batch_size, dtype=torch.long, device=device))

    # ---- forward -----------------------------------------------------------------------------------------------
    def forward_packed(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor, state: State) -> torch.Tensor:
        """tokens [total] packed; advances `state` in place; returns final hidden states [total, d]."""
        x = self.transformer.wte(tokens)
        pos0 = state.pos.clone()
        backend = resolve_backend(self.backend, x.device)
        for block, layer_state in zip(self.transformer.h, state.layers):
            x = block(x, layer_state, cu_seqlens, pos0, backend)
        state.pos += cu_seqlens[1:] - cu_seqlens[:-1]
        return self.transformer.ln_f(x, backend == "triton")

    @torch.no_grad()
    def prefill(
        self,
        tokens: torch.Tensor,
        state: State | None = None,
        lengths: torch.Tensor | None = None,
        logits: str = "all",
    ) -> tuple[torch.Tensor | None, State]:
        """Consume tokens [B, T] (row i holds lengths[i] tokens, right-padded) and continue `state` (zeros if None).

        logits: "all" -> [B, T, V] (zeros at padding), "last" -> [B, V] at each row's last token, "none" -> None.
        Returns (logits, state); the input state is not modified.
        Row bookkeeping happens on the host (pass `lengths` as a CPU tensor to spare one read-back), so a forward
        pass never waits for the device: the host can queue the next pass while this one runs.
        """
        B, T = tokens.shape
        device = tokens.device
        host_lengths = torch.full((B,), T) if lengths is None else lengths.detach().cpu().long()
        if B and int(host_lengths.min()) < 1:
            raise ValueError("every row needs at least one token (lengths >= 1)")
        state = self.new_state(B, device) if state is None else state.clone()
        V = self.config.padded_vocab_size
        ldt = torch.promote_types(torch.float32, self.lm_head.weight.dtype)  # fp32, or fp64 for fp64 models
        out = None
        if logits == "all":
            out = torch.zeros(B, T, V, device=device, dtype=ldt)
        elif logits == "last":
            out = torch.zeros(B, V, device=device, dtype=ldt)
        to_dev = lambda t: t.to(device, non_blocking=True)  # noqa: E731  (host-built indices)
        for c0 in range(0, int(host_lengths.max()) if B else 0, self.chunk_tokens):
            seg = (host_lengths - c0).clamp(0, self.chunk_tokens)
            rows = (seg > 0).nonzero().squeeze(-1)
            seg_rows = seg[rows]
            cu = torch.zeros(len(rows) + 1, dtype=torch.long)
            cu[1:] = seg_rows.cumsum(0)
            cols = c0 + torch.arange(int(seg_rows.max()))
            valid = cols[None, :] < (c0 + seg_rows)[:, None]
            flat = (rows[:, None] * T + cols[None, :])[valid]  # packed token -> position in tokens.view(-1)
            cu_dev = to_dev(cu)
            describe_packing(cu_dev, cu.tolist())
            rows_dev, flat_dev = to_dev(rows), to_dev(flat)
            sub = state.select(rows_dev) if len(rows) < B else state
            hidden = self.forward_packed(tokens.reshape(-1)[flat_dev], cu_dev, sub)
            if len(rows) < B:
                state.assign(rows_dev, sub)
            if logits == "all":
                out.view(B * T, V)[flat_dev] = self.lm_head(hidden).to(ldt)
            elif logits == "last":
                done = host_lengths[rows] <= c0 + self.chunk_tokens  # rows whose last token lies in this chunk
                out[to_dev(rows[done])] = self.lm_head(hidden[to_dev((cu[1:] - 1)[done])]).to(ldt)
        return out, state

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One token per row (tokens [B]); updates `state` in place and returns logits [B, V] (fp32)."""
        x = self.transformer.wte(tokens)
        backend = resolve_backend(self.backend, x.device)
        for block, layer_state in zip(self.transformer.h, state.layers):
            x = block.step(x, layer_state, state.pos, backend)
        state.pos += 1
        logits = self.lm_head(self.transformer.ln_f(x, backend == "triton"))
        return logits.to(torch.promote_types(torch.float32, logits.dtype)), state

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] of full rows from a zero state (the official model's forward)."""
        return self.prefill(tokens)[0]
