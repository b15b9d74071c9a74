"""DiffusionLM.forward_dense against independent implementations.

* LLaDA: a plain-PyTorch re-derivation written here from the state-dict names (own RMSNorm, rotary
  embedding through complex multiplication in fp64, softmax attention), sharing no code with the package.
* Dream / Qwen2 / Llama: transformers' own Qwen2ForCausalLM / LlamaForCausalLM with the same weights, run
  bidirectionally. How (transformers 5.x): ``attn_implementation="eager"`` and a 4-D float additive
  ``attention_mask`` of shape (B, 1, T, T) (0 = attend, -inf = padded key). ``create_causal_mask`` returns
  a 4-D mask unchanged ("already prepared"), so no causal mask is ever built; each test also checks that
  the HF output really depends on a later token.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from spacache_kernels.models import load_model
from tests.models.checkpoints import (
    dream_config,
    dream_state_dict,
    llada_config,
    llada_state_dict,
    write_checkpoint,
)

transformers = pytest.importorskip("transformers")

FP32_ATOL = 1e-4


def _ids(batch: int, length: int, seed: int, high: int = 120) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (batch, length), generator=g)


# --------------------------------------------------------------------------------------------
# (a) LLaDA vs a plain-PyTorch re-derivation
# --------------------------------------------------------------------------------------------
def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rotary_complex(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate x (B, H, T, Dh) fp64 at positions 0..T-1.

    Pairs (x[j], x[j + Dh/2]) become complex numbers, multiplied by e^{i p w_j}.
    """
    dh = x.shape[-1]
    half = dh // 2
    w = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / dh)
    angle = torch.arange(x.shape[2], dtype=torch.float64)[:, None] * w[None, :]  # (T, Dh/2)
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat((z.real, z.imag), dim=-1)


