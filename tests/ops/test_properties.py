"""Property tests: the torch backend (prefill and decode step) equals the float64 token-loop reference over random
shapes, gate strengths, initial states and varlen splits drawn by hypothesis.

The Triton kernels get their randomised checks in test_triton.py (under the interpreter they are too slow for
many hypothesis examples on CPU).
"""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gdn2.ops import gated_delta_rule2, gated_delta_rule2_step, naive_recurrent_gdn2
from tests.conftest import rel_err

TOL = 1e-9  # float64 on both sides: anything above this is a wrong formula, not rounding
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def problems(draw, varlen: bool = False):
    """Inputs of one gated_delta_rule2 call: shapes, gates and an optional initial state / packing."""
    B = 1 if varlen else draw(st.integers(1, 3))
    T = draw(st.integers(1, 150))
    H = draw(st.integers(1, 3))
    HV = H * draw(st.integers(1, 2))
    dk, dv = draw(st.sampled_from([4, 8, 16])), draw(st.sampled_from([4, 8, 16]))
    decay = draw(st.floats(0.0, 20.0))  # |log-decay| per token up to 20: gates from 1 down to e^-20
    b_max = draw(st.floats(0.0, 2.0))  # [0, 2]: negative eigenvalues included
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, uniform=False):
        f = torch.rand if uniform else torch.randn
        return f(*shape, generator=gen, dtype=torch.float64)

    gate_heads = draw(st.sampled_from([H, HV]))  # g and b per key head or per value head
    x = {
        "q": rnd(B, T, H, dk), "k": rnd(B, T, H, dk), "v": rnd(B, T, HV, dv),
        "g": -rnd(B, T, gate_heads, dk, uniform=True) * decay, "b": rnd(B, T, gate_heads, dk, uniform=True) * b_max,
        "w": rnd(B, T, HV, dv, uniform=True),
    }
    cu = None
    if varlen:
        cuts = sorted(draw(st.sets(st.integers(1, T - 1), max_size=4))) if T > 1 else []
        cu = torch.tensor([0, *cuts, T])
    n = B if cu is None else len(cu) - 1
    state = rnd(n, HV, dk, dv) if draw(st.booleans()) else None
    return x, state, cu


def _both(x, state, cu, **kw):
    args = (x["q"], x["k"], x["v"], x["g"], x["b"], x["w"])
    ref = naive_recurrent_gdn2(*args, initial_state=state, output_final_state=True, cu_seqlens=cu, **kw)
    got = gated_delta_rule2(*args, initial_state=state, output_final_state=True, cu_seqlens=cu, backend="torch",
                            **kw)
    return ref, got


@SETTINGS
@given(problems(), st.booleans())
def test_torch_prefill_equals_reference(problem, l2norm):
    x, state, _ = problem
    if not l2norm:  # unnormalised keys: keep |k|^2 b small enough that the reference itself stays bounded
        x["k"] = x["k"] / (x["k"].norm(dim=-1, keepdim=True) + 1e-9)
    (ref_o, ref_s), (o, s) = _both(x, state, None, use_qk_l2norm=l2norm)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert rel_err(o, ref_o) < TOL and rel_err(s, ref_s) < TOL


@SETTINGS
@given(problems(varlen=True))
def test_torch_varlen_equals_reference(problem):
    x, state, cu = problem
    (ref_o, ref_s), (o, s) = _both(x, state, cu, use_qk_l2norm=True)
    assert rel_err(o, ref_o) < TOL and rel_err(s, ref_s) < TOL
    # packing is invisible: each packed sequence alone gives the same output and final state
    for n in range(len(cu) - 1):
        a, e = int(cu[n]), int(cu[n + 1])
        part = {k: t[:, a:e] for k, t in x.items()}
        (o1, s1), _ = _both(part, None if state is None else state[n:n + 1], None, use_qk_l2norm=True)
        assert rel_err(o[:, a:e], o1) < TOL and rel_err(s[n:n + 1], s1) < TOL


@SETTINGS
@given(problems())
def test_torch_decode_steps_continue_the_prefill(problem):
    """Prefill all but the last token, then one decode step: same output and state as the reference."""
    x, state, _ = problem
    T = x["q"].shape[1]
    (ref_o, ref_s), _ = _both(x, state, None, use_qk_l2norm=True)
    head = {k: t[:, : T - 1] for k, t in x.items()}
    if T > 1:
        _, S = gated_delta_rule2(*head.values(), initial_state=state, output_final_state=True,
                                 use_qk_l2norm=True, backend="torch")
    else:
        B, HV, dk, dv = x["q"].shape[0], x["v"].shape[2], x["q"].shape[3], x["v"].shape[3]
        S = state.clone() if state is not None else torch.zeros(B, HV, dk, dv, dtype=torch.float64)
    last = [x[k][:, -1] for k in ("q", "k", "v", "g", "b", "w")]
    o = gated_delta_rule2_step(*last, S, use_qk_l2norm=True, backend="torch")
    assert rel_err(o, ref_o[:, -1]) < TOL and rel_err(S, ref_s) < TOL
