"""Input validation shared by the ops: every error names the argument and what was expected.

Kernels never validate; the ops call these before dispatch. Value checks on index tensors (range,
duplicates) read the tensor back to the host, so they run only when ``check_indices=True``; the
runtime's hot path passes ``False`` after constructing its indices itself. They are also skipped
while ``torch.compile`` traces and while a CUDA graph is captured (:func:`host_checks_enabled`), and
the memory overlap checks (which read data pointers) while ``torch.compile`` traces.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def host_checks_enabled(*tensors: torch.Tensor | None) -> bool:
    """Whether checks that read tensor values back to the host may run now.

    False while ``torch.compile`` traces (the tensors are fakes without values; a read would break
    the graph) and while a CUDA graph is being captured on the current stream (a device-to-host copy
    is illegal there). The index range / distinctness checks of the ops are skipped then, as with
    ``check_indices=False``.
    """
    if torch.compiler.is_compiling():
        return False
    if any(t is not None and t.is_cuda for t in tensors) and torch.cuda.is_current_stream_capturing():
        return False
    return True


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    value,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    shape: Sequence[int | None] | None = None,
) -> torch.Tensor:
    """Check type, rank, dtype and (where given, ``None`` = any) shape of one tensor argument."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {_dtype_names(dtypes)}, got {value.dtype}")
    if shape is not None:
        want = tuple(shape)
        if len(want) != value.dim() or any(w is not None and w != s for w, s in zip(want, value.shape)):
            shown = "(" + ", ".join("*" if w is None else str(w) for w in want) + ")"
            raise ValueError(f"{name}: expected shape {shown}, got {tuple(value.shape)}")
    return value


def check_float(name: str, value, **kwargs) -> torch.Tensor:
    """A floating tensor (fp32, fp16 or bf16)."""
    return check_tensor(name, value, dtypes=FLOAT_DTYPES, **kwargs)


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors on one device; returns it."""
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{name}: expected device {first} (the device of {first_name}), got {dev}")
    return first


def check_same_dtype(**tensors: torch.Tensor | None) -> torch.dtype:
    """All given tensors of one dtype; returns it."""
    present = {k: v for k, v in tensors.items() if v is not None}
    first_name, first = next(iter(present.items()))
    for name, value in present.items():
        if value.dtype != first.dtype:
            raise TypeError(
                f"{name}: expected dtype {first.dtype} (the dtype of {first_name}), got {value.dtype}"
            )
    return first.dtype


def check_k(name: str, k, length: int) -> int:
    """An integer budget in [0, length]."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name}: expected an int, got {type(k).__name__}")
    if not 0 <= k <= length:
        raise ValueError(f"{name}: expected 0 <= {name} <= {length}, got {k}")
    return k


def check_contiguous(name: str, value: torch.Tensor) -> torch.Tensor:
    """Reject tensors that an in-place kernel cannot address with plain row strides."""
    if not value.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (call .contiguous() first)")
    return value


def check_index(
    name: str,
    idx,
    *,
    batch: int,
    length: int,
    count: int | None = None,
    check_values: bool = True,
    unique: bool = True,
) -> torch.Tensor:
    """A (batch, count) int32/int64 index tensor into a dim of size ``length``.

    With ``check_values``: every entry in [0, length) and, with ``unique``, no repeats within a row
    (a host sync; skipped where :func:`host_checks_enabled` is False).
    """
    check_tensor(name, idx, ndim=2, dtypes=INDEX_DTYPES, shape=(batch, count))
    if check_values and idx.numel() and host_checks_enabled(idx):
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= length:
            raise ValueError(f"{name}: expected indices in [0, {length}), got values in [{lo}, {hi}]")
        if unique and idx.shape[1] > 1:
            ordered = idx.sort(dim=1).values
            if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
                raise ValueError(f"{name}: expected distinct indices within each row, found a repeat")
    return idx


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last) byte addresses any element of ``t`` can touch (strides are never negative)."""
    start = t.data_ptr()
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return start, start + (extent + 1) * t.element_size()


def check_disjoint(name: str, value: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    """Reject ``value`` whose memory may overlap ``other``'s: the kernels read and write in parallel.

    Skipped while ``torch.compile`` traces: fake tensors have no data pointers.
    """
    if torch.compiler.is_compiling() or value.numel() == 0 or other.numel() == 0:
        return
    (a0, a1), (b0, b1) = _byte_span(value), _byte_span(other)
    if a0 < b1 and b0 < a1:
        raise ValueError(f"{name}: must not share memory with {other_name} (pass a separate tensor)")
