"""The "Just read twice" recall protocol (HazyResearch/prefix-linear-attention, lm-eval-harness fork).

For each doc: cut the context to a token window around the answer (`--cutting_context`), build the JRT prompt
(default or "twice" variant), greedily generate up to 48 tokens cut at the first newline, and score 1 when any
label occurs case-insensitively in the generation (`contains`). Window: `context_length - answer_length`
tokens of the model's tokenizer, BOS counted when the tokenizer has one (the fork tokenizes with the HF
default); a doc whose first answer is 0 or 1 characters long is dropped, as in the fork.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import datasets

from gdn2.tokenizer import Tokenizer
from tasks.offline import load_dataset
from tasks.token_counter import tokenizer_from_metadata

SWDE_SUMMARY = "Summary of information above..."


@dataclass(frozen=True)
class Recipe:
    dataset: str
    context_key: str  # the field that gets cut
    answer_keys: tuple[str, ...]  # fields whose first value centres the window; () = keep the start
    labels: Callable[[dict], list[str]]
    prompt: Callable[[dict], str]
    prompt_twice: Callable[[dict], str]


def _strip_trailing(text: str, suffix: str) -> str:
    while suffix and text.lower().endswith(suffix.lower()):
        text = text[: -len(suffix)]
    return text


def _capitalised(key: str) -> str:
    return key[:1].upper() + key[1:]


def _key_value_body(doc: dict) -> tuple[str, str]:
    """SWDE/FDA: the text without a trailing "key:" and ending in ".", and the "Key:" question."""
    text = _strip_trailing(doc["text"], doc["key"] + ":").strip("\n").strip(".")
    return (text if text.endswith(".") else text + "."), _capitalised(doc["key"]) + ":"


def _swde_body(doc: dict) -> str:
    """The (cut) text before "Summary of information above...", without a trailing "key:" (the fork's
    doc_to_text). A window that ends inside the summary line keeps the part of it that survived the cut."""
    return _strip_trailing(doc["text"].split(SWDE_SUMMARY)[0], doc["key"] + ":")


def _swde_prompt(doc: dict) -> str:
    text = _swde_body(doc)
    body = text.strip("\n").strip().strip("\n").strip().strip(".") + "."
    return body + " " + _capitalised(doc["key"]) + ":"


def _swde_twice(doc: dict) -> str:
    text = _swde_body(doc)
    body = text.strip("\n").strip(".").strip().strip("\n").strip()
    body = body if body.endswith(".") else body + "."
    question = _capitalised(doc["key"]) + ":"
    return f"Information about {question.strip(':')}. " + body + "\n" + body + " " + question


def _fda_prompt(doc: dict) -> str:
    body, question = _key_value_body(doc)
    return body + " " + question


def _fda_twice(doc: dict) -> str:
    body, question = _key_value_body(doc)
    return f"Information about {question.strip(':')}. " + body + "\n" + body + " " + question


def _squad_twice(doc: dict) -> str:
    return doc["question"] + " " + doc["context"].split("Question:")[0] + "\n" + doc["text"].strip()


def _qa_context(doc: dict, *, clean: bool = False, repeated: bool = True) -> str:
    """The context without its trailing question (TriviaQA also drops its [PAR]/[DOC]/[TLE] markers)."""
    context = doc["context"].strip()
    if clean:
        context = re.sub(r"\[PAR\]|\[DOC\]|\[TLE\]", "", context)
    question = doc["question"].strip()
    if repeated:
        return _strip_trailing(context, question)
    return context[: -len(question)] if question and context.endswith(question) else context


def _qa_prompt(clean: bool = False, repeated: bool = True) -> Callable[[dict], str]:
    def prompt(doc: dict) -> str:
        context = _qa_context(doc, clean=clean, repeated=repeated)
        return context.strip().strip(".") + ". " + doc["question"].strip()

    return prompt


def _qa_twice(clean: bool = False, strip_colon: bool = True) -> Callable[[dict], str]:
    def prompt(doc: dict) -> str:
        body = _qa_context(doc, clean=clean).strip().strip(".").strip() + "."
        question = doc["question"].strip()
        intro = doc["orig_question"].strip(":") if strip_colon else doc["orig_question"]
        return f"{intro} " + body + "\n" + body + " " + question

    return prompt


def _value_label(doc: dict) -> list[str]:
    return [doc["value"]]


def _answers(doc: dict) -> list[str]:
    return list(doc["answers"])


RECIPES: dict[str, Recipe] = {
    "swde": Recipe("hazyresearch/based-swde-v2", "text", ("key", "value"), _value_label, _swde_prompt, _swde_twice),
    "squad": Recipe(
        "hazyresearch/based-squad", "text", ("value",), _value_label, lambda d: d["text"].strip(), _squad_twice
    ),
    "fda": Recipe("hazyresearch/based-fda", "text", ("key", "value"), _value_label, _fda_prompt, _fda_twice),
    "triviaqa": Recipe(
        "hazyresearch/based_triviaqa", "context", (), _answers, _qa_prompt(clean=True),
        _qa_twice(clean=True, strip_colon=False),
    ),
    "nq": Recipe("hazyresearch/based_nq_{nq_context}", "context", ("answers",), _answers,
                 _qa_prompt(repeated=False), _qa_twice()),
    "drop": Recipe("hazyresearch/based_drop", "context", (), _answers, _qa_prompt(), _qa_twice()),
}


def _first(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return str(value[0]) if value else ""
    return str(value)


def _answer_position(doc: dict, recipe: Recipe, context: str) -> int | None:
    """The fork's character position of the answer (api/task.py L366-389); None when it drops the doc."""
    pos = -1
    for key in recipe.answer_keys:
        answer = _first(doc[key])
        if len(answer) <= 1:
            return None
        match = re.search(re.escape(answer), context, re.IGNORECASE)
        if match and (pos < 0 or match.start() < pos):
            pos = match.start()
    if pos < 0 and doc.get("alt_answers"):
        for answer in doc["alt_answers"]:  # the first alternative found wins, not the earliest
            match = re.search(re.escape(answer), context, re.IGNORECASE)
            if match:
                pos = match.start()
                break
    return 0 if not recipe.answer_keys else pos


