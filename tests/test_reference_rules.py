"""The authors' rules (issue 12), each on a hand-built state with an exact expected result.

SPA-Cache: published presets, warm-up, early termination, Dream's first generated logit.
"""

from __future__ import annotations

import pathlib
from types import SimpleNamespace

import pytest
import torch

from spacache_kernels.decoding import PUBLISHED, DecodeConfig
from spacache_kernels.generation import (
    early_stop_pad,
    first_masked_block,
    fixed_commit_counts,
    generate,
    row_transfer_schedule,
)
from spacache_kernels.models import load_model
from spacache_kernels.models.runtime import DenoiseRuntime
from spacache_kernels.policies import GenerationShape, SpaCache, StepPlan, make_policy, update_ratios
from tests.models.checkpoints import write_llada_checkpoint

N_LAYERS = 4  # the shared `llada` / `dream` fixtures of tests/conftest.py


def prompts(batch: int, length: int = 6, seed: int = 0, vocab: int = 100) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


# -- item 1, 2: published presets ---------------------------------------------------------------


def test_llada_gsm8k_preset_is_the_published_run():
    spa = make_policy("spa:llada-8b-gsm8k")
    assert (spa.proxy_rank, spa.max_update_ratio, spa.min_update_ratio) == (128, 0.25, 2**-4)
    assert (spa.refresh_steps, spa.refresh_gen_steps, spa.cache_warmup_steps) == (50, 7, 0)
    assert spa.early_stop_steps == "block"
    assert make_policy("spa:llada-8b").min_update_ratio == 2**-4
    # At G = 256 the floor 2^-4 gives LLaDA-8B's shallow layers 1-4 exactly 16 tokens (2^-5: 9-14).
    floor = spa.min_update_ratio
    ratios = update_ratios(32, max_update_ratio=0.25, min_update_ratio=floor, preset="llada-8b")
    assert [int(r * 256) for r in ratios[1:5]] == [16, 16, 16, 16]
    old = update_ratios(32, max_update_ratio=0.25, min_update_ratio=2**-5, preset="llada-8b")
    assert [int(r * 256) for r in old[1:5]] != [16, 16, 16, 16]


def test_dream_gsm8k_preset_is_the_published_run():
    spa = make_policy("spa:dream-7b-gsm8k")
    assert (spa.proxy_rank, spa.max_update_ratio, spa.min_update_ratio) == (32, 0.25, 0.125)
    assert (spa.refresh_steps, spa.refresh_gen_steps) == (25, 2)
    assert (spa.cache_warmup_steps, spa.early_stop_steps, spa.preset) == (1, 1, "dream-7b")
    assert make_policy("spa:dream-7b") == spa
    run = PUBLISHED["spa:dream-7b-gsm8k"]
    assert "scripts/dream/eval_gsm8k.sh" in run.source
    assert run.decode.replace(description="") == DecodeConfig(
        gen_length=256, steps=256, block_length=256, temperature=0.2, confidence="neg_entropy",
        schedule="spa-dream",
    )  # fmt: skip
    llada_run = PUBLISHED["spa:llada-8b-gsm8k"].decode
    assert (llada_run.gen_length, llada_run.steps, llada_run.block_length) == (256, 256, 8)


def test_every_published_run_is_a_preset_and_documented():
    docs = (pathlib.Path(__file__).parents[1] / "docs" / "policies.md").read_text()
    runs = {key: entry for key, entry in PUBLISHED.items() if "SPA-Cache scripts/" in entry.source}
    assert len(runs) == 15  # 7 LLaDA-8B tasks, LLaDA-1.5 GSM8K, 7 Dream-7B tasks
    for key, entry in runs.items():
        script = entry.source.split()[1]
        assert f"`{key}`" in docs and script in docs, key
        make_policy(key)  # constructible


def _fake_reset(policy, shift: bool, prompt_len: int = 5, gen_len: int = 8):
    policy.model = SimpleNamespace(config=SimpleNamespace(shift_logits=shift))
    policy.shape = GenerationShape(1, prompt_len, gen_len, torch.device("cpu"))


def test_warmup_steps_are_full_refreshes():
    spa = SpaCache(refresh_steps=25, refresh_gen_steps=2, cache_warmup_steps=1)
    _fake_reset(spa, shift=False)
    kinds = [spa.plan(n).kind for n in (0, 1, 2, 3, 4, 24, 25, 26, 27)]
    assert kinds == ["full", "full", "gen", "partial", "gen", "gen", "full", "gen", "partial"]
    no_warmup = SpaCache(refresh_steps=25, refresh_gen_steps=2)
    _fake_reset(no_warmup, shift=False)
    assert no_warmup.plan(1).kind == "partial"


