"""A policy defined outside the package (tests/external/drift_topk.py, under 50 lines) runs by
``package.module:Class`` through generate(), the CLI and the lm-eval wrapper."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spacache_kernels.__main__ import main
from spacache_kernels.generation import generate
from spacache_kernels.models import load_model
from spacache_kernels.policies import make_policy, policy_class
from tests.external.drift_topk import DriftTopK
from tests.models.checkpoints import write_llada_checkpoint

SPEC = "tests.external.drift_topk:DriftTopK"
EXTERNAL = Path(__file__).resolve().parent / "external" / "drift_topk.py"
KW = dict(gen_length=16, steps=16, block_length=8, backend="torch")


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return write_llada_checkpoint(tmp_path_factory.mktemp("llada"), n_layers=3, max_sequence_length=64)


def test_the_external_policy_is_short():
    assert len(EXTERNAL.read_text().splitlines()) < 50


def test_resolver_finds_the_class_by_module_path():
    assert policy_class(SPEC) == (DriftTopK, None)
    policy = make_policy(SPEC, refresh=2)
    assert isinstance(policy, DriftTopK) and repr(policy) == "DriftTopK(refresh=2, ratio=0.25, backend=None)"
    with pytest.raises(ValueError, match="does not name a CachePolicy"):
        make_policy("tests.external.drift_topk:torch")
    with pytest.raises(ValueError, match="cannot import module"):
        make_policy("tests.external.no_such_module:DriftTopK")


def test_generate_by_name_refresh_every_step_equals_vanilla_and_partial_steps_differ(path):
    model = load_model(path)
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(1))
    vanilla = generate(model, ids, policy="vanilla", **KW)
    forced = generate(model, ids, policy=make_policy(SPEC, refresh=1), **KW)
    assert torch.equal(forced.sequences, vanilla.sequences)
    partial = generate(model, ids, policy=SPEC, **KW)  # by name, the defaults
    assert partial.stats.plan_kinds["partial"] == 12
    assert partial.stats.flops < vanilla.stats.flops
    # Threshold mode: rows finish at different steps and leave the batch (row_state is trimmed).
    ragged = generate(model, ids, policy=SPEC, threshold=0.2, **KW)
    for row in range(2):
        alone = generate(model, ids[row : row + 1], policy=SPEC, threshold=0.2, **KW)
        assert torch.equal(ragged.sequences[row : row + 1], alone.sequences)


def test_cli_runs_the_external_policy(path, capsys):
    argv = ["generate", "--model", str(path), "--prompt-ids", "5,6,7", "--policy", SPEC, "--gen-length", "16",
            "--steps", "16", "--block-length", "8", "--backend", "torch"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    stats = json.loads(captured.err.strip().splitlines()[-1])
    assert stats["policy"] == "drift_topk"
    want = generate(load_model(path), torch.tensor([[5, 6, 7]]), policy=SPEC, **KW)
    assert [int(t) for t in captured.out.strip().split(",")] == want.sequences[0, 3:].tolist()


def test_lm_eval_wrapper_runs_the_external_policy():
    pytest.importorskip("lm_eval")
    from spacache_kernels.integrations.lm_eval_model import SpaCacheLM
    from tests.test_lm_eval_model import CHECKPOINT, _Request

    lm = SpaCacheLM(pretrained=str(CHECKPOINT), policy=SPEC, refresh=1, gen_length=8, steps=8, block_length=8,
                    backend="torch")  # fmt: skip
    vanilla = SpaCacheLM(pretrained=str(CHECKPOINT), policy="vanilla", gen_length=8, steps=8, block_length=8,
                         backend="torch")  # fmt: skip
    requests = [_Request("1234+5678="), _Request("4321+1111=", doc_id=1)]
    assert lm.generate_until(requests, disable_tqdm=True) == vanilla.generate_until(
        requests, disable_tqdm=True
    )
    with pytest.raises(ValueError, match="model_args"):
        SpaCacheLM(pretrained=str(CHECKPOINT), policy=SPEC, not_an_option=1, backend="torch")
