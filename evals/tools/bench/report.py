"""The benchmark's report: numbers (.json) and text tables (.md, rich markdown boxes), with each target marked."""
from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FLOOR_TARGET = 1.5  # issue 16: ours' best within this x the compute floor on loglikelihood mixes
LL_DIFF_TARGET = 1e-3  # |d ll| against the anchor, in the exact-fp32 run
DECODE_FLOOR_TARGET = 1.2  # issue 16: decode at the largest batch (256) within this x its memory floor
LONG_MEM_TARGET = 1.10  # the peak at the longest prompt / the peak at the shortest that fills a chunk


@dataclass
class Report:
    env: dict
    setup: dict
    mixes: list[dict] = field(default_factory=list)
    decode: list[dict] = field(default_factory=list)
    long_context: list[dict] = field(default_factory=list)
    hybrid: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e-2 and x != 0 else f"{x:.{digits}f}"
    return str(x)


def _verdict(missed: list[str]) -> str:
    return "met" if not missed else "MISSED: " + ", ".join(missed)


def mix_target(r: dict, exact: bool) -> str:
    """Issue 16's targets for a loglikelihood row (floor, anchor ratio, decisions; |d ll| in the exact-fp32 run);
    a generation row shows its ratio only."""
    if r["kind"] != "loglikelihood":
        return f"{r['ratio']:.1f}x" if "ratio" in r else "-"
    if r.get("ratio_target") is None and r.get("ours_over_floor") is None:  # a report from before issue 16
        return "-"
    missed = []
    if r.get("ours_over_floor") is not None and r["ours_over_floor"] > FLOOR_TARGET:
        missed.append(f"floor {r['ours_over_floor']:.2f}x > {FLOOR_TARGET}")
    if "ratio" not in r:
        return "-" if not missed else _verdict(missed)
    if r.get("ratio_target") and r["ratio"] < r["ratio_target"]:
        missed.append(f"anchor {r['ratio']:.2f}x < {r['ratio_target']:g}")
    if r.get("acc_agree", 1.0) < 1.0:
        missed.append("decisions differ")
    if exact and r.get("max_abs_ll_diff", 0.0) > LL_DIFF_TARGET:
        missed.append(f"|d ll| {r['max_abs_ll_diff']:.2g} > {LL_DIFF_TARGET:g}")
    return _verdict(missed)


def hybrid_target(r: dict) -> str:
    """Issue 15's targets for one row of the hybrid comparison."""
    if r.get("note"):
        return r["note"]
    missed = []
    if r.get("speed_target") and r["hybrid_over_recurrent"] < r["speed_target"]:
        missed.append(f"speed {r['hybrid_over_recurrent']:.2f}x < {r['speed_target']:g}")
    if r.get("peak_target") and r.get("peak_ratio") and r["peak_ratio"] > r["peak_target"]:
        missed.append(f"peak {r['peak_ratio']:.2f}x > {r['peak_target']:g}")
    if r.get("floor_target") and r["hybrid_floor_ratio"] > r["floor_target"]:
        missed.append(f"floor {r['hybrid_floor_ratio']:.2f}x > {r['floor_target']:g}")
    if r.get("long_peak_target") and r["hybrid_peak_vs_first"] > r["long_peak_target"]:
        missed.append(f"peak grows {r['hybrid_peak_vs_first']:.2f}x")
    if not any(r.get(k) for k in ("speed_target", "peak_target", "floor_target", "long_peak_target")):
        return "-"
    return _verdict(missed)


def _sweep_cells(rows: list[dict] | None, batches: list[int]) -> list[str]:
    by_batch = {x["batch"]: x for x in rows or []}
    return [_fmt(by_batch[b].get("req_s"), 1) if b in by_batch and "req_s" in by_batch[b]
            else by_batch[b]["note"] if b in by_batch else "-" for b in batches]


