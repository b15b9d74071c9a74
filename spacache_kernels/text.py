"""Text in, text out: a checkpoint's tokenizer around :func:`spacache_kernels.generate`.

    from spacache_kernels import load_model
    from spacache_kernels.text import generate_text
    model = load_model("checkpoints/tiny-dlm")
    generate_text(model, ["1234+5678="], tokenizer="checkpoints/tiny-dlm", gen_length=8, steps=8,
                  block_length=8)                                  # -> ["6912"]

Tokenizers (:func:`load_tokenizer`): a directory with ``char_tokenizer.json`` (the tiny trained
checkpoints, :class:`~spacache_kernels.models.char_tokenizer.CharTokenizer`), else a transformers tokenizer
(``AutoTokenizer``, imported lazily). A transformers tokenizer that has a chat template wraps each
prompt as one user turn with the generation prompt (as LLaDA-Instruct / Dream-Instruct expect) unless
``chat_template=False``. Prompts of different lengths are left-padded with an attention mask.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from spacache_kernels.models.char_tokenizer import CharTokenizer


class HFTokenizer:
    """The small surface of a transformers tokenizer used here, behind the CharTokenizer API."""

    def __init__(self, path: str | os.PathLike, trust_remote_code: bool = False):
        from transformers import AutoTokenizer  # lazy: the char tokenizer needs no transformers

        self.hf = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        self.name = str(path)

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self.hf.pad_token_id

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids, *, stop_at_eos: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def chat(self, text: str) -> str:
        """``text`` as one user turn followed by the assistant's generation prompt."""
        return self.hf.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )


Tokenizer = CharTokenizer | HFTokenizer


def load_tokenizer(path: str | os.PathLike, *, trust_remote_code: bool = False) -> Tokenizer:
    """The tokenizer stored in a checkpoint directory (see the module docstring)."""
    if not isinstance(path, (str, os.PathLike)) or not Path(path).is_dir():
        raise ValueError(f"tokenizer: expected a checkpoint or tokenizer directory, got {path!r}")
    if CharTokenizer.is_char_tokenizer_dir(path):
        return CharTokenizer.load(path)
    try:
        return HFTokenizer(path, trust_remote_code)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"tokenizer: {str(path)!r} has neither char_tokenizer.json nor a transformers tokenizer ({err})"
        ) from err


def encode_prompts(
    tokenizer: Tokenizer, prompts: list[str], *, chat_template: bool | None = None, pad_token_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(B, P)`` int64, left-padded with ``pad_token_id``, and the attention mask ``(B, P)``.

    chat_template: None = use it when the tokenizer has one; True = require it; False = plain text.
    """
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts: expected a non-empty list of strings, got {prompts!r}")
    has_chat = isinstance(tokenizer, HFTokenizer) and tokenizer.has_chat_template
    if chat_template and not has_chat:
        raise ValueError("chat_template: the tokenizer has no chat template")
    use_chat = has_chat if chat_template is None else bool(chat_template)
    rows = [tokenizer.encode(tokenizer.chat(p) if use_chat else p) for p in prompts]
    for text, row in zip(prompts, rows):
        if not row:
            raise ValueError(f"prompts: {text!r} encodes to no tokens")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def decode_rows(tokenizer: Tokenizer, rows: torch.Tensor, eos_token_id: int | None) -> list[str]:
    """Generated ids ``(B, G)`` -> text, each row cut at its first EOS."""
    out = []
    for row in rows.tolist():
        if eos_token_id is not None and eos_token_id in row:
            row = row[: row.index(eos_token_id)]
        out.append(tokenizer.decode(row))
    return out


def generate_text(
    model,
    prompts: str | list[str],
    *,
    tokenizer: str | os.PathLike | Tokenizer,
    chat_template: bool | None = None,
    **generate_kwargs,
) -> str | list[str]:
    """Decode after each prompt with :func:`~spacache_kernels.generate` and return the answers as text.

    Args:
        model: a loaded :class:`~spacache_kernels.models.DiffusionLM`.
        prompts: one string (returns one string) or a list of strings (returns a list).
        tokenizer: a tokenizer directory (usually the checkpoint's) or a loaded tokenizer.
        chat_template: see :func:`encode_prompts`.
        generate_kwargs: ``gen_length``, ``steps``, ``block_length``, ``policy``, ``temperature``,
            ``seed``, ... as for ``generate()``; ``eos_token_id`` defaults to the model's.
    """
    from spacache_kernels.generation import generate

    single = isinstance(prompts, str)
    tok = tokenizer if isinstance(tokenizer, (CharTokenizer, HFTokenizer)) else load_tokenizer(tokenizer)
    cfg = model.config
    eos = generate_kwargs.pop("eos_token_id", None)
    eos = eos if eos is not None else (cfg.eos_token_id if cfg.eos_token_id is not None else tok.eos_token_id)
    pad = next((i for i in (cfg.pad_token_id, tok.pad_token_id, eos) if i is not None), 0)
    ids, mask = encode_prompts(tok, [prompts] if single else list(prompts), chat_template=chat_template,
                               pad_token_id=pad)  # fmt: skip
    out = generate(model, ids, attention_mask=mask, eos_token_id=eos, **generate_kwargs)
    texts = decode_rows(tok, out.sequences[:, ids.shape[1] :], eos)
    return texts[0] if single else texts
