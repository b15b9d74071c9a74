"""Load LLaDA / Dream / Llama / Qwen2 weights into a :class:`DiffusionLM`.

Two sources:

* a checkpoint directory: ``config.json`` plus ``model.safetensors`` or a sharded
  ``model.safetensors.index.json``. Read directly with safetensors: no ``trust_remote_code``, no
  transformers model class, no pickles. Every shard header is checked first (names and shapes), so a
  broken checkpoint fails before gigabytes are read; then the shards are read one at a time, one tensor
  at a time, straight into the preallocated runtime tensors (peak memory: the model plus one tensor).
* an already-loaded HF ``nn.Module`` (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``LlamaModel``,
  ``Qwen2Model``, or a remote-code LLaDA / Dream module): its ``config.to_dict()`` and its
  ``state_dict()`` names. Tensors that need no conversion share storage with the module.

Name layouts:

* LLaDA: ``model.transformer.wte.weight``, ``model.transformer.blocks.{i}.{q_proj, k_proj, v_proj,
  attn_out, ff_proj (gate), up_proj, ff_out (down), attn_norm, ff_norm}.weight``,
  ``model.transformer.ln_f.weight``, ``model.transformer.ff_out.weight`` (LM head, absent when tied).
* Dream / Qwen2 / Llama: ``model.embed_tokens.weight``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj
  .{weight,bias}``, ``model.layers.{i}.mlp.{gate,up,down}_proj.weight``, ``model.layers.{i}.
  {input_layernorm, post_attention_layernorm}.weight``, ``model.norm.weight``, ``lm_head.weight``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spacache_kernels.models.config import ModelConfig
from spacache_kernels.models.model import FLOAT_DTYPES, DiffusionLM, LayerWeights

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Tensors a checkpoint may carry that hold nothing the runtime needs (recomputed RoPE buffers).
_IGNORABLE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class _Entry:
    """One checkpoint tensor and where it goes: ``dest`` is ("embed",) / ("final_norm",) / ("lm_head",)
    or (layer, field); ``rows`` selects the destination rows for fused K/V tensors."""

    name: str
    dest: tuple
    shape: tuple[int, ...]
    rows: slice | None = None


def _plan(config: ModelConfig) -> tuple[list[_Entry], set[str]]:
    """Every tensor the config needs, and the checkpoint names that may be present but are unused."""
    d, f, q, kv, v = config.d_model, config.ffn_dim, config.q_width, config.kv_width, config.vocab_size
    k_rows, v_rows = slice(0, kv), slice(kv, 2 * kv)
    entries: list[_Entry] = []
    if config.arch == "llada":
        names = {
            "attn_norm": "attn_norm.weight",
            "q": "q_proj",
            "k": "k_proj",
            "v": "v_proj",
            "o": "attn_out",
            "ffn_norm": "ff_norm.weight",
            "gate": "ff_proj.weight",
            "up": "up_proj.weight",
            "down": "ff_out.weight",
        }
        prefix = "model.transformer.blocks.{i}."
        embed, final_norm, lm_head = (
            "model.transformer.wte.weight",
            "model.transformer.ln_f.weight",
            "model.transformer.ff_out.weight",
        )
    else:
        names = {
            "attn_norm": "input_layernorm.weight",
            "q": "self_attn.q_proj",
            "k": "self_attn.k_proj",
            "v": "self_attn.v_proj",
            "o": "self_attn.o_proj",
            "ffn_norm": "post_attention_layernorm.weight",
            "gate": "mlp.gate_proj.weight",
            "up": "mlp.up_proj.weight",
            "down": "mlp.down_proj.weight",
        }
        prefix = "model.layers.{i}."
        embed, final_norm, lm_head = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"

    for i in range(config.n_layers):
        p = prefix.format(i=i)
        entries += [
            _Entry(p + names["attn_norm"], (i, "attn_norm"), (d,)),
            _Entry(p + names["q"] + ".weight", (i, "w_q"), (q, d)),
            _Entry(p + names["k"] + ".weight", (i, "w_kv"), (kv, d), k_rows),
            _Entry(p + names["v"] + ".weight", (i, "w_kv"), (kv, d), v_rows),
            _Entry(p + names["o"] + ".weight", (i, "w_o"), (d, q)),
            _Entry(p + names["ffn_norm"], (i, "ffn_norm"), (d,)),
            _Entry(p + names["gate"], (i, "w_gate"), (f, d)),
            _Entry(p + names["up"], (i, "w_up"), (f, d)),
            _Entry(p + names["down"], (i, "w_down"), (d, f)),
        ]
        if config.qkv_bias:
            entries += [
                _Entry(p + names["q"] + ".bias", (i, "b_q"), (q,)),
                _Entry(p + names["k"] + ".bias", (i, "b_kv"), (kv,), k_rows),
                _Entry(p + names["v"] + ".bias", (i, "b_kv"), (kv,), v_rows),
            ]
        if config.o_bias:
            entries.append(_Entry(p + names["o"] + ".bias", (i, "b_o"), (d,)))
    entries += [_Entry(embed, ("embed",), (v, d)), _Entry(final_norm, ("final_norm",), (d,))]
    unused = set()
    if config.tie_embeddings:
        unused.add(lm_head)  # some tied checkpoints store the head anyway; it equals the embedding
    else:
        entries.append(_Entry(lm_head, ("lm_head",), (v, d)))
    return entries, unused


def _dest_shape(config: ModelConfig, dest: tuple) -> tuple[int, ...]:
    """Full shape of a destination tensor (fused K/V is twice the rows of one entry)."""
    if dest[0] in ("embed", "lm_head"):
        return (config.vocab_size, config.d_model)
    if dest[0] == "final_norm":
        return (config.d_model,)
    return LayerWeights.expected_shapes(config)[dest[1]]


# --------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------
class _Source:
    """Uniform access to checkpoint tensors, grouped in shards read one after the other."""

    description: str
    share_storage: bool = False

    def where(self, name: str) -> str:
        """Where tensor ``name`` lives, for error messages."""
        return self.description

    def config_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype | None, str]]:
        """Every tensor name -> (shape, dtype or None when not a float type we load, dtype name)."""
        raise NotImplementedError

    def shards(self) -> Iterator[tuple[list[str], Callable[[str], torch.Tensor]]]:
        """Yields ``(names in this shard, get(name) -> tensor)``, one shard at a time."""
        raise NotImplementedError

    def default_dtype(self, first_tensor_dtype: torch.dtype | None) -> torch.dtype | None:
        return first_tensor_dtype

    def default_device(self) -> torch.device:
        return torch.device("cpu")


class _DirectorySource(_Source):
    def __init__(self, path: Path):
        from safetensors import safe_open  # local: keep `import spacache_kernels.models` light

        self._safe_open = safe_open
        self.path = path
        self.description = f"checkpoint {str(path)!r}"
        config_path = path / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{self.description}: no config.json in the directory")
        with open(config_path) as fh:
            self._config = json.load(fh)
        index = path / INDEX_FILE
        if index.is_file():
            with open(index) as fh:
                weight_map = json.load(fh).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{self.description}: {INDEX_FILE} has no 'weight_map' dict")
            self._files: dict[str, list[str]] = {}
            for name, file in weight_map.items():
                self._files.setdefault(file, []).append(name)
        elif (path / SINGLE_FILE).is_file():
            self._files = {SINGLE_FILE: None}  # names read from the header below
        else:
            raise FileNotFoundError(
                f"{self.description}: neither {SINGLE_FILE} nor {INDEX_FILE} found (only safetensors "
                "checkpoints are read; pickled .bin files are not loaded)"
            )
        for file in self._files:
            if not (path / file).is_file():
                raise FileNotFoundError(
                    f"{self.description}: shard {file!r} listed in {INDEX_FILE} is missing"
                )

    def config_dict(self) -> dict[str, Any]:
        return self._config

    def where(self, name: str) -> str:
        file = self._origin.get(name)
        return f"{self.description}, file {file!r}" if file else self.description

    def shapes(self):
        out = {}
        self._origin: dict[str, str] = {}
        for file, listed in self._files.items():
            with self._safe_open(str(self.path / file), framework="pt", device="cpu") as handle:
                present = set(handle.keys())
                names = present if listed is None else listed
                absent = [n for n in names if n not in present]
                if absent:
                    raise ValueError(
                        f"{self.description}: shard {file!r} lacks tensors its index lists: {_few(absent)}"
                    )
                for name in present:
                    # A name stored in two files would be loaded twice, the second copy silently
                    # winning: refuse (the index maps each name to one file; check every file's keys).
                    if name in self._origin:
                        raise ValueError(
                            f"{self.description}: tensor {name!r} is stored in two files, "
                            f"{self._origin[name]!r} and {file!r}"
                        )
                    self._origin[name] = file
                for name in names:
                    piece = handle.get_slice(name)
                    raw = piece.get_dtype()
                    out[name] = (tuple(piece.get_shape()), _SAFETENSORS_DTYPES.get(raw), raw)
        return out

    def shards(self):
        for file, listed in self._files.items():
            with self._safe_open(str(self.path / file), framework="pt", device="cpu") as handle:
                # Only the names the index assigns to this file (all of them for a single file).
                yield (list(handle.keys()) if listed is None else list(listed)), handle.get_tensor

    def default_dtype(self, first_tensor_dtype):
        name = self._config.get("torch_dtype") or self._config.get("dtype")
        if isinstance(name, str) and name in _DTYPE_NAMES:
            return _DTYPE_NAMES[name]
        return first_tensor_dtype


class _ModuleSource(_Source):
    share_storage = True

    def __init__(self, module):
        if not hasattr(module, "config") or not hasattr(module, "state_dict"):
            raise TypeError(
                f"source: expected a checkpoint directory or an HF module with .config and .state_dict(), "
                f"got {type(module).__name__}"
            )
        self.description = f"module {type(module).__name__}"
        config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
        if not config.get("architectures"):
            # A config built in code has no architectures entry; the class name says which family.
            config["architectures"] = [type(module).__name__]
        self._config = config
        state = module.state_dict()
        if state and not any(k.startswith("model.") for k in state):
            # A bare base model (LlamaModel, Qwen2Model) has names without the "model." prefix.
            state = {f"model.{k}": v for k, v in state.items()}
        self._state = {k: v.detach() for k, v in state.items()}

    def config_dict(self):
        return self._config

    def shapes(self):
        out = {}
        for k, v in self._state.items():
            out[k] = (tuple(v.shape), v.dtype if v.dtype in FLOAT_DTYPES else None, str(v.dtype)[6:])
        return out

    def shards(self):
        yield list(self._state), self._state.__getitem__

    def default_device(self):
        for tensor in self._state.values():
            return tensor.device
        return torch.device("cpu")


def _few(names: list[str], limit: int = 8) -> str:
    names = sorted(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _as_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype: expected torch.float32/float16/bfloat16, got {dtype!r}")


# --------------------------------------------------------------------------------------------
def load_model(
    source, *, device=None, dtype: torch.dtype | str | None = None, check_finite: bool = False
) -> DiffusionLM:
    """Load a diffusion LM into the runtime layout.

    Args:
        source: a checkpoint directory (str / PathLike) with ``config.json`` and safetensors weights, or
            an already-loaded HF module exposing ``.config`` and ``.state_dict()``.
        device: where the weights go; default the CPU for a directory, the module's device for a module.
        dtype: float32 / float16 / bfloat16; default the checkpoint's (``torch_dtype`` / ``dtype`` in
            config.json, else the tensors' own), or the module's parameter dtype.
        check_finite: verify that every loaded tensor (after the dtype conversion) is finite: a NaN
            or inf weight otherwise shows up only as NaN confidences in ``generate()``.

    Raises:
        ValueError: unsupported architecture or feature, missing or malformed config field (named),
            missing tensors (all named, with the checkpoint), unexpected tensors, a tensor of the wrong
            shape or of a non-float dtype (int8 / float8 quantized weights are not dequantized), a
            tensor stored in two files, a stored LM head that differs from the embedding under
            weight tying, or (``check_finite``) a non-finite tensor; each names the tensor and file.
        FileNotFoundError: no config.json / safetensors weights in the directory.
        TypeError: ``source`` is neither a path nor an HF module; ``check_finite`` is not a bool.
    """
    if not isinstance(check_finite, bool):
        raise TypeError(f"check_finite: expected a bool, got {type(check_finite).__name__}")
    if isinstance(source, (str, os.PathLike)):
        src: _Source = _DirectorySource(Path(source))
    else:
        src = _ModuleSource(source)
    config = ModelConfig.from_dict(src.config_dict())
    entries, unused = _plan(config)

    # Validate every name and shape from the headers before reading any data.
    available = src.shapes()
    wanted = {e.name for e in entries}
    missing = [e.name for e in entries if e.name not in available]
    if missing:
        raise ValueError(f"{src.description}: missing tensors {_few(missing)} (arch {config.arch!r})")
    unexpected = [n for n in available if n not in wanted and n not in unused and not _IGNORABLE.search(n)]
    if unexpected:
        raise ValueError(
            f"{src.description}: unexpected tensors {_few(unexpected)}; the config does not describe them "
            f"(arch {config.arch!r}), so loading would silently drop part of the model"
        )
    for e in entries:
        shape, float_dtype, raw = available[e.name]
        if shape != e.shape:
            raise ValueError(f"{src.where(e.name)}: tensor {e.name!r} has shape {shape}, expected {e.shape}")
        if float_dtype is None:
            raise ValueError(
                f"{src.where(e.name)}: tensor {e.name!r} has dtype {raw}, expected F32 / F16 / BF16 "
                "(quantized int / float8 checkpoints are not supported: casting would change the weights)"
            )
    tied_heads = [n for n in unused if n in available and config.tie_embeddings]
    for name in tied_heads:
        if available[name][0] != (config.vocab_size, config.d_model) or available[name][1] is None:
            raise ValueError(
                f"{src.where(name)}: weight tying is on but the stored LM head {name!r} has shape "
                f"{available[name][0]} and dtype {available[name][2]}, not the embedding's"
            )

    embed_name = next(e.name for e in entries if e.dest == ("embed",))
    dtype = _as_dtype(dtype) or src.default_dtype(available[embed_name][1]) or torch.float32
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype: expected torch.float32/float16/bfloat16, got {dtype}")
    try:
        device = src.default_device() if device is None else torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device: expected a torch device or a name like 'cpu' / 'cuda:0', got {device!r}"
        ) from err

    by_name = {e.name: e for e in entries}
    tensors: dict[tuple, torch.Tensor] = {}
    stored_heads: dict[str, torch.Tensor] = {}
    for names, get in src.shards():
        for name in names:
            entry = by_name.get(name)
            if entry is None:
                if name in tied_heads:
                    stored_heads[name] = get(name)  # compared with the embedding below
                continue
            value = get(name)
            if check_finite and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{src.where(name)}: tensor {name!r} has non-finite values (NaN or inf)")
            if entry.rows is not None:
                if entry.dest not in tensors:
                    shape = _dest_shape(config, entry.dest)
                    tensors[entry.dest] = torch.empty(shape, device=device, dtype=dtype)
                tensors[entry.dest][entry.rows].copy_(value)
            else:
                converted = value.to(device=device, dtype=dtype)
                if converted is value and not src.share_storage:
                    converted = value.clone()  # never keep a view of a memory-mapped file
                if check_finite and not bool(torch.isfinite(converted).all()):
                    raise ValueError(
                        f"{src.where(name)}: tensor {name!r} overflows to inf in {dtype} (load in float32)"
                    )
                tensors[entry.dest] = converted
            del value
    for name, head in stored_heads.items():
        # Tied weights use the embedding as the head; a stored head that differs would be dropped.
        if not torch.equal(head.to(device=device, dtype=dtype), tensors[("embed",)]):
            raise ValueError(
                f"{src.where(name)}: weight tying is on (config) but the stored LM head {name!r} differs "
                "from the embedding; set the tying flag to false in config.json to use the stored head"
            )

    layers = []
    for i in range(config.n_layers):
        fields = {name: tensors.get((i, name)) for name in LayerWeights.expected_shapes(config)}
        layers.append(LayerWeights(**fields))
    return DiffusionLM(
        config, tensors[("embed",)], layers, tensors[("final_norm",)], tensors.get(("lm_head",))
    )
