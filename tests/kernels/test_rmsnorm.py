"""RMSNorm: the kernel against the reference, the reference against a direct computation, and the
op's validation and backend selection.

On the CPU the kernel runs under ``TRITON_INTERPRET=1`` (tests/conftest.py) in fp32 and fp16; bf16
at real shapes runs only on a GPU (``gpu`` marker).
"""

from __future__ import annotations

import math

import pytest
import torch

from spacache_kernels.kernels import rmsnorm as kernels
from spacache_kernels.ops import reference
from spacache_kernels.ops.norm import rms_norm
from tests.helpers import poisoned, randn, tolerances

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
EPS = 1e-5

SHAPES = [
    pytest.param((72,), id="1d-d72"),
    pytest.param((1, 1, 72), id="B1-L1-d72"),
    pytest.param((3, 37, 100), id="B3-L37-d100"),
    pytest.param((5, 1), id="R5-d1"),
    pytest.param((2, 19, 8), id="B2-L19-d8"),
    pytest.param((2, 3, 4096), id="B2-L3-d4096"),
]
DTYPES = [
    pytest.param(F32, F32, id="fp32"),
    pytest.param(F16, F16, id="fp16"),
    pytest.param(F16, F32, id="fp16-w32"),
]


def make_inputs(shape, dtype=F32, weight_dtype=F32, *, device="cpu", seed=0, scale=1.0):
    x = randn(*shape, dtype=dtype, device=device, seed=seed, scale=scale)
    # Weights around 1 with a spread, so a wrong column of the weight shows.
    weight = (1.0 + 0.5 * randn(shape[-1], seed=seed + 1)).to(device=device, dtype=weight_dtype)
    return x, weight


def direct_rms_norm(x, weight, eps):
    """Row by row in float64 Python arithmetic."""
    rows = x.double().reshape(-1, x.shape[-1]).tolist()
    w = weight.double().tolist()
    out = []
    for row in rows:
        inv = 1.0 / math.sqrt(sum(v * v for v in row) / len(row) + eps)
        out.append([v * inv * wv for v, wv in zip(row, w)])
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape)


# --------------------------------------------------------------------------------------------
# the reference against a direct computation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 1e-3, 30.0], ids=["unit", "tiny-eps-matters", "large"])
@pytest.mark.parametrize("shape", [(3, 37, 100), (1, 72), (4, 1)], ids=["B3-L37-d100", "R1-d72", "R4-d1"])
def test_reference_matches_direct_computation(shape, scale):
    x, weight = make_inputs(shape, seed=len(shape), scale=scale)
    expect = direct_rms_norm(x, weight, EPS)
    torch.testing.assert_close(reference.rms_norm(x, weight, EPS).double(), expect, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# the kernel
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("dtype", "weight_dtype"), DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_reference(shape, dtype, weight_dtype, device):
    x, weight = make_inputs(shape, dtype, weight_dtype, device=device, seed=shape[-1])
    out_buf = poisoned(x.shape, dtype, device)
    out = kernels.rms_norm(x, weight, EPS, out_buf)
    assert out is out_buf
    assert not out.isnan().any(), "an output element was never written"
    torch.testing.assert_close(out, reference.rms_norm(x, weight, EPS), **tolerances(dtype))


@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    ("shape", "block_d"),
    [((3, 37, 100), 32), ((2, 72), 64), ((4, 100), 128), ((2, 16500), None)],
    ids=["d100-chunk32", "d72-chunk64", "d100-onechunk", "d16500-auto-two-pass"],
)
def test_kernel_two_pass_path(shape, block_d, dtype, device):
    """Rows wider than a chunk: sum of squares over chunks, then a second normalising pass."""
    x, weight = make_inputs(shape, dtype, device=device, seed=3)
    out = kernels.rms_norm(x, weight, EPS, poisoned(x.shape, dtype, device), block_d=block_d)
    assert not out.isnan().any()
    torch.testing.assert_close(out, reference.rms_norm(x, weight, EPS), **tolerances(dtype))


