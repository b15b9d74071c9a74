"""The command line: python -m spacache_kernels generate ..."""

import json

import torch

from spacache_kernels.__main__ import main
from spacache_kernels.generate import generate
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
