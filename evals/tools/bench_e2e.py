"""End-to-end evaluation speed: our `gdn2` backend against lm-eval's `hf` model on fla's KDA class, same requests;
and (hybrid shapes) a GDN-2 + SWA hybrid against its recurrent twin.

    python run_eval.py bench e2e --estimate-only                   # what each section will cost on an H200
    python run_eval.py bench e2e --sections mixes --counts recall=0,niah=0   # loglikelihood mixes, full size, sweep
    python run_eval.py bench e2e --exact-fp32 --sections mixes --counts mc=250,lambada=500,recall=0,niah=0 \\
        --batch-sizes 64 --anchor-batches 64                       # fp32 agreement with the anchor
    python run_eval.py bench e2e --shape swa_gdn2_1.3B             # hybrid vs recurrent twin
    python run_eval.py bench e2e --shape tiny --device cpu --no-anchor --counts mc=4,lambada=8,recall=2,niah=1 \\
        --length-scale 0.02 --out results/bench/e2e-tiny.md

Recurrent shapes: one random-weight KDA-variant model is written as an fla KDA Hugging Face folder, read by ours
(load_checkpoint + GDN2LM) and by the anchor (fla's KDAForCausalLM under lm-eval's HFLM). Both get the same lm-eval
Instances (strings), so tokenisation, batching and scoring are all inside the timed region.
Hybrid shapes (swa_gdn2_1.3B, tiny_hybrid): the hybrid and its recurrent twin (gdn2_1.3B, tiny) are built from our
Config with the same gates (--gates) and seed and handed to GDN2LM as modules; no anchor (fla has no SWA model).

Sections (--sections):
  mixes   requests/s per mix (multiple choice, LAMBADA-style, 2K recall generation, NIAH). Loglikelihood mixes are
          run at every batch size of a sweep (--batch-sizes for ours, --anchor-batches for the anchor), each batch
          with an untimed first pass and a timed second; the best is reported with its batch, against the compute
          floor (2 x body params x tokens each context once + 2 x head params x scored tokens, over the matmul
          rate measured in the run), and log-likelihoods and decisions are compared with the anchor's.
  decode  ms per token against batch size: our model.step eager and replayed from a CUDA graph, the anchor under
          Hugging Face generate; memory floor = (weights + state bytes read and written) / copy bandwidth.
  long    one prompt's prefill (4K .. 128K): peak CUDA memory (should depend on the prefill chunk only), tokens/s.
Targets (issue 16, one H200): loglikelihood mixes within 1.5x the compute floor and >= 4x (mc) / 2x (lambada) the
anchor's best, same decisions; |d ll| <= 1e-3 in the --exact-fp32 run; decode at the largest batch within 1.2x its
floor. Hybrid targets (issue 15) are in evals/tools/bench/hybrid.py. The report is rewritten after every step, so a
run stopped by a time limit keeps what it measured.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from evals.tools.bench.common import copy_bandwidth, csv_ints, environment, matmul_rate, version
from evals.tools.bench.estimate import estimate, render_estimate
from evals.tools.bench.models import GATES, HYBRID_TWINS, SPECIALS, is_hybrid_shape, shape_names
from evals.tools.bench.report import Report, read_report, render, write
from evals.tools.bench.workload import MIXES, parse_counts

SECTIONS = ("mixes", "decode", "long")
SWEEP = "32,64,128,256"
HYBRID_BATCH = "64"  # issue 15 measured the hybrid at 64 rows / 131072 tokens
HYBRID_LONG = "16384,65536"  # the 64K prompt, and a shorter one to show the peak does not grow
HYBRID_DECODE = "1,64"  # issue 15's decode target is at batch 64


def _check_device(device: str) -> str:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA GPU is visible: run on a GPU machine or pass --device cpu")
    return device


def _exact_fp32() -> None:
    """fp32 with exact dots everywhere: Triton's default fp32 tl.dot precision (fla's kernels) to ieee, read when a
    kernel compiles (so before anything compiles), and torch's matmuls (and with them our kernels' choice) to full
    fp32 precision."""
    kept = os.environ.get("TRITON_F32_DEFAULT")
    if kept not in (None, "ieee"):
        raise ValueError(f"--exact-fp32 but TRITON_F32_DEFAULT={kept} is set: unset it (the flag sets it to ieee)")
    os.environ["TRITON_F32_DEFAULT"] = "ieee"
    torch.set_float32_matmul_precision("highest")


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Parsed lists and mode-dependent defaults, checked before any device time is spent."""
    hybrid = is_hybrid_shape(args.shape)
    a = argparse.Namespace(**vars(args))
    a.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in a.sections if s not in SECTIONS]
    if bad:
        raise ValueError(f"--sections {','.join(bad)}: choose from {', '.join(SECTIONS)}")
    if args.gates not in GATES:
        raise ValueError(f"--gates {args.gates}: choose one of {', '.join(GATES)}")
    if args.gates != "kda" and not hybrid:
        raise ValueError("--gates native has no fla twin for the anchor: use it with a hybrid --shape "
                         f"({', '.join(HYBRID_TWINS)})")
    a.counts = parse_counts(args.counts)
    a.batch_sizes = csv_ints(args.batch_sizes or (HYBRID_BATCH if hybrid else SWEEP))
    a.anchor_batches = csv_ints(args.anchor_batches)
    a.decode_batches = csv_ints(args.decode_batches or (HYBRID_DECODE if hybrid else "1,8,64,256"))
    a.long_lengths = csv_ints(args.long_lengths or (HYBRID_LONG if hybrid else "4096,16384,32768,65536,131072"))
    a.long_chunks = csv_ints(args.long_chunks)
    if args.exact_fp32 and args.dtype not in ("auto", "float32", "fp32"):
        raise ValueError(f"--exact-fp32 runs in float32: drop --dtype {args.dtype}")
    if args.exact_fp32:
        a.dtype = "float32"
    if hybrid:
        a.anchor = False
    if not a.batch_sizes or not a.anchor_batches or min(a.batch_sizes + a.anchor_batches) < 1:
        raise ValueError("--batch-sizes and --anchor-batches need positive integers, e.g. 32,64,128,256")
    return a


