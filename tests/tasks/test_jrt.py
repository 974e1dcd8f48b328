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


# ---- the fork's truncate_context edge cases (api/task.py L352-432), on hand-made documents ----------------------
BODY = "Fixture Motors. Model: Roadster X. Price: $31,500. Colors: red, blue.\n "
SWDE = {"key": "model", "value": "Roadster X"}


def test_swde_is_cut_with_its_summary_and_a_window_ending_inside_it_keeps_that_part():
    text = BODY + "Summary of information above... model:"
    # byte tokens: BOS + one per character; the answer ("Model", the key, at 16) is within half a window of the
    # start, so the window is the first `window` tokens, BOS included, and keeps `window - 1` characters
    kept = len(BODY) + len("Summary of information above.")
    cut = cut_context({**SWDE, "text": text}, RECIPES["swde"], BYTE, window=kept + 1)
    assert cut["text"] == BODY + "Summary of information above."
    # the fork's doc_to_text finds no full "Summary of information above..." and keeps the fragment
    assert RECIPES["swde"].prompt(cut) == BODY + "Summary of information above. Model:"
    # a window past the summary: the prompt drops it (and the trailing "model:"), whitespace stripped as the fork
    whole = cut_context({**SWDE, "text": text}, RECIPES["swde"], BYTE, window=1000)
    assert whole["text"] == text and RECIPES["swde"].prompt(whole) == BODY.strip() + " Model:"
    assert RECIPES["swde"].prompt_twice(whole) == (
        f"Information about Model. {BODY.strip()}\n{BODY.strip()} Model:")


def test_swde_without_key_or_value_in_the_body_centres_on_the_summarys_key():
    body = "Bookshop page. " + "Shelf talk and opening hours. " * 10
    text = body + "Summary of information above... author:"
    doc = {"key": "author", "value": "Ana Lopes", "text": text}
    at = text.lower().index("author")  # only in the summary line
    cut = cut_context(doc, RECIPES["swde"], BYTE, window=100)
    assert cut["text"] == text[at - 50:]  # half a window before the key, to the end
    assert RECIPES["swde"].prompt(cut) == text[at - 50:len(body)].strip().strip(".") + ". Author:"


def test_tok_pos_is_used_only_when_no_answer_was_found():
    context = "x" * 600 + " Paris is in France. " + "y" * 600
    doc = {"context": context, "question": "where", "orig_question": "where", "answers": ["France"],
           "tok_pos": 100}
    at = context.index("France")
    found = cut_context(doc, RECIPES["nq"], BYTE, window=200)
    assert found["context"] == context[at - 100:at + 100]  # centred on the answer, tok_pos ignored
    missing = {**doc, "answers": ["Lyon"]}
    cut = cut_context(missing, RECIPES["nq"], BYTE, window=200)
    assert cut["context"] == context[0:199]  # tok_pos 100: start max(0, 100 - 100) = 0, BOS in the window
    short = {**missing, "context": context[:150]}  # all-but-last prefix within the window: tok_pos not used,
    # the window is centred on the last character
    assert cut_context(short, RECIPES["nq"], BYTE, window=200)["context"] == context[49:150]
    no_tok_pos = {k: v for k, v in missing.items() if k != "tok_pos"}
    n = len(context)  # nothing found: context[:-1] gives the position, near the end
    assert cut_context(no_tok_pos, RECIPES["nq"], BYTE, window=200)["context"] == context[n - 1 - 100:]


def test_alt_answers_are_tried_when_nothing_matched_and_the_first_found_wins():
    context = "z" * 400 + " France. " + "z" * 400 + " Paris. " + "z" * 400
    doc = {"context": context, "question": "q", "orig_question": "q", "answers": ["Lyon"],
           "alt_answers": ["Nice", "Paris", "France"]}
    paris = context.index("Paris")
    cut = cut_context(doc, RECIPES["nq"], BYTE, window=100)
    assert cut["context"] == context[paris - 50:paris + 50]  # Paris: listed before France, found later
    direct = {**doc, "answers": ["france"]}  # a match of the answer itself: alternatives are not tried
    france = context.index("France")
    assert cut_context(direct, RECIPES["nq"], BYTE, window=100)["context"] == context[france - 50:france + 50]


def test_swde_fixture_prompts_end_at_the_key_without_the_summary(data_dir):
    ds = jrt_utils.build_dataset("swde", tokenizer="byte", data_dir=str(data_dir))["validation"]
    assert ds[0]["prompt"] == ("Fixture Motors. Model: Roadster X. Engine: 2.0L turbo. Price: $31,500. "
                               "Colors: red, blue. Model:")
    assert "Summary of information above" in ds[0]["text"]  # cut with the summary, as the fork does
