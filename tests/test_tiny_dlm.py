"""The shipped tiny trained checkpoint, its tokenizer and tasks, and the training script's pieces.

Everything runs on the torch backend (the Triton interpreter would take minutes); the whole file takes
well under a minute on a 2-core CPU.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from spacache_kernels.integrations.tiny_tasks import (
    TASKS,
    TRAIN_SEED,
    checkpoint_tasks,
    decode_problems,
    encode_batch,
    exact_match,
    heldout_problems,
    problems,
)
from spacache_kernels.models import load_model
from spacache_kernels.models.char_tokenizer import CharTokenizer
from spacache_kernels.policies import SpaCache

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "checkpoints" / "tiny-dlm"
N_PROBLEMS = {"add": 16, "copy": 16}  # the tasks of this checkpoint (checkpoint_tasks(CHECKPOINT))
MARGIN = 0.13  # one or two misses below the documented held-out accuracy (documented >= 0.9 itself)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Small matmuls on a shared 2-core machine: one intra-op thread is several times faster than two
    # (no spinning at OpenMP barriers while other processes hold the cores).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model():
    return load_model(CHECKPOINT, dtype=torch.float32)


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer.load(CHECKPOINT)


def test_checkpoint_layout_and_load(model, tok):
    files = {p.name for p in CHECKPOINT.iterdir()}
    assert {"config.json", "model.safetensors", "char_tokenizer.json"} <= files
    size = sum(p.stat().st_size for p in CHECKPOINT.iterdir())
    assert size < 8 * 2**20, f"checkpoint is {size / 2**20:.1f} MiB; keep it a few MB"
    config = json.loads((CHECKPOINT / "config.json").read_text())
    assert config["architectures"] == ["LLaDAModelLM"] and config["block_type"] == "llama"
    assert model.config.arch == "llada"
    assert model.mask_id == tok.mask_token_id
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.config.vocab_size == tok.vocab_size


def test_tokenizer_round_trip(tmp_path, tok):
    rng = random.Random(0)
    for task in TASKS:
        for p in problems(task, 5, seed=3):
            assert tok.decode(tok.encode(p.prompt)) == p.prompt
            assert tok.decode(tok.encode(p.answer) + [tok.eos_token_id, 5]) == p.answer  # stops at EOS
    text = "".join(rng.choice(tok.chars) for _ in range(200))
    assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path)
    again = CharTokenizer.load(tmp_path)
    assert again.itos == tok.itos and again.vocab_size == tok.vocab_size
    assert tok.decode([tok.mask_token_id, tok.encode("7")[0]]) == "?7"  # an undecoded mask never matches
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.encode("A")


def test_tasks_are_fixed_length_and_scored_exactly(tok):
    for name, spec in TASKS.items():
        batch = heldout_problems(name, 4)
        prompt_ids, answer_ids = encode_batch(tok, batch)
        assert prompt_ids.shape == (4, spec.prompt_length)
        assert answer_ids.shape == (4, spec.gen_length)
        assert spec.gen_length % spec.block_length == 0
        assert exact_match(tok, batch, answer_ids) == [True] * 4
        wrong = answer_ids.clone()
        first = batch[0].answer[0]
        other = ("9" if first != "9" else "8") if name == "add" else ("z" if first != "z" else "y")
        wrong[0, 0] = tok.encode(other)[0]
        assert exact_match(tok, batch, wrong) == [False, True, True, True]
    p = heldout_problems("add", 1)[0]
    a, b = p.prompt.rstrip("=").split("+")
    assert int(p.answer) == int(a) + int(b)


@pytest.fixture(scope="module")
def vanilla_tokens(model, tok):
    return {task: decode_problems(model, tok, heldout_problems(task, n))[0] for task, n in N_PROBLEMS.items()}


def test_vanilla_accuracy_matches_documented(tok, vanilla_tokens):
    documented = json.loads((CHECKPOINT / "training.json").read_text())["final_vanilla_accuracy"]
    assert checkpoint_tasks(CHECKPOINT) == list(N_PROBLEMS)
    for task in N_PROBLEMS:
        hits = exact_match(tok, heldout_problems(task, N_PROBLEMS[task]), vanilla_tokens[task])
        accuracy = sum(hits) / len(hits)
        assert documented[task]["accuracy"] >= 0.9, f"{task}: the shipped checkpoint documents < 90%"
        assert accuracy >= documented[task]["accuracy"] - MARGIN, (task, accuracy, documented[task])


def test_spa_full_ratio_equals_vanilla(model, tok, vanilla_tokens):
    """Ratio 1 in every layer with a full refresh every step is vanilla decoding, token for token."""
    for task in N_PROBLEMS:
        policy = SpaCache(max_update_ratio=1.0, budget="uniform", refresh_steps=1, backend="torch")
        tokens = decode_problems(model, tok, heldout_problems(task, N_PROBLEMS[task]), policy)[0]
        assert torch.equal(tokens, vanilla_tokens[task]), task


def test_spa_full_ratio_recomputes_every_generated_token(model, tok, vanilla_tokens):
    """Ratio 1 everywhere (default refreshes): every partial step recomputes all generated tokens, so
    it equals refreshing the generated region every step. It is *not* vanilla: between full refreshes
    SPA-Cache keeps the prompt's K/V from the last full refresh (the reference rule), and the prompt
    attends to the generated tokens; on this checkpoint that changes one addition of 16."""
    probs = heldout_problems("add", N_PROBLEMS["add"])
    ratio_one = decode_problems(model, tok, probs, SpaCache(max_update_ratio=1.0, budget="uniform"))[0]
    gen_refresh = decode_problems(model, tok, probs, SpaCache(refresh_gen_steps=1, max_update_ratio=0.1))[0]
    assert torch.equal(ratio_one, gen_refresh)
    hits = exact_match(tok, probs, ratio_one)
    documented = json.loads((CHECKPOINT / "training.json").read_text())["final_vanilla_accuracy"]
    assert sum(hits) / len(hits) >= documented["add"]["accuracy"] - MARGIN


def test_training_loss_and_export_match_runtime(tmp_path):
    from bench.train_tiny_dlm import TinyLLaDA, check_against_runtime, export, llada_config, llada_sft_loss

    torch.manual_seed(0)
    tok = CharTokenizer()
    config = llada_config(tok, d_model=32, n_layers=2, n_heads=2, mlp_hidden_size=48, max_sequence_length=160)
    model = TinyLLaDA(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(2):
        for task in TASKS:
            prompt_ids, answer_ids = encode_batch(tok, problems(task, 4, seed=1))
            loss = llada_sft_loss(model, prompt_ids, answer_ids, tok.mask_token_id, gen)
            assert torch.isfinite(loss) and loss > 0
            opt.zero_grad()
            loss.backward()
            assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
            opt.step()
            losses.append(float(loss.detach()))
    export(model, tok, tmp_path)
    ids = torch.cat(encode_batch(tok, problems("copy", 2, seed=5)), dim=1)
    ids[:, -30:] = tok.mask_token_id
    diff = check_against_runtime(model, tmp_path, ids)
    assert diff < 1e-4
    runtime = load_model(tmp_path)
    with torch.no_grad():
        model.eval()
        assert torch.allclose(model(ids), runtime.forward_dense(ids), atol=1e-4, rtol=0)
    # A wrong export (gate and up swapped) must be caught by the same check.
    with torch.no_grad():
        block = model.model.transformer.blocks[0]
        block.ff_proj.weight, block.up_proj.weight = block.up_proj.weight, block.ff_proj.weight
    with pytest.raises(AssertionError, match="differs"):
        check_against_runtime(model, tmp_path, ids)


def test_loss_weights_masked_tokens_by_inverse_ratio():
    """With a model that predicts uniformly, the loss is log(V) * E[masked count / p] / G ~ log(V)."""
    from bench.train_tiny_dlm import llada_sft_loss

    vocab = 10

    class Uniform(torch.nn.Module):
        def forward(self, ids):
            return torch.zeros(*ids.shape, vocab)

    answers = torch.randint(2, vocab, (4000, 8))
    prompts = torch.randint(2, vocab, (4000, 3))
    loss = llada_sft_loss(Uniform(), prompts, answers, 1, torch.Generator().manual_seed(0))
    assert abs(float(loss) - torch.log(torch.tensor(float(vocab)))) < 0.1


def test_eval_covers_the_registry_and_records_failures(monkeypatch):
    """bench.eval runs every registered policy; one that raises becomes an error row, not a crash."""
    from bench import eval as quality
    from spacache_kernels.policies import POLICIES, CachePolicy

    class Broken(CachePolicy):
        name = "broken"

        def reset(self, model, shape):
            raise RuntimeError("this policy always fails")

    monkeypatch.setitem(POLICIES, "broken", Broken)
    labels = [label for label, *_ in quality.settings()]
    assert set(POLICIES) <= set(labels) and "spa r=0.1" in labels and "spa r=1 uniform" in labels
    previous = torch.get_num_threads()
    try:
        report = quality.evaluate(CHECKPOINT, {"add": 4, "copy": 1}, batch_size=8, threads=1)
    finally:
        torch.set_num_threads(previous)
    rows = {row["setting"]: row for row in report["rows"]}
    assert "this policy always fails" in rows["broken"]["error"]
    assert "this policy always fails" in rows["broken t=0.9"]["error"]
    assert rows["vanilla"]["flops_ratio"] == 1.0 and rows["vanilla"]["tasks"]["add"]["agreement"] == 1.0
    assert 0 < rows["spa r=0.1"]["flops_ratio"] < rows["spa r=1"]["flops_ratio"] < 1
    # fixed count commits one token per forward; threshold decoding at least one, never more than a block
    add = TASKS["add"]
    assert rows["vanilla"]["tasks"]["add"]["forwards"] == add.gen_length
    assert rows["vanilla"]["tasks"]["add"]["tokens_per_forward"] == 1.0
    fast = rows["vanilla t=0.9"]["tasks"]["add"]
    assert 1.0 <= fast["tokens_per_forward"] <= add.block_length
    assert fast["forwards"] * fast["tokens_per_forward"] == pytest.approx(add.gen_length)
    assert set(report["aup"]) == set(POLICIES) - {"broken"}
    table = quality.format_table(report["rows"], ["add", "copy"], markdown=True)
    assert "| broken |  | error: RuntimeError: this policy always fails" in table


def test_wilson_interval_and_aup_on_hand_computed_cases():
    from bench.eval import aup, wilson_interval

    lo, hi = wilson_interval(8, 10)  # textbook value: [0.490, 0.943]
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    for total in (64, 128, 1000):  # the interval contains the proportion (128/128 once rounded below 1)
        for correct in (0, 1, total - 1, total):
            lo, hi = wilson_interval(correct, total)
            assert lo <= correct / total <= hi
    with pytest.raises(ValueError, match="total"):
        wilson_interval(0, 0)
    # one point at TPF 1 and full accuracy: the accuracy itself
    assert aup([(1.0, 0.9)], best=0.9) == pytest.approx(0.9)
    # a second point at TPF 3 without accuracy loss adds the trapezoid 2 * 0.9
    assert aup([(3.0, 0.9), (1.0, 0.9)], best=0.9) == pytest.approx(0.9 + 2 * 0.9)
    # losing accuracy is discounted: y = 0.6 of best 0.9 weighs exp(-3 / 3) = e^-1
    weighted = 0.6 * torch.exp(torch.tensor(-1.0)).item()
    assert aup([(1.0, 0.9), (3.0, 0.6)], best=0.9) == pytest.approx(0.9 + 2 * (0.9 + weighted) / 2)
    with pytest.raises(ValueError, match="points"):
        aup([], best=1.0)


def test_heldout_addition_problems_were_not_trained_on():
    """Replays the shipped run's training stream of additions (seeded) against the held-out prompts."""
    training = json.loads((CHECKPOINT / "training.json").read_text())
    rng = random.Random(f"add:{TRAIN_SEED}:{training['seed']}")
    seen = {TASKS["add"].make(rng).prompt for _ in range(training["steps"] * training["batch_sizes"]["add"])}
    assert len(seen) > 100_000
    assert not {p.prompt for p in heldout_problems("add", 256)} & seen


