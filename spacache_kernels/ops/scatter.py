"""Row scatter into a preallocated cache, and the scatter fused with the residual add.

:func:`scatter_rows_` writes recomputed rows into a cache (e.g. sparse K/V rows into the KV cache);
:func:`scatter_residual` is SPA-Cache's layer output: the recomputed branch rows ``o + f`` go into the
per-layer branch cache and every row gets ``x + branch`` (cached rows reuse their stale branch).

Operators (:mod:`spacache_kernels.ops._library`), all mutating ``cache``:
``torch.ops.spacache.scatter_rows_(cache!, idx, src, backend) -> ()``,
``torch.ops.spacache.scatter_residual(x, cache!, idx, src, backend) -> Tensor`` and
``torch.ops.spacache.scatter_residual_out(x, cache!, idx, src, out!, backend) -> ()`` (also mutates
``out``, which may be ``x``).
"""

from __future__ import annotations

import torch

from spacache_kernels.ops import reference
from spacache_kernels.ops._dispatch import resolve_backend
from spacache_kernels.ops._library import check_op_backend, define
from spacache_kernels.ops._validate import (
    check_contiguous,
    check_disjoint,
    check_float,
    check_index,
    check_same_device,
)


def _scatter_rows_impl(cache, idx, src, backend: str) -> None:
    if check_op_backend(backend) == "torch":
        reference.scatter_rows_(cache, idx, src)
        return
    from spacache_kernels.kernels import scatter as kernels  # imports triton only when needed

    kernels.scatter_rows(cache, idx, src)


def _scatter_residual_impl(x, cache, idx, src, backend: str) -> torch.Tensor:
    if check_op_backend(backend) == "torch":
        return reference.scatter_residual(x, cache, idx, src).contiguous()
    from spacache_kernels.kernels import scatter as kernels

    return kernels.scatter_residual(x, cache, idx, src)


def _scatter_residual_out_impl(x, cache, idx, src, out, backend: str) -> None:
    if check_op_backend(backend) == "torch":
        out.copy_(reference.scatter_residual(x, cache, idx, src))
        return
    from spacache_kernels.kernels import scatter as kernels

    kernels.scatter_residual(x, cache, idx, src, out=out)


SCATTER_ROWS_ = define(
    "scatter_rows_(Tensor(a!) cache, Tensor idx, Tensor src, str backend) -> ()",
    _scatter_rows_impl,
    lambda cache, idx, src, backend: None,
)
SCATTER_RESIDUAL = define(
    "scatter_residual(Tensor x, Tensor(a!) cache, Tensor idx, Tensor src, str backend) -> Tensor",
    _scatter_residual_impl,
    lambda x, cache, idx, src, backend: x.new_empty(x.shape),
)
SCATTER_RESIDUAL_OUT = define(
    "scatter_residual_out(Tensor x, Tensor(a!) cache, Tensor idx, Tensor src, Tensor(b!) out, "
    "str backend) -> ()",
    _scatter_residual_out_impl,
    lambda x, cache, idx, src, out, backend: None,
)


def _check_scatter_args(cache, idx, src) -> tuple[int, int, int, int]:
    """Types, ranks, dtypes and shapes of the scatter arguments (no host sync)."""
    check_float("cache", cache, ndim=3)
    check_contiguous("cache", cache)
    n_batch, length, n = cache.shape
    check_index("idx", idx, batch=n_batch, length=length, check_values=False)
    k = idx.shape[1]
    if k > length:  # impossible for distinct in-range indices; checked even without check_indices
        raise ValueError(f"idx: expected at most L = {length} indices per row, got k = {k}")
    check_float("src", src, ndim=3, shape=(n_batch, k, n))
    return n_batch, length, n, k


def _check_index_values(idx: torch.Tensor, length: int) -> None:
    """Range and distinctness of ``idx`` (reads it back: a host sync), after the device check."""
    check_index("idx", idx, batch=idx.shape[0], length=length, check_values=True, unique=True)


