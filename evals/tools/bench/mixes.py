"""The `mixes` section: requests/s per mix, each harness at its best batch size, against the compute floor.

Every loglikelihood mix is run at each batch size of a sweep (ours and the anchor separately); each batch size gets
an untimed first pass (compiles and tunes that batch's kernel shapes) and a timed second pass; the best timed pass
is reported with the batch that gave it. Generation mixes run at one batch each (ours: --batch-size, the anchor:
the mix's recorded batch).

Compute floor of a loglikelihood mix (`compute_floor_s`): the matmul FLOPs the work needs, over the dense matmul
rate measured in the same run (common.matmul_rate, in the run's dtype):
    2 x body parameters x (each distinct context once + each continuation but its last token)
  + 2 x lm_head parameters x (scored tokens)
Embedding lookups cost no FLOPs; attention and recurrence FLOPs (under 1% at gdn2_1.3B) are left out, so the floor
is a lower bound. `ours_over_floor` is ours' best timed seconds over it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from evals.tools.bench.common import peak_reset
from evals.tools.bench.harnesses import Harness, Pass, run_requests, write_profile
from evals.tools.bench.models import param_split
from evals.tools.bench.workload import MIXES, Mix, make_requests, needed_tokens


def sweep(h: Harness, mix: Mix, requests: list, device: str, batches: list[int], log: Callable[[str], None],
          notes: list[str], rows: list[dict]) -> tuple[Pass | None, int | None]:
    """Time `h` at each batch size, appending one row per batch to `rows` as it goes: (the fastest pass, its
    batch). A best at the largest batch of a sweep is noted: a larger one might be faster still."""
    best, best_batch = None, None
    for b in batches:
        try:
            p = run_requests(h, mix.kind, requests, device, b)
        except torch.OutOfMemoryError as err:
            rows.append(dict(batch=b, note="out of memory"))
            notes.append(f"{h.name} {mix.name} batch {b}: {str(err)[:160]}")
            peak_reset(device)
            log(f"{mix.name}: {h.name} batch {b}: out of memory")
            continue
        rows.append(dict(batch=b, seconds=p.seconds, req_s=len(requests) / p.seconds, warmup_s=p.warmup_s,
                         peak_GiB=p.peak_GiB))
        log(f"{mix.name}: {h.name} batch {b}: {len(requests)} requests in {p.seconds:.2f}s "
            f"({len(requests) / p.seconds:.1f}/s; first pass {p.warmup_s:.1f}s)")
        if best is None or p.seconds < best.seconds:
            best, best_batch = p, b
    if len(batches) > 1 and best_batch == max(batches):
        notes.append(f"{h.name} {mix.name}: fastest at the largest batch swept ({best_batch}); a larger one may be "
                     "faster still")
    return best, best_batch


def compute_floor(model, requests: list, flops_per_s: float) -> dict:
    """The FLOP floor of scoring `requests` (see the module docstring)."""
    params, tokens = param_split(model), needed_tokens(requests)
    flops = 2 * params["body"] * tokens["body"] + 2 * params["head"] * tokens["head"]
    return dict(floor_tokens=tokens["body"], floor_naive_tokens=tokens["naive"], floor_flops=flops,
                compute_floor_s=flops / flops_per_s)


def compare_loglikelihoods(mix: Mix, ours: list, anchor: list, requests: list) -> dict:
    """Max |d ll| (also relative to the anchor's |ll|: a sum of many tokens carries each token's rounding) and
    agreement of the per-document decision (argmax choice, or greedy match for one continuation)."""
    diff = max(abs(a[0] - b[0]) for a, b in zip(ours, anchor))
    rel = max(abs(a[0] - b[0]) / max(abs(b[0]), 1e-9) for a, b in zip(ours, anchor))
    return dict(max_abs_ll_diff=diff, max_rel_ll_diff=rel,
                **{f"acc_{k}": v for k, v in accuracies(mix, ours, anchor, requests).items()})


def accuracies(mix: Mix, ours: list, anchor: list, requests: list) -> dict:
    def decisions(res):
        if mix.choices == 1:
            return [bool(r[1]) for r in res]
        by_doc: dict[int, list[float]] = {}
        for req, r in zip(requests, res):
            by_doc.setdefault(req.doc["doc"], []).append(r[0])
        return [max(range(len(v)), key=v.__getitem__) for _, v in sorted(by_doc.items())]

    mine, theirs = decisions(ours), decisions(anchor)
    label = lambda d: d if mix.choices == 1 else d == 0  # noqa: E731  (choice 0 plays the gold answer)
    n = len(mine)
    return dict(ours=sum(map(bool, map(label, mine))) / n, anchor=sum(map(bool, map(label, theirs))) / n,
                agree=sum(a == b for a, b in zip(mine, theirs)) / n)


def bench_mixes(report, ours: Harness, anchor: Harness | None, anchor_why: str | None, words: list[str],
                counts: dict[str, int], length_scale: float, gen_cap: int | None, device: str,
                ours_batches: list[int], anchor_batches: list[int], gen_batch: int, flops_per_s: float,
                log: Callable[[str], None], profile_dir: str | None = None) -> None:
    if any(docs > 0 and MIXES[n].kind == "loglikelihood" for n, docs in counts.items()):
        p = param_split(ours.model)
        report.notes.append(
            f"compute floor (floor s) = (2 x {p['body'] / 1e6:.1f}M block params x (each distinct context once + "
            f"each continuation but its last token) + 2 x {p['head'] / 1e6:.1f}M lm_head params x scored tokens) / "
            f"the {flops_per_s / 1e12:.3g} TFLOP/s of dense matmuls measured in this run, this dtype; embeddings "
            "cost none, "
            "attention and recurrence FLOPs are left out (a lower bound)")
    for name, docs in counts.items():
        if docs <= 0:
            continue
        mix = MIXES[name]
        ll = mix.kind == "loglikelihood"
        requests = make_requests(mix, words, docs, length_scale, gen_cap=gen_cap)
        row: dict[str, Any] = dict(mix=name, kind=mix.kind, docs=docs, requests=len(requests), about=mix.about,
                                   ours_sweep=[], anchor="not measured (the run stopped first)")
        report.mixes.append(row)  # filled in as the sweeps go: a stopped run keeps what it measured
        best, batch = sweep(ours, mix, requests, device, ours_batches if ll else [gen_batch], log, report.notes,
                            row["ours_sweep"])
        if best is None:
            row["ours"] = "out of memory"
            continue
        row.update(ours_s=best.seconds, ours_req_s=len(requests) / best.seconds, ours_best_batch=batch,
                   ours_peak_GiB=best.peak_GiB, ours_warmup_s=best.warmup_s)
        if profile_dir:
            ours.set_batch(batch)
            write_profile(lambda: ours.lm.loglikelihood(requests, disable_tqdm=True) if ll else
                          ours.lm.generate_until(requests, disable_tqdm=True), device,
                          Path(profile_dir) / f"profile-{name}.txt")
        if ll:
            row.update(compute_floor(ours.model, requests, flops_per_s))
            row["ours_over_floor"] = best.seconds / row["compute_floor_s"]
            row["ratio_target"] = mix.ratio_target
        log(f"{name}: ours best {row['ours_req_s']:.1f} req/s (batch {batch})")
        if anchor is None:
            row["anchor"] = anchor_why.split(" (")[0]
        else:
            row["anchor_sweep"] = []
            theirs, abatch = sweep(anchor, mix, requests, device, anchor_batches if ll else [mix.anchor_batch], log,
                                   report.notes, row["anchor_sweep"])
            del row["anchor"]
            if theirs is None:
                row["anchor"] = "out of memory"
            else:
                row.update(anchor_s=theirs.seconds, anchor_req_s=len(requests) / theirs.seconds,
                           anchor_best_batch=abatch, anchor_peak_GiB=theirs.peak_GiB,
                           anchor_warmup_s=theirs.warmup_s, ratio=theirs.seconds / best.seconds)
                if ll:
                    row.update(compare_loglikelihoods(mix, best.outputs, theirs.outputs, requests))
                else:
                    row["same_text"] = sum(a == b for a, b in zip(best.outputs, theirs.outputs)) / len(requests)
        if ll and "acc_ours" not in row:
            row["acc_ours"] = accuracies(mix, best.outputs, best.outputs, requests)["ours"]
        log(f"{name}: done")
