"""Contract tests of the lm-eval backend "gdn2" against from-scratch scoring with a tiny random model."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from evals.harness.backend import GDN2LM
from gdn2.config import Config
from gdn2.model import GPT
from gdn2.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "gdn2" / "demo" / "tokenizer"


def make_lm(preset="tiny", batch_size=8, **kw) -> GDN2LM:
    model = GPT(Config.from_name(preset, vocab_size=1024)).init_weights(seed=3)
    return GDN2LM(model=model, tokenizer=load_tokenizer(TOKENIZER), bos="true", batch_size=batch_size, **kw)


def from_scratch(lm: GDN2LM, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    whole = torch.tensor([ctx + cont])
    logp = F.log_softmax(lm.model(whole)[0].double(), -1)
    pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
    target = torch.tensor(cont)
    return float(logp[pos, target].sum()), bool((logp[pos].argmax(-1) == target).all())


REQUESTS = [("The grass is green. The sky is", " blue."), ("The grass is green. The sky is", " yellow"),
            ("The grass is green. The sky is", " b"), ("Question: what colour?\nAnswer:", " green"),
            ("", "A whole document with no context."), ("x" * 300, " y z"), ("Here we go.", " There and back again.")]


@pytest.mark.parametrize("preset", ["tiny", "tiny_hybrid"])
def test_shared_context_scoring_equals_from_scratch(preset):
    lm = make_lm(preset)
    res = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(REQUESTS)])
    for (ctx, cont), (ll, greedy) in zip(REQUESTS, res):
        if ctx:
            c, x = lm._encode_pair(ctx, cont)
        else:
            c, x = [lm.prefix_token_id], lm.tok_encode(cont, add_special_tokens=False)
        ref_ll, ref_greedy = from_scratch(lm, c, x)
        assert abs(ll - ref_ll) <= 1e-5 * max(1.0, abs(ref_ll)) and greedy == ref_greedy


def test_is_greedy_exact():
    lm = make_lm()
    ctx = lm.tok_encode("The sky is")
    logits, state = lm.model.prefill(torch.tensor([ctx]), logits="last")
    greedy = []
    for _ in range(4):
        nxt = logits.argmax(-1)
        greedy.append(int(nxt))
        logits, state = lm.model.step(nxt, state)
    other = greedy[:3] + [(greedy[3] + 1) % 1000]
    out = lm._loglikelihood_tokens([(("a", "b"), ctx, greedy), (("a", "c"), ctx, other)])
    assert out[0][1] is True and out[1][1] is False


@pytest.mark.parametrize("chunk", [4096, 7])
def test_rolling_equals_summed_token_logprobs(chunk):
    lm = make_lm("tiny_hybrid")
    lm.batching.rolling_chunk = chunk
    docs = ["One document that is long enough to cross several chunks of the rolling scorer. " * 3, "Short."]
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)])
    for doc, ll in zip(docs, got):
        ids = lm.tok_encode(doc, add_special_tokens=False)
        ref, _ = from_scratch(lm, [lm.prefix_token_id], ids)
        assert abs(ll - ref) <= 1e-5 * abs(ref)


def _gen(lm, ctx, **kwargs):
    return lm.generate_until([Instance("generate_until", {}, (ctx, kwargs), 0)])[0]


def _greedy_tokens(lm, ctx: str, n: int) -> list[int]:
    logits, state = lm.model.prefill(torch.tensor([lm.tok_encode(ctx)]), logits="last")
    out = []
    for _ in range(n):
        nxt = logits.argmax(-1)
        if int(nxt) == lm.tok.eos_id:
            break
        out.append(int(nxt))
        logits, state = lm.model.step(nxt, state)
    return out


def test_generate_until_stops_and_limits():
    lm = make_lm()
    ref = _greedy_tokens(lm, "The grass is", 24)
    free = _gen(lm, "The grass is", until=[], max_gen_toks=24)
    assert free == lm.tok.decode(ref)
    assert _gen(lm, "The grass is", until=[], max_gen_toks=5) == lm.tok.decode(ref[:5])
    for cut in (3, len(free) // 2):
        stop = free[cut:cut + 2]
        if stop.strip():
            assert _gen(lm, "The grass is", until=[stop], max_gen_toks=24) == free.split(stop)[0]


def test_batch_composition_does_not_change_results():
    reqs = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(REQUESTS)]
    one = make_lm(batch_size=1).loglikelihood(reqs)
    many = make_lm(batch_size=16).loglikelihood(reqs)
    for (a, ga), (b, gb) in zip(one, many):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)) and ga == gb
    gens = [Instance("generate_until", {}, (c or "x", {"until": ["."], "max_gen_toks": 8}), i)
            for i, (c, _) in enumerate(REQUESTS)]
    assert make_lm(batch_size=1).generate_until(gens) == make_lm(batch_size=16).generate_until(gens)


def test_bos_policy_is_explicit_and_recorded():
    lm = make_lm()
    assert lm.tok_encode("hi")[0] == lm.tok.bos_id
    lm.set_bos("none")
    assert lm.tok_encode("hi")[0] != lm.tok.bos_id and lm.prefix_token_id == lm.tok.eos_id
    assert lm.describe()["bos"] is False
    with pytest.raises(ValueError, match="bos="):
        lm.set_bos("maybe")


def _native_checkpoint(tmp_path: Path) -> Path:
    from evals.tools.train_demo import save

    model = GPT(Config.from_name("tiny", vocab_size=1024)).init_weights(seed=5)
    model.steps_done = 0
    model.config.name = "gdn2-demo"
    save(model, tmp_path / "ckpt", {}, TOKENIZER)
    return tmp_path / "ckpt"


def test_lm_eval_cli_runs_our_task_end_to_end(tmp_path):
    """`lm_eval --model gdn2 ... --include_path tasks` through lm-eval's own CLI, with the .pth plugin."""
    from evals.harness import lm_eval_plugin

    ckpt = _native_checkpoint(tmp_path)
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    lm_eval_plugin.install(str(site_dir))
    meta = json.dumps({"max_seq_lengths": [512], "num_samples": 2, "tokenizer": str(ckpt)})
    argv = ["lm_eval", "--model", "gdn2", "--model_args", f"pretrained={ckpt},device=cpu", "--include_path",
            str(ROOT / "tasks"), "--tasks", "ruler_niah_single_1", "--metadata", meta, "--limit", "2",
            "--output_path", str(tmp_path / "out")]
    code = (f"import site, sys; site.addsitedir({str(site_dir)!r}); sys.argv = {argv!r}; "
            "from lm_eval.__main__ import cli_evaluate; cli_evaluate()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**{k: v for k, v in __import__("os").environ.items() if k != "TQDM_DISABLE"},
                               "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gdn2 generate_until" in proc.stderr and "2/2" in proc.stderr  # our bar under lm-eval's CLI
    results = list((tmp_path / "out").rglob("results_*.json"))
    assert results, proc.stdout[-2000:]
    from lm_eval.utils import sanitize_model_name

    assert results[0].parent.name == sanitize_model_name(str(ckpt))  # the folder is named after pretrained=
    doc = json.loads(results[0].read_text())
    assert "512,none" in doc["results"]["ruler_niah_single_1"]
    from gdn2.formats.base import sha256_file

    assert doc["config"]["model_sha"] == sha256_file(next(ckpt.glob("*.safetensors")))  # get_model_info
    assert doc["config"]["model_dtype"] == "torch.float32" and doc["config"]["model_num_parameters"] > 0


def test_generation_read_back_in_blocks_equals_token_by_token(monkeypatch):
    """GPUs read tokens back every few steps: tokens past a stop or EOS inside a block must not leak out."""
    import functools

    import evals.harness.backend as backend
    from gdn2.generate import greedy_blocks

    gens = [Instance("generate_until", {}, (c or "x", {"until": [".", "e"], "max_gen_toks": 12}), i)
            for i, (c, _) in enumerate(REQUESTS)]
    ref = make_lm(batch_size=4).generate_until(gens)
    monkeypatch.setattr(backend, "greedy_blocks", functools.partial(greedy_blocks, first_block=5))
    assert make_lm(batch_size=4).generate_until(gens) == ref


@pytest.mark.parametrize("text,stop", [("naïve café", "é"), ("one\n\ntwo", "\n\n"), ("x" * 40 + "END", "END"),
                                        ("日本語のテキスト", "テキ")])
def test_stop_strings_found_from_the_tail_alone(text, stop):
    """StopStrings looks only at the last few tokens; it must fire exactly when the whole text first holds the stop."""
    from evals.harness.backend import StopStrings

    tok = load_tokenizer(TOKENIZER)
    ids = tok.encode(text)
    stops = StopStrings([stop], tok)
    first_full = next(i for i in range(1, len(ids) + 1) if stop in tok.decode(ids[:i]))
    first_tail = next(i for i in range(1, len(ids) + 1) if stops.found(ids[:i]))
    assert first_tail == first_full


# ---- lm-eval conventions: model args, batch_size=auto, get_model_info, progress -------------------------------------
LM_EVAL_DEFAULTS = {"batch_size": None, "max_batch_size": None, "device": None}  # what simple_evaluate passes


def test_model_args_string_reaches_the_backend():
    """`--model_args pretrained=...,dtype=...` as lm-eval hands it over (create_from_arg_string)."""
    from lm_eval.loggers.evaluation_tracker import GeneralConfigTracker

    args = "pretrained=demo:gdn2-demo,dtype=float32,device=cpu,batch_size=4,max_batch_tokens=2048,bos=false," \
           "prefill_chunk=512,max_gen_toks=17"
    lm = GDN2LM.create_from_arg_string(args, {**LM_EVAL_DEFAULTS, "batch_size": 9})  # --model_args win
    info = lm.describe()
    assert Path(info["checkpoint"]).name == "gdn2-demo" and info["format"]
    assert (info["dtype"], info["device"], info["batch_size"], info["max_batch_tokens"], info["bos"]) == \
        ("float32", "cpu", 4, 2048, False)
    chunk = getattr(lm, "_prefill_args", {}).get("chunk_tokens", getattr(lm.model, "chunk_tokens", None))
    assert chunk == 512 and lm.batching.max_gen_toks == 17
    assert GeneralConfigTracker._get_model_name(args) == "demo:gdn2-demo"  # lm-eval's output folder name
    cli = GDN2LM.create_from_arg_string("checkpoint=demo:gdn2-demo", {"batch_size": 3, "max_batch_size": 64,
                                                                       "device": "cpu"})
    assert cli.batching.batch_size == 3 and cli.describe()["sha256"] == info["sha256"]


@pytest.mark.parametrize("args,message", [
    ("pretrained=demo:gdn2-demo,dtpye=bfloat16", r"unknown gdn2 model arg dtpye \(did you mean dtype\?\): valid "
                                                 r"--model_args are pretrained, checkpoint, tokenizer, device, dtype"),
    ("pretrained=demo:gdn2-demo,chunk=4,bacth_size=2", r"model args chunk, bacth_size \(did you mean batch_size\?\)"),
    ("pretrained=demo:gdn2-demo,checkpoint=demo:kda-demo", "name two checkpoints"),
    ("pretrained=demo:gdn2-demo,batch_size=0", "batch_size=0: use a positive integer, auto or auto:N"),
    ("pretrained=demo:gdn2-demo,batch_size=auto:x", "batch_size=auto:x: use"),
    ("pretrained=demo:gdn2-demo,batch_size=auto,max_batch_size=-2", "max_batch_size=-2: use a positive integer"),
])
def test_bad_model_args_fail_with_the_valid_names(args, message):
    with pytest.raises(ValueError, match=message) as err:
        GDN2LM.create_from_arg_string(args, LM_EVAL_DEFAULTS)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=message.split(":")[0]):  # the Python constructor refuses them too
        GDN2LM(**__import__("lm_eval.utils").utils.simple_parse_args_string(args))


