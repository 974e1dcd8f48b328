"""The torch chunkwise backend and the tied special cases against the float64 token-loop reference."""
import pytest
import torch

from gdn2.ops import chunk_gdn2_torch, gated_delta_rule2, gated_deltanet, kda, naive_recurrent_gdn2, no_delta
from tests.conftest import rel_err


def make_inputs(B, T, H, HV, dk, dv, *, dtype=torch.float64, decay=0.5, b_max=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = r(B, T, H, dk), r(B, T, H, dk), r(B, T, HV, dv)
    g = -u(B, T, H, dk) * decay
    b, w = u(B, T, H, dk) * b_max, u(B, T, HV, dv)
    return [x.to(dtype) for x in (q, k, v)] + [g.float() if dtype != torch.float64 else g] + \
        [x.to(dtype) for x in (b, w)]


CASES = [  # B, T, H, HV, dk, dv
    (1, 1, 1, 1, 8, 8), (2, 17, 2, 2, 16, 8), (1, 64, 1, 1, 8, 16), (2, 100, 3, 3, 16, 32),
    (1, 130, 2, 4, 32, 16), (3, 200, 4, 4, 8, 8),
]


@pytest.mark.parametrize("B,T,H,HV,dk,dv", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("with_state", [False, True])
def test_torch_equals_naive_fp64(B, T, H, HV, dk, dv, with_state):
    x = make_inputs(B, T, H, HV, dk, dv, seed=T)
    S0 = torch.randn(B, HV, dk, dv, dtype=torch.float64) if with_state else None
    ref_o, ref_s = naive_recurrent_gdn2(*x, initial_state=S0, output_final_state=True, use_qk_l2norm=True)
    o, s = chunk_gdn2_torch(*x, initial_state=S0, output_final_state=True, use_qk_l2norm=True)
    assert rel_err(o, ref_o) < 1e-10 and rel_err(s, ref_s) < 1e-10


@pytest.mark.parametrize("decay", [5.0, 20.0])
def test_strong_decay_stays_exact(decay):
    x = make_inputs(2, 150, 2, 2, 16, 16, decay=decay, b_max=2.0, seed=1)
    ref_o, ref_s = naive_recurrent_gdn2(*x, output_final_state=True, use_qk_l2norm=True)
    o, s = chunk_gdn2_torch(*x, output_final_state=True, use_qk_l2norm=True)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert rel_err(o, ref_o) < 1e-10 and rel_err(s, ref_s) < 1e-10


def test_varlen_equals_each_sequence_alone():
    cu = torch.tensor([0, 5, 70, 71, 200])
    x = make_inputs(1, 200, 2, 2, 16, 8, seed=3)
    S0 = torch.randn(4, 2, 16, 8, dtype=torch.float64)
    for backend in ("naive", "torch"):
        o, s = gated_delta_rule2(*x, initial_state=S0, output_final_state=True, cu_seqlens=cu, backend=backend)
        for n in range(4):
            a, e = int(cu[n]), int(cu[n + 1])
            o1, s1 = naive_recurrent_gdn2(*(t[:, a:e] for t in x), initial_state=S0[n:n + 1], output_final_state=True)
            assert rel_err(o[:, a:e], o1) < 1e-10 and rel_err(s[n:n + 1], s1) < 1e-10


def test_state_carries_across_calls():
    x = make_inputs(2, 150, 2, 2, 16, 16, seed=4)
    o, s = gated_delta_rule2(*x, output_final_state=True, backend="torch")
    o1, s1 = gated_delta_rule2(*(t[:, :77] for t in x), output_final_state=True, backend="torch")
    o2, s2 = gated_delta_rule2(*(t[:, 77:] for t in x), initial_state=s1, output_final_state=True, backend="torch")
    assert rel_err(torch.cat([o1, o2], 1), o) < 1e-10 and rel_err(s2, s) < 1e-10


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_low_precision_within_tolerance(dtype, tol):
    x64 = make_inputs(2, 130, 2, 2, 32, 32, seed=5)
    k = torch.nn.functional.normalize(x64[1], dim=-1)
    x64[1] = k
    ref, _ = naive_recurrent_gdn2(*x64)
    x = [t.to(dtype) if i != 3 else t.float() for i, t in enumerate(x64)]
    o, _ = chunk_gdn2_torch(*x)
    assert o.dtype == dtype and torch.isfinite(o).all()
    assert rel_err(o, ref) < tol


def _direct_kda(q, k, v, g, beta, scale):
    """KDA written directly: S <- diag(e^g) S; S <- S + beta k (v - S^T k)^T; o = S^T (scale q)."""
    B, T, H, dk = q.shape
    out = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    for bi in range(B):
        for h in range(H):
            S = torch.zeros(dk, v.shape[-1], dtype=torch.float64)
            for t in range(T):
                S = torch.diag(g[bi, t, h].exp()) @ S
                kt = k[bi, t, h]
                S = S + beta[bi, t, h] * torch.outer(kt, v[bi, t, h] - S.T @ kt)
                out[bi, t, h] = S.T @ (scale * q[bi, t, h])
    return out


def test_kda_is_the_tied_case():
    q, k, v, g, _, _ = make_inputs(2, 40, 2, 2, 8, 8, seed=6)
    beta = torch.rand(2, 40, 2, dtype=torch.float64)
    o, _ = kda(q, k, v, g, beta, backend="torch")
    assert rel_err(o, _direct_kda(q, k, v, g, beta, 8 ** -0.5)) < 1e-10


def test_gated_deltanet_is_scalar_decay_kda():
    q, k, v, _, _, _ = make_inputs(1, 70, 2, 2, 8, 4, seed=7)
    gs, beta = -torch.rand(1, 70, 2, dtype=torch.float64), torch.rand(1, 70, 2, dtype=torch.float64)
    o, _ = gated_deltanet(q, k, v, gs, beta, backend="torch")
    # Gated DeltaNet directly: S <- e^g S; S <- S + beta k (v - S^T k)^T
    ref = torch.zeros_like(o)
    for h in range(2):
        S = torch.zeros(8, 4, dtype=torch.float64)
        for t in range(70):
            kt = k[0, t, h]
            S = gs[0, t, h].exp() * S
            S = S + beta[0, t, h] * torch.outer(kt, v[0, t, h] - S.T @ kt)
            ref[0, t, h] = S.T @ (q[0, t, h] * 8 ** -0.5)
    assert rel_err(o, ref) < 1e-10


def test_no_delta_is_gated_linear_attention():
    q, k, v, g, _, _ = make_inputs(1, 50, 1, 1, 8, 4, seed=8)
    o, _ = no_delta(q, k, v, g, backend="torch")
    ref = torch.zeros_like(o)
    S = torch.zeros(8, 4, dtype=torch.float64)
    for t in range(50):
        S = g[0, t, 0].exp()[:, None] * S + torch.outer(k[0, t, 0], v[0, t, 0])
        ref[0, t, 0] = S.T @ (q[0, t, 0] * 8 ** -0.5)
    assert rel_err(o, ref) < 1e-10


def test_bad_shapes_name_the_problem():
    x = make_inputs(1, 10, 2, 2, 8, 8)
    with pytest.raises(ValueError, match="w must have v's shape"):
        gated_delta_rule2(*x[:5], x[5][..., :4])
    with pytest.raises(ValueError, match="unknown backend"):
        gated_delta_rule2(*x, backend="cuda")


def test_mild_and_strong_chunks_in_one_call_with_gradients():
    """Chunks route to the one-matmul or the pairwise scores by their decay; values and gradients stay exact."""
    x = make_inputs(1, 256, 2, 2, 16, 8, seed=9, decay=0.1)
    x[3][:, 128:] *= 300  # the last two chunks decay far beyond the factorised form's safe range
    x = [t.requires_grad_() for t in x]
    y = [t.detach().clone().requires_grad_() for t in x]
    o, s = chunk_gdn2_torch(*x, output_final_state=True, use_qk_l2norm=True)
    ref_o, ref_s = naive_recurrent_gdn2(*y, output_final_state=True, use_qk_l2norm=True)
    assert rel_err(o, ref_o) < 1e-10 and rel_err(s, ref_s) < 1e-10
    r = torch.randn_like(o)
    (o * r).sum().backward()
    (ref_o * r).sum().backward()
    for a, b in zip(x, y):
        assert rel_err(a.grad, b.grad) < 1e-10
