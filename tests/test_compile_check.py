"""The GPU compile check: every kernel compiled for sm_90a and sm_80 through its launcher (no GPU).

The rules (:mod:`spacache_kernels.compile_check.resources`) are tested on hand-built inputs; the check
itself runs once per session in a subprocess with ``TRITON_INTERPRET`` unset (this suite sets it,
and interpreted kernels cannot be compiled), and its result must cover every kernel and every kept
config, have no problems, and match the committed ``docs/kernels.md``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pathlib
import subprocess
import sys

import pytest
import triton

from spacache_kernels.compile_check import resources as rs
from spacache_kernels.compile_check.report import render_markdown, summary_lines

REPO = pathlib.Path(__file__).resolve().parents[1]
KERNEL_MODULES = ("attention", "confidence", "gather_linear", "proxy_select", "rmsnorm", "rope", "scatter")

LOG = """ptxas info    : Compiling entry function '_k' for 'sm_90a'
ptxas info    : Function properties for _k
    16 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers
"""


def _res(**kw) -> rs.Resources:
    base = dict(
        registers=128, stack_bytes=0, spill_store_bytes=0, spill_load_bytes=0, shared_bytes=64 * 1024,
        tensor_core="wgmma", has_dot=True,
    )  # fmt: skip
    base.update(kw)
    return rs.Resources(**base)


# ------------------------------------------------------------------------------------------------
# rules on hand-built inputs
# ------------------------------------------------------------------------------------------------
def test_parse_ptxas_log():
    assert rs.parse_ptxas_log(LOG) == (168, 16, 12, 8)
    with pytest.raises(ValueError, match="log"):
        rs.parse_ptxas_log("ptxas info : 0 bytes gmem")


def test_tensor_core_instruction():
    assert rs.tensor_core_instruction("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16") == "wgmma"
    assert rs.tensor_core_instruction("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == "mma"
    assert rs.tensor_core_instruction("fma.rn.f32 %f1, %f2, %f3, %f4;") == "-"


def test_occupancy_hand_computed():
    # 128 regs x 32 lanes = 4096 per warp -> 16 warps by registers -> 4 blocks of 4 warps.
    assert rs.blocks_per_sm(128, 4, 0) == 4
    assert rs.occupancy(128, 4, 0) == 0.25
    # 100 regs round up to 3328 per warp (13 units of 256): 19 warps -> 2 blocks of 8 warps.
    assert rs.blocks_per_sm(100, 8, 0) == 2
    # Shared memory bound: (100 KB + 1 KB reserved) twice fits in 228 KB, three times not.
    assert rs.blocks_per_sm(32, 4, 100 * 1024) == 2
    # Warp bound: 16 warps per block, 64 per SM.
    assert rs.blocks_per_sm(16, 16, 0) == 4
    # Block bound: 1 warp of 16 registers would allow 64 blocks; the SM holds 32.
    assert rs.blocks_per_sm(16, 1, 0) == 32
    with pytest.raises(ValueError, match="registers"):
        rs.blocks_per_sm(0, 4, 0)


def test_problems_rules():
    assert rs.problems(_res(), 90, native_16bit=True, wgmma_reason=None) == []
    over = rs.problems(_res(shared_bytes=228 * 1024), 90, True, None)
    assert len(over) == 1 and "shared memory" in over[0]
    # 200 KB fits sm_90 (227 KB) but not sm_80 (163 KB).
    assert rs.problems(_res(shared_bytes=200 * 1024), 90, True, None) == []
    assert "sm_80" in rs.problems(_res(shared_bytes=200 * 1024), 80, True, None)[0]
    assert "spills" in rs.problems(_res(spill_store_bytes=4), 80, True, None)[0]
    no_wgmma = _res(tensor_core="mma")
    assert "wgmma" in rs.problems(no_wgmma, 90, True, None)[0]
    assert rs.problems(no_wgmma, 90, True, "few rows") == []
    assert rs.problems(no_wgmma, 80, True, None) == []  # sm_80 has no wgmma
    assert rs.problems(no_wgmma, 90, False, None) == []  # the fp32 path cannot use 16-bit MMAs
    assert rs.problems(_res(tensor_core="-", has_dot=False), 90, True, None) == []


def test_wgmma_reason_parse():
    doc = "Kernel.\n\n    No wgmma: tiles of 16 rows,\n    below a warpgroup.\n\n    More text."
    assert rs.wgmma_reason(doc) == "tiles of 16 rows, below a warpgroup."
    assert rs.wgmma_reason("Kernel without a reason.") is None
    assert rs.wgmma_reason(None) is None


# ------------------------------------------------------------------------------------------------
# the check itself (one subprocess per session)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def check_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile-check") / "result.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "spacache_kernels.compile_check", "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    if not out.exists():
        pytest.fail(f"the compile check produced no result (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc, json.loads(out.read_text())


def _package_kernels() -> dict[str, object]:
    """Every ``*_kernel`` of the kernel modules: name -> its Autotuner or JITFunction."""
    found = {}
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"spacache_kernels.kernels.{name}")
        for attr, obj in vars(module).items():
            if attr.endswith("_kernel") and hasattr(obj, "fn") and not inspect.isfunction(obj):
                found[attr] = obj
    return found


@pytest.mark.slow
def test_compile_check_passes(check_result):
    proc, result = check_result
    lines, failed = summary_lines(result)
    assert proc.returncode == 0 and not failed, "\n".join(lines) + "\n" + proc.stderr[-3000:]
    assert not result["errors"]


@pytest.mark.slow
def test_compile_check_covers_every_kernel_and_config(check_result):
    _, result = check_result
    kernels = _package_kernels()
    assert len(kernels) >= 14, sorted(kernels)
    configs_by_arch: dict[int, dict[str, set]] = {}
    for arch in (90, 80):
        rows = [r for r in result["rows"] if r["arch"] == arch]
        compiled = {r["kernel"] for r in rows}
        assert set(kernels) <= compiled, (arch, sorted(set(kernels) - compiled))
        for name, obj in kernels.items():
            if not isinstance(obj, triton.runtime.autotuner.Autotuner):
                continue
            # Under TRITON_INTERPRET the list holds the first config only; the subprocess had them all.
            seen = {r["config_index"] for r in rows if r["kernel"] == name and r["dtype"] == "bf16"}
            assert None not in seen and len(seen) >= 2, (name, arch, seen)
            configs_by_arch.setdefault(arch, {})[name] = seen
    for name, on_sm80 in configs_by_arch[80].items():  # sm_80 keeps a subset of sm_90a's configs
        assert on_sm80 <= configs_by_arch[90][name], (name, on_sm80, configs_by_arch[90][name])
    # bf16 GEMMs on sm_90a: the BLOCK_M >= 64 configs of the gathered GEMM use wgmma.
    tcs = {
        r["tensor_core"] for r in result["rows"] if r["kernel"] == "_gather_linear_kernel" and r["arch"] == 90
    }
    assert "wgmma" in tcs


@pytest.mark.slow
def test_kernels_md_is_generated_from_this_code(check_result):
    _, result = check_result
    committed = (REPO / "docs" / "kernels.md").read_text()
    if f"with triton {result['triton']}:" not in committed:
        pytest.skip(f"docs/kernels.md was generated with another triton than {result['triton']}")
    assert committed == render_markdown(result), "docs/kernels.md is stale: run `make kernels-report`"
