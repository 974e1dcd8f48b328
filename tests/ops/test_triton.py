"""The Triton backend (chunked prefill and decode step) against the float64 token-loop reference.

Without CUDA the kernels run under TRITON_INTERPRET=1 on CPU tensors at small shapes (set before triton is
imported); with CUDA they run compiled, at the paper's shapes and over randomised cases.
"""
import importlib
import os
import random
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from gdn2.ops import gated_delta_rule2, gated_delta_rule2_step, gated_deltanet, kda, naive_recurrent_gdn2  # noqa: E402
from tests.conftest import rel_err  # noqa: E402


def _kernels():
    """The kernel modules, (re)built under the interpreter when this process has no GPU."""
    mods = []
    for name in ("gdn2.ops.chunk_tiles", "gdn2.ops.chunk_mild", "gdn2.ops.chunk", "gdn2.ops.recurrent"):
        mod = importlib.import_module(name)
        if not CUDA and not _interpreted(mod):
            mod = importlib.reload(mod)
        mods.append(mod)
    return mods[2:]


def _interpreted(mod) -> bool:
    probes = ("_intra_chunk_kernel", "_mild_intra_chunk_kernel", "_decode_step_kernel", "unit_lower_inverse")
    name = next(n for n in probes if hasattr(mod, n))
    return type(getattr(mod, name)).__name__ == "InterpretedFunction"


def tf32_enabled() -> bool:
    """Whether fp32 matmuls may use tf32 here: read through torch.get_float32_matmul_precision, which old torch and
    torch >= 2.9 (where the legacy `allow_tf32` flag and the new `fp32_precision` must not be mixed) both keep."""
    return CUDA and torch.get_float32_matmul_precision() != "highest"


chunk_mod, recurrent_mod = _kernels()
chunk_gdn2_triton = chunk_mod.chunk_gdn2_triton
fused_recurrent_step_triton = recurrent_mod.fused_recurrent_step_triton
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# fp32 without tf32, fp32 with tf32 dots, 16-bit inputs
TOL = {"exact": 1e-5, "tf32": 3e-3, "half": 2e-2}


def gates(B, T, H, HV, dk, dv, *, gate_heads=None, decay=0.5, b_max=1.0, seed=0, dtype=torch.float32):
    """Random q, k, v, g, b, w in float64 on DEV, with g in [-decay, 0], b in [0, b_max] on `gate_heads` heads."""
    gen = torch.Generator().manual_seed(seed)
    Hg = gate_heads or H
    shapes = [(B, T, H, dk), (B, T, H, dk), (B, T, HV, dv), (B, T, Hg, dk), (B, T, Hg, dk), (B, T, HV, dv)]
    q, k, v, g, b, w = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes)
    g = -torch.rand(g.shape, generator=gen, dtype=torch.float64) * decay
    b = torch.rand(b.shape, generator=gen, dtype=torch.float64) * b_max
    w = torch.rand(w.shape, generator=gen, dtype=torch.float64)
    return [x.to(DEV) for x in (q, k, v, g, b, w)]


def cast(x64, dtype):
    """Inputs for the kernel: q, k, v, b, w in `dtype`, g in fp32."""
    return [t.float() if i == 3 else t.to(dtype) for i, t in enumerate(x64)]


def check_chunk(x64, dtype, tol, *, S0=None, cu_seqlens=None, l2norm=True, scale=None):
    """Run the Triton prefill and compare o and the final state with the fp64 reference on the same values."""
    x = cast(x64, dtype)
    ref_in = [t.double() for t in x]  # the reference sees exactly the rounded inputs the kernel sees
    kw = dict(output_final_state=True, cu_seqlens=cu_seqlens, use_qk_l2norm=l2norm, scale=scale)
    ro, rs = naive_recurrent_gdn2(*ref_in, initial_state=S0, **kw)
    o, s = chunk_gdn2_triton(*x, initial_state=None if S0 is None else S0.float(), **kw)
    assert o.dtype == dtype and s.dtype == torch.float32
    assert torch.isfinite(o).all() and torch.isfinite(s).all(), "NaN/inf in the Triton output"
    assert rel_err(o, ro) < tol, f"o: {rel_err(o, ro):.2e}"
    assert rel_err(s, rs) < tol, f"final state: {rel_err(s, rs):.2e}"


