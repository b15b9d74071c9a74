"""Fixed-count decoding with static buffers: each step eager, compiled, or replayed as a CUDA graph.

``generate(..., cuda_graph=True)`` (or ``compile_step=True``) hands its loop to :func:`decode_fixed`.
A step is split in two:

* host part (eager, no host sync): fill the step's buffers (step index, block starts), build the
  :class:`DecodeState`, ``policy.begin_step``, ``policy.plan``, ``policy.forced_commit``;
* device part (:func:`device_step`): ``runtime.step`` for the plan, ``runtime.decide``, the
  fixed-count commit, ``policy.end_step``. It reads and writes only static buffers (the tokens, the
  row seeds, the block starts, the step index as a 0-d tensor, the committed mask, the first-NaN
  step) and the runtime's and the policy's preallocated state, updated in place, and it never reads
  a device value on the host, so it traces into one graph (``torch.compile(fullgraph=True)``) and
  can be captured as a CUDA graph.

Everything in the device part that can change a shape or a launch comes from the host and is the
graph key (:func:`plan_key`): the plan's kind, region, K/V sparsity, dense V, row count of a row-set
plan, the first-token logit rule, this step's commit count, and whether the policy forced commits.
A policy's per-layer budgets are a function of the plan's kind (SPA-Cache, dLLM-Cache), so the key
covers them.

CUDA graphs (:class:`GraphRunner`): the first step with a new key runs eagerly on a side stream (the
warm-up: Triton autotuning, cuBLAS workspaces and the allocator settle outside any capture) and its
host-side counters (FLOPs, recomputed rows per layer) are recorded; the second step with that key is
captured once, with a static copy of the plan's row index set and of the forced-commit mask, into a
memory pool all graphs share, and replayed; later steps with the key copy their index set into the
static buffer and replay. A key seen only once is never captured (dKV-Cache's row count shrinks every
step, so its cached steps stay eager). The counters a replay cannot update from Python are added from
the warm-up's record.

What stays eager: the host part above (a few small launches: two fills, the policies' ``begin_step``
and ``plan`` tensors), the threshold / factor rules and early termination (rows leave the batch and
blocks are skipped on values read from the device), Dream's schedules (their count is read from the
device), and the policies with ``step_syncs`` (Elastic-Cache, d2Cache: data-dependent control flow
and token-set sizes); :func:`check_graph_args` rejects those combinations.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import torch

from spacache_kernels.contract import DecodeState, StepPlan, debug_checks_enabled
from spacache_kernels.ops.reference import hash_u32
from spacache_kernels.policies.d2cache import canvas_density
from spacache_kernels.unmasking import FixedCount

MODES = ("eager", "compile", "cuda_graph")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")  # compile_step=True is "inductor"


@dataclasses.dataclass
class StepBuffers:
    """The tensors that change between steps, allocated once; every step reads and writes them in place.

    tokens: (B, T) int64; row_seeds: (B,) int64; block_of_row: (B,) int64 (the current block, the same
    for every row); block_start: (B,) int64 its first absolute position; step: () int64 the step
    index; committed: (B, T) bool the positions the latest step committed; first_nan_step: () int64
    the first step whose confidences held a NaN (-1: none); offsets: (b,) ``arange(block_length)``.
    """

    tokens: torch.Tensor
    row_seeds: torch.Tensor
    block_of_row: torch.Tensor
    block_start: torch.Tensor
    step: torch.Tensor
    committed: torch.Tensor
    first_nan_step: torch.Tensor
    offsets: torch.Tensor

    @classmethod
    def create(cls, tokens: torch.Tensor, row_seeds: torch.Tensor, block_length: int) -> StepBuffers:
        """Buffers around ``tokens`` (B, T), used in place (the caller's tensor is the static one)."""
        batch, dev = tokens.shape[0], tokens.device
        return cls(
            tokens=tokens,
            row_seeds=row_seeds,
            block_of_row=torch.zeros(batch, dtype=torch.int64, device=dev),
            block_start=torch.zeros(batch, dtype=torch.int64, device=dev),
            step=torch.zeros((), dtype=torch.int64, device=dev),
            committed=torch.zeros_like(tokens, dtype=torch.bool),
            first_nan_step=torch.full((), -1, dtype=torch.int64, device=dev),
            offsets=torch.arange(block_length, device=dev),
        )


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What every step of one generation shares (host values, fixed for the generation)."""

    prompt_len: int
    block_length: int
    mask_id: int
    temperature: float = 0.0
    confidence: str = "max_prob"
    certainty_prior: float | None = None


def step_seeds(row_seeds: torch.Tensor, step, block_of_row: torch.Tensor, block_length: int) -> torch.Tensor:
    """Per-row noise keys of one step: hash(row seed, step, first generated offset of the row's block).

    ``step`` is an int or a 0-d int64 tensor (the same keys either way). The confidence op adds the
    offset inside the block, so the noise of a token depends on (seed, step, its position in the
    generated region) only: never on the row's place in the batch or the padded prompt width.
    """
    key = hash_u32(hash_u32(row_seeds) ^ step)
    return hash_u32(key ^ (block_of_row * block_length))


def plan_key(plan: StepPlan, count: int, forced: torch.Tensor | None) -> tuple:
    """Everything host-side that shapes a step's device work: one CUDA graph per distinct key."""
    rows = None if plan.rows is None else tuple(plan.rows.shape)
    return (plan.kind, plan.region, plan.sparse_kv, plan.dense_v, rows, plan.first_gen_own_logit, count,
            forced is not None)  # fmt: skip


def decide_block(
    runtime, tokens: torch.Tensor, positions: torch.Tensor, settings: StepSettings, *,
    row_seeds: torch.Tensor, step, block_of_row: torch.Tensor, first_nan_step: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Token and ranking confidence at ``positions`` (B, b) after ``runtime.step``: the part of a step
    every decoding path (``generate()``'s loop, :func:`device_step`) shares, without host syncs.

    ``step`` is an int or a 0-d int64 tensor. Records the step in ``first_nan_step`` (0-d int64, in
    place) when it is the first whose confidences hold a NaN. Returns ``(token, conf, current, masked)``
    (B, b): the prediction, its confidence (times d2Cache's certainty density when
    ``settings.certainty_prior`` is set), the tokens now at ``positions`` and which of them are masked.
    """
    seeds = 0
    if settings.temperature > 0:
        seeds = step_seeds(row_seeds, step, block_of_row, settings.block_length)
    token, conf = runtime.decide(
        positions, temperature=float(settings.temperature), seed=seeds, measure=settings.confidence
    )
    nan_now = torch.isnan(conf).any() & (first_nan_step < 0)
    first_nan_step.copy_(torch.where(nan_now, step, first_nan_step))
    current = torch.gather(tokens, 1, positions)
    masked = current == settings.mask_id
    if settings.certainty_prior is not None:
        decoded = tokens[:, settings.prompt_len :] != settings.mask_id
        density = canvas_density(decoded, settings.certainty_prior)
        conf = conf * torch.gather(density, 1, positions - settings.prompt_len)
    return token, conf, current, masked


def device_step(
    runtime, policy, plan: StepPlan, bufs: StepBuffers, settings: StepSettings, count: int,
    forced: torch.Tensor | None, end_state: DecodeState,
) -> None:  # fmt: skip
    """The device part of one fixed-count step (module docstring): runs the plan, decides the block's
    tokens, commits ``count`` of them per row (plus ``forced`` (B, b) bool), then ``policy.end_step``.
    Reads no device value on the host; writes ``bufs`` in place."""
    runtime.step(bufs.tokens, plan)
    positions = bufs.block_start[:, None] + bufs.offsets  # (B, b)
    token, conf, current, masked = decide_block(
        runtime, bufs.tokens, positions, settings, row_seeds=bufs.row_seeds, step=bufs.step,
        block_of_row=bufs.block_of_row, first_nan_step=bufs.first_nan_step,
    )  # fmt: skip
    commit = FixedCount.commit_count(conf, masked, count, forced)
    bufs.tokens.scatter_(1, positions, torch.where(commit, token, current))
    bufs.committed.zero_().scatter_(1, positions, commit)
    policy.end_step(end_state)


def check_graph_args(*, cuda_graph: bool, compile_step: bool, device: torch.device, policy, threshold,
                     factor, early_stop: int | None, schedule: str) -> str | None:  # fmt: skip
    """The step mode ``generate()``'s ``cuda_graph`` / ``compile_step`` (True or a backend name of
    :data:`COMPILE_BACKENDS`) ask for: "cuda_graph", "compile" or None (its own eager loop); else a
    ValueError naming the argument and what stands in the way (module docstring: what stays eager)."""
    if not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph: expected a bool, got {type(cuda_graph).__name__}")
    if not isinstance(compile_step, (bool, str)):
        raise TypeError(f"compile_step: expected a bool or a torch.compile backend name, got "
                        f"{type(compile_step).__name__}")  # fmt: skip
    if isinstance(compile_step, str) and compile_step not in COMPILE_BACKENDS:
        raise ValueError(f"compile_step: expected True or one of {COMPILE_BACKENDS}, got {compile_step!r}")
    if not (cuda_graph or compile_step):
        return None
    name = "cuda_graph" if cuda_graph else "compile_step"
    if cuda_graph and compile_step:
        raise ValueError("cuda_graph / compile_step: choose one (a captured step is not compiled too)")
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph: CUDA graphs need a CUDA device; the model is on {device}")
    if threshold is not None or factor is not None:
        raise ValueError(
            f"{name}: needs the fixed-count rule; threshold / factor steps decide on the host which "
            "rows leave the batch (use the default eager loop)"
        )
    if early_stop:
        raise ValueError(
            f"{name}: early termination (early_stop_steps, or the policy preset's) reads the tokens on the "
            "host to skip finished blocks; pass early_stop_steps=None with a policy without it"
        )
    if schedule != "llada":
        raise ValueError(
            f"{name}: schedule {schedule!r} reads the batch's masked count on the host every step; "
            "use schedule='llada'"
        )
    if policy.step_syncs is not None:
        raise ValueError(f"{name}: policy {policy!r} reads device values on the host: {policy.step_syncs}")
    if debug_checks_enabled():
        raise ValueError(f"{name}: SPACACHE_DEBUG=1 checks the policies' answers on the host; unset it")
    return "cuda_graph" if cuda_graph else "compile"


# -- CUDA graphs ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Counters:
    """The host-side counters a step adds to (a replay cannot run the Python that adds them)."""

    runtime_flops: int
    policy_flops: int
    layer_rows: list[int]

    @classmethod
    def read(cls, runtime, policy) -> _Counters:
        return cls(runtime.flops, getattr(policy, "flops", 0), list(runtime.layer_rows))

    def write(self, runtime, policy) -> None:
        runtime.flops = self.runtime_flops
        if hasattr(policy, "flops"):
            policy.flops = self.policy_flops
        runtime.layer_rows[:] = self.layer_rows

    def zero(self) -> _Counters:
        return _Counters(0, 0, [0] * len(self.layer_rows))

    def minus(self, other: _Counters) -> _Counters:
        rows = [a - b for a, b in zip(self.layer_rows, other.layer_rows, strict=True)]
        flops = self.runtime_flops - other.runtime_flops
        return _Counters(flops, self.policy_flops - other.policy_flops, rows)

    def plus(self, other: _Counters) -> _Counters:
        rows = [a + b for a, b in zip(self.layer_rows, other.layer_rows, strict=True)]
        flops = self.runtime_flops + other.runtime_flops
        return _Counters(flops, self.policy_flops + other.policy_flops, rows)


class CudaGraphs:
    """The capture backend: side-stream warm-up, capture into one shared pool, replay."""

    def __init__(self):
        self.pool = None

    def warmup(self, fn: Callable[[], None]) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)

    def capture(self, fn: Callable[[], None]):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            fn()
        if self.pool is None:
            self.pool = graph.pool()
        return graph

    def replay(self, graph) -> None:
        graph.replay()


@dataclasses.dataclass
class _Entry:
    """One graph key: the warm-up's counters, then (from the key's second step) the captured graph
    with its static plan (its row index set copied into ``rows``) and forced-commit mask."""

    delta: _Counters
    graph: object = None
    plan: StepPlan | None = None
    rows: torch.Tensor | None = None
    forced: torch.Tensor | None = None


class GraphRunner:
    """Runs device steps through captured graphs, one per :func:`plan_key` (module docstring).

    ``backend``: :class:`CudaGraphs` (default) or any object with ``warmup(fn)``, ``capture(fn) ->
    handle`` and ``replay(handle)`` (the CPU tests substitute one that replays by re-running the
    captured closure, to check the keys, the static buffers and the counters without a GPU).
    """

    def __init__(self, runtime, policy, bufs: StepBuffers, settings: StepSettings, backend=None):
        self.runtime, self.policy, self.bufs, self.settings = runtime, policy, bufs, settings
        self.backend = backend if backend is not None else CudaGraphs()
        self.entries: dict[tuple, _Entry] = {}
        self.warmups = self.captures = self.replays = 0

    def __call__(self, plan: StepPlan, count: int, forced, end_state: DecodeState) -> None:
        key = plan_key(plan, count, forced)
        entry = self.entries.get(key)
        rt, pol = self.runtime, self.policy
        if entry is None:  # first sight: the warm-up is this step, run eagerly
            before = _Counters.read(rt, pol)
            self.backend.warmup(lambda: device_step(rt, pol, plan, self.bufs, self.settings, count, forced,
                                                    end_state))  # fmt: skip
            self.entries[key] = _Entry(delta=_Counters.read(rt, pol).minus(before))
            self.warmups += 1
            return
        if entry.graph is None:  # second sight: capture once (records, runs nothing), then replay
            rows = None if plan.rows is None else plan.rows.clone()
            static_forced = None if forced is None else forced.clone()
            static_plan = dataclasses.replace(plan, rows=rows)
            before = _Counters.read(rt, pol)
            entry.graph = self.backend.capture(
                lambda: device_step(
                    rt, pol, static_plan, self.bufs, self.settings, count, static_forced, end_state
                )  # fmt: skip
            )
            before.write(rt, pol)  # the capture ran the Python of the step, but none of its work
            entry.plan, entry.rows, entry.forced = static_plan, rows, static_forced
            self.captures += 1
        else:
            if entry.rows is not None:
                entry.rows.copy_(plan.rows)
            if entry.forced is not None:
                entry.forced.copy_(forced)
        self.backend.replay(entry.graph)
        _Counters.read(rt, pol).plus(entry.delta).write(rt, pol)
        rt.last_plan = entry.plan
        self.replays += 1


# -- the loop ------------------------------------------------------------------------------------------
def _compiled_step(backend: str):
    """``device_step`` under ``torch.compile(fullgraph=True)``: a graph break or a host sync raises."""
    return torch.compile(device_step, fullgraph=True, dynamic=False, backend=backend)


def decode_fixed(
    runtime, policy, rule: FixedCount, bufs: StepBuffers, settings: StepSettings, *, steps: int,
    mode: str = "eager", on_step=None, bar=None, plan_kinds: dict | None = None, gen_len: int,
    compile_backend: str = "inductor", graph_backend=None,
) -> tuple[int, GraphRunner | None]:  # fmt: skip
    """Decode ``steps`` fixed-count steps (lockstep blocks, no early termination) on ``bufs``.

    mode: "eager" (the device part as plain calls), "compile" (``torch.compile(fullgraph=True)``,
    ``compile_backend``) or "cuda_graph" (:class:`GraphRunner`). Returns the steps run and the graph
    runner (its warm-up / capture / replay counts), or None outside "cuda_graph".
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    steps_per_block = rule.steps_per_block
    runner = None
    if mode == "cuda_graph":
        run = runner = GraphRunner(runtime, policy, bufs, settings, graph_backend)
    elif mode == "compile":
        compiled = _compiled_step(compile_backend)

        def run(plan, count, forced, end_state):
            # Dynamo guards on the host counters a step adds to: each compiled call starts them at
            # zero (one graph per plan key, not one per running total) and the totals are restored.
            totals = _Counters.read(runtime, policy)
            totals.zero().write(runtime, policy)
            compiled(runtime, policy, plan, bufs, settings, count, forced, end_state)
            _Counters.read(runtime, policy).plus(totals).write(runtime, policy)
    else:

        def run(plan, count, forced, end_state):
            device_step(runtime, policy, plan, bufs, settings, count, forced, end_state)

    block_length, prompt_len = settings.block_length, settings.prompt_len
    # One compiled graph per plan key (a Fast-dLLM region per block): more than dynamo's default 8.
    limit = torch._dynamo.config.patch(recompile_limit=64) if mode == "compile" else contextlib.nullcontext()
    with limit:
        for step in range(steps):
            block_index, step_in_block = divmod(step, steps_per_block)
            bufs.block_of_row.fill_(block_index)
            bufs.block_start.fill_(prompt_len + block_index * block_length)
            bufs.step.fill_(step)
            common = dict(step=step, tokens=bufs.tokens, block_start=bufs.block_start,
                          block_length=block_length, block_index=block_index, step_in_block=step_in_block,
                          mask_id=settings.mask_id)  # fmt: skip
            masked = rule.masked_left(gen_len, block_index, step_in_block)
            state = DecodeState(**common, committed=bufs.committed if step else None, masked_count=masked)
            policy.begin_step(state)
            plan = policy.plan(step)
            if on_step is not None:
                on_step(step, plan)
            if plan_kinds is not None:
                plan_kinds[plan.kind] = plan_kinds.get(plan.kind, 0) + 1
            forced = policy.forced_commit(state)
            run(plan, rule.per_step[step_in_block], forced, DecodeState(**common, committed=bufs.committed))
            if bar is not None:
                bar.update(1)
    return steps, runner


__all__ = [
    "COMPILE_BACKENDS",
    "MODES",
    "CudaGraphs",
    "GraphRunner",
    "StepBuffers",
    "StepSettings",
    "check_graph_args",
    "decide_block",
    "decode_fixed",
    "device_step",
    "plan_key",
    "step_seeds",
]
