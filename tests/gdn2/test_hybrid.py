"""Hybrid models (GDN-2 + sliding-window attention) on the packed window ops: the vectorised torch path equals the
per-row reference (backend="naive": a loop over rows for the attention, the token loop for the recurrence) on
ragged batches, prompts 2-3x the window, prefill chunks smaller and larger than the window, prefills continued from
a state and decode steps; continuations scored through a shared context equal copied-state scoring; a prefill's
number of torch operators does not depend on the number of rows. The GPU test compares the fused kernels in bf16.
"""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gdn2.config import Config
from gdn2.model import GPT
from tests.conftest import rel_err

WINDOW = 8  # small, so that prompts of 2-3 windows stay cheap for the token-loop reference
CUDA = torch.cuda.is_available()


def hybrid(dtype=torch.float64, **overrides) -> GPT:
    cfg = Config.from_name("tiny_hybrid", local_window=WINDOW, **overrides)
    return GPT(cfg).init_weights(seed=4).to(dtype).eval()


def tokens(B, T, seed=0):
    return torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(seed))


def assert_states_close(a, b, tol):
    assert torch.equal(a.pos, b.pos)
    for la, lb in zip(a.layers, b.layers):
        for key in la:
            assert la[key].shape == lb[key].shape and rel_err(la[key], lb[key]) < tol, key


TOL = {torch.float64: 1e-11, torch.float32: 1e-4}


@pytest.mark.parametrize("dtype, chunk", [  # prefill passes shorter than, longer than, and not splitting the window
    (torch.float64, 7), (torch.float64, 16384), (torch.float32, 40)])
def test_torch_path_equals_the_per_row_reference(dtype, chunk):
    m = hybrid(dtype)
    x = tokens(4, 3 * WINDOW - 1, seed=1)
    lengths = torch.tensor([3 * WINDOW - 1, 2 * WINDOW + 3, 5, WINDOW - 1])  # ragged, odd, 2-3x the window
    tol = TOL[dtype]
    ref, s_ref = m.prefill(x, lengths=lengths, backend="naive", chunk_tokens=chunk)
    got, s = m.prefill(x, lengths=lengths, backend="torch", chunk_tokens=chunk)
    assert rel_err(got, ref) < tol
    assert_states_close(s, s_ref, tol)
    # continued from the states: rings partly filled (row 2), full and wrapped around (rows 0, 1)
    more, more_len = tokens(4, 2 * WINDOW + 1, seed=2), torch.tensor([2 * WINDOW + 1, 3, WINDOW, 1])
    ref, s_ref = m.prefill(more, s_ref, lengths=more_len, backend="naive", chunk_tokens=chunk)
    got, s = m.prefill(more, s, lengths=more_len, backend="torch", chunk_tokens=chunk)
    assert rel_err(got, ref) < tol
    assert_states_close(s, s_ref, tol)
    for t in tokens(WINDOW + 2, 4, seed=3):  # decode steps past a whole window: every slot rewritten
        ref, _ = m.step(t, s_ref, backend="naive")
        got, _ = m.step(t, s, backend="torch")
        assert rel_err(got, ref) < tol
    assert_states_close(s, s_ref, tol)


def test_prefill_then_steps_equal_one_prefill():
    m = hybrid()
    x = tokens(3, 3 * WINDOW, seed=4)
    full, _ = m.prefill(x)
    _, s = m.prefill(x[:, :WINDOW + 5])
    steps = [m.step(x[:, t], s)[0] for t in range(WINDOW + 5, 3 * WINDOW)]
    assert rel_err(torch.stack(steps, 1), full[:, WINDOW + 5:]) < 1e-11


