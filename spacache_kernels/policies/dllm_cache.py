"""dLLM-Cache (Liu et al., arXiv 2506.06295): long-interval prompt cache, short-interval response
cache, and V-verify adaptive updates in between.

Rules (ALGORITHMS.md; the authors' hooks on LLaDA / Dream):

* Cached per layer: K and V of every token, and the attention + FFN outputs of the response
  (generated) tokens (held as their sum, the runtime's branch cache: a token's layer output is
  ``input + attn_out + ffn_out`` either way).
* Step counter ``n`` from 1 (``n = step + 1``): prompt refresh when ``(n - 1) % prompt_interval == 0``,
  response refresh when ``(n - 1) % gen_interval == 0``. Layer 0 always refreshes (its input is the
  token embedding, so recomputing the unchanged prompt there is a no-op and is skipped).
* Otherwise V-verify per layer: V of every response token is computed, ``s_i = cos(V_new_i,
  V_cached_i)`` against the cached V, and the ``int(G * ratio)`` tokens with the lowest ``s`` get Q, K,
  attention and FFN recomputed; V of every response token is replaced, the recomputed K and branch
  outputs are written into the caches, every other token reuses its cached branch output.
* A prompt refresh without a response refresh recomputes the whole prompt plus the V-verified
  response tokens in one pass.

Defaults: ratio 0.25, (prompt_interval, gen_interval) = (50, 7) for LLaDA-Instruct GSM8K (gen 256,
steps 256, block 8). Presets: ``DLLMCache.from_preset("llada-base")`` etc. (:data:`PRESETS`).

Implementation notes: the cosine reads the fresh V that the runtime computes anyway (one V GEMM per
layer, with the bias where the model has one) against the runtime's V cache, so the policy keeps no
copy of its own; the selection is a stable sort (ties go to the lower position).
"""

from __future__ import annotations

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

    def select(self, layer, normed, plan):
        if layer == 0 or plan.kind in ("full", "gen") or self.budget is None:
            return None
        runtime, prompt_len = self.runtime, self.shape.prompt_len
        values = runtime.layer_values  # (B, R, kv_width): fresh V of the live rows, not yet written
        v_new = values[:, prompt_len:] if plan.region == "all" else values
        batch, gen_len, width = v_new.shape
        v_cached = runtime.v_cache[layer][:, prompt_len:].reshape(batch, gen_len, width)
        self.flops += 3 * batch * gen_len * width  # dot product and two norms
        return drift_bottom_k(v_new, v_cached, self.budget)

    def __repr__(self) -> str:
        return (
            f"DLLMCache(prompt_interval={self.prompt_interval}, gen_interval={self.gen_interval}, "
            f"ratio={self.ratio})"
        )
