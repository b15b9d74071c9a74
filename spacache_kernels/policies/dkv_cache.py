"""dKV-Cache-Decode (Ma et al., arXiv 2505.15781): delayed caching of decoded tokens.

A decoded token's K/V are reused from the step after the one that decoded it; full forwards at the
first two steps of every block and every ``refresh_interval`` steps (8 for LLaDA, 4 for Dream);
``variant="prefill"`` caches the prompt only. Rules: ``docs/policies.md`` ("Rules of each policy",
``dkv_decode``).
"""

from __future__ import annotations

from dataclasses import dataclass

from spacache_kernels.decoding import settings_of
from spacache_kernels.policies._rows import rows_from_mask
from spacache_kernels.policies.base import CachePolicy, DecodeState, StepPlan, check_positive_int

VARIANTS = ("decode", "prefill")


@dataclass(repr=False)
class DKVCacheDecode(CachePolicy):
    """dKV-Cache policy (rules: docs/policies.md, ``dkv_decode``).

    Args:
        refresh_interval: R, full-forward period within a block (decode variant).
        variant: "decode" (delayed decoded-token cache) or "prefill" (prompt-only cache).
    """

    name = "dkv_decode"
    row_state = {"_masked_now": 0}
    presets = settings_of("dkv_decode")
    lockstep_blocks = True
    decide_fresh_only = True

    refresh_interval: int = 8
    variant: str = "decode"
    backend: str | None = None

    def __post_init__(self):
        check_positive_int("refresh_interval", self.refresh_interval)
        if self.variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {VARIANTS}, got {self.variant!r}")

    def reset(self, model, shape) -> None:
        super().reset(model, shape)
        self._masked_prev = None  # (B, T) bool: masked at the start of the previous step
        self._masked_now = None
        # Their per-row counts when the host knows them (DecodeState.masked_count), else None.
        self._count_prev = self._count_now = None

    def begin_step(self, state: DecodeState) -> None:
        super().begin_step(state)
        self._masked_prev, self._count_prev = self._masked_now, self._count_now
        self._masked_now, self._count_now = state.tokens == state.mask_id, state.masked_count

    def plan(self, step: int) -> StepPlan:
        if self.variant == "prefill":
            return StepPlan(region="all", kind="full") if step == 0 else StepPlan(region="gen", kind="gen")
        i = self.state.step_in_block
        if i <= 1 or i % self.refresh_interval == 0 or self._masked_prev is None:
            return StepPlan(region="all", kind="full")
        # Every row has the same masked count under the fixed-count rule: the set's width is known on
        # the host then (no sync); otherwise rows_from_mask reads the largest count.
        count = None if self._count_prev is None else max(self._count_prev, 1)
        return StepPlan(region="all", kind="cached", rows=rows_from_mask(self._masked_prev, count))
