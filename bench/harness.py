"""Timing, roofline and reporting helpers shared by every microbenchmark.

GPU: medians from ``triton.testing.do_bench`` (CUDA events, cache flush between reps); the device's
peaks are *measured* once per run (a large device-to-device copy for bandwidth, a large bf16 GEMM
for compute) so "% of peak" is relative to what this machine really does. CPU: medians from
``time.perf_counter`` over repeated calls, peaks measured the same way in fp32.
Each benchmark records its figures in pytest-benchmark's ``extra_info``; ``python -m bench``
prints them as one table and saves the JSON under ``bench/results/``.
"""

from __future__ import annotations

import functools
import pathlib
import statistics
import subprocess
import time
from collections.abc import Callable

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# bf16 is what the models run in on a GPU; the CPU path measures the fp32 torch reference.
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
BACKENDS = ("triton", "torch") if ON_GPU else ("torch",)


def git_commit() -> str:
    """The repository's short HEAD commit, or "unknown" outside a git checkout (recorded in results)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=pathlib.Path(__file__).resolve().parent,
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name() -> str:
    if ON_GPU:
        return torch.cuda.get_device_name()
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def median_seconds(fn: Callable[[], object], *, reps: int | None = None) -> float:
    """Median wall time of one call of ``fn`` in seconds."""
    if ON_GPU:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    fn()  # warm-up
    times = []
    budget = 0.5  # seconds of measurement per case on the 2-core CPU machine
    start = time.perf_counter()
    while len(times) < (reps or 200) and (time.perf_counter() - start < budget or len(times) < 3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@functools.lru_cache(maxsize=1)
def measured_peaks() -> dict:
    """Copy bandwidth (bytes/s, read + write counted) and dense GEMM throughput (FLOP/s) of this device."""
    n_bytes = (1 << 30) if ON_GPU else (1 << 26)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    copy_s = median_seconds(lambda: dst.copy_(src))
    m = 8192 if ON_GPU else 1024
    a = torch.randn(m, m, device=DEVICE, dtype=DTYPE)
    b = torch.randn(m, m, device=DEVICE, dtype=DTYPE)
    gemm_s = median_seconds(lambda: a @ b)
    return {"bandwidth": 2 * n_bytes / copy_s, "flops": 2 * m**3 / gemm_s, "gemm_dtype": str(DTYPE)}


def record(
    benchmark,
    fn: Callable[[], object],
    *,
    op: str,
    backend: str,
    shape: str,
    bytes_moved: float | None = None,
    flops: float | None = None,
    baseline: str | None = None,
) -> float:
    """Time ``fn`` and store its roofline figures in ``benchmark.extra_info``; returns the median (s).

    ``bytes_moved``: the minimum DRAM traffic the op needs (each input read once, each output
    written once). ``flops``: its arithmetic. The figure of merit is whichever roof is closer.
    ``baseline``: a label saying what this row should be compared with (e.g. "cuBLAS dense GEMM").
    """
    seconds = median_seconds(fn)
    peaks = measured_peaks()
    info = {"op": op, "backend": backend, "shape": shape, "median_us": seconds * 1e6}
    pct = []
    if bytes_moved:
        info["GB/s"] = bytes_moved / seconds / 1e9
        pct.append(100 * bytes_moved / seconds / peaks["bandwidth"])
    if flops:
        info["TFLOP/s"] = flops / seconds / 1e12
        pct.append(100 * flops / seconds / peaks["flops"])
    if pct:
        info["pct_peak"] = max(pct)
    if baseline:
        info["baseline"] = baseline
    benchmark.extra_info.update(info)
    # pytest-benchmark's own statistics: a few rounds of the same call (cheap, already warm).
    benchmark.pedantic(fn, rounds=3 if ON_GPU else 1, iterations=1, warmup_rounds=0)
    return seconds
