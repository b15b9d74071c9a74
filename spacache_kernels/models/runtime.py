"""The cached denoising step: one generation's caches and the per-layer hot path.

Per layer, for the live rows ``x`` (B, R, d) (a contiguous region of positions, or a per-row index set)
and the generated rows ``sel`` the policy picks (``None`` = all):

    h   = rms_norm(x)                                    ops.rms_norm
    K|V = gather_linear(h, None, Wkv, RoPE on K's columns)  first, one launch, when K/V are dense
    V   = gather_linear(h, None, Wv)                     first, when only V is dense (dLLM-Cache)
    sel = policy.select(ctx)                             (SPA: fused proxy projection + drift top-k;
                                                          dLLM-Cache: cosine of V against the V cache)
    K|V = gather_linear(h, sel, Wkv, RoPE on K's columns)   sparse K/V: one launch over the rows
          (K alone with dense V), written into the preallocated K/V cache at their absolute positions
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

from dataclasses import dataclass

import torch

from spacache_kernels.contract import LayerContext, StepPlan, check_selection, debug_checks_enabled
from spacache_kernels.ops.confidence import token_confidence
from spacache_kernels.ops.launchers import launchers_for

MEASURES = ("max_prob", "margin", "neg_entropy")


@dataclass
class _Live:
    """The live rows of a step: ``[lo, hi)`` (or ``rows`` (B, n) absolute positions), their RoPE
    positions (B, R), their count R, and where the generated region starts among them."""

    lo: int
    hi: int
    rows: torch.Tensor | None
    positions: torch.Tensor
    count: int
    gen_offset: int  # select() indices are relative to the generated region; the live rows start at lo
    selectable: bool


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

    def __init__(self, model, attention_mask: torch.Tensor, prompt_len: int, policy, backend):
        cfg = model.config
        self.model = model
        self.policy = policy
        # Backend resolved and launchers chosen once per generation (ops.launchers); the hot path
        # below calls them unvalidated: shapes, dtypes and devices are fixed by the model and the plan.
        self.ops = launchers_for(backend, model.lm_head, head_dim=cfg.head_dim)
        self.backend = self.ops.backend
        self.norm_eps = float(cfg.norm_eps)
        self.rope = (model.rope_cos, model.rope_sin)
        self.kv_width = cfg.n_kv_heads * cfg.head_dim  # K is w_kv's first kv_width rows, V the rest
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
        self.debug = debug_checks_enabled()  # value checks of the policy's answers (host syncs)
        self.expanded = False  # whether the latest step switched to full recomputation mid-way
        self.last_plan: StepPlan | None = None  # the plan of the latest step (decide() reads it)
        # Recomputed rows per layer, summed over batch rows: host ints (torch.compile keeps the updates).
        self.layer_rows = [0] * cfg.n_layers
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
        self.ops.scatter_rows_(cache.view(batch, -1, width), target, new)

    def step(self, tokens: torch.Tensor, plan: StepPlan) -> None:
        """Run one denoising step over ``tokens`` (B, T); updates caches and ``self.hidden``."""
        self.last_plan = plan
        x, live = self._embed_live(tokens, plan)
        expanded = False
        n_layers = len(self.model.layers)
        for li in range(n_layers):
            x, ctx = self._layer(li, x, plan, live, expanded)
            if self.layer_out is None:
                continue
            self._write_rows(self.layer_out[li], x, live.lo, live.rows, None)
            if not expanded and self.policy.expand_after(ctx) and li + 1 < n_layers:
                # Deeper layers recompute every position from this layer's (partly cached) output.
                expanded = True
                x = self.layer_out[li].clone()
                live = _Live(0, self.total_len, None, self.positions, self.total_len, self.prompt_len, False)
        self._finish(x, live)
        self.expanded = expanded

    def _embed_live(self, tokens: torch.Tensor, plan: StepPlan) -> tuple[torch.Tensor, _Live]:
        """The embedded live rows (B, R, d) of ``tokens`` (B, T) and where they sit."""
        lo, hi, rows = self._live(plan)
        if rows is None:
            x = self.model.embed_tokens(tokens[:, lo:hi])
            pos_live = self.positions[:, lo:hi]
        else:
            x = self.model.embed_tokens(torch.gather(tokens, 1, rows))
            pos_live = torch.gather(self.positions, 1, rows)
        selectable = rows is None and lo <= self.prompt_len and hi == self.total_len
        return x, _Live(lo, hi, rows, pos_live, x.shape[1], self.prompt_len - lo, selectable)

    def _finish(self, x: torch.Tensor, live: _Live) -> None:
        """Keep the last layer's output of the live rows and mark them fresh (decide() reads both)."""
        self._write_rows(self.hidden, x, live.lo, live.rows, None)
        self.fresh.zero_()
        if live.rows is None:
            self.fresh[:, live.lo : live.hi] = True
        else:
            self.fresh.scatter_(1, live.rows, True)

    def _select(self, ctx: LayerContext, live: _Live) -> torch.Tensor | None:
        """The policy's generated rows for layer ``ctx.layer`` (checked), or None (all live rows)."""
        sel = self.policy.select(ctx)
        if sel is None:
            return None
        batch = ctx.raw.shape[0]
        check_selection(
            self.policy, sel, layer=ctx.layer, batch=batch, gen_len=self.gen_len, values=self.debug
        )
        if self.branch is None:
            raise ValueError(
                f"policy {self.policy!r}: select() returned rows but needs_branch_cache is False"
            )
        if not live.selectable:
            raise ValueError(
                f"policy {self.policy!r}: select() returned rows for a plan whose live rows do not cover "
                "the generated region contiguously"
            )
        return sel

    def _query_rows(self, sel: torch.Tensor | None, live: _Live) -> torch.Tensor | None:
        """The recomputed rows (indices into the live rows): None = all, else the selected generated
        rows, preceded by every prompt row when the live rows start before the generated region."""
        if sel is None or not live.gen_offset:
            return sel
        prompt_rows = torch.arange(live.gen_offset, device=sel.device).expand(sel.shape[0], -1)
        return torch.cat([prompt_rows, sel + live.gen_offset], dim=1)

    def _kv(self, layer, h: torch.Tensor, rows, positions) -> tuple[torch.Tensor, torch.Tensor]:
        """K (RoPE applied) and V (B, n, Hkv * Dh) of the live rows ``rows`` of ``h`` (None = all) in one
        launch over the fused ``w_kv``: RoPE covers the first ``kv_width`` output columns (K) only.
        Both results are column views of one (B, n, 2 * kv_width) tensor."""
        kv = self.ops.linear(h, rows, layer.w_kv, layer.b_kv, rope=self.rope, positions=positions,
                             rope_cols=self.kv_width)  # fmt: skip
        return kv[..., : self.kv_width], kv[..., self.kv_width :]

    def _half(self, layer, second: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The K (``second=False``) or V weight and bias: a row slice of the fused ``w_kv`` / ``b_kv``."""
        part = slice(self.kv_width, None) if second else slice(None, self.kv_width)
        return layer.w_kv[part], None if layer.b_kv is None else layer.b_kv[part]

    def _layer(
        self, li: int, x: torch.Tensor, plan: StepPlan, live: _Live, expanded: bool
    ) -> tuple[torch.Tensor, LayerContext]:
        """One layer over the live rows ``x`` (B, R, d): K/V, select, cache writes, attention, FFN,
        residual. Returns the layer output (B, R', d) and the layer's context (for expand_after)."""
        ops, layer = self.ops, self.model.layers[li]
        h = ops.rms_norm(x, layer.attn_norm, self.norm_eps)
        # K and V of every live row (no sparse K/V, or the step expanded): one launch, before select()
        # so that it can read V. dLLM-Cache's V-verify (dense_v) needs V of every row but K of the
        # selected ones only: V alone first, K after select(). Otherwise both follow select().
        kv_dense = expanded or not plan.sparse_kv
        v_dense = kv_dense or plan.dense_v
        k_new = v_new = None
        if kv_dense:
            k_new, v_new = self._kv(layer, h, None, live.positions)
        elif plan.dense_v:
            v_new = ops.linear(h, None, *self._half(layer, second=True))
        gen = slice(live.gen_offset, live.count) if live.selectable else None
        ctx = LayerContext(li, plan, x, h, gen, v_new, self.k_cache[li], self.v_cache[li], self.backend,
                           expanded)  # fmt: skip
        sel = None if expanded else self._select(ctx, live)
        q_rows = self._query_rows(sel, live)
        pos_q = live.positions if q_rows is None else torch.gather(live.positions, 1, q_rows)
        n_q = live.count if q_rows is None else q_rows.shape[1]

        # K/V of the recomputed rows when they are sparse, then every new row into the caches.
        kv_rows = None if kv_dense else q_rows
        if v_new is None:
            k_new, v_new = self._kv(layer, h, kv_rows, pos_q)
        elif k_new is None:
            w_k, b_k = self._half(layer, second=False)
            k_new = ops.linear(h, kv_rows, w_k, b_k, rope=self.rope, positions=pos_q)
        self._write_rows(ctx.k_cache, k_new, live.lo, live.rows, kv_rows)
        self._write_rows(ctx.v_cache, v_new, live.lo, live.rows, None if v_dense else kv_rows)

        delta = self._attention_ffn(ctx, layer, x, h, q_rows, pos_q)
        self.layer_rows[li] += n_q * x.shape[0]
        k_count = n_q if kv_rows is not None else live.count
        self.flops += self._layer_flops(x.shape[0], n_q, k_count, live.count if v_dense else k_count)
        return self._residual(li, x, delta, sel, live), ctx

    def _attention_ffn(self, ctx: LayerContext, layer, x, h, q_rows, pos_q) -> torch.Tensor:
        """``attn_out + ffn_out`` (B, n_q, d) of the recomputed rows ``q_rows`` (None = all live rows):
        their queries against every cached key (probability rows to the policy), the output
        projection, the residual, and the SwiGLU FFN."""
        ops, cfg, policy = self.ops, self.model.config, self.policy
        batch, hq, dh = x.shape[0], cfg.n_heads, cfg.head_dim
        q = ops.linear(h, q_rows, layer.w_q, layer.b_q, rope=self.rope, positions=pos_q)
        n_q = q.shape[1]
        prob_rows = policy.attention_rows(ctx)
        attn, probs = ops.attention(q.view(batch, n_q, hq, dh), ctx.k_cache, ctx.v_cache, self.key_padding,
                                    prob_rows)  # fmt: skip
        if probs is not None:
            policy.observe_attention(ctx, probs)
        o = ops.linear(attn.reshape(batch, n_q, hq * dh), None, layer.w_o, layer.b_o)
        if q_rows is None:
            y = x + o
        else:
            y = torch.gather(x, 1, q_rows.unsqueeze(-1).expand(-1, -1, x.shape[-1])) + o
        g = ops.rms_norm(y, layer.ffn_norm, self.norm_eps)
        ffn = ops.linear(ops.swiglu(g, None, layer.w_gate, layer.w_up), None, layer.w_down, None)
        return o + ffn

    def _residual(self, li: int, x, delta, sel, live: _Live) -> torch.Tensor:
        """The layer output: ``x + delta`` for recomputed rows, ``x + cached branch`` for the others
        (the branch cache keeps ``delta`` of the generated rows for later steps)."""
        if sel is None:
            if self.branch is not None and live.rows is None and live.hi == self.total_len:
                # The branch cache covers the generated region [P, T).
                first = max(live.lo, self.prompt_len)
                self.branch[li][:, first - self.prompt_len :].copy_(delta[:, first - live.lo :])
            return x + delta
        off = live.gen_offset
        x_gen = self.ops.scatter_residual(x[:, off:], self.branch[li], sel, delta[:, off:])
        if off:  # region "all": the prompt rows were all recomputed
            x_gen = torch.cat([x[:, :off] + delta[:, :off], x_gen], dim=1)
        return x_gen

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
        normed = self.ops.rms_norm(rows, model.final_norm, self.norm_eps)
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
