"""Public functional ops (autograd-free). Each takes ``backend="auto"|"triton"|"torch"``."""

from spacache_kernels.ops._dispatch import default_backend, resolve_backend

__all__ = ["default_backend", "resolve_backend"]
