"""lm-eval glue for the RULER needle tasks: the dataset builder, per-length scoring and aggregation.

Every `ruler_niah_*.yaml` points `custom_dataset` here and names its RULER variant in `dataset_kwargs`;
lm-eval calls the builder with the task metadata (run-time metadata included) merged with those kwargs.
Essays: `essay_dir`, else `<data_dir>/paul_graham_essays`, else the Hugging Face dataset lm-eval uses.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import datasets

from tasks.ruler.niah import DEFAULT_SIZING, NiahGenerator
from tasks.token_counter import tokenizer_from_metadata

DEFAULT_LENGTHS = [4096]
DEFAULT_SAMPLES = 500
DEFAULT_SEED = 42


def _lengths(value: Any) -> list[int]:
    if isinstance(value, (int, str)):
        value = [value]
    lengths = [int(v) for v in value]
    if not lengths or min(lengths) <= 0:
        raise ValueError(f"max_seq_lengths must be positive integers, got {value!r}")
    return lengths


def build_dataset(variant: str, **metadata: Any) -> dict[str, datasets.Dataset]:
    """All samples of one NIAH task, interleaved over lengths (so `--limit k` still covers every length)."""
    task = f"ruler_{variant}"
    lengths = _lengths(metadata.get("max_seq_lengths", DEFAULT_LENGTHS))
    num_samples = int(metadata.get("num_samples", DEFAULT_SAMPLES))
    essay_dir = metadata.get("essay_dir")
    if not essay_dir and metadata.get("data_dir"):
        essay_dir = str(Path(metadata["data_dir"]) / "paul_graham_essays")
    generator = NiahGenerator(
        variant,
        tokenizer_from_metadata(metadata, task),
        haystack=metadata.get("haystack"),
        essay_dir=essay_dir,
        tokens_to_generate=metadata.get("tokens_to_generate"),
        seed=int(metadata.get("seed", DEFAULT_SEED)),
        sizing=str(metadata.get("sizing", DEFAULT_SIZING)),
    )
    per_length = [list(generator.samples(length, num_samples)) for length in lengths]
    rows = [rows[i] for i in range(num_samples) for rows in per_length]
    return {"test": datasets.Dataset.from_list(rows)}


def postprocess_pred(text: str) -> str:
    """RULER's prediction clean-up: strip, control characters to newlines, strip again."""
    return re.sub(r"[\x00-\x1f]", "\n", text.strip()).strip()


def string_match_all(prediction: str, references: list[str]) -> float:
    """Fraction of references found case-insensitively in the prediction (RULER's NIAH metric)."""
    pred = prediction.lower()
    return sum(ref.lower() in pred for ref in references) / len(references)


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    # one metric per length, named by the length, as lm-eval's own RULER tasks report it
    return {str(doc["max_length"]): string_match_all(postprocess_pred(results[0]), doc["outputs"])}
