"""spacache_kernels: fused Triton kernels, model adapters and caching policies for diffusion LMs.

Layers (imports point downward): ``kernels`` (Triton) -> ``ops`` (validated, autograd-free ops with
pure-PyTorch references) -> ``models`` (LLaDA / Dream adapters and the cached-step runtime) ->
``policies`` (what to recompute) -> ``generation`` (the denoising loop) -> ``integrations``
(lm-eval, the tiny models' tasks).
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "GenerationOutput": ("spacache_kernels.generation", "GenerationOutput"),
    "load_model": ("spacache_kernels.models", "load_model"),
    "DiffusionLM": ("spacache_kernels.models", "DiffusionLM"),
    "SpaCache": ("spacache_kernels.policies", "SpaCache"),
    "Vanilla": ("spacache_kernels.policies", "Vanilla"),
}


def __getattr__(name: str):
    # Lazy so that `import spacache_kernels` stays cheap and never imports triton by itself.
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'spacache_kernels' has no attribute {name!r}")


# Imported eagerly (torch, no triton): the package's most used name.
from spacache_kernels.generation import generate  # noqa: E402

__all__ = ["__version__", "generate", *_LAZY]
