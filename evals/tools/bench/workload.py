"""The request mixes: lm-eval Instances shaped like the paper's kinds of task, and the work each one needs."""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Mix:
    """Requests shaped like one kind of task (lengths in tokens of the word tokenizer)."""

    name: str
    kind: str  # "loglikelihood" or "generate_until"
    docs: int  # default documents: full size, so a timed pass lasts seconds rather than fixed costs
    context: tuple[int, int]
    choices: int = 1  # continuations per context
    continuation: tuple[int, int] = (1, 1)
    gen_tokens: int = 0
    anchor_batch: int = 32  # the anchor's batch for generation mixes (loglikelihood mixes sweep --anchor-batches)
    ratio_target: float | None = None  # issue 16: ours at its best >= this x the anchor's best
    about: str = ""


MIXES = {m.name: m for m in (
    Mix("mc", "loglikelihood", 1000, (100, 300), choices=4, continuation=(10, 30), ratio_target=4.0,
        about="multiple choice: 4 continuations of 10-30 tokens per 100-300 token context"),
    Mix("lambada", "loglikelihood", 2000, (60, 100), ratio_target=2.0,
        about="LAMBADA-style: ~80 token context, one-word continuation"),
    Mix("recall", "generate_until", 32, (1500, 2000), gen_tokens=48, anchor_batch=16,
        about="2K recall: 1500-2000 token context, greedy up to 48 tokens, until newline"),
    Mix("niah", "generate_until", 4, (4096, 16384), gen_tokens=32, anchor_batch=4,
        about="needle prompts: 4K-16K tokens, 32 generated tokens"),
)}


def parse_counts(text: str) -> dict[str, int]:
    """'mc=250,lambada=500' -> {'mc': 250, 'lambada': 500} (docs per mix; 0 skips a mix)."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, value = item.partition("=")
        if name not in MIXES or not value.strip().isdigit():
            raise ValueError(f"--counts item {item!r}: write NAME=DOCS with NAME one of {', '.join(MIXES)}")
        out[name] = int(value)
    return out


def make_requests(mix: Mix, words: list[str], docs: int, length_scale: float = 1.0, seed: int = 0,
                  gen_cap: int | None = None) -> list:
    """lm-eval Instances for `docs` documents of `mix`; context lengths are scaled by length_scale (>= 2 tokens),
    generated tokens capped at gen_cap."""
    from lm_eval.api.instance import Instance

    rng = random.Random(f"{mix.name}-{seed}")
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    scaled = lambda lo_hi: max(2, round(rng.randint(*lo_hi) * length_scale))  # noqa: E731
    out = []
    for d in range(docs):
        ctx = text(scaled(mix.context))
        if mix.kind == "loglikelihood":
            for c in range(mix.choices):
                cont = " " + text(rng.randint(*mix.continuation))
                out.append(Instance("loglikelihood", {"doc": d}, (ctx, cont), c, (mix.name, d, 1)))
        else:
            kw = dict(until=["\n"], max_gen_toks=min(mix.gen_tokens, gen_cap or mix.gen_tokens), do_sample=False,
                      temperature=0.0)
            out.append(Instance("generate_until", {"doc": d}, (ctx, kw), 0, (mix.name, d, 1)))
    return out


def needed_tokens(requests: list) -> dict[str, int]:
    """Tokens a loglikelihood pass must put through the model, counted as the word tokenizer splits (one token per
    word, no BOS):

    - `body`: every distinct context once (continuations of one context share its state) plus each continuation's
      tokens but its last (the last token's own next-token distribution is never needed);
    - `head`: one lm_head row per scored token (each continuation token is predicted once);
    - `naive`: what a harness that re-reads the context for every continuation feeds (context + continuation - 1
      per request), for comparison.
    """
    contexts = {r.args[0] for r in requests}
    conts = [len(r.args[1].split()) for r in requests]
    ctx_tokens = sum(len(c.split()) for c in contexts)
    body = ctx_tokens + sum(n - 1 for n in conts)
    naive = sum(len(r.args[0].split()) + n - 1 for r, n in zip(requests, conts))
    return dict(body=body, head=sum(conts), naive=naive, contexts=len(contexts))
