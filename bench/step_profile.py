"""Host time and kernel launches per denoising step, for every registered policy.

``python -m bench.step_profile`` (also the last part of ``make bench``): each policy decodes one
prompt batch on a random-weight model; per step it reports

* ``host_us``: wall microseconds per step (the fastest of ``--repeats`` runs; on a CPU this includes
  the tiny model's arithmetic, on a GPU with small shapes it is the host overhead of the hot path);
* ``launches``: kernel launches per step = Triton launches plus aten ops that are not views (the
  work a GPU step would queue), counted with a ``TorchDispatchMode`` (aten ops inside a Triton
  launch, e.g. the interpreter's own copies, are not counted; a ``torch.ops.spacache`` operator
  counts as the launches inside it).

Both are measured from ``stats`` and the counts over a whole ``generate()`` call, divided by the
steps run, so the script runs unchanged on older commits (the before / after figures of a refactor).
``--docs`` rewrites the marked section of ``docs/benchmarks.md``.

``--compile BACKEND`` (e.g. ``inductor``) adds a second table: the same decoding eager and with
``generate(..., compile_step=BACKEND)`` (each step's device part under ``torch.compile(fullgraph=
True)``; ``spacache_kernels.graphs``). A dispatch mode cannot watch compiled code, so both rows of
that table count launches with the profiler instead (:func:`profiled_launches`): compute kernels
(inductor's generated ones, and every outermost aten op that is not a view or an allocation).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import pathlib
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from spacache_kernels.generation import generate
from spacache_kernels.models.synthetic import random_model
from spacache_kernels.policies import POLICIES, make_policy

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
BEGIN, END = "<!-- step-profile:begin -->", "<!-- step-profile:end -->"


class LaunchCounter(TorchDispatchMode):
    """Counts aten ops that are not views, and (through :func:`count_triton`) Triton launches."""

    def __init__(self):
        super().__init__()
        self.aten = 0
        self.triton = 0
        self.in_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "spacache":
            return self._run_operator(func, args, kwargs)
        if not self.in_triton and not func.is_view:
            self.aten += 1
        return func(*args, **kwargs)

    def _run_operator(self, func, args, kwargs):
        """A ``torch.ops.spacache`` operator is no launch itself: count what runs inside it.

        Its kernel is called directly on the backend key (calling ``func`` would come back here) with
        this mode pushed again. The dispatcher's autograd fallback has excluded the autograd keys on
        the way to this mode, which would let composite ops (``matmul``, ``to``) reach the counter
        undecomposed; they are re-enabled so the inner ops count as they do outside an operator.
        """
        key = torch._C.DispatchKey.CUDA if _on_cuda(args) else torch._C.DispatchKey.CPU
        autograd = torch._C.DispatchKey.AutogradFunctionality
        excluded = torch._C._dispatch_tls_is_dispatch_key_excluded(autograd)
        torch._C._dispatch_tls_set_dispatch_key_excluded(autograd, False)
        try:
            with self:
                return func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)
        finally:
            torch._C._dispatch_tls_set_dispatch_key_excluded(autograd, excluded)


def _on_cuda(args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)


@contextlib.contextmanager
def count_triton(counter: LaunchCounter):
    """Wrap the Triton launch entry points (compiled and interpreted) to count launches."""
    patched = []
    try:
        from triton.runtime import interpreter, jit

        for cls in (jit.JITFunction, interpreter.InterpretedFunction):
            original = cls.run

            def run(self, *args, __original=original, **kwargs):
                counter.triton += 1
                counter.in_triton += 1
                try:
                    return __original(self, *args, **kwargs)
                finally:
                    counter.in_triton -= 1

            cls.run = run
            patched.append((cls, original))
    except ImportError:  # pragma: no cover - triton is a dependency on Linux
        pass
    try:
        yield
    finally:
        for cls, original in patched:
            cls.run = original


def profile(shape="llada-tiny", backend="torch", batch=2, gen_length=32, block_length=16, steps=16,
            repeats=3, threshold=None, device=None) -> list[dict]:  # fmt: skip
    """One row per registered policy: host_us and launches per step (module docstring)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = random_model(shape, device=device, dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    ids = torch.randint(0, 1000, (batch, 16), generator=torch.Generator().manual_seed(0)).to(device)
    kw = dict(gen_length=gen_length, steps=steps, block_length=block_length, backend=backend,
              threshold=threshold)  # fmt: skip
    rows = []
    for name in sorted(POLICIES):
        generate(model, ids, policy=make_policy(name), **kw)  # warm-up (SVD proxies, compilation)
        best = min(
            (generate(model, ids, policy=make_policy(name), **kw).stats for _ in range(repeats)),
            key=lambda s: s.seconds,
        )
        counter = LaunchCounter()
        with count_triton(counter), counter:
            counted = generate(model, ids, policy=make_policy(name), **kw).stats
        rows.append(
            dict(
                policy=name, steps=best.steps, host_us=1e6 * best.seconds / best.steps,
                launches=(counter.aten + counter.triton) / counted.steps,
                triton=counter.triton / counted.steps, aten=counter.aten / counted.steps,
            )
        )  # fmt: skip
    return rows


# aten ops that queue no kernel: allocations and no-op conjugate / negation resolution.
_NOT_KERNELS = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::resolve_conj",
                "aten::resolve_neg", "aten::lift_fresh"}  # fmt: skip


