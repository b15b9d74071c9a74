"""Flash-style attention of gathered queries against the full K/V cache (bidirectional, GQA, key padding).

SPA-Cache recomputes only ``S`` selected tokens per layer, but each of them attends to every one of
the ``T`` cached keys (prompt + generated, no causal mask). Two kernels, each behind a launcher that
takes raw tensors (no validation: :func:`spacache_kernels.ops.attention.sparse_attention` validates):

* **Main kernel** (:func:`sparse_attention_fwd`): grid ``(cdiv(S, BLOCK_M), B * Hq)``. One program
  holds ``BLOCK_M`` query rows of one (batch, query head) and streams the keys of kv head
  ``h // (Hq // Hkv)`` in ``BLOCK_N`` tiles with an online softmax (running max ``m``, running sum
  ``l`` and the output accumulator in fp32). ``scale * log2(e)`` is folded into the logits so the
  exponentials are ``exp2``. Padding keys (``key_padding`` True) and keys past ``T`` get ``-inf``;
  their V rows are not even loaded, so garbage in unused cache slots cannot leak in through
  ``0 * NaN``. A row with no valid key ends with ``l = 0`` and is written as zeros (the reference's
  ``nan_to_num``). On request it stores each row's base-2 log-sum-exp ``m + log2(l)`` (``-inf`` for
  such rows) in an fp32 (B, Hq, S) buffer.
* **Probability kernel** (:func:`attention_row_probs`): for ``m`` selected query rows per batch
  (Elastic-Cache's attention-drift test needs a few rows of probabilities, never all of them) it
  recomputes those rows' logits tile by tile and writes ``exp2(logit * scale * log2(e) - lse)``:
  the exact softmax, normalised by the main kernel's final log-sum-exp, without a second
  reduction and without an eager (B, Hq, S, T) attention matrix.

Both take arbitrary strides: the caches are usually ``buffer[:, :T]`` slices of a preallocated
(B, T_max, Hkv, Dh) buffer and are read in place.

Roofline, with ``e`` the element size::

    FLOPs = 4 * B * Hq * S * T * Dh          (QK^T and PV, 2 FLOPs per multiply-add each)
    bytes = 2 * B * T * Hkv * Dh * e         (K and V read once: the query heads of one GQA group
                                              re-read their kv head from L2, not DRAM)
          + 2 * B * S * Hq * Dh * e          (q read, out written)
          + B * T                            (key_padding, bool)

Arithmetic intensity ~ ``2 * S * (Hq / Hkv) / e`` FLOP/byte for S << T: with bf16, no GQA (LLaDA)
that is ``S`` FLOP/byte, so ``S = 64`` is bandwidth-bound on an H100 (ridge ~300 FLOP/byte) and
``S = 256`` approaches the compute roof. The probability kernel adds ``2 * B * Hq * m * T * Dh``
FLOPs and writes ``4 * B * m * Hq * T`` bytes.

Precision: fp16/bf16 inputs on a GPU use native ``tl.dot`` with fp32 accumulation (P is cast to V's
dtype for the PV product, as in FlashAttention). fp32 inputs, and every input under
``TRITON_INTERPRET=1`` (where 16-bit arithmetic is wrong), are upcast right after loading and
multiplied with ``input_precision="ieee"`` (no tf32).

Status: written without a GPU. Both kernels compile for sm_90 (checked offline with
``triton.compile``: the first config fits in shared memory for every Dh <= 256 and dtype, the
autotuner drops the ones that do not), and the interpreter tests cover the arithmetic; the config
list is untuned until ``bench/test_bench_attention_confidence.py`` has run on a GPU. The grid gives
each query head its own program, so the heads of one GQA group each stream their kv head (from L2
after the first); packing a group's heads into one program's rows is the next step if that shows.
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

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256  # the (BLOCK_M, Dh) fp32 accumulator and the q tile must stay in registers

# The first config is the interpreter's (autotune_configs keeps only it there).
_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 128}, num_warps=4, num_stages=4),
]


# The best tile depends on how many query tiles there are (occupancy) and how long the key loop is;
# keying on power-of-two buckets of S and T rather than their values keeps a generation, whose S
# changes from layer to layer, from re-tuning at every new budget.
@triton.autotune(
    configs=autotune_configs(_FWD_CONFIGS),
    key=["s_bucket", "t_bucket", "HEAD_DIM", "HAS_PAD", "UPCAST"],
    prune_configs_by=prune_by_target(
        # fp32 q / acc / K tiles of Dh = 128: 16 x 16 is the largest tile without spills on both targets.
        upcast=[triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=2)],
        # sm_80: the 64 x 64 tiles spill (4-8 B), 16 x 128 with 4 stages needs 200 KB of shared
        # memory; it keeps 128 x 64 and 32 x 64.
        hopper_only=(0, 1, 4),
    ),
)
@triton.jit
def _attn_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pad_ptr,
    out_ptr,
    lse_ptr,
    S,
    T,
    n_q_heads,
    group,
    qk_scale,  # scale * log2(e)
    s_bucket,  # autotune key only
    t_bucket,  # autotune key only
    stride_qb,
    stride_qs,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_pb,
    stride_pt,
    stride_ob,
    stride_os,
    stride_oh,
    stride_od,
    stride_lb,
    stride_lh,
    stride_ls,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_PAD: tl.constexpr,
    STORE_LSE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Online-softmax attention of BLOCK_M gathered queries of one (batch, head) over all keys.

    No wgmma: the configs with BLOCK_M < 64 use mma.sync (a warpgroup MMA takes 64 rows). They are
    there for few selected queries per head (S of 16-32), where more programs over the heads beat
    masked 64-row tiles; the BLOCK_M >= 64 configs use wgmma.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_q_heads).to(tl.int64)
    h = pid_bh % n_q_heads
    kv_h = (h // group).to(tl.int64)
    h = h.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < S
    offs_m64 = offs_m.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q_ptrs = (
        q_ptr + b * stride_qb + h * stride_qh + offs_m64[:, None] * stride_qs + offs_d[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    k_base = k_ptr + b * stride_kb + kv_h * stride_kh
    v_base = v_ptr + b * stride_vb + kv_h * stride_vh
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, T, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < T
        offs_n64 = offs_n.to(tl.int64)
        if HAS_PAD:
            pad = tl.load(pad_ptr + b * stride_pb + offs_n64 * stride_pt, mask=key_ok, other=1)
            key_ok = key_ok & (pad == 0)
        k_t = tl.load(
            k_base + offs_n64[None, :] * stride_kt + offs_d[:, None] * stride_kd,
            mask=d_ok[:, None] & key_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            qk = tl.dot(q, k_t.to(tl.float32), input_precision="ieee")
        else:
            qk = tl.dot(q, k_t)
        logits = tl.where(key_ok[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        # While a row has seen only -inf logits its max is -inf; subtracting a 0 instead keeps
        # exp2 at exp2(-inf) = 0 rather than exp2(-inf + inf) = NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(logits - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_base + offs_n64[:, None] * stride_vt + offs_d[None, :] * stride_vd,
            mask=key_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None]
        if UPCAST:
            acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

    empty = l_i == 0.0  # no valid key at all: acc is 0, write zeros
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    out_ptrs = (
        out_ptr + b * stride_ob + h * stride_oh + offs_m64[:, None] * stride_os + offs_d[None, :] * stride_od
    )
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    if STORE_LSE:
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(lse_ptr + b * stride_lb + h * stride_lh + offs_m64 * stride_ls, lse, mask=m_ok)


@triton.jit
def _attn_probs_kernel(
    q_ptr,
    k_ptr,
    pad_ptr,
    lse_ptr,
    rows_ptr,
    probs_ptr,
    n_rows,
    T,
    n_q_heads,
    group,
    qk_scale,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_pb,
    stride_pt,
    stride_lb,
    stride_lh,
    stride_ls,
    stride_rb,
    stride_rm,
    stride_xb,
    stride_xm,
    stride_xh,
    stride_xt,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_PAD: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Exact softmax probabilities of a few query rows, normalised by the main kernel's log-sum-exp.

    No wgmma: one program holds BLOCK_R = 16 tracked rows (a policy tracks one or two per batch
    row), below the 64 rows of a warpgroup MMA, so it uses mma.sync; the kernel is bound by writing
    the fp32 probabilities, not by the QK^T product.
    """
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_q_heads).to(tl.int64)
    h = pid_bh % n_q_heads
    kv_h = (h // group).to(tl.int64)
    h = h.to(tl.int64)

    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < n_rows
    offs_r64 = offs_r.to(tl.int64)
    q_rows = tl.load(rows_ptr + b * stride_rb + offs_r64 * stride_rm, mask=r_ok, other=0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q_ptrs = q_ptr + b * stride_qb + h * stride_qh + q_rows[:, None] * stride_qs + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + q_rows * stride_ls, mask=r_ok, other=0.0)

    k_base = k_ptr + b * stride_kb + kv_h * stride_kh
    out_rows = probs_ptr + b * stride_xb + h * stride_xh + offs_r64[:, None] * stride_xm
    for start_n in range(0, T, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_range = offs_n < T
        key_ok = in_range
        offs_n64 = offs_n.to(tl.int64)
        if HAS_PAD:
            pad = tl.load(pad_ptr + b * stride_pb + offs_n64 * stride_pt, mask=in_range, other=1)
            key_ok = key_ok & (pad == 0)
        k_t = tl.load(
            k_base + offs_n64[None, :] * stride_kt + offs_d[:, None] * stride_kd,
            mask=d_ok[:, None] & key_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            qk = tl.dot(q, k_t.to(tl.float32), input_precision="ieee")
        else:
            qk = tl.dot(q, k_t)
        # Padding keys get exactly 0 (and so do all keys of an all-padding row, whose lse is -inf).
        prob = tl.where(key_ok[None, :], tl.exp2(qk * qk_scale - lse[:, None]), 0.0)
        tl.store(out_rows + offs_n64[None, :] * stride_xt, prob, mask=r_ok[:, None] & in_range[None, :])


def _use_upcast(dtype: torch.dtype) -> bool:
    return interpreting() or dtype == torch.float32


def _padding_view(key_padding: torch.Tensor | None, fallback: torch.Tensor):
    """(pointer tensor, strides) of the padding mask; bool read as uint8 (same bytes, no copy)."""
    if key_padding is None:
        return fallback, (0, 0)
    pad = key_padding.view(torch.uint8) if key_padding.dtype == torch.bool else key_padding
    return pad, pad.stride()


def sparse_attention_fwd(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key_padding: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    out: torch.Tensor | None = None,
    lse_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention output of every query row, optionally with each row's base-2 log-sum-exp.

    q (B, S, Hq, Dh); k_cache, v_cache (B, T, Hkv, Dh), same dtype as q, ``Hq % Hkv == 0``,
    ``Dh <= 256``, any strides; key_padding (B, T) bool (True = ignore) or None; scale (default
    ``Dh ** -0.5``). out (B, S, Hq, Dh) in q's dtype or None (allocated). lse_out (B, Hq, S) fp32 or
    None: when given, receives each row's log-sum-exp of ``scale * q.k`` over its valid keys in base
    2 (the natural one times ``log2(e)``; ``-inf`` for rows with no valid key), as
    :func:`attention_row_probs` expects. Returns ``out``.
    """
    n_batch, n_queries, n_q_heads, head_dim = q.shape
    length, n_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"q: the Triton kernel supports head dim <= {MAX_HEAD_DIM}, got {head_dim}")
    if scale is None:
        scale = head_dim**-0.5
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if n_batch == 0 or n_queries == 0 or n_q_heads == 0 or head_dim == 0:
        return out
    pad, pad_strides = _padding_view(key_padding, q)
    lse_strides = lse_out.stride() if lse_out is not None else (0, 0, 0)

    def grid(meta):
        return (triton.cdiv(n_queries, meta["BLOCK_M"]), n_batch * n_q_heads)

    with device_guard(q):
        _attn_fwd_kernel[grid](
            q,
            k_cache,
            v_cache,
            pad,
            out,
            lse_out if lse_out is not None else out,
            n_queries,
            length,
            n_q_heads,
            n_q_heads // n_kv_heads,
            float(scale) * LOG2E,
            next_pow2(n_queries),
            next_pow2(length),
            *q.stride(),
            *k_cache.stride(),
            *v_cache.stride(),
            *pad_strides,
            *out.stride(),
            *lse_strides,
            HEAD_DIM=head_dim,
            BLOCK_D=max(16, next_pow2(head_dim)),
            HAS_PAD=key_padding is not None,
            STORE_LSE=lse_out is not None,
            UPCAST=_use_upcast(q.dtype),
        )
    return out


def attention_row_probs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    key_padding: torch.Tensor | None,
    lse: torch.Tensor,
    prob_rows: torch.Tensor,
    scale: float | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax probabilities of selected query rows, from the main kernel's log-sum-exp.

    q, k_cache, key_padding, scale as for :func:`sparse_attention_fwd`; lse (B, Hq, S) fp32 filled
    by it (``lse_out``) with the same inputs; prob_rows (B, m) int32/int64 in [0, S).
    out (B, m, Hq, T) fp32 or None (allocated). Returns ``out``; rows with no valid key are zeros.
    """
    n_batch, _, n_q_heads, head_dim = q.shape
    length, n_kv_heads = k_cache.shape[1], k_cache.shape[2]
    n_rows = prob_rows.shape[1]
    if scale is None:
        scale = head_dim**-0.5
    if out is None:
        out = torch.empty((n_batch, n_rows, n_q_heads, length), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    pad, pad_strides = _padding_view(key_padding, q)
    block_r = 16  # tl.dot needs >= 16 rows; m is small (a few tracked rows per batch)
    block_d = max(16, next_pow2(head_dim))
    # fp32 key tiles of Dh >= 128 spill registers (sm_80) or overflow shared memory at 128 keys per tile.
    block_n = 64 if interpreting() or q.element_size() * block_d >= 512 else 128
    with device_guard(q):
        _attn_probs_kernel[(triton.cdiv(n_rows, block_r), n_batch * n_q_heads)](
            q,
            k_cache,
            pad,
            lse,
            prob_rows,
            out,
            n_rows,
            length,
            n_q_heads,
            n_q_heads // n_kv_heads,
            float(scale) * LOG2E,
            *q.stride(),
            *k_cache.stride(),
            *pad_strides,
            *lse.stride(),
            *prob_rows.stride(),
            *out.stride(),
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            HAS_PAD=key_padding is not None,
            UPCAST=_use_upcast(q.dtype),
            BLOCK_R=block_r,
            BLOCK_N=block_n,
            num_warps=4,
            num_stages=2,
        )
    return out


def sparse_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key_padding: torch.Tensor | None = None,
    scale: float | None = None,
    prob_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Both kernels: ``(out (B, S, Hq, Dh) in q's dtype, probs (B, m, Hq, T) fp32 or None)``.

    Shapes and contracts as :func:`sparse_attention_fwd` and :func:`attention_row_probs`; the
    log-sum-exp buffer is allocated (and stored) only when ``prob_rows`` is given.
    """
    n_batch, n_queries, n_q_heads, head_dim = q.shape
    if scale is None:
        scale = head_dim**-0.5
    lse = None
    if prob_rows is not None:
        lse = torch.empty((n_batch, n_q_heads, n_queries), dtype=torch.float32, device=q.device)
    out = sparse_attention_fwd(q, k_cache, v_cache, key_padding, scale, lse_out=lse)
    probs = None
    if prob_rows is not None:
        probs = attention_row_probs(q, k_cache, key_padding, lse, prob_rows, scale)
    return out, probs
