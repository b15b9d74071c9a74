"""Strict loading: quantized dtypes, tied heads that differ, tensors stored twice, non-finite weights,
and malformed config fields are errors that name the tensor (or field) and the file."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from spacache_kernels.models import load_model
from spacache_kernels.models.config import ModelConfig
from tests.models.checkpoints import (
    dream_config,
    llada_config,
    write_dream_checkpoint,
    write_llada_checkpoint,
)

SINGLE = "model.safetensors"
NAME = "model.layers.1.mlp.up_proj.weight"


def _rewrite(path, file: str, edit) -> None:
    tensors = load_file(str(path / file))
    edit(tensors)
    save_file(tensors, str(path / file), metadata={"format": "pt"})


@pytest.mark.parametrize("dtype, raw", [(torch.int8, "I8"), (torch.float8_e4m3fn, "F8_E4M3")])
def test_quantized_tensor_is_rejected_with_its_name_and_file(tmp_path, dtype, raw):
    path = write_dream_checkpoint(tmp_path)
    _rewrite(path, SINGLE, lambda t: t.__setitem__(NAME, t[NAME].clamp(-1, 1).to(dtype)))
    with pytest.raises(ValueError, match=rf"{SINGLE}.*{re.escape(NAME)}.*{raw}"):
        load_model(path)


def test_tied_head_that_differs_from_the_embedding_is_an_error(tmp_path):
    head = "model.transformer.ff_out.weight"
    path = write_llada_checkpoint(tmp_path, weight_tying=True)

    def add_head(tensors, scale):
        tensors[head] = tensors["model.transformer.wte.weight"] * scale

    _rewrite(path, SINGLE, lambda t: add_head(t, 1.0))
    model = load_model(path)  # an identical stored head is fine
    assert model.lm_head is model.embed
    _rewrite(path, SINGLE, lambda t: add_head(t, 1.5))
    with pytest.raises(ValueError, match=rf"{SINGLE}.*{re.escape(head)}.*differs from the embedding"):
        load_model(path)


def test_tensor_stored_in_two_shards_is_an_error(tmp_path):
    path = write_dream_checkpoint(tmp_path, sharded=True)
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    name = sorted(load_file(str(path / first)))[0]
    copy = load_file(str(path / first))[name] + 1.0
    _rewrite(path, second, lambda t: t.__setitem__(name, copy))
    with pytest.raises(ValueError, match=rf"{re.escape(name)}.*two files.*{first}.*{second}"):
        load_model(path)


def test_check_finite_names_the_tensor_and_file(tmp_path):
    path = write_llada_checkpoint(tmp_path)
    name = "model.transformer.blocks.1.v_proj.weight"

    def poison(tensors):
        tensors[name][3, 5] = float("nan")

    _rewrite(path, SINGLE, poison)
    load_model(path)  # off by default
    with pytest.raises(ValueError, match=rf"{SINGLE}.*{re.escape(name)}.*non-finite"):
        load_model(path, check_finite=True)
    with pytest.raises(TypeError, match="check_finite"):
        load_model(path, check_finite="yes")


def test_check_finite_catches_overflow_in_the_target_dtype(tmp_path):
    path = write_llada_checkpoint(tmp_path)
    name = "model.transformer.blocks.0.up_proj.weight"
    _rewrite(path, SINGLE, lambda t: t[name].__setitem__((0, 0), 1e6))  # beyond float16's 65504
    load_model(path, dtype=torch.float32, check_finite=True)
    with pytest.raises(ValueError, match=rf"{re.escape(name)}.*inf in torch.float16"):
        load_model(path, dtype=torch.float16, check_finite=True)


@pytest.mark.parametrize(
    "make, field, value, message",
    [
        (llada_config, "n_heads", "4", "expected an integer"),
        (llada_config, "n_heads", 0, "expected an integer >= 1"),
        (llada_config, "n_layers", 2.5, "expected an integer"),
        (llada_config, "max_sequence_length", [64], "expected an integer"),
        (llada_config, "rms_norm_eps", "small", "expected a finite number"),
        (llada_config, "mask_token_id", -1, "expected an integer >= 0"),
        (dream_config, "num_attention_heads", None, "missing required field"),
        (dream_config, "rope_theta", float("nan"), "expected a finite number"),
        (dream_config, "eos_token_id", "eos", "expected an integer"),
        (dream_config, "head_dim", True, "expected an integer"),
    ],
)
def test_malformed_config_fields_are_named(make, field, value, message):
    config = make()
    config[field] = value
    with pytest.raises(ValueError, match=rf"config: .*'?{field}'?.*{message}|{message}.*'{field}'"):
        ModelConfig.from_dict(config)
