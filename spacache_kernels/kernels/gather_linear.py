"""Gather GEMMs: ``Y[b, j] = X[b, idx[b, j]] @ W^T (+ bias)``, with a RoPE or SwiGLU epilogue.

Three kernels share one tiling and one gathered-row loader (launchers take raw tensors and do not
validate; :mod:`spacache_kernels.ops.linear` does):

* :func:`gather_linear_fused` (plain): the output is tiled over the flattened ``(b, j)`` row space
  (``M = B*k`` rows, ``BLOCK_M`` per tile) and the ``n`` output columns (``BLOCK_N``), reducing over
  ``d`` in ``BLOCK_K`` steps with an fp32 accumulator. Each tile loads ``idx[b, j]`` for its rows once
  and then reads ``X[b, idx[b, j], k0:k0+BLOCK_K]`` straight through it, so the gathered ``(B, k, d)``
  activation is never materialized. ``idx=None`` (constexpr ``HAS_IDX=False``) reads row ``j``.
  Tiles are launched in ``GROUP_M`` super-rows so that consecutive programs reuse weight tiles in L2.
* RoPE epilogue (same launcher, ``rope=(cos, sin)``): rotate-half needs, for output column ``c`` of a
  head, its partner ``c +- Dh/2``, which lives in another lane of the accumulator. Instead of shuffling
  registers, the kernel keeps **two accumulators**: ``lo`` over the first-half columns of the heads in
  the tile and ``hi`` over their second-half columns (the weight rows are loaded in that order, so the
  FLOPs and weight bytes equal the plain GEMM's). Lane ``t`` of both is the same rotation pair, and
  the epilogue is elementwise: ``out_lo = lo*cos_lo - hi*sin_lo``, ``out_hi = hi*cos_hi + lo*sin_hi``.
  A tile covers whole heads: ``HEADS`` heads of ``BLOCK_HALF = next_pow2(Dh/2)`` lanes each (lanes past
  ``Dh/2`` are masked, so any even ``Dh`` works, e.g. 24). Positions come from a ``(B, k)`` tensor or,
  when absent, are the gathered row index (``idx[b, j]``, or ``j`` when ``idx`` is None), which is
  :func:`spacache_kernels.ops.reference.default_positions`. ``rope_cols`` limits the rotation to the
  first ``rope_cols / Dh`` heads (K and V in one launch over the fused ``[W_k; W_v]``): the tiling
  stays per head, so a tile may hold rotated and plain heads side by side, and each lane picks its
  head's epilogue (``head < rope_heads``: rotate, else the accumulator as it is; compiled only for
  such launches, constexpr ``PARTIAL``). A rotation pair never crosses a head, so it never crosses
  the K/V boundary either.
* :func:`gather_swiglu_fused`: the same two-accumulator loop with the gate and up weights over the same
  columns, sharing each gathered ``X`` tile; the epilogue writes ``silu(gate) * up``.

Precision: when ``X`` and ``W`` share a 16-bit dtype on a GPU, ``tl.dot`` runs on tensor cores with
fp32 accumulation. Otherwise (fp32, mixed dtypes, and always under ``TRITON_INTERPRET=1`` where 16-bit
arithmetic is wrong) tiles are upcast to fp32 right after loading and multiplied with
``input_precision="ieee"`` (no tf32). Epilogues (bias, RoPE, SiLU) are fp32; the output is rounded once
to its dtype. All offsets are int64.

Roofline, with ``e`` the element size, ``M = B*k`` gathered rows, weight ``(n, d)``::

    FLOPs = 2*B*k*n*d                (x2 for SwiGLU: gate and up)
    bytes = n*d*e                    (weight, read once if the tiles stay in L2; x2 for SwiGLU)
          + B*k*d*e                  (the gathered rows; re-read per column tile, mostly from L2)
          + B*k*n*e                  (output)
          + B*k*(idx size)           (+ positions and 2*B*k*Dh table entries with RoPE)

Arithmetic intensity ~ ``2*M*n*d / (n*d*e) = M`` FLOP/byte for ``e = 2`` when ``M << n, d``: below the
H100 bf16 ridge point (~300 FLOP/B) the op is **bound by reading the weight**, and for few rows
(``M`` below ~128) ``index_select`` + cuBLAS is a strong baseline because the gather is then cheap and
cuBLAS reads the weight at near peak bandwidth. Fusion pays where it also folds in work (RoPE, SwiGLU).
The op (:func:`spacache_kernels.ops.linear.gather_linear`) therefore keeps both behind
``impl="fused" | "torch_gather"``; ``impl="auto"`` means "fused" until GPU measurements
(``bench/test_bench_gather_linear.py``) set the rule. No GPU was available when this was written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spacache_kernels.kernels._config import (
    autotune_configs,
    device_guard,
    interpreting,
    next_pow2,
    prune_by_target,
)

ROPE_MIN_LANES = 64  # lanes per rotation half in one RoPE tile: tl.dot needs >= 16, wider tiles reuse X
GROUP_M = 8  # tiles of rows sharing one weight column band in L2

# First config = the interpreter's (autotune_configs keeps only it there): small, so that masked
# partial tiles show up in the CPU tests at small shapes. The others target Hopper: small BLOCK_M with
# long BLOCK_K for the weight-bound few-rows case (there the grid is ~n / BLOCK_N programs, so narrow
# column tiles keep more of the 132 SMs streaming weight; no split-K yet), large tiles once M is in the
# hundreds.
_LINEAR_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]

# Two accumulators per tile (RoPE halves / SwiGLU gate+up): half the register budget per accumulator.
# RoPE tiles are HEAD_GROUPS * (heads that fill ROPE_MIN_LANES) heads wide; SwiGLU tiles BLOCK_N wide.
_ROPE_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "HEAD_GROUPS": 1, "BLOCK_K": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 16, "HEAD_GROUPS": 1, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 32, "HEAD_GROUPS": 1, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "HEAD_GROUPS": 1, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "HEAD_GROUPS": 1, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "HEAD_GROUPS": 2, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]
_SWIGLU_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]

# fp32 RoPE tiles: a 32-deep K step keeps the two fp32 accumulators and weight tiles in registers.
_ROPE_PRUNE = prune_by_target(
    upcast=[triton.Config({"BLOCK_M": 16, "HEAD_GROUPS": 1, "BLOCK_K": 32}, num_warps=4, num_stages=2)],
    hopper_only=(3, 4),  # spill on sm_80 (44-188 B): the two accumulators need sm_90's registers
    cpu_only=(0,),  # spills 12 B on sm_90 under triton 3.6 (and 4 B on sm_80)
)
_LINEAR_PRUNE = prune_by_target(hopper_only=(3,))  # 64x128 with 4 stages spills 16 B on sm_80 (triton 3.6)
_SWIGLU_PRUNE = prune_by_target(hopper_only=(5,))  # 128x128 spills on sm_80

# The autotune keys bucket the row count to a power of two: k changes per layer and per step, and
# retuning for every distinct M would stall the first steps of a generation.
_KEY = ["m_bucket", "n", "d", "UPCAST"]


# --------------------------------------------------------------------------------------------
# shared pieces (inlined into each kernel)
# --------------------------------------------------------------------------------------------
@triton.jit
def _tile_ids(num_pid_m, num_pid_n, GROUP: tl.constexpr):
    """(pid_m, pid_n) of this program with GROUP row tiles walked per column band (L2 reuse)."""
    pid = tl.program_id(0)
    per_group = GROUP * num_pid_n
    first_m = (pid // per_group) * GROUP
    group_rows = tl.minimum(num_pid_m - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _gathered_rows(
    pid_m, M, rows_per_batch, idx_ptr, stride_ib, stride_ik, HAS_IDX: tl.constexpr, BLOCK_M: tl.constexpr
):
    """For the tile's flattened rows m = b*k + j: (b, j, source row idx[b, j] or j, valid), int64."""
    flat = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = flat < M
    batch = flat // rows_per_batch
    slot = flat % rows_per_batch
    if HAS_IDX:
        src = tl.load(idx_ptr + batch * stride_ib + slot * stride_ik, mask=row_ok, other=0).to(tl.int64)
    else:
        src = slot
    return batch, slot, src, row_ok


