"""Checkpoint loading: official lit_gpt containers (the shared fixtures), fla KDA / Gated DeltaNet folders checked
against float64 token loops written here from the spec (section 3, not gdn2.layers), native folders, bad files."""
import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from gdn2 import checkpoint as ckpt_mod
from gdn2.checkpoint import CheckpointError, load_checkpoint, save_native
from gdn2.config import Config
from gdn2.model import GPT
from tests.conftest import ROOT, rel_err

OFFICIAL = ("rec", "hyb", "gva")


@pytest.fixture
def official_dir() -> Path:
    path = ROOT.parent / "shared" / "fixtures" / "official_lit_gpt"
    if not (path / "official_rec.pth").is_file():
        pytest.skip(f"official lit_gpt fixtures not found at {path} (CI has them at ../shared/fixtures)")
    return path


def official_ref(folder: Path, name: str) -> dict:
    return torch.load(folder / f"official_{name}_ref.pt", weights_only=True)


# ---- official lit_gpt ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", OFFICIAL)
def test_official_fixture_reproduces_exact_logits(official_dir, name):
    loaded = load_checkpoint(str(official_dir / f"official_{name}.pth"))
    ref = official_ref(official_dir, name)
    assert loaded.format == "lit_gpt"
    assert "official_" + name + ".config.json" in loaded.inferred["config_from"]
    assert rel_err(loaded.model(ref["tokens"]), ref["logits_exact_recurrence"]) < 1e-4
    assert loaded.sha256 == hashlib.sha256((official_dir / f"official_{name}.pth").read_bytes()).hexdigest()
    assert not loaded.model.training


def test_training_output_folder_prefers_final(official_dir, tmp_path):
    run = tmp_path / "tiny_gdn2_hyb_exp1"
    run.mkdir()
    shutil.copyfile(official_dir / "official_hyb.pth", run / "final-model-ckpt.pth")
    (run / "latest-model-ckpt.pth").write_bytes(b"not a checkpoint")  # would fail if it were picked
    # no config JSON: the lit_gpt/config.py copy that training writes, read without executing it
    cfg = json.loads((official_dir / "official_hyb.config.json").read_text())
    (run / "lit_gpt").mkdir()
    (run / "lit_gpt" / "config.py").write_text(
        "import torch\nconfigs = [dict(name='other', n_embd=64, n_head=2), dict(" +
        ", ".join(f"{k}={v!r}" for k, v in cfg.items() if not k.startswith("_")) + ")]\n"
        "name_to_config = {c['name']: c for c in configs}\n")
    loaded = load_checkpoint(str(run))
    ref = official_ref(official_dir, "hyb")
    assert loaded.inferred["checkpoint_file"] == "final-model-ckpt.pth"
    assert "tiny_gdn2_hyb" in loaded.inferred["config_from"] and loaded.config.n_head == 4
    assert rel_err(loaded.model(ref["tokens"]), ref["logits_exact_recurrence"]) < 1e-4


def test_config_inferred_from_keys_alone(official_dir, tmp_path):
    for name in ("rec", "gva"):  # recurrent models: every shape-relevant field follows from the tensors
        shutil.copyfile(official_dir / f"official_{name}.pth", tmp_path / f"{name}.pth")
        loaded = load_checkpoint(str(tmp_path / f"{name}.pth"))
        ref = official_ref(official_dir, name)
        assert rel_err(loaded.model(ref["tokens"]), ref["logits_exact_recurrence"]) < 1e-4
    assert loaded.config.num_v_heads == 4 and loaded.config.gdn2_num_heads == 2


def test_wrapper_prefixes_and_bare_state_dict(official_dir, tmp_path):
    sd = torch.load(official_dir / "official_rec.pth", weights_only=True)["model"]
    torch.save({"model": {"_forward_module._orig_mod." + k: v for k, v in sd.items()}}, tmp_path / "a.pth")
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "b.pth")
    ref = official_ref(official_dir, "rec")
    for f in ("a.pth", "b.pth"):
        out = load_checkpoint(str(tmp_path / f), preset="tiny").model(ref["tokens"])
        assert rel_err(out, ref["logits_exact_recurrence"]) < 1e-4


def test_wrong_preset_lists_keys_and_suggests_the_fitting_one(official_dir):
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(str(official_dir / "official_rec.pth"), preset="tiny_hybrid")
    msg = str(err.value)
    assert "missing (31)" in msg and "transformer.h.1.attn.attn.weight" in msg and "and 21 more" in msg
    assert "unexpected (17): transformer.h.1.attn.A_log" in msg  # 4 layers assumed, 2 stored
    assert "assumed config" in msg and "gdn2_per_layer=2" in msg
    assert "--preset tiny" in msg


