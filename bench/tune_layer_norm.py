"""Sweep the launch parameters of the LayerNorm backward on this GPU and write the device time of each.

Triton backward: elements per program (rows per program x padded hidden), warps, programs per multiprocessor;
CUDA backward: its grid (blocks per multiprocessor; `auto` is what the launcher picks). bf16 activations and
weights, 16k rows, residual and bias, no dropout. Times are CUDA-graph replays (device time, no host launch
overhead) of one launcher call, column sums included. The defaults in kernels/triton/add_layer_norm.py
(`launch_config`, PROGRAMS_PER_SM) and kernels/cuda/add_layer_norm.cu are chosen from these tables.
Usage: python bench/tune_layer_norm.py [--quick] [--budget-s 150]. Needs a GPU (exits 0 with a message without one).
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_graph_ms, markdown_table, measure_peaks, on_gpu, write_results  # noqa: E402

ROWS = 16384
HIDDEN = (768, 1024, 2048, 4096, 8192)


def triton_rows(hidden: int, copy_gbps: float, deadline: float) -> list[dict]:
    from videobert._kernels.triton import add_layer_norm as tln

    x, r, dout = (torch.randn(ROWS, hidden, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    w, b = torch.ones(hidden, device="cuda", dtype=torch.bfloat16), torch.zeros(hidden, device="cuda",
                                                                                 dtype=torch.bfloat16)
    _, s, mean, rstd = tln.add_layer_norm_fwd(x, r, w, b, 1e-12, 0.0, None)
    block_n = triton.next_power_of_2(hidden)
    default = tln.launch_config(hidden, backward=True)
    row_choices = sorted({max(1, e // block_n) for e in (block_n, 2048, 4096, 8192)})
    out = []
    for rows, warps, per_sm in itertools.product(row_choices, (4, 8, 16), (2, 4, 8)):
        if time.monotonic() > deadline or warps * 32 > block_n * rows:
            continue
        config = (block_n, rows, warps)
        timing = bench_graph_ms(lambda: tln.add_layer_norm_bwd(dout, None, s, mean, rstd, w, True, True, 0.0, None,
                                                               config=config, programs_per_sm=per_sm), rep_ms=10)
        if timing:
            out.append(dict(kernel="triton_bwd", hidden=hidden, rows_per_program=rows, warps=warps,
                            per_sm=per_sm, default=config == default and per_sm == tln.PROGRAMS_PER_SM,
                            device_ms=timing[0], pct_of_copy=_pct(hidden, timing[0], copy_gbps), blocks=""))
    return out


def cuda_rows(hidden: int, copy_gbps: float) -> list[dict]:
    try:
        from videobert._kernels import cuda  # noqa: F401  (loads the extension)
    except ImportError as exc:
        print(f"no CUDA extension: {exc}")
        return []
    ops = torch.ops.videobert_cuda
    s, dout = (torch.randn(ROWS, hidden, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mean, rstd = torch.zeros(ROWS, device="cuda"), torch.ones(ROWS, device="cuda")
    w = torch.ones(hidden, device="cuda", dtype=torch.bfloat16)
    dx, dres = torch.empty_like(s), torch.empty_like(s)
    dw, db = torch.empty_like(w), torch.empty_like(w)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    auto = ops.add_layer_norm_bwd_blocks(s, w)
    out = []
    for label, blocks in [("auto", auto)] + [(str(k), k * sms) for k in (1, 2, 4, 8, 16)]:
        partial = torch.empty(2, blocks, hidden, device="cuda")
        timing = bench_graph_ms(lambda: ops.add_layer_norm_bwd(
            dout, None, s, mean, rstd, w, dx, dres, partial[0], partial[1], dw, db, 0, 0, 0, 1.0, False,
            torch.cuda.current_stream().cuda_stream), rep_ms=10)
        if timing:
            out.append(dict(kernel="cuda_bwd", hidden=hidden, rows_per_program="", warps="", per_sm=label,
                            default=label == "auto", device_ms=timing[0],
                            pct_of_copy=_pct(hidden, timing[0], copy_gbps), blocks=blocks))
    return out


def _pct(hidden: int, ms: float, copy_gbps: float) -> float:
    """Share of the copy bandwidth: the backward reads dout and s and writes dx and dresidual."""
    return 100 * 4 * ROWS * hidden * 2 / ms / 1e6 / copy_gbps


def main(argv=None) -> int:
    """Run the sweep; writes layer_norm_tuning.{csv,json,md} beside the other results."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budget-s", type=float, default=150.0,
                        help="seconds of Triton configs in all (an equal share per hidden size)")
    parser.add_argument("--quick", action="store_true", help="a 75-second budget")
    args = parser.parse_args(argv)
    if args.quick:
        args.budget_s = min(args.budget_s, 75.0)
    if not on_gpu():
        print("No CUDA device: the tuning sweep needs a GPU; nothing to do.")
        return 0
    peaks = measure_peaks()
    results = []
    for hidden in HIDDEN:
        results += cuda_rows(hidden, peaks["copy_gbps"])
    for hidden in HIDDEN:  # an equal share of the budget each
        results += triton_rows(hidden, peaks["copy_gbps"], time.monotonic() + args.budget_s / len(HIDDEN))
        write_results("layer_norm_tuning", results, {"peaks": peaks, "rows": ROWS})
    best = {}
    for row in results:
        key = (row["kernel"], row["hidden"])
        if key not in best or row["device_ms"] < best[key]["device_ms"]:
            best[key] = row
    print(markdown_table([r for r in results if r["default"]] + list(best.values())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
