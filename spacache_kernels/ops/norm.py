"""RMSNorm (LLaDA's and Qwen2/Dream's pre-attention, pre-FFN and final norm).

Operators (:mod:`spacache_kernels.ops._library`): ``torch.ops.spacache.rms_norm(x, weight, eps,
backend) -> Tensor`` and ``torch.ops.spacache.rms_norm_out(x, weight, eps, out!, backend) -> ()``,
which writes into ``out`` (mutated; ``out`` may be ``x``).
"""

from __future__ import annotations

import math
import numbers

import torch

from spacache_kernels.ops import reference
from spacache_kernels.ops._dispatch import resolve_backend
from spacache_kernels.ops._library import check_op_backend, define
from spacache_kernels.ops._validate import check_contiguous, check_disjoint, check_float, check_same_device


def _rms_norm_impl(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str) -> torch.Tensor:
    if check_op_backend(backend) == "torch":
        return reference.rms_norm(x, weight, eps).contiguous()
    from spacache_kernels.kernels import rmsnorm as kernels  # imports triton only when needed

    return kernels.rms_norm(x, weight, eps, None)


def _rms_norm_out_impl(x, weight, eps: float, out: torch.Tensor, backend: str) -> None:
    if check_op_backend(backend) == "torch":
        out.copy_(reference.rms_norm(x, weight, eps))
        return
    from spacache_kernels.kernels import rmsnorm as kernels

    kernels.rms_norm(x, weight, eps, out)


RMS_NORM = define(
    "rms_norm(Tensor x, Tensor weight, float eps, str backend) -> Tensor",
    _rms_norm_impl,
    lambda x, weight, eps, backend: x.new_empty(x.shape),
)
RMS_NORM_OUT = define(
    "rms_norm_out(Tensor x, Tensor weight, float eps, Tensor(a!) out, str backend) -> ()",
    _rms_norm_out_impl,
    lambda x, weight, eps, out, backend: None,
)


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

    Runs ``torch.ops.spacache.rms_norm`` (or ``rms_norm_out`` when ``out`` is given, mutating it).
    While ``torch.compile`` traces, the check that ``out`` shares no memory with ``x`` (a data
    pointer comparison) is skipped.

    Args:
        x: (..., d) fp32/fp16/bf16, at least 1-D, ``d >= 1``, any strides.
        weight: (d,) fp32/fp16/bf16 (need not match ``x``'s dtype), any stride.
        eps: a finite float > 0.
        out: (..., d) with ``x``'s shape and dtype, contiguous; may be ``x`` itself (in place),
            must not otherwise share memory with ``x``; or None (allocated, contiguous).
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
    if (
        out is not None
        and not torch.compiler.is_compiling()
        and not (out.data_ptr() == x.data_ptr() and out.stride() == x.stride())
    ):
        # A program reads a whole row before writing it, so out = x works; a partial overlap
        # could let one program overwrite another's row before it is read.
        check_disjoint("out", out, "x", x)

    backend = resolve_backend(backend, x, weight, out)
    if out is None:
        return RMS_NORM(x, weight, float(eps), backend)
    RMS_NORM_OUT(x, weight, float(eps), out, backend)
    return out
