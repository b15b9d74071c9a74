"""The tiny trained diffusion LMs' tasks: problem generators, exact-match scoring, decoding a task.

The shipped checkpoint ``checkpoints/tiny-dlm`` (trained by ``bench/train_tiny_dlm.py``) is a small
LLaDA-layout masked diffusion LM that solves synthetic problems with exact answers, so that caching
policies can be scored on *accuracy* rather than only on agreement with vanilla decoding:

* ``add``: fixed-width addition, ``"0123+4567="`` -> ``"04690"`` (operands zero-padded to
  ``ADD_DIGITS`` digits, the sum to ``ADD_DIGITS + 1``), then EOS padding up to ``gen_length``;
* ``copy``: long-context copy, ``"<64 letters>="`` -> the same 64 letters, then EOS padding.

The deeper ``checkpoints/tiny-dlm-deep`` (8 layers) was trained on tasks whose answers span several
blocks of a 64-token generation (blocks of 8):

* ``sort``: 24 digits -> the same digits ascending (every answer token depends on the whole prompt);
* ``count``: 32 bits -> the running count of 1s modulo 10 (each answer digit is the previous
  generated digit plus one prompt bit);
* ``chain``: 32 digits, half of them 0 -> the running sum modulo 10 (not in the shipped checkpoint).

Every task has a fixed prompt length and a fixed answer region (the answer followed by EOS up to the
task's ``gen_length``), so a whole task is decoded by one ``generate(..., gen_length=...)`` call
without left padding. The char tokenizer is :mod:`spacache_kernels.models.char_tokenizer`.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from spacache_kernels.models.char_tokenizer import LETTERS, CharTokenizer

ADD_DIGITS = 4
COPY_LENGTH = 64
SORT_LENGTH = 24
CHAIN_LENGTH = 32
COUNT_LENGTH = 32


@dataclass(frozen=True)
class Problem:
    task: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class Task:
    """One synthetic task: fixed prompt length, answer region of ``gen_length`` tokens.

    Attributes:
        name: task name.
        prompt_length: characters in every prompt.
        answer_length: characters in every answer (before the EOS padding).
        gen_length: answer region decoded by ``generate``; answer + ``gen_length - answer_length`` EOS.
        block_length: the semi-autoregressive block used for evaluation (divides ``gen_length``).
        make: ``make(rng) -> Problem`` draws one problem.
    """

    name: str
    prompt_length: int
    answer_length: int
    gen_length: int
    block_length: int
    make: Callable[[random.Random], Problem]


def make_add(rng: random.Random, digits: int = ADD_DIGITS) -> Problem:
    """``a+b=`` with a, b uniform in [0, 10^digits), zero-padded; answer the zero-padded sum."""
    a, b = rng.randrange(10**digits), rng.randrange(10**digits)
    return Problem("add", f"{a:0{digits}d}+{b:0{digits}d}=", f"{a + b:0{digits + 1}d}")


def make_copy(rng: random.Random, length: int = COPY_LENGTH) -> Problem:
    """``s=`` with s ``length`` uniform random letters; answer s."""
    seq = "".join(rng.choice(LETTERS) for _ in range(length))
    return Problem("copy", seq + "=", seq)


def make_sort(rng: random.Random, length: int = SORT_LENGTH) -> Problem:
    """``s=`` with s ``length`` uniform random digits; answer the digits of s in ascending order.

    Every answer token depends on the whole prompt (the digit at answer position j is the one whose
    count of smaller digits is <= j), so no block of the answer can be produced from a local window.
    """
    digits = [rng.randrange(10) for _ in range(length)]
    return Problem("sort", "".join(map(str, digits)) + "=", "".join(map(str, sorted(digits))))


def make_chain(rng: random.Random, length: int = CHAIN_LENGTH) -> Problem:
    """``s=`` with s ``length`` random digits; answer the running sums of s modulo 10.

    A multi-step arithmetic chain: answer digit j is ``(answer[j-1] + s[j]) % 10``, so each step needs
    the previous *generated* token as well as the prompt; a cache that keeps stale features of answer
    tokens decoded in earlier blocks breaks the chain. Half of the digits are 0 (the others uniform in
    1..9): an all-uniform chain gives a small model no gradient until it attends to both inputs at once
    (the sum mod 10 of two unknowns is uniform given either), while "a zero repeats the previous sum"
    is learnable alone and leads it to the prompt digit.
    """
    digits = [0 if rng.random() < 0.5 else rng.randrange(1, 10) for _ in range(length)]
    sums, total = [], 0
    for d in digits:
        total = (total + d) % 10
        sums.append(total)
    return Problem("chain", "".join(map(str, digits)) + "=", "".join(map(str, sums)))


def make_count(rng: random.Random, length: int = COUNT_LENGTH) -> Problem:
    """``s=`` with s ``length`` uniform random bits; answer the running count of 1s modulo 10.

    The simplest arithmetic chain: answer digit j is ``answer[j-1] + s[j]`` modulo 10, a successor step
    gated by one prompt bit, so each step depends on the previous *generated* digit (counting the 1s of
    the prompt directly is the hard way). An early 8-layer run did not learn ``chain`` (a 10 x 10
    addition table per step) in its budget, so the shipped deep checkpoint trains on this one.
    """
    bits = [rng.randrange(2) for _ in range(length)]
    counts, total = [], 0
    for b in bits:
        total = (total + b) % 10
        counts.append(total)
    return Problem("count", "".join(map(str, bits)) + "=", "".join(map(str, counts)))


TASKS: dict[str, Task] = {
    "add": Task("add", 2 * ADD_DIGITS + 2, ADD_DIGITS + 1, 8, 8, make_add),
    "copy": Task("copy", COPY_LENGTH + 1, COPY_LENGTH, COPY_LENGTH + 8, 8, make_copy),
    # the deeper checkpoint's tasks (checkpoints/tiny-dlm-deep): answers over several blocks
    "sort": Task("sort", SORT_LENGTH + 1, SORT_LENGTH, 64, 8, make_sort),
    "chain": Task("chain", CHAIN_LENGTH + 1, CHAIN_LENGTH, 64, 8, make_chain),
    "count": Task("count", COUNT_LENGTH + 1, COUNT_LENGTH, 64, 8, make_count),
}

# Seeds of the problem streams: training draws from TRAIN_SEED, evaluation from EVAL_SEED; a
# held-out problem that also occurs in training is skipped (see ``heldout_problems``).
TRAIN_SEED = 1234
EVAL_SEED = 99


def problems(task: str, count: int, seed: int) -> list[Problem]:
    """``count`` problems of ``task`` from a seeded stream (deterministic)."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, got {task!r}")
    rng = random.Random(f"{task}:{seed}")
    return [TASKS[task].make(rng) for _ in range(count)]


