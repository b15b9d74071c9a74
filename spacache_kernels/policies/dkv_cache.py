"""dKV-Cache-Decode (Ma et al., arXiv 2505.15781): delayed caching of decoded tokens.

Rules (docs/policies.md; the authors' LLaDA decode script):

* Only the K/V of *decoded* tokens are reused (the prompt counts as decoded), and a token is reused
  only from the step after the one in which it was decoded: at step ``i`` the live tokens are the
  ones that were still masked at the start of step ``i - 1`` (every masked token, plus the tokens
  decoded at step ``i - 1``); all others contribute their cached K/V.
* Within each block (step counter ``i`` reset per block): a full forward at ``i = 0``, at ``i = 1``
  and whenever ``i % refresh_interval == 0``; the cache is therefore rebuilt at every block start.
* ``refresh_interval`` R = 8 for LLaDA and 4 for Dream (presets ``"llada"`` / ``"dream"``).
* ``variant="prefill"`` (Dream's dKV-Cache-Prefill): the prompt's K/V are cached at step 0 and never
  refreshed; every step recomputes the whole generated region.

Only tokens recomputed in a step may be committed (``decide_fresh_only``); the reference gives the
others confidence ``-inf``. Blocks advance in lockstep across the batch.

Deliberate deviation: the mask token is never predicted (the reference's argmax runs over the whole
vocabulary and can "commit" the mask id, leaving the position masked).
"""

from __future__ import annotations

from spacache_kernels.policies._rows import rows_from_mask
from spacache_kernels.policies.base import CachePolicy, DecodeState, StepPlan, check_positive_int

PRESETS: dict[str, dict] = {"llada": {"refresh_interval": 8}, "dream": {"refresh_interval": 4}}
VARIANTS = ("decode", "prefill")


class DKVCacheDecode(CachePolicy):
    """dKV-Cache policy (see the module docstring).

    Args:
        refresh_interval: R, full-forward period within a block (decode variant).
        variant: "decode" (delayed decoded-token cache) or "prefill" (prompt-only cache).
    """

    name = "dkv_decode"
    row_state = {"_masked_now": 0}
    presets = PRESETS
    lockstep_blocks = True
    decide_fresh_only = True

    def __init__(self, refresh_interval: int = 8, variant: str = "decode", backend=None):
        self.refresh_interval = check_positive_int("refresh_interval", refresh_interval)
        if variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        self.backend = backend

    def reset(self, model, shape) -> None:
        super().reset(model, shape)
        self._masked_prev = None  # (B, T) bool: masked at the start of the previous step
        self._masked_now = None

    def begin_step(self, state: DecodeState) -> None:
        super().begin_step(state)
        self._masked_prev = self._masked_now
        self._masked_now = state.tokens == state.mask_id

    def plan(self, step: int) -> StepPlan:
        if self.variant == "prefill":
            return StepPlan(region="all", kind="full") if step == 0 else StepPlan(region="gen", kind="gen")
        i = self.state.step_in_block
        if i <= 1 or i % self.refresh_interval == 0 or self._masked_prev is None:
            return StepPlan(region="all", kind="full")
        return StepPlan(region="all", kind="cached", rows=rows_from_mask(self._masked_prev))

    def __repr__(self) -> str:
        return f"DKVCacheDecode(refresh_interval={self.refresh_interval}, variant={self.variant!r})"
