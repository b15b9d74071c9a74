"""Kernel tests for the fused proxy drift kernel and the bottom-k selection kernel vs the reference.

On the CPU these run under ``TRITON_INTERPRET=1`` (set by tests/conftest.py) in fp32 and fp16;
bf16 at real shapes runs only on a GPU (``gpu`` marker).
"""

from __future__ import annotations

import math

import pytest
import torch

from spacache_kernels.kernels import proxy_select as kernels
from spacache_kernels.ops import reference
from tests.helpers import poisoned, randn, tolerances

# fp32 math on both sides: only the summation order differs.
SCORE_TOL = dict(atol=2e-5, rtol=1e-5)


def make_inputs(batch, length, d, r, dtype, device, *, cache_dtype=None, drift=None, seed=0):
    """hidden (B, L, d), proj (d, r) and a previous-step proxy cache (B, L, r).

    ``drift=None``: an unrelated random cache (cosines near 0). ``drift=eps``: the cache is the
    current proxy plus relative noise ``eps`` (cosines near 1, as between two denoising steps).
    """
    hidden = randn(batch, length, d, dtype=dtype, device=device, seed=seed)
    proj = randn(d, r, dtype=dtype, device=device, seed=seed + 1, scale=d**-0.5)
    cache_dtype = cache_dtype or dtype
    if drift is None:
        cache = randn(batch, length, r, dtype=cache_dtype, device=device, seed=seed + 2)
    else:
        proxy = hidden.float() @ proj.float()
        noise = randn(batch, length, r, device=device, seed=seed + 2)
        # Per-row drift sizes spread over two decades, so scores are distinct and well separated.
        order = torch.randperm(length, generator=torch.Generator().manual_seed(seed + 3))
        scale = torch.logspace(-2, 0, length)[order].to(device).view(1, length, 1)
        cache = (proxy + drift * scale * noise * proxy.norm(dim=-1, keepdim=True) / math.sqrt(r)).to(
            cache_dtype
        )
    return hidden, proj, cache


def run_both(hidden, proj, cache):
    """(kernel scores, kernel-written cache), (reference scores, reference-written cache)."""
    kernel_cache = cache.clone()
    scores = poisoned(hidden.shape[:2], torch.float32, hidden.device)
    out = kernels.proxy_select_fused(hidden, proj, kernel_cache, scores)
    assert out is scores
    ref_cache = cache.clone()
    _, ref_scores = reference.proxy_select(hidden, proj, ref_cache, 0)
    return (scores, kernel_cache), (ref_scores, ref_cache)