def check_step(B, H, HV, dk, dv, dtype, tol, *, gate_heads=None, seed=0):
    x64 = [t[:, 0] for t in gates(B, 1, H, HV, dk, dv, gate_heads=gate_heads, seed=seed, b_max=2.0)]
    x = cast(x64, dtype)
    S0 = torch.randn(B, HV, dk, dv, dtype=torch.float64, device=DEV)
    ro, rs = naive_recurrent_gdn2(*(t[:, None].double() for t in x), initial_state=S0, output_final_state=True,
                                  use_qk_l2norm=True)
    S = S0.float().contiguous()
    o = fused_recurrent_step_triton(*x, S, use_qk_l2norm=True)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    assert rel_err(o, ro[:, 0]) < tol and rel_err(S, rs) < tol, (rel_err(o, ro[:, 0]), rel_err(S, rs))


# ---------------------------------------------------------------- CPU (interpreter) and GPU: small shapes
SMALL = [  # B, T, H, HV, dk, dv, gate_heads, decay, b_max, with_state
    (1, 1, 1, 1, 16, 16, None, 0.5, 1.0, True),
    (1, 50, 1, 2, 16, 32, 2, 0.5, 2.0, True),
    (2, 70, 1, 1, 32, 16, None, 20.0, 2.0, False),
    (1, 64, 2, 2, 24, 20, None, 1.0, 1.0, True),
]


@pytest.mark.parametrize("B,T,H,HV,dk,dv,gh,decay,b_max,with_state", SMALL,
                         ids=lambda c: str(c).replace(" ", ""))
def test_chunk_fp32_small(B, T, H, HV, dk, dv, gh, decay, b_max, with_state):
    x64 = gates(B, T, H, HV, dk, dv, gate_heads=gh, decay=decay, b_max=b_max, seed=T)
    S0 = torch.randn(B, HV, dk, dv, dtype=torch.float64, device=DEV) if with_state else None
    tol = TOL["tf32"] if tf32_enabled() else TOL["exact"]
    check_chunk(x64, torch.float32, tol, S0=S0)


def test_chunk_bf16_small_no_l2norm():
    x64 = gates(1, 40, 1, 1, 16, 16, seed=5)
    x64[0] = x64[0] / x64[0].norm(dim=-1, keepdim=True)
    x64[1] = x64[1] / x64[1].norm(dim=-1, keepdim=True)
    check_chunk(x64, torch.bfloat16, TOL["half"], l2norm=False, scale=0.7)


@pytest.mark.parametrize("decay,mild_rows", [(0.5, 200), (3.0, 64), (20.0, 0)], ids=["mild", "mixed", "strong"])
def test_chunk_bf16_mild_path_and_worklist(decay, mild_rows):
    """bf16 inputs take the mild-decay kernel; chunks whose decay passes MILD_RANGE go to the exact kernel through
    the worklist. Mild, strong and mixed chunks (and a partial last chunk) all match the reference."""
    x64 = gates(1, 200, 2, 2, 32, 16, decay=decay, b_max=2.0, seed=11)
    x64[3][:, :mild_rows] *= 0.01 / decay  # the first rows decay mildly
    S0 = torch.randn(1, 2, 32, 16, dtype=torch.float64, device=DEV)
    check_chunk(x64, torch.bfloat16, TOL["half"], S0=S0)


def test_chunk_bf16_varlen_mixed_decays():
    cu = torch.tensor([0, 1, 65, 65, 190], dtype=torch.int32, device=DEV)
    x64 = gates(1, 190, 1, 2, 16, 32, decay=4.0, b_max=1.0, seed=12)
    x64[3][:, :100] *= 0.01
    S0 = torch.randn(4, 2, 16, 32, dtype=torch.float64, device=DEV)
    check_chunk(x64, torch.bfloat16, TOL["half"], S0=S0, cu_seqlens=cu)


