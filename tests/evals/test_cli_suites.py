"""The CLI end to end on the embedded demo checkpoint: the NIAH grid and Table 2 on offline fixture data."""
import json
from pathlib import Path

import pytest

import run_eval
from evals.reports.results import RunStore
from tasks import catalog

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def hash_cache(tmp_path_factory, monkeypatch):
    """Content hashes are cached in a file: the tests' own, not the user's ~/.cache."""
    monkeypatch.setenv("GDN2_HASH_CACHE", str(tmp_path_factory.getbasetemp() / "file-hashes.json"))


def _results(out: Path, label: str = "gdn2-demo") -> dict:
    meta = json.loads((out / label / "meta.json").read_text())
    assert meta["complete"] is True
    return RunStore(out).read_results(label)["results"]


def test_table3_suite_runs_on_the_demo_checkpoint(tmp_path):
    essays = ROOT / "tests" / "fixtures" / "data" / "paul_graham_essays"  # two short texts the tests wrote
    # RULER's own sizing leaves no essay haystack at 1K with the demo's small BPE (its smallest, 500 words, is
    # longer): the suite as a file beside it, sized tight, which --suite takes by path
    suite = tmp_path / "table3_tight.yaml"
    suite.write_text((catalog.SUITES_DIR / "table3.yaml").read_text().replace("sizing: ruler", "sizing: tight"))
    code = run_eval.main(["run", "--checkpoint", "demo:gdn2-demo", "--suite", str(suite), "--limit", "2",
                          "--lengths", "1024,2048", "--essay-dir", str(essays), "--output", str(tmp_path / "out")])
    assert code == 0
    results = _results(tmp_path / "out")
    for task in ("ruler_niah_single_1", "ruler_niah_single_2", "ruler_niah_single_3", "ruler_niah_multikey_1"):
        assert task in results and any(k.endswith(",none") and k[0].isdigit() for k in results[task])
    samples = RunStore(tmp_path / "out").samples_path("gdn2-demo", "ruler_niah_single_1").read_text().splitlines()
    assert len(samples) == 2


def test_table2_suite_runs_on_offline_fixtures(tmp_path, capsys):
    code = run_eval.main(["run", "--checkpoint", "demo:gdn2-demo", "--suite", "table2", "--data-dir",
                          str(ROOT / "tests" / "fixtures" / "data"), "--limit", "2", "--output", str(tmp_path)])
    assert code == 0
    results = _results(tmp_path)
    assert {"wikitext", "lambada_openai", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
            "openbookqa", "social_iqa", "boolq"} <= set(results)
    assert 0.0 <= results["piqa"]["acc,none"] <= 1.0 and results["wikitext"]["word_perplexity,none"] > 1.0
    config = json.loads((tmp_path / "gdn2-demo" / "config.json").read_text())
    assert config["model"]["bos"] is True and config["model"]["sha256"]
    assert "wikitext_ppl" in capsys.readouterr().out  # the summary table
