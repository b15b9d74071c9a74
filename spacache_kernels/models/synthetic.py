"""Random-weight diffusion LMs at named shapes, built directly on the target device.

For throughput benchmarks, where the weights' values do not matter but their shapes do: no download,
no checkpoint file, no host round trip (an 8B model in bf16 is drawn straight into GPU memory).

Named shapes (``SHAPES``):

* ``"llada-8b"``: LLaDA-8B-Instruct (d 4096, 32 layers, 32 heads, no GQA, SwiGLU 12288, vocab
  126464, mask id 126336, RoPE theta 5e5, no biases, untied head).
* ``"dream-7b"``: Dream-v0-Instruct-7B, the Qwen2 layout (d 3584, 28 layers, 28 query / 4 key-value
  heads, SwiGLU 18944, vocab 152064, q/k/v bias, RoPE theta 1e6, shifted logits, mask id 151666).
* ``"llada-tiny"`` / ``"dream-tiny"``: the same structure (GQA or not, biases, logit shift, FFN /
  width ratio) at a width, depth and vocabulary small enough for a 2-core CPU.

Initialization is that of a freshly initialized transformer: every linear weight and the embeddings
are N(0, 0.02^2), biases N(0, 0.02^2), norm weights 1. With RMSNorm in front of every block the
activations then stay O(1) and finite in bf16 at any depth.
"""

from __future__ import annotations

import dataclasses

import torch

from spacache_kernels.models.config import DREAM_MASK_ID, LLADA_MASK_ID, ModelConfig
from spacache_kernels.models.model import FLOAT_DTYPES, DiffusionLM, LayerWeights

INIT_STD = 0.02

SHAPES: dict[str, ModelConfig] = {
    "llada-8b": ModelConfig(
        arch="llada", d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128, ffn_dim=12288,
        vocab_size=126464, rope_theta=500000.0, norm_eps=1e-5, mask_token_id=LLADA_MASK_ID,
        max_positions=4096, eos_token_id=126081, pad_token_id=126081,
    ),
    "dream-7b": ModelConfig(
        arch="dream", d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, head_dim=128, ffn_dim=18944,
        vocab_size=152064, rope_theta=1000000.0, norm_eps=1e-6, mask_token_id=DREAM_MASK_ID,
        max_positions=131072, qkv_bias=True, shift_logits=True, eos_token_id=151643,
        pad_token_id=151643,
    ),
    # Scaled-down: width / 16, 4 layers, vocabulary 4096; FFN ratio and head structure kept.
    "llada-tiny": ModelConfig(
        arch="llada", d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, head_dim=64, ffn_dim=768,
        vocab_size=4096, rope_theta=500000.0, norm_eps=1e-5, mask_token_id=4095, max_positions=2048,
    ),
    "dream-tiny": ModelConfig(
        arch="dream", d_model=256, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=32, ffn_dim=1344,
        vocab_size=4096, rope_theta=1000000.0, norm_eps=1e-6, mask_token_id=4094, max_positions=2048,
        qkv_bias=True, shift_logits=True,
    ),
}  # fmt: skip


def shape_config(shape: str | ModelConfig) -> ModelConfig:
    """The :class:`ModelConfig` of a named shape (a ModelConfig is returned as is)."""
    if isinstance(shape, ModelConfig):
        return shape
    if not isinstance(shape, str):
        raise TypeError(f"shape: expected a shape name or a ModelConfig, got {type(shape).__name__}")
    key = shape.strip().lower().replace("_", "-")
    if key not in SHAPES:
        raise ValueError(f"shape: expected one of {sorted(SHAPES)} or a ModelConfig, got {shape!r}")
    return SHAPES[key]


def random_model(
    shape: str | ModelConfig = "llada-tiny",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> DiffusionLM:
    """A :class:`DiffusionLM` with seeded random weights drawn directly on ``device`` in ``dtype``.

    Args:
        shape: a name from ``SHAPES`` ("llada-8b", "dream-7b", "llada-tiny", "dream-tiny") or a
            :class:`ModelConfig`.
        device: where the weights are created (the random draws happen there too).
        dtype: float32 / float16 / bfloat16.
        seed: the same seed, device and dtype give the same weights.
    """
    config = shape_config(shape)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype: expected torch.float32/float16/bfloat16, got {dtype}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    generator = torch.Generator(device=device).manual_seed(seed)

    def normal(*size: int) -> torch.Tensor:
        out = torch.empty(size, device=device, dtype=dtype)
        return out.normal_(0.0, INIT_STD, generator=generator)

    def ones(size: int) -> torch.Tensor:
        return torch.ones(size, device=device, dtype=dtype)

    layers = []
    for name_shapes in (LayerWeights.expected_shapes(config) for _ in range(config.n_layers)):
        fields = {}
        for name, size in name_shapes.items():
            if size is None:
                fields[name] = None
            elif name.endswith("_norm"):
                fields[name] = ones(*size)
            else:
                fields[name] = normal(*size)
        layers.append(LayerWeights(**fields))
    embed = normal(config.vocab_size, config.d_model)
    lm_head = None if config.tie_embeddings else normal(config.vocab_size, config.d_model)
    return DiffusionLM(config, embed, layers, ones(config.d_model), lm_head)


def with_layers(shape: str | ModelConfig, n_layers: int) -> ModelConfig:
    """A named shape with another depth (e.g. a 2-layer LLaDA-8B-width model for a quick check)."""
    return dataclasses.replace(shape_config(shape), n_layers=n_layers)


__all__ = ["INIT_STD", "SHAPES", "random_model", "shape_config", "with_layers"]
