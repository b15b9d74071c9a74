"""Microbenchmarks: gathered-query attention (sparse_attention) and the fused LM head (token_confidence).

GPU, LLaDA-8B shapes (Hq = Hkv = 32, Dh 128, bf16):

* attention: T 512 / 1024 cached keys, S = 64 (0.25 * 256, SPA-Cache's peak budget) / 256 (a full
  refresh of the generated region) queries, batch 1 / 16, left-padded keys; the Triton kernel vs the
  torch reference (fp32 einsum + softmax) and vs ``torch.nn.functional.scaled_dot_product_attention``
  on the gathered queries with a boolean key mask (the ``baseline`` rows: what a plain PyTorch port
  would call);
* confidence: d 4096, V 126464, 8 / 32 rows per batch, batch 1 / 16, argmax; the Triton kernel vs
  the reference (fp32 full logits + log-softmax + argmax) and vs the bf16 cuBLAS logits GEMM with
  an fp32 softmax/max on top (``baseline``: the best a non-fused PyTorch path does).

CPU: small shapes, torch only (the Triton interpreter's timings mean nothing).

Rooflines (see the kernel modules): attention FLOPs 4*B*Hq*S*T*Dh, bytes K/V read once
2*B*T*Hkv*Dh*e + q read and out written 2*B*S*Hq*Dh*e + key_padding B*T; confidence FLOPs
2*rows*V*d, bytes the LM head once V*d*e + the gathered rows rows*d*e + outputs rows*12.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench import harness
from spacache_kernels.ops import reference
from spacache_kernels.ops.attention import sparse_attention
from spacache_kernels.ops.confidence import token_confidence

Q_HEADS, HEAD_DIM, D_MODEL, VOCAB = 32, 128, 4096, 126464

if harness.ON_GPU:
    ATTN_SHAPES = [
        pytest.param(batch, n_queries, length, Q_HEADS, HEAD_DIM, id=f"B{batch}-S{n_queries}-T{length}")
        for length in (512, 1024)
        for n_queries in (64, 256)
        for batch in (1, 16)
    ]
    CONF_SHAPES = [
        pytest.param(batch, m, D_MODEL, VOCAB, id=f"B{batch}-m{m}") for m in (8, 32) for batch in (1, 16)
    ]
    ATTN_IMPLS = ("triton", "torch", "sdpa")
    CONF_IMPLS = ("triton", "torch", "cublas")
else:
    ATTN_SHAPES = [pytest.param(2, 16, 128, 4, 32, id="small-B2-S16-T128")]
    CONF_SHAPES = [pytest.param(2, 8, 256, 4096, id="small-B2-m8-d256-V4096")]
    ATTN_IMPLS = ("torch",)
    CONF_IMPLS = ("torch",)

_DTYPE_NAME = str(harness.DTYPE).replace("torch.", "")


def attention_inputs(batch, n_queries, length, heads, head_dim):
    """q (B, S, H, Dh); k/v as ``[:, :T]`` slices of (B, T + 128, H, Dh) buffers; left padding (B, T)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, n_queries, heads, head_dim, generator=gen).to(harness.DEVICE, harness.DTYPE)
    k_buf = torch.randn(batch, length + 128, heads, head_dim, generator=gen).to(harness.DEVICE, harness.DTYPE)
    v_buf = torch.randn(batch, length + 128, heads, head_dim, generator=gen).to(harness.DEVICE, harness.DTYPE)
    pads = torch.tensor([(37 * b) % (length // 4) for b in range(batch)], device=harness.DEVICE)
    key_padding = torch.arange(length, device=harness.DEVICE).view(1, -1) < pads.view(-1, 1)
    return q, k_buf[:, :length], v_buf[:, :length], key_padding


def attention_bytes(batch, n_queries, length, heads, head_dim, elem) -> int:
    return (
        2 * batch * length * heads * head_dim * elem
        + 2 * batch * n_queries * heads * head_dim * elem
        + batch * length
    )


@pytest.mark.parametrize("impl", ATTN_IMPLS)
@pytest.mark.parametrize(("batch", "n_queries", "length", "heads", "head_dim"), ATTN_SHAPES)
def test_bench_sparse_attention(benchmark, batch, n_queries, length, heads, head_dim, impl):
    q, k, v, key_padding = attention_inputs(batch, n_queries, length, heads, head_dim)
    if impl == "sdpa":
        mask = (~key_padding)[:, None, None, :]  # (B, 1, 1, T), True = attend
        q_t, k_t, v_t = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        fn = lambda: F.scaled_dot_product_attention(q_t, k_t, v_t, attn_mask=mask).transpose(1, 2)
        out = fn()
    else:
        fn = lambda: sparse_attention(q, k, v, key_padding, backend=impl)
        out, probs = fn()
        assert probs is None
    assert out.shape == q.shape
    labels = {
        "triton": None,
        "torch": None,
        "sdpa": "baseline: F.scaled_dot_product_attention on the gathered queries (bool key mask)",
    }
    harness.record(
        benchmark,
        fn,
        op="sparse_attention",
        backend={"sdpa": "torch SDPA"}.get(impl, impl),
        shape=f"B={batch} S={n_queries} T={length} Hq={heads} Hkv={heads} Dh={head_dim} {_DTYPE_NAME}",
        bytes_moved=attention_bytes(batch, n_queries, length, heads, head_dim, q.element_size()),
        flops=4 * batch * heads * n_queries * length * head_dim,
        baseline=labels[impl] if impl != "triton" else "torch reference and torch SDPA",
    )


@pytest.fixture(scope="module")
def lm_head_by_shape():
    """One LM head per (V, d), kept across cases (the GPU one is 1 GB in bf16)."""
    heads = {}

    def get(vocab, d):
        if (vocab, d) not in heads:
            gen = torch.Generator().manual_seed(1)
            heads[(vocab, d)] = (torch.randn(vocab, d, generator=gen) * d**-0.5).to(
                harness.DEVICE, harness.DTYPE
            )
        return heads[(vocab, d)]

    return get


def _cublas_confidence(hidden, lm_head, positions):
    """The unfused path: gather, 16-bit GEMM into (rows, V) logits, fp32 log-softmax, max."""
    logits = reference.gather_rows(hidden, positions) @ lm_head.T
    logp = torch.log_softmax(logits.float(), dim=-1)
    best, token = logp.max(dim=-1)
    return token, best.exp()


@pytest.mark.parametrize("impl", CONF_IMPLS)
@pytest.mark.parametrize(("batch", "m", "d", "vocab"), CONF_SHAPES)
def test_bench_token_confidence(benchmark, batch, m, d, vocab, impl, lm_head_by_shape):
    length = 256
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(batch, length, d, generator=gen).to(harness.DEVICE, harness.DTYPE)
    positions = torch.stack([torch.randperm(length, generator=gen)[:m].sort().values for _ in range(batch)])
    positions = positions.to(harness.DEVICE)
    lm_head = lm_head_by_shape(vocab, d)
    if impl == "cublas":
        fn = lambda: _cublas_confidence(hidden, lm_head, positions)
    else:
        fn = lambda: token_confidence(hidden, lm_head, positions, backend=impl, check_indices=False)
    token, conf = fn()
    assert token.shape == (batch, m) and conf.shape == (batch, m)
    rows = batch * m
    elem = lm_head.element_size()
    labels = {
        "triton": "torch reference (fp32 logits + logsumexp) and bf16 cuBLAS logits",
        "torch": None,
        "cublas": "baseline: gathered rows @ lm_head.T (16-bit cuBLAS) + fp32 log_softmax + max",
    }
    harness.record(
        benchmark,
        fn,
        op="token_confidence",
        backend={"cublas": "torch cuBLAS logits"}.get(impl, impl),
        shape=f"B={batch} m={m} d={d} V={vocab} argmax {_DTYPE_NAME}",
        bytes_moved=vocab * d * elem + rows * d * elem + rows * 12,
        flops=2 * rows * vocab * d,
        baseline=labels[impl],
    )
