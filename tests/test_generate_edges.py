"""generate() at the edges: reproducible sampling per row, the backend default, NaN, statistics."""

from __future__ import annotations

import pytest
import torch

from spacache_kernels.generation import generate
from spacache_kernels.models import load_model
from tests.helpers import left_pad
from tests.models.checkpoints import write_llada_checkpoint

GEN, BLOCK = 16, 8


@pytest.fixture(scope="module")
def llada(tmp_path_factory):
    path = write_llada_checkpoint(tmp_path_factory.mktemp("llada"), n_layers=2, max_sequence_length=64)
    return load_model(path, dtype=torch.float32)


def prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 100, (length,), generator=torch.Generator().manual_seed(seed))


SAMPLE = dict(
    gen_length=GEN, steps=GEN, block_length=BLOCK, policy="vanilla", backend="torch", temperature=2.0
)


@pytest.mark.parametrize("rule", [{}, {"threshold": 0.5}])
def test_a_row_samples_the_same_alone_and_at_any_batch_position(llada, rule):
    rows = [prompt(4, 1), prompt(6, 2), prompt(3, 3)]
    seeds = [5, 17, 5]
    alone = [
        generate(llada, r[None], seed=s, **SAMPLE, **rule).sequences[0, len(r) :] for r, s in zip(rows, seeds)
    ]
    for order in ([0, 1, 2], [2, 0, 1]):
        ids, mask = left_pad([rows[i] for i in order])
        out = generate(llada, ids, attention_mask=mask, seed=[seeds[i] for i in order], **SAMPLE, **rule)
        for pos, i in enumerate(order):
            assert torch.equal(out.sequences[pos, ids.shape[1] :], alone[i]), f"row {i} at position {pos}"
    # An int seed is every row's seed: the same as passing it per row.
    ids, mask = left_pad(rows)
    shared = generate(llada, ids, attention_mask=mask, seed=5, **SAMPLE, **rule).sequences[:, ids.shape[1] :]
    assert torch.equal(shared[0], alone[0]) and torch.equal(shared[2], alone[2])


def test_different_seeds_give_different_samples(llada):
    ids = prompt(5, 4)[None].repeat(4, 1)  # one prompt, four times ("repeats")
    same = generate(llada, ids, seed=3, **SAMPLE).sequences[:, 5:]
    assert all(torch.equal(same[0], row) for row in same)
    varied = generate(llada, ids, seed=torch.tensor([0, 1, 2, 3]), **SAMPLE).sequences[:, 5:]
    assert len({tuple(row.tolist()) for row in varied}) == 4
    greedy = dict(SAMPLE, temperature=0.0)
    assert torch.equal(
        generate(llada, ids, seed=1, **greedy).sequences, generate(llada, ids, seed=2, **greedy).sequences
    )


@pytest.mark.parametrize(
    "seed, error",
    [
        (1.5, TypeError),
        (True, TypeError),
        ([1, 2, 3], ValueError),
        (torch.zeros(2, dtype=torch.float32), ValueError),
    ],
)
def test_bad_seed(llada, seed, error):
    with pytest.raises(error, match="seed"):
        generate(llada, prompt(4, 0)[None].repeat(2, 1), seed=seed, **SAMPLE)


def forbid_triton(monkeypatch):
    """SPACACHE_BACKEND=torch, and the Triton LM-head kernel fails if anything still reaches it
    (under TRITON_INTERPRET=1 "auto" would pick it)."""
    from spacache_kernels.kernels import confidence

    def fail(*args, **kwargs):
        raise AssertionError("the Triton kernel ran although SPACACHE_BACKEND=torch")

    monkeypatch.setenv("SPACACHE_BACKEND", "torch")
    monkeypatch.setattr(confidence, "token_confidence", fail)


def test_generate_follows_spacache_backend(llada, monkeypatch):
    ids = prompt(4, 0)[None]
    kw = dict(gen_length=8, steps=8, block_length=8, policy="spa")
    want = generate(llada, ids, backend="torch", **kw).sequences
    forbid_triton(monkeypatch)
    assert torch.equal(generate(llada, ids, **kw).sequences, want)
    with pytest.raises(AssertionError, match="Triton kernel ran"):  # an explicit backend still wins
        generate(llada, ids, backend="triton", **kw)
    monkeypatch.setenv("SPACACHE_BACKEND", "cuda")
    with pytest.raises(ValueError, match="SPACACHE_BACKEND"):
        generate(llada, ids, **kw)


# --------------------------------------------------------------------------------------------
# NaN is never hidden
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("poisoned", ["q", "k", "v"])
def test_attention_nan_propagates_the_same_on_both_backends(poisoned):
    from spacache_kernels.ops import sparse_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 2, 8, generator=g) for n in (3, 5, 5))
    {"q": q, "k": k, "v": v}[poisoned][0, 1, 0, 0] = float("nan")
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1] = True  # batch row 1: every key is padding -> zeros, the only rows allowed to be zeroed
    outs = [sparse_attention(q, k, v, pad, backend=b)[0] for b in ("torch", "triton")]
    nan_rows = [o.isnan().any(-1).any(-1) for o in outs]
    assert torch.equal(nan_rows[0], nan_rows[1])
    assert bool(nan_rows[0][0].any()) and not bool(nan_rows[0][1].any())
    assert torch.equal(outs[0][1], torch.zeros_like(outs[0][1])) and torch.equal(outs[1][1], outs[0][1])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_weight_makes_generate_raise(tmp_path, backend):
    from safetensors.torch import load_file, save_file

    path = write_llada_checkpoint(tmp_path, n_layers=2, max_sequence_length=64)
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.transformer.blocks.1.q_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(path / "model.safetensors"))
    model = load_model(path, dtype=torch.float32)
    with pytest.raises(FloatingPointError, match="step 0 .*not finite"):
        generate(model, prompt(4, 0)[None], gen_length=8, steps=8, block_length=8, backend=backend)
    with pytest.raises(ValueError, match="q_proj.*non-finite"):
        load_model(path, check_finite=True)


