"""The Triton layer kernels (norms, short conv, gates, SwiGLU) against the torch code they replace, one by one and
through whole models: prefill of ragged rows from a carried state, and decode steps, with backend="triton" vs
backend="torch". Without CUDA the kernels run under TRITON_INTERPRET=1 on CPU tensors."""
import importlib
import os

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from gdn2 import layers  # noqa: E402
from gdn2.config import Config  # noqa: E402
from gdn2.model import GPT  # noqa: E402
from tests.conftest import rel_err  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
TOL = 1e-5  # fp32 everywhere: the kernels compute in fp32 like the torch code


def _interpreted_modules():
    """The kernel modules, rebuilt under the interpreter when an earlier import compiled them for a GPU."""
    mods = {}
    for name, probe in (("gdn2.layer_kernels", "_rms_norm_kernel"), ("gdn2.ops.chunk_tiles", "unit_lower_inverse"),
                        ("gdn2.ops.chunk_mild", "_mild_intra_chunk_kernel"),
                        ("gdn2.ops.chunk", "_intra_chunk_kernel"),
                        ("gdn2.ops.recurrent", "_decode_step_kernel"), ("gdn2.ops.swa_triton", "_prefill_kernel")):
        mod = importlib.import_module(name)
        if not CUDA and type(getattr(mod, probe)).__name__ != "InterpretedFunction":
            mod = importlib.reload(mod)
        mods[name] = mod
    return mods


K = _interpreted_modules()["gdn2.layer_kernels"]
OPS = layers.triton_ops()  # the Triton column of the ops table (after the reload above)


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(DEV)


def test_rms_norm_on_strided_rows():
    x = rand(7, 300)[:, :200]  # rows strided, as a slice of a packed projection
    w = rand(200, seed=1)
    ref = layers.RMSNorm(200, eps=1e-5).to(DEV)
    ref.weight.data.copy_(w)
    assert rel_err(K.rms_norm(x, w, 1e-5), ref(x)) < TOL


@pytest.mark.parametrize("swish", [True, False])
def test_gated_rms_norm(swish):
    o, gate, w = rand(5, 3, 40), rand(5, 200, seed=1)[:, :120], rand(40, seed=2)
    norm = layers.RMSNorm(40, eps=1e-6).to(DEV)
    norm.weight.data.copy_(w)
    g = gate.unflatten(-1, (3, 40))
    act = g * torch.sigmoid(g) if swish else torch.sigmoid(g)
    assert rel_err(K.gated_rms_norm(o, gate, w, 1e-6, swish), norm(o) * act) < TOL


def test_short_conv_over_ragged_sequences_with_tails():
    C, W = 72, 4
    lengths = [5, 1, 2, 9, 3]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device=DEV)
    x = rand(sum(lengths), C + 16)[:, :C]
    tail, weight = rand(len(lengths), W - 1, C, seed=1), rand(C, 1, W, seed=2)
    seq = layers.sequence_ids(cu, x.shape[0])
    y_ref, tail_ref = layers.TORCH_OPS.short_conv(x, tail, weight.view(C, W), seq, cu)
    y, new_tail = OPS.short_conv(x, tail, weight.view(C, W), seq, cu)
    assert rel_err(y, y_ref) < TOL
    assert torch.equal(new_tail, tail_ref)  # the last inputs are copied, not computed


def test_short_conv_step_shifts_the_tail_in_place():
    C, W = 300, 4
    x, weight = rand(3, C + 10)[:, :C], rand(C, 1, W, seed=2)
    tail = rand(3, W - 1, C, seed=1)
    tail_ref = tail.clone()
    y_ref = layers.TORCH_OPS.short_conv_step(x, tail_ref, weight.view(C, W))
    y = OPS.short_conv_step(x, tail, weight.view(C, W))
    assert rel_err(y, y_ref) < TOL and torch.equal(tail, tail_ref)


