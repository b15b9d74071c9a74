"""Import hook that registers the ``spacache`` lm-eval model whenever lm-eval's registry is imported.

lm-eval 0.4.13 discovers models only through its own registry (``lm_eval.models.MODEL_MAPPING`` plus
``@register_model`` / ``model_registry.register`` at import time); it reads no entry points for
models. So ``python -m spacache_kernels.integrations.lm_eval_model install-hook`` writes a one-line
``.pth`` file (:func:`pth_line`) into site-packages, run by ``site`` at every interpreter start.
That line must cost nothing and must never fail, so it:

* does not import ``spacache_kernels`` (the package imports torch): it locates the package with
  ``importlib.util.find_spec`` (a path lookup, no import) and executes *this file* by path;
* does nothing at all when the package is gone (``pip uninstall`` leaves the ``.pth`` behind;
  ``uninstall-hook`` removes it) and swallows every error of its own.

This file is stdlib-only; importing it as a module installs nothing. :func:`install` puts a finder
on ``sys.meta_path`` that wraps the loader of ``lm_eval.api.registry``: right after that module
executes, ``lm_eval.models`` is imported (which fills the registry with lm-eval's own lazy entries;
the registry does that by itself only while it is empty, so registering first would hide lm-eval's
models) and ``spacache`` is registered as the lazy placeholder
``"spacache_kernels.integrations.lm_eval_model:SpaCacheLM"``. The wrapper module (and torch) is
imported only when lm-eval resolves ``--model spacache``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

TARGET_MODULE = "lm_eval.api.registry"
MODEL_NAME = "spacache"
MODEL_PATH = "spacache_kernels.integrations.lm_eval_model:SpaCacheLM"
PTH_NAME = "spacache_kernels_lm_eval.pth"


def pth_line() -> str:
    """The single line of the ``.pth`` file: find this file without importing the package, run it.

    ``site`` executes ``.pth`` lines that start with ``import``; everything else is inside a
    ``try`` (a stale line after ``pip uninstall`` must never print a traceback at startup).
    """
    code = (
        "try:\n"
        " import importlib.util as u, os\n"
        " s = u.find_spec('spacache_kernels')\n"
        " d = s and s.submodule_search_locations and list(s.submodule_search_locations)\n"
        " p = d and os.path.join(d[0], 'integrations', '_lm_eval_hook.py')\n"
        " if p and os.path.isfile(p):\n"
        "  exec(compile(open(p).read(), p, 'exec'), {'__name__': '_spacache_kernels_lm_eval_hook'})\n"
        "except Exception:\n"
        " pass\n"
    )
    return f"import sys; exec({code!r})\n"


def register(registry_module) -> None:
    """Register ``spacache`` lazily in an imported ``lm_eval.api.registry`` (idempotent)."""
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
    spacache_lm_eval_hook = True  # marker: this file may run twice (by path and as a module)

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
    if any(getattr(f, "spacache_lm_eval_hook", False) for f in sys.meta_path):
        return
    if TARGET_MODULE in sys.modules:
        register(sys.modules[TARGET_MODULE])
        return
    sys.meta_path.insert(0, _Finder())


if __name__ == "_spacache_kernels_lm_eval_hook":  # executed by the .pth line (not on a plain import)
    install()
