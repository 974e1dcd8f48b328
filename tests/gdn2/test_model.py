"""The model: state continuation, step decoding, ragged batches, gate modes, and the official fixtures."""
import json

import pytest
import torch

from gdn2.config import Config
from gdn2.layers import TORCH_OPS, apply_gate_mode
from gdn2.model import GPT
from gdn2.state import State
from tests.conftest import rel_err

PRESETS = ["tiny", "tiny_hybrid"]


def tiny_model(preset: str, **overrides) -> GPT:
    return GPT(Config.from_name(preset, **overrides)).init_weights(seed=1).double()


def tokens(B, T, seed=0):
    return torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", PRESETS)
def test_prefix_then_rest_equals_whole(preset):
    m, x = tiny_model(preset), tokens(2, 150)  # longer than the SWA window (64)
    full, s_full = m.prefill(x)
    a, s = m.prefill(x[:, :70])
    b, s2 = m.prefill(x[:, 70:], s)
    assert rel_err(torch.cat([a, b], 1), full) < 1e-12
    for la, lb in zip(s2.layers, s_full.layers):
        for key in la:
            assert rel_err(la[key], lb[key]) < 1e-12 or la[key].abs().max() == 0


@pytest.mark.parametrize("preset", PRESETS)
def test_prefill_then_steps_equals_whole(preset):
    m, x = tiny_model(preset), tokens(2, 140, seed=1)
    full, _ = m.prefill(x)
    _, s = m.prefill(x[:, :60])
    steps = [m.step(x[:, t], s)[0] for t in range(60, 140)]
    assert rel_err(torch.stack(steps, 1), full[:, 60:]) < 1e-10


@pytest.mark.parametrize("preset", PRESETS)
def test_rows_do_not_depend_on_each_other(preset):
    m, x = tiny_model(preset), tokens(3, 120, seed=2)
    lengths = torch.tensor([120, 33, 90])
    batch, s = m.prefill(x, lengths=lengths)
    for i, L in enumerate(lengths.tolist()):
        alone, s1 = m.prefill(x[i:i + 1, :L])
        assert rel_err(batch[i, :L], alone[0]) < 1e-12
        nxt = torch.tensor([7])
        assert rel_err(m.step(nxt.repeat(3), s.clone())[0][i], m.step(nxt, s1)[0][0]) < 1e-12


@pytest.mark.parametrize("preset", PRESETS)
def test_chunked_prefill_and_last_logits(preset):
    m, x = tiny_model(preset), tokens(3, 100, seed=3)
    lengths = torch.tensor([100, 41, 64])
    ref, s_ref = m.prefill(x, lengths=lengths)
    chunked, s = m.prefill(x, lengths=lengths, chunk_tokens=32)
    last, _ = m.prefill(x, lengths=lengths, logits="last", chunk_tokens=32)
    assert rel_err(chunked, ref) < 1e-12
    assert rel_err(last, ref[torch.arange(3), lengths - 1]) < 1e-12
    assert torch.equal(s.pos, s_ref.pos)


def test_state_select_expand_clone():
    m, x = tiny_model("tiny_hybrid"), tokens(2, 30)
    _, s = m.prefill(x)
    e = s.expand(3)
    assert e.num_rows == 6 and torch.equal(e.layers[0]["S"][3], s.layers[0]["S"][1])
    sel = s.select([1, 1, 0])
    assert torch.equal(sel.layers[1]["k"][2], s.layers[1]["k"][0])
    c = s.clone()
    c.layers[0]["S"].add_(1)
    assert not torch.equal(c.layers[0]["S"], s.layers[0]["S"])


def test_gate_modes():
    b, w = torch.rand(2, 5, 3, 8), torch.rand(2, 5, 3, 4)
    sb, sw = apply_gate_mode(b, w, "scalar_b")
    assert torch.equal(sw, w) and torch.allclose(sb, b.mean(-1, keepdim=True).expand_as(b))
    tb, tw = apply_gate_mode(b, w, "tied")
    assert torch.allclose(tb[..., :1], tw[..., :1]) and torch.equal(apply_gate_mode(b, w, "expanded_b")[0], 2 * b)


def test_tied_mode_with_equal_gates_is_the_kda_path():
    """A GDN-2 model whose erase and write projections are equal and constant per head equals the KDA form."""
    m = tiny_model("tiny", gate_mode="tied")
    mixer = m.transformer.h[0].attn
    # make b_proj and w_proj produce per-head-constant logits (rows repeated within each head)
    H, K = mixer.H, mixer.K
    with torch.no_grad():
        base = torch.randn(H, m.config.n_embd, dtype=torch.float64) * 0.1
        mixer.b_proj.weight.copy_(base.repeat_interleave(K, 0))
        mixer.w_proj.weight.copy_(base.repeat_interleave(mixer.V, 0))
    kda_model = tiny_model("tiny", beta="scalar")
    state = {k: v for k, v in m.state_dict().items() if not k.endswith(("b_proj.weight", "w_proj.weight"))}
    state.update({k: v for k, v in kda_model.state_dict().items() if k.endswith("b_proj.weight")})
    kda_model.load_state_dict(state)
    with torch.no_grad():
        kda_model.transformer.h[0].attn.b_proj.weight.copy_(base)
        kda_model.transformer.h[1].attn.b_proj.weight.copy_(m.transformer.h[1].attn.b_proj.weight[::K])
        per_head = m.transformer.h[1].attn.b_proj.weight[::K]
        m.transformer.h[1].attn.w_proj.weight.copy_(per_head.repeat_interleave(mixer.V, 0))
        m.transformer.h[1].attn.b_proj.weight.copy_(per_head.repeat_interleave(K, 0))
    x = tokens(1, 80)
    assert rel_err(m.prefill(x)[0], kda_model.prefill(x)[0]) < 1e-12