# -- item 3: early termination ------------------------------------------------------------------


def test_early_stop_pad_overwrites_after_the_first_stop_token():
    M, E, PAD = 9, 7, 8  # mask, EOS, pad
    tokens = torch.tensor(
        [
            [1, 2, 3, E, M, 4, E, M],  # first stop at gen 1 (E): everything after becomes pad
            [1, 2, M, M, M, M, M, M],  # no stop: untouched
            [1, 2, 3, 4, 5, PAD, M, 6],  # pad is a stop id too
        ]
    )
    changed = early_stop_pad(tokens, 2, torch.tensor([E, PAD]), PAD)
    assert tokens.tolist() == [
        [1, 2, 3, E, PAD, PAD, PAD, PAD],
        [1, 2, M, M, M, M, M, M],
        [1, 2, 3, 4, 5, PAD, PAD, PAD],
    ]
    assert changed.tolist() == [
        [False, False, False, False, True, True, True, True],
        [False] * 8,
        [False, False, False, False, False, False, True, True],
    ]


def test_per_row_schedule_and_first_masked_block():
    assert row_transfer_schedule(torch.tensor([8, 5, 0]), 4).tolist() == [[2, 2, 2, 2], [2, 1, 1, 1], [0] * 4]
    conf = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 0.8, 0.6]])
    masked = torch.tensor([[True, True, True, False], [True, True, True, True]])
    got = fixed_commit_counts(conf, masked, torch.tensor([2, 1]))
    assert got.tolist() == [[False, True, True, False], [False, False, True, False]]
    M = 9
    tokens = torch.tensor([[0, 1, 2, M, M, M, M], [0, 1, 2, 3, 4, 5, 6], [0, M, 2, 3, M, 5, 6]])
    assert first_masked_block(tokens, 1, M, 2).tolist() == [1, 3, 0]  # 3 = the block count: done


def test_early_termination_pads_skips_blocks_and_counts_steps(llada):
    ids = prompts(2, seed=11)
    kw = dict(gen_length=16, steps=16, block_length=8, policy="vanilla", backend="torch")
    plain = generate(llada, ids, **kw).sequences
    # Make the token vanilla decodes at row 0, generated position 2 (block 0) the EOS: the decoding
    # of block 0 is unchanged, then (early stop every block) row 0 is padded after its first EOS and
    # leaves the batch; block 1 is decoded for row 1 only.
    eos = int(plain[0, 6 + 2])
    pad = llada.config.pad_token_id  # also a stop token
    first = int(torch.isin(plain[0, 6:], torch.tensor([eos, pad])).nonzero()[0])
    out = generate(llada, ids, eos_token_id=eos, early_stop_steps="block", **kw)
    want0 = torch.cat([plain[0, : 6 + first + 1], torch.full((16 - first - 1,), pad)])
    assert torch.equal(out.sequences[0], want0)
    alone = generate(llada, ids[:1], eos_token_id=eos, early_stop_steps=8, **kw)
    assert torch.equal(alone.sequences[0], want0)
    assert alone.stats.steps == 8  # block 1 had no mask left: skipped
    assert alone.stats.generated_tokens == first  # up to the first stop token
    # The published presets switch it on (block length for LLaDA).
    spa = make_policy("spa:llada-8b-gsm8k", budget=[1.0] * N_LAYERS, refresh_steps=1)
    with_preset = generate(llada, ids[:1], eos_token_id=eos, **{**kw, "policy": spa})
    assert torch.equal(with_preset.sequences[0], want0) and with_preset.stats.steps == 8


def test_early_termination_every_step_drops_a_finished_row_mid_block(llada):
    # Every step: a row whose stop token leaves no mask behind finishes inside a block and leaves the
    # batch; the other row goes on with its own per-row schedule, exactly as it would alone.
    ids = prompts(2, seed=11)
    kw = dict(gen_length=16, steps=16, block_length=8, policy="vanilla", backend="torch")
    plain = generate(llada, ids, **kw).sequences
    kw["early_stop_steps"] = 1
    for eos in sorted(set(plain[:, 6:14].flatten().tolist())):  # block-0 tokens, in a fixed order
        alone = [generate(llada, ids[r : r + 1], eos_token_id=eos, **kw) for r in range(2)]
        steps = sorted(a.stats.steps for a in alone)
        if steps[0] < 8 and steps[0] < steps[1]:  # one row is done inside block 0, the other goes on
            break
    else:
        pytest.fail("no stop token ends exactly one row inside block 0 on these inputs")
    out = generate(llada, ids, eos_token_id=eos, **kw)
    alone0, alone1 = alone
    assert torch.equal(out.sequences[0], alone0.sequences[0])
    assert torch.equal(out.sequences[1], alone1.sequences[0])
    assert out.stats.steps == max(alone0.stats.steps, alone1.stats.steps)


