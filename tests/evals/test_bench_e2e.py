"""The end-to-end benchmark on the CPU at the tiny shape: the fla KDA folder it writes, its requests, its report."""
import importlib.util
import json
import re

import pytest
import torch
from safetensors import safe_open

from evals.tools import bench_e2e
from evals.tools.bench_e2e import MIXES, build_model, make_requests, parse_counts, write_fla_kda_folder
from gdn2.checkpoint import load_checkpoint

# fla KDA's parameter names of one layer (spec section 3.2 and 3.1), written out independently of the code
FLA_LAYER_KEYS = {
    "attn_norm.weight", "mlp_norm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    *(f"attn.{k}" for k in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "q_conv1d.weight", "k_conv1d.weight",
                            "v_conv1d.weight", "f_proj.0.weight", "f_proj.1.weight", "b_proj.weight", "A_log",
                            "dt_bias", "g_proj.0.weight", "g_proj.1.weight", "g_proj.1.bias", "o_norm.weight",
                            "o_proj.weight")),
}


@pytest.fixture(scope="module")
def folder_and_model(tmp_path_factory):
    model = build_model("tiny", seed=1)
    return write_fla_kda_folder(model, tmp_path_factory.mktemp("fla") / "kda"), model


def test_fla_folder_has_fla_kda_names_and_config(folder_and_model):
    folder, model = folder_and_model
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "kda" and cfg["architectures"] == ["KDAForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_heads"], cfg["head_dim"]) == (128, 2, 2, 32)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert tuple(f.get_tensor("model.layers.0.attn.b_proj.weight").shape) == (2, 128)  # one beta per head
    layer_keys = {k.removeprefix("model.layers.0.") for k in keys if k.startswith("model.layers.0.")}
    assert layer_keys == FLA_LAYER_KEYS
    assert keys - {k for k in keys if k.startswith("model.layers.")} == {
        "model.embeddings.weight", "model.norm.weight", "lm_head.weight"}


def test_fla_folder_loads_with_our_loader_and_matches_the_model(folder_and_model):
    folder, model = folder_and_model
    loaded = load_checkpoint(str(folder))
    assert loaded.format == "fla-kda"
    assert loaded.inferred["variant"]["beta"] == "scalar" and loaded.inferred["variant"]["gate_act"] == "sigmoid"
    model.backend = loaded.model.backend = "torch"
    tokens = torch.randint(3, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded.model(tokens), model(tokens), rtol=1e-5, atol=1e-5)
    words = bench_e2e.word_list(model.config.vocab_size - 3)
    assert loaded.tokenizer.encode(f"{words[0]} {words[5]}") == [3, 8]  # one token per word, after 3 specials
    assert loaded.tokenizer.vocab_size == model.config.vocab_size


def test_requests_have_the_mix_lengths_in_tokens(folder_and_model):
    folder, _ = folder_and_model
    tok = load_checkpoint(str(folder)).tokenizer
    words = bench_e2e.word_list(tok.vocab_size - 3)
    mc = make_requests(MIXES["mc"], words, docs=3)
    assert len(mc) == 12 and len({r.args[0] for r in mc}) == 3  # 4 continuations share each context
    for r in mc:
        assert 100 <= len(tok.encode(r.args[0])) <= 300 and 10 <= len(tok.encode(r.args[1])) <= 30
    lam = make_requests(MIXES["lambada"], words, docs=2)
    assert all(len(tok.encode(r.args[1])) == 1 for r in lam)
    niah = make_requests(MIXES["niah"], words, docs=1, length_scale=0.5, gen_cap=5)
    assert 2048 <= len(tok.encode(niah[0].args[0])) <= 8192
    assert niah[0].args[1] == dict(until=["\n"], max_gen_toks=5, do_sample=False, temperature=0.0)


def test_bad_counts_fail_clearly():
    assert parse_counts("mc=2, niah=0") == {"mc": 2, "niah": 0}
    with pytest.raises(ValueError, match="--counts item 'arc=3'"):
        parse_counts("arc=3")


@pytest.mark.skipif(importlib.util.find_spec("fla") is not None, reason="fla is installed here")
def test_anchor_reports_not_installed_without_fla():
    assert bench_e2e.anchor_available().startswith("not installed")