def test_losses_compare_with_vanilla_under_the_same_rule():
    from bench.eval import format_losses, losses

    def row(setting, policy, threshold, correct):
        return {"setting": setting, "policy": policy, "kwargs": {}, "threshold": threshold,
                "tasks": {"sort": {"correct": correct, "accuracy": correct / 10}}}  # fmt: skip

    report = {
        "name": "ck",
        "counts": {"sort": 10},
        "rows": [
            row("vanilla", "vanilla", None, 10),
            row("a", "a", None, 7),  # 3 below vanilla fixed
            row("b", "b", None, 9),  # 1 below: not listed
            row("vanilla t=0.9", "vanilla", 0.9, 6),
            row("a t=0.9", "a", 0.9, 5),  # 1 below vanilla t=0.9 (4 below fixed): not listed
            row("b t=0.9", "b", 0.9, 2),  # 4 below vanilla t=0.9
            {"setting": "broken", "policy": "broken", "kwargs": {}, "threshold": None, "error": "x"},
        ],
    }
    assert losses(report) == {"sort": [("b t=0.9", 0.2, 0.6), ("a", 0.7, 1.0)]}
    text = format_losses([report])
    assert text == "* `ck` sort (vanilla: fixed 1.000, t=0.9 0.600): b t=0.9 -0.400 (0.200); a -0.300 (0.700)"