def test_bad_early_stop_steps(llada):
    with pytest.raises(ValueError, match="early_stop_steps"):
        generate(llada, prompts(1), gen_length=8, steps=8, block_length=8, early_stop_steps=0)


# -- item 4: Dream, the first generated token between full refreshes -----------------------------


@pytest.mark.parametrize("rule", ["own", "prompt_end"])
def test_dream_first_generated_logit_between_full_refreshes(dream, rule):
    ids = prompts(2, seed=12)
    batch, plen, glen = 2, 6, 8
    tokens = torch.cat([ids, torch.full((batch, glen), dream.mask_id)], dim=1)
    tokens[:, plen + 3] = 5  # some decoded token
    spa = SpaCache(budget=[1.0] * N_LAYERS, refresh_steps=100, refresh_gen_steps=1, first_gen_logit=rule)
    spa.reset(dream, GenerationShape(batch, plen, glen, dream.device, "torch", block_length=glen))
    runtime = DenoiseRuntime(dream, torch.ones_like(tokens), plen, spa, "torch")
    runtime.step(tokens, spa.plan(0))
    plan = spa.plan(1)
    assert plan.kind == "gen"
    assert plan.first_gen_own_logit == (rule == "own")
    assert plan.region == ("gen" if rule == "own" else (plen - 1, plen + glen))
    runtime.step(tokens, plan)
    positions = torch.arange(plen, plen + glen).expand(batch, -1)
    token, conf = runtime.decide(positions)
    dense = dream.forward_dense(tokens)  # the token at i is predicted by the network at i - 1
    # "own": token P from the network's output at P itself (= the dense prediction for P + 1);
    # "prompt_end": from the freshly recomputed P - 1 (= the dense prediction for P).
    source = dense[:, plen + 1] if rule == "own" else dense[:, plen]
    want = source.index_fill(-1, torch.tensor([dream.mask_id]), -float("inf")).argmax(-1)
    assert torch.equal(token[:, 0], want)
    want_conf = torch.softmax(source, -1).gather(-1, want[:, None])[:, 0]
    torch.testing.assert_close(conf[:, 0].float(), want_conf, atol=1e-5, rtol=1e-5)
    # The other positions read P + j - 1 as always.
    rest = dense[:, plen + 1 :].index_fill(-1, torch.tensor([dream.mask_id]), -float("inf")).argmax(-1)
    assert torch.equal(token[:, 1:], rest)


def test_bad_spa_reference_options():
    with pytest.raises(ValueError, match="first_gen_logit"):
        SpaCache(first_gen_logit="previous")
    with pytest.raises(ValueError, match="cache_warmup_steps"):
        SpaCache(cache_warmup_steps=-1)
    with pytest.raises(ValueError, match="early_stop_steps"):
        SpaCache(early_stop_steps=0)
    assert StepPlan(region="gen", kind="x").first_gen_own_logit is False


# -- item 6: Fast-dLLM on Dream commits the block's first token at the block start ----------------


def _recording(cls):
    class Recording(cls):
        # The log is made in __init__, so it counts as a setting and generate()'s policy.release()
        # (which drops what a generation attached) leaves it readable afterwards.
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.log = []

        def reset(self, model, shape):
            super().reset(model, shape)
            self.log.clear()

        def begin_step(self, state):
            super().begin_step(state)
            self._before = state.tokens.clone()

        def end_step(self, state):
            entry = (state.step_in_block, int(state.block_start[0]), self._before, state.committed.clone())
            self.log.append(entry)

    return Recording


def _dense_choice(model, tokens, lo, hi):
    """Token and confidence the full forward gives each position of [lo, hi) (mask never predicted)."""
    logits = model.forward_dense(tokens)[:, lo:hi]
    token = logits.index_fill(-1, torch.tensor([model.mask_id]), -float("inf")).argmax(-1)
    return token, torch.softmax(logits, -1).gather(-1, token[..., None])[..., 0]


