"""The decoding configuration every entry point shares, and the papers' settings as named presets.

:class:`DecodeConfig` holds what ``generate()`` needs besides the model, the prompts and the policy:
lengths, the unmasking rule and its parameter, sampling, EOS. Its defaults are the defaults of the
CLI (``python -m spacache_kernels generate``), the lm-eval model and the benchmarks, and
:data:`DECODE_PRESETS` holds the published settings under one naming style (``<method>-<task>``,
``<method>-<model>-<task>``), selectable as ``--decode NAME`` (CLI), ``decode=NAME`` (lm-eval model
argument) and by the benchmark settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class DecodeConfig:
    """gen_length / steps / block_length: G, total steps (None: G, one token per step), block size;
    threshold / factor: the unmasking rule (None and None: fixed count); temperature (0: greedy) and
    seed; eos_token_id (None: the model's); confidence ("max_prob" | "margin" | "neg_entropy") and
    schedule ("llada" | "dream" | "spa-dream") as in ``generate()``."""

    gen_length: int = 256
    steps: int | None = None
    block_length: int = 32
    threshold: float | None = None
    factor: float | None = None
    temperature: float = 0.0
    seed: int = 0
    eos_token_id: int | None = None
    confidence: str = "max_prob"
    schedule: str = "llada"
    description: str = ""

    def generate_kwargs(self) -> dict:
        """The keyword arguments of ``generate()`` (``steps`` resolved)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "description"}
        out["steps"] = self.gen_length if self.steps is None else self.steps
        return out

    def replace(self, **overrides) -> DecodeConfig:
        """A copy with ``overrides`` (unknown names: TypeError naming them)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"DecodeConfig: unknown fields {unknown}; expected some of {sorted(names)}")
        return dataclasses.replace(self, **overrides)


def _spa_runs() -> dict[str, DecodeConfig]:
    """Every published SPA-Cache run's decoding (``policies.spa.PUBLISHED_RUNS``) as ``spa-<run>``."""
    from spacache_kernels.policies.spa import PUBLISHED_RUNS

    return {
        f"spa-{name}": DecodeConfig(**run["generate"], description=f"SPA-Cache {name} ({run['script']})")
        for name, run in PUBLISHED_RUNS.items()
    }


DECODE_PRESETS: dict[str, DecodeConfig] = {
    "spa-gsm8k": DecodeConfig(
        256, 256, 8, description="SPA-Cache GSM8K: gen 256, 256 steps, block 8, fixed count (1/step)"
    ),  # fmt: skip
    "fast-dllm": DecodeConfig(
        256, 256, 32, threshold=0.9, description="Fast-dLLM: gen 256, block 32, confidence threshold 0.9"
    ),  # fmt: skip
    **_spa_runs(),
}


def decode_config(spec: str | DecodeConfig | None = None, **overrides) -> DecodeConfig:
    """A :class:`DecodeConfig` from a preset name, a config, or None (the defaults), with overrides
    (None values are ignored, so unset CLI / model arguments keep the preset's)."""
    if spec is None:
        base = DecodeConfig()
    elif isinstance(spec, DecodeConfig):
        base = spec
    elif isinstance(spec, str):
        key = spec.strip().lower()
        if key not in DECODE_PRESETS:
            raise ValueError(f"decode: expected one of {sorted(DECODE_PRESETS)}, got {spec!r}")
        base = DECODE_PRESETS[key]
    else:
        raise TypeError(f"decode: expected a preset name or a DecodeConfig, got {type(spec).__name__}")
    return base.replace(**{k: v for k, v in overrides.items() if v is not None})


__all__ = ["DECODE_PRESETS", "DecodeConfig", "decode_config"]
