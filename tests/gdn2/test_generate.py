"""Greedy decoding through Stepper / greedy_blocks equals a plain prefill + model.step loop."""
import pytest
import torch

from gdn2.config import Config
from gdn2.generate import Stepper, StepperCache, greedy_blocks
from gdn2.model import GPT

CUDA = torch.cuda.is_available()


def model_on(preset: str, device: str) -> GPT:
    """backend "auto" everywhere below: torch on the CPU, the Triton kernels on a GPU."""
    return GPT(Config.from_name(preset)).init_weights(seed=2).to(device).eval()


def prompts(B: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 90, (B,), generator=gen)
    return torch.randint(0, 512, (B, int(lengths.max())), generator=gen).to(device), lengths.to(device)


def reference(model: GPT, tokens, lengths, n: int) -> torch.Tensor:
    logits, state = model.prefill(tokens, lengths=lengths, logits="last")
    out = []
    for _ in range(n):
        nxt = logits.argmax(-1)
        out.append(nxt)
        logits, state = model.step(nxt, state)
    return torch.stack(out, 1).cpu()


def blocks(model: GPT, tokens, lengths, n: int, steppers=None, first_block=None) -> torch.Tensor:
    logits, state = model.prefill(tokens, lengths=lengths, logits="last")
    got = [t for t, _ in greedy_blocks(model, logits, state, n, steppers, first_block=first_block)]
    return torch.cat(got, 1)


@pytest.mark.parametrize("preset", ["tiny", "tiny_hybrid"])
@pytest.mark.parametrize("first_block", [1, 3, 8])
def test_blocks_equal_step_loop(preset, first_block):
    model = model_on(preset, "cpu")
    tokens, lengths = prompts(5, "cpu")
    ref = reference(model, tokens, lengths, 21)
    got = blocks(model, tokens, lengths, 21, first_block=first_block)
    assert got.shape == (5, 21) and torch.equal(got, ref)


def test_padded_rows_do_not_change_real_rows():
    model = model_on("tiny_hybrid", "cpu")
    tokens, lengths = prompts(3, "cpu", seed=1)
    ref = reference(model, tokens, lengths, 10)
    logits, state = model.prefill(tokens, lengths=lengths, logits="last")
    stepper = Stepper(model, rows=8, graph=False)
    stepper.load(state, logits)
    out = [stepper.tokens[:3].clone()]
    for _ in range(9):
        stepper.advance()
        out.append(stepper.tokens[:3].clone())
    assert torch.equal(torch.stack(out, 1), ref)
    assert stepper.state.pos[3:].eq(9).all()  # padding rows started from zero and stepped along


def test_nonfinite_logits_are_flagged():
    model = model_on("tiny", "cpu")
    tokens, lengths = prompts(2, "cpu")
    logits, state = model.prefill(tokens, lengths=lengths, logits="last")
    logits[1, 5] = float("nan")
    toks, bad = next(greedy_blocks(model, logits, state, 4, first_block=2))
    assert bad.tolist() == [[False, False], [True, False]]


def test_state_load_copies_rows_and_zeroes_the_rest():
    model = model_on("tiny_hybrid", "cpu")
    tokens, lengths = prompts(2, "cpu")
    _, state = model.prefill(tokens, lengths=lengths, logits="none")
    big = model.new_state(4)
    for layer in big.layers:
        for t in layer.values():
            t.fill_(7)
    big.load_(state)
    for mine, theirs in zip(big.layers, state.layers):
        for k in mine:
            assert torch.equal(mine[k][:2], theirs[k]) and mine[k][2:].eq(0).all()
    assert torch.equal(big.pos[:2], state.pos) and big.pos[2:].eq(0).all()


def test_cpu_cache_never_captures():
    cache = StepperCache(model_on("tiny", "cpu"))
    assert not cache.graphs and cache.get(3).rows == 3 and cache.get(3).graph is None


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset", ["tiny", "tiny_hybrid"])
def test_cuda_graph_decoding_equals_eager(preset, set_tf32):
    set_tf32(False)
    model = model_on(preset, "cuda")
    cache = StepperCache(model)
    assert cache.graphs
    for B in (1, 3, 8):  # 3 pads to a 4-row graph
        tokens, lengths = prompts(B, "cuda", seed=B)
        ref = reference(model, tokens, lengths, 40)
        got = blocks(model, tokens, lengths, 40, cache)
        assert cache.get(B).graph is not None and cache.get(B).rows >= B
        assert torch.equal(got, ref), f"B={B}: graph and eager greedy tokens differ"