def test_batch_composition_does_not_change_a_row():
    m = hybrid()
    x = tokens(5, 2 * WINDOW + 7, seed=5)
    lengths = torch.tensor([2 * WINDOW + 7, 9, 1, 2 * WINDOW, 20])
    _, ctx = m.prefill(tokens(5, 30, seed=6), lengths=torch.tensor([30, 3, 17, 30, 1]))
    batch, s = m.prefill(x, ctx, lengths=lengths)
    for i in (0, 2, 4):
        alone, s1 = m.prefill(x[i:i + 1, :lengths[i]], ctx.select([i]))
        assert rel_err(batch[i, :lengths[i]], alone[0]) < 1e-12
        assert_states_close(s.select([i]), s1, 1e-12)
    pair, _ = m.prefill(x[[4, 0]], ctx.select([4, 0]), lengths=lengths[[4, 0]])
    assert rel_err(pair[1], batch[0]) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk", [5, 16384])
def test_shared_context_scoring_equals_copied_states(dtype, chunk):
    """Continuations of two contexts, as the backend scores them: rows=parent reads each context's ring by
    reference; the result equals prefilling from copies of the context states (state.select)."""
    m = hybrid(dtype)
    ctx_tokens, ctx_len = tokens(2, 2 * WINDOW + 3, seed=7), torch.tensor([2 * WINDOW + 3, WINDOW - 4])
    _, ctx = m.prefill(ctx_tokens, lengths=ctx_len, logits="last")
    parent = torch.tensor([0, 1, 1, 0, 1])
    cont, cont_len = tokens(5, 12, seed=8), torch.tensor([12, 1, 7, 3, 11])
    want, s_want = m.prefill(cont, ctx.select(parent), lengths=cont_len, chunk_tokens=chunk)
    got, none = m.prefill(cont, ctx, lengths=cont_len, rows=parent, return_state=False, chunk_tokens=chunk)
    assert none is None and rel_err(got, want) < TOL[dtype]
    got, s = m.prefill(cont, ctx, lengths=cont_len, rows=parent, chunk_tokens=chunk)  # with rings of their own
    assert rel_err(got, want) < TOL[dtype]
    assert_states_close(s, s_want, TOL[dtype])
    nxt = tokens(1, 5, seed=9)[0]
    assert rel_err(m.step(nxt, s)[0], m.step(nxt, s_want)[0]) < TOL[dtype]
    for layer in ctx.layers:  # the context state is read, never written
        assert all(t.shape[0] == 2 for t in layer.values())


def test_shared_context_keeps_the_context_rings_unchanged():
    m = hybrid()
    _, ctx = m.prefill(tokens(2, 40, seed=10))
    before = ctx.clone()
    m.prefill(tokens(3, 30, seed=11), ctx, rows=torch.tensor([1, 0, 1]))
    for mine, theirs in zip(ctx.layers, before.layers):
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _prefill_ops(m: GPT, B: int, backend: str, shared: bool = False, T: int = 3 * WINDOW) -> int:
    gen = torch.Generator().manual_seed(B)
    lengths = torch.randint(1, T, (B,), generator=gen)
    lengths[0] = T  # the same longest row for every B
    x = torch.randint(0, 512, (B, T), generator=gen)
    _, state = m.prefill(tokens(B, WINDOW + 3, seed=B))  # rings wrapped around
    rows = torch.arange(B).flip(0) if shared else None
    with OpCount() as count:
        m.prefill(x, state, lengths=lengths, backend=backend, rows=rows)
    return sum(count.calls.values())


@pytest.mark.parametrize("shared", [False, True])
def test_prefill_operator_count_does_not_grow_with_rows(shared):
    m = hybrid(torch.float32)
    counts = [_prefill_ops(m, B, "torch", shared) for B in (2, 8)]
    assert counts[0] == counts[1], counts
    naive = [_prefill_ops(m, B, "naive", T=4) for B in (2, 8)]  # the per-row reference does grow: the count can tell
    assert naive[1] > naive[0]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("window", [64, 2048])