def heldout_problems(task: str, count: int, seed: int = EVAL_SEED, exclude: set[str] | None = None):
    """Deterministic evaluation problems, skipping prompts in ``exclude`` (e.g. ones seen in training).

    Training draws fresh problems every step from a different seed; ``copy`` has 26^64 prompts and
    ``add`` 10^8 (``tests/test_tiny_dlm.py`` checks that the first 256 additions never occur in the
    shipped run's training stream); ``exclude`` drops given prompts when exactness matters.
    """
    rng = random.Random(f"{task}:{seed}")
    out: list[Problem] = []
    while len(out) < count:
        p = TASKS[task].make(rng)
        if exclude is None or p.prompt not in exclude:
            out.append(p)
    return out


def encode_batch(tok: CharTokenizer, batch: Sequence[Problem]) -> tuple[torch.Tensor, torch.Tensor]:
    """Problems of one task -> ``(prompt_ids (B, P), answer_ids (B, G))`` int64, answers EOS-padded."""
    if not batch:
        raise ValueError("batch: expected at least one problem")
    task = TASKS[batch[0].task]
    if any(p.task != task.name for p in batch):
        raise ValueError("batch: expected problems of a single task")
    prompts = torch.tensor([tok.encode(p.prompt) for p in batch], dtype=torch.int64)
    pad = [tok.eos_token_id] * (task.gen_length - task.answer_length)
    answers = torch.tensor([tok.encode(p.answer) + pad for p in batch], dtype=torch.int64)
    return prompts, answers


def exact_match(tok: CharTokenizer, batch: Sequence[Problem], generated: torch.Tensor) -> list[bool]:
    """Per problem: the decoded text up to the first EOS equals the answer.

    generated: (B, G) the generated region only (``out.sequences[:, P:]``).
    """
    return [tok.decode(row) == p.answer for p, row in zip(batch, generated, strict=True)]


def decode_problems(
    model, tok: CharTokenizer, batch: Sequence[Problem], policy="vanilla", *, backend="torch",
    threshold: float | None = None, block_length: int | None = None,
):  # fmt: skip
    """Decode one task's problems with ``generate()``.

    Default: fixed count, one token per step, the task's block length. ``threshold`` switches to
    Fast-dLLM's confidence-threshold unmasking; ``block_length`` overrides the task's block.
    Returns ``(generated (B, G) int64, the GenerationOutput)``; ``policy`` is a name or an instance.
    """
    from spacache_kernels.generation import generate  # the tokenizer side stays importable on its own

    prompt_ids, _ = encode_batch(tok, batch)  # validates: non-empty, one task
    spec = TASKS[batch[0].task]
    out = generate(
        model, prompt_ids, gen_length=spec.gen_length, steps=spec.gen_length,
        block_length=spec.block_length if block_length is None else block_length,
        policy=policy, eos_token_id=tok.eos_token_id, backend=backend, threshold=threshold,
    )  # fmt: skip
    return out.sequences[:, prompt_ids.shape[1] :], out


def checkpoint_tasks(directory: str | os.PathLike) -> list[str]:
    """The tasks a shipped checkpoint was trained on, from its ``training.json``.

    ``"tasks"`` when recorded (``bench/train_tiny_dlm.py --tasks``), else the tasks of its final
    accuracy table (checkpoints from before the flag: ``add`` and ``copy``).
    """
    path = Path(directory) / "training.json"
    if not path.is_file():
        raise ValueError(f"directory: {directory} has no training.json naming its tasks")
    data = json.loads(path.read_text())
    names = data.get("tasks") or list(data.get("final_vanilla_accuracy", {}))
    unknown = [n for n in names if n not in TASKS]
    if not names or unknown:
        raise ValueError(f"{path}: expected task names from {sorted(TASKS)}, got {names}")
    return list(names)


__all__ = [
    "ADD_DIGITS",
    "CHAIN_LENGTH",
    "COPY_LENGTH",
    "COUNT_LENGTH",
    "EVAL_SEED",
    "Problem",
    "SORT_LENGTH",
    "TASKS",
    "TRAIN_SEED",
    "Task",
    "checkpoint_tasks",
    "decode_problems",
    "encode_batch",
    "exact_match",
    "heldout_problems",
    "problems",
]
