"""Microbenchmarks: fused proxy drift + selection (proxy_select), and the selection step alone.

GPU: LLaDA-8B (d 4096) and Dream-7B (d 3584) widths at rank 128, L 256 / 1024 generated tokens,
batch 1 / 16, k = L / 4, every backend in ``harness.BACKENDS``; plus the bottom-k step timed as the
Triton sort kernel vs ``torch.topk`` + sort on the same scores (the op's ``select=`` choice, which
must be settled from these numbers). CPU: one small shape, torch backend only (the Triton
interpreter's timings mean nothing).

Roofline (see ``spacache_kernels/kernels/proxy_select.py``): bytes = hidden B*L*d + proj d*r + proxy
cache read and write 2*B*L*r + scores B*L*4 + update_idx B*k*8; FLOPs = 2*B*L*d*r.
"""

from __future__ import annotations

import pytest
import torch

from bench import harness
from spacache_kernels.ops import reference
from spacache_kernels.ops.proxy import proxy_select

RANK = 128

if harness.ON_GPU:
    SHAPES = [
        pytest.param(model, batch, length, d, RANK, id=f"{model}-B{batch}-L{length}-d{d}-r{RANK}")
        for model, d in (("llada8b", 4096), ("dream7b", 3584))
        for length in (256, 1024)
        for batch in (1, 16)
    ]
    SELECT_SHAPES = [
        pytest.param(batch, length, id=f"B{batch}-L{length}") for length in (256, 1024) for batch in (1, 16)
    ]
    SELECTS = ("kernel", "torch")
else:
    SHAPES = [pytest.param("small", 2, 256, 512, 64, id="small-B2-L256-d512-r64")]
    SELECT_SHAPES = [pytest.param(2, 256, id="B2-L256")]
    SELECTS = ("torch",)


def proxy_bytes(batch, length, d, r, k, dtype, cache_dtype) -> int:
    elem = torch.finfo(dtype).bits // 8
    cache_elem = torch.finfo(cache_dtype).bits // 8
    return (
        batch * length * d * elem
        + d * r * elem
        + 2 * batch * length * r * cache_elem
        + batch * length * 4
        + batch * k * 8
    )


def make_inputs(batch, length, d, r):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, length, d, generator=gen).to(harness.DEVICE, harness.DTYPE)
    proj = (torch.randn(d, r, generator=gen) * d**-0.5).to(harness.DEVICE, harness.DTYPE)
    proxy_cache = torch.randn(batch, length, r, generator=gen).to(harness.DEVICE, harness.DTYPE)
    return hidden, proj, proxy_cache


@pytest.mark.parametrize("backend", harness.BACKENDS)
@pytest.mark.parametrize(("model", "batch", "length", "d", "r"), SHAPES)
def test_bench_proxy_select(benchmark, model, batch, length, d, r, backend):
    hidden, proj, proxy_cache = make_inputs(batch, length, d, r)
    k = length // 4
    # The call overwrites proxy_cache each time; the work (and its timing) does not depend on it.
    fn = lambda: proxy_select(hidden, proj, proxy_cache, k, backend=backend)
    update_idx, scores = fn()
    assert update_idx.shape == (batch, k) and scores.shape == (batch, length)
    harness.record(
        benchmark,
        fn,
        op="proxy_select",
        backend=backend,
        shape=f"{model} B={batch} L={length} d={d} r={r} k={k} {str(harness.DTYPE).replace('torch.', '')}",
        bytes_moved=proxy_bytes(batch, length, d, r, k, harness.DTYPE, proxy_cache.dtype),
        flops=2 * batch * length * d * r,
        baseline="torch backend (matmul + cosine + topk + sort + copy)" if backend != "torch" else None,
    )


@pytest.mark.parametrize("select", SELECTS)
@pytest.mark.parametrize(("batch", "length"), SELECT_SHAPES)
def test_bench_bottom_k(benchmark, batch, length, select):
    gen = torch.Generator().manual_seed(1)
    # A random permutation per row: distinct scores, so both selections must agree exactly.
    scores = (torch.rand(batch, length, generator=gen).argsort(dim=1).float() / length).to(harness.DEVICE)
    k = length // 4
    if select == "kernel":
        from spacache_kernels.kernels.proxy_select import bottom_k_select

        out = torch.empty((batch, k), dtype=torch.int64, device=harness.DEVICE)
        fn = lambda: bottom_k_select(scores, k, out)
        assert torch.equal(fn(), reference.bottom_k_sorted(scores, k))
    else:
        fn = lambda: reference.bottom_k_sorted(scores, k)
    harness.record(
        benchmark,
        fn,
        op="bottom_k",
        backend="triton sort kernel" if select == "kernel" else "torch.topk + sort",
        shape=f"B={batch} L={length} k={k} fp32",
        bytes_moved=batch * length * 4 + batch * k * 8,
        baseline="torch.topk + sort" if select == "kernel" else None,
    )