def cut_context(doc: dict, recipe: Recipe, tok: Tokenizer, window: int, count_bos: bool = True) -> dict | None:
    """The doc with its context cut to `window` tokens around the answer; None when the fork drops it.

    As the fork's truncate_context: the stripped context is tokenized with BOS (its HF default); the answer's
    token position is the token count of the text before it, or of all but the last character when no answer
    (nor alternative answer) was found, in which case a `tok_pos` the doc carries replaces it if that count
    exceeds the window; the window starts half a window before that position, and decoding drops the BOS.
    """
    context = doc[recipe.context_key].strip()
    bos = [tok.bos_id] if count_bos and tok.bos_id is not None else []
    pos = _answer_position(doc, recipe, context)
    if pos is None:
        return None
    tokens = bos + tok.encode(context)
    p = len(bos) + len(tok.encode(context[:pos]))  # pos == -1: context[:-1], as in the fork
    if pos == -1 and doc.get("tok_pos") is not None and p > window:
        p = int(doc["tok_pos"])
    start = max(0, p - window // 2)
    end = min(len(tokens), p + window - (p - start))
    kept = tokens[start:end][1:] if bos and start == 0 else tokens[start:end]  # decode skips BOS
    return {**doc, recipe.context_key: tok.decode(kept)}


def build_dataset(recipe: str, twice: bool = False, **metadata: Any) -> dict[str, datasets.Dataset]:
    """Cut, prompted docs of one recall task, each with `prompt` and `labels` fields."""
    spec = RECIPES[recipe]
    dataset_id = spec.dataset.format(nq_context=int(metadata.get("nq_context", 2048)))
    raw = load_dataset(dataset_id, None, metadata.get("data_dir"))["validation"]
    tok = tokenizer_from_metadata(metadata, f"jrt_{recipe}")
    window = int(metadata.get("context_length", 2000)) - int(metadata.get("answer_length", 50))
    make_prompt = spec.prompt_twice if twice else spec.prompt
    rows = []
    for doc in raw:
        # SWDE: the fork cuts the whole text, "Summary of information above..." included (its validation_docs
        # split of the summary changes dicts that `datasets` hands out afresh, so it is lost); only the
        # prompt (doc_to_text) drops the summary, after the cut
        if metadata.get("cutting_context", True):
            doc = cut_context(doc, spec, tok, window, bool(metadata.get("count_bos", True)))
            if doc is None:
                continue
        rows.append({**doc, "prompt": make_prompt(doc), "labels": spec.labels(doc)})
    return {"validation": datasets.Dataset.from_list(rows)}


def contains(prediction: str, labels: list[str]) -> int:
    """1 when any label occurs in the prediction, ignoring case (labels used as stored, not stripped)."""
    return int(any(re.search(re.escape(label), prediction, re.IGNORECASE) for label in labels))


def process_results(doc: dict, results: list[str]) -> dict[str, int]:
    return {"contains": contains(results[0], doc["labels"])}
