"""Rotary embedding: the reference against an independent complex-number derivation, the Triton
kernel (:mod:`spacache_kernels.kernels.rope`) and the op (:func:`spacache_kernels.ops.rope.apply_rope`)
against the reference."""

from __future__ import annotations

import pytest
import torch

from spacache_kernels.kernels.rope import apply_rope_fused
from spacache_kernels.ops import reference
from spacache_kernels.ops.rope import apply_rope
from tests.helpers import poisoned, randn, tolerances

DTYPES = [torch.float32, torch.float16]


def inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """``1 / theta^(2i / Dh)`` for i in [0, Dh/2), float64."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def rope_tables(n_pos: int, head_dim: int, theta: float, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """LLaDA/Llama-style fp32 tables (P, Dh): ``cos/sin(p * inv_freq)`` with the two halves equal."""
    angles = torch.arange(n_pos, dtype=torch.float64)[:, None] * inv_freq(head_dim, theta)[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def complex_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Independent RoPE: pair ``(x_i, x_{i+Dh/2})`` as ``x_i + i*x_{i+Dh/2}``, times ``exp(i*p*f_i)``.

    x (B, S, H, Dh), positions (B, S). float64 throughout; returns (B, S, H, Dh) float64.
    """
    half = x.shape[-1] // 2
    xd = x.double()
    pairs = torch.complex(xd[..., :half], xd[..., half:])
    angles = positions.double()[:, :, None, None] * inv_freq(x.shape[-1], theta).to(x.device)
    rotated = pairs * torch.polar(torch.ones_like(angles), angles)
    return torch.cat((rotated.real, rotated.imag), dim=-1)


def random_positions(n_batch: int, seq: int, n_pos: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_pos, (n_batch, seq), generator=g)  # repeats allowed


# --------------------------------------------------------------------------------------------
# reference vs the complex-number derivation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("theta", [10000.0, 500000.0])
@pytest.mark.parametrize("shape", [(2, 7, 3, 16), (1, 5, 2, 24), (2, 4, 2, 128)])
def test_reference_matches_complex_rotation(shape, theta):
    n_batch, seq, _, head_dim = shape
    n_pos = 4096
    x = randn(*shape, seed=1)
    positions = random_positions(n_batch, seq, n_pos, seed=2)
    cos, sin = rope_tables(n_pos, head_dim, theta)
    got = reference.apply_rope(x, positions, cos, sin)
    want = complex_rope(x, positions, theta)
    # fp32 tables at positions up to 4096: the angle itself is exact in float64 and rounded once.
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_reference_position_zero_is_identity():
    x = randn(1, 3, 2, 16, seed=3)
    cos, sin = rope_tables(8, 16, 10000.0)
    out = reference.apply_rope(x, torch.zeros(1, 3, dtype=torch.long), cos, sin)
    torch.testing.assert_close(out, x, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
# kernel vs reference
# --------------------------------------------------------------------------------------------
# Random tables whose halves differ: a kernel that mixed up the cos/sin halves would pass with real
# (half-symmetric) tables but not with these.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,n_pos",
    [((1, 1, 1, 16), 4), ((3, 37, 4, 24), 64), ((2, 5, 3, 128), 11), ((2, 9, 1, 2), 9)],
    ids=["single", "odd-S-Dh24", "Dh128", "Dh2"],
)
def test_kernel_matches_reference(shape, n_pos, dtype, device):
    n_batch, seq, _, head_dim = shape
    x = randn(*shape, dtype=dtype, device=device, seed=4)
    positions = random_positions(n_batch, seq, n_pos, seed=5).to(device)
    cos = randn(n_pos, head_dim, device=device, seed=6)
    sin = randn(n_pos, head_dim, device=device, seed=7)
    out = apply_rope_fused(x, positions, cos, sin, out=poisoned(shape, dtype, device))
    want = reference.apply_rope(x, positions, cos, sin)
    assert out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out, want, **tolerances(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_strided_inputs_int32_positions(dtype, device):
    """x with S and H swapped in memory, positions and tables as strided views, out transposed."""
    n_batch, seq, heads, head_dim, n_pos = 2, 13, 3, 24, 40
    x = randn(n_batch, heads, seq, head_dim, dtype=dtype, device=device, seed=8).transpose(1, 2)
    positions = random_positions(seq, n_batch, n_pos, seed=9).to(device).T.to(torch.int32)
    cos = randn(n_pos, 2 * head_dim, device=device, seed=10)[:, ::2]
    sin = randn(head_dim, n_pos, device=device, seed=11).T
    out = poisoned((n_batch, heads, seq, head_dim), dtype, device).transpose(1, 2)
    apply_rope_fused(x, positions, cos, sin, out=out)
    want = reference.apply_rope(x, positions, cos, sin)
    assert not out.isnan().any()
    torch.testing.assert_close(out, want, **tolerances(dtype))


def test_kernel_in_place(device):
    x = randn(2, 6, 2, 32, device=device, seed=12)
    positions = random_positions(2, 6, 16, seed=13).to(device)
    cos, sin = rope_tables(16, 32, 500000.0, device)
    want = reference.apply_rope(x, positions, cos, sin)
    result = apply_rope_fused(x, positions, cos, sin, out=x)
    assert result.data_ptr() == x.data_ptr()
    torch.testing.assert_close(x, want, **tolerances(torch.float32))


def test_kernel_empty(device):
    x = randn(2, 0, 3, 16, device=device)
    out = apply_rope_fused(
        x, torch.zeros(2, 0, dtype=torch.long, device=device), *rope_tables(4, 16, 1e4, device)
    )
    assert out.shape == (2, 0, 3, 16)


# --------------------------------------------------------------------------------------------
# op
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_op_matches_complex_rotation(backend, dtype, device):
    n_batch, seq, heads, head_dim, theta = 3, 11, 2, 24, 500000.0
    x = randn(n_batch, seq, heads, head_dim, dtype=dtype, device=device, seed=14)
    positions = random_positions(n_batch, seq, 300, seed=15).to(device)
    cos, sin = rope_tables(300, head_dim, theta, device)
    out = apply_rope(x, positions, cos, sin, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape
    want = complex_rope(x.cpu(), positions.cpu(), theta)
    torch.testing.assert_close(out.cpu().double(), want, **tolerances(dtype))


# --------------------------------------------------------------------------------------------
# GPU, real shapes, bf16
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("n_batch,seq", [(1, 256), (16, 1024)])
def test_gpu_bf16_llada_shapes(n_batch, seq, device):
    heads, head_dim, theta = 32, 128, 500000.0
    x = randn(n_batch, seq, heads, head_dim, dtype=torch.bfloat16, device=device, seed=16)
    positions = random_positions(n_batch, seq, 4096, seed=17).to(device)
    cos, sin = rope_tables(4096, head_dim, theta, device)
    out = apply_rope(x, positions, cos, sin, backend="triton")
    torch.testing.assert_close(
        out, reference.apply_rope(x, positions, cos, sin), **tolerances(torch.bfloat16)
    )
    want = complex_rope(x, positions, theta)
    torch.testing.assert_close(out.double(), want, **tolerances(torch.bfloat16))
