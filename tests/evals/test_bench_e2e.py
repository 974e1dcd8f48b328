"""The end-to-end benchmark on the CPU at the tiny shapes: the fla KDA folder it writes, its requests, the compute
floor, its report, and the hybrid-vs-recurrent comparison."""
import importlib.util
import json
import os
import re

import pytest
import torch
from lm_eval.api.instance import Instance
from safetensors import safe_open

from evals.tools import bench_e2e
from evals.tools.bench import report as bench_report
from evals.tools.bench.harnesses import anchor_available, anchor_generate_warning
from evals.tools.bench.mixes import compare_loglikelihoods, compute_floor
from evals.tools.bench.models import build_model, param_split, word_list, write_fla_kda_folder
from evals.tools.bench.workload import MIXES, make_requests, needed_tokens, parse_counts
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
    tokens = torch.randint(3, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded.model(tokens), model(tokens), rtol=1e-5, atol=1e-5)
    words = word_list(model.config.vocab_size - 3)
    assert loaded.tokenizer.encode(f"{words[0]} {words[5]}") == [3, 8]  # one token per word, after 3 specials
    assert loaded.tokenizer.vocab_size == model.config.vocab_size


def test_requests_have_the_mix_lengths_in_tokens(folder_and_model):
    folder, _ = folder_and_model
    tok = load_checkpoint(str(folder)).tokenizer
    words = word_list(tok.vocab_size - 3)
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
    assert anchor_available().startswith("not installed")


def test_command_end_to_end_without_anchor(tmp_path):
    import run_eval

    out = tmp_path / "e2e.md"
    rc = run_eval.main(["bench", "e2e", "--shape", "tiny", "--device", "cpu", "--no-anchor", "--counts",
                        "mc=2,lambada=3,recall=1,niah=0", "--length-scale", "0.02", "--gen-cap", "2",
                        "--batch-sizes", "1,4", "--decode-batches", "1,2", "--decode-steps", "2", "--out", str(out),
                        "--workdir", str(tmp_path), "--profile", str(tmp_path / "prof")])
    assert rc == 0
    profile = (tmp_path / "prof" / "profile-mc.txt").read_text()
    assert profile.startswith("wall ") and "aten::" in profile and "function calls" in profile  # ops, then Python
    report = json.loads(out.with_suffix(".json").read_text())
    assert {"device", "torch", "triton", "lm_eval", "fla", "date", "copy_TBps", "matmul_TFLOPs"} <= set(report["env"])
    assert report["env"]["fla"] is None or importlib.util.find_spec("fla")
    rows = {r["mix"]: r for r in report["mixes"]}
    assert [r["mix"] for r in report["mixes"]] == ["mc", "lambada", "recall"]  # niah=0 skips a mix
    assert [rows[m]["requests"] for m in rows] == [8, 3, 1]
    assert all(r["ours_req_s"] > 0 and r["anchor"] == "off" for r in rows.values())
    for m in ("mc", "lambada"):  # the sweep ran every batch size; the best is the fastest timed pass
        sweep = rows[m]["ours_sweep"]
        assert [x["batch"] for x in sweep] == [1, 4]
        best = max(sweep, key=lambda x: x["req_s"])
        assert rows[m]["ours_best_batch"] == best["batch"] and rows[m]["ours_req_s"] == best["req_s"]
        assert rows[m]["compute_floor_s"] > 0
        assert rows[m]["ours_over_floor"] == pytest.approx(rows[m]["ours_s"] / rows[m]["compute_floor_s"])
    assert [x["batch"] for x in rows["recall"]["ours_sweep"]] == [64]  # generation: --batch-size only
    assert 0 <= rows["mc"]["acc_ours"] <= 1
    assert [r["B"] for r in report["decode"]] == [1, 2]
    assert all(r["floor_ms"] > 0 and r["ours_ms"] > 0 and r["graph_note"] == "cuda only" for r in report["decode"])
    assert report["long_context"] == [{"length": None, "note": "cuda only"}]
    text = out.with_suffix(".md").read_text()
    for title in ("Requests/s on identical lm-eval requests", "Batch sweep", "Decoding after", "Long-context prefill"):
        assert title in text
    assert re.search(r"\|\s+recall \|\s+1 \|", text) and "cuda only" in text
    again = tmp_path / "again.md"
    assert run_eval.main(["bench", "e2e", "--render", str(out.with_suffix(".json")), "--out", str(again)]) == 0
    assert again.read_text() == text


