"""dLLM-Cache (Liu et al., arXiv 2506.06295): long-interval prompt cache, short-interval response
cache, and V-verify adaptive updates in between.

Rules (docs/policies.md; the authors' hooks on LLaDA / Dream):

* Cached per layer: K and V of every token, and the attention + FFN outputs of the response
  (generated) tokens (held as their sum, the runtime's branch cache: a token's layer output is
  ``input + attn_out + ffn_out`` either way).
* Step counter ``n`` from 1 (``n = step + 1``): prompt refresh when ``(n - 1) % prompt_interval == 0``,
  response refresh when ``(n - 1) % gen_interval == 0``. Layer 0 always refreshes prompt and
  response. In between prompt refreshes every prompt token's residual stream is carried on: its
  output is the fresh layer-0 output plus the cached attention + FFN outputs of the deeper layers.
  For LLaDA-layout models no prompt state reaches a decision, so the prompt is simply not run
  between its refreshes. For shifted-logit models (Dream) position ``P - 1`` predicts generated
  token 0, so its state is rebuilt as the reference has it: ``embedding + fresh layer-0 branch +
  the deeper layers' branches cached at the last prompt refresh`` (the layer-0 branch of that one
  row is recomputed against the step's layer-0 K/V; nothing else of the prompt runs).
* Otherwise V-verify per layer: V of every response token is computed, ``s_i = cos(V_new_i,
  V_cached_i)`` against the cached V, and the ``int(G * ratio)`` tokens with the lowest ``s`` get Q, K,
  attention and FFN recomputed; V of every response token is replaced, the recomputed K and branch
  outputs are written into the caches, every other token reuses its cached branch output.
* A prompt refresh without a response refresh recomputes the whole prompt plus the V-verified
  response tokens in one pass.

Defaults: ratio 0.25, (prompt_interval, gen_interval) = (50, 7) for LLaDA-Instruct GSM8K (gen 256,
steps 256, block 8). Presets: ``DLLMCache.from_preset("llada-base")`` etc. (:data:`PRESETS`).

Deliberate deviation: the mask token is never predicted (the reference's argmax runs over the whole
vocabulary and can "commit" the mask id, leaving the position masked).

Implementation notes: the cosine reads the fresh V that the runtime computes anyway (one V GEMM per
layer, with the bias where the model has one) against the runtime's V cache, so the policy keeps no
copy of its own; the selection is a stable sort (ties go to the lower position).
"""

from __future__ import annotations

import torch

from spacache_kernels.ops.attention import sparse_attention
from spacache_kernels.ops.linear import gather_linear, gather_swiglu
from spacache_kernels.ops.norm import rms_norm
from spacache_kernels.policies._rows import drift_bottom_k
from spacache_kernels.policies.base import (
    CachePolicy,
    GenerationShape,
    StepPlan,
    check_fraction,
    check_positive_int,
)

# (prompt_interval, gen_interval) published per model and task.
PRESETS: dict[str, dict] = {
    "llada-instruct": {"prompt_interval": 50, "gen_interval": 7},
    "llada-base": {"prompt_interval": 100, "gen_interval": 6},
    "dream-instruct": {"prompt_interval": 25, "gen_interval": 2},
    "dream-base": {"prompt_interval": 100, "gen_interval": 8},
}


class DLLMCache(CachePolicy):
    """dLLM-Cache policy (see the module docstring).

    Args:
        prompt_interval: Kp, steps between prompt refreshes.
        gen_interval: Kr, steps between response refreshes.
        ratio: rho in (0, 1], the fraction of response tokens V-verify recomputes.
        backend: backend of the policy's own ops (None: generate()'s).
    """

    name = "dllm_cache"
    row_state = {"_deeper": 0, "_refresh_branch0": 0}
    presets = PRESETS
    needs_branch_cache = True

    def __init__(self, prompt_interval: int = 50, gen_interval: int = 7, ratio: float = 0.25, backend=None):
        self.prompt_interval = check_positive_int("prompt_interval", prompt_interval)
        self.gen_interval = check_positive_int("gen_interval", gen_interval)
        self.ratio = check_fraction("ratio", ratio)
        self.backend = backend

    def reset(self, model, shape: GenerationShape) -> None:
        super().reset(model, shape)
        budget = int(shape.gen_len * self.ratio)
        self.budget = None if budget >= shape.gen_len else budget
        self.shift = bool(model.config.shift_logits)
        self._deeper = None  # (B, d): P - 1's state at the last prompt refresh minus its layer-0 branch
        self._refresh_branch0 = None  # (B, d): P - 1's layer-0 branch at the last prompt refresh

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
        """Shifted logits: keep position P - 1 as the reference has it (see the module docstring)."""
        runtime, prompt_end = self.runtime, self.shape.prompt_len - 1
        branch0 = self._layer0_branch(prompt_end)
        if plan.region == "all":  # prompt refresh: P - 1 runs through every layer in this step
            self._refresh_branch0, self._deeper = branch0, None
            return
        if self._deeper is None:  # first step after a refresh: runtime.hidden still holds its result
            self._deeper = runtime.hidden[:, prompt_end] - self._refresh_branch0
        # Not recomputed by the runtime in this step, so decide() reads this value.
        runtime.hidden[:, prompt_end] = self._deeper + branch0

    def _layer0_branch(self, pos: int) -> torch.Tensor:
        """(B, d) attention + FFN output of layer 0 for the token at ``pos``, against the step's
        layer-0 K/V cache (the runtime's own math for one row)."""
        model, cfg, runtime, backend = self.model, self.model.config, self.runtime, self.runtime.backend
        layer = model.layers[0]
        x = model.embed_tokens(self.state.tokens[:, pos : pos + 1])  # (B, 1, d)
        h = rms_norm(x, layer.attn_norm, cfg.norm_eps, backend=backend)
        q = gather_linear(
            h, None, layer.w_q, layer.b_q, rope=(model.rope_cos, model.rope_sin),
            positions=runtime.positions[:, pos : pos + 1], backend=backend,
        )  # fmt: skip
        batch = x.shape[0]
        attn, _ = sparse_attention(
            q.view(batch, 1, cfg.n_heads, cfg.head_dim), runtime.k_cache[0], runtime.v_cache[0],
            runtime.key_padding, backend=backend,
        )  # fmt: skip
        o = gather_linear(attn.reshape(batch, 1, -1), None, layer.w_o, layer.b_o, backend=backend)
        g = rms_norm(x + o, layer.ffn_norm, cfg.norm_eps, backend=backend)
        f = gather_linear(gather_swiglu(g, None, layer.w_gate, layer.w_up, backend=backend), None,
                          layer.w_down, backend=backend)  # fmt: skip
        self.flops += runtime._layer_flops(batch, 1, 0, 0)
        return (o + f)[:, 0]

    def __repr__(self) -> str:
        return (
            f"DLLMCache(prompt_interval={self.prompt_interval}, gen_interval={self.gen_interval}, "
            f"ratio={self.ratio})"
        )
