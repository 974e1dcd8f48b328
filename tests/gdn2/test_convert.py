"""`convert`: every supported format to the native folder and back, through the API and the CLI parser."""
import argparse
import json
import shutil

import pytest
import torch

from gdn2.checkpoint import load_checkpoint
from gdn2.convert import add_cli, convert
from tests.conftest import rel_err
from tests.gdn2.test_checkpoint import (
    FLA_CASES,
    fla_state,
    fla_tokens,
    official_dir,  # noqa: F401  (a pytest fixture)
    official_ref,
    write_fla_folder,
)


def cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="run_eval.py")
    add_cli(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.mark.parametrize("name", ["rec", "hyb"])
def test_official_to_native_keeps_exact_logits(official_dir, tmp_path, name):  # noqa: F811
    run = tmp_path / "run"
    run.mkdir()  # a training output folder as a user would point at it
    shutil.copyfile(official_dir / f"official_{name}.pth", run / "final-model-ckpt.pth")
    shutil.copyfile(official_dir / f"official_{name}.config.json", run / "config.json")
    args = cli(["convert", str(run), str(tmp_path / "native")])
    assert args.func(args) == 0
    loaded = load_checkpoint(str(tmp_path / "native"))
    ref = official_ref(official_dir, name)
    assert loaded.format == "native" and loaded.config.n_head == 4
    assert rel_err(loaded.model(ref["tokens"]), ref["logits_exact_recurrence"]) < 1e-4
    meta = json.loads((tmp_path / "native" / "config.json").read_text())
    assert meta["source"]["format"] == "lit_gpt" and meta["source"]["sha256"] == load_checkpoint(str(run)).sha256


@pytest.mark.parametrize("case", ["kda_hybrid_sharded", "kda_gva_negeig_tied", "gdn"])
def test_fla_round_trip(tmp_path, case):
    c, container, legacy = FLA_CASES[case]
    src = write_fla_folder(tmp_path / "fla", c, fla_state(c, seed=5, legacy=legacy), container)
    out = convert(src, tmp_path / "native")
    again = convert(out, tmp_path / "native2")  # native -> native is the identity
    a, b, n = (load_checkpoint(str(p)) for p in (src, out, again))
    assert b.config == a.config and n.config == a.config and b.format == "native"
    x = fla_tokens(c, T=12)
    assert torch.equal(b.model(x), a.model(x)) and torch.equal(n.model(x), a.model(x))


def test_convert_dtype_and_tokenizer(official_dir, tmp_path):  # noqa: F811
    out = convert(official_dir / "official_rec.pth", tmp_path / "bf16", dtype="bfloat16", tokenizer="byte")
    loaded = load_checkpoint(str(out))
    params = dict(loaded.model.named_parameters())
    assert params["transformer.wte.weight"].dtype == torch.bfloat16
    assert params["transformer.h.1.attn.dt_bias"].dtype == torch.float32
    assert loaded.tokenizer.name == "byte"
    with pytest.raises(ValueError, match="unknown dtype"):
        convert(official_dir / "official_rec.pth", tmp_path / "x", dtype="int3")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        convert(official_dir / "official_rec.pth", tmp_path / "file")
