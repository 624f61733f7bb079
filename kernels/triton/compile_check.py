"""Compile a Triton kernel for a GPU that is not present and report its resources (registers, spills).

Uses `triton.compile` with an explicit `GPUTarget` and the argument specialisation of a typical launch, then the
CUDA tools shipped in the Triton wheel on the cubin it built: `cuobjdump -res-usage` for registers and stack
(register spills), so shipped configs can be checked on a CPU-only machine, and `nvdisasm`, so the instructions
of a kernel's inner loops can be counted there too.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import subprocess
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


@dataclass(frozen=True)
class CompileReport:
    """Resources of one compiled kernel: registers per thread, stack frame bytes per thread (register spills: a
    Triton kernel keeps nothing else in local memory), shared memory bytes."""

    registers: int
    stack: int
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


def _cuda_tool(arch: int, name: str) -> str:
    """A CUDA binary tool (cuobjdump, nvdisasm) shipped beside the wheel's ptxas."""
    return os.path.join(os.path.dirname(_ptxas(arch)), name)


def _cubin_tool(compiled, arch: int, tool: str, *flags: str) -> str:
    """Output of `tool flags` on the compiled kernel's cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        return subprocess.run([_cuda_tool(arch, tool), *flags, cubin], capture_output=True, text=True,
                              check=True).stdout


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
    """Compile `fn` for sm_`arch` and count the SASS opcodes of each loop body (the instructions from a label to
    the branch back to it), in the order their bodies end: the
    per-tile cost of a kernel's inner loops, without a GPU.
    Code after the kernel's first unconditional EXIT is left out: ptxas puts the retry loops of barrier waits
    there (TMA kernels), out of line, branching back into the loop they belong to."""
    compiled = compile_kernel(fn, signature, constexprs, arch, num_warps, num_stages)
    sass = _cubin_tool(compiled, arch, "nvdisasm", "-c")
    labels, opcodes, loops = {}, [], []
    for line in sass.splitlines():
        label = re.match(r"\s*\.L_x_(\d+):", line)
        if label:
            labels[label.group(1)] = len(opcodes)
            continue
        instruction = re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)[^;]*;", line)
        if not instruction:
            continue
        if instruction.group(2) == "EXIT" and not instruction.group(1):
            break
        opcodes.append(instruction.group(2))
        target = re.search(r"BRA[^;]*\.L_x_(\d+)", line)
        if target and labels.get(target.group(1), len(opcodes)) < len(opcodes) - 1:
            loops.append(Counter(opcodes[labels[target.group(1)]:]))
    return loops


def compile_report(fn, signature: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int) -> CompileReport:
    """Compile `fn` (a @triton.jit function) for sm_`arch` and read the resource usage of its cubin (cuobjdump):
    the registers and stack of the very cubin a launch loads, built with Triton's own ptxas flags (a separate
    plain ptxas run allocates registers differently); Triton's cache serves repeated compiles."""
    return _report(compile_kernel(fn, signature, constexprs, arch, num_warps, num_stages), arch)


def _report(compiled, arch: int) -> CompileReport:
    """The resource usage of a compiled kernel's cubin (`compile_report`)."""
    usage = re.search(r"REG:(\d+) STACK:(\d+)", _cubin_tool(compiled, arch, "cuobjdump", "-res-usage"))
    return CompileReport(int(usage.group(1)), int(usage.group(2)), int(compiled.metadata.shared))


# ---------------------------------------------------------------------------------------------- attention tables

ARCHS = (80, 90)
HEAD_DIMS = (32, 64, 128)
# Most shared memory one block may have (bytes): A100 163 KiB, H100 227 KiB; a launch asking for more fails.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# (HAS_RULES, HAS_DROPOUT): an entry serving a head dim with dropout serves every launch at that head dim, so all
# four variants must fit (rules without dropout is not always lighter than rules with it: ptxas allocates each
# anew, and the 128x128 forward at D=128 on sm_90 spilled 24 bytes without dropout, none with); entries served
# only without dropout are checked with and without rules
NO_DROPOUT_VARIANTS = ((False, False), (True, False))
VARIANTS = NO_DROPOUT_VARIANTS + ((True, True), (False, True))


def kind_variants(kind: str, variants: tuple) -> tuple:
    """The (HAS_RULES, HAS_DROPOUT) variants of `variants` that a kind is launched with: the warp-specialised
    forward never with rules."""
    return tuple(v for v in variants if not (kind == "fwd_ws" and v[0]))


def as_launched(signature: dict, *multiples_of_16: str) -> dict:
    """The signature as a typical launch specialises it: every pointer 16-byte aligned (fresh allocations are)
    and the named integers divisible by 16 (":16"), so loads vectorise as they do on a GPU."""
    return {name: f"{kind}:16" if kind.startswith("*") or name in multiples_of_16 else kind
            for name, kind in signature.items()}


