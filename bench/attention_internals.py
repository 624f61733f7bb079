"""Compiler figures of the attention kernels, no GPU needed: the README's "Attention kernel internals" table.

For each kernel's first config shipped for sm_90 at one head dim, on the pointer path and on the TMA path:
SASS instructions per tile of its inner loops (interior / masked tiles, without and with dropout 0.1),
warp-instructions per 1,000 (query, key) pairs in the interior, registers per thread, blocks per multiprocessor
that registers and shared memory allow, bulk tensor loads (UTMALDG) in the kernel, and the useful share of the
(query, key) pairs its tiles compute on bench/attention.py's packed layout (8 rows of 2,048, VideoBERT-like
samples; counted from the samples' spans as the kernels walk them: a block visits the tiles covering the union of
its rows' windows; blocks are work items, but for key blocks under dropout). Compiled as a launch specialises the
kernel (bf16, no rules; `compile_check`).
Usage: python bench/attention_internals.py [--head-dim 64] [--arch 90]. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"  # real JIT functions, compiled for a GPU that need not be here
sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import videobert_rows  # noqa: E402
from common import markdown_table  # noqa: E402

from videobert._kernels.triton import segment_attention as sa  # noqa: E402
from videobert._kernels.triton.compile_check import (attention_constexprs, attention_kernel,  # noqa: E402
                                                     attention_report, attention_signature, attention_tensor_ops,
                                                     kind_archs, loop_opcodes)

REGISTERS_PER_SM = 65536
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}  # a block also reserves 1 KiB
ROWS = {"fwd": "forward", "fwd_tma": "forward, TMA", "dkdv": "backward (deterministic): dK/dV",
        "dq": "backward (deterministic): dQ", "bwd": "backward (default): atomic dK, dV, dQ",
        "bwd_tma": "backward (default), TMA"}


def blocks_of(row: list, own: int, items: bool) -> list:
    """[start, end) of a kernel's blocks of `own` positions over a row of ids: fixed, or work items (each run of
    equal ids cut from its start; fixed where that makes more than twice as many)."""
    fixed = [(start, min(start + own, len(row))) for start in range(0, len(row), own)]
    if not items:
        return fixed
    starts, run = [], 0
    for pos, value in enumerate(row):
        run = pos if pos == 0 or value != row[pos - 1] else run
        if (pos - run) % own == 0:
            starts.append(pos)
    if len(starts) > sa.MAX_ITEMS_PER_BLOCK * len(fixed):
        return fixed
    return list(zip(starts, starts[1:] + [len(row)]))


def useful_share(config: tuple, query_side: bool, seg: torch.Tensor, align: int, items: bool = False) -> float:
    """Allowed pairs over computed pairs of a kernel walking `seg` (contiguous samples, -1 padding, no rules) with
    blocks of BLOCK_M queries (query_side: forward, dQ) or BLOCK_N keys (dK/dV kernels), fixed or work items
    (`blocks_of`), and tiles of the other from the window's low end rounded down to `align` (`_tile_align`)."""
    block_m, block_n = config[:2]
    own, tile = (block_m, block_n) if query_side else (block_n, block_m)
    computed = useful = 0
    for row in seg.tolist():
        spans = {}
        for pos, s in enumerate(row):
            if s >= 0:
                lo, hi = spans.get(s, (pos, pos + 1))
                spans[s] = (min(lo, pos), max(hi, pos + 1))
        useful += sum((hi - lo) ** 2 for lo, hi in spans.values())
        for start, end in blocks_of(row, own, items):
            windows = [spans[s] for s in row[start:end] if s >= 0]
            if windows:
                lo, hi = min(w[0] for w in windows), max(w[1] for w in windows)
                computed += own * tile * -(-(hi - (lo // align) * align) // tile)
    return useful / computed


def blocks_per_sm(registers: int, shared: int, warps: int, arch: int) -> int:
    """Resident blocks per multiprocessor: registers (allocated 8 per thread at a time) and shared memory."""
    by_registers = REGISTERS_PER_SM // (-(-registers // 8) * 8 * 32 * warps)
    return min(by_registers, SHARED_PER_SM[arch] // (shared + 1024), 64 // warps)


def kernel_row(kind: str, head_dim: int, arch: int, seg: torch.Tensor) -> dict:
    """One table row: the kind's first config shipped for `arch` at `head_dim`."""
    fn, table = attention_kernel(kind)
    config = next(e[0] for e in table if sa.serves(e, head_dim, arch // 10, dropout=True))
    block_m, block_n, warps, stages = config
    loops, regs = {}, {}
    for dropout in (False, True):
        constexprs = attention_constexprs(kind, block_m, block_n, head_dim, False, dropout)
        body = loop_opcodes(fn, attention_signature(kind, "bf16"), constexprs, arch, warps, stages)
        loops[dropout] = [sum(loop.values()) for loop in body]  # the interior and the masked loop
        regs[dropout] = attention_report(kind, config, head_dim, arch, False, dropout, "bf16")
    interior = {d: loops[d][0] * warps * 1000 / (block_m * block_n) for d in (False, True)}
    query_side = kind.startswith(("fwd", "dq"))
    tile = block_n if query_side else block_m  # key tiles (the query-side kernels') align to dropout's groups
    # key blocks are work items too, but where they are fixed (`fixed_key_blocks`: under dropout)
    useful = [100 * useful_share(config, query_side, seg, sa._tile_align(query_side and dropout, tile),
                                 query_side or not sa.fixed_key_blocks(dropout)) for dropout in (False, True)]
    return {"kernel": ROWS[kind], "tile, warps, stages": f"{block_m}x{block_n}, {warps}, {stages}",
            "SASS/tile no dropout": "{} / {}".format(*loops[False]),
            "SASS/tile dropout 0.1": "{} / {}".format(*loops[True]),
            "warp-instr / 1k pairs": f"{interior[False]:.0f} / {interior[True]:.0f}",
            "registers": f"{regs[False].registers} / {regs[True].registers}",
            "blocks/SM": " / ".join(str(blocks_per_sm(r.registers, r.shared, warps, arch)) for r in regs.values()),
            "UTMALDG": attention_tensor_ops(kind, config, head_dim, arch)["UTMALDG"],
            "useful pairs": " / ".join(dict.fromkeys(f"{u:.0f}%" for u in useful))}


def main(argv=None) -> int:
    """Print the table for the kernels shipped on this arch (the TMA kinds where their table serves it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, default=64, choices=(32, 64, 128))
    parser.add_argument("--arch", type=int, default=90, choices=(80, 90))
    args = parser.parse_args(argv)
    seg, _ = videobert_rows(8, 2048, torch.Generator().manual_seed(0))
    kinds = [k for k in ROWS if args.arch in kind_archs(k)
             and any(sa.serves(e, args.head_dim, args.arch // 10) for e in attention_kernel(k)[1])]
    print(markdown_table([kernel_row(kind, args.head_dim, args.arch, seg) for kind in kinds]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
