"""Host time of a training step with every GPU kernel stubbed out: what the Python layers, PyTorch's dispatcher
and the launchers cost per step, the part of a step a GPU cannot hide when its kernels are short.

On the CPU (Triton's interpreter entry points replaced by no-ops, so no kernel work is done; PyTorch's own CPU
ops of a small model still run) it times, for the same batches: the eager step (forward, backward, clipping,
AdamW) through the fused ops, and the host work of a `--cuda-graphs` step (`GraphedSteps`: the static batch,
the copies into the captured buffers, the metrics' copies; the graph launch itself is one driver call, stubbed
here too). It also counts the Triton launches of an eager step: each costs host time on a GPU. These are CPU
proxies, not GPU figures. Usage: python bench/host_overhead.py [--steps 20] [--preset tiny].
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors reach the (stubbed) Triton entry points

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_results  # noqa: E402

from videobert.config import PRESETS, VideoBERTConfig  # noqa: E402
from videobert.data import random_pretraining_batch, static_batch  # noqa: E402
from videobert.model import VideoBERTForPretraining  # noqa: E402
from videobert.train import GraphedSteps, _metrics  # noqa: E402


class StubbedLaunches:
    """Within the block, Triton kernel launches do nothing and are counted."""

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction

        self.target, self.launches = InterpretedFunction, 0
        self.original = InterpretedFunction.run

        def run(fn, *args, **kwargs):
            self.launches += 1
        InterpretedFunction.run = run
        return self

    def __exit__(self, *exc):
        self.target.run = self.original


def eager_step(model, optimizer, batch) -> dict:
    """One step as videobert/train.py's eager loop takes it (one micro-batch)."""
    optimizer.zero_grad(set_to_none=True)
    output = model(**batch.model_inputs())
    output["loss"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return _metrics(output)


def main(argv=None) -> int:
    """Time both paths; writes host_overhead.{csv,json,md} under bench/results/cpu-smoke/ (or VIDEOBERT_BENCH_OUT)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--preset", default="large", choices=PRESETS, help="the depth to time (widths are toy)")
    parser.add_argument("--samples", type=int, default=4, help="samples per batch (rows of 32 tokens)")
    args = parser.parse_args(argv)
    # The preset's depth (the number of ops per step is what costs host time) at toy widths, so that the CPU's
    # own arithmetic stays small beside the host work being measured.
    layers = VideoBERTConfig.preset(args.preset).num_layers
    config = VideoBERTConfig(hidden_size=16, num_layers=layers, num_heads=1, intermediate_size=32,
                             text_vocab_size=1000, num_visual_tokens=64, backend="triton")
    batches = [random_pretraining_batch(config, args.samples, 32, seed=i) for i in range(args.steps + 2)]
    torch.manual_seed(0)
    model = VideoBERTForPretraining(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # one call, as on a GPU
    rows = []
    with StubbedLaunches() as stub:
        eager_step(model, optimizer, batches[0])  # first-call costs (backend resolution, imports)
        stub.launches = 0
        start = time.perf_counter()
        for batch in batches[1:args.steps + 1]:
            eager_step(model, optimizer, batch)
        eager_ms = (time.perf_counter() - start) * 1e3 / args.steps
        launches = stub.launches / args.steps
        graphed = GraphedSteps(model, optimizer, lambda b: static_batch(b, config), 1.0, torch.device("cpu"),
                               warmup=0, capture=lambda fn, pool: (lambda: None, {k: v for k, v in fn().items()}))
        graphed(batches[0])  # captures (here: runs once)
        start = time.perf_counter()
        for batch in batches[1:args.steps + 1]:
            graphed(batch)
        graphed_ms = (time.perf_counter() - start) * 1e3 / args.steps
    rows.append(dict(preset=args.preset, layers=config.num_layers, path="eager", host_ms_per_step=eager_ms,
                     triton_launches_per_step=launches))
    rows.append(dict(preset=args.preset, layers=config.num_layers, path="cuda_graphs", host_ms_per_step=graphed_ms,
                     triton_launches_per_step=0))
    if not torch.cuda.is_available():  # CPU proxies never go to a GPU's results folder
        os.environ.setdefault("VIDEOBERT_BENCH_OUT", str(Path(__file__).resolve().parent / "results" / "cpu-smoke"))
    write_results("host_overhead", rows, {"note": "CPU, kernel launches stubbed: host-side proxies"})
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
