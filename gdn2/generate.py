"""Greedy decoding from a prefilled state, one `model.step` per token, replayed from a CUDA graph on GPUs.

A decode step of a recurrent model is a few hundred small kernels over a fixed-size state; launching them one by
one from Python costs more than running them. `Stepper` owns fixed buffers (the state, the current token, a
non-finite flag) so that the step, the argmax and the NaN check can be captured once as a CUDA graph and replayed
per token. The host only reads the tokens back every few steps (`greedy_blocks`), so the GPU is never waiting on
Python between tokens; the caller looks at each block (stop strings, EOS) and stops iterating when it is done.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from gdn2.model import GPT
from gdn2.state import State


class Stepper:
    """model.step + argmax for a fixed number of rows over fixed buffers; captured as a CUDA graph if `graph`.

    Rows beyond the caller's batch are padding: they start from a zero state and their tokens are ignored (rows
    never interact in a step).
    """

    def __init__(self, model: GPT, rows: int, graph: bool, pool: tuple | None = None, backend: str = "auto") -> None:
        self.model, self.rows, self.backend = model, rows, backend
        device = model.lm_head.weight.device
        self.state = model.new_state(rows, device)
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.nonfinite = torch.zeros(rows, dtype=torch.bool, device=device)  # of the logits behind `tokens`
        self.graph: torch.cuda.CUDAGraph | None = None
        if graph:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # compile and autotune outside the capture
                for _ in range(2):
                    self._step()
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self._step()

    def _step(self) -> None:
        logits, _ = self.model.step(self.tokens, self.state, backend=self.backend)
        self._choose(logits)

    def _choose(self, logits: torch.Tensor) -> None:
        """The greedy token of each of the first len(logits) rows, and whether its logits held NaN/inf."""
        n = logits.shape[0]
        self.nonfinite[:n] = ~torch.isfinite(logits).all(-1)
        self.tokens[:n] = logits.argmax(-1)

    def load(self, state: State, logits: torch.Tensor) -> None:
        """Start from `state` (its rows first, zeros after) with the tokens chosen from `logits` [n, V]."""
        self.state.load_(state)
        self.tokens.zero_()
        self.nonfinite.zero_()
        self._choose(logits)

    def advance(self) -> None:
        """Feed the current tokens; `tokens` and `nonfinite` then hold the next ones."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()


class StepperCache:
    """One captured Stepper per padded batch size (powers of two), sharing one CUDA graph memory pool.
    `backend` is the kernels' choice for every step (see GPT.step)."""

    def __init__(self, model: GPT, graphs: bool | None = None, backend: str = "auto") -> None:
        self.model, self.backend = model, backend
        device = model.lm_head.weight.device
        self.graphs = device.type == "cuda" if graphs is None else graphs
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self._steppers: dict[int, Stepper] = {}

    def get(self, rows: int) -> Stepper:
        padded = 1 << max(0, rows - 1).bit_length() if self.graphs else rows
        if padded not in self._steppers:
            if not self.graphs:
                self._steppers.clear()  # eager steppers are cheap: keep one
            try:
                self._steppers[padded] = Stepper(self.model, padded, self.graphs, self._pool, self.backend)
            except RuntimeError as err:  # e.g. a backend that syncs with the host cannot be captured
                logging.getLogger("gdn2").warning("CUDA graph capture failed (%s): decoding eagerly", str(err)[:200])
                self.graphs = False
                return self.get(rows)
        return self._steppers[padded]


def greedy_blocks(
    model: GPT,
    logits: torch.Tensor,
    state: State,
    max_new: int,
    steppers: StepperCache | None = None,
    first_block: int | None = None,
    max_block: int = 32,
    backend: str = "auto",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Greedy tokens after a prefill that returned `logits` [B, V] and `state`, in blocks.

    Yields (tokens [B, k], nonfinite [B, k]) on the CPU; nonfinite marks tokens chosen from logits holding NaN/inf.
    Blocks double from `first_block` (default: 1 on the CPU, where reading back costs nothing; 4 on GPUs) up to
    `max_block`; the caller stops iterating once every row is done. At most `max_new` tokens per row.
    `backend` applies when no `steppers` are given (theirs is used otherwise).
    """
    B = logits.shape[0]
    steppers = steppers or StepperCache(model, backend=backend)
    stepper = steppers.get(B)
    stepper.load(state, logits)
    block = first_block or (4 if steppers.graphs else 1)
    produced = 0
    while produced < max_new:
        k = min(block, max_new - produced)
        toks = torch.empty(stepper.rows, k, dtype=torch.long, device=stepper.tokens.device)
        bad = torch.empty(stepper.rows, k, dtype=torch.bool, device=stepper.tokens.device)
        for j in range(k):
            if produced + j:
                stepper.advance()
            toks[:, j] = stepper.tokens
            bad[:, j] = stepper.nonfinite
        produced += k
        block = min(2 * block, max_block)
        yield toks[:B].cpu(), bad[:B].cpu()