def base_kind(kind: str) -> str:
    """The kernel of an attention kind: "fwd_tma" is the forward's TMA path, "bwd_tma" the atomic backward's,
    "fwd_ws" the forward's warp-specialised TMA path."""
    return kind.removesuffix("_tma").removesuffix("_ws")


def attention_signature(kind: str, dtype: str) -> dict:
    """Argument types of an attention kernel (one of KINDS) as a launch with int32 ids specialises them:
    (B, L, H, D) tensors or views of a fused QKV projection have strides that are multiples of D (32, 64, 128),
    and training rows are a multiple of 16 long."""
    kind = base_kind(kind)
    sig = {name: f"*{dtype}" for name in ("Q", "K", "V", "Out" if kind == "fwd" else "DO")}
    if kind == "fwd":
        sig["Lse"] = "*fp32"
    else:
        sig.update({"Lse": "*fp32", "Delta": "*fp32"})
        grads = {"bwd": ["DK", "DV"], "dkdv": ["DK", "DV", "DQ"], "dq": ["DQ"]}[kind]
        sig.update({name: f"*{dtype}" for name in grads})
        if kind == "bwd":
            sig["DQ"] = "*fp32"  # the atomic backward's accumulator
    sig.update({"Seg": "*i32", "Mod": "*i32", "Win": "*i32", "Rules": "*i64"})
    sig["Items"] = "*i32"
    strides = ["qb", "ql", "qh", "kb", "kl", "kh", "vb", "vl", "vh"]
    strides += ["ob", "ol", "oh"] if kind == "fwd" else ["db", "dl", "dh", "gb", "gl", "gh"]
    strides.append("items")
    sig.update({f"stride_{s}": "i32" for s in strides})
    sig.update({"B": "i32", "H": "i32", "L": "i32"})
    if kind != "fwd":
        sig["scale"] = "fp32"
    sig.update({"scale_log2": "fp32", "Rng": "*i64", "threshold": "i32", "drop_scale": "fp32",
                "L_BUCKET": "i32", "TMA_MODE": "i32"})
    if kind == "fwd":
        sig["WS_MODE"] = "i32"
    return as_launched(sig, *(name for name in sig if name.startswith("stride_")), "L", "L_BUCKET")


def attention_constexprs(kind: str, block_m: int, block_n: int, head_dim: int, rules: bool, dropout: bool) -> dict:
    """Compile-time arguments of an attention kernel as a launch with two modalities specialises them."""
    consts = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, NUM_MODALITIES=2, HAS_RULES=rules, HAS_DROPOUT=dropout,
                  DOT_PRECISION="tf32", BLOCK_M=block_m, BLOCK_N=block_n, USE_TMA=kind != base_kind(kind))
    if base_kind(kind) == "fwd":
        consts.update(WARP_SPECIALIZE=kind == "fwd_ws", MIXED_ITEMS=False)
    kind = base_kind(kind)
    if kind in ("bwd", "dkdv"):  # one kernel: the atomic backward is the dK/dV kernel adding dQ
        consts["ATOMIC_DQ"] = kind == "bwd"
    return consts


KINDS = ("fwd", "bwd", "dkdv", "dq", "fwd_tma", "bwd_tma", "fwd_ws")


def attention_kernel(kind: str):
    """The jit function and shipped table of an attention kind (one of KINDS)."""
    from videobert._kernels.triton import segment_attention as sa

    kernels = {"fwd": sa._segment_attention_fwd_kernel, "bwd": sa._segment_attention_bwd_dkdv_kernel,
               "dkdv": sa._segment_attention_bwd_dkdv_kernel, "dq": sa._segment_attention_bwd_dq_kernel}
    return kernels[base_kind(kind)], sa.TABLES[kind]


def kind_archs(kind: str) -> tuple:
    """The archs a kind ships for: the TMA path needs sm_90's tensor memory accelerator."""
    return (90,) if kind != base_kind(kind) else ARCHS


def compile_attention(kind: str, config: tuple, head_dim: int, arch: int, rules: bool, dropout: bool,
                      dtype: str = "fp16"):
    """An attention kernel compiled with config (BLOCK_M, BLOCK_N, warps, stages) as launched (`compile_kernel`)."""
    block_m, block_n, warps, stages = config
    return compile_kernel(attention_kernel(kind)[0], attention_signature(kind, dtype),
                          attention_constexprs(kind, block_m, block_n, head_dim, rules, dropout), arch, warps, stages)


def attention_report(kind: str, config: tuple, head_dim: int, arch: int, rules: bool, dropout: bool,
                     dtype: str = "fp16") -> CompileReport:
    """Compile an attention kernel with config (BLOCK_M, BLOCK_N, warps, stages) as launched."""
    return _report(compile_attention(kind, config, head_dim, arch, rules, dropout, dtype), arch)


