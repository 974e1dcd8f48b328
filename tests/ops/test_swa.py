"""Sliding-window attention over a ring buffer: the vectorised torch path and the Triton kernels against the naive
per-sequence reference (float64), on ragged packings that continue rings empty, partly filled, full and wrapped
around, with sequences sharing a ring row, windows crossing the ring/token boundary and prompts 2-3x the window.

Without CUDA the Triton kernels run under TRITON_INTERPRET=1 at small shapes; the bf16 comparisons need a GPU.
"""
import importlib
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

from gdn2.ops import sliding_window_attention, sliding_window_attention_step, sliding_window_write  # noqa: E402
from gdn2.ops.swa import ring_positions, swa_prefill_naive  # noqa: E402
from tests.conftest import rel_err  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def _triton():
    """The kernel module, rebuilt under the interpreter when an earlier import compiled it for a GPU."""
    pytest.importorskip("triton")
    mod = importlib.import_module("gdn2.ops.swa_triton")
    if not CUDA and type(mod._prefill_kernel).__name__ != "InterpretedFunction":
        mod = importlib.reload(mod)
    return mod


def case(lengths, pos0, window, nh=2, hs=16, M=None, cache_rows=None, seed=0, dtype=torch.float64, device="cpu"):
    """Random packed q, k, v and rings whose slots hold what a real history would (zeros where still empty)."""
    gen = torch.Generator().manual_seed(seed)
    total, Wc = sum(lengths), window - 1
    M = len(lengths) if M is None else M
    q, k, v = (torch.randn(total, nh, hs, generator=gen, dtype=torch.float64) for _ in range(3))
    kc, vc = (torch.randn(M, Wc, nh, hs, generator=gen, dtype=torch.float64) for _ in range(2))
    seen = torch.tensor(pos0 if cache_rows is None else [0] * M, dtype=torch.long)
    if cache_rows is not None:
        for n, r in enumerate(cache_rows):
            seen[r] = pos0[n]
    empty = ring_positions(seen, Wc) < 0
    kc[empty], vc[empty] = 0, 0
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    rows = None if cache_rows is None else torch.tensor(cache_rows, device=device)
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return dict(q=to(q), k=to(k), v=to(v), k_cache=to(kc), v_cache=to(vc), pos0=torch.tensor(pos0).to(device),
                cu_seqlens=cu.to(device), window=window, cache_rows=rows)


CASES = {
    "fresh rows, odd lengths": ([5, 1, 17, 9], [0, 0, 0, 0], 8),
    "rings partly filled": ([3, 12, 7], [2, 5, 1], 8),
    "rings full and wrapped": ([9, 4, 21], [7, 30, 100], 8),
    "prompts 2-3x the window": ([24, 19, 3], [0, 13, 40], 9),
    "one sequence": ([40], [11], 16),
    "window of 2": ([6, 3], [4, 0], 2),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_prefill_equals_naive(name, dtype):
    c = case(*CASES[name], dtype=dtype)
    got = sliding_window_attention(**c, backend="torch")
    want = swa_prefill_naive(**case(*CASES[name]))
    assert got.dtype == dtype and rel_err(got, want) < (1e-12 if dtype == torch.float64 else 1e-5)


def test_naive_equals_attention_over_the_whole_history():
    """The reference itself: a ring built from a history, continued by new tokens, equals attention over the whole
    sequence with a window mask (written out from the definition)."""
    window, H, L, hs = 8, 23, 10, 16  # 23 tokens of history: the ring has wrapped around
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(H + L, 1, hs, generator=gen, dtype=torch.float64) for _ in range(3))
    kc, vc = torch.zeros(1, window - 1, 1, hs, dtype=torch.float64), torch.zeros(1, window - 1, 1, hs,
                                                                                 dtype=torch.float64)
    for p in range(H):
        kc[0, p % (window - 1)], vc[0, p % (window - 1)] = k[p], v[p]
    o = swa_prefill_naive(q[H:], k[H:], v[H:], kc, vc, torch.tensor([H]), torch.tensor([0, L]), window)
    for i in range(L):
        p = H + i
        keys = range(max(0, p - window + 1), p + 1)
        s = torch.stack([q[p, 0] @ k[j, 0] for j in keys]) / hs**0.5
        want = (s.softmax(0)[:, None] * v[list(keys), 0]).sum(0)
        assert rel_err(o[i, 0], want) < 1e-12