def test_missing_and_misshapen_keys(official_dir, tmp_path):
    sd = torch.load(official_dir / "official_rec.pth", weights_only=True)["model"]
    bad = dict(sd)
    del bad["transformer.h.1.attn.g_proj.1.bias"]
    bad["transformer.h.0.attn.o_norm.weight"] = torch.ones(48)
    torch.save({"model": bad}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(str(tmp_path / "bad.pth"), preset="tiny")
    msg = str(err.value)
    assert "1 missing" in msg and "g_proj.1.bias" in msg
    assert "transformer.h.0.attn.o_norm.weight: checkpoint (48,) vs model (32,)" in msg


def test_truncated_and_unsafe_files(official_dir, tmp_path):
    data = (official_dir / "official_rec.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut.pth .*truncated or corrupt.*re-download") as err:
        load_checkpoint(str(tmp_path / "cut.pth"))
    assert "\n" not in str(err.value)
    torch.save({"model": {}, "where": Path("x")}, tmp_path / "code.pth")  # a pickled class: never unpickled
    with pytest.raises(CheckpointError, match="never runs code"):
        load_checkpoint(str(tmp_path / "code.pth"))
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(str(tmp_path / "cut.safetensors"))


def test_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="lm-eval's own hf model"):
        load_checkpoint("hf:some/model")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(str(tmp_path / "nope.pth"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="hf:"):
        load_checkpoint(str(tmp_path))
    (tmp_path / "config.json").unlink()
    torch.save({"model": {}}, tmp_path / "final-model-ckpt.pth")
    with pytest.raises(ValueError, match="unknown model preset 'gdn2_13B'; did you mean gdn2_1.3B"):
        load_checkpoint(str(tmp_path), preset="gdn2_13B")
    with pytest.raises(CheckpointError, match="not an official lit_gpt GDN-2 state dict"):
        load_checkpoint(str(tmp_path))


def test_dtype_keeps_decay_params_fp32(official_dir):
    loaded = load_checkpoint(str(official_dir / "official_rec.pth"), dtype="bf16", gate_mode="tied")
    params = dict(loaded.model.named_parameters())
    assert params["transformer.h.0.attn.q_proj.weight"].dtype == torch.bfloat16
    assert params["transformer.h.0.attn.A_log"].dtype == torch.float32
    assert loaded.config.gate_mode == "tied"
    with pytest.raises(ValueError, match="gate_mode"):
        load_checkpoint(str(official_dir / "official_rec.pth"), gate_mode="half")


# ---- native and demo ----------------------------------------------------------------------------------------------
def tiny_gpt(seed=0, **overrides) -> GPT:
    return GPT(Config.from_name("tiny_hybrid", **overrides)).init_weights(seed=seed).double()


def test_native_and_demo_resolution(tmp_path, monkeypatch):
    model = tiny_gpt(gate_act="sigmoid")  # fla's GDN2 layer variant: a native config with a sigmoid gate
    save_native(model, tokenizer_src="byte", out_dir=tmp_path / "demo" / "mini", extra_meta={"bos_policy": "none"})
    monkeypatch.setattr(ckpt_mod, "DEMO_DIR", tmp_path / "demo")
    x = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(0))  # past the window (64)
    loaded = [load_checkpoint(spec) for spec in ("demo:mini", "mini", str(tmp_path / "demo" / "mini"))]
    assert rel_err(loaded[0].model(x), model(x)) < 1e-12
    for ld in loaded:
        assert ld.format == "native" and ld.config.gate_act == "sigmoid" and ld.sha256 == loaded[0].sha256
        assert ld.tokenizer.name == "byte" and ld.bos_policy == "none"
    with pytest.raises(FileNotFoundError, match="available demos are"):
        load_checkpoint("demo:other")


def test_tokenizer_files_and_bos_policy(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    src = tmp_path / "tok"
    src.mkdir()
    tok.save(str(src / "tokenizer.json"))
    save_native(tiny_gpt(), tokenizer_src=src, out_dir=tmp_path / "m")
    loaded = load_checkpoint(str(tmp_path / "m"))
    assert loaded.tokenizer.encode("a b") == [3, 4] and loaded.tokenizer.bos_id == 1
    assert loaded.bos_policy == "bos"  # the post-processor adds <s>, as the stream pipeline's call did
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "eos_token": "</s>"}))
    assert load_checkpoint(str(tmp_path / "m")).bos_policy == "none"


