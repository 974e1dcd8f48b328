"""lm_eval.simple_evaluate end to end on the offline fixtures with a tiny rule-based LM of our own."""
from __future__ import annotations

import re
from pathlib import Path

import lm_eval
from lm_eval.api.model import LM

from tasks.catalog import load_suite, task_manager

DEMO_TOKENIZER = str(Path(__file__).resolve().parents[2] / "gdn2" / "demo" / "tokenizer")  # the quick suite's


class RuleLM(LM):
    """Answers needle questions by reading the needle; scores a continuation by its length in characters."""

    def generate_until(self, requests):
        out = []
        for req in requests:
            context = req.args[0]
            key = re.search(r"for (\S+) mentioned in the provided text\?", context).group(1)
            values = re.findall(rf"for {re.escape(key)} is: (\S+)\.", context)
            out.append(" " + ", ".join(values))
        return out

    def loglikelihood(self, requests):
        return [(float(len(req.args[1].strip())), True) for req in requests]

    def loglikelihood_rolling(self, requests):
        return [-float(len(req.args[0])) for req in requests]


def test_simple_evaluate_needles_and_multiple_choice(data_dir):
    suite = load_suite("quick")
    tm = task_manager(
        data_dir=data_dir,
        metadata={"tokenizer": DEMO_TOKENIZER},
        # RULER's essay unit (500 words) cannot fit 256 tokens: the short essay cells use "tight" sizing
        task_metadata={**suite.metadata, "ruler_niah_single_2": {**suite.metadata["ruler_niah_single_2"],
                                                                 "haystack": "essay", "num_samples": 3,
                                                                 "sizing": "tight"}},
        task_config=suite.config,
    )
    out = lm_eval.simple_evaluate(model=RuleLM(), tasks=["ruler_niah_single_2", "piqa"], task_manager=tm)
    niah, piqa = out["results"]["ruler_niah_single_2"], out["results"]["piqa"]
    assert {niah["256,none"], niah["512,none"], niah["1024,none"]} == {1.0}
    # the longer solution is gold in both fixture rows; per character every choice ties, so acc_norm takes
    # the first choice: right for row 0 only
    assert piqa["acc,none"] == 1.0 and piqa["acc_norm,none"] == 0.5
    config = out["configs"]["ruler_niah_single_2"]
    assert config["metadata"]["max_seq_lengths"] == [256, 512, 1024] and config["metadata"]["sizing"] == "tight"
    assert config["generation_kwargs"]["max_gen_toks"] == 16
    assert out["n-samples"]["ruler_niah_single_2"]["original"] == 9  # 3 per length, interleaved


def test_quick_suite_generates_in_well_under_a_second(data_dir):
    suite = load_suite("quick")
    tm = task_manager(metadata={"tokenizer": DEMO_TOKENIZER}, task_metadata=suite.metadata,
                      task_config=suite.config)
    loaded = tm.load(suite.tasks)["tasks"]
    for task in loaded.values():
        task.build_all_requests(limit=None)
        assert len(task.instances) == 60
