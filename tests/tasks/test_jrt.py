"""JRT recall: context cutting around the answer, the fork's prompts, and its doc drops."""
from __future__ import annotations

from gdn2.tokenizer import load_tokenizer
from tasks.jrt import jrt_utils
from tasks.jrt.jrt_utils import RECIPES, cut_context

BYTE = load_tokenizer("byte")


def test_window_is_centred_on_the_answer_and_counts_bos():
    text = "a" * 3000 + " The answer is Lake Arden. " + "b" * 3000
    doc = {"text": text, "value": "Lake Arden"}
    cut = cut_context(doc, RECIPES["squad"], BYTE, window=950)
    assert "Lake Arden" in cut["text"]
    assert len(cut["text"]) == 950  # one byte per token, BOS not decoded
    assert cut["text"].index("Lake Arden") in range(470, 480)  # answer near the middle of the window


def test_window_without_answer_keys_keeps_the_start_with_bos_counted():
    doc = {"context": "x" * 5000, "question": "q", "answers": ["yes"]}
    cut = cut_context(doc, RECIPES["drop"], BYTE, window=1950)
    assert cut["context"] == "x" * 1949  # BOS takes one token of the window
    assert len(cut_context(doc, RECIPES["drop"], BYTE, window=1950, count_bos=False)["context"]) == 1950


def test_docs_with_a_one_character_answer_are_dropped():
    doc = {"text": "Weight: 5 kg. Weight:", "key": "weight", "value": "5"}
    assert cut_context(doc, RECIPES["fda"], BYTE, window=100) is None


def test_default_and_twice_prompts_follow_the_fork():
    swde = {"text": "Title: Big Fish. Director: Tim Burton. director:", "key": "director", "value": "Tim Burton"}
    assert RECIPES["swde"].prompt(swde) == "Title: Big Fish. Director: Tim Burton. Director:"
    body = "Title: Big Fish. Director: Tim Burton."
    assert RECIPES["swde"].prompt_twice(swde) == f"Information about Director. {body}\n{body} Director:"
    nq = {"context": "Paris is in France. where is paris", "question": "where is paris",
          "orig_question": "where is paris:", "answers": ["France"]}
    assert RECIPES["nq"].prompt(nq) == "Paris is in France. where is paris"
    assert RECIPES["nq"].prompt_twice(nq) == "where is paris Paris is in France.\nParis is in France. where is paris"
    tqa = {"context": "[DOC] [TLE] Paris [PAR] Paris is in France.", "question": "Where is Paris?",
           "orig_question": "Where is Paris?", "answers": ["France"]}
    assert RECIPES["triviaqa"].prompt(tqa) == "Paris  Paris is in France. Where is Paris?"


def test_contains_ignores_case_and_escapes_labels():
    assert jrt_utils.contains(" the price is $31,500.", ["$31,500"]) == 1
    assert jrt_utils.contains(" ROADSTER x", ["Roadster X"]) == 1
    assert jrt_utils.contains(" roadster", ["Roadster X", "coupe"]) == 0


def test_nq_context_option_picks_the_dataset_and_is_recorded(data_dir):
    from tasks.catalog import task_manager

    tm = task_manager(data_dir=data_dir, metadata={"tokenizer": "byte"}, task_metadata={"jrt_nq": {"nq_context": 1024}})
    task = tm.load(["jrt_nq"])["tasks"]["jrt_nq"]
    assert task.config.metadata["nq_context"] == 1024 and task.config.metadata["context_length"] == 2000
    tm = task_manager(data_dir=data_dir, metadata={"tokenizer": "byte"}, task_metadata={"jrt_nq": {"nq_context": 512}})
    try:
        tm.load(["jrt_nq"])
    except FileNotFoundError as err:
        assert "hazyresearch/based_nq_512" in str(err)
    else:
        raise AssertionError("based_nq_512 has no fixture; loading it must fail")
