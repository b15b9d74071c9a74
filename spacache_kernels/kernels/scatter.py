"""Row scatter into a cache, and the scatter fused with the residual add (SPA-Cache's layer output).

Launchers take raw tensors and do not validate (the op layer, :mod:`spacache_kernels.ops.scatter`,
does). Indices must be in range and distinct within a batch row; with repeats the winning row is
unspecified (as for ``torch.Tensor.scatter_``) but ``cache`` and ``out`` agree on it.

* :func:`scatter_rows`: ``cache[b, idx[b, j], :] = src[b, j, :]`` in place. One program per tile of
  ``BLOCK_R`` flattened ``(b, j)`` rows x ``BLOCK_N`` columns; ``src`` is cast to the cache dtype on
  store.
* :func:`scatter_residual`: the same scatter, then ``out = x + cache`` over all ``(B, L, n)`` in one
  pass that never re-reads the rows it just wrote. Two launches:

  1. ``_slot_kernel`` (tiny): ``slot[b, idx[b, j]] = j`` into an *uninitialised* ``(B, L)`` int32
     buffer, so no fill kernel is needed. Positions not in ``idx`` hold garbage; the main kernel
     tells them apart with the sparse-set test ``0 <= slot < k and idx[b, slot] == l``, which holds
     exactly when ``l`` is selected (then at slot ``slot``), whatever the garbage was.
  2. ``_scatter_residual_kernel``: one program per (``BLOCK_L`` positions, ``BLOCK_N`` columns,
     batch row). A selected row reads ``src``, stores it (cast) into ``cache`` and adds it to ``x``;
     an unselected row reads ``cache``. Masks are disjoint, so each cache element is either read or
     written, never both.

Roofline (bytes), with ``e_x``, ``e_c``, ``e_s``, ``e_i`` the element sizes of ``x``/``out``,
``cache``, ``src``, ``idx``::

    scatter_rows:      B*k*n*(e_s + e_c)                 (read src rows, write cache rows)
                     + B*k*e_i                           (idx)
    scatter_residual:  B*L*n*e_x                         (read x)
                     + B*(L-k)*n*e_c + B*k*n*e_c         (read unselected cache rows, write selected)
                     + B*k*n*e_s                         (read src rows)
                     + B*L*n*e_x                         (write out)
                     + 2*B*k*e_i + B*k*4 + B*L*4         (idx twice, slot written and read: tiny)
                     = B*n*(2*L*e_x + L*e_c + k*e_s) + O(B*L)

The unfused alternative (scatter, then ``x + cache``) re-reads the ``k`` rows it wrote: ``B*k*n*e_c``
more, i.e. 3.5 vs 3.25 row-passes at ``k = L/4`` in one dtype (7% fewer bytes fused) and 4 vs 3.5 at
``k = L/2`` (12.5%). The torch reference (``scatter_`` with an expanded int64 index, then fp32
upcasts of ``x`` and ``cache``, add, downcast) moves several times more.

Tile sizes are autotuned on a GPU (the first config alone under ``TRITON_INTERPRET=1``, where its
small tiles exercise the boundary masks). Both in-place kernels are idempotent under re-runs (the
cache rows receive the same ``src``), except when ``out`` aliases ``x``; ``restore_value`` covers it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spacache_kernels.kernels._config import autotune_configs, device_guard, next_pow2

# (rows per program, columns per program, warps). The row tile is BLOCK_R in the scatter kernel and
# BLOCK_L in the residual kernel: both stream the same (rows, n) tiles. First config: the
# interpreter's (small tiles: 37 positions / 100 columns span several tiles).
_TILES = [
    (4, 64, 4), (1, 1024, 4), (2, 1024, 4), (4, 1024, 8), (4, 512, 4), (8, 512, 8), (8, 256, 4), (16, 256, 8),
]  # fmt: skip


def _tile_configs(row_block: str) -> list[triton.Config]:
    return [triton.Config({row_block: r, "BLOCK_N": n}, num_warps=w) for r, n, w in _TILES]


_ROWS_CONFIGS = _tile_configs("BLOCK_R")
_RESIDUAL_CONFIGS = _tile_configs("BLOCK_L")
_SLOT_BLOCK = 1024  # indices per program of the slot kernel


@triton.autotune(configs=autotune_configs(_ROWS_CONFIGS), key=["n", "rows_class"])
@triton.jit
def _scatter_rows_kernel(
    cache_ptr,
    idx_ptr,
    src_ptr,
    n_rows,  # B * k
    k,
    n,
    rows_class,  # only an autotune key: next_pow2(B * k), the grid size
    stride_cb,
    stride_cl,
    stride_cn,
    stride_ib,
    stride_ik,
    stride_sb,
    stride_sk,
    stride_sn,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    b = rows // k
    j = rows - b * k
    pos = tl.load(idx_ptr + b * stride_ib + j * stride_ik, mask=row_ok, other=0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    tile_ok = row_ok[:, None] & (cols < n)[None, :]
    src_rows = tl.load(
        src_ptr + (b * stride_sb + j * stride_sk)[:, None] + cols[None, :] * stride_sn, mask=tile_ok
    )
    cache_rows = cache_ptr + (b * stride_cb + pos * stride_cl)[:, None] + cols[None, :] * stride_cn
    tl.store(cache_rows, src_rows.to(cache_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _slot_kernel(slot_ptr, idx_ptr, L, k, stride_ib, stride_ik, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = j < k
    pos = tl.load(idx_ptr + b * stride_ib + j.to(tl.int64) * stride_ik, mask=ok, other=0).to(tl.int64)
    tl.store(slot_ptr + b * L + pos, j, mask=ok)


# restore_value: autotuning re-runs the kernel, and ``out`` may be ``x`` itself (in-place residual);
# the cache writes are idempotent and need no restoring.
@triton.autotune(
    configs=autotune_configs(_RESIDUAL_CONFIGS), key=["n", "rows_class"], restore_value=["out_ptr"]
)
@triton.jit
def _scatter_residual_kernel(
    x_ptr,
    cache_ptr,
    idx_ptr,
    src_ptr,
    slot_ptr,
    out_ptr,
    L,
    k,
    n,
    rows_class,  # only an autotune key: next_pow2(B * L), the grid size
    stride_xb,
    stride_xl,
    stride_xn,
    stride_cb,
    stride_cl,
    stride_cn,
    stride_ib,
    stride_ik,
    stride_sb,
    stride_sk,
    stride_sn,
    stride_ob,
    stride_ol,
    stride_on,
    BLOCK_L: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(2).to(tl.int64)
    pos = tl.program_id(0).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    pos_ok = pos < L
    # Sparse-set membership test against the uninitialised slot buffer (see the module docstring).
    slot = tl.load(slot_ptr + b * L + pos, mask=pos_ok, other=-1)
    slot_ok = pos_ok & (slot >= 0) & (slot < k)
    j = tl.where(slot_ok, slot, 0).to(tl.int64)
    back = tl.load(idx_ptr + b * stride_ib + j * stride_ik, mask=slot_ok, other=-1).to(tl.int64)
    selected = slot_ok & (back == pos)
    kept = pos_ok & (back != pos)  # back is -1 wherever slot_ok is False

    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = (cols < n)[None, :]
    sel_tile = selected[:, None] & col_ok
    kept_tile = kept[:, None] & col_ok
    all_tile = pos_ok[:, None] & col_ok

    new_rows = tl.load(
        src_ptr + (b * stride_sb + j * stride_sk)[:, None] + cols[None, :] * stride_sn,
        mask=sel_tile,
        other=0.0,
    ).to(cache_ptr.dtype.element_ty)
    cache_rows = cache_ptr + (b * stride_cb + pos * stride_cl)[:, None] + cols[None, :] * stride_cn
    tl.store(cache_rows, new_rows, mask=sel_tile)
    old_rows = tl.load(cache_rows, mask=kept_tile, other=0.0)
    # Round src to the cache dtype first (above), exactly as the reference's out = x + cache does.
    delta = tl.where(selected[:, None], new_rows.to(tl.float32), old_rows.to(tl.float32))
    hidden = tl.load(
        x_ptr + (b * stride_xb + pos * stride_xl)[:, None] + cols[None, :] * stride_xn,
        mask=all_tile,
        other=0.0,
    ).to(tl.float32)
    out_rows = out_ptr + (b * stride_ob + pos * stride_ol)[:, None] + cols[None, :] * stride_on
    tl.store(out_rows, (hidden + delta).to(out_ptr.dtype.element_ty), mask=all_tile)


def _new_slot_buffer(n_batch: int, length: int, device: torch.device) -> torch.Tensor:
    """The (B, L) int32 position -> slot map, uninitialised on purpose.

    The main kernel validates every slot it reads (sparse-set test), so no fill launch is needed.
    A separate function so that tests can hand the kernel adversarial garbage.
    """
    return torch.empty((n_batch, length), dtype=torch.int32, device=device)


def scatter_rows(cache: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``cache[b, idx[b, j], :] = src[b, j, :]`` in place (``src`` cast to ``cache``'s dtype).

    cache (B, L, n) float, non-overlapping rows; idx (B, k) int32/int64, distinct values in [0, L)
    per row, any strides; src (B, k, n) float, any strides, sharing no memory with ``cache``.
    All on one device. Returns ``cache``. ``k = 0`` launches nothing.
    """
    n_batch, _, n = cache.shape
    k = idx.shape[1]
    n_rows = n_batch * k
    if n_rows == 0 or n == 0:
        return cache

    def grid(meta):
        return (triton.cdiv(n_rows, meta["BLOCK_R"]), triton.cdiv(n, meta["BLOCK_N"]))

    with device_guard(cache):
        _scatter_rows_kernel[grid](
            cache,
            idx,
            src,
            n_rows,
            k,
            n,
            next_pow2(n_rows),
            *cache.stride(),
            *idx.stride(),
            *src.stride(),
        )
    return cache


