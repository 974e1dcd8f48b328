"""The RULER needle generator: RULER's sizing (binary and linear), "tight" sizing, keys, haystacks and scoring."""
from __future__ import annotations

import random
import statistics
import uuid

import pytest

from gdn2.tokenizer import load_tokenizer
from tasks.ruler import corpus, niah, niah_utils
from tasks.ruler.haystacks import NOISE_PASSAGE
from tasks.ruler.keys import KeyWords, ruler_keys
from tasks.ruler.niah import FIT_TOLERANCE, NEEDLE, VARIANTS, NiahGenerator
from tests.tasks.conftest import ESSAY_DIR, LLAMA2, sizing_tokenizers

BYTE = load_tokenizer("byte")
SHARED_ESSAYS = LLAMA2.parents[1] / "paul_graham_essays"


def _samples(task: str, tok, length: int, n: int, **kw) -> list[dict]:
    return list(NiahGenerator(task, tok, essay_dir=str(ESSAY_DIR), **kw).samples(length, n))


@pytest.mark.parametrize("sizing", niah.SIZINGS)
@pytest.mark.parametrize("task", sorted(VARIANTS))
def test_same_seed_same_samples_other_seed_other_samples(task, sizing):
    a, b = _samples(task, BYTE, 4096, 4, sizing=sizing), _samples(task, BYTE, 4096, 4, sizing=sizing)
    assert a == b
    c = _samples(task, BYTE, 4096, 4, seed=7, sizing=sizing)
    assert [s["outputs"] for s in c] != [s["outputs"] for s in a]
    assert all(s["sizing"] == sizing for s in a)


