"""``make bench`` / ``python -m bench``: kernel microbenchmarks, then end-to-end policy throughput.

On a CUDA machine every op runs through its Triton kernel and the torch reference (and the named
baselines) at LLaDA-8B / Dream-7B shapes, with % of this device's measured peak. On a CPU-only
machine the torch path runs at small shapes and the header says that the Triton kernels need a GPU.
The raw pytest-benchmark JSON (with every figure in ``extra_info``) is saved under ``bench/results/``.

Then the end-to-end policy throughput harness (``bench/e2e.py``) runs every registered caching policy
at random-weight model shapes in the SPA-Cache GSM8K and Fast-dLLM settings, prints its table, saves
``bench/results/e2e-<stamp>.json`` and regenerates its marked section of ``docs/benchmarks.md`` (with
a speed-vs-update-ratio plot under ``docs/img/``). Last, ``bench/step_profile.py`` reports host
microseconds and kernel launches per step for every policy (its section of ``docs/benchmarks.md``).
``--skip-kernels`` / ``--skip-e2e`` / ``--skip-steps`` leave a part out.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
COLUMNS = ("op", "backend", "shape", "median_us", "GB/s", "TFLOP/s", "pct_peak", "baseline")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"
    return "" if value is None else str(value)


def format_table(rows: list[dict]) -> str:
    """Rows of ``extra_info`` dicts -> an aligned plain-text table."""
    cells = [list(COLUMNS)] + [[_fmt(r.get(c)) for c in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def header() -> str:
    from bench import harness

    peaks = harness.measured_peaks()
    mode = (
        "GPU: Triton kernels vs the torch reference at model shapes"
        if harness.ON_GPU
        else "CPU-only machine: torch reference path at small shapes. "
        "The Triton kernels need a CUDA GPU; run `make bench` there for their figures."
    )
    return (
        f"spacache_kernels microbenchmarks | device: {harness.device_name()} | "
        f"commit {harness.git_commit()} | {_dt.date.today().isoformat()}\n{mode}\n"
        f"measured peaks: copy {peaks['bandwidth'] / 1e9:.1f} GB/s, "
        f"{peaks['gemm_dtype']} GEMM {peaks['flops'] / 1e12:.2f} TFLOP/s (pct_peak is relative to these)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="select", default=None, help="pytest -k expression to pick benchmarks")
    parser.add_argument("--json", default=None, help="kernel JSON (default bench/results/kernels-*.json)")
    parser.add_argument("--skip-kernels", action="store_true", help="skip the kernel microbenchmarks")
    parser.add_argument("--skip-e2e", action="store_true", help="skip the end-to-end policy harness")
    parser.add_argument("--skip-steps", action="store_true",
                        help="skip the per-step host time and launch counts")  # fmt: skip
    from bench import e2e

    e2e.add_arguments(parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    args, passthrough = parser.parse_known_args(argv)
    e2e_config = None
    if not args.skip_e2e:
        try:  # bad e2e options fail now, not after the kernel benchmarks
            e2e_config = e2e.config_from_args(args)
        except ValueError as exc:
            parser.error(str(exc))

    status = 0 if args.skip_kernels else run_kernels(args, passthrough)
    if e2e_config is not None:
        print(flush=True)
        e2e.run(e2e_config, args, e2e.command_line(argv))
    if not args.skip_steps:
        from bench import step_profile

        print(flush=True)
        step_profile.main([] if getattr(args, "no_docs", False) else ["--docs"])
    return status


def run_kernels(args: argparse.Namespace, passthrough: list[str]) -> int:
    """The pytest-benchmark microbenchmarks: header, table, JSON; returns pytest's exit status."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_json = pathlib.Path(args.json) if args.json else RESULTS / f"kernels-{stamp}.json"
    print(header(), flush=True)
    cmd = [
        sys.executable, "-m", "pytest", str(HERE), "-q", "-p", "no:cacheprovider",
        "--benchmark-only", f"--benchmark-json={out_json}", "--benchmark-disable-gc",
        "--benchmark-columns=median", *passthrough,
    ]  # fmt: skip
    if args.select:
        cmd += ["-k", args.select]
    status = subprocess.run(cmd, cwd=HERE.parent).returncode
    if not out_json.exists():
        print("no benchmark ran", file=sys.stderr)
        return status or 1
    rows = [b["extra_info"] for b in json.loads(out_json.read_text())["benchmarks"] if b.get("extra_info")]
    print()
    print(format_table(rows))
    print(f"\nJSON: {out_json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
