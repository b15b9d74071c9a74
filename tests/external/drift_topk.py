"""A caching policy written outside the package: full refresh every ``refresh`` steps, otherwise per
layer the ``ratio`` share of generated tokens whose layer input (the raw residual stream) drifted
most in L2 since that layer last saw it. Used by name as ``tests.external.drift_topk:DriftTopK``."""

from __future__ import annotations

import torch

from spacache_kernels.policies import CachePolicy, LayerContext, StepPlan


class DriftTopK(CachePolicy):
    name = "drift_topk"
    needs_branch_cache = True  # select() returns rows: the runtime keeps the others' branch output
    row_state = {"seen": 1}  # (L, B, G, d): trimmed by the base class when finished rows leave

    def __init__(self, refresh: int = 4, ratio: float = 0.25, backend=None):
        self.refresh, self.ratio, self.backend = refresh, ratio, backend

    def reset(self, model, shape) -> None:
        super().reset(model, shape)
        cfg = model.config
        self.seen = torch.zeros(cfg.n_layers, shape.batch, shape.gen_len, cfg.d_model, device=shape.device)
        self.k = max(1, int(self.ratio * shape.gen_len))

    def plan(self, step: int) -> StepPlan:
        if step % self.refresh == 0:
            return StepPlan(region="all", kind="full")  # prompt and generated tokens: every cache rebuilt
        return StepPlan(region="gen", kind="partial")  # the prompt's K/V stay cached

    def select(self, ctx: LayerContext) -> torch.Tensor | None:
        raw = ctx.raw[:, ctx.gen].float()  # (B, G, d): this layer's input for the generated tokens
        seen = self.seen[ctx.layer]
        if ctx.plan.kind == "full" or ctx.layer == 0:
            seen.copy_(raw)
            return None
        drift = (raw - seen).norm(dim=-1)  # (B, G)
        rows = drift.topk(self.k, dim=1).indices.sort(dim=1).values
        idx = rows.unsqueeze(-1).expand(-1, -1, raw.shape[-1])
        seen.scatter_(1, idx, raw.gather(1, idx))  # the recomputed rows' inputs are now the seen ones
        return rows
