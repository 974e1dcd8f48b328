"""Tokenizers: a built-in byte-level one (needs no files) and the official families.

`load_tokenizer(spec)` accepts:
  - "byte"                      the byte-level tokenizer of the demo checkpoints (256 bytes + BOS/EOS/PAD)
  - a folder with tokenizer.model (SentencePiece) or tokenizer.json (Hugging Face tokenizers)
  - a path to one of those files
Every tokenizer exposes the same small interface: encode(text) -> list[int] without special tokens,
encode_batch(texts) (the same, for many texts at once: the file-based ones encode them in parallel),
decode(ids) -> str, bos_id, eos_id, vocab_size, name, sha256 (a content hash: the same files give the same hash
wherever they lie, so a results folder made with them resumes from another clone or path). BOS is never added
implicitly: whether a sequence starts with BOS is the caller's explicit policy (the official pipelines differ,
see the checkpoint spec).
The file-based tokenizers also report `add_bos`: whether the Hugging Face call that the official stream pipeline
made (default add_special_tokens) puts BOS before a document - `add_bos_token` of tokenizer_config.json when
present, else what the tokenizer.json post-processor does, else the Llama convention (True) for SentencePiece.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Protocol, Sequence


class Tokenizer(Protocol):
    name: str
    sha256: str
    bos_id: int | None
    eos_id: int | None
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; 256 = BOS, 257 = EOS, 258 = PAD. Lossless, no files needed."""

    name = "byte"
    sha256 = hashlib.sha256(b"gdn2 byte tokenizer: 256 bytes + BOS 256, EOS 257, PAD 258").hexdigest()
    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    def __init__(self, path: Path):
        import sentencepiece as spm

        self.name = str(path)
        self.sha256 = files_sha256(path)
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.vocab_size = self.sp.vocab_size()
        cfg = _tokenizer_config(path)
        self.add_bos = bool(cfg.get("add_bos_token", True)) and self.bos_id is not None

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(list(texts), num_threads=-1)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


class HFTokenizer:
    """tokenizer.json through `tokenizers`; BOS/EOS from tokenizer_config.json when present."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _Tok

        self.name = str(path)
        self.sha256 = files_sha256(path)
        self.tok = _Tok.from_file(str(path))
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        cfg = _tokenizer_config(path)
        bos, eos = _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token"))
        self.bos_id = self.tok.token_to_id(bos) if bos else self.tok.token_to_id("<s>")
        self.eos_id = self.tok.token_to_id(eos) if eos else self.tok.token_to_id("</s>")
        if "add_bos_token" in cfg:
            self.add_bos = bool(cfg["add_bos_token"]) and self.bos_id is not None
        else:  # what a default call does: the post-processor of Llama-style files inserts <s>
            self.add_bos = self.bos_id is not None and self.tok.encode("a").ids[:1] == [self.bos_id]

    def encode(self, text: str) -> list[int]:
        # The post-processor of Llama-style files inserts <s>; BOS is the caller's decision, so skip it.
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def files_sha256(path: Path) -> str:
    """Content hash of a tokenizer file and the tokenizer_config.json beside it (BOS/EOS and add_bos come from
    there); file names enter as roles, not paths, so a copy elsewhere hashes the same."""
    h = hashlib.sha256()
    config = path.parent / "tokenizer_config.json"
    for role, f in (("tokenizer" + path.suffix, path), ("tokenizer_config.json", config)):
        if f.is_file():
            h.update(f"{role} {_file_sha256(f)}\n".encode())
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_file(spec: str | Path) -> Path | None:
    """The file load_tokenizer(spec) would read (None for "byte"), without loading it; errors as load_tokenizer."""
    if str(spec) == "byte":
        return None
    path = Path(spec)
    if path.is_dir():
        for name in ("tokenizer.model", "tokenizer.json"):
            if (path / name).exists():
                return path / name
        raise FileNotFoundError(
            f"no tokenizer in {path}: expected tokenizer.model or tokenizer.json there "
            "(pass --tokenizer PATH to use another one)"
        )
    if not path.exists():
        raise FileNotFoundError(f"tokenizer not found: {path} (pass 'byte' or a folder with tokenizer files)")
    if path.suffix not in (".model", ".json"):
        raise ValueError(f"unknown tokenizer file {path}: expected tokenizer.model or tokenizer.json")
    return path


def tokenizer_sha256(spec: str | Path) -> str:
    """What load_tokenizer(spec).sha256 gives, from the files alone (no tokenizer is built)."""
    path = tokenizer_file(spec)
    return ByteTokenizer.sha256 if path is None else files_sha256(path)


def _tokenizer_config(path: Path) -> dict:
    """tokenizer_config.json beside a tokenizer file, or {} when absent or unreadable."""
    cfg_path = path.parent / "tokenizer_config.json"
    if not cfg_path.exists():
        return {}
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{cfg_path} is not valid JSON: fix it or re-download the tokenizer files") from None
    return cfg if isinstance(cfg, dict) else {}


def _token_str(tok: object) -> str | None:
    if isinstance(tok, dict):  # AddedToken serialised as a dict
        return tok.get("content")
    return tok if isinstance(tok, str) else None


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """Load a tokenizer from "byte", a folder, or a tokenizer.model / tokenizer.json file."""
    path = tokenizer_file(spec)
    if path is None:
        return ByteTokenizer()
    return SentencePieceTokenizer(path) if path.suffix == ".model" else HFTokenizer(path)
