"""Microbenchmarks: gather GEMMs (q/k/v projection, the same with the RoPE epilogue, K and V in one
launch over the fused ``[W_k; W_v]`` with RoPE on the K columns only, SwiGLU gate+up).

GPU: LLaDA-8B shapes (d 4096; q/k/v n 4096 with Dh 128; fused K/V n 8192, RoPE on 4096; SwiGLU n
12288), batch 1 / 16, L 256 / 1024 generated tokens, k = ratio * L for ratios 0.05 / 0.25 / 0.5,
bf16. Four rows per case:

* ``triton fused``: the op with ``impl="fused"`` (gather through idx in the GEMM, fused epilogue);
* ``torch reference``: the op's torch backend (fp32 math: a correctness oracle, not a contender);
* ``index_select + cuBLAS``: the op with ``impl="torch_gather"`` (materialized gather, cuBLAS in
  bf16, then the standalone RoPE kernel / SwiGLU in torch). **This is the baseline** the fused
  kernel must beat, and the crossover sets ``AUTO_TORCH_GATHER_MAX_ROWS`` in ``ops/linear.py``;
* ``dense cuBLAS (no gather)``: the same GEMM (+ epilogue) over ``B*k`` contiguous rows, a lower bound
  for any gathered implementation.

CPU: one small shape, torch paths only (reference, index_select + matmul, dense matmul); the Triton
interpreter's timings mean nothing.

Roofline (``kernels/gather_linear.py``): FLOPs = 2*B*k*n*d (x2 for SwiGLU); bytes = weight n*d*e
(x2 for SwiGLU) + gathered rows B*k*d*e + output B*k*n*e + idx B*k*8 (+ bias, + fp32 table rows
2*B*k*Dh*4 with RoPE). For few rows the weight term dominates: the op is bandwidth-bound.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench import harness
from spacache_kernels.ops import reference
from spacache_kernels.ops.linear import gather_linear, gather_swiglu, index_select_rows
from spacache_kernels.ops.rope import apply_rope

HEAD_DIM = 128
THETA = 500000.0

if harness.ON_GPU:
    D, N_QKV, N_FFN = 4096, 4096, 12288
    SHAPES = [
        pytest.param(batch, length, ratio, id=f"B{batch}-L{length}-r{ratio}")
        for batch in (1, 16)
        for length in (256, 1024)
        for ratio in (0.05, 0.25, 0.5)
    ]
    VARIANTS = ("triton fused", "torch reference", "index_select + cuBLAS", "dense cuBLAS (no gather)")
else:
    D, N_QKV, N_FFN = 256, 256, 512
    SHAPES = [pytest.param(2, 128, 0.25, id="B2-L128-r0.25")]
    VARIANTS = ("torch reference", "index_select + matmul", "dense matmul (no gather)")
OPS = ("gather_linear", "gather_linear+rope", "kv_proj", "gather_swiglu")
ROPE_OPS = ("gather_linear+rope", "kv_proj")
# What every other row is compared with: the materialized gather + vendor GEMM.
BASELINE = next(v for v in VARIANTS if v.startswith("index_select"))


def rope_tables(n_pos: int):
    freqs = 1.0 / THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    angles = torch.arange(n_pos, dtype=torch.float64)[:, None] * freqs[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().float().to(harness.DEVICE), angles.sin().float().to(harness.DEVICE)


def make_inputs(batch: int, length: int, k: int, n_weights: int, n: int):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, length, D, generator=gen).to(harness.DEVICE, harness.DTYPE)
    idx = torch.stack([torch.randperm(length, generator=gen)[:k].sort().values for _ in range(batch)])
    idx = idx.to(harness.DEVICE)
    ws = [
        (torch.randn(n, D, generator=gen) * D**-0.5).to(harness.DEVICE, harness.DTYPE)
        for _ in range(n_weights)
    ]
    return x, idx, ws


def gemm_bytes(batch: int, k: int, n: int, n_weights: int, op: str) -> int:
    elem = torch.finfo(harness.DTYPE).bits // 8
    total = n_weights * n * D * elem + batch * k * D * elem + batch * k * n * elem + batch * k * 8
    if op in ROPE_OPS:
        total += 2 * batch * k * HEAD_DIM * 4
    return total


def unfused(op: str, rows_of, ws, rope, positions):
    """GEMM(s) in the input dtype on rows from ``rows_of()``, then RoPE (Triton on a GPU) / SwiGLU."""
    if op == "gather_swiglu":

        def swiglu():
            rows = rows_of()
            return F.silu(F.linear(rows, ws[0])) * F.linear(rows, ws[1])

        return swiglu
    if op == "gather_linear":
        return lambda: F.linear(rows_of(), ws[0])

    def linear_rope():
        y = F.linear(rows_of(), ws[0])
        batch, k, n = y.shape
        cols = n // 2 if op == "kv_proj" else n  # kv_proj: RoPE on the K half only
        heads = y[..., :cols].view(batch, k, cols // HEAD_DIM, HEAD_DIM)
        rotated = apply_rope(heads, positions, *rope, check_indices=False).view(batch, k, cols)
        return rotated if cols == n else torch.cat([rotated, y[..., cols:]], dim=-1)

    return linear_rope


def make_fn(op: str, variant: str, x, idx, ws, rope):
    if variant.startswith("dense"):
        rows = x[:, : idx.shape[1]].contiguous()  # B*k rows, no gather
        return unfused(op, lambda: rows, ws, rope, idx)
    if variant.startswith("index_select") and not harness.ON_GPU:
        # The op's impl="torch_gather" needs its triton backend; on the CPU run the same path by hand.
        return unfused(op, lambda: index_select_rows(x, idx), ws, rope, idx)
    if variant == "triton fused":
        kwargs = dict(backend="triton", impl="fused")
    elif variant.startswith("index_select"):
        kwargs = dict(backend="triton", impl="torch_gather")
    else:
        kwargs = dict(backend="torch")
    if op == "gather_swiglu":
        return lambda: gather_swiglu(x, idx, ws[0], ws[1], check_indices=False, **kwargs)
    rope_arg = rope if op in ROPE_OPS else None
    cols = ws[0].shape[0] // 2 if op == "kv_proj" else None
    return lambda: gather_linear(x, idx, ws[0], rope=rope_arg, rope_cols=cols, check_indices=False, **kwargs)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(("batch", "length", "ratio"), SHAPES)
def test_bench_gather_linear(benchmark, batch, length, ratio, op, variant):
    k = max(1, int(ratio * length))
    n_weights, n = {"gather_swiglu": (2, N_FFN), "kv_proj": (1, 2 * N_QKV)}.get(op, (1, N_QKV))
    x, idx, ws = make_inputs(batch, length, k, n_weights, n)
    rope = rope_tables(length) if op in ROPE_OPS else None
    fn = make_fn(op, variant, x, idx, ws, rope)
    out = fn()
    assert out.shape == (batch, k, n)
    if not variant.startswith("dense") and variant != "torch reference":
        # Same inputs as the reference: a fast wrong answer must not make it into the table.
        if op == "gather_swiglu":
            want = reference.gather_swiglu(x, idx, ws[0], ws[1])
        else:
            cols = n // 2 if op == "kv_proj" else None
            want = reference.gather_linear(x, idx, ws[0], rope=rope, rope_cols=cols)
        torch.testing.assert_close(out.float(), want.float(), atol=6e-2, rtol=6e-2)
    harness.record(
        benchmark,
        fn,
        op=op,
        backend=variant,
        shape=f"B={batch} L={length} k={k} d={D} n={n} {str(harness.DTYPE).replace('torch.', '')}",
        bytes_moved=gemm_bytes(batch, k, n, n_weights, op),
        flops=2 * n_weights * batch * k * n * D,
        baseline=BASELINE if variant != BASELINE else None,
    )
