"""Every task builds its requests from the offline fixtures and scores hand-made model outputs correctly."""
from __future__ import annotations

import re

import pytest

from tasks.catalog import LM_EVAL_TASKS, list_tasks, task_manager

MULTIPLE_CHOICE = [t for t in LM_EVAL_TASKS if t not in ("wikitext", "lambada_openai")]


@pytest.fixture(scope="module")
def tm(data_dir):
    # 4096: with one token per byte, RULER's sizing needs room for 500 essay words
    return task_manager(data_dir=data_dir, metadata={"tokenizer": "byte", "num_samples": 2,
                                                     "max_seq_lengths": [4096]})


def _requests(tm, name):
    task = tm.load([name])["tasks"][name]
    task.build_all_requests(limit=None)
    assert task.instances, name
    by_doc: dict[int, list] = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    return task, by_doc


@pytest.mark.parametrize("name", list_tasks())
def test_every_task_builds_requests_from_the_fixtures(tm, name):
    task, by_doc = _requests(tm, name)
    assert len(by_doc) >= 2


@pytest.mark.parametrize("name", MULTIPLE_CHOICE)
def test_multiple_choice_scores_the_best_choice(tm, name):
    task, by_doc = _requests(tm, name)
    for insts in by_doc.values():
        doc = insts[0].doc
        # winogrande has several contexts and one continuation: its gold comes from doc_to_text
        gold = int(task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc))
        right = [(0.0 if i == gold else -5.0, False) for i in range(len(insts))]
        wrong = [(-5.0 if i == gold else 0.0, False) for i in range(len(insts))]
        assert task.process_results(doc, right)["acc"] == 1.0
        assert task.process_results(doc, wrong)["acc"] == 0.0


def test_hellaswag_acc_norm_divides_by_choice_length(tm):
    task, by_doc = _requests(tm, "hellaswag")
    doc = by_doc[0][0].doc  # gold 0, the shortest-but-one ending
    lengths = [len(c) for c in task.doc_to_choice(doc)]
    # every choice scores -1 per character except choice 3, which scores -0.9: acc_norm picks 3
    lls = [(-1.0 * n if i != 3 else -0.9 * n, False) for i, n in enumerate(lengths)]
    assert task.process_results(doc, lls)["acc_norm"] == 0.0
    lls[0] = (-0.5 * lengths[0], False)
    assert task.process_results(doc, lls)["acc_norm"] == 1.0


def test_lambada_accuracy_needs_a_greedy_continuation(tm):
    task, by_doc = _requests(tm, "lambada_openai")
    inst = by_doc[0][0]
    assert inst.args[1] == " hands"
    assert task.process_results(inst.doc, [(-2.0, True)])["acc"] == 1
    assert task.process_results(inst.doc, [(-2.0, False)])["acc"] == 0
    assert task.process_results(inst.doc, [(-2.0, True)])["perplexity"] == -2.0


def test_wikitext_word_perplexity_counts_words_of_the_raw_page(tm):
    task, by_doc = _requests(tm, "wikitext")
    doc = by_doc[0][0].doc
    ll, words = task.process_results(doc, [-30.0])["word_perplexity"]
    # lm-eval counts re.split(r"\s+") pieces of the raw page, edge empties included
    assert ll == -30.0 and words == len(re.split(r"\s+", doc["page"])) == len(doc["page"].split()) + 2


@pytest.mark.parametrize("name", [t for t in list_tasks() if t.startswith("jrt_")])
def test_recall_contains_metric(tm, name):
    task, by_doc = _requests(tm, name)
    for insts in by_doc.values():
        doc = insts[0].doc
        assert insts[0].args[1]["until"] == ["\n"] and insts[0].args[1]["max_gen_toks"] == 48
        assert task.process_results(doc, [" " + doc["labels"][0].upper() + " and more"])["contains"] == 1
        assert task.process_results(doc, [" something else"])["contains"] == 0


@pytest.mark.parametrize("name", [t for t in list_tasks() if t.startswith("ruler_")])
def test_needle_tasks_score_per_length(tm, name):
    task, by_doc = _requests(tm, name)
    for insts in by_doc.values():
        doc = insts[0].doc
        assert insts[0].args[0] == doc["input"]
        assert task.process_results(doc, [" " + " ".join(doc["outputs"])]) == {"4096": 1.0}
        assert task.process_results(doc, [" 0000000"]) == {"4096": 0.0}


def test_missing_offline_dataset_names_id_and_path(tmp_path):
    tm = task_manager(data_dir=tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        tm.load(["piqa"])
    message = str(err.value)
    assert "baber/piqa" in message and str(tmp_path / "baber__piqa" / "default") in message
    assert "\n" not in message


def test_data_dir_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        task_manager(data_dir=tmp_path / "nope")


def test_parquet_and_save_to_disk_layouts(tmp_path, data_dir):
    from tasks.offline import load_local

    src = load_local("baber/piqa", None, data_dir)
    (tmp_path / "a__b" / "default").mkdir(parents=True)
    src["validation"].to_parquet(str(tmp_path / "a__b" / "default" / "validation.parquet"))
    src.save_to_disk(str(tmp_path / "c__d" / "cfg"))
    assert load_local("a/b", None, tmp_path)["validation"][0] == src["validation"][0]
    assert load_local("c/d", "cfg", tmp_path)["train"][1] == src["train"][1]
