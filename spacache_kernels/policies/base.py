"""The caching-policy interface the runtime executes.

Per denoising step the runtime asks the policy for a :class:`StepPlan` (which rows are live: the
whole sequence or only the generated region), then, per layer, for the live rows it must recompute
(``select``; ``None`` = all of them). Rows not selected keep their cached branch output
(``attn_out + ffn_out``): their layer output is ``input + cached branch``. Every policy drives the
same runtime and kernels; only these decisions differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Region = Literal["all", "gen"]


@dataclass(frozen=True)
class StepPlan:
    """What one denoising step recomputes.

    region: "all" = every token (prompt + generated) runs through every layer and every cache is
    rebuilt; "gen" = only the generated region runs, the prompt contributes its cached K/V.
    kind: a label for statistics ("full", "gen", "partial").
    sparse_kv: recompute K/V only for the selected rows (else for every live row, as the reference).
    """

    region: Region
    kind: str
    sparse_kv: bool = False


@dataclass
class GenerationShape:
    """Sizes fixed for one generate() call, handed to ``CachePolicy.reset``."""

    batch: int
    prompt_len: int
    gen_len: int
    device: torch.device
    backend: str | None = None


class CachePolicy:
    """Base class: recompute everything every step (subclasses override the decisions).

    Attributes: ``name`` (registry key), ``needs_branch_cache`` (the runtime then keeps the
    per-layer ``attn_out + ffn_out`` of generated tokens).
    """

    name = "base"
    needs_branch_cache = False
    backend: str | None = None  # None: use generate()'s backend

    def reset(self, model, shape: GenerationShape) -> None:
        """Allocate per-generation state (called once at the start of every generate())."""
        self.shape = shape
        self.flops = 0  # FLOPs the policy itself spends (e.g. proxy projections), counted per call

    def plan(self, step: int) -> StepPlan:
        """The plan of global step ``step`` (0-based, counted over the whole generation)."""
        return StepPlan(region="all", kind="full")

    def select(self, layer: int, normed: torch.Tensor, plan: StepPlan) -> torch.Tensor | None:
        """Rows of the live region to recompute in ``layer``: (B, k) int64 ascending, or None (all).

        normed: the attention-normed live rows (B, R, d) of this layer (R = T for region "all",
        G for "gen").
        """
        return None

    def op_backend(self) -> str | None:
        """The backend for the policy's own ops: its own setting, else generate()'s."""
        return self.backend if self.backend is not None else self.shape.backend

    def drop_rows(self, keep: torch.Tensor) -> None:
        """Forget finished batch rows: ``keep`` (B,) bool marks the rows that stay."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
