"""RULER's needle-in-a-haystack samples, generated locally and sized to a token budget in one of three ways.

Recipe (NVIDIA/RULER scripts/data/synthetic/niah.py and synthetic.yaml): needles "One of the special magic
{values} for {key} is: {value}." hidden in a haystack, RULER's template and answer prefix (singular wording when
one value is asked for), 7-digit numbers or UUIDs as values, keys drawn from `wonderwords`' adjective-noun
pairs (tasks/ruler/keys.py). The prompt including the answer prefix, counted without special tokens, plus
`tokens_to_generate` must fit `max_seq_length`.

Sizing (`sizing`; eval-protocol.md 2.2):
- "ruler": RULER HEAD (binary search since 2025-06-03). One freshly drawn sample per probe binary-searches the
  haystack size (essay words, noise or distractor lines); every sample is then drawn anew and, while it
  overshoots, loses a whole unit (500 essay words; 25 lines, or 5 below 4K tokens) and is drawn again. A sample
  whose key or value takes a token more than the probe's is therefore a unit short.
- "ruler-linear": RULER before 2025-06 (and lm-eval 0.4.13's own tasks): start at one unit and add units while
  a probe, counted with its answers appended, fits; step back one; then the same per-sample shrinking.
- "tight": this harness's own earlier generator: every sample filled to within 2% under the budget (essay and
  noise cut at the word), needles on the 40-depth grid walked in shuffled blocks.
"ruler" and "ruler-linear" draw every sample exactly as RULER does, from one `random.Random(seed)` stream per
task and length (RULER seeds 42 per task and length), so with RULER's tokenizer, essay text and sentence
splitter they give RULER's own samples.
"""
from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from gdn2.tokenizer import Tokenizer
from tasks.ruler import corpus, haystacks
from tasks.ruler.keys import ruler_keys

SIZINGS = ("ruler", "ruler-linear", "tight")
DEFAULT_SIZING = "ruler"
NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
TEMPLATE = (
    "Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_v} afterwards.\n{context}\n"
    "What are all the special magic {type_v} for {query} mentioned in the provided text?"
)
ANSWER_PREFIX = " The special magic {type_v} for {query} mentioned in the provided text are"
DEPTHS = [int(round(100 * i / 39)) for i in range(40)]  # RULER: np.round(np.linspace(0, 100, 40))
FIT_TOLERANCE = 0.02  # sizing "tight": prompts land within 2% under the budget
ESSAY_UNIT = 500  # RULER's haystack units (niah.py L214-222)
LINE_UNIT, SHORT_LINE_UNIT = 25, 5
MAX_RETRIES_AT_FLOOR = 100  # RULER retries forever at its smallest haystack; we give up with a clear error


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
    # the same draws from `rng` as RULER's generate_random
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if kind == "words":
        return rng.choice(ruler_keys())
    raise ValueError(f"unknown needle type {kind!r}: expected numbers, uuids or words")


def _singular(text: str) -> str:
    # RULER's wording for a single expected answer
    for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        text = text.replace(old, new)
    return text


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


