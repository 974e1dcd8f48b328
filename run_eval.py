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
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's tqdm bars; ours are rich's, per task with tokens/s

DEMO_CHECKPOINTS = ["demo:gdn-demo", "demo:kda-demo", "demo:gdn2-demo"]


class UsageError(ValueError):
    """A bad command-line value: one line naming the option and the fix, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors ("error: ..." and the --help hint), exit code 2, like every other error."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not positive; give an integer >= 1")
    return value


def _batch_size(text: str) -> int | str:
    if text.startswith("auto"):  # lm-eval's auto / auto:N, for the backend to probe or refuse
        return text
    return _positive_int(text)


def _lengths(text: str) -> list[int]:
    parts = _csv(text)
    if not parts:
        raise argparse.ArgumentTypeError(f"{text!r} holds no length; give positive lengths, e.g. 1024,2048")
    return [_positive_int(t) for t in parts]


def _limit(text: str) -> int | float:
    """An int >= 1 (documents per task) or a fraction in (0, 1) of each task's documents, as lm-eval takes it."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a document count (e.g. 20) or a "
                                         f"fraction below 1 (e.g. 0.1)") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive finite number; give a document count "
                                         f"(e.g. 20) or a fraction below 1 (e.g. 0.1), or leave --limit out for all")
    if value >= 1 and value != int(value):
        raise argparse.ArgumentTypeError(f"{text}: a count must be whole (e.g. 20); fractions must be below 1")
    return int(value) if value >= 1 else value


def _fewshot(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of few-shot examples >= 0")
    return value


def _model_args(text: str) -> dict:
    from lm_eval.utils import simple_parse_args_string

    try:
        return simple_parse_args_string(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not lm-eval's key=value,key2=value2 form") from None


def _metadata(text: str) -> dict:
    """lm-eval's --metadata: a JSON object or key=value pairs."""
    import json

    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not valid JSON ({err.msg})") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError("give a JSON object, e.g. '{\"max_seq_lengths\": [4096]}'")
        return value
    return _model_args(text)


def check_run_args(args: argparse.Namespace) -> dict:
    """What argparse's types cannot see alone: an absent device, the Triton backend's needs, --model_args names.
    Returns the parsed --model_args."""
    try:
        model_args = _model_args(args.model_args) if args.model_args else {}
    except argparse.ArgumentTypeError as err:
        raise UsageError(f"argument --model_args: {err}") from None
    device = args.device
    if device and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
                             f"leave --device out (or --device cpu) to run on the CPU")
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s); use cuda:0 "
                             f"to cuda:{torch.cuda.device_count() - 1}")
    elif device and device != "cpu" and not device.startswith(("mps", "xpu")):
        raise UsageError(f"--device {device}: use cpu, cuda or cuda:N")
    if args.backend == "triton":
        import importlib.util

        import torch

        from evals.harness.errors import TRITON_NEEDS

        interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests)
        if importlib.util.find_spec("triton") is None or not (torch.cuda.is_available() or interpreted):
            raise UsageError(f"--backend triton: {TRITON_NEEDS}")
    if model_args and any(not c.startswith("hf:") for c in args.checkpoint or DEMO_CHECKPOINTS):
        from evals.harness.runner import model_arg_names

        valid = model_arg_names()
        bad = [k for k in model_args if k not in valid]
        if bad:
            import difflib

            near = difflib.get_close_matches(bad[0], valid, n=1)
            hint = f"did you mean {near[0]}? " if near else ""
            raise UsageError(f"--model_args: unknown argument {bad[0]!r} for gdn2; {hint}valid: {', '.join(valid)}")
    return model_args


