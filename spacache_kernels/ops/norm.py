"""RMSNorm (LLaDA's and Qwen2/Dream's pre-attention, pre-FFN and final norm)."""

from __future__ import annotations

import math
import numbers

import torch

from spacache_kernels.ops import reference
from spacache_kernels.ops._dispatch import resolve_backend
from spacache_kernels.ops._validate import check_contiguous, check_disjoint, check_float, check_same_device


@torch.no_grad()
def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    *,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``x * rsqrt(mean(x^2, -1) + eps) * weight`` over the last dim, fp32 math.

    Args:
        x: (..., d) fp32/fp16/bf16, at least 1-D, ``d >= 1``, any strides.
        weight: (d,) fp32/fp16/bf16 (need not match ``x``'s dtype), any stride.
        eps: a finite float > 0.
        out: (..., d) with ``x``'s shape and dtype, contiguous; may be ``x`` itself (in place),
            must not otherwise share memory with ``x``; or None (allocated).
        backend: ``"auto" | "triton" | "torch"`` or None (``SPACACHE_BACKEND``, default auto).

    Returns:
        ``out`` (..., d) in ``x``'s dtype.
    """
    check_float("x", x)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x: expected shape (..., d) with d >= 1, got {tuple(x.shape)}")
    d = x.shape[-1]
    check_float("weight", weight, ndim=1, shape=(d,))
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps: expected a float, got {type(eps).__name__}")
    if not (math.isfinite(float(eps)) and float(eps) > 0):
        raise ValueError(f"eps: expected a finite value > 0, got {eps!r}")
    if out is not None:
        check_float("out", out, shape=tuple(x.shape))
        if out.dtype != x.dtype:
            raise TypeError(f"out: expected dtype {x.dtype} (the dtype of x), got {out.dtype}")
        check_contiguous("out", out)
    check_same_device(x=x, weight=weight, out=out)
    if out is not None and not (out.data_ptr() == x.data_ptr() and out.stride() == x.stride()):
        # A program reads a whole row before writing it, so out = x works; a partial overlap
        # could let one program overwrite another's row before it is read.
        check_disjoint("out", out, "x", x)

    backend = resolve_backend(backend, x, weight, out)
    if backend == "torch":
        result = reference.rms_norm(x, weight, float(eps))
        return result if out is None else out.copy_(result)
    from spacache_kernels.kernels import rmsnorm as kernels  # imports triton only when needed

    return kernels.rms_norm(x, weight, float(eps), out)
