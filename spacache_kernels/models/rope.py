"""RoPE cos/sin tables in the rotate-half layout that ``ops.reference.apply_rope`` consumes."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch


def inverse_frequencies(
    head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None, device=None
) -> torch.Tensor:
    """``inv_freq[j] = 1 / theta ** (2j / Dh)`` for j < Dh/2, fp32 (Dh/2,), optionally llama3-scaled.

    Computed in fp32 with the same expression as the LLaDA and transformers code the checkpoints were
    trained with, so the tables match theirs bit for bit rather than being "more exact" than training.
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim: expected a positive even size, got {head_dim}")
    if theta <= 0:
        raise ValueError(f"theta: expected a positive RoPE base, got {theta}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type != "llama3":
        raise ValueError(
            f"scaling: rope type {rope_type!r} is not supported (supported: 'default', 'llama3')"
        )
    return _llama3_scale(inv_freq, scaling)


def _llama3_scale(inv_freq: torch.Tensor, scaling: Mapping[str, Any]) -> torch.Tensor:
    # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a linear blend in between.
    factor = float(scaling["factor"])
    low = float(scaling["low_freq_factor"])
    high = float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_len / low
    high_freq_wavelen = old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(medium, blended, scaled)


def rope_tables(
    head_dim: int,
    max_positions: int,
    theta: float,
    device=None,
    scaling: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables ``(cos, sin)``, each fp32 (max_positions, head_dim), the two halves equal.

    ``freqs[p, j] = p * inv_freq[j]``, ``emb = cat(freqs, freqs)``; ``cos = emb.cos()``, ``sin = emb.sin()``.
    ``scaling``: None, or a ``rope_scaling`` dict of type "default" or "llama3" (others raise ValueError).
    """
    if max_positions <= 0:
        raise ValueError(f"max_positions: expected a positive integer, got {max_positions}")
    inv_freq = inverse_frequencies(head_dim, theta, scaling, device=device)
    pos = torch.arange(max_positions, dtype=torch.float32, device=device)
    freqs = pos[:, None] * inv_freq[None, :]  # (P, Dh/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()
