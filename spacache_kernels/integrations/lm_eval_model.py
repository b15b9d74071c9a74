"""lm-evaluation-harness model ``spacache``: generative evaluation of diffusion LMs under a caching policy.

    pip install -e '.[lm_eval]'
    # once: makes `lm_eval --model spacache` work (uninstall-hook undoes it)
    python -m spacache_kernels.integrations.lm_eval_model install-hook
    lm_eval --model spacache \\
        --model_args pretrained=/models/LLaDA-8B-Instruct,policy=spa,gen_length=256,block_length=8 \\
        --tasks gsm8k --num_fewshot 4 --batch_size 16

Registration. lm-eval (checked at 0.4.13) discovers models only through its own registry
(``lm_eval.models.MODEL_MAPPING`` plus ``model_registry.register`` at import time); it reads no entry
points for models. So there are three ways in, all registering the same class under ``spacache``
(idempotently: any of them may run after another):

* ``import spacache_kernels.integrations.lm_eval_model`` before calling
  ``lm_eval.simple_evaluate(model="spacache")``;
* ``python -m spacache_kernels.integrations.lm_eval_model <lm_eval arguments>`` (also ``accelerate launch -m
  spacache_kernels.integrations.lm_eval_model ...``): the ``lm_eval`` CLI with the model registered;
* the import hook (:mod:`spacache_kernels.integrations._lm_eval_hook`), a one-line ``.pth`` file in
  site-packages, written by ``install-hook`` and removed by ``uninstall-hook``: interpreter start
  imports nothing heavy (neither torch nor this package), and when a program imports
  ``lm_eval.api.registry`` the name ``spacache`` is registered lazily, so the stock ``lm_eval`` and
  ``accelerate launch -m lm_eval`` commands find ``--model spacache``. A ``.pth`` left behind by
  ``pip uninstall`` is inert.

Model arguments (``--model_args key=value,...``):

* ``pretrained``: checkpoint directory (LLaDA / Dream layout, see ``load_model``).
* ``policy``: any spelling ``generate()`` accepts: a registered name (``spacache_kernels.policies.
  POLICIES``), a name with a published preset (``spa:llada-8b-gsm8k``) or ``package.module:Class`` for a
  policy defined outside the package; any further argument the policy's
  constructor accepts (``max_update_ratio``, ``proxy_rank``, ``refresh_steps``, ...) is passed to it.
* ``decode``: the decoding of a published setting, a key of ``spacache_kernels.decoding.PUBLISHED``
  (``spa:llada-8b-gsm8k``, ``fast_dllm_dual:llada-8b-gsm8k``, ...); the arguments below override it,
  and unset ones come from the shared ``DecodeConfig`` defaults (gen 256, steps = gen_length, block
  32, fixed count).
* ``preset``: a published setting taken whole, instead of ``policy``: its policy settings and, where
  the source publishes one, its decoding (``decode`` and the arguments below still override it).
* ``gen_length``, ``steps`` (default = gen_length), ``block_length``, ``threshold`` / ``factor``,
  ``temperature``, ``seed`` (default: lm-eval's torch seed; each request samples with its own seed
  derived from it and the request, so repeats differ and batching never changes a sample),
  ``backend`` ("auto" | "triton" | "torch";
  default ``SPACACHE_BACKEND``, else auto), ``device``, ``dtype`` (default bfloat16
  on CUDA, float32 on the CPU), ``batch_size`` (an integer; ``auto`` is rejected: there is nothing
  cheap to probe), ``cuda_graph`` (``True``: ``generate(..., cuda_graph=True)``, each step plan
  captured once as a CUDA graph; needs CUDA, the fixed-count rule, no early termination and a
  policy without ``step_syncs``). All of these are checked before the weights are loaded.
* A context longer than ``max_positions - gen_length`` tokens is truncated from the left with a
  warning (as lm-eval's HF model does).
* ``tokenizer``: a tokenizer directory (default ``pretrained``). A directory with a
  ``char_tokenizer.json`` uses the tiny char tokenizer (:mod:`spacache_kernels.models.char_tokenizer`);
  anything else is loaded with ``transformers.AutoTokenizer`` (imported lazily),
  ``trust_remote_code`` passed on.

Only ``generate_until`` is implemented: a diffusion LM here decodes a fixed-length masked region, so
the answer is read up to the first EOS and cut at the task's ``until`` strings; ``max_gen_toks`` does
not change ``gen_length`` (the region length is part of the decoding setting being evaluated).
Log-likelihood requests raise NotImplementedError.

Data parallel: under ``accelerate launch`` (``WORLD_SIZE > 1``) each process takes the GPU of its
``LOCAL_RANK``, and the harness splits the requests by ``rank`` / ``world_size`` and gathers the
results through :meth:`SpaCacheLM.all_gather` / :meth:`SpaCacheLM.gather_object`.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import LM

from spacache_kernels.decoding import canonical_key, decode_config, published
from spacache_kernels.generation import generate, validate_decoding
from spacache_kernels.graphs import check_graph_args
from spacache_kernels.integrations import _lm_eval_hook as _hook
from spacache_kernels.models import load_model
from spacache_kernels.models.char_tokenizer import CharTokenizer
from spacache_kernels.policies import make_policy, policy_class
from spacache_kernels.text import HFTokenizer

eval_logger = logging.getLogger("spacache_kernels.integrations.lm_eval_model")
MODEL_NAME = "spacache"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# lm-eval passes these to every model; they are handled here, never forwarded to the policy.
_HARNESS_ARGS = ("max_batch_size", "max_length")


_HFTokenizer = HFTokenizer  # the transformers tokenizer wrapper lives in spacache_kernels.text


def _as_int(name: str, value) -> int:
    """lm-eval passes model_args as parsed strings: accept ints and integral strings only."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    return value


