"""SPA-Cache's SVD proxies: once per model and weights in memory; on disk under a key covering every
value projection, written atomically, rebuilt when corrupt; ``~`` expanded."""

from __future__ import annotations

import pytest
import torch

import spacache_kernels.policies.spa as spa_module
from spacache_kernels.generation import generate
from spacache_kernels.models import load_model
from spacache_kernels.policies import SpaCache
from tests.models.checkpoints import write_llada_checkpoint

KW = dict(gen_length=8, steps=8, block_length=8, backend="torch")


@pytest.fixture
def model(tmp_path):
    return load_model(write_llada_checkpoint(tmp_path / "m", n_layers=4, max_sequence_length=64))


@pytest.fixture
def svd_calls(monkeypatch):
    calls = []
    real = spa_module.svd_proxy

    def counting(w_v, rank, **kwargs):
        calls.append(w_v.shape)
        return real(w_v, rank, **kwargs)

    monkeypatch.setattr(spa_module, "svd_proxy", counting)
    return calls


def ids():
    return torch.tensor([[5, 6, 7, 8]])


def test_proxies_are_computed_once_per_model_and_weights(model, svd_calls, tmp_path):
    first = generate(model, ids(), policy="spa", **KW)
    assert len(svd_calls) == 3  # layers 1..3
    again = generate(model, ids(), policy=SpaCache(), **KW)  # a new instance, a new call
    assert len(svd_calls) == 3 and torch.equal(first.sequences, again.sequences)
    assert first.stats.setup_seconds > 0 and again.stats.setup_seconds >= 0
    kv = model.config.kv_width
    model.layers[2].w_kv[kv:].mul_(1.5)  # the weights change in place: the proxies must follow
    generate(model, ids(), policy="spa", **KW)
    assert len(svd_calls) == 6
    other = load_model(write_llada_checkpoint(tmp_path / "other", n_layers=4, max_sequence_length=64))
    generate(other, ids(), policy="spa", **KW)  # another model object: its own proxies
    assert len(svd_calls) == 9


def test_cache_dir_key_covers_every_layer(model, tmp_path, svd_calls):
    cache = tmp_path / "cache"
    generate(model, ids(), policy=SpaCache(cache_dir=cache), **KW)
    files = sorted(cache.glob("spa_proxy_*.pt"))
    assert len(files) == 1 and len(svd_calls) == 3
    spa_module._PROXY_MEMO.clear()  # a fresh process: only the disk cache remains
    generate(model, ids(), policy=SpaCache(cache_dir=cache), **KW)
    assert len(svd_calls) == 3  # read back, not recomputed
    kv = model.config.kv_width
    model.layers[2].w_kv[kv:].mul_(1.5)  # a middle layer: the old key (layers 1 and -1) missed it
    spa_module._PROXY_MEMO.clear()
    policy = SpaCache(cache_dir=cache)
    proj = policy.proxies(model)
    assert len(svd_calls) == 6 and len(sorted(cache.glob("spa_proxy_*.pt"))) == 2
    want = spa_module.svd_proxy(model.layers[2].w_v, proj[2].shape[1], dtype=model.dtype)
    torch.testing.assert_close(proj[2], want)


def test_cache_dir_expands_the_user(model, tmp_path, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    policy = SpaCache(cache_dir="~/spa")
    assert policy.cache_dir == home / "spa"
    generate(model, ids(), policy=policy, **KW)
    assert list((home / "spa").glob("spa_proxy_*.pt")) and not (work / "~").exists()


def test_corrupt_cache_file_is_rebuilt(model, tmp_path, svd_calls):
    cache = tmp_path / "cache"
    SpaCache(cache_dir=cache).proxies(model)
    (path,) = cache.glob("spa_proxy_*.pt")
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # a crash mid-write under the old non-atomic writer
    spa_module._PROXY_MEMO.clear()
    with pytest.warns(UserWarning, match="corrupt"):
        proj = SpaCache(cache_dir=cache).proxies(model)
    assert len(svd_calls) == 6 and proj[1].shape == (model.config.d_model, 64)
    spa_module._PROXY_MEMO.clear()
    SpaCache(cache_dir=cache).proxies(model)  # the rebuilt file is valid again
    assert len(svd_calls) == 6


def test_cache_writes_are_atomic(model, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    SpaCache(cache_dir=cache).proxies(model)
    (path,) = cache.glob("spa_proxy_*.pt")
    before = path.read_bytes()
    path.unlink()

    def crash(value, fh):
        fh.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(spa_module.torch, "save", crash)
    spa_module._PROXY_MEMO.clear()
    with pytest.raises(OSError, match="disk full"):
        SpaCache(cache_dir=cache).proxies(model)
    assert list(cache.iterdir()) == []  # neither a half-written cache file nor a temporary left over
    monkeypatch.undo()
    spa_module._PROXY_MEMO.clear()
    SpaCache(cache_dir=cache).proxies(model)
    assert path.read_bytes() == before
