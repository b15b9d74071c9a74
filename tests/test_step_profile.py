"""bench/step_profile.py: launches are counted as Triton launches plus aten ops that are not views."""

from __future__ import annotations

import torch

from bench.step_profile import LaunchCounter, count_triton, format_rows


def test_counter_counts_compute_ops_not_views():
    x = torch.randn(4, 3)
    counter = LaunchCounter()
    with counter:
        y = x.view(12)[2:]  # views: not launches
        z = (y * 2).sum()  # two launches
    assert counter.aten == 2 and counter.triton == 0
    assert torch.isfinite(z)


def test_triton_launches_count_once_and_hide_their_own_aten_ops():
    from spacache_kernels.kernels.rmsnorm import rms_norm

    x, w = torch.randn(2, 8), torch.randn(8)
    counter = LaunchCounter()
    with count_triton(counter), counter:
        rms_norm(x, w, 1e-5)
    assert counter.triton == 1
    assert counter.aten <= 2  # the launcher's output allocation
    plain = LaunchCounter()
    with plain:  # without the Triton hook the interpreter's own tensor ops would count
        rms_norm(x, w, 1e-5)
    assert plain.aten > counter.aten


def _counts(fn) -> tuple[int, int]:
    counter = LaunchCounter()
    with count_triton(counter), counter:
        fn()
    return counter.aten, counter.triton


def test_a_spacache_operator_counts_as_the_launches_inside_it():
    """The public ops run torch.ops.spacache operators: counted as what the reference or the launcher
    does (the operator itself is no launch), with the same decompositions as outside an operator."""
    from spacache_kernels import ops
    from spacache_kernels.kernels import scatter as kernels
    from spacache_kernels.ops import reference

    g = torch.Generator().manual_seed(0)
    hidden, head = torch.randn(2, 9, 16, generator=g), torch.randn(50, 16, generator=g)
    positions = torch.tensor([[1, 2], [3, 4]])

    def public():
        ops.token_confidence(hidden, head, positions, backend="torch", check_indices=False)

    assert _counts(public) == _counts(lambda: reference.token_confidence(hidden, head, positions))
    assert _counts(public)[0] > 5  # matmul, argmax, logsumexp, ...
    cache, src = torch.randn(2, 7, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    idx = torch.tensor([[0, 3, 5], [6, 1, 2]])
    got = _counts(lambda: ops.scatter_rows_(cache, idx, src, backend="triton", check_indices=False))
    assert got == _counts(lambda: kernels.scatter_rows(cache, idx, src)) and got[1] == 1


def test_format_rows():
    rows = [dict(policy="spa", steps=4, host_us=1234.4, launches=10.25, triton=8.0, aten=2.25)]
    table = format_rows(rows)
    assert table.splitlines()[2] == "| spa | 4 | 1234 | 10.2 | 8.0 | 2.2 |"


def test_profiled_launches_count_outermost_compute_ops_not_views_or_allocations():
    from bench.step_profile import profiled_launches

    x = torch.randn(4, 3)
    compiled, aten = profiled_launches(lambda: (x.view(12)[2:] * 2).sum())
    assert (compiled, aten) == (0, 2)  # mul and sum; the view and slice are not kernels
    w = torch.randn(5, 3)
    compiled, aten = profiled_launches(lambda: torch.nn.functional.linear(x, w))
    assert (compiled, aten) == (0, 1)  # linear -> matmul -> mm: one call


def test_format_compiled():
    from bench.step_profile import format_compiled

    rows = [
        dict(policy="spa", mode="eager", host_us=900.0, launches=300.0, compiled=0.0, aten=300.0,
             same_tokens=None),
        dict(policy="spa", mode="compiled (inductor)", host_us=400.0, launches=60.5, compiled=20.0, aten=40.5,
             same_tokens=0.875),
    ]  # fmt: skip
    lines = format_compiled(rows).splitlines()
    assert lines[2] == "| spa | eager | 900 | 300.0 | 0.0 | 300.0 |  |"
    assert lines[3] == "| spa | compiled (inductor) | 400 | 60.5 | 20.0 | 40.5 | 0.875 |"
