"""dLLM-Cache (Liu et al., arXiv 2506.06295): long-interval prompt cache, short-interval response
cache, and V-verify adaptive updates in between.

Prompt and response refresh on their own periods (``prompt_interval``, ``gen_interval``); in the other
steps each layer recomputes the ``int(G * ratio)`` response tokens whose fresh V differs most (cosine)
from the cached V and reuses the others' cached attention + FFN output. Rules, defaults (50, 7,
ratio 0.25) and the handling of Dream's shifted logits: ``docs/policies.md`` ("Rules of each
policy", ``dllm_cache``); the per-model intervals are entries of
:data:`spacache_kernels.decoding.PUBLISHED`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spacache_kernels.decoding import settings_of
from spacache_kernels.policies._rows import drift_bottom_k
from spacache_kernels.policies.base import (
    CachePolicy,
    GenerationShape,
    StepPlan,
    check_fraction,
    check_positive_int,
)


@dataclass(repr=False)
class DLLMCache(CachePolicy):
    """dLLM-Cache policy (rules: docs/policies.md, ``dllm_cache``).

    Args:
        prompt_interval: Kp, steps between prompt refreshes.
        gen_interval: Kr, steps between response refreshes.
        ratio: rho in (0, 1], the fraction of response tokens V-verify recomputes.
        backend: backend of the policy's own ops (None: generate()'s).
    """

    name = "dllm_cache"
    row_state = {"_deeper": 0, "_refresh_branch0": 0}
    presets = settings_of("dllm_cache")
    needs_branch_cache = True

    prompt_interval: int = 50
    gen_interval: int = 7
    ratio: float = 0.25
    backend: str | None = None

    def __post_init__(self):
        check_positive_int("prompt_interval", self.prompt_interval)
        check_positive_int("gen_interval", self.gen_interval)
        self.ratio = check_fraction("ratio", self.ratio)

    def reset(self, model, shape: GenerationShape) -> None:
        super().reset(model, shape)
        budget = int(shape.gen_len * self.ratio)
        self.budget = None if budget >= shape.gen_len else budget
        self.shift = bool(model.config.shift_logits)
        # Shifted logits only, updated in place (a captured CUDA graph replays into the same memory):
        # (B, d) P - 1's state at the last prompt refresh minus its layer-0 branch, and that branch.
        d, dt = model.config.d_model, model.dtype
        self._deeper = torch.zeros(shape.batch, d, dtype=dt, device=shape.device) if self.shift else None
        self._refresh_branch0 = torch.zeros_like(self._deeper) if self.shift else None
        self._prompt_refreshed = False  # set while tracing a prompt-refresh step, read by end_step

    def plan(self, step: int) -> StepPlan:
        prompt = step % self.prompt_interval == 0
        gen = step % self.gen_interval == 0
        if prompt and gen:
            return StepPlan(region="all", kind="full")
        if gen:
            return StepPlan(region="gen", kind="gen")
        partial = self.budget is not None
        region = "all" if prompt else "gen"
        kind = "prompt" if prompt else "partial"
        return StepPlan(region=region, kind=kind, sparse_kv=partial, dense_v=partial)

    def select(self, ctx):
        layer, plan = ctx.layer, ctx.plan
        if layer == 1 and self.shift:
            # Layer 0's K/V of this step are written by now (select runs before layer 1's writes).
            self._prompt_end(plan)
        if layer == 0 or plan.kind in ("full", "gen") or self.budget is None:
            return None
        prompt_len = self.shape.prompt_len
        values = ctx.values  # (B, R, kv_width): fresh V of the live rows, not yet written
        v_new = values[:, prompt_len:] if plan.region == "all" else values
        batch, gen_len, width = v_new.shape
        v_cached = ctx.v_cache[:, prompt_len:].reshape(batch, gen_len, width)
        self.flops += 3 * batch * gen_len * width  # dot product and two norms
        return drift_bottom_k(v_new, v_cached, self.budget)

    def _prompt_end(self, plan) -> None:
        """Shifted logits: keep position P - 1 as the reference has it (docs/policies.md)."""
        runtime, prompt_end = self.runtime, self.shape.prompt_len - 1
        branch0 = self._layer0_branch(prompt_end)
        if plan.region == "all":  # prompt refresh: P - 1 runs through every layer in this step
            self._refresh_branch0.copy_(branch0)
            self._prompt_refreshed = True  # end_step keeps the deeper layers' part of its state
            return
        # Not recomputed by the runtime in this step, so decide() reads this value.
        runtime.hidden[:, prompt_end] = self._deeper + branch0

    def end_step(self, state) -> None:
        if self._prompt_refreshed:
            # runtime.hidden holds P - 1's state of the refresh until the next step's end; its deeper
            # layers' part is what every step up to the next refresh adds to its fresh layer-0 branch.
            prompt_end = self.shape.prompt_len - 1
            self._deeper.copy_(self.runtime.hidden[:, prompt_end] - self._refresh_branch0)
            self._prompt_refreshed = False

    def _layer0_branch(self, pos: int) -> torch.Tensor:
        """(B, d) attention + FFN output of layer 0 for the token at ``pos``, against the step's
        layer-0 K/V cache (the runtime's own math for one row)."""
        # The runtime's unvalidated launchers: the public ops' index checks would read the positions
        # on the host in every step.
        model, cfg, runtime, ops = self.model, self.model.config, self.runtime, self.runtime.ops
        layer = model.layers[0]
        x = model.embed_tokens(self.state.tokens[:, pos : pos + 1])  # (B, 1, d)
        h = ops.rms_norm(x, layer.attn_norm, float(cfg.norm_eps))
        q = ops.linear(
            h, None, layer.w_q, layer.b_q, rope=(model.rope_cos, model.rope_sin),
            positions=runtime.positions[:, pos : pos + 1],
        )  # fmt: skip
        batch = x.shape[0]
        attn, _ = ops.attention(
            q.view(batch, 1, cfg.n_heads, cfg.head_dim), runtime.k_cache[0], runtime.v_cache[0],
            runtime.key_padding, None,
        )  # fmt: skip
        o = ops.linear(attn.reshape(batch, 1, -1), None, layer.w_o, layer.b_o)
        g = ops.rms_norm(x + o, layer.ffn_norm, float(cfg.norm_eps))
        f = ops.linear(ops.swiglu(g, None, layer.w_gate, layer.w_up), None, layer.w_down, None)
        self.flops += runtime._layer_flops(batch, 1, 0, 0)
        return (o + f)[:, 0]
