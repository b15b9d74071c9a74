"""Low-rank proxy ops: the SPA-Cache token picker and the SVD that builds its projection.

:func:`proxy_select` scores how far each token's low-rank proxy moved since the previous step and
picks the ``k`` tokens that moved most (lowest cosine) for recomputation; :func:`svd_proxy` builds the
projection ``proj`` it uses from a layer's value-projection weight.

Operators (:mod:`spacache_kernels.ops._library`):
``torch.ops.spacache.proxy_select(hidden, proj, proxy_cache!, k, backend, select) -> (Tensor, Tensor)``
mutates ``proxy_cache`` (``select``: the resolved ``"kernel"`` or ``"torch"``, ignored by the torch
backend); ``torch.ops.spacache.svd_proxy(w_v, rank, dtype) -> Tensor`` (``rank`` the resolved int)
mutates nothing.
"""

from __future__ import annotations

import math
import numbers

import torch

from spacache_kernels.ops import reference
from spacache_kernels.ops._dispatch import resolve_backend
from spacache_kernels.ops._library import check_op_backend, define
from spacache_kernels.ops._validate import (
    check_contiguous,
    check_float,
    check_k,
    check_same_device,
)

SELECTS = ("kernel", "torch")
MAX_TRITON_RANK = 256  # spacache_kernels.kernels.proxy_select.MAX_RANK (not imported: triton is optional)
MAX_KERNEL_SELECT_L = 16384  # spacache_kernels.kernels.proxy_select.MAX_SELECT_L


def _proxy_select_impl(hidden, proj, proxy_cache, k: int, backend: str, select: str):
    if check_op_backend(backend) == "torch":
        update_idx, scores = reference.proxy_select(hidden, proj, proxy_cache, k)
        return update_idx.contiguous(), scores.contiguous()
    if select not in SELECTS:
        raise ValueError(f"select: the spacache operators take a resolved select {SELECTS}, got {select!r}")
    from spacache_kernels.kernels import proxy_select as kernels  # imports triton only when needed

    n_batch, length, _ = hidden.shape
    scores = torch.empty((n_batch, length), dtype=torch.float32, device=hidden.device)
    kernels.proxy_select_fused(hidden, proj, proxy_cache, scores)
    if select == "kernel":
        update_idx = kernels.bottom_k_select(scores, k)
    else:
        update_idx = reference.bottom_k_sorted(scores, k)
    return update_idx, scores


def _proxy_select_fake(hidden, proj, proxy_cache, k: int, backend: str, select: str):
    n_batch, length, _ = hidden.shape
    update_idx = hidden.new_empty((n_batch, k), dtype=torch.int64)
    return update_idx, hidden.new_empty((n_batch, length), dtype=torch.float32)


def _svd_proxy_impl(w_v: torch.Tensor, rank: int, dtype: torch.dtype) -> torch.Tensor:
    u, s, _ = torch.linalg.svd(w_v.float().T, full_matrices=False)
    return (u[:, :rank] * s[:rank]).to(dtype).contiguous()


PROXY_SELECT = define(
    "proxy_select(Tensor hidden, Tensor proj, Tensor(a!) proxy_cache, SymInt k, str backend, str select) "
    "-> (Tensor, Tensor)",
    _proxy_select_impl,
    _proxy_select_fake,
)
SVD_PROXY = define(
    "svd_proxy(Tensor w_v, int rank, ScalarType dtype) -> Tensor",
    _svd_proxy_impl,
    lambda w_v, rank, dtype: w_v.new_empty((w_v.shape[1], rank), dtype=dtype),
)


