#!/usr/bin/env python3
"""gdn2-eval: evaluate GDN-2 family checkpoints on the paper's suites, make its tables, compare checkpoints.

Examples:
    python run_eval.py run --suite quick                                  # the three demo checkpoints
    python run_eval.py run --checkpoint out/final-model-ckpt.pth --suite table2 --data-dir ~/gdn2-data
    python run_eval.py run --checkpoint demo:gdn2-demo --tasks ruler_niah_single_1 --lengths 1024,2048 --limit 20
    python run_eval.py table results/quick --layout table3 --format md
    python run_eval.py compare results/quick/gdn-demo results/quick/gdn2-demo
    python run_eval.py list
    python run_eval.py convert out/final-model-ckpt.pth converted/ --preset gdn2_1.3B
Every error is one line naming the problem and the fix (add --debug for the traceback); finished work stays on
disk and rerunning the same command resumes it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager

os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's tqdm bars; ours are rich's, per task with tokens/s

DEMO_CHECKPOINTS = ["demo:gdn-demo", "demo:kda-demo", "demo:gdn2-demo"]


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> list[int]:
    return [int(t) for t in _csv(text)]


def _limit(text: str) -> int | float:
    value = float(text)
    return int(value) if value >= 1 else value


def cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from evals.harness.distributed import is_main_process
    from evals.harness.runner import RunSpec, quiet_lm_eval, run
    from evals.reports.summary import print_summary

    quiet_lm_eval()
    checkpoints = args.checkpoint or DEMO_CHECKPOINTS
    spec = RunSpec(
        checkpoints=checkpoints, tasks=_csv(args.tasks) if args.tasks else [], suite=args.suite,
        limit=args.limit, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
        output=args.output or f"results/{args.suite or 'run'}", data_dir=args.data_dir, essay_dir=args.essay_dir,
        seed=args.seed, bos=args.bos, gate_modes=_csv(args.gate_modes) if args.gate_modes else None,
        lengths=args.lengths, num_samples=args.num_samples, backend=args.backend, tokenizer=args.tokenizer,
        preset=args.preset,
    )
    console = Console(stderr=True)
    started = time.time()
    main = is_main_process()  # under torchrun every rank evaluates; rank 0 shows progress and writes
    labels = run(spec, on_task=(lambda label, task, lm: _progress(console, label, task, lm)) if main else None)
    if not main:
        return 0
    console.print(f"[dim]{len(labels)} checkpoint run(s) in {time.time() - started:.1f}s -> {spec.output}[/dim]")
    print_summary(spec.output, labels, suite=spec.suite)
    return 0


@contextmanager
def _progress(console, label: str, task: str, lm):
    """A rich bar per task: requests done and tokens/s, fed by the backend's progress hook."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = getattr(lm, "progress", None)
    if progress is None:
        yield
        return
    state = {"tokens": 0, "t0": time.time()}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console, transient=False) as bar:
        handle = bar.add_task(f"{label} {task}", total=None, rate="")

        def hook(requests: int, tokens: int) -> None:
            state["tokens"] += tokens
            rate = state["tokens"] / max(time.time() - state["t0"], 1e-6)
            bar.update(handle, advance=requests, rate=f"{rate:,.0f} tok/s")

        progress.hook = hook
        try:
            yield
        finally:
            progress.hook = None
            bar.update(handle, total=bar.tasks[0].completed)


def cmd_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from gdn2.checkpoint import _demo_names
    from gdn2.config import PRESETS
    from tasks import catalog

    console = Console()
    ours = set(catalog._our_tasks())
    t = Table(title="tasks", show_lines=False)
    t.add_column("task")
    t.add_column("from")
    for name in catalog.list_tasks():
        t.add_row(name, "tasks/ (ours)" if name in ours else "lm-eval")
    console.print(t)
    s = Table(title="suites")
    s.add_column("suite")
    s.add_column("tasks")
    s.add_column("description")
    for name in catalog.list_suites():
        suite = catalog.load_suite(name)
        s.add_row(name, str(len(suite.tasks)), suite.description)
    console.print(s)
    c = Table(title="built-in checkpoints and presets")
    c.add_column("name")
    c.add_column("kind")
    for name in _demo_names():
        c.add_row(f"demo:{name}", "embedded demo checkpoint (toy, see README)")
    for name in PRESETS:
        c.add_row(name, "model preset (--preset, for lit_gpt checkpoints)")
    console.print(c)
    return 0


def cmd_plugin(args: argparse.Namespace) -> int:
    from evals.harness import lm_eval_plugin

    path = lm_eval_plugin.install() if args.action == "install" else lm_eval_plugin.uninstall()
    print(f"{args.action}ed {path}: `lm_eval --model gdn2 ...` {'now works' if args.action == 'install' else 'is off'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_eval.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="evaluate checkpoints on tasks or a suite")
    r.add_argument("--checkpoint", action="append",
                   help="path, demo:NAME or hf:PATH; repeatable (default: the three demo checkpoints)")
    what = r.add_mutually_exclusive_group()
    what.add_argument("--tasks", help="comma-separated task names (see `list`)")
    what.add_argument("--suite", help="quick | table2 | table3 | table4 | table5 | all")
    r.add_argument("--limit", type=_limit, help="documents per task (an int, or a fraction < 1)")
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    r.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    r.add_argument("--output", help="results folder (default results/<suite>); rerun to resume")
    r.add_argument("--data-dir", help="read every dataset from this folder instead of the hub (tasks/README.md)")
    r.add_argument("--essay-dir", help="folder of .txt essays for essay-haystack NIAH tasks")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--bos", choices=["bos", "none"], help="override the suite's BOS policy for every task")
    r.add_argument("--gate-modes", help="comma-separated gate modes (full,scalar_b,scalar_w,tied,expanded_b)")
    r.add_argument("--lengths", type=_ints, help="NIAH max_seq_lengths, e.g. 1024,2048,4096")
    r.add_argument("--num-samples", type=int, help="NIAH samples per length (default: the suite's, RULER 500)")
    r.add_argument("--backend", default="auto", help="recurrence backend: auto | torch | triton | naive")
    r.add_argument("--tokenizer", help="tokenizer file or folder, when the checkpoint has none beside it")
    r.add_argument("--preset", help="model preset for lit_gpt checkpoints without a config")
    r.set_defaults(func=cmd_run)

    ls = sub.add_parser("list", help="tasks, suites and built-in checkpoints")
    ls.set_defaults(func=cmd_list)

    pl = sub.add_parser("lm-eval-plugin", help="register the gdn2 model with lm-eval's own CLI (a .pth file)")
    pl.add_argument("action", choices=["install", "uninstall"])
    pl.set_defaults(func=cmd_plugin)

    from evals.reports.report_cli import add_cli as add_report_cli
    from gdn2.convert import add_cli as add_convert_cli

    add_report_cli(sub)
    add_convert_cli(sub)
    bench = sub.add_parser("bench", help="speed benchmarks (GPU)").add_subparsers(dest="bench", required=True)
    for module in ("evals.tools.bench_kernels", "evals.tools.bench_e2e"):
        try:
            __import__(module, fromlist=["add_cli"]).add_cli(bench)
        except ImportError:
            pass
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted: finished tasks are saved; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as err:  # one line unless --debug
        if args.debug or os.environ.get("GDN2_DEBUG"):
            raise
        from evals.harness.errors import explain

        print(f"error: {explain(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
