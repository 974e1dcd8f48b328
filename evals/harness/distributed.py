"""Data-parallel evaluation under `torchrun --nproc-per-node N`: torch.distributed from torchrun's env vars.

Every rank loads the model on its own device (cuda:LOCAL_RANK, or the CPU with gloo) and runs the same
lm-eval pipeline. `DataParallelLM` splits each request list that lm-eval hands the model across the ranks,
computes its share and all-gathers the responses, so every rank ends up with every response in request order.

Why the model splits requests rather than letting lm-eval shard documents by `lm.rank`: lm-eval 0.4's
evaluator concatenates the ranks' per-sample metric lists rank by rank and only over the metric names rank 0
saw. That reorders samples (bootstrap stderrs change) and fails on tasks whose metric names vary by document,
as our NIAH tasks do (one metric per length, lengths interleaved). With the split inside the model, lm-eval
sees one process on every rank (as it does under tensor-parallel launchers), its scoring code is the single
process code, and only rank 0 gets results back from `simple_evaluate` and writes them.
"""
from __future__ import annotations

import hashlib
import heapq
import logging
import os
import pickle
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
from lm_eval.api.model import LM

log = logging.getLogger(__name__)

# A rank waits for the others at the end of every request list; shares of a long NIAH task can finish hours
# apart on unlucky splits, far past torch's 10-minute default.
TIMEOUT = timedelta(hours=int(os.environ.get("GDN2_DIST_TIMEOUT_HOURS", "12")))


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistEnv:
    """This process's place in a torchrun launch (RANK, WORLD_SIZE, LOCAL_RANK); one process without them."""
    try:
        rank, world, local = (int(os.environ.get(k, d)) for k, d in
                              (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")))
    except ValueError as err:
        raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({err}); launch with torchrun "
                         f"--nproc-per-node N or unset them") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} WORLD_SIZE={world} is not a valid launch; use torchrun --nproc-per-node N")
    return DistEnv(rank, world, local)


def is_main_process() -> bool:
    """True on rank 0 and in a plain single-process run: the process that writes results and prints."""
    return dist_env().is_main


def local_device(device: str | None) -> str | None:
    """The device of this rank: `cuda` (or nothing, with a GPU present) becomes cuda:LOCAL_RANK under torchrun."""
    env = dist_env()
    if env.world_size == 1 or not torch.cuda.is_available() or device not in (None, "cuda"):
        return device
    if env.local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK={env.local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                         f"use --nproc-per-node <= {torch.cuda.device_count()}")
    return f"cuda:{env.local_rank}"


def init(device: str | None = None) -> DistEnv:
    """Join the process group once (nccl for GPUs, gloo for the CPU); a no-op in a single process."""
    env = dist_env()
    if env.world_size > 1 and not dist.is_initialized():
        device = local_device(device) or "cpu"
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))  # nccl's object collectives stage on the current device
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=TIMEOUT)
    return env


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _active():
        dist.barrier()


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's tensor, stacked (scalars) or concatenated along dim 0, in rank order (accelerate's gather)."""
    if not _active():
        return tensor if tensor.dim() else tensor[None]
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable object, in rank order, on every rank."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's object in rank order on rank `dst`; None elsewhere (lm-eval's LM.gather_object contract)."""
    if not _active():
        return [obj]
    rank = dist.get_rank()
    out: list[Any] | None = [None] * dist.get_world_size() if rank == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


# ---- splitting requests ---------------------------------------------------------------------------------------
def split_by_cost(costs: list[int], groups: list[list[int]], world_size: int) -> list[list[int]]:
    """Request indices per rank: whole groups, costliest first, each to the least loaded rank (deterministic)."""
    order = sorted(range(len(groups)), key=lambda g: (-sum(costs[i] for i in groups[g]), groups[g][0]))
    loads = [(0, r) for r in range(world_size)]
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for g in order:
        load, r = heapq.heappop(loads)
        shares[r].extend(groups[g])
        heapq.heappush(loads, (load + sum(costs[i] for i in groups[g]), r))
    return [sorted(s) for s in shares]


def _request_key(args: tuple) -> str:
    return hashlib.sha256(repr(args).encode("utf-8", "surrogatepass")).hexdigest()


def _groups(method: str, requests: list) -> list[list[int]]:
    """Loglikelihood requests that share a context stay on one rank, so the backend prefills it once."""
    if method != "loglikelihood":
        return [[i] for i in range(len(requests))]
    by_context: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
        by_context.setdefault(req.args[0], []).append(i)
    return list(by_context.values())


class DataParallelLM(LM):
    """Wraps an lm-eval LM; each request list is split across the torchrun ranks and the responses gathered.

    To lm-eval it is one process (rank 0 of 1) on every rank; anything else (describe, set_bos, tok,
    progress) is the wrapped model's.
    """

    def __init__(self, lm: LM) -> None:
        super().__init__()
        self.lm = lm
        self.env = dist_env()

    def __getattr__(self, name: str) -> Any:
        if name == "lm":  # not set yet (unpickling, early errors): do not recurse
            raise AttributeError(name)
        return getattr(self.lm, name)

    @property
    def device(self):
        return self.lm.device

    def set_cache_hook(self, cache_hook) -> None:
        # the wrapped model writes each finished batch of its share into this rank's request cache
        super().set_cache_hook(cache_hook)
        self.lm.set_cache_hook(cache_hook)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list:
        return self._split("loglikelihood", requests)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list:
        return self._split("loglikelihood_rolling", requests)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list:
        return self._split("generate_until", requests)

    def _split(self, method: str, requests: list) -> list:
        run: Callable[[list], list] = getattr(self.lm, method)
        digest = hashlib.sha256("".join(_request_key(r.args) for r in requests).encode()).hexdigest()
        if len(set(all_gather_object(digest))) > 1:
            # The ranks' request caches disagree (a run killed mid-task); each rank computes what it lacks.
            log.warning("%s: ranks hold different cached requests; computing them without splitting", method)
            return run(requests)
        costs = [sum(len(a) for a in r.args if isinstance(a, str)) for r in requests]
        mine = split_by_cost(costs, _groups(method, requests), self.env.world_size)[self.env.rank]
        try:
            outcome: tuple = ("ok", list(zip(mine, run([requests[i] for i in mine]) if mine else [])))
        except Exception as err:  # noqa: BLE001 - raised on every rank below, instead of hanging the others
            outcome = ("error", _portable(err))
            local_error = err
        gathered = all_gather_object(outcome)
        errors = [o[1] for o in gathered if o[0] == "error"]
        if errors:
            # every rank raises the same exception type, so callers that handle one (a NaN check, an OOM)
            # take the same path on every rank and the ranks stay in step
            if outcome[0] == "error":
                raise local_error
            raise errors[0]
        out: list = [None] * len(requests)
        for _, pairs in gathered:
            for i, res in pairs:
                out[i] = res
        return out


def _portable(err: Exception) -> Exception:
    """`err` if it survives pickling (to reach the other ranks), else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001 - any unpicklable exception
        return RuntimeError(f"rank {dist_env().rank}: {type(err).__name__}: {err}")


def data_parallel(lm: LM) -> LM:
    """`lm` wrapped for a torchrun launch of several processes; `lm` itself in a single process."""
    return DataParallelLM(lm) if dist_env().world_size > 1 else lm