@pytest.mark.parametrize("name", ["fast_dllm_prefix", "fast_dllm_dual"])
@pytest.mark.parametrize("rule", ["first_token", "rule"])
def test_fast_dllm_dream_block_start_commit(dream, name, rule):
    from spacache_kernels.policies import POLICIES

    policy = _recording(POLICIES[name])(dream_block_start=rule)
    ids = prompts(2, seed=13)
    kw = dict(gen_length=8, steps=8, block_length=4, threshold=1.0, backend="torch")
    out = generate(dream, ids, policy=policy, **kw)
    assert not (out.sequences == dream.mask_id).any()
    starts = [entry for entry in policy.log if entry[0] == 0]
    assert len(starts) == 2  # one per block
    best_elsewhere = 0
    for _, lo, before, committed in starts:
        token, conf = _dense_choice(dream, before, lo, lo + 4)
        masked = before[:, lo : lo + 4] == dream.mask_id
        if rule == "first_token":
            want = torch.zeros_like(masked)
            want[:, 0] = True  # unconditionally, whatever its confidence
        else:
            best = torch.where(masked, conf, -float("inf")).argmax(1)
            want = torch.zeros_like(masked).scatter_(1, best[:, None], True)
        assert torch.equal(committed[:, lo : lo + 4], want)
        assert not committed[:, :lo].any() and not committed[:, lo + 4 :].any()
        assert torch.equal(out.sequences[:, lo][want[:, 0]], token[:, 0][want[:, 0]])
        best_elsewhere += int((torch.where(masked, conf, -float("inf")).argmax(1) != 0).sum())
    assert best_elsewhere > 0  # on these inputs the two rules differ at some block start


def test_fast_dllm_dream_forced_first_token_under_fixed_count(dream):
    from spacache_kernels.policies import FastDLLMPrefix

    policy = _recording(FastDLLMPrefix)()
    ids = prompts(1, seed=14)
    generate(dream, ids, gen_length=8, steps=4, block_length=4, policy=policy, backend="torch")
    for step_in_block, lo, before, committed in policy.log:
        assert int(committed.sum()) == 2  # the fixed count (4 tokens over 2 steps) is kept
        if step_in_block == 0:
            token, conf = _dense_choice(dream, before, lo, lo + 4)
            other = 1 + int(conf[0, 1:].argmax())  # the first token, plus the best of the others
            assert committed[0, lo] and committed[0, lo + other]


def test_fast_dllm_llada_has_no_forced_commit(llada):
    from spacache_kernels.policies import FastDLLMDual

    policy = FastDLLMDual()
    policy.reset(llada, GenerationShape(1, 4, 8, llada.device))
    state = SimpleNamespace(step_in_block=0, tokens=torch.zeros(1, 12, dtype=torch.long), block_length=4)
    assert policy.forced_commit(state) is None
    with pytest.raises(ValueError, match="dream_block_start"):
        FastDLLMDual(dream_block_start="x")


# -- items 8-12: d2Cache ------------------------------------------------------------------------


def fft_density(decoded: torch.Tensor, sigma: float) -> torch.Tensor:
    """The reference's FFT canvas density (d2Cache ``src/utils/common.py``), re-derived here."""
    batch, length = decoded.shape
    canvas = torch.nn.functional.pad(decoded.double(), (length, length), value=1.0)
    canvas[~decoded[:, -1], 2 * length :] = 0.0
    ext = 3 * length
    dist = torch.cat([torch.arange(ext), torch.arange(-ext, 0)]).double()
    kernel = torch.fft.fft(torch.exp(-(dist**2) / (2 * sigma**2)), n=2 * ext)
    spectrum = torch.fft.fft(torch.nn.functional.pad(canvas, (0, ext)), n=2 * ext)
    weighted = torch.fft.ifft(spectrum * kernel).real
    norm = torch.fft.ifft(torch.fft.fft(torch.ones(batch, 2 * ext, dtype=torch.float64)) * kernel).real
    return (weighted[:, length : 2 * length] / norm[:, length : 2 * length]).float()


def test_canvas_density_is_the_reference_fft_canvas():
    from spacache_kernels.policies.d2cache import canvas_density

    # One decoded token, sigma 1: canvas [1 | 1 | 1]; d = (K(1) + K(0) + K(-1)) / sum_{D=-3..2} K(D).
    k = lambda d: torch.exp(torch.tensor(-(d**2) / 2.0, dtype=torch.float64))  # noqa: E731
    want = (k(1) + k(0) + k(-1)) / sum(k(d) for d in range(-3, 3))
    assert canvas_density(torch.tensor([[True]]), 1.0).item() == pytest.approx(float(want), rel=1e-6)
    # Last token masked: the right pad is 0.
    want = (k(1) + 0 + 0) / sum(k(d) for d in range(-3, 3))
    assert canvas_density(torch.tensor([[False]]), 1.0).item() == pytest.approx(float(want), rel=1e-6)
    g = torch.Generator().manual_seed(3)
    decoded = torch.rand(3, 20, generator=g) > 0.5
    decoded[0, -1], decoded[1, -1] = True, False
    torch.testing.assert_close(canvas_density(decoded, 3.0), fft_density(decoded, 3.0), atol=1e-6, rtol=1e-5)


M = 99  # the mask id of the hand-built d2Cache states