def test_sentencepiece_tokenizer_wins_and_vocab_is_checked(tmp_path):
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["the cat sat on the mat", "hello world"] * 20),
                                   model_writer=buf, vocab_size=30, model_type="bpe", bos_id=1, eos_id=2, unk_id=0,
                                   pad_id=-1, minloglevel=2)
    src = tmp_path / "tok"
    src.mkdir()
    (src / "tokenizer.model").write_bytes(buf.getvalue())
    save_native(tiny_gpt(), tokenizer_src=src / "tokenizer.model", out_dir=tmp_path / "m")
    loaded = load_checkpoint(str(tmp_path / "m"))
    assert loaded.tokenizer.vocab_size == 30 and loaded.tokenizer.bos_id == 1 and loaded.bos_policy == "bos"
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("the cat")) == "the cat"
    small = GPT(Config.from_name("tiny_hybrid", vocab_size=16, padding_multiple=16))
    save_native(small, tokenizer_src=src, out_dir=tmp_path / "small")
    with pytest.raises(CheckpointError, match="has 30 tokens but .* embeds only 16"):
        load_checkpoint(str(tmp_path / "small"))


# ---- fla HF folders, with independent float64 references ----------------------------------------------------------
def fla_config(model_type: str, **kw) -> dict:
    base = dict(model_type=model_type, hidden_size=32, num_hidden_layers=2, num_heads=2, head_dim=8, expand_v=1.0,
                vocab_size=64, intermediate_size=48, norm_eps=1e-6, conv_size=4)
    return {**base, **kw}


