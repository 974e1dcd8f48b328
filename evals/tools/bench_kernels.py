"""Kernel benchmark: our Triton prefill and decode step against fla-core, on identical inputs in one process.

    python run_eval.py bench kernels                  # the paper's shapes (H=16, dk=dv=128, bf16)
    python -m evals.tools.bench_kernels --out evals/tools/bench_results/kernels_h200.txt

Times are medians of triton.testing.do_bench. The bytes floor is every input read once and every output written
once (for decode: the fp32 state read and written) over the device-to-device copy bandwidth measured here.
fla-core's chunk_gdn2, chunk_kda and fused_recurrent_gdn2 are timed when `fla` is importable.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

PREFILL_SHAPES = [(8, 2048), (4, 4096), (1, 16384), (32, 1024)]
DECODE_BATCHES = [1, 16, 64, 256]
PREFILL_TARGET = 0.67  # x fla-core chunk_gdn2
DECODE_FLOOR_TARGET = 1.2  # x state-traffic floor at the largest batch
DECODE_B1_TARGET_US = 15.0


@dataclass
class Report:
    env: dict
    prefill: list[dict] = field(default_factory=list)
    decode: list[dict] = field(default_factory=list)


def _bench_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written (1 GiB buffers)."""
    bw = _copy_bandwidth(1 << 29)
    torch.cuda.empty_cache()  # the buffers died with _copy_bandwidth's frame
    return bw


def _copy_bandwidth(n: int) -> float:
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    return 2 * x.numel() * x.element_size() / (_bench_ms(lambda: y.copy_(x)) * 1e-3)


def _fla():
    """fla-core's kernels, or None when fla is not installed."""
    try:
        from fla.ops.gdn2 import chunk_gdn2, fused_recurrent_gdn2
        from fla.ops.kda import chunk_kda
    except ImportError:
        return None
    return dict(chunk_gdn2=chunk_gdn2, chunk_kda=chunk_kda, fused_recurrent_gdn2=fused_recurrent_gdn2)


def environment(bw: float) -> dict:
    import triton

    try:
        import fla

        fla_version = getattr(fla, "__version__", "unknown")
    except ImportError:
        fla_version = None
    return dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
                fla=fla_version, python=platform.python_version(), copy_TBps=bw / 1e12,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def _inputs(B: int, T: int, H: int, K: int, V: int, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s, dt=torch.bfloat16: torch.randn(*s, device="cuda", generator=gen).to(dt)  # noqa: E731
    u = lambda *s: torch.rand(*s, device="cuda", generator=gen).to(torch.bfloat16)  # noqa: E731
    q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V)
    g = torch.nn.functional.logsigmoid(r(B, T, H, K, dt=torch.float32)) / 16
    return q, k, v, g, u(B, T, H, K), u(B, T, H, V), u(B, T, H)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def bench_prefill(B: int, T: int, H: int, K: int, V: int, bw: float, fla: dict | None) -> dict:
    from gdn2.ops.chunk import chunk_gdn2_triton

    q, k, v, g, b, w, beta = _inputs(B, T, H, K, V)
    row = dict(shape=f"B{B}xT{T}")
    with torch.no_grad():
        ours = lambda: chunk_gdn2_triton(q, k, v, g, b, w, use_qk_l2norm=True)  # noqa: E731
        row["ours_ms"] = _bench_ms(ours)
        row["ours_state_ms"] = _bench_ms(lambda: chunk_gdn2_triton(q, k, v, g, b, w, use_qk_l2norm=True,
                                                                   output_final_state=True))
        if fla:
            row["fla_gdn2_ms"] = _bench_ms(lambda: fla["chunk_gdn2"](q, k, v, g, b, w, use_qk_l2norm_in_kernel=True))
            row["fla_kda_ms"] = _bench_ms(lambda: fla["chunk_kda"](q, k, v, g, beta, use_qk_l2norm_in_kernel=True))
            row["rel_diff_vs_fla"] = _rel(ours()[0], fla["chunk_gdn2"](q, k, v, g, b, w,
                                                                        use_qk_l2norm_in_kernel=True)[0])
    nbytes = B * T * H * (3 * K * 2 + 4 * K + 2 * V * 2 + V * 2)  # q,k,b bf16 + g fp32 + v,w bf16 in; o out
    row["floor_ms"] = nbytes / bw * 1e3
    return row  # the caller empties the CUDA cache once these inputs are gone


