"""Microbenchmarks: scatter_residual (fused scatter + residual add), scatter_rows_, rms_norm.

GPU: LLaDA-8B width (n = d = 4096) in bf16, batch 1 / 16, L 256 / 1024 generated tokens, update
ratios 0.05 / 0.25 / 0.5 (k = ratio * L), every backend in ``harness.BACKENDS``, plus two baselines
for scatter_residual: the best eager PyTorch composition (``scatter_`` then ``torch.add``, two
kernels) and the unfused Triton path (the ``scatter_rows`` kernel, then ``torch.add``), which shows
what fusing the add buys. CPU: small shapes, torch only (the Triton interpreter's timings mean
nothing).

Rooflines (see ``spacache_kernels/kernels/scatter.py`` and ``rmsnorm.py``), element sizes ``e_*``:

* scatter_residual: ``B*n*(2*L*e_x + L*e_c + k*e_s)`` (+ O(B*L) for indices); every row of ``x``
  read and of ``out`` written, the cache read where unselected and written where selected, the
  ``src`` rows read. The unfused baselines move ``B*k*n*e_c`` more (they re-read the rows they wrote).
* scatter_rows_: ``B*k*n*(e_s + e_c) + B*k*e_i``.
* rms_norm: ``R*d*(e_x + e_o) + d*e_w``.
"""

from __future__ import annotations

import pytest
import torch

from bench import harness
from spacache_kernels.ops.norm import rms_norm
from spacache_kernels.ops.scatter import scatter_residual, scatter_rows_

IDX_DTYPE = torch.int64
DTYPE_NAME = str(harness.DTYPE).replace("torch.", "")

if harness.ON_GPU:
    WIDTH = 4096  # LLaDA-8B d_model
    SCATTER_SHAPES = [
        pytest.param(batch, length, ratio, id=f"B{batch}-L{length}-r{ratio}")
        for batch in (1, 16)
        for length in (256, 1024)
        for ratio in (0.05, 0.25, 0.5)
    ]
    NORM_SHAPES = [
        pytest.param(batch, length, id=f"B{batch}-L{length}") for batch in (1, 16) for length in (256, 1024)
    ]
    RESIDUAL_VARIANTS = (*harness.BACKENDS, "eager", "unfused-triton")
else:
    WIDTH = 512
    SCATTER_SHAPES = [pytest.param(2, 256, 0.25, id="B2-L256-r0.25")]
    NORM_SHAPES = [pytest.param(2, 256, id="B2-L256")]
    RESIDUAL_VARIANTS = (*harness.BACKENDS, "eager")

VARIANT_LABELS = {
    "eager": "torch scatter_ + torch.add (2 kernels)",
    "unfused-triton": "triton scatter_rows + torch.add (2 kernels)",
}


def _elem(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def make_scatter_inputs(batch, length, ratio, n=None):
    """x, cache (B, L, n), idx (B, k) sorted distinct, src (B, k, n) on the bench device/dtype."""
    n = n or WIDTH
    k = int(ratio * length)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, length, n, generator=gen).to(harness.DEVICE, harness.DTYPE)
    cache = torch.randn(batch, length, n, generator=gen).to(harness.DEVICE, harness.DTYPE)
    src = torch.randn(batch, k, n, generator=gen).to(harness.DEVICE, harness.DTYPE)
    idx = torch.stack([torch.randperm(length, generator=gen)[:k].sort().values for _ in range(batch)])
    return x, cache, idx.to(harness.DEVICE, IDX_DTYPE), src


def residual_bytes(batch, length, k, n, e_x, e_c, e_s, e_i) -> int:
    return (
        batch * n * (2 * length * e_x + length * e_c + k * e_s)
        + 2 * batch * k * e_i
        + batch * (k + length) * 4
    )


@pytest.mark.parametrize("variant", RESIDUAL_VARIANTS)
@pytest.mark.parametrize(("batch", "length", "ratio"), SCATTER_SHAPES)
def test_bench_scatter_residual(benchmark, batch, length, ratio, variant):
    x, cache, idx, src = make_scatter_inputs(batch, length, ratio)
    k, n = idx.shape[1], x.shape[-1]
    out = torch.empty_like(x)
    expanded = idx.unsqueeze(-1).expand(-1, -1, n)
    if variant == "eager":

        def fn():
            cache.scatter_(1, expanded, src)
            return torch.add(x, cache, out=out)

    elif variant == "unfused-triton":
        from spacache_kernels.kernels.scatter import scatter_rows

        def fn():
            scatter_rows(cache, idx, src)
            return torch.add(x, cache, out=out)

    else:
        fn = lambda: scatter_residual(x, cache, idx, src, out=out, backend=variant, check_indices=False)

    # Every variant computes the same thing: check it once before timing (bit-exact in one dtype).
    expect = scatter_residual(x, cache.clone(), idx, src, backend="torch")
    assert torch.equal(fn(), expect)
    e = _elem(harness.DTYPE)
    harness.record(
        benchmark,
        fn,
        op="scatter_residual",
        backend=VARIANT_LABELS.get(variant, variant),
        shape=f"B={batch} L={length} n={n} k={k} ({ratio:g}L) {DTYPE_NAME}",
        bytes_moved=residual_bytes(batch, length, k, n, e, e, e, 8),
        baseline=None if variant == "torch" else "torch backend (reference)",
    )


@pytest.mark.parametrize("backend", harness.BACKENDS)
@pytest.mark.parametrize(("batch", "length", "ratio"), SCATTER_SHAPES)
def test_bench_scatter_rows(benchmark, batch, length, ratio, backend):
    _, cache, idx, src = make_scatter_inputs(batch, length, ratio)
    k, n = idx.shape[1], cache.shape[-1]
    fn = lambda: scatter_rows_(cache, idx, src, backend=backend, check_indices=False)
    fn()
    assert torch.equal(torch.gather(cache, 1, idx.unsqueeze(-1).expand(-1, -1, n)), src)
    e = _elem(harness.DTYPE)
    harness.record(
        benchmark,
        fn,
        op="scatter_rows_",
        backend=backend,
        shape=f"B={batch} L={length} n={n} k={k} ({ratio:g}L) {DTYPE_NAME}",
        bytes_moved=batch * k * n * 2 * e + batch * k * 8,
        baseline=None if backend == "torch" else "torch backend (scatter_)",
    )


@pytest.mark.parametrize("backend", harness.BACKENDS)
@pytest.mark.parametrize(("batch", "length"), NORM_SHAPES)
def test_bench_rms_norm(benchmark, batch, length, backend):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, length, WIDTH, generator=gen).to(harness.DEVICE, harness.DTYPE)
    weight = (1 + 0.1 * torch.randn(WIDTH, generator=gen)).to(harness.DEVICE, harness.DTYPE)
    out = torch.empty_like(x)
    fn = lambda: rms_norm(x, weight, 1e-5, out=out, backend=backend)
    expect = rms_norm(x, weight, 1e-5, backend="torch")
    torch.testing.assert_close(fn(), expect, atol=6e-2, rtol=6e-2)
    e = _elem(harness.DTYPE)
    harness.record(
        benchmark,
        fn,
        op="rms_norm",
        backend=backend,
        shape=f"B={batch} L={length} d={WIDTH} {DTYPE_NAME}",
        bytes_moved=batch * length * WIDTH * 2 * e + WIDTH * e,
        baseline=None if backend == "torch" else "torch backend (reference)",
    )
