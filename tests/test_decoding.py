"""The shared decoding configuration and the one table of published settings, used by every entry
point (make_policy, decode_config, the CLI, lm-eval, the benchmarks)."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest

from spacache_kernels.decoding import (
    ALIASES,
    PUBLISHED,
    DecodeConfig,
    canonical_key,
    decode_config,
    preset_table,
    published,
    settings_of,
)
from spacache_kernels.policies import POLICIES, make_policy

DOCS = pathlib.Path(__file__).parents[1] / "docs" / "policies.md"


def test_presets_hold_the_papers_settings():
    # SPA-Cache GSM8K on LLaDA: gen 256, 256 steps, block 8, one token per step.
    assert decode_config("spa:llada-8b-gsm8k").generate_kwargs() == dict(
        gen_length=256, steps=256, block_length=8, threshold=None, factor=None, temperature=0.0, seed=0,
        eos_token_id=None, confidence="max_prob", schedule="llada",
    )  # fmt: skip
    # SPA-Cache GSM8K on Dream: one block of 256, sampled, negative entropy on the spa-dream schedule.
    dream = decode_config("spa:dream-7b-gsm8k")
    assert (dream.gen_length, dream.steps, dream.block_length, dream.temperature) == (256, 256, 256, 0.2)
    assert (dream.confidence, dream.schedule) == ("neg_entropy", "spa-dream")
    for policy in ("fast_dllm_prefix", "fast_dllm_dual"):  # Fast-dLLM: block 32, threshold 0.9
        fast = decode_config(f"{policy}:llada-8b-gsm8k")
        assert (fast.gen_length, fast.block_length, fast.threshold) == (256, 32, 0.9)


def test_one_naming_style():
    for key, entry in PUBLISHED.items():
        policy, _, name = key.partition(":")
        assert policy == entry.policy and policy in POLICIES, key
        assert name == name.lower() and " " not in name and "_" not in name, key
        assert name.startswith(("llada-8b", "llada-1.5", "dream-7b")), key  # <model>[-<task>]
    for alias, key in ALIASES.items():
        assert alias not in PUBLISHED and alias.partition(":")[0] == PUBLISHED[key].policy


@pytest.mark.parametrize("key", sorted(PUBLISHED))
def test_every_entry_resolves_to_its_settings(key):
    entry = published(key)
    policy = make_policy(key)
    assert type(policy) is POLICIES[entry.policy]
    for name, value in entry.settings.items():
        assert getattr(policy, name) == value, (key, name)
    # Everything the entry does not set keeps the constructor's default.
    default = POLICIES[entry.policy]()
    for field in dataclasses.fields(policy):
        if field.name not in entry.settings:
            assert getattr(policy, field.name) == getattr(default, field.name), (key, field.name)
    assert settings_of(entry.policy)[key.partition(":")[2]] == dict(entry.settings)
    if entry.decode is not None:
        assert decode_config(key) == entry.decode and entry.decode.description == entry.source
    else:
        with pytest.raises(ValueError, match="publishes policy settings only"):
            decode_config(key)


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_earlier_names_resolve_to_the_same_setting(alias):
    assert canonical_key(alias) == ALIASES[alias]
    assert make_policy(alias) == make_policy(ALIASES[alias])


def test_spellings_and_bad_keys():
    assert canonical_key(" Fast-DLLM-Dual : LLaDA-8B-GSM8K ") == "fast_dllm_dual:llada-8b-gsm8k"
    with pytest.raises(ValueError, match="preset: expected one of"):
        canonical_key("spa:gsm8k")
    with pytest.raises(TypeError, match="preset"):
        canonical_key(3)
    with pytest.raises(ValueError, match="policy: 'spa' has presets"):
        make_policy("spa:nope")
    with pytest.raises(ValueError, match="preset: 'dllm_cache' has presets"):
        POLICIES["dllm_cache"].from_preset("llada-8b-gsm8k")


def test_the_table_is_documented():
    text = DOCS.read_text()
    begin, end = "<!-- presets:begin -->\n", "<!-- presets:end -->"
    assert begin in text and end in text, "docs/policies.md lost the generated table's markers"
    documented = text[text.index(begin) + len(begin) : text.index(end)].strip()
    assert documented == preset_table().strip(), "regenerate: python -m spacache_kernels presets"


def test_defaults_and_overrides():
    cfg = decode_config(None, gen_length=64, threshold=None)  # None: keep the default
    assert cfg == DecodeConfig(gen_length=64) and cfg.generate_kwargs()["steps"] == 64
    assert decode_config("fast_dllm_dual:llada-8b-gsm8k", threshold=0.5).threshold == 0.5
    with pytest.raises(ValueError, match="decode: expected one of"):
        decode_config("gsm8k")
    with pytest.raises(TypeError, match="unknown fields"):
        decode_config(None, gen_len=3)
    with pytest.raises(TypeError, match="decode: expected a preset name"):
        decode_config(7)


def test_bench_settings_come_from_the_table():
    from bench.e2e import SETTING_SOURCES, SETTINGS

    assert set(SETTINGS) == set(SETTING_SOURCES)
    for name, setting in SETTINGS.items():
        cfg = PUBLISHED[SETTING_SOURCES[name]].decode
        assert (setting.gen_length, setting.steps, setting.block_length, setting.threshold) == (
            cfg.gen_length, cfg.generate_kwargs()["steps"], cfg.block_length, cfg.threshold,
        )  # fmt: skip


def test_cli_prints_the_table(capsys):
    from spacache_kernels.__main__ import main

    assert main(["presets"]) == 0
    assert capsys.readouterr().out == preset_table()


def test_cli_takes_the_preset(tmp_path, capsys):
    import torch

    from spacache_kernels.__main__ import main
    from spacache_kernels.generation import generate
    from spacache_kernels.models import load_model
    from tests.models.checkpoints import write_llada_checkpoint

    path = write_llada_checkpoint(tmp_path / "m", n_layers=2, max_sequence_length=600)
    common = ["generate", "--model", str(path), "--prompt-ids", "5,6,7", "--gen-length", "32",
              "--block-length", "16", "--backend", "torch"]  # fmt: skip
    # --decode: the decoding of a published setting (threshold 0.9), the policy given apart.
    assert main([*common, "--decode", "fast_dllm_dual:llada-8b-gsm8k", "--policy", "vanilla"]) == 0
    got = [int(t) for t in capsys.readouterr().out.strip().split(",")]
    model = load_model(path)
    want = generate(model, torch.tensor([[5, 6, 7]]), gen_length=32, steps=256, block_length=16,
                    threshold=0.9, policy="vanilla", backend="torch")  # fmt: skip
    assert got == want.sequences[0, 3:].tolist()
    # --preset: the policy and the decoding of one entry.
    assert main([*common, "--preset", "fast_dllm_dual:llada-8b-gsm8k"]) == 0
    got = [int(t) for t in capsys.readouterr().out.strip().split(",")]
    want = generate(model, torch.tensor([[5, 6, 7]]), gen_length=32, steps=256, block_length=16,
                    threshold=0.9, policy="fast_dllm_dual", backend="torch")  # fmt: skip
    assert got == want.sequences[0, 3:].tolist()
    with pytest.raises(SystemExit):  # --policy and --preset together
        main([*common, "--preset", "spa:llada-8b-gsm8k", "--policy", "spa"])
    with pytest.raises(SystemExit):
        main([*common, "--preset", "spa:nope"])
    assert "preset: expected one of" in capsys.readouterr().err