def scatter_residual(
    x: torch.Tensor,
    cache: torch.Tensor,
    idx: torch.Tensor,
    src: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``cache[b, idx[b, j]] = src[b, j]`` (in place), then ``out = x + cache``, fused.

    x (B, L, n) float, any strides; cache (B, L, n) float (any float dtype; ``src`` is rounded to
    it before the add, as the reference does), not sharing memory with ``x``, ``src`` or ``out``;
    idx (B, k) int32/int64, distinct values in [0, L) per row, any strides; src (B, k, n) float, any
    strides; out (B, L, n) or None (allocated contiguous in ``x``'s dtype); it may be ``x`` itself.
    All on one device. fp32 math, ``out`` in its own dtype. Returns ``out``.
    """
    n_batch, length, n = x.shape
    k = idx.shape[1]
    if out is None:
        out = torch.empty((n_batch, length, n), dtype=x.dtype, device=x.device)
    if n_batch == 0 or length == 0 or n == 0:
        return out
    slot = _new_slot_buffer(n_batch, length, x.device)

    def grid(meta):
        return (triton.cdiv(length, meta["BLOCK_L"]), triton.cdiv(n, meta["BLOCK_N"]), n_batch)

    with device_guard(x):
        if k > 0:
            block_k = min(_SLOT_BLOCK, next_pow2(k))
            _slot_kernel[(n_batch, triton.cdiv(k, block_k))](
                slot, idx, length, k, *idx.stride(), BLOCK_K=block_k
            )
        _scatter_residual_kernel[grid](
            x,
            cache,
            idx,
            src,
            slot,
            out,
            length,
            k,
            n,
            next_pow2(n_batch * length),
            *x.stride(),
            *cache.stride(),
            *idx.stride(),
            *src.stride(),
            *out.stride(),
        )
    return out
