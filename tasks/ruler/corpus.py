"""The essay corpus of RULER's essay haystacks, and the sentence splitter its needles are placed with.

Sources, as each harness reads them:
- a folder of *.txt essays (`essay_dir`): RULER's json/download_paulgraham_essay.py concatenates the sorted
  essay files with no separator ("...this.October ..." where an essay does not end in a newline);
- no folder: the Hugging Face dataset lm-eval 0.4.13's RULER tasks load (`baber/paul_graham_essays`, split
  train, texts joined with a space, as lm-eval's prepare_niah.py does). Needs the network or the HF cache.
Either way the text is whitespace-normalised and split on " " into RULER's word list.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

HF_ESSAYS = "baber/paul_graham_essays"
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+")


def words_of(text: str) -> list[str]:
    """RULER's haystack word list: whitespace runs to one space, split on " " (niah.py L86-87)."""
    return re.sub(r"\s+", " ", text).split(" ")


def essay_dir_text(essay_dir: str | Path) -> str:
    """The *.txt essays of a folder, sorted by name and concatenated without a separator (RULER's JSON)."""
    folder = Path(essay_dir)
    files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"essay haystack folder {folder} has no *.txt essays: pass --essay-dir <folder of essays> "
            "(RULER uses Paul Graham's essays) or use haystack=noise"
        )
    return "".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


def hub_essay_text() -> str:
    """lm-eval's essay source: the Hugging Face dataset, its texts joined with spaces."""
    import datasets

    try:
        texts = datasets.load_dataset(HF_ESSAYS, split="train")["text"]
    except Exception as err:  # offline, no cache, hub errors: one line naming the way out
        raise FileNotFoundError(
            f"essay-haystack NIAH tasks need essays: no essay dir was given and the Hugging Face dataset "
            f"{HF_ESSAYS} could not be loaded ({type(err).__name__}); pass --essay-dir <folder of *.txt essays> "
            "or --data-dir with a paul_graham_essays/ folder in it"
        ) from None
    return " ".join(texts)


@functools.lru_cache(maxsize=4)
def essay_words(essay_dir: str | None) -> tuple[str, ...]:
    """RULER's word list of the essays in `essay_dir`, or of lm-eval's hub dataset when it is None/empty."""
    text = essay_dir_text(essay_dir) if essay_dir else hub_essay_text()
    return tuple(words_of(text))


@functools.lru_cache(maxsize=1)
def _punkt():
    """NLTK's English Punkt model (what RULER's `sent_tokenize` uses) when its data is installed, else None."""
    try:
        import nltk

        nltk.data.find("tokenizers/punkt_tab/english/")
    except (ImportError, LookupError):
        return None
    from nltk.tokenize import sent_tokenize

    return sent_tokenize


def sentence_splitter() -> str:
    """Which splitter `split_sentences` uses here: "punkt" (RULER's) or "regex" (no NLTK punkt_tab data)."""
    return "punkt" if _punkt() is not None else "regex"


def split_sentences(text: str) -> list[str]:
    """Sentences of whitespace-normalised text, as RULER's `sent_tokenize(text)` gives them.

    Without NLTK's punkt_tab data (it is downloaded, not pip-installed) a split after ".", "!" or "?" (and any
    closing quotes or brackets) followed by a space stands in; it differs from Punkt only at abbreviations such
    as "e.g.", so needles can land a sentence apart, and prompt lengths are unchanged (sentences are joined back
    with the single space they were split at).
    """
    punkt = _punkt()
    if punkt is not None:
        return punkt(text)
    sentences, start = [], 0
    for end in _SENTENCE_END.finditer(text):
        sentences.append(text[start : end.start() + len(end.group().rstrip())])
        start = end.end()
    sentences.append(text[start:])
    return [s for s in sentences if s]
