"""Shared fixtures for the task tests: the committed offline data, tokenizers to size prompts with."""
from __future__ import annotations

from pathlib import Path

import pytest

from gdn2.tokenizer import load_tokenizer
from tasks.ruler.haystacks import NOISE_PASSAGE

DATA_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "data"
ESSAY_DIR = DATA_DIR / "paul_graham_essays"
# the real Llama-2 vocabulary when the shared folder is next to the repository (never committed)
LLAMA2 = Path(__file__).resolve().parents[3] / "shared" / "data" / "llama2_tokenizer" / "tokenizer.model"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    assert (DATA_DIR / "EleutherAI__lambada_openai").is_dir(), "run tests/fixtures/make_data.py"
    return DATA_DIR


@pytest.fixture(scope="session")
def bpe_tokenizer_path(tmp_path_factory) -> Path:
    """A small byte-level BPE trained here on the fixture essays and RULER's noise text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [p.read_text() for p in sorted(ESSAY_DIR.glob("*.txt"))] + [NOISE_PASSAGE] * 20
    corpus += ["One of the special magic numbers for giant-horse is: 1234567."] * 20
    tok.train_from_iterator(corpus, trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return path


def sizing_tokenizers(bpe_path: Path) -> dict[str, object]:
    toks = {"byte": load_tokenizer("byte"), "bpe": load_tokenizer(bpe_path)}
    if LLAMA2.exists():
        toks["llama2"] = load_tokenizer(LLAMA2)
    return toks
