"""``make gpu-check``: one prepared run on a single H100/H200 that settles what needs GPU numbers.

Runs on the GPU image as it is (system ``python3`` with torch / triton / pytest / pytest-benchmark,
no network, no install step) from the repository root with ``PYTHONPATH=.``, in under 8 minutes:

1. ``tests``: the ``gpu``-marked tests (real shapes, bf16): ``pytest -m gpu tests``.
2. ``kernels``: the kernel microbenchmarks (``python -m bench --skip-e2e``: Triton vs torch at
   LLaDA-8B / Dream-7B shapes, with % of this device's measured copy and GEMM peaks).
3. ``e2e``: end-to-end step time at the LLaDA-8B shape (random weights) for ``vanilla``, ``spa``,
   ``dllm_cache`` and ``fast_dllm_dual`` at batch 1 and 16 through :mod:`bench.e2e` (its FLOPs,
   weight-read floor and Triton-vs-torch token agreement at batch 1), shortened to
   ``--gen-length`` tokens so that the whole check fits its budget.
4. ``autotune``: the config each autotuned kernel chose for every key the e2e runs produced.

Every stage has a time limit (``--<stage>-limit``; the e2e stage passes a sixth of its limit to
each ``generate()`` call as bench.e2e's ``--run-timeout``); a stage that fails or times out is
reported and the next one still runs. The JSON (``bench/results/gpu-check-<stamp>.json``) holds
everything; a short table is printed last. ``--dry-run`` prints the plan without touching a GPU
(the CPU tests use it).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"

STAGES = ("tests", "kernels", "e2e", "autotune")
E2E_SHAPE = "llada-8b"
E2E_POLICIES = ("vanilla", "spa", "dllm_cache", "fast_dllm_dual")
E2E_BATCHES = (1, 16)
E2E_SETTING = "spa-gsm8k"
# Seconds per stage: 8 minutes in all on an H100 with room for model creation and Triton compiles.
DEFAULT_LIMITS = {"tests": 90, "kernels": 180, "e2e": 150}
AUTOTUNED_MODULES = ("gather_linear", "attention", "proxy_select", "confidence", "scatter")


@dataclasses.dataclass
class Plan:
    stages: list[str]
    limits: dict[str, int]
    kernels_k: str | None
    gen_length: int
    prompt_len: int
    stamp: str
    out_json: pathlib.Path
    dry_run: bool = False

    def commands(self) -> dict[str, list[str]]:
        """The subprocess command of each subprocess stage (tests, kernels)."""
        py = sys.executable
        kernels_json = self.out_json.with_name(self.out_json.stem + "-kernels.json")
        kernels = [py, "-m", "bench", "--skip-e2e", "--json", str(kernels_json)]
        if self.kernels_k:
            kernels += ["-k", self.kernels_k]
        return {
            "tests": [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
            "kernels": kernels,
        }

    def e2e_args(self) -> list[str]:
        """The ``python -m bench`` e2e options this check runs in-process (bench.e2e parses them)."""
        return [
            "--model-shape", E2E_SHAPE, "--policies", ",".join(E2E_POLICIES),
            "--batch", ",".join(map(str, E2E_BATCHES)), "--settings", E2E_SETTING, "--ratios", "none",
            "--gen-length", str(self.gen_length), "--steps", str(self.gen_length),
            "--prompt-len", str(self.prompt_len), "--run-timeout", str(self.limits["e2e"] // 6), "--no-docs",
        ]  # fmt: skip


def parse_args(argv: list[str] | None = None) -> Plan:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {STAGES}")
    parser.add_argument("--kernels-k", default=None, help="pytest -k expression for the microbenchmarks")
    parser.add_argument("--gen-length", type=int, default=128, help="e2e generated tokens (steps = this)")
    parser.add_argument("--prompt-len", type=int, default=128, help="e2e prompt tokens")
    for stage, limit in DEFAULT_LIMITS.items():
        parser.add_argument(f"--{stage}-limit", type=int, default=limit, help=f"seconds for {stage}")
    parser.add_argument("--json", default=None, help="output JSON (default bench/results/gpu-check-*.json)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        parser.error(f"--stages: expected a comma list of {STAGES}, got {args.stages!r}")
    if "autotune" in stages and "e2e" not in stages:
        parser.error("--stages: 'autotune' reports what the e2e runs tuned; it needs 'e2e'")
    limits = {stage: getattr(args, f"{stage}_limit") for stage in DEFAULT_LIMITS}
    for name, value in [*limits.items(), ("gen-length", args.gen_length), ("prompt-len", args.prompt_len)]:
        if value < 1:
            parser.error(f"--{name}: expected a positive integer, got {value}")
    if args.gen_length % 8:
        parser.error(
            f"--gen-length: expected a multiple of the setting's block length 8, got {args.gen_length}"
        )
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = pathlib.Path(args.json) if args.json else RESULTS / f"gpu-check-{stamp}.json"
    return Plan(stages, limits, args.kernels_k, args.gen_length, args.prompt_len, stamp, out, args.dry_run)


# ----------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------
def _run_subprocess(cmd: list[str], limit: int) -> dict[str, Any]:
    start = time.perf_counter()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, timeout=limit, capture_output=True, text=True)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-4000:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return {"status": "timeout", "seconds": limit, "output_tail": tail}
    print(proc.stdout[-6000:], proc.stderr[-3000:], sep="\n", flush=True)
    return {
        "status": "ok" if proc.returncode == 0 else f"exit {proc.returncode}",
        "seconds": round(time.perf_counter() - start, 1),
        "output_tail": (proc.stdout + proc.stderr)[-4000:],
    }


def run_tests(plan: Plan) -> dict[str, Any]:
    result = _run_subprocess(plan.commands()["tests"], plan.limits["tests"])
    last = [line for line in result["output_tail"].splitlines() if " passed" in line or " failed" in line]
    result["summary"] = last[-1].strip() if last else ""
    return result


def run_kernels(plan: Plan) -> dict[str, Any]:
    cmd = plan.commands()["kernels"]
    result = _run_subprocess(cmd, plan.limits["kernels"])
    path = pathlib.Path(cmd[cmd.index("--json") + 1])
    rows = []
    if path.exists():
        rows = [b["extra_info"] for b in json.loads(path.read_text())["benchmarks"] if b.get("extra_info")]
    result["rows"] = rows
    return result


def run_e2e(plan: Plan) -> dict[str, Any]:
    from bench import e2e

    parser = argparse.ArgumentParser()
    e2e.add_arguments(parser)
    cfg = e2e.config_from_args(parser.parse_args(plan.e2e_args()))
    cfg.progress = False
    start = time.perf_counter()
    try:
        result = e2e.run_matrix(cfg)
    except Exception as exc:  # a crash here is a finding; the autotune stage still reports
        return {
            "status": f"error: {type(exc).__name__}: {exc}",
            "seconds": round(time.perf_counter() - start, 1),
        }
    return {"status": "ok", "seconds": round(time.perf_counter() - start, 1), **result}


def autotune_choices() -> list[dict[str, Any]]:
    """Every autotuned kernel's chosen config per tuning key, as the e2e runs left them."""
    import importlib

    from triton.runtime.autotuner import Autotuner

    rows = []
    for name in AUTOTUNED_MODULES:
        module = importlib.import_module(f"spacache_kernels.kernels.{name}")
        for attr, obj in sorted(vars(module).items()):
            if not isinstance(obj, Autotuner):
                continue
            for key, config in obj.cache.items():
                rows.append(
                    {
                        "kernel": attr,
                        "key": [str(k) for k in key],
                        "config": {
                            **config.kwargs,
                            "num_warps": config.num_warps,
                            "num_stages": config.num_stages,
                        },
                        "config_index": obj.configs.index(config) if config in obj.configs else None,
                    }
                )
    return rows


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [header] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def summary_table(report: dict[str, Any]) -> str:
    """The short table printed last: stage status, kernel % of peak, e2e step time vs floor, tuning."""
    stages = report["stages"]
    out = [f"gpu-check | {report['device']} | commit {report['commit']} | {report['date']}"]
    out += _table(
        ["stage", "status", "seconds", "note"],
        [[name, s.get("status"), s.get("seconds"), s.get("summary", "")] for name, s in stages.items()],
    )
    kernels = stages.get("kernels", {}).get("rows", [])
    if kernels:
        out += ["", "kernels (median us, % of measured peak):"]
        out += _table(
            ["op", "backend", "shape", "us", "%peak"],
            [
                [r.get("op"), r.get("backend"), r.get("shape"), r.get("median_us"), r.get("pct_peak")]
                for r in kernels
            ],
        )
    e2e_rows = stages.get("e2e", {}).get("rows", [])
    if e2e_rows:
        out += [
            "",
            f"e2e {E2E_SHAPE} (step ms mean, weight-read / FLOP floor ms, triton-vs-torch agreement):",
        ]
        out += _table(
            ["policy", "B", "step_ms", "floor_ms", "%floor", "tok/s", "speedup", "agree", "error"],
            [
                [
                    r.get("policy"), r.get("batch"), r.get("step_ms_mean"), r.get("floor_ms"),
                    r.get("pct_of_floor"), r.get("tokens_per_s"), r.get("speedup"),
                    r.get("backend_agreement"), r.get("error"),
                ]
                for r in e2e_rows
            ],
        )  # fmt: skip
    tuned = stages.get("autotune", {}).get("rows", [])
    if tuned:
        out += ["", "autotuner choices:"]
        out += _table(
            ["kernel", "key", "config"],
            [[r["kernel"], ",".join(r["key"]), json.dumps(r["config"], sort_keys=True)] for r in tuned],
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    plan = parse_args(argv)
    if plan.dry_run:
        print(f"gpu-check plan: stages {','.join(plan.stages)}; limits {plan.limits}; JSON {plan.out_json}")
        for stage, cmd in plan.commands().items():
            if stage in plan.stages:
                print(f"  {stage}: {' '.join(cmd)}")
        if "e2e" in plan.stages:
            print(f"  e2e (in-process bench.e2e): {' '.join(plan.e2e_args())}")
        return 0

    import torch

    from bench.harness import git_commit

    if not torch.cuda.is_available():
        print("gpu-check needs a CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "commit": git_commit(),
        "date": _dt.date.today().isoformat(),
        "versions": {"torch": torch.__version__, "triton": __import__("triton").__version__},
        "command": "make gpu-check",
        "stages": {},
    }
    runners = {"tests": run_tests, "kernels": run_kernels, "e2e": run_e2e}
    for stage in plan.stages:
        print(f"== gpu-check: {stage}", flush=True)
        if stage == "autotune":
            report["stages"][stage] = {"status": "ok", "seconds": 0.0, "rows": autotune_choices()}
        else:
            report["stages"][stage] = runners[stage](plan)
    plan.out_json.parent.mkdir(parents=True, exist_ok=True)
    plan.out_json.write_text(json.dumps(report, indent=1, default=str))
    print()
    print(summary_table(report))
    print(f"\nJSON: {plan.out_json}")
    return 0 if all(s.get("status") == "ok" for s in report["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
