"""Smoke test of the end-to-end policy harness (bench/e2e.py) at a tiny shape and a few steps."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from bench import e2e
from spacache_kernels.policies import POLICIES
from spacache_kernels.policies.base import CachePolicy

TINY = dict(
    shapes=["llada-tiny"], policies=["spa", "vanilla"], settings=["spa-gsm8k", "fast-dllm"], batches=[1],
    ratios=[0.5], prompt_len=8, gen_length=32, steps=8, compare_backends=False, warmup=False,
    threads=1, progress=False,
)  # fmt: skip


class _Broken(CachePolicy):
    name = "broken"

    def plan(self, step):
        raise RuntimeError(f"boom at step {step}")


@pytest.fixture(scope="module")
def result():
    return e2e.run_matrix(e2e.E2EConfig(**TINY))


def test_rows_and_ratios(result):
    rows = result["rows"]
    # vanilla first (the baseline), then spa, then the spa sweep point, per setting.
    assert [(r["setting"], r["policy"], r["sweep"]) for r in rows] == [
        ("spa-gsm8k", "vanilla", False), ("spa-gsm8k", "spa", False), ("spa-gsm8k", "spa", True),
        ("fast-dllm", "vanilla", False), ("fast-dllm", "spa", False), ("fast-dllm", "spa", True),
    ]  # fmt: skip
    for r in rows:
        assert "error" not in r, r.get("error")
        for key in ("step_ms_median", "step_ms_mean", "tokens_per_s", "gflop_per_step", "speedup",
                    "flops_ratio", "rows_ratio", "floor_ms", "pct_of_floor", "work_mem_mb"):  # fmt: skip
            assert key in r, key
        assert r["steps"] > 0 and r["tokens_per_s"] > 0 and r["floor_ms"] > 0
        assert r["generated_tokens"] == 32
        if r["policy"] == "vanilla":
            assert r["flops_ratio"] == 1.0 and r["speedup"] == 1.0 and r["rows_ratio"] == 1.0
        else:
            assert 0 < r["flops_ratio"] < 1 and 0 < r["rows_ratio"] < 1
    spa = {(r["setting"], r["variant"]): r for r in rows if r["policy"] == "spa"}
    # A larger update budget recomputes more rows.
    fixed = [k for k in spa if k[0] == "spa-gsm8k"]
    assert len(fixed) == 2
    lo, hi = sorted(fixed, key=lambda k: float(k[1].split("=")[1]))
    assert spa[lo]["rows_ratio"] < spa[hi]["rows_ratio"]
    assert result["meta"]["device_type"] == "cpu" and result["meta"]["backend"] == "torch"
    assert result["meta"]["settings"]["spa-gsm8k"]["gen_length"] == 32


def test_table_json_and_docs(result, tmp_path, capsys):
    text = e2e.format_text(result)
    header = text.splitlines()[0]
    for column in ("policy", "step ms (median)", "tok/s", "GFLOP/step", "speedup", "FLOPs ratio",
                   "triton=torch", "floor ms", "work mem MB", "cuda_graph tok/s"):  # fmt: skip
        assert column in header
    assert "n/a (GPU only)" in text
    assert "CPU-only machine" in e2e.header_text(result)

    docs = tmp_path / "benchmarks.md"
    begin, end = e2e.markers("cpu")
    docs.write_text(f"# Benchmarks\n\nhand-written intro\n\n{begin}\nOLD TABLE\n{end}\n\nhand-written tail\n")
    image = e2e.speed_plot(result, tmp_path / "img" / "plot.png")
    assert image is not None and image.stat().st_size > 1000
    section = e2e.docs_section(result, "python -m bench", image, docs)
    e2e.update_docs(docs, section, "cpu")
    e2e.update_docs(docs, section, "cpu")  # idempotent: replaced, never appended twice
    out = docs.read_text()
    assert out.count(begin) == 1 and out.count(end) == 1 and "OLD TABLE" not in out
    assert out.startswith("# Benchmarks\n\nhand-written intro\n") and out.rstrip().endswith(
        "hand-written tail"
    )
    inner = out[out.index(begin) : out.index(end)]
    assert "| vanilla |" in inner and "| spa |" in inner and "](img/plot.png)" in inner
    assert "commit" in inner and "python -m bench" in inner

    # A file without markers gets a new marked section at the end.
    bare = tmp_path / "bare.md"
    bare.write_text("# Only prose\n")
    e2e.update_docs(bare, "NEW", "gpu")
    assert bare.read_text() == "# Only prose\n\n<!-- e2e-gpu:begin -->\nNEW\n<!-- e2e-gpu:end -->\n"

    # run(): JSON on disk with the same rows, docs at the given path.
    args = argparse.Namespace(e2e_json=str(tmp_path / "e2e.json"), no_docs=False, docs=str(docs),
                              img_dir=str(tmp_path / "img"))  # fmt: skip
    cfg = e2e.E2EConfig(**{**TINY, "settings": ["spa-gsm8k"], "ratios": []})
    e2e.run(cfg, args, "python -m bench --test")
    saved = json.loads((tmp_path / "e2e.json").read_text())
    assert [r["policy"] for r in saved["rows"]] == ["vanilla", "spa"]
    assert saved["meta"]["command"] == "python -m bench --test"
    assert "python -m bench --test" in docs.read_text()
    assert "spa" in capsys.readouterr().out


def test_failing_policy_is_a_row_not_a_crash(monkeypatch):
    monkeypatch.setitem(POLICIES, "broken", _Broken)
    cfg = e2e.E2EConfig(**{**TINY, "policies": ["broken"], "settings": ["spa-gsm8k"], "ratios": []})
    rows = e2e.run_matrix(cfg)["rows"]
    assert [r["policy"] for r in rows] == ["vanilla", "broken"]
    assert "error" not in rows[0]
    assert rows[1]["error"] == "RuntimeError: boom at step 0"
    assert "speedup" not in rows[1]


def test_bad_options_are_clear():
    with pytest.raises(ValueError, match=r"policy: unknown 'nope'; expected one of \["):
        e2e.E2EConfig(policies=["spa", "nope"])
    with pytest.raises(ValueError, match=r"model shape: unknown 'llada-70b'"):
        e2e.E2EConfig(shapes=["llada-70b"])
    with pytest.raises(ValueError, match=r"setting: unknown"):
        e2e.E2EConfig(settings=["gsm9k"])
    with pytest.raises(ValueError, match="batch"):
        e2e.E2EConfig(batches=[0])
    with pytest.raises(ValueError, match="ratios"):
        e2e.E2EConfig(ratios=[1.5])
    with pytest.raises(ValueError, match="block length"):
        e2e.E2EConfig(gen_length=20)
    with pytest.raises(ValueError, match="repeats"):
        e2e.E2EConfig(repeats=0)
    with pytest.raises(ValueError, match="run_timeout"):
        e2e.E2EConfig(run_timeout=-1.0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--skip-kernels", "--policies", "spa,nope"], "policy: unknown 'nope'"),
        (["--skip-kernels", "--model-shape", "gpt5"], "model shape: unknown 'gpt5'"),
        (["--skip-kernels", "--batch", "one"], "comma-separated list of int"),
    ],
)
def test_command_line_errors(argv, message, capsys):
    from bench.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_step_guard_stops_a_run_that_never_ends():
    clock = e2e.StepClock(cuda=False, max_steps=2)
    clock(0), clock(1)
    with pytest.raises(e2e.RunAborted, match="no end after 2 steps"):
        clock(2)
    assert len(clock.step_seconds()) == 1
    timed = e2e.StepClock(cuda=False, timeout=1e-9)
    with pytest.raises(e2e.RunAborted, match="run-timeout"):
        timed(0)


def test_cuda_graph_column_says_where_the_eager_loop_stays():
    from spacache_kernels.models.synthetic import random_model

    cfg = e2e.E2EConfig(**{**TINY, "cuda_graph": True})
    fixed, threshold = cfg.setting("spa-gsm8k"), cfg.setting("fast-dllm")
    for setting, policy in [(threshold, "spa"), (fixed, "elastic"), (fixed, "d2cache")]:
        row = dict(sweep=False)
        e2e._cuda_graph_run(cfg, row, None, None, setting, policy, "torch", {})
        assert row == dict(sweep=False, cuda_graph_note="eager only")
    # On the CPU a run that would use graphs reports generate()'s error instead of crashing the table.
    model = random_model("llada-tiny")
    row = dict(sweep=False)
    ids = torch.randint(0, 100, (1, 8))
    e2e._cuda_graph_run(cfg, row, model, ids, fixed, "spa", "torch", {})
    assert row["cuda_graph_note"].startswith("error: ValueError: cuda_graph: CUDA graphs need a CUDA device")
    assert "n/a" in e2e._cell(dict(sweep=False), "cuda_graph_tokens_per_s", True)
    assert e2e._cell(dict(cuda_graph_tokens_per_s=123.4, cuda_graph_agreement=1.0), "cuda_graph_tokens_per_s",
                     False) == "123.4 (1.000 same)"  # fmt: skip