def _graph_ms(fn) -> float:
    """Time one call replayed from a CUDA graph (no Python or launch overhead between steps)."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _bench_ms(graph.replay)


def bench_decode(B: int, H: int, K: int, V: int, bw: float, fla: dict | None) -> dict:
    from gdn2.ops.recurrent import fused_recurrent_step_triton

    q, k, v, g, b, w, _ = _inputs(B, 1, H, K, V, seed=B)
    S0 = torch.randn(B, H, K, V, device="cuda")
    S = S0.clone()
    out = torch.empty(B, H, V, dtype=v.dtype, device="cuda")
    step_in = [x[:, 0] for x in (q, k, v, g, b, w)]
    ours = lambda: fused_recurrent_step_triton(*step_in, S, use_qk_l2norm=True, out=out)  # noqa: E731
    row = dict(B=B)
    with torch.no_grad():
        row["ours_us"] = _bench_ms(ours) * 1e3
        row["ours_graph_us"] = _graph_ms(ours) * 1e3
        if fla:
            fla_step = lambda: fla["fused_recurrent_gdn2"](q, k, v, g, b, w, initial_state=S0,  # noqa: E731
                                                           output_final_state=True, use_qk_l2norm_in_kernel=True)
            row["fla_us"] = _bench_ms(fla_step) * 1e3
            S.copy_(S0)
            ours()
            o_fla, S_fla = fla_step()
            row["rel_diff_vs_fla"] = max(_rel(out, o_fla[:, 0]), _rel(S, S_fla))
    row["floor_us"] = 2 * B * H * K * V * 4 / bw * 1e6
    return row


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def render(report: Report) -> str:
    """The report as plain-text tables (rich), for the terminal and the README."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    env = report.env
    console = Console(record=True, width=160, file=io.StringIO(), force_terminal=False)
    console.print(f"{env['device']}  torch {env['torch']}  triton {env['triton']}  fla-core {env['fla'] or 'absent'}"
                  f"  copy {env['copy_TBps']:.2f} TB/s  {env['date']}")
    t = Table(title=f"Prefill forward, H=16 K=V=128, bf16, l2norm in kernel (target: ours <= {PREFILL_TARGET} x fla "
                    "chunk_gdn2 and <= fla chunk_kda)", box=box.MARKDOWN)
    for col in ("shape", "ours ms", "ours+state ms", "fla gdn2 ms", "fla kda ms", "ours/fla gdn2", "ours/fla kda",
                "floor ms", "ours/floor", "rel diff vs fla", "target"):
        t.add_column(col, justify="right")
    for r in report.prefill:
        g2, kd = r.get("fla_gdn2_ms"), r.get("fla_kda_ms")
        met = None if g2 is None else (r["ours_ms"] <= PREFILL_TARGET * g2 and r["ours_ms"] <= kd)
        t.add_row(r["shape"], _fmt(r["ours_ms"]), _fmt(r["ours_state_ms"]), _fmt(g2), _fmt(kd),
                  _fmt(g2 and r["ours_ms"] / g2, 2), _fmt(kd and r["ours_ms"] / kd, 2), _fmt(r["floor_ms"]),
                  _fmt(r["ours_ms"] / r["floor_ms"], 1), _fmt(r.get("rel_diff_vs_fla"), 4),
                  "-" if met is None else ("met" if met else "MISSED"))
    console.print(t)
    t = Table(title=f"Decode step, H=16 K=V=128, fp32 state (targets: largest B <= {DECODE_FLOOR_TARGET} x floor, "
                    f"B=1 <= {DECODE_B1_TARGET_US:.0f} us)", box=box.MARKDOWN)
    for col in ("B", "ours us", "ours graph us", "fla us", "ours/fla", "floor us", "ours/floor", "graph/floor",
                "rel diff vs fla", "target"):
        t.add_column(col, justify="right")
    last_b = max((r["B"] for r in report.decode), default=None)
    for r in report.decode:
        fla_us = r.get("fla_us")
        best = min(r["ours_us"], r["ours_graph_us"])
        met = "-"
        if r["B"] == 1:
            met = "met" if best <= DECODE_B1_TARGET_US else "MISSED"
        elif r["B"] == last_b:
            met = "met" if best <= DECODE_FLOOR_TARGET * r["floor_us"] else "MISSED"
        t.add_row(str(r["B"]), _fmt(r["ours_us"], 1), _fmt(r["ours_graph_us"], 1), _fmt(fla_us, 1),
                  _fmt(fla_us and r["ours_us"] / fla_us, 2), _fmt(r["floor_us"], 1),
                  _fmt(r["ours_us"] / r["floor_us"], 2), _fmt(r["ours_graph_us"] / r["floor_us"], 2),
                  _fmt(r.get("rel_diff_vs_fla"), 4), met)
    console.print(t)
    return console.export_text()


