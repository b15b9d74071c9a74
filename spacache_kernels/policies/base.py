"""The caching-policy interface the runtime executes.

Per denoising step ``generate`` hands the policy the decoding state (:meth:`CachePolicy.begin_step`)
and asks for a :class:`StepPlan`: which token positions are *live* (run through the layers) this step.
Live positions are a contiguous region (``"all"``, ``"gen"`` or an absolute ``(start, stop)`` range)
or an explicit per-row index set ``rows``. Positions that are not live keep their cached K/V (every
layer attends to all ``T`` keys); their hidden states are not updated.

Inside a region that covers the generated tokens the policy may, per layer, pick the generated rows
it recomputes (``select``; ``None`` = all live rows). Rows not selected keep their cached branch
output (``attn_out + ffn_out``, the "branch cache"): their layer output is ``input + cached branch``.
Further hooks let a policy read chosen attention-probability rows (``attention_rows`` /
``observe_attention``), switch the deeper layers of a step to full recomputation
(``expand_after``, with a per-layer output cache) and see what each step committed (``end_step``).
Every policy drives the same runtime and kernels; only these decisions differ.
"""

from __future__ import annotations

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
        sparse); the fresh V of the live rows is then visible to ``select`` as ``runtime.layer_values``.
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
    """

    step: int
    tokens: torch.Tensor
    block_start: torch.Tensor
    block_length: int
    block_index: int | None
    step_in_block: int | None
    mask_id: int
    committed: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)


class CachePolicy:
    """Base class: recompute everything every step (subclasses override the decisions).

    Class attributes a policy sets:
        name: registry key.
        presets: published settings by name (``from_preset`` / ``make_policy("name:preset")``).
        needs_branch_cache: the runtime keeps the per-layer ``attn_out + ffn_out`` of generated tokens
            (required when ``select`` returns indices).
        needs_layer_outputs: the runtime keeps every layer's output for all positions (required for
            ``expand_after``).
        lockstep_blocks: in threshold/factor mode all batch rows move to the next block together (the
            references' behaviour; required when the policy keys on block starts).
        decide_fresh_only: only positions whose (shift-adjusted) hidden state was recomputed in the
            step may be committed (the others hold stale states).
        early_stop_steps: the policy's published early-termination period, used by ``generate()``
            when its own ``early_stop_steps`` is None (an int, ``"block"``, or None: off).

    Every policy inherits one deliberate deviation from the references, made in ``generate()``: the
    mask token is never predicted (the references take the argmax over the whole vocabulary and can
    "commit" the mask id, which leaves the position masked; d2Cache's vanilla loop can then spin).
    """

    name = "base"
    presets: dict[str, dict] = {}  # published settings: preset name -> constructor kwargs
    needs_branch_cache = False
    needs_layer_outputs = False
    lockstep_blocks = False
    decide_fresh_only = False
    early_stop_steps: int | str | None = None
    backend: str | None = None  # None: use generate()'s backend

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> CachePolicy:
        """A policy with one of the published settings in ``cls.presets``; ``overrides`` win."""
        if preset not in cls.presets:
            raise ValueError(
                f"preset: {cls.name!r} has presets {sorted(cls.presets) or 'none'}, got {preset!r}"
            )
        return cls(**{**cls.presets[preset], **overrides})

    def reset(self, model, shape: GenerationShape) -> None:
        """Allocate per-generation state (called once at the start of every generate())."""
        self._settings = set(vars(self)) | {"_settings"}  # what release() keeps
        self.shape = shape
        self.model = model
        self.runtime = None
        self.state: DecodeState | None = None
        self.flops = 0  # FLOPs the policy itself spends (e.g. proxy projections), counted per call

    def attach(self, runtime) -> None:
        """The runtime of this generation (its caches are readable by the policy)."""
        self.runtime = runtime

    def begin_step(self, state: DecodeState) -> None:
        """Called before :meth:`plan` with the state the step will decode from."""
        self.state = state

    def plan(self, step: int) -> StepPlan:
        """The plan of global step ``step`` (0-based, counted over the whole generation)."""
        return StepPlan(region="all", kind="full")

    def select(self, layer: int, normed: torch.Tensor, plan: StepPlan) -> torch.Tensor | None:
        """Generated rows to recompute in ``layer``: (B, k) int64 ascending, relative to the generated
        region (``0`` = position ``P``), or None (all live rows).

        normed: the attention-normed live rows (B, R, d) of this layer (R = T for region "all",
        G for "gen"). With region "all" the prompt rows are always recomputed.
        """
        return None

    def attention_rows(self, layer: int, plan: StepPlan) -> torch.Tensor | None:
        """(B, m) indices into this layer's query rows whose attention probabilities the policy wants."""
        return None

    def observe_attention(self, layer: int, probs: torch.Tensor) -> None:
        """The probabilities (B, m, Hq, T) fp32 of the rows asked for by :meth:`attention_rows`."""

    def expand_after(self, layer: int, plan: StepPlan) -> bool:
        """True: every layer deeper than ``layer`` recomputes all positions in this step."""
        return False

    def forced_commit(self, state: DecodeState) -> torch.Tensor | None:
        """(B, block_length) bool: block positions this step commits unconditionally, or None.

        When given, a threshold / factor step commits exactly these (still-masked) positions; a
        fixed-count step commits them plus its remaining count by confidence.
        """
        return None

    def end_step(self, state: DecodeState) -> None:
        """Called after the step's commit; ``state.tokens`` / ``state.committed`` are post-commit."""

    def op_backend(self) -> str | None:
        """The backend for the policy's own ops: its own setting, else generate()'s."""
        return self.backend if self.backend is not None else self.shape.backend

    def drop_rows(self, keep: torch.Tensor) -> None:
        """Forget finished batch rows: ``keep`` (B,) bool marks the rows that stay."""

    def release(self) -> None:
        """Drop everything one generation attached (model, runtime, caches, state); called by
        generate() when it returns or fails, so a policy instance kept by the caller does not keep
        gigabytes alive. The settings and small results (numbers, strings, lists of them, the
        shape) stay readable."""
        settings = getattr(self, "_settings", None)
        if settings is None:
            return
        for name, value in list(vars(self).items()):
            if name not in settings and not _is_small(value):
                delattr(self, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _is_small(value) -> bool:
    """Plain data that holds no tensor, model or runtime (kept by :meth:`CachePolicy.release`)."""
    if value is None or isinstance(value, (bool, int, float, str, GenerationShape)):
        return True
    if isinstance(value, (list, tuple)):
        return all(v is None or isinstance(v, (bool, int, float, str)) for v in value)
    if isinstance(value, dict):
        return all(isinstance(v, (bool, int, float, str)) for v in value.values())
    return False


def check_positive_int(name: str, value) -> int:
    """``value`` as a positive int, or ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def check_early_stop_steps(value) -> int | str | None:
    """An early-termination period: a positive int, ``"block"`` (the block length) or None (off)."""
    if value is None or value == "block":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"early_stop_steps: expected a positive int, 'block' or None, got {value!r}")
    return value


def check_fraction(name: str, value, *, low_open: bool = True) -> float:
    """``value`` as a float in (0, 1] (or [0, 1] with ``low_open=False``), or ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    ok = (0 < value <= 1) if low_open else (0 <= value <= 1)
    if not ok:
        raise ValueError(f"{name}: expected a value in {'(0, 1]' if low_open else '[0, 1]'}, got {value}")
    return float(value)