def _params(shape: str, gates: str) -> int:
    """The model's parameter count without building its weights (on the meta device)."""
    from evals.tools.bench.models import model_config
    from gdn2.model import GPT

    with torch.device("meta"):
        return sum(p.numel() for p in GPT(model_config(shape, gates)).parameters())


def run(args: argparse.Namespace) -> Report | None:
    if args.render:
        report = read_report(Path(args.render))
        print(render(report))
        if args.out:
            write(report, Path(args.out))
        return report
    a = _resolve(args)
    hybrid = is_hybrid_shape(a.shape)
    print(render_estimate(estimate(a, _params(a.shape, a.gates), hybrid)),
          file=sys.stderr, flush=True)
    if a.estimate_only:
        return None
    if a.exact_fp32:
        _exact_fp32()
    device = _check_device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from evals.harness.backend import _dtype

    dtype = _dtype(a.dtype, device)
    counts = {**{m.name: m.docs for m in MIXES.values()}, **a.counts}
    out = Path(a.out or f"results/bench/e2e-{a.shape}-{device.split(':')[0]}.md")
    started = time.perf_counter()
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="gdn2-bench-e2e-"))
    bw, flops = copy_bandwidth(device), matmul_rate(device, dtype)
    prompt = max(2, round(a.decode_prompt * a.length_scale))
    setup = dict(shape=a.shape, gates=a.gates, dtype=str(dtype).removeprefix("torch."), exact_fp32=a.exact_fp32,
                 prefill_chunk=a.prefill_chunk, length_scale=a.length_scale, counts=counts, gen_cap=a.gen_cap,
                 batch_sizes=a.batch_sizes, anchor_batches=a.anchor_batches, gen_batch=a.batch_size,
                 max_batch_tokens=a.max_batch_tokens, decode_prompt=prompt, decode_steps=a.decode_steps,
                 sections=a.sections, seed=a.seed)
    report = Report(env=environment(device, bw, flops), setup=setup)

    def log(msg: str) -> None:
        """A progress line; each one also rewrites the report, so a run stopped by a time limit keeps its rows
        (every section appends its row before it logs it, and fills a mix's row as its sweeps go)."""
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", file=sys.stderr, flush=True)
        write(report, out)

    (_run_hybrid if hybrid else _run_anchor)(a, report, device, dtype, workdir, bw, flops, prompt, counts, log)
    log(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    print(render(report))
    return report


def _run_anchor(a, report, device, dtype, workdir, bw, flops, prompt, counts, log) -> None:
    from evals.tools.bench.decode import bench_decode
    from evals.tools.bench.harnesses import anchor_available, anchor_generate_warning, load_anchor, load_ours
    from evals.tools.bench.long import bench_long
    from evals.tools.bench.mixes import bench_mixes
    from evals.tools.bench.models import build_model, word_list, write_fla_kda_folder

    model = build_model(a.shape, seed=a.seed, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    folder = write_fla_kda_folder(model, workdir / f"kda-{a.shape}")
    del model
    report.setup.update(params=params, folder=str(folder))
    log(f"wrote {folder} ({params / 1e6:.1f}M params)")
    ours = load_ours(folder, device, report.setup["dtype"], a.batch_size, a.max_batch_tokens, a.prefill_chunk)
    report.notes.append(ours.note)
    log(f"loaded ours on {device}")
    if "long" in a.sections:  # first, while only our weights are on the device
        bench_long(report, ours.model, a.long_lengths, a.long_chunks, device, log)
    anchor_why = anchor_available() if a.anchor else "off (--no-anchor)"
    anchor = None if anchor_why else load_anchor(folder, device, dtype, a.anchor_batches[0])
    report.notes.append(anchor.note if anchor else f"anchor: {anchor_why}")
    if anchor and (warning := anchor_generate_warning(version("transformers"), version("fla"))):
        report.notes.append(warning)
    log(f"anchor: {anchor_why or 'loaded'}")
    # the H200 carries no `datasets` wheel: say whether anything on this path (lm-eval, fla, ours) imported it
    report.notes.append(f"`datasets` imported: {'yes' if 'datasets' in sys.modules else 'no'}")
    if "decode" in a.sections:  # before the mixes: shorter, kept if a time limit stops the run
        bench_decode(report, ours, anchor, a.decode_batches, prompt, a.decode_steps, device, bw, log)
    if "mixes" in a.sections:
        words = word_list(ours.model.config.vocab_size - len(SPECIALS))
        bench_mixes(report, ours, anchor, anchor_why, words, counts, a.length_scale, a.gen_cap, device,
                    a.batch_sizes, a.anchor_batches, a.batch_size, flops, log, a.profile)


def _run_hybrid(a, report, device, dtype, workdir, bw, flops, prompt, counts, log) -> None:
    from evals.tools.bench.harnesses import load_ours_model
    from evals.tools.bench.hybrid import hybrid_decode, hybrid_long, hybrid_mixes
    from evals.tools.bench.models import build_model, model_config, write_word_tokenizer

    twin = HYBRID_TWINS[a.shape]
    words = write_word_tokenizer(workdir / "tokenizer", model_config(a.shape, a.gates).vocab_size)
    harnesses = []
    for name, shape in (("hybrid", a.shape), ("recurrent", twin)):
        model = build_model(shape, seed=a.seed, dtype=dtype, gates=a.gates)
        harnesses.append(load_ours_model(name, model, workdir / "tokenizer" / "tokenizer.json", device,
                                         a.batch_sizes[0], a.max_batch_tokens, a.prefill_chunk))
    hyb, rec = harnesses
    params = {h.name: sum(p.numel() for p in h.model.parameters()) for h in harnesses}
    report.setup.update(params=params["hybrid"], twin=twin, twin_params=params["recurrent"])
    report.notes += [hyb.note, rec.note, f"rows per forward {a.batch_sizes[0]}, at most {a.max_batch_tokens} tokens"]
    log(f"built {a.shape} ({params['hybrid'] / 1e6:.1f}M) and {twin} ({params['recurrent'] / 1e6:.1f}M) on {device}")
    if "decode" in a.sections:
        hybrid_decode(report, hyb, rec, a.decode_batches, prompt, a.decode_steps, device, bw, log)
    if "long" in a.sections:
        hybrid_long(report, hyb, rec, a.long_lengths, a.prefill_chunk, device, log)
    if "mixes" in a.sections:
        hybrid_mixes(report, hyb, rec, words, counts, a.length_scale, a.gen_cap, device, a.batch_sizes[0], log)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default="gdn2_1.3B", choices=shape_names(),
                   help="model sizes: a recurrent preset or kda_1.3B (vs the anchor), or a hybrid "
                   f"({', '.join(HYBRID_TWINS)}: vs its recurrent twin)")
    p.add_argument("--gates", default="kda", help="kda (fla KDA's layer variant; the anchor needs it) or native "
                   "(GDN-2's own gates; hybrid shapes only)")
    p.add_argument("--device", help="cuda (default when a GPU is visible) or cpu")
    p.add_argument("--dtype", default="auto", help="weights' dtype, both harnesses (auto: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--exact-fp32", action="store_true", help="float32 with exact dots in both harnesses: sets "
                   "TRITON_F32_DEFAULT=ieee before anything compiles and torch's fp32 matmul precision to highest")
    p.add_argument("--anchor", action=argparse.BooleanOptionalAction, default=True,
                   help="also run lm-eval's hf model on fla's KDAForCausalLM when fla and transformers import "
                   "(recurrent shapes; a hybrid is compared with its recurrent twin instead)")
    p.add_argument("--out", help="report file: tables to .md and numbers to .json (default results/bench/e2e-...)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"any of {','.join(SECTIONS)}")
    p.add_argument("--counts", default="", help="documents per mix, e.g. mc=1000,lambada=2000,recall=32,niah=4 "
                   f"(defaults: {','.join(f'{m.name}={m.docs}' for m in MIXES.values())}; 0 skips a mix)")
    p.add_argument("--length-scale", type=float, default=1.0, help="multiply every context length (tests: 0.02)")
    p.add_argument("--gen-cap", type=int, help="cap on generated tokens per request (tests; default: the mix's)")
    p.add_argument("--batch-sizes", help=f"our rows per forward swept on loglikelihood mixes (default {SWEEP}; "
                   f"hybrid shapes: {HYBRID_BATCH}, the first value used for every work item)")
    p.add_argument("--anchor-batches", default=SWEEP, help="the anchor's batch sizes swept on loglikelihood mixes")
    p.add_argument("--batch-size", type=int, default=64, help="our rows per forward on generation mixes")
    p.add_argument("--max-batch-tokens", type=int, default=1 << 17, help="our rows x padded length per forward")
    p.add_argument("--prefill-chunk", type=int, default=16384, help="our prefill columns per pass")
    p.add_argument("--decode-batches", help=f"decode batch sizes (default 1,8,64,256; hybrid shapes: {HYBRID_DECODE})")
    p.add_argument("--decode-prompt", type=int, default=512, help="prompt tokens before decoding (times length scale)")
    p.add_argument("--decode-steps", type=int, default=128, help="timed decode steps")
    p.add_argument("--long-lengths", help=f"prompt lengths of the long section (default 4096,...,131072; hybrid "
                   f"shapes: {HYBRID_LONG})")
    p.add_argument("--long-chunks", default="4096,16384", help="prefill chunks the long section runs at (recurrent "
                   "shapes; hybrids use --prefill-chunk)")
    p.add_argument("--workdir", help="where the fla folder is written (default: a new temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", metavar="DIR", help="also profile one more pass of ours per mix at its best batch "
                   "(torch.profiler); the busiest operators go to DIR/profile-MIX.txt")
    p.add_argument("--estimate-only", action="store_true", help="print the estimated H200 time of each section and "
                   "stop")
    p.add_argument("--render", metavar="REPORT.json", help="print (and with --out, rewrite) a saved report's tables "
                   "instead of measuring")


def _cli(args: argparse.Namespace) -> int:
    run(args)
    return 0


def add_cli(bench_subparsers) -> argparse.ArgumentParser:
    """Register `e2e` under the `bench` command of run_eval.py."""
    p = bench_subparsers.add_parser("e2e", help="end-to-end requests/s, decoding and long-context memory vs the "
                                    "lm-eval hf + fla anchor (hybrids: vs their recurrent twin)", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=_cli)
    return p