def render(report: Report) -> str:
    """The report as text tables (rich, markdown boxes), for the terminal and the README."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    env, s = report.env, report.setup
    exact = bool(s.get("exact_fp32"))
    console = Console(record=True, width=400, file=io.StringIO(), force_terminal=False)
    console.print(f"{env['device']}  torch {env['torch']}  triton {env['triton'] or '-'}  lm-eval {env['lm_eval']}  "
                  f"fla {env['fla'] or 'absent'}  transformers {env['transformers'] or 'absent'}  "
                  f"copy {env['copy_TBps']:.3f} TB/s  matmul {_fmt(env.get('matmul_TFLOPs'), 1)} TFLOP/s  "
                  f"{env['date']}")
    console.print(f"model: {s['shape']} ({s.get('gates', 'kda')} gates), {s['params'] / 1e6:.1f}M params, {s['dtype']}"
                  f"{', exact fp32 dots (TRITON_F32_DEFAULT=ieee)' if exact else ''}, random weights; prefill chunk "
                  f"{s['prefill_chunk']}; length scale {s['length_scale']}")
    if report.mixes:
        t = Table(title=f"Requests/s on identical lm-eval requests, each harness at its best batch (targets: "
                        f"loglikelihood mixes within {FLOOR_TARGET}x the compute floor, >= 4x (mc) / 2x (lambada) "
                        f"the anchor's best, same decisions"
                        f"{f', |d ll| <= {LL_DIFF_TARGET:g}' if exact else ''})", box=box.MARKDOWN)
        for col in ("mix", "requests", "ours req/s", "ours batch", "anchor req/s", "anchor batch", "ours/anchor",
                    "floor s", "ours s", "ours/floor", "max abs d ll", "max rel d ll", "acc ours", "acc anchor",
                    "decisions agree", "same text", "ours peak GiB", "anchor peak GiB", "1st pass s ours",
                    "1st pass s anchor", "target"):
            t.add_column(col, justify="right")
        for r in report.mixes:
            anchor_rate = _fmt(r.get("anchor_req_s"), 1) if "anchor_req_s" in r else r.get("anchor", "-")
            t.add_row(r["mix"], str(r["requests"]), _fmt(r.get("ours_req_s"), 1) if "ours_req_s" in r else
                      r.get("ours", "-"), _fmt(r.get("ours_best_batch")), anchor_rate,
                      _fmt(r.get("anchor_best_batch")), _fmt(r.get("ratio")), _fmt(r.get("compute_floor_s"), 3),
                      _fmt(r.get("ours_s"), 3), _fmt(r.get("ours_over_floor")), _fmt(r.get("max_abs_ll_diff"), 3),
                      _fmt(r.get("max_rel_ll_diff"), 4), _fmt(r.get("acc_ours"), 3), _fmt(r.get("acc_anchor"), 3),
                      _fmt(r.get("acc_agree"), 3), _fmt(r.get("same_text"), 3), _fmt(r.get("ours_peak_GiB")),
                      _fmt(r.get("anchor_peak_GiB")), _fmt(r.get("ours_warmup_s"), 1),
                      _fmt(r.get("anchor_warmup_s"), 1), mix_target(r, exact))
        console.print(t)
        batches = sorted({x["batch"] for r in report.mixes for k in ("ours_sweep", "anchor_sweep")
                          for x in r.get(k) or []})
        if batches:
            t = Table(title="Batch sweep: requests/s of the timed pass at each batch size (rows per forward)",
                      box=box.MARKDOWN)
            for col in ("mix", "harness", *map(str, batches)):
                t.add_column(col, justify="right")
            for r in report.mixes:
                for who in ("ours", "anchor"):
                    if r.get(f"{who}_sweep"):
                        t.add_row(r["mix"], who, *_sweep_cells(r[f"{who}_sweep"], batches))
            console.print(t)
    if report.decode:
        t = Table(title=f"Decoding after a {s['decode_prompt']}-token prompt (target: largest batch within "
                        f"{DECODE_FLOOR_TARGET}x the memory floor = (weights + state read and written) / copy "
                        "bandwidth)", box=box.MARKDOWN)
        for col in ("B", "ours ms/tok", "ours graph ms/tok", "ours tokens/s", "anchor ms/tok", "anchor tokens/s",
                    "floor ms", "ours/floor", "note", "target"):
            t.add_column(col, justify="right")
        last = max(r["B"] for r in report.decode)
        for r in report.decode:
            target = "-" if r["B"] != last else ("met" if r["ours_floor_ratio"] <= DECODE_FLOOR_TARGET else "MISSED")
            note = "; ".join(x for x in (r.get("graph_note"), r.get("anchor_note")) if x)
            t.add_row(str(r["B"]), _fmt(r["ours_ms"], 3), _fmt(r["ours_graph_ms"], 3), _fmt(r["ours_tok_s"], 0),
                      _fmt(r.get("anchor_ms"), 3), _fmt(r.get("anchor_tok_s"), 0), _fmt(r["floor_ms"], 3),
                      _fmt(r["ours_floor_ratio"]), note or "-", target)
        console.print(t)
    if report.long_context:
        t = Table(title=f"Long-context prefill, one prompt (target: per chunk, peak at the longest within "
                        f"{LONG_MEM_TARGET:.2f}x the shortest that fills a chunk)", box=box.MARKDOWN)
        for col in ("length", "peak GiB", "working GiB", "peak / first", "prefill s", "tokens/s", "chunk", "target"):
            t.add_column(col, justify="right")
        rows = report.long_context
        for i, r in enumerate(rows):
            if r.get("length") is None:
                t.add_row("-", "-", "-", "-", "-", "-", "-", r["note"])
                continue
            last = i == len(rows) - 1 or rows[i + 1]["chunk"] != r["chunk"]  # the longest prompt of its chunk
            # a prompt shorter than the chunk prefills in one smaller pass: compare with the first full-chunk one
            base = next((x for x in rows if x["chunk"] == r["chunk"] and x["length"] >= r["chunk"]), r)
            target = "-" if not last else ("met" if r["peak_GiB"] <= LONG_MEM_TARGET * base["peak_GiB"] else "MISSED")
            t.add_row(str(r["length"]), _fmt(r["peak_GiB"], 3), _fmt(r["working_GiB"], 3),
                      _fmt(r["peak_vs_first"], 3), _fmt(r["prefill_s"]), _fmt(r["tok_s"], 0), str(r["chunk"]), target)
        console.print(t)
    if report.hybrid:
        t = Table(title=f"Hybrid {s['shape']} against its recurrent twin {s.get('twin')} on the same requests "
                        "(targets, issue 15: loglikelihood >= 0.75x and peak <= 1.5x; generation >= 0.6x; decode B=64 "
                        "within 2x its memory floor; long prefill >= 0.75x, peak independent of length)",
                  box=box.MARKDOWN)
        for col in ("work", "unit", "hybrid", "recurrent", "hybrid/recurrent", "hybrid peak GiB",
                    "recurrent peak GiB", "peak ratio", "hybrid ms/tok", "hybrid floor ms", "hybrid/floor",
                    "note", "target"):
            t.add_column(col, justify="right")
        for r in report.hybrid:
            if r.get("note") and "hybrid_req_s" not in r:
                t.add_row(r["work"], *["-"] * 11, r["note"])
                continue
            t.add_row(r["work"], r["unit"], _fmt(r["hybrid_req_s"], 1), _fmt(r["recurrent_req_s"], 1),
                      _fmt(r["hybrid_over_recurrent"]), _fmt(r.get("hybrid_peak_GiB")),
                      _fmt(r.get("recurrent_peak_GiB")), _fmt(r.get("peak_ratio")),
                      _fmt(r.get("hybrid_best_ms"), 3),
                      _fmt(r.get("hybrid_floor_ms"), 3), _fmt(r.get("hybrid_floor_ratio")),
                      r.get("hybrid_note") or "-", hybrid_target(r))
        console.print(t)
    for n in report.notes:
        console.print(f"note: {n}")
    return console.export_text()


def write(report: Report, out: Path) -> None:
    """The tables to out (.md) and the numbers beside it (.json)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(asdict(report), indent=1, default=str))  # numbers first
    out.with_suffix(".md").write_text(render(report))


def read_report(path: Path) -> Report:
    """A report written by `write` (its .json), e.g. to render it again."""
    data = json.loads(Path(path).with_suffix(".json").read_text())
    return Report(**{k: v for k, v in data.items() if k in Report.__dataclass_fields__})