@triton.jit
def _mma(acc, a, b, UPCAST: tl.constexpr):
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _dual_gemm(
    x_rows,
    row_ok,
    wa_cols,
    wb_cols,
    col_ok,
    d,
    stride_xd,
    stride_wad,
    stride_wbd,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    LANES: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Two (BLOCK_M, LANES) fp32 products of one gathered X tile with two weight column sets."""
    acc_a = tl.zeros((BLOCK_M, LANES), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, LANES), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    for k0 in range(0, d, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < d
        a = tl.load(x_rows + kk[None, :] * stride_xd, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        wa = tl.load(wa_cols + kk[:, None] * stride_wad, mask=w_mask, other=0.0)
        wb = tl.load(wb_cols + kk[:, None] * stride_wbd, mask=w_mask, other=0.0)
        acc_a = _mma(acc_a, a, wa, UPCAST)
        acc_b = _mma(acc_b, a, wb, UPCAST)
    return acc_a, acc_b


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.autotune(configs=autotune_configs(_LINEAR_CONFIGS), key=_KEY, prune_configs_by=_LINEAR_PRUNE)
@triton.jit
def _gather_linear_kernel(
    x_ptr,
    idx_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    M,
    rows_per_batch,
    n,
    d,
    m_bucket,  # only an autotune key
    stride_xb,
    stride_xl,
    stride_xd,
    stride_ib,
    stride_ik,
    stride_wn,
    stride_wd,
    stride_bn,
    stride_ob,
    stride_ok,
    stride_on,
    HAS_IDX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Plain gathered GEMM tile (module docstring).

    No wgmma: the configs with BLOCK_M < 64 use mma.sync. A Hopper warpgroup MMA takes 64 rows per
    warpgroup; these configs serve the weight-bound few-rows case (a few dozen gathered rows), where
    a 64-row tile would mostly multiply masked rows. The configs with BLOCK_M >= 64 use wgmma; the
    autotuner picks on the GPU.
    """
    pid_m, pid_n = _tile_ids(tl.cdiv(M, BLOCK_M), tl.cdiv(n, BLOCK_N), GROUP)
    batch, slot, src, row_ok = _gathered_rows(
        pid_m, M, rows_per_batch, idx_ptr, stride_ib, stride_ik, HAS_IDX, BLOCK_M
    )
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n

    x_rows = x_ptr + batch[:, None] * stride_xb + src[:, None] * stride_xl
    w_cols = w_ptr + cols[None, :] * stride_wn
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < d
        a = tl.load(x_rows + kk[None, :] * stride_xd, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_cols + kk[:, None] * stride_wd, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _mma(acc, a, w, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols * stride_bn, mask=col_ok, other=0.0).to(tl.float32)[None, :]

    out = out_ptr + batch[:, None] * stride_ob + slot[:, None] * stride_ok + cols[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.autotune(configs=autotune_configs(_ROPE_CONFIGS), key=_KEY + ["half"], prune_configs_by=_ROPE_PRUNE)
@triton.jit
def _gather_linear_rope_kernel(
    x_ptr,
    idx_ptr,
    w_ptr,
    bias_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    out_ptr,
    M,
    rows_per_batch,
    n,
    d,
    m_bucket,  # only an autotune key
    n_heads,
    rope_heads,  # heads [0, rope_heads) are rotated, the rest are written as computed
    half,
    stride_xb,
    stride_xl,
    stride_xd,
    stride_ib,
    stride_ik,
    stride_wn,
    stride_wd,
    stride_bn,
    stride_cp,
    stride_cd,
    stride_sp,
    stride_sd,
    stride_pb,
    stride_pk,
    stride_ob,
    stride_ok,
    stride_on,
    HAS_IDX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_POS: tl.constexpr,
    PARTIAL: tl.constexpr,  # rope_heads < n_heads
    UPCAST: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BASE_HEADS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_GROUPS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Gathered GEMM with the RoPE epilogue: lo / hi accumulators (module docstring).

    No wgmma: the configs with BLOCK_M < 64 use mma.sync. A Hopper warpgroup MMA takes 64 rows per
    warpgroup; these configs serve the weight-bound few-rows case (a few dozen gathered rows), where
    a 64-row tile would mostly multiply masked rows. The configs with BLOCK_M >= 64 use wgmma; the
    autotuner picks on the GPU.
    """
    HEADS: tl.constexpr = BASE_HEADS * HEAD_GROUPS
    LANES: tl.constexpr = HEADS * BLOCK_HALF
    pid_m, pid_n = _tile_ids(tl.cdiv(M, BLOCK_M), tl.cdiv(n_heads, HEADS), GROUP)
    batch, slot, src, row_ok = _gathered_rows(
        pid_m, M, rows_per_batch, idx_ptr, stride_ib, stride_ik, HAS_IDX, BLOCK_M
    )
    # Lane t <-> rotation pair (head, i): column head*Dh + i in lo, + Dh/2 in hi.
    lane = tl.arange(0, LANES)
    head = pid_n.to(tl.int64) * HEADS + lane // BLOCK_HALF
    pair = (lane % BLOCK_HALF).to(tl.int64)
    col_ok = (pair < half) & (head < n_heads)
    col_lo = head * (2 * half) + pair
    col_hi = col_lo + half

    x_rows = x_ptr + batch[:, None] * stride_xb + src[:, None] * stride_xl
    lo, hi = _dual_gemm(
        x_rows,
        row_ok,
        w_ptr + col_lo[None, :] * stride_wn,
        w_ptr + col_hi[None, :] * stride_wn,
        col_ok,
        d,
        stride_xd,
        stride_wd,
        stride_wd,
        UPCAST,
        BLOCK_M,
        LANES,
        BLOCK_K,
    )
    if HAS_BIAS:
        lo += tl.load(bias_ptr + col_lo * stride_bn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        hi += tl.load(bias_ptr + col_hi * stride_bn, mask=col_ok, other=0.0).to(tl.float32)[None, :]

    if HAS_POS:
        pos = tl.load(pos_ptr + batch * stride_pb + slot * stride_pk, mask=row_ok, other=0).to(tl.int64)
    else:
        pos = src
    tile_ok = row_ok[:, None] & col_ok[None, :]
    rot_ok = tile_ok
    if PARTIAL:
        # Per lane: is its head rotated? The plain heads of a fused K/V launch skip the table reads
        # and keep the accumulator exactly, NaN / inf included. A constexpr branch, so that the
        # all-heads launches (Q, K alone) compile without it (it costs ~20 registers per thread).
        rotate = head < rope_heads
        rot_ok = tile_ok & rotate[None, :]
    cos_rows = cos_ptr + pos[:, None] * stride_cp
    sin_rows = sin_ptr + pos[:, None] * stride_sp
    cos_lo = tl.load(cos_rows + pair[None, :] * stride_cd, mask=rot_ok, other=0.0).to(tl.float32)
    cos_hi = tl.load(cos_rows + (pair + half)[None, :] * stride_cd, mask=rot_ok, other=0.0).to(tl.float32)
    sin_lo = tl.load(sin_rows + pair[None, :] * stride_sd, mask=rot_ok, other=0.0).to(tl.float32)
    sin_hi = tl.load(sin_rows + (pair + half)[None, :] * stride_sd, mask=rot_ok, other=0.0).to(tl.float32)
    out_lo = lo * cos_lo - hi * sin_lo
    out_hi = hi * cos_hi + lo * sin_hi
    if PARTIAL:
        out_lo = tl.where(rotate[None, :], out_lo, lo)
        out_hi = tl.where(rotate[None, :], out_hi, hi)

    out_rows = out_ptr + batch[:, None] * stride_ob + slot[:, None] * stride_ok
    out_ty = out_ptr.dtype.element_ty
    tl.store(out_rows + col_lo[None, :] * stride_on, out_lo.to(out_ty), mask=tile_ok)
    tl.store(out_rows + col_hi[None, :] * stride_on, out_hi.to(out_ty), mask=tile_ok)


@triton.autotune(configs=autotune_configs(_SWIGLU_CONFIGS), key=_KEY, prune_configs_by=_SWIGLU_PRUNE)
@triton.jit
def _gather_swiglu_kernel(
    x_ptr,
    idx_ptr,
    wg_ptr,
    wu_ptr,
    out_ptr,
    M,
    rows_per_batch,
    n,
    d,
    m_bucket,  # only an autotune key
    stride_xb,
    stride_xl,
    stride_xd,
    stride_ib,
    stride_ik,
    stride_gn,
    stride_gd,
    stride_un,
    stride_ud,
    stride_ob,
    stride_ok,
    stride_on,
    HAS_IDX: tl.constexpr,
    UPCAST: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Gathered gate and up GEMMs sharing the X tile, SwiGLU epilogue (module docstring).

    No wgmma: the configs with BLOCK_M < 64 use mma.sync. A Hopper warpgroup MMA takes 64 rows per
    warpgroup; these configs serve the weight-bound few-rows case (a few dozen gathered rows), where
    a 64-row tile would mostly multiply masked rows. The configs with BLOCK_M >= 64 use wgmma; the
    autotuner picks on the GPU.
    """
    pid_m, pid_n = _tile_ids(tl.cdiv(M, BLOCK_M), tl.cdiv(n, BLOCK_N), GROUP)
    batch, slot, src, row_ok = _gathered_rows(
        pid_m, M, rows_per_batch, idx_ptr, stride_ib, stride_ik, HAS_IDX, BLOCK_M
    )
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n
    x_rows = x_ptr + batch[:, None] * stride_xb + src[:, None] * stride_xl
    gate, up = _dual_gemm(
        x_rows,
        row_ok,
        wg_ptr + cols[None, :] * stride_gn,
        wu_ptr + cols[None, :] * stride_un,
        col_ok,
        d,
        stride_xd,
        stride_gd,
        stride_ud,
        UPCAST,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
    )
    act = gate / (1.0 + tl.exp(-gate)) * up  # silu(gate) * up; exp overflow -> inf -> gate/inf = -0
    out = out_ptr + batch[:, None] * stride_ob + slot[:, None] * stride_ok + cols[None, :] * stride_on
    tl.store(out, act.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def _upcast(*tensors: torch.Tensor) -> bool:
    # Native 16-bit tl.dot only when every operand shares that dtype and a real GPU runs it.
    dtypes = {t.dtype for t in tensors}
    return interpreting() or len(dtypes) > 1 or torch.float32 in dtypes


def _idx_args(idx: torch.Tensor | None, x: torch.Tensor):
    # A dummy pointer (never read: HAS_IDX=False) keeps the signature fixed.
    if idx is None:
        return x, 0, 0
    return (idx, *idx.stride())


def _output(out: torch.Tensor | None, x: torch.Tensor, rows: int, n: int) -> torch.Tensor:
    if out is None:
        out = torch.empty((x.shape[0], rows, n), dtype=x.dtype, device=x.device)
    return out


def gather_linear_fused(
    x: torch.Tensor,
    idx: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    positions: torch.Tensor | None = None,
    rope_cols: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[b, j] = x[b, idx[b, j]] @ weight.T (+ bias)``, then RoPE per head when ``rope`` is given.

    x (B, L, d) float, any strides; idx (B, k) int32/int64 in [0, L) (repeats allowed) or None (k = L,
    row j); weight (n, d), any strides; bias (n,) or None; rope = (cos, sin), each (P, Dh) float with
    Dh even and n % Dh == 0; positions (B, k) int in [0, P) or None (the gathered row index, as
    :func:`~spacache_kernels.ops.reference.default_positions`); rope_cols: with rope, rotate only the
    columns ``[0, rope_cols)`` (a multiple of Dh in (0, n]), None = all; out (B, k, n) or None
    (allocated, x's dtype), any strides, must not overlap the inputs. All on one device. Returns ``out``.
    """
    n_batch, length, d = x.shape
    rows = length if idx is None else idx.shape[1]
    n = weight.shape[0]
    out = _output(out, x, rows, n)
    m_total = n_batch * rows
    if m_total == 0 or n == 0:
        return out
    has_bias = bias is not None
    bias_arg, bias_stride = (bias, bias.stride(0)) if has_bias else (weight, 0)
    upcast = _upcast(x, weight)
    idx_ptr, *idx_strides = _idx_args(idx, x)
    common = dict(HAS_IDX=idx is not None, HAS_BIAS=has_bias, UPCAST=upcast, GROUP=GROUP_M)

    with device_guard(x):
        if rope is None:

            def grid(meta):
                return (triton.cdiv(m_total, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

            _gather_linear_kernel[grid](
                x,
                idx_ptr,
                weight,
                bias_arg,
                out,
                m_total,
                rows,
                n,
                d,
                next_pow2(m_total),
                *x.stride(),
                *idx_strides,
                *weight.stride(),
                bias_stride,
                *out.stride(),
                **common,
            )
            return out

        cos, sin = rope
        head_dim = cos.shape[-1]
        half = head_dim // 2
        n_heads = n // head_dim
        rope_heads = n_heads if rope_cols is None else rope_cols // head_dim
        block_half = next_pow2(half)
        base_heads = max(1, ROPE_MIN_LANES // block_half)
        has_pos = positions is not None
        pos_arg, pos_strides = (positions, positions.stride()) if has_pos else (x, (0, 0))

        def rope_grid(meta):
            heads = base_heads * meta["HEAD_GROUPS"]
            return (triton.cdiv(m_total, meta["BLOCK_M"]) * triton.cdiv(n_heads, heads),)

        _gather_linear_rope_kernel[rope_grid](
            x,
            idx_ptr,
            weight,
            bias_arg,
            cos,
            sin,
            pos_arg,
            out,
            m_total,
            rows,
            n,
            d,
            next_pow2(m_total),
            n_heads,
            rope_heads,
            half,
            *x.stride(),
            *idx_strides,
            *weight.stride(),
            bias_stride,
            *cos.stride(),
            *sin.stride(),
            *pos_strides,
            *out.stride(),
            HAS_POS=has_pos,
            PARTIAL=rope_heads < n_heads,
            BLOCK_HALF=block_half,
            BASE_HEADS=base_heads,
            **common,
        )
    return out


def gather_swiglu_fused(
    x: torch.Tensor,
    idx: torch.Tensor | None,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[b, j] = silu(x_g @ w_gate.T) * (x_g @ w_up.T)`` with ``x_g = x[b, idx[b, j]]``.

    x (B, L, d) float, any strides; idx (B, k) int32/int64 in [0, L) or None (all rows); w_gate and
    w_up (n, d), any strides; out (B, k, n) or None (allocated, x's dtype). Returns ``out``.
    """
    n_batch, length, d = x.shape
    rows = length if idx is None else idx.shape[1]
    n = w_gate.shape[0]
    out = _output(out, x, rows, n)
    m_total = n_batch * rows
    if m_total == 0 or n == 0:
        return out

    def grid(meta):
        return (triton.cdiv(m_total, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    idx_ptr, *idx_strides = _idx_args(idx, x)
    with device_guard(x):
        _gather_swiglu_kernel[grid](
            x,
            idx_ptr,
            w_gate,
            w_up,
            out,
            m_total,
            rows,
            n,
            d,
            next_pow2(m_total),
            *x.stride(),
            *idx_strides,
            *w_gate.stride(),
            *w_up.stride(),
            *out.stride(),
            HAS_IDX=idx is not None,
            UPCAST=_upcast(x, w_gate, w_up),
            GROUP=GROUP_M,
        )
    return out
