"""Kernel tests for the fused LM head + argmax / Gumbel-max + confidence, against the reference.

The reference is checked against full logits followed by ``torch.softmax`` and ``max`` (fp64), and
its integer hash against a plain-Python lowbias32. On the CPU the kernels run under
``TRITON_INTERPRET=1`` (tests/conftest.py) in fp32 and fp16; bf16 at real shapes runs only on a GPU
(``gpu`` marker). Tokens are compared exactly on tie-free random inputs (tokens whose top two
scores lie closer than fp32 rounding could move are reported, not silently skipped: there are none
at these sizes), confidences to fp32 rounding.
"""

from __future__ import annotations

import pytest
import torch

from spacache_kernels.kernels import confidence as kernels
from spacache_kernels.ops import reference
from tests.helpers import distinct_indices, randn

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = [pytest.param(F32, id="fp32"), pytest.param(F16, id="fp16")]
CONF_TOL = dict(atol=1e-6, rtol=1e-4)
U32 = 0xFFFFFFFF


def make_inputs(batch, length, d, vocab, dtype, device, *, seed=0, lm_scale=None):
    """hidden (B, L, d) and lm_head (V, d), scaled so that logits have a spread of a few units."""
    hidden = randn(batch, length, d, dtype=dtype, device=device, seed=seed)
    lm_head = randn(vocab, d, dtype=dtype, device=device, seed=seed + 1, scale=lm_scale or 2.0 * d**-0.5)
    return hidden, lm_head


def direct_confidence(hidden, lm_head, positions, temperature=0.0, seed=0):
    """Full fp64 logits, softmax, then the argmax of the (optionally Gumbel-perturbed) scores.

    Returns (token, confidence, top-two score gap per row).
    """
    rows = (
        hidden.double()
        if positions is None
        else torch.stack([hidden[b, positions[b]] for b in range(len(hidden))])
    )
    logits = rows.double() @ lm_head.double().T  # (B, m, V)
    probs = torch.softmax(logits, dim=-1)
    score = logits
    if temperature > 0:
        b, m, v = logits.shape
        u = reference.counter_uniform(seed, torch.arange(b * m).view(b, m, 1), torch.arange(v).view(1, 1, v))
        score = logits / temperature - torch.log(-torch.log(u.double()))
    top2 = score.topk(min(2, score.shape[-1]), dim=-1).values
    gap = top2[..., 0] - top2[..., -1] if score.shape[-1] > 1 else torch.full(score.shape[:2], float("inf"))
    token = score.argmax(-1)
    return token, torch.gather(probs, -1, token.unsqueeze(-1)).squeeze(-1), gap


def assert_tokens_match(token, expect, gap, min_gap=1e-4):
    """Exact agreement wherever the decision is not a near tie of the scores."""
    clear = gap > min_gap
    assert clear.float().mean() > 0.9, "the inputs are supposed to be tie-free"
    assert torch.equal(token[clear], expect[clear])


# (B, L, m or None for all rows, d, V)
SHAPES = [
    pytest.param(1, 1, None, 16, 257, id="B1-L1-all-d16-V257"),
    pytest.param(3, 11, 5, 100, 1000, id="B3-L11-m5-d100-V1000"),
    pytest.param(2, 24, 9, 72, 257, id="B2-L24-m9-d72-V257"),
    pytest.param(1, 20, None, 256, 1000, id="B1-L20-all-d256-V1000"),
]


@pytest.mark.parametrize("temperature", [0.0, 0.7], ids=["argmax", "t0.7"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "length", "m", "d", "vocab"), SHAPES)
def test_kernel_matches_reference(batch, length, m, d, vocab, dtype, temperature, device):
    hidden, lm_head = make_inputs(batch, length, d, vocab, dtype, device, seed=d + vocab)
    positions = None if m is None else distinct_indices(batch, length, m, seed=length, device=device).flip(1)
    token, conf = kernels.token_confidence(hidden, lm_head, positions, temperature, seed=7)
    ref_token, ref_conf = reference.token_confidence(hidden, lm_head, positions, temperature, seed=7)
    _, _, gap = direct_confidence(
        hidden.cpu(), lm_head.cpu(), None if positions is None else positions.cpu(), temperature, 7
    )
    n_rows = m if m is not None else length
    assert token.shape == (batch, n_rows) and token.dtype == torch.int64
    assert conf.shape == (batch, n_rows) and conf.dtype == torch.float32
    assert_tokens_match(token.cpu(), ref_token.cpu(), gap)
    torch.testing.assert_close(conf, ref_conf, **CONF_TOL)


