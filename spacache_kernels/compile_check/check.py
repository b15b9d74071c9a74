"""Run the cases for one GPU target (a worker process) or for several in parallel (the driver).

A worker compiles for exactly one target: Triton keeps one binder (target, backend) per device per
kernel, so one process cannot compile the same kernel for two targets. Each worker gets its own empty
``TRITON_CACHE_DIR`` (the run's compile cache: identical specializations compile once, and every
compile goes through ptxas, whose log gives registers and spills) and must run with
``TRITON_INTERPRET`` unset, since interpreted kernels cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

ARCHS = (90, 80)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def run_worker(arch: int, case_filter: str | None = None, full: bool = False) -> dict[str, Any]:
    """Compile every case for ``sm_{arch}`` in this process; rows of results and errors.

    ``full``: every specialization and fp16 too (see :func:`.cases.all_cases`, :func:`._driver.compile_only`).
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set: interpreted kernels cannot be compiled; unset it")
    import triton
    from triton.backends.compiler import GPUTarget

    from spacache_kernels.compile_check import resources as rs
    from spacache_kernels.compile_check._driver import compile_only
    from spacache_kernels.compile_check.cases import all_cases

    rows: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    seen: dict[int, rs.Resources] = {}
    start = time.perf_counter()
    with compile_only(GPUTarget("cuda", arch, 32), dedup=not full) as recorder:
        for case in all_cases(full):
            if case_filter and case_filter not in case.label:
                continue
            first = len(recorder.launches)
            try:
                case.run()
            except Exception as exc:  # a compile error is a finding, not a crash of the check
                errors.append({"case": case.label, "arch": arch, "error": f"{type(exc).__name__}: {exc}"})
                continue
            for launch in recorder.launches[first:]:
                key = id(launch.compiled)
                if key not in seen:
                    seen[key] = rs.resources_of(launch.compiled, launch.ptxas_log)
                res = seen[key]
                native = case.dtype in ("bf16", "fp16") and not launch.constexprs.get("UPCAST", False)
                reason = rs.wgmma_reason(launch.jit.fn.__doc__)
                rows.append(
                    {
                        "case": case.name,
                        "label": case.label,
                        "shape": case.shape,
                        "batch": case.batch,
                        "dtype": case.dtype,
                        "arch": arch,
                        "kernel": launch.kernel_name,
                        "config_index": launch.config_index,
                        "config": {k: _jsonable(v) for k, v in launch.config.items()},
                        "constexprs": {k: _jsonable(v) for k, v in launch.constexprs.items()},
                        "grid": list(launch.grid),
                        "registers": res.registers,
                        "stack_bytes": res.stack_bytes,
                        "spill_store_bytes": res.spill_store_bytes,
                        "spill_load_bytes": res.spill_load_bytes,
                        "shared_bytes": res.shared_bytes,
                        "tensor_core": res.tensor_core,
                        "has_dot": res.has_dot,
                        "native_16bit": native,
                        "wgmma_reason": reason,
                        "problems": rs.problems(res, arch, native, reason),
                    }
                )
    return {
        "arch": arch,
        "triton": triton.__version__,
        "full": full,
        "compiles": len(seen),
        "seconds": round(time.perf_counter() - start, 1),
        "rows": rows,
        "errors": errors,
    }


def run_parallel(
    archs=ARCHS, case_filter: str | None = None, jobs: int = 2, full: bool = False
) -> dict[str, Any]:
    """One worker subprocess per arch (``jobs`` at a time); their merged results."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated (silences its warning)
    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="spacache-compile-check-") as tmp:
        pending = list(archs)
        running: list[tuple[int, subprocess.Popen, str]] = []
        while pending or running:
            while pending and len(running) < max(1, jobs):
                arch = pending.pop(0)
                out = os.path.join(tmp, f"sm{arch}.json")
                cmd = [
                    sys.executable,
                    "-m",
                    "spacache_kernels.compile_check",
                    "--worker",
                    str(arch),
                    "--out",
                    out,
                ]
                if case_filter:
                    cmd += ["-k", case_filter]
                if full:
                    cmd.append("--full")
                worker_env = {**env, "TRITON_CACHE_DIR": os.path.join(tmp, f"cache-sm{arch}")}
                running.append((arch, subprocess.Popen(cmd, env=worker_env), out))
            arch, proc, out = running.pop(0)
            if proc.wait() != 0 or not os.path.exists(out):
                raise RuntimeError(f"compile-check worker for sm_{arch} failed (exit code {proc.returncode})")
            with open(out) as fh:
                results.append(json.load(fh))
    return {
        "triton": results[0]["triton"] if results else None,
        "full": full,
        "seconds": round(time.perf_counter() - start, 1),
        "workers": [{k: r[k] for k in ("arch", "compiles", "seconds")} for r in results],
        "rows": [row for r in results for row in r["rows"]],
        "errors": [err for r in results for err in r["errors"]],
    }
