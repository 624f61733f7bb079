"""Benchmark `add_layer_norm` (Triton and CUDA) against PyTorch eager, torch.compile, apex and Liger.

Every provider computes out = LayerNorm(dropout(x) + residual) (and s = dropout(x) + residual) and its backward
(dx, dresidual, dweight, dbias), without dropout and with 0.1 (training's rate; the peers run F.dropout before
their add). GB/s count the bytes a fused kernel must move, each tensor once (forward: read x and residual,
write out and s; backward: read dout and s, write dx and dresidual), for every provider, and are reported as a
share of the device-to-device copy bandwidth measured in the same run. `ms` is what an eager caller waits
(host launch overhead included: it dominates below a few hundred microseconds); `device_ms` replays the same
forward, or forward+backward, from a CUDA graph, and the backward's device time is their difference. Our Triton
rows name their launch configs (`configs`).
Usage: python bench/layer_norm.py [--quick] [--dtypes bf16,fp16] [--dropouts 0,0.1] (--quick: 16k rows, bf16,
hidden 768, 1024, 4096). Without a GPU it runs a toy smoke pass on the CPU and says so.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the smoke pass runs the Triton kernel in the interpreter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (bench_ms, device_name, device_times, dropout_rates, markdown_table, measure_peaks,  # noqa: E402
                    on_gpu, plot, rotating, write_results)

from videobert._kernels.triton import add_layer_norm as tln  # noqa: E402
from videobert.ops import BackendUnavailableError, add_layer_norm  # noqa: E402
from videobert.ops._backend import resolve  # noqa: E402

EPS = 1e-12
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _eager(x, r, w, b, dropout_p=0.0):
    s = F.dropout(x, dropout_p) + r if dropout_p else x + r
    return F.layer_norm(s, s.shape[-1:], w, b, EPS), s


def providers(device: torch.device, dtype: torch.dtype, hidden: int, dropout_p: float = 0.0) -> dict:
    """name -> callable(x, r, w, b) -> (out, s), s = dropout(x) + r; each only when it can run here."""
    out = {}
    for backend in ("triton", "cuda"):
        try:
            resolve("add_layer_norm", backend, device, dtype, hidden_size=hidden)
        except BackendUnavailableError as exc:
            print(f"videobert_{backend}: {exc}")
            continue
        out[f"videobert_{backend}"] = (lambda backend: lambda x, r, w, b: add_layer_norm(
            x, r, w, b, EPS, dropout_p=dropout_p, return_residual=True, backend=backend))(backend)
    out["torch_eager"] = lambda x, r, w, b: _eager(x, r, w, b, dropout_p)
    if not on_gpu():
        print("torch_compile, apex and Liger rows: GPU only")
    else:
        # The backward is timed by replaying one graph (retain_graph), which donated buffers forbid.
        import torch._functorch.config

        torch._functorch.config.donated_buffer = False
        compiled = torch.compile(_eager, dynamic=True)
        out["torch_compile"] = lambda x, r, w, b: compiled(x, r, w, b, dropout_p)
    try:
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine
    except ImportError:
        fused_layer_norm_affine = None
    if fused_layer_norm_affine is not None and on_gpu():
        def apex(x, r, w, b):
            s = F.dropout(x, dropout_p) + r if dropout_p else x + r
            return fused_layer_norm_affine(s, w, b, s.shape[-1:], EPS), s
        out["apex_add+fused_layer_norm"] = apex
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    except ImportError:
        LigerLayerNormFunction = None
    if LigerLayerNormFunction is not None and on_gpu():
        def liger(x, r, w, b):
            s = F.dropout(x, dropout_p) + r if dropout_p else x + r
            return LigerLayerNormFunction.apply(s, w, b, EPS), s
        out["liger_add+layer_norm"] = liger
    return out


def launch_configs(hidden: int) -> str:
    """The Triton kernels' launch configs at this hidden size (not autotuned: fixed per size)."""
    block_n, rows, warps = tln.launch_config(hidden)
    bwd_block, bwd_rows, bwd_warps = tln.launch_config(hidden, backward=True)
    return (f"fwd {rows}x{block_n} w{warps}; bwd {bwd_rows}x{bwd_block} w{bwd_warps} "
            f"s{tln.backward_loop_stages(hidden)} {tln.PROGRAMS_PER_SM}/SM")


def fwd_bwd(fn):
    """A call of `fn` and the gradients of all four inputs, on one rotating set (x, r, w, b, dout)."""
    return lambda x, r, w, b, dout: torch.autograd.grad(fn(x, r, w, b)[0], (x, r, w, b), dout)


