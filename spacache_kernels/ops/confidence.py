"""The LM head where a decision is needed: token choice and confidence without a (B, L, V) tensor.

:func:`token_confidence` applies the LM head at selected positions (the masked tokens of the current
block), picks a token per position (argmax, or Gumbel-max sampling with counter-based noise that is
identical on both backends) and returns its softmax probability, the confidence every unmasking
rule of ``generate.py`` ranks by.

Operator (:mod:`spacache_kernels.ops._library`): ``torch.ops.spacache.token_confidence(hidden,
lm_head, positions?, temperature, seed, row_seeds?, suppress_token?, backend) -> (token, confidence)``
(mutates nothing); ``seed`` is the int seed in [0, 2^32) and ``row_seeds`` the (B,) int64 per-row seeds
in [0, 2^32) that replace it when given.
"""

from __future__ import annotations

import math
import numbers

import torch

from spacache_kernels.ops import reference
from spacache_kernels.ops._dispatch import resolve_backend
from spacache_kernels.ops._library import check_op_backend, define
from spacache_kernels.ops._validate import check_float, check_index, check_same_device

_U32 = 0xFFFFFFFF


def _token_confidence_impl(
    hidden, lm_head, positions, temperature: float, seed: int, row_seeds, suppress_token, backend
):
    seeds = seed if row_seeds is None else row_seeds
    if check_op_backend(backend) == "torch":
        token, conf = reference.token_confidence(
            hidden, lm_head, positions, temperature, seeds, suppress_token
        )
        return token.contiguous(), conf.contiguous()
    from spacache_kernels.kernels import confidence as kernels  # imports triton only when needed

    return kernels.token_confidence(hidden, lm_head, positions, temperature, seeds, suppress_token)


def _token_confidence_fake(hidden, lm_head, positions, temperature, seed, row_seeds, suppress_token, backend):
    shape = (hidden.shape[0], hidden.shape[1] if positions is None else positions.shape[1])
    return hidden.new_empty(shape, dtype=torch.int64), hidden.new_empty(shape, dtype=torch.float32)


TOKEN_CONFIDENCE = define(
    "token_confidence(Tensor hidden, Tensor lm_head, Tensor? positions, float temperature, SymInt seed, "
    "Tensor? row_seeds, int? suppress_token, str backend) -> (Tensor, Tensor)",
    _token_confidence_impl,
    _token_confidence_fake,
)


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature: expected a float >= 0, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature >= 0.0):
        raise ValueError(f"temperature: expected a finite float >= 0, got {temperature}")
    return temperature


def _check_seed(seed, n_batch: int, device: torch.device) -> int | torch.Tensor:
    """An int, or a (B,) int tensor of per-row seeds (returned as int64 in [0, 2^32) on ``device``)."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype not in (torch.int32, torch.int64) or tuple(seed.shape) != (n_batch,):
            raise ValueError(
                f"seed: expected an int or a ({n_batch},) int32/int64 tensor of per-row seeds, "
                f"got {seed.dtype} of shape {tuple(seed.shape)}"
            )
        if seed.device != device:
            raise ValueError(f"seed: expected per-row seeds on {device}, got {seed.device}")
        return (seed.long() & _U32).contiguous()
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed: expected an int or a (B,) int tensor, got {type(seed).__name__}")
    return int(seed)


@torch.no_grad()
def token_confidence(
    hidden: torch.Tensor,
    lm_head: torch.Tensor,
    positions: torch.Tensor | None = None,
    *,
    temperature: float = 0.0,
    seed: int | torch.Tensor = 0,
    suppress_token: int | None = None,
    backend: str | None = None,
    check_indices: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token choice and its probability from the LM head at selected positions.

    With ``z = hidden[b, positions[b, j]] @ lm_head.T`` (fp32 math): ``temperature == 0`` gives
    ``token = argmax_v z`` (the lowest index among ties); ``temperature > 0`` gives the Gumbel-max
    sample ``argmax_v (z / temperature + g)``, ``g = -log(-log(u))`` with
    ``u = reference.counter_uniform(seed, b * m + j, v)``, or with per-row seeds
    ``u = reference.counter_uniform(seed[b], j, v)`` (a row's sample then does not depend on the
    batch it is in), so both backends draw the same tokens for the same seed.
    ``confidence = softmax(z)[token]`` (of the untempered logits).

    Args:
        hidden: (B, L, d) fp32/fp16/bf16, any strides (the final-normed hidden states).
        lm_head: (V, d) fp32/fp16/bf16, any strides, ``V >= 1``.
        positions: (B, m) int32/int64 in [0, L) (repeats allowed), or None for all L positions.
        temperature: a float >= 0.
        seed: an int (its low 32 bits select the noise), or a (B,) int32/int64 tensor of per-row
            seeds on the device of ``hidden`` (their low 32 bits are used).
        suppress_token: a vocabulary id never chosen (generate() passes the mask id: committing the
            mask token would leave the position masked); it still counts in the softmax.
        backend: ``"auto" | "triton" | "torch"`` or None (``SPACACHE_BACKEND``, default auto).
        check_indices: verify that ``positions`` lies in [0, L) (reads it back to the host: a sync;
            skipped while ``torch.compile`` traces or a CUDA graph is captured).

    Returns:
        ``(token (B, m) int64, confidence (B, m) fp32)``, new contiguous tensors from
        ``torch.ops.spacache.token_confidence``.
    """
    check_float("hidden", hidden, ndim=3)
    n_batch, length, d = hidden.shape
    check_float("lm_head", lm_head, ndim=2, shape=(None, d))
    if lm_head.shape[0] == 0:
        raise ValueError(
            f"lm_head: expected at least one vocabulary row (V >= 1), got shape {tuple(lm_head.shape)}"
        )
    if positions is not None:
        check_index("positions", positions, batch=n_batch, length=length, check_values=False)
    temperature = _check_temperature(temperature)
    seed = _check_seed(seed, n_batch, hidden.device)
    if suppress_token is not None and (
        isinstance(suppress_token, bool) or not isinstance(suppress_token, int)
        or not 0 <= suppress_token < lm_head.shape[0]
    ):  # fmt: skip
        raise ValueError(
            f"suppress_token: expected None or an int in [0, {lm_head.shape[0]}), got {suppress_token!r}"
        )
    check_same_device(hidden=hidden, lm_head=lm_head, positions=positions)
    if positions is not None and check_indices:
        check_index("positions", positions, batch=n_batch, length=length, check_values=True, unique=False)
    backend = resolve_backend(backend, hidden, lm_head, positions)
    # Only the low 32 bits select the noise (both backends mask them), and the operator's int is 64-bit.
    if isinstance(seed, torch.Tensor):
        int_seed, row_seeds = 0, seed
    else:
        int_seed, row_seeds = seed & _U32, None
    return TOKEN_CONFIDENCE(
        hidden, lm_head, positions, temperature, int_seed, row_seeds, suppress_token, backend
    )
