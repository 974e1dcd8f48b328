"""The hybrid comparison (issue 15): a hybrid (GDN-2 + sliding-window attention) against its recurrent twin on
the same requests, in the same process, both through our backend. There is no fla anchor for a hybrid (fla's KDA
model has no SWA layers).

Rows (report.hybrid), one per work item: each mix (req/s), decode at each batch (tokens/s, with the hybrid's memory
floor: weights + key/value ring + matrix state bytes per step over the copy bandwidth) and one long prompt per
length (tokens/s). Peak memory is each model's own weights + its working peak (the other model's weights, resident
too, are not counted).
"""
from __future__ import annotations

from typing import Callable

from evals.tools.bench.common import gib, is_cuda, peak_reset, weight_bytes, working_peak
from evals.tools.bench.decode import decode_row
from evals.tools.bench.harnesses import Harness, run_requests
from evals.tools.bench.long import prefill_once
from evals.tools.bench.workload import MIXES, make_requests

# issue 15's targets: hybrid / recurrent speed at least, hybrid / recurrent peak at most
SPEED_TARGET = {"loglikelihood": 0.75, "generate_until": 0.6, "long": 0.75}
PEAK_TARGET = {"loglikelihood": 1.5}
DECODE_FLOOR_TARGET = 2.0  # x the hybrid's memory floor, at batch DECODE_TARGET_BATCH
DECODE_TARGET_BATCH = 64
LONG_PEAK_TARGET = 1.10  # the hybrid's peak at the longest prompt / at the shortest


def _pair(work: str, kind: str, unit: str, hyb: dict, rec: dict) -> dict:
    row = dict(work=work, kind=kind, unit=unit, **{f"hybrid_{k}": v for k, v in hyb.items()},
               **{f"recurrent_{k}": v for k, v in rec.items()})
    row["hybrid_over_recurrent"] = hyb["req_s"] / rec["req_s"]
    if hyb.get("peak_GiB") and rec.get("peak_GiB"):
        row["peak_ratio"] = hyb["peak_GiB"] / rec["peak_GiB"]
    row["speed_target"] = SPEED_TARGET.get(kind)
    row["peak_target"] = PEAK_TARGET.get(kind)
    return row


def hybrid_mixes(report, hyb: Harness, rec: Harness, words: list[str], counts: dict[str, int], length_scale: float,
                 gen_cap: int | None, device: str, rows: int, log: Callable[[str], None]) -> None:
    for name, docs in counts.items():
        if docs <= 0:
            continue
        mix = MIXES[name]
        requests = make_requests(mix, words, docs, length_scale, gen_cap=gen_cap)
        both = {}
        for h in (hyb, rec):
            p = run_requests(h, mix.kind, requests, device, rows)
            both[h.name] = dict(req_s=len(requests) / p.seconds, seconds=p.seconds, warmup_s=p.warmup_s,
                                peak_GiB=p.peak_GiB)
            log(f"{name}: {h.name} {len(requests)} requests in {p.seconds:.2f}s (first pass {p.warmup_s:.1f}s)")
        row = _pair(name, mix.kind, "req/s", both[hyb.name], both[rec.name])
        row.update(requests=len(requests), batch=rows)
        report.hybrid.append(row)


def _decode(h: Harness, B: int, prompt: int, steps: int, device: str, bw: float) -> dict:
    base = peak_reset(device)
    r = decode_row(h, B, prompt, steps, device, bw)
    working = working_peak(device, base)
    return dict(req_s=r["ours_tok_s"], ms=r["ours_ms"], graph_ms=r["ours_graph_ms"], best_ms=r["ours_best_ms"],
                floor_ms=r["floor_ms"], floor_ratio=r["ours_floor_ratio"], note=r.get("graph_note"),
                peak_GiB=None if working is None else gib(weight_bytes(h.model) + working))


def hybrid_decode(report, hyb: Harness, rec: Harness, batches: list[int], prompt: int, steps: int, device: str,
                  bw: float, log: Callable[[str], None]) -> None:
    for B in batches:
        row = _pair(f"decode B={B}", "decode", "tokens/s", _decode(hyb, B, prompt, steps, device, bw),
                    _decode(rec, B, prompt, steps, device, bw))
        row["B"] = B
        if B == DECODE_TARGET_BATCH:
            row["floor_target"] = DECODE_FLOOR_TARGET
        report.hybrid.append(row)
        log(f"decode B={B}: hybrid {row['hybrid_best_ms']:.3f} ms/token (floor {row['hybrid_floor_ms']:.3f}), "
            f"recurrent {row['recurrent_best_ms']:.3f}")


def hybrid_long(report, hyb: Harness, rec: Harness, lengths: list[int], chunk: int, device: str,
                log: Callable[[str], None]) -> None:
    if not is_cuda(device):
        report.hybrid.append(dict(work="long", kind="long", note="cuda only"))
        return
    first = {}
    for h in (hyb, rec):
        prefill_once(h.model, min(lengths[0], chunk), chunk, device)  # compile and tune, untimed
    for T in lengths:
        both = {}
        for h in (hyb, rec):
            r = prefill_once(h.model, T, chunk, device)
            peak = gib(weight_bytes(h.model)) + r["working_GiB"]
            first.setdefault(h.name, peak)
            both[h.name] = dict(req_s=r["tok_s"], seconds=r["prefill_s"], peak_GiB=peak,
                                peak_vs_first=peak / first[h.name])
        row = _pair(f"prefill {T // 1024}K", "long", "tokens/s", both[hyb.name], both[rec.name])
        row.update(length=T, chunk=chunk)
        if T == max(lengths):
            row["long_peak_target"] = LONG_PEAK_TARGET
        report.hybrid.append(row)
        log(f"long T={T}: hybrid {row['hybrid_req_s']:.0f} tok/s, recurrent {row['recurrent_req_s']:.0f} tok/s")
