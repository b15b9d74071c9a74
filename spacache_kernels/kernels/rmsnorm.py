"""Row-wise RMSNorm: ``out = x * rsqrt(mean(x^2) + eps) * weight`` over the last dim, fp32 math.

The launcher (:func:`rms_norm`) takes raw tensors; :func:`spacache_kernels.ops.norm.rms_norm`
validates. One program per block of ``BLOCK_R`` rows (several rows when ``d`` is small, so a
program always holds about 4096 elements). For ``d <= MAX_SINGLE_PASS_D`` a row lives in registers
(``BLOCK_D = next_pow2(d)``, masked) and ``x`` is read once; wider rows are walked twice in
``BLOCK_D`` chunks (sum of squares, then normalise), the second read mostly from L2.

Roofline, with ``e_x``, ``e_w``, ``e_o`` the element sizes of ``x``, ``weight``, ``out``::

    bytes = R*d*e_x          (read x once)
          + d*e_w            (weight; re-read per program, from L2)
          + R*d*e_o          (write out)
    FLOPs = 4*R*d            (square, sum, two multiplies): memory-bound everywhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spacache_kernels.kernels._config import device_guard, next_pow2

MAX_SINGLE_PASS_D = 16384  # fp32 row in registers: 16384 / (8 warps * 32 lanes) = 64 values per lane
TILE_ELEMS = 4096  # elements per program when rows are short
LOOP_BLOCK_D = 4096  # chunk width of the two-pass path


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    n_rows,
    d,
    eps,
    stride_xr,
    stride_xd,
    stride_w,
    stride_or,
    stride_od,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = (rows < n_rows)[:, None]
    x_rows = x_ptr + rows[:, None] * stride_xr
    out_rows = out_ptr + rows[:, None] * stride_or
    offs = tl.arange(0, BLOCK_D).to(tl.int64)
    if SINGLE_PASS:
        col_ok = offs < d
        mask = row_ok & col_ok[None, :]
        x = tl.load(x_rows + offs[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        inv_rms = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=1) / d + eps)
        w = tl.load(w_ptr + offs * stride_w, mask=col_ok, other=0.0).to(tl.float32)
        y = x * inv_rms[:, None] * w[None, :]
        tl.store(out_rows + offs[None, :] * stride_od, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + offs
            mask = row_ok & (cols < d)[None, :]
            x = tl.load(x_rows + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
            acc += x * x
        inv_rms = 1.0 / tl.sqrt_rn(tl.sum(acc, axis=1) / d + eps)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + offs
            col_ok = cols < d
            mask = row_ok & col_ok[None, :]
            x = tl.load(x_rows + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols * stride_w, mask=col_ok, other=0.0).to(tl.float32)
            y = x * inv_rms[:, None] * w[None, :]
            tl.store(out_rows + cols[None, :] * stride_od, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
    *,
    block_d: int | None = None,
) -> torch.Tensor:
    """``out = x * rsqrt(mean(x^2, -1) + eps) * weight`` row-wise, fp32 math.

    x (..., d) float (leading dims are flattened: a view when the strides allow, else a copy);
    weight (d,) float, any stride; eps > 0; out (..., d) like ``x`` (its own dtype; leading dims
    must flatten to a view, e.g. contiguous) or None (allocated in ``x``'s dtype). ``block_d``
    forces the chunk width (a power of two); below ``d`` it selects the two-pass path (tests use
    it to reach that path at small ``d``). Returns ``out``.
    """
    d = x.shape[-1]
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows_x = x.reshape(-1, d)
    rows_out = out.view(-1, d)
    n_rows = rows_x.shape[0]
    if n_rows == 0 or d == 0:
        return out
    if block_d is None:
        block_d = next_pow2(d) if d <= MAX_SINGLE_PASS_D else LOOP_BLOCK_D
    single_pass = block_d >= d
    block_r = min(max(1, TILE_ELEMS // block_d), next_pow2(n_rows))
    num_warps = min(max(block_r * block_d // 256, 1), 8)
    with device_guard(x):
        _rms_norm_kernel[(triton.cdiv(n_rows, block_r),)](
            rows_x,
            weight,
            rows_out,
            n_rows,
            d,
            float(eps),
            *rows_x.stride(),
            weight.stride(0),
            *rows_out.stride(),
            BLOCK_R=block_r,
            BLOCK_D=block_d,
            SINGLE_PASS=single_pass,
            num_warps=num_warps,
        )
    return out