def _is_view(name: str) -> bool:
    packet = getattr(torch.ops.aten, name.removeprefix("aten::"), None)
    if packet is None or not hasattr(packet, "overloads"):
        return False
    return any(getattr(packet, o).is_view for o in packet.overloads())


def profiled_launches(fn) -> tuple[int, int]:
    """(compiled kernels, aten kernels) that ``fn()`` runs, from ``torch.profiler`` events: inductor's
    generated kernels (profiled through ``cpp.enable_kernel_profile`` on the CPU; ``triton_*`` on a
    GPU) and the aten ops called from outside any other aten op that are neither views nor allocations
    (what Python or a compiled graph's wrapper calls: ``linear`` counts once, not with its ``mm``)."""
    import torch._inductor.config as inductor_config
    from torch.profiler import ProfilerActivity, profile

    with (
        inductor_config.patch({"cpp.enable_kernel_profile": True}),
        profile(activities=[ProfilerActivity.CPU]) as prof,
    ):
        fn()

    def kernel_like(name: str) -> bool:
        return name.startswith("aten::") and name not in _NOT_KERNELS and not _is_view(name)

    def inside_kernel(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if kernel_like(parent.name):
                return True
            parent = parent.cpu_parent
        return False

    compiled = aten = 0
    for event in prof.events():
        name = event.name
        if "cpp_fused" in name or name.startswith("triton_"):
            compiled += 1
        elif kernel_like(name) and not inside_kernel(event):
            aten += 1  # the outermost: linear -> matmul -> mm, or mul -> (scalar copy), counts once
    return compiled, aten


def compare_compiled(policies, compile_backend="inductor", shape="llada-tiny", backend="torch", batch=2,
                     gen_length=32, block_length=16, steps=16, repeats=3,
                     device=None) -> list[dict]:  # fmt: skip
    """Per policy two rows, eager and ``compile_step=compile_backend``: host_us per step (the fastest of
    ``repeats`` runs after a warm-up that also compiles), profiled launches per step, and the fraction
    of the compiled run's tokens equal to the eager run's (inductor reorders fp32 arithmetic, so near
    ties of a random-weight model can flip; ``aot_eager`` / ``eager`` are bit-identical)."""
    import torch._inductor.config as inductor_config

    # Kernel profiling is a code-generation switch: on before the first compilation, so the profiler
    # sees every generated kernel (it adds a record-function call per kernel to the timed runs).
    with inductor_config.patch({"cpp.enable_kernel_profile": True}):
        return _compare_compiled(policies, compile_backend, shape, backend, batch, gen_length, block_length,
                                 steps, repeats, device)  # fmt: skip


def _compare_compiled(policies, compile_backend, shape, backend, batch, gen_length, block_length, steps,
                      repeats, device) -> list[dict]:  # fmt: skip
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = random_model(shape, device=device, dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    ids = torch.randint(0, 1000, (batch, 16), generator=torch.Generator().manual_seed(0)).to(device)
    kw = dict(gen_length=gen_length, steps=steps, block_length=block_length, backend=backend)
    rows = []
    for name in policies:
        for mode in ("eager", compile_backend):
            extra = {} if mode == "eager" else {"compile_step": compile_backend}
            want = None if mode == "eager" else rows[-1]["sequences"]
            first = generate(model, ids, policy=make_policy(name), **kw, **extra)  # warm-up, compilation
            best = min(
                (generate(model, ids, policy=make_policy(name), **kw, **extra).stats for _ in range(repeats)),
                key=lambda s: s.seconds,
            )
            once = functools.partial(generate, model, ids, policy=make_policy(name), **kw, **extra)
            compiled, aten = profiled_launches(once)
            rows.append(
                dict(
                    policy=name, mode="eager" if mode == "eager" else f"compiled ({mode})", steps=best.steps,
                    host_us=1e6 * best.seconds / best.steps, launches=(compiled + aten) / best.steps,
                    compiled=compiled / best.steps, aten=aten / best.steps, sequences=first.sequences,
                    same_tokens=None if want is None else float((want == first.sequences).float().mean()),
                )
            )  # fmt: skip
    for row in rows:
        row.pop("sequences")
    return rows


def format_compiled(rows: list[dict]) -> str:
    lines = [
        "| policy | mode | host us / step | launches / step | compiled kernels | aten kernels "
        "| same tokens as eager |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        same = "" if r["same_tokens"] is None else f"{r['same_tokens']:.3f}"
        lines.append(
            f"| {r['policy']} | {r['mode']} | {r['host_us']:.0f} | {r['launches']:.1f} | "
            f"{r['compiled']:.1f} | {r['aten']:.1f} | {same} |"
        )
    return "\n".join(lines)


def format_rows(rows: list[dict]) -> str:
    lines = [
        "| policy | steps | host us / step | launches / step | Triton | aten |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['steps']} | {r['host_us']:.0f} | {r['launches']:.1f} | "
            f"{r['triton']:.1f} | {r['aten']:.1f} |"
        )
    return "\n".join(lines)


def write_docs(table: str, note: str, begin: str = BEGIN, end: str = END,
               title: str = "Host time and launches per step") -> None:  # fmt: skip
    text = DOCS.read_text()
    marker = "<!-- generated by bench/step_profile.py; edits between these markers are overwritten -->"
    block = f"{begin}\n{marker}\n{note}\n\n{table}\n{end}"
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n## {title}\n\n" + block + "\n"
    DOCS.write_text(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llada-tiny")
    parser.add_argument("--backend", default=None, help="default: auto on a GPU (Triton), torch on a CPU")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (default 1)")
    parser.add_argument("--docs", action="store_true", help="rewrite the section of docs/benchmarks.md")
    parser.add_argument(
        "--compile",
        default=None,
        metavar="BACKEND",
        help="also compare eager with compile_step=BACKEND (inductor / aot_eager / eager)",
    )
    parser.add_argument("--compile-policies", default="vanilla,spa", help="policies of the --compile table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.backend is None:
        args.backend = "auto" if torch.cuda.is_available() else "torch"
    rows = profile(args.shape, args.backend, repeats=args.repeats)
    table = format_rows(rows)
    print(table)
    if args.docs:
        dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        note = (
            f"{args.shape}, fp32 on the CPU / bf16 on a GPU, backend {args.backend}, batch 2, prompt 16, "
            f"gen_length 32, block 16, 16 steps, fixed count; device: {dev}, {args.threads} thread(s)."
        )
        write_docs(table, note)
    if args.compile:
        compiled = compare_compiled(args.compile_policies.split(","), args.compile, backend=args.backend,
                                    repeats=args.repeats)  # fmt: skip
        table = format_compiled(compiled)
        print(table)
        if args.docs:
            note = (
                f"{args.shape}, backend {args.backend}, batch 2, prompt 16, gen_length 32, block 16, "
                f"16 steps, fixed count; eager against compile_step={args.compile!r}; launches counted "
                f"with the profiler (bench/step_profile.py: profiled_launches); {args.threads} thread(s)."
            )
            write_docs(table, note, "<!-- step-compile:begin -->", "<!-- step-compile:end -->",
                       "Eager against compiled steps")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
