"""Benchmark `segment_attention` (Triton) against SDPA, FlexAttention and flash-attn varlen.

Rows of VideoBERT-like packed samples (text 10-60 tokens, video 10-120, plus [CLS] [>] [SEP]) and rows of one
sample each, D=64 with BERT-base/large head counts, L in 512..4096, 16k tokens per batch, each without dropout
and with 0.1 (training's rate). Peers as a user without this project would run them: on one-sample rows SDPA
without a mask (its flash/cuDNN backends), on packed rows SDPA with the dense mask built per call and
FlexAttention compiled with a block mask from `create_block_mask(..., _compile=True)` (also with max-autotune
under --max-autotune); flash-attn varlen wherever importable; a peer without dropout sits out those rows.
Forward, backward and forward+backward; TFLOP/s count only allowed (query, key) pairs (forward 4*H*D per pair,
backward 2.5x). Per-batch setups (this kernel's metadata, FlexAttention's block mask) are timed alone and also
reported added to each call ("videobert+metadata", "flex+create_block_mask"), which compare with each other.
`ms` is the time per call as a caller sees it, host overhead included (a small packed case can be bound by it);
`device_ms` replays the calls from a CUDA graph (device time alone; this kernel's includes its metadata launch,
which a capture rebuilds). Our rows name the autotuned configs (`configs`).
Usage: python bench/attention.py [--quick] [--layouts packed,single] [--dropouts 0,0.1] [--max-autotune].
Without a GPU it runs a toy smoke pass on the CPU and says so.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the smoke pass runs the Triton kernel in the interpreter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (bench_ms, device_name, device_times, dropout_rates, markdown_table, measure_peaks,  # noqa: E402
                    on_gpu, plot, rotating, write_results)

from videobert._kernels.reference import attention_allowed  # noqa: E402
from videobert._kernels.triton.segment_attention import (attention_metadata, reset_autotuning,  # noqa: E402
                                                         tuned_configs, work_items)
from videobert.data import allowed_pairs  # noqa: E402
from videobert.ops import segment_attention  # noqa: E402

TOKENS_PER_BATCH = 16384


def videobert_rows(B: int, L: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment_ids, modality_ids) of rows packed with VideoBERT-like samples in order; tails are padding."""
    seg = torch.full((B, L), -1, dtype=torch.int32)
    mod = torch.zeros((B, L), dtype=torch.int32)
    for b in range(B):
        start, index = 0, 0
        while True:
            text = int(torch.randint(10, 61, (), generator=gen))
            video = int(torch.randint(10, 121, (), generator=gen))
            n = text + video + 3
            if start + n > L:
                break
            seg[b, start:start + n] = index
            mod[b, start + text + 2:start + n] = 1
            start, index = start + n, index + 1
    return seg, mod


def providers(seg, layout: str, dropout_p: float, max_autotune: bool = False):
    """name -> (per-batch setup: (label, ms) or None, callable(q, k, v) -> out); each only when it can run here
    (a peer without dropout is left out of the dropout rows, saying so). A setup is what a packed batch costs
    once, shared by every layer: this kernel's metadata and work items (reused while the same ids come back, so
    timed calls skip them) and FlexAttention's block mask (built by `create_block_mask(..., _compile=True)`, as its docs
    advise for per-batch masks)."""
    device = seg.device
    metadata_ms = bench_ms(lambda: work_items(attention_metadata(seg, None, None)[0]))[0]
    out = {"videobert": (("metadata", metadata_ms), lambda q, k, v: segment_attention(
        q, k, v, seg, dropout_p=dropout_p, backend="triton"))}

    if layout == "single":  # what a user without this project runs on full rows: no mask, the flash backend
        def sdpa(q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p).transpose(1, 2)
        out["sdpa"] = (None, sdpa)
    else:
        def sdpa_masked(q, k, v):
            mask = attention_allowed(seg, None, None)[:, None]  # built per call: packed batches change every step
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                dropout_p=dropout_p).transpose(1, 2)
        out["sdpa_dense_mask"] = (None, sdpa_masked)
    try:
        from torch.nn.attention import flex_attention as flex
    except ImportError:
        flex = None
    if flex is not None and dropout_p > 0:
        print("flex: FlexAttention has no dropout; no row with dropout")
    elif flex is not None:
        B, L = seg.shape

        def mask_mod(b, h, i, j):
            return (seg[b, i] == seg[b, j]) & (seg[b, i] >= 0)

        def build():
            return flex.create_block_mask(mask_mod, B, None, L, L, device=device, _compile=on_gpu())

        block_mask = build()
        mask_ms = bench_ms(build)[0]
        modes = {"flex": {}}
        if max_autotune and on_gpu():
            modes["flex_max_autotune"] = {"mode": "max-autotune-no-cudagraphs"}
        for name, options in modes.items():
            attend = torch.compile(flex.flex_attention, **options) if on_gpu() else flex.flex_attention
            out[name] = (("create_block_mask", mask_ms),
                         (lambda attend: lambda q, k, v: attend(q.transpose(1, 2), k.transpose(1, 2),
                                                                v.transpose(1, 2), block_mask=block_mask
                                                                ).transpose(1, 2))(attend))
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        flash_attn_varlen_func = None
    if flash_attn_varlen_func is None or not on_gpu():
        print("flash_attn_varlen: " + ("flash-attn not importable" if flash_attn_varlen_func is None else
                                       "GPU only") + "; no row")
    else:
        lengths = torch.stack([torch.bincount(r[r >= 0].long(), minlength=1) for r in seg.cpu()], 0)
        lengths = lengths[lengths > 0].to(torch.int32)
        cu = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0)).to(device)
        real = (seg.flatten() >= 0).nonzero().squeeze(1)
        max_len = int(lengths.max())

        def flash(q, k, v):
            q, k, v = (t.flatten(0, 1)[real] for t in (q, k, v))
            return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout_p)
        out["flash_attn_varlen"] = (None, flash)
    return out


def _rates(flops, ms, p20, p80, peak_tflops):
    """Timing columns of a row: milliseconds, TFLOP/s and the share of the measured matmul peak (if measured)."""
    tflops = flops / ms / 1e9
    return dict(ms=ms, p20_ms=p20, p80_ms=p80, tflops=tflops,
                pct_of_matmul_peak=100 * tflops / peak_tflops if peak_tflops == peak_tflops else "")


def run_case(layout, L, H, D, dtype, device, peak_tflops, dropout_p=0.0, max_autotune=False):
    """Rows of every provider (fwd, bwd, fwd+bwd) on one layout ("packed" VideoBERT-like samples or "single"
    sample rows), shape and dropout rate; TFLOP/s counted on allowed pairs only. Our rows name the configs the
    autotuner chose for each kernel."""
    B = max(1, TOKENS_PER_BATCH // L) if on_gpu() else 2
    gen = torch.Generator().manual_seed(L)  # the same rows and inputs with and without dropout
    if layout == "packed":
        seg, _ = videobert_rows(B, L, gen)
    else:
        seg = torch.zeros((B, L), dtype=torch.int32)
    seg = seg.to(device)
    pairs = allowed_pairs(seg.cpu())
    fwd_flops = 4.0 * pairs * H * D
    # From the CPU generator: a peer whose CUDA-graph capture fails can leave the CUDA generator unusable.
    q, k, v, dout = (torch.randn(B, L, H, D).to(device, dtype) for _ in range(4))
    sets = rotating(*(t.requires_grad_() for t in (q, k, v)), dout)  # dout: the gradient of the output (q's shape)
    reset_autotuning()  # each layout is its own workload: packed rows must not pick one-sample rows' tiles
    named = providers(seg, layout, dropout_p, max_autotune)
    modes = {name: {"fwd": lambda q, k, v, dout, fn=fn: fn(q, k, v),
                    "fwd+bwd": lambda q, k, v, dout, fn=fn: torch.autograd.grad(fn(q, k, v), (q, k, v), dout)}
             for name, (_, fn) in named.items()}
    timings = {}
    for name, (setup, fn) in named.items():
        timings[name] = {}
        try:
            timings[name]["fwd"] = bench_ms(modes[name]["fwd"], sets)
            graphs = [(fn(q, k, v), (q, k, v), dout) for q, k, v, dout in sets]
            timings[name]["bwd"] = bench_ms(
                lambda out, inputs, dout: torch.autograd.grad(out, inputs, dout, retain_graph=True), graphs)
            del graphs
            timings[name]["fwd+bwd"] = bench_ms(modes[name]["fwd+bwd"], sets)
        except Exception as exc:  # a peer that cannot run (part of) this case is reported, not fatal
            print(f"{name} on {layout} L={L}: no {'fwd' if not timings[name] else 'bwd'} "
                  f"({type(exc).__name__}: {str(exc).splitlines()[0]})")
    rows = []
    for name, (setup, fn) in named.items():  # device times after every eager timing: a failed capture spoils none
        on_device = device_times(modes[name]["fwd"], modes[name]["fwd+bwd"], sets) if timings[name] else {}
        setup_ms = setup[1] if setup else None
        for mode, (ms, p20, p80) in timings[name].items():
            flops = fwd_flops * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]
            device_ms = on_device.get(mode)
            row = dict(layout=layout, L=L, H=H, D=D, B=B, dtype=str(dtype).replace("torch.", ""),
                       dropout=dropout_p, mode=mode, provider=name, **_rates(flops, ms, p20, p80, peak_tflops),
                       device_ms=device_ms or "", device_tflops=flops / device_ms / 1e9 if device_ms else "",
                       setup_ms=setup_ms if setup_ms is not None else "",
                       configs=tuned_configs() if name == "videobert" else "")
            rows.append(row)
            if setup_ms is not None and mode != "bwd":
                rows.append(dict(row, provider=f"{name}+{setup[0]}", with_setup=True, device_ms="", device_tflops="",
                                 **_rates(flops, ms + setup_ms, p20 + setup_ms, p80 + setup_ms, peak_tflops)))
    # Rows with their per-batch setup compare with this kernel's own row with setup, the others without.
    ours = {(r["mode"], r.get("with_setup", False)): r["ms"] for r in rows if r["provider"].startswith("videobert")}
    for row in rows:
        key = (row["mode"], row.pop("with_setup", False))
        row["speedup_of_videobert"] = row["ms"] / ours[key] if key in ours else ""
    return rows


def _layouts(text: str) -> list[str]:
    """Layout names from "packed,single"; each must be one of those two."""
    names = text.split(",")
    if not names or any(name not in ("packed", "single") for name in names):
        raise argparse.ArgumentTypeError(f"expected comma-separated layouts of packed, single, got {text!r}")
    return names


def main(argv=None) -> int:
    """Run the attention benchmark; writes results under bench/results/<gpu>/<date>/."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="L=2048 only, BERT-large heads")
    parser.add_argument("--layouts", default="packed,single", type=_layouts,
                        help="comma-separated layouts of packed (VideoBERT-like samples) and single (one per row)")
    parser.add_argument("--dropouts", default="0,0.1", type=dropout_rates,
                        help="attention dropout rates, each a case of its own (training runs 0.1)")
    parser.add_argument("--max-autotune", action="store_true",
                        help="also FlexAttention compiled with mode=max-autotune-no-cudagraphs (minutes of tuning)")
    args = parser.parse_args(argv)
    if not on_gpu():
        print("No CUDA device: running a toy-size smoke pass on the CPU (Triton interpreter). "
              "These are NOT GPU figures.")
        cases = [c for c in [("packed", 160, 2, 16), ("single", 32, 2, 16)] if c[0] in args.layouts]
        dtype, device = torch.float32, "cpu"
    else:
        lengths = [2048] if args.quick else [512, 1024, 2048, 4096]
        heads = [16] if args.quick else [12, 16]
        cases = [(layout, L, H, 64) for layout in args.layouts for L in lengths for H in heads]
        dtype, device = torch.bfloat16, "cuda"
    peaks = measure_peaks()
    rows = []
    for layout, L, H, D in cases:
        for dropout_p in args.dropouts:
            rows += run_case(layout, L, H, D, dtype, device, peaks["matmul_tflops"], dropout_p, args.max_autotune)
            # Written after every case so that a run cut short still leaves its finished rows.
            out = write_results("attention", rows, {"peaks": peaks, "tokens_per_batch": TOKENS_PER_BATCH})
    print(markdown_table(rows))
    plot(out / "attention.png", [r for r in rows if r["mode"] == "fwd+bwd"], "L", "tflops",
         ["layout", "H", "dropout", "provider"], "segment attention fwd+bwd, TFLOP/s on allowed pairs")
    print(f"results in {out} ({device_name()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
