"""Input validation of ``gather_linear``, ``gather_swiglu`` (:mod:`spacache_kernels.ops.linear`) and
``apply_rope`` (:mod:`spacache_kernels.ops.rope`): every rule raises a ValueError/TypeError that names
the offending argument, and what the rules allow (repeated indices, strided x) is accepted."""

from __future__ import annotations

import re

import pytest
import torch

from spacache_kernels.ops import reference
from spacache_kernels.ops.linear import gather_linear, gather_swiglu
from spacache_kernels.ops.rope import apply_rope
from tests.helpers import randn

B, L, D, N, K, DH, P = 2, 10, 16, 32, 4, 8, 12


def tables(n_pos=P, head_dim=DH, dtype=torch.float32):
    return randn(n_pos, head_dim, dtype=dtype, seed=1), randn(n_pos, head_dim, dtype=dtype, seed=2)


def linear_args(**overrides):
    args = dict(
        x=randn(B, L, D, seed=3),
        idx=torch.tensor([[0, 3, 3, 9], [1, 2, 5, 8]]),
        weight=randn(N, D, seed=4),
        bias=randn(N, seed=5),
    )
    args.update(overrides)
    return args


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


# (overrides, extra keyword arguments, exception, argument name the message must start with)
LINEAR_RULES = [
    ({"x": [[1.0]]}, {}, TypeError, "x"),
    ({"x": randn(L, D)}, {}, ValueError, "x"),
    ({"x": torch.ones(B, L, D, dtype=torch.int32)}, {}, TypeError, "x"),
    ({"idx": torch.zeros(B, K)}, {}, TypeError, "idx"),
    ({"idx": torch.zeros(B * K, dtype=torch.long)}, {}, ValueError, "idx"),
    ({"idx": torch.zeros(B + 1, K, dtype=torch.long)}, {}, ValueError, "idx"),
    ({"idx": torch.tensor([[0, 1, 2, L], [0, 1, 2, 3]])}, {}, ValueError, "idx"),
    ({"idx": torch.tensor([[0, 1, 2, 3], [0, -1, 2, 3]], dtype=torch.int32)}, {}, ValueError, "idx"),
    ({"weight": randn(N, D + 1)}, {}, ValueError, "weight"),
    ({"weight": randn(N * D)}, {}, ValueError, "weight"),
    ({"weight": randn(N, D, dtype=torch.float16)}, {}, TypeError, "weight"),
    ({"weight": "W"}, {}, TypeError, "weight"),
    ({"bias": randn(N + 1)}, {}, ValueError, "bias"),
    ({"bias": randn(1, N)}, {}, ValueError, "bias"),
    ({"bias": randn(N, dtype=torch.float16)}, {}, TypeError, "bias"),
    ({}, {"rope": randn(P, DH)}, TypeError, "rope"),
    ({}, {"rope": tables() + tables()}, TypeError, "rope"),
    ({}, {"rope": (randn(P * DH), randn(P, DH))}, ValueError, "rope[0]"),
    ({}, {"rope": (torch.ones(P, DH, dtype=torch.long), randn(P, DH))}, TypeError, "rope[0]"),
    ({}, {"rope": (randn(P, DH), randn(P, DH + 2))}, ValueError, "rope[1]"),
    ({}, {"rope": (randn(P, DH), torch.ones(P, DH, dtype=torch.long))}, TypeError, "rope[1]"),
    ({}, {"rope": tables(head_dim=7)}, ValueError, "rope[0]"),
    ({}, {"rope": tables(head_dim=12)}, ValueError, "rope"),  # 12 does not divide n = 32
    ({}, {"positions": torch.zeros(B, K, dtype=torch.long)}, ValueError, "positions"),
    ({}, {"rope": tables(), "positions": torch.zeros(B, K)}, TypeError, "positions"),
    ({}, {"rope": tables(), "positions": torch.zeros(B, K + 1, dtype=torch.long)}, ValueError, "positions"),
    ({}, {"rope": tables(), "positions": torch.full((B, K), P, dtype=torch.long)}, ValueError, "positions"),
    ({}, {"rope": tables(n_pos=9)}, ValueError, "idx"),  # positions default to idx, which reaches 9
    ({"idx": None}, {"rope": tables(n_pos=L - 1)}, ValueError, "rope"),  # default arange(L) > P
    ({}, {"rope_cols": DH}, ValueError, "rope_cols"),  # without rope
    ({}, {"rope": tables(), "rope_cols": "8"}, TypeError, "rope_cols"),
    ({}, {"rope": tables(), "rope_cols": True}, TypeError, "rope_cols"),
    ({}, {"rope": tables(), "rope_cols": 0}, ValueError, "rope_cols"),
    ({}, {"rope": tables(), "rope_cols": DH + 2}, ValueError, "rope_cols"),  # not whole heads
    ({}, {"rope": tables(), "rope_cols": N + DH}, ValueError, "rope_cols"),  # past the output
    ({"weight": meta(N, D)}, {}, ValueError, "weight"),
    ({"bias": meta(N)}, {}, ValueError, "bias"),
    ({}, {"rope": (meta(P, DH), meta(P, DH))}, ValueError, "rope[0]"),
    ({}, {"backend": "cuda"}, ValueError, "backend"),
    ({}, {"impl": "cublas"}, ValueError, "impl"),
]


@pytest.mark.parametrize("overrides,kwargs,exc,name", LINEAR_RULES)
def test_gather_linear_rejects(overrides, kwargs, exc, name):
    args = linear_args(**overrides)
    with pytest.raises(exc, match=f"^{re.escape(name)}:"):
        gather_linear(args.pop("x"), args.pop("idx"), args.pop("weight"), args.pop("bias"), **kwargs)


