"""Benchmark the fused MLM loss `linear_cross_entropy` against PyTorch eager, torch.compile, PyTorch's own
chunked `F.linear_cross_entropy` (where this torch has it), Liger and Cut Cross-Entropy: forward+backward time and
the extra GPU memory beyond inputs and gradients.

Each provider computes mean cross-entropy over hidden @ weight.T for N masked tokens (bf16, 10% ignored rows)
and the gradients of hidden and weight, on inputs whose logits look like a trained MLM head's (`mlm_like_inputs`:
p(target) about 0.3), not N(0, 1) noise. Peers also run at the vocabulary padded to a multiple of 64 (`vocab_run`;
TFLOP/s always count the real vocabulary). Extra memory = peak allocated during forward+backward minus what the
inputs and the gradients themselves take; the eager logits (N x V fp32) are reported for reference. Our rows
name the fused forward's tile, vocabulary splits and the backward's method (`configs`).
A second table, softmax_cross_entropy, times the loss over logits that already exist (Triton, CUDA, PyTorch
eager, Liger's cross-entropy): forward+backward GB/s, counting one read of the logits forward and one read plus
one write of their gradient backward, as a share of the copy bandwidth measured in the same run.
Usage: python bench/mlm_loss.py [--quick]. Without a GPU it runs a toy smoke pass on the CPU and says so.
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
from common import (bench_ms, device_name, extra_memory_bytes, markdown_table, measure_peaks,  # noqa: E402
                    on_gpu, plot, rotating, write_results)

from videobert._kernels.triton import cross_entropy as tce  # noqa: E402
from videobert.ops import BackendUnavailableError, linear_cross_entropy, softmax_cross_entropy  # noqa: E402
from videobert.ops._backend import resolve  # noqa: E402


def _eager(h, w, labels):
    return F.cross_entropy(F.linear(h, w).float(), labels, ignore_index=-100)


def providers() -> dict:
    """name -> callable(hidden, weight, labels) -> scalar loss; each only when it can run here."""
    backend = "triton"
    out = {"videobert_triton": lambda h, w, labels: linear_cross_entropy(h, w, labels, backend=backend),
           "torch_eager": _eager}
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if options is not None:  # PyTorch's own chunked fused loss, where this torch has it
        out["torch_linear_cross_entropy"] = lambda h, w, labels: F.linear_cross_entropy(
            h, w, labels, ignore_index=-100, options=options())
    else:
        print("torch.nn.functional.linear_cross_entropy (chunked) not in this torch: no row")
    if not on_gpu():
        print("torch_compile, Liger and Cut Cross-Entropy rows: GPU only")
    else:
        out["torch_compile"] = torch.compile(_eager, dynamic=True)
        try:
            from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
            out["liger_fused_linear_ce"] = lambda h, w, labels: LigerFusedLinearCrossEntropyFunction.apply(
                h, w, labels, None, None, -100)[0]
        except ImportError:
            print("liger-kernel not importable: no Liger row")
        try:
            from cut_cross_entropy import linear_cross_entropy as cce
            out["cut_cross_entropy"] = lambda h, w, labels: cce(h, w, labels, ignore_index=-100)
        except ImportError:
            print("cut-cross-entropy not importable: no CCE row")
    return out


def mlm_like_inputs(N: int, D: int, V: int, gen: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden, weight, labels) whose logits look like a trained MLM head's, not N(0, 1) noise (which would leave
    Cut Cross-Entropy's gradient filtering nothing to skip): weight rows of unit norm, logits N(0, 2^2) plus 12
    on the target, i.e. p(target) about 0.3 and a loss about 1.2 at V = 51k, BERT-like; 10% ignored rows."""
    weight = torch.randn(V, D, generator=gen) * D ** -0.5
    labels = torch.randint(0, V, (N,), generator=gen)
    target = weight[labels]
    hidden = 2 * torch.randn(N, D, generator=gen) + 12 * target / target.square().sum(1, keepdim=True)
    labels = torch.where(torch.rand(N, generator=gen) < 0.1, -100, labels)
    return hidden, weight, labels


def linear_configs(N: int, D: int, V: int, dtype, device) -> str:
    """Our fused forward's tile config and vocabulary splits, and the backward's method, at this shape."""
    device = torch.device(device)
    tile = tce.LINEAR_CONFIG["gpu" if device.type == "cuda" else "interpret"]
    _, splits = tce.forward_splits(N, V, device)
    return (f"fwd {'x'.join(map(str, tile[:3]))} w{tile[3]} s{tile[4]} splits {splits}; "
            f"bwd {tce.default_backward_method(N, D, V, dtype, device)}")