def test_model_args_list_is_the_constructors():
    import inspect

    params = set(inspect.signature(GDN2LM.__init__).parameters) - {"self", "model", "unknown"}
    assert params == set(GDN2LM.MODEL_ARGS)
    GDN2LM.check_model_args({"pretrained": "x", "batch_size": 1, "max_batch_size": 8, "device": "cpu"})


@pytest.mark.parametrize("spec", ["auto", "auto:4"])
def test_batch_size_auto_on_cpu_keeps_the_default_and_says_so(spec, caplog):
    from evals.harness.backend import DEFAULT_BATCH_SIZE

    with caplog.at_level("WARNING", logger="gdn2"):
        lm = make_lm(batch_size=spec, max_batch_tokens=96)
    assert lm.batching.batch_size == DEFAULT_BATCH_SIZE and lm.batch_sizes == {0: DEFAULT_BATCH_SIZE}
    assert any(f"batch_size={spec}" in r.message and "no GPU" in r.message for r in caplog.records)
    lm._probe_rows(3)  # the probe a GPU would run works on this model (3 rows x 32 tokens: the token budget)


def _fits_up_to(n):
    tried = []

    def fits(size):
        tried.append(size)
        if size > n:
            raise torch.OutOfMemoryError("fake")
    return fits, tried