def test_kernel_strided_x_and_weight(device):
    # (3, 37, 100) with strides (37, 1, 111): the rows flatten to a (111, 100) view with a column
    # stride of 111, so the kernel reads it in place through its strides.
    x = randn(100, 111, device=device, seed=4).t().view(3, 37, 100)
    assert x.reshape(-1, 100).stride() == (1, 111)
    weight = (1.0 + randn(200, seed=5)).to(device)[::2]
    assert not x.is_contiguous() and weight.stride(0) == 2
    out = kernels.rms_norm(x, weight, EPS)
    assert out.is_contiguous()
    torch.testing.assert_close(out, reference.rms_norm(x, weight, EPS), **tolerances(F32))
    sliced = randn(3, 37, 200, device=device, seed=6)[..., ::2]
    torch.testing.assert_close(
        kernels.rms_norm(sliced, weight, EPS), reference.rms_norm(sliced, weight, EPS), **tolerances(F32)
    )


def test_kernel_in_place(device):
    x, weight = make_inputs((3, 37, 100), F16, device=device, seed=8)
    expect = reference.rms_norm(x, weight, EPS)
    stream = x.clone()
    assert rms_norm(stream, weight, EPS, out=stream) is stream
    torch.testing.assert_close(stream, expect, **tolerances(F16))


def test_kernel_empty_rows(device):
    x = torch.empty(0, 5, 72, device=device)
    out = kernels.rms_norm(x, torch.ones(72, device=device), EPS)
    assert out.shape == (0, 5, 72)


# --------------------------------------------------------------------------------------------
# the op: validation
# --------------------------------------------------------------------------------------------
def _good(device="cpu"):
    return make_inputs((2, 5, 72), device=device, seed=9)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a: a.update(x=[[1.0]]), TypeError, "x"),
        (lambda a: a.update(x=torch.ones(2, 5, 72, dtype=torch.int32)), TypeError, "x"),
        (lambda a: a.update(x=torch.tensor(1.0)), ValueError, "x"),
        (lambda a: a.update(x=torch.ones(2, 5, 0)), ValueError, "x"),
        (lambda a: a.update(weight=torch.ones(71)), ValueError, "weight"),
        (lambda a: a.update(weight=torch.ones(1, 72)), ValueError, "weight"),
        (lambda a: a.update(weight=torch.ones(72, dtype=torch.int64)), TypeError, "weight"),
        (lambda a: a.update(weight=torch.ones(72, device="meta")), ValueError, "weight"),
        (lambda a: a.update(eps=0.0), ValueError, "eps"),
        (lambda a: a.update(eps=-1e-6), ValueError, "eps"),
        (lambda a: a.update(eps=float("nan")), ValueError, "eps"),
        (lambda a: a.update(eps=float("inf")), ValueError, "eps"),
        (lambda a: a.update(eps=True), TypeError, "eps"),
        (lambda a: a.update(eps="1e-5"), TypeError, "eps"),
        (lambda a: a.update(out=torch.empty(2, 5, 71)), ValueError, "out"),
        (lambda a: a.update(out=torch.empty(2, 5, 72, dtype=F16)), TypeError, "out"),
        (lambda a: a.update(out=torch.empty(2, 72, 5).transpose(1, 2)), ValueError, "out"),
        (lambda a: a.update(out=torch.empty(2, 5, 72, device="meta")), ValueError, "out"),
    ],
    ids=[
        "x-list",
        "x-int",
        "x-0d",
        "x-d0",
        "weight-len",
        "weight-2d",
        "weight-int",
        "weight-device",
        "eps-0",
        "eps-neg",
        "eps-nan",
        "eps-inf",
        "eps-bool",
        "eps-str",
        "out-shape",
        "out-dtype",
        "out-noncontig",
        "out-device",
    ],
)
def test_op_validation(change, error, match):
    x, weight = _good()
    args = dict(x=x, weight=weight, eps=EPS, out=None)
    change(args)
    with pytest.raises(error, match=rf"^{match}:"):
        rms_norm(args["x"], args["weight"], args["eps"], out=args["out"], backend="torch")