def test_hybrid_command_compares_with_the_recurrent_twin(tmp_path):
    import run_eval

    out = tmp_path / "hybrid.md"
    rc = run_eval.main(["bench", "e2e", "--shape", "tiny_hybrid", "--device", "cpu", "--counts",
                        "mc=2,lambada=2,recall=1,niah=0", "--length-scale", "0.02", "--gen-cap", "2",
                        "--decode-batches", "2", "--decode-steps", "2", "--out", str(out), "--workdir", str(tmp_path)])
    assert rc == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["setup"]["twin"] == "tiny" and report["setup"]["params"] > report["setup"]["twin_params"]
    assert not report["mixes"] and not report["decode"]  # no anchor for a hybrid
    rows = {r["work"]: r for r in report["hybrid"]}
    assert list(rows) == ["decode B=2", "long", "mc", "lambada", "recall"]
    assert rows["long"]["note"] == "cuda only"
    for work in ("decode B=2", "mc", "lambada", "recall"):
        r = rows[work]
        assert r["hybrid_req_s"] > 0 and r["recurrent_req_s"] > 0
        assert r["hybrid_over_recurrent"] == pytest.approx(r["hybrid_req_s"] / r["recurrent_req_s"])
    assert rows["mc"]["requests"] == 8 and rows["mc"]["speed_target"] == 0.75 and rows["mc"]["peak_target"] == 1.5
    assert rows["recall"]["speed_target"] == 0.6
    # the hybrid's decode floor counts its key/value ring: more bytes per step than the recurrent twin's
    assert rows["decode B=2"]["hybrid_floor_ms"] > rows["decode B=2"]["recurrent_floor_ms"]
    assert "Hybrid tiny_hybrid against its recurrent twin tiny" in out.with_suffix(".md").read_text()


def test_needed_tokens_count_each_context_once():
    reqs = [Instance("loglikelihood", {"doc": 0}, ("a b c", " d e"), 0),
            Instance("loglikelihood", {"doc": 0}, ("a b c", " f"), 1),
            Instance("loglikelihood", {"doc": 1}, ("g h", " i j k"), 0)]
    # contexts 3 + 2 tokens once; continuations but their last token: 1 + 0 + 2; scored tokens 2 + 1 + 3
    assert needed_tokens(reqs) == dict(body=8, head=6, naive=(3 + 1) + (3 + 0) + (2 + 2), contexts=2)


def test_compute_floor_is_body_and_head_flops_over_the_rate():
    model = build_model("tiny")
    split = param_split(model)
    assert split["body"] + split["head"] + split["embedding"] == split["total"] and split["head"] == 512 * 128
    reqs = make_requests(MIXES["mc"], word_list(50), docs=3, length_scale=0.05)
    tokens = needed_tokens(reqs)
    got = compute_floor(model, reqs, flops_per_s=1e9)
    assert got["floor_flops"] == 2 * split["body"] * tokens["body"] + 2 * split["head"] * tokens["head"]
    assert got["compute_floor_s"] == pytest.approx(got["floor_flops"] / 1e9)
    assert tokens["body"] < tokens["naive"]  # 4 continuations share each context


def test_estimate_only_spends_no_time_measuring(capsys):
    import run_eval

    assert run_eval.main(["bench", "e2e", "--estimate-only", "--sections", "mixes", "--counts",
                          "recall=0,niah=0"]) == 0
    err = capsys.readouterr().err
    assert "estimated H200 wall time" in err and "mixes: mc" in err and "mixes: recall" not in err
    assert "ours at 4 batch size(s), anchor at 4" in err and "total" in err


