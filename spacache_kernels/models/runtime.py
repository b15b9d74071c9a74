"""The cached denoising step: one generation's caches and the per-layer hot path.

Per layer, for the live rows ``x`` (B, R, d) (all T tokens, or the G generated ones) and the rows
``sel`` the policy picks (``None`` = all):

    h   = rms_norm(x)                                    ops.rms_norm
    sel = policy.select(layer, h, plan)                  (SPA: fused proxy projection + drift top-k)
    K,V = gather_linear(h, rows, Wk / Wv) -> RoPE(K)     rows = all live rows, or sel (sparse K/V)
          written into the preallocated K/V cache at their absolute positions
    q   = gather_linear(h, sel, Wq) -> RoPE at positions[sel]
    a   = sparse_attention(q, Kcache, Vcache, key padding)
    o   = a @ Wo ;  y = x[sel] + o ;  f = swiglu_ffn(rms_norm(y))
    out = scatter_residual(x, branch_cache, sel, o + f)  (branch_cache[sel] <- o + f; out = x + branch)

Caches (preallocated once per generation, never grown): K/V (L, B, T, Hkv, Dh) post-RoPE, the branch
sum ``attn_out + ffn_out`` of generated tokens (L, B, G, d) when the policy reuses it, and the last
layer's output (B, T, d) from which decisions are read. No host syncs inside a step: every shape
depends on host-side integers only (budgets, lengths), never on tensor values.
"""

from __future__ import annotations

import numpy as np
import torch

from spacache_kernels.ops.attention import sparse_attention
from spacache_kernels.ops.confidence import token_confidence
from spacache_kernels.ops.linear import gather_linear, gather_swiglu
from spacache_kernels.ops.norm import rms_norm
from spacache_kernels.ops.scatter import scatter_residual, scatter_rows_
from spacache_kernels.policies.base import CachePolicy, StepPlan