def cmd_run(args: argparse.Namespace) -> int:
    model_args = check_run_args(args)
    from rich.console import Console

    from evals.harness.distributed import is_main_process
    from evals.harness.runner import RunSpec, quiet_lm_eval, run
    from evals.reports.summary import print_summary

    quiet_lm_eval()
    checkpoints = args.checkpoint or DEMO_CHECKPOINTS
    spec = RunSpec(
        checkpoints=checkpoints, tasks=_csv(args.tasks) if args.tasks else [], suite=args.suite,
        limit=args.limit, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
        output=args.output or f"results/{Path(args.suite).stem if args.suite else 'run'}", data_dir=args.data_dir,
        essay_dir=args.essay_dir, seed=args.seed, bos=args.bos,
        gate_modes=_csv(args.gate_modes) if args.gate_modes else None, lengths=args.lengths,
        num_samples=args.num_samples, backend=args.backend, tokenizer=args.tokenizer, preset=args.preset,
        model_args=model_args, model_args_text=args.model_args, gen_kwargs=args.gen_kwargs,
        num_fewshot=args.num_fewshot, include_path=list(args.include_path or []), metadata=dict(args.metadata or {}),
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
    """A rich bar per task: requests done of the total, tokens/s and an ETA, fed by the backend's progress hooks
    (start_hook(total) at the start of every request list, hook(requests, tokens) after every batch)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = getattr(lm, "progress", None)
    if progress is None:
        yield
        return
    state = {"tokens": 0, "t0": time.time()}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                  console=console, transient=False) as bar:
        handle = bar.add_task(f"{label} {task}", total=None, rate="")

        def start(total: int) -> None:  # a task may hand the model several request lists: totals add up
            bar.update(handle, total=bar.tasks[0].completed + total)

        def hook(requests: int, tokens: int) -> None:
            state["tokens"] += tokens
            rate = state["tokens"] / max(time.time() - state["t0"], 1e-6)
            bar.update(handle, advance=requests, rate=f"{rate:,.0f} tok/s")

        progress.hook = hook
        progress.start_hook = start
        try:
            yield
        finally:
            progress.hook = None
            progress.start_hook = None
            bar.update(handle, total=bar.tasks[0].completed)


def cmd_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from gdn2.checkpoint import _demo_names
    from gdn2.config import PRESETS
    from tasks import catalog

    console = Console()
    ours = set(catalog._our_tasks())
    t = Table(title="tasks", show_lines=False,
              caption="and any lm-eval task or group")
    t.add_column("task")
    t.add_column("from")
    for name in catalog.list_tasks():
        t.add_row(name, "tasks/ (ours)" if name in ours else "lm-eval")
    console.print(t)
    s = Table(title="suites")
    s.add_column("suite")
    s.add_column("tasks")
    s.add_column("description")
    broken = []
    for name in catalog.list_suites():
        try:
            suite = catalog.load_suite(name)
        except Exception as err:  # noqa: BLE001 - one broken suite file must not hide the others
            from evals.harness.errors import explain

            broken.append(explain(err))
            s.add_row(name, "-", "[red]broken: see the warning below[/red]")
            continue
        s.add_row(name, str(len(suite.tasks)), suite.description)
    console.print(s)
    for message in broken:
        print(f"warning: {message}", file=sys.stderr)
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
    p = Parser(prog="run_eval.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    # lm-eval's underscore spellings (--batch_size, --output_path, ...) are aliases of ours
    r = sub.add_parser("run", help="evaluate checkpoints on tasks or a suite")
    r.add_argument("--checkpoint", "--pretrained", action="append",
                   help="path, demo:NAME or hf:PATH; repeatable (default: the three demo checkpoints)")
    what = r.add_mutually_exclusive_group()
    what.add_argument("--tasks", help="comma-separated task names: ours (see `list`) or any lm-eval task or group")
    what.add_argument("--suite", help="quick | table2 | table3 | table4 | table5 | all, or a path to a suite .yaml")
    r.add_argument("--limit", type=_limit, help="documents per task (an int >= 1, or a fraction < 1)")
    r.add_argument("--batch-size", "--batch_size", type=_batch_size, default=32, help="rows per forward (>= 1)")
    r.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    r.add_argument("--dtype", default="auto", choices=["auto", "float32", "fp32", "bfloat16", "bf16", "float16",
                                                       "fp16", "float64"],
                   help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    r.add_argument("--output", "--output_path", "--output-path",
                   help="results folder (default results/<suite>); rerun to resume")
    r.add_argument("--data-dir", "--data_dir",
                   help="read every dataset from this folder instead of the hub (tasks/README.md)")
    r.add_argument("--essay-dir", "--essay_dir", help="folder of .txt essays for essay-haystack NIAH tasks")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--bos", choices=["bos", "none"], help="override the suite's BOS policy for every task")
    r.add_argument("--gate-modes", "--gate_modes",
                   help="comma-separated gate modes (full,scalar_b,scalar_w,tied,expanded_b)")
    r.add_argument("--lengths", type=_lengths, help="NIAH max_seq_lengths, e.g. 1024,2048,4096")
    r.add_argument("--num-samples", "--num_samples", type=_positive_int,
                   help="NIAH samples per length (default: the suite's, RULER 500)")
    r.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "naive"],
                   help="recurrence backend: auto | torch | triton (CUDA GPU) | naive")
    r.add_argument("--tokenizer", help="tokenizer file or folder, when the checkpoint has none beside it")
    r.add_argument("--preset", help="model preset for lit_gpt checkpoints without a config")
    r.add_argument("--model_args", "--model-args",
                   help="backend arguments, lm-eval's k=v,k2=v2 (e.g. prefill_chunk=4096; see the README)")
    r.add_argument("--gen_kwargs", "--gen-kwargs", help="generation arguments for generate_until tasks (k=v,...)")
    r.add_argument("--num_fewshot", "--num-fewshot", type=_fewshot, help="few-shot examples per prompt")
    r.add_argument("--include_path", "--include-path", action="append",
                   help="another folder of task YAMLs (repeatable), as lm-eval's --include_path")
    r.add_argument("--metadata", type=_metadata,
                   help="metadata handed to every task: JSON or k=v,... (e.g. max_seq_lengths for RULER)")
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
    # everything, the parser's imports included, runs inside the try: an early Ctrl-C gives one line too
    debug = "--debug" in (sys.argv[1:] if argv is None else argv) or bool(os.environ.get("GDN2_DEBUG"))
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted: finished tasks are saved; rerun the same command to resume", file=sys.stderr)
        return 130
    except SystemExit:  # --help, or argparse's own exit
        raise
    except Exception as err:  # one line unless --debug
        if debug:
            raise
        from evals.harness.errors import explain

        print(f"error: {explain(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
