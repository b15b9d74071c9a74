"""Config parsing, checkpoint loading (single file, sharded, HF modules), errors, RoPE tables, helpers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from spacache_kernels.models import DiffusionLM, LayerWeights, ModelConfig, load_model, rope_tables
from tests.models.checkpoints import (
    DREAM_SHAPE,
    LLADA_SHAPE,
    dream_config,
    dream_state_dict,
    llada_config,
    llada_state_dict,
    write_checkpoint,
    write_dream_checkpoint,
    write_llada_checkpoint,
)


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 120, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------
LLADA_8B = {
    "activation_type": "silu",
    "alibi": False,
    "architectures": ["LLaDAModelLM"],
    "block_type": "llama",
    "d_model": 4096,
    "embedding_size": 126464,
    "eos_token_id": 126081,
    "include_bias": False,
    "include_qkv_bias": False,
    "layer_norm_type": "rms",
    "mask_token_id": 126336,
    "max_sequence_length": 4096,
    "mlp_hidden_size": 12288,
    "mlp_ratio": 4,
    "n_heads": 32,
    "n_kv_heads": 32,
    "n_layers": 32,
    "pad_token_id": 126081,
    "rms_norm_eps": 1e-05,
    "rope": True,
    "rope_theta": 500000.0,
    "scale_logits": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 126464,
    "weight_tying": False,
}
DREAM_7B = {
    "architectures": ["DreamModel"],
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "mask_token_id": 151666,
    "max_position_embeddings": 131072,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "pad_token_id": 151643,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_sliding_window": False,
    "vocab_size": 152064,
}


def test_config_llada_8b_fields():
    cfg = ModelConfig.from_dict(LLADA_8B)
    assert (cfg.arch, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (
        "llada", 4096, 32, 32, 32, 128,
    )  # fmt: skip
    assert (cfg.ffn_dim, cfg.vocab_size, cfg.mask_token_id, cfg.max_positions) == (
        12288,
        126464,
        126336,
        4096,
    )
    assert (cfg.rope_theta, cfg.norm_eps, cfg.eos_token_id, cfg.pad_token_id) == (
        500000.0,
        1e-5,
        126081,
        126081,
    )
    assert not (cfg.qkv_bias or cfg.o_bias or cfg.tie_embeddings or cfg.shift_logits)


def test_config_llada_defaults_and_alternatives():
    base = {
        k: v for k, v in LLADA_8B.items() if k not in ("mlp_hidden_size", "mask_token_id", "embedding_size")
    }
    cfg = ModelConfig.from_dict(
        {**base, "vocab_size": 126400, "include_qkv_bias": True, "weight_tying": True}
    )
    assert cfg.ffn_dim == 4 * 4096  # mlp_ratio * d_model when mlp_hidden_size is absent
    assert cfg.mask_token_id == 126336 and cfg.vocab_size == 126400
    assert cfg.qkv_bias and cfg.tie_embeddings
    # embedding_size (padded rows) wins over vocab_size
    assert ModelConfig.from_dict({**LLADA_8B, "vocab_size": 126400}).vocab_size == 126464


def test_config_dream_7b_fields():
    cfg = ModelConfig.from_dict(DREAM_7B)
    assert (cfg.arch, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim) == (
        "dream", 3584, 28, 4, 128, 18944,
    )  # fmt: skip
    assert (cfg.vocab_size, cfg.mask_token_id, cfg.max_positions, cfg.rope_theta) == (
        152064,
        151666,
        131072,
        1e6,
    )
    assert cfg.qkv_bias and not cfg.o_bias and cfg.shift_logits and not cfg.tie_embeddings
    no_mask = {k: v for k, v in DREAM_7B.items() if k != "mask_token_id"}
    assert ModelConfig.from_dict(no_mask).mask_token_id == 151666


def test_config_plain_llama_and_qwen2():
    llama = {**DREAM_7B, "architectures": ["LlamaForCausalLM"], "attention_bias": False}
    del llama["mask_token_id"]
    cfg = ModelConfig.from_dict(llama)
    assert cfg.arch == "llama" and cfg.mask_token_id is None and not cfg.qkv_bias and not cfg.shift_logits
    qwen = {**DREAM_7B, "architectures": ["Qwen2ForCausalLM"]}
    cfg = ModelConfig.from_dict(qwen)
    assert cfg.arch == "qwen2" and cfg.qkv_bias and not cfg.shift_logits and cfg.mask_token_id == 151666
    # transformers 5.x keeps rope_theta under rope_parameters
    moved = {k: v for k, v in qwen.items() if k != "rope_theta"}
    moved["rope_parameters"] = {"rope_type": "default", "rope_theta": 1234.0}
    assert ModelConfig.from_dict(moved).rope_theta == 1234.0


def test_config_is_hashable_and_frozen():
    cfg = ModelConfig.from_dict(DREAM_7B)
    assert hash(cfg) == hash(ModelConfig.from_dict(dict(DREAM_7B)))
    with pytest.raises(AttributeError):
        cfg.d_model = 1


def test_config_unknown_architecture():
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*LLaDAModelLM"):
        ModelConfig.from_dict({**DREAM_7B, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="'gpt2'"):
        ModelConfig.from_dict({"model_type": "gpt2", "hidden_size": 8})


@pytest.mark.parametrize(
    "base, field",
    [(LLADA_8B, "d_model"), (LLADA_8B, "n_layers"), (LLADA_8B, "rope_theta"), (DREAM_7B, "hidden_size"),
     (DREAM_7B, "num_attention_heads"), (DREAM_7B, "intermediate_size")],
)  # fmt: skip
def test_config_missing_field_is_named(base, field):
    broken = {k: v for k, v in base.items() if k != field}
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_dict(broken)


@pytest.mark.parametrize(
    "base, field, value",
    [(LLADA_8B, "alibi", True), (LLADA_8B, "include_bias", True), (LLADA_8B, "block_type", "sequential"),
     (LLADA_8B, "attention_layer_norm", True), (DREAM_7B, "use_sliding_window", True),
     (DREAM_7B, "hidden_act", "gelu"), (DREAM_7B, "rope_scaling", {"rope_type": "yarn", "factor": 4.0})],
)  # fmt: skip
def test_config_unsupported_features_are_rejected(base, field, value):
    with pytest.raises(ValueError, match=field if field != "rope_scaling" else "yarn"):
        ModelConfig.from_dict({**base, field: value})


def test_config_rejects_inconsistent_heads():
    with pytest.raises(ValueError, match="n_heads"):
        ModelConfig.from_dict({**DREAM_7B, "num_key_value_heads": 5})


# --------------------------------------------------------------------------------------------
# RoPE tables
# --------------------------------------------------------------------------------------------
def test_rope_tables_formula_and_halves():
    cos, sin = rope_tables(8, 50, 10000.0, "cpu")
    assert cos.shape == sin.shape == (50, 8) and cos.dtype == sin.dtype == torch.float32
    assert torch.equal(cos[:, :4], cos[:, 4:]) and torch.equal(sin[:, :4], sin[:, 4:])
    angle = torch.arange(50, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, 8, 2) / 8)
    torch.testing.assert_close(cos[:, :4].double(), angle.cos(), atol=1e-5, rtol=0)
    torch.testing.assert_close(sin[:, :4].double(), angle.sin(), atol=1e-5, rtol=0)


def test_rope_llama3_scaling_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }  # fmt: skip
    hc = transformers.LlamaConfig(
        hidden_size=256,
        num_attention_heads=4,
        rope_theta=500000.0,
        max_position_embeddings=512,
        rope_scaling=scaling,
    )
    inv_freq, factor = ROPE_INIT_FUNCTIONS["llama3"](hc, "cpu")
    assert factor == 1.0
    cos, sin = rope_tables(64, 512, 500000.0, "cpu", scaling=scaling)
    angle = torch.arange(512, dtype=torch.float32)[:, None] * inv_freq[None, :]
    torch.testing.assert_close(cos[:, :32], angle.cos(), atol=1e-6, rtol=0)
    unscaled, _ = rope_tables(64, 512, 500000.0, "cpu")
    assert (cos - unscaled).abs().max() > 1e-2  # the scaling changed something at long wavelengths


def test_rope_rejects_other_scalings_and_odd_dims():
    with pytest.raises(ValueError, match="dynamic"):
        rope_tables(8, 16, 10000.0, "cpu", scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="head_dim"):
        rope_tables(7, 16, 10000.0, "cpu")


# --------------------------------------------------------------------------------------------
# loading from directories
# --------------------------------------------------------------------------------------------
def test_llada_weights_land_in_the_kernel_layout(tmp_path):
    config = llada_config(include_qkv_bias=True)
    sd = llada_state_dict(config, seed=2)
    model = load_model(write_checkpoint(tmp_path, config, sd))
    p = "model.transformer.blocks.1."
    layer = model.layers[1]
    assert isinstance(layer, LayerWeights) and len(model.layers) == 2
    assert torch.equal(layer.w_kv, torch.cat((sd[p + "k_proj.weight"], sd[p + "v_proj.weight"])))
    assert torch.equal(layer.w_v, sd[p + "v_proj.weight"]) and torch.equal(layer.w_k, sd[p + "k_proj.weight"])
    assert torch.equal(layer.b_kv, torch.cat((sd[p + "k_proj.bias"], sd[p + "v_proj.bias"])))
    assert torch.equal(layer.b_q, sd[p + "q_proj.bias"]) and layer.b_o is None
    assert torch.equal(layer.w_gate, sd[p + "ff_proj.weight"]) and torch.equal(
        layer.w_up, sd[p + "up_proj.weight"]
    )
    assert torch.equal(layer.w_down, sd[p + "ff_out.weight"]) and torch.equal(
        layer.w_o, sd[p + "attn_out.weight"]
    )
    assert torch.equal(model.lm_head, sd["model.transformer.ff_out.weight"])
    assert torch.equal(model.final_norm, sd["model.transformer.ln_f.weight"])
    assert model.mask_id == LLADA_SHAPE["mask_id"] and model.device == torch.device("cpu")
    assert model.rope_cos.shape == (config["max_sequence_length"], 16)


@pytest.mark.parametrize("writer", [write_llada_checkpoint, write_dream_checkpoint])
def test_sharded_equals_single_file(tmp_path, writer):
    single = load_model(writer(tmp_path / "single"))
    sharded_dir = writer(tmp_path / "sharded", sharded=True)
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    sharded = load_model(sharded_dir)
    for (name, a), (_, b) in zip(single._named_tensors(), sharded._named_tensors()):
        assert torch.equal(a, b), name
    ids = _ids(2, 11, seed=0)
    assert torch.equal(single.forward_dense(ids), sharded.forward_dense(ids))


def test_weight_tying_shares_the_embedding(tmp_path):
    model = load_model(write_llada_checkpoint(tmp_path, weight_tying=True))
    assert model.lm_head is model.embed
    half = model.to(dtype=torch.float16)
    assert half.lm_head is half.embed
    untied = load_model(write_llada_checkpoint(tmp_path / "untied"))
    assert untied.num_parameters() == model.num_parameters() + LLADA_SHAPE["vocab"] * LLADA_SHAPE["d_model"]


def test_tied_checkpoint_may_also_store_the_head(tmp_path):
    config = dream_config(tie_word_embeddings=True)
    sd = dream_state_dict(config)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    model = load_model(write_checkpoint(tmp_path, config, sd))
    assert model.lm_head is model.embed


def test_dtype_defaults(tmp_path):
    as_bf16 = load_model(write_dream_checkpoint(tmp_path / "a", torch_dtype="bfloat16"))
    assert as_bf16.dtype == torch.bfloat16 and as_bf16.layers[0].b_kv.dtype == torch.bfloat16
    from_tensors = load_model(write_dream_checkpoint(tmp_path / "b", dtype=torch.float16, torch_dtype=None))
    assert from_tensors.dtype == torch.float16
    explicit = load_model(tmp_path / "b", dtype=torch.float32)
    assert explicit.dtype == torch.float32 and explicit.rope_sin.dtype == torch.float32
    assert load_model(str(tmp_path / "b"), dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        load_model(tmp_path / "b", dtype=torch.int8)


def test_num_parameters_counts_every_checkpoint_tensor(tmp_path):
    path = write_dream_checkpoint(tmp_path)
    total = sum(t.numel() for t in load_file(str(path / "model.safetensors")).values())
    assert load_model(path).num_parameters() == total


def test_flops_per_token_formula(tmp_path):
    model = load_model(write_dream_checkpoint(tmp_path))
    s = DREAM_SHAPE
    d, f, v, dh = s["d_model"], s["mlp"], s["vocab"], s["d_model"] // s["n_heads"]
    q, kv = s["n_heads"] * dh, s["n_kv_heads"] * dh
    t = 100
    proj = 2 * d * (q + 2 * kv) + 2 * q * d
    per_layer = proj + 2 * 2 * t * q + 3 * 2 * d * f
    assert model.flops_per_token(t) == s["n_layers"] * per_layer + 2 * d * v
    assert model.flops_per_token(t + 1) - model.flops_per_token(t) == s["n_layers"] * 4 * q


# --------------------------------------------------------------------------------------------
# (f) errors
# --------------------------------------------------------------------------------------------
def test_missing_tensor_is_named_with_the_checkpoint(tmp_path):
    config = llada_config()
    sd = llada_state_dict(config)
    del sd["model.transformer.blocks.1.up_proj.weight"]
    path = write_checkpoint(tmp_path / "ckpt", config, sd)
    with pytest.raises(ValueError, match=r"blocks\.1\.up_proj\.weight") as info:
        load_model(path)
    assert str(path) in str(info.value)


def test_missing_lm_head_when_untied(tmp_path):
    config = dream_config()
    sd = dream_state_dict(config)
    del sd["lm_head.weight"]
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_model(write_checkpoint(tmp_path, config, sd, sharded=True))


def test_missing_bias_for_dream(tmp_path):
    config = dream_config()
    sd = dream_state_dict(config)
    del sd["model.layers.0.self_attn.k_proj.bias"]
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.k_proj\.bias"):
        load_model(write_checkpoint(tmp_path, config, sd))


def test_wrong_shape_is_named(tmp_path):
    config = dream_config()
    sd = dream_state_dict(config)
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(DREAM_SHAPE["mlp"] + 1, DREAM_SHAPE["d_model"])
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj\.weight.*\(97, 64\)"):
        load_model(write_checkpoint(tmp_path, config, sd))


def test_unexpected_tensor_is_rejected(tmp_path):
    config = llada_config()  # include_qkv_bias False, yet the checkpoint carries a bias
    sd = llada_state_dict(config)
    sd["model.transformer.blocks.0.q_proj.bias"] = torch.zeros(LLADA_SHAPE["d_model"])
    with pytest.raises(ValueError, match=r"unexpected tensors.*q_proj\.bias"):
        load_model(write_checkpoint(tmp_path, config, sd))


def test_rotary_buffers_are_ignored(tmp_path):
    config = dream_config()
    sd = dream_state_dict(config)
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    load_model(write_checkpoint(tmp_path, config, sd))


def test_unknown_architecture_in_checkpoint(tmp_path):
    path = write_dream_checkpoint(tmp_path, architectures=["MistralForCausalLM"])
    with pytest.raises(ValueError, match=r"MistralForCausalLM.*supported"):
        load_model(path)


def test_missing_config_field_in_checkpoint(tmp_path):
    path = write_llada_checkpoint(tmp_path)
    config = json.loads((path / "config.json").read_text())
    del config["n_heads"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="n_heads"):
        load_model(path)


def test_directory_without_weights_or_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dream_config()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(tmp_path)


def test_missing_shard_file(tmp_path):
    path = write_dream_checkpoint(tmp_path, sharded=True)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        load_model(path)


def test_index_lists_tensor_its_shard_lacks(tmp_path):
    path = write_dream_checkpoint(tmp_path, sharded=True)
    shard = path / "model-00001-of-00002.safetensors"
    tensors = load_file(str(shard))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(shard))
    with pytest.raises(ValueError, match=dropped.replace(".", r"\.")):
        load_model(path)


def test_not_a_module():
    with pytest.raises(TypeError, match="state_dict"):
        load_model(object())


# --------------------------------------------------------------------------------------------
# DiffusionLM construction and inputs
# --------------------------------------------------------------------------------------------
def test_constructor_and_inputs_are_validated(tmp_path):
    model = load_model(write_llada_checkpoint(tmp_path))
    layers = list(model.layers)
    layers[0] = LayerWeights(**{**layers[0].tensors(), "w_up": layers[0].w_up[:-1]})
    with pytest.raises(ValueError, match=r"layers\.0\.w_up"):
        DiffusionLM(model.config, model.embed, layers, model.final_norm, model.lm_head)
    with pytest.raises(ValueError, match="max positions"):
        model.forward_dense(torch.zeros(1, model.config.max_positions + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        model.forward_dense(torch.full((1, 4), LLADA_SHAPE["vocab"]))
    with pytest.raises(ValueError, match="attention_mask"):
        model.forward_dense(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 5))
    with pytest.raises(TypeError, match="input_ids"):
        model.forward_dense(torch.zeros(2, 4))


def test_to_returns_an_independent_copy(tmp_path):
    model = load_model(write_llada_checkpoint(tmp_path))
    copy = model.to()
    assert copy is not model and torch.equal(copy.layers[0].w_kv, model.layers[0].w_kv)
    copy.layers[0].w_kv.zero_()
    assert model.layers[0].w_kv.abs().sum() > 0
    assert math.isclose(copy.rope_cos[5, 0].item(), model.rope_cos[5, 0].item())
