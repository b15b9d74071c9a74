"""d2Cache (Jiang et al., arXiv 2509.23094): dual adaptive caching by certainty density and
attention rollout.

After each step the next step's token set is chosen: the ``k`` masked tokens best by cached
confidence times certainty density, the tokens just decoded, and the attention-rollout nucleus;
every other token skips the network. ``rules="reference"`` (default) reproduces the authors' code
including its slips (C1-C6), ``rules="corrected"`` fixes them. Rules, defaults (k 32, sigma 10,
rollout_p 0.1) and the published decoding: ``docs/policies.md`` ("Rules of each policy",
``d2cache``). The rollout is computed as column sums, O(L n T) per step, without any T x T product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from spacache_kernels.policies._rows import distinct_rows, rows_from_mask
from spacache_kernels.policies.base import (
    CachePolicy,
    DecodeState,
    LayerContext,
    StepPlan,
    check_positive_int,
)

RULES = ("reference", "corrected")


def certainty_density(
    decoded: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, prompt_len: int, sigma: float
) -> torch.Tensor:
    """(B, G) density of decoded positions around each generated position.

    decoded: (B, G) bool for the generated region (the prompt counts as decoded); positions: (B, T)
    the tokens' position ids; valid: (B, T) bool, False at left padding (left out of both sums, so a
    padded row scores like the same row alone). ``d_i = sum_j K(p_i - p_j) m_j / sum_j K(p_i - p_j)``.
    """
    batch = decoded.shape[0]
    pos = positions.float()
    dist = pos[:, prompt_len:, None] - pos[:, None, :]  # (B, G, T)
    kernel = torch.exp(-(dist**2) / (2 * sigma**2)) * valid[:, None, :]
    m = torch.cat([decoded.new_ones(batch, prompt_len), decoded], dim=1).float()  # (B, T)
    return torch.einsum("bgt,bt->bg", kernel, m) / kernel.sum(dim=-1)


def canvas_density(decoded: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, G) certainty density as d2Cache's reference computes it (rule C2 in docs/policies.md).

    decoded: (B, G) bool over the generated region. The canvas is ``[G ones | decoded | G pad]`` with
    the pad 1 only where the last generated token is decoded; ``d_i = sum_j c_j K(i + G - j) / Z``
    with ``K(D) = exp(-D^2 / (2 sigma^2))`` and ``Z = sum_{D=-3G}^{3G-1} K(D)`` (the reference's
    circular FFT normalises by the whole period's kernel mass). Computed directly, O(G^2), no FFT.
    """
    batch, gen_len = decoded.shape
    pad = decoded[:, -1:].float().expand(-1, gen_len)
    canvas = torch.cat([decoded.new_ones(batch, gen_len).float(), decoded.float(), pad], dim=1)  # (B, 3G)
    offsets = torch.arange(gen_len, device=decoded.device, dtype=torch.float64)
    j = torch.arange(3 * gen_len, device=decoded.device, dtype=torch.float64)
    kernel = torch.exp(-((offsets[:, None] + gen_len - j[None, :]) ** 2) / (2 * sigma**2))  # (G, 3G)
    dist = torch.arange(-3 * gen_len, 3 * gen_len, device=decoded.device, dtype=torch.float64)
    mass = torch.exp(-(dist**2) / (2 * sigma**2)).sum()
    return (canvas.double() @ kernel.T / mass).float()


def rollout_importance(
    layer_probs: list[tuple[torch.Tensor, torch.Tensor]], valid: torch.Tensor
) -> torch.Tensor:
    """Column sums of the attention rollout ``M_L ... M_1`` (B, T), without forming any T x T matrix.

    layer_probs: per layer, ``(rows (B, n) positions that ran, probs (B, n, T) head-mean rows)``;
    rows repeated as padding must be marked by zero probability rows (their weight is dropped).
    valid: (B, T) bool, False at left padding (those rows are left out of the column sums).
    ``M_l`` has ``(A_i + e_i) / sum(A_i + e_i)`` at the rows that ran and ``e_i`` elsewhere.
    """
    v = valid.float()
    for rows, probs in reversed(layer_probs):
        m_rows = probs + torch.zeros_like(probs).scatter_(2, rows.unsqueeze(-1), 1.0)
        m_rows = m_rows / m_rows.sum(dim=-1, keepdim=True)
        weight = torch.gather(v, 1, rows)  # v_i of the rows that ran
        valid = probs.sum(dim=-1) > 0
        weight = weight * valid
        # Rows that ran replace their identity contribution v_i e_i by v_i * M_l[i].
        v = v - torch.zeros_like(v).scatter_add_(1, rows, weight)
        v = v + torch.einsum("bn,bnt->bt", weight, m_rows)
    return v


