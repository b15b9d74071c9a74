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


def target_arch() -> int:
    """Compute capability (e.g. 90) of the device Triton compiles for now."""
    from triton.runtime.driver import driver

    return int(driver.active.get_current_target().arch)


def prune_by_target(
    upcast: list[triton.Config] | None = None,
    hopper_only: tuple[int, ...] = (),
    cpu_only: tuple[int, ...] = (),
) -> dict:
    """``prune_configs_by`` of a GEMM-like kernel: the configs that fit the launch's dtype and GPU.

    * With ``UPCAST`` (fp32 or mixed inputs) every tile is fp32, twice the registers and shared
      memory of the 16-bit tiles the lists are sized for: the larger configs spill or exceed the
      per-block shared memory. fp32 is the exactness path, not the fast one, so it runs ``upcast``
      (small configs checked to compile without spills) or else the first config.
    * ``hopper_only``: indices of configs that spill or exceed the 163 KB of shared memory per block
      on sm_80 (they fit sm_90's registers and 227 KB); dropped below compute capability 9.0.
    * ``cpu_only``: indices of configs kept for the interpreter alone (the first config, whose small
      tiles exercise the boundary masks in the CPU tests) because they spill on a GPU.

    ``python -m spacache_kernels.compile_check`` checks every config this keeps, on sm_90a and sm_80.
    Under the interpreter the list is already the first config alone and is kept as it is.
    """

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        if interpreting():
            return configs
        if kwargs.get("UPCAST"):
            return list(upcast) if upcast else configs[:1]
        drop = set(cpu_only) | (set(hopper_only) if target_arch() < 90 else set())
        return [c for i, c in enumerate(configs) if i not in drop]

    return {"early_config_prune": prune}


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def device_guard(tensor: torch.Tensor):
    """Context making ``tensor``'s CUDA device current (Triton launches on the current device)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
