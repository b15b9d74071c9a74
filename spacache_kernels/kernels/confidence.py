"""LM head at selected positions with argmax / Gumbel-max and confidence, never materializing logits.

A diffusion LM decides, at every step, which masked token to commit and how sure it is:
``token = argmax_v z_v`` (or a Gumbel-max sample) and ``confidence = softmax(z)[token]``, with
``z = hidden[b, positions[b, j]] @ lm_head.T``. The (rows, V) logits (V = 126464 for LLaDA) are
never written to memory: each program keeps, per row, an online log-sum-exp and the running best.

Kernels, each behind a launcher that takes raw tensors (no validation:
:func:`spacache_kernels.ops.confidence.token_confidence` validates):

* **Partial kernel**: grid ``(cdiv(rows, BLOCK_M), n_splits)`` over blocks of the flattened
  ``(b, j)`` rows and contiguous vocabulary ranges ("splits", each a multiple of every ``BLOCK_V``).
  It loops over its range in ``BLOCK_V`` tiles; each tile's logits ``h_rows @ W_tile^T`` come from
  ``tl.dot`` over ``d`` in ``BLOCK_D`` chunks (fp32 accumulation). Per row it keeps the running max
  ``m`` and ``l = sum exp(z - m)``, the best score, its token and the raw logit of that token.
  Columns past ``V`` are ``-inf``. Ties go to the lowest vocabulary index (as ``torch.argmax``):
  inside a tile the smallest tied column wins, and a later tile replaces the best only when
  strictly better. With ``temperature > 0`` the score is ``z / temperature + g``,
  ``g = -log(-log(u))``, ``u`` the counter-based uniform of ``reference.counter_uniform`` recomputed
  bit for bit in uint32 arithmetic (``hash_u32``, "lowbias32") from ``(seed, row = b * m + j, v)``,
  or, with per-row seeds, from ``(seed[b], row = j, v)`` (a row's noise then depends on its own seed
  only, not on where it sits in the batch), so the noise costs no memory and matches the torch backend.
* **Combine kernel**: merges the ``n_splits`` partials of each row (log-sum-exp rescaling; the best
  score, lowest token among equal scores since splits are in vocabulary order) and writes
  ``token`` (int64) and ``confidence = exp(best_logit - lse)`` (fp32).

Why the splits: the brief's grid over row blocks alone launches ``cdiv(rows, BLOCK_M)`` programs,
1-2 for a single sequence's 8-32 rows, so a handful of SMs would stream the whole 1 GB LM head.
Splitting the vocabulary gives every SM work while still reading each weight tile once per row
block; ``splits=1`` is the plain row-block grid.

Roofline, with ``e`` the element size and ``rows = B * m``::

    FLOPs = 2 * rows * V * d
    bytes = cdiv(rows, BLOCK_M) * V * d * e   (the LM head, read once per row block)
          + rows * d * e                      (the gathered hidden rows; re-read per vocab tile
                                               from L2, BLOCK_M * d * e per tile)
          + rows * 12                         (token int64 + confidence fp32)

The intensity is ``2 * rows / (cdiv(rows, BLOCK_M) * e)`` FLOP/byte, at most ``BLOCK_M``
(e = 2): for the 8-32 rows of one sequence this is far below an H100's ridge (~300 FLOP/byte), so
the kernel is bound by reading the weight (1.04 GB for d 4096, V 126464 in bf16: ~0.35 ms at
3 TB/s), exactly like cuBLAS on the gathered rows; fusion pays by skipping the (rows, V) logits
round trip, the softmax pass and the noise tensor. Only with hundreds of rows (B = 16 x 32) does it
approach the compute roof.

Precision: fp16/bf16 inputs of one dtype on a GPU use native ``tl.dot`` (fp32 accumulation);
fp32 or mixed inputs, and every input under ``TRITON_INTERPRET=1``, are upcast right after loading
and multiplied with ``input_precision="ieee"``. Nothing is computed in float64.

Status: written without a GPU. Every kernel compiles for sm_90 (checked offline with
``triton.compile``; every config fits in shared memory), and the interpreter tests cover the
arithmetic, but the config list and :func:`default_splits` are untuned guesses until
``bench/test_bench_attention_confidence.py`` has run on a GPU.
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

# A constexpr: compiled kernels may only read globals declared as such (the interpreter does not care).
LOG2E = tl.constexpr(1.4426950408889634)
_U32 = 0xFFFFFFFF
# Every split is a multiple of this, which every config's BLOCK_V divides, so a split never holds a
# partial tile that starts past its end (every tile has at least one real column).
SPLIT_QUANTUM = 256
MAX_SPLITS = 1024  # the combine kernel holds one row block's partials of all splits in registers
MIN_SPLIT_V = 512  # below this a program's weight stream is too short to amortise its h reloads

_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_V": 128, "BLOCK_D": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16, "BLOCK_V": 128, "BLOCK_D": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_V": 256, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_V": 128, "BLOCK_D": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_V": 256, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_V": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_V": 64, "BLOCK_D": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_V": 64, "BLOCK_D": 64}, num_warps=8, num_stages=3),
]


@triton.jit
def _hash_u32(x):
    """lowbias32 on a uint32 tensor (wrapping multiplies): ``reference.hash_u32``."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def _uniform_from_hash(hsh):
    # (h >> 8) < 2^24 converts exactly; the + 0.5 rounds once in fp32, which is what the
    # reference's float64 sum followed by .float() gives too.
    return ((hsh >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # 2^-24


@triton.jit
def _row_keys(seed, rows):
    """``hash(row ^ hash(seed))`` per row (uint32), the per-row half of ``counter_uniform``."""
    seed_h = _hash_u32(seed.to(tl.uint32))
    return _hash_u32(rows.to(tl.uint32) ^ seed_h)


# The grid's second axis is the split count, computed on the host from the row count: the key
# holds the values that decide the best tile shape.
@triton.autotune(
    configs=autotune_configs(_CONFIGS),
    key=["row_bucket", "V", "d", "SAMPLE", "ROW_SEEDS", "UPCAST"],
    # fp32: narrower vocabulary and d steps keep the fp32 tiles and the sampling state in registers.
    prune_configs_by=prune_by_target(
        upcast=[triton.Config({"BLOCK_M": 16, "BLOCK_V": 32, "BLOCK_D": 32}, num_warps=4, num_stages=2)]
    ),
)
@triton.jit(do_not_specialize=["seed", "temperature"])
def _lm_head_partial_kernel(
    hidden_ptr,
    pos_ptr,
    w_ptr,
    part_m_ptr,
    part_l_ptr,
    part_best_ptr,
    part_tok_ptr,
    part_logit_ptr,
    n_rows,
    m,
    V,
    d,
    split_v,
    temperature,
    seed,
    row_seed_ptr,  # (B,) int64 per-row seeds in [0, 2^32) when ROW_SEEDS (else a dummy pointer)
    suppress,  # vocabulary id never chosen (-1: none)
    row_bucket,  # autotune key only
    stride_hb,
    stride_hl,
    stride_hd,
    stride_pb,
    stride_pm,
    stride_wv,
    stride_wd,
    HAS_POS: tl.constexpr,
    SAMPLE: tl.constexpr,
    ROW_SEEDS: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """LM-head partials of one row block over one vocabulary split (module docstring).

    No wgmma: the configs with BLOCK_M < 64 use mma.sync. A Hopper warpgroup MMA takes 64 rows per
    warpgroup; these configs serve the weight-bound few-rows case (a few dozen gathered rows), where
    a 64-row tile would mostly multiply masked rows. The configs with BLOCK_M >= 64 use wgmma; the
    autotuner picks on the GPU.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    b = (rows // m).to(tl.int64)
    j = (rows % m).to(tl.int64)
    if HAS_POS:
        pos = tl.load(pos_ptr + b * stride_pb + j * stride_pm, mask=row_ok, other=0).to(tl.int64)
    else:
        pos = j
    h_rows = hidden_ptr + b * stride_hb + pos * stride_hl
    offs_d = tl.arange(0, BLOCK_D)

    v_lo = pid_s * split_v
    v_hi = tl.minimum(v_lo + split_v, V)
    if SAMPLE:
        if ROW_SEEDS:
            row_seed = tl.load(row_seed_ptr + b, mask=row_ok, other=0)
            row_key = _hash_u32(j.to(tl.uint32) ^ _hash_u32(row_seed.to(tl.uint32)))
        else:
            row_key = _row_keys(seed, rows)

    run_m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    best = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    best_tok = tl.zeros((BLOCK_M,), dtype=tl.int32)
    best_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wv
        acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            dd = (d0 + offs_d).to(tl.int64)
            d_ok = dd < d
            h = tl.load(
                h_rows[:, None] + dd[None, :] * stride_hd, mask=row_ok[:, None] & d_ok[None, :], other=0.0
            )
            w = tl.load(w_cols + dd[:, None] * stride_wd, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                acc = tl.dot(h.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(h, w, acc)
        logits = tl.where(col_ok[None, :], acc, float("-inf"))

        # Online log-sum-exp. The tile's first column is always real (v0 < v_hi), so the new max
        # is finite and exp2(-inf - finite) = 0 handles the first tile.
        new_m = tl.maximum(run_m, tl.max(logits, axis=1))
        run_l = run_l * tl.exp2((run_m - new_m) * LOG2E) + tl.sum(
            tl.exp2((logits - new_m[:, None]) * LOG2E), axis=1
        )
        run_m = new_m

        if SAMPLE:
            hsh = _hash_u32(cols.to(tl.uint32)[None, :] ^ row_key[:, None])
            u = _uniform_from_hash(hsh)
            score = tl.where(col_ok[None, :], logits / temperature - tl.log(-tl.log(u)), float("-inf"))
        else:
            score = logits
        score = tl.where(cols[None, :] == suppress, float("-inf"), score)
        tile_best = tl.max(score, axis=1)
        tile_tok = tl.min(tl.where(score == tile_best[:, None], cols[None, :], 2147483647), axis=1)
        tile_logit = tl.sum(tl.where(cols[None, :] == tile_tok[:, None], logits, 0.0), axis=1)
        better = tile_best > best  # strict: an equal score in a later tile has a higher index
        best = tl.where(better, tile_best, best)
        best_tok = tl.where(better, tile_tok, best_tok)
        best_logit = tl.where(better, tile_logit, best_logit)

    offs = pid_s.to(tl.int64) * n_rows + rows
    tl.store(part_m_ptr + offs, run_m, mask=row_ok)
    tl.store(part_l_ptr + offs, run_l, mask=row_ok)
    tl.store(part_best_ptr + offs, best, mask=row_ok)
    tl.store(part_tok_ptr + offs, best_tok, mask=row_ok)
    tl.store(part_logit_ptr + offs, best_logit, mask=row_ok)


@triton.jit
def _combine_kernel(
    part_m_ptr,
    part_l_ptr,
    part_best_ptr,
    part_tok_ptr,
    part_logit_ptr,
    token_ptr,
    conf_ptr,
    n_rows,
    n_splits,
    stride_tok,
    stride_conf,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    splits = tl.arange(0, BLOCK_S)
    ok = row_ok[:, None] & (splits < n_splits)[None, :]
    offs = splits.to(tl.int64)[None, :] * n_rows + rows[:, None]
    part_m = tl.load(part_m_ptr + offs, mask=ok, other=float("-inf"))
    part_l = tl.load(part_l_ptr + offs, mask=ok, other=0.0)
    part_best = tl.load(part_best_ptr + offs, mask=ok, other=float("-inf"))
    part_tok = tl.load(part_tok_ptr + offs, mask=ok, other=2147483647)
    part_logit = tl.load(part_logit_ptr + offs, mask=ok, other=0.0)

    # Rows past n_rows (all lanes -inf) take max 0 so that no -inf - -inf is ever evaluated.
    run_m = tl.where(row_ok, tl.max(part_m, axis=1), 0.0)
    # Padding split lanes have part_m = -inf, hence a weight exp2(-inf) = 0.
    run_l = tl.sum(tl.where(ok, part_l * tl.exp2((part_m - run_m[:, None]) * LOG2E), 0.0), axis=1)
    best = tl.max(part_best, axis=1)
    # Splits cover increasing vocabulary ranges, so the lowest token among tied splits is the
    # lowest index overall.
    tok = tl.min(tl.where(part_best == best[:, None], part_tok, 2147483647), axis=1)
    logit = tl.sum(tl.where(ok & (part_tok == tok[:, None]), part_logit, 0.0), axis=1)
    conf = tl.exp2((logit - run_m) * LOG2E) / tl.where(row_ok, run_l, 1.0)
    tl.store(token_ptr + rows.to(tl.int64) * stride_tok, tok.to(tl.int64), mask=row_ok)
    tl.store(conf_ptr + rows.to(tl.int64) * stride_conf, conf, mask=row_ok)


@triton.jit(do_not_specialize=["seed"])
def _uniform_kernel(rows_ptr, cols_ptr, out_ptr, n, seed, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    rows = tl.load(rows_ptr + offs, mask=ok, other=0)
    cols = tl.load(cols_ptr + offs, mask=ok, other=0)
    hsh = _hash_u32(cols.to(tl.uint32) ^ _row_keys(seed, rows))
    tl.store(out_ptr + offs, _uniform_from_hash(hsh), mask=ok)


def default_splits(n_rows: int, vocab: int, device: torch.device) -> int:
    """How many vocabulary splits fill the device: about 4 programs per SM over all row blocks.

    Row blocks are counted at 32 rows (a mid-sized config); each split spans at least
    ``MIN_SPLIT_V`` columns. Under the interpreter there is nothing to fill: one split.
    """
    if device.type != "cuda":
        return 1
    return splits_for_sms(n_rows, vocab, torch.cuda.get_device_properties(device).multi_processor_count)


def splits_for_sms(n_rows: int, vocab: int, n_sm: int) -> int:
    """:func:`default_splits` on a device with ``n_sm`` SMs (the compile check uses it offline)."""
    want = triton.cdiv(4 * n_sm, triton.cdiv(n_rows, 32))
    return max(1, min(want, triton.cdiv(vocab, MIN_SPLIT_V), MAX_SPLITS))


def token_confidence(
    hidden: torch.Tensor,
    lm_head: torch.Tensor,
    positions: torch.Tensor | None = None,
    temperature: float = 0.0,
    seed: int | torch.Tensor = 0,
    suppress_token: int | None = None,
    *,
    splits: int | None = None,
    token_out: torch.Tensor | None = None,
    conf_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax (or Gumbel-max sample) of the LM head logits at selected positions, and its probability.

    hidden (B, L, d) float, any strides; lm_head (V, d) float, any strides, ``V >= 1``; positions
    (B, m) int32/int64 in [0, L) or None (all L rows, ``m = L``); temperature >= 0 (0 = argmax);
    seed an int (its low 32 bits are used) or a (B,) int64 tensor of per-row seeds in [0, 2^32) on
    the device of ``hidden`` (the noise of row ``(b, j)`` is then keyed by ``(seed[b], j)``).
    splits: the number of vocabulary ranges processed in parallel (None: :func:`default_splits`;
    rounded so that every range is a whole number of ``SPLIT_QUANTUM`` columns and none is empty).
    token_out (B, m) int64, conf_out (B, m) fp32, or None (allocated). Returns ``(token, confidence)``.
    """
    n_batch, length, d = hidden.shape
    vocab = lm_head.shape[0]
    m = positions.shape[1] if positions is not None else length
    n_rows = n_batch * m
    device = hidden.device
    if token_out is None:
        token_out = torch.empty((n_batch, m), dtype=torch.int64, device=device)
    if conf_out is None:
        conf_out = torch.empty((n_batch, m), dtype=torch.float32, device=device)
    if n_rows == 0:
        return token_out, conf_out
    if vocab == 0:
        raise ValueError("lm_head: expected at least one vocabulary row, got V = 0")

    if splits is None:
        splits = default_splits(n_rows, vocab, device)
    splits = max(1, min(int(splits), MAX_SPLITS))
    split_v = triton.cdiv(triton.cdiv(vocab, splits), SPLIT_QUANTUM) * SPLIT_QUANTUM
    splits = triton.cdiv(vocab, split_v)

    part_m = torch.empty((splits, n_rows), dtype=torch.float32, device=device)
    part_l = torch.empty_like(part_m)
    part_best = torch.empty_like(part_m)
    part_logit = torch.empty_like(part_m)
    part_tok = torch.empty((splits, n_rows), dtype=torch.int32, device=device)
    upcast = interpreting() or hidden.dtype != lm_head.dtype or hidden.dtype == torch.float32
    sample = temperature > 0
    row_seeds = isinstance(seed, torch.Tensor)
    pos = positions if positions is not None else hidden  # dummy pointer when HAS_POS is False
    pos_strides = positions.stride() if positions is not None else (0, 0)

    def grid(meta):
        return (triton.cdiv(n_rows, meta["BLOCK_M"]), splits)

    with device_guard(hidden):
        _lm_head_partial_kernel[grid](
            hidden,
            pos,
            lm_head,
            part_m,
            part_l,
            part_best,
            part_tok,
            part_logit,
            n_rows,
            m,
            vocab,
            d,
            split_v,
            float(temperature) if sample else 1.0,
            0 if row_seeds else int(seed) & _U32,
            seed if row_seeds else hidden,
            -1 if suppress_token is None else int(suppress_token),
            next_pow2(n_rows),
            *hidden.stride(),
            *pos_strides,
            *lm_head.stride(),
            HAS_POS=positions is not None,
            SAMPLE=sample,
            ROW_SEEDS=row_seeds,
            UPCAST=upcast,
        )
        block_s = max(16, next_pow2(splits))
        block_rows = max(1, min(64, 4096 // block_s))
        _combine_kernel[(triton.cdiv(n_rows, block_rows),)](
            part_m,
            part_l,
            part_best,
            part_tok,
            part_logit,
            token_out,
            conf_out,
            n_rows,
            splits,
            token_out.stride(1),
            conf_out.stride(1),
            BLOCK_ROWS=block_rows,
            BLOCK_S=block_s,
            num_warps=4,
        )
    return token_out, conf_out


def counter_uniform(seed: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The kernel's Gumbel uniforms for (row, col) pairs, for checking against the reference.

    rows, cols: int tensors of one shape with values in [0, 2^32) (they are used modulo 2^32).
    Returns fp32 of that shape: ``reference.counter_uniform(seed, rows, cols)`` bit for bit.
    """
    flat_rows = (rows.long() & _U32).to(torch.int64).reshape(-1).contiguous()
    flat_cols = (cols.long() & _U32).to(torch.int64).reshape(-1).contiguous()
    out = torch.empty(flat_rows.shape, dtype=torch.float32, device=rows.device)
    n = out.numel()
    if n:
        with device_guard(rows):
            _uniform_kernel[(triton.cdiv(n, 1024),)](
                flat_rows, flat_cols, out, n, int(seed) & _U32, BLOCK=1024
            )
    return out.view(rows.shape)
