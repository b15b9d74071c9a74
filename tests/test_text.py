"""Text in, text out (spacache_kernels.text): the char tokenizer of the tiny checkpoint and a
transformers tokenizer with a chat template."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spacache_kernels.generation import generate
from spacache_kernels.models import load_model
from spacache_kernels.models.char_tokenizer import CharTokenizer
from spacache_kernels.text import HFTokenizer, encode_prompts, generate_text, load_tokenizer

TINY = Path(__file__).resolve().parent.parent / "checkpoints" / "tiny-dlm"
KW = dict(gen_length=8, steps=8, block_length=8, backend="torch")


def test_generate_text_equals_encoding_by_hand():
    model = load_model(TINY)
    tok = CharTokenizer.load(TINY)
    prompts = ["1234+5678=", "99+1="]
    texts = generate_text(model, prompts, tokenizer=TINY, **KW)
    width = max(len(p) for p in prompts)
    ids = torch.full((2, width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(tok.encode(p))
        mask[i, width - len(p) :] = 1
    out = generate(model, ids, attention_mask=mask, **KW).sequences[:, width:]
    assert texts == [tok.decode(row) for row in out]  # decode stops at EOS
    assert generate_text(model, "1234+5678=", tokenizer=tok, **KW) == texts[0] == str(1234 + 5678).zfill(5)


def test_bad_text_inputs_are_named():
    model = load_model(TINY)
    with pytest.raises(ValueError, match="prompts: expected a non-empty list"):
        generate_text(model, [], tokenizer=TINY, **KW)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        generate_text(model, "héllo", tokenizer=TINY, **KW)
    with pytest.raises(ValueError, match="tokenizer: expected"):
        load_tokenizer(TINY / "config.json")
    with pytest.raises(ValueError, match="chat_template: the tokenizer has no chat template"):
        encode_prompts(CharTokenizer.load(TINY), ["1+1="], chat_template=True)


def _char_level_hf_tokenizer(directory: Path, vocab_size: int, chat_template: str | None) -> list[str]:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = [chr(c) for c in range(32, 127)]
    names += [f"<x{i}>" for i in range(len(names), vocab_size)]
    names[124], names[125], names[126] = "<eos>", "<unk>", "<mask>"
    core = Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    hf = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>")
    if chat_template:
        hf.chat_template = chat_template
    hf.save_pretrained(directory)
    return names


def test_transformers_tokenizer_uses_its_chat_template(tmp_path):
    from tests.models.checkpoints import LLADA_SHAPE, write_llada_checkpoint

    template = (
        "{% for m in messages %}[{{ m['content'] }}]{% endfor %}{% if add_generation_prompt %}:{% endif %}"
    )
    names = _char_level_hf_tokenizer(tmp_path, LLADA_SHAPE["vocab"], template)
    write_llada_checkpoint(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer) and tok.has_chat_template
    ids, mask = encode_prompts(tok, ["ab", "abcd"], pad_token_id=124)
    assert ids[1].tolist() == [names.index(c) for c in "[abcd]:"]
    assert ids[0].tolist() == [124, 124] + [names.index(c) for c in "[ab]:"]
    assert mask[0].tolist()[:3] == [0, 0, 1]
    plain, _ = encode_prompts(tok, ["ab"], chat_template=False)
    assert plain.tolist() == [[names.index("a"), names.index("b")]]
    model = load_model(tmp_path)
    texts = generate_text(model, ["ab", "abcd"], tokenizer=tmp_path, **KW)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
