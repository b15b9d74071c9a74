"""The shared decoding configuration: one default and one preset table for every entry point."""

from __future__ import annotations

import pytest

from spacache_kernels.decoding import DECODE_PRESETS, DecodeConfig, decode_config
from spacache_kernels.policies.spa import PUBLISHED_RUNS


def test_presets_hold_the_papers_settings():
    assert decode_config("spa-gsm8k").generate_kwargs() == dict(
        gen_length=256, steps=256, block_length=8, threshold=None, factor=None, temperature=0.0, seed=0,
        eos_token_id=None, confidence="max_prob", schedule="llada",
    )  # fmt: skip
    fast = decode_config("fast-dllm")
    assert (fast.gen_length, fast.block_length, fast.threshold) == (256, 32, 0.9)
    for name, run in PUBLISHED_RUNS.items():  # every published SPA-Cache run, one naming style
        kwargs = DECODE_PRESETS[f"spa-{name}"].generate_kwargs()
        assert {k: kwargs[k] for k in run["generate"]} == run["generate"]


def test_defaults_and_overrides():
    cfg = decode_config(None, gen_length=64, threshold=None)  # None: keep the default
    assert cfg == DecodeConfig(gen_length=64) and cfg.generate_kwargs()["steps"] == 64
    assert decode_config("fast-dllm", threshold=0.5).threshold == 0.5
    with pytest.raises(ValueError, match="decode: expected one of"):
        decode_config("gsm8k")
    with pytest.raises(TypeError, match="unknown fields"):
        decode_config(None, gen_len=3)


def test_bench_settings_come_from_the_presets():
    from bench.e2e import SETTINGS

    for name, setting in SETTINGS.items():
        cfg = DECODE_PRESETS[name]
        assert (setting.gen_length, setting.block_length, setting.threshold) == (
            cfg.gen_length, cfg.block_length, cfg.threshold,
        )  # fmt: skip


def test_cli_takes_the_preset(tmp_path, capsys):
    import torch

    from spacache_kernels.__main__ import main
    from spacache_kernels.generation import generate
    from spacache_kernels.models import load_model
    from tests.models.checkpoints import write_llada_checkpoint

    path = write_llada_checkpoint(tmp_path / "m", n_layers=2, max_sequence_length=600)
    argv = ["generate", "--model", str(path), "--prompt-ids", "5,6,7", "--decode", "fast-dllm",
            "--gen-length", "32", "--block-length", "16", "--backend", "torch",
            "--policy", "vanilla"]  # fmt: skip
    assert main(argv) == 0
    got = [int(t) for t in capsys.readouterr().out.strip().split(",")]
    want = generate(load_model(path), torch.tensor([[5, 6, 7]]), gen_length=32, steps=256, block_length=16,
                    threshold=0.9, policy="vanilla", backend="torch")  # fmt: skip
    assert got == want.sequences[0, 3:].tolist()