def test_command_end_to_end_without_anchor(tmp_path):
    import run_eval

    out = tmp_path / "e2e.md"
    rc = run_eval.main(["bench", "e2e", "--shape", "tiny", "--device", "cpu", "--no-anchor", "--counts",
                        "mc=2,lambada=3,recall=1,niah=1", "--length-scale", "0.02", "--gen-cap", "3",
                        "--decode-batches", "1,2", "--decode-steps", "2", "--out", str(out),
                        "--workdir", str(tmp_path), "--profile", str(tmp_path / "prof")])
    assert rc == 0
    profile = (tmp_path / "prof" / "profile-mc.txt").read_text()
    assert profile.startswith("wall ") and "aten::" in profile and "_score_batch" in profile  # ops, then Python
    report = json.loads(out.with_suffix(".json").read_text())
    assert {"device", "torch", "triton", "lm_eval", "fla", "date"} <= set(report["env"])
    assert report["env"]["fla"] is None or importlib.util.find_spec("fla")
    rows = {r["mix"]: r for r in report["mixes"]}
    assert [r["mix"] for r in report["mixes"]] == ["mc", "lambada", "recall", "niah"]
    assert [rows[m]["requests"] for m in rows] == [8, 3, 1, 1]
    assert all(r["ours_req_s"] > 0 and r["anchor"] == "off" for r in rows.values())
    assert 0 <= rows["mc"]["acc_ours"] <= 1
    assert [r["B"] for r in report["decode"]] == [1, 2]
    assert all(r["floor_ms"] > 0 and r["ours_ms"] > 0 and r["graph_note"] == "cuda only" for r in report["decode"])
    assert report["long_context"] == [{"length": None, "note": "cuda only"}]
    text = out.with_suffix(".md").read_text()
    for title in ("Requests/s on identical lm-eval requests", "Decoding after", "Long-context prefill"):
        assert title in text
    assert re.search(r"\|\s+niah \|\s+1 \|", text) and "cuda only" in text
    again = tmp_path / "again.md"
    assert run_eval.main(["bench", "e2e", "--render", str(out.with_suffix(".json")), "--out", str(again)]) == 0
    assert again.read_text() == text


def test_decisions_compare_argmax_per_document():
    mix = MIXES["mc"]
    reqs = make_requests(mix, bench_e2e.word_list(50), docs=2, length_scale=0.05)
    ours = [(-1.0, False), (-2.0, False), (-3.0, False), (-4.0, False)] + [(-5.0, False)] * 3 + [(-0.5, False)]
    anchor = [(-1.0, False), (-2.0, False), (-3.0, False), (-4.0, False)] + [(-0.1, False)] + [(-5.0, False)] * 3
    got = bench_e2e.compare_loglikelihoods(mix, ours, anchor, reqs)
    assert got["max_abs_ll_diff"] == pytest.approx(4.9)
    assert got["max_rel_ll_diff"] == pytest.approx(4.9 / 0.1)
    # doc 0: both pick choice 0 (the gold); doc 1: ours picks 3, the anchor picks 0
    assert (got["acc_ours"], got["acc_anchor"], got["acc_agree"]) == (0.5, 1.0, 0.5)


def test_render_marks_targets_on_gpu_shaped_rows():
    env = dict(device="H200", torch="2", triton="3", lm_eval="0.4.13", fla="0.6.0", transformers="5", copy_TBps=4.2,
               date="today")
    setup = dict(shape="gdn2_1.3B", params=1.28e9, dtype="bfloat16", prefill_chunk=16384, length_scale=1.0,
                 decode_prompt=512)
    report = bench_e2e.Report(env, setup)
    report.mixes = [
        dict(mix="mc", kind="loglikelihood", requests=1000, ours_req_s=900.0, anchor_req_s=230.0, ratio=900 / 230,
             max_abs_ll_diff=5e-4, acc_ours=0.25, acc_anchor=0.25, acc_agree=1.0),
        dict(mix="lambada", kind="loglikelihood", requests=500, ours_req_s=200.0, anchor_req_s=80.0, ratio=2.5,
             max_abs_ll_diff=5e-4, acc_ours=0.0, acc_anchor=0.0, acc_agree=1.0),
        dict(mix="niah", kind="generate_until", requests=4, ours_req_s=2.0, anchor="out of memory")]
    report.decode = [dict(B=1, ours_ms=5.0, ours_graph_ms=1.0, ours_tok_s=1000.0, floor_ms=0.7, ours_floor_ratio=1.4),
                     dict(B=64, ours_ms=6.0, ours_graph_ms=None, graph_note="capture failed: X", ours_tok_s=1e4,
                          floor_ms=1.4, ours_floor_ratio=6 / 1.4, anchor_ms=60.0, anchor_tok_s=1000.0)]
    # chunk 16384: the 4K prompt fits in one smaller pass, so the longest is judged against the 32K prompt
    report.long_context = [dict(length=T, chunk=c, peak_GiB=p, working_GiB=p - 2.5, peak_vs_first=p / pts[0],
                                prefill_s=1.0, tok_s=T) for c, pts in ((4096, (3.0, 3.05, 3.1)),
                                                                       (16384, (2.8, 3.0, 3.4)),
                                                                       (65536, (2.8, 3.0, 3.05)))
                           for T, p in zip((4096, 32768, 131072), pts)]
    lines = bench_e2e.render(report).splitlines()
    row = lambda first: next(ln for ln in lines if re.match(rf"\|\s+{first} \|", ln))  # noqa: E731
    assert row("mc").rstrip(" |").endswith("met") and row("lambada").rstrip(" |").endswith("MISSED")
    assert "out of memory" in row("niah")
    assert row("64").rstrip(" |").endswith("MISSED") and "capture failed" in row("64")
    long_rows = [ln for ln in lines if re.match(r"\|\s+131072 \|", ln)]
    assert [ln.rstrip(" |").split()[-1] for ln in long_rows] == ["met", "MISSED", "met"]


def test_anchor_generate_warning_names_the_broken_transformers_versions():
    assert bench_e2e.anchor_generate_warning("5.17.0", "0.6.0") is None
    assert "transformers < 5.24" in bench_e2e.anchor_generate_warning("5.24.0", "0.6.0")
    assert bench_e2e.anchor_generate_warning("5.24.0", None) is None
