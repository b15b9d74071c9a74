"""The runtime-policy contract, checked for every registered policy (one suite, parametrized):

* a forced refresh equals vanilla decoding;
* a ragged (left-padded) batch decodes each row as it would alone;
* threshold mode: lockstep policies move every row's block together, the others decode each row
  as alone (finished rows leave the batch: per-row state is trimmed);
* the Triton kernels (the interpreter on the CPU) give what the torch reference gives;
* state isolation: one instance reused for a second generation gives what a fresh one gives, and
  release() leaves no tensor behind;

plus the runtime's checks of what ``select()`` returns and the base class's per-row state trimming.
A policy added to the registry must add its settings to ``CONTRACT`` (the first test fails otherwise).
"""

from __future__ import annotations

import pytest
import torch

from spacache_kernels.generation import generate
from spacache_kernels.policies import (
    POLICIES,
    CachePolicy,
    D2Cache,
    DKVCacheDecode,
    DLLMCache,
    ElasticCache,
    FastDLLMDual,
    FastDLLMPrefix,
    SpaCache,
    StepPlan,
    Vanilla,
)

GEN, BLOCK = 16, 8
N_LAYERS = 4  # the shared fixtures' depth (tests/conftest.py)


def prompts(batch: int, length: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def run(model, ids, policy, **kw):
    args = dict(gen_length=GEN, steps=GEN, block_length=BLOCK, backend="torch")
    args.update(kw)
    return generate(model, ids, policy=policy, **args)


# name -> forced (a factory, the run's overrides), ragged / triton factories (settings that exercise
# the policy's partial paths).
CONTRACT = {
    "vanilla": dict(forced=(Vanilla, {}), ragged=Vanilla, triton=Vanilla),
    "spa": dict(
        forced=(lambda: SpaCache(budget=[1.0] * N_LAYERS, refresh_steps=1, refresh_gen_steps=1), {}),
        ragged=lambda: SpaCache(proxy_rank=16, max_update_ratio=0.5, refresh_steps=5),
        triton=lambda: SpaCache(proxy_rank=16, max_update_ratio=0.5, refresh_steps=99, refresh_gen_steps=99),
    ),
    "dllm_cache": dict(
        forced=(lambda: DLLMCache(prompt_interval=1, gen_interval=1), {}),
        ragged=lambda: DLLMCache(prompt_interval=5, gen_interval=3, ratio=0.25),
        triton=lambda: DLLMCache(prompt_interval=3, gen_interval=4, ratio=0.5),  # dense V + sparse K
    ),
    # With block length 1 every step starts a block, so every step is Fast-dLLM's full refresh.
    "fast_dllm_prefix": dict(
        forced=(FastDLLMPrefix, {"block_length": 1}), ragged=FastDLLMPrefix, triton=FastDLLMPrefix
    ),  # fmt: skip
    "fast_dllm_dual": dict(
        forced=(FastDLLMDual, {"block_length": 1}), ragged=FastDLLMDual, triton=FastDLLMDual
    ),  # fmt: skip  # range regions
    "dkv_decode": dict(
        forced=(lambda: DKVCacheDecode(refresh_interval=1), {}),
        ragged=lambda: DKVCacheDecode(refresh_interval=3),
        triton=lambda: DKVCacheDecode(refresh_interval=3),
    ),
    "elastic": dict(
        forced=(lambda: ElasticCache(refresh_interval=1), {}),
        ragged=lambda: ElasticCache(window=4, gamma=0.0),  # gamma 0: no batch-wide trigger
        triton=lambda: ElasticCache(window=2, gamma=1.0),  # row sets, mid-step expansion
    ),
    "d2cache": dict(
        forced=(lambda: D2Cache(refresh_interval=1), {}),
        ragged=lambda: D2Cache(k=4),
        triton=lambda: D2Cache(k=2, rollout_p=0.2),  # padded row sets, probability rows
    ),
}
NAMES = sorted(POLICIES)


def test_every_registered_policy_is_in_the_contract_suite():
    assert sorted(CONTRACT) == NAMES


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_forced_refresh_equals_vanilla(request, name, arch):
    model = request.getfixturevalue(arch)
    ids = prompts(2, seed=1 if not CONTRACT[name]["forced"][1] else 2)
    build, overrides = CONTRACT[name]["forced"]
    want = run(model, ids, "vanilla", **overrides)
    got = run(model, ids, build(), **overrides)
    assert torch.equal(got.sequences, want.sequences)
    if not overrides:
        assert got.stats.plan_kinds == {"full": GEN}
        assert got.stats.flops >= want.stats.flops  # the policy's own work comes on top


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_ragged_batch_equals_per_row_runs(request, name, arch):
    model = request.getfixturevalue(arch)
    build = CONTRACT[name]["ragged"]
    long_ids, short_ids = prompts(1, 7, seed=5), prompts(1, 4, seed=6)
    ids = torch.cat([long_ids, torch.cat([torch.zeros(1, 3, dtype=torch.long), short_ids], 1)])
    mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    batch = run(model, ids, build(), attention_mask=mask).sequences
    alone_long = run(model, long_ids, build()).sequences
    alone_short = run(model, short_ids, build()).sequences
    assert torch.equal(batch[0, 7:], alone_long[0, 7:])
    assert torch.equal(batch[1, 7:], alone_short[0, 4:])


@pytest.mark.parametrize("name", NAMES)
def test_threshold_mode(llada, name):
    """Lockstep policies share every row's block (the references' batch behaviour); the others
    decode each row as alone, finished rows leaving the batch."""
    build = CONTRACT[name]["ragged"]
    ids = prompts(2, seed=7)
    kw = dict(threshold=0.5, steps=GEN)
    policy = build()
    states = []
    original = policy.begin_step

    def begin_step(state):
        states.append((state.block_index, state.block_start.clone()))
        original(state)

    policy.begin_step = begin_step
    batch = run(llada, ids, policy, **kw).sequences
    lockstep = type(policy).lockstep_blocks
    for block_index, block_start in states:
        assert (block_index is not None) == lockstep
        if lockstep:
            assert (block_start == block_start[0]).all()
    for row in range(2):
        alone = run(llada, ids[row : row + 1], build(), **kw).sequences
        if not lockstep or name == "fast_dllm_dual":  # idle lockstep steps repeat the same computation
            assert torch.equal(batch[row], alone[0])
        else:  # the rule still runs; decoded tokens stay out of the mask
            assert not (batch[row] == llada.mask_id).any()


@pytest.mark.parametrize("name", NAMES)
def test_triton_path_matches_torch_path(llada, name):
    # The Triton kernels (the interpreter on the CPU) on the same plans as the torch reference.
    build = CONTRACT[name]["triton"]
    ids = prompts(2, seed=10)
    kw = dict(gen_length=8, steps=8, block_length=4)
    by_torch = run(llada, ids, build(), backend="torch", **kw)
    by_triton = run(llada, ids, build(), backend="triton", **kw)
    assert torch.equal(by_triton.sequences, by_torch.sequences)
    assert by_triton.stats.plan_kinds == by_torch.stats.plan_kinds
    assert by_triton.stats.layer_recomputed_tokens == by_torch.stats.layer_recomputed_tokens
    assert by_triton.stats.flops == by_torch.stats.flops


@pytest.mark.parametrize("name", NAMES)
def test_state_isolation(llada, name):
    build = CONTRACT[name]["ragged"]
    first, second = prompts(2, seed=8), prompts(2, 5, seed=9)
    policy = build()
    run(llada, first, policy, threshold=0.5)
    reused = run(llada, second, policy)
    fresh = run(llada, second, build())
    assert torch.equal(reused.sequences, fresh.sequences)
    assert reused.stats.flops == fresh.stats.flops
    assert not [k for k, v in vars(policy).items() if isinstance(v, torch.Tensor)]  # released
    assert repr(policy) == repr(build())  # the settings survive


# -- the runtime's checks of select() ------------------------------------------------------------
class _Select(CachePolicy):
    """Returns ``rows`` from select() on the partial steps (hand-built answers)."""

    name = "select_fixture"
    needs_branch_cache = True

    def __init__(self, rows):
        self.rows = rows

    def plan(self, step):
        return StepPlan(region="all", kind="full") if step == 0 else StepPlan(region="gen", kind="partial")

    def select(self, ctx):
        assert ctx.raw[:, ctx.gen].shape[1] == GEN and ctx.raw.shape == ctx.normed.shape
        return None if ctx.plan.kind == "full" else self.rows


@pytest.mark.parametrize(
    "rows, match",
    [
        (torch.tensor([[0.0, 1.0]] * 2), "int64"),
        (torch.tensor([0, 1]), r"of shape \(2,\)"),
        (torch.zeros(3, 2, dtype=torch.long), r"\(2, k\)"),
        (torch.arange(GEN + 1).expand(2, -1), "k <= 16"),
        ([0, 1], "returned list"),
    ],
)
def test_select_answers_are_checked_and_name_the_policy(llada, rows, match):
    with pytest.raises((TypeError, ValueError), match=match) as info:
        run(llada, prompts(2), _Select(rows))
    assert "policy _Select(rows=" in str(info.value) and "select() at layer 0" in str(info.value)


@pytest.mark.parametrize(
    "rows, match",
    [
        (torch.tensor([[0, GEN]] * 2), r"indices in \[0, 16\]; expected \[0, 16\)"),
        (torch.tensor([[-1, 2]] * 2), "expected"),
        (torch.tensor([[3, 3]] * 2), "strictly ascending"),
        (torch.tensor([[4, 3]] * 2), "strictly ascending"),
    ],
)
def test_select_values_are_checked_under_the_debug_switch(llada, monkeypatch, rows, match):
    monkeypatch.setenv("SPACACHE_DEBUG", "1")
    with pytest.raises(ValueError, match=match):
        run(llada, prompts(2), _Select(rows))
    monkeypatch.setenv("SPACACHE_DEBUG", "1")
    good = run(llada, prompts(2), _Select(torch.tensor([[2, 5]] * 2)))
    assert good.stats.plan_kinds == {"full": 1, "partial": GEN - 1}


def test_base_class_trims_declared_row_state():
    class Rows(CachePolicy):
        row_state = {"per_row": 0, "per_layer_row": 1, "absent": 0}

    policy = Rows()
    policy.per_row = torch.arange(3)
    policy.per_layer_row = torch.arange(6).view(2, 3)
    policy.absent = None
    policy.drop_rows(torch.tensor([True, False, True]))
    assert policy.per_row.tolist() == [0, 2]
    assert policy.per_layer_row.tolist() == [[0, 2], [3, 5]]
    assert policy.absent is None


class _HookRecorder(CachePolicy):
    """Records every per-layer hook call; asks for one probability row and expands after layer 1 on
    steps after the first (a full step, then region "gen" steps with sparse K/V of two rows)."""

    needs_branch_cache = True
    needs_layer_outputs = True

    def __init__(self):
        self.calls = []

    def plan(self, step: int) -> StepPlan:
        if step == 0:
            return StepPlan(region="all", kind="full")
        return StepPlan(region="gen", kind="partial", sparse_kv=True)

    def select(self, ctx):
        self.calls.append(("select", ctx))
        return None if ctx.plan.kind == "full" else torch.tensor([[1, 4]] * ctx.raw.shape[0])

    def attention_rows(self, ctx):
        self.calls.append(("attention_rows", ctx))
        return torch.zeros(ctx.raw.shape[0], 1, dtype=torch.long)

    def observe_attention(self, ctx, probs):
        self.calls.append(("observe_attention", ctx))
        assert probs.shape[:2] == (ctx.raw.shape[0], 1)

    def expand_after(self, ctx):
        self.calls.append(("expand_after", ctx))
        return ctx.plan.kind == "partial" and ctx.layer == 1


def test_every_per_layer_hook_gets_the_layer_context(llada):
    """One calling convention: select, attention_rows, observe_attention and expand_after get the
    same LayerContext of their layer; after expand_after says yes, the deeper layers' contexts say
    ``expanded`` (all T positions live, no generated slice) and select is not asked."""
    policy = _HookRecorder()
    ids = prompts(2)
    run(llada, ids, policy, steps=2, gen_length=BLOCK, block_length=BLOCK)
    hooks = ["select", "attention_rows", "observe_attention", "expand_after"]
    first, second = policy.calls[: 4 * N_LAYERS], policy.calls[4 * N_LAYERS :]
    assert [name for name, _ in first] == hooks * N_LAYERS
    for layer in range(N_LAYERS):
        contexts = {id(ctx) for _, ctx in first[4 * layer : 4 * layer + 4]}
        assert len(contexts) == 1 and first[4 * layer][1].layer == layer
    assert all(not ctx.expanded for _, ctx in first)
    # Step 1: layers 0 and 1 select; layers 2 and 3 run expanded (neither select nor expand_after).
    assert [name for name, _ in second] == hooks * 2 + hooks[1:3] * 2
    total = ids.shape[1] + BLOCK
    for _, ctx in second:
        assert ctx.expanded == (ctx.layer >= 2)
        if ctx.expanded:
            assert ctx.gen is None and ctx.raw.shape[1] == total
        else:
            assert ctx.gen == slice(0, BLOCK) and ctx.raw.shape[1] == BLOCK
