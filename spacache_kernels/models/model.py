"""The model runtime's weights, in the layout the kernels want, and its dense (cache-free) forward.

``DiffusionLM`` is a plain object, not an ``nn.Module``: nothing here records autograd, and every
weight is stored once in the form the ops consume (K and V rows fused into one matrix, so the runtime
reads them with one gather GEMM). ``forward_dense`` runs every token through every layer using the
reference ops of :mod:`spacache_kernels.ops.reference`, so the model shares one definition of each op
with the kernels, and it is the oracle the cached runtime is tested against.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from spacache_kernels.models.config import ModelConfig
from spacache_kernels.models.rope import rope_tables
from spacache_kernels.ops import reference as ref

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class LayerWeights:
    """One transformer block's weights (d = d_model, F = ffn_dim, Hq/Hkv heads of width Dh).

    Attributes:
        attn_norm: (d,) RMSNorm weight before attention.
        w_q: (Hq*Dh, d) query projection.
        w_kv: (2*Hkv*Dh, d) key rows then value rows.
        b_q: (Hq*Dh,) or None.  b_kv: (2*Hkv*Dh,) or None (key bias then value bias).
        w_o: (d, Hq*Dh) output projection.  b_o: (d,) or None (only Llama ``attention_bias``).
        ffn_norm: (d,) RMSNorm weight before the MLP.
        w_gate, w_up: (F, d) SwiGLU gate and up projections: ``silu(f @ w_gate.T) * (f @ w_up.T)``.
        w_down: (d, F) down projection.
    """

    attn_norm: torch.Tensor
    w_q: torch.Tensor
    w_kv: torch.Tensor
    b_q: torch.Tensor | None
    b_kv: torch.Tensor | None
    w_o: torch.Tensor
    ffn_norm: torch.Tensor
    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor
    b_o: torch.Tensor | None = None

    @property
    def w_k(self) -> torch.Tensor:
        """(Hkv*Dh, d) view of the key rows of ``w_kv``."""
        return self.w_kv[: self.w_kv.shape[0] // 2]

    @property
    def w_v(self) -> torch.Tensor:
        """(Hkv*Dh, d) view of the value rows of ``w_kv`` (the SVD proxy is built from it)."""
        return self.w_kv[self.w_kv.shape[0] // 2 :]

    @property
    def b_k(self) -> torch.Tensor | None:
        return None if self.b_kv is None else self.b_kv[: self.b_kv.shape[0] // 2]

    @property
    def b_v(self) -> torch.Tensor | None:
        return None if self.b_kv is None else self.b_kv[self.b_kv.shape[0] // 2 :]

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """Field name -> tensor (None for absent biases)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @staticmethod
    def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...] | None]:
        """Field name -> the shape ``config`` requires, None where the tensor must be absent."""
        d, f, q, kv = config.d_model, config.ffn_dim, config.q_width, config.kv_width
        return {
            "attn_norm": (d,),
            "w_q": (q, d),
            "w_kv": (2 * kv, d),
            "b_q": (q,) if config.qkv_bias else None,
            "b_kv": (2 * kv,) if config.qkv_bias else None,
            "w_o": (d, q),
            "ffn_norm": (d,),
            "w_gate": (f, d),
            "w_up": (f, d),
            "w_down": (d, f),
            "b_o": (d,) if config.o_bias else None,
        }


