"""Public gather-GEMM ops: ``gather_linear`` (optional bias and RoPE) and ``gather_swiglu``.

Validate, pick a backend (``backend="auto" | "triton" | "torch"``, see
:mod:`spacache_kernels.ops._dispatch`), then run the reference (torch) or, on the triton backend, one
of two implementations chosen by ``impl``:

* ``"fused"``: the Triton gather GEMM (:mod:`spacache_kernels.kernels.gather_linear`), which reads the
  selected rows through ``idx`` and applies bias / RoPE / SwiGLU in its epilogue.
* ``"torch_gather"``: ``index_select`` of the rows (:func:`index_select_rows`), then cuBLAS
  (``torch.nn.functional.linear``) in the input dtype, then RoPE through the standalone Triton kernel
  / SwiGLU in torch. For few rows the op is bound by reading the weight and this baseline is strong
  (docs/kernels.md).
* ``"auto"``: :data:`AUTO_TORCH_GATHER_MAX_ROWS` decides. It is ``None`` (always "fused") because no
  GPU was available to measure the crossover; set it from ``bench/test_bench_gather_linear.py`` on
  the target GPU.

Operators (:mod:`spacache_kernels.ops._library`; both mutate nothing):
``torch.ops.spacache.gather_linear(x, idx?, weight, bias?, cos?, sin?, positions?, backend, impl)``
and ``torch.ops.spacache.gather_swiglu(x, idx?, w_gate, w_up, backend, impl)``, each ``-> Tensor``,
with ``impl`` the resolved ``"fused"`` or ``"torch_gather"`` (ignored by the torch backend).
"""

from __future__ import annotations

import torch

from spacache_kernels.ops import reference
from spacache_kernels.ops._dispatch import resolve_backend
from spacache_kernels.ops._library import check_op_backend, define
from spacache_kernels.ops._validate import (
    check_float,
    check_index,
    check_same_device,
    check_same_dtype,
    check_tensor,
    host_checks_enabled,
)
from spacache_kernels.ops.rope import check_rope_tables

IMPLS = ("auto", "fused", "torch_gather")
# impl="auto" picks "torch_gather" when B*k is at most this many rows; None = always "fused".
# Unmeasured: must be set from GPU benchmarks (see the module docstring).
AUTO_TORCH_GATHER_MAX_ROWS: int | None = None