# ---- sizing "ruler" / "ruler-linear": RULER's own algorithm --------------------------------------------------------
def _reference_ruler(task: str, tok, words: list[str], max_len: int, num: int, seed: int, linear: bool) -> list:
    """RULER's niah.py loop written out again from its description (eval-protocol.md 2.2), for noise and essay
    haystacks and the byte tokenizer: one global stream, probes first, then per-sample shrinking."""
    v = VARIANTS[task]
    rng = random.Random(seed)
    keys = ruler_keys()
    unit = 500 if v.haystack == "essay" else (5 if max_len < 4096 else 25)

    def draw(kind: str) -> str:
        if kind == "numbers":
            return str(rng.randint(1_000_000, 9_999_999))
        if kind == "uuids":
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))
        return rng.choice(keys)

    def make(n: int) -> tuple[str, list[str]]:
        ks, vs, needles = [], [], []
        for _ in range(max(v.num_keys, v.num_queries)):
            ks.append(draw(v.key_type))
            vs.append([])
            for _ in range(v.num_values):
                vs[-1].append(draw(v.value_type))
                needles.append(f"One of the special magic {v.value_type} for {ks[-1]} is: {vs[-1][-1]}.")
        random.Random(seed).shuffle(needles)
        if v.haystack == "essay":
            ws = words if linear else words * (n // len(words) + 1)  # HEAD repeats the essays, older RULER not
            sents = corpus.split_sentences(" ".join(ws[:n]).strip())
            pos = [0] + sorted(int(len(sents) * d / 100) for d in rng.sample(niah.DEPTHS, len(needles)))
            pos.append(len(sents))
            chunks = []
            for i in range(1, len(pos)):
                chunks.append(" ".join(sents[pos[i - 1]:pos[i]]))
                if i <= len(needles):
                    chunks.append(needles[i - 1])
            context = " ".join(chunks)
        else:
            lines = [NOISE_PASSAGE] * n
            for i, needle in zip(sorted(rng.sample(range(n), len(needles)), reverse=True), needles):
                lines.insert(i, needle)
            context = "\n".join(lines)
        q = rng.sample(range(max(v.num_keys, v.num_queries)), 1)[0]
        t = v.value_type[:-1]
        text = (f"A special magic {t} is hidden within the following text. Make sure to memorize it. I will quiz "
                f"you about the {t} afterwards.\n{context}\nWhat is the special magic {t} for {ks[q]} mentioned in "
                f"the provided text? The special magic {t} for {ks[q]} mentioned in the provided text is")
        return text, vs[q]

    def tokens(text: str) -> int:
        return len(tok.encode(text))

    if linear:
        size, total = unit, 0
        while total + 128 < max_len:
            text, answers = make(size)
            total = tokens(text + " ".join(answers))
            if total + 128 > max_len:
                size -= unit
                break
            if v.haystack == "essay" and size > len(words):
                size = len(words)
                break
            size += unit
    else:
        per_unit = tokens(make(unit)[0]) / unit
        lo, hi, size = unit, max(int(max_len / per_unit * 3), 2 * unit), unit
        while lo <= hi:
            mid = (lo + hi) // 2
            if tokens(make(mid)[0]) + 128 <= max_len:
                size, lo = mid, mid + 1
            else:
                hi = mid - 1
    out = []
    for _ in range(num):
        used = size
        while tokens((sample := make(used))[0]) + 128 > max_len:
            used -= unit
        out.append((sample[0], sample[1], used))
    return out


@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize("task, length", [("niah_single_1", 2048), ("niah_single_1", 4096),
                                          ("niah_single_2", 4096), ("niah_multikey_1", 8192)])
def test_ruler_sizing_is_rulers_algorithm_sample_for_sample(task, length, linear):
    words = corpus.words_of(corpus.essay_dir_text(ESSAY_DIR))
    ref = _reference_ruler(task, BYTE, words, length, 12, 42, linear)
    ours = _samples(task, BYTE, length, 12, sizing="ruler-linear" if linear else "ruler")
    assert [(s["input"], s["outputs"], s["haystack_size"]) for s in ours] == ref
    for s in ours:
        assert len(BYTE.encode(s["input"])) + 128 == s["length"] <= length


def test_ruler_sizing_leaves_samples_a_whole_unit_short():
    # S-NIAH-3's UUID values vary in byte length only through the key: some samples overshoot the probe's size
    samples = _samples("niah_single_3", BYTE, 8192, 40)
    sizes = {s["haystack_size"] for s in samples}
    full = max(sizes)
    assert all((full - size) % 500 == 0 for size in sizes)
    short = [s for s in samples if s["units_short"]]
    assert short and len(short) < len(samples)
    assert all(s["haystack_size"] == full - 500 * s["units_short"] for s in samples)
    assert statistics.median(s["length"] for s in short) < 8192 - 1500  # a unit is ~2.8K bytes


def test_binary_search_keeps_the_largest_fitting_size_of_one_probe_each():
    probes = []

    def probe(n: int) -> niah._Sample:
        probes.append(n)
        return niah._Sample("x" * (7 * n + 40), ["1"], "k", "", [0])

    size = niah._binary_search(probe, len, 25, 1024, 128)
    assert size == (1024 - 128 - 40) // 7
    assert probes[0] == 25  # the per-unit estimate; the search range is [unit, 3 x the estimate]
    assert max(probes[1:]) <= int(1024 / ((7 * 25 + 40) / 25) * 3)
    # nothing fits: RULER falls back to one unit
    assert niah._binary_search(lambda n: niah._Sample("x" * 5000, ["1"], "k", "", [0]), len, 25, 1024, 128) == 25


def test_linear_search_steps_back_one_unit_after_overshooting_with_the_answers_appended():
    def probe(n: int) -> niah._Sample:
        return niah._Sample("x" * (10 * n), ["12345"], "k", "", [0])

    # 10n + len(" ".join(answers)) + 128 <= 1024  ->  n <= 89.1; units of 25: 75 fits, 100 does not
    assert niah._linear_search(probe, len, 25, 1024, 128, cap=None) == 75
    assert niah._linear_search(probe, len, 25, 1024, 128, cap=60) == 60  # the essays ran out first


def test_essay_needles_at_depth_0_and_100_keep_rulers_spaces():
    words = ["First", "sentence.", "Second", "one.", "Third", "here."]
    sampler = niah._RulerSampler(VARIANTS["niah_single_2"], "essay", words, 42)
    for depth, expected in ((0, "afterwards.\n One of the special magic numbers"), (100, "Third here. One of")):
        rng = random.Random(1)
        orig = rng.sample
        rng.sample = lambda pop, k, d=depth: [d] if pop is niah.DEPTHS else orig(pop, k)  # type: ignore
        sample = sampler(len(words), rng)
        assert expected in sample.text
        if depth == 100:
            assert sample.text.split(" is: ")[1].split("\n")[0].endswith(". ")  # the trailing space
        else:
            assert "\nFirst sentence." not in sample.text


def test_noise_haystack_is_whole_passages_with_needles_before_a_line_never_after_the_last():
    sampler = niah._RulerSampler(VARIANTS["niah_single_1"], "noise", (), 42)
    for _ in range(50):
        sample = sampler(6, random.Random(_))
        context = sample.text.split("afterwards.\n")[1].split("\nWhat is")[0]
        lines = context.split("\n")
        assert len(lines) == 7 and lines.count(NOISE_PASSAGE) == 6
        assert lines[-1] == NOISE_PASSAGE  # a needle goes before a passage, never after the last one


def test_keys_are_rulers_wonderwords_pairs_indexed_lazily():
    adjs = ["blue", "blue-eyed", "old", "Early", "ad hoc", "blue", "x-rated", "a"]
    nouns = ["eyed-cat", "cat", "dog", "Zebra", "ice cream", "cat", "-x"]
    brute = sorted({f"{a}-{n}" for a in adjs for n in nouns})
    keys = KeyWords(adjs, nouns)
    assert len(keys) == len(brute) and list(keys) == brute
    a, b = random.Random(5), random.Random(5)
    assert [a.choice(brute) for _ in range(20)] == [b.choice(keys) for _ in range(20)]
    real = ruler_keys()
    assert len(real) > 6_000_000 and real[0] < real[1] < real[len(real) // 2] < real[-1]
    assert any(" " in real[i] or real[i] != real[i].lower() for i in range(0, len(real), 997))


def test_essay_corpus_is_joined_as_ruler_does(tmp_path):
    (tmp_path / "a.txt").write_text("The end of this.")
    (tmp_path / "b.txt").write_text("October  was\nnext.\n")
    assert corpus.words_of(corpus.essay_dir_text(tmp_path)) == ["The", "end", "of", "this.October", "was", "next.",
                                                                ""]


def test_without_an_essay_dir_the_hub_dataset_is_read_as_lm_eval_does(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, split=None, **kw):
        calls.append((name, split))
        return {"text": ["One essay.", "Two\nessays."]}

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    corpus.essay_words.cache_clear()
    try:
        assert corpus.essay_words(None) == ("One", "essay.", "Two", "essays.")
        assert calls == [("baber/paul_graham_essays", "train")]

        def offline(*a, **kw):
            raise ConnectionError("offline")

        monkeypatch.setattr(datasets, "load_dataset", offline)
        corpus.essay_words.cache_clear()
        with pytest.raises(FileNotFoundError, match="--essay-dir"):
            NiahGenerator("niah_single_2", BYTE)
    finally:
        corpus.essay_words.cache_clear()


def test_sentence_splitter_keeps_closing_quotes_and_rejoins_to_the_same_text():
    text = 'He said "no." Then (he left.) OK? Fine'
    sents = corpus.split_sentences(text)
    assert " ".join(sents) == text
    if corpus.sentence_splitter() == "regex":
        assert sents == ['He said "no."', "Then (he left.)", "OK?", "Fine"]


@pytest.mark.skipif(not (LLAMA2.exists() and SHARED_ESSAYS.is_dir()), reason="needs ../shared Llama 2 and essays")
def test_llama2_lengths_follow_rulers_distribution():
    tok = load_tokenizer(LLAMA2)

    def cell(task: str, length: int, sizing: str = "ruler") -> list[dict]:
        return list(NiahGenerator(task, tok, essay_dir=str(SHARED_ESSAYS), sizing=sizing).samples(length, 100))

    s2 = cell("niah_single_2", 1024)
    assert statistics.median(s["length"] - 128 for s in s2) < 600  # RULER HEAD: 209
    mk = cell("niah_multikey_1", 1024)
    assert 0.2 <= sum(s["units_short"] > 0 for s in mk) / len(mk) <= 0.8  # RULER HEAD: 48%
    tight = cell("niah_single_2", 1024, "tight")
    assert all((1 - FIT_TOLERANCE) * 896 <= s["length"] - 128 <= 896 for s in tight)


# ---- sizing "tight": this harness's earlier generator --------------------------------------------------------------
@pytest.mark.parametrize("tok_name", ["byte", "bpe", "llama2"])
@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
                                  "niah_multivalue", "niah_multiquery", "niah_multikey_2"])