def test_gather_linear_device_of_positions():
    # check_indices=False: the range check would read the meta tensor back before the device check.
    rope = tables()
    with pytest.raises(ValueError, match="^positions:"):
        gather_linear(**linear_args(), rope=rope, positions=meta(B, K, dtype=torch.long), check_indices=False)


def test_check_indices_false_skips_value_checks_only():
    bad = torch.tensor([[0, 1, 2, L], [0, 1, 2, 3]])
    with pytest.raises(ValueError, match="^idx:"):
        gather_linear(**linear_args(idx=bad))
    # The value check is skipped (no host read-back); the shape and dtype checks still run.
    with pytest.raises(ValueError, match="^idx:"):
        gather_linear(**linear_args(idx=torch.zeros(B, K, 1, dtype=torch.long)), check_indices=False)
    with pytest.raises(TypeError, match="^idx:"):
        gather_linear(**linear_args(idx=torch.zeros(B, K)), check_indices=False)
    ok = torch.tensor([[0, 1, 2, L - 1], [0, 1, 2, 3]])
    out = gather_linear(**linear_args(idx=ok), check_indices=False, backend="torch")
    assert out.shape == (B, K, N)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gather_linear_accepts_repeats_strided_x_and_int32(backend):
    x = randn(B, D, L, seed=6).transpose(1, 2)  # d is not the innermost dim
    idx = torch.tensor([[4, 4, 4, 0], [9, 9, 1, 1]], dtype=torch.int32)  # repeats are legitimate
    weight, bias = randn(N, D, seed=7), randn(N, seed=8)
    out = gather_linear(x, idx, weight, bias, rope=tables(), backend=backend)
    want = reference.gather_linear(x.contiguous(), idx.long(), weight, bias, rope=tables())
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[:, 0], out[:, 1], atol=0, rtol=0)  # same row, same position


# ------------------------------------------------------------------------------------------------
def swiglu_args(**overrides):
    args = dict(
        x=randn(B, L, D, seed=9),
        idx=torch.tensor([[0, 3, 3, 9], [1, 2, 5, 8]]),
        w_gate=randn(N, D, seed=10),
        w_up=randn(N, D, seed=11),
    )
    args.update(overrides)
    return args


SWIGLU_RULES = [
    ({"x": randn(B, L, D, 1)}, {}, ValueError, "x"),
    ({"idx": torch.full((B, K), L, dtype=torch.long)}, {}, ValueError, "idx"),
    ({"idx": torch.zeros(B, K, dtype=torch.int16)}, {}, TypeError, "idx"),
    ({"w_gate": randn(N, D - 1)}, {}, ValueError, "w_gate"),
    ({"w_gate": torch.ones(N, D, dtype=torch.long)}, {}, TypeError, "w_gate"),
    ({"w_up": randn(N + 1, D)}, {}, ValueError, "w_up"),
    ({"w_up": randn(N, D, dtype=torch.float16)}, {}, TypeError, "w_up"),
    ({"w_up": None}, {}, TypeError, "w_up"),
    ({"w_up": meta(N, D)}, {}, ValueError, "w_up"),
    ({}, {"backend": "gpu"}, ValueError, "backend"),
    ({}, {"impl": 3}, ValueError, "impl"),
]


@pytest.mark.parametrize("overrides,kwargs,exc,name", SWIGLU_RULES)
def test_gather_swiglu_rejects(overrides, kwargs, exc, name):
    args = swiglu_args(**overrides)
    with pytest.raises(exc, match=f"^{re.escape(name)}:"):
        gather_swiglu(args.pop("x"), args.pop("idx"), args.pop("w_gate"), args.pop("w_up"), **kwargs)


# ------------------------------------------------------------------------------------------------
def rope_args(**overrides):
    cos, sin = tables()
    args = dict(
        x=randn(B, K, 3, DH, seed=12), positions=torch.tensor([[0, 5, 5, 11], [1, 2, 3, 4]]), cos=cos, sin=sin
    )
    args.update(overrides)
    return args


ROPE_RULES = [
    ({"x": randn(B, K, DH)}, {}, ValueError, "x"),
    ({"x": torch.ones(B, K, 3, DH, dtype=torch.long)}, {}, TypeError, "x"),
    ({"positions": torch.zeros(B, K + 1, dtype=torch.long)}, {}, ValueError, "positions"),
    ({"positions": torch.zeros(B, K)}, {}, TypeError, "positions"),
    ({"positions": torch.full((B, K), P, dtype=torch.long)}, {}, ValueError, "positions"),
    ({"cos": randn(P, DH + 2), "sin": randn(P, DH + 2)}, {}, ValueError, "cos"),
    ({"cos": randn(P, DH, 1)}, {}, ValueError, "cos"),
    ({"cos": torch.ones(P, DH, dtype=torch.long)}, {}, TypeError, "cos"),
    ({"sin": randn(P + 1, DH)}, {}, ValueError, "sin"),
    ({"x": randn(B, K, 3, 7), "cos": randn(P, 7), "sin": randn(P, 7)}, {}, ValueError, "cos"),
    ({"sin": meta(P, DH)}, {}, ValueError, "sin"),
    ({}, {"backend": "fast"}, ValueError, "backend"),
]


@pytest.mark.parametrize("overrides,kwargs,exc,name", ROPE_RULES)
def test_apply_rope_rejects(overrides, kwargs, exc, name):
    args = rope_args(**overrides)
    with pytest.raises(exc, match=f"^{re.escape(name)}:"):
        apply_rope(args.pop("x"), args.pop("positions"), args.pop("cos"), args.pop("sin"), **kwargs)