def _as_float(name: str, value) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, got {value!r}") from None


def _as_bool(name: str, value) -> bool:
    """A bool, or its lm-eval model_args spelling ("true" / "false", any case)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "false"):
        return text == "true"
    raise ValueError(f"{name}: expected True or False, got {value!r}")


def _batch_size(value) -> int:
    if str(value).strip().lower().startswith("auto"):
        raise ValueError(
            f"batch_size: {value!r} is not supported (a diffusion LM's memory depends on gen_length and "
            "the policy's caches, so there is nothing to probe cheaply); give an integer such as 16"
        )
    size = _as_int("batch_size", value)
    if size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {size}")
    return size


def _validate_decoding(gen_length, steps, block_length, threshold, factor, temperature, backend) -> None:
    """generate()'s model-free checks, run here so that a typo fails before the weights load."""
    validate_decoding(gen_length, steps, block_length, threshold, factor, temperature, backend)


def _check_policy(policy, policy_kwargs: dict) -> None:
    """Any spelling generate() accepts ("spa", "spa:llada-8b-gsm8k", "fast-dllm-dual", ...); the other
    model_args must be arguments of that policy."""
    cls, _ = policy_class(str(policy))  # unknown names, presets and modules: named errors
    accepted = inspect.signature(cls.__init__).parameters
    unknown = sorted(k for k in policy_kwargs if k not in accepted)
    if unknown:
        raise ValueError(
            f"model_args: {unknown} are neither wrapper arguments nor arguments of policy {policy!r} "
            f"(it accepts {sorted(k for k in accepted if k != 'self')})"
        )
    make_policy(str(policy), **policy_kwargs)  # unknown names and presets, bad values: named errors


