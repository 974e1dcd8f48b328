import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count() or 1))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """norm of the difference over norm of the reference (b)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture
def shared_dir() -> Path:
    path = ROOT.parent / "shared"
    if not path.is_dir():
        pytest.skip(f"shared folder not found at {path}")
    return path


@pytest.fixture
def set_tf32():
    """set_tf32(on) for one test, restored after. torch.set_float32_matmul_precision sets the legacy allow_tf32 and
    the new fp32_precision alike (monkeypatching `torch.backends.cuda.matmul.allow_tf32` fails at teardown: the
    attribute lives in a __getattr__, and newer pytest undoes it with delattr)."""
    kept = torch.get_float32_matmul_precision()
    yield lambda on: torch.set_float32_matmul_precision("high" if on else "highest")
    torch.set_float32_matmul_precision(kept)
