"""Elastic-Cache (Nguyen-Tri et al., arXiv 2510.14973): sliding-window queries and attention-drift
triggered, depth-wise cache refresh.

Only a window of the first masked positions (plus the last step's decoded and the tracked tokens)
runs; when a tracked token's attention row drifts below ``gamma`` in some layer, every deeper layer
recomputes all tokens. Rules, defaults (window 16, gamma 0.9, track 1) and deviations:
``docs/policies.md`` ("Rules of each policy", ``elastic``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spacache_kernels.ops.reference import cosine_rows
from spacache_kernels.policies._rows import distinct_rows, rows_from_mask
from spacache_kernels.policies.base import (
    CachePolicy,
    DecodeState,
    LayerContext,
    StepPlan,
    check_fraction,
    check_positive_int,
)


@dataclass(repr=False)
class ElasticCache(CachePolicy):
    """Elastic-Cache policy (rules: docs/policies.md, ``elastic``).

    Args:
        window: beta, the number of leading masked positions that are live queries.
        gamma: attention-drift threshold in [0, 1] (cosine below it triggers the refresh).
        track_num: tracked decoded tokens per layer.
        refresh_interval: also recompute everything every this many steps (None: only at step 0, as
            the reference; an extension for long generations and for testing).
    """

    name = "elastic"
    row_state = {"tracked": 1, "cached_rows": 1, "has_cached": 1}
    lockstep_blocks = True
    decide_fresh_only = True
    needs_layer_outputs = True
    step_syncs = (
        "the live set's size (window + last commits + tracked tokens, which may coincide) is read in "
        "plan(), and the drift test decides on the host, layer by layer, whether the deeper layers "
        "switch to full recomputation (1 + one read per layer up to the trigger, per reuse step)"
    )

    window: int = 16
    gamma: float = 0.9
    track_num: int = 1
    refresh_interval: int | None = None
    backend: str | None = None

    def __post_init__(self):
        check_positive_int("window", self.window)
        if self.refresh_interval is not None:
            check_positive_int("refresh_interval", self.refresh_interval)
        self.gamma = check_fraction("gamma", self.gamma, low_open=False)
        check_positive_int("track_num", self.track_num)

    def reset(self, model, shape) -> None:
        super().reset(model, shape)
        n_layers, batch, total = model.config.n_layers, shape.batch, shape.prompt_len + shape.gen_len
        self.tracked = torch.zeros(n_layers, batch, self.track_num, dtype=torch.int64, device=shape.device)
        self.cached_rows = torch.zeros(n_layers, batch, self.track_num, total, device=shape.device)
        self.has_cached = torch.zeros(n_layers, batch, self.track_num, dtype=torch.bool, device=shape.device)
        self.triggers = 0  # layers at which a drift refresh started, summed over steps
        self._first = True

    # -- per step ------------------------------------------------------------------------------
    def begin_step(self, state: DecodeState) -> None:
        super().begin_step(state)
        masked = state.tokens == state.mask_id
        self._decoded = ~masked
        masked[:, : self.shape.prompt_len] = False
        rank = masked.long().cumsum(dim=1)
        self._window = masked & (rank <= self.window)  # (B, T) the first `window` masked positions
        # The window's query positions (B, window), padded by repeats, and which entries are distinct:
        # the same for every layer of the step.
        self._window_pos = rows_from_mask(self._window, count=self.window)
        self._window_distinct = distinct_rows(self._window_pos).unsqueeze(-1)
        self._drift = None

    def plan(self, step: int) -> StepPlan:
        if self._first or (self.refresh_interval is not None and step % self.refresh_interval == 0):
            self._full = True
            self._rows = None
            return StepPlan(region="all", kind="full")
        self._full = False
        live = self._window.clone()
        if self.state.committed is not None:
            live |= self.state.committed
        live.scatter_(1, self.tracked.permute(1, 0, 2).reshape(live.shape[0], -1), True)
        self._rows = rows_from_mask(live)
        return StepPlan(region="all", kind="window", rows=self._rows)

    def _query_index(self, positions: torch.Tensor, expanded: bool) -> torch.Tensor:
        """Indices of absolute ``positions`` (B, m) among this layer's query rows."""
        if self._rows is None or expanded:
            return positions
        return torch.searchsorted(self._rows, positions)

    def attention_rows(self, ctx: LayerContext) -> torch.Tensor:
        rows = torch.cat([self._window_pos, self.tracked[ctx.layer]], dim=1)
        return self._query_index(rows, ctx.expanded)

    def observe_attention(self, ctx: LayerContext, probs: torch.Tensor) -> None:
        layer = ctx.layer
        mean = probs.mean(dim=2)  # (B, m, T) head-averaged rows
        n_win = self._window_pos.shape[1]
        window_rows, tracked_rows = mean[:, :n_win], mean[:, n_win:]
        # Drift test of the tracked tokens against their cached rows (reuse steps only).
        if not self._full and not ctx.expanded:
            cos = cosine_rows(tracked_rows, self.cached_rows[layer])
            drift = (cos < self.gamma) & self.has_cached[layer]
            self._drift = bool(drift.any())
        else:
            self._drift = False
        self.cached_rows[layer] = tracked_rows
        self.has_cached[layer] = True
        # Re-pick the most attended decoded tokens (distinct window rows only: drop padding repeats).
        attended = (window_rows * self._window_distinct).sum(dim=1).masked_fill(~self._decoded, -1.0)
        new_tracked = attended.topk(self.track_num, dim=1).indices
        changed = new_tracked != self.tracked[layer]
        self.has_cached[layer] &= ~changed
        self.tracked[layer] = new_tracked

    def expand_after(self, ctx: LayerContext) -> bool:
        if self._drift:
            self.triggers += 1
            return True
        return False

    def end_step(self, state: DecodeState) -> None:
        self._first = False
