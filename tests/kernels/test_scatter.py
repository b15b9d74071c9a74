"""Kernel tests for the row scatter and the fused scatter + residual add, against the reference.

The reference itself is checked against a plain Python loop. Both ops only copy and add, so every
comparison is exact (``torch.equal``): the kernel rounds ``src`` to the cache dtype and adds in fp32
exactly as the reference does. On the CPU these run under ``TRITON_INTERPRET=1`` (tests/conftest.py)
in fp32 and fp16; bf16 at real shapes runs only on a GPU (``gpu`` marker).
"""

from __future__ import annotations

import pytest
import torch

from spacache_kernels.kernels import scatter as kernels
from spacache_kernels.ops import reference
from tests.helpers import distinct_indices, poisoned, randn

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (B, L, n, k): batch 1 and 3, L = 1 and 37, n = 72 and 100 (not powers of two), k = 0 and k = L.
SHAPES = [
    pytest.param(1, 1, 72, 0, id="B1-L1-n72-k0"),
    pytest.param(1, 1, 72, 1, id="B1-L1-n72-kL"),
    pytest.param(3, 37, 100, 0, id="B3-L37-n100-k0"),
    pytest.param(3, 37, 100, 9, id="B3-L37-n100-k9"),
    pytest.param(3, 37, 100, 37, id="B3-L37-n100-kL"),
    pytest.param(2, 16, 72, 5, id="B2-L16-n72-k5"),
]
# (x, cache, src) dtypes: one dtype throughout, and src / cache / x in mixed precisions.
DTYPES = [
    pytest.param(F32, F32, F32, id="fp32"),
    pytest.param(F16, F16, F16, id="fp16"),
    pytest.param(F16, F16, F32, id="fp16-src32"),
    pytest.param(F16, F32, F16, id="fp16-cache32"),
]
IDX_DTYPES = [pytest.param(torch.int64, id="i64"), pytest.param(torch.int32, id="i32")]


def make_inputs(batch, length, n, k, x_dtype=F32, cache_dtype=F32, src_dtype=F32, *, device="cpu", seed=0):
    """x (B, L, n), cache (B, L, n), idx (B, k) int64 shuffled (not ascending), src (B, k, n)."""
    x = randn(batch, length, n, dtype=x_dtype, device=device, seed=seed)
    cache = randn(batch, length, n, dtype=cache_dtype, device=device, seed=seed + 1)
    src = randn(batch, k, n, dtype=src_dtype, device=device, seed=seed + 2, scale=3.0)
    idx = distinct_indices(batch, length, k, seed=seed + 3, device=device)
    # Shuffle within each row: the kernels must not rely on ascending order.
    order = torch.stack(
        [torch.randperm(k, generator=torch.Generator().manual_seed(seed + b)) for b in range(batch)]
    )
    idx = torch.gather(idx, 1, order.to(device))
    return x, cache, idx, src


def direct_scatter(cache, idx, src):
    """A Python loop of row assignments: the plain meaning of the scatter."""
    expect = cache.clone()
    for b in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            expect[b, int(idx[b, j])] = src[b, j].to(cache.dtype)
    return expect


def assert_scattered(before, after, idx, src):
    """Selected rows hold exactly ``src`` (cast), every other row is bit-for-bit unchanged."""
    selected = torch.zeros(before.shape[:2], dtype=torch.bool, device=before.device)
    selected.scatter_(1, idx.long(), True)
    assert torch.equal(after[~selected], before[~selected]), "a row not in idx was modified"
    rows = torch.gather(after, 1, idx.long().unsqueeze(-1).expand(-1, -1, after.shape[-1]))
    assert torch.equal(rows, src.to(after.dtype)), "a selected row does not hold src"


# --------------------------------------------------------------------------------------------
# the reference against a direct computation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("x_dtype", "cache_dtype", "src_dtype"), DTYPES)
@pytest.mark.parametrize(("batch", "length", "n", "k"), SHAPES)
def test_reference_matches_direct_computation(batch, length, n, k, x_dtype, cache_dtype, src_dtype):
    x, cache, idx, src = make_inputs(batch, length, n, k, x_dtype, cache_dtype, src_dtype, seed=length + k)
    expect_cache = direct_scatter(cache, idx, src)
    # The ops define the add in fp32 (then rounded to x's dtype); the independent part here is the
    # loop above, which checks where each row goes and how it is cast.
    expect_out = (x.float() + expect_cache.float()).to(x_dtype)

    scattered = reference.scatter_rows_(cache.clone(), idx, src)
    assert torch.equal(scattered, expect_cache)

    written = cache.clone()
    out = reference.scatter_residual(x, written, idx, src)
    assert out.dtype == x_dtype
    assert torch.equal(written, expect_cache)
    assert torch.equal(out, expect_out)


