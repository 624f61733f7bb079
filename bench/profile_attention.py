"""Where the time of one `segment_attention` call goes: torch.profiler tables of host and device time.

Usage: python bench/profile_attention.py [--L 512] [--B 32] [--H 12]. Needs a GPU. Prints the per-op table
sorted by host time and by device time for forward and forward+backward, plus wall-clock per call with and
without a synchronisation, which separates launch overhead from kernel time.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import videobert_rows  # noqa: E402

from videobert.ops import segment_attention  # noqa: E402


def main(argv=None) -> int:
    """Profile forward and forward+backward of one packed batch; prints tables."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--L", type=int, default=512)
    parser.add_argument("--B", type=int, default=32)
    parser.add_argument("--H", type=int, default=12)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 1
    seg, _ = videobert_rows(args.B, args.L, torch.Generator().manual_seed(0))
    seg = seg.cuda()
    q, k, v = (torch.randn(args.B, args.L, args.H, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)
    # Gradients returned, not accumulated into .grad (no sum, expand or add kernels beside the op's own).
    steps = {"fwd": lambda: segment_attention(q, k, v, seg, backend="triton"),
             "fwd+bwd": lambda: torch.autograd.grad(segment_attention(q, k, v, seg, backend="triton"), (q, k, v),
                                                    dout)}
    for name, step in steps.items():
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        for sync in (False, True):
            start = time.perf_counter()
            for _ in range(50):
                step()
                if sync:
                    torch.cuda.synchronize()
            torch.cuda.synchronize()
            print(f"{name}: {(time.perf_counter() - start) / 50 * 1e6:.0f} us per call (sync each call: {sync})")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        table = prof.key_averages()
        print(f"== {name}, by host time")
        print(table.table(sort_by="self_cpu_time_total", row_limit=25))
        print(f"== {name}, by device time")
        print(table.table(sort_by="self_cuda_time_total", row_limit=15))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
