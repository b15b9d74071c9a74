"""Compile every Triton kernel of the package for real GPUs (sm_90a, sm_80) on a CPU-only machine.

``python -m spacache_kernels.compile_check`` drives the real launchers of
:mod:`spacache_kernels.kernels` at the specializations a generation produces (LLaDA-8B and Dream-7B
shapes, batch 1 and 16, bf16, plus fp16 / fp32) through a driver stand-in whose target is the GPU and
whose launches only compile (:mod:`._driver`), for every config each autotuner keeps. It fails on a
compile error, shared memory over the per-block limit, a register spill, or a 16-bit GEMM without
wgmma on sm_90a that the kernel's docstring does not explain (:mod:`.resources`), and writes the
resource report ``docs/kernels.md`` (:mod:`.report`). Needs ``TRITON_INTERPRET`` unset; the test
``tests/test_compile_check.py`` runs it in a subprocess.
"""
