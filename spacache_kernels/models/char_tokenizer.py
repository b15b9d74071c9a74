"""The char-level tokenizer of the tiny trained checkpoints (``checkpoints/tiny-dlm``, ``-deep``).

One token per character plus the special ``<eos>`` (also used as padding, as in LLaDA's SFT) and
``<mask>`` tokens; stored next to the weights as ``char_tokenizer.json`` (:meth:`CharTokenizer.save`
/ :meth:`CharTokenizer.load`). The tasks the checkpoints were trained on live in
:mod:`spacache_kernels.integrations.tiny_tasks`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

TOKENIZER_FILE = "char_tokenizer.json"  # not "tokenizer.json": that name is HF tokenizers' format
EOS = "<eos>"
MASK = "<mask>"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
CHARS = "0123456789+=" + LETTERS


class CharTokenizer:
    """One token per character, plus ``<eos>`` (id ``eos_token_id``, also the padding) and ``<mask>``.

    Args:
        chars: the ordinary characters, ids assigned after the special tokens in this order.
        vocab_size: rows of the embedding (>= the number of tokens; the extra ids are never produced,
            they only round the embedding to a friendly size).
    """

    format_name = "spacache-char-tokenizer"

    def __init__(self, chars: str = CHARS, vocab_size: int | None = None):
        if len(set(chars)) != len(chars):
            raise ValueError("chars: expected distinct characters")
        self.specials = [EOS, MASK]
        self.chars = chars
        self.itos = self.specials + list(chars)
        self.stoi = {ch: i for i, ch in enumerate(chars, start=len(self.specials))}
        self.vocab_size = len(self.itos) if vocab_size is None else int(vocab_size)
        if self.vocab_size < len(self.itos):
            raise ValueError(f"vocab_size: expected >= {len(self.itos)} tokens, got {self.vocab_size}")

    @property
    def eos_token_id(self) -> int:
        return 0

    @property
    def pad_token_id(self) -> int:
        return 0

    @property
    def mask_token_id(self) -> int:
        return 1

    def encode(self, text: str) -> list[int]:
        """Text -> ids, one per character; raises ValueError on a character outside the vocabulary."""
        try:
            return [self.stoi[ch] for ch in text]
        except KeyError as err:
            bad = err.args[0]
            raise ValueError(f"text: character {bad!r} is not in the vocabulary {self.chars!r}") from None

    def decode(self, ids: Sequence[int] | torch.Tensor, *, stop_at_eos: bool = True) -> str:
        """Ids -> text. Stops at the first EOS by default; a mask or unused id raises ValueError."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_token_id:
                if stop_at_eos:
                    break
                continue
            if i < len(self.specials) or i >= len(self.itos):
                out.append("?")  # a mask or an unused id: visible in the text, never a valid answer
                continue
            out.append(self.itos[i])
        return "".join(out)

    # --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": self.format_name,
            "chars": self.chars,
            "specials": self.specials,
            "vocab_size": self.vocab_size,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "mask_token_id": self.mask_token_id,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        with open(path, "w") as fh:
            json.dump(self.to_dict(), fh, indent=2)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> CharTokenizer:
        """Read ``char_tokenizer.json`` from a checkpoint directory (ValueError if it is not ours)."""
        path = Path(directory) / TOKENIZER_FILE
        with open(path) as fh:
            data = json.load(fh)
        if data.get("format") != cls.format_name:
            raise ValueError(f"{path}: not a {cls.format_name} file (format={data.get('format')!r})")
        tok = cls(data["chars"], data["vocab_size"])
        if data.get("specials") != tok.specials or data.get("mask_token_id") != tok.mask_token_id:
            raise ValueError(f"{path}: special tokens {data.get('specials')} differ from {tok.specials}")
        return tok

    @staticmethod
    def is_char_tokenizer_dir(directory: str | os.PathLike) -> bool:
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            return False
        try:
            with open(path) as fh:
                return json.load(fh).get("format") == CharTokenizer.format_name
        except (OSError, ValueError):
            return False


__all__ = ["CHARS", "EOS", "LETTERS", "MASK", "TOKENIZER_FILE", "CharTokenizer"]