def test_shared_ring_rows_equal_copied_rows():
    """Three continuations of context 1 and one of context 0 read two ring rows by reference."""
    lengths, pos0, rows = [4, 7, 1, 12], [30, 30, 30, 5], [1, 1, 1, 0]
    c = case(lengths, pos0, 8, M=2, cache_rows=rows)
    copied = dict(c, k_cache=c["k_cache"][c["cache_rows"]], v_cache=c["v_cache"][c["cache_rows"]], cache_rows=None)
    want = swa_prefill_naive(**copied)
    assert rel_err(swa_prefill_naive(**c), want) < 1e-14
    assert rel_err(sliding_window_attention(**c, backend="torch"), want) < 1e-12


def _sequential_write(c):
    """The ring after the pass, by storing every token's key in turn (the definition)."""
    kc, vc = c["k_cache"].clone(), c["v_cache"].clone()
    cu, Wc = c["cu_seqlens"].tolist(), kc.shape[1]
    for n in range(len(cu) - 1):
        for t in range(cu[n], cu[n + 1]):
            slot = (int(c["pos0"][n]) + t - cu[n]) % Wc
            kc[n, slot], vc[n, slot] = c["k"][t], c["v"][t]
    return kc, vc


@pytest.mark.parametrize("name", list(CASES))
def test_torch_write_equals_sequential_stores(name):
    c = case(*CASES[name])
    want = _sequential_write(c)
    sliding_window_write(c["k"], c["v"], c["k_cache"], c["v_cache"], c["pos0"], c["cu_seqlens"], backend="torch")
    assert torch.equal(c["k_cache"], want[0]) and torch.equal(c["v_cache"], want[1])


def _step_case(pos, window, seed=1, dtype=torch.float64, device="cpu"):
    return case([1] * len(pos), pos, window, seed=seed, dtype=dtype, device=device)


STEPS = {"empty and partly filled rings": ([0, 1, 3], 8), "full and wrapped": ([7, 8, 50, 1000], 8),
         "window of 2": ([0, 5], 2), "long window": ([100, 3], 48)}


@pytest.mark.parametrize("name", list(STEPS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_step_equals_one_token_prefill(name, dtype):
    """A decode step is a one-token prefill (attend to ring + itself) followed by the write of that token."""
    c = _step_case(*STEPS[name], dtype=dtype)
    ref = _step_case(*STEPS[name])
    want = swa_prefill_naive(**ref)
    want_ring = _sequential_write(ref)
    got = sliding_window_attention_step(c["q"], c["k"], c["v"], c["k_cache"], c["v_cache"], c["pos0"], c["window"],
                                        backend="torch")
    assert rel_err(got, want) < (1e-12 if dtype == torch.float64 else 1e-5)
    assert rel_err(c["k_cache"], want_ring[0]) < 1e-7 and rel_err(c["v_cache"], want_ring[1]) < 1e-7


@pytest.mark.parametrize("backend", ["naive", "torch", "triton"])
def test_short_ring_equals_the_full_ring_cut(backend):
    """A ring of R < window-1 slots whose rows have seen at most R tokens (how GPT.prefill sizes rings for short
    rows) is the full ring cut after slot R: attention and the write agree with the full ring's."""
    if backend == "triton":
        _triton()
    R, lengths, pos0 = 9, [4, 9, 1, 3], [5, 0, 8, 6]  # pos0 + length <= R everywhere
    full = case(lengths, pos0, 16, dtype=torch.float32, device=DEV)
    short = dict(full, k_cache=full["k_cache"][:, :R].clone(), v_cache=full["v_cache"][:, :R].clone())
    want = sliding_window_attention(**full, backend="naive")
    assert rel_err(sliding_window_attention(**short, backend=backend).cpu(), want.cpu()) < 1e-5
    write = "torch" if backend == "naive" else backend
    for c in (full, short):
        sliding_window_write(c["k"], c["v"], c["k_cache"], c["v_cache"], c["pos0"], c["cu_seqlens"], backend=write)
    for name in ("k_cache", "v_cache"):
        assert torch.equal(short[name], full[name][:, :R])


# ---- Triton (interpreter on CPU: fp32, small shapes) ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["rings partly filled", "rings full and wrapped", "prompts 2-3x the window",
                                  "window of 2"])
