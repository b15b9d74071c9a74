"""Policies are dataclasses: every setting is a field, shown by repr, usable with replace / fields,
compared by ==; per-generation state stays outside the fields."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from spacache_kernels.generation import generate
from spacache_kernels.policies import POLICIES, CachePolicy, D2Cache, DLLMCache, ElasticCache, SpaCache

# A non-default value for every field of every registered policy (the repr must show each one).
OTHER = {
    "spa": dict(
        proxy_rank=8,
        max_update_ratio=0.5,
        avg_update_ratio=0.3,
        budget="uniform",
        refresh_steps=9,
        refresh_gen_steps=3,
        sparse_kv=True,
        preset="dream-7b",
        min_update_ratio=0.1,
        cache_warmup_steps=2,
        early_stop_steps="block",
        first_gen_logit="prompt_end",
        cache_dir="/tmp/spa-proxies",
        backend="torch",
    ),  # fmt: skip
    "dllm_cache": dict(prompt_interval=9, gen_interval=3, ratio=0.5, backend="torch"),
    "fast_dllm_prefix": dict(dream_block_start="rule", backend="torch"),
    "fast_dllm_dual": dict(dream_block_start="rule", backend="torch"),
    "dkv_decode": dict(refresh_interval=3, variant="prefill", backend="torch"),
    "elastic": dict(window=4, gamma=0.5, track_num=2, refresh_interval=5, backend="torch"),
    "d2cache": dict(
        k=4, sigma=2.0, rollout_p=0.3, inflate_w=2, refresh_interval=6, rules="corrected", backend="torch"
    ),  # fmt: skip
    "vanilla": {},
}


def test_every_policy_is_covered():
    assert set(OTHER) == set(POLICIES), "add the new policy's non-default settings to OTHER"


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_repr_shows_every_field(name):
    cls = POLICIES[name]
    assert dataclasses.is_dataclass(cls)
    kwargs = OTHER[name]
    assert {f.name for f in dataclasses.fields(cls)} == set(kwargs), "every field has a non-default value"
    policy = cls(**kwargs)
    text = repr(policy)
    assert text.startswith(f"{cls.__name__}(")
    for field in dataclasses.fields(policy):
        assert f"{field.name}={getattr(policy, field.name)!r}" in text, (name, field.name)
    # The repr is the constructor call that rebuilds the policy.
    namespace = {cls.__name__: cls, "PosixPath": __import__("pathlib").PosixPath}
    assert eval(text, namespace) == policy  # noqa: S307 - our own repr


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_replace_and_equality(name):
    cls = POLICIES[name]
    policy, other = cls(), cls(**OTHER[name])
    assert policy == cls() and (policy != other or not OTHER[name])
    assert dataclasses.replace(policy, **OTHER[name]) == other
    assert dataclasses.replace(other) == other


def test_runtime_state_stays_out_of_the_fields(llada):
    policy = SpaCache(proxy_rank=4, refresh_steps=4, refresh_gen_steps=2)
    before = repr(policy)
    ids = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(0))
    generate(llada, ids, gen_length=8, steps=8, block_length=8, policy=policy, backend="torch")
    assert repr(policy) == before and policy == SpaCache(proxy_rank=4, refresh_steps=4, refresh_gen_steps=2)
    assert "ratios" in vars(policy) and "ratios" not in {f.name for f in dataclasses.fields(policy)}
    assert not [k for k, v in vars(policy).items() if isinstance(v, torch.Tensor)]  # released


def test_positional_and_keyword_calls_keep_working():
    assert DLLMCache(100, 6, 0.5) == DLLMCache(prompt_interval=100, gen_interval=6, ratio=0.5)
    assert D2Cache(8, 5) == D2Cache(k=8, sigma=5.0)
    assert ElasticCache(8, 0.5, 2) == ElasticCache(window=8, gamma=0.5, track_num=2)
    assert SpaCache(64, 0.5).proxy_rank == 64
    # Normalised on construction, as before: floats, bools, an expanded path, per-layer ratios.
    assert isinstance(D2Cache(sigma=5).sigma, float) and SpaCache(sparse_kv=1).sparse_kv is True
    home = SpaCache(cache_dir="~/x").cache_dir
    assert home.name == "x" and "~" not in str(home)
    ratios = [0.5, 0.25, 1.0, 0.125]
    spa = SpaCache(budget=ratios)
    ratios[0] = 0.0  # the policy keeps its own copy
    assert spa.budget == (0.5, 0.25, 1.0, 0.125)


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: SpaCache(proxy_rank=True), TypeError, "proxy_rank"),
        (lambda: SpaCache(refresh_steps=0), ValueError, "refresh_steps"),
        (lambda: SpaCache(budget=[0.5, 2.0]), ValueError, "budget"),
        (lambda: DLLMCache(ratio=0.0), ValueError, "ratio"),
        (lambda: ElasticCache(refresh_interval=0), ValueError, "refresh_interval"),
        (lambda: D2Cache(sigma=float("inf")), ValueError, "sigma"),
        (lambda: POLICIES["dkv_decode"](variant="greedy"), ValueError, "variant"),
        (lambda: POLICIES["fast_dllm_dual"](dream_block_start="x"), ValueError, "dream_block_start"),
        (lambda: dataclasses.replace(DLLMCache(), gen_interval=0), ValueError, "gen_interval"),
    ],
)
def test_validation_runs_on_every_construction(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_a_plain_subclass_keeps_its_constructor_repr():
    class Plain(CachePolicy):
        name = "plain"

        def __init__(self, every: int = 2, backend=None):
            self.every, self.backend = every, backend

    assert repr(Plain(3)) == "Plain(every=3, backend=None)"
