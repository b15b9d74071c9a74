"""Row scatter into a preallocated cache, and the scatter fused with the residual add.

:func:`scatter_rows_` writes recomputed rows into a cache (e.g. sparse K/V rows into the KV cache);
:func:`scatter_residual` is SPA-Cache's layer output: the recomputed branch rows ``o + f`` go into the
per-layer branch cache and every row gets ``x + branch`` (cached rows reuse their stale branch).
"""

from __future__ import annotations

import torch

from spacache_kernels.ops import reference
from spacache_kernels.ops._dispatch import resolve_backend
from spacache_kernels.ops._validate import (
    check_contiguous,
    check_disjoint,
    check_float,
    check_index,
    check_same_device,
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
            leave the winning row unspecified.

    Returns:
        ``cache``.
    """
    _, length, _, _ = _check_scatter_args(cache, idx, src)
    check_same_device(cache=cache, idx=idx, src=src)
    if check_indices:
        _check_index_values(idx, length)
    check_disjoint("src", src, "cache", cache)
    backend = resolve_backend(backend, cache, idx, src)
    if backend == "torch":
        return reference.scatter_rows_(cache, idx, src)
    from spacache_kernels.kernels import scatter as kernels  # imports triton only when needed

    return kernels.scatter_rows(cache, idx, src)


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
        check_indices: as in :func:`scatter_rows_`.

    Returns:
        ``out`` (B, L, n) in ``x``'s dtype.
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
        is_x = out.data_ptr() == x.data_ptr() and out.stride() == x.stride()
        if not is_x:
            check_disjoint("out", out, "x", x)

    backend = resolve_backend(backend, x, cache, idx, src, out)
    if backend == "torch":
        result = reference.scatter_residual(x, cache, idx, src)
        return result if out is None else out.copy_(result)
    from spacache_kernels.kernels import scatter as kernels  # imports triton only when needed

    return kernels.scatter_residual(x, cache, idx, src, out=out)
