"""Standalone rotary embedding (rotate-half convention) at arbitrary positions.

``out[b, s, h] = x[b, s, h] * cos[pos[b, s]] + rotate_half(x[b, s, h]) * sin[pos[b, s]]`` with
``rotate_half([x1, x2]) = [-x2, x1]`` over the head dim ``Dh`` (the definition is
:func:`spacache_kernels.ops.reference.apply_rope`). The launcher takes raw tensors and does not validate;
:func:`spacache_kernels.ops.rope.apply_rope` does.

One program handles ``BLOCK_R`` rows of the flattened ``(b, s, h)`` space; lane ``i`` of a row holds the
rotation pair ``(x[i], x[i + Dh/2])`` (``BLOCK_HALF = next_pow2(Dh/2)`` lanes, the excess masked), so
each program reads both halves before writing either and the kernel may run in place (``out=x``).
The gathered GEMM has the same rotation as a fused epilogue
(:func:`spacache_kernels.kernels.gather_linear.gather_linear_fused` with ``rope=``); this kernel is for
tensors that do not come out of that GEMM.

Roofline (``e`` the element size of ``x``, ``t`` of the tables): bandwidth-bound,
``bytes = 2*B*S*H*Dh*e`` (read x, write out) ``+ B*S*(pos size) + 2*B*S*Dh*t`` (the table rows, read
once per (b, s) from DRAM, then from cache for the other heads); ~``3*B*S*H*Dh`` FLOPs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spacache_kernels.kernels._config import device_guard, next_pow2

TILE_ELEMENTS = 4096  # rows x lanes per program: enough bytes in flight per SM, few registers each


@triton.jit
def _rope_kernel(
    x_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    R,
    S,
    H,
    half,
    stride_xb,
    stride_xs,
    stride_xh,
    stride_xd,
    stride_pb,
    stride_ps,
    stride_cp,
    stride_cd,
    stride_sp,
    stride_sd,
    stride_ob,
    stride_os,
    stride_oh,
    stride_od,
    BLOCK_R: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    head = rows % H
    seq = (rows // H) % S
    batch = rows // (H * S)
    pair = tl.arange(0, BLOCK_HALF).to(tl.int64)
    tile_ok = row_ok[:, None] & (pair < half)[None, :]

    pos = tl.load(pos_ptr + batch * stride_pb + seq * stride_ps, mask=row_ok, other=0).to(tl.int64)
    x_rows = x_ptr + (batch * stride_xb + seq * stride_xs + head * stride_xh)[:, None]
    x_lo = tl.load(x_rows + pair[None, :] * stride_xd, mask=tile_ok, other=0.0).to(tl.float32)
    x_hi = tl.load(x_rows + (pair + half)[None, :] * stride_xd, mask=tile_ok, other=0.0).to(tl.float32)
    cos_rows = cos_ptr + pos[:, None] * stride_cp
    sin_rows = sin_ptr + pos[:, None] * stride_sp
    cos_lo = tl.load(cos_rows + pair[None, :] * stride_cd, mask=tile_ok, other=0.0).to(tl.float32)
    cos_hi = tl.load(cos_rows + (pair + half)[None, :] * stride_cd, mask=tile_ok, other=0.0).to(tl.float32)
    sin_lo = tl.load(sin_rows + pair[None, :] * stride_sd, mask=tile_ok, other=0.0).to(tl.float32)
    sin_hi = tl.load(sin_rows + (pair + half)[None, :] * stride_sd, mask=tile_ok, other=0.0).to(tl.float32)
    out_lo = x_lo * cos_lo - x_hi * sin_lo
    out_hi = x_hi * cos_hi + x_lo * sin_hi

    out_rows = out_ptr + (batch * stride_ob + seq * stride_os + head * stride_oh)[:, None]
    out_ty = out_ptr.dtype.element_ty
    tl.store(out_rows + pair[None, :] * stride_od, out_lo.to(out_ty), mask=tile_ok)
    tl.store(out_rows + (pair + half)[None, :] * stride_od, out_hi.to(out_ty), mask=tile_ok)


def apply_rope_fused(
    x: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate ``x`` (B, S, H, Dh) at ``positions`` (B, S) with tables ``cos``/``sin`` (P, Dh).

    Any strides for every input; ``Dh`` even; positions int32/int64 in [0, P). ``out`` (B, S, H, Dh)
    or None (allocated in x's dtype); ``out`` may be ``x`` itself (in place) but must not partially
    overlap it. fp32 math, one rounding to ``out``'s dtype. Returns ``out``.
    """
    n_batch, seq, heads, head_dim = x.shape
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = n_batch * seq * heads
    if rows == 0 or head_dim == 0:
        return out
    half = head_dim // 2
    block_half = next_pow2(half)
    block_r = max(1, TILE_ELEMENTS // block_half)
    with device_guard(x):
        _rope_kernel[(triton.cdiv(rows, block_r),)](
            x,
            positions,
            cos,
            sin,
            out,
            rows,
            seq,
            heads,
            half,
            *x.stride(),
            *positions.stride(),
            *cos.stride(),
            *sin.stride(),
            *out.stride(),
            BLOCK_R=block_r,
            BLOCK_HALF=block_half,
            num_warps=4,
        )
    return out