def test_exact_fp32_sets_triton_and_torch_precision(monkeypatch):
    monkeypatch.setenv("TRITON_F32_DEFAULT", "tf32")
    with pytest.raises(ValueError, match="unset it"):
        bench_e2e._exact_fp32()
    monkeypatch.delenv("TRITON_F32_DEFAULT")  # restored by monkeypatch afterwards
    kept = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        bench_e2e._exact_fp32()
        assert os.environ["TRITON_F32_DEFAULT"] == "ieee" and torch.get_float32_matmul_precision() == "highest"
    finally:
        os.environ.pop("TRITON_F32_DEFAULT", None)
        torch.set_float32_matmul_precision(kept)


@pytest.mark.parametrize("argv,message", [
    (["--gates", "native"], "--gates native has no fla twin"),
    (["--sections", "mixes,speed"], "--sections speed"),
    (["--exact-fp32", "--dtype", "bfloat16"], "--exact-fp32 runs in float32"),
    (["--batch-sizes", "0"], "positive integers"),
])
def test_bad_arguments_fail_before_measuring(argv, message, capsys):
    import run_eval

    assert run_eval.main(["bench", "e2e", "--estimate-only", *argv]) == 2
    assert message in capsys.readouterr().err


def test_decisions_compare_argmax_per_document():
    mix = MIXES["mc"]
    reqs = make_requests(mix, word_list(50), docs=2, length_scale=0.05)
    ours = [(-1.0, False), (-2.0, False), (-3.0, False), (-4.0, False)] + [(-5.0, False)] * 3 + [(-0.5, False)]
    anchor = [(-1.0, False), (-2.0, False), (-3.0, False), (-4.0, False)] + [(-0.1, False)] + [(-5.0, False)] * 3
    got = compare_loglikelihoods(mix, ours, anchor, reqs)
    assert got["max_abs_ll_diff"] == pytest.approx(4.9)
    assert got["max_rel_ll_diff"] == pytest.approx(4.9 / 0.1)
    # doc 0: both pick choice 0 (the gold); doc 1: ours picks 3, the anchor picks 0
    assert (got["acc_ours"], got["acc_anchor"], got["acc_agree"]) == (0.5, 1.0, 0.5)


