"""Fast-dLLM (Wu et al., arXiv 2505.22618): block-wise approximate KV cache, prefix and dual.

A full forward at every block start rebuilds the K/V; the other steps forward the current block and
the suffix (prefix cache) or the block alone (dual cache). Rules, the Dream block-start commit and
the paper's setting (block 32, threshold 0.9: decoding arguments, entries ``fast_dllm_*`` of
:data:`spacache_kernels.decoding.PUBLISHED`): ``docs/policies.md`` ("Rules of each policy").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spacache_kernels.decoding import settings_of
from spacache_kernels.policies.base import CachePolicy, DecodeState, StepPlan

DREAM_BLOCK_START = ("first_token", "rule")


@dataclass(repr=False)
class _FastDLLM(CachePolicy):
    """Args: dream_block_start: "first_token" (the reference, Dream only) or "rule"; backend."""

    lockstep_blocks = True
    dual = False

    dream_block_start: str = "first_token"
    backend: str | None = None

    def __post_init__(self):
        if self.dream_block_start not in DREAM_BLOCK_START:
            raise ValueError(
                f"dream_block_start: expected one of {DREAM_BLOCK_START}, got {self.dream_block_start!r}"
            )

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


class FastDLLMPrefix(_FastDLLM):
    """Fast-dLLM prefix cache: per step forward the current block and the suffix."""

    name = "fast_dllm_prefix"
    presets = settings_of("fast_dllm_prefix")


class FastDLLMDual(_FastDLLM):
    """Fast-dLLM dual cache: per step forward only the current block."""

    name = "fast_dllm_dual"
    presets = settings_of("fast_dllm_dual")
    dual = True
