"""Op-level tests for sparse_attention and token_confidence: every validation rule, and both backends.

Each rejected input must raise ``TypeError``/``ValueError`` naming the offending argument. The
accepted paths run through the op on both backends (Triton under ``TRITON_INTERPRET=1`` on the
CPU) and must agree with each other and with the reference.
"""

from __future__ import annotations

import pytest
import torch

from spacache_kernels.ops import reference
from spacache_kernels.ops.attention import sparse_attention
from spacache_kernels.ops.confidence import token_confidence
from tests.helpers import randn, tolerances

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


# --------------------------------------------------------------------------------------------
# sparse_attention
# --------------------------------------------------------------------------------------------
def attn_inputs(batch=2, n_queries=5, q_heads=4, kv_heads=2, head_dim=16, length=12, dtype=F32, device="cpu"):
    q = randn(batch, n_queries, q_heads, head_dim, dtype=dtype, device=device, seed=1)
    k = randn(batch, length, kv_heads, head_dim, dtype=dtype, device=device, seed=2)
    v = randn(batch, length, kv_heads, head_dim, dtype=dtype, device=device, seed=3)
    key_padding = torch.zeros(batch, length, dtype=torch.bool, device=device)
    key_padding[0, :3] = True
    rows = torch.tensor([[0, 4], [2, 2]], device=device)
    return q, k, v, key_padding, rows


def _attn_case(**changes):
    q, k, v, key_padding, rows = attn_inputs()
    args = dict(q=q, k_cache=k, v_cache=v, key_padding=key_padding, prob_rows=rows)
    args.update(changes)
    return args


ATTN_BAD = [
    pytest.param(dict(q=[[1.0]]), TypeError, "q", id="q-not-tensor"),
    pytest.param(dict(q=torch.zeros(2, 5, 64)), ValueError, "q", id="q-rank"),
    pytest.param(dict(q=torch.zeros(2, 5, 4, 16, dtype=torch.int32)), TypeError, "q", id="q-int"),
    pytest.param(dict(q=torch.zeros(2, 5, 0, 16)), ValueError, "q", id="q-no-heads"),
    pytest.param(dict(q=torch.zeros(2, 5, 4, 0)), ValueError, "q", id="q-empty-head-dim"),
    pytest.param(dict(k_cache=torch.zeros(2, 12, 32)), ValueError, "k_cache", id="k-rank"),
    pytest.param(
        dict(k_cache=torch.zeros(2, 12, 2, 16, dtype=torch.int64)), TypeError, "k_cache", id="k-int"
    ),
    pytest.param(dict(k_cache=torch.zeros(3, 12, 2, 16)), ValueError, "k_cache", id="k-batch"),
    pytest.param(dict(k_cache=torch.zeros(2, 12, 2, 32)), ValueError, "k_cache", id="k-head-dim"),
    pytest.param(dict(k_cache=torch.zeros(2, 12, 3, 16)), ValueError, "k_cache", id="k-heads-not-divisor"),
    pytest.param(dict(k_cache=torch.zeros(2, 12, 0, 16)), ValueError, "k_cache", id="k-no-heads"),
    pytest.param(
        dict(k_cache=torch.zeros(2, 12, 2, 16, dtype=F16)), TypeError, "k_cache", id="k-dtype-mismatch"
    ),
    pytest.param(dict(v_cache=torch.zeros(2, 11, 2, 16)), ValueError, "v_cache", id="v-length"),
    pytest.param(dict(v_cache=torch.zeros(2, 12, 1, 16)), ValueError, "v_cache", id="v-heads"),
    pytest.param(
        dict(v_cache=torch.zeros(2, 12, 2, 16, dtype=BF16)), TypeError, "v_cache", id="v-dtype-mismatch"
    ),
    pytest.param(dict(v_cache="v"), TypeError, "v_cache", id="v-not-tensor"),
    pytest.param(
        dict(key_padding=torch.zeros(2, 12, dtype=torch.uint8)), TypeError, "key_padding", id="pad-dtype"
    ),
    pytest.param(
        dict(key_padding=torch.zeros(2, 11, dtype=torch.bool)), ValueError, "key_padding", id="pad-length"
    ),
    pytest.param(
        dict(key_padding=torch.zeros(1, 12, dtype=torch.bool)), ValueError, "key_padding", id="pad-batch"
    ),
    pytest.param(
        dict(key_padding=torch.zeros(2, 12, 1, dtype=torch.bool)), ValueError, "key_padding", id="pad-rank"
    ),
    pytest.param(dict(scale="0.1"), TypeError, "scale", id="scale-str"),
    pytest.param(dict(scale=True), TypeError, "scale", id="scale-bool"),
    pytest.param(dict(scale=float("nan")), ValueError, "scale", id="scale-nan"),
    pytest.param(dict(scale=float("inf")), ValueError, "scale", id="scale-inf"),
    pytest.param(dict(prob_rows=torch.tensor([[0.0], [1.0]])), TypeError, "prob_rows", id="rows-float"),
    pytest.param(dict(prob_rows=torch.tensor([0, 1])), ValueError, "prob_rows", id="rows-rank"),
    pytest.param(dict(prob_rows=torch.tensor([[0, 1]])), ValueError, "prob_rows", id="rows-batch"),
    pytest.param(dict(prob_rows=torch.tensor([[0, 5], [1, 1]])), ValueError, "prob_rows", id="rows-too-high"),
    pytest.param(
        dict(prob_rows=torch.tensor([[0, -1], [1, 1]])), ValueError, "prob_rows", id="rows-negative"
    ),
    pytest.param(dict(backend="cuda"), ValueError, "backend", id="backend-unknown"),
]