# --------------------------------------------------------------------------------------------
# scatter_rows
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("idx_dtype", IDX_DTYPES)
@pytest.mark.parametrize(("x_dtype", "cache_dtype", "src_dtype"), DTYPES)
@pytest.mark.parametrize(("batch", "length", "n", "k"), SHAPES)
def test_scatter_rows_matches_reference(
    batch, length, n, k, x_dtype, cache_dtype, src_dtype, idx_dtype, device
):
    _, cache, idx, src = make_inputs(batch, length, n, k, x_dtype, cache_dtype, src_dtype, device=device)
    idx = idx.to(idx_dtype)
    written = cache.clone()
    result = kernels.scatter_rows(written, idx, src)
    assert result is written
    assert_scattered(cache, written, idx, src)
    assert torch.equal(written, reference.scatter_rows_(cache.clone(), idx, src))


def test_scatter_rows_strided_src_and_idx(device):
    """src and idx as transposed / sliced views: the launcher passes their strides through."""
    batch, length, n, k = 3, 37, 100, 11
    _, cache, idx, src = make_inputs(batch, length, n, k, device=device, seed=5)
    src_view = src.transpose(1, 2).contiguous().transpose(1, 2)  # (B, k, n) with stride_n = k
    wide = torch.cat([src, src], dim=-1).contiguous()[..., ::2]  # stride_n = 2 (values differ)
    idx_view = idx.t().contiguous().t()  # (B, k) with stride_b = 1
    assert not src_view.is_contiguous() and not wide.is_contiguous() and not idx_view.is_contiguous()
    for view in (src_view, wide):
        written = kernels.scatter_rows(cache.clone(), idx_view, view)
        assert_scattered(cache, written, idx, view)


# --------------------------------------------------------------------------------------------
# scatter_residual
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("idx_dtype", IDX_DTYPES)
@pytest.mark.parametrize(("x_dtype", "cache_dtype", "src_dtype"), DTYPES)
@pytest.mark.parametrize(("batch", "length", "n", "k"), SHAPES)
def test_scatter_residual_matches_reference(
    batch, length, n, k, x_dtype, cache_dtype, src_dtype, idx_dtype, device
):
    x, cache, idx, src = make_inputs(batch, length, n, k, x_dtype, cache_dtype, src_dtype, device=device)
    idx = idx.to(idx_dtype)
    written = cache.clone()
    out_buf = poisoned(x.shape, x_dtype, device)
    out = kernels.scatter_residual(x, written, idx, src, out=out_buf)
    assert out is out_buf
    assert not out.isnan().any(), "an output element was never written"
    assert_scattered(cache, written, idx, src)

    ref_cache = cache.clone()
    ref_out = reference.scatter_residual(x, ref_cache, idx, src)
    assert torch.equal(written, ref_cache)
    assert torch.equal(out, ref_out)


def test_scatter_residual_k0_is_plain_add(device):
    x, cache, idx, src = make_inputs(2, 37, 100, 0, F16, F16, F16, device=device, seed=3)
    written = cache.clone()
    out = kernels.scatter_residual(x, written, idx, src)
    assert out.dtype == F16 and out.shape == x.shape
    assert torch.equal(written, cache)
    assert torch.equal(out, (x.float() + cache.float()).to(F16))


def test_scatter_residual_strided_x_src_idx(device):
    batch, length, n, k = 3, 37, 100, 13
    x, cache, idx, src = make_inputs(batch, length, n, k, device=device, seed=7)
    x_view = x.transpose(0, 1).contiguous().transpose(0, 1)  # (B, L, n), batch stride n
    src_view = src.transpose(1, 2).contiguous().transpose(1, 2)
    idx_view = idx.t().contiguous().t()
    assert not (x_view.is_contiguous() or src_view.is_contiguous() or idx_view.is_contiguous())
    written = cache.clone()
    out = kernels.scatter_residual(x_view, written, idx_view, src_view)
    ref_cache = cache.clone()
    assert torch.equal(out, reference.scatter_residual(x, ref_cache, idx, src))
    assert torch.equal(written, ref_cache)