def run_case(N: int, D: int, V: int, dtype, device) -> list[dict]:
    """Rows of every linear cross-entropy provider at one shape: forward+backward time, TFLOP/s and the memory
    allocated beyond inputs and gradients; each peer also at the vocabulary padded to a multiple of 64 (extra
    weight rows: the aligned shape a model may pad its embedding to), ours at the vocabulary as given."""
    gen = torch.Generator().manual_seed(N + D + V)
    hidden, weight, labels = mlm_like_inputs(N, D, V, gen)
    hidden, labels = hidden.to(device, dtype).requires_grad_(), labels.to(device)
    V64 = -(-V // 64) * 64
    weights = {V: weight.to(device, dtype).requires_grad_()}
    if V64 != V:
        pad = torch.randn(V64 - V, D, generator=gen) * D ** -0.5
        weights[V64] = torch.cat([weight, pad]).to(device, dtype).requires_grad_()
    results = []
    for name, fn in providers().items():
        def step(hidden, weight, labels):
            return torch.autograd.grad(fn(hidden, weight, labels), (hidden, weight))
        for vocab, w in weights.items():
            if name.startswith("videobert") and vocab != V:
                continue
            sets = rotating(hidden, w, labels)
            try:
                step(*sets[0])
                extra = extra_memory_bytes(lambda: step(*sets[0]))  # beyond the gradients it returns
                extra = "" if extra is None else extra / 2**20
                ms, p20, p80 = bench_ms(step, sets)
            except Exception as exc:  # a peer that cannot run this case is reported, not fatal
                print(f"{name} N={N} D={D} V={vocab}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
                continue
            flops = 6.0 * N * D * V  # logits, dhidden, dweight over the real vocabulary: padding is no work
            logits_mib = N * V * 4 / 2**20  # the eager fp32 logits
            results.append(dict(N=N, D=D, V=V, vocab_run=vocab, dtype=str(dtype).replace("torch.", ""),
                                provider=name, ms=ms, p20_ms=p20, p80_ms=p80, tflops=flops / ms / 1e9,
                                extra_mib=extra, eager_logits_mib=logits_mib,
                                extra_pct_of_eager_logits=100 * extra / logits_mib if extra != "" else "",
                                configs=linear_configs(N, D, V, dtype, device) if name == "videobert_triton"
                                else ""))
    ours = next((r["ms"] for r in results if r["provider"] == "videobert_triton"), None)
    for row in results:
        row["speedup_of_videobert"] = row["ms"] / ours if ours else ""
    return results


def softmax_providers(device: torch.device, dtype: torch.dtype) -> dict:
    """name -> callable(logits, labels) -> scalar loss; each only when it can run here."""
    out = {}
    for backend in ("triton", "cuda"):
        try:
            resolve("softmax_cross_entropy", backend, device, dtype)
        except BackendUnavailableError as exc:
            print(f"videobert_{backend}: {exc}")
            continue
        out[f"videobert_{backend}"] = (lambda backend: lambda logits, labels: softmax_cross_entropy(
            logits, labels, backend=backend))(backend)
    out["torch_eager"] = lambda logits, labels: F.cross_entropy(logits, labels, ignore_index=-100)
    if on_gpu():
        try:
            from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction
            out["liger_cross_entropy"] = lambda logits, labels: LigerCrossEntropyFunction.apply(
                logits, labels, None, -100)[0]
        except ImportError:
            print("liger-kernel not importable: no Liger row")
    return out


def run_softmax_case(N: int, V: int, dtype, device, copy_gbps: float) -> list[dict]:
    """Rows of every softmax cross-entropy provider on given (N, V) logits: forward+backward time and GB/s."""
    gen = torch.Generator().manual_seed(N + V)
    logits = (4 * torch.randn(N, V, generator=gen)).to(device, dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=gen)
    labels = torch.where(torch.rand(N, generator=gen) < 0.1, -100, labels).to(device)
    moved = 3 * logits.numel() * logits.element_size()
    sets = rotating(logits, labels)
    results = []
    for name, fn in softmax_providers(torch.device(device), dtype).items():
        try:
            ms, p20, p80 = bench_ms(lambda logits, labels: torch.autograd.grad(fn(logits, labels), (logits,)), sets)
        except Exception as exc:  # a peer that cannot run this case is reported, not fatal
            print(f"{name} N={N} V={V}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            continue
        gbps = moved / ms / 1e6
        results.append(dict(N=N, V=V, dtype=str(dtype).replace("torch.", ""), provider=name, ms=ms, p20_ms=p20,
                            p80_ms=p80, gbps=gbps, pct_of_copy=100 * gbps / copy_gbps if copy_gbps == copy_gbps
                            else ""))
    ours = min((r["ms"] for r in results if r["provider"].startswith("videobert")), default=None)
    for row in results:
        row["speedup_of_best_videobert"] = row["ms"] / ours if ours else ""
    return results


def main(argv=None) -> int:
    """Run the MLM loss benchmark; writes results under bench/results/<gpu>/<date>/."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="N=16k, D=1024, V=51258 only")
    args = parser.parse_args(argv)
    if not on_gpu():
        print("No CUDA device: running a toy-size smoke pass on the CPU (Triton interpreter). "
              "These are NOT GPU figures.")
        cases, dtype, device = [(32, 64, 300)], torch.float32, "cpu"
    else:
        cases = [(16384, 1024, 51258)] if args.quick else [
            (N, D, V) for N in (4096, 16384, 65536) for D in (768, 1024) for V in (30522, 20736, 51258)]
        dtype, device = torch.bfloat16, "cuda"
    peaks = measure_peaks()
    results = []
    for N, D, V in cases:
        results += run_case(N, D, V, dtype, device)
        out = write_results("mlm_loss", results, {"peaks": peaks, "ignored_fraction": 0.1})
    print(markdown_table(results))
    plot(out / "mlm_loss.png", results, "N", "ms", ["D", "V", "provider"], "MLM loss forward+backward, ms")
    softmax_cases = sorted({(N, V) for N, _, V in cases})
    softmax_rows = []
    for N, V in softmax_cases:
        softmax_rows += run_softmax_case(N, V, dtype, device, peaks["copy_gbps"])
        write_results("softmax_cross_entropy", softmax_rows, {"peaks": peaks, "ignored_fraction": 0.1})
    print(markdown_table(softmax_rows))
    print(f"results in {out} ({device_name()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
