"""Fused low-rank proxy drift + per-row bottom-k selection (SPA-Cache's token picker).

Two kernels, each with a launcher that takes raw tensors (no validation: the op layer,
:func:`spacache_kernels.ops.proxy.proxy_select`, validates):

* **Kernel A** (:func:`proxy_select_fused`): ``p = hidden @ proj`` (rank ``r``), ``score = cos(p,
  proxy_cache)``, ``proxy_cache <- p``. One program per (block of ``BLOCK_L`` rows, batch row); it
  walks ``d`` in ``BLOCK_D`` tiles accumulating ``p`` in fp32 with ``tl.dot`` (``r`` padded to a power
  of two, at least 16 and at most 256, with masks), then reads the cached proxy rows, writes the fp32
  score, and overwrites the cached rows with ``p``. Each program reads and writes only its own rows, so
  the in-place cache update needs no synchronisation.
* **Kernel B** (:func:`bottom_k_select`): one program per batch row sorts the ``L`` scores (padded to a
  power of two) as int64 keys ``(order-preserving score bits << 32) | position`` so that ties break by
  the lower position, takes the ``k``-th smallest key as a threshold, and writes the positions at or
  under it in ascending position order (a prefix sum gives each its output slot).

Roofline, with ``e`` the element size of ``hidden``/``proj`` and ``c`` that of ``proxy_cache``::

    bytes = B*L*d*e            (read hidden once: the dominant term)
          + d*r*e              (proj; re-read per program, but from L2)
          + 2*B*L*r*c          (read the cached proxy, write the new one)
          + B*L*4              (fp32 scores out)
          + B*k*8              (int64 update_idx out; kernel B re-reads the scores, B*L*4 more)
    FLOPs = 2*B*L*d*r          (the projection; the cosine is O(B*L*r))

At LLaDA-8B shapes (d 4096, r 128, bf16) the arithmetic intensity is ~r = 128 FLOP/byte of ``hidden``,
under an H100's bf16 ridge point (~300), so the fused kernel should be bound by reading ``hidden``.
It is, only when ``hidden`` and ``proj`` share a 16-bit dtype: then ``tl.dot`` runs on tensor cores
with fp32 accumulation. Otherwise (fp32 inputs, mixed dtypes, and always under ``TRITON_INTERPRET=1``
where bf16 arithmetic is wrong) tiles are upcast to fp32 right after loading and multiplied with
``input_precision="ieee"`` (no tf32), which is exact but compute-bound on a GPU.

Selection: kernel B launches one program per batch row, and for small ``L`` it may not beat
``torch.topk`` + ``sort`` (two launches, but well-tuned ones). The op therefore keeps both
(``select="kernel" | "torch"``). Which is faster at the real shapes has **not** been measured: no GPU
was available when this was written; ``bench/test_bench_proxy.py`` times both and the default must be
settled on a GPU.
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

COS_EPS = 1e-8  # matches spacache_kernels.ops.reference.COS_EPS (torch.cosine_similarity's epsilon)
MAX_RANK = 256  # the fp32 (BLOCK_L, BLOCK_R) accumulator must stay in registers
MAX_SELECT_L = 16384  # one program sorts a whole row; beyond this, use torch.topk

# The first config is the one the interpreter uses (autotune_configs keeps only it there).
_FUSED_CONFIGS = [
    triton.Config({"BLOCK_L": 32, "BLOCK_D": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_L": 16, "BLOCK_D": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_L": 32, "BLOCK_D": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_L": 64, "BLOCK_D": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_L": 64, "BLOCK_D": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_L": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_L": 128, "BLOCK_D": 32}, num_warps=8, num_stages=4),
]


# restore_value: autotuning runs the kernel once per config, and each run overwrites the cache it
# reads; without restoring it, every run after the first would score p against itself.
@triton.autotune(
    configs=autotune_configs(_FUSED_CONFIGS),
    key=["n_batch", "L", "d", "r"],
    restore_value=["cache_ptr"],
    # fp32: the (32, 128) fp32 accumulator over 8 warps, 32-wide d steps: no spills on sm_80 / sm_90.
    prune_configs_by=prune_by_target(
        upcast=[triton.Config({"BLOCK_L": 32, "BLOCK_D": 32}, num_warps=8, num_stages=2)]
    ),
)
@triton.jit
def _proxy_fused_kernel(
    hidden_ptr,
    proj_ptr,
    cache_ptr,
    scores_ptr,
    n_batch,  # only an autotune key: the grid size (occupancy) depends on it
    L,
    d,
    r,
    stride_hb,
    stride_hl,
    stride_hd,
    stride_pd,
    stride_pr,
    stride_cb,
    stride_cl,
    stride_cr,
    stride_sb,
    stride_sl,
    EPS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Kernel A: proxy projection, cosine against the cached proxy, cache update.

    No wgmma: the configs with BLOCK_L < 64 use mma.sync. A Hopper warpgroup MMA takes 64 rows per
    warpgroup; these configs serve the weight-bound few-rows case (a few dozen gathered rows), where
    a 64-row tile would mostly multiply masked rows. The configs with BLOCK_L >= 64 use wgmma; the
    autotuner picks on the GPU.
    """
    pid_l = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    row_ok = rows < L
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_R)
    col_ok = cols < r
    offs_d = tl.arange(0, BLOCK_D)

    hidden_rows = hidden_ptr + pid_b * stride_hb + rows64[:, None] * stride_hl
    proj_cols = proj_ptr + cols[None, :].to(tl.int64) * stride_pr
    acc = tl.zeros((BLOCK_L, BLOCK_R), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        dd = (d0 + offs_d).to(tl.int64)
        d_ok = dd < d
        h = tl.load(hidden_rows + dd[None, :] * stride_hd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        # Masked-out proj columns load as 0, so the padded columns of p are exactly 0 and drop out
        # of the dot product and the norms below.
        w = tl.load(proj_cols + dd[:, None] * stride_pd, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            acc = tl.dot(h.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, w, acc)

    cache_ptrs = cache_ptr + pid_b * stride_cb + rows64[:, None] * stride_cl + cols[None, :] * stride_cr
    tile_ok = row_ok[:, None] & col_ok[None, :]
    cached = tl.load(cache_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
    dot = tl.sum(acc * cached, axis=1)
    p_norm = tl.sqrt_rn(tl.sum(acc * acc, axis=1))
    c_norm = tl.sqrt_rn(tl.sum(cached * cached, axis=1))
    score = dot / (tl.maximum(p_norm, EPS) * tl.maximum(c_norm, EPS))
    tl.store(cache_ptrs, acc.to(cache_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(scores_ptr + pid_b * stride_sb + rows64 * stride_sl, score, mask=row_ok)


@triton.jit
def _bottom_k_kernel(
    scores_ptr,
    out_ptr,
    L,
    k,
    stride_sb,
    stride_sl,
    stride_ob,
    stride_ok,
    BLOCK: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pos = tl.arange(0, BLOCK)
    valid = pos < L
    score = tl.load(scores_ptr + pid_b * stride_sb + pos.to(tl.int64) * stride_sl, mask=valid, other=0.0)
    score = score.to(tl.float32)
    # -0.0 and +0.0 must tie, as they do in torch.topk.
    score = tl.where(score == 0.0, 0.0, score)
    bits = score.to(tl.int32, bitcast=True)
    # Signed int32 that orders like the float: for negative floats reverse the magnitude bits.
    # (Signed rather than the usual unsigned map so that the int64 key below compares correctly
    # under tl.sort's signed comparison.)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    # NaN ranks above +inf, as in torch.topk(largest=False); padding lanes take the same top value
    # and, their positions being >= L, sort after every real score, so the k <= L smallest keys
    # are always real positions.
    ordered = tl.where((score != score) | (pos >= L), 0x7FFFFFFF, ordered)
    key = (ordered.to(tl.int64) << 32) | pos.to(tl.int64)
    ranked = tl.sort(key)
    # Keys are distinct (the position is in them), so exactly k keys are <= the k-th smallest.
    kth = tl.sum(tl.where(pos == k - 1, ranked, 0), axis=0)
    chosen = (key <= kth) & valid
    slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    tl.store(out_ptr + pid_b * stride_ob + slot.to(tl.int64) * stride_ok, pos.to(tl.int64), mask=chosen)


def proxy_select_fused(
    hidden: torch.Tensor, proj: torch.Tensor, proxy_cache: torch.Tensor, scores_out: torch.Tensor
) -> torch.Tensor:
    """``p = hidden @ proj``; ``scores_out = cos(p, proxy_cache)``; ``proxy_cache <- p`` (in place).

    hidden (B, L, d) float, any strides; proj (d, r) float, any strides, ``r <= 256``;
    proxy_cache (B, L, r) float (any float dtype: ``p`` is cast to it on store); scores_out (B, L)
    fp32. All on one device. Returns ``scores_out``.
    """
    n_batch, length, d = hidden.shape
    r = proj.shape[1]
    block_r = max(16, next_pow2(r))  # tl.dot needs every dim >= 16
    if block_r > MAX_RANK:
        raise ValueError(f"proj: the Triton kernel supports rank r <= {MAX_RANK}, got r = {r}")
    if n_batch == 0 or length == 0:
        return scores_out
    # Native 16-bit tl.dot only when both operands share that dtype and a real GPU runs it.
    upcast = interpreting() or hidden.dtype != proj.dtype or hidden.dtype == torch.float32

    def grid(meta):
        return (triton.cdiv(length, meta["BLOCK_L"]), n_batch)

    with device_guard(hidden):
        _proxy_fused_kernel[grid](
            hidden,
            proj,
            proxy_cache,
            scores_out,
            n_batch,
            length,
            d,
            r,
            *hidden.stride(),
            *proj.stride(),
            *proxy_cache.stride(),
            *scores_out.stride(),
            EPS=COS_EPS,
            BLOCK_R=block_r,
            UPCAST=upcast,
        )
    return scores_out


def bottom_k_select(scores: torch.Tensor, k: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of the ``k`` lowest scores per row, ascending; ties go to the lower position.

    scores (B, L) float (any strides), ``0 <= k <= L <= MAX_SELECT_L``; out (B, k) int64 or None
    (allocated). Returns ``out`` (B, k) int64. ``k = 0`` launches nothing.
    """
    n_batch, length = scores.shape
    if out is None:
        out = torch.empty((n_batch, k), dtype=torch.int64, device=scores.device)
    if length > MAX_SELECT_L:
        raise ValueError(f"scores: the selection kernel supports L <= {MAX_SELECT_L}, got L = {length}")
    if k == 0 or n_batch == 0:
        return out
    # >= 16 lanes: very short sorts are the least exercised path of tl.sort across Triton versions.
    block = max(16, next_pow2(length))
    with device_guard(scores):
        _bottom_k_kernel[(n_batch,)](
            scores,
            out,
            length,
            k,
            *scores.stride(),
            *out.stride(),
            BLOCK=block,
            num_warps=4 if block <= 2048 else 8,
        )
    return out
