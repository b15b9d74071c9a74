"""Unvalidated launchers for the runtime's hot path, chosen once per generation.

Every public op (``ops.rms_norm``, ``ops.gather_linear``, ...) validates its arguments and resolves
its backend on each call: about 20 us of host time, 15-20 calls per layer, so milliseconds per step
(against a weight-read floor of about 3.7 ms per LLaDA-8B step on an H200). Inside one generation
the shapes, dtypes and devices are fixed by the model and by host-side integers the runtime itself
computed, so the runtime checks them once (the model at load, the plan per step) and calls these
launchers instead: the same reference functions and Triton kernels the public ops end in, without
the checks. Code outside the runtime keeps using the public ops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from spacache_kernels.ops import linear as _linear
from spacache_kernels.ops import reference
from spacache_kernels.ops._dispatch import resolve_backend


@dataclass(frozen=True)
class Launchers:
    """One backend's hot-path functions (signatures as the reference functions of ``ops.reference``).

    rms_norm(x, weight, eps); linear(x, idx, weight, bias, rope=, positions=, rope_cols=);
    swiglu(x, idx, w_gate, w_up); attention(q, k_cache, v_cache, key_padding, prob_rows);
    scatter_rows_(cache, idx, src); scatter_residual(x, cache, idx, src).
    """

    backend: str
    rms_norm: Callable
    linear: Callable
    swiglu: Callable
    attention: Callable
    scatter_rows_: Callable
    scatter_residual: Callable


def _torch_launchers() -> Launchers:
    return Launchers(
        backend="torch",
        rms_norm=lambda x, w, eps: reference.rms_norm(x, w, eps),
        linear=reference.gather_linear,
        swiglu=reference.gather_swiglu,
        attention=lambda q, k, v, pad, prob_rows: reference.sparse_attention(q, k, v, pad, None, prob_rows),
        scatter_rows_=reference.scatter_rows_,
        scatter_residual=reference.scatter_residual,
    )


def _triton_launchers() -> Launchers:
    from spacache_kernels.kernels import attention, gather_linear, rmsnorm, scatter

    if _linear.AUTO_TORCH_GATHER_MAX_ROWS is None:  # impl="auto" always picks the fused kernel
        linear, swiglu = gather_linear.gather_linear_fused, gather_linear.gather_swiglu_fused
    else:  # the per-call row-count choice of impl="auto" stays with the public op

        def linear(x, idx, w, b, rope=None, positions=None, rope_cols=None):
            return _linear.gather_linear(
                x, idx, w, b, rope=rope, positions=positions, rope_cols=rope_cols, backend="triton",
                check_indices=False,
            )  # fmt: skip

        def swiglu(x, idx, w_gate, w_up):
            return _linear.gather_swiglu(x, idx, w_gate, w_up, backend="triton", check_indices=False)

    return Launchers(
        backend="triton",
        rms_norm=lambda x, w, eps: rmsnorm.rms_norm(x, w, eps, None),
        linear=linear,
        swiglu=swiglu,
        attention=lambda q, k, v, pad, prob_rows: attention.sparse_attention(q, k, v, pad, None, prob_rows),
        scatter_rows_=scatter.scatter_rows,
        scatter_residual=scatter.scatter_residual,
    )


def launchers_for(backend: str | None, *tensors: torch.Tensor, head_dim: int | None = None) -> Launchers:
    """The launchers of ``backend`` ("auto" | "triton" | "torch" | None) resolved once for
    ``tensors`` (the model's weights), as the public ops would resolve it on each call. ``head_dim``:
    checked against the Triton attention kernel's limit here, once, instead of per call."""
    name = resolve_backend(backend, *tensors)
    if name == "torch":
        return _torch_launchers()
    from spacache_kernels.ops.attention import MAX_TRITON_HEAD_DIM

    if head_dim is not None and head_dim > MAX_TRITON_HEAD_DIM:
        raise ValueError(
            f"q: the Triton backend supports head dim Dh <= {MAX_TRITON_HEAD_DIM}, got {head_dim}; "
            "use backend='torch'"
        )
    return _triton_launchers()


__all__ = ["Launchers", "launchers_for"]