class SpaCacheLM(LM):
    """lm-eval model: ``generate_until`` through :func:`spacache_kernels.generate` (module docstring)."""

    def __init__(
        self,
        pretrained: str,
        policy: str | None = None,
        gen_length: int | None = None,
        steps: int | None = None,
        block_length: int | None = None,
        threshold: float | None = None,
        factor: float | None = None,
        temperature: float | None = None,
        decode: str | None = None,
        backend: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 1,
        tokenizer: str | None = None,
        trust_remote_code: bool = False,
        add_bos_token: bool = False,
        seed: int | None = None,
        preset: str | None = None,
        cuda_graph: bool | str = False,
        **policy_kwargs: Any,
    ):
        super().__init__()
        for name in _HARNESS_ARGS:
            policy_kwargs.pop(name, None)
        # Everything that can be checked without the weights is checked before loading them.
        if preset is not None:
            if policy is not None:
                raise ValueError(f"preset: give policy or preset, not both (got policy={policy!r})")
            policy = canonical_key(preset)
            if decode is None and published(policy).decode is not None:
                decode = policy
        policy = "spa" if policy is None else policy
        # Unset decoding arguments come from the shared DecodeConfig (a preset with decode=NAME).
        cfg = decode_config(decode, gen_length=gen_length, steps=steps, block_length=block_length,
                            threshold=threshold, factor=factor, temperature=temperature)  # fmt: skip
        self.gen_length = _as_int("gen_length", cfg.gen_length)
        self.steps = _as_int("steps", cfg.steps) if cfg.steps is not None else self.gen_length
        self.block_length = _as_int("block_length", cfg.block_length)
        self.threshold = _as_float("threshold", cfg.threshold)
        self.factor = _as_float("factor", cfg.factor)
        self.temperature = _as_float("temperature", cfg.temperature)
        self.confidence, self.schedule = cfg.confidence, cfg.schedule
        _validate_decoding(self.gen_length, self.steps, self.block_length, self.threshold, self.factor,
                           self.temperature, backend)  # fmt: skip
        self.batch_size = _batch_size(batch_size)
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
        _check_policy(policy, policy_kwargs)
        self._setup_distributed(device)
        self.cuda_graph = _as_bool("cuda_graph", cuda_graph)
        policy_obj = make_policy(str(policy), **policy_kwargs)
        check_graph_args(
            cuda_graph=self.cuda_graph, compile_step=False, device=self._device, policy=policy_obj,
            threshold=self.threshold, factor=self.factor, early_stop=policy_obj.early_stop_steps,
            schedule=self.schedule,
        )  # fmt: skip
        if dtype is None:
            dtype = "bfloat16" if self._device.type == "cuda" else "float32"
        self.policy_name, self.policy_kwargs = policy, dict(policy_kwargs)
        self.pretrained = str(pretrained)
        self.model = load_model(self.pretrained, device=self._device, dtype=_DTYPES[dtype])
        tok_dir = tokenizer or self.pretrained
        if CharTokenizer.is_char_tokenizer_dir(tok_dir):
            self.tok = CharTokenizer.load(tok_dir)
            self._tokenizer_name = f"spacache-char:{Path(tok_dir).name}"
        else:
            self.tok = _HFTokenizer(tok_dir, bool(trust_remote_code))
            self._tokenizer_name = str(tok_dir).replace("/", "__")
        cfg = self.model.config
        self.eos_token_id = cfg.eos_token_id if cfg.eos_token_id is not None else self.tok.eos_token_id
        self.pad_token_id = next(
            (i for i in (cfg.pad_token_id, self.tok.pad_token_id, self.eos_token_id) if i is not None), 0
        )
        self.max_context = cfg.max_positions - self.gen_length
        if self.max_context < 1:
            raise ValueError(
                f"gen_length: expected fewer than the model's {cfg.max_positions} positions, "
                f"got {self.gen_length}"
            )
        self.backend = backend
        self.add_bos_token = bool(add_bos_token)
        # lm-eval seeds torch (--seed, third value) before it builds the model: derive from that.
        self.seed = int(seed) if seed is not None else torch.initial_seed()
        self.last_stats: list = []  # GenerationStats of every generate() call, for throughput reports

    # --------------------------------------------------------------------------------------------
    def _setup_distributed(self, device: str | None) -> None:
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            # The lm_eval CLI passes --device (default "cuda") to every model; on a CPU-only machine
            # run on the CPU rather than fail, and say so.
            print(f"spacache: device {device!r} unavailable (no CUDA); using the CPU", file=sys.stderr)
            device = "cpu"
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.accelerator = None
        if world > 1:
            try:
                from accelerate import Accelerator
            except ImportError as err:  # pragma: no cover - only under a multi-process launcher
                raise ImportError("data-parallel evaluation needs `pip install accelerate`") from err
            self.accelerator = Accelerator()
            self._rank = self.accelerator.process_index
            self._world_size = self.accelerator.num_processes
            self._device = self.accelerator.device if device is None else torch.device(device)
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def all_gather(self, tensor):
        return tensor if self.accelerator is None else self.accelerator.gather(tensor)

    def gather_object(self, obj, dst=0):
        if self.accelerator is None:
            return [obj]
        result = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj=obj, object_gather_list=result, dst=dst)
        return result

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    @property
    def tokenizer_name(self) -> str:
        return self._tokenizer_name

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt=True) -> str:
        if not isinstance(self.tok, _HFTokenizer):
            raise NotImplementedError("the char tokenizer of the tiny checkpoints has no chat template")
        return self.tok.hf.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    # --------------------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(
            "spacache: loglikelihood is not implemented; diffusion LMs are evaluated generatively here "
            "(use generate_until tasks such as gsm8k, or a task with output_type: generate_until)"
        )

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(
            "spacache: loglikelihood_rolling is not implemented; diffusion LMs are evaluated generatively"
        )

    def _encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text)
        if self.add_bos_token and isinstance(self.tok, _HFTokenizer) and self.tok.hf.bos_token_id is not None:
            ids = [self.tok.hf.bos_token_id] + ids
        if not ids:
            raise ValueError("spacache: empty prompt after tokenization")
        if len(ids) > self.max_context:
            # As lm-eval's own HF model does: keep the end of the context (the question), drop its start.
            eval_logger.warning(
                "spacache: context of %d tokens exceeds the %d the model has room for next to gen_length=%d; "
                "truncating it from the left",
                len(ids), self.max_context, self.gen_length,
            )  # fmt: skip
            ids = ids[-self.max_context :]
        return ids

    def _decode(self, ids: list[int], until: list[str]) -> str:
        if self.eos_token_id is not None and self.eos_token_id in ids:
            ids = ids[: ids.index(self.eos_token_id)]
        text = self.tok.decode(ids)
        for stop in until:
            if stop and stop in text:
                text = text[: text.index(stop)]
        return text

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """requests[i].args = (context, gen_kwargs) -> the generated continuation of each context.

        Requests are decoded in batches of ``batch_size`` sorted by prompt length (left-padded with
        an attention mask when ragged); results come back in the original order.
        """
        from tqdm.auto import tqdm

        items = []
        seen: dict[str, int] = {}
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(gen_kwargs.get("temperature", self.temperature) or 0.0)
            if not gen_kwargs.get("do_sample", temperature > 0):
                temperature = 0.0
            items.append((i, self._encode(context), until, temperature, self._request_seed(req, seen)))
        # Longest first: the slowest batch runs first, and similar lengths share a batch.
        order = sorted(items, key=lambda item: (-len(item[1]), item[3]))
        results: list[str | None] = [None] * len(items)
        bar = tqdm(total=len(items), disable=disable_tqdm or self.rank != 0, desc="spacache generate")
        start = 0
        while start < len(order):
            temp = order[start][3]
            batch = [order[start]]
            while len(batch) < self.batch_size and start + len(batch) < len(order):
                nxt = order[start + len(batch)]
                if nxt[3] != temp:
                    break
                batch.append(nxt)
            start += len(batch)
            prompts, untils, seeds = ([b[k] for b in batch] for k in (1, 2, 4))
            texts = self._generate_batch(prompts, untils, temp, seeds)
            for (idx, *_), text in zip(batch, texts, strict=True):
                results[idx] = text
                self.cache_hook.add_partial("generate_until", requests[idx].args, text)
            bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]

    def _request_seed(self, req, seen: dict[str, int]) -> int:
        """The sampling seed of one request: a hash of the model's seed, the request (task, document,
        index, arguments) and how often the same request came before (lm-eval's ``repeats`` pass one
        request several times: each repeat gets its own seed). Independent of batching and order."""
        import hashlib

        key = repr((getattr(req, "task_name", None), getattr(req, "doc_id", None), getattr(req, "idx", None),
                    req.args))  # fmt: skip
        occurrence = seen.get(key, 0)
        seen[key] = occurrence + 1
        digest = hashlib.blake2b(f"{self.seed}|{occurrence}|{key}".encode(), digest_size=4).digest()
        return int.from_bytes(digest, "little")

    def _generate_batch(
        self, prompts: list[list[int]], untils: list[list[str]], temperature: float, seeds: list[int]
    ):
        length = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), length), self.pad_token_id, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, length - len(p) :] = torch.tensor(p)
            mask[row, length - len(p) :] = 1
        ragged = bool((mask == 0).any())
        policy = make_policy(self.policy_name, **self.policy_kwargs)
        out = generate(
            self.model,
            ids,
            attention_mask=mask if ragged else None,
            gen_length=self.gen_length,
            steps=self.steps,
            block_length=self.block_length,
            policy=policy,
            threshold=self.threshold,
            factor=self.factor,
            temperature=temperature,
            eos_token_id=self.eos_token_id,
            confidence=self.confidence,
            schedule=self.schedule,
            backend=self.backend,
            seed=seeds,
            cuda_graph=self.cuda_graph,
        )
        self.last_stats.append(out.stats)
        gen = out.sequences[:, length:].cpu().tolist()
        return [self._decode(row, until) for row, until in zip(gen, untils, strict=True)]


