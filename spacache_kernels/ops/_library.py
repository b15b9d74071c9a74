"""The ``spacache`` operator namespace: every public op registered with ``torch.library``.

Each op module defines its operator here (:func:`define`: schema, eager implementation, fake
implementation) and its public function validates the arguments, resolves the backend and calls the
returned ``OpOverload`` (``torch.ops.spacache.<name>.default``). ``torch.compile`` therefore sees one
opaque node per public op (no graph break, no tracing into Triton), and the fake implementation gives
it the exact output shapes and dtypes without running anything.

Why ``Library.define`` + ``impl`` and not ``torch.library.custom_op``: ``custom_op`` wraps every call
in its own Python dispatch layer, about 9 us of host time per call on the 2-core development machine,
where a plain ``Library`` registration costs about 2 us (docs/architecture.md, "Ops as torch
operators").

Contract of the registered operators (what :func:`define` assumes of every implementation):

* ``backend`` is the resolved name, ``"torch"`` (the reference of :mod:`spacache_kernels.ops.reference`)
  or ``"triton"`` (the launcher in :mod:`spacache_kernels.kernels`); anything else is a ``ValueError``.
* Arguments are otherwise not validated: call the public functions, which are.
* Every returned tensor is new and contiguous (never an input or a view of one), so the fake
  implementations, which allocate contiguous tensors, describe the real outputs exactly (strides
  included: the compiler lays out later buffers from them).
* Mutated arguments are declared ``Tensor(a!)`` in the schema and the op then returns no alias of
  them (the public function returns the mutated tensor itself).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

NAMESPACE = "spacache"
OP_BACKENDS = ("torch", "triton")

# FRAGMENT, not DEF: the namespace can then be extended by other fragments (tests, user code) without
# clashing; each op name is still defined once.
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")


def define(schema: str, impl: Callable, fake: Callable) -> torch._ops.OpOverload:
    """Register ``spacache::<schema>`` with an eager ``impl`` for every device and a ``fake``.

    ``schema`` is the operator schema without the namespace, e.g.
    ``"rms_norm(Tensor x, Tensor weight, float eps, str backend) -> Tensor"``. Returns the default
    overload, the object the public functions call (cheaper than going through ``torch.ops`` by name).
    """
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    # CompositeExplicitAutograd: one Python kernel for every backend key (CPU, CUDA, ...); the fake
    # (registered below) serves the Meta key and FakeTensor tracing.
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIB)
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def check_op_backend(backend: str) -> str:
    """The ``backend`` argument of a registered op: ``"torch"`` or ``"triton"`` (already resolved)."""
    if backend not in OP_BACKENDS:
        raise ValueError(
            f"backend: the spacache operators take a resolved backend {OP_BACKENDS}, got {backend!r} "
            "(the public functions of spacache_kernels.ops resolve 'auto' and None)"
        )
    return backend
