"""Gather GEMMs: the references against direct per-batch computations, the Triton kernels
(:mod:`spacache_kernels.kernels.gather_linear`) and the ops (:mod:`spacache_kernels.ops.linear`,
both ``impl`` choices) against the references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spacache_kernels.kernels.gather_linear import gather_linear_fused, gather_swiglu_fused
from spacache_kernels.ops import reference
from spacache_kernels.ops.linear import gather_linear, gather_swiglu, index_select_rows
from tests.helpers import distinct_indices, poisoned, randn, tolerances
from tests.kernels.test_rope import complex_rope, rope_tables

DTYPES = [torch.float32, torch.float16]


def make_idx(kind: str, n_batch: int, length: int, k: int, seed: int, device) -> torch.Tensor | None:
    """``none``: None; ``int32``/``int64``: random rows with repeats; ``distinct``: ascending distinct."""
    if kind == "none":
        return None
    if kind == "distinct":
        return distinct_indices(n_batch, length, k, seed=seed, device=device)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, length, (n_batch, k), generator=g)
    return idx.to(device=device, dtype=torch.int32 if kind == "int32" else torch.int64)


def rows_of(idx: torch.Tensor | None, n_batch: int, length: int) -> torch.Tensor:
    return torch.arange(length).expand(n_batch, length) if idx is None else idx.long().cpu()


def loop_linear(x, idx, weight, bias=None) -> torch.Tensor:
    """``F.linear`` over ``x[b][idx[b]]`` one batch row at a time, float64 on the CPU."""
    rows = rows_of(idx, x.shape[0], x.shape[1])
    b64 = None if bias is None else bias.double().cpu()
    return torch.stack(
        [F.linear(x[b].double().cpu()[rows[b]], weight.double().cpu(), b64) for b in range(x.shape[0])]
    )


def loop_swiglu(x, idx, w_gate, w_up) -> torch.Tensor:
    return F.silu(loop_linear(x, idx, w_gate)) * loop_linear(x, idx, w_up)


def weights(n: int, d: int, dtype, device, seed: int, bias: bool):
    weight = randn(n, d, dtype=dtype, device=device, seed=seed, scale=d**-0.5)
    return weight, (randn(n, dtype=dtype, device=device, seed=seed + 1) if bias else None)


# --------------------------------------------------------------------------------------------
# references vs direct computations
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("idx_kind", ["none", "int32", "distinct"])
@pytest.mark.parametrize("bias", [False, True])
def test_reference_linear_matches_loop(idx_kind, bias):
    n_batch, length, d, n, k = 3, 37, 72, 48, 9
    x = randn(n_batch, length, d, seed=20)
    idx = make_idx(idx_kind, n_batch, length, k, seed=21, device="cpu")
    weight, b = weights(n, d, torch.float32, "cpu", seed=22, bias=bias)
    got = reference.gather_linear(x, idx, weight, b)
    torch.testing.assert_close(got.double(), loop_linear(x, idx, weight, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("idx_kind", ["none", "distinct"])
@pytest.mark.parametrize("explicit_positions", [False, True])
def test_reference_rope_epilogue_matches_complex(idx_kind, explicit_positions):
    n_batch, length, d, n, head_dim, k, theta = 2, 37, 100, 96, 24, 13, 500000.0
    x = randn(n_batch, length, d, seed=23)
    idx = make_idx(idx_kind, n_batch, length, k, seed=24, device="cpu")
    rows = length if idx is None else k
    weight, b = weights(n, d, torch.float32, "cpu", seed=25, bias=True)
    positions = torch.randint(0, 512, (n_batch, rows)) if explicit_positions else None
    got = reference.gather_linear(
        x, idx, weight, b, rope=rope_tables(512, head_dim, theta), positions=positions
    )
    if positions is None:
        positions = rows_of(idx, n_batch, length)
    linear = loop_linear(x, idx, weight, b).view(n_batch, rows, n // head_dim, head_dim)
    want = complex_rope(linear, positions, theta).view(n_batch, rows, n)
    torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=5e-5)


def test_reference_swiglu_matches_loop():
    x = randn(3, 20, 72, seed=26)
    idx = make_idx("int64", 3, 20, 7, seed=27, device="cpu")
    w_gate, _ = weights(48, 72, torch.float32, "cpu", seed=28, bias=False)
    w_up, _ = weights(48, 72, torch.float32, "cpu", seed=29, bias=False)
    got = reference.gather_swiglu(x, idx, w_gate, w_up)
    torch.testing.assert_close(got.double(), loop_swiglu(x, idx, w_gate, w_up), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# kernels vs references (poisoned outputs)
# --------------------------------------------------------------------------------------------
# (B, L, d, n, k, idx kind, bias). 3 x 64 = 192 rows = 12 row tiles of the interpreter's BLOCK_M 16:
# one full GROUP_M band of 8 and a partial one.
LINEAR_CASES = [
    (1, 1, 72, 48, 1, "int64", True),
    (3, 37, 100, 96, 11, "int32", False),
    (3, 37, 72, 96, 37, "distinct", True),
    (1, 37, 100, 48, 0, "int64", True),
    (3, 37, 72, 48, None, "none", False),
    (3, 100, 64, 48, 64, "int32", True),
    (2, 256, 256, 96, 64, "int64", False),
]
LINEAR_IDS = ["L1", "odd-int32", "k=L", "k=0", "idx-None", "grouped", "L256-d256"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=LINEAR_IDS)
def test_linear_kernel_matches_reference(case, dtype, device):
    n_batch, length, d, n, k, idx_kind, has_bias = case
    x = randn(n_batch, length, d, dtype=dtype, device=device, seed=30)
    idx = make_idx(idx_kind, n_batch, length, k, seed=31, device=device)
    weight, bias = weights(n, d, dtype, device, seed=32, bias=has_bias)
    rows = length if idx is None else k
    out = gather_linear_fused(x, idx, weight, bias, out=poisoned((n_batch, rows, n), dtype, device))
    want = reference.gather_linear(x, idx, weight, bias)
    assert out.shape == (n_batch, rows, n) and not out.isnan().any()
    torch.testing.assert_close(out, want, **tolerances(dtype))


# (B, L, d, n, Dh, k, idx kind, positions given, bias). Dh 24: 12 live lanes of 16 per half.
ROPE_CASES = [
    (3, 37, 72, 96, 24, 11, "int64", True, True),
    (1, 37, 100, 48, 16, 37, "distinct", False, False),
    (3, 37, 72, 48, 24, None, "none", False, True),
    (2, 20, 72, 96, 16, 9, "int32", False, True),
    (1, 1, 72, 48, 16, 1, "int64", True, False),
    (2, 20, 64, 48, 24, 0, "int64", True, True),
    (2, 37, 64, 96, 32, 37, "none", True, False),
]
ROPE_IDS = ["explicit-pos", "pos=idx", "pos=arange", "int32-pos=idx", "L1", "k=0", "idx-None-explicit"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ROPE_CASES, ids=ROPE_IDS)
def test_rope_kernel_matches_reference(case, dtype, device):
    n_batch, length, d, n, head_dim, k, idx_kind, given_pos, has_bias = case
    n_pos = 64
    x = randn(n_batch, length, d, dtype=dtype, device=device, seed=33)
    idx = make_idx(idx_kind, n_batch, length, k, seed=34, device=device)
    weight, bias = weights(n, d, dtype, device, seed=35, bias=has_bias)
    # Random tables whose halves differ, so that a lo/hi mix-up cannot pass.
    rope = (randn(n_pos, head_dim, device=device, seed=36), randn(n_pos, head_dim, device=device, seed=37))
    rows = length if idx is None else k
    positions = None
    if given_pos:
        positions = torch.randint(0, n_pos, (n_batch, rows), generator=torch.Generator().manual_seed(38))
        positions = positions.to(device)
    out = poisoned((n_batch, rows, n), dtype, device)
    gather_linear_fused(x, idx, weight, bias, rope=rope, positions=positions, out=out)
    want = reference.gather_linear(x, idx, weight, bias, rope=rope, positions=positions)
    assert not out.isnan().any()
    torch.testing.assert_close(out, want, **tolerances(dtype))


# Partial RoPE (rope_cols): (B, L, d, heads, Dh, rotated heads, k, idx kind, positions given, bias). The
# interpreter's RoPE tile holds 4 heads of Dh 24 (16 lanes per half) or 8 of Dh 16, so a tile covers
# rotated and plain heads side by side (3 of 6, 5 of 12) or the boundary falls between tiles (4 of 8).
PARTIAL_ROPE_CASES = [
    (3, 37, 72, 6, 24, 3, 11, "int64", True, True),
    (2, 29, 100, 12, 16, 5, None, "none", True, False),
    (1, 37, 64, 8, 24, 4, 37, "distinct", False, True),
    (2, 20, 72, 6, 16, 1, 9, "int32", False, False),
    (2, 20, 72, 6, 24, 3, 0, "int64", True, True),
]
PARTIAL_ROPE_IDS = ["mixed-tile-Dh24", "mixed-tile-Dh16", "tile-boundary", "one-head", "k=0"]


def test_reference_partial_rope_is_rope_then_plain():
    """rope_cols splits the output: rotated heads as a RoPE GEMM over the first weight rows, the rest
    as the plain GEMM over the others (what K and V from one fused [W_k; W_v] need)."""
    n_batch, length, d, head_dim = 2, 23, 40, 16
    x = randn(n_batch, length, d, seed=90)
    idx = make_idx("int64", n_batch, length, 7, seed=91, device="cpu")
    weight, bias = weights(5 * head_dim, d, torch.float32, "cpu", seed=92, bias=True)
    rope = (randn(32, head_dim, seed=93), randn(32, head_dim, seed=94))
    positions = torch.randint(0, 32, (n_batch, 7), generator=torch.Generator().manual_seed(95))
    cols = 2 * head_dim
    got = reference.gather_linear(x, idx, weight, bias, rope=rope, positions=positions, rope_cols=cols)
    rotated = reference.gather_linear(x, idx, weight[:cols], bias[:cols], rope=rope, positions=positions)
    plain = reference.gather_linear(x, idx, weight[cols:], bias[cols:])
    assert torch.equal(got, torch.cat([rotated, plain], dim=-1))
    full = reference.gather_linear(x, idx, weight, bias, rope=rope, positions=positions)
    assert torch.equal(
        reference.gather_linear(x, idx, weight, bias, rope=rope, positions=positions, rope_cols=5 * head_dim),
        full,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", PARTIAL_ROPE_CASES, ids=PARTIAL_ROPE_IDS)
def test_partial_rope_kernel_matches_reference(case, dtype, device):
    n_batch, length, d, heads, head_dim, rot_heads, k, idx_kind, given_pos, has_bias = case
    n_pos, n = 64, heads * head_dim
    x = randn(n_batch, length, d, dtype=dtype, device=device, seed=96)
    idx = make_idx(idx_kind, n_batch, length, k, seed=97, device=device)
    weight, bias = weights(n, d, dtype, device, seed=98, bias=has_bias)
    rope = (randn(n_pos, head_dim, device=device, seed=99), randn(n_pos, head_dim, device=device, seed=100))
    rows = length if idx is None else k
    positions = None
    if given_pos:
        positions = torch.randint(0, n_pos, (n_batch, rows), generator=torch.Generator().manual_seed(101))
        positions = positions.to(device)
    cols = rot_heads * head_dim
    out = poisoned((n_batch, rows, n), dtype, device)
    gather_linear_fused(x, idx, weight, bias, rope=rope, positions=positions, rope_cols=cols, out=out)
    want = reference.gather_linear(x, idx, weight, bias, rope=rope, positions=positions, rope_cols=cols)
    assert not out.isnan().any()
    torch.testing.assert_close(out, want, **tolerances(dtype))
    # The plain heads are exactly the plain kernel's output (same tiles, no epilogue arithmetic).
    plain = gather_linear_fused(x, idx, weight[cols:], None if bias is None else bias[cols:])
    torch.testing.assert_close(out[..., cols:], plain, atol=0, rtol=0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the discarded rotation
def test_partial_rope_kernel_keeps_plain_heads_nonfinite(device):
    """A plain head is stored as accumulated: inf stays inf (a cos=1 / sin=0 rotation would make NaN
    of ``inf * 0`` in the partner lane), and the rotated heads see no table entry of a plain head."""
    n_batch, length, d, head_dim = 1, 5, 32, 16
    x = randn(n_batch, length, d, device=device, seed=102)
    weight, _ = weights(4 * head_dim, d, torch.float32, device, seed=103, bias=False)
    bias = torch.zeros(4 * head_dim, device=device)
    bias[3 * head_dim] = float("inf")  # column 0 of the last (plain) head; its rotation partner is finite
    rope = (randn(8, head_dim, device=device, seed=104), randn(8, head_dim, device=device, seed=105))
    out = gather_linear_fused(x, None, weight, bias, rope=rope, rope_cols=2 * head_dim)
    assert torch.isinf(out[..., 3 * head_dim]).all()
    assert (
        torch.isfinite(out[..., 3 * head_dim + 1 :]).all() and torch.isfinite(out[..., : 3 * head_dim]).all()
    )


SWIGLU_CASES = [
    (1, 1, 72, 48, 1, "int64"),
    (3, 37, 100, 96, 11, "int32"),
    (2, 37, 72, 48, None, "none"),
    (2, 37, 72, 48, 0, "int64"),
    (2, 128, 256, 96, 64, "distinct"),
]
SWIGLU_IDS = ["L1", "odd-int32", "idx-None", "k=0", "L128-d256"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SWIGLU_CASES, ids=SWIGLU_IDS)
def test_swiglu_kernel_matches_reference(case, dtype, device):
    n_batch, length, d, n, k, idx_kind = case
    # Scale 3: gate values reach the saturated ends of silu.
    x = randn(n_batch, length, d, dtype=dtype, device=device, seed=39, scale=3.0)
    idx = make_idx(idx_kind, n_batch, length, k, seed=40, device=device)
    w_gate, _ = weights(n, d, dtype, device, seed=41, bias=False)
    w_up, _ = weights(n, d, dtype, device, seed=42, bias=False)
    rows = length if idx is None else k
    out = gather_swiglu_fused(x, idx, w_gate, w_up, out=poisoned((n_batch, rows, n), dtype, device))
    want = reference.gather_swiglu(x, idx, w_gate, w_up)
    assert not out.isnan().any()
    torch.testing.assert_close(out, want, **tolerances(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_strided_operands(dtype, device):
    """Transposed x (d not innermost), strided weights, column-major idx/positions, transposed out."""
    n_batch, length, d, n, k, head_dim = 3, 29, 72, 48, 10, 16
    x = randn(n_batch, d, length, dtype=dtype, device=device, seed=43).transpose(1, 2)
    idx = make_idx("int32", k, length, n_batch, seed=44, device=device).T
    weight = randn(n, 2 * d, dtype=dtype, device=device, seed=45, scale=d**-0.5)[:, ::2]
    w_up = randn(d, n, dtype=dtype, device=device, seed=46, scale=d**-0.5).T
    bias = randn(2 * n, dtype=dtype, device=device, seed=47)[1::2]
    rope = (randn(32, head_dim, device=device, seed=48), randn(head_dim, 32, device=device, seed=49).T)
    positions = torch.randint(0, 32, (k, n_batch), generator=torch.Generator().manual_seed(50)).to(device).T
    assert not (
        x.is_contiguous() or idx.is_contiguous() or weight.is_contiguous() or positions.is_contiguous()
    )

    def out_buffer():
        return poisoned((n_batch, n, k), dtype, device).transpose(1, 2)

    tol = tolerances(dtype)
    out = gather_linear_fused(x, idx, weight, bias, out=out_buffer())
    torch.testing.assert_close(out, reference.gather_linear(x, idx, weight, bias), **tol)
    out = gather_linear_fused(x, idx, weight, bias, rope=rope, positions=positions, out=out_buffer())
    want = reference.gather_linear(x, idx, weight, bias, rope=rope, positions=positions)
    torch.testing.assert_close(out, want, **tol)
    out = gather_swiglu_fused(x, idx, weight, w_up, out=out_buffer())
    torch.testing.assert_close(out, reference.gather_swiglu(x, idx, weight, w_up), **tol)


# --------------------------------------------------------------------------------------------
# ops: every backend / impl against the direct computation
# --------------------------------------------------------------------------------------------
OP_PATHS = [("torch", "auto"), ("triton", "fused"), ("triton", "torch_gather"), ("auto", "auto")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,impl", OP_PATHS)
def test_op_linear_and_rope(backend, impl, dtype, device):
    n_batch, length, d, n, head_dim, k, theta = 3, 37, 100, 96, 24, 12, 500000.0
    x = randn(n_batch, length, d, dtype=dtype, device=device, seed=51)
    idx = make_idx("int64", n_batch, length, k, seed=52, device=device)  # repeats allowed
    weight, bias = weights(n, d, dtype, device, seed=53, bias=True)
    tol = tolerances(dtype)

    out = gather_linear(x, idx, weight, bias, backend=backend, impl=impl)
    assert out.dtype == dtype and out.shape == (n_batch, k, n)
    torch.testing.assert_close(out.double().cpu(), loop_linear(x, idx, weight, bias), **tol)

    rope = rope_tables(64, head_dim, theta, device)
    out = gather_linear(x, idx, weight, bias, rope=rope, backend=backend, impl=impl)
    linear = loop_linear(x, idx, weight, bias).view(n_batch, k, n // head_dim, head_dim)
    want = complex_rope(linear, idx.cpu(), theta).view(n_batch, k, n)
    torch.testing.assert_close(out.double().cpu(), want, **tol)


@pytest.mark.parametrize("backend,impl", OP_PATHS)
def test_op_partial_rope(backend, impl, device):
    """rope_cols through the op on every path: K heads rotated, V heads plain, as a fused K/V GEMM."""
    n_batch, length, d, head_dim, k, theta = 2, 29, 72, 24, 10, 500000.0
    x = randn(n_batch, length, d, device=device, seed=106)
    idx = make_idx("int64", n_batch, length, k, seed=107, device=device)
    weight, bias = weights(6 * head_dim, d, torch.float32, device, seed=108, bias=True)
    rope = rope_tables(64, head_dim, theta, device)
    cols = 2 * head_dim
    out = gather_linear(x, idx, weight, bias, rope=rope, rope_cols=cols, backend=backend, impl=impl)
    linear = loop_linear(x, idx, weight, bias)
    heads = linear[..., :cols].reshape(n_batch, k, 2, head_dim)
    want = torch.cat(
        [complex_rope(heads, idx.cpu(), theta).reshape(n_batch, k, cols), linear[..., cols:]], -1
    )
    torch.testing.assert_close(out.double().cpu(), want, **tolerances(torch.float32))


@pytest.mark.parametrize("backend,impl", OP_PATHS)
def test_op_swiglu(backend, impl, device):
    x = randn(2, 37, 72, device=device, seed=54, scale=2.0)
    idx = make_idx("int32", 2, 37, 13, seed=55, device=device)
    w_gate, _ = weights(96, 72, torch.float32, device, seed=56, bias=False)
    w_up, _ = weights(96, 72, torch.float32, device, seed=57, bias=False)
    out = gather_swiglu(x, idx, w_gate, w_up, backend=backend, impl=impl)
    want = loop_swiglu(x, idx, w_gate, w_up)
    torch.testing.assert_close(out.double().cpu(), want, **tolerances(torch.float32))


@pytest.mark.parametrize("backend,impl", OP_PATHS)
def test_op_empty_selection_and_idx_none(backend, impl, device):
    x = randn(3, 20, 72, device=device, seed=58)
    weight, bias = weights(48, 72, torch.float32, device, seed=59, bias=True)
    empty = torch.zeros(3, 0, dtype=torch.long, device=device)
    rope = rope_tables(32, 16, 1e4, device)
    for out in (
        gather_linear(x, empty, weight, bias, backend=backend, impl=impl),
        gather_linear(x, empty, weight, rope=rope, backend=backend, impl=impl),
        gather_swiglu(x, empty, weight, weight, backend=backend, impl=impl),
    ):
        assert out.shape == (3, 0, 48) and out.dtype == x.dtype
    out = gather_linear(x, None, weight, bias, rope=rope, backend=backend, impl=impl)
    linear = loop_linear(x, None, weight, bias).view(3, 20, 3, 16)
    want = complex_rope(linear, rows_of(None, 3, 20), 1e4).view(3, 20, 48)
    torch.testing.assert_close(out.double().cpu(), want, **tolerances(torch.float32))


# --------------------------------------------------------------------------------------------
# GPU, LLaDA-8B shapes, bf16
# --------------------------------------------------------------------------------------------
GPU_SHAPES = [(1, 256), (1, 1024), (16, 256), (16, 1024)]


def _gpu_inputs(n_batch, length, n, device, seed):
    d = 4096
    x = randn(n_batch, length, d, dtype=torch.bfloat16, device=device, seed=seed)
    idx = distinct_indices(n_batch, length, length // 4, seed=seed + 1, device=device)
    weight = randn(n, d, dtype=torch.bfloat16, device=device, seed=seed + 2, scale=d**-0.5)
    return x, idx, weight


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fused", "torch_gather"])
@pytest.mark.parametrize("n_batch,length", GPU_SHAPES)
def test_gpu_bf16_linear_rope(n_batch, length, impl, device):
    x, idx, weight = _gpu_inputs(n_batch, length, 4096, device, seed=60)
    bias = randn(4096, dtype=torch.bfloat16, device=device, seed=63)
    tol = tolerances(torch.bfloat16)
    out = gather_linear(x, idx, weight, bias, backend="triton", impl=impl)
    torch.testing.assert_close(out, reference.gather_linear(x, idx, weight, bias), **tol)
    rope = rope_tables(length, 128, 500000.0, device)
    out = gather_linear(x, idx, weight, rope=rope, backend="triton", impl=impl)
    torch.testing.assert_close(out, reference.gather_linear(x, idx, weight, rope=rope), **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fused", "torch_gather"])
@pytest.mark.parametrize("n_batch,length", GPU_SHAPES)
def test_gpu_bf16_swiglu(n_batch, length, impl, device):
    x, idx, w_gate = _gpu_inputs(n_batch, length, 12288, device, seed=64)
    w_up = randn(12288, 4096, dtype=torch.bfloat16, device=device, seed=67, scale=4096**-0.5)
    out = gather_swiglu(x, idx, w_gate, w_up, backend="triton", impl=impl)
    torch.testing.assert_close(
        out, reference.gather_swiglu(x, idx, w_gate, w_up), **tolerances(torch.bfloat16)
    )


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_index_select_rows_matches_gather(layout, device):
    """The "torch_gather" path's row gather, including its torch.gather fallback for unflattenable x."""
    if layout == "contiguous":
        x = randn(3, 17, 24, device=device, seed=70)
    else:
        x = randn(3, 24, 17, device=device, seed=70).transpose(1, 2)
    idx = make_idx("int32", 3, 17, 9, seed=71, device=device)
    got = index_select_rows(x, idx)
    assert got.shape == (3, 9, 24)
    torch.testing.assert_close(got, reference.gather_rows(x, idx), atol=0, rtol=0)
    assert index_select_rows(x, None) is x