SWEEP_INTRA = [dict(intra_warps=w) for w in (8, 4)]
SWEEP_STATE = [dict(state_bv=64, state_warps=8, state_stages=st) for st in (2, 3)]
SWEEP_DECODE = [dict(bv_large=bl, bv_small=32, warps=w) for bl, w in ((64, 4), (64, 8), (128, 8), (128, 16), (32, 4))]


def _best(configs: list[dict], launch: dict, fn, label: str, profile: bool = False) -> dict:
    """Time fn under each config (applied to `launch`), print the fastest few, leave `launch` at the best."""
    start, times = dict(launch), []
    for cfg in configs:
        launch.update(start | cfg)
        try:
            times.append((_bench_ms(fn, rep=30), cfg))
            if profile:
                print(f"  {label} {cfg}: {times[-1][0] * 1e3:.0f} us = {_kernel_times(fn)}")
        except Exception as err:  # e.g. out of shared memory for some settings
            print(f"  {label} {cfg}: {type(err).__name__}")
    times.sort(key=lambda x: x[0])
    for t, cfg in times[:4]:
        print(f"{label}: {t * 1e3:.1f} us {cfg}")
    launch.update(start | times[0][1])
    return times[0][1]


def _kernel_times(fn) -> str:
    """GPU time per kernel of one call (mean over 5), from the torch profiler."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / 5) for e in prof.key_averages() if e.device_time_total > 0]
    return ", ".join(f"{name[:24]} {us:.0f} us" for name, us in sorted(rows, key=lambda r: -r[1])[:3])


def sweep(args: argparse.Namespace) -> None:
    """Time launch-setting variants of both kernels (overriding their LAUNCH dicts); keeps the best for the run."""
    from gdn2.ops import chunk, recurrent

    H, K, V = args.heads, args.dk, args.dv
    for (B, T) in [(8, 2048)]:
        q, k, v, g, b, w, _ = _inputs(B, T, H, K, V)
        fn = lambda: chunk.chunk_gdn2_triton(q, k, v, g, b, w, use_qk_l2norm=True)  # noqa: E731
        _best(SWEEP_INTRA, chunk.LAUNCH, fn, f"prefill B{B}xT{T}", profile=True)
        _best(SWEEP_STATE, chunk.LAUNCH, fn, f"prefill B{B}xT{T}", profile=True)
    for B in (256, 1):
        q, k, v, g, b, w, _ = _inputs(B, 1, H, K, V)
        S = torch.randn(B, H, K, V, device="cuda")
        step_in = [x[:, 0] for x in (q, k, v, g, b, w)]
        _best(SWEEP_DECODE, recurrent.LAUNCH,
              lambda: recurrent.fused_recurrent_step_triton(*step_in, S, use_qk_l2norm=True), f"decode B{B}")
    print(f"chunk.LAUNCH = {chunk.LAUNCH}\nrecurrent.LAUNCH = {recurrent.LAUNCH}")


def run(args: argparse.Namespace) -> Report:
    if not torch.cuda.is_available():
        raise SystemExit("bench kernels needs a CUDA GPU (the Triton kernels and fla-core run on CUDA only)")
    shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes]
    if args.sweep:
        sweep(args)
    bw = copy_bandwidth()
    fla = None if args.no_fla else _fla()
    report = Report(env=environment(bw))
    for B, T in shapes:
        report.prefill.append(bench_prefill(B, T, args.heads, args.dk, args.dv, bw, fla))
        torch.cuda.empty_cache()
    for B in args.decode_batches:
        report.decode.append(bench_decode(B, args.heads, args.dk, args.dv, bw, fla))
    text = render(report)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(asdict(report), indent=1))
    return report


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", nargs="+", default=[f"{B}x{T}" for B, T in PREFILL_SHAPES],
                   help="prefill shapes as BxT (default: the paper's four)")
    p.add_argument("--decode-batches", nargs="+", type=int, default=DECODE_BATCHES)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dk", type=int, default=128)
    p.add_argument("--dv", type=int, default=128)
    p.add_argument("--no-fla", action="store_true", help="time our kernels only")
    p.add_argument("--sweep", action="store_true", help="first time launch-setting variants of our kernels")
    p.add_argument("--out", help="also write the table here (text) and the numbers beside it (.json)")


def add_cli(bench_subparsers) -> argparse.ArgumentParser:
    """Register `kernels` under the `bench` command of run_eval.py."""
    p = bench_subparsers.add_parser("kernels", help="time the Triton prefill/decode kernels against fla-core",
                                    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=_cli)
    return p


def _cli(args: argparse.Namespace) -> int:
    """run_eval.py's exit status: 0 once the table is printed (run returns the Report, for Python callers)."""
    run(args)
    return 0


def main(argv: list[str] | None = None) -> Report:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
