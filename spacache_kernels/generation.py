"""The denoising loop: blocks, steps, unmasking rules, batch bookkeeping and statistics.

Sequence layout ``[prompt (P, left-padded) | generated (G, starts fully masked)]``; the generated
region is decoded block by block (semi-autoregressive). The unmasking rules (fixed count, default;
``threshold=tau``; ``factor=f``) are small objects in :mod:`spacache_kernels.unmasking`, independent
of the caching policy. ``on_step`` is called at the start of every step (benchmarks time steps and
guard runaway loops with it).

Confidence is ``softmax(logits)[token]`` (``confidence="margin"`` / ``"neg_entropy"``: the other
measures the references use); temperature > 0 samples the token with Gumbel-max. The noise of a row
is keyed by (its own seed, step, position in the generated region) only, so a prompt samples the
same alone and anywhere in any batch (``_step_seeds``). Fixed count may follow Dream's schedule
instead (``schedule="dream"`` / ``"spa-dream"``), every rule may rank by confidence times d2Cache's
certainty density (``certainty_prior``), a policy may force commits (Fast-dLLM's Dream block
start), and ``early_stop_steps`` turns on SPA-Cache's early termination.
The mask token is never predicted (a deliberate deviation from every reference).
In threshold/factor mode each row advances to its next block as soon as its block is decoded and
leaves the batch when it has no mask left (so a batch decodes each row exactly as it would alone;
the reference keeps blocks in lockstep across the batch). Fixed-count mode needs no host sync per
step; threshold/factor mode reads one flag per step (whether the loop is done).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from spacache_kernels.graphs import StepBuffers, StepSettings, check_graph_args, decode_fixed
from spacache_kernels.graphs import step_seeds as _step_seeds
from spacache_kernels.models.model import DiffusionLM
from spacache_kernels.models.runtime import MEASURES, DenoiseRuntime
from spacache_kernels.ops._dispatch import BACKENDS
from spacache_kernels.policies import CachePolicy, GenerationShape, make_policy
from spacache_kernels.policies.base import DecodeState
from spacache_kernels.policies.d2cache import canvas_density
from spacache_kernels.unmasking import (
    SCHEDULES,
    dream_transfer_count,
    factor_commit,
    fixed_commit,
    fixed_commit_counts,
    row_transfer_schedule,
    threshold_commit,
    transfer_schedule,
    unmasking_rule,
)

__all__ = [  # the rule helpers stay importable from here (their home is spacache_kernels.unmasking)
    "SCHEDULES",
    "GenerationOutput",
    "GenerationStats",
    "dream_transfer_count",
    "early_stop_pad",
    "factor_commit",
    "first_masked_block",
    "fixed_commit",
    "fixed_commit_counts",
    "generate",
    "row_transfer_schedule",
    "threshold_commit",
    "transfer_schedule",
]


@dataclass
class GenerationStats:
    """What one generate() call did. FLOPs are counted from the rows each op processed."""

    steps: int = 0
    forwards: int = 0
    generated_tokens: int = 0  # summed over rows, up to (excluding) each row's first EOS; no prompt
    seconds: float = 0.0  # the denoising loop only; setup is in setup_seconds
    setup_seconds: float = 0.0  # policy.reset (e.g. SPA's SVD proxies on first use) + cache allocation
    tokens_per_second: float = 0.0  # generated_tokens / seconds
    flops: int = 0
    flops_per_step: float = 0.0
    layer_recomputed_tokens: list[int] = field(default_factory=list)  # summed over steps and rows
    plan_kinds: dict[str, int] = field(default_factory=dict)
    graph_replays: int = 0  # cuda_graph=True: steps replayed from a captured graph
    policy: str = ""


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # (B, P + G) int64: the prompt (as given) followed by the generated tokens
    stats: GenerationStats


def early_stop_pad(
    tokens: torch.Tensor, prompt_len: int, stop_ids: torch.Tensor, pad_id: int
) -> torch.Tensor:
    """Early termination (SPA-Cache's ``spac/sequence.py``): overwrite everything after each row's first
    stop token (EOS or pad) in the generated region with ``pad_id``, in place. Returns the (B, T) bool
    mask of the positions that changed."""
    gen = tokens[:, prompt_len:]
    is_stop = torch.isin(gen, stop_ids)
    after = torch.cat([torch.zeros_like(is_stop[:, :1]), is_stop[:, :-1]], dim=1).cummax(dim=1).values
    changed = after & (gen != pad_id)
    gen.masked_fill_(changed, pad_id)
    return torch.cat([torch.zeros_like(tokens[:, :prompt_len], dtype=torch.bool), changed], dim=1)


def first_masked_block(
    tokens: torch.Tensor, prompt_len: int, mask_id: int, block_length: int
) -> torch.Tensor:
    """(B,) int64: the block of each row's first still-masked generated position (the block count
    when none is left)."""
    masked = tokens[:, prompt_len:] == mask_id
    gen_len = masked.shape[1]
    none_left = torch.full_like(masked[:, 0], gen_len, dtype=torch.long)
    first = torch.where(masked.any(1), masked.long().argmax(1), none_left)
    return first // block_length


def _stop_tokens(model, eos_token_id) -> tuple[torch.Tensor, int]:
    """The token ids that end a row for early termination (the given EOS, the config's EOS and pad)
    and the id written after them (the config's pad, else the EOS)."""
    cfg = model.config
    ids = [i for i in (eos_token_id, cfg.eos_token_id, cfg.pad_token_id) if i is not None]
    if not ids:
        raise ValueError(
            "early_stop_steps: early termination needs an EOS or pad token id; pass eos_token_id "
            "(the model's config has neither)"
        )
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else ids[0]
    return torch.tensor(sorted(set(ids)), dtype=torch.int64, device=model.device), int(pad)


def _early_stop_period(early_stop_steps, policy, block_length: int) -> int | None:
    """generate()'s ``early_stop_steps``, else the policy's published one; ``"block"`` = block length."""
    from spacache_kernels.policies.base import check_early_stop_steps

    value = check_early_stop_steps(early_stop_steps)
    if value is None:
        value = getattr(policy, "early_stop_steps", None)
    return block_length if value == "block" else value


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def _row_seeds(seed, batch: int, device: torch.device) -> torch.Tensor:
    """(B,) int64 in [0, 2^32): one seed per row from an int (shared), a sequence or an int tensor."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype not in (torch.int32, torch.int64) or tuple(seed.shape) != (batch,):
            raise ValueError(
                f"seed: expected an int or ({batch},) int seeds, got {seed.dtype} "
                f"of shape {tuple(seed.shape)}"
            )
        return (seed.to(device=device, dtype=torch.int64) & 0xFFFFFFFF).contiguous()
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch or any(isinstance(s, bool) or not isinstance(s, int) for s in seed):
            raise ValueError(f"seed: expected an int or a sequence of {batch} ints (one per row), got {seed}")
        return torch.tensor([s & 0xFFFFFFFF for s in seed], dtype=torch.int64, device=device)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int or a sequence of per-row ints, got {type(seed).__name__}")
    return torch.full((batch,), seed & 0xFFFFFFFF, dtype=torch.int64, device=device)


def _note_nan(conf: torch.Tensor, step: int, first_nan_step: torch.Tensor) -> torch.Tensor:
    """Record (on the device, no host sync) the first step whose confidences hold a NaN."""
    bad = torch.isnan(conf).any()
    return torch.where(bad & (first_nan_step < 0), torch.full_like(first_nan_step, step), first_nan_step)


def _raise_if_nan(first_nan_step: torch.Tensor) -> None:
    step = int(first_nan_step)
    if step >= 0:
        raise FloatingPointError(
            f"generate: the confidences of step {step} are not finite (NaN): the model produced NaN "
            "logits (NaN / inf weights, or an overflow in a low-precision dtype); "
            "load_model(..., check_finite=True) names a non-finite weight"
        )


def validate_decoding(
    gen_length,
    steps,
    block_length,
    threshold=None,
    factor=None,
    temperature=0.0,
    backend=None,
    certainty_prior=None,
    confidence="max_prob",
    schedule="llada",
) -> None:
    """The checks of generate()'s decoding arguments that need no model or prompt: generate() runs them,
    and so do the entry points that must fail on a typo before loading weights (lm-eval, the CLI)."""
    _check_int("gen_length", gen_length)
    _check_int("steps", steps)
    _check_int("block_length", block_length)
    if gen_length % block_length:
        raise ValueError(f"gen_length: expected a multiple of block_length={block_length}, got {gen_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps: expected a multiple of the block count {num_blocks}, got {steps}")
    for name, value in (("threshold", threshold), ("factor", factor), ("temperature", temperature)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite number, got {value}")
    if threshold is not None and factor is not None:
        raise ValueError("threshold / factor: give at most one unmasking rule")
    if threshold is not None and not 0 < threshold <= 1:
        raise ValueError(f"threshold: expected a value in (0, 1], got {threshold}")
    if factor is not None and not factor > 0:
        raise ValueError(f"factor: expected a positive value, got {factor}")
    if confidence not in MEASURES:
        raise ValueError(f"confidence: expected one of {MEASURES}, got {confidence!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    sigma = certainty_prior
    if sigma is not None and (type(sigma) not in (int, float) or sigma <= 0):
        raise ValueError(f"certainty_prior: expected a positive sigma or None, got {certainty_prior!r}")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature: expected a number >= 0, got {temperature!r}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")


def _validate(model, input_ids, attention_mask, gen_length, steps, block_length, threshold, factor,
              temperature, backend, eos_token_id=None, certainty_prior=None, confidence="max_prob",
              schedule="llada"):  # fmt: skip
    validate_decoding(gen_length, steps, block_length, threshold, factor, temperature, backend,
                      certainty_prior, confidence, schedule)  # fmt: skip
    if not isinstance(model, DiffusionLM):
        raise TypeError(f"model: expected a DiffusionLM (see load_model), got {type(model).__name__}")
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids: expected a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids: expected an int64 or int32 tensor, got {input_ids.dtype}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids: expected a non-empty (B, P) tensor, got shape {tuple(input_ids.shape)}")
    cfg = model.config
    if model.mask_id is None:
        raise ValueError("model: its config has no mask_token_id, so it cannot decode masked tokens")
    total = input_ids.shape[1] + gen_length
    if total > cfg.max_positions:
        raise ValueError(
            f"input_ids: prompt length {input_ids.shape[1]} + gen_length {gen_length} exceeds the "
            f"model's max positions {cfg.max_positions}"
        )
    if eos_token_id is not None and (
        isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int)
        or not 0 <= eos_token_id < cfg.vocab_size
    ):  # fmt: skip
        raise ValueError(
            f"eos_token_id: expected None or a token id in [0, {cfg.vocab_size}), got {eos_token_id!r}"
        )
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: expected a tensor of shape {tuple(input_ids.shape)}")
        m = attention_mask.long()
        if bool(((m != 0) & (m != 1)).any()):
            raise ValueError("attention_mask: expected values 0 (padding) and 1 (token)")
        if bool((m[:, 1:] < m[:, :-1]).any()):
            raise ValueError("attention_mask: expected left padding (zeros only before the tokens)")
        if bool((m.sum(1) == 0).any()):
            raise ValueError("attention_mask: every row needs at least one real prompt token")
    real = input_ids if attention_mask is None else input_ids[attention_mask.bool()]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= cfg.vocab_size):
        raise ValueError(f"input_ids: expected token ids in [0, {cfg.vocab_size})")
    if bool((real == model.mask_id).any()):
        raise ValueError(f"input_ids: the prompt contains the mask token id {model.mask_id}")


def _release_policy(fn):
    """Release a caller-owned policy instance when generate() returns or raises (its caches, the
    runtime and the model would otherwise stay alive as long as the instance does)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            policy = kwargs.get("policy")
            if isinstance(policy, CachePolicy):
                policy.release()

    return wrapper


@_release_policy
@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    gen_length: int,
    steps: int,
    block_length: int,
    policy: str | CachePolicy = "spa",
    threshold: float | None = None,
    factor: float | None = None,
    temperature: float = 0.0,
    eos_token_id: int | None = None,
    early_stop_steps: int | str | None = None,
    certainty_prior: float | None = None,
    confidence: str = "max_prob",
    schedule: str = "llada",
    backend: str | None = None,
    seed: int | list[int] | torch.Tensor = 0,
    progress: bool = False,
    on_step=None,
    cuda_graph: bool = False,
    compile_step: bool | str = False,
) -> GenerationOutput:
    """Decode ``gen_length`` masked tokens after each prompt with a caching policy.

    Args:
        model: a :class:`~spacache_kernels.models.DiffusionLM` (see ``load_model``).
        input_ids: (B, P) int64 prompts, left-padded when ragged (then pass ``attention_mask``).
        attention_mask: (B, P) 1 for tokens, 0 for left padding.
        gen_length / steps / block_length: G, total steps, block size (G % block == 0 and
            steps % (G / block) == 0); in threshold/factor mode ``steps`` is not used beyond that check.
        policy: "spa" | "vanilla" | any registered name | a CachePolicy instance.
        threshold / factor: unmasking rule (default: fixed count per step).
        temperature: 0 = greedy; > 0 = Gumbel-max sampling (reproducible through ``seed``).
        seed: the sampling seed: an int shared by every row, or one int per row (a sequence or a (B,)
            int tensor; give repeated prompts different seeds to get different samples). A row's
            noise depends on its seed, the step and the position only, so a prompt samples the same
            alone and in any batch, at any position. Low 32 bits are used.
        eos_token_id: for statistics (generated tokens are counted up to each row's first EOS) and
            early termination; default: the model's ``config.eos_token_id``.
        early_stop_steps: early termination (SPA-Cache's published runs): every that many steps,
            everything after a row's first EOS / pad (``eos_token_id`` and the config's EOS and pad
            ids) is overwritten with pad, a block with no mask left in any row skips its remaining
            steps, and a row with no mask left leaves the batch; under the fixed-count rule each row
            then commits its own block's masked count over the block's steps. An int, ``"block"``
            (the block length), or None: the policy's ``early_stop_steps`` (its presets set the
            published value; default off). ``stats.steps`` counts the steps actually run.
        certainty_prior: d2Cache's published decoding ("certainty prior", sigma 10): every rule ranks
            (and thresholds) confidence times the certainty density of the decoded positions
            around each token, computed as d2Cache's reference does (``policies.d2cache.
            canvas_density`` over the generated region before the step); None: plain confidence.
        confidence: what the rules rank by: "max_prob" (default; LLaDA, ``alg="maskgit_plus"``),
            "margin" (top-1 minus top-2 probability, ``alg="topk_margin"``) or "neg_entropy"
            (``alg="entropy"``, Dream's and Fast-dLLM-Dream's fixed-step default).
        schedule: fixed-count tokens per step: "llada" (``b // s`` per step, remainder first),
            "dream" (Dream's ``generation_utils``: at step i of s, ``int(m * (1 - t_{i+1} / t_i))``
            with ``t = linspace(1, 1e-3, s + 1)`` and m the block's masked count averaged over the
            batch, everything left at the last step; as Fast-dLLM's Dream block loop) or
            "spa-dream" (SPA-Cache's copy of it, which commits at least one token per step).
        backend: "auto" | "triton" | "torch" for every op; None (default): ``SPACACHE_BACKEND``, else
            "auto".
        progress: show a tqdm bar over steps.
        on_step: None, or a callable ``on_step(step, plan)`` called at the start of every step with
            the step index and the policy's :class:`StepPlan` (before the step runs); an exception
            it raises ends generate() (the policy is still released).
        cuda_graph: capture each distinct step plan once as a CUDA graph and replay it (a CUDA model,
            the fixed-count "llada" schedule, no early termination, a policy without ``step_syncs``;
            anything else is a ValueError naming the obstacle). Same tokens as the eager loop;
            see ``spacache_kernels.graphs`` for what is captured and what stays eager.
        compile_step: run each step's device part under ``torch.compile(fullgraph=True)`` (True:
            inductor, or a backend name: "aot_eager", "eager"); the same conditions except the device
            (checked on the torch backend; the Triton kernels under dynamo are not checked yet).

    Returns:
        GenerationOutput(sequences (B, P + G) int64, stats).

    Raises:
        ValueError / TypeError: a bad argument (named, with what was expected).
        FloatingPointError: a step's confidences were NaN (checked once, after the loop).

    Deliberate deviation from every reference: the mask token is never predicted (the references take
    the argmax over the whole vocabulary and can "commit" the mask id, which leaves the position
    masked; d2Cache's vanilla loop can then spin forever).
    """
    _validate(model, input_ids, attention_mask, gen_length, steps, block_length, threshold, factor,
              temperature, backend, eos_token_id, certainty_prior, confidence, schedule)  # fmt: skip
    policy = make_policy(policy)
    device = model.device
    input_ids = input_ids.to(device=device, dtype=torch.int64)
    batch, prompt_len = input_ids.shape
    row_seeds = _row_seeds(seed, batch, device)
    mask_id = model.mask_id
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device=device, dtype=torch.int64)
    full_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, gen_length)], dim=1)
    tokens = torch.cat([input_ids, input_ids.new_full((batch, gen_length), mask_id)], dim=1)
    # Padding positions hold a real id so the embedding never sees garbage (they are masked out).
    pad_fill = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    tokens[:, :prompt_len] = torch.where(attention_mask.bool(), input_ids, pad_fill)

    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id  # EOS padding is not throughput
    setup_start = time.perf_counter()
    num_blocks = gen_length // block_length
    early = _early_stop_period(early_stop_steps, policy, block_length)
    stop_ids, stop_pad = _stop_tokens(model, eos_token_id) if early else (None, None)
    fixed = threshold is None and factor is None
    graph_mode = check_graph_args(
        cuda_graph=cuda_graph, compile_step=compile_step, device=device, policy=policy,
        threshold=threshold, factor=factor, early_stop=early, schedule=schedule,
    )  # fmt: skip
    unmasking = "fixed" if fixed else ("threshold" if threshold is not None else "factor")
    policy.reset(
        model,
        GenerationShape(
            batch, prompt_len, gen_length, device, backend, block_length=block_length,
            steps_per_block=steps // num_blocks, unmasking=unmasking,
        ),
    )  # fmt: skip
    runtime = DenoiseRuntime(model, full_mask, prompt_len, policy, backend)
    output = tokens.clone()
    row_ids = torch.arange(batch, device=device)  # original row of each live row
    offsets = torch.arange(block_length, device=device)
    # Blocks advance per row in threshold/factor mode unless the policy keys on shared block starts.
    lockstep = fixed or policy.lockstep_blocks
    stats = GenerationStats(policy=getattr(policy, "name", type(policy).__name__))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats.setup_seconds = time.perf_counter() - setup_start
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps if fixed else gen_length, desc=f"generate[{stats.policy}]", unit="step")

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start_time = time.perf_counter()
    step = 0
    block_of_row = torch.zeros(batch, dtype=torch.int64, device=device)
    rule = unmasking_rule(threshold, factor, block_length=block_length, steps_per_block=steps // num_blocks,
                          schedule=schedule)  # fmt: skip
    steps_per_block = steps // num_blocks
    block_index, step_in_block = 0, 0  # host-side, meaningful in lockstep mode
    committed = None
    first_nan_step = torch.full((), -1, dtype=torch.int64, device=device)
    row_counts = None  # (B, steps per block): fixed-count schedule per row under early termination
    if graph_mode is not None:  # every step on static buffers, compiled or captured (graphs.py)
        bufs = StepBuffers.create(tokens, row_seeds, block_length)
        settings = StepSettings(
            prompt_len, block_length, mask_id, float(temperature), confidence, certainty_prior
        )
        step, runner = decode_fixed(
            runtime, policy, rule, bufs, settings, steps=steps, mode=graph_mode, on_step=on_step, bar=bar,
            plan_kinds=stats.plan_kinds, gen_len=gen_length,
            compile_backend=compile_step if isinstance(compile_step, str) else "inductor",
        )  # fmt: skip
        first_nan_step = bufs.first_nan_step
        stats.graph_replays = runner.replays if runner is not None else 0
    while graph_mode is None:
        if fixed and early:
            if step_in_block >= steps_per_block:  # the block's steps are used up
                block_index, step_in_block = block_index + 1, 0
            # Skip every block no row has a mask left in (one host read per step).
            target = int(first_masked_block(tokens, prompt_len, mask_id, block_length).min())
            if target > block_index:
                block_index, step_in_block = target, 0
            if block_index >= num_blocks:
                break
            if step_in_block == 0:
                lo = prompt_len + block_index * block_length
                block_masked = (tokens[:, lo : lo + block_length] == mask_id).sum(1)
                row_counts = row_transfer_schedule(block_masked, steps_per_block)
            block_of_row.fill_(block_index)
        elif fixed:
            if step >= steps:
                break
            block_index, step_in_block = divmod(step, steps_per_block)
            block_of_row.fill_(block_index)
        block_start = prompt_len + block_of_row * block_length
        known = rule.masked_left(gen_length, block_index, step_in_block) if fixed and not early else None
        state = DecodeState(
            step=step, tokens=tokens, block_start=block_start, block_length=block_length,
            block_index=block_index if lockstep else None, step_in_block=step_in_block if lockstep else None,
            mask_id=mask_id, committed=committed, masked_count=known,
        )  # fmt: skip
        policy.begin_step(state)
        plan = policy.plan(step)
        if on_step is not None:
            on_step(step, plan)
        stats.plan_kinds[plan.kind] = stats.plan_kinds.get(plan.kind, 0) + 1
        runtime.step(tokens, plan)
        positions = block_start[:, None] + offsets  # (B, b)
        step_seeds = _step_seeds(row_seeds, step, block_of_row, block_length) if temperature > 0 else 0
        token, conf = runtime.decide(
            positions, temperature=float(temperature), seed=step_seeds, measure=confidence
        )
        first_nan_step = _note_nan(conf, step, first_nan_step)
        current = torch.gather(tokens, 1, positions)
        masked = current == mask_id
        if certainty_prior is not None:
            density = canvas_density(tokens[:, prompt_len:] != mask_id, certainty_prior)
            conf = conf * torch.gather(density, 1, positions - prompt_len)
        forced = policy.forced_commit(state)
        commit = rule.commit(conf, masked, step_in_block=step_in_block, row_counts=row_counts, forced=forced)
        tokens.scatter_(1, positions, torch.where(commit, token, current))
        committed = torch.zeros_like(tokens, dtype=torch.bool).scatter_(1, positions, commit)
        if early and (step + 1) % early == 0:
            # Padded positions changed token, so the policy sees them as committed.
            committed |= early_stop_pad(tokens, prompt_len, stop_ids, stop_pad)
        policy.end_step(
            DecodeState(
                step=step, tokens=tokens, block_start=block_start, block_length=block_length,
                block_index=state.block_index, step_in_block=state.step_in_block, mask_id=mask_id,
                committed=committed,
            )
        )  # fmt: skip
        step += 1
        step_in_block += 1
        if bar is not None:
            bar.update(1)
        if fixed and not early:
            continue
        if early:
            # A row's next block is its first with a mask left (padding may have emptied several).
            nxt = first_masked_block(tokens, prompt_len, mask_id, block_length)
            if lockstep and not fixed:
                moved = int(nxt.min())  # the one host read per step in lockstep mode
                if moved > block_index:
                    block_index, step_in_block = moved, 0
                block_of_row = torch.where(nxt >= num_blocks, nxt, torch.full_like(nxt, block_index))
            else:
                block_of_row = nxt
        else:
            # Threshold/factor: rows advance to their next block, finished rows leave the batch.
            block_done = ~((torch.gather(tokens, 1, positions) == mask_id).any(1))
            if lockstep:
                all_done = bool(block_done.all())  # the one host read per step in lockstep mode
                block_done = block_done.new_full(block_done.shape, all_done)
                if all_done:
                    block_index, step_in_block = block_index + 1, 0
            block_of_row += block_done.long()
        finished = block_of_row >= num_blocks
        if bool(finished.any()):  # the one host read per step in this mode
            output[row_ids[finished]] = tokens[finished]
            keep = ~finished
            if not bool(keep.any()):
                break
            tokens, row_ids, block_of_row = tokens[keep], row_ids[keep], block_of_row[keep]
            row_seeds = row_seeds[keep]
            committed = committed[keep] if committed is not None else None
            row_counts = row_counts[keep] if row_counts is not None else None
            runtime.drop_rows(keep)
            policy.drop_rows(keep)
    output[row_ids] = tokens  # the rows still in the batch (finished ones were written as they left)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats.seconds = time.perf_counter() - start_time
    if bar is not None:
        bar.close()
    _raise_if_nan(first_nan_step)  # one read after the loop: a NaN step fails loudly, never as EOS

    gen = output[:, prompt_len:]
    if early or eos_token_id is not None:
        is_eos = torch.isin(gen, stop_ids) if early else gen == eos_token_id
        first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(gen[:, 0], gen_length))
        stats.generated_tokens = int(first.sum())
    else:
        stats.generated_tokens = int(gen.numel())
    stats.steps = stats.forwards = step
    stats.tokens_per_second = stats.generated_tokens / stats.seconds if stats.seconds > 0 else float("nan")
    stats.flops = int(runtime.flops + getattr(policy, "flops", 0))
    stats.flops_per_step = stats.flops / max(step, 1)
    stats.layer_recomputed_tokens = [int(v) for v in np.asarray(runtime.layer_rows)]
    return GenerationOutput(sequences=output, stats=stats)
