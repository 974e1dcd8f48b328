"""RULER's needle keys: the sorted set of f"{adjective}-{noun}" over the `wonderwords` package's word lists.

RULER (scripts/data/synthetic/niah.py) builds that list in full, about 6.2 million strings (8 s and ~0.6 GB),
and draws keys with `random.choice(words)`. `KeyWords` is the same sorted sequence without building it: since
`random.choice(seq)` only reads `len(seq)` and `seq[i]`, drawing from it with a seeded `random.Random` gives
RULER's keys exactly.

Why the order can be computed: two keys "A-x" and "B-y" whose adjectives have prefixes "A-" and "B-" that are
not prefixes of one another compare as "A-" and "B-" do. Adjectives whose "A-" is a prefix of another's (only
"blue" and "blue-eyed" style pairs, a handful) form a family whose keys interleave; a family's few thousand
keys are sorted explicitly, every other adjective's block is the sorted noun list behind a fixed prefix.
"""
from __future__ import annotations

import functools
from bisect import bisect_right
from collections.abc import Sequence
from importlib import resources


def wonderwords_list(name: str) -> list[str]:
    """One word list shipped by `wonderwords` (e.g. "nounlist.txt"), read as wonderwords reads it."""
    try:
        files = resources.files("wonderwords") / "assets"  # a plain folder in older releases, a package in 3.x
    except ModuleNotFoundError as err:
        raise ImportError("RULER needle keys need the `wonderwords` package: pip install wonderwords") from err
    with files.joinpath(name).open("r") as f:
        return [line.rstrip() for line in f.readlines()]


class KeyWords(Sequence):
    """`sorted(set(f"{a}-{n}" for a in adjectives for n in nouns))`, indexed without being built."""

    def __init__(self, adjectives: Sequence[str], nouns: Sequence[str]):
        self._nouns = sorted(set(nouns))
        families: list[list[str]] = []
        for adj in sorted(set(adjectives), key=lambda a: a + "-"):
            # sorted by "adj-", a family's members follow its root directly
            if families and (adj + "-").startswith(families[-1][0] + "-"):
                families[-1].append(adj)
            else:
                families.append([adj])
        self._blocks: list[str | list[str]] = []  # a prefix "adj-" over all nouns, or a family's sorted keys
        self._offsets = [0]
        for family in families:
            if len(family) == 1:
                block: str | list[str] = family[0] + "-"
                size = len(self._nouns)
            else:
                block = sorted({f"{a}-{n}" for a in family for n in self._nouns})
                size = len(block)
            self._blocks.append(block)
            self._offsets.append(self._offsets[-1] + size)

    def __len__(self) -> int:
        return self._offsets[-1]

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("key index out of range")
        b = bisect_right(self._offsets, index) - 1
        block, i = self._blocks[b], index - self._offsets[b]
        return block + self._nouns[i] if isinstance(block, str) else block[i]


@functools.lru_cache(maxsize=1)
def ruler_keys() -> KeyWords:
    """RULER's key list from the installed wonderwords (3.0.1: 6,171,620 keys)."""
    return KeyWords(wonderwords_list("adjectivelist.txt"), wonderwords_list("nounlist.txt"))
