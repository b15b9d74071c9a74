"""Fast-dLLM (Wu et al., arXiv 2505.22618): block-wise approximate KV cache, prefix and dual.

Rules (docs/policies.md; the authors' LLaDA / Dream generation code):

* At every block start one full forward over all tokens rebuilds every layer's K/V; that forward
  also decodes the step (its logits are the step's logits), so a refresh costs no extra pass.
* Prefix cache (:class:`FastDLLMPrefix`): the K/V of everything before the current block stay frozen;
  each other step forwards the block and the whole (masked) suffix after it and rewrites their K/V.
* Dual cache (:class:`FastDLLMDual`): the suffix K/V are frozen too; each other step forwards only
  the block's tokens and overwrites their K/V slots.
* Blocks advance in lockstep across the batch (as in the reference), also under threshold decoding.
* Dream (shifted logits): the block-start forward commits the block's first token unconditionally
  (``dream/model/generation_utils_block.py``: ``x[:, current_block_start] = x0[:, current_block_start]``)
  before the threshold loop; under the fixed-count rule the rest of that step's count goes by
  confidence. ``dream_block_start="rule"`` applies the ordinary unmasking rule at the block start
  instead (this package's earlier behaviour; not the published rule). LLaDA's reference has no such
  step, so LLaDA-layout models always use the ordinary rule.

Deliberate deviation: the mask token is never predicted (the reference's argmax runs over the whole
vocabulary and can "commit" the mask id, leaving the position masked).

Defaults (the paper's setting): block 32, threshold 0.9, gen 256 / 512; these are ``generate()``
arguments (:data:`RECOMMENDED`), the policies themselves have no parameters.
"""

from __future__ import annotations

import torch

from spacache_kernels.policies.base import CachePolicy, DecodeState, StepPlan

RECOMMENDED = {"block_length": 32, "threshold": 0.9}
DREAM_BLOCK_START = ("first_token", "rule")


class _FastDLLM(CachePolicy):
    """Args: dream_block_start: "first_token" (the reference, Dream only) or "rule"; backend."""

    lockstep_blocks = True
    dual = False

    def __init__(self, dream_block_start: str = "first_token", backend=None):
        if dream_block_start not in DREAM_BLOCK_START:
            raise ValueError(
                f"dream_block_start: expected one of {DREAM_BLOCK_START}, got {dream_block_start!r}"
            )
        self.dream_block_start = dream_block_start
        self.backend = backend

    def forced_commit(self, state: DecodeState) -> torch.Tensor | None:
        if not (self.model.config.shift_logits and self.dream_block_start == "first_token"):
            return None
        if state.step_in_block != 0:
            return None
        tokens = state.tokens
        forced = torch.zeros(tokens.shape[0], state.block_length, dtype=torch.bool, device=tokens.device)
        forced[:, 0] = True
        return forced

    def plan(self, step: int) -> StepPlan:
        state = self.state
        if state is None or state.step_in_block == 0:
            return StepPlan(region="all", kind="full")
        start = self.shape.prompt_len + state.block_index * state.block_length
        stop = start + state.block_length if self.dual else self.shape.prompt_len + self.shape.gen_len
        return StepPlan(region=(start, stop), kind="dual" if self.dual else "prefix")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dream_block_start={self.dream_block_start!r})"


class FastDLLMPrefix(_FastDLLM):
    """Fast-dLLM prefix cache: per step forward the current block and the suffix."""

    name = "fast_dllm_prefix"


class FastDLLMDual(_FastDLLM):
    """Fast-dLLM dual cache: per step forward only the current block."""

    name = "fast_dllm_dual"
    dual = True
