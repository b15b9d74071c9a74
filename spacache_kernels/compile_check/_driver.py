"""Compile-only launches: a Triton driver stand-in for a GPU target, and launch interception.

Inside :func:`compile_only`, every ``kernel[grid](...)`` that a launcher of
:mod:`spacache_kernels.kernels` makes is compiled for the stand-in's target (the whole pipeline down
to a cubin through the ptxas of the Triton wheel, no CUDA driver needed) and not launched. An
autotuned kernel compiles every config its autotuner would try (after its own pruning, if any) and
benchmarks none. Each compilation is recorded as a :class:`Launch` with the grid the launch would
have used and ptxas' resource log.

Only public-ish Triton entry points are touched: ``triton.runtime.driver.driver.set_active``,
``JITFunction.run(*args, grid, warmup, **kwargs)`` (with ``warmup=True``: compile, return the
kernel, do not launch) and ``Autotuner.run``; both triton 3.6 and 3.9 have them.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Any

from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime.autotuner import Autotuner
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction


class CompileOnlyDriver:
    """The few driver calls a compile-only launch makes, answered for a fixed GPU target."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_benchmarker(self):
        raise RuntimeError("compile-only driver: nothing is launched, so nothing can be benchmarked")


@dataclass
class Launch:
    """One intercepted launch: the kernel compiled for it, its grid, its config, ptxas' log."""

    kernel_name: str
    jit: Any  # the JITFunction
    compiled: Any  # triton.compiler.CompiledKernel
    grid: tuple[int, int, int]
    config: dict[str, Any]  # the autotune config (or the launcher's BLOCK_* choice), warps, stages
    constexprs: dict[str, Any]  # every constexpr argument of the launch
    config_index: int | None  # position in the autotune list (None: not autotuned)
    ptxas_log: str  # empty when the kernel came from the in-process cache


@dataclass
class Recorder:
    launches: list[Launch] = field(default_factory=list)
    autotune_index: int | None = None  # set while an autotuner compiles its config list
    autotune_config: dict[str, Any] | None = None


def _grid3(grid, meta: dict[str, Any]) -> tuple[int, int, int]:
    dims = tuple(int(g) for g in (grid(meta) if callable(grid) else grid))
    return (*dims, *(1,) * (3 - len(dims)))  # type: ignore[return-value]


def _variant_key(jit, args, kwargs) -> tuple:
    """What decides the generated code apart from integer divisibility and pointer alignment."""
    dtypes = tuple(str(a.dtype) if hasattr(a, "dtype") else type(a).__name__ for a in args)
    return (
        jit.fn.__qualname__,
        jit.fn.__module__,
        dtypes,
        tuple(sorted((k, repr(v)) for k, v in kwargs.items())),
    )


@contextlib.contextmanager
def compile_only(target: GPUTarget, *, dedup: bool = False):
    """Context: launches compile for ``target`` instead of running; yields the :class:`Recorder`.

    ``dedup``: compile each kernel variant (argument dtypes, constexprs, config) once and reuse it for
    launches that differ only in how Triton specializes integers (divisibility by 16) and pointers
    (16-byte alignment). Those hints change addressing code, not tile shapes or register and shared
    memory budgets; the fast CI tier uses this, ``--full`` compiles every specialization.
    """
    recorder = Recorder()
    variants: dict[tuple, tuple[Any, str]] = {}
    real_jit_run = JITFunction.run
    real_autotune_run = Autotuner.run
    real_dump = knobs.nvidia.dump_ptxas_log

    def jit_run(self, *args, grid, warmup, **kwargs):
        key = _variant_key(self, args, kwargs) if dedup else None
        if key in variants:
            compiled, text = variants[key]
        else:
            log = io.StringIO()
            # ptxas' -v log (registers, spills) is printed only while dump_ptxas_log is set.
            with contextlib.redirect_stdout(log):
                compiled = real_jit_run(self, *args, grid=grid, warmup=True, **kwargs)
            text = log.getvalue()
            if dedup:
                variants[key] = (compiled, text)
        meta = dict(zip(self.arg_names, args))
        meta.update(kwargs)
        constexprs = {k: v for k, v in kwargs.items() if k in self.arg_names and k.isupper()}
        if recorder.autotune_config is not None:
            config = dict(recorder.autotune_config)
        else:  # a plain launch: the launcher's tile constexprs are its config
            config = {k: v for k, v in constexprs.items() if k.startswith("BLOCK")}
        config.setdefault("num_warps", compiled.metadata.num_warps)
        config.setdefault("num_stages", compiled.metadata.num_stages)
        recorder.launches.append(
            Launch(
                kernel_name=self.fn.__name__,
                jit=self,
                compiled=compiled,
                grid=_grid3(grid, meta),
                config=config,
                constexprs=constexprs,
                config_index=recorder.autotune_index,
                ptxas_log=text,
            )
        )
        return compiled

    def autotune_run(self, *args, **kwargs):
        kwargs.pop("warmup", None)
        self.nargs = dict(zip(self.arg_names, args))
        kept = self.prune_configs(kwargs)
        compiled = None
        try:
            for config in kept:
                # None: a config the pruning function added (the fp32 path's own list).
                recorder.autotune_index = self.configs.index(config) if config in self.configs else None
                recorder.autotune_config = {
                    **config.kwargs,
                    "num_warps": config.num_warps,
                    "num_stages": config.num_stages,
                }
                compiled = self.fn.run(*args, warmup=False, **kwargs, **config.all_kwargs())
        finally:
            recorder.autotune_index = recorder.autotune_config = None
            self.nargs = None
        return compiled

    previous = driver._active  # reset_active() would create the real driver, which needs a GPU
    driver.set_active(CompileOnlyDriver(target))
    JITFunction.run = jit_run
    Autotuner.run = autotune_run
    knobs.nvidia.dump_ptxas_log = True
    try:
        yield recorder
    finally:
        knobs.nvidia.dump_ptxas_log = real_dump
        Autotuner.run = real_autotune_run
        JITFunction.run = real_jit_run
        driver._active = previous
