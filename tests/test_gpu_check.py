"""``make gpu-check`` (bench/gpu_check.py) on the CPU: its plan, argument checks and final table.

The check itself needs a CUDA device; here only what does not: ``--dry-run`` prints the plan,
bad options are refused with the option named, and the summary table renders a hand-built report.
"""

from __future__ import annotations

import pytest

from bench import gpu_check


def test_dry_run_prints_the_plan(capsys):
    assert gpu_check.main(["--dry-run", "--gen-length", "64", "--kernels-k", "proxy"]) == 0
    out = capsys.readouterr().out
    assert "-m pytest -q -m gpu" in out
    assert "-m bench --skip-e2e" in out and "-k proxy" in out
    assert "--model-shape llada-8b --policies vanilla,spa,dllm_cache,fast_dllm_dual --batch 1,16" in out
    assert "--gen-length 64 --steps 64" in out


def test_e2e_args_parse_as_bench_options():
    import argparse

    from bench import e2e

    plan = gpu_check.parse_args(["--gen-length", "96", "--prompt-len", "64"])
    parser = argparse.ArgumentParser()
    e2e.add_arguments(parser)
    cfg = e2e.config_from_args(parser.parse_args(plan.e2e_args()))
    assert cfg.shapes == ["llada-8b"] and cfg.batches == [1, 16] and cfg.ratios == []
    assert cfg.policies == ["vanilla", "spa", "dllm_cache", "fast_dllm_dual"]
    assert cfg.setting("spa-gsm8k").gen_length == 96 and cfg.prompt_len == 64


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--stages", "tests,bogus"], "--stages"),
        (["--stages", "autotune"], "needs 'e2e'"),
        (["--gen-length", "100"], "--gen-length"),
        (["--tests-limit", "0"], "--tests-limit"),
    ],
)
def test_bad_options_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(argv)
    assert message in capsys.readouterr().err


def test_summary_table_renders_every_section():
    report = {
        "device": "NVIDIA H200", "commit": "abc1234", "date": "2026-12-03",
        "stages": {
            "tests": {"status": "ok", "seconds": 41.0, "summary": "12 passed"},
            "kernels": {"status": "ok", "seconds": 120.0, "rows": [
                {"op": "proxy_select", "backend": "triton", "shape": "B1 L256", "median_us": 12.5,
                 "pct_peak": 71.25},
            ]},
            "e2e": {"status": "ok", "seconds": 90.0, "rows": [
                {"policy": "spa", "batch": 16, "step_ms_mean": 48.0, "floor_ms": 21.5, "pct_of_floor": 44.8,
                 "tokens_per_s": 333.0, "speedup": 2.5, "backend_agreement": 0.98},
            ]},
            "autotune": {"status": "ok", "seconds": 0.0, "rows": [
                {"kernel": "_gather_linear_kernel", "key": ["64", "4096"], "config": {"BLOCK_M": 64}},
            ]},
        },
    }  # fmt: skip
    text = gpu_check.summary_table(report)
    lines = text.splitlines()
    assert lines[0] == "gpu-check | NVIDIA H200 | commit abc1234 | 2026-12-03"
    assert any(line.split()[:3] == ["tests", "ok", "41.0"] for line in lines)
    assert any(line.split()[:5] == ["proxy_select", "triton", "B1", "L256", "12.5"] for line in lines)
    spa = next(line for line in lines if line.startswith("spa"))
    assert spa.split()[:9] == ["spa", "16", "48.0", "21.5", "44.8", "333.0", "2.5", "0.98", "-"]
    assert any("_gather_linear_kernel" in line and '"BLOCK_M": 64' in line for line in lines)


def test_without_cuda_it_refuses_to_run(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: main() would run the whole check")
    assert gpu_check.main(["--stages", "tests"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