def test_gpu_fused_bf16_equals_float64_torch(window, set_tf32):
    """The Triton path of a hybrid in bf16 (fused SWA prefill/decode, layer kernels, chunked recurrence) against the
    float64 torch path of the same weights: prefill of ragged rows 2-3x the window, a continued prefill through
    a shared context, and decode steps from the CUDA-graph Stepper."""
    from gdn2.generate import Stepper

    set_tf32(False)
    cfg = Config.from_name("tiny_hybrid", local_window=window, n_embd=256, n_head=2)  # head size 128
    fast = GPT(cfg).init_weights(seed=5).cuda().to_dtype(torch.bfloat16).eval()
    exact = GPT(cfg).cuda().double().eval()
    exact.load_state_dict({k: v.double() for k, v in fast.state_dict().items()})
    T = 3 * window
    x = tokens(4, T, seed=12).cuda()
    lengths = torch.tensor([T, 2 * window + 1, 17, window - 1])
    a, sa = fast.prefill(x, lengths=lengths, backend="triton", chunk_tokens=window + 100)
    b, sb = exact.prefill(x, lengths=lengths, backend="torch", chunk_tokens=window + 100)
    assert rel_err(a, b) < 1e-2
    parent = torch.tensor([0, 0, 2, 1, 3, 3])
    cont, cont_len = tokens(6, 40, seed=13).cuda(), torch.tensor([40, 1, 9, 33, 2, 40])
    a2, _ = fast.prefill(cont, sa, lengths=cont_len, rows=parent, return_state=False, backend="triton")
    b2, _ = exact.prefill(cont, sb.select(parent.cuda()), lengths=cont_len, backend="torch")
    assert rel_err(a2, b2) < 1e-2
    last, _ = fast.prefill(x, lengths=lengths, logits="last", backend="triton")
    graph, eager = Stepper(fast, 4, graph=True, backend="triton"), Stepper(fast, 4, graph=False, backend="triton")
    graph.load(sa, last)
    eager.load(sa, last)
    for t in tokens(8, 4, seed=14).cuda():  # decode: the ring read in place, in bf16
        la, _ = fast.step(t, sa, backend="triton")
        lb, _ = exact.step(t, sb, backend="torch")
        assert rel_err(la, lb) < 1e-2
        graph.advance()
        eager.advance()
        assert torch.equal(graph.tokens, eager.tokens)  # the captured step is the eager step


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_short_rings_grow_like_full_rings(set_tf32):
    """Fused bf16 path with rings sized to short prompts (fewer tokens than window-1), grown by a continued prefill
    past the window and by CUDA-graph decode steps, against the float64 torch path that starts from full rings."""
    from gdn2.generate import Stepper

    set_tf32(False)
    window = 256
    cfg = Config.from_name("tiny_hybrid", local_window=window, n_embd=256, n_head=2)  # head size 128
    fast = GPT(cfg).init_weights(seed=6).cuda().to_dtype(torch.bfloat16).eval()
    exact = GPT(cfg).cuda().double().eval()
    exact.load_state_dict({k: v.double() for k, v in fast.state_dict().items()})
    x = tokens(3, 2 * window, seed=21).cuda()
    short_len = torch.tensor([30, 7, 100])
    a, sa = fast.prefill(x[:, :100], lengths=short_len, backend="triton")
    b, sb = exact.prefill(x[:, :100], exact.new_state(3), lengths=short_len, backend="torch")
    assert rel_err(a, b) < 1e-2
    swa = next(i for i, block in enumerate(fast.transformer.h) if not block.is_gdn2)
    assert sa.layers[swa]["k"].shape[1] == 100 and sb.layers[swa]["k"].shape[1] == window - 1
    graph = Stepper(fast, 4, graph=True, backend="triton")
    graph.load(sa, fast.prefill(x[:, :100], lengths=short_len, logits="last", backend="triton")[0])
    steps = tokens(4, 3, seed=22).cuda()
    for t in steps:
        graph.tokens[:3] = t
        graph.advance()
    ref_state = sb.clone()
    for t in steps:
        _, ref_state = exact.step(t, ref_state, backend="torch")
    assert rel_err(graph.state.layers[swa]["k"][:3].double(), ref_state.layers[swa]["k"]) < 1e-2
    more = torch.tensor([window + 50, window, 3])  # past the window: the short rings grow, then wrap
    a2, _ = fast.prefill(x[:, 100:100 + window + 50], sa, lengths=more, backend="triton")
    b2, _ = exact.prefill(x[:, 100:100 + window + 50], sb, lengths=more, backend="torch")
    assert rel_err(a2, b2) < 1e-2