@pytest.mark.parametrize("fits_up_to,start,limit,want", [(40, 8, 1024, 32), (1000, 8, 20, 20), (5, 8, 1024, 4),
                                                         (4096, 8, 1024, 1024), (1, 8, 64, 1)])
def test_batch_size_probe_finds_the_largest_that_fits(fits_up_to, start, limit, want):
    from evals.harness.backend import largest_fitting

    fits, tried = _fits_up_to(fits_up_to)
    assert largest_fitting(fits, start, limit) == want
    assert max(tried) <= limit


def test_batch_size_probe_names_the_fix_when_nothing_fits():
    from evals.harness.backend import largest_fitting
    from evals.harness.guards import GPUOutOfMemoryError

    with pytest.raises(GPUOutOfMemoryError, match="not even one row"):
        largest_fitting(_fits_up_to(0)[0], 8, 64)


def test_get_model_info_gives_lm_evals_keys():
    lm = GDN2LM("demo:gdn2-demo", device="cpu", dtype="float32")
    info = lm.get_model_info()
    assert set(info) == {"model_num_parameters", "model_dtype", "model_revision", "model_sha"}
    assert info["model_num_parameters"] == lm.describe()["num_parameters"] == sum(
        p.numel() for p in lm.model.parameters()) > 0
    assert info["model_dtype"] == "torch.float32" and info["model_sha"] == lm.describe()["sha256"]
    assert len(lm.describe()["tokenizer_sha256"]) == 64 and lm.weight_files == lm.loaded.weight_files


