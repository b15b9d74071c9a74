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


# -- shared tiny models (session-scoped: built once; tests must not modify them) --------------------
@pytest.fixture(scope="session")
def llada(tmp_path_factory):
    """A 4-layer LLaDA-layout checkpoint (fp32), loaded through load_model."""
    from spacache_kernels.models import load_model
    from tests.models.checkpoints import write_llada_checkpoint

    path = write_llada_checkpoint(tmp_path_factory.mktemp("llada"), n_layers=4, max_sequence_length=64)
    return load_model(path, dtype=torch.float32)


@pytest.fixture(scope="session")
def dream(tmp_path_factory):
    """A 4-layer Dream-layout (Qwen2, shifted logits) checkpoint (fp32), loaded through load_model."""
    from spacache_kernels.models import load_model
    from tests.models.checkpoints import write_dream_checkpoint

    path = write_dream_checkpoint(tmp_path_factory.mktemp("dream"), num_hidden_layers=4)
    return load_model(path, dtype=torch.float32)
