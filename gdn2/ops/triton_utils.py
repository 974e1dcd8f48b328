"""Launch-side helpers shared by the Triton prefill and decode kernels."""
from __future__ import annotations

import os

import torch

# Head dims the kernels hold whole in registers (the key axis must be whole for the in-kernel L2 norm).
MAX_HEAD_DIM = 128


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (CPU tensors, numpy semantics: bf16 dots are not supported there)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def block_size(d: int) -> int:
    """Power-of-two register tile covering a head dim (tl.dot needs at least 16)."""
    return max(16, 1 << (d - 1).bit_length())


def tf32_allowed() -> bool:
    """Whether torch lets fp32 CUDA matmuls use tf32. torch >= 2.9 has a per-backend `fp32_precision` ("ieee",
    "tf32", or "none" = not set: ieee) and raises on reading the legacy `allow_tf32` once the new API was used;
    older torch has only `allow_tf32`."""
    matmul = torch.backends.cuda.matmul
    try:
        return matmul.fp32_precision == "tf32"
    except AttributeError:  # torch < 2.9
        return bool(matmul.allow_tf32)


def fp32_dot_precision(dtype: torch.dtype) -> str:
    """Dot precision for fp32 operands: exact ("ieee") for fp32 inputs unless torch allows tf32; tf32 otherwise."""
    if dtype == torch.float32 and not tf32_allowed():
        return "ieee"
    return "tf32"


def head_groups(H: int, HV: int, name: str, heads: int) -> int:
    """Value heads per head of a tensor with `heads` heads (H or HV); value head hv reads head hv // result."""
    if heads not in (H, HV):
        raise ValueError(f"{name} must have H={H} or HV={HV} heads, got {heads}")
    return HV // heads


def check_device(x: torch.Tensor) -> None:
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(f"the Triton backend needs CUDA tensors, got {x.device}: use backend='torch' on CPU")