def _three_kinds():
    return [
        ("loglikelihood", [Instance("loglikelihood", {}, r, i) for i, r in enumerate(REQUESTS)]),
        ("loglikelihood_rolling", [Instance("loglikelihood_rolling", {}, ("Some document.",), i) for i in range(3)]),
        ("generate_until", [Instance("generate_until", {}, ("x", {"until": ["."], "max_gen_toks": 3}), i)
                            for i in range(2)]),
    ]


def test_progress_hooks_see_every_request_list_with_its_total():
    lm = make_lm(batch_size=2)
    seen = []
    lm.progress.start_hook = lambda total: seen.append(["start", total, 0])
    lm.progress.hook = lambda requests, tokens: seen[-1].__setitem__(2, seen[-1][2] + requests)
    for kind, reqs in _three_kinds():
        getattr(lm, kind)(reqs)
    assert seen == [["start", n, n] for n in (len(REQUESTS), 3, 2)]
    assert lm.progress.bar is None


def test_a_tqdm_bar_without_hooks_unless_disabled(capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    lm = make_lm(batch_size=2)
    for kind, reqs in _three_kinds():
        getattr(lm, kind)(reqs)
        err = capsys.readouterr().err
        assert f"gdn2 {kind}" in err and f"{len(reqs)}/{len(reqs)}" in err
        getattr(lm, kind)(reqs, disable_tqdm=True)
        assert f"gdn2 {kind}" not in capsys.readouterr().err
    assert lm.progress.bar is None
