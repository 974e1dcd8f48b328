"""Suites and the catalogue: names, typos, columns, and the paper's averages on the paper's own numbers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.catalog import list_suites, list_tasks, load_suite, paper_average

PAPER = json.loads((Path(__file__).resolve().parents[2] / "results/reference/paper_tables.json").read_text())


def _rows(table: str):
    for family in PAPER[table]["rows"].values():
        yield from family.items()


def test_catalogue_lists_every_task_and_suite():
    tasks = set(list_tasks())
    for variant in ("single_1", "single_2", "single_3", "multikey_1", "multikey_2", "multikey_3", "multivalue",
                    "multiquery"):
        assert f"ruler_niah_{variant}" in tasks
    for name in ("swde", "squad", "fda", "triviaqa", "nq", "drop"):
        assert {f"jrt_{name}", f"jrt_{name}_twice"} <= tasks
    assert {"lambada_openai", "wikitext", "hellaswag", "social_iqa", "boolq"} <= tasks
    assert set(list_suites()) == {"table2", "table3", "table4", "table5", "quick", "all"}


def test_typos_name_the_closest_suite_and_average():
    with pytest.raises(ValueError, match="table3"):
        load_suite("tabel3")
    with pytest.raises(ValueError, match="recall_avg"):
        paper_average("table5", {}, name="recal_avg")


@pytest.mark.parametrize("table, key", [("table2", "table2_lm_commonsense"), ("table3", "table3_ruler_niah"),
                                        ("table4", "table4_recall_2k"), ("table5", "table5_ablations")])
def test_suite_columns_are_the_papers(table, key):
    suite = load_suite(table)
    assert suite.paper_table == key
    assert suite.table_columns == PAPER[key]["columns"]


def test_table3_is_the_14_cell_grid():
    suite = load_suite("table3")
    assert len(suite.columns) == 14
    assert suite.metadata["ruler_niah_single_1"]["max_seq_lengths"] == [1024, 2048, 4096, 8192]
    assert suite.metadata["ruler_niah_single_3"]["max_seq_lengths"] == [1024, 2048, 4096]
    assert all(m["num_samples"] == 500 for m in suite.metadata.values())


@pytest.mark.parametrize("table, key, column", [("table2", "table2_lm_commonsense", "avg_acc"),
                                                ("table4", "table4_recall_2k", "avg")])
def test_averages_reproduce_every_paper_row(table, key, column):
    rows = list(_rows(key))
    assert len(rows) == 13
    for model, row in rows:
        assert abs(paper_average(table, row) - row[column]) <= 0.005 + 1e-9, model


def test_table5_averages_are_table2_and_table4_averages():
    t2 = PAPER["table2_lm_commonsense"]["rows"]["recurrent"]["Gated DeltaNet-2"]
    t4 = PAPER["table4_recall_2k"]["rows"]["recurrent"]["Gated DeltaNet-2"]
    t5 = PAPER["table5_ablations"]["rows"]["recurrent"]["Gated DeltaNet-2 (b in [0,1])"]
    row = {**t2, **t4}
    assert round(paper_average("table5", row, name="commonsense_avg"), 2) == t5["commonsense_avg"]
    assert round(paper_average("table5", row, name="recall_avg"), 2) == t5["recall_avg"]


def test_table5_modes_and_bos_policies():
    suite = load_suite("table5")
    assert suite.gate_modes == ["full", "scalar_b", "scalar_w", "tied", "expanded_b"]
    assert set(suite.gate_mode_rows.values()) - {None} == set(PAPER["table5_ablations"]["rows"]["recurrent"])
    assert suite.bos is None
    assert suite.bos_by_task["piqa"] == "bos" and suite.bos_by_task["jrt_fda"] == "none"
    assert load_suite("table4").bos == "none" and load_suite("table2").bos == "bos"


def test_cells_come_from_lm_eval_results_in_the_papers_unit():
    suite = load_suite("table4")
    results = {t: {"contains,none": v} for t, v in zip(suite.tasks, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])}
    assert suite.cell("swde", results) == pytest.approx(10.0)
    assert suite.cell("avg", results) == pytest.approx(35.0)
    assert suite.cell("avg", {}) is None
    t2 = load_suite("table2")
    assert t2.cell("wikitext_ppl", {"wikitext": {"word_perplexity,none": 15.9}}) == pytest.approx(15.9)


def test_all_holds_every_task_with_a_bos_policy():
    suite = load_suite("all")
    assert set(suite.tasks) == set(list_tasks())
    assert set(suite.bos_by_task) == set(suite.tasks)


def test_each_of_our_tasks_declares_its_bos_policy():
    from tasks.catalog import task_bos

    for task in list_tasks():
        expected = "none" if task.startswith("jrt_") else "bos" if task.startswith("ruler_") else None
        assert task_bos(task) == expected, task


def test_a_suite_falls_back_to_the_tasks_bos_policy_and_can_override_it(tmp_path, monkeypatch):
    from tasks import catalog

    (tmp_path / "mine.yaml").write_text("suite: mine\ntasks: [jrt_swde, ruler_niah_single_1, piqa]\n"
                                        "bos_by_task: {ruler_niah_single_1: none, piqa: bos}\n")
    (tmp_path / "open.yaml").write_text("suite: open\ntasks: [jrt_swde, piqa]\n")
    monkeypatch.setattr(catalog, "SUITES_DIR", tmp_path)
    assert catalog.load_suite("mine").bos_by_task == {"jrt_swde": "none", "ruler_niah_single_1": "none",
                                                      "piqa": "bos"}
    with pytest.raises(ValueError, match="no BOS policy for piqa"):  # lm-eval's tasks declare none
        catalog.load_suite("open")


def test_the_declared_bos_policy_is_in_the_task_metadata_that_results_record(data_dir):
    from tasks.catalog import task_manager

    tm = task_manager(data_dir=data_dir, metadata={"tokenizer": "byte"})
    task = tm.load(["jrt_swde"])["tasks"]["jrt_swde"]
    assert task.config.metadata["bos"] == "none"


def test_a_malformed_bos_declaration_is_a_clear_error(monkeypatch):
    from tasks import catalog

    configs = {**catalog._task_configs(), "jrt_swde": {"task": "jrt_swde", "metadata": {"bos": "yes"}}}
    monkeypatch.setattr(catalog, "_task_configs", lambda: configs)
    with pytest.raises(ValueError, match="jrt_swde: metadata bos 'yes'"):
        catalog.task_bos("jrt_swde")


def test_which_tasks_need_the_hub():
    from tasks.catalog import task_needs_hub

    assert not task_needs_hub("ruler_niah_single_1")  # noise: generated here
    assert task_needs_hub("ruler_niah_single_2")  # essays from lm-eval's HF dataset
    assert not task_needs_hub("ruler_niah_single_2", {"essay_dir": "/essays"})
    assert not task_needs_hub("ruler_niah_single_2", {"haystack": "noise"})
    assert not task_needs_hub("ruler_niah_multikey_1", data_dir="/data")  # <data_dir>/paul_graham_essays
    assert task_needs_hub("jrt_swde") and task_needs_hub("piqa") and not task_needs_hub("piqa", data_dir="/d")