def test_eval_skips_tasks_the_checkpoint_does_not_solve(tmp_path):
    from bench.eval import solved_tasks

    accuracy = {"sort": {"accuracy": 0.1}, "count": {"accuracy": 0.8}}
    (tmp_path / "training.json").write_text(json.dumps({"final_vanilla_accuracy": accuracy}))
    assert solved_tasks(tmp_path, ["sort", "count", "chain"]) == (["count", "chain"], {"sort": 0.1})
    assert solved_tasks(tmp_path / "nowhere", ["sort"]) == (["sort"], {})  # nothing documented: keep


def test_block_rows_mask_a_clean_prefix_one_block_and_the_whole_suffix():
    """--block-rows: the first rows hold the state semi-AR decoding sees (clean prefix, one partly masked
    block, masked suffix) and only that block's masked tokens are scored, weighted by 1/(p * block)."""
    from bench.train_tiny_dlm import llada_sft_loss

    vocab, mask_id, block, gen = 10, 1, 4, 16
    seen = {}

    class Uniform(torch.nn.Module):
        def forward(self, ids):
            seen["ids"] = ids.clone()
            return torch.zeros(*ids.shape, vocab)

    rows = 4000
    answers = torch.randint(2, vocab, (rows, gen))
    prompts = torch.randint(2, vocab, (rows, 3))
    loss = llada_sft_loss(Uniform(), prompts, answers, mask_id, torch.Generator().manual_seed(0),
                          block_length=block, block_rows=0.5)  # fmt: skip
    masked = seen["ids"][:, 3:] == mask_id  # (rows, gen)
    for row in masked[: rows // 2 : 97]:  # block rows: clean prefix, a partly masked block, masked after
        first = int(row.nonzero()[0]) if row.any() else gen
        b = first // block
        assert not row[: b * block].any() and row[(b + 1) * block :].all()
    iid = masked[rows // 2 :]
    holes = (iid[:, :-1] & ~iid[:, 1:]).sum(dim=1)  # a masked token followed by a clean one
    assert (holes >= 2).float().mean() > 0.3  # the other rows keep LLaDA's iid masks
    # suffix masks are not scored: the expected loss is still log(V) per scored token
    assert abs(float(loss) - torch.log(torch.tensor(float(vocab)))) < 0.1
    with pytest.raises(ValueError, match="block_length"):
        llada_sft_loss(Uniform(), prompts[:8], answers[:8, :6], mask_id, block_length=4, block_rows=0.5)


def test_eval_render_rewrites_the_doc_from_a_saved_run(tmp_path, monkeypatch):
    """``--render JSON`` rebuilds docs/quality.md and the plot from a saved run without decoding."""
    from bench import eval as quality

    saved = tmp_path / "run.json"
    previous = torch.get_num_threads()
    try:
        args = ["--checkpoint", str(CHECKPOINT), "--count", "add=2", "--count", "copy=1"]
        assert quality.main([*args, "--json", str(saved), "--no-doc"]) == 0
    finally:
        torch.set_num_threads(previous)
    monkeypatch.setattr(quality, "DOC", tmp_path / "quality.md")
    monkeypatch.setattr(quality, "PLOT", tmp_path / "plot.png")
    monkeypatch.setattr(quality, "ROOT", tmp_path)
    monkeypatch.setattr(quality, "evaluate", None)  # rendering must not decode
    assert quality.main(["--render", str(saved)]) == 0
    doc = (tmp_path / "quality.md").read_text()
    run = json.loads(saved.read_text())
    assert f"commit `{run['commit']}`" in doc and "| vanilla | add | " in doc
    assert (tmp_path / "plot.png").stat().st_size > 0