def _joined_query(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def haystack_unit(haystack: str, max_seq_length: int) -> int:
    """RULER's sizing step: 500 essay words; 25 noise or distractor lines, 5 below 4096 tokens."""
    if haystack == "essay":
        return ESSAY_UNIT
    return SHORT_LINE_UNIT if max_seq_length < 4096 else LINE_UNIT


# ---- RULER's own samples (sizing "ruler" and "ruler-linear") ------------------------------------------------------
@dataclass
class _Sample:
    text: str  # the whole prompt, answer prefix included
    answers: list[str]
    query: str
    prefix: str
    depths: list[int]  # needle depths in percent of the haystack


class _RulerSampler:
    """RULER's generate_input_output: one sample with `n` haystack units, drawn from `rng` in RULER's order."""

    def __init__(self, variant: NiahVariant, haystack: str, words: Sequence[str], seed: int, repeat: bool = True):
        self.variant, self.haystack, self.words, self.seed = variant, haystack, words, seed
        self.repeat = repeat  # RULER HEAD repeats the essays as often as needed; before, they just ran out
        self._sentences: dict[int, list[str]] = {}  # essay sentences of the first n words, as RULER re-splits them

    def essay_sentences(self, n: int) -> list[str]:
        if n not in self._sentences:
            words = self.words
            if self.repeat and n > len(words):
                words = list(words) * -(-n // len(words))
            if len(self._sentences) > 64:
                self._sentences.clear()
            self._sentences[n] = corpus.split_sentences(" ".join(words[:n]).strip())
        return self._sentences[n]

    def __call__(self, n: int, rng: random.Random) -> _Sample:
        v = self.variant
        num_keys = max(v.num_keys, v.num_queries)
        keys, values, needles = [], [], []
        for _ in range(num_keys):
            keys.append(_random_item(v.key_type, rng))
            values.append([])
            for _ in range(v.num_values):
                values[-1].append(_random_item(v.value_type, rng))
                needles.append(NEEDLE.format(type_v=v.value_type, key=keys[-1], value=values[-1][-1]))
        random.Random(self.seed).shuffle(needles)  # RULER shuffles with a fresh generator of the task seed
        if self.haystack == "essay":
            sents = self.essay_sentences(n)
            depths = rng.sample(DEPTHS, len(needles))
            cuts = [0] + sorted(int(len(sents) * (d / 100)) for d in depths) + [len(sents)]
            parts: list[str] = []
            for i in range(1, len(cuts)):
                # an empty run of sentences still adds its " ": a needle at depth 0 starts with a space, one at
                # depth 100 ends with one (RULER's join)
                parts.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
                if i - 1 < len(needles):
                    parts.append(needles[i - 1])
            context = " ".join(parts)
        else:
            if self.haystack == "noise":
                lines = [haystacks.NOISE_PASSAGE] * n
            else:
                lines = [
                    NEEDLE.format(type_v=v.value_type, key=_random_item(v.key_type, rng),
                                  value=_random_item(v.value_type, rng))
                    for _ in range(n)
                ]
            # whole lines; a needle goes before line i (uniform), never after the last line
            at = sorted(rng.sample(range(n), len(needles)), reverse=True)
            for index, needle in zip(at, needles):
                lines.insert(index, needle)
            depths = [round(100 * i / n) for i in at]
            context = "\n".join(lines)
        asked = rng.sample(range(num_keys), v.num_queries)
        query = _joined_query([keys[i] for i in asked])
        template, prefix = _prompt_parts(v, query)
        return _Sample(template.replace("{context}", context) + prefix, [a for i in asked for a in values[i]],
                       query, prefix, sorted(depths))


def _binary_search(probe: Callable[[int], _Sample], count: Callable[[str], int], unit: int, max_len: int,
                   to_generate: int) -> int:
    """RULER HEAD's haystack size: the largest n whose one freshly drawn probe fits (niah.py L224-257)."""
    tokens_per_unit = count(probe(unit).text) / unit
    low, high = unit, max(int(max_len / tokens_per_unit * 3), 2 * unit)
    best = None
    while low <= high:
        mid = (low + high) // 2
        if count(probe(mid).text) + to_generate <= max_len:
            best, low = mid, mid + 1
        else:
            high = mid - 1
    return unit if best is None else best


def _linear_search(probe: Callable[[int], _Sample], count: Callable[[str], int], unit: int, max_len: int,
                   to_generate: int, cap: int | None) -> int:
    """RULER's size before 2025-06: grow by a unit while a probe with its answers appended fits, step back one."""
    n, total = unit, 0
    while total + to_generate < max_len:
        sample = probe(n)
        total = count(sample.text + " ".join(sample.answers))
        if total + to_generate > max_len:
            return n - unit
        if cap is not None and n > cap:  # the essays ran out: RULER then stops at their length
            return cap
        n += unit
    return n


# ---- this harness's earlier generator (sizing "tight") ------------------------------------------------------------
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


def _fit(hay: haystacks.Haystack, draw: _Draw, template: str, prefix: str, budget: int) -> tuple[str, int, int]:
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
    return prompt(best), best_len, best


class NiahGenerator:
    """Samples for one task at any length; the essay corpus is read once per generator."""

    def __init__(
        self,
        task: str,
        tokenizer: Tokenizer,
        *,
        haystack: str | None = None,
        essay_dir: str | None = None,
        tokens_to_generate: int | None = None,
        seed: int = 42,
        sizing: str = DEFAULT_SIZING,
    ):
        if task not in VARIANTS:
            raise ValueError(f"unknown NIAH task {task!r}: expected one of {', '.join(VARIANTS)}")
        if sizing not in SIZINGS:
            raise ValueError(f"unknown sizing {sizing!r}: expected one of {', '.join(SIZINGS)} (tasks/README.md)")
        self.task, self.tokenizer, self.seed, self.sizing = task, tokenizer, seed, sizing
        self.variant = VARIANTS[task]
        self.haystack = haystack or self.variant.haystack
        if self.haystack not in ("noise", "essay", "needle"):
            raise ValueError(f"unknown haystack {self.haystack!r}: expected noise, essay or needle")
        ttg = self.variant.tokens_to_generate if tokens_to_generate is None else int(tokens_to_generate)
        self.tokens_to_generate = ttg
        self._words: Sequence[str] = corpus.essay_words(essay_dir or None) if self.haystack == "essay" else ()
        self._sampler = _RulerSampler(self.variant, self.haystack, self._words, seed, repeat=sizing == "ruler")
        self._shared: haystacks.Haystack | None = None

    def samples(self, max_seq_length: int, num_samples: int) -> Iterator[dict]:
        """`num_samples` RULER records for one length: input (prompt incl. answer prefix), outputs, ..."""
        max_seq_length = int(max_seq_length)
        if max_seq_length - self.tokens_to_generate <= 0:
            raise ValueError(
                f"max_seq_length {max_seq_length} leaves no room after {self.tokens_to_generate} generated tokens"
            )
        if self.sizing == "tight":
            return self._tight_samples(max_seq_length, num_samples)
        return self._ruler_samples(max_seq_length, num_samples)

    def _count(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def _too_small(self, max_seq_length: int, unit: int) -> ValueError:
        what = f"{unit} essay words" if self.haystack == "essay" else f"{unit} lines"
        return ValueError(
            f"ruler_{self.task} at max_seq_length {max_seq_length}: no sample fits the budget of "
            f"{max_seq_length - self.tokens_to_generate} tokens even with RULER's smallest haystack ({what}): "
            "raise max_seq_lengths, lower tokens_to_generate or use sizing=tight"
        )

    def _ruler_samples(self, max_seq_length: int, num_samples: int) -> Iterator[dict]:
        rng = random.Random(self.seed)  # RULER: random.seed(seed) at the start of each task x length
        unit = haystack_unit(self.haystack, max_seq_length)

        def probe(n: int) -> _Sample:
            return self._sampler(n, rng)

        ttg = self.tokens_to_generate
        if self.sizing == "ruler":
            size = _binary_search(probe, self._count, unit, max_seq_length, ttg)
        else:
            cap = len(self._words) if self.haystack == "essay" else None
            size = _linear_search(probe, self._count, unit, max_seq_length, ttg, cap)
        for index in range(num_samples):
            used, failures = size, 0
            while True:  # RULER: draw anew, a unit smaller each time it overshoots (never below one unit)
                try:
                    sample = self._sampler(used, rng)
                    length = self._count(sample.text) + ttg
                    if length <= max_seq_length:
                        break
                except ValueError:  # fewer lines than needles
                    pass
                if used > unit:
                    used -= unit
                else:
                    failures += 1
                    if failures >= MAX_RETRIES_AT_FLOOR:
                        raise self._too_small(max_seq_length, unit)
            yield self._record(index, sample.text, sample.answers, length, max_seq_length, sample.prefix,
                               sample.query, sample.depths, used, (size - used) // unit)

    def _record(self, index: int, text: str, answers: list[str], length: int, max_seq_length: int, prefix: str,
                query: str, depths: list[int], units: int, units_short: int) -> dict:
        return {
            "index": index,
            "input": text,
            "outputs": answers,
            "length": length,
            "max_length": max_seq_length,
            "gen_prefix": prefix.strip(),
            "query": query,
            "depths": depths,
            "haystack": self.haystack,
            "sizing": self.sizing,
            "haystack_size": units,  # essay words or haystack lines ("tight": pieces)
            "units_short": units_short,  # whole units below the searched size (RULER's per-sample shrinking)
            "sentence_splitter": corpus.sentence_splitter() if self.haystack == "essay" else "",
        }

    def _tight_haystack(self, budget: int, rng: random.Random, keys: set[str]) -> haystacks.Haystack:
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
                words = [w for w in self._words if w]
                self._shared = haystacks.essay_haystack(self.tokenizer, words, budget)
        return self._shared

    def _tight_samples(self, max_seq_length: int, num_samples: int) -> Iterator[dict]:
        budget = max_seq_length - self.tokens_to_generate
        rng = random.Random(f"{self.seed}|{self.task}|{max_seq_length}")
        depth_block: list[int] = []
        for index in range(num_samples):
            if index % len(DEPTHS) == 0:
                depth_block = rng.sample(DEPTHS, len(DEPTHS))
            draw = _draw(self.variant, rng, depth_block, index)
            template, prefix = _prompt_parts(self.variant, draw.query)
            hay_rng = random.Random(f"{self.seed}|{self.task}|{max_seq_length}|{index}|haystack")
            hay = self._tight_haystack(budget, hay_rng, draw.keys)
            text, length, pieces = _fit(hay, draw, template, prefix, budget)
            yield self._record(index, text, draw.answers, length + self.tokens_to_generate, max_seq_length,
                               prefix, draw.query, draw.depths, pieces, 0)