@pytest.mark.parametrize("length", [1024, 4096])
def test_tight_prompts_land_within_two_percent_under_budget(task, tok_name, length, bpe_tokenizer_path):
    toks = sizing_tokenizers(bpe_tokenizer_path)
    if tok_name not in toks:
        pytest.skip("llama2 tokenizer not present in ../shared")
    if VARIANTS[task].haystack == "needle" and length < 4096:
        pytest.skip("needle haystacks move in whole distractor lines: within 2% from 4K on")
    tok = toks[tok_name]
    budget = length - VARIANTS[task].tokens_to_generate
    for s in _samples(task, tok, length, 4, sizing="tight"):
        prompt_tokens = len(tok.encode(s["input"]))
        assert prompt_tokens == s["length"] - VARIANTS[task].tokens_to_generate
        assert (1 - FIT_TOLERANCE) * budget <= prompt_tokens <= budget, (task, tok_name, prompt_tokens, budget)


def test_tight_single_needle_depths_walk_the_grid_evenly():
    depths = [s["depths"][0] for s in _samples("niah_single_1", BYTE, 1024, 80, sizing="tight")]
    assert sorted(depths[:40]) == sorted(depths[40:]) and len(set(depths[:40])) == 40


# ---- every sizing ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizing", niah.SIZINGS)
@pytest.mark.parametrize("task", sorted(VARIANTS))
def test_every_sample_holds_its_needles_answers_and_prompt(task, sizing):
    variant = VARIANTS[task]
    for s in _samples(task, BYTE, 4096, 6, sizing=sizing):
        assert len(s["outputs"]) == variant.num_queries * variant.num_values
        for answer in s["outputs"]:
            assert answer in s["input"]
            needle = NEEDLE.format(type_v=variant.value_type, key="", value=answer).split(" for ")[0]
            assert f" is: {answer}." in s["input"] and needle in s["input"]
        for key in s["query"].replace(", and ", ", ").split(", "):
            assert f"for {key} is: " in s["input"]
        assert s["input"].endswith(s["gen_prefix"]) and s["query"] in s["gen_prefix"]
        singular = variant.num_queries * variant.num_values == 1
        assert s["input"].startswith("A special magic" if singular else "Some special magic")
        assert len(BYTE.encode(s["input"])) + variant.tokens_to_generate == s["length"] <= 4096
        if variant.value_type == "uuids":
            assert all(len(a) == 36 and a.count("-") == 4 for a in s["outputs"])
        if variant.value_type == "numbers":
            assert all(len(a) == 7 and a.isdigit() for a in s["outputs"])


