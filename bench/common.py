"""Shared benchmark plumbing: timing, the card's measured peaks, and result files tagged with the GPU name.

Timing on a GPU is `triton.testing.do_bench` (CUDA events, warm-up, L2 flushed between runs): the median with
20th/80th percentiles in milliseconds, host launch overhead included as an eager caller sees it. Where the host
is the bottleneck (small kernels), `bench_graph_ms` replays the same call from a CUDA graph: the device time.
Both take the call's arguments as `rotating` sets: consecutive calls read different copies of the inputs, whose
total is several times the L2 cache, so neither a CUDA-graph replay (which does not flush L2) nor anything that
caches by input finds the previous call's data still warm.
Without a GPU every script runs a toy-size smoke pass on the CPU and labels its numbers as such.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import itertools
import json
import os
import re
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

RESULTS_ROOT = Path(__file__).resolve().parent / "results"


def on_gpu() -> bool:
    """Whether benchmarks run for real (a CUDA device is present)."""
    return torch.cuda.is_available()


def device_name() -> str:
    """The GPU's name, or "cpu-smoke" when there is none."""
    return torch.cuda.get_device_name() if on_gpu() else "cpu-smoke"


# A cycle through the rotating sets reads at least this many times the cache; more sets than MAX_SETS buy nothing.
CACHE_MULTIPLE = 4
MAX_SETS = 8
CPU_CACHE_BYTES = 32 * 2**20  # a typical last-level cache: the smoke pass rotates too


def cache_bytes() -> int:
    """Bytes a repeated call could be served from: the GPU's L2 cache (a nominal 32 MiB on the CPU)."""
    return torch.cuda.get_device_properties(0).L2_cache_size if on_gpu() else CPU_CACHE_BYTES


def _nbytes(args: Sequence) -> int:
    storages = {a.untyped_storage().data_ptr(): a.untyped_storage().nbytes() for a in args
                if isinstance(a, torch.Tensor)}
    return sum(storages.values())


def _fresh(arg):
    if not isinstance(arg, torch.Tensor):
        return arg
    return arg.detach().clone().requires_grad_(arg.requires_grad)