def test_scatter_residual_out_is_x(device):
    """``out=x`` updates the residual stream in place (each element reads its own x first)."""
    x, cache, idx, src = make_inputs(2, 37, 72, 10, F16, F16, F16, device=device, seed=11)
    expect = reference.scatter_residual(x, cache.clone(), idx, src)
    stream = x.clone()
    out = kernels.scatter_residual(stream, cache.clone(), idx, src, out=stream)
    assert out is stream
    assert torch.equal(stream, expect)


@pytest.mark.parametrize(
    "garbage",
    ["zeros", "minus-one", "int32-max", "random-in-range"],
)
def test_scatter_residual_ignores_slot_garbage(garbage, monkeypatch, device):
    """The uninitialised slot buffer may hold anything; the sparse-set test must reject it all.

    "zeros" and "random-in-range" make most unselected positions point at valid slots of *other*
    positions, which only the ``idx[b, slot] == l`` check can catch.
    """
    batch, length, n, k = 2, 37, 72, 9
    x, cache, idx, src = make_inputs(batch, length, n, k, device=device, seed=13)

    def fake_buffer(n_batch, len_, dev):
        if garbage == "zeros":
            return torch.zeros((n_batch, len_), dtype=torch.int32, device=dev)
        if garbage == "minus-one":
            return torch.full((n_batch, len_), -1, dtype=torch.int32, device=dev)
        if garbage == "int32-max":
            return torch.full((n_batch, len_), 2**31 - 1, dtype=torch.int32, device=dev)
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, k, (n_batch, len_), generator=g, dtype=torch.int32).to(dev)

    monkeypatch.setattr(kernels, "_new_slot_buffer", fake_buffer)
    written = cache.clone()
    out = kernels.scatter_residual(x, written, idx, src)
    ref_cache = cache.clone()
    assert torch.equal(out, reference.scatter_residual(x, ref_cache, idx, src))
    assert torch.equal(written, ref_cache)


def test_scatter_residual_duplicates_agree(device):
    """With a repeated index (check_indices=False upstream) one src row wins, in cache and out alike."""
    x, cache, _, src = make_inputs(1, 8, 72, 3, device=device, seed=17)
    idx = torch.tensor([[5, 2, 5]], device=device)
    written = cache.clone()
    out = kernels.scatter_residual(x, written, idx, src)
    assert torch.equal(written[0, 5], src[0, 0]) or torch.equal(written[0, 5], src[0, 2])
    assert torch.equal(written[0, 2], src[0, 1])
    assert torch.equal(out, x + written)


# --------------------------------------------------------------------------------------------
# GPU: real shapes in bf16
# --------------------------------------------------------------------------------------------
GPU_SHAPES = [
    pytest.param(batch, length, id=f"B{batch}-L{length}") for batch in (1, 16) for length in (256, 1024)
]


@pytest.mark.gpu
@pytest.mark.parametrize(("batch", "length"), GPU_SHAPES)
def test_gpu_scatter_rows_bf16(batch, length):
    n, k = 4096, length // 4
    _, cache, idx, src = make_inputs(batch, length, n, k, BF16, BF16, BF16, device="cuda", seed=batch)
    written = kernels.scatter_rows(cache.clone(), idx, src)
    assert_scattered(cache, written, idx, src)


@pytest.mark.gpu
@pytest.mark.parametrize(("x_dtype", "cache_dtype", "src_dtype"), [(BF16, BF16, BF16), (BF16, F32, BF16)])
@pytest.mark.parametrize(("batch", "length"), GPU_SHAPES)
def test_gpu_scatter_residual_bf16(batch, length, x_dtype, cache_dtype, src_dtype):
    n, k = 4096, length // 4
    x, cache, idx, src = make_inputs(batch, length, n, k, x_dtype, cache_dtype, src_dtype, device="cuda")
    written = cache.clone()
    out = kernels.scatter_residual(x, written, idx, src, out=poisoned(x.shape, x_dtype, "cuda"))
    assert_scattered(cache, written, idx, src)
    ref_cache = cache.clone()
    assert torch.equal(out, reference.scatter_residual(x, ref_cache, idx, src))
    assert torch.equal(written, ref_cache)
