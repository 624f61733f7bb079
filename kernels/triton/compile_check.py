"""Compile a Triton kernel for a GPU that is not present and report its resources (registers, spills).

Uses `triton.compile` with an explicit `GPUTarget`, then the `ptxas` shipped in the Triton wheel with
`-v` on the generated PTX, so shipped configs can be checked for register spills on a CPU-only machine, and
its `nvdisasm` on the cubin, so the instructions of a kernel's inner loops can be counted there too.
"""
from __future__ import annotations

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


def _compile(fn, signature: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int):
    source = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def loop_opcodes(fn, signature: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int) -> list[Counter]:
    """Compile `fn` for sm_`arch` and count the SASS opcodes of each loop body (the instructions from a label
    to the branch back to it), in program order: the per-tile cost of a kernel's inner loops, without a GPU."""
    compiled = _compile(fn, signature, constexprs, arch, num_warps, num_stages)
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
    """Compile `fn` (a @triton.jit function) for sm_`arch` and read ptxas' resource usage."""
    compiled = _compile(fn, signature, constexprs, arch, num_warps, num_stages)
    gpu_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        result = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={gpu_name}", ptx, "-o", os.path.join(tmp, "k.cubin")],
                                capture_output=True, text=True, check=True)
    text = result.stdout + result.stderr
    registers = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return CompileReport(registers, int(spills.group(1)), int(spills.group(2)), int(compiled.metadata.shared))
