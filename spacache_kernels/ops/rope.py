"""Public rotary-embedding op: validate, pick a backend, run the Triton kernel or the reference.

Operator (:mod:`spacache_kernels.ops._library`): ``torch.ops.spacache.apply_rope(x, positions, cos,
sin, backend) -> Tensor`` (mutates nothing).
"""

from __future__ import annotations

import torch

from spacache_kernels.ops import reference
from spacache_kernels.ops._dispatch import resolve_backend
from spacache_kernels.ops._library import check_op_backend, define
from spacache_kernels.ops._validate import check_float, check_index, check_same_device


def _apply_rope_impl(x, positions, cos, sin, backend: str) -> torch.Tensor:
    if check_op_backend(backend) == "torch":
        return reference.apply_rope(x, positions, cos, sin).contiguous()
    from spacache_kernels.kernels.rope import apply_rope_fused  # imports triton only when needed

    return apply_rope_fused(x, positions, cos, sin)


APPLY_ROPE = define(
    "apply_rope(Tensor x, Tensor positions, Tensor cos, Tensor sin, str backend) -> Tensor",
    _apply_rope_impl,
    lambda x, positions, cos, sin, backend: x.new_empty(x.shape),
)


def check_rope_tables(cos, sin, *, cos_name: str = "cos", sin_name: str = "sin") -> tuple[int, int]:
    """``cos``/``sin``: float (P, Dh) tables of one shape with Dh even and >= 2; returns ``(P, Dh)``."""
    check_float(cos_name, cos, ndim=2)
    check_float(sin_name, sin, ndim=2, shape=tuple(cos.shape))
    n_pos, head_dim = cos.shape
    if head_dim < 2 or head_dim % 2:
        raise ValueError(
            f"{cos_name}: expected an even head dim Dh >= 2 in shape (P, Dh), got {tuple(cos.shape)}"
        )
    return n_pos, head_dim


@torch.no_grad()
def apply_rope(
    x: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    backend: str | None = None,
    check_indices: bool = True,
) -> torch.Tensor:
    """Rotary embedding, rotate-half convention (LLaDA, Qwen2/Dream).

    x (B, S, H, Dh) float, any strides; positions (B, S) int32/int64 in [0, P); cos, sin (P, Dh)
    float tables (any float dtype) with Dh = x's head dim, even. Returns a new contiguous
    (B, S, H, Dh) tensor in x's dtype: ``x * cos[pos] + rotate_half(x) * sin[pos]``,
    ``rotate_half([x1, x2]) = [-x2, x1]`` (fp32 math). ``check_indices=False`` skips the range check
    on ``positions`` (a host sync), as do ``torch.compile`` tracing and CUDA graph capture. Runs
    ``torch.ops.spacache.apply_rope``.
    """
    check_float("x", x, ndim=4)
    n_batch, seq, _, head_dim = x.shape
    n_pos, table_dim = check_rope_tables(cos, sin)
    if table_dim != head_dim:
        raise ValueError(f"cos: expected shape (P, {head_dim}) to match x's head dim, got {tuple(cos.shape)}")
    check_index(
        "positions",
        positions,
        batch=n_batch,
        length=n_pos,
        count=seq,
        check_values=check_indices,
        unique=False,
    )
    check_same_device(x=x, positions=positions, cos=cos, sin=sin)
    return APPLY_ROPE(x, positions, cos, sin, resolve_backend(backend, x, positions, cos, sin))
