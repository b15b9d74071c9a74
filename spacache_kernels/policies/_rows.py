"""Helpers shared by the policies that hand the runtime explicit per-row position sets."""

from __future__ import annotations

import torch


def rows_from_mask(mask: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """The True positions of each row of ``mask`` (B, T) bool as a (B, n) int64 ascending index set.

    ``n = count`` (may exceed T) or, when None, the largest per-row count (one host read). Rows with
    fewer positions are padded by repeating their last one (the runtime computes a repeated row twice
    and writes the same values), so the set stays non-decreasing. A row with no True position gets position 0
    (a lone recomputation of the first token; only finished rows are ever empty).
    """
    counts = mask.sum(dim=1)
    if count is None:
        count = max(int(counts.max()), 1)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :count]  # True first, ascending
    if count > order.shape[1]:
        # More slots than positions (e.g. Elastic-Cache's window of 16 over a shorter sequence): the
        # extra slots are padding, filled with the row's last position below like every other.
        order = torch.nn.functional.pad(order, (0, count - order.shape[1]))
    last = torch.gather(order, 1, (counts - 1).clamp_min(0).unsqueeze(1))
    slot = torch.arange(count, device=mask.device)
    return torch.where(slot.unsqueeze(0) < counts.unsqueeze(1), order, last)


def distinct_rows(rows: torch.Tensor) -> torch.Tensor:
    """(B, n) bool: False for the padding repeats of :func:`rows_from_mask` (a value equal to its left)."""
    first = torch.ones_like(rows[:, :1], dtype=torch.bool)
    return torch.cat([first, rows[:, 1:] != rows[:, :-1]], dim=1)


def drift_bottom_k(new: torch.Tensor, cached: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) int64 ascending: per row the ``k`` rows whose cosine(new, cached) is lowest.

    new, cached: (B, R, w) any float dtype; the cosine is taken in fp32 with torch's epsilon and ties
    go to the lower position (the same rule as ``ops.proxy_select``).
    """
    from spacache_kernels.ops.reference import bottom_k_sorted, cosine_rows

    return bottom_k_sorted(cosine_rows(new, cached), k)