def register_with_lm_eval() -> None:
    """Register :class:`SpaCacheLM` as lm-eval model ``spacache`` (idempotent).

    The name may already be taken by the import hook's lazy placeholder (which names this class) or
    by this class from an earlier import: both are fine. Another model under the name is an error.
    """
    from lm_eval.api import registry

    if len(registry.model_registry) == 0:
        import lm_eval.models  # noqa: F401  (lm-eval's own lazy entries; it adds them only when empty)
    current = dict(registry.model_registry.items()).get(MODEL_NAME)
    if isinstance(current, type) and f"{current.__module__}:{current.__qualname__}" == _hook.MODEL_PATH:
        return  # this class, or the same class from an earlier import of this module
    if current is not None and current != _hook.MODEL_PATH:
        raise ValueError(f"lm-eval model name {MODEL_NAME!r} is already registered to {current!r}")
    registry.model_registry.register(MODEL_NAME, target=SpaCacheLM)  # placeholder -> class upgrade


def _site_dir(site_dir: str | None) -> Path:
    import sysconfig

    return Path(site_dir or sysconfig.get_paths()["purelib"])


def install_hook(site_dir: str | None = None) -> Path:
    """Write the hook's ``.pth`` file into ``site_dir`` (default: this interpreter's purelib).

    Its one line (:func:`spacache_kernels.integrations._lm_eval_hook.pth_line`) imports nothing heavy,
    does nothing when the package has been uninstalled, and never raises. Installing twice rewrites
    the same file.
    """
    path = _site_dir(site_dir) / _hook.PTH_NAME
    path.write_text(_hook.pth_line())
    return path


def uninstall_hook(site_dir: str | None = None) -> Path | None:
    """Remove the hook's ``.pth`` file from ``site_dir``; returns its path, or None if none was there."""
    path = _site_dir(site_dir) / _hook.PTH_NAME
    if not path.exists():
        return None
    path.unlink()
    return path


def main(argv: list[str] | None = None) -> None:
    """``python -m spacache_kernels.integrations.lm_eval_model [install-hook [DIR] | uninstall-hook [DIR]
    | <lm_eval CLI arguments>]``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["install-hook"]:
        print(f"wrote {install_hook(argv[1] if len(argv) > 1 else None)}")
        return
    if argv[:1] == ["uninstall-hook"]:
        removed = uninstall_hook(argv[1] if len(argv) > 1 else None)
        print(f"removed {removed}" if removed else "no spacache lm-eval hook was installed there")
        return
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    # Run the importable module, not this `__main__` copy: its class is the one lm-eval must find
    # (and registering a second, `__main__`, class under the same name would collide).
    from spacache_kernels.integrations.lm_eval_model import main as _main

    _main()
else:
    register_with_lm_eval()