@pytest.mark.parametrize(("changes", "error", "name"), ATTN_BAD)
def test_sparse_attention_rejects(changes, error, name):
    args = _attn_case(**changes)
    with pytest.raises(error, match=rf"^{name}:"):
        sparse_attention(
            args["q"],
            args["k_cache"],
            args["v_cache"],
            args["key_padding"],
            scale=args.get("scale"),
            prob_rows=args["prob_rows"],
            backend=args.get("backend"),
        )


@pytest.mark.parametrize("name", ["k_cache", "v_cache", "key_padding", "prob_rows"])
def test_sparse_attention_rejects_other_device(name):
    args = _attn_case()
    args[name] = args[name].to("meta")
    with pytest.raises(ValueError, match=rf"^{name}:"):
        sparse_attention(
            args["q"], args["k_cache"], args["v_cache"], args["key_padding"], prob_rows=args["prob_rows"]
        )


def test_sparse_attention_triton_head_dim_limit():
    q, k, v, _, _ = attn_inputs(head_dim=272, length=3, n_queries=1)
    with pytest.raises(ValueError, match="^q:"):
        sparse_attention(q, k, v, backend="triton")
    out, _ = sparse_attention(q, k, v, backend="torch")  # the reference has no limit
    assert out.shape == q.shape


def test_sparse_attention_unchecked_rows_still_validates_shape():
    q, k, v, key_padding, _ = attn_inputs()
    with pytest.raises(ValueError, match="^prob_rows:"):
        sparse_attention(
            q, k, v, key_padding, prob_rows=torch.zeros(3, 1, dtype=torch.int64), check_indices=False
        )


@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
def test_sparse_attention_backends_agree(dtype):
    q, k, v, key_padding, rows = attn_inputs(dtype=dtype)
    results = {
        backend: sparse_attention(q, k, v, key_padding, scale=0.2, prob_rows=rows, backend=backend)
        for backend in ("torch", "triton", "auto")
    }
    expect_out, expect_probs = reference.sparse_attention(q, k, v, key_padding, 0.2, rows)
    for out, probs in results.values():
        torch.testing.assert_close(out, expect_out, **tolerances(dtype))
        torch.testing.assert_close(probs, expect_probs, atol=1e-5, rtol=1e-4)
    out, probs = sparse_attention(q, k, v, prob_rows=rows.int(), check_indices=False, backend="triton")
    torch.testing.assert_close(out, reference.sparse_attention(q, k, v)[0], **tolerances(dtype))
    assert probs.shape == (2, 2, 4, 12)


def test_sparse_attention_empty_queries_and_scale_int():
    q, k, v, _, _ = attn_inputs(n_queries=0)
    for backend in ("torch", "triton"):
        out, probs = sparse_attention(
            q, k, v, scale=1, prob_rows=torch.zeros(2, 0, dtype=torch.int64), backend=backend
        )
        assert out.shape == (2, 0, 4, 16) and probs.shape == (2, 0, 4, 12)


# --------------------------------------------------------------------------------------------
# token_confidence
# --------------------------------------------------------------------------------------------
def conf_inputs(batch=2, length=7, d=24, vocab=300, dtype=F32, device="cpu"):
    hidden = randn(batch, length, d, dtype=dtype, device=device, seed=5)
    lm_head = randn(vocab, d, dtype=dtype, device=device, seed=6, scale=0.4)
    positions = torch.tensor([[6, 0, 2], [1, 1, 5]], device=device)
    return hidden, lm_head, positions


