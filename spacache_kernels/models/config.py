"""Model configuration: one frozen description of a LLaDA / Dream / Llama / Qwen2 network.

``ModelConfig.from_dict`` reads a checkpoint's ``config.json`` (or an HF config's ``to_dict()``) under
each family's own field names, so loading never needs ``trust_remote_code``. Features the runtime does
not implement (ALiBi, qk-norm, biases outside q/k/v/o, sliding windows, other activations) are
rejected with an error naming the field, never silently ignored: a silently dropped feature would
produce a plausible-looking but wrong model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ARCHS = ("llada", "dream", "llama", "qwen2")

# config.json "architectures" entry (or HF class name) -> arch.
_ARCH_NAMES = {
    "LLaDAModelLM": "llada",
    "LLaDAModel": "llada",
    "DreamModel": "dream",
    "LlamaForCausalLM": "llama",
    "LlamaModel": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen2Model": "qwen2",
}
# Fallback when "architectures" is absent (an HF config built in code has architectures=None).
_MODEL_TYPES = {"llada": "llada", "dream": "dream", "llama": "llama", "qwen2": "qwen2"}

LLADA_MASK_ID = 126336
DREAM_MASK_ID = 151666


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of one diffusion LM.

    Attributes:
        arch: "llada" | "dream" | "llama" | "qwen2".
        d_model: hidden width d.
        n_layers: number of transformer blocks.
        n_heads, n_kv_heads: query heads Hq and key/value heads Hkv (Hq % Hkv == 0; GQA when Hkv < Hq).
        head_dim: Dh; the q projection has Hq * Dh rows (need not equal d for Llama configs).
        ffn_dim: F, width of the SwiGLU hidden layer.
        vocab_size: V, rows of the embedding and of the LM head (LLaDA's padded ``embedding_size``).
        rope_theta: RoPE base.
        norm_eps: RMSNorm epsilon.
        mask_token_id: the [MASK] id the denoiser fills in (None for a plain Llama/Qwen2 config).
        max_positions: rows of the RoPE tables; sequences longer than this are rejected.
        qkv_bias: q/k/v projections carry a bias (Dream/Qwen2 always; LLaDA ``include_qkv_bias``).
        o_bias: the output projection carries a bias (Llama ``attention_bias`` only).
        tie_embeddings: the LM head is the embedding matrix.
        shift_logits: Dream convention: the logit at position i-1 predicts token i.
        eos_token_id, pad_token_id: special ids (None when the config has none).
        rope_scaling: None, or the ``rope_scaling`` / ``rope_parameters`` entries of a supported
            scaled RoPE ("llama3") as sorted ``(key, value)`` pairs, kept hashable.
    """

    arch: str
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    rope_theta: float
    norm_eps: float
    mask_token_id: int | None
    max_positions: int
    qkv_bias: bool = False
    o_bias: bool = False
    tie_embeddings: bool = False
    shift_logits: bool = False
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    rope_scaling: tuple[tuple[str, Any], ...] | None = None

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch: expected one of {ARCHS}, got {self.arch!r}")
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads: expected a multiple of n_kv_heads ({self.n_kv_heads}), got {self.n_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim: expected an even size (RoPE rotates pairs), got {self.head_dim}")
        if self.max_positions <= 0:
            raise ValueError(f"max_positions: expected a positive integer, got {self.max_positions}")
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(
                f"mask_token_id: expected an id in [0, vocab_size={self.vocab_size}), "
                f"got {self.mask_token_id}"
            )

    @property
    def q_width(self) -> int:
        """Hq * Dh: output width of the query projection."""
        return self.n_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """Hkv * Dh: output width of each of the key and value projections."""
        return self.n_kv_heads * self.head_dim

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> ModelConfig:
        """Build from a ``config.json`` dict (LLaDA, Dream, Llama or Qwen2 field names).

        Raises ValueError naming the architecture when it is not supported, and naming the field when
        a required one is missing or holds a value for a feature the runtime does not implement.
        """
        arch = detect_arch(config)
        if arch == "llada":
            return _from_llada(config)
        return _from_qwen_llama(config, arch)


def detect_arch(config: Mapping[str, Any]) -> str:
    """The arch of a config dict: from ``architectures[0]``, else from ``model_type``."""
    supported = sorted(_ARCH_NAMES)
    archs = config.get("architectures")
    if archs:
        name = archs[0] if isinstance(archs, (list, tuple)) else archs
        if name not in _ARCH_NAMES:
            raise ValueError(f"unsupported architecture {name!r}; supported architectures: {supported}")
        return _ARCH_NAMES[name]
    model_type = config.get("model_type")
    if model_type is not None and str(model_type).lower() in _MODEL_TYPES:
        return _MODEL_TYPES[str(model_type).lower()]
    raise ValueError(
        f"unsupported architecture: config has no 'architectures' entry and model_type {model_type!r}; "
        f"supported architectures: {supported}"
    )


_REQUIRED = object()


def _int(config: Mapping[str, Any], name: str, family: str, default: Any = _REQUIRED, minimum: int = 1):
    """``config[name]`` as an int >= ``minimum`` (a float only when integral), else a ValueError that
    names the field; ``default`` when absent (missing and required: the field is named too)."""
    value = config.get(name)
    if value is None:
        if default is _REQUIRED:
            raise ValueError(f"config: missing required field {name!r} for a {family} checkpoint")
        return default
    if isinstance(value, bool) or not (
        isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    ):
        raise ValueError(f"config: field {name!r} expected an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"config: field {name!r} expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _float(config: Mapping[str, Any], name: str, default: float, positive: bool = True) -> float:
    """``config[name]`` as a finite float (> 0 when ``positive``), else a ValueError naming the field."""
    value = config.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"config: field {name!r} expected a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"config: field {name!r} expected a positive number, got {value!r}")
    return float(value)


def _reject(config: Mapping[str, Any], name: str, unsupported, why: str) -> None:
    """Error when ``config[name]`` is present and equals (or, for a callable, satisfies) ``unsupported``."""
    if name not in config or config[name] is None:
        return
    value = config[name]
    bad = unsupported(value) if callable(unsupported) else value == unsupported
    if bad:
        raise ValueError(f"config: {name}={value!r} is not supported ({why})")


def _rope_scaling(config: Mapping[str, Any]) -> tuple[tuple[str, Any], ...] | None:
    """Normalize ``rope_scaling`` (transformers 4.x) / ``rope_parameters`` (5.x) to the supported form."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters")
    if not scaling:
        return None
    if not isinstance(scaling, Mapping):
        raise ValueError(f"config: rope_scaling must be a dict, got {type(scaling).__name__}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise ValueError(
            f"config: rope_scaling type {rope_type!r} is not supported (supported: 'default', 'llama3')"
        )
    needed = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    for key in needed:
        if scaling.get(key) is None:
            raise ValueError(f"config: rope_scaling of type 'llama3' is missing {key!r}")
    return (("rope_type", "llama3"),) + tuple((k, scaling[k]) for k in sorted(needed))


def _rope_theta(config: Mapping[str, Any], family: str) -> float:
    # transformers 5.x moves rope_theta into rope_parameters.
    theta = config.get("rope_theta")
    params = config.get("rope_parameters")
    if theta is None and isinstance(params, Mapping):
        theta = params.get("rope_theta")
    if theta is None:
        raise ValueError(f"config: missing required field 'rope_theta' for a {family} checkpoint")
    return _float({"rope_theta": theta}, "rope_theta", 0.0)


def _from_llada(config: Mapping[str, Any]) -> ModelConfig:
    family = "LLaDA"
    d_model = _int(config, "d_model", family)
    n_heads = _int(config, "n_heads", family)
    n_layers = _int(config, "n_layers", family)
    n_kv_heads = _int(config, "n_kv_heads", family, default=n_heads)
    if config.get("multi_query_attention"):
        n_kv_heads = 1
    if config.get("mlp_hidden_size") is not None:
        ffn_dim = _int(config, "mlp_hidden_size", family)
    elif config.get("mlp_ratio") is not None:
        ffn_dim = int(_float(config, "mlp_ratio", 1.0) * d_model)
    else:
        raise ValueError(
            "config: missing required field 'mlp_hidden_size' (or 'mlp_ratio') for a LLaDA checkpoint"
        )
    vocab = config.get("embedding_size") or config.get("vocab_size")
    if vocab is not None:
        vocab = _int(config, "embedding_size" if config.get("embedding_size") else "vocab_size", family)
    if vocab is None:
        raise ValueError(
            "config: missing required field 'vocab_size' (or 'embedding_size') for a LLaDA checkpoint"
        )
    # LLaDA's block is the OLMo "llama" block; every other OLMo option changes the math.
    _reject(
        config, "block_type", lambda v: v != "llama", "only the 'llama' block (q/k/v_proj, ff_proj/up_proj)"
    )
    _reject(
        config, "activation_type", lambda v: v != "silu", "only 'silu' gating: act(ff_proj(x)) * up_proj(x)"
    )
    _reject(config, "layer_norm_type", lambda v: v != "rms", "only RMSNorm")
    _reject(config, "rope", False, "RoPE is the only position encoding")
    _reject(config, "alibi", True, "ALiBi")
    _reject(config, "attention_layer_norm", True, "qk-norm")
    _reject(config, "input_emb_norm", True, "embedding norm")
    _reject(config, "clip_qkv", lambda v: True, "q/k/v clipping")
    _reject(config, "scale_logits", True, "logit scaling")
    _reject(config, "include_bias", True, "biases on every linear layer; only include_qkv_bias")
    _reject(config, "bias_for_layer_norm", True, "norm biases")
    _reject(config, "layer_norm_with_affine", False, "norms without weights")
    _reject(config, "rope_scaling", lambda v: bool(v), "scaled RoPE in a LLaDA config")
    return ModelConfig(
        arch="llada",
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=d_model // n_heads,
        ffn_dim=ffn_dim,
        vocab_size=int(vocab),
        rope_theta=_rope_theta(config, family),
        norm_eps=_float(config, "rms_norm_eps", 1e-5),
        mask_token_id=_int(config, "mask_token_id", family, default=LLADA_MASK_ID, minimum=0),
        max_positions=_int(config, "max_sequence_length", family, default=4096),
        qkv_bias=bool(config.get("include_qkv_bias", False)),
        o_bias=False,
        tie_embeddings=bool(config.get("weight_tying", False)),
        shift_logits=False,
        eos_token_id=_optional_id(config, "eos_token_id"),
        pad_token_id=_optional_id(config, "pad_token_id"),
    )


def _optional_id(config: Mapping[str, Any], name: str) -> int | None:
    value = config.get(name)
    if isinstance(value, (list, tuple)):  # some configs list several EOS ids; the first is canonical
        value = value[0] if value else None
    return _int({name: value}, name, "", default=None, minimum=0)


def _from_qwen_llama(config: Mapping[str, Any], arch: str) -> ModelConfig:
    family = {"dream": "Dream", "llama": "Llama", "qwen2": "Qwen2"}[arch]
    d_model = _int(config, "hidden_size", family)
    n_heads = _int(config, "num_attention_heads", family)
    n_layers = _int(config, "num_hidden_layers", family)
    ffn_dim = _int(config, "intermediate_size", family)
    vocab = _int(config, "vocab_size", family)
    n_kv_heads = _int(config, "num_key_value_heads", family, default=n_heads)
    head_dim = _int(config, "head_dim", family, default=d_model // n_heads)
    _reject(config, "hidden_act", lambda v: v != "silu", "only SiLU-gated MLPs")
    _reject(config, "use_sliding_window", True, "sliding-window attention")
    _reject(config, "mlp_bias", True, "MLP biases")
    _reject(config, "partial_rotary_factor", lambda v: v != 1.0, "partial rotary embeddings")
    if arch == "llama":
        # Llama's attention_bias puts a bias on q, k, v and o alike.
        qkv_bias = o_bias = bool(config.get("attention_bias", False))
    else:
        qkv_bias, o_bias = True, False  # Qwen2 / Dream: q/k/v biases are hard-wired
    default_mask = DREAM_MASK_ID if arch == "dream" else None
    mask_id = _int(config, "mask_token_id", family, default=default_mask, minimum=0)
    return ModelConfig(
        arch=arch,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        ffn_dim=ffn_dim,
        vocab_size=vocab,
        rope_theta=_rope_theta(config, family),
        norm_eps=_float(config, "rms_norm_eps", 1e-6),
        mask_token_id=mask_id,
        max_positions=_int(
            config, "max_position_embeddings", family, default=32768 if arch != "llama" else 2048
        ),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        shift_logits=arch == "dream",
        eos_token_id=_optional_id(config, "eos_token_id"),
        pad_token_id=_optional_id(config, "pad_token_id"),
        rope_scaling=_rope_scaling(config),
    )