def _d2_step(
    rules, *, before, after, conf, fresh_conf=None, k=2, shift=False, prompt_len=2, layer_probs=None,
    inflate_w=0,
):  # fmt: skip
    """Run D2Cache.end_step on a hand-built state: generated tokens ``before`` / ``after`` this step's
    commit (lists, M = masked), the cached confidence ``conf``; the step's own logits give
    ``fresh_conf`` (default: ``conf``). Returns the next step's row set (absolute positions)."""
    from spacache_kernels.policies import D2Cache, DecodeState

    gen_len = len(before)
    total = prompt_len + gen_len
    conf = torch.tensor([conf], dtype=torch.float32)
    fresh = conf if fresh_conf is None else torch.tensor([fresh_conf], dtype=torch.float32)
    policy = D2Cache(k=k, rollout_p=0.1 if layer_probs else 0.0, rules=rules, inflate_w=inflate_w)
    policy.shape = GenerationShape(1, prompt_len, gen_len, torch.device("cpu"), block_length=gen_len)
    policy.model = SimpleNamespace(config=SimpleNamespace(d_model=1), lm_head=torch.zeros(1, 1))
    policy.shift, policy.flops = shift, 0
    policy.runtime = SimpleNamespace(
        key_padding=None,
        positions=torch.arange(total)[None],
        decide=lambda target: (target, fresh[0][target - prompt_len]),
    )
    policy.conf, policy._conf_set = conf.clone(), True
    policy._ran = torch.arange(total)[None]
    policy._layer_probs = layer_probs or []
    tokens = torch.tensor([[1] * prompt_len + list(before)])
    state = dict(block_start=torch.tensor([prompt_len]), block_length=gen_len, block_index=0, step_in_block=1)
    policy.begin_step(DecodeState(step=1, tokens=tokens, mask_id=M, **state))
    tokens[0, prompt_len:] = torch.tensor(after)
    committed = torch.zeros_like(tokens, dtype=torch.bool)
    committed[0, prompt_len:] = torch.tensor(before) != torch.tensor(after)
    policy.end_step(DecodeState(step=1, tokens=tokens, mask_id=M, committed=committed, **state))
    return sorted(set(policy.next_rows[0].tolist()))


def test_d2cache_c3_window_rounds_to_the_still_masked_count():
    # 12 generated, 0 and 1 decoded, this step commits 2; k = 2 is reached at 4. The reference rounds
    # to the 10 still-masked (window 0..9), so the confident 10 and 11 are out of reach.
    before = [5, 5] + [M] * 10
    after = [5, 5, 6] + [M] * 9
    conf = [0.1] * 10 + [0.9, 0.95]
    assert _d2_step("reference", before=before, after=after, conf=conf) == [2 + 2, 2 + 3, 2 + 4]
    # Rounded to the block length (corrected) the window covers 10 and 11.
    assert _d2_step("corrected", before=before, after=after, conf=conf) == [2 + 2, 2 + 10, 2 + 11]


def test_d2cache_c1_cached_confidence_is_step_zero():
    before = [5] + [M] * 7
    after = [5, 6] + [M] * 6
    conf = [0.5] * 8
    fresh = [0.5] * 7 + [1.0]  # this step's logits make 7 the most confident
    k1 = dict(before=before, after=after, conf=conf, fresh_conf=fresh, k=1)
    assert _d2_step("reference", **k1) == [2 + 1, 2 + 2]  # step-0 confidence: density decides (2)
    assert _d2_step("corrected", **k1) == [2 + 1, 2 + 7]


def test_d2cache_c5_last_prompt_token_is_overwritten_after_the_nucleus():
    # Dream: a layer whose every query attends to the last prompt token (1) makes it the most important
    # token, so the nucleus adds it; the reference then overwrites it with generated token 0's selection.
    prompt_len, before, after = 2, [M, M, M, M], [M, 7, M, M]
    total = prompt_len + len(before)
    probs = torch.zeros(1, total, total)
    probs[0, :, prompt_len - 1] = 1.0
    layer = [(torch.arange(total)[None], probs)]
    kw = dict(before=before, after=after, conf=[0.1, 0.1, 0.1, 0.9], k=1, shift=True, layer_probs=layer)
    # chosen: generated 3 (run at position 2 + 2 = 4); committed: generated 1 (position 3).
    assert _d2_step("reference", **kw) == [3, 4]
    assert _d2_step("corrected", **kw) == [1, 3, 4]
    # When generated token 0 is chosen, position P - 1 stays selected (the nucleus then adds the next
    # most important token, position 0 on this tie).
    kw["conf"] = [0.9, 0.1, 0.1, 0.1]
    assert _d2_step("reference", **kw) == [0, 1, 3]