def test_chunk_varlen_small():
    cu = torch.tensor([0, 3, 3, 70], dtype=torch.int32, device=DEV)  # an empty sequence and one over two chunks
    x64 = gates(1, 70, 1, 1, 16, 16, b_max=2.0, seed=7)
    S0 = torch.randn(3, 1, 16, 16, dtype=torch.float64, device=DEV)
    check_chunk(x64, torch.float32, TOL["exact"] if not CUDA else TOL["tf32"], S0=S0, cu_seqlens=cu)


def test_step_small():
    check_step(2, 1, 2, 16, 24, torch.float32, TOL["exact"], gate_heads=2)


def test_step_rejects_bad_state():
    x = cast([t[:, 0] for t in gates(1, 1, 1, 1, 16, 16)], torch.float32)
    with pytest.raises(ValueError, match="state must be"):
        fused_recurrent_step_triton(*x, torch.zeros(1, 1, 16, 16, dtype=torch.float64, device=DEV))


# ---------------------------------------------------------------- GPU: paper shapes, random cases, graphs
@gpu
@pytest.mark.parametrize("B,T", [(2, 1000), (1, 4096)], ids=lambda c: str(c))
def test_chunk_paper_shape_bf16(B, T):
    x64 = gates(B, T, 16, 16, 128, 128, decay=0.1, seed=T)
    S0 = torch.randn(B, 16, 128, 128, dtype=torch.float64, device=DEV) * 0.1
    check_chunk(x64, torch.bfloat16, TOL["half"], S0=S0)


@gpu
@pytest.mark.parametrize("allow_tf32", [False, True])
def test_chunk_paper_shape_fp32(allow_tf32, set_tf32):
    set_tf32(allow_tf32)
    x64 = gates(2, 333, 16, 16, 128, 128, decay=1.0, b_max=2.0, seed=11)
    S0 = torch.randn(2, 16, 128, 128, dtype=torch.float64, device=DEV)
    check_chunk(x64, torch.float32, TOL["tf32" if allow_tf32 else "exact"], S0=S0)


@gpu
@pytest.mark.parametrize("seed", range(12))
def test_chunk_random_cases(seed, set_tf32):
    set_tf32(False)
    rng = random.Random(seed)
    H = rng.choice([1, 2, 4])
    HV = H * rng.choice([1, 2])
    dk, dv = rng.choice([16, 32, 64, 128, 48]), rng.choice([16, 32, 64, 128, 80])
    T = rng.choice([1, 5, 63, 64, 65, 127, 200, 511])
    B = rng.choice([1, 2, 3])
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
    x64 = gates(B, T, H, HV, dk, dv, gate_heads=rng.choice([H, HV]), decay=rng.choice([0.1, 1.0, 20.0]),
                b_max=rng.choice([1.0, 2.0]), seed=seed)
    S0 = torch.randn(B, HV, dk, dv, dtype=torch.float64, device=DEV) if rng.random() < 0.5 else None
    check_chunk(x64, dtype, TOL["exact"] if dtype == torch.float32 else TOL["half"], S0=S0)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_chunk_varlen_gpu(dtype, set_tf32):
    set_tf32(False)
    lengths = [1, 64, 0, 200, 37, 129, 1000]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    x64 = gates(1, sum(lengths), 4, 8, 64, 64, decay=2.0, b_max=2.0, seed=3)
    S0 = torch.randn(len(lengths), 8, 64, 64, dtype=torch.float64, device=DEV)
    check_chunk(x64, dtype, TOL["exact"] if dtype == torch.float32 else TOL["half"], S0=S0, cu_seqlens=cu)


@gpu
def test_tied_special_cases_through_dispatcher():
    q, k, v, g, _, _ = gates(2, 300, 4, 4, 64, 64, seed=9)
    beta = torch.rand(2, 300, 4, dtype=torch.float64, device=DEV)
    x = dict(use_qk_l2norm=True, output_final_state=True)
    for fn, gate in ((kda, g), (gated_deltanet, g[..., 0])):
        ro, rs = fn(q, k, v, gate, beta, backend="naive", **x)
        o, s = fn(q.bfloat16(), k.bfloat16(), v.bfloat16(), gate.float(), beta.bfloat16(), backend="triton", **x)
        assert rel_err(o, ro) < TOL["half"] and rel_err(s, rs) < TOL["half"], fn.__name__


