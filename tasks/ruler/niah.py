"""RULER's needle-in-a-haystack samples, generated locally and sized to a token budget.

Recipe (NVIDIA/RULER scripts/data/synthetic/niah.py and synthetic.yaml): needles "One of the special magic
{values} for {key} is: {value}." hidden in a haystack, RULER's template and answer prefix (singular wording when
one value is asked for), 7-digit numbers or UUIDs as values, "adjective-noun" words (or UUIDs) as keys. Sizing
follows RULER HEAD: the prompt including the answer prefix, counted without special tokens, plus
`tokens_to_generate` must fit `max_seq_length`; we binary-search the number of haystack pieces (words or
distractor lines) so every prompt lands just under that budget. Needle depths come from RULER's grid of 40
evenly spaced depths; single-needle tasks walk that grid in shuffled blocks so depths are spread evenly over
the samples. Everything is drawn from a `random.Random` seeded by (seed, task, length): same seed, same samples.
"""
from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import Iterator

from gdn2.tokenizer import Tokenizer
from tasks.ruler import haystacks
from tasks.ruler.words import KEY_WORDS

NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
TEMPLATE = (
    "Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_v} afterwards.\n{context}\n"
    "What are all the special magic {type_v} for {query} mentioned in the provided text?"
)
ANSWER_PREFIX = " The special magic {type_v} for {query} mentioned in the provided text are"
DEPTHS = [int(round(100 * i / 39)) for i in range(40)]  # RULER: np.linspace(0, 100, 40), rounded
FIT_TOLERANCE = 0.02  # prompts land within 2% under the budget


@dataclass(frozen=True)
class NiahVariant:
    """One RULER NIAH task (scripts/synthetic.yaml)."""

    haystack: str  # "noise" | "essay" | "needle"
    key_type: str  # "words" | "uuids"
    value_type: str  # "numbers" | "uuids"
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    tokens_to_generate: int = 128


VARIANTS: dict[str, NiahVariant] = {
    "niah_single_1": NiahVariant("noise", "words", "numbers"),
    "niah_single_2": NiahVariant("essay", "words", "numbers"),
    "niah_single_3": NiahVariant("essay", "words", "uuids"),
    "niah_multikey_1": NiahVariant("essay", "words", "numbers", num_keys=4),
    "niah_multikey_2": NiahVariant("needle", "words", "numbers"),
    "niah_multikey_3": NiahVariant("needle", "uuids", "uuids"),
    "niah_multivalue": NiahVariant("essay", "words", "numbers", num_values=4),
    "niah_multiquery": NiahVariant("essay", "words", "numbers", num_queries=4),
}