# --------------------------------------------------------------------------------------------
# errors name the argument
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(threshold="0.9"), TypeError, "threshold: expected a number"),
        (dict(factor=True), TypeError, "factor: expected a number"),
        (dict(temperature=float("nan")), ValueError, "temperature: expected a finite"),
        (dict(eos_token_id=10_000), ValueError, "eos_token_id: expected None or a token id"),
        (dict(eos_token_id="eos"), ValueError, "eos_token_id"),
        (dict(policy=3), TypeError, "policy: expected a name"),
    ],
)
def test_generate_errors_name_the_argument(llada, kwargs, error, match):
    kw = dict(gen_length=8, steps=8, block_length=8, backend="torch")
    with pytest.raises(error, match=match):
        generate(llada, prompt(4, 0)[None], **{**kw, **kwargs})


def test_generate_rejects_a_non_model_and_load_model_a_bad_device(tmp_path):
    with pytest.raises(TypeError, match="model: expected a DiffusionLM"):
        generate(object(), prompt(4, 0)[None], gen_length=8, steps=8, block_length=8)
    path = write_llada_checkpoint(tmp_path, n_layers=1)
    with pytest.raises(ValueError, match="device: expected a torch device"):
        load_model(path, device="gpu0")


# --------------------------------------------------------------------------------------------
# memory lifetime and honest throughput
# --------------------------------------------------------------------------------------------
def _policy_names():
    from spacache_kernels.policies import POLICIES

    return sorted(POLICIES)


@pytest.mark.parametrize("name", _policy_names())
def test_a_kept_policy_instance_does_not_keep_the_model_or_caches_alive(tmp_path, name):
    import gc
    import weakref

    from spacache_kernels.policies import make_policy

    model = load_model(
        write_llada_checkpoint(tmp_path, n_layers=2, max_sequence_length=64), dtype=torch.float32
    )
    policy = make_policy(name)
    out = generate(model, prompt(4, 0)[None], gen_length=16, steps=16, block_length=16, policy=policy,
                   backend="torch")  # fmt: skip
    assert out.stats.steps == 16
    leftovers = [k for k, v in vars(policy).items() if isinstance(v, torch.Tensor) or v is model]
    assert not leftovers, leftovers
    dead = weakref.ref(model)
    del model
    gc.collect()
    assert dead() is None, "the policy instance (or something it holds) still references the model"
    # ... and it is still usable for another generation.
    other = load_model(write_llada_checkpoint(tmp_path / "b", n_layers=2, max_sequence_length=64))
    generate(
        other, prompt(4, 0)[None], gen_length=16, steps=16, block_length=16, policy=policy, backend="torch"
    )


def test_a_failed_generation_releases_the_policy_too(tmp_path):
    """A generation that fails after the policy attached its state (a NaN model: the error comes
    after the loop) still releases the model and the caches."""
    from safetensors.torch import load_file, save_file

    from spacache_kernels.policies import SpaCache

    path = write_llada_checkpoint(tmp_path, n_layers=2, max_sequence_length=64)
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.transformer.wte.weight"][:, 0] = float("nan")
    save_file(tensors, str(path / "model.safetensors"))
    model = load_model(path, dtype=torch.float32)
    policy = SpaCache()
    with pytest.raises(FloatingPointError):
        generate(
            model, prompt(4, 0)[None], gen_length=8, steps=8, block_length=8, policy=policy, backend="torch"
        )
    assert policy.budgets is not None  # it did reset (settings and small results stay readable)
    leftovers = [k for k, v in vars(policy).items() if isinstance(v, torch.Tensor) or v is model]
    assert (
        not leftovers and getattr(policy, "model", None) is None and getattr(policy, "runtime", None) is None
    )


def test_throughput_counts_tokens_up_to_the_models_eos_by_default(tmp_path):
    """The EOS id defaults to the model's config: EOS padding is not counted as generated tokens,
    and setup (policy.reset, SVD proxies) is reported apart from the loop's time."""
    kw = dict(gen_length=16, steps=16, block_length=8, policy="spa", backend="torch")
    ids = prompt(4, 0)[None].repeat(2, 1)
    base = load_model(write_llada_checkpoint(tmp_path / "a", n_layers=2, max_sequence_length=64))
    tokens = generate(base, ids, **kw).sequences[:, 4:]
    eos = int(tokens[0, 5])  # a token that occurs: make it the EOS id of an otherwise equal model
    model = load_model(
        write_llada_checkpoint(tmp_path / "b", n_layers=2, max_sequence_length=64, eos_token_id=eos)
    )
    out = generate(model, ids, **kw)
    assert torch.equal(out.sequences[:, 4:], tokens)
    first = [row.tolist().index(eos) if eos in row.tolist() else 16 for row in tokens]
    assert out.stats.generated_tokens == sum(first) < 32
    assert out.stats.tokens_per_second == pytest.approx(out.stats.generated_tokens / out.stats.seconds)
    assert out.stats.setup_seconds > 0