def rotating(*args, min_bytes: int | None = None) -> list[tuple]:
    """Argument sets for `bench_ms` / `bench_graph_ms`: `args` itself, then copies of its tensors (same values
    and requires_grad) until one cycle reads at least `min_bytes` (default CACHE_MULTIPLE x `cache_bytes()`);
    at most MAX_SETS sets and, on a GPU, no more copies than a quarter of the free memory holds."""
    min_bytes = CACHE_MULTIPLE * cache_bytes() if min_bytes is None else min_bytes
    per_set = max(1, _nbytes(args))
    count = min(MAX_SETS, max(1, -(-min_bytes // per_set)))
    if on_gpu():
        count = max(1, min(count, 1 + torch.cuda.mem_get_info()[0] // 4 // per_set))
    return [tuple(args)] + [tuple(_fresh(a) for a in args) for _ in range(count - 1)]


def cycling(fn: Callable[..., object], sets: Sequence[tuple] | None) -> Callable[[], object]:
    """A no-argument call of `fn` on the next of `sets` each time (`fn` itself when `sets` is None)."""
    if sets is None:
        return fn
    if not sets:
        raise ValueError("sets: expected at least one argument tuple, got none")
    order = itertools.cycle(sets)
    return lambda: fn(*next(order))


def bench_ms(fn: Callable[..., object], sets: Sequence[tuple] | None = None, warmup_ms: int = 25,
             rep_ms: int = 100) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of `fn(*set)` over the `rotating` sets (of `fn()` without them); CUDA
    events on a GPU, a short wall-clock loop on the CPU."""
    fn = cycling(fn, sets)
    if on_gpu():
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return median, p20, p80
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[1], times[0], times[-1]


def bench_graph_ms(fn: Callable[..., object], sets: Sequence[tuple] | None = None,
                   rep_ms: int = 100) -> tuple[float, float, float] | None:
    """(median, p20, p80) device milliseconds of `fn(*set)` over the `rotating` sets replayed from one CUDA
    graph (no host launch overhead; no L2 flush, which the rotation stands in for), or None without a GPU or
    when `fn` cannot be captured (the reason is printed)."""
    if not on_gpu():
        return None
    import triton.testing

    fn = cycling(fn, sets)
    try:
        median, p20, p80 = triton.testing.do_bench_cudagraph(fn, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    except Exception as exc:  # e.g. a peer that synchronises with the host inside the call
        print(f"no CUDA-graph timing: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return None
    return median, p20, p80


def device_times(fwd: Callable[..., object], fwd_bwd: Callable[..., object],
                 sets: Sequence[tuple]) -> dict[str, float]:
    """Median device milliseconds per mode ("fwd", "fwd+bwd" and their difference "bwd") from CUDA-graph replays
    of `fwd` and `fwd_bwd` over the rotating sets; a mode whose capture failed (or every mode without a GPU) is
    left out."""
    times = {}
    for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        timed = bench_graph_ms(fn, sets)
        if timed:
            times[mode] = timed[0]
    if len(times) == 2:
        times["bwd"] = times["fwd+bwd"] - times["fwd"]
    return times


def extra_memory_bytes(fn: Callable[[], Sequence]) -> int | None:
    """Bytes `fn()` allocates at its peak beyond the tensors it returns (the scratch of an op whose outputs are
    its gradients), or None without a GPU."""
    if not on_gpu():
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    outputs = fn()
    torch.cuda.synchronize()
    returned = sum(t.numel() * t.element_size() for t in outputs if t is not None)
    return torch.cuda.max_memory_allocated() - base - returned


def dropout_rates(text: str) -> list[float]:
    """argparse type: dropout rates from "0,0.1", each in [0, 1)."""
    try:
        rates = [float(part) for part in text.split(",")]
    except ValueError:
        rates = []
    if not rates or any(not 0 <= r < 1 for r in rates):
        raise argparse.ArgumentTypeError(f"expected comma-separated rates in [0, 1), got {text!r}")
    return rates


def measure_peaks() -> dict:
    """The card's dense bf16 matmul rate (TFLOP/s) and device-to-device copy bandwidth (GB/s, read + write),
    measured now: the references that percentages in the tables are taken against."""
    if not on_gpu():
        return {"matmul_tflops": float("nan"), "copy_gbps": float("nan")}
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    matmul_ms = bench_ms(lambda: a @ b)[0]
    src = torch.empty(512 * 2**20, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src))[0]
    return {"matmul_tflops": 2 * n**3 / matmul_ms / 1e9, "copy_gbps": 2 * src.numel() / copy_ms / 1e6}


def results_dir() -> Path:
    """bench/results/<gpu-name>/<date>/ (created), or the VIDEOBERT_BENCH_OUT directory if set."""
    if os.environ.get("VIDEOBERT_BENCH_OUT"):
        path = Path(os.environ["VIDEOBERT_BENCH_OUT"])
    else:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", device_name()).strip("-")
        path = RESULTS_ROOT / slug / _dt.date.today().isoformat()
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_results(name: str, rows: Sequence[dict], meta: dict) -> Path:
    """Write rows as <name>.csv, <name>.json (with meta: device, peaks, versions) and <name>.md; returns the folder."""
    out = results_dir()
    meta = {"device": device_name(), "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__, "gpu_figures": on_gpu(), **meta}
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": list(rows)}, indent=2))
    if rows:
        columns = list(rows[0])
        with open(out / f"{name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        (out / f"{name}.md").write_text(f"# {name} on {meta['device']} ({meta['date']})\n\n" + markdown_table(rows))
    if out.resolve().is_relative_to(RESULTS_ROOT.resolve()) and on_gpu():
        update_index()
    return out


# Everything from this line on in the index is written by hand (the goals table) and kept when it is rewritten.
INDEX_KEEP_MARKER = "<!-- Written by hand from here on: kept when the index above is rewritten. -->"


def update_index(root: Path = RESULTS_ROOT) -> Path:
    """Rewrite root/README.md: one line per results folder (card, date, folder, its tables), newest first, then
    whatever followed INDEX_KEEP_MARKER, unchanged."""
    index = root / "README.md"
    old = index.read_text() if index.exists() else ""
    kept = old[old.index(INDEX_KEEP_MARKER):] if INDEX_KEEP_MARKER in old else ""
    entries = {}
    for path in sorted(root.rglob("*.json")):
        try:
            meta = json.loads(path.read_text()).get("meta", {})
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        folder = path.parent.relative_to(root).as_posix()
        entry = entries.setdefault(folder, {"device": meta.get("device", "?"), "date": meta.get("date", ""),
                                            "tables": []})
        entry["tables"].append(path.stem)
        entry["date"] = max(entry["date"], meta.get("date", ""))
    lines = ["# Recorded benchmark runs", "",
             "Written by `bench/common.py` after every run under this folder; each folder holds the tables as",
             "CSV, JSON (with the card, versions and the peaks measured in that run) and markdown, and the plots.",
             "", "| card | date | folder | tables |", "|---|---|---|---|"]
    for folder, e in sorted(entries.items(), key=lambda kv: kv[1]["date"], reverse=True):
        lines.append(f"| {e['device']} | {e['date']} | [{folder}]({folder}) | {', '.join(sorted(e['tables']))} |")
    index.write_text("\n".join(lines) + "\n" + ("\n" + kept if kept else ""))
    return index


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def markdown_table(rows: Sequence[dict]) -> str:
    """Rows as a markdown table (also printed to the terminal by the scripts)."""
    if not rows:
        return "(no rows)\n"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot(path: Path, rows: Sequence[dict], x: str, y: str, series: Sequence[str], title: str) -> None:
    """A PNG line plot of `y` against `x`, one line per distinct value of the `series` columns (skipped
    with a message when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib not installed: no plot {path.name}")
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    groups: dict[tuple, list] = {}
    for row in rows:
        if isinstance(row.get(y), (int, float)):
            groups.setdefault(tuple(row[s] for s in series), []).append((row[x], row[y]))
    for key, points in groups.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=" ".join(map(str, key)))
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(f"{title} ({device_name()})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
