"""The unmasking rules: which masked positions of the current block a step commits.

Each rule is a small object with one method, ``commit(conf, masked, step_in_block=..., row_counts=...,
forced=...)`` -> (B, b) bool, testable alone on hand-built confidences (``tests/test_unmasking.py``):

* :class:`FixedCount` (LLaDA low-confidence remasking): a block of b tokens decoded in s steps commits
  ``b // s`` tokens per step (the first ``b % s`` steps one more), the most confident masked ones;
  or Dream's schedule (``schedule="dream"`` / ``"spa-dream"``); under early termination each row
  commits its own block's masked count over the block's steps (``row_counts``);
* :class:`Threshold` (Fast-dLLM): the most confident masked token plus every other with
  confidence >= tau;
* :class:`Factor` (Fast-dLLM): sort the masked confidences descending and commit the largest n with
  ``c_(j) >= 1 - f / (j + 1)`` for every j <= n (j = 1 always passes).

A policy may force commits (``forced``, Fast-dLLM's Dream block start): threshold / factor then commit
exactly those, the fixed count commits them plus the rest of its count by confidence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def transfer_schedule(block_length: int, steps_per_block: int) -> list[int]:
    """Tokens committed at each step of a block under the fixed-count rule."""
    base, extra = divmod(block_length, steps_per_block)
    return [base + (1 if i < extra else 0) for i in range(steps_per_block)]


def _rank_key(conf: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Confidence as a ranking key: -inf where not masked, and a masked position whose confidence is
    -inf (a stale state under ``decide_fresh_only``) still ranks above every unmasked one, so each
    rule always makes progress while fresh positions keep priority."""
    lowest = torch.finfo(conf.dtype).min
    return torch.where(masked, torch.nan_to_num(conf, nan=lowest, neginf=lowest), float("-inf"))


def threshold_commit(conf: torch.Tensor, masked: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, b) bool: the most confident masked position plus every masked one with conf >= tau."""
    conf = _rank_key(conf, masked)
    best = torch.zeros_like(masked).scatter_(1, conf.argmax(1, keepdim=True), True)
    return masked & (best | (conf >= threshold))


def factor_commit(conf: torch.Tensor, masked: torch.Tensor, factor: float) -> torch.Tensor:
    """(B, b) bool: the largest n with ``c_(j) >= 1 - f/(j+1)`` for all j <= n (j = 1 always)."""
    conf = _rank_key(conf, masked)
    ordered, order = conf.sort(dim=1, descending=True)
    j = torch.arange(1, conf.shape[1] + 1, device=conf.device, dtype=conf.dtype)
    passes = ordered >= 1 - factor / (j + 1)
    passes[:, 0] = True
    passes &= ordered > float("-inf")  # never commit a position that is not masked
    keep_sorted = passes.long().cumprod(dim=1).bool()
    return torch.zeros_like(masked).scatter_(1, order, keep_sorted) & masked


def fixed_commit(conf: torch.Tensor, masked: torch.Tensor, count: int) -> torch.Tensor:
    """(B, b) bool: the ``count`` most confident masked positions of each row."""
    if count == 0:
        return torch.zeros_like(masked)
    conf = _rank_key(conf, masked)
    top = conf.topk(count, dim=1).indices
    return torch.zeros_like(masked).scatter_(1, top, True) & masked


def fixed_commit_counts(conf: torch.Tensor, masked: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B, b) bool: per row the ``counts[row]`` (B,) most confident masked positions (no host sync)."""
    if counts.shape != conf.shape[:1]:
        raise ValueError(f"counts: expected shape ({conf.shape[0]},), got {tuple(counts.shape)}")
    key = _rank_key(conf, masked)
    order = key.argsort(dim=1, descending=True, stable=True)
    ranks = torch.arange(key.shape[1], device=key.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, ranks)
    return (rank < counts.unsqueeze(1)) & masked


def row_transfer_schedule(masked_in_block: torch.Tensor, steps_per_block: int) -> torch.Tensor:
    """(B, s) tokens each row commits at each step of a block, from its masked count (B,) at the block
    start (the reference's per-row ``get_num_transfer_tokens``; rows differ once early termination
    has padded part of a block)."""
    base = masked_in_block.unsqueeze(1) // steps_per_block
    extra = masked_in_block.unsqueeze(1) % steps_per_block
    return base + (torch.arange(steps_per_block, device=masked_in_block.device) < extra).long()


def _with_forced(forced, conf, masked, count) -> torch.Tensor:
    """A step whose policy forces ``forced`` (B, b): threshold / factor (``count`` None) commit exactly
    those; the fixed-count rule commits them plus the rest of the step's ``count`` by confidence."""
    if count is None:
        return forced
    # count - tensor, not as_tensor(count): no host-to-device copy inside a captured CUDA graph.
    rest = count - forced.sum(1)
    return forced | fixed_commit_counts(conf, masked & ~forced, rest.clamp_min(0))