@pytest.mark.parametrize("variant", [
    dict(), dict(allow_neg_eigval=True), dict(beta="scalar"), dict(beta="scalar", allow_neg_eigval=True),
    dict(decay="scalar", beta="scalar", out_gate="full"), dict(decay_heads="value"),
])
def test_gates_match_torch(variant):
    model = GPT(Config.from_name("tiny", **variant)).init_weights(seed=3).to(DEV)
    attn = model.transformer.h[0].attn
    with torch.no_grad():
        attn.dt_bias.add_(rand(*attn.dt_bias.shape, seed=4))  # spread the decays
        p = attn._project(rand(11, model.config.n_embd, seed=5) * 3)
        for a, b in zip(attn._gates(p, OPS), attn._gates(p, layers.TORCH_OPS)):
            assert a.shape == b.shape and rel_err(a, b) < TOL


def test_swiglu():
    h = rand(6, 2 * 100 + 8)[:, :200]
    a, u = h.chunk(2, dim=-1)
    assert rel_err(K.swiglu(h), F.silu(a) * u) < TOL


def test_stacked_weights_are_views_and_follow_moves():
    model = GPT(Config.from_name("tiny")).init_weights(seed=0)
    attn = model.transformer.h[0].attn
    with torch.no_grad():
        W = attn.in_proj.get()
        assert attn.q_proj.weight.data_ptr() == W.data_ptr()  # rebased onto the stack: no copy kept
        attn.k_proj.weight.mul_(2)  # an in-place edit is seen through the view
        assert torch.equal(attn.in_proj.get()[attn.q_proj.weight.shape[0]:][:4], attn.k_proj.weight[:4])
        model.double()  # moved: stacked again, from the new values
        assert attn.in_proj.get().dtype == torch.float64
    assert attn.in_proj.get().requires_grad  # with autograd on, a differentiable concatenation


MODELS = {
    "gdn2": dict(),
    "kda": dict(beta="scalar", allow_neg_eigval=True),
    "gated_deltanet": dict(decay="scalar", beta="scalar", out_gate="full"),
    "no_out_gate": dict(out_gate="none", decay_heads="value"),
    "value_heads": dict(gdn2_num_v_heads=4, gdn2_expand_v=2, conv_size=2),  # HV = 2H, dv = 2dk, short conv of 2
    "tied_gates": dict(gate_mode="tied", allow_neg_eigval=True),  # a Table 5 ablation on top of the kernels' gates
}


def _pair(name: str, preset: str = "tiny") -> tuple[GPT, GPT]:
    fast = GPT(Config.from_name(preset, **MODELS.get(name, {}))).init_weights(seed=7).to(DEV).eval()
    ref = GPT(fast.config).to(DEV).eval()
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@pytest.mark.parametrize("name", list(MODELS) + ["hybrid"])
def test_model_prefill_and_steps_match_torch(name):
    fast, ref = _pair(name, "tiny_hybrid" if name == "hybrid" else "tiny")
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 512, (3, 21), generator=gen).to(DEV)
    lengths = torch.tensor([21, 6, 13], device=DEV)
    (la, sa), (lb, sb) = (fast.prefill(tokens, lengths=lengths, backend="triton"),
                          ref.prefill(tokens, lengths=lengths, backend="torch"))
    assert rel_err(la, lb) < 1e-4
    more = torch.randint(0, 512, (3, 9), generator=gen).to(DEV)  # continue from the carried states
    (la, sa), (lb, sb) = fast.prefill(more, sa, backend="triton"), ref.prefill(more, sb, backend="torch")
    assert rel_err(la, lb) < 1e-4
    for t in torch.randint(0, 512, (4, 3), generator=gen).to(DEV):
        la, _ = fast.step(t, sa, backend="triton")
        lb, _ = ref.step(t, sb, backend="torch")
        assert rel_err(la, lb) < 1e-4
    for x, y in zip(sa.layers, sb.layers):
        for key in x:
            assert rel_err(x[key], y[key]) < 1e-4
