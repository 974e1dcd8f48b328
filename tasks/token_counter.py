"""The tokenizer a generated task sizes its prompts with, chosen from lm-eval task metadata.

Metadata keys (first match wins):
  hf_tokenizer   a Hugging Face tokenizer name or folder, for baselines (needs `transformers`)
  tokenizer      a spec for `gdn2.tokenizer.load_tokenizer`: "byte", a folder, or a tokenizer file
  pretrained     lm-eval's usual model argument, used as a Hugging Face name as a last resort
Every tokenizer here encodes without special tokens, as RULER counts lengths.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Sequence

from gdn2.tokenizer import Tokenizer, load_tokenizer


class AutoTokenizerAdapter:
    """`transformers.AutoTokenizer` behind the small gdn2 tokenizer interface."""

    def __init__(self, name: str):
        try:
            from transformers import AutoTokenizer
        except ImportError as err:  # only baselines need it
            raise ImportError(
                f"hf_tokenizer={name!r} needs the `transformers` package: pip install transformers "
                "(or pass tokenizer=<path to tokenizer.json/tokenizer.model> instead)"
            ) from err
        self.tok = AutoTokenizer.from_pretrained(name)
        self.name = name
        self.bos_id = self.tok.bos_token_id
        self.eos_id = self.tok.eos_token_id
        self.vocab_size = len(self.tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))


@lru_cache(maxsize=8)
def _load(kind: str, spec: str) -> Tokenizer:
    return AutoTokenizerAdapter(spec) if kind == "hf" else load_tokenizer(spec)


def tokenizer_from_metadata(metadata: dict[str, Any], task: str) -> Tokenizer:
    """The sizing tokenizer named in `metadata`; a clear error when none is given."""
    if metadata.get("hf_tokenizer"):
        return _load("hf", str(metadata["hf_tokenizer"]))
    if metadata.get("tokenizer"):
        return _load("gdn2", str(metadata["tokenizer"]))
    if isinstance(metadata.get("pretrained"), str) and metadata["pretrained"]:
        return _load("hf", metadata["pretrained"])
    raise ValueError(
        f"{task} sizes its inputs with the model's tokenizer but none was given: pass metadata "
        '{"tokenizer": "byte" | <tokenizer folder or file>} or {"hf_tokenizer": <HF name>}'
    )
