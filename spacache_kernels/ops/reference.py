"""Pure-PyTorch definitions of every op: the fallback backend and the test oracle.

Each function here *defines* its op. The Triton kernels must agree with it (up to floating-point
reassociation), and the op layer (:mod:`spacache_kernels.ops`) calls it for ``backend="torch"``.
Inputs are assumed valid (the op layer validates). Arithmetic is fp32; outputs take the input dtype
unless stated otherwise.
"""

from __future__ import annotations

import torch

COS_EPS = 1e-8  # torch.cosine_similarity's epsilon: cos = a.b / (max(|a|, eps) * max(|b|, eps))
_U32 = 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# proxy projection + drift selection
# --------------------------------------------------------------------------------------------
def cosine_rows(a: torch.Tensor, b: torch.Tensor, eps: float = COS_EPS) -> torch.Tensor:
    """Row-wise cosine over the last dim in fp32: ``(..., r), (..., r) -> (...)``."""
    a = a.float()
    b = b.float()
    dot = (a * b).sum(-1)
    return dot / (a.norm(dim=-1).clamp_min(eps) * b.norm(dim=-1).clamp_min(eps))


def bottom_k_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` lowest scores per row, ascending by position: ``(B, L) -> (B, k)`` int64.

    A stable sort makes ties go to the lower position (``torch.topk`` leaves tie order unspecified),
    the same rule the Triton selection kernel follows, so both backends pick identical rows.
    """
    idx = scores.sort(dim=-1, stable=True).indices[:, :k]
    return idx.sort(dim=-1).values


def proxy_select(
    hidden: torch.Tensor, proj: torch.Tensor, proxy_cache: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank proxy drift selection.

    hidden (B, L, d), proj (d, r), proxy_cache (B, L, r) (updated in place), k in [0, L].
    ``p = hidden @ proj``; ``scores = cos(p, proxy_cache)`` (B, L) fp32; ``proxy_cache <- p``;
    returns ``(update_idx (B, k) int64 ascending, scores)``.
    """
    proxy = hidden.float() @ proj.float()
    scores = cosine_rows(proxy, proxy_cache)
    proxy_cache.copy_(proxy.to(proxy_cache.dtype))
    return bottom_k_sorted(scores, k), scores


# --------------------------------------------------------------------------------------------
# gather GEMMs
# --------------------------------------------------------------------------------------------
def gather_rows(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """``x[b, idx[b, j]]``: (B, L, d), (B, k) -> (B, k, d); ``idx=None`` means all rows."""
    if idx is None:
        return x
    return torch.gather(x, 1, idx.long().unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def apply_rope(
    x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """Rotary embedding (rotate-half convention, as LLaDA and Qwen2/Dream use it).

    x (B, S, H, Dh), positions (B, S) int, cos/sin (P, Dh) tables with the two halves equal.
    ``out = x * cos[pos] + rotate_half(x) * sin[pos]``, ``rotate_half([x1, x2]) = [-x2, x1]``.
    """
    c = cos.float()[positions.long()].unsqueeze(2)  # (B, S, 1, Dh)
    s = sin.float()[positions.long()].unsqueeze(2)
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * c + rotated * s).to(x.dtype)


def default_positions(idx: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """Positions of gathered rows when none are given: ``idx`` itself, or ``arange(L)`` per row."""
    if idx is not None:
        return idx.long()
    return torch.arange(length, device=device).expand(batch, length)


def gather_linear(
    x: torch.Tensor,
    idx: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    positions: torch.Tensor | None = None,
    rope_cols: int | None = None,
) -> torch.Tensor:
    """``y[b, j] = x[b, idx[b, j]] @ weight.T (+ bias)``, then optional RoPE.

    x (B, L, d), idx (B, k) or None (all L rows), weight (n, d), bias (n,).
    rope = (cos, sin) tables (P, Dh) with n a multiple of Dh: the output is rotated per head of width
    Dh at ``positions`` (B, k) (default: ``idx``, or ``arange(L)`` when ``idx`` is None).
    rope_cols: rotate only the output columns ``[0, rope_cols)`` (a multiple of Dh; the heads after
    it are left as the GEMM wrote them), e.g. K and V from one fused ``[W_k; W_v]`` weight with
    ``rope_cols = Hkv * Dh``; None = all n columns.
    Returns (B, k, n) in x's dtype.
    """
    rows = gather_rows(x, idx).float()
    y = rows @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    if rope is not None:
        cos, sin = rope
        head_dim = cos.shape[-1]
        if positions is None:
            positions = default_positions(idx, x.shape[0], x.shape[1], x.device)
        b, k, n = y.shape
        cols = n if rope_cols is None else rope_cols
        rotated = apply_rope(y[..., :cols].reshape(b, k, cols // head_dim, head_dim), positions, cos, sin)
        rotated = rotated.view(b, k, cols)
        y = rotated if cols == n else torch.cat([rotated, y[..., cols:]], dim=-1)
    return y.to(x.dtype)


def gather_swiglu(
    x: torch.Tensor, idx: torch.Tensor | None, w_gate: torch.Tensor, w_up: torch.Tensor
) -> torch.Tensor:
    """``silu(x_g @ w_gate.T) * (x_g @ w_up.T)`` with ``x_g = x[b, idx[b, j]]``: (B, k, n) in x's dtype."""
    rows = gather_rows(x, idx).float()
    gate = rows @ w_gate.float().T
    up = rows @ w_up.float().T
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


# --------------------------------------------------------------------------------------------
# scatter
# --------------------------------------------------------------------------------------------
def scatter_rows_(cache: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``cache[b, idx[b, j]] = src[b, j]`` in place; cache (B, L, n), idx (B, k), src (B, k, n)."""
    cache.scatter_(1, idx.long().unsqueeze(-1).expand(-1, -1, cache.shape[-1]), src.to(cache.dtype))
    return cache


def scatter_residual(
    x: torch.Tensor, cache: torch.Tensor, idx: torch.Tensor, src: torch.Tensor
) -> torch.Tensor:
    """Scatter ``src`` into ``cache`` (in place), then ``out = x + cache`` (B, L, n) in x's dtype."""
    scatter_rows_(cache, idx, src)
    return (x.float() + cache.float()).to(x.dtype)


# --------------------------------------------------------------------------------------------
# norms
# --------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim, fp32 math, x's dtype out."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return out.to(x.dtype)


# --------------------------------------------------------------------------------------------
# attention of gathered queries against the full cache
# --------------------------------------------------------------------------------------------
def sparse_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key_padding: torch.Tensor | None = None,
    scale: float | None = None,
    prob_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Bidirectional attention of selected queries against every cached key.

    q (B, S, Hq, Dh); k_cache, v_cache (B, T, Hkv, Dh) with Hq a multiple of Hkv (GQA: query head h
    reads kv head ``h // (Hq // Hkv)``); key_padding (B, T) bool, True = padding (ignored).
    prob_rows (B, m) int indices into S: also return those rows' softmax probabilities
    (B, m, Hq, T) fp32. Returns ``(out (B, S, Hq, Dh) in q's dtype, probs or None)``.
    A row whose keys are all padding gets zeros; NaN anywhere else propagates (as in the kernel).
    """
    b, s, hq, dh = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    if scale is None:
        scale = dh**-0.5
    kf = k_cache.float().repeat_interleave(group, dim=2)  # (B, T, Hq, Dh)
    vf = v_cache.float().repeat_interleave(group, dim=2)
    logits = torch.einsum("bshd,bthd->bhst", q.float(), kf) * scale
    if key_padding is not None:
        logits = logits.masked_fill(key_padding[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if key_padding is not None:
        # Only rows whose keys are all padding (softmax of all -inf = NaN) become zeros; a NaN from
        # the inputs must stay visible.
        probs = probs.masked_fill(key_padding.all(-1)[:, None, None, None], 0.0)
    out = torch.einsum("bhst,bthd->bshd", probs, vf).to(q.dtype)
    sel = None
    if prob_rows is not None:
        rows = prob_rows.long()  # (B, m)
        p = probs.permute(0, 2, 1, 3)  # (B, S, Hq, T)
        sel = torch.gather(p, 1, rows[:, :, None, None].expand(-1, -1, hq, p.shape[-1]))
    return out, sel


# --------------------------------------------------------------------------------------------
# LM head + confidence
# --------------------------------------------------------------------------------------------
def _mul_u32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2^32`` for uint32 values held in int64, without int64 overflow."""
    lo = c & 0xFFFF
    hi = c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _U32


def hash_u32(x: torch.Tensor) -> torch.Tensor:
    """The 'lowbias32' integer hash on uint32 values held in int64 (matched bit for bit in Triton)."""
    x = x & _U32
    x = x ^ (x >> 16)
    x = _mul_u32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul_u32(x, 0x846CA68B)
    x = x ^ (x >> 16)
    return x


def counter_uniform(seed: int | torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """Counter-based uniform in (0, 1) for (row, col) pairs: ``hash(col ^ hash(row ^ hash(seed)))``.

    ``seed``: an int, or an int tensor broadcasting against ``row`` (per-row seeds).
    The Triton confidence kernel draws the same numbers, so Gumbel-max sampling is reproducible
    across backends without materializing a (rows, V) noise tensor in the kernel path.
    """
    if not isinstance(seed, torch.Tensor):
        seed = torch.tensor(seed & _U32, dtype=torch.int64, device=row.device)
    s = hash_u32(seed.long())
    h = hash_u32(col.long() ^ hash_u32(row.long() ^ s))
    return ((h >> 8).double() + 0.5).float() * (2.0**-24)


def token_confidence(
    hidden: torch.Tensor,
    lm_head: torch.Tensor,
    positions: torch.Tensor | None = None,
    temperature: float = 0.0,
    seed: int | torch.Tensor = 0,
    suppress_token: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LM head at selected positions, then the decision and its confidence.

    hidden (B, L, d), lm_head (V, d), positions (B, m) int or None (all L). Logits ``z`` (fp32).
    temperature == 0: ``token = argmax z``; temperature > 0: Gumbel-max,
    ``token = argmax(z / temperature + g)`` with ``g = -log(-log(u))``, ``u = counter_uniform(seed,
    flat_row, v)`` and ``flat_row = b * m + j``; with per-row seeds (a (B,) int tensor)
    ``u = counter_uniform(seed[b], j, v)``. ``confidence = softmax(z)[token]`` (fp32).
    ``suppress_token``: a vocabulary id that is never chosen (the mask token: committing it would
    leave the position masked); it still counts in the softmax normalizer.
    Returns ``(token (B, m) int64, confidence (B, m) fp32)``.
    """
    rows = gather_rows(hidden, positions).float()
    logits = rows @ lm_head.float().T  # (B, m, V)
    score = logits
    if temperature > 0:
        b, m, v = logits.shape
        if isinstance(seed, torch.Tensor):  # per-row seeds: row (b, j) is keyed by (seed[b], j)
            row, seed = torch.arange(m, device=hidden.device).view(1, m, 1), seed.view(b, 1, 1)
        else:
            row = torch.arange(b * m, device=hidden.device).view(b, m, 1)
        u = counter_uniform(seed, row, torch.arange(v, device=hidden.device).view(1, 1, v))
        score = logits / temperature - torch.log(-torch.log(u))
    if suppress_token is not None:
        score = score.clone()
        score[..., suppress_token] = float("-inf")
    token = score.argmax(-1)
    lse = torch.logsumexp(logits, dim=-1)
    conf = torch.exp(torch.gather(logits, -1, token.unsqueeze(-1)).squeeze(-1) - lse)
    return token, conf
