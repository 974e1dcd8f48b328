"""Each private lm-eval hook of evals.harness.lm_eval_compat, run through lm-eval's own code.

If an lm-eval upgrade moves one of them, its test here fails (or the hook's own shape check raises
LMEvalCompatError), before a run silently loses the behaviour the hook provides.
"""
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM

from evals.harness import guards, lm_eval_compat
from evals.harness.lm_eval_compat import LMEvalCompatError

ROOT = Path(__file__).resolve().parents[2]

TASK_YAML = """\
task: compat_probe
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: !function helpers.text
doc_to_target: " {{{{answer}}}}"
metric_list:
  - metric: acc
metadata:
  version: 1.0
  own: 1
"""


@pytest.fixture
def task_dir(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps({"q": q, "answer": a}) + "\n" for q, a in [("sky", "blue"), ("grass", "green")]))
    (folder / "helpers.py").write_text("def text(doc):\n    return 'The ' + doc['q'] + ' is'\n")
    (folder / "compat_probe.yaml").write_text(TASK_YAML.format(data=data))
    guards.guard_yaml_functions([folder])  # a task folder of this test: its `!function` may run under the guard
    return folder


class CountingLM(LM):
    """Answers every loglikelihood request with (-1, True) and counts the requests it was asked."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self.asked += len(requests)
        out = [(-1.0, True) for _ in requests]
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError


# ---- version check ---------------------------------------------------------------------------------------------------
def test_version_outside_the_checked_ones_warns_once(monkeypatch, caplog):
    lm_eval_compat.check_version.cache_clear()
    monkeypatch.setattr(lm_eval_compat, "lm_eval_version", lambda: "0.9.0")
    with caplog.at_level(logging.WARNING, logger=lm_eval_compat.__name__):
        assert lm_eval_compat.check_version() is False
        lm_eval_compat.check_version()
    assert sum("0.9.0" in r.message for r in caplog.records) == 1
    lm_eval_compat.check_version.cache_clear()
    monkeypatch.undo()
    assert lm_eval_compat.check_version() is (lm_eval_compat.lm_eval_version() in lm_eval_compat.CHECKED_VERSIONS)


def test_a_moved_hook_names_itself_the_version_and_the_fix(monkeypatch):
    from lm_eval.tasks import _yaml_loader

    monkeypatch.setattr(_yaml_loader, "_mk_function_ctor", lambda base_dir, resolve: None)  # no name lookup
    with pytest.raises(LMEvalCompatError, match=r"_import_func_in_yml .*pip install 'lm-eval=="):
        lm_eval_compat.yaml_function_resolver()


# ---- 1. `!function` resolution (guards.guard_yaml_functions) ---------------------------------------------------------
def test_yaml_resolver_is_what_lm_eval_calls_for_function_tags(task_dir, monkeypatch):
    from lm_eval.tasks._yaml_loader import load_yaml

    calls = []
    original = lm_eval_compat.yaml_function_resolver()
    original = getattr(original, "__wrapped__", original)  # lm-eval's own, under the guard if one is installed

    def recording(qual, base_dir):
        calls.append((qual, Path(base_dir)))
        return original(qual, base_dir)

    monkeypatch.setattr(lm_eval_compat._yaml_loader(), "_import_func_in_yml", original)  # restored after the test
    lm_eval_compat.set_yaml_function_resolver(recording)
    cfg = load_yaml(task_dir / "compat_probe.yaml", resolve_func=True)
    assert calls == [("helpers.text", task_dir)]
    assert cfg["doc_to_text"]({"q": "sky"}) == "The sky is"


def test_guard_refuses_a_function_outside_the_task_folders(task_dir, tmp_path, monkeypatch):
    from lm_eval.tasks._yaml_loader import load_yaml

    monkeypatch.setattr(lm_eval_compat._yaml_loader(), "_import_func_in_yml", lm_eval_compat.yaml_function_resolver())
    monkeypatch.setattr(guards, "_YAML_ROOTS", [])
    guards.guard_yaml_functions([tmp_path / "elsewhere"])
    with pytest.raises(ValueError, match="only code inside the task folders"):
        load_yaml(task_dir / "compat_probe.yaml", resolve_func=True)


# ---- 2 and 3. the CachingLM swap and the task factory, through simple_evaluate ---------------------------------------
def _manager(task_dir, **factory_kw):
    from lm_eval.tasks import TaskManager

    from tasks.task_factory import SuiteTaskFactory

    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    return lm_eval_compat.install_task_factory(tm, SuiteTaskFactory(meta={}, **factory_kw))


def test_task_factory_rewrites_the_config_lm_eval_builds_the_task_from(task_dir):
    tm = _manager(task_dir, task_metadata={"compat_probe": {"lengths": [256]}},
                  task_config={"compat_probe": {"num_fewshot": 0, "description": "Colours. "}})
    with guards.hf_offline(hub=True, datasets=True):
        task = tm.load(["compat_probe"])["tasks"]["compat_probe"]
    assert task.config.metadata["lengths"] == [256] and task.config.metadata["own"] == 1
    assert task.config.description == "Colours. "


def test_durable_cache_is_the_cache_simple_evaluate_uses(task_dir, tmp_path):
    import lm_eval

    from evals.harness.request_cache import RequestCache, durable_cache

    cache = tmp_path / "cache" / "probe"
    results = []
    for _ in range(2):
        lm = CountingLM()
        with guards.hf_offline(hub=True, datasets=True), durable_cache():
            out = lm_eval.simple_evaluate(model=lm, tasks=["compat_probe"], task_manager=_manager(task_dir),
                                          use_cache=str(cache), bootstrap_iters=0)
        results.append((lm.asked, out["results"]["compat_probe"]["acc,none"]))
    assert results == [(2, 1.0), (0, 1.0)]  # the second run is answered from our cache alone
    db = RequestCache(f"{cache}_rank0.db")
    assert len(db) == 2 and all(db[k] == (-1.0, True) for k in db.keys())  # JSON-stored tuples, not pickles


# ---- 4. _encode_pair's trailing-space rule ---------------------------------------------------------------------------
TRICKY = [("Question: colour?\nAnswer:", " blue"), ("ends in spaces   ", "x"), ("tab\t", "\tcont"),
          ("newlines\n\n", "Next"), ("ideographic\u3000", "空"), ("   ", "only spaces before"), ("a", ""),
          ("naïve ", " café")]


@pytest.mark.parametrize("ctx,cont", TRICKY)
def test_encode_pair_texts_follow_lm_evals_rule(ctx, cont):
    n = len(ctx) - len(ctx.rstrip())
    moved_ctx, moved_cont = (ctx[:-n], ctx[-n:] + cont) if n else (ctx, cont)
    assert lm_eval_compat.encode_pair_texts(ctx, cont) == [moved_ctx + moved_cont, moved_ctx]


def test_backend_encodes_exactly_what_lm_eval_asks_for():
    """GDN2LM.loglikelihood encodes ahead, in one batch, every text lm-eval's _encode_pair then asks for."""
    from evals.harness.backend import GDN2LM
    from gdn2.config import Config
    from gdn2.model import GPT
    from gdn2.tokenizer import load_tokenizer

    model = GPT(Config.from_name("tiny", vocab_size=1024)).init_weights(seed=3)
    lm = GDN2LM(model=model, tokenizer=load_tokenizer(ROOT / "gdn2" / "demo" / "tokenizer"), bos="true")
    batch_calls = []
    encode_batch = lm.tok.encode_batch

    def counted(texts):
        batch_calls.append(len(texts))
        return encode_batch(texts)

    lm.tok.encode = lambda text: pytest.fail(f"{text!r} was encoded outside the batch")
    lm.tok.encode_batch = counted
    reqs = [Instance("loglikelihood", {}, (c or "x", cont or "y"), i) for i, (c, cont) in enumerate(TRICKY)]
    lm.loglikelihood(reqs)
    assert len(batch_calls) == 1


# ---- 5. the model registry (lm_eval_plugin) --------------------------------------------------------------------------
def test_registry_hook_makes_gdn2_an_lm_eval_model_lazily():
    """In a fresh interpreter: activate() before lm-eval is imported, then lm-eval's own lookup finds GDN2LM, and
    the backend module (torch) is imported only when the model is asked for."""
    code = ("import sys; from evals.harness import lm_eval_plugin; lm_eval_plugin.activate()\n"
            "from lm_eval.api.registry import get_model, model_registry\n"
            "import lm_eval.models\n"
            "assert 'gdn2' in model_registry and 'hf' in model_registry, sorted(model_registry.keys())[:5]\n"
            "assert 'evals.harness.backend' not in sys.modules\n"
            "cls = get_model('gdn2')\n"
            "from evals.harness.backend import GDN2LM\n"
            "assert cls is GDN2LM, cls\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
