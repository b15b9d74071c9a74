"""The decoding configuration every entry point shares, and the one table of published settings.

:class:`DecodeConfig` holds what ``generate()`` needs besides the model, the prompts and the policy:
lengths, the unmasking rule and its parameter, sampling, EOS. Its defaults are the defaults of the
CLI (``python -m spacache_kernels generate``), the lm-eval model and the benchmarks.

:data:`PUBLISHED` is the one table of the papers' settings. A key names the policy and the setting,
``"<policy>:<model>-<task>"`` (the task left out where the source gives one setting per model), e.g.
``"spa:llada-8b-gsm8k"``; its entry (:class:`Preset`) holds the policy's constructor settings and,
where the source publishes it, the decoding (a :class:`DecodeConfig`). Every entry point reads it:
``make_policy("spa:llada-8b-gsm8k")`` builds the policy, ``decode_config("spa:llada-8b-gsm8k")`` (CLI
``--decode``, lm-eval ``decode=``) gives the decoding, CLI ``--preset`` / lm-eval ``preset=`` take
both, and the benchmarks' settings are entries of it. ``python -m spacache_kernels presets`` prints
it (the same table as ``docs/policies.md``). This module imports nothing from the package, so the
policies (which take their ``presets`` from here) and the entry points can all import it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


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


@dataclass(frozen=True)
class Preset:
    """One published setting.

    policy: the registered policy name; settings: its constructor keyword arguments (read-only);
    decode: the decoding the source runs it with, or None where the source publishes the policy
    settings only (the caller's decoding, by default the :class:`DecodeConfig` defaults, applies);
    source: where the numbers come from.
    """

    policy: str
    settings: Mapping[str, object]
    decode: DecodeConfig | None
    source: str


_SPA_REPO = "wenhao728/spa-cache f26dd1f"
_TASKS = ("gsm8k", "math", "humaneval", "mbpp", "bbh", "gpqa", "mmlu-pro")
# SPA-Cache's LLaDA runs: task -> (refresh, gen refresh, min ratio, gen_length, steps, block_length).
_SPA_LLADA = {
    "gsm8k": (50, 7, 2**-4, 256, 256, 8),
    "math": (50, 2, 2**-4, 256, 256, 32),
    "humaneval": (50, 8, 0.2, 512, 512, 32),
    "mbpp": (25, 4, 2**-4, 512, 512, 32),
    "bbh": (50, 6, 2**-4, 256, 256, 256),
    "gpqa": (50, 6, 2**-4, 128, 128, 64),
    "mmlu-pro": (50, 3, 0.125, 256, 256, 256),
}
# SPA-Cache's Dream runs: task -> (refresh, gen refresh, min ratio). All decode alike: one block of
# 256, temperature 0.2 (their top-p 0.95 is not implemented here), ranked by negative entropy on
# SPA-Cache's copy of Dream's schedule (at least one token per step).
_SPA_DREAM = {
    "gsm8k": (25, 2, 0.125),
    "math": (50, 1, 2**-4),
    "humaneval": (50, 3, 2**-4),
    "mbpp": (8, 3, 0.125),
    "bbh": (32, 2, 2**-4),
    "gpqa": (16, 1, 0.2),
    "mmlu-pro": (16, 4, 2**-4),
}
_DREAM_SAMPLING = dict(temperature=0.2, confidence="neg_entropy", schedule="spa-dream")


def _spa_llada(refresh: int, gen_refresh: int, floor: float, curve: str = "llada-8b") -> dict:
    """SpaCache settings of a LLaDA run (the LLaDA eval script: rank 128, early stop every block)."""
    return dict(
        proxy_rank=128, max_update_ratio=0.25, min_update_ratio=floor, refresh_steps=refresh,
        refresh_gen_steps=gen_refresh, early_stop_steps="block", preset=curve,
    )  # fmt: skip


def _spa_dream(refresh: int, gen_refresh: int, floor: float) -> dict:
    """SpaCache settings of a Dream run (the Dream eval script's defaults add one warm-up step and
    early termination every step)."""
    return dict(
        proxy_rank=32, max_update_ratio=0.25, min_update_ratio=floor, refresh_steps=refresh,
        refresh_gen_steps=gen_refresh, cache_warmup_steps=1, early_stop_steps=1, preset="dream-7b",
    )  # fmt: skip


def _table() -> dict[str, Preset]:
    out: dict[str, Preset] = {}

    def add(policy: str, name: str, settings: dict, decode: DecodeConfig | None, source: str) -> None:
        if decode is not None:
            decode = dataclasses.replace(decode, description=source)
        out[f"{policy}:{name}"] = Preset(policy, MappingProxyType(dict(settings)), decode, source)

    for task, (refresh, gen_refresh, floor, g, s, b) in _SPA_LLADA.items():
        script = f"scripts/llada/eval_{task.replace('-', '_')}.sh"
        add("spa", f"llada-8b-{task}", _spa_llada(refresh, gen_refresh, floor), DecodeConfig(g, s, b),
            f"SPA-Cache {script} ({_SPA_REPO})")  # fmt: skip
    # LLaDA-1.5 runs the LLaDA GSM8K script with its own budget curve.
    add("spa", "llada-1.5-gsm8k", _spa_llada(50, 7, 2**-4, curve="llada-1.5"), DecodeConfig(256, 256, 8),
        f"SPA-Cache scripts/llada/eval_gsm8k.sh with the LLaDA-1.5 curve ({_SPA_REPO})")  # fmt: skip
    for task, (refresh, gen_refresh, floor) in _SPA_DREAM.items():
        script = f"scripts/dream/eval_{task.replace('-', '_')}.sh"
        add("spa", f"dream-7b-{task}", _spa_dream(refresh, gen_refresh, floor),
            DecodeConfig(256, 256, 256, **_DREAM_SAMPLING), f"SPA-Cache {script} ({_SPA_REPO})")  # fmt: skip
    # Fast-dLLM's setting (the policies have no parameters of their own): block 32, threshold 0.9.
    for policy in ("fast_dllm_prefix", "fast_dllm_dual"):
        for model in ("llada-8b", "dream-7b"):
            add(policy, f"{model}-gsm8k", {}, DecodeConfig(256, 256, 32, threshold=0.9),
                "Fast-dLLM (arXiv 2505.22618): gen 256, block 32, threshold 0.9")  # fmt: skip
    # dLLM-Cache's (prompt_interval, gen_interval) per model; the decoding is not part of them.
    for model, (kp, kr) in {
        "llada-8b-instruct": (50, 7), "llada-8b-base": (100, 6),
        "dream-7b-instruct": (25, 2), "dream-7b-base": (100, 8),
    }.items():  # fmt: skip
        add("dllm_cache", model, {"prompt_interval": kp, "gen_interval": kr}, None,
            "dLLM-Cache (arXiv 2506.06295), intervals per model")  # fmt: skip
    # dKV-Cache-Decode's refresh interval per model.
    for model, interval in {"llada-8b": 8, "dream-7b": 4}.items():
        add("dkv_decode", model, {"refresh_interval": interval}, None,
            "dKV-Cache (arXiv 2505.15781), refresh interval per model")  # fmt: skip
    return out


PUBLISHED: dict[str, Preset] = _table()

# Earlier names of table entries, still accepted everywhere a key is.
ALIASES: dict[str, str] = {
    "spa:llada-8b": "spa:llada-8b-gsm8k",
    "spa:llada-1.5": "spa:llada-1.5-gsm8k",
    "spa:dream-7b": "spa:dream-7b-gsm8k",
    "dllm_cache:llada-instruct": "dllm_cache:llada-8b-instruct",
    "dllm_cache:llada-base": "dllm_cache:llada-8b-base",
    "dllm_cache:dream-instruct": "dllm_cache:dream-7b-instruct",
    "dllm_cache:dream-base": "dllm_cache:dream-7b-base",
    "dkv_decode:llada": "dkv_decode:llada-8b",
    "dkv_decode:dream": "dkv_decode:dream-7b",
}


def canonical_key(spec: str) -> str:
    """``spec`` as a key of :data:`PUBLISHED` (policy part normalised like policy names: case, ``-``
    and ``_`` do not matter; an alias resolved), or ValueError listing the keys."""
    if not isinstance(spec, str):
        raise TypeError(f"preset: expected a 'policy:setting' string, got {type(spec).__name__}")
    head, sep, tail = spec.strip().partition(":")
    key = f"{head.strip().lower().replace('-', '_')}{sep}{tail.strip().lower()}"
    key = ALIASES.get(key, key)
    if key not in PUBLISHED:
        raise ValueError(f"preset: expected one of {sorted(PUBLISHED)} (or {sorted(ALIASES)}), got {spec!r}")
    return key


def published(spec: str) -> Preset:
    """The :class:`Preset` of table key (or alias) ``spec``."""
    return PUBLISHED[canonical_key(spec)]


def settings_of(policy: str) -> dict[str, dict]:
    """The table's settings of one policy, ``{setting name: constructor kwargs}`` (a policy class's
    ``presets``)."""
    entries = ((key.partition(":")[2], entry) for key, entry in PUBLISHED.items())
    return {name: dict(entry.settings) for name, entry in entries if entry.policy == policy}


def decode_config(spec: str | DecodeConfig | None = None, **overrides) -> DecodeConfig:
    """A :class:`DecodeConfig` from a table key with a published decoding, a config, or None (the
    defaults), with overrides (None values are ignored, so unset CLI / model arguments keep the
    preset's)."""
    if spec is None:
        base = DecodeConfig()
    elif isinstance(spec, DecodeConfig):
        base = spec
    elif isinstance(spec, str):
        with_decode = sorted(k for k, entry in PUBLISHED.items() if entry.decode is not None)
        try:
            entry = published(spec)
        except ValueError:
            raise ValueError(f"decode: expected one of {with_decode}, got {spec!r}") from None
        if entry.decode is None:
            raise ValueError(
                f"decode: {spec!r} publishes policy settings only, no decoding; expected one of {with_decode}"
            )
        base = entry.decode
    else:
        raise TypeError(f"decode: expected a preset name or a DecodeConfig, got {type(spec).__name__}")
    return base.replace(**{k: v for k, v in overrides.items() if v is not None})


def _decode_text(cfg: DecodeConfig | None) -> str:
    """The decoding of a table row: lengths, then every field that differs from the defaults."""
    if cfg is None:
        return "not published (the shared defaults)"
    default = DecodeConfig()
    shown = [f"gen_length={cfg.gen_length}", f"steps={cfg.generate_kwargs()['steps']}",
             f"block_length={cfg.block_length}"]  # fmt: skip
    for f in dataclasses.fields(cfg):
        if f.name in ("gen_length", "steps", "block_length", "description"):
            continue
        if getattr(cfg, f.name) != getattr(default, f.name):
            shown.append(f"{f.name}={getattr(cfg, f.name)!r}")
    return ", ".join(shown)


def preset_table() -> str:
    """:data:`PUBLISHED` and :data:`ALIASES` as Markdown (printed by ``python -m spacache_kernels
    presets``; ``docs/policies.md`` holds the same text, checked by a test)."""
    lines = ["| preset | policy settings | decoding | source |", "|---|---|---|---|"]
    for key, entry in PUBLISHED.items():
        settings = ", ".join(f"{k}={v!r}" for k, v in entry.settings.items()) or "(the defaults)"
        lines.append(f"| `{key}` | {settings} | {_decode_text(entry.decode)} | {entry.source} |")
    lines += ["", "Earlier names, still accepted: " + ", ".join(f"`{a}` = `{k}`" for a, k in ALIASES.items())]
    return "\n".join(lines) + "\n"


__all__ = [
    "ALIASES",
    "PUBLISHED",
    "DecodeConfig",
    "Preset",
    "canonical_key",
    "decode_config",
    "settings_of",
    "preset_table",
    "published",
]
