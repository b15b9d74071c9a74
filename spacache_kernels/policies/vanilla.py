"""Vanilla decoding: every token through every layer at every step (no reuse)."""

from __future__ import annotations

from spacache_kernels.policies.base import CachePolicy


class Vanilla(CachePolicy):
    """Recompute everything every step: the quality reference and the speed baseline."""

    name = "vanilla"
