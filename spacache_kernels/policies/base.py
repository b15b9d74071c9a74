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

The shared types (:class:`StepPlan`, :class:`DecodeState`, :class:`GenerationShape`,
:class:`LayerContext`) live in :mod:`spacache_kernels.contract`, below both this module and the
runtime; the rules are written out in ``docs/policies.md``.

Policies are dataclasses: their settings are the dataclass fields (validated in ``__post_init__``),
so ``repr`` shows every one, ``dataclasses.replace`` / ``fields`` work and two policies with the same
settings compare equal. Per-generation state is plain attributes set in :meth:`CachePolicy.reset`,
outside the fields (and so outside ``repr`` and ``==``).
"""

from __future__ import annotations

import dataclasses
import inspect

import torch

from spacache_kernels.contract import DecodeState, GenerationShape, LayerContext, Region, StepPlan
from spacache_kernels.decoding import ALIASES

__all__ = [
    "CachePolicy",
    "DecodeState",
    "GenerationShape",
    "LayerContext",
    "Region",
    "StepPlan",
    "check_early_stop_steps",
    "check_fraction",
    "check_positive_int",
]


class CachePolicy:
    """Base class: recompute everything every step (subclasses override the decisions).

    Class attributes a policy sets:
        name: registry key.
        presets: published settings by preset name, constructor kwargs (``from_preset`` /
            ``make_policy("name:preset")``); the built-in policies take theirs from the one table of
            published settings, :data:`spacache_kernels.decoding.PUBLISHED`.
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
        row_state: per-row state, declared once: attribute name -> the dimension that indexes batch
            rows. When finished rows leave the batch the base :meth:`drop_rows` trims every declared
            attribute that holds a tensor (None is skipped), so subclasses need no ``drop_rows``.
        step_syncs: None when a fixed-count step of the policy never reads a device value on the
            host (no ``.item()`` / ``bool(t)`` / data-dependent shape in ``begin_step``, ``plan``, the
            per-layer hooks or ``end_step``): its steps then compile into one graph and can be
            captured as CUDA graphs (``generate(..., cuda_graph=True)``). Otherwise the reason, in
            words (its published rule is data-dependent control flow); ``cuda_graph`` rejects it.

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
    row_state: dict[str, int] = {}
    step_syncs: str | None = None

    @classmethod
    def preset_name(cls, preset: str) -> str:
        """The canonical name of ``preset`` (an older name is resolved through
        :data:`spacache_kernels.decoding.ALIASES`), or ValueError listing ``cls.presets``."""
        alias = ALIASES.get(f"{cls.name}:{preset}")
        name = alias.partition(":")[2] if alias is not None else preset
        if name not in cls.presets:
            raise ValueError(
                f"preset: {cls.name!r} has presets {sorted(cls.presets) or 'none'}, got {preset!r}"
            )
        return name

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> CachePolicy:
        """A policy with one of the published settings in ``cls.presets``; ``overrides`` win."""
        return cls(**{**cls.presets[cls.preset_name(preset)], **overrides})

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

    def select(self, ctx: LayerContext) -> torch.Tensor | None:
        """Generated rows to recompute in layer ``ctx.layer``: (B, k) int64 strictly ascending,
        relative to the generated region (``0`` = position ``P``), or None (all live rows).

        ``ctx`` (:class:`~spacache_kernels.contract.LayerContext`) holds the live rows of this layer
        (raw and normed), the slice of them that is the generated region, the fresh V when the plan
        computes it densely, and the layer's K/V caches. With region "all" the prompt rows are always
        recomputed. The runtime checks the answer's shape and dtype (and, with ``SPACACHE_DEBUG=1``,
        its range and order) and names the policy when it is wrong.
        """
        return None

    def attention_rows(self, ctx: LayerContext) -> torch.Tensor | None:
        """(B, m) indices into layer ``ctx.layer``'s query rows whose attention probabilities the
        policy wants, or None. The query rows are the live rows (all ``T`` positions when
        ``ctx.expanded``), narrowed to the prompt rows plus the selected ones when ``select`` picked."""
        return None

    def observe_attention(self, ctx: LayerContext, probs: torch.Tensor) -> None:
        """The probabilities (B, m, Hq, T) fp32 of the rows asked for by :meth:`attention_rows` for
        layer ``ctx.layer``."""

    def expand_after(self, ctx: LayerContext) -> bool:
        """Called after layer ``ctx.layer`` ran (policies with ``needs_layer_outputs`` only). True:
        every deeper layer recomputes all positions in this step."""
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
        """Forget finished batch rows: ``keep`` (B,) bool marks the rows that stay. Trims every
        attribute declared in ``row_state``; override (and call ``super()``) only for state that
        is not a plain tensor indexed by batch row."""
        for name, dim in self.row_state.items():
            value = getattr(self, name, None)
            if isinstance(value, torch.Tensor):
                setattr(self, name, value[(slice(None),) * dim + (keep,)])

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
        """Every setting: ``Name(a=1, b='x')``. A dataclass policy shows every field; any other
        subclass the attribute of each ``__init__`` parameter (parameters not stored under their
        own name are left out)."""
        if dataclasses.is_dataclass(self):
            shown = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)]
            return f"{type(self).__name__}({', '.join(shown)})"
        params = inspect.signature(type(self).__init__).parameters
        skip = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
        shown = [
            f"{name}={getattr(self, name)!r}"
            for name, param in params.items()
            if name != "self" and param.kind not in skip and hasattr(self, name)
        ]
        return f"{type(self).__name__}({', '.join(shown)})"


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
