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