@torch.no_grad()
def proxy_select(
    hidden: torch.Tensor,
    proj: torch.Tensor,
    proxy_cache: torch.Tensor,
    k: int,
    *,
    backend: str | None = None,
    select: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the ``k`` tokens per row whose low-rank proxy drifted most, and refresh the proxy cache.

    ``p = hidden @ proj`` (fp32 math); ``scores = cos(p, proxy_cache)`` row-wise, with the cosine
    ``a.b / (max(|a|, 1e-8) * max(|b|, 1e-8))``; ``proxy_cache <- p`` (cast to its dtype, in place);
    ``update_idx`` = positions of the ``k`` lowest scores per row, ascending.

    Args:
        hidden: (B, L, d) fp32/fp16/bf16, any strides (the normed layer input).
        proj: (d, r) fp32/fp16/bf16, e.g. from :func:`svd_proxy`; ``r <= 256`` for the Triton backend.
            On a GPU the fused kernel uses tensor cores only when ``proj`` has ``hidden``'s 16-bit
            dtype; other combinations are exact fp32 but much slower.
        proxy_cache: (B, L, r) fp32/fp16/bf16, contiguous; the previous step's proxies, overwritten.
        k: int in [0, L], the number of tokens to recompute per row.
        backend: ``"auto" | "triton" | "torch"`` or None (``SPACACHE_BACKEND``, default auto).
        select: how the Triton backend picks the bottom k: ``"kernel"`` (one sort per row in
            Triton, ties to the lower position; the default for ``L <= 16384``) or ``"torch"``
            (``torch.topk`` + sort, the default beyond). Ignored by the torch backend, which always
            uses ``torch.topk`` (tie order unspecified).

    Returns:
        ``(update_idx (B, k) int64 ascending per row, scores (B, L) fp32)``, both new and
        contiguous, from ``torch.ops.spacache.proxy_select`` (which mutates ``proxy_cache``).
    """
    check_float("hidden", hidden, ndim=3)
    n_batch, length, d = hidden.shape
    if d == 0:
        raise ValueError(f"hidden: expected a non-empty last dim d, got shape {tuple(hidden.shape)}")
    check_float("proj", proj, ndim=2, shape=(d, None))
    r = proj.shape[1]
    if r == 0:
        raise ValueError(f"proj: expected at least one column (rank r >= 1), got shape {tuple(proj.shape)}")
    check_float("proxy_cache", proxy_cache, ndim=3, shape=(n_batch, length, r))
    check_contiguous("proxy_cache", proxy_cache)
    check_same_device(hidden=hidden, proj=proj, proxy_cache=proxy_cache)
    k = check_k("k", k, length)
    if select is not None and select not in SELECTS:
        raise ValueError(f"select: expected one of {SELECTS} or None, got {select!r}")
    backend = resolve_backend(backend, hidden, proj, proxy_cache)
    if backend == "torch":
        return PROXY_SELECT(hidden, proj, proxy_cache, k, backend, "torch")  # select: unused

    if r > MAX_TRITON_RANK:
        raise ValueError(
            f"proj: the Triton backend supports rank r <= {MAX_TRITON_RANK}, got r = {r}; "
            "use backend='torch' for larger ranks"
        )
    if select is None:
        select = "kernel" if length <= MAX_KERNEL_SELECT_L else "torch"
    elif select == "kernel" and length > MAX_KERNEL_SELECT_L:
        raise ValueError(
            f"select: the selection kernel supports L <= {MAX_KERNEL_SELECT_L}, got L = {length}; "
            "use select='torch'"
        )
    return PROXY_SELECT(hidden, proj, proxy_cache, k, backend, select)


def _resolve_rank(rank, out_features: int, in_features: int) -> int:
    limit = min(out_features, in_features)
    if isinstance(rank, bool) or not isinstance(rank, numbers.Real):
        raise TypeError(f"rank: expected an int or a float fraction, got {type(rank).__name__}")
    if isinstance(rank, numbers.Integral):
        r = int(rank)
        if not 1 <= r <= limit:
            raise ValueError(f"rank: expected an int in [1, {limit}] (min of w_v's shape), got {r}")
        return r
    frac = float(rank)
    if not (math.isfinite(frac) and 0.0 < frac <= 1.0):
        raise ValueError(f"rank: expected a float fraction in (0, 1] of the KV width, got {rank!r}")
    r = max(1, round(frac * out_features))
    if r > limit:
        raise ValueError(
            f"rank: fraction {frac} of the KV width {out_features} gives r = {r}, "
            f"above min(w_v.shape) = {limit}"
        )
    return r


@torch.no_grad()
def svd_proxy(w_v: torch.Tensor, rank: int | float, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The SPA-Cache singular proxy projection of a value-projection weight.

    With ``w_v`` (out, in) the value projection (``v = h @ w_v.T``) and ``w_v.T = U S Vh`` (SVD in
    fp32, ``full_matrices=False``), returns ``proj = U[:, :r] * S[:r]`` of shape (in, r), so that

        ``h @ proj = (h @ w_v.T) @ Vh[:r].T``

    i.e. the value vector seen through its top-r right singular directions (``Vh[:r]`` has
    orthonormal rows, so this keeps the part of ``v`` that carries the most energy, and cosines of
    proxies approximate cosines of values).

    Args:
        w_v: (out, in) float; ``out`` is the KV width (n_kv_heads * head_dim), ``in`` the model width.
        rank: an int in [1, min(out, in)], or a float in (0, 1]: that fraction of the KV width ``out``,
            ``r = max(1, round(rank * out))`` (which must not exceed min(out, in)).
        dtype: the result's dtype (default ``w_v.dtype``).

    Returns:
        proj (in, r) in ``dtype``, contiguous, from ``torch.ops.spacache.svd_proxy``.
    """
    check_float("w_v", w_v, ndim=2)
    out_features, in_features = w_v.shape
    if out_features == 0 or in_features == 0:
        raise ValueError(f"w_v: expected a non-empty matrix, got shape {tuple(w_v.shape)}")
    r = _resolve_rank(rank, out_features, in_features)
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"dtype: expected a floating dtype, got {dtype}")
    return SVD_PROXY(w_v, r, dtype or w_v.dtype)