def test_d2cache_c6_inflate_fills_gaps_shorter_than_the_width():
    # Committed: generated 1; chosen (k = 1, most confident): generated 4. Gap between them: 2 and 3.
    before, after = [5] + [M] * 7, [5, 6] + [M] * 6
    conf = [0.1, 0.1, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    kw = dict(before=before, after=after, conf=conf, k=1, inflate_w=2)
    assert _d2_step("reference", **kw) == [2 + 1, 2 + 4]  # distance 3 > 2: not filled
    assert _d2_step("corrected", **kw) == [2 + 1, 2 + 2, 2 + 3, 2 + 4]  # a gap of 2 <= 2: filled
    kw["inflate_w"] = 3
    assert _d2_step("reference", **kw) == [2 + 1, 2 + 2, 2 + 3, 2 + 4]


def test_certainty_prior_decoding_equals_a_plain_loop(llada):
    # d2Cache's published decoding: one block, one token per step, confidence x canvas density.
    ids = prompts(1, seed=15)
    plen, glen, sigma = 6, 8, 3.0
    x = torch.cat([ids, torch.full((1, glen), llada.mask_id)], dim=1)
    for _ in range(glen):
        logits = llada.forward_dense(x)[:, plen:]
        token = logits.index_fill(-1, torch.tensor([llada.mask_id]), -float("inf")).argmax(-1)
        conf = torch.softmax(logits, -1).gather(-1, token[..., None])[..., 0]
        masked = x[:, plen:] == llada.mask_id
        score = torch.where(masked, conf * fft_density(~masked, sigma), -float("inf"))
        best = int(score.argmax())
        x[0, plen + best] = token[0, best]
    kw = dict(gen_length=glen, steps=glen, block_length=glen, policy="vanilla", backend="torch")
    got = generate(llada, ids, certainty_prior=sigma, **kw)
    assert torch.equal(got.sequences, x)
    assert not torch.equal(generate(llada, ids, **kw).sequences, x)  # the prior changes the order
    with pytest.raises(ValueError, match="certainty_prior"):
        generate(llada, ids, certainty_prior=0.0, **kw)


# -- item 13: dLLM-Cache on Dream, position P - 1 between prompt refreshes --------------------------


def dense_branches(model, ids):
    """Embeddings (B, T, d) and every layer's attention + FFN output (list of (B, T, d)), full forward."""
    from spacache_kernels.ops import reference as ref

    cfg = model.config
    batch, length = ids.shape
    positions = model.positions(None, length).expand(batch, length)
    rope = (model.rope_cos, model.rope_sin)
    hidden = emb = model.embed_tokens(ids)
    branches = []
    for layer in model.layers:
        normed = ref.rms_norm(hidden, layer.attn_norm, cfg.norm_eps)
        q = ref.gather_linear(normed, None, layer.w_q, layer.b_q, rope=rope, positions=positions)
        w_k, w_v = layer.w_kv[: cfg.kv_width], layer.w_kv[cfg.kv_width :]
        b_k = b_v = None
        if layer.b_kv is not None:
            b_k, b_v = layer.b_kv[: cfg.kv_width], layer.b_kv[cfg.kv_width :]
        k = ref.gather_linear(normed, None, w_k, b_k, rope=rope, positions=positions)
        v = ref.gather_linear(normed, None, w_v, b_v)
        shape = (batch, length, -1, cfg.head_dim)
        attn, _ = ref.sparse_attention(q.view(shape), k.view(shape), v.view(shape), None)
        o = ref.gather_linear(attn.reshape(batch, length, -1), None, layer.w_o, layer.b_o)
        g = ref.rms_norm(hidden + o, layer.ffn_norm, cfg.norm_eps)
        f = ref.gather_linear(ref.gather_swiglu(g, None, layer.w_gate, layer.w_up), None, layer.w_down)
        branches.append(o + f)
        hidden = hidden + o + f
    return emb, branches


def test_dllm_cache_dream_prompt_end_carries_fresh_layer0_and_cached_deeper_layers(dream):
    from spacache_kernels.policies import DecodeState, DLLMCache

    ids = prompts(2, seed=16)
    batch, plen, glen = 2, 6, 8
    t0 = torch.cat([ids, torch.full((batch, glen), dream.mask_id)], dim=1)
    t1 = t0.clone()
    t1[:, plen + 2], t1[:, plen + 5] = 7, 9
    policy = DLLMCache(prompt_interval=100, gen_interval=1)
    policy.reset(dream, GenerationShape(batch, plen, glen, dream.device, "torch", block_length=glen))
    runtime = DenoiseRuntime(dream, torch.ones_like(t0), plen, policy, "torch")
    tokens = t0.clone()
    for step, now in enumerate([t0, t1]):
        tokens.copy_(now)
        state = DecodeState(step, tokens, torch.tensor([plen] * batch), glen, 0, step, dream.mask_id)
        policy.begin_step(state)
        runtime.step(tokens, policy.plan(step))
        policy.end_step(state)  # the refresh step's end keeps P - 1's deeper layers
    assert policy.plan(1).region == "gen"
    token, conf = runtime.decide(torch.arange(plen, plen + glen).expand(batch, -1))
    # The reference's P - 1: embedding + layer 0 on the new tokens + layers 1.. cached at step 0.
    emb, old = dense_branches(dream, t0)
    _, new = dense_branches(dream, t1)
    state = emb[:, plen - 1] + new[0][:, plen - 1] + sum(b[:, plen - 1] for b in old[1:])
    from spacache_kernels.ops import reference as ref

    logits = ref.rms_norm(state, dream.final_norm, dream.config.norm_eps) @ dream.lm_head.T
    want = logits.index_fill(-1, torch.tensor([dream.mask_id]), -float("inf")).argmax(-1)
    want_conf = torch.softmax(logits, -1).gather(-1, want[:, None])[:, 0]
    assert torch.equal(token[:, 0], want)
    torch.testing.assert_close(conf[:, 0].float(), want_conf, atol=1e-5, rtol=1e-5)
    # The state left from step 0 (the earlier behaviour) predicts differently.
    stale = emb[:, plen - 1] + sum(b[:, plen - 1] for b in old)
    stale_logits = ref.rms_norm(stale, dream.final_norm, dream.config.norm_eps) @ dream.lm_head.T
    stale_conf = torch.softmax(stale_logits, -1).max(-1).values
    assert not torch.allclose(stale_conf, want_conf, atol=1e-4)


# -- item 7: confidence measures and Dream's schedule ---------------------------------------------


def test_confidence_measures_on_a_known_distribution():
    from spacache_kernels.models.runtime import confidence_measure

    probs = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]])
    normed, head = probs.log(), torch.eye(3)  # logits = log p, so softmax gives p back
    torch.testing.assert_close(confidence_measure(normed, head, "margin"), torch.tensor([[0.2, 0.7]]))
    want = (probs * torch.log(probs + 1e-10)).sum(-1)
    torch.testing.assert_close(confidence_measure(normed, head, "neg_entropy"), want)
    with pytest.raises(ValueError, match="measure"):
        confidence_measure(normed, head, "entropy")