SCHEDULES = ("llada", "dream", "spa-dream")


def dream_transfer_count(masked: torch.Tensor, step_in_block: int, steps_per_block: int,
                         at_least_one: bool = False, eps: float = 1e-3) -> int:  # fmt: skip
    """Tokens Dream's schedule commits at step ``step_in_block`` of a block: ``int(m * (1 - s / t))``
    with ``t, s`` consecutive entries of ``linspace(1, eps, steps + 1)`` and ``m`` the masked count of
    ``masked`` (B, b) averaged over the batch (fp32, as the reference), ``int(m)`` at the last step.
    One host read."""
    mean = masked.sum().float().cpu() / masked.shape[0]
    if step_in_block < steps_per_block - 1:
        times = torch.linspace(1, eps, steps_per_block + 1)
        count = int(mean * (1 - times[step_in_block + 1] / times[step_in_block]))
    else:
        count = int(mean)
    return max(count, 1) if at_least_one else count


def _step_count(schedule, fixed_schedule, row_counts, masked, step_in_block):
    """The fixed-count rule's tokens this step: an int, or (B,) per row under early termination."""
    if schedule != "llada":
        return dream_transfer_count(masked, step_in_block, len(fixed_schedule), schedule == "spa-dream")
    if row_counts is not None:
        return row_counts[:, step_in_block]
    return fixed_schedule[step_in_block]


@dataclass(frozen=True)
class FixedCount:
    """The fixed-count rule: ``block_length`` tokens over ``steps_per_block`` steps per block."""

    block_length: int
    steps_per_block: int
    schedule: str = "llada"
    per_step: list[int] = field(init=False, repr=False)
    name = "fixed"

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {SCHEDULES}, got {self.schedule!r}")
        object.__setattr__(self, "per_step", transfer_schedule(self.block_length, self.steps_per_block))

    def commit(self, conf, masked, *, step_in_block: int, row_counts=None, forced=None) -> torch.Tensor:
        """(B, b) bool; ``row_counts`` (B, s): per-row schedule under early termination."""
        count = _step_count(self.schedule, self.per_step, row_counts, masked, step_in_block)
        return self.commit_count(conf, masked, count, forced)

    @staticmethod
    def commit_count(conf, masked, count, forced=None) -> torch.Tensor:
        """(B, b) bool: ``count`` (an int, or (B,) per row) most confident masked positions, plus the
        ``forced`` ones (counted in). The step of ``spacache_kernels.graphs`` calls this with the count
        it read from :attr:`per_step` on the host."""
        if forced is not None:
            return _with_forced(forced & masked, conf, masked, count)
        if isinstance(count, torch.Tensor):
            return fixed_commit_counts(conf, masked, count)
        return fixed_commit(conf, masked, count)

    def masked_left(self, gen_len: int, block_index: int, step_in_block: int) -> int | None:
        """Masked positions every row still has before step ``step_in_block`` of block ``block_index``
        (each step commits exactly its count in every row), or None where the count is not known on
        the host (Dream's schedules: it depends on the batch's masked count)."""
        if self.schedule != "llada":
            return None
        return gen_len - block_index * self.block_length - sum(self.per_step[:step_in_block])


@dataclass(frozen=True)
class Threshold:
    """Fast-dLLM's confidence threshold ``tau`` in (0, 1]."""

    threshold: float
    name = "threshold"

    def commit(self, conf, masked, *, step_in_block: int = 0, row_counts=None, forced=None) -> torch.Tensor:
        if forced is not None:
            return _with_forced(forced & masked, conf, masked, None)
        return threshold_commit(conf, masked, self.threshold)


@dataclass(frozen=True)
class Factor:
    """Fast-dLLM's factor rule with factor ``f`` > 0."""

    factor: float
    name = "factor"

    def commit(self, conf, masked, *, step_in_block: int = 0, row_counts=None, forced=None) -> torch.Tensor:
        if forced is not None:
            return _with_forced(forced & masked, conf, masked, None)
        return factor_commit(conf, masked, self.factor)


def unmasking_rule(threshold, factor, *, block_length: int, steps_per_block: int, schedule: str = "llada"):
    """The rule ``generate()``'s arguments name: threshold, else factor, else the fixed count."""
    if threshold is not None:
        return Threshold(threshold)
    if factor is not None:
        return Factor(factor)
    return FixedCount(block_length, steps_per_block, schedule)


__all__ = [
    "SCHEDULES",
    "Factor",
    "FixedCount",
    "Threshold",
    "dream_transfer_count",
    "factor_commit",
    "fixed_commit",
    "fixed_commit_counts",
    "row_transfer_schedule",
    "threshold_commit",
    "transfer_schedule",
    "unmasking_rule",
]