def test_render_marks_targets_on_gpu_shaped_rows():
    env = dict(device="H200", torch="2", triton="3", lm_eval="0.4.13", fla="0.6.0", transformers="5", copy_TBps=4.2,
               matmul_TFLOPs=700.0, date="today")
    setup = dict(shape="gdn2_1.3B", params=1.28e9, dtype="bfloat16", prefill_chunk=16384, length_scale=1.0,
                 decode_prompt=512)
    report = bench_report.Report(env, setup)
    ll = dict(kind="loglikelihood", acc_ours=0.25, acc_anchor=0.25, acc_agree=1.0, max_abs_ll_diff=0.2)
    report.mixes = [
        dict(ll, mix="mc", requests=4000, ours_req_s=3000.0, anchor_req_s=590.0, ratio=3000 / 590, ratio_target=4.0,
             ours_over_floor=1.3, ours_sweep=[dict(batch=64, req_s=2000.0), dict(batch=256, req_s=3000.0)],
             anchor_sweep=[dict(batch=64, req_s=590.0), dict(batch=256, note="out of memory")]),
        dict(ll, mix="lambada", requests=2000, ours_req_s=1458.0, anchor_req_s=1226.0, ratio=1.19, ratio_target=2.0,
             ours_over_floor=2.5),
        dict(mix="niah", kind="generate_until", requests=4, ours_req_s=2.0, anchor="out of memory")]
    report.decode = [dict(B=1, ours_ms=5.0, ours_graph_ms=1.0, ours_tok_s=1000.0, floor_ms=0.7, ours_floor_ratio=1.4),
                     dict(B=256, ours_ms=6.0, ours_graph_ms=None, graph_note="capture failed: X", ours_tok_s=1e4,
                          floor_ms=1.4, ours_floor_ratio=6 / 1.4, anchor_ms=60.0, anchor_tok_s=1000.0)]
    # chunk 16384: the 4K prompt fits in one smaller pass, so the longest is judged against the 32K prompt
    report.long_context = [dict(length=T, chunk=c, peak_GiB=p, working_GiB=p - 2.5, peak_vs_first=p / pts[0],
                                prefill_s=1.0, tok_s=T) for c, pts in ((4096, (3.0, 3.05, 3.1)),
                                                                       (16384, (2.8, 3.0, 3.4)),
                                                                       (65536, (2.8, 3.0, 3.05)))
                           for T, p in zip((4096, 32768, 131072), pts)]
    lines = bench_report.render(report).splitlines()
    row = lambda first, n=0: [ln for ln in lines if re.match(rf"\|\s+{first} \|", ln)][n]  # noqa: E731
    assert row("mc").rstrip(" |").endswith("met")  # bf16: |d ll| 0.2 is not a target outside --exact-fp32
    assert row("lambada").rstrip(" |").endswith("MISSED: floor 2.50x > 1.5, anchor 1.19x < 2")
    assert "out of memory" in row("niah")
    assert re.search(r"\|\s+mc \|\s+ours \|\s+2000.0 \|\s+3000.0 \|", row("mc", 1))  # the sweep table
    assert "out of memory" in row("mc", 2)
    assert row("256").rstrip(" |").endswith("MISSED") and "capture failed" in row("256")
    long_rows = [ln for ln in lines if re.match(r"\|\s+131072 \|", ln)]
    assert [ln.rstrip(" |").split()[-1] for ln in long_rows] == ["met", "MISSED", "met"]
    report.setup["exact_fp32"] = True  # the fp32 agreement run judges |d ll| too
    assert bench_report.mix_target(report.mixes[0], exact=True) == "MISSED: |d ll| 0.2 > 0.001"


def test_hybrid_targets_follow_issue_15():
    row = lambda **kw: dict(dict(hybrid_over_recurrent=1.0), **kw)  # noqa: E731
    target = bench_report.hybrid_target
    assert target(row(speed_target=0.75, peak_target=1.5, peak_ratio=1.2)) == "met"
    assert target(row(hybrid_over_recurrent=0.5, speed_target=0.6)) == "MISSED: speed 0.50x < 0.6"
    assert target(row(speed_target=0.75, peak_target=1.5, peak_ratio=6.9)) == "MISSED: peak 6.90x > 1.5"
    assert target(row(floor_target=2.0, hybrid_floor_ratio=21.8)) == "MISSED: floor 21.80x > 2"
    assert target(row(speed_target=0.75, long_peak_target=1.1, hybrid_peak_vs_first=1.0)) == "met"
    assert target(row()) == "-"


def test_anchor_generate_warning_names_the_broken_transformers_versions():
    assert anchor_generate_warning("5.17.0", "0.6.0") is None
    assert "transformers < 5.24" in anchor_generate_warning("5.24.0", "0.6.0")
    assert anchor_generate_warning("5.24.0", None) is None


def test_mixes_section_sweeps_and_compares_both_harnesses(folder_and_model):
    """The anchor's side of the mixes section, with our backend standing in for lm-eval's hf model (fla is absent
    here): both swept, the best of each reported with its batch, log-likelihoods compared."""
    from evals.tools.bench.harnesses import load_ours
    from evals.tools.bench.mixes import bench_mixes

    folder, model = folder_and_model
    ours, stand_in = (load_ours(folder, "cpu", "float32", 4, 1 << 14, 64) for _ in range(2))
    stand_in.name = "anchor"
    report = bench_report.Report(env={}, setup={})
    bench_mixes(report, ours, stand_in, None, word_list(model.config.vocab_size - 3), {"mc": 2, "recall": 1}, 0.05,
                2, "cpu", [1, 2], [2, 8], 1, 1e9, lambda msg: None)
    mc, recall = report.mixes
    assert [x["batch"] for x in mc["ours_sweep"]] == [1, 2] and [x["batch"] for x in mc["anchor_sweep"]] == [2, 8]
    assert mc["anchor_best_batch"] in (2, 8) and mc["ratio"] == pytest.approx(mc["ours_req_s"] / mc["anchor_req_s"])
    assert mc["max_abs_ll_diff"] < 1e-4 and mc["acc_agree"] == 1.0  # one function, one dtype: same numbers
    assert [x["batch"] for x in recall["anchor_sweep"]] == [MIXES["recall"].anchor_batch] and recall["same_text"] == 1