def test_op_rejects_out_overlapping_x():
    buf = randn(2 * 5 * 72 + 72, seed=10)
    x = buf[: 2 * 5 * 72].view(2, 5, 72)
    out = buf[72:].view(2, 5, 72)  # contiguous, one row behind x: rows would be overwritten unread
    with pytest.raises(ValueError, match="^out: must not share memory with x"):
        rms_norm(x, torch.ones(72), out=out, backend="torch")


# --------------------------------------------------------------------------------------------
# the op: backends
# --------------------------------------------------------------------------------------------
def _spy(monkeypatch):
    """Record which implementation the op calls."""
    calls = []
    real_kernel, real_ref = kernels.rms_norm, reference.rms_norm

    def kernel(*a, **kw):
        calls.append("triton")
        return real_kernel(*a, **kw)

    def ref(*a, **kw):
        calls.append("torch")
        return real_ref(*a, **kw)

    monkeypatch.setattr(kernels, "rms_norm", kernel)
    monkeypatch.setattr(reference, "rms_norm", ref)
    return calls


@pytest.mark.parametrize(
    ("env", "backend", "expect"),
    [
        (None, "torch", "torch"),
        (None, "triton", "triton"),
        (None, "auto", "triton"),
        (None, None, "triton"),
        ("torch", None, "torch"),
        ("triton", None, "triton"),
        ("torch", "triton", "triton"),
    ],
)
def test_op_backend_selection(env, backend, expect, monkeypatch, device):
    if env is None:
        monkeypatch.delenv("SPACACHE_BACKEND", raising=False)
    else:
        monkeypatch.setenv("SPACACHE_BACKEND", env)
    calls = _spy(monkeypatch)
    x, weight = _good(device)
    out_buf = poisoned(x.shape, x.dtype, device)
    out = rms_norm(x, weight, EPS, out=out_buf, backend=backend)
    assert calls == [expect]
    assert out is out_buf
    torch.testing.assert_close(out, reference.rms_norm(x, weight, EPS), **tolerances(F32))


def test_op_backend_errors(monkeypatch):
    x, weight = _good()
    with pytest.raises(ValueError, match="backend"):
        rms_norm(x, weight, backend="cuda")
    monkeypatch.setenv("SPACACHE_BACKEND", "fast")
    with pytest.raises(ValueError, match="SPACACHE_BACKEND"):
        rms_norm(x, weight)
    monkeypatch.delenv("SPACACHE_BACKEND")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="triton"):
        rms_norm(x, weight, backend="triton")
    calls = _spy(monkeypatch)
    rms_norm(x, weight)  # auto on CPU tensors without the interpreter: the reference
    assert calls == ["torch"]


def test_op_default_eps_is_1e5():
    x, weight = make_inputs((4, 72), seed=12, scale=1e-3)  # mean(x^2) ~ 1e-6: eps changes the result
    torch.testing.assert_close(rms_norm(x, weight, backend="torch"), reference.rms_norm(x, weight, 1e-5))


# --------------------------------------------------------------------------------------------
# GPU: real shapes in bf16
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize(("batch", "length"), [(1, 256), (1, 1024), (16, 256), (16, 1024)])
@pytest.mark.parametrize("weight_dtype", [BF16, F32], ids=["w-bf16", "w-fp32"])
def test_gpu_rms_norm_bf16(batch, length, weight_dtype):
    x, weight = make_inputs((batch, length, 4096), BF16, weight_dtype, device="cuda", seed=batch + length)
    out = rms_norm(x, weight, EPS, out=poisoned(x.shape, BF16, "cuda"), backend="triton")
    torch.testing.assert_close(out, reference.rms_norm(x, weight, EPS), **tolerances(BF16))