class DiffusionLM:
    """A diffusion LM's weights plus RoPE tables: what the runtime and ``forward_dense`` execute.

    Attributes:
        config: the :class:`ModelConfig`.
        embed: (V, d) token embeddings.
        layers: list of :class:`LayerWeights`, one per block.
        final_norm: (d,) final RMSNorm weight.
        lm_head: (V, d); the same tensor object as ``embed`` when ``config.tie_embeddings``.
        rope_cos, rope_sin: fp32 (max_positions, head_dim) RoPE tables.
        device, dtype: where and in which dtype the weights live.
        mask_id: ``config.mask_token_id``.

    Args:
        config: the model's configuration.
        embed, layers, final_norm, lm_head: the weights (``lm_head`` None or ignored when tied); all on
            one device in one float dtype, shapes as ``config`` says (ValueError naming the tensor).
        rope: precomputed ``(cos, sin)`` tables; built from ``config`` when None.
    """

    def __init__(
        self,
        config: ModelConfig,
        embed: torch.Tensor,
        layers: list[LayerWeights],
        final_norm: torch.Tensor,
        lm_head: torch.Tensor | None = None,
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        self.config = config
        self.embed = embed
        self.layers = list(layers)
        self.final_norm = final_norm
        if config.tie_embeddings:
            lm_head = embed
        elif lm_head is None:
            raise ValueError("lm_head: required when config.tie_embeddings is False")
        self.lm_head = lm_head
        self._check()
        if rope is None:
            rope = rope_tables(
                config.head_dim,
                config.max_positions,
                config.rope_theta,
                self.device,
                config.rope_scaling_dict,
            )
        cos, sin = rope
        want = (config.max_positions, config.head_dim)
        for name, table in (("rope cos", cos), ("rope sin", sin)):
            if tuple(table.shape) != want or table.dtype != torch.float32:
                raise ValueError(f"{name}: expected fp32 {want}, got {table.dtype} {tuple(table.shape)}")
        self.rope_cos = cos.to(self.device)
        self.rope_sin = sin.to(self.device)

    # ------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def mask_id(self) -> int | None:
        return self.config.mask_token_id

    def _named_tensors(self):
        yield "embed", self.embed
        yield "final_norm", self.final_norm
        if not self.config.tie_embeddings:
            yield "lm_head", self.lm_head
        for i, layer in enumerate(self.layers):
            for name, tensor in layer.tensors().items():
                if tensor is not None:
                    yield f"layers.{i}.{name}", tensor

    def _check(self) -> None:
        cfg = self.config
        if len(self.layers) != cfg.n_layers:
            raise ValueError(f"layers: expected {cfg.n_layers} layers, got {len(self.layers)}")
        shapes = {
            "embed": (cfg.vocab_size, cfg.d_model),
            "final_norm": (cfg.d_model,),
            "lm_head": (cfg.vocab_size, cfg.d_model),
        }
        for i, layer in enumerate(self.layers):
            for name, shape in layer.expected_shapes(cfg).items():
                tensor = getattr(layer, name)
                if (shape is None) != (tensor is None):
                    state = "present" if shape is None else "missing"
                    raise ValueError(f"layers.{i}.{name}: unexpectedly {state} for this config")
                if shape is not None:
                    shapes[f"layers.{i}.{name}"] = shape
        if self.embed.dtype not in FLOAT_DTYPES:
            raise TypeError(f"embed: expected dtype float32/float16/bfloat16, got {self.embed.dtype}")
        for name, tensor in self._named_tensors():
            if tuple(tensor.shape) != shapes[name]:
                raise ValueError(f"{name}: expected shape {shapes[name]}, got {tuple(tensor.shape)}")
            if tensor.dtype != self.dtype or tensor.device != self.device:
                raise ValueError(
                    f"{name}: expected {self.dtype} on {self.device} (like embed), got {tensor.dtype} on "
                    f"{tensor.device}"
                )

    def __repr__(self) -> str:
        c = self.config
        return (
            f"DiffusionLM(arch={c.arch!r}, layers={c.n_layers}, d_model={c.d_model}, heads={c.n_heads}/"
            f"{c.n_kv_heads}, ffn={c.ffn_dim}, vocab={c.vocab_size}, dtype={self.dtype}, "
            f"device={self.device})"
        )

    # ------------------------------------------------------------------------------------------
    def to(self, device=None, dtype: torch.dtype | None = None) -> DiffusionLM:
        """A copy with every weight on ``device`` / in ``dtype`` (RoPE tables stay fp32); ties are kept."""
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype: expected torch.float32/float16/bfloat16, got {dtype}")
        device = self.device if device is None else torch.device(device)
        dtype = self.dtype if dtype is None else dtype

        def convert(t: torch.Tensor | None) -> torch.Tensor | None:
            # .to returns the same tensor when nothing changes; clone so the copy never aliases self.
            if t is None:
                return None
            out = t.to(device=device, dtype=dtype)
            return out.clone() if out is t else out

        layers = [
            LayerWeights(**{name: convert(t) for name, t in layer.tensors().items()}) for layer in self.layers
        ]
        embed = convert(self.embed)
        lm_head = None if self.config.tie_embeddings else convert(self.lm_head)
        rope = (self.rope_cos.to(device), self.rope_sin.to(device))
        return DiffusionLM(self.config, embed, layers, convert(self.final_norm), lm_head, rope=rope)

    # ------------------------------------------------------------------------------------------
    def positions(self, attention_mask: torch.Tensor | None, length: int | None = None) -> torch.Tensor:
        """RoPE positions (B, T) int64: ``cumsum(mask) - 1`` clamped at 0.

        attention_mask (B, T): 1 = real token, 0 = left padding. A left-padded row then gives its first
        real token position 0, exactly as the same row without padding. None: ``arange(length)`` (1, T).
        """
        if attention_mask is None:
            if length is None:
                raise ValueError("positions: pass attention_mask or length")
            return torch.arange(length, device=self.device).unsqueeze(0)
        return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings: input_ids (B, T) int -> (B, T, d) in the model dtype."""
        return torch.nn.functional.embedding(input_ids, self.embed)

    @torch.no_grad()
    def forward_dense(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Full bidirectional forward of every token, no cache.

        input_ids (B, T) int; attention_mask (B, T) (1 = real token, 0 = left padding) or None.
        Returns fp32 logits (B, T, V) where logit i predicts token i. For Dream (``config.shift_logits``)
        the network's own output at i-1 predicts token i, so the logits are shifted here
        (``cat(logits[:, :1], logits[:, :-1])`` without padding; see ``_shift_dream_logits``), and
        callers never see the network's own convention. The LM head runs in fp32 (a transient fp32
        copy of the head: this is the reference path, not the hot one).
        """
        cfg = self.config
        ids, mask = self._check_inputs(input_ids, attention_mask)
        batch, length = ids.shape
        positions = self.positions(mask, length).expand(batch, length)
        key_padding = None if mask is None else mask == 0
        rope = (self.rope_cos, self.rope_sin)
        hq, hkv, dh, kv_width = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.kv_width

        hidden = self.embed_tokens(ids)  # (B, T, d)
        for layer in self.layers:
            normed = ref.rms_norm(hidden, layer.attn_norm, cfg.norm_eps)
            q = ref.gather_linear(normed, None, layer.w_q, layer.b_q, rope=rope, positions=positions)
            # K and V as two calls on the fused matrix (RoPE on K only), the same split as the runtime's.
            k = ref.gather_linear(
                normed, None, layer.w_kv[:kv_width], layer.b_k, rope=rope, positions=positions
            )
            v = ref.gather_linear(normed, None, layer.w_kv[kv_width:], layer.b_v)
            attn, _ = ref.sparse_attention(
                q.view(batch, length, hq, dh),
                k.view(batch, length, hkv, dh),
                v.view(batch, length, hkv, dh),
                key_padding,
            )
            hidden = hidden + ref.gather_linear(
                attn.reshape(batch, length, hq * dh), None, layer.w_o, layer.b_o
            )
            normed = ref.rms_norm(hidden, layer.ffn_norm, cfg.norm_eps)
            hidden = hidden + ref.gather_linear(
                ref.gather_swiglu(normed, None, layer.w_gate, layer.w_up), None, layer.w_down
            )
        normed = ref.rms_norm(hidden, self.final_norm, cfg.norm_eps)
        logits = normed.float() @ self.lm_head.float().T  # (B, T, V)
        if cfg.shift_logits:
            logits = self._shift_dream_logits(logits, mask)
        return logits

    @staticmethod
    def _shift_dream_logits(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Dream: ``out[:, i] = logits[:, i - 1]``, and ``out[:, 0] = logits[:, 0]``.

        In a left-padded row the first real token has no real predecessor either, so it keeps its own
        logit like position 0 does; its logits then equal those of the same row without padding.
        """
        batch, length, vocab = logits.shape
        pos = torch.arange(length, device=logits.device).expand(batch, length)
        src = (pos - 1).clamp_min(0)
        if mask is not None:
            src = torch.where(torch.gather(mask, 1, src) != 0, src, pos)
        return torch.gather(logits, 1, src.unsqueeze(-1).expand(-1, -1, vocab))

    def _check_inputs(self, input_ids, attention_mask):
        cfg = self.config
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(
                f"input_ids: expected a (B, T) tensor, got {getattr(input_ids, 'shape', input_ids)}"
            )
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids: expected an integer tensor, got {input_ids.dtype}")
        length = input_ids.shape[1]
        if length > cfg.max_positions:
            raise ValueError(
                f"input_ids: length {length} exceeds the model's max positions {cfg.max_positions}"
            )
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size):
            raise ValueError(f"input_ids: expected token ids in [0, {cfg.vocab_size})")
        ids = input_ids.to(self.device)
        if attention_mask is None:
            return ids, None
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask: expected shape {tuple(input_ids.shape)} like input_ids, got "
                f"{tuple(getattr(attention_mask, 'shape', ()))}"
            )
        return ids, attention_mask.to(self.device).long()

    # ------------------------------------------------------------------------------------------
    def flops_per_token(self, context_len: int) -> int:
        """FLOPs (multiply-add = 2) to run one token through every layer and the LM head.

        Per layer, with d, F, Hq*Dh = q, Hkv*Dh = kv and ``context_len`` = T keys:
        ``2*d*q`` (Q) + ``2*d*2*kv`` (K, V) + ``4*T*q`` (QK^T and PV) + ``2*q*d`` (output projection)
        + ``6*d*F`` (gate, up, down). Plus ``2*d*V`` for the LM head. Norms, RoPE, softmax and residual
        adds are O(d) per token and left out, as is conventional.
        """
        if context_len < 0:
            raise ValueError(f"context_len: expected >= 0, got {context_len}")
        c = self.config
        d, q, kv = c.d_model, c.q_width, c.kv_width
        per_layer = 2 * d * q + 4 * d * kv + 4 * context_len * q + 2 * q * d + 6 * d * c.ffn_dim
        return c.n_layers * per_layer + 2 * d * c.vocab_size

    def num_parameters(self) -> int:
        """Number of weights, a tied LM head counted once."""
        return sum(t.numel() for _, t in self._named_tensors())
