"""Caching policies: per step and per layer, what to refresh and which tokens to recompute.

Pick one by name (``policy="spa"``), by name and published setting (``policy="spa:llada-8b-gsm8k"``,
a key of the one table :data:`spacache_kernels.decoding.PUBLISHED`), by ``"package.module:Class"``
for a policy defined elsewhere, or pass an instance; :func:`make_policy` resolves all four. Every
policy is a dataclass whose ``repr`` shows every setting.
"""

from __future__ import annotations

import importlib
import importlib.util

from spacache_kernels.policies.base import CachePolicy, DecodeState, GenerationShape, LayerContext, StepPlan
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
    """The published presets of policy ``name`` (usable as ``"name:preset"``; earlier names listed in
    :data:`spacache_kernels.decoding.ALIASES` are accepted too)."""
    return sorted(policy_class(name)[0].presets)


def _external_class(module_name: str, attr: str, spec: str) -> type[CachePolicy]:
    """``package.module:Class``: a policy defined outside this package, imported on demand."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"policy: cannot import module {module_name!r} of {spec!r} ({exc})") from exc
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, CachePolicy)):
        raise ValueError(f"policy: {spec!r} does not name a CachePolicy subclass in {module_name!r}")
    return cls


def policy_class(spec: str) -> tuple[type[CachePolicy], str | None]:
    """The policy class and preset (or None) a policy string names.

    Spellings: a registered name (``"spa"``, ``"fast-dllm-dual"``: case, ``-`` and ``_`` do not
    matter), a registered name with a published preset (``"spa:llada-8b-gsm8k"``; the preset comes
    back under its canonical name), or
    ``"package.module:Class"`` for a policy defined outside the package (the module part has a dot or
    is not a registered name; the class must subclass :class:`CachePolicy`).
    """
    if not isinstance(spec, str):
        raise TypeError(f"policy: expected a name or a CachePolicy instance, got {type(spec).__name__}")
    head, _, tail = spec.strip().partition(":")
    key = head.strip().lower().replace("-", "_")
    if key in POLICIES:
        cls, preset = POLICIES[key], tail.strip().lower() or None
        if preset is not None:
            try:
                preset = cls.preset_name(preset)
            except ValueError:
                raise ValueError(
                    f"policy: {key!r} has presets {sorted(cls.presets) or 'none'}, got {tail.strip()!r}"
                ) from None
        return cls, preset
    if tail and ("." in head or importlib.util.find_spec(head.strip()) is not None):
        return _external_class(head.strip(), tail.strip(), spec), None
    raise ValueError(
        f"policy: expected one of {sorted(POLICIES)} (optionally name:preset), 'package.module:Class' "
        f"or a CachePolicy, got {spec!r}"
    )


def make_policy(policy, **kwargs) -> CachePolicy:
    """The one policy resolver (``generate()``, the CLI, lm-eval and the benchmarks all use it): an
    instance as is, or a new instance from a string :func:`policy_class` understands, with
    constructor ``kwargs`` overriding the preset."""
    if isinstance(policy, CachePolicy):
        if kwargs:
            raise ValueError("policy: keyword arguments apply only when the policy is given by name")
        return policy
    cls, preset = policy_class(policy)
    return cls.from_preset(preset, **kwargs) if preset is not None else cls(**kwargs)


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
    "LayerContext",
    "SpaCache",
    "StepPlan",
    "Vanilla",
    "make_policy",
    "policy_class",
    "policy_presets",
    "update_ratios",
]