def test_auto_impl_rule(monkeypatch, device):
    """impl="auto" runs the fused kernel unless B*k <= AUTO_TORCH_GATHER_MAX_ROWS (unset: always fused)."""
    import spacache_kernels.kernels.gather_linear as kernels
    import spacache_kernels.ops.linear as linear_op

    calls = []

    def spy(*args, **kwargs):
        calls.append("fused")
        return kernels.gather_linear_fused.__wrapped__(*args, **kwargs)

    spy.__wrapped__ = kernels.gather_linear_fused
    monkeypatch.setattr(kernels, "gather_linear_fused", spy)
    x = randn(2, 20, 72, device=device, seed=72)
    idx = make_idx("int64", 2, 20, 5, seed=73, device=device)
    weight, _ = weights(48, 72, torch.float32, device, seed=74, bias=False)
    want = reference.gather_linear(x, idx, weight)

    assert linear_op.AUTO_TORCH_GATHER_MAX_ROWS is None
    torch.testing.assert_close(gather_linear(x, idx, weight, backend="triton"), want, atol=1e-4, rtol=1e-4)
    assert calls == ["fused"]
    monkeypatch.setattr(linear_op, "AUTO_TORCH_GATHER_MAX_ROWS", 10)  # B*k = 10 rows: the baseline
    torch.testing.assert_close(gather_linear(x, idx, weight, backend="triton"), want, atol=1e-4, rtol=1e-4)
    assert calls == ["fused"]
    monkeypatch.setattr(linear_op, "AUTO_TORCH_GATHER_MAX_ROWS", 9)
    gather_linear(x, idx, weight, backend="triton")
    assert calls == ["fused", "fused"]
