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
"""

from __future__ import annotations

import argparse
import contextlib
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


def write_docs(table: str, note: str) -> None:
    text = DOCS.read_text()
    marker = "<!-- generated by bench/step_profile.py; edits between these markers are overwritten -->"
    block = f"{BEGIN}\n{marker}\n{note}\n\n{table}\n{END}"
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Host time and launches per step\n\n" + block + "\n"
    DOCS.write_text(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llada-tiny")
    parser.add_argument("--backend", default=None, help="default: auto on a GPU (Triton), torch on a CPU")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (default 1)")
    parser.add_argument("--docs", action="store_true", help="rewrite the section of docs/benchmarks.md")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
