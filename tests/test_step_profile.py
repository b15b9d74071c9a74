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


def test_format_rows():
    rows = [dict(policy="spa", steps=4, host_us=1234.4, launches=10.25, triton=8.0, aten=2.25)]
    table = format_rows(rows)
    assert table.splitlines()[2] == "| spa | 4 | 1234 | 10.2 | 8.0 | 2.2 |"