def test_scalar_b_leaves_w_untouched():
    m_full, m_sb = tiny_model("tiny"), tiny_model("tiny", gate_mode="scalar_b")
    m_sb.load_state_dict(m_full.state_dict())
    x = torch.randn(10, m_full.config.n_embd, dtype=torch.float64)
    a_full, a_sb = m_full.transformer.h[0].attn, m_sb.transformer.h[0].attn
    g1, b1, w1 = a_full._gates(a_full._project(x), TORCH_OPS)
    g2, b2, w2 = a_sb._gates(a_sb._project(x), TORCH_OPS)
    assert torch.equal(w1, w2) and torch.equal(g1, g2) and not torch.allclose(b1, b2)
    assert torch.allclose(b2, b1.mean(-1, keepdim=True).expand_as(b1))


@pytest.mark.parametrize("name", ["rec", "hyb", "gva"])
def test_official_fixtures_load_by_their_own_key_names(name, shared_dir):
    d = shared_dir / "fixtures" / "official_lit_gpt"
    ckpt = torch.load(d / f"official_{name}.pth", weights_only=True)
    ref = torch.load(d / f"official_{name}_ref.pt", weights_only=True)
    model = GPT(Config.from_dict(json.loads((d / f"official_{name}.config.json").read_text())))
    model.load_state_dict(ckpt["model"], strict=True)
    logits = model(ref["tokens"], backend="torch")
    assert logits.dtype == torch.float32
    assert rel_err(logits, ref["logits_exact_recurrence"]) < 1e-4


def test_random_init_starts_every_norm_gain_at_one():
    """A small final-norm gain would make every next-token distribution nearly flat (fragile argmax in benches)."""
    from gdn2.layers import RMSNorm

    m = GPT(Config.from_name("tiny_hybrid")).init_weights(seed=0)
    norms = [mod for mod in m.modules() if isinstance(mod, RMSNorm)]
    assert m.transformer.ln_f in norms and all(bool((n.weight == 1).all()) for n in norms)
    logits = m(torch.randint(0, 512, (1, 16)))
    assert float(logits.std()) > 0.1  # not a flat distribution


def test_state_size_does_not_grow_with_the_prompt():
    """Recurrent layers keep a fixed matrix per head; SWA layers a ring of at most window-1 keys and values: a
    hybrid's state after 500 tokens has the bytes it has after 1000 (and the window's last keys, not the first);
    after 20 tokens its rings hold 20 slots, not window-1."""
    m = tiny_model("tiny_hybrid")
    window = m.config.local_window
    _, short = m.prefill(tokens(1, 20))
    _, long = m.prefill(tokens(1, 500))
    _, longer = m.prefill(tokens(1, 1000))
    assert short.nbytes() < long.nbytes() == longer.nbytes() == m.new_state(1).nbytes()
    swa = next(layer for layer, block in zip(long.layers, m.transformer.h) if not block.is_gdn2)
    assert swa["k"].shape[1] == window - 1
    short_swa = next(layer for layer, block in zip(short.layers, m.transformer.h) if not block.is_gdn2)
    assert short_swa["k"].shape[1] == 20


def test_short_rings_grow_exactly():
    """States of rows that saw fewer than window-1 tokens have short rings; continuing them by prefill or step,
    joining them (cat, assign) and loading them into full buffers (load_) gives what full rings give."""
    m = tiny_model("tiny_hybrid")
    window = m.config.local_window
    x = tokens(2, 3 * window)
    ref, _ = m.prefill(x)
    _, s = m.prefill(x[:, :10])
    mid, s = m.prefill(x[:, 10:window + 5], s)  # crosses the window: the ring grows to full size
    rest, _ = m.prefill(x[:, window + 5:], s)
    torch.testing.assert_close(torch.cat([mid, rest], 1), ref[:, 10:], rtol=1e-9, atol=1e-9)
    _, s = m.prefill(x[:, :7])
    full = m.new_state(2)
    full.load_(s)
    joined = State.cat([s.select([0]), full.select([1])])  # 7 slots beside window-1
    assigned = m.new_state(2, ring=3)
    assigned.assign([0, 1], s)
    for state in (s.clone(), full, joined, assigned):
        rows = state.num_rows
        logits = []
        for t in range(7, 7 + window + 3):  # steps past the window: short rings grow to full in step()
            out, state = m.step(x[:rows, t], state)
            logits.append(out)
        torch.testing.assert_close(torch.stack(logits, 1), ref[:rows, 7:7 + window + 3], rtol=1e-9, atol=1e-9)