def _random_item(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if kind == "words":
        return rng.choice(KEY_WORDS)
    raise ValueError(f"unknown needle type {kind!r}: expected numbers, uuids or words")


def _singular(text: str) -> str:
    # RULER's wording for a single expected answer
    for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        text = text.replace(old, new)
    return text


@dataclass
class _Draw:
    """Everything random about one sample, drawn before sizing so it does not depend on the tokenizer."""

    needles: list[str]
    answers: list[str]
    query: str
    depths: list[int]
    keys: set[str]


def _draw(variant: NiahVariant, rng: random.Random, depth_block: list[int], index: int) -> _Draw:
    num_keys = max(variant.num_keys, variant.num_queries)
    keys: list[str] = []
    while len(keys) < num_keys:  # distinct keys, so every query has one answer set
        key = _random_item(variant.key_type, rng)
        if key not in keys:
            keys.append(key)
    values = [[_random_item(variant.value_type, rng) for _ in range(variant.num_values)] for _ in keys]
    needles = [
        NEEDLE.format(type_v=variant.value_type, key=k, value=v) for k, vs in zip(keys, values) for v in vs
    ]
    rng.shuffle(needles)
    asked = sorted(rng.sample(range(num_keys), variant.num_queries))
    queries = [keys[i] for i in asked]
    query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
    if len(needles) == 1:
        depths = [depth_block[index % len(depth_block)]]
    else:
        depths = sorted(rng.sample(DEPTHS, len(needles)))
    return _Draw(needles, [v for i in asked for v in values[i]], query, depths, set(keys))


def _prompt_parts(variant: NiahVariant, query: str) -> tuple[str, str]:
    """(template with a {context} slot, answer prefix), singular when one value is asked for."""
    template, prefix = TEMPLATE, ANSWER_PREFIX
    type_v = variant.value_type
    if variant.num_queries * variant.num_values == 1:
        template, prefix, type_v = _singular(template), _singular(prefix), type_v[:-1]
    return (
        template.format(type_v=type_v, query=query, context="{context}"),
        prefix.format(type_v=type_v, query=query),
    )


def _fit(hay: haystacks.Haystack, draw: _Draw, template: str, prefix: str, budget: int) -> tuple[str, int]:
    """The longest prompt within `budget` tokens: estimate from prefix sums, correct with exact counts."""
    tok = hay.tokenizer

    def prompt(n: int) -> str:
        return template.format(context=hay.render(n, draw.needles, draw.depths)) + prefix

    fixed = len(tok.encode(prompt(0)))
    if fixed > budget:
        raise ValueError(
            f"the NIAH template and needles alone take {fixed} tokens, over the budget of {budget}: "
            "raise max_seq_lengths or lower tokens_to_generate"
        )
    best, best_len = 0, fixed  # n = 0 fits, checked above
    upper = len(hay.pieces) + 1  # smallest n known not to fit
    n = hay.max_pieces_within(budget - fixed)
    for _ in range(32):  # the interval (best, upper) shrinks every round; 1-3 rounds are typical
        length = len(tok.encode(prompt(n)))
        if length <= budget:
            best, best_len = max((best, best_len), (n, length))
        else:
            upper = min(upper, n)
        # secant step: scale the prefix-sum estimate by how far off it was for this n
        ratio = (length - fixed) / hay.cum[n] if hay.cum[n] and length > fixed else 1.0
        nxt = min(hay.max_pieces_within(int((budget - fixed) / ratio)), upper - 1)
        if length <= budget and nxt <= n:
            nxt = min(hay.max_pieces_within(hay.cum[n] + budget - length), upper - 1)
        if length > budget:
            nxt = min(nxt, n - 1)
        if nxt <= best:
            break
        n = nxt
    return prompt(best), best_len


class NiahGenerator:
    """Samples for one task; haystacks are built once per generator and shared by all lengths."""

    def __init__(
        self,
        task: str,
        tokenizer: Tokenizer,
        *,
        haystack: str | None = None,
        essay_dir: str | None = None,
        tokens_to_generate: int | None = None,
        seed: int = 42,
    ):
        if task not in VARIANTS:
            raise ValueError(f"unknown NIAH task {task!r}: expected one of {', '.join(VARIANTS)}")
        self.task, self.tokenizer, self.seed = task, tokenizer, seed
        self.variant = VARIANTS[task]
        self.haystack = haystack or self.variant.haystack
        if self.haystack not in ("noise", "essay", "needle"):
            raise ValueError(f"unknown haystack {self.haystack!r}: expected noise, essay or needle")
        ttg = self.variant.tokens_to_generate if tokens_to_generate is None else int(tokens_to_generate)
        self.tokens_to_generate = ttg
        self._essay_words = haystacks.read_essays(essay_dir or "") if self.haystack == "essay" else None
        self._shared: haystacks.Haystack | None = None

    def _haystack_for(self, budget: int, rng: random.Random, keys: set[str]) -> haystacks.Haystack:
        # Piece costs counted alone overestimate some tokenizers (a lone "\n" or leading space can cost an
        # extra token), so cover twice the budget to never run out of pieces.
        budget = 2 * budget + 64
        if self.haystack == "needle":  # fresh distractors per sample, never reusing a real key
            def line() -> str:
                key = _random_item(self.variant.key_type, rng)
                while key in keys:
                    key = _random_item(self.variant.key_type, rng)
                value = _random_item(self.variant.value_type, rng)
                return NEEDLE.format(type_v=self.variant.value_type, key=key, value=value)

            return haystacks.needle_haystack(self.tokenizer, line, budget)
        if self._shared is None or self._shared.cum[-1] < budget:
            if self.haystack == "noise":
                self._shared = haystacks.noise_haystack(self.tokenizer, budget)
            else:
                self._shared = haystacks.essay_haystack(self.tokenizer, self._essay_words or [], budget)
        return self._shared

    def samples(self, max_seq_length: int, num_samples: int) -> Iterator[dict]:
        """`num_samples` RULER records for one length: input (prompt incl. answer prefix), outputs, ..."""
        budget = int(max_seq_length) - self.tokens_to_generate
        if budget <= 0:
            raise ValueError(
                f"max_seq_length {max_seq_length} leaves no room after {self.tokens_to_generate} generated tokens"
            )
        rng = random.Random(f"{self.seed}|{self.task}|{max_seq_length}")
        depth_block: list[int] = []
        for index in range(num_samples):
            if index % len(DEPTHS) == 0:
                depth_block = rng.sample(DEPTHS, len(DEPTHS))
            draw = _draw(self.variant, rng, depth_block, index)
            template, prefix = _prompt_parts(self.variant, draw.query)
            hay_rng = random.Random(f"{self.seed}|{self.task}|{max_seq_length}|{index}|haystack")
            hay = self._haystack_for(budget, hay_rng, draw.keys)
            text, length = _fit(hay, draw, template, prefix, budget)
            yield {
                "index": index,
                "input": text,
                "outputs": draw.answers,
                "length": length + self.tokens_to_generate,
                "max_length": int(max_seq_length),
                "gen_prefix": prefix.strip(),
                "query": draw.query,
                "depths": draw.depths,
                "haystack": self.haystack,
            }
