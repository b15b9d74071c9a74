"""The launches real use makes, at the real model shapes, as calls of the kernel launchers.

Each :class:`Case` calls one launcher of :mod:`spacache_kernels.kernels` with ``meta`` tensors
(shapes, dtypes and strides only, no memory) laid out as :class:`~spacache_kernels.models.runtime.
DenoiseRuntime` and the policies lay them out: K/V projections from slices of the fused ``w_kv``,
per-layer views of the ``(L, B, T, Hkv, Dh)`` caches, ``int64`` row indices, fp32 RoPE tables and
proxy caches. Triton specializes integer arguments on divisibility by 16 and pointers on 16-byte
alignment, so these cases reach the same compiled variants a generation does.

Sizes: ``T = 456`` positions (a 200-token prompt and 256 generated tokens), ``k = 64`` recomputed
rows, ``m = 32`` decision rows (one block), proxy rank 128, two tracked attention-probability rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from spacache_kernels.kernels import (
    attention,
    confidence,
    gather_linear,
    proxy_select,
    rmsnorm,
    rope,
    scatter,
)
from spacache_kernels.models.config import ModelConfig
from spacache_kernels.models.synthetic import SHAPES

PROMPT_LEN = 200
GEN_LEN = 256
TOTAL_LEN = PROMPT_LEN + GEN_LEN  # 456
SELECTED = 64  # rows a partial step recomputes per layer
DECIDE_ROWS = 32  # positions whose token is decided per step (one block)
PROXY_RANK = 128
PROB_ROWS = 2  # attention-probability rows a policy tracks (Elastic-Cache's track_num, d2Cache)
N_SM = 132  # H100 / H200 SXM

MODEL_SHAPES = ("llada-8b", "dream-7b")
BATCHES = (1, 16)
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Case:
    """One launcher call: ``run()`` makes it (inside :func:`..._driver.compile_only`)."""

    name: str  # e.g. "q_proj_rope"
    shape: str  # model shape name
    batch: int
    dtype: str  # "bf16" | "fp16" | "fp32"
    run: Callable[[], object]

    @property
    def label(self) -> str:
        return f"{self.name}[{self.shape},B={self.batch},{self.dtype}]"


def _t(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def model_cases(shape: str, batch: int, dtype: torch.dtype) -> list[Case]:
    """Every launch of one denoising step (all policies' paths) plus the token decision."""
    cfg: ModelConfig = SHAPES[shape]
    d, hq, hkv, dh, f, vocab = (
        cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size,
    )  # fmt: skip
    q_width, kv_width = hq * dh, hkv * dh
    b, t, g, k = batch, TOTAL_LEN, GEN_LEN, SELECTED
    f32, i64 = torch.float32, torch.int64

    # Weights as DiffusionLM holds them: fused K/V weight and bias, sliced per projection.
    w_q, w_kv, w_o = (
        _t(q_width, d, dtype=dtype),
        _t(2 * kv_width, d, dtype=dtype),
        _t(d, q_width, dtype=dtype),
    )
    w_k, w_v = w_kv[:kv_width], w_kv[kv_width:]
    b_q = _t(q_width, dtype=dtype) if cfg.qkv_bias else None
    b_kv = _t(2 * kv_width, dtype=dtype) if cfg.qkv_bias else None
    b_k, b_v = (b_kv[:kv_width], b_kv[kv_width:]) if b_kv is not None else (None, None)
    w_gate, w_up, w_down = _t(f, d, dtype=dtype), _t(f, d, dtype=dtype), _t(d, f, dtype=dtype)
    norm_w, lm_head = _t(d, dtype=dtype), _t(vocab, d, dtype=dtype)
    rope_tables = (_t(cfg.max_positions, dh, dtype=f32), _t(cfg.max_positions, dh, dtype=f32))

    # Activations and caches.
    x_all, x_gen, x_sel = _t(b, t, d, dtype=dtype), _t(b, g, d, dtype=dtype), _t(b, k, d, dtype=dtype)
    positions = _t(b, t, dtype=i64)
    sel = _t(b, k, dtype=i64)
    kv_cache = _t(2, b, t, hkv, dh, dtype=dtype)  # two layers of the (L, B, T, Hkv, Dh) cache
    k_layer, v_layer = kv_cache[0], kv_cache[1]
    attn_out = _t(b, k, q_width, dtype=dtype)
    q_sel = attn_out.view(b, k, hq, dh)
    key_padding = _t(b, t, dtype=torch.bool)
    lse = _t(b, hq, k, dtype=f32)
    prob_rows = _t(b, PROB_ROWS, dtype=i64)
    act = _t(b, k, f, dtype=dtype)
    branch = _t(2, b, g, d, dtype=dtype)[1]
    proxy_cache = _t(2, b, g, PROXY_RANK, dtype=f32)[1]
    proj = _t(d, PROXY_RANK, dtype=dtype)
    scores = _t(b, g, dtype=f32)
    decide = _t(b, DECIDE_ROWS, d, dtype=dtype)
    splits = confidence.splits_for_sms(b * DECIDE_ROWS, vocab, N_SM)

    calls: dict[str, Callable[[], object]] = {
        "rms_norm": lambda: rmsnorm.rms_norm(x_all, norm_w, cfg.norm_eps),
        "rms_norm_rows": lambda: rmsnorm.rms_norm(x_sel, norm_w, cfg.norm_eps),
        "v_proj_dense": lambda: gather_linear.gather_linear_fused(x_all, None, w_v, b_v),
        "v_proj_sparse": lambda: gather_linear.gather_linear_fused(x_gen, sel, w_v, b_v),
        "k_proj_rope": lambda: gather_linear.gather_linear_fused(
            x_all, None, w_k, b_k, rope=rope_tables, positions=positions
        ),
        # K and V in one launch over the whole w_kv, RoPE on K's columns only (the runtime's dense and
        # sparse K/V paths).
        "kv_proj_rope": lambda: gather_linear.gather_linear_fused(
            x_all, None, w_kv, b_kv, rope=rope_tables, positions=positions, rope_cols=kv_width
        ),
        "kv_proj_rope_sparse": lambda: gather_linear.gather_linear_fused(
            x_gen, sel, w_kv, b_kv, rope=rope_tables, positions=positions[:, :k], rope_cols=kv_width
        ),
        "q_proj_rope": lambda: gather_linear.gather_linear_fused(
            x_gen, sel, w_q, b_q, rope=rope_tables, positions=positions[:, :k]
        ),
        "o_proj": lambda: gather_linear.gather_linear_fused(attn_out, None, w_o),
        "ffn_gate_up": lambda: gather_linear.gather_swiglu_fused(x_sel, None, w_gate, w_up),
        "ffn_down": lambda: gather_linear.gather_linear_fused(act, None, w_down),
        "attention": lambda: attention.sparse_attention_fwd(q_sel, k_layer, v_layer, None),
        "attention_padded_lse": lambda: attention.sparse_attention_fwd(
            q_sel, k_layer, v_layer, key_padding, lse_out=lse
        ),
        "attention_probs": lambda: attention.attention_row_probs(q_sel, k_layer, key_padding, lse, prob_rows),
        "scatter_residual": lambda: scatter.scatter_residual(x_gen, branch, sel, x_sel),
        "scatter_kv_rows": lambda: scatter.scatter_rows(
            k_layer.view(b, t, kv_width), sel, _t(b, k, kv_width, dtype=dtype)
        ),
        "proxy_select": lambda: proxy_select.proxy_select_fused(x_gen, proj, proxy_cache, scores),
        "bottom_k": lambda: proxy_select.bottom_k_select(scores, k),
        "lm_head_argmax": lambda: confidence.token_confidence(
            decide, lm_head, None, 0.0, 0, cfg.mask_token_id, splits=splits
        ),
        "lm_head_sample": lambda: confidence.token_confidence(
            decide, lm_head, None, 1.0, 7, cfg.mask_token_id, splits=splits
        ),
        # generate() samples with one seed per row (the noise is keyed by the row's own seed).
        "lm_head_sample_row_seeds": lambda: confidence.token_confidence(
            decide, lm_head, None, 1.0, _t(b, dtype=i64), cfg.mask_token_id, splits=splits
        ),
        "rope": lambda: rope.apply_rope_fused(q_sel, positions[:, :k], *rope_tables),
    }
    name = DTYPE_NAMES[dtype]
    return [Case(case, shape, batch, name, call) for case, call in calls.items()]


def extra_cases() -> list[Case]:
    """Kernels outside the step: the Gumbel-noise check kernel (tests compare it to the reference)."""
    rows, cols = _t(4096, dtype=torch.int64), _t(4096, dtype=torch.int64)
    return [Case("counter_uniform", "-", 1, "int64", lambda: confidence.counter_uniform(0, rows, cols))]


def all_cases(full: bool = False) -> list[Case]:
    """bf16 at every model shape and batch; fp32 at LLaDA-8B batch 1; fp16 there too when ``full``.

    fp16 compiles to the code bf16 does up to the conversion instructions, so the fast (CI) tier
    leaves it to ``--full``.
    """
    cases: list[Case] = []
    for shape in MODEL_SHAPES:
        for batch in BATCHES:
            cases += model_cases(shape, batch, torch.bfloat16)
    for dtype in (torch.float16, torch.float32) if full else (torch.float32,):
        cases += model_cases(MODEL_SHAPES[0], BATCHES[0], dtype)
    return cases + extra_cases()
