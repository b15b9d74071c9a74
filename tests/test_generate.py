"""generate(): equivalences that must hold exactly (fp32), ragged batches, statistics, bad input."""

from __future__ import annotations

import pytest
import torch

from spacache_kernels.generation import generate
from spacache_kernels.policies import SpaCache, Vanilla
from tests.helpers import left_pad

N_LAYERS = 4  # the shared `llada` / `dream` fixtures of tests/conftest.py
PROMPT, GEN, BLOCK = 6, 16, 8


def prompts(batch: int, length: int = PROMPT, seed: int = 0, vocab: int = 100) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def plain_loop(model, ids, gen_length, steps, block_length):
    """LLaDA's reference decoding written out independently: full logits every step, fixed count.

    The mask token itself is never predicted (as in generate()); it still counts in the softmax.
    """
    mask_id = model.mask_id
    batch, p = ids.shape
    x = torch.cat([ids, torch.full((batch, gen_length), mask_id)], dim=1)
    n_blocks = gen_length // block_length
    spb = steps // n_blocks
    for blk in range(n_blocks):
        lo, hi = p + blk * block_length, p + (blk + 1) * block_length
        counts = [block_length // spb + (1 if i < block_length % spb else 0) for i in range(spb)]
        for n in counts:
            logits = model.forward_dense(x)
            x0 = logits.clone().index_fill_(-1, torch.tensor([mask_id]), -float("inf")).argmax(-1)
            conf = torch.softmax(logits, -1).gather(-1, x0[..., None])[..., 0]
            conf[:, :lo] = -float("inf")
            conf[:, hi:] = -float("inf")
            conf = torch.where(x == mask_id, conf, torch.tensor(-float("inf")))
            for b in range(batch):
                if n:
                    top = conf[b].topk(n).indices
                    x[b, top] = x0[b, top]
    return x


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_vanilla_equals_plain_forward_dense_loop(llada, backend):
    ids = prompts(2)
    want = plain_loop(llada, ids, GEN, GEN, BLOCK)
    got = generate(
        llada, ids, gen_length=GEN, steps=GEN, block_length=BLOCK, policy="vanilla", backend=backend
    )
    assert torch.equal(got.sequences, want)


def test_vanilla_equals_plain_loop_dream_shifted_logits(dream):
    ids = prompts(2, seed=3)
    want = plain_loop(dream, ids, GEN, GEN // 2, BLOCK)
    got = generate(
        dream, ids, gen_length=GEN, steps=GEN // 2, block_length=BLOCK, policy="vanilla", backend="torch"
    )
    assert torch.equal(got.sequences, want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_spa_full_budget_and_refresh_every_step_equals_vanilla(llada, backend):
    ids = prompts(2, seed=1)
    spa = SpaCache(budget=[1.0] * N_LAYERS, refresh_steps=1, refresh_gen_steps=1)
    got = generate(llada, ids, gen_length=GEN, steps=GEN, block_length=BLOCK, policy=spa, backend=backend)
    want = generate(
        llada, ids, gen_length=GEN, steps=GEN, block_length=BLOCK, policy="vanilla", backend=backend
    )
    assert torch.equal(got.sequences, want.sequences)


class _SelectEverything(SpaCache):
    """SPA whose partial steps select every generated row explicitly (exercises gather/scatter)."""

    def select(self, ctx):
        picked = super().select(ctx)
        if ctx.plan.kind == "partial" and ctx.layer > 0:
            batch, rows = ctx.normed.shape[:2]
            return torch.arange(rows).expand(batch, rows)
        return picked


def test_sparse_path_with_every_row_selected_equals_dense_update(llada):
    ids = prompts(2, seed=2)
    kw = dict(gen_length=GEN, steps=GEN, block_length=BLOCK, backend="torch")
    dense = generate(llada, ids, policy=SpaCache(budget=[1.0] * N_LAYERS, refresh_steps=5), **kw)
    sparse = generate(llada, ids, policy=_SelectEverything(budget=[0.5] * N_LAYERS, refresh_steps=5), **kw)
    assert torch.equal(dense.sequences, sparse.sequences)
    assert dense.stats.plan_kinds == sparse.stats.plan_kinds
    assert dense.stats.plan_kinds["partial"] > 0


@pytest.mark.parametrize("policy", ["vanilla", "spa"])
@pytest.mark.parametrize("rule", [{}, {"threshold": 0.3}])
def test_ragged_batch_equals_each_row_alone(llada, policy, rule):
    rows = [prompts(1, 4, seed=5)[0], prompts(1, 6, seed=6)[0], prompts(1, 2, seed=7)[0]]
    ids, mask = left_pad(rows)
    kw = dict(gen_length=GEN, steps=GEN, block_length=BLOCK, policy=policy, backend="torch", **rule)
    batched = generate(llada, ids, attention_mask=mask, **kw).sequences
    for i, r in enumerate(rows):
        alone = generate(llada, r[None], **kw).sequences
        assert torch.equal(batched[i, ids.shape[1] :], alone[0, len(r) :]), f"row {i}"


def test_two_calls_give_the_same_result(llada):
    ids = prompts(2, seed=4)
    spa = SpaCache(proxy_rank=16, max_update_ratio=0.5, refresh_steps=6, refresh_gen_steps=3)
    kw = dict(gen_length=GEN, steps=GEN, block_length=BLOCK, policy=spa, backend="torch")
    a = generate(llada, ids, **kw)
    b = generate(llada, ids, **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert a.stats.flops == b.stats.flops


def test_spa_defaults_on_a_tiny_model(llada, capsys):
    ids = prompts(3, seed=8)
    kw = dict(gen_length=32, steps=32, block_length=BLOCK, backend="torch")
    spa = generate(llada, ids, policy="spa", **kw)
    ref = generate(llada, ids, policy="vanilla", **kw)
    assert spa.sequences.shape == (3, PROMPT + 32)
    assert torch.equal(spa.sequences[:, :PROMPT], ids)
    assert not (spa.sequences == llada.mask_id).any()
    agreement = (spa.sequences[:, PROMPT:] == ref.sequences[:, PROMPT:]).float().mean().item()
    with capsys.disabled():
        print(f"\n[spa defaults, tiny random LLaDA] token agreement with vanilla: {agreement:.1%}; "
              f"FLOPs ratio {spa.stats.flops / ref.stats.flops:.3f}")  # fmt: skip
    assert spa.stats.flops < ref.stats.flops
    assert spa.stats.plan_kinds == {"full": 1, "gen": 4, "partial": 27}  # steps 0 / 7,14,21,28 / rest
    again = generate(llada, ids, policy="spa", **kw)
    assert torch.equal(again.sequences, spa.sequences)


def test_stats_count_layers_and_eos(llada):
    ids = prompts(2, seed=9)
    eos = int(prompts(1, 1, seed=9)[0, 0])
    kw = dict(gen_length=GEN, steps=GEN, block_length=BLOCK, backend="torch", eos_token_id=eos)
    out = generate(llada, ids, policy=Vanilla(), **kw)
    assert out.stats.steps == out.stats.forwards == GEN
    assert out.stats.layer_recomputed_tokens == [GEN * 2 * (PROMPT + GEN)] * N_LAYERS
    assert 0 <= out.stats.generated_tokens <= 2 * GEN
    cfg = llada.config
    assert out.stats.flops_per_step == pytest.approx(
        2 * (PROMPT + GEN) * (llada.flops_per_token(PROMPT + GEN) - 2 * cfg.d_model * cfg.vocab_size)
        + 2 * BLOCK * 2 * cfg.d_model * cfg.vocab_size
    )


def test_threshold_and_factor_modes_finish(llada):
    ids = prompts(2, seed=10)
    for rule in ({"threshold": 0.9}, {"factor": 1.0}):
        kw = dict(gen_length=GEN, steps=GEN, block_length=BLOCK, backend="torch")
        out = generate(llada, ids, policy="spa", **kw, **rule)
        assert not (out.sequences == llada.mask_id).any()
        assert 2 <= out.stats.steps <= GEN


def test_temperature_sampling_is_reproducible(llada):
    ids = prompts(1, seed=11)
    kw = dict(
        gen_length=GEN, steps=GEN, block_length=BLOCK, policy="vanilla", backend="torch", temperature=1.0
    )
    a = generate(llada, ids, seed=1, **kw).sequences
    assert torch.equal(a, generate(llada, ids, seed=1, **kw).sequences)
    assert not torch.equal(a, generate(llada, ids, seed=2, **kw).sequences)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(gen_length=15), ValueError, "gen_length"),
        (dict(steps=3), ValueError, "steps"),
        (dict(gen_length=64), ValueError, "max positions"),
        (dict(threshold=0.5, factor=1.0), ValueError, "threshold"),
        (dict(threshold=1.5), ValueError, "threshold"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(block_length=0), ValueError, "block_length"),
        (dict(steps=2.0), TypeError, "steps"),
        (dict(policy="nope"), ValueError, "policy"),
    ],
)
def test_bad_arguments(llada, kwargs, error, match):
    args = dict(gen_length=GEN, steps=GEN, block_length=BLOCK, backend="torch") | kwargs
    with pytest.raises(error, match=match):
        generate(llada, prompts(1), **args)


def test_bad_input_ids(llada):
    kw = dict(gen_length=GEN, steps=GEN, block_length=BLOCK)
    with pytest.raises(TypeError, match="input_ids"):
        generate(llada, prompts(1).float(), **kw)
    with pytest.raises(ValueError, match="input_ids"):
        generate(llada, prompts(1)[0], **kw)
    with pytest.raises(ValueError, match="mask token"):
        generate(llada, torch.tensor([[1, llada.mask_id, 2]]), **kw)
    with pytest.raises(ValueError, match="input_ids"):
        generate(llada, torch.tensor([[1, 100000]]), **kw)
    with pytest.raises(ValueError, match="left padding"):
        generate(llada, prompts(1, 3), attention_mask=torch.tensor([[1, 0, 1]]), **kw)
    with pytest.raises(ValueError, match="attention_mask"):
        generate(llada, prompts(1, 3), attention_mask=torch.ones(1, 4), **kw)


def test_bad_policy_parameters():
    with pytest.raises(ValueError, match="refresh_steps"):
        SpaCache(refresh_steps=0)
    with pytest.raises(ValueError, match="proxy_rank"):
        SpaCache(proxy_rank=1.5)
    with pytest.raises(ValueError, match="max_update_ratio"):
        SpaCache(max_update_ratio=2.0)
    with pytest.raises(ValueError, match="preset"):
        SpaCache(preset="gpt-9")


def test_spa_partial_steps_agree_across_backends(llada):
    """The Triton path of the partial step (proxy_select -> gather -> attention -> scatter_residual)."""
    ids = prompts(2, seed=12)
    spa = dict(proxy_rank=16, max_update_ratio=0.5, refresh_steps=100, refresh_gen_steps=100)
    kw = dict(gen_length=GEN, steps=GEN // 2, block_length=BLOCK)
    by_torch = generate(llada, ids, policy=SpaCache(**spa), backend="torch", **kw)
    by_triton = generate(llada, ids, policy=SpaCache(**spa), backend="triton", **kw)
    assert by_triton.stats.plan_kinds == {"full": 1, "partial": GEN // 2 - 1}
    assert by_triton.stats.layer_recomputed_tokens == by_torch.stats.layer_recomputed_tokens
    assert torch.equal(by_triton.sequences, by_torch.sequences)