@pytest.mark.parametrize("splits", [1, 2, 3, 1000], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("temperature", [0.0, 0.7], ids=["argmax", "t0.7"])
def test_vocab_splits_agree(splits, temperature, device):
    """Splitting the vocabulary (the combine kernel) changes nothing: V = 1000 in 1..4 ranges."""
    hidden, lm_head = make_inputs(2, 13, 48, 1000, F32, device, seed=21)
    positions = torch.tensor([[12, 0, 5], [3, 3, 7]], dtype=torch.int32, device=device)  # a repeat
    token, conf = kernels.token_confidence(hidden, lm_head, positions, temperature, seed=3, splits=splits)
    ref_token, ref_conf = reference.token_confidence(hidden, lm_head, positions, temperature, seed=3)
    assert torch.equal(token, ref_token)
    torch.testing.assert_close(conf, ref_conf, **CONF_TOL)
    if temperature == 0:  # a repeated position is the same row (sampling draws per (b, j) instead)
        assert torch.equal(token[1, 0], token[1, 1]) and torch.equal(conf[1, 0], conf[1, 1])


@pytest.mark.parametrize("splits", [1, 4], ids=lambda s: f"splits{s}")
def test_ties_pick_the_lowest_index(splits, device):
    """Exactly tied maxima (integer-valued inputs: every dot product is exact) inside one tile and
    across tiles/splits: the lowest vocabulary index wins, as in torch.argmax."""
    d, vocab = 32, 1000
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randint(-2, 3, (2, 4, d), generator=gen).float().to(device)
    lm_head = torch.randint(-1, 2, (vocab, d), generator=gen).float()
    lm_head[[3, 5, 900]] = 2 * hidden[0, 1].cpu().sign()  # row (0, 1): tie at 3, 5 (one tile) and 900
    lm_head[[257, 999]] = 2 * hidden[1, 2].cpu().sign()  # row (1, 2): tie across the last split
    lm_head = lm_head.to(device)
    token, conf = kernels.token_confidence(hidden, lm_head, None, 0.0, 0, splits=splits)
    ref_token, ref_conf = reference.token_confidence(hidden, lm_head)
    assert int(token[0, 1]) == 3 and int(token[1, 2]) == 257
    assert torch.equal(token, ref_token)
    torch.testing.assert_close(conf, ref_conf, **CONF_TOL)


def test_sampling_follows_the_seed(device):
    hidden, lm_head = make_inputs(2, 16, 32, 1000, F32, device, seed=4, lm_scale=0.05)  # flat logits
    tokens = {}
    for seed in (0, 1, 2**40 + 1):
        token, _ = kernels.token_confidence(hidden, lm_head, None, 0.7, seed)
        ref_token, _ = reference.token_confidence(hidden, lm_head, None, 0.7, seed)
        assert torch.equal(token, ref_token)
        tokens[seed] = token
    assert (tokens[0] != tokens[1]).float().mean() > 0.5, "a different seed must give different samples"
    # The seed is used modulo 2^32.
    assert torch.equal(tokens[1], tokens[2**40 + 1])
    greedy, _ = kernels.token_confidence(hidden, lm_head, None, 0.0, 0)
    assert (greedy != tokens[0]).float().mean() > 0.5, "temperature 0.7 on flat logits must not be greedy"


def test_per_row_seeds_key_the_noise_by_row_not_by_batch_position(device):
    """With a (B,) seed tensor, row b's sample depends on (seed[b], j) only: the same row with the
    same seed samples the same alone or at another batch position, on both backends."""
    hidden, lm_head = make_inputs(3, 8, 32, 1000, F32, device, seed=5, lm_scale=0.05)  # flat logits
    seeds = torch.tensor([11, 2**32 + 7, 11], device=device)  # rows 0 and 2 share a seed
    token, _ = kernels.token_confidence(hidden, lm_head, None, 0.8, seeds)
    ref_token, _ = reference.token_confidence(hidden, lm_head, None, 0.8, seeds)
    assert torch.equal(token, ref_token)
    for b in range(3):
        alone, _ = kernels.token_confidence(hidden[b : b + 1], lm_head, None, 0.8, seeds[b : b + 1])
        assert torch.equal(alone[0], token[b])
    flipped, _ = kernels.token_confidence(hidden.flip(0), lm_head, None, 0.8, seeds.flip(0))
    assert torch.equal(flipped.flip(0), token)
    other, _ = kernels.token_confidence(hidden, lm_head, None, 0.8, seeds + 1)
    assert (other != token).float().mean() > 0.5, "a different seed must give different samples"
    assert torch.equal(reference.token_confidence(hidden, lm_head, None, 0.8, seeds & U32)[0], ref_token)


def test_confidence_is_of_the_untempered_logits(device):
    hidden, lm_head = make_inputs(1, 6, 40, 300, F32, device, seed=8)
    token, conf = kernels.token_confidence(hidden, lm_head, None, 1.5, 9)
    probs = torch.softmax(hidden[0].double() @ lm_head.double().T, dim=-1)
    expect = probs.gather(-1, token[0].unsqueeze(-1)).squeeze(-1).float()
    torch.testing.assert_close(conf[0], expect, **CONF_TOL)


def test_strided_inputs(device):
    """hidden as a slice of a wider buffer, lm_head as the transpose of a (d, V) matrix."""
    base = randn(2, 10, 80, device=device, seed=30)
    hidden = base[:, 1:9, 10:74]
    lm_head = randn(64, 500, device=device, seed=31, scale=0.25).T
    assert not hidden.is_contiguous() and not lm_head.is_contiguous()
    positions = torch.tensor([[0, 7], [4, 2]], device=device)
    token, conf = kernels.token_confidence(hidden, lm_head, positions, 0.0, 0, splits=2)
    ref_token, ref_conf = reference.token_confidence(hidden.contiguous(), lm_head.contiguous(), positions)
    assert torch.equal(token, ref_token)
    torch.testing.assert_close(conf, ref_conf, **CONF_TOL)


def test_empty_rows(device):
    hidden, lm_head = make_inputs(2, 5, 16, 100, F32, device)
    token, conf = kernels.token_confidence(
        hidden, lm_head, torch.zeros((2, 0), dtype=torch.int64, device=device)
    )
    assert token.shape == (2, 0) and conf.shape == (2, 0) and token.dtype == torch.int64
    token, conf = kernels.token_confidence(hidden[:, :0], lm_head)
    assert token.shape == (2, 0)


def test_single_token_vocab(device):
    hidden, lm_head = make_inputs(2, 3, 16, 1, F32, device)
    token, conf = kernels.token_confidence(hidden, lm_head, None, 0.5, 1)
    assert (token == 0).all()
    torch.testing.assert_close(conf, torch.ones_like(conf))


# --------------------------------------------------------------------------------------------
# the Gumbel noise: bit-for-bit with the reference, and the reference hash with the spec
# --------------------------------------------------------------------------------------------
def lowbias32(x: int) -> int:
    x &= U32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & U32
    x ^= x >> 15
    x = (x * 0x846CA68B) & U32
    x ^= x >> 16
    return x


def test_reference_hash_matches_python_lowbias32():
    gen = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randint(0, 2**32, (300,), generator=gen), torch.tensor([0, 1, 2**31, U32])])
    got = reference.hash_u32(values)
    assert got.tolist() == [lowbias32(int(v)) for v in values]


