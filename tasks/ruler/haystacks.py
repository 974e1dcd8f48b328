"""Haystacks of sizing "tight" (this harness's earlier generator), as token-costed pieces to size a prompt with.

A haystack is a list of pieces (words for "essay" and "noise", distractor lines for "needle"), each with the
separator that precedes it and its token count under the evaluated tokenizer. Prefix sums of those counts let
the generator binary-search the number of pieces for a token budget without re-encoding the whole prompt; one
exact encode per sample then corrects the estimate. Needles go at sentence starts (essay) or line starts
(noise, needle), as in RULER.
"""
from __future__ import annotations

import itertools
import re
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Callable

from gdn2.tokenizer import Tokenizer

# RULER's noise haystack: one passage per line.
NOISE_PASSAGE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")


@dataclass
class Haystack:
    """Pieces with separators, token costs and the piece indices where a needle may start."""

    tokenizer: Tokenizer
    joiner: str  # separator placed around inserted needles
    pieces: list[str] = field(default_factory=list)
    seps: list[str] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # indices of pieces that begin a sentence/line
    cum: list[int] = field(default_factory=lambda: [0])  # cum[n] = tokens of the first n pieces
    _cost_cache: dict[str, int] = field(default_factory=dict)

    def add(self, piece: str, sep: str, starts_sentence: bool) -> None:
        key = sep + piece
        cost = self._cost_cache.get(key)
        if cost is None:
            cost = self._cost_cache[key] = len(self.tokenizer.encode(key))
        if starts_sentence:
            self.starts.append(len(self.pieces))
        self.pieces.append(piece)
        self.seps.append(sep)
        self.cum.append(self.cum[-1] + cost)

    def max_pieces_within(self, tokens: int) -> int:
        """Largest n with cum[n] <= tokens (binary search over the prefix sums)."""
        return max(0, bisect_right(self.cum, tokens) - 1)

    def render(self, n: int, needles: list[str], depths: list[int]) -> str:
        """The first n pieces with `needles[i]` at `depths[i]` percent of the sentence starts."""
        starts = self.starts[: bisect_right(self.starts, n - 1)] if n else []
        slots = [
            starts[k] if k < len(starts) else n
            for k in (int(len(starts) * d / 100) for d in depths)
        ]
        inserts = sorted(zip(slots, range(len(needles))))
        out: list[str] = []
        j = 0
        for i in range(n + 1):
            while j < len(inserts) and inserts[j][0] == i:
                out.append((self.joiner if out else "") + needles[inserts[j][1]])
                j += 1
            if i < n:
                out.append((self.seps[i] if out else "") + self.pieces[i])
        return "".join(out)


def word_haystack(tokenizer: Tokenizer, words: list[str], line_starts: set[int], min_tokens: int) -> Haystack:
    """Words, cycled until they cover `min_tokens`; needles go at line starts if any, else sentence starts."""
    hay = Haystack(tokenizer, joiner="\n" if line_starts else " ")
    prev = ""
    for i, word in zip(itertools.count(), itertools.cycle(words)):
        if hay.cum[-1] >= min_tokens and i % len(words) == 0:
            break
        in_text = i % len(words)
        new_line = in_text in line_starts
        # lines (noise) or sentences (essay) are where RULER puts needles
        sentence_start = i == 0 or new_line if line_starts else i == 0 or bool(_SENTENCE_END.search(prev))
        hay.add(word, "\n" if new_line and i else " ", sentence_start)
        prev = word
    return hay


def noise_haystack(tokenizer: Tokenizer, min_tokens: int) -> Haystack:
    words = NOISE_PASSAGE.split(" ")
    # one passage per line; a cycle of the word list is one passage, so line starts are index 0
    return word_haystack(tokenizer, words, {0}, min_tokens)


def essay_haystack(tokenizer: Tokenizer, words: list[str], min_tokens: int) -> Haystack:
    return word_haystack(tokenizer, words, set(), min_tokens)


def needle_haystack(tokenizer: Tokenizer, make_line: Callable[[], str], min_tokens: int) -> Haystack:
    """Distractor needles, one per line, generated until they cover `min_tokens`."""
    hay = Haystack(tokenizer, joiner="\n")
    while hay.cum[-1] < min_tokens:
        hay.add(make_line(), "\n", True)
    return hay
