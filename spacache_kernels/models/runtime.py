"""The cached denoising step: one generation's caches and the per-layer hot path.

Per layer, for the live rows ``x`` (B, R, d) (a contiguous region of positions, or a per-row index set)
and the generated rows ``sel`` the policy picks (``None`` = all):

    h   = rms_norm(x)                                    ops.rms_norm
    V   = gather_linear(h, None, Wv)                     first, when the plan needs V of every live row
    sel = policy.select(layer, h, plan)                  (SPA: fused proxy projection + drift top-k;
                                                          dLLM-Cache: cosine of V against the V cache)
    K,V = gather_linear(h, rows, Wk / Wv) -> RoPE(K)     rows = all live rows, or sel (sparse K/V)
          written into the preallocated K/V cache at their absolute positions
    q   = gather_linear(h, sel, Wq) -> RoPE at positions[sel]
    a   = sparse_attention(q, Kcache, Vcache, key padding [, probability rows for the policy])
    o   = a @ Wo ;  y = x[sel] + o ;  f = swiglu_ffn(rms_norm(y))
    out = scatter_residual(x, branch_cache, sel, o + f)  (branch_cache[sel] <- o + f; out = x + branch)

Caches (preallocated once per generation, never grown): K/V (L, B, T, Hkv, Dh) post-RoPE, the branch
sum ``attn_out + ffn_out`` of generated tokens (L, B, G, d) when the policy reuses it, every layer's
output (L, B, T, d) when the policy can switch to full recomputation mid-step (Elastic-Cache), and the
last layer's output (B, T, d) from which decisions are read. No host syncs inside a step: every shape
depends on host-side integers only (budgets, lengths, the plan's row count), never on tensor values.
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

MEASURES = ("max_prob", "margin", "neg_entropy")


def confidence_measure(normed: torch.Tensor, lm_head: torch.Tensor, measure: str, temperature: float = 0.0):
    """(B, m) "margin" or "neg_entropy" of the next-token distribution of ``normed`` (B, m, d) rows, as
    Dream's / Fast-dLLM's ``sample_tokens`` computes them (over the whole vocabulary, mask included)."""
    logits = normed.float() @ lm_head.float().T
    if temperature > 0:
        logits = logits / temperature
    probs = torch.softmax(logits, dim=-1)
    if measure == "margin":
        top = probs.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]
    if measure == "neg_entropy":
        return (probs * torch.log(probs + 1e-10)).sum(dim=-1)
    raise ValueError(f"measure: expected one of {MEASURES}, got {measure!r}")


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
        self.layer_out = (
            torch.empty(cfg.n_layers, batch, total, cfg.d_model, device=dev, dtype=dt)
            if policy.needs_layer_outputs
            else None
        )
        self.hidden = torch.empty(batch, total, cfg.d_model, device=dev, dtype=dt)
        # Positions whose last-layer state was recomputed by the latest step (decide_fresh_only).
        self.fresh = torch.zeros(batch, total, dtype=torch.bool, device=dev)
        self.layer_values = None  # V of the live rows while select() runs (dense-V plans)
        self.expanded = False  # whether the latest step switched to full recomputation mid-way
        self.last_plan: StepPlan | None = None  # the plan of the latest step (decide() reads it)
        self.layer_rows = np.zeros(cfg.n_layers, dtype=np.int64)  # recomputed rows per layer (per row)
        self.flops = 0
        policy.attach(self)

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
        if self.layer_out is not None:
            self.layer_out = self.layer_out[:, keep]
        self.hidden = self.hidden[keep]
        self.fresh = self.fresh[keep]

    def _layer_flops(self, batch: int, q_rows: int, k_rows: int, v_rows: int) -> int:
        """FLOPs of one layer for ``q_rows`` recomputed queries (and FFN rows), K / V over the given rows."""
        cfg = self.model.config
        q_width = cfg.n_heads * cfg.head_dim
        kv_width = cfg.n_kv_heads * cfg.head_dim
        d, f, t = cfg.d_model, cfg.ffn_dim, self.total_len
        per_batch = (
            2 * (k_rows + v_rows) * d * kv_width  # K and V
            + 2 * q_rows * d * q_width  # Q
            + 4 * q_rows * t * q_width  # QK^T and PV
            + 2 * q_rows * q_width * d  # output projection
            + 6 * q_rows * d * f  # gate, up, down
        )
        return batch * per_batch

    # ------------------------------------------------------------------------------------------
    def _live(self, plan: StepPlan) -> tuple[int, int, torch.Tensor | None]:
        """(start, stop, rows): the contiguous live range, or ``rows`` (B, n) absolute positions."""
        if plan.rows is not None:
            rows = plan.rows
            if rows.dim() != 2 or rows.shape[0] != self.positions.shape[0] or rows.dtype != torch.int64:
                raise ValueError(
                    f"plan.rows: expected a ({self.positions.shape[0]}, n) int64 tensor, "
                    f"got {rows.dtype} {tuple(rows.shape)}"
                )
            return 0, self.total_len, rows
        if plan.region == "all":
            return 0, self.total_len, None
        if plan.region == "gen":
            return self.prompt_len, self.total_len, None
        lo, hi = plan.region
        if not 0 <= lo < hi <= self.total_len:
            raise ValueError(
                f"plan.region: expected 0 <= start < stop <= {self.total_len}, got {plan.region}"
            )
        return lo, hi, None

    def _write_rows(self, cache: torch.Tensor, new: torch.Tensor, lo: int, rows, sub) -> None:
        """Write ``new`` (B, n, W) into ``cache`` (B, T, ...) at the live rows (``sub``: a subset of them)."""
        batch, width = new.shape[0], new.shape[-1]
        if rows is None and sub is None:
            cache[:, lo : lo + new.shape[1]] = new.view(cache[:, lo : lo + new.shape[1]].shape)
            return
        target = (sub + lo) if rows is None else (rows if sub is None else torch.gather(rows, 1, sub))
        scatter_rows_(cache.view(batch, -1, width), target, new, backend=self.backend, check_indices=False)

    def step(self, tokens: torch.Tensor, plan: StepPlan) -> None:
        """Run one denoising step over ``tokens`` (B, T); updates caches and ``self.hidden``."""
        model, cfg, backend, policy = self.model, self.model.config, self.backend, self.policy
        lo, hi, rows = self._live(plan)
        self.last_plan = plan
        prompt_len = self.prompt_len
        if rows is None:
            x = model.embed_tokens(tokens[:, lo:hi])  # (B, R, d)
            pos_live = self.positions[:, lo:hi]
        else:
            x = model.embed_tokens(torch.gather(tokens, 1, rows))
            pos_live = torch.gather(self.positions, 1, rows)
        batch, live = x.shape[:2]
        # select() indices are relative to the generated region; the live rows start at lo.
        gen_offset = prompt_len - lo  # 0 for region "gen", P for "all"
        selectable = rows is None and lo <= prompt_len and hi == self.total_len
        rope = (model.rope_cos, model.rope_sin)
        hq, dh = cfg.n_heads, cfg.head_dim
        kv_width = cfg.n_kv_heads * cfg.head_dim
        expanded = False
        for li, layer in enumerate(model.layers):
            h = rms_norm(x, layer.attn_norm, cfg.norm_eps, backend=backend)
            w_k, w_v = layer.w_kv[:kv_width], layer.w_kv[kv_width:]
            b_k = b_v = None
            if layer.b_kv is not None:
                b_k, b_v = layer.b_kv[:kv_width], layer.b_kv[kv_width:]
            # V of every live row first when the plan needs it densely, so select() can read it.
            v_dense = not plan.sparse_kv or plan.dense_v or expanded
            v_new = gather_linear(h, None, w_v, b_v, backend=backend) if v_dense else None
            self.layer_values = v_new
            sel = None if expanded else policy.select(li, h, plan)
            self.layer_values = None
            if sel is not None and self.branch is None:
                raise ValueError(f"policy {policy!r}: select() returned rows but needs_branch_cache is False")
            if sel is not None and not selectable:
                raise ValueError(
                    f"policy {policy!r}: select() returned rows for a plan whose live rows do not cover "
                    "the generated region contiguously"
                )
            if sel is not None and gen_offset:
                # Region "all": every prompt row is recomputed, plus the selected generated rows.
                prompt_rows = torch.arange(gen_offset, device=sel.device).expand(batch, -1)
                q_rows = torch.cat([prompt_rows, sel + gen_offset], dim=1)
            else:
                q_rows = sel
            pos_q = pos_live if q_rows is None else torch.gather(pos_live, 1, q_rows)
            n_q = live if q_rows is None else q_rows.shape[1]

            kv_rows = q_rows if (plan.sparse_kv and not expanded) else None
            kv_pos = pos_q if kv_rows is not None else pos_live
            k_new = gather_linear(
                h, kv_rows, w_k, b_k, rope=rope, positions=kv_pos, backend=backend, check_indices=False
            )
            if v_new is None:
                v_new = gather_linear(h, kv_rows, w_v, b_v, backend=backend, check_indices=False)
            k_layer, v_layer = self.k_cache[li], self.v_cache[li]  # (B, T, Hkv, Dh), contiguous
            self._write_rows(k_layer, k_new, lo, rows, kv_rows)
            self._write_rows(v_layer, v_new, lo, rows, None if v_dense else kv_rows)

            q = gather_linear(
                h, q_rows, layer.w_q, layer.b_q, rope=rope, positions=pos_q, backend=backend,
                check_indices=False,
            )  # fmt: skip
            self.expanded = expanded  # tells attention_rows() which row space the queries are in
            prob_rows = policy.attention_rows(li, plan)
            attn, probs = sparse_attention(
                q.view(batch, n_q, hq, dh), k_layer, v_layer, self.key_padding, prob_rows=prob_rows,
                backend=backend, check_indices=False,
            )  # fmt: skip
            if probs is not None:
                policy.observe_attention(li, probs)
            o = gather_linear(attn.reshape(batch, n_q, hq * dh), None, layer.w_o, layer.b_o, backend=backend)
            if q_rows is None:
                y = x + o
            else:
                y = torch.gather(x, 1, q_rows.unsqueeze(-1).expand(-1, -1, x.shape[-1])) + o
            g = rms_norm(y, layer.ffn_norm, cfg.norm_eps, backend=backend)
            ffn = gather_linear(
                gather_swiglu(g, None, layer.w_gate, layer.w_up, backend=backend), None, layer.w_down,
                backend=backend,
            )  # fmt: skip
            delta = o + ffn
            if sel is None:
                x = x + delta
                if self.branch is not None and rows is None and hi == self.total_len:
                    # The branch cache covers the generated region [P, T).
                    first = max(lo, prompt_len)
                    self.branch[li][:, first - prompt_len :].copy_(delta[:, first - lo :])
            else:
                x_gen = scatter_residual(
                    x[:, gen_offset:], self.branch[li], sel, delta[:, gen_offset:], backend=backend,
                    check_indices=False,
                )  # fmt: skip
                if gen_offset:  # region "all": the prompt rows were all recomputed
                    x_gen = torch.cat([x[:, :gen_offset] + delta[:, :gen_offset], x_gen], dim=1)
                x = x_gen

            self.layer_rows[li] += n_q * batch
            k_count = n_q if kv_rows is not None else live
            self.flops += self._layer_flops(batch, n_q, k_count, live if v_dense else k_count)

            if self.layer_out is not None:
                self._write_rows(self.layer_out[li], x, lo, rows, None)
                if not expanded and policy.expand_after(li, plan) and li + 1 < len(model.layers):
                    # Deeper layers recompute every position from this layer's (partly cached) output.
                    expanded = True
                    x = self.layer_out[li].clone()
                    lo, hi, rows, live = 0, self.total_len, None, self.total_len
                    pos_live = self.positions
                    gen_offset, selectable = prompt_len, False
        self._write_rows(self.hidden, x, lo, rows, None)
        self.fresh.zero_()
        if rows is None:
            self.fresh[:, lo:hi] = True
        else:
            self.fresh.scatter_(1, rows, True)
        self.expanded = expanded

    # ------------------------------------------------------------------------------------------
    def decide(
        self,
        positions: torch.Tensor,
        *,
        temperature: float = 0.0,
        seed: int | torch.Tensor = 0,
        measure: str = "max_prob",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted token and confidence at ``positions`` (B, m) of the last computed hidden states.

        measure: the confidence the unmasking rule ranks by (the references' choices): "max_prob"
        (the chosen token's probability, fused kernel), "margin" (top-1 minus top-2 probability) or
        "neg_entropy" (``sum p log(p + 1e-10)``); the last two are computed from the decision rows'
        logits in fp32 (``B x m x V``, the references' own cost), with the temperature applied.

        Dream-style models (``config.shift_logits``) read the hidden state one position earlier, so
        the result always means "the prediction for token ``positions``". A plan with
        ``first_gen_own_logit`` reads generated token 0 (position ``P``) from its own position.
        """
        model, cfg = self.model, self.model.config
        src = positions - 1 if cfg.shift_logits else positions
        if cfg.shift_logits and self.last_plan is not None and self.last_plan.first_gen_own_logit:
            src = torch.where(positions == self.prompt_len, positions, src)
        rows = torch.gather(self.hidden, 1, src.unsqueeze(-1).expand(-1, -1, self.hidden.shape[-1]))
        normed = rms_norm(rows, model.final_norm, cfg.norm_eps, backend=self.backend)
        self.flops += 2 * rows.shape[0] * rows.shape[1] * cfg.d_model * model.lm_head.shape[0]
        token, conf = token_confidence(
            normed, model.lm_head, None, temperature=temperature, seed=seed, suppress_token=model.mask_id,
            backend=self.backend, check_indices=False,
        )  # fmt: skip
        if measure != "max_prob":
            conf = confidence_measure(normed, model.lm_head, measure, temperature)
        if self.policy.decide_fresh_only:
            # A stale hidden state must never be committed: its confidence drops below every fresh one.
            conf = conf.masked_fill(~torch.gather(self.fresh, 1, src), float("-inf"))
        return token, conf