CONF_BAD = [
    pytest.param(dict(hidden=1.0), TypeError, "hidden", id="hidden-not-tensor"),
    pytest.param(dict(hidden=torch.zeros(7, 24)), ValueError, "hidden", id="hidden-rank"),
    pytest.param(dict(hidden=torch.zeros(2, 7, 24, dtype=torch.int64)), TypeError, "hidden", id="hidden-int"),
    pytest.param(dict(lm_head=torch.zeros(300, 24, 1)), ValueError, "lm_head", id="head-rank"),
    pytest.param(dict(lm_head=torch.zeros(300, 25)), ValueError, "lm_head", id="head-width"),
    pytest.param(dict(lm_head=torch.zeros(0, 24)), ValueError, "lm_head", id="head-empty-vocab"),
    pytest.param(dict(lm_head=torch.zeros(300, 24, dtype=torch.int8)), TypeError, "lm_head", id="head-int"),
    pytest.param(dict(positions=torch.tensor([[0.0, 1.0, 2.0]] * 2)), TypeError, "positions", id="pos-float"),
    pytest.param(dict(positions=torch.tensor([0, 1])), ValueError, "positions", id="pos-rank"),
    pytest.param(dict(positions=torch.tensor([[0, 1, 2]])), ValueError, "positions", id="pos-batch"),
    pytest.param(
        dict(positions=torch.tensor([[0, 7, 2], [0, 1, 2]])), ValueError, "positions", id="pos-too-high"
    ),
    pytest.param(
        dict(positions=torch.tensor([[0, -2, 2], [0, 1, 2]])), ValueError, "positions", id="pos-negative"
    ),
    pytest.param(dict(temperature="hot"), TypeError, "temperature", id="temp-str"),
    pytest.param(dict(temperature=True), TypeError, "temperature", id="temp-bool"),
    pytest.param(dict(temperature=-0.1), ValueError, "temperature", id="temp-negative"),
    pytest.param(dict(temperature=float("nan")), ValueError, "temperature", id="temp-nan"),
    pytest.param(dict(temperature=float("inf")), ValueError, "temperature", id="temp-inf"),
    pytest.param(dict(seed=1.5), TypeError, "seed", id="seed-float"),
    pytest.param(dict(seed=False), TypeError, "seed", id="seed-bool"),
    pytest.param(dict(seed=None), TypeError, "seed", id="seed-none"),
    pytest.param(dict(backend="fast"), ValueError, "backend", id="backend-unknown"),
]


def _conf_case(**changes):
    hidden, lm_head, positions = conf_inputs()
    args = dict(hidden=hidden, lm_head=lm_head, positions=positions, temperature=0.0, seed=0, backend=None)
    args.update(changes)
    return args


@pytest.mark.parametrize(("changes", "error", "name"), CONF_BAD)
def test_token_confidence_rejects(changes, error, name):
    args = _conf_case(**changes)
    with pytest.raises(error, match=rf"^{name}:"):
        token_confidence(
            args["hidden"],
            args["lm_head"],
            args["positions"],
            temperature=args["temperature"],
            seed=args["seed"],
            backend=args["backend"],
        )


@pytest.mark.parametrize("name", ["lm_head", "positions"])
def test_token_confidence_rejects_other_device(name):
    args = _conf_case()
    args[name] = args[name].to("meta")
    with pytest.raises(ValueError, match=rf"^{name}:"):
        token_confidence(args["hidden"], args["lm_head"], args["positions"])


@pytest.mark.parametrize("temperature", [0, 0.7], ids=["argmax-int0", "t0.7"])
@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
def test_token_confidence_backends_agree(dtype, temperature):
    hidden, lm_head, positions = conf_inputs(dtype=dtype)
    expect_token, expect_conf = reference.token_confidence(hidden, lm_head, positions, float(temperature), 42)
    for backend in ("torch", "triton", "auto"):
        token, conf = token_confidence(
            hidden, lm_head, positions, temperature=temperature, seed=42, backend=backend
        )
        assert torch.equal(token, expect_token), backend
        torch.testing.assert_close(conf, expect_conf, atol=1e-6, rtol=1e-4)
    # All positions, int32 positions, unchecked indices.
    token, conf = token_confidence(hidden, lm_head, backend="triton")
    assert torch.equal(token, reference.token_confidence(hidden, lm_head)[0])
    token, _ = token_confidence(hidden, lm_head, positions.int(), check_indices=False, backend="triton")
    assert torch.equal(token, reference.token_confidence(hidden, lm_head, positions)[0])


def test_token_confidence_mixed_dtypes_and_negative_seed():
    hidden, lm_head, positions = conf_inputs()
    lm_head16 = lm_head.half()
    for backend in ("torch", "triton"):
        token, conf = token_confidence(
            hidden, lm_head16, positions, temperature=0.9, seed=-3, backend=backend
        )
        expect_token, expect_conf = reference.token_confidence(hidden, lm_head16, positions, 0.9, -3)
        assert torch.equal(token, expect_token)
        torch.testing.assert_close(conf, expect_conf, atol=1e-6, rtol=1e-4)
