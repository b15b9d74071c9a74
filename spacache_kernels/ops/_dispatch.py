"""Backend selection, one rule everywhere.

``backend="auto" | "triton" | "torch"``; the environment variable ``SPACACHE_BACKEND`` sets what
``None`` means (default ``auto``). ``auto`` picks Triton when the tensors live on a CUDA device or
when ``TRITON_INTERPRET=1`` is set (the CPU test path), else the pure-PyTorch reference.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def default_backend() -> str:
    """The backend named by ``SPACACHE_BACKEND`` (``auto`` when unset)."""
    value = os.environ.get("SPACACHE_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"SPACACHE_BACKEND: expected one of {BACKENDS}, got {value!r}")
    return value


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:  # pragma: no cover - Linux always has it through the dependency list
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str | None, *tensors: torch.Tensor) -> str:
    """Return ``"triton"`` or ``"torch"`` for an op called with ``backend`` on ``tensors``.

    Raises ``ValueError`` for an unknown backend name, or when Triton is requested for tensors it
    cannot run on (CPU tensors without ``TRITON_INTERPRET=1``).
    """
    if backend is None:
        backend = default_backend()
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
    on_cuda = any(t.is_cuda for t in tensors if t is not None)
    runnable = triton_available() and (on_cuda or _interpreting())
    if backend == "auto":
        return "triton" if runnable else "torch"
    if backend == "triton" and not runnable:
        raise ValueError(
            "backend='triton': the tensors are on the CPU and TRITON_INTERPRET is not set; "
            "use CUDA tensors, set TRITON_INTERPRET=1, or pick backend='torch'"
        )
    return backend
