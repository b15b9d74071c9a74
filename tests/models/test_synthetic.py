"""Random-weight models at named shapes (spacache_kernels.models.synthetic)."""

from __future__ import annotations

import pytest
import torch

from spacache_kernels.models import LayerWeights, ModelConfig
from spacache_kernels.models.synthetic import INIT_STD, SHAPES, random_model, shape_config, with_layers


def _parameter_count(config: ModelConfig) -> int:
    per_layer = sum(
        torch.Size(shape).numel() for shape in LayerWeights.expected_shapes(config).values() if shape
    )
    head = 0 if config.tie_embeddings else config.vocab_size * config.d_model
    return config.n_layers * per_layer + config.vocab_size * config.d_model + head + config.d_model


def test_real_shapes_match_the_published_models():
    llada, dream = SHAPES["llada-8b"], SHAPES["dream-7b"]
    assert (llada.arch, llada.d_model, llada.n_layers, llada.n_heads, llada.n_kv_heads) == (
        "llada", 4096, 32, 32, 32,
    )  # fmt: skip
    assert (llada.ffn_dim, llada.vocab_size, llada.mask_token_id, llada.rope_theta) == (
        12288, 126464, 126336, 500000.0,
    )  # fmt: skip
    assert not llada.qkv_bias and not llada.shift_logits
    assert (dream.arch, dream.d_model, dream.n_layers, dream.n_heads, dream.n_kv_heads) == (
        "dream", 3584, 28, 28, 4,
    )  # fmt: skip
    assert (dream.ffn_dim, dream.vocab_size, dream.mask_token_id, dream.rope_theta) == (
        18944, 152064, 151666, 1e6,
    )  # fmt: skip
    assert dream.qkv_bias and dream.shift_logits and dream.head_dim == 128
    # Parameter counts of the real checkpoints: LLaDA-8B 8.02e9, Dream-7B (Qwen2.5-7B) 7.62e9.
    assert _parameter_count(llada) == pytest.approx(8.02e9, rel=0.01)
    assert _parameter_count(dream) == pytest.approx(7.62e9, rel=0.01)


@pytest.mark.parametrize(("tiny", "real"), [("llada-tiny", "llada-8b"), ("dream-tiny", "dream-7b")])
def test_tiny_shapes_keep_the_structure(tiny, real):
    small, big = SHAPES[tiny], SHAPES[real]
    assert small.arch == big.arch
    assert (small.qkv_bias, small.shift_logits, small.tie_embeddings) == (
        big.qkv_bias, big.shift_logits, big.tie_embeddings,
    )  # fmt: skip
    assert (small.n_kv_heads < small.n_heads) == (big.n_kv_heads < big.n_heads)
    assert small.ffn_dim / small.d_model == pytest.approx(big.ffn_dim / big.d_model, rel=0.02)
    assert small.rope_theta == big.rope_theta


@pytest.mark.parametrize("name", ["llada-tiny", "dream-tiny"])
def test_random_model_builds_a_usable_model(name):
    model = random_model(name, seed=3)
    cfg = SHAPES[name]
    assert model.config == cfg and model.dtype == torch.float32 and model.device.type == "cpu"
    assert model.num_parameters() == _parameter_count(cfg)
    layer = model.layers[0]
    assert (layer.b_q is not None) == cfg.qkv_bias
    assert torch.equal(layer.attn_norm, torch.ones(cfg.d_model))
    assert layer.w_gate.std().item() == pytest.approx(INIT_STD, rel=0.05)
    assert model.embed.mean().abs().item() < 1e-3
    # Independent draws, not one tensor repeated.
    assert not torch.equal(model.layers[0].w_q, model.layers[1].w_q)
    ids = torch.randint(0, cfg.vocab_size - 1, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = model.forward_dense(ids)
    assert logits.shape == (2, 12, cfg.vocab_size) and torch.isfinite(logits).all()


def test_seed_determines_the_weights():
    a = random_model("llada-tiny", seed=1)
    b = random_model("llada-tiny", seed=1)
    c = random_model("llada-tiny", seed=2)
    assert torch.equal(a.layers[2].w_kv, b.layers[2].w_kv) and torch.equal(a.lm_head, b.lm_head)
    assert not torch.equal(a.layers[2].w_kv, c.layers[2].w_kv)


def test_deep_bf16_model_stays_finite():
    # A 32-layer stack at the tiny width in bf16: the init scale keeps activations finite.
    model = random_model(with_layers("dream-tiny", 32), dtype=torch.bfloat16, seed=0)
    assert model.dtype == torch.bfloat16 and model.config.n_layers == 32
    ids = torch.randint(0, 4000, (1, 16), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(model.forward_dense(ids)).all()


def test_accepts_a_model_config():
    cfg = with_layers("llada-tiny", 2)
    assert random_model(cfg).config.n_layers == 2
    assert shape_config(cfg) is cfg
    assert shape_config("LLaDA_Tiny") is SHAPES["llada-tiny"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="shape: expected one of"):
        random_model("llada-70b")
    with pytest.raises(TypeError, match="shape"):
        random_model(7)
    with pytest.raises(ValueError, match="dtype"):
        random_model("llada-tiny", dtype=torch.int32)
