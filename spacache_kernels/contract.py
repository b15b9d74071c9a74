"""The runtime-policy contract: the types the denoising runtime and the caching policies share.

This module sits below both (it imports only torch): ``models.runtime`` executes :class:`StepPlan`
objects and hands a :class:`LayerContext` to the policy's per-layer hooks; ``policies.base`` builds
on these types; ``generate`` passes :class:`GenerationShape` and :class:`DecodeState`. Nothing here
imports a policy or the runtime, so every import in the package points downward.

The rules a policy follows are written out in ``docs/policies.md``; the checks the runtime makes on a
policy's answers live here (:func:`check_selection`), so that a bad answer fails with an error that
names the policy instead of a raw torch error deep inside a kernel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

import torch

Region = Literal["all", "gen"] | tuple[int, int]


@dataclass(frozen=True, eq=False)
class StepPlan:
    """What one denoising step recomputes.

    region: ``"all"`` = every token (prompt + generated) runs through every layer and every cache is
        rebuilt; ``"gen"`` = only the generated region runs, the prompt contributes its cached K/V;
        ``(start, stop)`` = the absolute positions ``[start, stop)`` run (Fast-dLLM's block / suffix).
    kind: a label for statistics ("full", "gen", "partial", ...).
    sparse_kv: recompute K/V only for the selected rows (else for every live row, as the references).
    dense_v: with ``sparse_kv``, still compute V for every live row (dLLM-Cache's V-verify: only K is
        sparse); the fresh V of the live rows is then visible to ``select`` as ``ctx.values``.
    rows: (B, n) int64 absolute positions, non-decreasing per row, or None. When given it replaces
        ``region``: exactly these positions run (per-row sets of different sizes are padded by
        repeating a row's last position: a repeated row computes and writes identical values).
        ``select`` must return None for such plans.
    first_gen_own_logit: shifted-logit models (Dream): predict generated token 0 from the hidden state
        at its own position ``P`` instead of ``P - 1`` (what the references do when their logits cover
        only the generated region, so the shift wraps token 0 onto itself).
    """

    region: Region
    kind: str
    sparse_kv: bool = False
    dense_v: bool = False
    rows: torch.Tensor | None = None
    first_gen_own_logit: bool = False


@dataclass
class GenerationShape:
    """Sizes fixed for one generate() call, handed to ``CachePolicy.reset``.

    unmasking: "fixed" | "threshold" | "factor"; steps_per_block: fixed-count steps per block.
    """

    batch: int
    prompt_len: int
    gen_len: int
    device: torch.device
    backend: str | None = None
    block_length: int | None = None
    steps_per_block: int | None = None
    unmasking: str = "fixed"


@dataclass
class DecodeState:
    """The decoding state ``generate`` shows the policy before each step (and after, with ``committed``).

    tokens: (B, T) current tokens (mask id where still masked).
    block_start: (B,) int64 absolute position of each row's current block.
    block_index: the current block when blocks advance in lockstep (fixed count, or a policy with
        ``lockstep_blocks``), else None. step_in_block: steps taken in that block before this one.
    committed: (B, T) bool, the positions committed by the previous step (None on step 0).
    masked_count: how many generated positions every row still has masked, when the host knows it
        without reading the tokens (fixed count on the "llada" schedule without early termination:
        each step commits exactly its count in every row), else None. A policy that needs a per-row
        position count as a shape (``rows_from_mask``) reads it here instead of syncing.
    """

    step: int
    tokens: torch.Tensor
    block_start: torch.Tensor
    block_length: int
    block_index: int | None
    step_in_block: int | None
    mask_id: int
    committed: torch.Tensor | None = None
    masked_count: int | None = None
    extras: dict = field(default_factory=dict)


@dataclass(eq=False)
class LayerContext:
    """What a policy sees of one layer of one step: the one argument of every per-layer hook
    (``CachePolicy.select``, ``attention_rows``, ``observe_attention``, ``expand_after``).

    The runtime builds one context per layer, before ``select``; the later hooks of the same layer
    get the same object (so ``values``, ``k_cache`` and ``v_cache`` then hold what the layer wrote).

    layer: the layer index. plan: the step's plan. backend: the op backend the runtime resolved for
    this generation ("triton" | "torch").
    raw: (B, R, d) the layer's input (the residual stream) of the R live rows; normed: the same rows
        after the attention RMSNorm (what the K/V/Q projections read).
    gen: the slice of the live rows that is the generated region (``raw[:, gen]`` is (B, G, d)), or
        None when the live rows do not cover it contiguously (then ``select`` must return None).
    values: (B, R, Hkv * Dh) the fresh V of the live rows (not yet written to the cache) when the plan
        computes V densely (``dense_v`` / not ``sparse_kv``), else None.
    k_cache / v_cache: (B, T, Hkv, Dh) this layer's K/V caches (post-RoPE), as of the previous step
        for the positions this step has not written yet.
    expanded: True when an earlier layer's ``expand_after`` switched this step to full recomputation:
        the live rows (and the query rows ``attention_rows`` indexes) are then all ``T`` positions,
        whatever the plan said, and ``select`` is not called.
    """

    layer: int
    plan: StepPlan
    raw: torch.Tensor
    normed: torch.Tensor
    gen: slice | None
    values: torch.Tensor | None
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    backend: str
    expanded: bool = False


def debug_checks_enabled() -> bool:
    """``SPACACHE_DEBUG=1``: also check the values of a policy's answers (ranges, duplicates), at the
    cost of a host sync per layer. The shape and dtype checks always run (they read no values)."""
    return os.environ.get("SPACACHE_DEBUG", "0").strip() not in ("", "0")


def check_selection(policy, sel, *, layer: int, batch: int, gen_len: int, values: bool) -> torch.Tensor:
    """Check what ``policy.select`` returned for ``layer``: a (batch, k) int64 tensor with
    ``k <= gen_len``; with ``values`` (the debug switch) also strictly ascending rows in
    ``[0, gen_len)``. Raises TypeError / ValueError naming the policy."""
    who = f"policy {policy!r}: select() at layer {layer}"
    if not isinstance(sel, torch.Tensor):
        raise TypeError(f"{who} returned {type(sel).__name__}; expected a (B, k) int64 tensor or None")
    if sel.dtype != torch.int64 or sel.dim() != 2 or sel.shape[0] != batch or sel.shape[1] > gen_len:
        raise ValueError(
            f"{who} returned {sel.dtype} of shape {tuple(sel.shape)}; expected int64 of shape "
            f"({batch}, k) with k <= {gen_len} (the generated rows)"
        )
    if values and sel.numel():
        if int(sel.min()) < 0 or int(sel.max()) >= gen_len:
            raise ValueError(
                f"{who} returned indices in [{int(sel.min())}, {int(sel.max())}]; expected [0, {gen_len})"
            )
        if sel.shape[1] > 1 and not bool((sel[:, 1:] > sel[:, :-1]).all()):
            raise ValueError(f"{who} returned rows that are not strictly ascending (unsorted or duplicated)")
    return sel


__all__ = [
    "DecodeState",
    "GenerationShape",
    "LayerContext",
    "Region",
    "StepPlan",
    "check_selection",
    "debug_checks_enabled",
]
