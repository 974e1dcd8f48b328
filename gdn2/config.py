"""Model configuration: one dataclass, the official presets, and the layer variants of related families.

Field names follow the official lit_gpt `Config`, so a preset or a `*.config.json` from a training run loads as is
(unknown fields are ignored). The variant fields at the bottom describe how a mixer's gates are parameterised;
their defaults are the official GDN-2 layer, other values let fla's KDA / Gated DeltaNet checkpoints run on the same
model and kernels (see ../shared/spec/checkpoint-formats.md section 3.5).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

GATE_MODES = ("full", "scalar_b", "scalar_w", "tied", "expanded_b")


@dataclass
class Config:
    name: str = "custom"
    vocab_size: int = 32000
    padding_multiple: int = 64
    padded_vocab_size: int | None = None
    n_layer: int = 18
    n_embd: int = 2304
    n_head: int = 18  # sliding-window attention heads (hybrid models only)
    intermediate_size: int = 6208
    norm_eps: float = 1e-5
    local_window: int = 2048  # SWA: each query sees itself and the window-1 previous tokens
    gdn2_per_layer: int = 1  # 1: every layer GDN-2; 2: even layers GDN-2, odd layers SWA
    gdn2_num_heads: int = 16
    gdn2_head_dim: int = 128
    gdn2_num_v_heads: int | None = None
    gdn2_expand_v: float = 1.0
    conv_size: int = 4
    rope_base: float = 10000.0
    # --- layer variants (official GDN-2 = the defaults) ---
    gate_act: str = "swish"  # output-gate activation: "swish" (official) or "sigmoid" (fla's GDN2 and KDA)
    out_gate: str = "lowrank"  # "lowrank": g_proj.0/g_proj.1(+bias); "full": one g_proj, no bias; "none"
    decay: str = "channel"  # "channel": f_proj.0/f_proj.1 + dt_bias per channel; "scalar": a_proj + dt_bias per head
    beta: str = "channel"  # "channel": b_proj [H*dk] and w_proj [HV*dv]; "scalar": one b_proj per head, b = w = beta
    decay_heads: str = "key"  # A_log / dt_bias / f_proj per "key" head (official) or per "value" head (fla)
    allow_neg_eigval: bool = False  # doubles b (channel gates) or beta (scalar gates)
    gate_mode: str = "full"  # run-time ablation of the paper's Table 5, one of GATE_MODES

    def __post_init__(self) -> None:
        if self.padded_vocab_size is None:
            m = self.padding_multiple
            self.padded_vocab_size = -(-self.vocab_size // m) * m
        if self.gate_mode not in GATE_MODES:
            raise ValueError(f"unknown gate_mode {self.gate_mode!r}: choose one of {', '.join(GATE_MODES)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} must be divisible by n_head {self.n_head}")

    # derived sizes
    @property
    def head_k(self) -> int:
        return self.gdn2_head_dim

    @property
    def head_v(self) -> int:
        return int(self.gdn2_head_dim * self.gdn2_expand_v)

    @property
    def num_v_heads(self) -> int:
        return self.gdn2_num_v_heads or self.gdn2_num_heads

    @property
    def num_decay_heads(self) -> int:
        return self.num_v_heads if self.decay_heads == "value" else self.gdn2_num_heads

    def is_gdn2_layer(self, i: int) -> bool:
        return self.gdn2_per_layer <= 0 or i % self.gdn2_per_layer == 0

    @property
    def is_hybrid(self) -> bool:
        return any(not self.is_gdn2_layer(i) for i in range(self.n_layer))

    @classmethod
    def from_name(cls, name: str, **overrides) -> "Config":
        if name not in PRESETS:
            import difflib

            close = difflib.get_close_matches(name, PRESETS, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; presets: {', '.join(PRESETS)}"
            raise ValueError(f"unknown model preset {name!r}{hint}")
        return cls(**{**PRESETS[name], "name": name, **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Build from a dict (a lit_gpt config JSON or our own), ignoring fields that do not apply here."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_COMMON = dict(vocab_size=32000, padding_multiple=64, norm_eps=1e-5, local_window=2048)
PRESETS: dict[str, dict] = {
    "gdn2_1.3B": dict(_COMMON, n_layer=18, n_embd=2304, n_head=18, intermediate_size=6208, gdn2_per_layer=1,
                      gdn2_num_heads=16, gdn2_head_dim=128),
    "swa_gdn2_1.3B": dict(_COMMON, n_layer=18, n_embd=2304, n_head=18, intermediate_size=6784, gdn2_per_layer=2,
                          gdn2_num_heads=16, gdn2_head_dim=128),
    "swa_gdn2_100M": dict(_COMMON, n_layer=12, n_embd=768, n_head=12, intermediate_size=2048, gdn2_per_layer=2,
                          gdn2_num_heads=4, gdn2_head_dim=64),
    "gdn2_12h_100M": dict(_COMMON, n_layer=12, n_embd=768, n_head=12, intermediate_size=2048, gdn2_per_layer=1,
                          gdn2_num_heads=12, gdn2_head_dim=64),
    "gdn2_12h_305M": dict(_COMMON, n_layer=12, n_embd=1024, n_head=16, intermediate_size=4352, gdn2_per_layer=1,
                          gdn2_num_heads=16, gdn2_head_dim=64),
    # tiny shapes for tests and demos (the official fixtures use the same sizes)
    "tiny": dict(vocab_size=512, padding_multiple=64, n_layer=2, n_embd=128, n_head=4, intermediate_size=256,
                 local_window=64, gdn2_per_layer=1, gdn2_num_heads=2, gdn2_head_dim=32),
    "tiny_hybrid": dict(vocab_size=512, padding_multiple=64, n_layer=4, n_embd=128, n_head=4, intermediate_size=256,
                        local_window=64, gdn2_per_layer=2, gdn2_num_heads=2, gdn2_head_dim=32),
}
