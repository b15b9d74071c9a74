"""Op-level tests for proxy_select (validation, backends, the reference itself) and svd_proxy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spacache_kernels.kernels import proxy_select as kernels
from spacache_kernels.ops import proxy, reference
from spacache_kernels.ops.proxy import proxy_select, svd_proxy
from tests.helpers import randn, tolerances


def make_inputs(batch, length, d, r, dtype=torch.float32, device="cpu", cache_dtype=None, seed=0):
    hidden = randn(batch, length, d, dtype=dtype, device=device, seed=seed)
    proj = randn(d, r, dtype=dtype, device=device, seed=seed + 1, scale=d**-0.5)
    cache = randn(batch, length, r, dtype=cache_dtype or dtype, device=device, seed=seed + 2)
    return hidden, proj, cache


def direct_proxy_select(hidden, proj, cache, k):
    """An independent computation: F.cosine_similarity and a plain Python sort per row."""
    proxy_rows = hidden.double() @ proj.double()
    scores = F.cosine_similarity(proxy_rows, cache.double(), dim=-1, eps=1e-8)
    picked = []
    for row in scores.tolist():
        order = sorted(range(len(row)), key=lambda i: row[i])
        picked.append(sorted(order[:k]))
    return picked, scores, proxy_rows


# --------------------------------------------------------------------------------------------
# the reference against a direct computation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("batch", "length", "d", "r", "k"),
    [(1, 1, 72, 24, 1), (3, 37, 100, 48, 9), (2, 64, 40, 8, 0), (2, 20, 33, 300, 20)],
    ids=["B1-L1-k1", "B3-L37-k9", "B2-L64-k0", "B2-L20-r300-kL"],
)
def test_reference_matches_direct_computation(batch, length, d, r, k):
    hidden, proj, cache = make_inputs(batch, length, d, r, seed=length)
    picked, scores, proxy_rows = direct_proxy_select(hidden, proj, cache, k)
    written = cache.clone()
    update_idx, ref_scores = reference.proxy_select(hidden, proj, written, k)
    torch.testing.assert_close(ref_scores, scores.float(), atol=1e-5, rtol=1e-5)
    assert update_idx.dtype == torch.int64 and update_idx.shape == (batch, k)
    assert update_idx.tolist() == picked
    torch.testing.assert_close(written, proxy_rows.float(), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# the op: both backends
# --------------------------------------------------------------------------------------------
CASES = [
    pytest.param(1, 1, 72, 24, 0, id="B1-L1-k0"),
    pytest.param(1, 1, 72, 24, 1, id="B1-L1-kL"),
    pytest.param(3, 37, 100, 48, 1, id="B3-L37-k1"),
    pytest.param(3, 37, 100, 48, 9, id="B3-L37-k9"),
    pytest.param(3, 37, 100, 48, 37, id="B3-L37-kL"),
    pytest.param(2, 128, 256, 64, 32, id="B2-L128-d256-k32"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(("batch", "length", "d", "r", "k"), CASES)
@pytest.mark.parametrize("select", ["kernel", "torch"])
def test_triton_backend_matches_torch_backend(batch, length, d, r, k, dtype, select, device):
    hidden, proj, cache = make_inputs(batch, length, d, r, dtype, device, seed=batch + length + k)
    triton_cache, torch_cache = cache.clone(), cache.clone()
    idx, scores = proxy_select(hidden, proj, triton_cache, k, backend="triton", select=select)
    ref_idx, ref_scores = proxy_select(hidden, proj, torch_cache, k, backend="torch")
    assert scores.dtype == torch.float32 and scores.shape == (batch, length)
    assert idx.dtype == torch.int64 and idx.shape == (batch, k)
    torch.testing.assert_close(scores, ref_scores, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(triton_cache, torch_cache, **tolerances(dtype))
    # Random caches give cosines spread over (-1, 1): no ties, so the sets must be identical.
    assert len(set(ref_scores.flatten().tolist())) == ref_scores.numel()
    assert idx.tolist() == ref_idx.tolist()
    if k > 1:
        assert bool((idx[:, 1:] > idx[:, :-1]).all())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(("batch", "length"), [(0, 5), (2, 0)], ids=["B0", "L0"])
def test_empty_batch_or_length(batch, length, backend, device):
    hidden, proj, cache = make_inputs(batch, length, 8, 4, device=device)
    idx, scores = proxy_select(hidden, proj, cache, 0, backend=backend)
    assert idx.shape == (batch, 0) and idx.dtype == torch.int64
    assert scores.shape == (batch, length) and scores.dtype == torch.float32


def test_op_writes_cache_in_its_own_dtype(device):
    hidden, proj, cache = make_inputs(2, 37, 72, 24, torch.float16, device, cache_dtype=torch.float32)
    before = cache.clone()
    idx, scores = proxy_select(hidden, proj, cache, 5, backend="triton")
    assert cache.dtype == torch.float32
    torch.testing.assert_close(cache, hidden.float() @ proj.float(), atol=1e-4, rtol=1e-4)
    expected = F.cosine_similarity(hidden.float() @ proj.float(), before, dim=-1)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


def test_op_non_contiguous_hidden_is_handled(device):
    """Views of hidden (strided rows, e.g. the generated region of a longer sequence) need no copy."""
    full = randn(2, 50, 72, device=device, seed=9)
    hidden = full[:, 10:47]  # rows 10..46: non-contiguous in the batch dim
    _, proj, cache = make_inputs(2, 37, 72, 24, device=device)
    assert not hidden.is_contiguous()
    triton_cache, torch_cache = cache.clone(), cache.clone()
    idx, scores = proxy_select(hidden, proj, triton_cache, 6, backend="triton")
    ref_idx, ref_scores = proxy_select(hidden.contiguous(), proj, torch_cache, 6, backend="torch")
    torch.testing.assert_close(scores, ref_scores, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(triton_cache, torch_cache, atol=1e-5, rtol=1e-5)
    assert idx.tolist() == ref_idx.tolist()


def test_select_kernel_breaks_ties_by_position(device):
    """A zero-initialised cache gives all-zero scores (the first step): the lowest positions win."""
    hidden, proj, _ = make_inputs(2, 37, 72, 24, device=device)
    cache = torch.zeros(2, 37, 24, device=device)
    idx, scores = proxy_select(hidden, proj, cache, 5, backend="triton")
    assert bool((scores == 0).all())
    assert idx.tolist() == [list(range(5))] * 2


def test_rank_above_256_needs_the_torch_backend(device):
    hidden, proj, cache = make_inputs(1, 8, 16, 257, device=device)
    with pytest.raises(ValueError, match=r"proj: .*r <= 256"):
        proxy_select(hidden, proj, cache.clone(), 2, backend="triton")
    idx, _ = proxy_select(hidden, proj, cache, 2, backend="torch")
    assert idx.shape == (1, 2)


def test_constants_match_the_kernel_module():
    assert proxy.MAX_TRITON_RANK == kernels.MAX_RANK
    assert proxy.MAX_KERNEL_SELECT_L == kernels.MAX_SELECT_L


class Spy:
    def __init__(self, fn):
        self.fn = fn
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.fixture
def spies(monkeypatch):
    spy = {
        "reference": Spy(reference.proxy_select),
        "fused": Spy(kernels.proxy_select_fused),
        "select_kernel": Spy(kernels.bottom_k_select),
        "select_torch": Spy(reference.bottom_k_sorted),
    }
    monkeypatch.setattr(reference, "proxy_select", spy["reference"])
    monkeypatch.setattr(kernels, "proxy_select_fused", spy["fused"])
    monkeypatch.setattr(kernels, "bottom_k_select", spy["select_kernel"])
    monkeypatch.setattr(reference, "bottom_k_sorted", spy["select_torch"])
    return spy


@pytest.mark.parametrize(
    ("env", "backend", "expected"),
    [
        (None, None, "triton"),  # auto under TRITON_INTERPRET=1 (or on CUDA)
        ("torch", None, "torch"),
        ("triton", None, "triton"),
        ("auto", None, "triton"),
        ("torch", "triton", "triton"),  # the argument beats the environment
        ("triton", "torch", "torch"),
    ],
)
def test_backend_choice(env, backend, expected, spies, monkeypatch, device):
    if env is None:
        monkeypatch.delenv("SPACACHE_BACKEND", raising=False)
    else:
        monkeypatch.setenv("SPACACHE_BACKEND", env)
    hidden, proj, cache = make_inputs(1, 9, 16, 8, device=device)
    proxy_select(hidden, proj, cache, 3, backend=backend)
    assert (spies["fused"].calls, spies["reference"].calls) == ((1, 0) if expected == "triton" else (0, 1))


def test_unknown_env_backend_is_named(monkeypatch):
    monkeypatch.setenv("SPACACHE_BACKEND", "cuda")
    hidden, proj, cache = make_inputs(1, 9, 16, 8)
    with pytest.raises(ValueError, match="SPACACHE_BACKEND"):
        proxy_select(hidden, proj, cache, 3)


@pytest.mark.parametrize(
    ("select", "kernel_calls", "torch_calls"), [(None, 1, 0), ("kernel", 1, 0), ("torch", 0, 1)]
)
def test_select_choice(select, kernel_calls, torch_calls, spies, device):
    hidden, proj, cache = make_inputs(2, 9, 16, 8, device=device)
    proxy_select(hidden, proj, cache, 3, backend="triton", select=select)
    assert (spies["select_kernel"].calls, spies["select_torch"].calls) == (kernel_calls, torch_calls)


def test_select_defaults_to_torch_beyond_one_sort(spies, device, monkeypatch):
    monkeypatch.setattr(proxy, "MAX_KERNEL_SELECT_L", 8)
    hidden, proj, cache = make_inputs(1, 9, 16, 8, device=device)
    proxy_select(hidden, proj, cache, 3, backend="triton")
    assert (spies["select_kernel"].calls, spies["select_torch"].calls) == (0, 1)
    with pytest.raises(ValueError, match="select"):
        proxy_select(hidden, proj, cache, 3, backend="triton", select="kernel")


def test_op_runs_without_autograd():
    hidden, proj, cache = make_inputs(1, 5, 16, 8)
    hidden.requires_grad_(True)
    _, scores = proxy_select(hidden, proj, cache, 2, backend="torch")
    assert not scores.requires_grad


# --------------------------------------------------------------------------------------------
# validation: every rule names its argument
# --------------------------------------------------------------------------------------------
def _valid():
    hidden, proj, cache = make_inputs(2, 6, 16, 8)
    return dict(hidden=hidden, proj=proj, proxy_cache=cache, k=2)


INVALID = [
    pytest.param("hidden", [[1.0]], TypeError, "hidden: expected a torch.Tensor", id="hidden-not-tensor"),
    pytest.param("hidden", torch.ones(6, 16), ValueError, "hidden: expected a 3-D", id="hidden-2d"),
    pytest.param(
        "hidden",
        torch.ones(2, 6, 16, dtype=torch.int32),
        TypeError,
        "hidden: expected dtype",
        id="hidden-int",
    ),
    pytest.param("hidden", torch.ones(2, 6, 0), ValueError, "hidden: expected a non-empty", id="hidden-d0"),
    pytest.param("proj", torch.ones(16, 8, 1), ValueError, "proj: expected a 2-D", id="proj-3d"),
    pytest.param(
        "proj",
        torch.ones(15, 8),
        ValueError,
        r"proj: expected shape \(16, .*got \(15, 8\)",
        id="proj-wrong-d",
    ),
    pytest.param(
        "proj", torch.ones(16, 8, dtype=torch.float64), TypeError, "proj: expected dtype", id="proj-f64"
    ),
    pytest.param("proj", torch.ones(16, 0), ValueError, "proj: expected at least one column", id="proj-r0"),
    pytest.param(
        "proxy_cache",
        torch.ones(2, 6, 9),
        ValueError,
        r"proxy_cache: expected shape \(2, 6, 8\)",
        id="cache-r",
    ),
    pytest.param(
        "proxy_cache", torch.ones(1, 6, 8), ValueError, "proxy_cache: expected shape", id="cache-batch"
    ),
    pytest.param(
        "proxy_cache",
        torch.ones(2, 6, 8, dtype=torch.int64),
        TypeError,
        "proxy_cache: expected dtype",
        id="cache-int",
    ),
    pytest.param(
        "proxy_cache",
        torch.ones(2, 8, 6).transpose(1, 2),
        ValueError,
        "proxy_cache: expected a contiguous",
        id="cache-noncontig",
    ),
    pytest.param(
        "proj", torch.ones(16, 8, device="meta"), ValueError, "proj: expected device cpu", id="proj-device"
    ),
    pytest.param(
        "proxy_cache",
        torch.ones(2, 6, 8, device="meta"),
        ValueError,
        "proxy_cache: expected device",
        id="cache-device",
    ),
    pytest.param("k", 2.0, TypeError, "k: expected an int", id="k-float"),
    pytest.param("k", True, TypeError, "k: expected an int", id="k-bool"),
    pytest.param("k", -1, ValueError, "k: expected 0 <= k <= 6", id="k-negative"),
    pytest.param("k", 7, ValueError, "k: expected 0 <= k <= 6", id="k-above-L"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(("name", "value", "error", "message"), INVALID)
def test_invalid_arguments_are_named(name, value, error, message, backend):
    args = _valid()
    args[name] = value
    before = args["proxy_cache"].clone() if isinstance(args["proxy_cache"], torch.Tensor) else None
    with pytest.raises(error, match=message):
        proxy_select(args["hidden"], args["proj"], args["proxy_cache"], args["k"], backend=backend)
    if (
        before is not None
        and args["proxy_cache"].device.type == "cpu"
        and args["proxy_cache"].shape == before.shape
    ):
        assert torch.equal(args["proxy_cache"], before), "a rejected call must not touch the cache"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [(dict(backend="cuda"), "backend: expected one of"), (dict(select="topk"), "select: expected one of")],
)
def test_invalid_options_are_named(kwargs, message):
    args = _valid()
    with pytest.raises(ValueError, match=message):
        proxy_select(args["hidden"], args["proj"], args["proxy_cache"], args["k"], **kwargs)


# --------------------------------------------------------------------------------------------
# svd_proxy
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("out_features", "in_features"), [(48, 80), (80, 48)], ids=["wide", "tall"])
@pytest.mark.parametrize("rank", [1, 7, 24])
def test_svd_proxy_identity(out_features, in_features, rank):
    """h @ proj == (h @ Wv^T) @ Vh_r^T: the value seen through its top-r right singular directions."""
    w_v = randn(out_features, in_features, seed=rank, scale=in_features**-0.5)
    hidden = randn(5, 11, in_features, seed=rank + 1)
    proj = svd_proxy(w_v, rank)
    assert proj.shape == (in_features, rank) and proj.dtype == w_v.dtype
    _, _, vh = torch.linalg.svd(w_v.double().T, full_matrices=False)
    # Singular vectors are defined up to sign; fix each pair's sign from proj itself.
    u_r = proj.double() / proj.double().norm(dim=0)
    v_r = vh[:rank]
    sign = torch.sign(((w_v.double().T @ v_r.T) * u_r).sum(0))
    values = hidden.double() @ w_v.double().T
    torch.testing.assert_close(hidden.double() @ proj.double(), (values @ v_r.T) * sign, atol=5e-4, rtol=1e-3)


@pytest.mark.parametrize(("out_features", "in_features"), [(48, 80), (80, 48)], ids=["wide", "tall"])
def test_svd_proxy_columns_are_scaled_singular_directions(out_features, in_features):
    w_v = randn(out_features, in_features, seed=3)
    rank = 10
    proj = svd_proxy(w_v, rank).double()
    singular = torch.linalg.svdvals(w_v.double())
    # Columns: orthogonal, with norms the top-r singular values in descending order.
    gram = proj.T @ proj
    torch.testing.assert_close(gram, torch.diag(singular[:rank] ** 2), atol=1e-3, rtol=1e-5)
    # proj spans the top-r left singular subspace of Wv^T: the best rank-r approximation
    # proj @ pinv(proj) @ Wv^T leaves exactly the tail energy (Eckart-Young).
    w_t = w_v.double().T
    residual = w_t - proj @ torch.linalg.lstsq(proj, w_t).solution
    torch.testing.assert_close(residual.norm() ** 2, (singular[rank:] ** 2).sum(), atol=1e-6, rtol=1e-6)


def test_svd_proxy_full_rank_preserves_value_norms():
    """At r = out <= in, Vh is orthogonal: |h @ proj| == |h @ Wv^T| row by row."""
    w_v = randn(32, 64, seed=4)
    hidden = randn(3, 9, 64, seed=5)
    proj = svd_proxy(w_v, 1.0)
    assert proj.shape == (64, 32)
    torch.testing.assert_close(
        (hidden @ proj).norm(dim=-1), (hidden @ w_v.T).norm(dim=-1), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize(("rank", "expected"), [(0.25, 16), (0.01, 1), (1.0, 64), (0.5, 32), (3, 3)])
def test_svd_proxy_rank_fraction_of_kv_width(rank, expected):
    w_v = randn(64, 96, seed=6)
    assert svd_proxy(w_v, rank).shape == (96, expected)


def test_svd_proxy_dtype():
    w_v = randn(16, 24, dtype=torch.float16, seed=7)
    assert svd_proxy(w_v, 4).dtype == torch.float16
    proj32 = svd_proxy(w_v, 4, dtype=torch.float32)
    assert proj32.dtype == torch.float32
    torch.testing.assert_close(svd_proxy(w_v, 4).float(), proj32, **tolerances(torch.float16))


@pytest.mark.parametrize(
    ("w_shape", "rank", "error", "message"),
    [
        ((16, 24), 0, ValueError, r"rank: expected an int in \[1, 16\]"),
        ((16, 24), 17, ValueError, r"rank: expected an int in \[1, 16\]"),
        ((24, 16), -3, ValueError, r"rank: expected an int in \[1, 16\]"),
        ((16, 24), 0.0, ValueError, r"rank: expected a float fraction in \(0, 1\]"),
        ((16, 24), 1.5, ValueError, r"rank: expected a float fraction"),
        ((16, 24), float("nan"), ValueError, r"rank: expected a float fraction"),
        ((24, 16), 1.0, ValueError, r"rank: fraction 1.0 of the KV width 24 gives r = 24"),
        ((16, 24), True, TypeError, "rank: expected an int or a float"),
        ((16, 24), "half", TypeError, "rank: expected an int or a float"),
    ],
)
def test_svd_proxy_bad_rank(w_shape, rank, error, message):
    with pytest.raises(error, match=message):
        svd_proxy(randn(*w_shape), rank)


def test_svd_proxy_bad_weight():
    with pytest.raises(ValueError, match="w_v: expected a 2-D"):
        svd_proxy(randn(4, 4, 4), 2)
    with pytest.raises(TypeError, match="w_v: expected dtype"):
        svd_proxy(torch.ones(4, 4, dtype=torch.int64), 2)
    with pytest.raises(TypeError, match="w_v: expected a torch.Tensor"):
        svd_proxy([[1.0]], 1)
    with pytest.raises(TypeError, match="dtype: expected a floating dtype"):
        svd_proxy(randn(4, 4), 2, dtype=torch.int32)
