"""The lm-eval backend "gdn2": a TemplateLM over the GDN-2 model's explicit recurrent state.

    lm_eval --model gdn2 --model_args pretrained=PATH,bos=true,dtype=bfloat16 --include_path tasks --tasks ...

(`pretrained=` and `checkpoint=` are the same argument; lm-eval names its output folder after `pretrained`.
GDN2LM.MODEL_ARGS lists the accepted model args; any other is refused, naming them.)

What a recurrent model buys, and how it is used here:
  - loglikelihood: requests that share a context are grouped; the context is prefilled once, its state is
    repeated once per continuation, and all continuations are scored from it in one ragged batch.
  - loglikelihood_rolling: the whole document is consumed in bounded chunks that carry the state; no windows.
  - generate_until: contexts are prefilled in ragged batches, then decoded greedily with model.step, replayed
    from a CUDA graph on GPUs (gdn2.generate); stop strings are checked on the last few tokens only.
Padding never enters a state (ragged rows go through lengths), nothing is truncated by default, and requests are
sorted by length and batched under a token budget; results come back in request order.
"""
from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from evals.harness import guards
from evals.harness.lm_eval_compat import encode_pair_texts
from gdn2.generate import StepperCache, greedy_blocks
from gdn2.model import GPT
from gdn2.tokenizer import Tokenizer

log = logging.getLogger("gdn2")

BOS_VALUES = {"auto": None, "true": True, "bos": True, "1": True, "yes": True,
              "false": False, "none": False, "0": False, "no": False}


def _as_bool(x: Any) -> bool:
    return str(x).lower() in ("1", "true", "yes", "on")


@dataclass
class Batching:
    batch_size: int = 32  # rows per forward
    max_batch_tokens: int = 65536  # rows x padded length per forward
    rolling_chunk: int = 4096  # columns per pass when scoring whole documents
    max_gen_toks: int = 256


@dataclass
class Progress:
    """Counts tokens and requests of each request list lm-eval hands the model.

    Our CLI points `start_hook` (total requests of the list starting) and `hook` (requests done, tokens consumed)
    at its own bars; with no hook set (lm-eval's CLI), `start` opens a tqdm bar instead, lm-eval's habit, unless
    the caller passed disable_tqdm (or TQDM_DISABLE is set).
    """

    hook: Callable[[int, int], None] | None = None  # (requests done, tokens consumed)
    start_hook: Callable[[int], None] | None = None  # (total requests of the list that starts)
    tokens: int = 0
    requests: int = 0
    log: list = field(default_factory=list)
    bar: Any = None  # the tqdm bar of the list in flight, when no hook is set
    bar_tokens0: int = 0  # tokens counted when that bar opened (for its tok/s)

    def start(self, total: int, desc: str, disable: bool = False) -> None:
        self.finish()
        if self.start_hook:
            self.start_hook(total)
        elif self.hook is None and not disable:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="req")
            self.bar_tokens0 = self.tokens

    def update(self, requests: int, tokens: int) -> None:
        self.requests += requests
        self.tokens += tokens
        if self.hook:
            self.hook(requests, tokens)
        if self.bar is not None:
            elapsed = self.bar.format_dict.get("elapsed") or 0.0
            if elapsed > 0:
                self.bar.set_postfix_str(f"{(self.tokens - self.bar_tokens0) / elapsed:,.0f} tok/s", refresh=False)
            self.bar.update(requests)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    @contextmanager
    def running(self, total: int, desc: str, disable: bool = False) -> Iterator[None]:
        """start(...) around one request list, closing its bar however the list ends."""
        self.start(total, desc, disable)
        try:
            yield
        finally:
            self.finish()


DEFAULT_BATCH_SIZE = 32
AUTO_BATCH_LIMIT = 1024  # batch_size=auto probes up to this many rows unless max_batch_size says otherwise


def unknown_model_args_message(unknown: list[str], valid: tuple[str, ...]) -> str:
    """One line naming the unknown model args, the closest valid names and all valid ones."""
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, valid, n=1)
        hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return (f"unknown gdn2 model arg{'s' if len(unknown) > 1 else ''} {', '.join(hints)}: valid --model_args are "
            f"{', '.join(valid)}")


