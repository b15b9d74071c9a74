"""Test setup. The interpreter switch must come before anything imports triton."""

import os

try:
    import torch as _torch_probe  # torch does not import triton at import time

    _HAS_CUDA = _torch_probe.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """CUDA when present, else the CPU (kernels then run under the interpreter)."""
    return torch.device("cuda" if _HAS_CUDA else "cpu")
