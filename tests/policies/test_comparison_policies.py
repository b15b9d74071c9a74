"""The comparison policies (dLLM-Cache, Fast-dLLM, dKV-Cache, Elastic-Cache, d2Cache): each rule on
hand-built states, presets, bad input. What every policy must satisfy (forced refresh = vanilla,
ragged batches, threshold mode, Triton = torch, state isolation) is in ``test_contract.py``."""

from __future__ import annotations

import pytest
import torch

from spacache_kernels.generation import generate
from spacache_kernels.policies import (
    POLICIES,
    D2Cache,
    DecodeState,
    DKVCacheDecode,
    DLLMCache,
    ElasticCache,
    FastDLLMDual,
    FastDLLMPrefix,
    GenerationShape,
    LayerContext,
    make_policy,
)
from spacache_kernels.policies._rows import distinct_rows, drift_bottom_k, rows_from_mask
from spacache_kernels.policies.d2cache import certainty_density, inflate, nucleus, rollout_importance

PROMPT, GEN, BLOCK = 6, 16, 8


def prompts(batch: int, length: int = PROMPT, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def run(model, ids, policy, **kw):
    args = dict(gen_length=GEN, steps=GEN, block_length=BLOCK, backend="torch")
    args.update(kw)
    return generate(model, ids, policy=policy, **args)


def test_caching_policies_spend_fewer_flops_than_vanilla(llada):
    ids = prompts(2, seed=4)
    base = run(llada, ids, "vanilla").stats.flops
    for name in ["dllm_cache", "fast_dllm_prefix", "fast_dllm_dual", "dkv_decode", "elastic", "d2cache"]:
        stats = run(llada, ids, name).stats
        assert stats.flops < base, name
        assert stats.steps == GEN


# -- rules on hand-built states --------------------------------------------------------------------
def _shape(batch=1, prompt=4, gen=8, block=4, spb=4):
    return GenerationShape(batch, prompt, gen, torch.device("cpu"), "torch", block, spb)


def _state(tokens, block_index, step_in_block, block=4, prompt=4, mask_id=99, committed=None):
    start = torch.full((tokens.shape[0],), prompt + block_index * block)
    return DecodeState(0, tokens, start, block, block_index, step_in_block, mask_id, committed)


def test_dllm_cache_schedule_and_v_verify(llada):
    policy = DLLMCache(prompt_interval=4, gen_interval=3, ratio=0.5)
    policy.reset(llada, _shape(gen=8))
    kinds = [policy.plan(s).kind for s in range(9)]
    assert kinds == ["full", "partial", "partial", "gen", "prompt", "partial", "gen", "partial", "prompt"]
    assert policy.plan(4).region == "all" and policy.plan(4).dense_v and policy.plan(1).sparse_kv

    class FakeRuntime:
        v_cache = torch.randn(4, 1, 12, 2, 3)

    rt = FakeRuntime()
    new = rt.v_cache[1][:, 4:].reshape(1, 8, 6).clone()
    drift_rows = torch.tensor([6, 1, 3, 0])  # decreasing drift: 6 most changed
    for rank, row in enumerate(drift_rows):
        new[0, row] = -new[0, row] * (1 + rank) + 0.1 * rank * torch.randn(6)  # cosine about -1
    new[0, 0] = new[0, 0] * 0.5 + torch.randn(6)
    policy.attach(rt)

    def ctx(layer, step):
        cache = rt.v_cache[layer]
        return LayerContext(layer, policy.plan(step), new, new, slice(0, 8), new, cache, cache, "torch")

    picked = policy.select(ctx(1, 1))
    want = drift_bottom_k(new, rt.v_cache[1][:, 4:].reshape(1, 8, 6), 4)
    assert torch.equal(picked, want) and picked.shape == (1, 4)
    assert set(picked[0].tolist()) >= {6, 1, 3}
    assert policy.select(ctx(0, 1)) is None  # layer 0 always refreshes
    assert policy.select(ctx(1, 3)) is None  # response refresh


def test_fast_dllm_regions(llada):
    prefix, dual = FastDLLMPrefix(), FastDLLMDual()
    tokens = torch.full((1, 12), 99)
    for policy in (prefix, dual):
        policy.reset(llada, _shape())
        policy.begin_step(_state(tokens, 1, 0))
        assert policy.plan(4).region == "all"
        policy.begin_step(_state(tokens, 1, 2))
    assert prefix.plan(6).region == (8, 12) and dual.plan(6).region == (8, 12)
    prefix.begin_step(_state(tokens, 0, 1))
    dual.begin_step(_state(tokens, 0, 1))
    assert prefix.plan(1).region == (4, 12) and dual.plan(1).region == (4, 8)


def test_dkv_decode_live_rows_are_last_steps_masked(llada):
    policy = DKVCacheDecode(refresh_interval=3)
    policy.reset(llada, _shape())
    tok = torch.tensor([[1, 2, 3, 4, 99, 99, 99, 99, 99, 99, 99, 99]])
    kinds = []
    for i in range(4):
        policy.begin_step(_state(tok.clone(), 0, i))
        kinds.append(policy.plan(i))
        tok[0, 4 + i] = 7  # one token decoded per step
    assert [p.kind for p in kinds] == ["full", "full", "cached", "full"]
    # Step 2 runs what was masked at the start of step 1: positions 5.. (position 4 was decoded at 0).
    assert kinds[2].rows.tolist() == [list(range(5, 12))]
    assert DKVCacheDecode(variant="prefill").plan.__self__.variant == "prefill"


def test_rows_from_mask_pads_with_repeats():
    mask = torch.tensor([[0, 1, 0, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    rows = rows_from_mask(mask)
    assert rows.tolist() == [[1, 3, 4], [0, 0, 0], [0, 0, 0]]
    assert distinct_rows(rows).tolist() == [[True, True, True], [True, False, False], [True, False, False]]
    assert rows_from_mask(mask, count=4).tolist()[0] == [1, 3, 4, 4]
    # More slots than positions (Elastic-Cache's window over a short sequence): padded by repeats.
    assert rows_from_mask(mask, count=7).tolist() == [[1, 3, 4, 4, 4, 4, 4], [0] * 7, [0] * 7]


def test_elastic_window_longer_than_the_sequence_equals_vanilla_at_full_refresh(llada):
    """gen_length 8 with a 4-token prompt: the window of 16 is longer than the whole sequence."""
    ids = torch.randint(3, llada.config.vocab_size - 1, (2, 4), generator=torch.Generator().manual_seed(5))
    ids[ids == llada.mask_id] = 3
    kw = dict(gen_length=8, steps=8, block_length=8, backend="torch")
    want = generate(llada, ids, policy="vanilla", **kw).sequences
    forced = generate(llada, ids, policy=ElasticCache(window=16, refresh_interval=1), **kw).sequences
    assert torch.equal(forced, want)  # the window code runs every step, the refresh makes it exact
    cached = generate(llada, ids, policy=ElasticCache(window=16), **kw).sequences
    assert not (cached == llada.mask_id).any()


def test_certainty_density_matches_brute_force():
    torch.manual_seed(0)
    decoded = torch.rand(2, 10) > 0.5
    positions = torch.arange(14).expand(2, -1).clone()
    valid = torch.ones(2, 14, dtype=torch.bool)
    valid[1, :2] = False
    got = certainty_density(decoded, positions, valid, 4, 3.0)
    for b in range(2):
        m = torch.cat([torch.ones(4), decoded[b].float()])
        for i in range(10):
            w = torch.tensor([torch.exp(torch.tensor(-((4 + i - j) ** 2) / 18.0)) for j in range(14)])
            w = w * valid[b]
            assert got[b, i] == pytest.approx(float((w * m).sum() / w.sum()), rel=1e-5)


def test_rollout_importance_equals_explicit_product():
    torch.manual_seed(1)
    total, layers = 9, 3
    valid = torch.ones(2, total, dtype=torch.bool)
    valid[1, 0] = False
    layer_probs, explicit = [], torch.eye(total).expand(2, -1, -1)
    for _ in range(layers):
        rows = torch.stack([torch.tensor([0, 2, 5, 5]), torch.tensor([1, 3, 4, 8])])  # row 0 has a repeat
        probs = torch.softmax(torch.randn(2, 4, total), -1)
        probs[0, 3] = 0  # the repeat carries no weight
        layer_probs.append((rows, probs))
        m = torch.eye(total).repeat(2, 1, 1)
        for b in range(2):
            for j in range(4):
                if probs[b, j].sum() > 0:
                    row = probs[b, j] + torch.nn.functional.one_hot(rows[b, j], total).float()
                    m[b, rows[b, j]] = row / row.sum()
        explicit = m @ explicit
    got = rollout_importance(layer_probs, valid)
    want = (explicit * valid.unsqueeze(-1)).sum(dim=1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_nucleus_and_inflate():
    imp = torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.05]])
    cand = torch.tensor([[False, True, True, True, True]])
    # candidate shares 0.6, 0.2, 0.1, 0.1: only the first stays within p = 0.5 (at least one)
    assert nucleus(imp, cand, 0.5).tolist() == [[False, True, False, False, False]]
    assert nucleus(imp, cand, 0.85).tolist() == [[False, True, True, False, False]]
    sel = torch.tensor([[1, 0, 0, 1, 0, 0, 0, 1]], dtype=torch.bool)
    assert inflate(sel, 2).tolist() == [[True, True, True, True, False, False, False, True]]
    assert inflate(sel, 3).all()
    assert torch.equal(inflate(sel, 0), sel)


def test_d2cache_selection_after_a_step(llada):
    ids = prompts(1, seed=8)
    seen = []

    class Recording(D2Cache):
        def end_step(self, state):
            super().end_step(state)
            seen.append((state.tokens.clone(), state.committed.clone(), self.next_rows.clone()))

    run(llada, ids, Recording(k=3, rollout_p=0.0), block_length=GEN)
    tokens, committed, rows = seen[0]  # after step 0: one token decoded
    masked = (tokens[0] == llada.mask_id).nonzero().flatten()
    decoded = committed[0].nonzero().flatten()
    assert len(decoded) == 1 and distinct_rows(rows).all()
    assert set(rows[0].tolist()) >= set(decoded.tolist())
    chosen = sorted(set(rows[0].tolist()) - set(decoded.tolist()))
    assert len(chosen) == 3 and set(chosen) <= set(masked.tolist())
    # with rollout_p > 0 the nucleus adds at least one more token
    seen.clear()
    run(llada, ids, Recording(k=3, rollout_p=0.1), block_length=GEN)
    assert seen[0][2].shape[1] >= 5


def test_elastic_drift_trigger_expands_deeper_layers(llada):
    ids = prompts(1, seed=9)
    never = ElasticCache(window=4, gamma=0.0)
    out = run(llada, ids, never)
    assert never.triggers == 0 and out.stats.plan_kinds == {"full": 1, "window": GEN - 1}
    always = ElasticCache(window=4, gamma=1.0)  # any change of the tracked row triggers
    out_always = run(llada, ids, always)
    assert always.triggers > 0
    assert out_always.stats.flops > out.stats.flops


def test_presets_by_name():
    assert make_policy("dllm_cache:dream-instruct").gen_interval == 2
    assert make_policy("dllm_cache:llada-base", ratio=0.5).prompt_interval == 100
    assert make_policy("dkv_decode:dream").refresh_interval == 4
    assert make_policy("spa:dream-7b").preset == "dream-7b"
    with pytest.raises(ValueError, match="presets"):
        make_policy("dllm_cache:nope")
    for name in ["dllm_cache", "fast_dllm_prefix", "fast_dllm_dual", "dkv_decode", "elastic", "d2cache"]:
        assert name in POLICIES and make_policy(name).name == name


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: DLLMCache(ratio=0.0), "ratio"),
        (lambda: DLLMCache(ratio=1.5), "ratio"),
        (lambda: DLLMCache(prompt_interval=0), "prompt_interval"),
        (lambda: DKVCacheDecode(refresh_interval=-1), "refresh_interval"),
        (lambda: DKVCacheDecode(variant="x"), "variant"),
        (lambda: ElasticCache(window=0), "window"),
        (lambda: ElasticCache(gamma=1.5), "gamma"),
        (lambda: ElasticCache(track_num=0), "track_num"),
        (lambda: D2Cache(k=0), "k"),
        (lambda: D2Cache(sigma=0.0), "sigma"),
        (lambda: D2Cache(rollout_p=2.0), "rollout_p"),
        (lambda: D2Cache(inflate_w=-1), "inflate_w"),
    ],
)
def test_bad_parameters_rejected(build, match):
    with pytest.raises(ValueError, match=match):
        build()