@gpu
@pytest.mark.parametrize("B", [1, 3, 256])
def test_step_gpu(B):
    check_step(B, 16, 16, 128, 128, torch.bfloat16, TOL["half"], seed=B)
    check_step(B, 2, 4, 64, 32, torch.float32, TOL["exact"], gate_heads=4, seed=B)


@gpu
def test_step_in_cuda_graph_continues_prefill():
    """Prefill T tokens, then decode two more inside a captured graph: equals one prefill of T + 2 tokens."""
    x = cast(gates(2, 102, 2, 4, 64, 64, seed=21), torch.bfloat16)
    _, S = gated_delta_rule2(*(t[:, :100] for t in x), output_final_state=True, use_qk_l2norm=True)
    ref_o, ref_s = naive_recurrent_gdn2(*(t.double() for t in x), output_final_state=True, use_qk_l2norm=True)
    step_in = [t[:, 100].clone() for t in x]
    out = torch.empty(2, 4, 64, dtype=torch.bfloat16, device=DEV)
    fused_recurrent_step_triton(*step_in, S.clone(), use_qk_l2norm=True, out=out)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused_recurrent_step_triton(*step_in, S, use_qk_l2norm=True, out=out)
    outs = []
    for t in (100, 101):
        for buf, src in zip(step_in, x):
            buf.copy_(src[:, t])
        graph.replay()
        outs.append(out.clone())
    assert rel_err(torch.stack(outs, 1), ref_o[:, 100:]) < TOL["half"]
    assert rel_err(S, ref_s) < TOL["half"]


@gpu
def test_dispatcher_step_uses_triton():
    x = cast([t[:, 0] for t in gates(2, 1, 2, 2, 32, 32, seed=2)], torch.float32)
    S = torch.randn(2, 2, 32, 32, device=DEV)
    S_ref = S.clone()
    o = gated_delta_rule2_step(*x, S, backend="triton")
    o_ref = gated_delta_rule2_step(*x, S_ref, backend="naive")
    assert rel_err(o, o_ref) < TOL["tf32"] and rel_err(S, S_ref) < TOL["tf32"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_chunk_layout_is_read_back_once_per_cu_seqlens_tensor(monkeypatch):
    """The layers of a forward share cu_seqlens: the layout must be computed once, and again when it changes."""
    from gdn2.ops import describe_packing
    from gdn2.ops import utils as ops_utils

    calls = []
    real = chunk_mod._compute_layout
    monkeypatch.setattr(chunk_mod, "_compute_layout", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(ops_utils, "_PACKING", [None])
    cu = torch.tensor([0, 70, 75, 200])
    first = chunk_mod._chunk_layout(cu, 1, 200, "cpu")
    for _ in range(3):
        assert chunk_mod._chunk_layout(cu, 1, 200, "cpu") is first
    assert len(calls) == 1 and first[0] == 2 + 1 + 2
    cu[1] = 64  # changed in place: recomputed
    assert chunk_mod._chunk_layout(cu, 1, 200, "cpu")[0] == 1 + 1 + 2 and len(calls) == 2
    other = torch.tensor([0, 70, 75, 200])  # equal values, another tensor: recomputed (never trusted by value)
    chunk_mod._chunk_layout(other, 1, 200, "cpu")
    assert len(calls) == 3
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        chunk_mod._chunk_layout(torch.tensor([0, 5, 3]), 1, 3, "cpu")
    told = torch.tensor([0, 3, 200])  # values handed over by the caller that built it: never read back
    describe_packing(told, [0, 3, 200])
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("cu_seqlens was read back"))
    assert chunk_mod._chunk_layout(told, 1, 200, "cpu")[0] == 1 + 4