@register_model("gdn2")
class GDN2LM(TemplateLM):
    """lm-eval LM over a GDN-2 family model (GDN-2, KDA, Gated DeltaNet, hybrids)."""

    # Every name --model_args may set (`model` is Python-only: a GPT instance). batch_size, max_batch_size and
    # device also come from lm-eval's own --batch_size/--max_batch_size/--device; trust_remote_code from its
    # --trust_remote_code, which lm-eval adds to every model's args (no effect here: gdn2 runs no remote code).
    MODEL_ARGS = ("pretrained", "checkpoint", "tokenizer", "device", "dtype", "batch_size", "max_batch_size",
                  "max_batch_tokens", "max_gen_toks", "bos", "gate_mode", "preset", "backend", "prefill_chunk",
                  "cuda_graphs", "trust_remote_code")

    @classmethod
    def check_model_args(cls, args: dict[str, Any] | list[str]) -> None:
        """Raise ValueError (one line, listing the valid names) for any name that is not a gdn2 model arg."""
        unknown = [k for k in args if k not in cls.MODEL_ARGS]
        if unknown:
            raise ValueError(unknown_model_args_message(unknown, cls.MODEL_ARGS))

    def __init__(
        self,
        checkpoint: str | None = None,
        *,
        pretrained: str | None = None,
        model: GPT | None = None,
        tokenizer: Tokenizer | str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        max_batch_size: int | None = None,
        max_batch_tokens: int = 65536,
        max_gen_toks: int = 256,
        bos: str | bool = "auto",
        gate_mode: str = "full",
        preset: str | None = None,
        backend: str = "auto",
        prefill_chunk: int = 16384,
        cuda_graphs: bool | str = True,
        trust_remote_code: bool | str = False,
        **unknown: Any,
    ) -> None:
        super().__init__()
        self.check_model_args(list(unknown))
        if pretrained is not None and checkpoint is not None and str(pretrained) != str(checkpoint):
            raise ValueError(f"checkpoint={checkpoint} and pretrained={pretrained} name two checkpoints: "
                             f"pass one of them (they are the same argument)")
        checkpoint = checkpoint if checkpoint is not None else pretrained
        rows, auto = _batch_size_arg(batch_size)
        if max_batch_size is not None and not (str(max_batch_size).isdigit() and int(max_batch_size) > 0):
            raise ValueError(f"max_batch_size={max_batch_size}: use a positive integer (the most rows "
                             f"batch_size=auto tries)")
        self.loaded = None
        if model is None:
            if checkpoint is None:
                raise ValueError("gdn2 needs pretrained=PATH_OR_NAME (or checkpoint=) in --model_args "
                                 "(see `run_eval.py list`)")
            from gdn2.checkpoint import load_checkpoint

            if device and device.startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's CLI asks for cuda by default; follow HFLM and fall back
                log.warning("device %s is not available: using cpu", device)
                device = "cpu"
            self.loaded = load_checkpoint(
                checkpoint, preset=preset, device=device or _default_device(), dtype=_dtype(dtype, device),
                gate_mode=gate_mode, tokenizer=tokenizer if isinstance(tokenizer, str) else None,
            )
            model, tok = self.loaded.model, self.loaded.tokenizer
            if tok is None:
                raise ValueError(f"no tokenizer for {checkpoint}: pass tokenizer=PATH in --model_args")
            tokenizer = tok
        elif isinstance(tokenizer, str) or tokenizer is None:
            from gdn2.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(tokenizer or "byte")
        self.model = model.eval()
        self.recurrence_backend = backend  # kernels and prefill chunk, passed to every model call
        self._prefill_args = dict(backend=backend, chunk_tokens=int(prefill_chunk))
        self.cuda_graphs = _as_bool(cuda_graphs)
        self._stepper_cache: StepperCache | None = None
        self.tok: Tokenizer = tokenizer
        self._device = self.model.lm_head.weight.device
        self.batching = Batching(batch_size=rows, max_batch_tokens=int(max_batch_tokens),
                                 max_gen_toks=int(max_gen_toks))
        self.batch_sizes: dict[int, int] = {}  # lm-eval records these in results["config"]["batch_sizes"]
        if auto:
            self.batching.batch_size = self._auto_batch_size(str(batch_size), max_batch_size)
            self.batch_sizes[0] = self.batching.batch_size
        self.bos = self._resolve_bos(bos)
        self.progress = Progress()
        self._encoded: dict[str, list[int]] = {}  # texts encoded ahead, in one parallel batch (_encoded_ahead)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "GDN2LM":
        """lm-eval's constructor hook: --model_args win over the CLI's --device/--batch_size/--max_batch_size."""
        cls.check_model_args(arg_dict)
        extra = {k: v for k, v in (additional_config or {}).items()
                 if v is not None and k not in arg_dict and k in cls.MODEL_ARGS}  # lm-eval's other knobs: not ours
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "GDN2LM":
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ---- identity, recorded with every result ----------------------------------------------------------------------
    def _resolve_bos(self, bos: str | bool) -> bool:
        """BOS policy: true/bos (one BOS before every context), false/none, or auto (the checkpoint's default)."""
        value = str(bos).lower()
        if value not in BOS_VALUES:
            raise ValueError(f"bos={bos!r}: use bos=true (or bos), bos=false (or none) or bos=auto")
        wanted = BOS_VALUES[value]
        if wanted is None:
            policy = getattr(self.loaded, "bos_policy", None)
            wanted = policy == "bos" if policy else self.tok.bos_id is not None
        if wanted and self.tok.bos_id is None:
            raise ValueError(f"bos=true but tokenizer {self.tok.name} has no BOS token; use bos=false")
        return wanted

    def set_bos(self, bos: str | bool) -> None:
        """Switch the BOS policy between tasks (suites set it per task, as each paper table did)."""
        self.bos = self._resolve_bos(bos)

    def describe(self) -> dict:
        """What was evaluated and how: stored in every result's config."""
        info = {
            "bos": self.bos, "tokenizer": self.tok.name, "tokenizer_sha256": getattr(self.tok, "sha256", None),
            "gate_mode": self.model.config.gate_mode,
            "dtype": str(self.model.lm_head.weight.dtype).replace("torch.", ""), "device": str(self._device),
            "recurrence_backend": self.recurrence_backend, "batch_size": self.batching.batch_size,
            "max_batch_tokens": self.batching.max_batch_tokens, "model_config": self.model.config.to_dict(),
            "num_parameters": self.num_parameters,
        }
        if self.loaded is not None:
            info.update(checkpoint=str(self.loaded.path), format=self.loaded.format, sha256=self.loaded.sha256,
                        tokenizer_note=self.loaded.tokenizer_note, inferred=self.loaded.inferred)
        return info

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())  # tied weights counted once, as HF does

    @property
    def weight_files(self) -> list:
        """The checkpoint's weight files (empty for a model passed in): what a resume checks for changes."""
        return list(getattr(self.loaded, "weight_files", None) or [])

    def get_model_info(self) -> dict:
        """lm-eval's hook: merged into results["config"] as HFLM's are. model_sha is the weights' content hash
        (a checkpoint file has no hub commit); model_revision is None for the same reason."""
        info = self.describe()
        return {"model_num_parameters": info["num_parameters"], "model_dtype": str(self.model.lm_head.weight.dtype),
                "model_revision": None, "model_sha": info.get("sha256") or ""}

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        # An empty context is conditioned on BOS under the BOS policy, else on the document separator (EOS).
        return self.tok.bos_id if self.bos else self.tok.eos_id

    @property
    def max_length(self) -> int:
        return 1 << 30  # a recurrent state has no length limit; nothing is truncated

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        add_bos = self.bos if add_special_tokens is None else add_special_tokens
        ids = self._encoded.get(string)
        ids = self.tok.encode(string) if ids is None else ids
        return [self.tok.bos_id] + ids if add_bos and self.tok.bos_id is not None else ids

    @contextmanager
    def _encoded_ahead(self, texts: list[str]) -> Iterator[None]:
        """Within the block, tok_encode finds `texts` already encoded, in one batch call (parallel for the
        file-based tokenizers): lm-eval's per-request encoding then costs a lookup."""
        todo = list(dict.fromkeys(texts))
        self._encoded = dict(zip(todo, self.tok.encode_batch(todo)))
        try:
            yield
        finally:
            self._encoded = {}

    def _encode_many(self, texts: list[str], add_special_tokens: bool | None = None) -> list[list[int]]:
        """tok_encode of many texts, encoded in one batch."""
        with self._encoded_ahead(texts):
            return [self.tok_encode(t, add_special_tokens) for t in texts]

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tok.decode(tokens)

    # ---- batching helpers -------------------------------------------------------------------------------------
    def _batches(self, order: list[int], lengths: list[int]) -> list[list[int]]:
        """Consecutive groups of `order` (longest first) under the row and token budgets."""
        batches, cur, width = [], [], 0
        for i in order:
            w = max(width, lengths[i])
            if cur and (len(cur) >= self.batching.batch_size or w * (len(cur) + 1) > self.batching.max_batch_tokens):
                batches.append(cur)
                cur, w = [], lengths[i]
            cur.append(i)
            width = w
        if cur:
            batches.append(cur)
        return batches

    def _ragged(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded token rows on the device and their lengths on the host (the model's row bookkeeping is
        done there, so nothing waits on a read-back)."""
        width = max(len(s) for s in seqs)
        tokens = torch.tensor([s + [0] * (width - len(s)) for s in seqs], dtype=torch.long)
        return tokens.to(self._device), torch.tensor([len(s) for s in seqs])

    # ---- out of memory ------------------------------------------------------------------------------------------
    def _guarded(self, run: Callable[[list[int]], list], batch: list[int]) -> list:
        """run(batch), split in halves on GPU out-of-memory; later batches keep the smaller budget."""
        return guards.run_batch(run, batch, self._shrink_batch, describe=lambda i: f"batch item {i}")

    def _shrink_batch(self, fitted: int) -> None:
        self.batching.batch_size = max(1, min(self.batching.batch_size, fitted))
        self.batching.max_batch_tokens = max(1, self.batching.max_batch_tokens // 2)
        log.warning(
            "GPU out of memory: retrying with batch size %d and %d tokens per batch (set --batch-size to start there)",
            self.batching.batch_size, self.batching.max_batch_tokens)

    def _auto_batch_size(self, spec: str, limit: int | None) -> int:
        """batch_size=auto / auto:N: the most rows per forward that fit, found once by doubling on the GPU.

        lm-eval's auto:N re-probes N times during a run; here the out-of-memory guard lowers the size whenever a
        batch does not fit, so one probe serves the whole run.
        """
        if self._device.type != "cuda":
            log.warning("batch_size=%s: there is no GPU memory to probe on %s; using batch size %d", spec,
                        self._device, DEFAULT_BATCH_SIZE)
            return DEFAULT_BATCH_SIZE
        rows = largest_fitting(self._probe_rows, start=8, limit=int(limit or AUTO_BATCH_LIMIT))
        log.info("batch_size=%s: %d rows per forward fit on %s (%d tokens per batch)", spec, rows, self._device,
                 self.batching.max_batch_tokens)
        return rows

    @torch.no_grad()
    def _probe_rows(self, rows: int) -> None:
        """The heaviest forward a batch of `rows` rows runs under the token budget: a prefill with every
        position's logits and their fp32 log-softmax, as scoring does."""
        width = max(1, min(self.batching.max_batch_tokens // rows, self.batching.rolling_chunk))
        tokens = torch.zeros(rows, width, dtype=torch.long, device=self._device)
        logits, _ = self.model.prefill(tokens, lengths=torch.full((rows,), width), **self._prefill_args)
        F.log_softmax(logits.float(), -1)
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    # ---- loglikelihood ------------------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        # the texts lm-eval's _encode_pair will ask for (taken from it: lm_eval_compat), or the bare continuation
        # for an empty context, are encoded ahead in one batch
        texts = []
        for ctx, cont in (req.args for req in requests):
            texts += encode_pair_texts(ctx, cont) if ctx else [cont]
        with self._encoded_ahead(texts), self.progress.running(len(requests), "gdn2 loglikelihood",
                                                               self._quiet(disable_tqdm)):
            return super().loglikelihood(requests, disable_tqdm=True)  # lm-eval's tokenizing bar: noise next to ours

    def _quiet(self, disable_tqdm: bool) -> bool:
        """No bar of our own when asked, or off the main process (lm-eval's rank, or torchrun's RANK under
        evals.harness.distributed, where every rank runs one share of each request list)."""
        return bool(disable_tqdm) or self.rank != 0 or os.environ.get("RANK", "0") != "0"

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_, ctx, cont) in enumerate(requests):
            if not cont:
                raise ValueError(f"request {i} has an empty continuation; nothing to score")
            groups.setdefault(tuple(ctx), []).append(i)
        contexts = list(groups)
        lengths = [len(c) + max(len(requests[i][2]) for i in groups[c]) for c in contexts]
        order = sorted(range(len(contexts)), key=lambda j: (-lengths[j], contexts[j]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for batch in self._batches(order, lengths):
            ctxs = [list(contexts[j]) for j in batch]
            members = [groups[contexts[j]] for j in batch]
            scored = self._guarded(
                lambda b: self._score_batch([list(contexts[j]) for j in b], [groups[contexts[j]] for j in b],
                                            requests), batch)
            for idx, res in zip(sum(members, []), scored):
                guards.require_finite(res[0], guards.describe_request(requests[idx], idx))  # before it is cached
                results[idx] = res
                self.cache_hook.add_partial("loglikelihood", requests[idx][0], res)
            self.progress.update(sum(len(m) for m in members), sum(len(c) for c in ctxs))
        return results

    def _score_batch(self, ctxs, members, requests) -> list[tuple[float, bool]]:
        """Prefill each context once, repeat its state per continuation, score every continuation.

        Continuation j's first token is predicted by its context's last logits, the rest by feeding its tokens
        but the last from the context's state; log-probabilities and greedy checks of all continuations are
        gathered on the device at once and read back with one copy.
        """
        tokens, lengths = self._ragged(ctxs)
        last, state = self.model.prefill(tokens, lengths=lengths, logits="last", **self._prefill_args)
        conts = [requests[i][2] for m in members for i in m]
        row_of = [r for r, m in enumerate(members) for _ in m]
        targets, cont_len = self._ragged(conts)  # [N, L] continuation tokens, right-padded
        first = F.log_softmax(last.float(), -1)[torch.tensor(row_of, device=self._device)]  # [N, V]
        tok_ll = first.gather(-1, targets[:, :1])  # [N, L]: log-prob of every continuation token, 0 past the end
        greedy = first.argmax(-1) == targets[:, 0]
        tail = [j for j, c in enumerate(conts) if len(c) > 1]
        if tail:
            tail_rows = torch.tensor(tail, device=self._device)
            t_tok, t_len = targets[tail_rows, :-1], cont_len[tail] - 1  # fed after the context
            parent = torch.tensor([row_of[j] for j in tail], device=self._device)  # SWA rings read by reference
            logits, _ = self.model.prefill(t_tok, state, lengths=t_len, rows=parent, return_state=False,
                                           **self._prefill_args)
            logp = F.log_softmax(logits.float(), -1)  # position p predicts continuation token p + 1
            want = targets[tail_rows, 1:]
            valid = (torch.arange(want.shape[1])[None, :] < t_len[:, None]).to(self._device)
            tail_ll = torch.zeros(len(conts), want.shape[1], device=self._device)
            tail_ll[tail_rows] = logp.gather(-1, want[..., None])[..., 0].masked_fill(~valid, 0.0)
            tok_ll = torch.cat([tok_ll, tail_ll], dim=1)
            greedy = greedy.index_put((tail_rows,), greedy[tail_rows] & ((logp.argmax(-1) == want) | ~valid).all(1))
        # each score sums exactly its own tokens in fp32 (the padded width of the batch never enters the sum)
        sums = [torch.tensor(lps[: len(c)], dtype=torch.float32).sum().item() for lps, c in zip(tok_ll.tolist(), conts)]
        return list(zip(sums, greedy.tolist()))

    # ---- loglikelihood_rolling --------------------------------------------------------------------------------------
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of log-probabilities of every token of each document, conditioned on the prefix token only."""
        with self.progress.running(len(requests), "gdn2 loglikelihood_rolling", self._quiet(disable_tqdm)):
            return self._rolling_requests(requests)

    def _rolling_requests(self, requests) -> list[float]:
        docs = [[self.prefix_token_id] + ids
                for ids in self._encode_many([req.args[0] for req in requests], add_special_tokens=False)]
        order = sorted(range(len(docs)), key=lambda i: -len(docs[i]))
        out = [0.0] * len(docs)
        for batch in self._batches(order, [min(len(d), self.batching.rolling_chunk) for d in docs]):
            for i, ll in zip(batch, self._guarded(lambda b: self._rolling_batch([docs[i] for i in b]), batch)):
                guards.require_finite(ll, guards.describe_request(requests[i], i))  # before it is cached
                out[i] = ll
                self.cache_hook.add_partial("loglikelihood_rolling", requests[i].args, ll)
            self.progress.update(len(batch), sum(len(docs[i]) for i in batch))
        return out

    def _rolling_batch(self, docs: list[list[int]]) -> list[float]:
        """Walk the documents in column chunks, carrying the state; chunk c predicts tokens c0+1 .. c1."""
        tokens, lengths = self._ragged(docs)
        inputs_len = lengths - 1  # the last token is only a target
        state = self.model.new_state(len(docs), ring=int(inputs_len.max()))  # SWA rings no longer than the docs
        total = torch.zeros(len(docs), dtype=torch.float64, device=self._device)
        C = self.batching.rolling_chunk
        for c0 in range(0, int(inputs_len.max()), C):
            seg = (inputs_len - c0).clamp(0, C)
            rows = (seg > 0).nonzero().squeeze(-1)
            rows_dev = rows.to(self._device)
            sub = state.select(rows_dev)
            logits, sub = self.model.prefill(tokens[rows_dev, c0 : c0 + C], sub, lengths=seg[rows],
                                             **self._prefill_args)
            state.assign(rows_dev, sub)
            logp = F.log_softmax(logits.float(), -1)
            targets = tokens[rows_dev, c0 + 1 : c0 + 1 + logits.shape[1]]
            pad = logits.shape[1] - targets.shape[1]
            if pad:
                targets = F.pad(targets, (0, pad))
            tok_lp = logp.gather(-1, targets[..., None])[..., 0]
            mask = (torch.arange(logits.shape[1])[None, :] < seg[rows, None]).to(self._device)
            total.index_add_(0, rows_dev, (tok_lp * mask).sum(1).double())
        return total.tolist()

    # ---- generate_until -------------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        with self.progress.running(len(requests), "gdn2 generate_until", self._quiet(disable_tqdm)):
            return self._generate_requests(requests)

    def _generate_requests(self, requests) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        by_kwargs: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            by_kwargs.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        for idxs in by_kwargs.values():
            gen_kwargs = dict(requests[idxs[0]].args[1])
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", self.batching.max_gen_toks))
            if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature", 0.0) or 0.0) > 0:
                raise ValueError("gdn2 decodes greedily: set do_sample=false and temperature=0 in the task")
            ctxs = self._encode_many([requests[i].args[0] for i in idxs])
            order = sorted(range(len(idxs)), key=lambda j: (-len(ctxs[j]), j))
            for batch in self._batches(order, [len(c) + max_new for c in ctxs]):
                try:
                    texts = self._guarded(lambda b: self._greedy([ctxs[j] for j in b], until, max_new), batch)
                except guards.NonFiniteError as err:  # name the request the bad row belongs to
                    i = idxs[err.item]
                    raise guards.NonFiniteError(guards.nonfinite_message("NaN/inf logits",
                                                                         guards.describe_request(requests[i], i)))
                for j, text in zip(batch, texts):
                    out[idxs[j]] = text
                    self.cache_hook.add_partial("generate_until", requests[idxs[j]].args, text)
                self.progress.update(len(batch), sum(len(ctxs[j]) for j in batch))
        return out

    def _greedy(self, ctxs: list[list[int]], until: list[str], max_new: int) -> list[str]:
        tokens, lengths = self._ragged(ctxs)
        logits, state = self.model.prefill(tokens, lengths=lengths, logits="last", **self._prefill_args)
        B = len(ctxs)
        generated: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        stops = StopStrings([s for s in until if s], self.tok)
        for block, nonfinite in greedy_blocks(self.model, logits, state, max_new, self._steppers()):
            for r in range(B):
                for t, bad in zip(block[r].tolist(), nonfinite[r].tolist()):
                    if done[r]:
                        break
                    if bad:
                        raise guards.NonFiniteError("NaN/inf logits while generating", row=r)
                    if t == self.tok.eos_id:
                        done[r] = True
                        break
                    generated[r].append(t)
                    done[r] = stops.found(generated[r])
            if all(done):
                break
        return [_cut(self.tok.decode(g), stops.stops) for g in generated]

    def _steppers(self) -> StepperCache:
        """Decode steppers (CUDA graphs on GPUs unless cuda_graphs=false), kept across batches."""
        if self._stepper_cache is None:
            self._stepper_cache = StepperCache(self.model, graphs=self._device.type == "cuda" and self.cuda_graphs,
                                              backend=self.recurrence_backend)
        return self._stepper_cache


class StopStrings:
    """Whether a generation has produced a stop string, looking only at its last few tokens.

    A stop that appears with the newest token lies within its bytes plus the stop's length before them, and every
    token holds at least one byte, so decoding the last len(stop bytes) + 1 tokens, plus a few for a character cut
    at the front, sees it: the check costs the same at every step instead of growing with the text.
    """

    MARGIN = 4  # a UTF-8 character has at most 4 bytes

    def __init__(self, stops: list[str], tok: Tokenizer) -> None:
        self.stops, self.tok = stops, tok
        self.window = max((len(s.encode()) for s in stops), default=0) + 1 + self.MARGIN

    def found(self, generated: list[int]) -> bool:
        if not self.stops:
            return False
        tail = self.tok.decode(generated[-self.window:])
        return any(s in tail for s in self.stops)


def _cut(text: str, stops: list[str]) -> str:
    """Text up to the earliest stop sequence (lm-eval's convention: the stop itself is not returned)."""
    for s in stops:
        text = text.split(s)[0]
    return text


def _batch_size_arg(value: int | str | None) -> tuple[int, bool]:
    """(rows, auto) from batch_size=N, auto or auto:N; anything else is refused with the accepted forms."""
    text = str(DEFAULT_BATCH_SIZE if value is None else value).strip().lower()
    if text == "auto" or (text.startswith("auto:") and text[5:].isdigit() and int(text[5:]) > 0):
        return DEFAULT_BATCH_SIZE, True
    if text.isdigit() and int(text) > 0:
        return int(text), False
    raise ValueError(f"batch_size={value}: use a positive integer, auto or auto:N")


def largest_fitting(fits: Callable[[int], None], start: int, limit: int) -> int:
    """The largest batch size from start, doubling up to limit, for which fits(size) runs without running out of
    GPU memory (halving below start when start itself does not fit); 1 must fit."""
    best, size = 0, max(1, min(start, limit))
    while size <= limit:
        if _oom(fits, size):
            break
        best, size = size, size * 2
    if best == 0:  # start did not fit: halve down
        size = max(1, min(start, limit)) // 2
        while size >= 1 and _oom(fits, size):
            size //= 2
        if size < 1:
            raise guards.GPUOutOfMemoryError("batch_size=auto: not even one row fits in GPU memory: use --dtype "
                                             "bfloat16, a smaller max_batch_tokens or prefill_chunk")
        return size
    if size > limit and best < limit and not _oom(fits, limit):  # doubling stepped over the limit: try it
        best = limit
    return best


def _oom(fits: Callable[[int], None], size: int) -> bool:
    """True when fits(size) ran out of GPU memory (the memory it took is released either way)."""
    failed = False
    try:
        fits(size)
    except torch.OutOfMemoryError:
        failed = True
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return failed


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype(name: str, device: str | None) -> torch.dtype | None:
    if name in ("auto", None):
        return torch.bfloat16 if (device or _default_device()).startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}
    if name not in table:
        raise ValueError(f"dtype={name!r}: use one of {', '.join(table)} or auto")
    return table[name]