class DenoiseRuntime:
    """Caches and step execution for one generate() call.

    Args:
        model: a :class:`~spacache_kernels.models.DiffusionLM`.
        attention_mask: (B, T) 1 for real tokens, 0 for left padding (prompt side only).
        prompt_len: P; the generated region is ``[P, T)``.
        policy: the caching policy (already ``reset`` for this generation).
        backend: op backend ("auto" | "triton" | "torch" | None).
    """

    def __init__(self, model, attention_mask: torch.Tensor, prompt_len: int, policy: CachePolicy, backend):
        cfg = model.config
        self.model = model
        self.policy = policy
        self.backend = backend
        self.prompt_len = prompt_len
        batch, total = attention_mask.shape
        self.total_len = total
        self.gen_len = total - prompt_len
        self.positions = model.positions(attention_mask)  # (B, T) int64
        # One host read at setup, so unpadded batches skip the mask entirely.
        self.key_padding = None if bool(attention_mask.all()) else attention_mask == 0
        dev, dt = model.device, model.dtype
        shape = (cfg.n_layers, batch, total, cfg.n_kv_heads, cfg.head_dim)
        self.k_cache = torch.empty(shape, device=dev, dtype=dt)
        self.v_cache = torch.empty(shape, device=dev, dtype=dt)
        self.branch = (
            torch.empty(cfg.n_layers, batch, self.gen_len, cfg.d_model, device=dev, dtype=dt)
            if policy.needs_branch_cache
            else None
        )
        self.hidden = torch.empty(batch, total, cfg.d_model, device=dev, dtype=dt)
        self.layer_rows = np.zeros(cfg.n_layers, dtype=np.int64)  # recomputed rows per layer (per row)
        self.flops = 0

    # ------------------------------------------------------------------------------------------
    def drop_rows(self, keep: torch.Tensor) -> None:
        """Keep only the batch rows marked in ``keep`` (B,) bool (finished rows leave)."""
        self.positions = self.positions[keep]
        if self.key_padding is not None:
            self.key_padding = self.key_padding[keep]
        self.k_cache = self.k_cache[:, keep]
        self.v_cache = self.v_cache[:, keep]
        if self.branch is not None:
            self.branch = self.branch[:, keep]
        self.hidden = self.hidden[keep]

    def _layer_flops(self, batch: int, live: int, sel: int, kv_rows: int) -> int:
        cfg = self.model.config
        q_width = cfg.n_heads * cfg.head_dim
        kv_width = cfg.n_kv_heads * cfg.head_dim
        d, f, t = cfg.d_model, cfg.ffn_dim, self.total_len
        per_batch = (
            2 * kv_rows * d * 2 * kv_width  # K and V
            + 2 * sel * d * q_width  # Q
            + 4 * sel * t * q_width  # QK^T and PV
            + 2 * sel * q_width * d  # output projection
            + 6 * sel * d * f  # gate, up, down
        )
        return batch * per_batch

    # ------------------------------------------------------------------------------------------
    def step(self, tokens: torch.Tensor, plan: StepPlan) -> None:
        """Run one denoising step over ``tokens`` (B, T); updates caches and ``self.hidden``."""
        model, cfg, backend = self.model, self.model.config, self.backend
        start = 0 if plan.region == "all" else self.prompt_len
        if plan.region == "gen" and self.branch is None:
            raise ValueError("plan: region 'gen' needs a policy with needs_branch_cache = True")
        x = model.embed_tokens(tokens[:, start:])  # (B, R, d)
        batch, live = x.shape[:2]
        pos_live = self.positions[:, start:]
        rope = (model.rope_cos, model.rope_sin)
        hq, hkv, dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        kv_width = hkv * dh
        for li, layer in enumerate(model.layers):
            h = rms_norm(x, layer.attn_norm, cfg.norm_eps, backend=backend)
            sel = self.policy.select(li, h, plan)
            pos_sel = pos_live if sel is None else torch.gather(pos_live, 1, sel)
            n_sel = live if sel is None else sel.shape[1]

            # K/V: every live row (reference) or only the selected ones (sparse K/V).
            kv_sel = sel if plan.sparse_kv else None
            kv_pos = pos_sel if plan.sparse_kv else pos_live
            w_k, w_v = layer.w_kv[:kv_width], layer.w_kv[kv_width:]
            b_k = b_v = None
            if layer.b_kv is not None:
                b_k, b_v = layer.b_kv[:kv_width], layer.b_kv[kv_width:]
            k_new = gather_linear(
                h, kv_sel, w_k, b_k, rope=rope, positions=kv_pos, backend=backend, check_indices=False
            )
            v_new = gather_linear(h, kv_sel, w_v, b_v, backend=backend, check_indices=False)
            k_layer, v_layer = self.k_cache[li], self.v_cache[li]  # (B, T, Hkv, Dh), contiguous
            if kv_sel is None:
                k_layer[:, start:] = k_new.view(batch, live, hkv, dh)
                v_layer[:, start:] = v_new.view(batch, live, hkv, dh)
            else:
                abs_rows = kv_sel + start
                scatter_rows_(k_layer.view(batch, -1, kv_width), abs_rows, k_new, backend=backend,
                              check_indices=False)  # fmt: skip
                scatter_rows_(v_layer.view(batch, -1, kv_width), abs_rows, v_new, backend=backend,
                              check_indices=False)  # fmt: skip

            q = gather_linear(
                h,
                sel,
                layer.w_q,
                layer.b_q,
                rope=rope,
                positions=pos_sel,
                backend=backend,
                check_indices=False,
            )
            attn, _ = sparse_attention(
                q.view(batch, n_sel, hq, dh), k_layer, v_layer, self.key_padding, backend=backend
            )
            o = gather_linear(
                attn.reshape(batch, n_sel, hq * dh), None, layer.w_o, layer.b_o, backend=backend
            )
            y = x if sel is None else torch.gather(x, 1, sel.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            y = y + o
            g = rms_norm(y, layer.ffn_norm, cfg.norm_eps, backend=backend)
            ffn = gather_linear(
                gather_swiglu(g, None, layer.w_gate, layer.w_up, backend=backend), None, layer.w_down,
                backend=backend,
            )  # fmt: skip
            delta = o + ffn
            if sel is None:
                x = x + delta
                if self.branch is not None:
                    gen_from = self.prompt_len - start  # 0 for region "gen", P for "all"
                    self.branch[li].copy_(delta[:, gen_from:])
            else:
                x = scatter_residual(x, self.branch[li], sel, delta, backend=backend, check_indices=False)

            self.layer_rows[li] += n_sel * batch
            self.flops += self._layer_flops(batch, live, n_sel, n_sel if plan.sparse_kv else live)
        self.hidden[:, start:] = x

    # ------------------------------------------------------------------------------------------
    def decide(
        self, positions: torch.Tensor, *, temperature: float = 0.0, seed: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted token and confidence at ``positions`` (B, m) of the last computed hidden states.

        Dream-style models (``config.shift_logits``) read the hidden state one position earlier, so
        the result always means "the prediction for token ``positions``".
        """
        model, cfg = self.model, self.model.config
        src = positions - 1 if cfg.shift_logits else positions
        rows = torch.gather(self.hidden, 1, src.unsqueeze(-1).expand(-1, -1, self.hidden.shape[-1]))
        normed = rms_norm(rows, model.final_norm, cfg.norm_eps, backend=self.backend)
        self.flops += 2 * rows.shape[0] * rows.shape[1] * cfg.d_model * model.lm_head.shape[0]
        return token_confidence(
            normed, model.lm_head, None, temperature=temperature, seed=seed, suppress_token=model.mask_id,
            backend=self.backend, check_indices=False,
        )  # fmt: skip