def attention_tensor_ops(kind: str, config: tuple, head_dim: int, arch: int) -> Counter:
    """Counts of the matrix instructions (HGMMA: wgmma; HMMA: mma.sync), bulk tensor loads (UTMALDG), bulk tensor
    reductions (UTMAREDG) and register reallocations between warpgroups (USETMAXREG: warp specialisation) in the
    SASS of an attention kernel compiled with `config` as launched (bf16, no rules, no dropout)."""
    sass = _cubin_tool(compile_attention(kind, config, head_dim, arch, False, False, "bf16"), arch, "nvdisasm", "-c")
    return Counter(re.findall(r"\b(HGMMA|HMMA|UTMALDG|UTMAREDG|USETMAXREG)\b", sass))


def _unless_declined(kind: str, compile_fn, *args):
    """compile_fn(*args), or None where it is the warp-specialised forward's and Triton's pass fails (it does on
    some tiles and head dims, README); any other kind's failure is raised."""
    try:
        return compile_fn(*args)
    except RuntimeError:
        if kind != "fwd_ws":
            raise
        return None


def uses_wgmma(kind: str, config: tuple, head_dim: int) -> bool:
    """Whether the sm_90 build of an attention config runs its GEMMs on wgmma (no mma.sync left), on the TMA
    path loads its tiles with bulk tensor copies and, warp-specialised, is so (Triton may decline silently)."""
    ops = _unless_declined(kind, attention_tensor_ops, kind, config, head_dim, 90)
    return ops is not None and ops["HGMMA"] > 0 and ops["HMMA"] == 0 \
        and (kind == base_kind(kind) or ops["UTMALDG"] > 0) and (kind != "fwd_ws" or ops["USETMAXREG"] > 0)


def fits(report: CompileReport, arch: int) -> bool:
    """No register spills (no stack) and within the card's shared memory."""
    return report.stack == 0 and report.shared <= SHARED_MEMORY_LIMIT[arch]


def _fits_case(case) -> bool:
    report = _unless_declined(case[0], attention_report, *case)
    return report is not None and fits(report, case[3])


def table_entry(kind: str, config: tuple, pool) -> tuple:
    """The table entry `config` earns: (config, head dims on sm_8x, on sm_9x[, (more head dims without dropout on
    sm_8x, on sm_9x)]) from compiling every head dim, arch and variant in `pool` (an executor)."""
    cases = [(kind, config, d, arch, rules, dropout) for d in HEAD_DIMS for arch in kind_archs(kind)
             for rules, dropout in kind_variants(kind, VARIANTS)]
    ok = dict(zip(cases, pool.map(_fits_case, cases)))

    def dims(arch: int, variants) -> tuple:
        return tuple(d for d in HEAD_DIMS
                     if all(ok.get((kind, config, d, arch, *v), False) for v in kind_variants(kind, variants)))

    wgmma = dict(zip(HEAD_DIMS, pool.map(uses_wgmma, *zip(*[(kind, config, d) for d in HEAD_DIMS]))))

    def shipped(arch: int, found: tuple) -> tuple:  # sm_9x ships wgmma configs only
        return tuple(d for d in found if arch < 90 or wgmma[d])

    every = tuple(shipped(arch, dims(arch, VARIANTS)) for arch in ARCHS)
    without = tuple(tuple(d for d in shipped(arch, dims(arch, NO_DROPOUT_VARIANTS)) if d not in served)
                    for arch, served in zip(ARCHS, every))
    return (config, *every) + ((without,) if any(without) else ())


def _config_arg(text: str) -> tuple:
    """An attention config from "M,N,WARPS,STAGES": four positive integers, the block sizes powers of two."""
    try:
        config = tuple(int(x) for x in text.split(","))
    except ValueError:
        config = ()
    if len(config) != 4 or min(config) < 1 or any(b & (b - 1) for b in config[:2]):
        raise argparse.ArgumentTypeError(f"expected M,N,WARPS,STAGES (four positive integers, M and N powers of "
                                         f"two), got {text!r}")
    return config


def _positive_int(text: str) -> int:
    """A count of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def main(argv=None) -> int:
    """Print the attention table entries that configs earn (the shipped tables' configs by default)."""
    parser = argparse.ArgumentParser(description="Compile attention configs for sm_80 and sm_90 as launched and "
                                                 "print the table entries they earn (no GPU needed).")
    parser.add_argument("--kind", choices=KINDS, action="append", help="default: all four")
    parser.add_argument("--config", action="append", type=_config_arg, metavar="M,N,WARPS,STAGES",
                        help="configs to try instead of the shipped ones (repeatable)")
    parser.add_argument("--workers", type=_positive_int, default=os.cpu_count() or 1, metavar="N",
                        help="compiler processes (default: one per core)")
    args = parser.parse_args(argv)
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for kind in args.kind or KINDS:
            configs = args.config or [entry[0] for entry in attention_kernel(kind)[1]]
            print(f"{kind}: {[table_entry(kind, config, pool) for config in configs]}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
