"""Import hook that registers the ``spacache`` lm-eval model whenever lm-eval's registry is imported.

Installed as a one-line ``.pth`` file (``python -m spacache_kernels.lm_eval_model install-hook``), so it
runs at every interpreter start; it imports nothing heavy (no torch, no lm_eval). It puts a finder on
``sys.meta_path`` that wraps the loader of ``lm_eval.api.registry``: right after that module executes,
``lm_eval.models`` is imported (which fills the registry with lm-eval's own lazy entries; the registry
only does that by itself while it is empty, so registering first would hide lm-eval's models) and then
``spacache`` is registered as a lazy ``"module:Class"`` placeholder. The wrapper module
``spacache_kernels.lm_eval_model`` (and torch) is imported only when ``--model spacache`` is used.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

TARGET_MODULE = "lm_eval.api.registry"
MODEL_NAME = "spacache"
MODEL_PATH = "spacache_kernels.lm_eval_model:SpaCacheLM"


def register(registry_module) -> None:
    """Register ``spacache`` lazily in an imported ``lm_eval.api.registry`` (idempotent)."""
    import importlib

    importlib.import_module("lm_eval.models")  # lm-eval's own entries first (see module docstring)
    registry = registry_module.model_registry
    if MODEL_NAME not in registry:
        registry.register(MODEL_NAME, target=MODEL_PATH)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        try:
            register(module)
        except Exception as err:  # never break lm-eval itself because of this plugin
            print(f"spacache_kernels: could not register the lm-eval model: {err!r}", file=sys.stderr)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once); register at once if lm-eval is already imported."""
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    if TARGET_MODULE in sys.modules:
        register(sys.modules[TARGET_MODULE])
        return
    sys.meta_path.insert(0, _Finder())


install()