def llada_reference_logits(sd: dict, config: dict, ids: torch.Tensor) -> torch.Tensor:
    """LLaDA's forward written from scratch in fp64, straight from the checkpoint names."""
    sd = {k: v.double() for k, v in sd.items()}
    eps, heads, theta = config["rms_norm_eps"], config["n_heads"], config["rope_theta"]
    b, t = ids.shape
    x = sd["model.transformer.wte.weight"][ids]
    for i in range(config["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        h = _rms(x, sd[p + "attn_norm.weight"], eps)

        def split(y):  # (B, T, H*Dh) -> (B, H, T, Dh)
            return y.view(b, t, heads, -1).transpose(1, 2)

        q = _rotary_complex(split(h @ sd[p + "q_proj.weight"].T), theta)
        k = _rotary_complex(split(h @ sd[p + "k_proj.weight"].T), theta)
        v = split(h @ sd[p + "v_proj.weight"].T)
        scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5  # no causal mask: every key
        a = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, t, -1)
        x = x + a @ sd[p + "attn_out.weight"].T
        h = _rms(x, sd[p + "ff_norm.weight"], eps)
        gate = h @ sd[p + "ff_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * (h @ sd[p + "up_proj.weight"].T)) @ sd[p + "ff_out.weight"].T
    x = _rms(x, sd["model.transformer.ln_f.weight"], eps)
    head = sd.get("model.transformer.ff_out.weight", sd["model.transformer.wte.weight"])
    return x @ head.T


@pytest.mark.parametrize("weight_tying", [False, True])
def test_llada_matches_plain_pytorch_derivation(tmp_path, weight_tying):
    config = llada_config(weight_tying=weight_tying)
    sd = llada_state_dict(config, seed=3)
    model = load_model(write_checkpoint(tmp_path, config, sd))
    ids = _ids(2, 13, seed=0)
    ours = model.forward_dense(ids)
    want = llada_reference_logits(sd, config, ids)
    assert ours.dtype == torch.float32 and ours.shape == (2, 13, config["vocab_size"])
    assert want.std() > 0.3  # the logits carry signal, so the tolerance below means something
    torch.testing.assert_close(ours, want.float(), atol=FP32_ATOL, rtol=0)


def test_llada_attention_is_bidirectional(tmp_path):
    config = llada_config()
    model = load_model(write_checkpoint(tmp_path, config, llada_state_dict(config)))
    ids = _ids(1, 9, seed=1)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 120
    assert (model.forward_dense(ids)[0, 0] - model.forward_dense(changed)[0, 0]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# (b) Dream layout vs transformers' Qwen2ForCausalLM, (c) Llama module vs LlamaForCausalLM
# --------------------------------------------------------------------------------------------
def _bidirectional_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 1/0 -> (B, 1, T, T) additive float mask: 0 for real keys, -inf for padding, no causal part."""
    blocked = attention_mask[:, None, None, :] == 0
    return (
        torch.zeros(blocked.shape, dtype=torch.float32)
        .masked_fill(blocked, float("-inf"))
        .expand(-1, 1, attention_mask.shape[1], -1)
    )


def _hf_logits(hf, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    if attention_mask is None:
        attention_mask = torch.ones_like(ids)
    positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        return hf(
            input_ids=ids, attention_mask=_bidirectional_mask(attention_mask), position_ids=positions
        ).logits


def _qwen2_from_dream(config: dict, sd: dict):
    hc = transformers.Qwen2Config(
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_key_value_heads"],
        num_hidden_layers=config["num_hidden_layers"],
        vocab_size=config["vocab_size"],
        rope_theta=config["rope_theta"],
        rms_norm_eps=config["rms_norm_eps"],
        max_position_embeddings=config["max_position_embeddings"],
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    hf = transformers.Qwen2ForCausalLM(hc).eval()
    hf.load_state_dict(sd, strict=True)
    return hf


def _shift(hf_logits: torch.Tensor) -> torch.Tensor:
    return torch.cat((hf_logits[:, :1], hf_logits[:, :-1]), dim=1)


@pytest.fixture(scope="module")
def dream_pair(tmp_path_factory):
    config = dream_config()
    sd = dream_state_dict(config, seed=5)
    path = write_checkpoint(tmp_path_factory.mktemp("dream"), config, sd)
    return load_model(path), _qwen2_from_dream(config, load_file(str(path / "model.safetensors")))


def test_dream_matches_transformers_qwen2_bidirectional(dream_pair):
    model, hf = dream_pair
    ids = _ids(2, 14, seed=2)
    hf_logits = _hf_logits(hf, ids)
    torch.testing.assert_close(model.forward_dense(ids), _shift(hf_logits), atol=FP32_ATOL, rtol=0)
    # The reference really is bidirectional: position 0 sees the last token.
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % 120
    assert (_hf_logits(hf, changed)[:, 0] - hf_logits[:, 0]).abs().max() > 1e-3


def test_dream_left_padding_matches_transformers(dream_pair):
    model, hf = dream_pair
    ids = _ids(2, 12, seed=4)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    ids[0, :5] = 121  # pad id
    ours = model.forward_dense(ids, mask)
    want = _shift(_hf_logits(hf, ids, mask))
    # Real tokens after the first real one read the previous real position, exactly as HF's shift.
    torch.testing.assert_close(ours[0, 6:], want[0, 6:], atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(ours[1], want[1], atol=FP32_ATOL, rtol=0)


def test_qwen2_module_loads_like_the_dream_directory(dream_pair):
    model, hf = dream_pair
    from_module = load_model(hf)
    assert from_module.config.arch == "qwen2" and not from_module.config.shift_logits
    ids = _ids(2, 10, seed=6)
    torch.testing.assert_close(from_module.forward_dense(ids), _hf_logits(hf, ids), atol=FP32_ATOL, rtol=0)


def _random_llama(seed: int, tie: bool, **overrides):
    g = torch.Generator().manual_seed(seed)
    kwargs = dict(
        hidden_size=48,
        head_dim=16,  # q width 4 * 16 = 64 != hidden 48: catches any d_model / q-width mix-up
        intermediate_size=80,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=96,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=128,
        attention_bias=True,
        tie_word_embeddings=tie,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        attn_implementation="eager",
    )
    kwargs.update(overrides)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            noise = torch.randn(param.shape, generator=g)
            param.copy_(1 + 0.1 * noise if "norm" in name else (0.5 if "embed" in name else 0.08) * noise)
    return hf


@pytest.mark.parametrize("tie", [True, False])
def test_llama_module_matches_transformers_bidirectional(tie):
    hf = _random_llama(seed=7, tie=tie)
    model = load_model(hf)
    cfg = model.config
    assert (cfg.arch, cfg.head_dim, cfg.qkv_bias, cfg.o_bias, cfg.tie_embeddings) == (
        "llama",
        16,
        True,
        True,
        tie,
    )
    ids = _ids(2, 40, seed=8, high=96)  # positions past original_max_position_embeddings
    hf_logits = _hf_logits(hf, ids)
    torch.testing.assert_close(model.forward_dense(ids), hf_logits, atol=FP32_ATOL, rtol=0)
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % 96
    assert (_hf_logits(hf, changed)[:, 0] - hf_logits[:, 0]).abs().max() > 1e-3
    # Unconverted tensors share the module's storage; the fused K/V is new.
    assert model.layers[0].w_q.data_ptr() == hf.model.layers[0].self_attn.q_proj.weight.data_ptr()
    assert torch.equal(model.layers[1].w_v, hf.model.layers[1].self_attn.v_proj.weight)
    assert (model.lm_head is model.embed) == tie


def test_bare_llama_model_needs_tied_head():
    tied = _random_llama(seed=9, tie=True)
    model = load_model(tied.model)  # LlamaModel: names without the "model." prefix, no lm_head
    ids = _ids(1, 8, seed=10, high=96)
    torch.testing.assert_close(model.forward_dense(ids), _hf_logits(tied, ids), atol=FP32_ATOL, rtol=0)
    untied = _random_llama(seed=9, tie=False)
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_model(untied.model)


# --------------------------------------------------------------------------------------------
# (d) left padding, (g) low precision
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_left_padded_row_matches_the_row_alone(tmp_path, arch):
    if arch == "llada":
        config = llada_config()
        sd = llada_state_dict(config, seed=11)
    else:
        config = dream_config()
        sd = dream_state_dict(config, seed=11)
    model = load_model(write_checkpoint(tmp_path, config, sd))
    pad = 4
    short = _ids(1, 9, seed=12)
    other = _ids(1, 9 + pad, seed=13)
    batch = torch.cat((torch.cat((torch.full((1, pad), 124), short), dim=1), other))
    mask = torch.ones_like(batch)
    mask[0, :pad] = 0
    padded = model.forward_dense(batch, mask)
    torch.testing.assert_close(padded[0, pad:], model.forward_dense(short)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(padded[1], model.forward_dense(other)[0], atol=1e-5, rtol=0)
    assert torch.equal(model.positions(mask)[0], torch.tensor([0] * (pad + 1) + list(range(1, 9))))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_to_low_precision_runs_close_to_fp32(tmp_path, dtype):
    config = dream_config()
    model = load_model(write_checkpoint(tmp_path, config, dream_state_dict(config, seed=14)))
    low = model.to(dtype=dtype)
    assert low.dtype == dtype and model.dtype == torch.float32
    assert low.rope_cos.dtype == torch.float32
    assert all(t.dtype == dtype for _, t in low._named_tensors())
    ids = _ids(2, 12, seed=15)
    got = low.forward_dense(ids)
    want = model.forward_dense(ids)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    tol = 0.05 if dtype == torch.float16 else 0.25
    assert (got - want).abs().max() < tol
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
