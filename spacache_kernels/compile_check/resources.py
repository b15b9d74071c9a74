"""Resources of a compiled kernel (registers, spills, shared memory, tensor-core instruction), an
occupancy estimate, and the rules the compile check enforces.

Limits (CUDA programming guide, compute capabilities 8.0 and 9.0): shared memory per block 163 KB
(sm_80) / 227 KB (sm_90); per SM 64K 32-bit registers, 64 resident warps, 32 resident blocks,
228 KB shared memory of which 1 KB is reserved per resident block. Registers are allocated per warp
in units of 256. The occupancy estimate ignores the per-SMSP split of the register file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SMEM_PER_BLOCK = {90: 227 * 1024, 80: 163 * 1024}
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_BLOCK = 1024
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256  # registers, per warp
WARPS_PER_SM = 64
BLOCKS_PER_SM = 32
N_SM = 132

_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass(frozen=True)
class Resources:
    registers: int  # per thread
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    shared_bytes: int  # per block, as the launch requests it
    tensor_core: str  # "wgmma" (Hopper warpgroup MMA), "mma" (mma.sync), or "-" (none)
    has_dot: bool  # the kernel contains a tl.dot (a GEMM-like kernel)

    @property
    def spill_bytes(self) -> int:
        return self.spill_store_bytes + self.spill_load_bytes


def parse_ptxas_log(log: str) -> tuple[int, int, int, int]:
    """(registers, stack frame, spill store, spill load bytes) from ``ptxas -v`` output."""
    regs = _REGS.search(log)
    spills = _SPILLS.search(log)
    if regs is None or spills is None:
        raise ValueError(f"log: no ptxas resource lines found in {log[:200]!r}")
    stack, store, load = (int(x) for x in spills.groups())
    return int(regs.group(1)), stack, store, load


def tensor_core_instruction(ptx: str) -> str:
    """Which MMA instruction family the PTX uses: ``wgmma``, ``mma`` (mma.sync) or ``-``."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync\.", ptx):
        return "mma"
    return "-"


def resources_of(compiled, ptxas_log: str) -> Resources:
    """:class:`Resources` of a ``CompiledKernel`` given the ptxas log of its compilation."""
    regs, stack, store, load = parse_ptxas_log(ptxas_log)
    return Resources(
        registers=regs,
        stack_bytes=stack,
        spill_store_bytes=store,
        spill_load_bytes=load,
        shared_bytes=int(compiled.metadata.shared),
        tensor_core=tensor_core_instruction(compiled.asm["ptx"]),
        has_dot="tt.dot" in compiled.asm["ttir"],
    )


def blocks_per_sm(registers: int, num_warps: int, shared_bytes: int) -> int:
    """Resident blocks per H100/H200 SM for a kernel with these per-thread registers and shared memory."""
    if registers < 1 or num_warps < 1 or shared_bytes < 0:
        raise ValueError(
            f"expected registers >= 1, num_warps >= 1, shared_bytes >= 0; got {registers}, {num_warps}, "
            f"{shared_bytes}"
        )
    regs_per_warp = -(-registers * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = (REGS_PER_SM // regs_per_warp) // num_warps
    by_warps = WARPS_PER_SM // num_warps
    by_smem = SMEM_PER_SM // (shared_bytes + SMEM_RESERVED_PER_BLOCK)
    return max(0, min(by_regs, by_warps, by_smem, BLOCKS_PER_SM))


def occupancy(registers: int, num_warps: int, shared_bytes: int) -> float:
    """Resident warps / 64 on an H100/H200 SM."""
    return blocks_per_sm(registers, num_warps, shared_bytes) * num_warps / WARPS_PER_SM


def problems(res: Resources, arch: int, native_16bit: bool, wgmma_reason: str | None) -> list[str]:
    """What the compile check rejects in one compiled config (empty list: fine).

    ``native_16bit``: the launch multiplies fp16/bf16 operands natively (not the fp32 upcast path);
    ``wgmma_reason``: the kernel's documented reason for running without wgmma, or None.
    """
    found = []
    limit = SMEM_PER_BLOCK[arch]
    if res.shared_bytes > limit:
        found.append(f"shared memory {res.shared_bytes} B > the sm_{arch} per-block limit {limit} B")
    if res.spill_bytes:
        found.append(f"register spills: {res.spill_store_bytes} B stored, {res.spill_load_bytes} B loaded")
    if arch == 90 and res.has_dot and native_16bit and res.tensor_core != "wgmma" and not wgmma_reason:
        found.append(
            f"16-bit GEMM without wgmma on sm_90a (uses {res.tensor_core!r}) and no 'No wgmma:' "
            "reason in the kernel's docstring"
        )
    return found


def wgmma_reason(doc: str | None) -> str | None:
    """The text after ``No wgmma:`` in a kernel docstring (its reason to run without wgmma), if any."""
    if not doc:
        return None
    match = re.search(r"No wgmma:\s*(.+?)(?:\n\s*\n|$)", doc, re.S)
    return " ".join(match.group(1).split()) if match else None