def test_triton_prefill_and_write(name):
    K = _triton()
    c = case(*CASES[name], dtype=torch.float32, device=DEV)
    want = swa_prefill_naive(**case(*CASES[name]))
    assert rel_err(K.swa_prefill_triton(**c).cpu(), want) < 1e-5
    want_ring = _sequential_write(c)
    K.swa_write_triton(c["k"], c["v"], c["k_cache"], c["v_cache"], c["pos0"], c["cu_seqlens"])
    assert torch.equal(c["k_cache"], want_ring[0]) and torch.equal(c["v_cache"], want_ring[1])


def test_triton_prefill_with_shared_rows_and_strided_inputs():
    K = _triton()
    c = case([4, 7, 1, 12], [30, 30, 30, 5], 8, M=2, cache_rows=[1, 1, 1, 0], dtype=torch.float32, device=DEV)
    want = swa_prefill_naive(**case([4, 7, 1, 12], [30, 30, 30, 5], 8, M=2, cache_rows=[1, 1, 1, 0]))
    qkv = torch.stack([c["q"], c["k"], c["v"]], 2)  # interleaved per head, as the layer's projection is
    strided = dict(c, q=qkv[:, :, 0], k=qkv[:, :, 1], v=qkv[:, :, 2])
    assert rel_err(K.swa_prefill_triton(**strided).cpu(), want) < 1e-5


@pytest.mark.parametrize("name", ["full and wrapped", "window of 2", "long window"])
def test_triton_step(name):
    K = _triton()
    c = _step_case(*STEPS[name], dtype=torch.float32, device=DEV)
    ref = _step_case(*STEPS[name])
    want, want_ring = swa_prefill_naive(**ref), _sequential_write(ref)
    got = K.swa_step_triton(c["q"], c["k"], c["v"], c["k_cache"], c["v_cache"], c["pos0"], c["window"])
    assert rel_err(got.cpu(), want) < 1e-5
    assert rel_err(c["k_cache"].cpu(), want_ring[0]) < 1e-6 and rel_err(c["v_cache"].cpu(), want_ring[1]) < 1e-6


# ---- GPU: bf16 kernels against the float64 reference, at the paper's head size ------------------------------------
@gpu
@pytest.mark.parametrize("window", [64, 2048])
def test_gpu_bf16_prefill_write_and_step(window):
    K = _triton()
    gen = torch.Generator().manual_seed(window)
    lengths = torch.randint(1, 3 * window, (9,), generator=gen).tolist() + [1, 3 * window + 1]
    pos0 = torch.randint(0, 4 * window, (len(lengths),), generator=gen).tolist()
    args = (lengths, pos0, window)
    c = case(*args, nh=4, hs=128, dtype=torch.bfloat16, device="cuda")
    exact = swa_prefill_naive(**{key: (t.double() if torch.is_tensor(t) and t.is_floating_point() else t)
                                 for key, t in c.items()})  # the bf16 inputs, attended exactly
    assert rel_err(K.swa_prefill_triton(**c), exact) < 1e-2
    assert rel_err(sliding_window_attention(**c, backend="torch"), exact) < 1e-2
    want_ring = _sequential_write(c)
    K.swa_write_triton(c["k"], c["v"], c["k_cache"], c["v_cache"], c["pos0"], c["cu_seqlens"])
    assert torch.equal(c["k_cache"], want_ring[0]) and torch.equal(c["v_cache"], want_ring[1])
    s = _step_case(pos0, window, seed=3, dtype=torch.bfloat16, device="cuda")
    s_exact = {key: (t.double() if torch.is_tensor(t) and t.is_floating_point() else t) for key, t in s.items()}
    want = swa_prefill_naive(**s_exact)
    got = K.swa_step_triton(s["q"], s["k"], s["v"], s["k_cache"], s["v_cache"], s["pos0"], window)
    assert rel_err(got, want) < 1e-2