def run_case(rows: int, hidden: int, dtype: torch.dtype, device, copy_gbps: float, dropout_p: float = 0.0
             ) -> list[dict]:
    """Rows of every provider (fwd, bwd, fwd+bwd) at one shape and dropout rate: times, GB/s and share of the
    copy bandwidth."""
    # Inputs come from the CPU generator: a peer whose CUDA-graph capture fails can leave the CUDA generator
    # unusable for the rest of the process.
    x, r, dout = (torch.randn(rows, hidden).to(device, dtype) for _ in range(3))
    x, r = x.requires_grad_(), r.requires_grad_()
    w = (1 + 0.1 * torch.randn(hidden)).to(device, dtype).requires_grad_()
    b = (0.1 * torch.randn(hidden)).to(device, dtype).requires_grad_()
    sets = rotating(x, r, w, b, dout)
    element = x.element_size()
    moved = {"fwd": 4 * rows * hidden * element, "bwd": 4 * rows * hidden * element}
    moved["fwd+bwd"] = moved["fwd"] + moved["bwd"]
    timings = {}
    named = providers(torch.device(device), dtype, hidden, dropout_p)
    for name, fn in named.items():
        timings[name] = {}
        try:
            timings[name]["fwd"] = bench_ms(lambda x, r, w, b, dout: fn(x, r, w, b), sets)
            graphs = [(fn(x, r, w, b)[0], (x, r, w, b), dout) for x, r, w, b, dout in sets]
            timings[name]["bwd"] = bench_ms(lambda out, leaves, dout: torch.autograd.grad(
                out, leaves, dout, retain_graph=True), graphs)
            del graphs  # their graphs would tie the leaves' autograd nodes to this stream during capture below
            timings[name]["fwd+bwd"] = bench_ms(fwd_bwd(fn), sets)
        except Exception as exc:  # a peer that cannot run (part of) this case is reported, not fatal
            print(f"{name} rows={rows} hidden={hidden}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    # Device times after every eager timing, ours first: a failed capture cannot spoil the eager figures.
    results = []
    for name, fn in named.items():
        on_device = device_times(lambda x, r, w, b, dout: fn(x, r, w, b), fwd_bwd(fn), sets) if timings[name] else {}
        for mode, (ms, p20, p80) in timings[name].items():
            gbps = moved[mode] / ms / 1e6
            device_ms = on_device.get(mode)
            device_gbps = moved[mode] / device_ms / 1e6 if device_ms else None
            results.append(dict(rows=rows, hidden=hidden, dtype=str(dtype).replace("torch.", ""),
                                dropout=dropout_p, mode=mode, provider=name, ms=ms, p20_ms=p20, p80_ms=p80, gbps=gbps,
                                pct_of_copy=100 * gbps / copy_gbps if copy_gbps == copy_gbps else "",
                                device_ms=device_ms if device_ms else "",
                                device_pct_of_copy=100 * device_gbps / copy_gbps if device_gbps else "",
                                configs=launch_configs(hidden) if name == "videobert_triton" else ""))
    for mode in ("fwd", "bwd", "fwd+bwd"):
        ours = min((row["ms"] for row in results if row["mode"] == mode and row["provider"].startswith("videobert")),
                   default=None)
        for row in results:
            if row["mode"] == mode:
                row["speedup_of_best_videobert"] = row["ms"] / ours if ours else ""
    return results


def main(argv=None) -> int:
    """Run the LayerNorm benchmark; writes results under bench/results/<gpu>/<date>/."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="16k rows, bf16 only, hidden 768, 1024, 4096")
    parser.add_argument("--dtypes", default="bf16,fp16", help="comma-separated of bf16, fp16, fp32")
    parser.add_argument("--dropouts", default="0,0.1", type=dropout_rates,
                        help="dropout rates on x, each a case of its own (training runs 0.1)")
    args = parser.parse_args(argv)
    if not on_gpu():
        print("No CUDA device: running a toy-size smoke pass on the CPU (Triton interpreter). "
              "These are NOT GPU figures.")
        cases, device = [(64, 768, torch.float32)], "cpu"
    else:
        dtypes = [torch.bfloat16] if args.quick else [DTYPES[d] for d in args.dtypes.split(",")]
        row_counts = [16384] if args.quick else [16384, 65536]
        hiddens = (768, 1024, 4096) if args.quick else (768, 1024, 2048, 4096, 8192)
        cases = [(rows, hidden, dtype) for dtype in dtypes for rows in row_counts for hidden in hiddens]
        device = "cuda"
    peaks = measure_peaks()
    results = []
    for rows, hidden, dtype in cases:
        for dropout_p in args.dropouts:
            results += run_case(rows, hidden, dtype, device, peaks["copy_gbps"], dropout_p)
            out = write_results("layer_norm", results, {"peaks": peaks, "eps": EPS})
    print(markdown_table(results))
    plot(out / "layer_norm.png", [r for r in results if r["mode"] != "fwd+bwd"], "hidden", "gbps",
         ["rows", "dtype", "dropout", "mode", "provider"],
         "residual add + dropout + LayerNorm, GB/s (fused-ideal bytes)")
    print(f"results in {out} ({device_name()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