def test_dream_schedule_counts():
    from spacache_kernels.generation import dream_transfer_count

    masked = torch.zeros(2, 8, dtype=torch.bool)
    masked[0, :8], masked[1, :6] = True, True  # m = 7 (batch mean)
    # t = linspace(1, 1e-3, 5) = 1, .75025, .5005, .25075, .001: int(7 * (1 - s / t)) = 1, 2, 3; last: 7
    assert [dream_transfer_count(masked, i, 4) for i in range(4)] == [1, 2, 3, 7]
    # 32 masked over 32 steps: the first step's 32 * (1 - t1 / t0) is 0.999, so Dream commits nothing
    # there and SPA-Cache's copy commits one.
    full = torch.ones(1, 32, dtype=torch.bool)
    assert dream_transfer_count(full, 0, 32) == 0
    assert dream_transfer_count(full, 0, 32, at_least_one=True) == 1


def test_dream_sampler_neg_entropy_equals_a_plain_loop(dream):
    # Dream's own sampler (alg="entropy", temperature 0) over one block, written out on full logits.
    ids = prompts(2, seed=17)
    glen, steps = 8, 4
    x = torch.cat([ids, torch.full((2, glen), dream.mask_id)], dim=1)
    times = torch.linspace(1, 1e-3, steps + 1)
    for i in range(steps):
        logits = dream.forward_dense(x)
        masked = x == dream.mask_id
        token = logits.index_fill(-1, torch.tensor([dream.mask_id]), -float("inf")).argmax(-1)
        probs = torch.softmax(logits, -1)
        conf = torch.where(masked, (probs * torch.log(probs + 1e-10)).sum(-1), -float("inf"))
        mean = masked.sum() / masked.shape[0]
        count = int(mean * (1 - times[i + 1] / times[i])) if i < steps - 1 else int(mean)
        if count > 0:
            top = conf.topk(count, dim=1).indices
            rows = torch.arange(2)[:, None].expand_as(top)
            x[rows, top] = torch.where(masked[rows, top], token[rows, top], x[rows, top])
    kw = dict(gen_length=glen, steps=steps, block_length=glen, policy="vanilla", backend="torch")
    got = generate(dream, ids, confidence="neg_entropy", schedule="dream", **kw)
    assert torch.equal(got.sequences, x)
    assert not torch.equal(generate(dream, ids, **kw).sequences, x)
    with pytest.raises(ValueError, match="schedule"):
        generate(dream, ids, schedule="cosine", **kw)
    with pytest.raises(ValueError, match="confidence"):
        generate(dream, ids, confidence="entropy", **kw)