@torch.no_grad()
def scatter_rows_(
    cache: torch.Tensor,
    idx: torch.Tensor,
    src: torch.Tensor,
    *,
    backend: str | None = None,
    check_indices: bool = True,
) -> torch.Tensor:
    """``cache[b, idx[b, j], :] = src[b, j, :]`` in place.

    Args:
        cache: (B, L, n) fp32/fp16/bf16, contiguous; the rows listed in ``idx`` are overwritten,
            every other row is left untouched.
        idx: (B, k) int32/int64, ``k <= L``, values in [0, L), distinct within each batch row, any
            strides.
        src: (B, k, n) fp32/fp16/bf16, any strides, cast to ``cache``'s dtype; must not share memory
            with ``cache``.
        backend: ``"auto" | "triton" | "torch"`` or None (``SPACACHE_BACKEND``, default auto).
        check_indices: verify the range and distinctness of ``idx`` (reads it back to the host: a
            sync). Pass False in the hot path for indices built by the library itself; duplicates then
            leave the winning row unspecified. Skipped while ``torch.compile`` traces or a CUDA graph
            is captured, as is (while compiling) the check that ``src`` shares no memory with ``cache``.

    Returns:
        ``cache`` (mutated by ``torch.ops.spacache.scatter_rows_``).
    """
    _, length, _, _ = _check_scatter_args(cache, idx, src)
    check_same_device(cache=cache, idx=idx, src=src)
    if check_indices:
        _check_index_values(idx, length)
    check_disjoint("src", src, "cache", cache)
    SCATTER_ROWS_(cache, idx, src, resolve_backend(backend, cache, idx, src))
    return cache


@torch.no_grad()
def scatter_residual(
    x: torch.Tensor,
    cache: torch.Tensor,
    idx: torch.Tensor,
    src: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    backend: str | None = None,
    check_indices: bool = True,
) -> torch.Tensor:
    """Scatter ``src`` into ``cache`` (in place), then ``out = x + cache`` over every row.

    ``cache[b, idx[b, j]] = src[b, j]`` (``src`` rounded to ``cache``'s dtype); then
    ``out = x + cache`` in fp32, stored in ``out``'s dtype. The Triton backend does both in one pass
    over the rows (selected rows read ``src``, the others ``cache``).

    Args:
        x: (B, L, n) fp32/fp16/bf16, any strides (the residual stream).
        cache: (B, L, n) fp32/fp16/bf16, contiguous (the per-layer branch cache); must not share
            memory with ``x``, ``src`` or ``out``.
        idx: (B, k) int32/int64, ``k <= L``, values in [0, L), distinct within each batch row.
        src: (B, k, n) fp32/fp16/bf16, any strides (the recomputed branch rows).
        out: (B, L, n) in ``x``'s dtype, contiguous, or None (allocated). May be ``x`` itself (an
            in-place residual update); must not otherwise share memory with ``x``.
        backend: ``"auto" | "triton" | "torch"`` or None (``SPACACHE_BACKEND``, default auto).
        check_indices: as in :func:`scatter_rows_` (the memory overlap checks are skipped while
            ``torch.compile`` traces).

    Returns:
        ``out`` (B, L, n) in ``x``'s dtype: a new contiguous tensor from
        ``torch.ops.spacache.scatter_residual`` when ``out`` is None, else ``out`` itself, written by
        ``torch.ops.spacache.scatter_residual_out``. Both mutate ``cache``.
    """
    n_batch, length, n, _ = _check_scatter_args(cache, idx, src)
    check_float("x", x, shape=(n_batch, length, n))
    if out is not None:
        check_float("out", out, shape=(n_batch, length, n))
        if out.dtype != x.dtype:
            raise TypeError(f"out: expected dtype {x.dtype} (the dtype of x), got {out.dtype}")
        check_contiguous("out", out)
    check_same_device(cache=cache, idx=idx, src=src, x=x, out=out)
    if check_indices:
        _check_index_values(idx, length)
    check_disjoint("src", src, "cache", cache)
    check_disjoint("x", x, "cache", cache)
    if out is not None:
        check_disjoint("out", out, "cache", cache)
        check_disjoint("out", out, "src", src)
        is_x = not torch.compiler.is_compiling() and (
            out.data_ptr() == x.data_ptr() and out.stride() == x.stride()
        )
        if not is_x:
            check_disjoint("out", out, "x", x)

    backend = resolve_backend(backend, x, cache, idx, src, out)
    if out is None:
        return SCATTER_RESIDUAL(x, cache, idx, src, backend)
    SCATTER_RESIDUAL_OUT(x, cache, idx, src, out, backend)
    return out
