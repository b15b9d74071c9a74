"""Count host syncs: every point where the host waits for a tensor's value.

A denoising step in fixed-count mode must queue its work without reading any tensor back, so that
it can run ahead of the device, compile into one graph (``torch.compile(fullgraph=True)``) and be
captured as a CUDA graph. :class:`SyncCounter` counts, while it is active:

* scalar reads: ``Tensor.item``, ``bool(t)``, ``int(t)``, ``float(t)``, ``if t:`` (all end in
  ``aten._local_scalar_dense``) and ``aten.equal`` / ``aten.is_nonzero``;
* data-dependent shapes: ``nonzero`` (boolean indexing and ``masked_select`` go through it or are
  counted themselves), ``unique``, ``repeat_interleave`` without ``output_size``;
* device-to-host copies (``.cpu()``, ``.to("cpu")`` of a CUDA tensor);
* ``Tensor.tolist``, ``Tensor.numpy`` and ``Tensor.__array__`` (on the CPU these read memory without
  dispatching an aten op, so they are wrapped at the Python level).

Each count keeps a short stack (the innermost frames inside this package) so that a test failure
names the line that synced. Used by the tests (zero syncs per step for every sync-free policy) and by
``bench/step_profile.py`` (syncs per step).
"""

from __future__ import annotations

import contextlib
import pathlib
import traceback
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_PACKAGE = str(pathlib.Path(__file__).resolve().parent)
_HERE = str(pathlib.Path(__file__).resolve())

# aten ops that read a value on the host or whose output shape depends on tensor values.
SYNC_OPS = frozenset(
    {
        "aten::_local_scalar_dense",
        "aten::equal",
        "aten::is_nonzero",
        "aten::nonzero",
        "aten::nonzero_static",  # not a sync; listed so it is never mistaken for one (see _is_sync)
        "aten::masked_select",
        "aten::_unique",
        "aten::_unique2",
        "aten::unique_dim",
        "aten::unique_consecutive",
        "aten::repeat_interleave",
    }
)
PYTHON_READS = ("tolist", "numpy", "__array__")


@dataclass
class SyncEvent:
    """One host sync: what caused it and where (``file:line function`` of the package's frames)."""

    what: str
    where: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.what} at {' <- '.join(self.where) or '<outside the package>'}"


def _where() -> list[str]:
    frames = [
        f"{pathlib.Path(f.filename).name}:{f.lineno} {f.name}"
        for f in traceback.extract_stack()
        if f.filename.startswith(_PACKAGE) and f.filename != _HERE
    ]
    return frames[::-1][:4]  # innermost first


def _is_sync(func, args, kwargs) -> str | None:
    name = func._schema.name
    if name == "aten::nonzero_static":
        return None
    if name == "aten::repeat_interleave":
        # With output_size the result's shape is known on the host.
        return None if (kwargs or {}).get("output_size") is not None else name
    if name in SYNC_OPS:
        return name
    if name in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"):
        # Boolean-mask indexing: the result's shape (or the written positions) is the mask's count.
        indices = args[1] if len(args) > 1 else ()
        if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
            return f"{name} (boolean mask)"
    if name in ("aten::_to_copy", "aten::copy_", "aten::to"):
        # A copy from a CUDA tensor into host memory waits for the device.
        src = args[1] if name == "aten::copy_" else args[0]
        dst_device = (kwargs or {}).get("device")
        if name == "aten::copy_":
            dst_device = args[0].device
        if isinstance(src, torch.Tensor) and src.device.type == "cuda" and dst_device is not None:
            if torch.device(dst_device).type == "cpu":
                return f"{name} (device to host)"
    return None


class _Mode(TorchDispatchMode):
    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        what = _is_sync(func, args, kwargs)
        if what is not None:
            self.counter._record(what)
        return func(*args, **(kwargs or {}))


class SyncCounter:
    """Context manager counting host syncs (see the module docstring); ``events`` lists them in order.

    ``with SyncCounter() as syncs: ...`` then ``syncs.count``. Counters nest: each active one counts
    every sync (a Python-level read is counted by every active counter exactly once).
    """

    _active: list[SyncCounter] = []
    _patched: dict[str, object] = {}

    def __init__(self):
        self.events: list[SyncEvent] = []
        self._mode = _Mode(self)
        self._depth = 0

    @property
    def count(self) -> int:
        return len(self.events)

    def _record(self, what: str) -> None:
        self.events.append(SyncEvent(what, _where()))

    def __enter__(self) -> SyncCounter:
        if not SyncCounter._active:
            _patch_python_reads()
        SyncCounter._active.append(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        SyncCounter._active.remove(self)
        if not SyncCounter._active:
            _unpatch_python_reads()

    def mark(self) -> int:
        """The count so far (for per-step differences)."""
        return self.count

    def report(self, start: int = 0) -> str:
        """The events from index ``start`` on, one per line."""
        return "\n".join(str(e) for e in self.events[start:])


def _patch_python_reads() -> None:
    for attr in PYTHON_READS:
        original = getattr(torch.Tensor, attr)
        SyncCounter._patched[attr] = original

        def wrapper(self, *args, __original=original, __attr=attr, **kwargs):
            # A read of a tensor that lives in host memory already is still a read of its values:
            # on a GPU run the same call would wait for the device.
            for counter in SyncCounter._active:
                counter._record(f"Tensor.{__attr}")
            with _suspended():
                return __original(self, *args, **kwargs)

        setattr(torch.Tensor, attr, wrapper)


def _unpatch_python_reads() -> None:
    for attr, original in SyncCounter._patched.items():
        setattr(torch.Tensor, attr, original)
    SyncCounter._patched.clear()


@contextlib.contextmanager
def _suspended():
    """Run without the active counters' dispatch modes (a Python-level read counts once, not twice)."""
    active = list(SyncCounter._active)
    SyncCounter._active.clear()
    try:
        with torch.utils._python_dispatch._disable_current_modes():
            yield
    finally:
        SyncCounter._active.extend(active)


__all__ = ["SYNC_OPS", "SyncCounter", "SyncEvent"]
