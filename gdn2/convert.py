"""`convert SRC DST`: any supported checkpoint -> our native folder (model.safetensors + config.json + tokenizer)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from gdn2.checkpoint import load_checkpoint, save_native


def convert(src: str | os.PathLike, dst: str | os.PathLike, **load_kwargs) -> Path:
    """Load `src` (any spec load_checkpoint accepts; kwargs go to it) and write it as a native folder at `dst`."""
    load_kwargs.setdefault("device", "cpu")
    loaded = load_checkpoint(str(src), **load_kwargs)
    extra = {"converted_from": {"spec": str(src), "format": loaded.format, "inferred": loaded.inferred}}
    return save_native(loaded, out_dir=dst, extra_meta=extra)


def _run(args: argparse.Namespace) -> int:
    out = convert(args.src, args.dst, preset=args.preset, config=args.config, tokenizer=args.tokenizer,
                  dtype=args.dtype)
    print(f"wrote native checkpoint {out}")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `convert SRC DST [--preset P] [--config F] [--tokenizer T] [--dtype D]`."""
    p = subparsers.add_parser("convert", help="convert a checkpoint (lit_gpt, fla, native, demo) to the native format",
                              description=__doc__)
    p.add_argument("src", help="checkpoint: a lit_gpt .pth, a training output / fla / native folder, or a demo name")
    p.add_argument("dst", help="output folder for the native checkpoint")
    p.add_argument("--preset", help="model preset of a lit_gpt checkpoint (default: inferred from its keys)")
    p.add_argument("--config", help="config JSON file (lit_gpt Config fields) or fields to override")
    p.add_argument("--tokenizer", help="tokenizer folder/file or 'byte' (default: files beside the checkpoint)")
    p.add_argument("--dtype", help="weight dtype to store: float32, bfloat16, float16 (default: the source's)")
    p.set_defaults(func=_run)
    return p
