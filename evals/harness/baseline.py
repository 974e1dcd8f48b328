"""Hugging Face baselines (`--checkpoint hf:PATH`): lm-eval's own HFLM, recorded as our checkpoints are.

    lm = load_hf_baseline("path/or/hub-id", device="cpu", dtype="auto", batch_size=8, model_args={})
    lm.describe()      # format "hf", sha256 of the weight files' contents, dtype, device, tokenizer + its content
                       # hash, transformers_version, bos: the same keys GDN2LM.describe() gives
    lm.weight_files    # the weight files, so a resume notices weights re-saved at the same path
    lm.set_bos("none") # the suite's BOS policy applied to the HF model too

Scoring stays HFLM's; only tokenization changes under an explicit BOS policy: texts are encoded without the
tokenizer's special tokens and BOS is put in front (or not) by the policy, exactly as GDN2LM does, because whether
a Hugging Face tokenizer adds BOS by default depends on its post-processor (GPT-2's adds nothing, Llama's adds BOS).
Before set_bos is called the tokenizer's own default stands, and describe()["bos"] says what that default does.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path
from typing import Any

import torch

# The weight files are chosen as the run identity chooses them (one function), so describe()'s hashes and the
# identity built before loading agree.
from evals.harness.identity import hf_weight_files as weight_files
from gdn2.formats.base import sha256_file, sha256_files

# files that decide how text becomes ids (vocabulary, merges, normalisation, special tokens, BOS/EOS settings)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def tokenizer_sha256(folder: Path) -> str | None:
    """Content hash of the tokenizer files in `folder`, by role (file name) and content, never by path."""
    lines = sorted(f"{name} {sha256_file(folder / name)}\n" for name in TOKENIZER_FILES if (folder / name).is_file())
    return hashlib.sha256("".join(lines).encode()).hexdigest() if lines else None


def _local_folder(name: str, revision: str | None) -> Path | None:
    """The folder holding a model: the path itself, or its snapshot in the Hugging Face cache (after loading)."""
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser().resolve()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, revision=revision, local_files_only=True))
    except Exception:  # not cached (or not a hub id): nothing to hash
        return None


def _hflm_class() -> type:
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise ValueError(f"Hugging Face baselines need transformers and accelerate (pip install 'gdn2-eval[hf]'): "
                         f"{err}") from None
    return HFLM


def load_hf_baseline(path: str, *, device: str | None = None, dtype: str | None = "auto",
                     batch_size: int | str = 1, model_args: dict[str, Any] | None = None):
    """lm-eval's HFLM over `path` (a local folder or a hub id; without the `hf:` prefix), recorded like our
    checkpoints (HFBaselineLM). model_args are HFLM's own (revision, tokenizer, trust_remote_code, ...); nothing
    is truncated unless max_length is given there."""
    args = dict(model_args or {})
    args.setdefault("max_length", 1 << 17)  # as for our models: no silent truncation of long contexts
    dtype = DTYPES.get(str(dtype), dtype)
    return _baseline_class()(pretrained=path, device=device or "cpu", dtype=dtype or "auto",
                             batch_size=batch_size, **args)


_CLASS: list[type] = []


def _baseline_class() -> type:
    """HFBaselineLM, defined on first use (transformers is an optional extra)."""
    if _CLASS:
        return _CLASS[0]
    HFLM = _hflm_class()

    class HFBaselineLM(HFLM):
        """HFLM with our record (describe, weight_files, content hashes) and an explicit BOS policy (set_bos)."""

        def __init__(self, pretrained: str, **kwargs: Any) -> None:
            super().__init__(pretrained=pretrained, **kwargs)
            self.checkpoint = str(pretrained)
            self.folder = _local_folder(self.checkpoint, self.revision)
            self.weight_files = weight_files(self.folder) if self.folder else []
            self.sha256 = sha256_files(self.weight_files) if self.weight_files else None
            tok_name = kwargs.get("tokenizer")
            tok_folder = _local_folder(str(tok_name), self.revision) if isinstance(tok_name, str) else self.folder
            self.tokenizer_spec = str(tok_name) if isinstance(tok_name, str) else self.checkpoint
            self.tokenizer_sha256 = tokenizer_sha256(tok_folder) if tok_folder else None
            self.bos_policy: str | None = None  # None: the tokenizer's own default
            self._rolling = False  # inside loglikelihood_rolling: the prefix token is the document's BOS

        # ---- BOS policy ---------------------------------------------------------------------------------------
        def set_bos(self, policy: str | bool) -> None:
            """"bos"/true: one BOS before every context (and as the empty context); "none"/false: no BOS (EOS as
            the empty context, as GDN2LM does); "auto": the tokenizer's own default."""
            value = str(policy).lower()
            if value in ("auto",):
                self.bos_policy = None
                return
            if value not in ("bos", "true", "1", "yes", "none", "false", "0", "no"):
                raise ValueError(f"bos={policy!r}: use bos=true (or bos), bos=false (or none) or bos=auto")
            wanted = value in ("bos", "true", "1", "yes")
            if wanted and self.tokenizer.bos_token_id is None:
                raise ValueError(f"bos=true but tokenizer {self.tokenizer_spec} has no BOS token; use bos=false")
            self.bos_policy = "bos" if wanted else "none"
            self.custom_prefix_token_id = (self.tokenizer.bos_token_id if wanted else self.tokenizer.eos_token_id)

        @property
        def adds_bos(self) -> bool:
            """Whether a context is encoded with BOS in front, under the policy or the tokenizer's default."""
            if self.bos_policy is not None:
                return self.bos_policy == "bos"
            ids = super().tok_encode("a")
            return bool(ids) and self.tokenizer.bos_token_id is not None and ids[0] == self.tokenizer.bos_token_id

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                       **kwargs) -> list[int]:
            if self.bos_policy is None:
                return super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
            ids = self.tokenizer.encode(string, add_special_tokens=False)
            add = (self.bos_policy == "bos" and not self._rolling) if add_special_tokens is None else add_special_tokens
            if add and self.bos_policy == "bos":
                ids = [self.tokenizer.bos_token_id] + ids
            return ids[-left_truncate_len:] if left_truncate_len else ids

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            # HFLM scores tok_encode(document) after prefix_token_id; under a policy the prefix is the BOS (or
            # EOS), so the document itself is encoded bare, as GDN2LM scores it
            self._rolling = True
            try:
                return super().loglikelihood_rolling(requests, disable_tqdm)
            finally:
                self._rolling = False

        def tok_batch_encode(self, strings: list[str], padding_side: str = "left",
                             left_truncate_len: int | None = None, truncation: bool = False):
            if self.bos_policy is None:
                return super().tok_batch_encode(strings, padding_side, left_truncate_len, truncation)
            rows = [self.tok_encode(s, left_truncate_len=left_truncate_len) for s in strings]
            width = max(len(r) for r in rows)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                cols = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
                ids[i, cols] = torch.tensor(r, dtype=torch.long)
                mask[i, cols] = 1
            return ids, mask

        # ---- the record ---------------------------------------------------------------------------------------
        @property
        def num_parameters(self) -> int:
            return sum(p.numel() for p in self.model.parameters())

        def describe(self) -> dict:
            """The same keys as GDN2LM.describe(), from the loaded model and the files it came from."""
            return {
                "checkpoint": self.checkpoint, "format": "hf", "sha256": self.sha256,
                "dtype": str(self.model.dtype).replace("torch.", ""), "device": str(self.device),
                "tokenizer": self.tokenizer_spec, "tokenizer_sha256": self.tokenizer_sha256, "bos": self.adds_bos,
                "bos_policy": self.bos_policy or "tokenizer default", "batch_size": self.batch_size,
                "num_parameters": self.num_parameters, "model_config": self.model.config.to_dict(),
                "transformers_version": importlib.metadata.version("transformers"), "revision": self.revision,
            }

        def get_model_info(self) -> dict:
            """lm-eval's keys without its hub query (offline runs): model_sha is the weights' content hash."""
            return {"model_num_parameters": self.num_parameters, "model_dtype": str(self.model.dtype),
                    "model_revision": self.revision, "model_sha": self.sha256 or ""}

    _CLASS.append(HFBaselineLM)
    return HFBaselineLM