@pytest.mark.parametrize("seed", [0, 1, 123456789, U32, -5])
def test_kernel_uniform_is_bit_exact(seed, device):
    gen = torch.Generator().manual_seed(abs(seed) % 1000)
    # The last two pairs hash to (h >> 8) = 2^24 - 1 for seed 0, where ``+ 0.5`` rounds u up to 1.0
    # in fp32 (the reference's behaviour, reproduced rather than fixed here).
    rows = torch.cat([torch.randint(0, 2**32, (2000,), generator=gen), torch.tensor([0, U32, 2**31, 84, 86])])
    cols = torch.cat(
        [torch.randint(0, 2**20, (2000,), generator=gen), torch.tensor([0, 0, 126463, 5285, 109246])]
    )
    got = kernels.counter_uniform(seed, rows.to(device), cols.to(device)).cpu()
    expect = reference.counter_uniform(seed, rows, cols)
    assert torch.equal(got.view(torch.int32), expect.view(torch.int32))
    assert ((got > 0) & (got <= 1)).all()


# --------------------------------------------------------------------------------------------
# the reference against a direct computation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.0, 0.7], ids=["argmax", "t0.7"])
@pytest.mark.parametrize(
    ("batch", "length", "m", "d", "vocab"),
    [(1, 1, None, 16, 257), (3, 11, 5, 100, 1000)],
    ids=["B1-V257", "B3-V1000"],
)
def test_reference_matches_full_softmax(batch, length, m, d, vocab, temperature):
    hidden, lm_head = make_inputs(batch, length, d, vocab, F32, "cpu", seed=d)
    positions = None if m is None else distinct_indices(batch, length, m, seed=1)
    token, conf = reference.token_confidence(hidden, lm_head, positions, temperature, 11)
    expect_token, expect_conf, gap = direct_confidence(hidden, lm_head, positions, temperature, 11)
    assert_tokens_match(token, expect_token, gap)
    torch.testing.assert_close(conf, expect_conf.float(), atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# real shapes (GPU only)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llada_lm_head():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return (torch.randn(126464, 4096, device="cuda") * (2.0 / 64)).to(BF16)


@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [0.0, 0.7], ids=["argmax", "t0.7"])
@pytest.mark.parametrize(("batch", "m"), [(1, 8), (1, 32), (16, 8), (16, 32)], ids=lambda v: str(v))
def test_real_shapes_bf16(batch, m, temperature, llada_lm_head, device):
    length, d = 256, 4096
    hidden = randn(batch, length, d, dtype=BF16, device=device, seed=batch * m)
    positions = distinct_indices(batch, length, m, seed=m, device=device)
    token, conf = kernels.token_confidence(hidden, llada_lm_head, positions, temperature, 5)
    ref_token, ref_conf = reference.token_confidence(hidden, llada_lm_head, positions, temperature, 5)
    # Gaps from the fp32 reference's own logits: bf16 products are exact in fp32 on both sides, so
    # only the summation order differs.
    rows = reference.gather_rows(hidden, positions).float()
    score = rows @ llada_lm_head.float().T
    if temperature > 0:
        u = reference.counter_uniform(
            5, torch.arange(batch * m, device=device).view(batch, m, 1), torch.arange(126464, device=device)
        )
        score = score / temperature - torch.log(-torch.log(u))
    top2 = score.topk(2, dim=-1).values
    assert_tokens_match(token, ref_token, top2[..., 0] - top2[..., 1], min_gap=1e-2)
    torch.testing.assert_close(conf, ref_conf, atol=1e-4, rtol=1e-2)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_suppressed_token_is_never_chosen_but_stays_in_the_softmax(backend, temperature):
    from spacache_kernels.ops.confidence import token_confidence as op

    hidden = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    lm_head = torch.randn(97, 32, generator=torch.Generator().manual_seed(4))
    free_tok, _ = op(hidden, lm_head, temperature=temperature, seed=9, backend=backend)
    banned = int(free_tok[0, 0])
    tok, conf = op(hidden, lm_head, temperature=temperature, seed=9, suppress_token=banned, backend=backend)
    assert not (tok == banned).any()
    logits = hidden @ lm_head.T
    probs = torch.softmax(logits, -1).gather(-1, tok[..., None])[..., 0]
    torch.testing.assert_close(conf, probs, atol=1e-5, rtol=1e-4)
    want_tok, want_conf = reference.token_confidence(hidden, lm_head, None, temperature, 9, banned)
    assert torch.equal(tok, want_tok)
    with pytest.raises(ValueError, match="suppress_token"):
        op(hidden, lm_head, suppress_token=97, backend=backend)
