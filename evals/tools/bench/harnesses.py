"""The harnesses: our `gdn2` backend and the anchor (lm-eval's `hf` model on fla's KDAForCausalLM), and one timed
pass of a harness over a mix's requests."""
from __future__ import annotations

import io
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from evals.tools.bench.common import gib, is_cuda, peak_reset, sync, weight_bytes, working_peak


@dataclass
class Harness:
    name: str
    lm: Any  # an lm-eval LM
    model: Any  # the torch module behind it, for decode timing and the compute floor
    note: str = ""
    prefill_chunk: int = 16384  # ours: prefill columns per pass
    backend: str = "auto"  # ours: the kernels (GDN2LM's default), for the calls the benchmark makes itself

    def set_batch(self, rows: int) -> None:
        """Rows per forward for the next pass (ours: Batching.batch_size; HFLM: batch_size_per_gpu)."""
        if hasattr(self.lm, "batching"):
            self.lm.batching.batch_size = rows
        else:
            self.lm.batch_size_per_gpu = rows


def load_ours(folder: Path, device: str, dtype: str, batch_size: int, max_batch_tokens: int,
              prefill_chunk: int) -> Harness:
    """Our backend reading the fla KDA folder through load_checkpoint (the path a user's checkpoint takes)."""
    from evals.harness.backend import GDN2LM

    lm = GDN2LM(checkpoint=str(folder), device=device, dtype=dtype, bos="false", batch_size=batch_size,
                max_batch_tokens=max_batch_tokens, prefill_chunk=prefill_chunk)
    return Harness("ours", lm, lm.model, f"gdn2 backend, {max_batch_tokens} tokens per forward at most",
                   prefill_chunk)


def load_ours_model(name: str, model, tokenizer: Path, device: str, batch_size: int, max_batch_tokens: int,
                    prefill_chunk: int) -> Harness:
    """Our backend over a model built in this process (hybrids: no checkpoint format of theirs to write)."""
    from evals.harness.backend import GDN2LM

    lm = GDN2LM(model=model.to(device), tokenizer=str(tokenizer), device=device, bos="false",
                batch_size=batch_size, max_batch_tokens=max_batch_tokens, prefill_chunk=prefill_chunk)
    return Harness(name, lm, lm.model, f"{name}: gdn2 backend over {model.config.name}", prefill_chunk)


def anchor_available() -> str | None:
    """None when fla's KDA model class and transformers import, else why not."""
    try:
        import fla  # noqa: F401  registers fla's classes with transformers
        import transformers  # noqa: F401
        from fla.models import KDAForCausalLM  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (needs accelerate)
    except Exception as err:  # ImportError, or a broken install failing at import
        return f"not installed ({type(err).__name__}: {str(err)[:80]})"
    return None


def anchor_generate_warning(transformers: str | None, fla: str | None) -> str | None:
    """fla 0.6.0 reads the decoding cache from `past_key_values`; transformers 5.24 passes it as `cache`, so each
    cached step of Hugging Face generate sees only the newest token: the anchor's generations are then wrong."""
    def parse(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", v)[:2])

    if transformers and fla and parse(fla) <= (0, 6) and parse(transformers) >= (5, 24):
        return (f"WARNING: fla {fla} with transformers {transformers} decodes wrongly after the first token (cache "
                "passed as `cache=`): the anchor's generation and decode rows are not valid; use transformers < 5.24")
    return None


def load_anchor(folder: Path, device: str, dtype: torch.dtype, batch_size: int) -> Harness:
    """lm-eval's HFLM over fla's KDAForCausalLM read from the same folder."""
    import fla  # noqa: F401
    from fla.models import KDAForCausalLM
    from lm_eval.models.huggingface import HFLM
    from transformers import PreTrainedTokenizerFast

    try:
        model = KDAForCausalLM.from_pretrained(str(folder), dtype=dtype)
    except TypeError:  # transformers < 4.56 calls it torch_dtype
        model = KDAForCausalLM.from_pretrained(str(folder), torch_dtype=dtype)
    model = model.to(device).eval()
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    # max_length: the folder says 2^20 positions, said again so HFLM never truncates a needle prompt
    lm = HFLM(pretrained=model, backend="causal", tokenizer=tok, batch_size=batch_size, max_length=1 << 20,
              device=device)
    return Harness("anchor", lm, model, "lm-eval hf (HFLM) on fla KDAForCausalLM")


@dataclass
class Pass:
    """One harness's timed pass over a mix at one batch size."""

    outputs: list
    seconds: float  # the timed (second) pass
    warmup_s: float  # the first pass, which compiles and autotunes every kernel shape the mix needs
    peak_GiB: float | None  # the harness's weights + its working peak (other resident models not counted)
    working_GiB: float | None  # the peak beyond what was allocated before the pass


def run_requests(h: Harness, kind: str, requests: list, device: str, rows: int,
                 profile: Path | None = None) -> Pass:
    """Run the requests twice at `rows` per forward; the second pass is timed.

    The untimed first pass compiles and autotunes every kernel shape the mix needs (fla tunes per shape), as the
    recorded anchor's warm rerun did; its seconds are reported beside. With `profile`, a third pass runs under
    torch.profiler and its busiest operators are written there.
    """
    call = h.lm.loglikelihood if kind == "loglikelihood" else h.lm.generate_until
    h.set_batch(rows)
    sync(device)
    t0 = time.perf_counter()
    call(requests, disable_tqdm=True)
    sync(device)
    warmup = time.perf_counter() - t0
    base = peak_reset(device)
    sync(device)
    t0 = time.perf_counter()
    out = call(requests, disable_tqdm=True)
    sync(device)
    seconds, working = time.perf_counter() - t0, working_peak(device, base)
    if profile is not None:
        write_profile(lambda: call(requests, disable_tqdm=True), device, profile)
    peak = None if working is None else gib(weight_bytes(h.model) + working)
    return Pass(out, seconds, warmup, peak, None if working is None else gib(working))


def write_profile(fn: Callable[[], Any], device: str, path: Path) -> None:
    """Run fn under torch.profiler, then under cProfile; write wall time, summed device time, the top operators
    and the Python functions that hold the host longest (time waiting on the device shows as sync calls)."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if is_cuda(device) else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    kernels = [e for e in events if "CUDA" in str(getattr(e, "device_type", ""))]  # operators' rows repeat these
    busy = sum(e.self_device_time_total for e in kernels) / 1e6 if len(acts) > 1 else float("nan")
    sort = "self_device_time_total" if len(acts) > 1 else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    host = cProfile.Profile()
    host.runcall(fn)
    sync(device)
    stats = io.StringIO()
    pstats.Stats(host, stream=stats).sort_stats("tottime").print_stats(30)
    path.write_text(f"wall {wall:.3f}s (profiled)  device busy {busy:.3f}s  kernels launched "
                    f"{sum(e.count for e in kernels)}\n"
                    + events.table(sort_by=sort, row_limit=45, max_name_column_width=70) + "\n"
                    + stats.getvalue())