def index_select_rows(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """``x[b, idx[b, j]]`` (B, k, d) by one ``index_select`` over the flattened (B*L, d) rows.

    The materialized gather of the "torch_gather" baseline: a single contiguous copy, cheaper than
    ``torch.gather`` with an index expanded over d. Falls back to ``torch.gather`` when x's strides
    do not allow the flattening view.
    """
    if idx is None:
        return x
    n_batch, length, d = x.shape
    try:
        flat = x.view(n_batch * length, d)
    except RuntimeError:
        return reference.gather_rows(x, idx)
    offsets = idx.long() + torch.arange(n_batch, device=x.device).mul_(length).unsqueeze(1)
    return flat.index_select(0, offsets.flatten()).view(n_batch, idx.shape[1], d)


def _check_impl(impl) -> str:
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    return impl


def _resolve_impl(impl: str, n_rows: int) -> str:
    if impl != "auto":
        return impl
    if AUTO_TORCH_GATHER_MAX_ROWS is not None and n_rows <= AUTO_TORCH_GATHER_MAX_ROWS:
        return "torch_gather"
    return "fused"


def _check_rows(x, idx, check_indices: bool) -> tuple[int, int, int, int]:
    """x (B, L, d) float and idx (B, k) int in [0, L) (repeats allowed) or None; returns (B, L, d, k)."""
    check_float("x", x, ndim=3)
    n_batch, length, d = x.shape
    if idx is None:
        return n_batch, length, d, length
    check_index("idx", idx, batch=n_batch, length=length, check_values=check_indices, unique=False)
    return n_batch, length, d, idx.shape[1]


def _check_rope(
    rope, positions, idx, rope_cols, *, n: int, n_batch: int, length: int, k: int, check_indices: bool
):
    """Validate the RoPE arguments; returns ``(cos, sin)`` or None."""
    if rope is None:
        if positions is not None:
            raise ValueError("positions: given without rope; positions only place the RoPE rotation")
        if rope_cols is not None:
            raise ValueError("rope_cols: given without rope; it limits the RoPE rotation to some columns")
        return None
    if not isinstance(rope, (tuple, list)) or len(rope) != 2:
        raise TypeError(f"rope: expected a (cos, sin) pair of (P, Dh) tensors, got {type(rope).__name__}")
    cos, sin = rope
    n_pos, head_dim = check_rope_tables(cos, sin, cos_name="rope[0]", sin_name="rope[1]")
    if n % head_dim:
        raise ValueError(f"rope: expected the head dim Dh = {head_dim} to divide the output width n = {n}")
    if rope_cols is not None:
        if isinstance(rope_cols, bool) or not isinstance(rope_cols, int):
            raise TypeError(f"rope_cols: expected an int or None, got {type(rope_cols).__name__}")
        if not 0 < rope_cols <= n or rope_cols % head_dim:
            raise ValueError(
                f"rope_cols: expected a multiple of the head dim Dh = {head_dim} in (0, n = {n}] "
                f"(whole heads are rotated), got {rope_cols}"
            )
    if positions is not None:
        check_index(
            "positions",
            positions,
            batch=n_batch,
            length=n_pos,
            count=k,
            check_values=check_indices,
            unique=False,
        )
    elif idx is None:
        # Positions default to arange(L): a shape fact, checked without reading anything back.
        if length > n_pos:
            raise ValueError(
                f"rope: positions default to arange(L) = 0..{length - 1} but the tables have P = {n_pos} rows"
            )
    elif check_indices and idx.numel() and host_checks_enabled(idx) and int(idx.max()) >= n_pos:
        raise ValueError(
            f"idx: used as the RoPE positions (positions=None), expected indices in [0, {n_pos}) "
            f"(the table rows), got a maximum of {int(idx.max())}"
        )
    return cos, sin


def _check_op_impl(impl: str) -> str:
    if impl not in ("fused", "torch_gather"):
        raise ValueError(
            f"impl: the spacache operators take a resolved impl ('fused', 'torch_gather'), got {impl!r}"
        )
    return impl


def _gather_linear_impl(
    x, idx, weight, bias, cos, sin, positions, rope_cols, backend: str, impl: str
) -> torch.Tensor:
    tables = None if cos is None else (cos, sin)
    if check_op_backend(backend) == "torch":
        return reference.gather_linear(
            x, idx, weight, bias, rope=tables, positions=positions, rope_cols=rope_cols
        ).contiguous()
    if _check_op_impl(impl) == "fused":
        from spacache_kernels.kernels.gather_linear import gather_linear_fused

        return gather_linear_fused(
            x, idx, weight, bias, rope=tables, positions=positions, rope_cols=rope_cols
        )

    out = torch.nn.functional.linear(index_select_rows(x, idx), weight, bias)
    if tables is None or out.numel() == 0:
        return out
    from spacache_kernels.kernels.rope import apply_rope_fused

    n_batch, length, _ = x.shape
    if positions is None:
        positions = reference.default_positions(idx, n_batch, length, x.device)
    head_dim = cos.shape[-1]
    cols = out.shape[2] if rope_cols is None else rope_cols
    heads = out[..., :cols].view(n_batch, out.shape[1], cols // head_dim, head_dim)  # strided if cols < n
    apply_rope_fused(heads, positions, cos, sin, out=heads)  # in place: one pass over the rotated columns
    return out


def _gather_linear_fake(x, idx, weight, bias, cos, sin, positions, rope_cols, backend, impl) -> torch.Tensor:
    rows = x.shape[1] if idx is None else idx.shape[1]
    return x.new_empty((x.shape[0], rows, weight.shape[0]))


def _gather_swiglu_impl(x, idx, w_gate, w_up, backend: str, impl: str) -> torch.Tensor:
    if check_op_backend(backend) == "torch":
        return reference.gather_swiglu(x, idx, w_gate, w_up).contiguous()
    if _check_op_impl(impl) == "fused":
        from spacache_kernels.kernels.gather_linear import gather_swiglu_fused

        return gather_swiglu_fused(x, idx, w_gate, w_up)
    rows = index_select_rows(x, idx)
    gate = torch.nn.functional.linear(rows, w_gate)
    return torch.nn.functional.silu(gate).mul_(torch.nn.functional.linear(rows, w_up))


def _gather_swiglu_fake(x, idx, w_gate, w_up, backend, impl) -> torch.Tensor:
    rows = x.shape[1] if idx is None else idx.shape[1]
    return x.new_empty((x.shape[0], rows, w_gate.shape[0]))


GATHER_LINEAR = define(
    "gather_linear(Tensor x, Tensor? idx, Tensor weight, Tensor? bias, Tensor? cos, Tensor? sin, "
    "Tensor? positions, SymInt? rope_cols, str backend, str impl) -> Tensor",
    _gather_linear_impl,
    _gather_linear_fake,
)
GATHER_SWIGLU = define(
    "gather_swiglu(Tensor x, Tensor? idx, Tensor w_gate, Tensor w_up, str backend, str impl) -> Tensor",
    _gather_swiglu_impl,
    _gather_swiglu_fake,
)


@torch.no_grad()
def gather_linear(
    x: torch.Tensor,
    idx: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    positions: torch.Tensor | None = None,
    rope_cols: int | None = None,
    backend: str | None = None,
    impl: str = "auto",
    check_indices: bool = True,
) -> torch.Tensor:
    """``y[b, j] = x[b, idx[b, j]] @ weight.T (+ bias)``, then optional RoPE per head.

    x (B, L, d) fp32/fp16/bf16, any strides; idx (B, k) int32/int64 in [0, L), repeats allowed, or
    None (all L rows, k = L); weight (n, d) and bias (n,) in x's dtype; rope = (cos, sin), each (P, Dh)
    float with Dh even and dividing n: output head ``h`` (columns ``h*Dh:(h+1)*Dh``) is rotated at
    ``positions`` (B, k) int in [0, P), default ``idx`` (or ``arange(L)`` when idx is None).
    ``rope_cols`` (with rope): rotate only the columns ``[0, rope_cols)``, a multiple of Dh in
    ``(0, n]``; the later columns are the plain GEMM output (K and V in one launch over a fused
    ``[W_k; W_v]`` weight: ``rope_cols = Hkv * Dh``). None: every column.
    ``impl`` picks the triton-backend implementation (module docstring); the torch backend runs
    :func:`spacache_kernels.ops.reference.gather_linear`. ``check_indices=False`` skips the value
    checks on idx/positions (host syncs), as do ``torch.compile`` tracing and CUDA graph capture.
    Returns a new contiguous (B, k, n) tensor in x's dtype (k = 0 gives an empty tensor). Runs
    ``torch.ops.spacache.gather_linear``.
    """
    _check_impl(impl)
    n_batch, length, d, k = _check_rows(x, idx, check_indices)
    check_float("weight", weight, ndim=2, shape=(None, d))
    n = weight.shape[0]
    if bias is not None:
        check_float("bias", bias, ndim=1, shape=(n,))
    check_same_dtype(x=x, weight=weight, bias=bias)
    tables = _check_rope(
        rope, positions, idx, rope_cols, n=n, n_batch=n_batch, length=length, k=k, check_indices=check_indices
    )
    if rope_cols == n:
        rope_cols = None  # every column: the plain RoPE path
    cos, sin = tables if tables is not None else (None, None)
    check_same_device(
        x=x, idx=idx, weight=weight, bias=bias, positions=positions, **{"rope[0]": cos, "rope[1]": sin}
    )

    backend = resolve_backend(backend, x, weight)
    impl = _resolve_impl(impl, n_batch * k)
    return GATHER_LINEAR(x, idx, weight, bias, cos, sin, positions, rope_cols, backend, impl)


@torch.no_grad()
def gather_swiglu(
    x: torch.Tensor,
    idx: torch.Tensor | None,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    *,
    backend: str | None = None,
    impl: str = "auto",
    check_indices: bool = True,
) -> torch.Tensor:
    """``silu(x_g @ w_gate.T) * (x_g @ w_up.T)`` with ``x_g[b, j] = x[b, idx[b, j]]``.

    x (B, L, d) fp32/fp16/bf16, any strides; idx (B, k) int32/int64 in [0, L), repeats allowed, or
    None (all rows); w_gate, w_up (n, d) in x's dtype. ``impl`` and ``check_indices`` as in
    :func:`gather_linear`. Returns a new contiguous (B, k, n) tensor in x's dtype. Runs
    ``torch.ops.spacache.gather_swiglu``.
    """
    _check_impl(impl)
    n_batch, _, d, k = _check_rows(x, idx, check_indices)
    check_float("w_gate", w_gate, ndim=2, shape=(None, d))
    check_tensor("w_up", w_up, shape=tuple(w_gate.shape))
    check_same_dtype(x=x, w_gate=w_gate, w_up=w_up)
    check_same_device(x=x, idx=idx, w_gate=w_gate, w_up=w_up)

    backend = resolve_backend(backend, x, w_gate)
    return GATHER_SWIGLU(x, idx, w_gate, w_up, backend, _resolve_impl(impl, n_batch * k))


__all__ = ["AUTO_TORCH_GATHER_MAX_ROWS", "IMPLS", "gather_linear", "gather_swiglu", "index_select_rows"]
