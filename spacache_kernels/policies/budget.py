"""Per-layer update budgets (the fraction of generated tokens each layer recomputes).

SPA-Cache's "gaussian" profile: with ``t = l / L`` (l = 0 .. L-1), a two-sided Gaussian peaking at
``mu`` whose value is ``freq_start`` at t = 0, ``freq_peak`` at mu and ``freq_end`` at t = 1 (each
side's width solved from those values); the whole curve is scaled so its peak equals
``max_update_ratio`` (or its mean equals ``avg_update_ratio``), then the left side is floored at
``min_update_ratio`` (2^-5). "uniform": the same ratio in every layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GaussianProfile:
    """Shape parameters of the split-Gaussian budget curve (before scaling)."""

    peak_pos: float
    freq_start: float
    freq_peak: float
    freq_end: float

    def curve(self, n_layers: int, scale: float = 1.0, floor: float = 0.0) -> np.ndarray:
        """Per-layer values ``(n_layers,)`` of the curve scaled by ``scale``, left side floored."""
        peak, start, end = (self.freq_peak * scale, self.freq_start * scale, self.freq_end * scale)
        mu = self.peak_pos
        if not (start < peak and end < peak):
            raise ValueError("profile: freq_start and freq_end must be strictly below freq_peak")
        sigma_left = math.sqrt(mu**2 / (2 * math.log(peak / max(start, 1e-9))))
        sigma_right = math.sqrt((1 - mu) ** 2 / (2 * math.log(peak / max(end, 1e-9))))
        t = np.arange(n_layers, dtype=np.float64) / n_layers
        sigma = np.where(t < mu, sigma_left, sigma_right)
        values = peak * np.exp(-((t - mu) ** 2) / (2 * sigma**2))
        # Only the shallow side is floored: deep layers may legitimately update very little.
        return np.where(t < mu, np.maximum(values, floor), values)


# The reference presets (docs/policies.md), by model family.
PRESETS: dict[str, GaussianProfile] = {
    "llada-8b": GaussianProfile(peak_pos=0.75, freq_start=0.03, freq_peak=0.25, freq_end=0.13),
    "llada-1.5": GaussianProfile(peak_pos=0.8, freq_start=0.03, freq_peak=0.25, freq_end=0.13),
    "dream-7b": GaussianProfile(peak_pos=0.5, freq_start=0.05, freq_peak=0.3, freq_end=0.25),
}
ARCH_PRESET = {"llada": "llada-8b", "dream": "dream-7b", "llama": "llada-8b", "qwen2": "dream-7b"}


def update_ratios(
    n_layers: int,
    budget="gaussian",
    *,
    max_update_ratio: float | None = 0.25,
    avg_update_ratio: float | None = None,
    min_update_ratio: float = 2**-5,
    preset: str = "llada-8b",
) -> np.ndarray:
    """Per-layer update ratios ``(n_layers,)`` in [0, 1].

    budget: "gaussian" (the preset's curve), "uniform", or an explicit sequence of n_layers ratios.
    Exactly one of ``max_update_ratio`` / ``avg_update_ratio`` sets the scale (avg wins when given).
    """
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers: expected a positive int, got {n_layers!r}")
    if not isinstance(budget, str):
        ratios = np.asarray(budget, dtype=np.float64)
        if ratios.shape != (n_layers,):
            raise ValueError(f"budget: expected {n_layers} per-layer ratios, got shape {ratios.shape}")
        if not np.all((ratios >= 0) & (ratios <= 1)):
            raise ValueError("budget: expected every per-layer ratio in [0, 1]")
        return ratios
    for name, value in (("max_update_ratio", max_update_ratio), ("avg_update_ratio", avg_update_ratio)):
        if value is not None and not 0 < value <= 1:
            raise ValueError(f"{name}: expected a value in (0, 1], got {value}")
    if max_update_ratio is None and avg_update_ratio is None:
        raise ValueError("max_update_ratio / avg_update_ratio: one of them must be given")
    if budget == "uniform":
        return np.full(n_layers, avg_update_ratio if avg_update_ratio is not None else max_update_ratio)
    if budget != "gaussian":
        raise ValueError(f"budget: expected 'gaussian', 'uniform' or a sequence of ratios, got {budget!r}")
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    profile = PRESETS[preset]
    if avg_update_ratio is not None:
        scale = avg_update_ratio / profile.curve(n_layers).mean()
    else:
        scale = max_update_ratio / profile.freq_peak
    return np.clip(profile.curve(n_layers, scale=scale, floor=min_update_ratio), 0.0, 1.0)
