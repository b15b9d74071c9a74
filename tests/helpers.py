"""Shared test helpers: seeded inputs, poisoned outputs, per-dtype tolerances."""

from __future__ import annotations

import torch

POISON = float("nan")


def randn(*shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0) -> torch.Tensor:
    """Fresh seeded normal values (never zeros), drawn in fp32 on the CPU then cast and moved."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)


def poisoned(shape, dtype, device="cpu") -> torch.Tensor:
    """An output buffer filled with NaN so an element the kernel forgot cannot pass a comparison."""
    return torch.full(tuple(shape), POISON, dtype=dtype, device=device)


def distinct_indices(batch: int, length: int, count: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """(batch, count) int64 distinct random positions per row in [0, length), ascending."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(length, generator=g)[:count].sort().values for _ in range(batch)]
    return torch.stack(rows).to(device)


def tolerances(dtype: torch.dtype) -> dict:
    return {
        torch.float32: dict(atol=1e-4, rtol=1e-4),
        torch.float16: dict(atol=2e-2, rtol=2e-2),
        torch.bfloat16: dict(atol=6e-2, rtol=6e-2),
    }[dtype]


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged 1-D prompts as a left-padded (B, P) int64 batch and its attention mask (1 = token)."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask
