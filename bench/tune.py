"""Sweep launch parameters and algorithm choices of the kernels on this GPU; the shipped defaults come from
these tables (each says which constant it informs). In this order (the newest, untimed choices first):

- linear_ce_backward_tuning: the linear cross-entropy backward per method, one sweep (fp32 dhidden accumulator)
  at several chunk widths and two sweeps, with its scratch memory, bf16 D=1024, N=16k with V in (51258, 30522),
  and N=1024, V=30522 (a VideoBERT step's masked tokens of one head) (SCRATCH_SHARE, BUDGET_MIN_ROWS, MIN_CHUNK
  and LINEAR_BACKWARD_METHODS in kernels/triton/cross_entropy.py: the default takes one sweep where it fits).
- linear_ce_tuning: the linear cross-entropy forward as one kernel ("fused", per LINEAR_CONFIG candidate),
  as GEMM chunks + the softmax kernel ("chunked") and as eager F.linear + F.cross_entropy (LINEAR_FORWARD,
  LINEAR_CONFIG), bf16 N=16k, D=1024, V=51258; and the fused kernel's vocabulary splits per row block, fixed
  counts against the launcher's choice (`vocab_splits`) at N = 4k, 16k and 19.2k.
- layer_norm_tuning: the LayerNorm backward, bf16, 16k rows, residual and bias. Triton: elements per program
  (rows per program x padded hidden), warps, programs per multiprocessor, software-pipelining depth of the loop
  over row tiles (`launch_config`, PROGRAMS_PER_SM, backward_loop_stages in kernels/triton/add_layer_norm.py); CUDA:
  its grid (`auto` is what the launcher picks).
- softmax_ce_tuning: the Triton softmax cross-entropy forward and backward, (BLOCK_M, BLOCK_V, warps)
  (SOFTMAX_CONFIG in kernels/triton/cross_entropy.py), bf16 logits 16k x 51258, and the backward on the ~2.1k-wide
  chunks of the one-sweep linear backward (whose lanes the whole-row tile of 8192 mostly masks).
Small kernels are timed as CUDA-graph replays (device time, no host launch overhead), millisecond-scale ones
with do_bench. Usage: python bench/tune.py [--quick] [--budget-s 150]; --quick times the launchers' choices
against a few alternatives, gives the LayerNorm sweep 30 s and skips the softmax one (scripts/gpu_check.sh
quick caps the whole run at 50 s). Needs a GPU (exits 0 without one).
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (bench_graph_ms, bench_ms, extra_memory_bytes, markdown_table, measure_peaks, on_gpu,  # noqa: E402
                    rotating, write_results)

from videobert._kernels.triton.launch import multiprocessors  # noqa: E402

ROWS = 16384
HIDDEN = (768, 1024, 2048, 4096, 8192)


def triton_rows(hidden: int, copy_gbps: float, deadline: float) -> list[dict]:
    """Device times of the Triton LayerNorm backward per launch choice at this hidden size, until `deadline`."""
    from videobert._kernels.triton import add_layer_norm as tln

    x, r, dout = (torch.randn(ROWS, hidden, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    w, b = torch.ones(hidden, device="cuda", dtype=torch.bfloat16), torch.zeros(hidden, device="cuda",
                                                                                 dtype=torch.bfloat16)
    _, s, mean, rstd = tln.add_layer_norm_fwd(x, r, w, b, 1e-12, 0.0, None)
    sets = rotating(dout, s, mean, rstd, w)
    block_n = triton.next_power_of_2(hidden)
    default = tln.launch_config(hidden, backward=True)
    shipped = (*default[1:], tln.PROGRAMS_PER_SM, tln.backward_loop_stages(hidden))
    row_choices = sorted({max(1, e // block_n) for e in (block_n, 2048, 4096, 8192)})
    # First the shipped tile at each loop pipelining depth and 2 or 3 programs per multiprocessor, then every tile
    # shape, warps and programs per multiprocessor without pipelining, while the budget lasts.
    candidates = [(*default[1:], per_sm, stages) for stages in (1, 2, 3) for per_sm in (2, 3)]
    candidates += [(rows, warps, per_sm, 1) for rows, warps, per_sm in
                   itertools.product(row_choices, (4, 8, 16), (2, 4, 8))]
    out = []
    for rows, warps, per_sm, stages in dict.fromkeys(candidates):
        if time.monotonic() > deadline or warps * 32 > block_n * rows:
            continue
        config = (block_n, rows, warps)
        # A config that cannot run (e.g. more shared memory than the card has) prints why and gives None.
        timing = bench_graph_ms(lambda dout, s, mean, rstd, w: tln.add_layer_norm_bwd(
            dout, None, s, mean, rstd, w, True, True, 0.0, None, config=config, programs_per_sm=per_sm,
            loop_stages=stages), sets, rep_ms=10)
        if timing:
            out.append(dict(kernel="triton_bwd", hidden=hidden, rows_per_program=rows, warps=warps,
                            per_sm=per_sm, loop_stages=stages, default=(rows, warps, per_sm, stages) == shipped,
                            device_ms=timing[0], pct_of_copy=_pct(hidden, timing[0], copy_gbps), blocks=""))
    return out


def cuda_rows(hidden: int, copy_gbps: float) -> list[dict]:
    """Device times of the CUDA LayerNorm backward per grid size (none without the extension)."""
    try:
        from videobert._kernels.cuda import library
    except ImportError as exc:
        print(f"no CUDA extension: {exc}")
        return []
    s, dout = (torch.randn(ROWS, hidden, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mean, rstd = torch.zeros(ROWS, device="cuda"), torch.ones(ROWS, device="cuda")
    w = torch.ones(hidden, device="cuda", dtype=torch.bfloat16)
    dx, dres = torch.empty_like(s), torch.empty_like(s)
    dw, db = torch.empty_like(w), torch.empty_like(w)
    sets = rotating(dout, s, mean, rstd, dx, dres)  # outputs too: rewriting one buffer would hit lines in L2
    sms = multiprocessors(torch.device("cuda"))
    auto = library.add_layer_norm_bwd_blocks(ROWS, hidden, s.dtype, w.dtype, s.device)
    dtype = library.DTYPES[torch.bfloat16]
    out = []
    for label, blocks in [("auto", auto)] + [(str(k), k * sms) for k in (1, 2, 4, 8, 16)]:
        partial = torch.empty(2, blocks, hidden, device="cuda")
        timing = bench_graph_ms(lambda dout, s, mean, rstd, dx, dres: library.call(
            "vb_add_layer_norm_bwd", dout.data_ptr(), None, s.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
            w.data_ptr(), dx.data_ptr(), dres.data_ptr(), partial[0].data_ptr(), partial[1].data_ptr(), dw.data_ptr(),
            db.data_ptr(), ROWS, hidden, blocks, dtype, dtype, None, 0, 1.0, 0, s.device.index,
            library.stream(s.device)), sets, rep_ms=10)
        if timing:
            out.append(dict(kernel="cuda_bwd", hidden=hidden, rows_per_program="", warps="", per_sm=label,
                            loop_stages="", default=label == "auto", device_ms=timing[0],
                            pct_of_copy=_pct(hidden, timing[0], copy_gbps), blocks=blocks))
    return out


def _pct(hidden: int, ms: float, copy_gbps: float) -> float:
    """Share of the copy bandwidth: the backward reads dout and s and writes dx and dresidual."""
    return 100 * 4 * ROWS * hidden * 2 / ms / 1e6 / copy_gbps


def softmax_rows(copy_gbps: float) -> list[dict]:
    """Device times of the Triton softmax cross-entropy forward and backward per (BLOCK_M, BLOCK_V, warps), on whole
    rows and (chunk_*) the backward in place on the chunks the one-sweep linear backward feeds it (D = 1024)."""
    from videobert._kernels.triton import cross_entropy as ce

    N, V = 16384, 51258
    logits = (4 * torch.randn(N, V, device="cuda")).to(torch.bfloat16)
    labels = torch.randint(0, V, (N,), device="cuda")
    dloss = torch.ones(N, device="cuda")
    grad = torch.empty_like(logits)
    width = min(V, ce._one_sweep_cols(N, 1024, V, torch.bfloat16, logits.device) or 2048)
    chunk = logits[:, :width].contiguous()
    shipped = {d: ce.SOFTMAX_CONFIG[d]["gpu"] for d in ("fwd", "bwd")}
    out = []
    for config in [(4, 1024, 8), (1, 2048, 4), (1, 4096, 8), (1, 8192, 16), (2, 2048, 8), (2, 4096, 16),
                   (8, 512, 8), (1, 16384, 32)]:
        for direction in ("fwd", "bwd"):
            ce.SOFTMAX_CONFIG[direction]["gpu"] = config
        try:
            _, lse, _ = ce.softmax_cross_entropy_fwd(logits, labels, -100, 0.0)
            # 1.6 GB of logits are 30x the L2 cache: `rotating` would add no copy.
            fwd = bench_graph_ms(lambda: ce.softmax_cross_entropy_fwd(logits, labels, -100, 0.0), rep_ms=20)
            bwd = bench_graph_ms(lambda: ce.softmax_cross_entropy_bwd(dloss, None, logits, labels, lse, -100, 0.0,
                                                                      out=grad), rep_ms=20)
            chunk_bwd = bench_graph_ms(lambda: ce.softmax_cross_entropy_bwd(
                dloss, None, chunk, labels, lse, -100, 0.0, out=chunk, col0=0, vocab=V), rep_ms=20)
        except Exception as exc:  # a config that does not compile or fit is reported, not fatal
            print(f"softmax config {config}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            continue
        finally:
            for direction in ("fwd", "bwd"):
                ce.SOFTMAX_CONFIG[direction]["gpu"] = shipped[direction]
        if fwd and bwd and chunk_bwd:
            nbytes = logits.numel() * logits.element_size()
            bm, bv, warps = config
            out.append(dict(block_m=bm, block_v=bv, warps=warps, fwd_default=config == shipped["fwd"],
                            bwd_default=config == shipped["bwd"], fwd_ms=fwd[0], bwd_ms=bwd[0],
                            fwd_pct_of_copy=100 * nbytes / fwd[0] / 1e6 / copy_gbps,
                            bwd_pct_of_copy=100 * 2 * nbytes / bwd[0] / 1e6 / copy_gbps, chunk_width=width,
                            chunk_bwd_ms=chunk_bwd[0],
                            chunk_bwd_pct_of_copy=100 * 2 * nbytes * width / V / chunk_bwd[0] / 1e6 / copy_gbps))
    return out


def linear_rows(matmul_tflops: float, quick: bool = False) -> list[dict]:
    """Times of the linear cross-entropy forward per method and fused-kernel config (N = 16k; `quick`: eager and
    the shipped config only), and of the fused kernel's vocabulary splits per row block (the launcher's choice
    against fixed counts) at N = 4k, 16k, 19.2k."""
    from videobert._kernels.triton import cross_entropy as ce

    D, V = 1024, 51258
    shipped = ce.LINEAR_CONFIG["gpu"]

    def fused(splits=None):
        return lambda h, w, y: ce.linear_cross_entropy_fwd(h, w, y, None, -100, 0.0, method="fused", splits=splits)
    cases = [(16384, "eager", None, None, lambda h, w, y: F.cross_entropy(F.linear(h, w).float(), y,
                                                                          reduction="none"))]
    sweep = [shipped]
    if not quick:  # the chunked forward and the other configs lost on 2026-11-25
        cases.append((16384, "chunked", None, None, lambda h, w, y: ce.linear_cross_entropy_fwd(
            h, w, y, None, -100, 0.0, method="chunked")))
        sweep += [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 4, 3), (128, 128, 32, 4, 4)]
    cases += [(16384, "fused", config, None, fused()) for config in dict.fromkeys(sweep)]  # shipped once
    for N in (4096, 16384, 19200):  # 32, 128 and 150 row blocks of 128 (the last: a nearly empty second wave)
        cases += [(N, "fused", None, splits, fused(splits)) for splits in (1, 2, 4, 8)]
        cases += [(N, "fused", None, None, fused())] if N != 16384 else []  # 16k: the sweep's first row
    out, inputs = [], {}
    for N, method, config, splits, fn in cases:
        if N not in inputs:
            hidden = torch.randn(N, D, device="cuda", dtype=torch.bfloat16)
            weight = (torch.randn(V, D, device="cuda") * D ** -0.5).to(torch.bfloat16)
            inputs[N] = rotating(hidden, weight, torch.randint(0, V, (N,), device="cuda"))
        ce.LINEAR_CONFIG["gpu"] = config or shipped
        try:
            chosen = ce.forward_splits(N, V, torch.device("cuda"))[1]  # the launcher's count for this config
            ms = bench_ms(fn, inputs[N])[0]
        except Exception as exc:  # a config that does not compile or fit is reported, not fatal
            print(f"linear forward N={N} {method} {config} splits={splits}: {type(exc).__name__}: "
                  f"{str(exc).splitlines()[0]}")
            continue
        finally:
            ce.LINEAR_CONFIG["gpu"] = shipped
        flops = 2.0 * N * D * V
        out.append(dict(N=N, method=method, config=str(config or ""),
                        splits=splits or (f"default ({chosen})" if method == "fused" else ""),
                        default=method == ce.LINEAR_FORWARD and (config or shipped) == shipped and not splits,
                        fwd_ms=ms, tflops=flops / ms / 1e9, pct_of_matmul=100 * flops / ms / 1e9 / matmul_tflops))
    return out


def linear_backward_rows(quick: bool = False) -> list[dict]:
    """Times and scratch memory of the linear cross-entropy backward per method, and which one the launcher
    picks by default: N = 16k at V = 51258 and 30522 (one sweep at several chunk widths too, unless `quick`), and
    a VideoBERT step's ~1k masked tokens of one head (N = 1024, V = 30522, below BUDGET_MIN_ROWS)."""
    from videobert._kernels.triton import cross_entropy as ce

    D = 1024
    out = []
    for N, V in ((16384, 51258), (16384, 30522), (1024, 30522)):
        hidden = torch.randn(N, D, device="cuda", dtype=torch.bfloat16)
        weight = (torch.randn(V, D, device="cuda") * D ** -0.5).to(torch.bfloat16)
        labels = torch.randint(0, V, (N,), device="cuda")
        _, lse, _ = ce.linear_cross_entropy_fwd(hidden, weight, labels, None, -100, 0.0)
        dloss = torch.full((N,), 1.0 / N, device="cuda")
        default = ce.default_backward_method(N, D, V, hidden.dtype, hidden.device)
        cases = [(method, None) for method in ce.LINEAR_BACKWARD_METHODS]
        if not quick and N >= ce.BUDGET_MIN_ROWS["gpu"]:
            cases += [("one_sweep", chunk) for chunk in (1024, 2048, 4096, 8192)]
        for method, chunk in cases:
            def backward(method=method, chunk=chunk):
                return ce.linear_cross_entropy_bwd(dloss, None, hidden, weight, labels, None, lse, -100, 0.0,
                                                   method=method, chunk=chunk)
            try:
                scratch = extra_memory_bytes(backward)  # beyond the gradients it returns
                ms = bench_ms(backward)[0]
            except Exception as exc:  # a method that cannot run here is reported, not fatal
                print(f"linear backward {method} N={N} V={V}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
                continue
            out.append(dict(N=N, V=V, method=method, chunk=chunk or "default",
                            default=method == default and not chunk, bwd_ms=ms, scratch_mib=scratch / 2**20,
                            scratch_pct_of_fp32_logits=100 * scratch / (4 * N * V)))
    return out


def main(argv=None) -> int:
    """Run the sweeps; writes <table>.{csv,json,md} beside the other results."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budget-s", type=float, default=150.0,
                        help="seconds of Triton configs in all (an equal share per hidden size)")
    parser.add_argument("--quick", action="store_true", help="the launchers' choices against a few alternatives "
                        "each, a 30-second budget for the LayerNorm sweep, no softmax config sweep")
    args = parser.parse_args(argv)
    if args.quick:
        args.budget_s = min(args.budget_s, 30.0)
    if not on_gpu():
        print("No CUDA device: the tuning sweep needs a GPU; nothing to do.")
        return 0
    peaks = measure_peaks()
    # The newest, never-timed choices first: a capped run (scripts/gpu_check.sh quick) keeps what finished.
    backward = linear_backward_rows(quick=args.quick)
    write_results("linear_ce_backward_tuning", backward, {"peaks": peaks})
    print(markdown_table(backward))
    linear = linear_rows(peaks["matmul_tflops"], quick=args.quick)
    write_results("linear_ce_tuning", linear, {"peaks": peaks})
    print(markdown_table(linear))
    results = []
    for hidden in HIDDEN:
        results += cuda_rows(hidden, peaks["copy_gbps"])
    for hidden in HIDDEN:  # an equal share of the budget each
        results += triton_rows(hidden, peaks["copy_gbps"], time.monotonic() + args.budget_s / len(HIDDEN))
        write_results("layer_norm_tuning", results, {"peaks": peaks, "rows": ROWS})
    if args.quick:
        print("--quick: no softmax cross-entropy config sweep (its configs were chosen on the 2026-11-25 H100 run)")
    else:
        softmax = softmax_rows(peaks["copy_gbps"])
        write_results("softmax_ce_tuning", softmax, {"peaks": peaks})
        print(markdown_table(softmax))
    best = {}
    for row in results:
        key = (row["kernel"], row["hidden"])
        if key not in best or row["device_ms"] < best[key]["device_ms"]:
            best[key] = row
    print(markdown_table([r for r in results if r["default"]] + list(best.values())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
