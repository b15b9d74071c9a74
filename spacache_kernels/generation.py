"""The denoising loop: blocks, steps, unmasking rules, batch bookkeeping and statistics.

Sequence layout ``[prompt (P, left-padded) | generated (G, starts fully masked)]``; the generated
region is decoded block by block (semi-autoregressive). The unmasking rules (fixed count, default;
``threshold=tau``; ``factor=f``) are small objects in :mod:`spacache_kernels.unmasking`, independent
of the caching policy. ``on_step`` is called at the start of every step (benchmarks time steps and
guard runaway loops with it).

Confidence is ``softmax(logits)[token]`` (``confidence="margin"`` / ``"neg_entropy"``: the other
measures the references use); temperature > 0 samples the token with Gumbel-max. The noise of a row
is keyed by (its own seed, step, position in the generated region) only, so a prompt samples the
same alone and anywhere in any batch (``graphs.step_seeds``). Fixed count may follow Dream's schedule
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

from spacache_kernels.graphs import StepBuffers, StepSettings, check_graph_args, decide_block, decode_fixed
from spacache_kernels.models.model import DiffusionLM
from spacache_kernels.models.runtime import MEASURES, DenoiseRuntime
from spacache_kernels.ops._dispatch import BACKENDS
from spacache_kernels.policies import CachePolicy, GenerationShape, make_policy
from spacache_kernels.policies.base import DecodeState
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


class DecodeBatch:
    """The batch bookkeeping of one generate() call: the rows still decoding and where each stands.

    tokens: (B', T) the live rows' current tokens (mask id where still masked); output: (B, T) every
    row's final sequence (a row is copied there when it leaves, the rest at :meth:`finish`);
    row_ids: (B',) the original row of each live row; block_of_row: (B',) int64 the block each row
    decodes; row_seeds: (B',) its sampling seed; committed: (B', T) bool, what the latest step
    committed (None before step 0); row_counts: (B', steps per block) the fixed-count schedule per row
    under early termination (else None). block_index / step_in_block: host-side counters of the
    current block and the steps taken in it (meaningful when blocks advance in lockstep).

    Every method keeps generate()'s host-sync budget: the fixed-count rule reads nothing back per step
    (early termination: one read), threshold / factor one read (whether a row finished).
    """

    def __init__(self, tokens: torch.Tensor, row_seeds: torch.Tensor, *, prompt_len: int, block_length: int,
                 num_blocks: int, steps_per_block: int, mask_id: int):  # fmt: skip
        batch, device = tokens.shape[0], tokens.device
        self.tokens = tokens
        self.output = tokens.clone()
        self.row_ids = torch.arange(batch, device=device)
        self.row_seeds = row_seeds
        self.block_of_row = torch.zeros(batch, dtype=torch.int64, device=device)
        self.committed: torch.Tensor | None = None
        self.row_counts: torch.Tensor | None = None
        self.block_index, self.step_in_block = 0, 0
        self.prompt_len, self.block_length, self.num_blocks = prompt_len, block_length, num_blocks
        self.steps_per_block, self.mask_id = steps_per_block, mask_id
        self._offsets = torch.arange(block_length, device=device)

    # -- before a step --------------------------------------------------------------------------
    def enter_fixed_step(self, step: int) -> None:
        """Fixed count: step ``step`` decodes block ``step // steps_per_block`` in every row."""
        self.block_index, self.step_in_block = divmod(step, self.steps_per_block)
        self.block_of_row.fill_(self.block_index)

    def enter_fixed_step_early_stop(self) -> bool:
        """Fixed count with early termination: move to the next block when this one's steps are used
        up or no row has a mask left in it (one host read), and fix each row's schedule for a new
        block. False: every block is done."""
        if self.step_in_block >= self.steps_per_block:
            self.block_index, self.step_in_block = self.block_index + 1, 0
        target = int(first_masked_block(self.tokens, self.prompt_len, self.mask_id, self.block_length).min())
        if target > self.block_index:
            self.block_index, self.step_in_block = target, 0
        if self.block_index >= self.num_blocks:
            return False
        if self.step_in_block == 0:
            lo = self.prompt_len + self.block_index * self.block_length
            block_masked = (self.tokens[:, lo : lo + self.block_length] == self.mask_id).sum(1)
            self.row_counts = row_transfer_schedule(block_masked, self.steps_per_block)
        self.block_of_row.fill_(self.block_index)
        return True

    def block_start(self) -> torch.Tensor:
        """(B',) int64 absolute position of each row's current block."""
        return self.prompt_len + self.block_of_row * self.block_length

    def block_positions(self, block_start: torch.Tensor) -> torch.Tensor:
        """(B', block_length) the absolute positions of each row's current block."""
        return block_start[:, None] + self._offsets

    def state(self, step: int, block_start: torch.Tensor, lockstep: bool, **kw) -> DecodeState:
        """The :class:`DecodeState` the policy sees (``committed`` as of the latest commit)."""
        return DecodeState(
            step=step, tokens=self.tokens, block_start=block_start, block_length=self.block_length,
            block_index=self.block_index if lockstep else None,
            step_in_block=self.step_in_block if lockstep else None, mask_id=self.mask_id,
            committed=self.committed, **kw,
        )  # fmt: skip

    # -- after a step ---------------------------------------------------------------------------
    def commit(self, positions: torch.Tensor, new: torch.Tensor, commit: torch.Tensor) -> None:
        """Write ``new`` (B', b) at ``positions`` and record ``commit`` (B', b) bool as the step's commits."""
        self.tokens.scatter_(1, positions, new)
        self.committed = torch.zeros_like(self.tokens, dtype=torch.bool).scatter_(1, positions, commit)

    def advance_after_early_stop(self, lockstep: bool, fixed: bool) -> None:
        """Early termination: a row's next block is its first with a mask left (padding may have
        emptied several); in lockstep threshold / factor mode the batch moves together (one read)."""
        nxt = first_masked_block(self.tokens, self.prompt_len, self.mask_id, self.block_length)
        if lockstep and not fixed:
            moved = int(nxt.min())  # the one host read per step in lockstep mode
            if moved > self.block_index:
                self.block_index, self.step_in_block = moved, 0
            self.block_of_row = torch.where(
                nxt >= self.num_blocks, nxt, torch.full_like(nxt, self.block_index)
            )
        else:
            self.block_of_row = nxt

    def advance_decoded_blocks(self, positions: torch.Tensor, lockstep: bool) -> None:
        """Threshold / factor: a row whose block ``positions`` has no mask left moves to its next block
        (in lockstep: all rows, once every row's block is decoded; one host read)."""
        block_done = ~((torch.gather(self.tokens, 1, positions) == self.mask_id).any(1))
        if lockstep:
            all_done = bool(block_done.all())  # the one host read per step in lockstep mode
            block_done = block_done.new_full(block_done.shape, all_done)
            if all_done:
                self.block_index, self.step_in_block = self.block_index + 1, 0
        self.block_of_row += block_done.long()

    def drop_finished(self, runtime: DenoiseRuntime, policy: CachePolicy) -> bool:
        """Rows past their last block leave (copied to ``output``; the runtime and the policy forget
        them): one host read. False: no row is left."""
        finished = self.block_of_row >= self.num_blocks
        if not bool(finished.any()):  # the one host read per step in this mode
            return True
        self.output[self.row_ids[finished]] = self.tokens[finished]
        keep = ~finished
        if not bool(keep.any()):
            return False
        self.tokens, self.row_ids, self.block_of_row = (
            self.tokens[keep],
            self.row_ids[keep],
            self.block_of_row[keep],
        )
        self.row_seeds = self.row_seeds[keep]
        self.committed = self.committed[keep] if self.committed is not None else None
        self.row_counts = self.row_counts[keep] if self.row_counts is not None else None
        runtime.drop_rows(keep)
        policy.drop_rows(keep)
        return True

    def finish(self) -> torch.Tensor:
        """(B, T) every row's sequence: the rows still in the batch join the ones that left."""
        self.output[self.row_ids] = self.tokens
        return self.output


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
    steps_per_block = steps // num_blocks
    rows = DecodeBatch(tokens, row_seeds, prompt_len=prompt_len, block_length=block_length,
                       num_blocks=num_blocks, steps_per_block=steps_per_block, mask_id=mask_id)  # fmt: skip
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
    rule = unmasking_rule(threshold, factor, block_length=block_length, steps_per_block=steps_per_block,
                          schedule=schedule)  # fmt: skip
    first_nan_step = torch.full((), -1, dtype=torch.int64, device=device)
    settings = StepSettings(
        prompt_len, block_length, mask_id, float(temperature), confidence, certainty_prior
    )
    if graph_mode is not None:  # every step on static buffers, compiled or captured (graphs.py)
        bufs = StepBuffers.create(rows.tokens, rows.row_seeds, block_length)  # rows.tokens stays the output
        step, runner = decode_fixed(
            runtime, policy, rule, bufs, settings, steps=steps, mode=graph_mode, on_step=on_step, bar=bar,
            plan_kinds=stats.plan_kinds, gen_len=gen_length,
            compile_backend=compile_step if isinstance(compile_step, str) else "inductor",
        )  # fmt: skip
        first_nan_step = bufs.first_nan_step
        stats.graph_replays = runner.replays if runner is not None else 0
    while graph_mode is None:
        # 1. Which block each row decodes (fixed count: by the step; else as the last step left it).
        if fixed and early:
            if not rows.enter_fixed_step_early_stop():
                break
        elif fixed:
            if step >= steps:
                break
            rows.enter_fixed_step(step)
        block_start = rows.block_start()
        # What every row still has masked, when the fixed-count schedule tells the host (no sync).
        known = None
        if fixed and not early:
            known = rule.masked_left(gen_length, rows.block_index, rows.step_in_block)
        state = rows.state(step, block_start, lockstep, masked_count=known)

        # 2. The policy plans the step; the runtime runs it.
        policy.begin_step(state)
        plan = policy.plan(step)
        if on_step is not None:
            on_step(step, plan)
        stats.plan_kinds[plan.kind] = stats.plan_kinds.get(plan.kind, 0) + 1
        runtime.step(rows.tokens, plan)

        # 3. Token and confidence at each row's block, then the unmasking rule commits some of them.
        positions = rows.block_positions(block_start)  # (B, b)
        token, conf, current, masked = decide_block(
            runtime, rows.tokens, positions, settings, row_seeds=rows.row_seeds, step=step,
            block_of_row=rows.block_of_row, first_nan_step=first_nan_step,
        )  # fmt: skip
        forced = policy.forced_commit(state)
        commit = rule.commit(conf, masked, step_in_block=rows.step_in_block, row_counts=rows.row_counts,
                             forced=forced)  # fmt: skip
        rows.commit(positions, torch.where(commit, token, current), commit)
        if early and (step + 1) % early == 0:
            # Padded positions changed token, so the policy sees them as committed.
            rows.committed |= early_stop_pad(rows.tokens, prompt_len, stop_ids, stop_pad)
        policy.end_step(rows.state(step, block_start, lockstep))
        step += 1
        rows.step_in_block += 1
        if bar is not None:
            bar.update(1)

        # 4. Rows move to their next block; finished rows leave the batch.
        if fixed and not early:
            continue
        if early:
            rows.advance_after_early_stop(lockstep, fixed)
        else:
            rows.advance_decoded_blocks(positions, lockstep)
        if not rows.drop_finished(runtime, policy):
            break
    output = rows.finish()
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
