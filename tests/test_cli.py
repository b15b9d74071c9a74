"""The command line: python -m spacache_kernels generate ..."""

import json
from pathlib import Path

import pytest
import torch

from spacache_kernels.__main__ import main
from spacache_kernels.generation import generate
from spacache_kernels.models import load_model
from tests.models.checkpoints import write_llada_checkpoint


def test_cli_generate_matches_the_api(tmp_path, capsys):
    path = write_llada_checkpoint(tmp_path / "m", n_layers=3, max_sequence_length=64)
    argv = ["generate", "--model", str(path), "--prompt-ids", "5,6,7", "--prompt-ids", "8,9",
            "--policy", "spa", "--gen-length", "16", "--steps", "16", "--block-length", "8",
            "--backend", "torch"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    rows = [[int(t) for t in line.split(",")] for line in captured.out.strip().splitlines()]
    stats = json.loads(captured.err.strip().splitlines()[-1])
    assert stats["steps"] == 16 and stats["policy"] == "spa"
    model = load_model(path)
    ids = torch.tensor([[5, 6, 7], [0, 8, 9]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    want = generate(model, ids, attention_mask=mask, gen_length=16, steps=16, block_length=8, policy="spa",
                    backend="torch")  # fmt: skip
    assert rows == want.sequences[:, 3:].tolist()


def test_cli_follows_spacache_backend(tmp_path, capsys, monkeypatch):
    from tests.test_generate_edges import forbid_triton

    path = write_llada_checkpoint(tmp_path / "m", n_layers=2, max_sequence_length=64)
    forbid_triton(monkeypatch)
    argv = ["generate", "--model", str(path), "--prompt-ids", "5,6,7", "--gen-length", "8", "--steps", "8",
            "--block-length", "8"]  # fmt: skip
    assert main(argv) == 0


TINY = str(Path(__file__).resolve().parent.parent / "checkpoints" / "tiny-dlm")


def test_cli_text_prompt_prints_the_decoded_answers(capsys):
    """`--prompt TEXT` goes through the checkpoint's char tokenizer; answers come back as text."""
    from spacache_kernels.text import generate_text

    prompts = ["1234+5678=", "4321+1111="]
    argv = ["generate", "--model", TINY, "--prompt", prompts[0], "--prompt", prompts[1], "--gen-length", "8",
            "--steps", "8", "--block-length", "8", "--backend", "torch"]  # fmt: skip
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    model = load_model(TINY)
    kw = dict(gen_length=8, steps=8, block_length=8, backend="torch")
    want = generate_text(model, prompts, tokenizer=TINY, **kw)
    assert lines == want
    assert int(lines[0]) == 1234 + 5678 and int(lines[1]) == 4321 + 1111  # the trained checkpoint adds


def test_cli_seed_selects_the_sample(capsys):
    base = ["generate", "--model", TINY, "--prompt", "1234+5678=", "--gen-length", "8", "--steps", "8",
            "--block-length", "8", "--backend", "torch", "--temperature", "50"]  # fmt: skip
    outs = {}
    for seed in ("1", "1", "2"):
        assert main([*base, "--seed", seed]) == 0
        outs.setdefault(seed, []).append(capsys.readouterr().out)
    assert outs["1"][0] == outs["1"][1] and outs["1"][0] != outs["2"][0]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt-ids", "1,2,3"], "mask token id 1"),  # the tiny checkpoint's mask id
        (["--prompt", "abc", "--gen-length", "12"], "gen_length: expected a multiple of block_length"),
        (["--prompt", "1+1=", "--policy", "spa:nope"], "presets"),
        (["--prompt", "1+1=", "--tokenizer", "/no/such/dir"], "tokenizer: expected"),
        (["--prompt", "1+1=", "--cuda-graph", "--device", "cpu"], "cuda_graph: CUDA graphs need"),
    ],
)
def test_cli_user_errors_are_reported_the_argparse_way(capsys, extra, message):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--model", TINY, "--gen-length", "8", "--steps", "8", "--block-length", "8",
              *extra])  # fmt: skip
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and message in err and "Traceback" not in err


def test_cli_missing_checkpoint_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--model", "/no/such/checkpoint", "--prompt", "1+1="])
    assert info.value.code == 2 and "no config.json" in capsys.readouterr().err
