"""Compile a Triton kernel for a GPU that is not present and report its resources (registers, spills).

Uses `triton.compile` with an explicit `GPUTarget` and the argument specialisation of a typical launch, reads
the resource usage from the verbose log of the ptxas run inside it (the `ptxas` shipped in the Triton wheel,
with Triton's own flags), so shipped configs can be checked for register spills on a CPU-only machine, and
runs the wheel's `nvdisasm` on the cubin, so the instructions of a kernel's inner loops can be counted there too.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


@dataclass(frozen=True)
class CompileReport:
    """Resources of one compiled kernel: registers per thread, spill bytes, static shared memory bytes."""

    registers: int
    spill_stores: int
    spill_loads: int
    shared: int


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for this arch (newer wheels ship one per PTX generation)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError:
        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    try:
        return get_ptxas(arch).path
    except TypeError:  # Triton versions whose get_ptxas takes no arch
        return get_ptxas().path


def compile_kernel(fn, signature: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int):
    """Compile for sm_`arch`. A signature type may end in ":16" (Triton's AOT notation): the argument is
    specialised as a launch specialises a pointer that is 16-byte aligned or an integer that divides by 16,
    which is what lets loads and stores be vectorised; without it the kernel compiles as for odd values."""
    types, attrs = {}, {}
    for name, kind in signature.items():
        types[name], _, divisor = kind.partition(":")
        if divisor:
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", int(divisor)]]
    source = ASTSource(fn=fn, signature={**types, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs,
                       attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def loop_opcodes(fn, signature: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int) -> list[Counter]:
    """Compile `fn` for sm_`arch` and count the SASS opcodes of each loop body (the instructions from a label
    to the branch back to it), in program order: the per-tile cost of a kernel's inner loops, without a GPU."""
    compiled = compile_kernel(fn, signature, constexprs, arch, num_warps, num_stages)
    nvdisasm = os.path.join(os.path.dirname(_ptxas(arch)), "nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout
    labels, opcodes, loops = {}, [], []
    for line in sass.splitlines():
        label = re.match(r"\s*\.L_x_(\d+):", line)
        if label:
            labels[label.group(1)] = len(opcodes)
            continue
        instruction = re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)[^;]*;", line)
        if not instruction:
            continue
        opcodes.append(instruction.group(1))
        target = re.search(r"BRA[^;]*\.L_x_(\d+)", line)
        if target and labels.get(target.group(1), len(opcodes)) < len(opcodes) - 1:
            loops.append(Counter(opcodes[labels[target.group(1)]:]))
    return loops


def compile_report(fn, signature: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int) -> CompileReport:
    """Compile `fn` (a @triton.jit function) for sm_`arch` and read the resource usage from Triton's own ptxas
    run (its flags, so these are the registers of the cubin a launch loads)."""
    log = io.StringIO()
    with triton.knobs.nvidia.scope(), triton.knobs.compilation.scope(), contextlib.redirect_stdout(log):
        triton.knobs.nvidia.dump_ptxas_log = True
        triton.knobs.compilation.always_compile = True  # a kernel from Triton's cache runs no ptxas, logs nothing
        compiled = compile_kernel(fn, signature, constexprs, arch, num_warps, num_stages)
    text = log.getvalue()
    registers = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return CompileReport(registers, int(spills.group(1)), int(spills.group(2)), int(compiled.metadata.shared))