def test_essay_task_without_essays_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        NiahGenerator("niah_single_2", BYTE, essay_dir=str(tmp_path))
    NiahGenerator("niah_single_2", BYTE, essay_dir=str(tmp_path), haystack="noise")  # noise needs no essays


def test_unknown_sizing_is_a_clear_error():
    with pytest.raises(ValueError, match="ruler-linear"):
        NiahGenerator("niah_single_1", BYTE, sizing="binary")


def test_missing_tokenizer_is_a_clear_error():
    with pytest.raises(ValueError, match="tokenizer"):
        niah_utils.build_dataset("niah_single_1", max_seq_lengths=[1024], num_samples=1)


@pytest.mark.parametrize("sizing", niah.SIZINGS)
def test_budget_too_small_for_the_template_is_a_clear_error(sizing):
    with pytest.raises(ValueError, match="budget"):
        _samples("niah_single_1", BYTE, 256, 1, sizing=sizing)
    if sizing == "ruler":  # one unit of 500 essay words (~2.8K bytes) cannot fit 1K bytes (older RULER: the
        # 103 fixture words run out first)
        with pytest.raises(ValueError, match="500 essay words"):
            _samples("niah_single_2", BYTE, 1024, 1, sizing=sizing)


def test_500_samples_at_8k_with_bytes():
    assert len(_samples("niah_single_2", BYTE, 8192, 500)) == 500