SHAPES = [
    pytest.param(1, 1, 72, 24, id="B1-L1-d72-r24"),
    pytest.param(3, 37, 100, 48, id="B3-L37-d100-r48"),
    pytest.param(2, 64, 256, 128, id="B2-L64-d256-r128"),
    pytest.param(1, 40, 64, 256, id="B1-L40-d64-r256"),
    pytest.param(1, 33, 48, 5, id="B1-L33-d48-r5"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(("batch", "length", "d", "r"), SHAPES)
def test_fused_matches_reference(batch, length, d, r, dtype, device):
    hidden, proj, cache = make_inputs(batch, length, d, r, dtype, device, seed=batch * 7 + length)
    (scores, kernel_cache), (ref_scores, ref_cache) = run_both(hidden, proj, cache)
    assert scores.dtype == torch.float32
    assert not scores.isnan().any(), "a score was never written"
    torch.testing.assert_close(scores, ref_scores, **SCORE_TOL)
    # The cache now holds the new proxies, rounded to its dtype like the reference's.
    torch.testing.assert_close(kernel_cache, ref_cache, **tolerances(dtype))
    assert not torch.allclose(kernel_cache.float(), cache.float(), atol=1e-2), "cache was not written"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fused_small_drift_scores_near_one(dtype, device):
    """Between steps the proxies barely move: the cosine must resolve differences just under 1."""
    hidden, proj, cache = make_inputs(2, 50, 96, 32, dtype, device, drift=1e-2, seed=3)
    (scores, kernel_cache), (ref_scores, ref_cache) = run_both(hidden, proj, cache)
    assert bool((ref_scores > 0.99).all())
    torch.testing.assert_close(scores, ref_scores, **SCORE_TOL)
    torch.testing.assert_close(kernel_cache, ref_cache, **tolerances(dtype))
    # The ranking (what selection uses) survives: the same positions are the 10 lowest.
    assert torch.equal(reference.bottom_k_sorted(scores, 10), reference.bottom_k_sorted(ref_scores, 10))


def test_fused_zero_vectors_score_zero_not_nan(device):
    """The 1e-8 clamp of both norms: a zero proxy (zero hidden row) or a zero cached row scores 0."""
    hidden, proj, cache = make_inputs(2, 20, 40, 16, torch.float32, device, seed=8)
    hidden[:, :3] = 0.0
    cache[:, 5:8] = 0.0
    cache[:, 0] = 0.0  # both zero
    (scores, kernel_cache), (ref_scores, ref_cache) = run_both(hidden, proj, cache)
    zero_rows = [0, 1, 2, 5, 6, 7]
    assert bool((ref_scores[:, zero_rows] == 0).all()) and not ref_scores.isnan().any()
    torch.testing.assert_close(scores, ref_scores, **SCORE_TOL)
    torch.testing.assert_close(kernel_cache, ref_cache, **tolerances(torch.float32))


def test_fused_cache_dtype_differs_from_hidden(device):
    """fp16 hidden and proj, fp32 cache: p is stored at fp32, not rounded through fp16."""
    hidden, proj, cache = make_inputs(2, 37, 72, 24, torch.float16, device, cache_dtype=torch.float32)
    (scores, kernel_cache), (ref_scores, ref_cache) = run_both(hidden, proj, cache)
    assert kernel_cache.dtype == torch.float32
    torch.testing.assert_close(scores, ref_scores, **SCORE_TOL)
    torch.testing.assert_close(kernel_cache, ref_cache, **tolerances(torch.float32))


def test_fused_mixed_hidden_and_proj_dtypes(device):
    """fp16 hidden with an fp32 proj (the upcast path) against the reference's fp32 product."""
    hidden, _, cache = make_inputs(2, 30, 80, 40, torch.float16, device, seed=5)
    proj = randn(80, 40, device=device, seed=6, scale=80**-0.5)
    (scores, kernel_cache), (ref_scores, ref_cache) = run_both(hidden, proj, cache)
    torch.testing.assert_close(scores, ref_scores, **SCORE_TOL)
    torch.testing.assert_close(kernel_cache, ref_cache, **tolerances(torch.float16))


@pytest.mark.parametrize("layout", ["strided-rows", "strided-features", "transposed-proj"])
def test_fused_non_contiguous_inputs(layout, device):
    """The launcher passes every stride, so hidden / proj views need no copy."""
    batch, length, d, r = 2, 37, 72, 24
    hidden, proj, cache = make_inputs(batch, length, d, r, torch.float32, device, seed=11)
    if layout == "strided-rows":  # every other row of a longer sequence
        wide = randn(batch, 2 * length, d, device=device, seed=12)
        wide[:, ::2] = hidden
        hidden = wide[:, ::2]
    elif layout == "strided-features":  # stride(-1) != 1
        hidden = hidden.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        proj = proj.T.contiguous().T
    assert not (hidden.is_contiguous() and proj.is_contiguous())
    (scores, kernel_cache), (ref_scores, ref_cache) = run_both(hidden, proj, cache)
    torch.testing.assert_close(scores, ref_scores, **SCORE_TOL)
    torch.testing.assert_close(kernel_cache, ref_cache, **tolerances(torch.float32))


def test_fused_rejects_rank_above_256(device):
    hidden, proj, cache = make_inputs(1, 4, 16, 257, torch.float32, device)
    with pytest.raises(ValueError, match="proj"):
        kernels.proxy_select_fused(hidden, proj, cache, poisoned((1, 4), torch.float32, device))


# --------------------------------------------------------------------------------------------
# selection kernel
# --------------------------------------------------------------------------------------------
def tie_free_scores(batch, length, device, seed=0):
    """Distinct scores per row (a scaled random permutation), negative and positive."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(length, generator=g).float() / length - 0.5 for _ in range(batch)]
    return torch.stack(rows).to(device)


def python_bottom_k(scores: torch.Tensor, k: int) -> list[list[int]]:
    """Bottom-k by a plain sort on (score, position), NaN above +inf, -0.0 equal to +0.0; ascending."""

    def rank(value: float, pos: int):
        return (math.isnan(value), 0.0 if math.isnan(value) else value, pos)

    out = []
    for row in scores.tolist():
        order = sorted(range(len(row)), key=lambda i: rank(row[i], i))
        out.append(sorted(order[:k]))
    return out


@pytest.mark.parametrize(
    ("batch", "length", "k"),
    [
        pytest.param(1, 1, 1, id="L1-k1"),
        pytest.param(1, 37, 1, id="L37-k1"),
        pytest.param(3, 37, 9, id="B3-L37-k9"),
        pytest.param(3, 37, 37, id="B3-L37-kL"),
        pytest.param(2, 256, 64, id="B2-L256-k64"),
        pytest.param(2, 1000, 250, id="B2-L1000-k250"),
    ],
)
def test_bottom_k_matches_reference(batch, length, k, device):
    scores = tie_free_scores(batch, length, device, seed=length + k)
    out = torch.full((batch, k), -1, dtype=torch.int64, device=device)
    got = kernels.bottom_k_select(scores, k, out)
    assert got is out
    assert got.dtype == torch.int64 and got.shape == (batch, k)
    assert bool((got[:, 1:] > got[:, :-1]).all()), "positions must be strictly ascending"
    ref = reference.bottom_k_sorted(scores, k)
    for row_got, row_ref in zip(got.tolist(), ref.tolist()):
        assert set(row_got) == set(row_ref)
    assert got.tolist() == python_bottom_k(scores, k)


def test_bottom_k_zero_launches_nothing(device):
    scores = tie_free_scores(2, 37, device)
    got = kernels.bottom_k_select(scores, 0)
    assert got.shape == (2, 0) and got.dtype == torch.int64


def test_bottom_k_ties_go_to_lower_positions(device):
    length = 40
    scores = torch.zeros(2, length, device=device)
    scores[0, ::3] = -1.0  # 14 equal minima
    scores[1] = 0.5  # all tied
    got = kernels.bottom_k_select(scores, 10)
    assert got[0].tolist() == list(range(0, 30, 3))
    assert got[1].tolist() == list(range(10))
    assert got.tolist() == python_bottom_k(scores, 10)


def test_bottom_k_special_values(device):
    """-inf first, -0.0 ties +0.0, NaN ranks above +inf (as torch.topk(largest=False) does)."""
    nan, inf = float("nan"), float("inf")
    scores = torch.tensor(
        [[3.0, 0.0, -0.0, nan, -inf, inf, 1.0, 1.0, -2.0, 0.0, -1e-30, 1e30, -nan]], device=device
    )
    for k in range(scores.shape[1] + 1):
        assert kernels.bottom_k_select(scores, k).tolist() == python_bottom_k(scores, k), f"k={k}"


def test_bottom_k_strided_scores(device):
    """A (B, L) view with non-unit strides (e.g. a column slice) is read through its strides."""
    base = tie_free_scores(3, 80, device, seed=4)
    scores = base[:, ::2]
    got = kernels.bottom_k_select(scores, 7)
    assert got.tolist() == python_bottom_k(scores, 7)


def test_bottom_k_rejects_rows_longer_than_one_sort(device):
    scores = torch.zeros(1, kernels.MAX_SELECT_L + 1, device=device)
    with pytest.raises(ValueError, match="scores"):
        kernels.bottom_k_select(scores, 1)


# --------------------------------------------------------------------------------------------
# GPU, real shapes, bf16
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("length", [256, 1024])
def test_gpu_real_shapes_bf16(batch, length, device):
    d, r = 4096, 128
    k = length // 4
    hidden, proj, cache = make_inputs(batch, length, d, r, torch.bfloat16, device, drift=0.05, seed=1)
    kernel_cache = cache.clone()
    scores = poisoned((batch, length), torch.float32, device)
    kernels.proxy_select_fused(hidden, proj, kernel_cache, scores)
    idx = kernels.bottom_k_select(scores, k)
    ref_cache = cache.clone()
    ref_idx, ref_scores = reference.proxy_select(hidden, proj, ref_cache, k)
    torch.testing.assert_close(scores, ref_scores, atol=2e-2, rtol=0)
    torch.testing.assert_close(kernel_cache, ref_cache, **tolerances(torch.bfloat16))
    assert bool((idx[:, 1:] > idx[:, :-1]).all())
    # bf16 near-ties can flip which index is chosen, not how low the chosen scores are.
    chosen = ref_scores.gather(1, idx).sort(dim=1).values
    ref_chosen = ref_scores.gather(1, ref_idx).sort(dim=1).values
    torch.testing.assert_close(chosen, ref_chosen, atol=2e-2, rtol=0)
    # And on the scores it was given, the selection kernel picks exactly topk's values.
    exact = reference.bottom_k_sorted(scores, k)
    assert torch.equal(scores.gather(1, idx).sort(dim=1).values, scores.gather(1, exact).sort(dim=1).values)
