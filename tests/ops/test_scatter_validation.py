"""Op-level tests for scatter_rows_ / scatter_residual: validation, aliasing rules, backends."""

from __future__ import annotations

import pytest
import torch

from spacache_kernels.kernels import scatter as kernels
from spacache_kernels.ops import reference
from spacache_kernels.ops.scatter import scatter_residual, scatter_rows_
from tests.helpers import distinct_indices, poisoned, randn

B, L, N, K = 2, 9, 72, 4


def good_args(device="cpu"):
    return dict(
        x=randn(B, L, N, device=device, seed=0),
        cache=randn(B, L, N, device=device, seed=1),
        idx=distinct_indices(B, L, K, seed=2, device=device),
        src=randn(B, K, N, device=device, seed=3),
        out=None,
    )


def call_residual(args, **kw):
    return scatter_residual(args["x"], args["cache"], args["idx"], args["src"], out=args["out"], **kw)


def call_rows(args, **kw):
    return scatter_rows_(args["cache"], args["idx"], args["src"], **kw)


# Changes that break one rule of both ops: (change, error type, argument named in the message).
SHARED_RULES = [
    pytest.param(lambda a: a.update(cache=[[[1.0]]]), TypeError, "cache", id="cache-list"),
    pytest.param(lambda a: a.update(cache=torch.ones(B, L * N)), ValueError, "cache", id="cache-2d"),
    pytest.param(
        lambda a: a.update(cache=torch.ones(B, L, N, dtype=torch.int32)), TypeError, "cache", id="cache-int"
    ),
    pytest.param(
        lambda a: a.update(cache=torch.ones(B, N, L).transpose(1, 2)),
        ValueError,
        "cache",
        id="cache-noncontig",
    ),
    pytest.param(lambda a: a.update(idx=a["idx"].tolist()), TypeError, "idx", id="idx-list"),
    pytest.param(lambda a: a.update(idx=a["idx"].float()), TypeError, "idx", id="idx-float"),
    pytest.param(lambda a: a.update(idx=a["idx"].to(torch.int16)), TypeError, "idx", id="idx-int16"),
    pytest.param(lambda a: a.update(idx=a["idx"][0]), ValueError, "idx", id="idx-1d"),
    pytest.param(
        lambda a: a.update(idx=torch.zeros(B + 1, K, dtype=torch.int64)), ValueError, "idx", id="idx-batch"
    ),
    pytest.param(lambda a: a["idx"].__setitem__((1, 2), L), ValueError, "idx", id="idx-eq-L"),
    pytest.param(lambda a: a["idx"].__setitem__((0, 0), -1), ValueError, "idx", id="idx-negative"),
    pytest.param(
        lambda a: a["idx"].__setitem__((1, 3), int(a["idx"][1, 0])), ValueError, "idx", id="idx-repeat"
    ),
    pytest.param(
        lambda a: a.update(idx=torch.arange(L + 1).repeat(B, 1), src=torch.ones(B, L + 1, N)),
        ValueError,
        "idx",
        id="idx-k-gt-L",
    ),
    pytest.param(lambda a: a.update(idx=a["idx"].to("meta")), ValueError, "idx", id="idx-device"),
    pytest.param(lambda a: a.update(src=torch.ones(B, K + 1, N)), ValueError, "src", id="src-k"),
    pytest.param(lambda a: a.update(src=torch.ones(B, K, N - 1)), ValueError, "src", id="src-n"),
    pytest.param(lambda a: a.update(src=torch.ones(B, K * N)), ValueError, "src", id="src-2d"),
    pytest.param(
        lambda a: a.update(src=torch.ones(B, K, N, dtype=torch.int64)), TypeError, "src", id="src-int"
    ),
    pytest.param(
        lambda a: a.update(src=torch.ones(B, K, N, device="meta")), ValueError, "src", id="src-device"
    ),
    pytest.param(lambda a: a.update(src=a["cache"][:, :K]), ValueError, "src", id="src-aliases-cache"),
]
RESIDUAL_RULES = [
    pytest.param(lambda a: a.update(x=1.0), TypeError, "x", id="x-float"),
    pytest.param(lambda a: a.update(x=torch.ones(B, L, N + 1)), ValueError, "x", id="x-shape"),
    pytest.param(lambda a: a.update(x=torch.ones(B, L, N, dtype=torch.int32)), TypeError, "x", id="x-int"),
    pytest.param(lambda a: a.update(x=torch.ones(B, L, N, device="meta")), ValueError, "x", id="x-device"),
    pytest.param(lambda a: a.update(x=a["cache"]), ValueError, "x", id="x-is-cache"),
    pytest.param(lambda a: a.update(out=torch.empty(B, L - 1, N)), ValueError, "out", id="out-shape"),
    pytest.param(
        lambda a: a.update(out=torch.empty(B, L, N, dtype=torch.float16)), TypeError, "out", id="out-dtype"
    ),
    pytest.param(
        lambda a: a.update(out=torch.empty(B, N, L).transpose(1, 2)), ValueError, "out", id="out-noncontig"
    ),
    pytest.param(
        lambda a: a.update(out=torch.empty(B, L, N, device="meta")), ValueError, "out", id="out-device"
    ),
    pytest.param(lambda a: a.update(out=a["cache"]), ValueError, "out", id="out-is-cache"),
]


def _out_overlaps_x(a):
    """out one row behind x in the same storage: a row could be overwritten before it is read."""
    storage = randn(B * L * N + N, seed=4)
    a.update(x=storage[: B * L * N].view(B, L, N), out=storage[N:].view(B, L, N))


def _out_overlaps_src(a):
    a.update(out=torch.empty(B, L, N))
    a.update(src=a["out"][:, :K])