def test_dataset_interleaves_lengths_and_takes_the_sizing_from_metadata():
    ds = niah_utils.build_dataset("niah_single_1", tokenizer="byte", max_seq_lengths=[1024, 2048], num_samples=3)
    assert ds["test"]["max_length"] == [1024, 2048] * 3 and set(ds["test"]["sizing"]) == {"ruler"}
    ds = niah_utils.build_dataset("niah_single_1", tokenizer="byte", max_seq_lengths=[1024], num_samples=2,
                                  sizing="tight")
    assert set(ds["test"]["sizing"]) == {"tight"}


def test_sizing_is_in_the_task_metadata_that_results_record():
    from tasks.catalog import task_manager

    tm = task_manager(metadata={"tokenizer": "byte"},
                      task_metadata={"ruler_niah_single_1": {"max_seq_lengths": [1024], "num_samples": 2}})
    task = tm.load(["ruler_niah_single_1"])["tasks"]["ruler_niah_single_1"]
    assert task.config.metadata["sizing"] == "ruler" and task.config.metadata["bos"] == "bos"
    tm = task_manager(metadata={"tokenizer": "byte"}, task_metadata={
        "ruler_niah_single_1": {"max_seq_lengths": [1024], "num_samples": 2, "sizing": "tight"}})
    task = tm.load(["ruler_niah_single_1"])["tasks"]["ruler_niah_single_1"]
    assert task.config.metadata["sizing"] == "tight"
    assert {d["sizing"] for d in task.dataset["test"]} == {"tight"}


def test_scoring_is_rulers_string_match_all_per_length():
    doc = {"max_length": 2048, "outputs": ["1234567", "7654321"]}
    assert niah_utils.process_results(doc, [" 1234567 and 7654321."]) == {"2048": 1.0}
    assert niah_utils.process_results(doc, ["\x00 1234567\n"]) == {"2048": 0.5}
    assert niah_utils.process_results(doc, ["no idea"]) == {"2048": 0.0}
    assert niah_utils.string_match_all("The UUID Is ABC-def", ["abc-DEF"]) == 1.0


def test_lengths_script_prints_one_row_per_task(capsys):
    from tasks.ruler import lengths

    lengths.main(["--tokenizer", "byte", "--essay-dir", str(ESSAY_DIR), "--lengths", "4096", "--samples", "3"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| task | ruler 4K | ruler-linear 4K | tight 4K |" and len(out) == 2 + len(lengths.TASKS)
    assert out[3].startswith("| S-NIAH-2 | ") and out[3].count("%") == 2
