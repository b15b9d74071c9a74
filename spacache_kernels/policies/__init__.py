"""Caching policies: per step and per layer, what to refresh and which tokens to recompute.

Pick one by name (``policy="spa"``) or pass an instance; :func:`make_policy` resolves both.
"""

from __future__ import annotations

from spacache_kernels.policies.base import CachePolicy, GenerationShape, StepPlan
from spacache_kernels.policies.budget import PRESETS, update_ratios
from spacache_kernels.policies.spa import SpaCache
from spacache_kernels.policies.vanilla import Vanilla

POLICIES: dict[str, type[CachePolicy]] = {"vanilla": Vanilla, "spa": SpaCache}


def make_policy(policy, **kwargs) -> CachePolicy:
    """A policy instance from a registry name (with constructor ``kwargs``) or an instance as is."""
    if isinstance(policy, CachePolicy):
        if kwargs:
            raise ValueError("policy: keyword arguments apply only when the policy is given by name")
        return policy
    if isinstance(policy, str):
        key = policy.strip().lower().replace("-", "_")
        if key not in POLICIES:
            raise ValueError(f"policy: expected one of {sorted(POLICIES)} or a CachePolicy, got {policy!r}")
        return POLICIES[key](**kwargs)
    raise TypeError(f"policy: expected a name or a CachePolicy instance, got {type(policy).__name__}")


__all__ = [
    "POLICIES",
    "PRESETS",
    "CachePolicy",
    "GenerationShape",
    "SpaCache",
    "StepPlan",
    "Vanilla",
    "make_policy",
    "update_ratios",
]
