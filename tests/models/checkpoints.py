"""Tiny random checkpoints in the real LLaDA and Dream on-disk layouts (config.json + safetensors).

Weights are seeded normals large enough that logits are far from uniform (linear ~0.08, embeddings
0.5, norm weights 1 +- 0.1), so a wrong transpose, a missing bias or a swapped gate/up pair moves the
logits by far more than the comparison tolerances.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

LLADA_SHAPE = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, mlp=96, vocab=128, mask_id=126)
DREAM_SHAPE = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp=96, vocab=128, mask_id=125)


def llada_config(**overrides) -> dict:
    """A config.json dict with the field names (and non-shape values) of LLaDA-8B-Instruct."""
    s = LLADA_SHAPE
    config = {
        "activation_type": "silu",
        "alibi": False,
        "architectures": ["LLaDAModelLM"],
        "attention_layer_norm": False,
        "block_type": "llama",
        "d_model": s["d_model"],
        "embedding_size": s["vocab"],
        "eos_token_id": 124,
        "include_bias": False,
        "include_qkv_bias": False,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": s["mask_id"],
        "max_sequence_length": 64,
        "mlp_hidden_size": s["mlp"],
        "mlp_ratio": 4,
        "model_type": "llada",
        "n_heads": s["n_heads"],
        "n_kv_heads": s["n_kv_heads"],
        "n_layers": s["n_layers"],
        "pad_token_id": 124,
        "rms_norm_eps": 1e-5,
        "rope": True,
        "rope_theta": 500000.0,
        "scale_logits": False,
        "torch_dtype": "float32",
        "vocab_size": s["vocab"],
        "weight_tying": False,
    }
    config.update(overrides)
    return config


def dream_config(**overrides) -> dict:
    """A config.json dict with the field names (and non-shape values) of Dream-v0-Instruct-7B."""
    s = DREAM_SHAPE
    config = {
        "architectures": ["DreamModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 120,
        "eos_token_id": 121,
        "hidden_act": "silu",
        "hidden_size": s["d_model"],
        "intermediate_size": s["mlp"],
        "mask_token_id": s["mask_id"],
        "max_position_embeddings": 64,
        "model_type": "Dream",
        "num_attention_heads": s["n_heads"],
        "num_hidden_layers": s["n_layers"],
        "num_key_value_heads": s["n_kv_heads"],
        "pad_token_id": 121,
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_sliding_window": False,
        "vocab_size": s["vocab"],
    }
    config.update(overrides)
    return config


def _random(shape, generator, kind: str) -> torch.Tensor:
    noise = torch.randn(*shape, generator=generator)
    if kind == "norm":
        return 1.0 + 0.1 * noise
    if kind == "embed":
        return 0.5 * noise
    if kind == "bias":
        return 0.1 * noise
    return 0.08 * noise


def llada_state_dict(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random fp32 tensors under LLaDA's names for ``config`` (a llada_config dict)."""
    g = torch.Generator().manual_seed(seed)
    d, f = config["d_model"], config["mlp_hidden_size"]
    vocab = config.get("embedding_size") or config["vocab_size"]
    dh = d // config["n_heads"]
    kv = config["n_kv_heads"] * dh
    sd = {"model.transformer.wte.weight": _random((vocab, d), g, "embed")}
    for i in range(config["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        sd[p + "attn_norm.weight"] = _random((d,), g, "norm")
        sd[p + "q_proj.weight"] = _random((d, d), g, "linear")
        sd[p + "k_proj.weight"] = _random((kv, d), g, "linear")
        sd[p + "v_proj.weight"] = _random((kv, d), g, "linear")
        if config.get("include_qkv_bias"):
            sd[p + "q_proj.bias"] = _random((d,), g, "bias")
            sd[p + "k_proj.bias"] = _random((kv,), g, "bias")
            sd[p + "v_proj.bias"] = _random((kv,), g, "bias")
        sd[p + "attn_out.weight"] = _random((d, d), g, "linear")
        sd[p + "ff_norm.weight"] = _random((d,), g, "norm")
        sd[p + "ff_proj.weight"] = _random((f, d), g, "linear")
        sd[p + "up_proj.weight"] = _random((f, d), g, "linear")
        sd[p + "ff_out.weight"] = _random((d, f), g, "linear")
    sd["model.transformer.ln_f.weight"] = _random((d,), g, "norm")
    if not config.get("weight_tying"):
        sd["model.transformer.ff_out.weight"] = _random((vocab, d), g, "linear")
    return sd


def dream_state_dict(config: dict, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random fp32 tensors under Dream's (= Qwen2's) names for ``config`` (a dream_config dict)."""
    g = torch.Generator().manual_seed(seed)
    d, f, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    dh = d // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * dh, config["num_key_value_heads"] * dh
    sd = {"model.embed_tokens.weight": _random((vocab, d), g, "embed")}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = _random((d,), g, "norm")
        for name, rows in (("q", q), ("k", kv), ("v", kv)):
            sd[p + f"self_attn.{name}_proj.weight"] = _random((rows, d), g, "linear")
            sd[p + f"self_attn.{name}_proj.bias"] = _random((rows,), g, "bias")
        sd[p + "self_attn.o_proj.weight"] = _random((d, q), g, "linear")
        sd[p + "post_attention_layernorm.weight"] = _random((d,), g, "norm")
        sd[p + "mlp.gate_proj.weight"] = _random((f, d), g, "linear")
        sd[p + "mlp.up_proj.weight"] = _random((f, d), g, "linear")
        sd[p + "mlp.down_proj.weight"] = _random((d, f), g, "linear")
    sd["model.norm.weight"] = _random((d,), g, "norm")
    if not config.get("tie_word_embeddings"):
        sd["lm_head.weight"] = _random((vocab, d), g, "linear")
    return sd


def write_checkpoint(
    path: Path, config: dict, state_dict: dict[str, torch.Tensor], *, sharded: bool = False, dtype=None
) -> Path:
    """Write ``config.json`` and the tensors (cast to ``dtype`` if given) into ``path``.

    sharded: two shards plus ``model.safetensors.index.json``. Key and value projections go to
    different shards on purpose, so the loader's K/V fusion has to combine shards.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "config.json", "w") as fh:
        json.dump(config, fh, indent=2)
    tensors = {k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in state_dict.items()}
    if not sharded:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    names = sorted(tensors)
    first = {n for i, n in enumerate(names) if i % 2 == 0 and "v_proj" not in n}
    first |= {n for n in names if "k_proj" in n}
    shards = {
        "model-00001-of-00002.safetensors": {n: tensors[n] for n in names if n in first},
        "model-00002-of-00002.safetensors": {n: tensors[n] for n in names if n not in first},
    }
    weight_map = {}
    for file, part in shards.items():
        save_file(part, str(path / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(path / "model.safetensors.index.json", "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    return path


def write_llada_checkpoint(
    path, *, seed: int = 0, sharded: bool = False, dtype=None, **config_overrides
) -> Path:
    """A tiny LLaDA checkpoint (d_model 64, 2 layers, 4 heads, mlp 96, vocab 128, mask id 126)."""
    config = llada_config(**config_overrides)
    return write_checkpoint(path, config, llada_state_dict(config, seed), sharded=sharded, dtype=dtype)


def write_dream_checkpoint(
    path, *, seed: int = 1, sharded: bool = False, dtype=None, **config_overrides
) -> Path:
    """A tiny Dream checkpoint (d_model 64, 2 layers, 4 query / 2 kv heads, q/k/v bias, vocab 128)."""
    config = dream_config(**config_overrides)
    return write_checkpoint(path, config, dream_state_dict(config, seed), sharded=sharded, dtype=dtype)
