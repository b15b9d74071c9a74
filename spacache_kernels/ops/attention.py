"""Attention of the gathered (recomputed) queries against the full K/V cache.

:func:`sparse_attention` is the attention step of a cached layer: only the ``S`` selected tokens
have fresh queries, but each attends (bidirectionally) to all ``T`` cached keys, with grouped-query
heads and a key padding mask. It can also return the softmax probabilities of a few query rows
(Elastic-Cache's attention-drift test) without building the full attention matrix.

Operator (:mod:`spacache_kernels.ops._library`): ``torch.ops.spacache.sparse_attention(q, k_cache,
v_cache, key_padding?, scale?, prob_rows?, backend) -> (out, probs)`` (mutates nothing); ``probs`` is
(B, m, Hq, T) fp32, with ``m = 0`` when ``prob_rows`` is None (an operator cannot return None; the
public function returns None then).
"""

from __future__ import annotations

import math
import numbers

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
)

MAX_TRITON_HEAD_DIM = 256  # spacache_kernels.kernels.attention.MAX_HEAD_DIM (triton is imported lazily)


def _no_probs(q: torch.Tensor, k_cache: torch.Tensor) -> torch.Tensor:
    """The (B, 0, Hq, T) fp32 probabilities the operator returns when no rows are asked for."""
    return q.new_empty((q.shape[0], 0, q.shape[2], k_cache.shape[1]), dtype=torch.float32)


def _sparse_attention_impl(q, k_cache, v_cache, key_padding, scale, prob_rows, backend: str):
    if check_op_backend(backend) == "torch":
        out, probs = reference.sparse_attention(q, k_cache, v_cache, key_padding, scale, prob_rows)
        # The reference's einsum may return a permuted layout; the fake promises contiguous.
        out = out.contiguous()
    else:
        from spacache_kernels.kernels import attention as kernels  # imports triton only when needed

        out, probs = kernels.sparse_attention(q, k_cache, v_cache, key_padding, scale, prob_rows)
    return out, _no_probs(q, k_cache) if probs is None else probs.contiguous()


def _sparse_attention_fake(q, k_cache, v_cache, key_padding, scale, prob_rows, backend):
    if prob_rows is None:
        probs = _no_probs(q, k_cache)
    else:
        probs = q.new_empty(
            (q.shape[0], prob_rows.shape[1], q.shape[2], k_cache.shape[1]), dtype=torch.float32
        )
    return q.new_empty(q.shape), probs


SPARSE_ATTENTION = define(
    "sparse_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? key_padding, float? scale, "
    "Tensor? prob_rows, str backend) -> (Tensor, Tensor)",
    _sparse_attention_impl,
    _sparse_attention_fake,
)


def _check_scale(scale) -> float | None:
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale}")
    return scale


@torch.no_grad()
def sparse_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key_padding: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    prob_rows: torch.Tensor | None = None,
    backend: str | None = None,
    check_indices: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Bidirectional attention of ``S`` selected queries against every cached key.

    ``out[b, s, h] = softmax_t(q[b, s, h] . k_cache[b, t, g(h)] * scale) @ v_cache[b, :, g(h)]``
    over the keys with ``key_padding[b, t] == False``, where ``g(h) = h // (Hq // Hkv)`` (GQA).
    Math in fp32; a query row whose keys are all padding (or ``T = 0``) gets zeros.

    Args:
        q: (B, S, Hq, Dh) fp32/fp16/bf16, any strides (``S = 0`` gives an empty output).
        k_cache: (B, T, Hkv, Dh), q's dtype, ``Hq % Hkv == 0``, any strides: typically
            ``buffer[:, :T]`` of a preallocated (B, T_max, Hkv, Dh) cache, read without a copy.
        v_cache: (B, T, Hkv, Dh), same shape and dtype as ``k_cache``, any strides.
        key_padding: (B, T) bool, True = padding (ignored key), or None (no padding).
        scale: the logit scale, a finite float; default ``Dh ** -0.5``.
        prob_rows: (B, m) int32/int64 indices into S (repeats allowed), or None: also return those
            rows' softmax probabilities.
        backend: ``"auto" | "triton" | "torch"`` or None (``SPACACHE_BACKEND``, default auto). The
            Triton backend supports ``Dh <= 256``.
        check_indices: verify that ``prob_rows`` lies in [0, S) (reads it back to the host: a sync;
            skipped while ``torch.compile`` traces or a CUDA graph is captured).

    Returns:
        ``(out (B, S, Hq, Dh) in q's dtype, probs (B, m, Hq, T) fp32 or None)``, new contiguous
        tensors from ``torch.ops.spacache.sparse_attention``; padding keys have probability 0.
    """
    check_float("q", q, ndim=4)
    n_batch, n_queries, n_q_heads, head_dim = q.shape
    if n_q_heads == 0 or head_dim == 0:
        raise ValueError(
            f"q: expected at least one head and a non-empty head dim, got shape {tuple(q.shape)}"
        )
    check_float("k_cache", k_cache, ndim=4)
    if k_cache.shape[0] != n_batch or k_cache.shape[3] != head_dim:
        raise ValueError(
            f"k_cache: expected shape ({n_batch}, T, Hkv, {head_dim}) (batch and head dim of q), "
            f"got {tuple(k_cache.shape)}"
        )
    length, n_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if n_kv_heads == 0 or n_q_heads % n_kv_heads != 0:
        raise ValueError(
            f"k_cache: expected a kv head count Hkv >= 1 that divides q's Hq = {n_q_heads}, "
            f"got Hkv = {n_kv_heads}"
        )
    check_float("v_cache", v_cache, ndim=4, shape=tuple(k_cache.shape))
    check_same_dtype(q=q, k_cache=k_cache, v_cache=v_cache)
    if key_padding is not None:
        check_tensor("key_padding", key_padding, ndim=2, dtypes=(torch.bool,), shape=(n_batch, length))
    scale = _check_scale(scale)
    if prob_rows is not None:
        check_index("prob_rows", prob_rows, batch=n_batch, length=n_queries, check_values=False)
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, key_padding=key_padding, prob_rows=prob_rows)
    if prob_rows is not None and check_indices:
        check_index("prob_rows", prob_rows, batch=n_batch, length=n_queries, check_values=True, unique=False)
    backend = resolve_backend(backend, q, k_cache, v_cache)
    if backend == "triton" and head_dim > MAX_TRITON_HEAD_DIM:
        raise ValueError(
            f"q: the Triton backend supports head dim Dh <= {MAX_TRITON_HEAD_DIM}, got {head_dim}; "
            "use backend='torch'"
        )
    out, probs = SPARSE_ATTENTION(q, k_cache, v_cache, key_padding, scale, prob_rows, backend)
    return out, (None if prob_rows is None else probs)