def nucleus(importance: torch.Tensor, candidates: torch.Tensor, p: float) -> torch.Tensor:
    """(B, T) bool: per row the most important candidates whose cumulative share stays <= p (>= 1)."""
    imp = importance.masked_fill(~candidates, 0.0).clamp_min(0)
    share = imp / imp.sum(dim=1, keepdim=True).clamp_min(1e-30)
    ordered, order = share.sort(dim=1, descending=True, stable=True)
    keep = ordered.cumsum(dim=1) <= p
    keep[:, 0] = True
    keep &= ordered > 0
    return torch.zeros_like(candidates).scatter_(1, order, keep) & candidates


def inflate(selected: torch.Tensor, width: int) -> torch.Tensor:
    """Fill every gap of at most ``width`` unselected positions between two selected ones."""
    if width <= 0:
        return selected
    total = selected.shape[1]
    pos = torch.arange(total, device=selected.device).expand_as(selected)
    prev = torch.where(selected, pos, -1).cummax(dim=1).values
    nxt = torch.where(selected, pos, total).flip(1).cummin(dim=1).values.flip(1)
    gap = nxt - prev
    return selected | ((prev >= 0) & (nxt < total) & (gap - 1 <= width))


@dataclass(repr=False)
class D2Cache(CachePolicy):
    """d2Cache policy (rules: docs/policies.md, ``d2cache``).

    Args:
        k: masked tokens chosen by certainty density per step.
        sigma: width of the density kernel (positions).
        rollout_p: nucleus share of the attention-rollout importance, in [0, 1].
        inflate_w: fill gaps up to this width between selected tokens (0: off).
        refresh_interval: also run every token every this many steps (None: only at step 0, as the
            reference; an extension for long generations and for testing).
        rules: "reference" (C1-C3, C5, C6 of docs/policies.md, the published method) or
            "corrected".
    """

    name = "d2cache"
    row_state = {"conf": 0, "_block_masked": 0, "next_rows": 0}
    lockstep_blocks = True
    decide_fresh_only = True
    step_syncs = (
        "the next step's token set (density top-k, this step's commits, the rollout nucleus) has a "
        "data-dependent size, read once per step in end_step() to shape the next plan's rows"
    )

    k: int = 32
    sigma: float = 10.0
    rollout_p: float = 0.1
    inflate_w: int = 0
    refresh_interval: int | None = None
    rules: str = "reference"
    backend: str | None = None

    def __post_init__(self):
        rules, sigma, rollout_p, inflate_w = self.rules, self.sigma, self.rollout_p, self.inflate_w
        if rules not in RULES:
            raise ValueError(f"rules: expected one of {RULES}, got {rules!r}")
        check_positive_int("k", self.k)
        if self.refresh_interval is not None:
            check_positive_int("refresh_interval", self.refresh_interval)
        if (
            isinstance(sigma, bool)
            or not isinstance(sigma, (int, float))
            or not sigma > 0
            or not math.isfinite(sigma)
        ):
            raise ValueError(f"sigma: expected a positive finite number, got {sigma!r}")
        if isinstance(rollout_p, bool) or not isinstance(rollout_p, (int, float)) or not 0 <= rollout_p <= 1:
            raise ValueError(f"rollout_p: expected a value in [0, 1], got {rollout_p!r}")
        if isinstance(inflate_w, bool) or not isinstance(inflate_w, int) or inflate_w < 0:
            raise ValueError(f"inflate_w: expected an int >= 0, got {inflate_w!r}")
        self.sigma, self.rollout_p = float(sigma), float(rollout_p)

    def reset(self, model, shape) -> None:
        super().reset(model, shape)
        self.shift = bool(model.config.shift_logits)
        self.next_rows: torch.Tensor | None = None
        self.conf = torch.zeros(shape.batch, shape.gen_len, device=shape.device)
        self._conf_set = False  # reference rule C1: the cached confidence is the step-0 one
        self._layer_probs: list = []

    def plan(self, step: int) -> StepPlan:
        self._layer_probs = []
        batch, total = self.runtime.positions.shape
        periodic = self.refresh_interval is not None and step % self.refresh_interval == 0
        full = self.next_rows is None or periodic
        # The positions that run this step (B, n), the same for every layer: all of them, or the
        # selection (padding repeats then carry no rollout weight).
        if full:
            self._ran = torch.arange(total, device=self.shape.device).expand(batch, -1)
            self._ran_weight = None
        else:
            self._ran = self.next_rows
            self._ran_weight = distinct_rows(self._ran).unsqueeze(-1)
        self._query_rows = torch.arange(self._ran.shape[1], device=self.shape.device).expand(batch, -1)
        if full:
            return StepPlan(region="all", kind="full")
        return StepPlan(region="all", kind="sparse", rows=self._ran)

    def begin_step(self, state: DecodeState) -> None:
        super().begin_step(state)
        # C3 needs the block's still-masked positions before this step commits (tokens change in place).
        lo = (state.block_start - self.shape.prompt_len).unsqueeze(1)
        cols = lo + torch.arange(state.block_length, device=lo.device)
        gen = state.tokens[:, self.shape.prompt_len :]
        self._block_masked = torch.gather(gen, 1, cols.clamp_max(gen.shape[1] - 1)) == state.mask_id

    def attention_rows(self, ctx: LayerContext) -> torch.Tensor:
        return self._query_rows  # every query row of the step

    def observe_attention(self, ctx: LayerContext, probs: torch.Tensor) -> None:
        mean = probs.mean(dim=2)  # (B, n, T): head-averaged rows
        if self._ran_weight is not None:
            mean = mean * self._ran_weight
        self._layer_probs.append((self._ran, mean))

    def end_step(self, state: DecodeState) -> None:
        prompt_len, gen_len = self.shape.prompt_len, self.shape.gen_len
        runtime, tokens = self.runtime, state.tokens
        batch, total = tokens.shape
        reference = self.rules == "reference"
        if not (reference and self._conf_set):
            self._refresh_confidence(runtime, batch, total)
        self._conf_set = True

        remaining = tokens[:, prompt_len:] == state.mask_id  # (B, G) after this step's commit
        # C3: the reference rounds the window to the block's still-masked count (before this commit).
        if reference:
            block = self._block_masked.sum(1).clamp_min(1)
        else:
            block = torch.full_like(state.block_start, state.block_length)
        meets = remaining.long().cumsum(dim=1) >= self.k
        first_end = torch.where(
            meets.any(1), meets.long().argmax(1), torch.full_like(meets[:, 0], gen_len - 1, dtype=torch.long)
        )
        search_end = (first_end // block + 1) * block - 1
        block_start = (state.block_start - prompt_len).unsqueeze(1)
        col = torch.arange(gen_len, device=tokens.device).unsqueeze(0)
        in_block = (col >= block_start) & (col < block_start + state.block_length)
        window = (col >= block_start) & (col <= search_end.unsqueeze(1))

        valid = (
            torch.ones_like(tokens, dtype=torch.bool) if runtime.key_padding is None else ~runtime.key_padding
        )
        if reference:
            density = canvas_density(~remaining, self.sigma)
        else:
            density = certainty_density(~remaining, runtime.positions, valid, prompt_len, self.sigma)
        scores = self.conf * density
        scores = torch.where(in_block, scores + scores.max(dim=1, keepdim=True).values, scores)
        scores = scores.masked_fill(~(window & remaining), float("-inf"))
        top = scores.topk(min(self.k, gen_len), dim=1).indices
        chosen = torch.zeros_like(remaining).scatter_(1, top, True) & remaining & window
        if self.shift:  # the logits of token i come from position i - 1: run that one instead
            selected = torch.cat(
                [chosen.new_zeros(batch, prompt_len - 1), chosen, chosen.new_zeros(batch, 1)], 1
            )
        else:
            selected = torch.cat([chosen.new_zeros(batch, prompt_len), chosen], dim=1)
        if state.committed is not None:
            selected |= state.committed
        if self.rollout_p > 0 and self._layer_probs:
            importance = rollout_importance(self._layer_probs, valid)
            selected |= nucleus(importance, ~selected & valid, self.rollout_p)
        if self.shift and reference:  # C5: overwritten, not OR-ed, after the nucleus
            selected[:, prompt_len - 1] = chosen[:, 0]
        # C6: the reference fills a gap when ``next - prev <= w``, i.e. gaps of at most w - 1 positions.
        selected = inflate(selected, self.inflate_w - 1 if reference else self.inflate_w)
        self.next_rows = rows_from_mask(selected)
        self._layer_probs = []

    def _refresh_confidence(self, runtime, batch: int, total: int) -> None:
        """Refresh the cached confidence of every generated token whose logits this step recomputed
        (the LM head only over the rows that ran)."""
        prompt_len, gen_len = self.shape.prompt_len, self.shape.gen_len
        ran = self._ran
        target = ran + 1 if self.shift else ran  # the token each row's logits predict
        valid = (target >= prompt_len) & (target < total)
        target = target.clamp(prompt_len, total - 1)
        _, conf = runtime.decide(target)
        # Invalid entries (prompt rows, clamped) write into a spare last column that is dropped.
        slot = torch.where(valid, target - prompt_len, gen_len)
        padded = torch.cat([self.conf, self.conf.new_zeros(batch, 1)], dim=1)
        # A token whose logits came from a stale state has confidence -inf; it scores as 0 here.
        conf = torch.nan_to_num(conf.float(), neginf=0.0)
        self.conf = padded.scatter(1, slot, conf)[:, :gen_len]
        self.flops += 2 * target.numel() * self.model.config.d_model * self.model.lm_head.shape[0]
