"""Shared launcher helpers for the Triton kernels.

The Triton interpreter (``TRITON_INTERPRET=1``, the CPU test path) cannot autotune over several
configs, so every autotuned kernel builds its config list through :func:`autotune_configs`, which
keeps only the first (smallest) config when interpreting.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_configs(configs: list[triton.Config]) -> list[triton.Config]:
    """The config list for ``@triton.autotune``: all of them on a GPU, the first one when interpreting."""
    if not configs:
        raise ValueError("configs: expected at least one triton.Config")
    return configs[:1] if interpreting() else configs


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def device_guard(tensor: torch.Tensor):
    """Context making ``tensor``'s CUDA device current (Triton launches on the current device)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
