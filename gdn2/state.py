"""The recurrent state of a batch of sequences, as a first-class object.

Per GDN-2 layer: the fp32 matrix state S [N, HV, dk, dv] and the short-conv tails [N, W-1, channels] (the last
W-1 conv inputs of q, k and v side by side). Per SWA layer: a ring buffer of rotated keys and values
[N, window-1, heads, head_size]; the key of absolute position p lives in slot p % (window-1). A ring may be
shorter (R < window-1 slots) while no row has seen more than R tokens: it has never wrapped, position p sits in
slot p under either size, so a short ring is a full one cut after slot R (GPT.prefill sizes rings to what the
rows will hold and grows them when they go further). `pos` [N] counts the tokens each row has consumed.
Every tensor has the row axis first, so selecting rows, repeating a row n times and cloning are one uniform
operation. To score n continuations of one context, `GPT.prefill(..., rows=parent)` continues the context's rows
without copying its rings (select would copy window-1 keys per continuation).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class State:
    layers: list[dict[str, torch.Tensor]]
    pos: torch.Tensor  # [N] int64, tokens consumed per row

    @property
    def num_rows(self) -> int:
        return int(self.pos.shape[0])

    def _map(self, fn) -> "State":
        return State([{k: fn(t) for k, t in layer.items()} for layer in self.layers], fn(self.pos))

    def clone(self) -> "State":
        return self._map(torch.clone)

    def select(self, rows: torch.Tensor | list[int]) -> "State":
        """The state of the given rows (a new State; indices may repeat)."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.pos.device)
        return self._map(lambda t: t.index_select(0, idx))

    def expand(self, repeats: int | torch.Tensor | list[int]) -> "State":
        """Repeat row i repeats[i] times (or every row `repeats` times), keeping row order."""
        reps = torch.as_tensor(repeats, device=self.pos.device)
        return self._map(lambda t: t.repeat_interleave(reps, dim=0))

    def assign(self, rows: torch.Tensor | list[int], other: "State") -> None:
        """Write `other`'s rows into these rows, in place (a ring shorter than other's is grown first)."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.pos.device)
        for mine, theirs in zip(self.layers, other.layers):
            for k in mine:
                slots = max(mine[k].shape[1], theirs[k].shape[1])
                mine[k] = pad_slots(mine[k], slots)
                mine[k].index_copy_(0, idx, pad_slots(theirs[k], slots))
        self.pos.index_copy_(0, idx, other.pos)

    def load_(self, other: "State") -> None:
        """Copy `other` into rows 0..n-1 and zero the rest, in place (the addresses stay, for CUDA graphs). A short
        ring of `other` fills the first slots of a longer one here (the module docstring says why that is exact)."""
        n = other.num_rows
        for mine, theirs in zip(self.layers, other.layers):
            for k, t in mine.items():
                src = theirs[k]
                t[:n, :src.shape[1]].copy_(src)
                t[:n, src.shape[1]:].zero_()  # slots a short ring lacks
                t[n:].zero_()
        self.pos[:n].copy_(other.pos)
        self.pos[n:].zero_()

    def to(self, device: torch.device | str) -> "State":
        return self._map(lambda t: t.to(device))

    @staticmethod
    def cat(states: list["State"]) -> "State":
        """The rows of all states, in order (short rings padded to the longest, as load_ does)."""
        def joined(ts: list[torch.Tensor]) -> torch.Tensor:
            slots = max(t.shape[1] for t in ts)
            return torch.cat([pad_slots(t, slots) for t in ts])

        layers = [{k: joined([s.layers[i][k] for s in states]) for k in states[0].layers[i]}
                  for i in range(len(states[0].layers))]
        return State(layers, torch.cat([s.pos for s in states]))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values())


def pad_slots(t: torch.Tensor, slots: int) -> torch.Tensor:
    """t with axis 1 zero-padded to `slots` entries (t itself when it has them): a short ring made longer."""
    if t.shape[1] >= slots:
        return t
    return torch.cat([t, t.new_zeros(t.shape[0], slots - t.shape[1], *t.shape[2:])], dim=1)