RESIDUAL_RULES += [
    pytest.param(_out_overlaps_x, ValueError, "out", id="out-overlaps-x"),
    pytest.param(_out_overlaps_src, ValueError, "out", id="out-aliases-src"),
]


@pytest.mark.parametrize(("change", "error", "match"), SHARED_RULES)
@pytest.mark.parametrize("op", [call_rows, call_residual], ids=["scatter_rows_", "scatter_residual"])
def test_shared_validation(op, change, error, match):
    args = good_args()
    change(args)
    with pytest.raises(error, match=rf"^{match}:"):
        op(args, backend="torch")


@pytest.mark.parametrize(("change", "error", "match"), RESIDUAL_RULES)
def test_residual_validation(change, error, match):
    args = good_args()
    change(args)
    with pytest.raises(error, match=rf"^{match}:"):
        call_residual(args, backend="torch")


def test_messages_say_what_was_expected():
    args = good_args()
    args["idx"][0, 1] = args["idx"][0, 0]
    with pytest.raises(ValueError, match="idx: expected distinct indices"):
        call_rows(args)
    args = good_args()
    args["idx"][1, 0] = L + 3
    with pytest.raises(ValueError, match=rf"idx: expected indices in \[0, {L}\)"):
        call_residual(args)


def test_check_indices_false_skips_value_checks():
    """Without check_indices a repeat passes validation (the hot path's own indices are trusted);
    the shape-level rules, k <= L included, still apply."""
    args = good_args()
    args["idx"][0, 1] = args["idx"][0, 0]
    call_rows(args, backend="torch", check_indices=False)
    args = good_args()
    args.update(idx=torch.zeros(B, L + 1, dtype=torch.int64), src=torch.ones(B, L + 1, N))
    with pytest.raises(ValueError, match="^idx: expected at most"):
        call_rows(args, backend="torch", check_indices=False)


# --------------------------------------------------------------------------------------------
# results through the op, both backends
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("k", [0, K, L], ids=["k0", "k4", "kL"])
def test_op_results(backend, k, device):
    args = good_args(device)
    idx = distinct_indices(B, L, k, seed=5, device=device).flip(1)  # descending: order must not matter
    src = randn(B, k, N, dtype=torch.float16, device=device, seed=6)
    x, cache = args["x"], args["cache"]

    ref_cache = cache.clone()
    ref_out = reference.scatter_residual(x, ref_cache, idx, src)

    written = cache.clone()
    assert scatter_rows_(written, idx, src, backend=backend) is written
    assert torch.equal(written, ref_cache)

    written = cache.clone()
    out_buf = poisoned(x.shape, x.dtype, device)
    out = scatter_residual(x, written, idx, src, out=out_buf, backend=backend)
    assert out is out_buf
    assert torch.equal(out, ref_out) and torch.equal(written, ref_cache)

    written = cache.clone()
    out = scatter_residual(x, written, idx, src, backend=backend)
    assert out.dtype == x.dtype and out.is_contiguous()
    assert torch.equal(out, ref_out) and torch.equal(written, ref_cache)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_op_out_is_x(backend, device):
    args = good_args(device)
    expect = reference.scatter_residual(args["x"], args["cache"].clone(), args["idx"], args["src"])
    stream = args["x"].clone()
    out = scatter_residual(stream, args["cache"], args["idx"], args["src"], out=stream, backend=backend)
    assert out is stream and torch.equal(stream, expect)


def _spy(monkeypatch):
    calls = []
    for name, module, label in [
        ("scatter_rows", kernels, "triton"),
        ("scatter_residual", kernels, "triton"),
        ("scatter_rows_", reference, "torch"),
        ("scatter_residual", reference, "torch"),
    ]:
        real = getattr(module, name)

        def wrapped(*a, _real=real, _label=label, **kw):
            calls.append(_label)
            return _real(*a, **kw)

        monkeypatch.setattr(module, name, wrapped)
    return calls


@pytest.mark.parametrize(
    ("env", "backend", "expect"),
    [
        (None, "torch", "torch"),
        (None, "triton", "triton"),
        (None, "auto", "triton"),
        (None, None, "triton"),
        ("torch", None, "torch"),
        ("TORCH ", None, "torch"),
        ("triton", None, "triton"),
        ("torch", "triton", "triton"),
        ("triton", "torch", "torch"),
    ],
)
@pytest.mark.parametrize("op", [call_rows, call_residual], ids=["scatter_rows_", "scatter_residual"])
def test_backend_selection(op, env, backend, expect, monkeypatch, device):
    if env is None:
        monkeypatch.delenv("SPACACHE_BACKEND", raising=False)
    else:
        monkeypatch.setenv("SPACACHE_BACKEND", env)
    calls = _spy(monkeypatch)
    args = good_args(device)
    ref_cache = args["cache"].clone()
    ref_out = reference.scatter_residual(args["x"], ref_cache, args["idx"], args["src"])
    calls.clear()
    result = op(args, backend=backend)
    # scatter_residual's torch path calls reference.scatter_rows_ from inside reference.scatter_residual.
    assert calls[0] == expect and set(calls) == {expect}
    assert torch.equal(args["cache"], ref_cache)
    if op is call_residual:
        assert torch.equal(result, ref_out)


def test_backend_errors(monkeypatch):
    args = good_args()
    with pytest.raises(ValueError, match="backend"):
        call_residual(args, backend="cuda")
    monkeypatch.setenv("SPACACHE_BACKEND", "fast")
    with pytest.raises(ValueError, match="SPACACHE_BACKEND"):
        call_rows(args)
    monkeypatch.delenv("SPACACHE_BACKEND")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="triton"):
        call_rows(args, backend="triton")
    calls = _spy(monkeypatch)
    call_residual(args)  # auto on CPU tensors without the interpreter: the reference
    assert calls and set(calls) == {"torch"}
