"""Fast-dLLM (Wu et al., arXiv 2505.22618): block-wise approximate KV cache, prefix and dual.

Rules (ALGORITHMS.md; the authors' LLaDA / Dream generation code):

* At every block start one full forward over all tokens rebuilds every layer's K/V; that forward
  also decodes the step (its logits are the step's logits), so a refresh costs no extra pass.
* Prefix cache (:class:`FastDLLMPrefix`): the K/V of everything before the current block stay frozen;
  each other step forwards the block and the whole (masked) suffix after it and rewrites their K/V.
* Dual cache (:class:`FastDLLMDual`): the suffix K/V are frozen too; each other step forwards only
  the block's tokens and overwrites their K/V slots.
* Blocks advance in lockstep across the batch (as in the reference), also under threshold decoding.

Defaults (the paper's setting): block 32, threshold 0.9, gen 256 / 512; these are ``generate()``
arguments (:data:`RECOMMENDED`), the policies themselves have no parameters.
"""

from __future__ import annotations

from spacache_kernels.policies.base import CachePolicy, StepPlan

RECOMMENDED = {"block_length": 32, "threshold": 0.9}


class _FastDLLM(CachePolicy):
    lockstep_blocks = True
    dual = False

    def __init__(self, backend=None):
        self.backend = backend

    def plan(self, step: int) -> StepPlan:
        state = self.state
        if state is None or state.step_in_block == 0:
            return StepPlan(region="all", kind="full")
        start = self.shape.prompt_len + state.block_index * state.block_length
        stop = start + state.block_length if self.dual else self.shape.prompt_len + self.shape.gen_len
        return StepPlan(region=(start, stop), kind="dual" if self.dual else "prefix")


class FastDLLMPrefix(_FastDLLM):
    """Fast-dLLM prefix cache: per step forward the current block and the suffix."""

    name = "fast_dllm_prefix"


class FastDLLMDual(_FastDLLM):
    """Fast-dLLM dual cache: per step forward only the current block."""

    name = "fast_dllm_dual"
    dual = True