def fla_state(c: dict, seed: int = 0, legacy: bool = False) -> dict[str, torch.Tensor]:
    """Random weights with fla's key names and shapes (spec 3.1-3.4)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s, std=0.2: torch.randn(*s, generator=gen) * std  # noqa: E731
    d, H, K = c["hidden_size"], c["num_heads"], c["head_dim"]
    V, HV, I, W = int(K * c["expand_v"]), c.get("num_v_heads") or H, c["intermediate_size"], c["conv_size"]
    attn = c.get("attn") or {}
    sd = {"model.embeddings.weight": rnd(c["vocab_size"], d, std=1.0), "model.norm.weight": 1 + rnd(d, std=0.1)}
    if not c.get("tie_word_embeddings"):
        sd["lm_head.weight"] = rnd(c["vocab_size"], d)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd.update({p + "attn_norm.weight": 1 + rnd(d, std=0.1), p + "mlp_norm.weight": 1 + rnd(d, std=0.1),
                   p + "mlp.gate_proj.weight": rnd(I, d), p + "mlp.up_proj.weight": rnd(I, d),
                   p + "mlp.down_proj.weight": rnd(d, I)})
        a = p + "attn."
        if i in attn.get("layers", []):
            sd.update({a + f"{x}_proj.weight": rnd(d, d) for x in "qkvo"})
            continue
        sd.update({a + "q_proj.weight": rnd(H * K, d), a + "k_proj.weight": rnd(H * K, d),
                   a + "v_proj.weight": rnd(HV * V, d), a + "q_conv1d.weight": rnd(H * K, 1, W, std=0.4),
                   a + "k_conv1d.weight": rnd(H * K, 1, W, std=0.4), a + "v_conv1d.weight": rnd(HV * V, 1, W, std=0.4),
                   a + "b_proj.weight": rnd(HV, d, std=0.5), a + "A_log": torch.rand(HV, generator=gen) * 2,
                   a + "o_norm.weight": 1 + rnd(V, std=0.1), a + "o_proj.weight": rnd(d, HV * V)})
        if c["model_type"] == "kda":
            sd.update({a + "f_proj.0.weight": rnd(V, d), a + "f_proj.1.weight": rnd(HV * K, V),
                       a + "dt_bias": rnd(HV * K, std=1.0), a + "g_proj.0.weight": rnd(V, d),
                       a + "g_proj.1.weight": rnd(HV * V, V), a + "g_proj.1.bias": rnd(HV * V)})
            if legacy:
                sd[a + "A"] = sd.pop(a + "A_log")
                sd[a + "f_proj.1.bias"] = sd.pop(a + "dt_bias")
        else:
            sd.update({a + "a_proj.weight": rnd(HV, d, std=0.5), a + "dt_bias": rnd(HV, std=1.0)})
            if c.get("use_gate", True):
                sd[a + "g_proj.weight"] = rnd(HV * V, d)
    return sd


def write_fla_folder(folder: Path, c: dict, sd: dict[str, torch.Tensor], container: str = "safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(c))
    sd = {k: v.float().contiguous() for k, v in sd.items()}
    if container == "bin":
        torch.save(sd, folder / "pytorch_model.bin")
    elif container == "sharded":
        keys = sorted(sd)
        shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, ks in shards.items():
            save_file({k: sd[k] for k in ks}, str(folder / name))
        index = {"weight_map": {k: name for name, ks in shards.items() for k in ks}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(sd, str(folder / "model.safetensors"))
    return folder


def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _conv_silu(x, w):  # x [T, C], w [C, 1, W]: y[t] = silu(sum_j w[:, 0, j] * x[t - W + 1 + j])
    W = w.shape[-1]
    xp = torch.cat([x.new_zeros(W - 1, x.shape[1]), x])
    return F.silu(sum(w[:, 0, j] * xp[j:j + x.shape[0]] for j in range(W)))


def _l2(x):
    return x / torch.sqrt((x * x).sum() + 1e-6)


def ref_mixer(p: dict, x: torch.Tensor, c: dict) -> torch.Tensor:
    """fla KDA / Gated DeltaNet layer, one token at a time (spec 3.2 / 3.3)."""
    T, H, K = x.shape[0], c["num_heads"], c["head_dim"]
    V, HV = int(K * c["expand_v"]), c.get("num_v_heads") or H
    q = _conv_silu(x @ p["q_proj.weight"].T, p["q_conv1d.weight"]).view(T, H, K)
    k = _conv_silu(x @ p["k_proj.weight"].T, p["k_conv1d.weight"]).view(T, H, K)
    v = _conv_silu(x @ p["v_proj.weight"].T, p["v_conv1d.weight"]).view(T, HV, V)
    A_log = p["A_log"] if "A_log" in p else p["A"]
    if c["model_type"] == "kda":
        dt = p["dt_bias"] if "dt_bias" in p else p["f_proj.1.bias"]
        f = x @ p["f_proj.0.weight"].T @ p["f_proj.1.weight"].T
        g = (-A_log.exp()[:, None] * F.softplus((f + dt).view(T, HV, K)))  # per value head and key channel
    else:
        g = (-A_log.exp() * F.softplus(x @ p["a_proj.weight"].T + p["dt_bias"]))[..., None].expand(T, HV, K)
    beta = torch.sigmoid(x @ p["b_proj.weight"].T) * (2 if c.get("allow_neg_eigval") else 1)
    o = x.new_zeros(T, HV, V)
    for hv in range(HV):
        h = hv // (HV // H)
        S = x.new_zeros(K, V)
        for t in range(T):
            kn, qn = _l2(k[t, h]), _l2(q[t, h])
            S = S * g[t, hv].exp()[:, None]
            S = S + beta[t, hv] * torch.outer(kn, v[t, hv] - S.T @ kn)
            o[t, hv] = S.T @ (qn * K ** -0.5)
    o = _rms(o, p["o_norm.weight"], c["norm_eps"])
    if c["model_type"] == "kda":
        o = o * torch.sigmoid((x @ p["g_proj.0.weight"].T @ p["g_proj.1.weight"].T + p["g_proj.1.bias"]).view(T, HV, V))
    elif c.get("use_gate", True):
        gate = (x @ p["g_proj.weight"].T).view(T, HV, V)
        o = o * gate * torch.sigmoid(gate)
    return o.reshape(T, HV * V) @ p["o_proj.weight"].T


def ref_attention(p: dict, x: torch.Tensor, a: dict) -> torch.Tensor:
    """fla softmax attention: NeoX RoPE, causal, keys i - window + 1 .. i (spec 3.4)."""
    T, d = x.shape
    nh = a["num_heads"]
    hs = d // nh
    q, k, v = ((x @ p[f"{n}_proj.weight"].T).view(T, nh, hs) for n in "qkv")
    inv = a.get("rope_theta", 10000.0) ** (-torch.arange(0, hs // 2, dtype=x.dtype) * 2 / hs)
    ang = torch.arange(T, dtype=x.dtype)[:, None] * inv
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]

    def rope(t):
        t1, t2 = t[..., : hs // 2], t[..., hs // 2:]
        return torch.cat([t1 * cos - t2 * sin, t1 * sin + t2 * cos], -1)

    q, k = rope(q), rope(k)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    mask = (j <= i) & (j > i - a["window_size"])
    s = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(hs)
    o = torch.einsum("hij,jhd->ihd", s.masked_fill(~mask, float("-inf")).softmax(-1), v)
    return o.reshape(T, d) @ p["o_proj.weight"].T


def ref_logits(sd: dict, c: dict, tokens: torch.Tensor) -> torch.Tensor:
    sd = {k: v.double() for k, v in sd.items()}
    attn, eps = c.get("attn") or {}, c["norm_eps"]
    out = []
    for row in tokens:
        x = sd["model.embeddings.weight"][row]
        for i in range(c["num_hidden_layers"]):
            pre = f"model.layers.{i}."
            p = {k[len(pre) + 5:]: v for k, v in sd.items() if k.startswith(pre + "attn.")}
            h = _rms(x, sd[pre + "attn_norm.weight"], eps)
            x = x + (ref_attention(p, h, attn) if i in attn.get("layers", []) else ref_mixer(p, h, c))
            h = _rms(x, sd[pre + "mlp_norm.weight"], eps)
            mlp = F.silu(h @ sd[pre + "mlp.gate_proj.weight"].T) * (h @ sd[pre + "mlp.up_proj.weight"].T)
            x = x + mlp @ sd[pre + "mlp.down_proj.weight"].T
        head = sd.get("lm_head.weight", sd["model.embeddings.weight"])
        out.append(_rms(x, sd["model.norm.weight"], eps) @ head.T)
    return torch.stack(out)


FLA_CASES = {
    "kda": (fla_config("kda"), "safetensors", False),
    "kda_gva_negeig_tied": (fla_config("kda", num_v_heads=4, allow_neg_eigval=True, tie_word_embeddings=True),
                            "bin", False),
    "kda_legacy_names": (fla_config("kda", expand_v=2.0), "safetensors", True),
    "kda_hybrid_sharded": (fla_config("kda", num_hidden_layers=4, attn={"layers": [1, 3], "num_heads": 4,
                                                                       "window_size": 8, "rope_theta": 500.0}),
                           "sharded", False),
    "gdn": (fla_config("gated_deltanet", expand_v=2.0, num_v_heads=4), "safetensors", False),
    "gdn_nogate": (fla_config("gated_deltanet", use_gate=False), "bin", False),
}


def fla_tokens(c, B=2, T=20):
    return torch.randint(0, c["vocab_size"], (B, T), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("case", list(FLA_CASES))
def test_fla_folder_matches_reference_recurrence(tmp_path, case):
    c, container, legacy = FLA_CASES[case]
    sd = fla_state(c, legacy=legacy)
    folder = write_fla_folder(tmp_path / case, c, sd, container)
    loaded = load_checkpoint(str(folder), dtype="float64")
    assert loaded.format == "fla-" + c["model_type"]
    x = fla_tokens(c)
    assert rel_err(loaded.model(x), ref_logits(sd, c, x)) < 1e-5  # the model norms in fp32 even for fp64 weights


def test_fla_unsupported_variants_fail_clearly(tmp_path):
    c = fla_config("kda", num_hidden_layers=2, attn={"layers": [1], "num_heads": 4, "window_size": None})
    write_fla_folder(tmp_path / "full", c, fla_state(c))
    with pytest.raises(CheckpointError, match="window_size=null"):
        load_checkpoint(str(tmp_path / "full"))
    loaded = load_checkpoint(str(tmp_path / "full"), config={"local_window": 4096})  # the explicit opt-in
    assert loaded.config.local_window == 4096
    c = fla_config("kda", safe_gate=True, lower_bound=-5.0)
    write_fla_folder(tmp_path / "safe", c, fla_state(c))
    with pytest.raises(CheckpointError, match="lower_bound"):
        load_checkpoint(str(tmp_path / "safe"))
    c = fla_config("gated_deltanet")
    sd = fla_state(c)
    sd["model.layers.0.attn.D"] = torch.zeros(2)
    del sd["model.layers.1.mlp.up_proj.weight"]
    write_fla_folder(tmp_path / "extra", c, sd)
    with pytest.raises(CheckpointError, match=r"(?s)missing \(1\): transformer.h.1.mlp.swiglu.w2.weight.*"
                                              r"unexpected \(1\): transformer.h.0.attn.D"):
        load_checkpoint(str(tmp_path / "extra"))