def test_a_run_stopped_during_the_anchor_sweep_keeps_ours_in_the_report(folder_and_model, tmp_path):
    """A time limit killed an H200 run in the anchor's sweep and the report file held nothing: every progress line
    rewrites the report, and a mix's row is in it (ours measured, the anchor marked) before the anchor runs."""
    from evals.tools.bench.harnesses import load_ours
    from evals.tools.bench.mixes import bench_mixes

    folder, model = folder_and_model
    ours, stand_in = (load_ours(folder, "cpu", "float32", 4, 1 << 14, 64) for _ in range(2))
    stand_in.name = "anchor"
    report, out = bench_report.Report(env={}, setup={}), tmp_path / "partial.json"

    def log(msg: str) -> None:
        out.write_text(json.dumps(report.mixes))  # what write() would save at this line
        if msg.startswith("mc: anchor batch"):
            raise KeyboardInterrupt  # the time limit, after the anchor's first batch

    with pytest.raises(KeyboardInterrupt):
        bench_mixes(report, ours, stand_in, None, word_list(model.config.vocab_size - 3), {"mc": 2}, 0.05, 2,
                    "cpu", [1, 2], [2, 8], 1, 1e9, log)
    (mc,) = json.loads(out.read_text())
    assert [x["batch"] for x in mc["ours_sweep"]] == [1, 2] and mc["ours_req_s"] > 0
    assert [x["batch"] for x in mc["anchor_sweep"]] == [2] and mc["anchor"].startswith("not measured")


def test_bench_kernels_command_exits_0_after_its_table(monkeypatch):
    """run_eval's main takes int() of the command's return: bench kernels returned its Report (a TypeError, exit 2
    on the H200 after the table was printed)."""
    import run_eval
    from evals.tools import bench_kernels

    monkeypatch.setattr(bench_kernels, "run", lambda args: bench_kernels.Report(env={}))  # no GPU here
    assert run_eval.main(["bench", "kernels", "--no-fla"]) == 0


def test_decode_floor_reads_the_ring_once_and_the_matrix_state_twice():
    from evals.tools.bench.decode import state_traffic_bytes
    from gdn2.state import State

    swa = {"k": torch.zeros(2, 7, 3, 4), "v": torch.zeros(2, 7, 3, 4)}  # fp32: 4 bytes an element
    gdn = {"S": torch.zeros(2, 3, 4, 4), "conv": torch.zeros(2, 3, 5, dtype=torch.bfloat16)}
    state = State([swa, gdn], torch.zeros(2, dtype=torch.long))
    assert state_traffic_bytes(state) == 2 * 168 * 4 + 2 * (96 * 4 + 30 * 2)


def test_decode_floor_counts_the_full_ring_the_step_reads():
    """A short prompt leaves the prefill's rings cut to it; the step reads the stepper's full-size rings, and the
    floor must count those (on the H200 a cut ring made the floor 1.6 ms for a step that moves 3.6 ms of bytes)."""
    from evals.tools.bench.decode import ours_decode, state_traffic_bytes
    from evals.tools.bench.harnesses import Harness

    model = build_model("tiny_hybrid", seed=2)
    prompt = 3
    assert model.config.local_window - 1 > prompt + 1  # the prefill's ring is shorter than the full one
    row = ours_decode(Harness("hybrid", lm=None, model=model, prefill_chunk=64, backend="torch"), 2, prompt, 1, "cpu")
    full = model.new_state(2, "cpu")
    assert row["traffic_bytes"] == state_traffic_bytes(full) and row["state_bytes"] == full.nbytes()
