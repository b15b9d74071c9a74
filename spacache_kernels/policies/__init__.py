"""Caching policies: per step and per layer, what to refresh and which tokens to recompute.

Pick one by name (``policy="spa"``), by name and published preset (``policy="dllm_cache:dream-instruct"``)
or pass an instance; :func:`make_policy` resolves all three.
"""

from __future__ import annotations

from spacache_kernels.policies.base import CachePolicy, DecodeState, GenerationShape, StepPlan
from spacache_kernels.policies.budget import PRESETS, update_ratios
from spacache_kernels.policies.d2cache import D2Cache
from spacache_kernels.policies.dkv_cache import DKVCacheDecode
from spacache_kernels.policies.dllm_cache import DLLMCache
from spacache_kernels.policies.elastic import ElasticCache
from spacache_kernels.policies.fast_dllm import FastDLLMDual, FastDLLMPrefix
from spacache_kernels.policies.spa import SpaCache
from spacache_kernels.policies.vanilla import Vanilla

POLICIES: dict[str, type[CachePolicy]] = {
    cls.name: cls
    for cls in (
        Vanilla,
        SpaCache,
        DLLMCache,
        FastDLLMPrefix,
        FastDLLMDual,
        DKVCacheDecode,
        ElasticCache,
        D2Cache,
    )
}


def policy_presets(name: str) -> list[str]:
    """The published presets of policy ``name`` (usable as ``"name:preset"``)."""
    return sorted(POLICIES[name].presets)


def make_policy(policy, **kwargs) -> CachePolicy:
    """A policy instance from a registry name (``"name"`` or ``"name:preset"``, with constructor
    ``kwargs`` overriding the preset) or an instance as is."""
    if isinstance(policy, CachePolicy):
        if kwargs:
            raise ValueError("policy: keyword arguments apply only when the policy is given by name")
        return policy
    if isinstance(policy, str):
        key, _, preset = policy.strip().partition(":")
        key = key.strip().lower().replace("-", "_")
        if key not in POLICIES:
            raise ValueError(f"policy: expected one of {sorted(POLICIES)} or a CachePolicy, got {policy!r}")
        cls = POLICIES[key]
        if not preset:
            return cls(**kwargs)
        preset = preset.strip()
        if preset not in cls.presets:
            raise ValueError(f"policy: {key!r} has presets {policy_presets(key) or 'none'}, got {preset!r}")
        return cls.from_preset(preset, **kwargs)
    raise TypeError(f"policy: expected a name or a CachePolicy instance, got {type(policy).__name__}")


__all__ = [
    "POLICIES",
    "PRESETS",
    "CachePolicy",
    "D2Cache",
    "DKVCacheDecode",
    "DLLMCache",
    "DecodeState",
    "ElasticCache",
    "FastDLLMDual",
    "FastDLLMPrefix",
    "GenerationShape",
    "SpaCache",
    "StepPlan",
    "Vanilla",
    "make_policy",
    "policy_presets",
    "update_ratios",
]
