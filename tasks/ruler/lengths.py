"""Prompt-length distribution of the NIAH generator per sizing mode, to compare with RULER's own.

    python -m tasks.ruler.lengths --tokenizer ../shared/data/llama2_tokenizer/tokenizer.model \\
        --essay-dir ../shared/data/paul_graham_essays [--lengths 1024 4096] [--samples 100] [--seed 42]

Prints a Markdown table: per task, length and sizing, the share of samples at least one haystack unit short of
the searched size and the median prompt tokens (answer prefix included, no special tokens; the budget is
length - 128).
"""
from __future__ import annotations

import argparse
import statistics

from gdn2.tokenizer import load_tokenizer
from tasks.ruler.niah import SIZINGS, NiahGenerator

TASKS = {"niah_single_1": "S-NIAH-1", "niah_single_2": "S-NIAH-2", "niah_single_3": "S-NIAH-3",
         "niah_multikey_1": "MK-NIAH-1"}


def cell(task: str, tok, essay_dir: str, length: int, samples: int, seed: int, sizing: str) -> tuple[float, float]:
    """(share of samples a unit short, median prompt tokens) of one task x length x sizing."""
    gen = NiahGenerator(task, tok, essay_dir=essay_dir, seed=seed, sizing=sizing)
    rows = list(gen.samples(length, samples))
    short = sum(r["units_short"] > 0 for r in rows) / len(rows)
    return short, statistics.median(r["length"] - gen.tokens_to_generate for r in rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", required=True, help="tokenizer spec for gdn2.tokenizer.load_tokenizer")
    p.add_argument("--essay-dir", required=True, help="folder of *.txt essays")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--sizing", nargs="+", default=list(SIZINGS), choices=SIZINGS)
    args = p.parse_args(argv)
    tok = load_tokenizer(args.tokenizer)
    head = [f"{s} {n // 1024}K" for s in args.sizing for n in args.lengths]
    print("| task | " + " | ".join(head) + " |")
    print("|---" * (len(head) + 1) + "|")
    for task, name in TASKS.items():
        cells = []
        for sizing in args.sizing:
            for length in args.lengths:
                short, median = cell(task, tok, args.essay_dir, length, args.samples, args.seed, sizing)
                cells.append(f"{median:g}" if sizing == "tight" else f"{100 * short:.0f}%, {median:g}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
