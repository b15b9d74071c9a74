"""Vanilla decoding: every token through every layer at every step (no reuse).

The mask token is never predicted (the one deviation every policy shares; ``docs/policies.md``,
"Rules of each policy").
"""

from __future__ import annotations

from dataclasses import dataclass

from spacache_kernels.policies.base import CachePolicy


@dataclass(repr=False)
class Vanilla(CachePolicy):
    """Recompute everything every step: the quality reference and the speed baseline."""

    name = "vanilla"