# -- item 5: the budget curve at the published depths ---------------------------------------------


def _reference_curve(n_layers, peak_pos, freq_start, freq_peak, freq_end, max_ratio, floor):
    """SPA-Cache's ``_split_gaussian_frequency`` with ``scale = max / peak``, re-derived here."""
    import math

    scale = max_ratio / freq_peak
    peak, start, end = freq_peak * scale, freq_start * scale, freq_end * scale
    sigma_l = math.sqrt(-(peak_pos**2) / (2 * math.log(start / peak)))
    sigma_r = math.sqrt(-((1 - peak_pos) ** 2) / (2 * math.log(end / peak)))
    out = []
    for layer in range(n_layers):
        t = layer / n_layers
        sigma = sigma_l if t < peak_pos else sigma_r
        value = peak * math.exp(-((t - peak_pos) ** 2) / (2 * sigma**2))
        out.append(max(value, floor) if t < peak_pos else value)
    return out


@pytest.mark.parametrize(
    "preset, n_layers, shape",
    [
        ("llada-8b", 32, (0.75, 0.03, 0.25, 0.13)),  # LLaDA-8B-Instruct
        ("llada-1.5", 32, (0.8, 0.03, 0.25, 0.13)),
        ("dream-7b", 28, (0.5, 0.05, 0.3, 0.25)),  # Dream-v0-Instruct-7B
        ("llada-8b", 12, (0.75, 0.03, 0.25, 0.13)),  # another depth: our extension, same formula
    ],
)
def test_budget_curve_equals_the_reference_at_the_published_depths(preset, n_layers, shape):
    got = update_ratios(n_layers, max_update_ratio=0.25, min_update_ratio=2**-4, preset=preset)
    want = _reference_curve(n_layers, *shape, max_ratio=0.25, floor=2**-4)
    assert got.tolist() == pytest.approx(want, rel=1e-12, abs=1e-15)


# -- item 14: the mask token is never predicted ----------------------------------------------------


def test_mask_token_is_never_committed_even_when_it_is_the_argmax(tmp_path):
    path = write_llada_checkpoint(tmp_path, n_layers=2, max_sequence_length=64)
    model = load_model(path, dtype=torch.float32)
    ids = prompts(1, seed=18)
    x = torch.cat([ids, torch.full((1, 8), model.mask_id)], dim=1)
    # Point the mask token's head row along the masked positions' final states: the references'
    # whole-vocabulary argmax would now "commit" the mask id there.
    logits = model.forward_dense(x)  # = lm_head @ final-normed state: recover the mean state
    normed_dir = torch.linalg.lstsq(model.lm_head.float(), logits[0, 6:].mean(0)).solution
    model.lm_head[model.mask_id] = 50 * normed_dir / normed_dir.norm()
    assert (model.forward_dense(x)[0, 6:].argmax(-1) == model.mask_id).all()
    out = generate(model, ids, gen_length=8, steps=8, block_length=8, policy="vanilla", backend="torch")
    assert not (out.sequences == model.mask_id).any() and out.stats.steps == 8


@pytest.mark.parametrize("policy", ["vanilla", "fast_dllm_prefix"])
def test_early_termination_under_threshold_decoding(llada, policy):
    ids = prompts(2, seed=11)
    kw = dict(gen_length=16, steps=16, block_length=8, backend="torch")
    fixed = generate(llada, ids, policy="vanilla", **kw).sequences
    eos = int(fixed[0, 6 + 2])
    pad = llada.config.pad_token_id
    stops = torch.tensor([eos, pad])
    # threshold 1.0 commits one token per step, the best: the fixed-count run's order.
    got = generate(llada, ids, policy=policy, threshold=1.0, eos_token_id=eos, early_stop_steps=8, **kw)
    want = generate(llada, ids, policy=policy, threshold=1.0, **kw).sequences
    firsts = []
    for row in range(2):
        gen, ref = got.sequences[row, 6:], want[row, 6:]
        hit = torch.isin(ref, stops).nonzero()
        firsts.append(int(hit[0]) if len(hit) else 16)
        assert not (gen == llada.mask_id).any()
        if firsts[-1] < 8:  # the stop is decoded in block 0: identical up to it, pad after it
            assert torch.equal(gen[: firsts[-1] + 1], ref[: firsts[-1] + 1])
            assert (gen[firsts[-1] + 1 :] == pad).all()
    assert firsts[0] < 8
    # One token per step: a row whose stop lands in block 0 is done after 8 steps, others need 16.
    assert got.stats.steps == (8 if max(firsts) < 8 else 16)
