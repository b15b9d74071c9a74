"""Vanilla decoding: every token through every layer at every step (no reuse).

Deliberate deviation from the references' vanilla loops: the mask token is never predicted (they
take the argmax over the whole vocabulary and can "commit" the mask id, which leaves the position
masked; d2Cache's vanilla loop can then spin forever).
"""

from __future__ import annotations

from spacache_kernels.policies.base import CachePolicy


class Vanilla(CachePolicy):
    """Recompute everything every step: the quality reference and the speed baseline."""

    name = "vanilla"
