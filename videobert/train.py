"""The compact pretraining loop: `videobert pretrain`.

One step: a packed batch from the data stream (see `videobert.samples`), forward under bf16 autocast on a GPU
(fp32 on the CPU), backward, gradient clipping, AdamW (fused on a GPU) with no weight decay on biases and
LayerNorm weights, linear warmup then linear decay. Every `log_every` steps (and the last) a line of metrics goes
to `OUT/metrics.jsonl` and the terminal; every `eval_every` steps a held-out split is scored. Checkpoints (model and
optimizer tensors as safetensors, everything else as JSON: nothing is unpickled) are written to a temporary
folder renamed into place, the last `keep` kept, always one at the end, and on SIGINT/SIGTERM before exiting.
`--resume` continues from the newest one and reproduces the uninterrupted run exactly on the CPU. Several
processes (torchrun) train with DDP, or with `--fsdp` with FSDP2 (parameters, gradients and optimizer state
sharded per encoder layer: for `large`), each rank on its own shard of batches; rank 0 logs and writes the
checkpoints, which hold full (unsharded) tensors either way.
MFU counts 6 x (non-embedding parameters) + 12 x layers x hidden x (mean attended keys) FLOPs per real token.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from videobert._optional import require
from videobert.checkpoint import full_state, latest_checkpoint, load_checkpoint, save_checkpoint, step_folders
from videobert.config import PRESETS, VideoBERTConfig
from videobert.data import allowed_pairs, static_batch
from videobert.logs import LEVELS, LOGGER, configure_logging
from videobert.flags import COUNT, NATURAL, NON_NEGATIVE, POSITIVE, RATE, SHARE, add_dataclass_flags, flag, write_config
from videobert.model import VideoBERTForPretraining, VideoBERTModel
from videobert.ops import manual_seed
from videobert.profiling import nvtx_range
from videobert.real_data import DataError, VideoFolder, check_bert_vocabulary, folder_tokenizer, held_out_videos
from videobert.samples import BatchDataset, PretrainingStream, SampleOptions, synthetic_videos
from videobert.text_tokenizer import TextTokenizer
from videobert.tracking import REPORTERS, open_reporter

OBJECTIVES = ("text_mlm", "visual_mlm", "vtm")
SCHEDULES = ("linear", "cosine")  # --schedule: the decay after the warmup (lr_factor)
FEATURE_MODES = ("tokens", "continuous")  # --features: clips as visual tokens, or as their feature vectors
SYNTHETIC_FEATURE_DIM = 64  # clip features of the synthetic corpus with --features continuous
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, by GPU name


@dataclass
class LoopArgs:
    """What the training loop itself is configured by; pretraining (`TrainArgs`) and fine-tuning
    (`videobert.finetune.FinetuneArgs`) add what their data and model need."""

    out: str = flag("runs/demo", "the run folder: run.json, config.yaml, metrics.jsonl, curves.png, checkpoints/")
    steps: int = flag(300, "optimizer steps in all (a resumed run continues to this step)", COUNT)
    seed: int = flag(0, "seed of the initialisation, the data stream and dropout")
    lr: float = flag(1e-3, "peak learning rate (AdamW)", NON_NEGATIVE)
    warmup: int = flag(30, "steps of linear warmup to --lr", NATURAL)
    schedule: str = flag("linear", "learning-rate decay after the warmup, to 0 at --steps", choices=SCHEDULES)
    weight_decay: float = flag(0.01, "AdamW weight decay (none on biases and LayerNorm weights)", NON_NEGATIVE)
    clip: float = flag(1.0, "gradient clipping: the largest global gradient norm", POSITIVE)
    grad_accum: int = flag(1, "micro-batches accumulated per optimizer step", COUNT)
    report_to: str = flag("none", "also write the metrics rows to TensorBoard (OUT/tensorboard) or Weights & "
                                  "Biases (each needs its package: pip install 'videobert[tensorboard]' or '[wandb]')",
                          choices=REPORTERS)
    num_workers: int = flag(0, "processes building batches (DataLoader workers; 0: the training process)", NATURAL)
    log_every: int = flag(10, "steps between metrics lines (metrics.jsonl and the log)", COUNT)
    eval_every: int = flag(100, "steps between held-out evaluations and checkpoints", COUNT)
    keep: int = flag(2, "checkpoints kept (the newest)", COUNT)
    on_nan: str = flag("stop", "a non-finite loss: stop the run (no checkpoint) or skip the step",
                       choices=("stop", "skip"))
    compile: bool = flag(False, "torch.compile the model")
    compile_mode: str = flag("default", "torch.compile mode with --compile (reduce-overhead: Inductor's CUDA graphs)",
                             choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    cuda_graphs: bool = flag(False, "capture whole steps (forward, backward, optimizer) per batch shape as CUDA "
                                    "graphs and replay them (one GPU)")
    gradient_checkpointing: bool = flag(False, "recompute each encoder layer in the backward (less activation "
                                               "memory)")
    fsdp: bool = flag(False, "with several processes (torchrun): FSDP2, sharded per encoder layer, instead of DDP")
    dist_timeout: int = flag(600, "seconds a collective waits for the other processes before the run stops",
                             COUNT)
    resume: bool = flag(False, "continue the run in --out from its newest intact checkpoint")
    overwrite: bool = flag(False, "clear --out's previous run first (without it or --resume a used --out is refused)")
    profile_steps: Optional[str] = flag(None, "A:B: cudaProfilerStart/Stop around steps A to B (for nsys)")
    log_level: str = flag("info", "the least important messages shown (rank 0's; other ranks show warnings and "
                                  "errors)", choices=LEVELS)


@dataclass
class TrainArgs(LoopArgs):
    """Everything a pretraining run is configured by (saved as OUT/run.json)."""

    preset: str = flag("tiny", "model size", choices=PRESETS)
    data: str = flag("synthetic", "'synthetic' (the embedded corpus) or a data folder (see the README's Data)")
    features: str = flag("tokens", "clips as visual tokens, or as their feature vectors (continuous: DATA/features/"
                                   "<id>.npy; synthetic: token_features)", choices=FEATURE_MODES)
    videos_per_batch: int = flag(8, "videos whose samples make one batch", COUNT)
    row_length: int = flag(128, "tokens per packed row", COUNT)
    num_videos: int = flag(4000, "synthetic data: training videos", COUNT)
    eval_videos: int = flag(0, "held-out videos (0: 64 synthetic ones, or --eval-share of a data folder's)", NATURAL)
    eval_share: float = flag(0.1, "share of a data folder's videos held out when --eval-videos is 0", SHARE)
    vocab_size: int = flag(400, "synthetic data: word pieces of the WordPiece vocabulary trained on it", COUNT)
    text_mlm_weight: float = flag(1.0, "weight of the text masked-LM loss", NON_NEGATIVE)
    visual_mlm_weight: float = flag(1.0, "weight of the visual masked-LM loss", NON_NEGATIVE)
    vtm_weight: float = flag(1.0, "weight of the video-text matching loss", NON_NEGATIVE)
    nce_weight: float = flag(0.0, "weight of the contrastive video-text loss (in-batch InfoNCE); 0: off", NON_NEGATIVE)
    hidden_dropout: float = flag(0.1, "dropout rate of the hidden states", RATE)
    attention_dropout: float = flag(0.1, "dropout rate of the attention probabilities", RATE)
    sample_mix: str = flag("0.6,0.2,0.2", "joint, text-only and video-only sample shares")
    max_concat: int = flag(3, "neighbouring sentences joined into one sample at most", COUNT)
    max_stride: int = flag(5, "clips subsampled with a random stride up to this", COUNT)
    negative_rate: float = flag(0.5, "share of joint samples paired with another video's clips (matching label 0)",
                                SHARE)
    init_from_bert: Optional[str] = flag(None, "a Hugging Face BERT folder to start from (its sizes and word "
                                               "pieces; needs the hf extra)")
    on_bad_data: str = flag("stop", "a bad video file: stop the run (checkpoint first) or skip it (counted in the "
                                    "log)", choices=("stop", "skip"))


@dataclass
class Job:
    """What the loop trains: `model(**batch.model_inputs())` returns a dict with "loss" and per-objective
    `<name>_loss` / `<name>_acc`; `stream` yields (batch, stats) and saves its position (`state_dict`);
    `evaluate(model, device)` scores the held-out split ("eval_*" keys); `summary(row)` is a log line's tail."""

    config: VideoBERTConfig
    model: torch.nn.Module
    stream: object
    evaluate: Callable[[torch.nn.Module, torch.device], dict]
    summary: Callable[[dict], str]
    info: dict  # written to OUT/run.json on a fresh start
    # A batch with static shapes (`videobert.data.static_batch`), for --cuda-graphs and reduce-overhead compiles;
    # None where the job has no such form.
    make_static: Optional[Callable[[object], object]] = None


# ------------------------------------------------------------------------------------------- data and model

def build(args: TrainArgs, out: Path, rank: int, world: int):
    """(model config, tokenizer, train stream, eval stream) for the run's data."""
    if args.features not in FEATURE_MODES:
        raise ValueError(f"--features must be one of {', '.join(FEATURE_MODES)}, got {args.features!r}")
    continuous = args.features == "continuous"
    try:
        mix = tuple(float(x) for x in args.sample_mix.split(","))
    except ValueError:
        raise ValueError(f"sample_mix must be three comma-separated numbers, got {args.sample_mix!r}") from None
    options = SampleOptions(mix=mix, max_concat=args.max_concat, max_stride=args.max_stride,
                            max_tokens=min(args.row_length, 128), negative_prob=args.negative_rate,
                            nce=args.nce_weight > 0, continuous=continuous)
    num_eval = args.eval_videos or (64 if args.data == "synthetic" else 0)
    if args.eval_videos and args.eval_videos < args.videos_per_batch:
        raise ValueError(f"eval_videos ({args.eval_videos}) must be at least videos_per_batch "
                         f"({args.videos_per_batch}): the held-out split is scored in whole batches")
    bert_dir = Path(args.init_from_bert) if args.init_from_bert else None
    if bert_dir is not None:  # BERT's own word pieces, as the paper started from BERT-large
        tokenizer = TextTokenizer.from_vocab(bert_dir / "vocab.txt")
        if args.data != "synthetic":
            check_bert_vocabulary(args.data, bert_dir, tokenizer)
    elif args.data != "synthetic":
        tokenizer = folder_tokenizer(args.data)
    elif (out / "vocab.txt").exists():
        tokenizer = TextTokenizer.from_vocab(out / "vocab.txt")
    else:
        from videobert.corpus import synthetic_corpus

        tokenizer = TextTokenizer.train((s.text for v in synthetic_corpus(200, seed=args.seed) for s in v.sentences),
                                        vocab_size=args.vocab_size)
    if rank == 0:  # the run folder carries its vocabulary, so a checkpoint is usable on its own
        tokenizer.save(out)
    if args.data == "synthetic":
        feature_dim = SYNTHETIC_FEATURE_DIM if continuous else None
        train_videos = synthetic_videos(args.seed, feature_dim=feature_dim)
        eval_videos = synthetic_videos(args.seed + 1_000_003, feature_dim=feature_dim)
        num_train = args.num_videos
    else:
        folder = VideoFolder(args.data, skip_bad=args.on_bad_data == "skip")
        folder.with_features = continuous
        feature_dim = None
        if continuous:  # the first video's dimension; every other file is checked against it
            if not (folder.root / "features").is_dir():
                raise ValueError(f"--features continuous: {folder.root / 'features'} does not exist (one (clips, F) "
                                 ".npy of clip features per video)")
            feature_dim = folder.features(folder.ids[0]).shape[1]
        num_eval, message = held_out_videos(len(folder), args.eval_videos, args.eval_share, args.videos_per_batch,
                                            world, args.data)
        if rank == 0:
            LOGGER.info(message)
        num_train = len(folder) - num_eval
        train_videos = folder.videos
        eval_videos = lambda start, stop: folder.videos(num_train + start, num_train + stop)  # noqa: E731
    fields = dict(text_mlm_weight=args.text_mlm_weight, visual_mlm_weight=args.visual_mlm_weight,
                  vtm_weight=args.vtm_weight, nce_weight=args.nce_weight, hidden_dropout=args.hidden_dropout,
                  attention_dropout=args.attention_dropout, video_feature_dim=feature_dim,
                  **tokenizer.config_overrides())
    if continuous and rank == 0:
        LOGGER.info("--features continuous: clips enter as their feature vectors; the objectives are text MLM and "
                    "video-text matching (and the contrastive one with --nce-weight): visual MLM predicts visual "
                    "tokens, so it is off")
    if bert_dir is not None:
        transformers = require("transformers", "hf", "--init-from-bert")
        config = VideoBERTConfig.from_bert_config(transformers.BertConfig.from_pretrained(bert_dir), **fields)
    else:
        config = VideoBERTConfig.preset(args.preset, **fields)
    if args.data != "synthetic":
        folder.num_visual_tokens = config.num_visual_tokens
    common = dict(encode_text=tokenizer.encode, config=config, options=options, row_length=args.row_length,
                  videos_per_batch=args.videos_per_batch, seed=args.seed)
    train = PretrainingStream(train_videos, num_train, rank=rank, world_size=world, **common)
    held_out = PretrainingStream(eval_videos, num_eval, **common)
    return config, tokenizer, train, held_out


def make_model(args: TrainArgs, config: VideoBERTConfig) -> VideoBERTForPretraining:
    """A fresh model, or one initialised from a Hugging Face BERT checkpoint folder (its sizes and word pieces;
    the word table grows by the visual tokens)."""
    if args.init_from_bert is None:
        return VideoBERTForPretraining(config)
    transformers = require("transformers", "hf", "--init-from-bert")
    return VideoBERTForPretraining.from_bert(transformers.BertForPreTraining.from_pretrained(args.init_from_bert),
                                             config)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on biases, LayerNorm weights and 1-D parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, warmup: int, total: int, kind: str = "linear") -> float:
    """The learning rate of step `step` (from 0) over the peak: linear warmup over `warmup` steps, then linear or
    cosine decay to 0 at `total` (`kind`)."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return max(0.0, (total - step) / max(1, total - warmup))


def flops_per_token(config: VideoBERTConfig, model: torch.nn.Module, mean_keys: float) -> float:
    """Training FLOPs per real token: 6 x non-embedding parameters + attention (12 x layers x hidden x keys)."""
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    dense = sum(p.numel() for p in model.parameters()) - embedding
    return 6.0 * dense + 12.0 * config.num_layers * config.hidden_size * mean_keys


# ------------------------------------------------------------------------------------------- the loop

PLAIN_PROGRESS_SECONDS = 30.0  # between progress lines where stderr is not a terminal


class _Progress:
    """A run's progress (steps, the last logged loss, tokens/s, time left) on rank 0 (`show`): a tqdm bar on a
    terminal's stderr, with log lines printed above it, else a plain line through `log` every `every` seconds
    (files, CI, nohup). `tokens` and `loss` are kept up to date by the loop."""

    def __init__(self, total: int, first: int, show: bool, terminal: bool, log: Callable[[str], None],
                 every: Optional[float] = None):
        self.total, self.first, self.log = total, first, log
        self.every = PLAIN_PROGRESS_SECONDS if every is None else every
        self.start = self.shown = time.perf_counter()
        self.tokens, self.loss = 0, None
        self.bar = tqdm(total=total, initial=first, unit="step", dynamic_ncols=True) if show and terminal else None
        self.plain = show and not terminal

    def logging(self):
        """A context in which the `videobert` logger's lines go above the bar (none without one)."""
        return logging_redirect_tqdm([LOGGER]) if self.bar is not None else contextlib.nullcontext()

    def update(self, step: int) -> None:
        """Show the run at `step`."""
        now = time.perf_counter()
        rate = self.tokens / max(now - self.start, 1e-9)
        loss = f"loss {self.loss:.4f}, " if self.loss is not None else ""
        if self.bar is not None:
            self.bar.set_postfix_str(f"{loss}{rate:.0f} tok/s", refresh=False)
            self.bar.update(step - self.bar.n)
        elif self.plain and (now - self.shown >= self.every or step == self.total):
            left = (now - self.start) / max(step - self.first, 1) * (self.total - step)
            self.log(f"progress: step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%), {loss}"
                     f"{rate:.0f} tok/s, {left:.0f} s left")
            self.shown = now

    def close(self) -> None:
        """Take the bar off the terminal."""
        if self.bar is not None:
            self.bar.close()


def _metrics(out: dict) -> dict:
    """The losses and accuracies of a model output, detached (still on the device: no synchronisation)."""
    return {k: v.detach() for k, v in out.items() if k == "loss" or k.endswith("_loss") or k.endswith("_acc")}


@torch.no_grad()
def evaluate(model, stream: PretrainingStream, device) -> dict:
    """Mean held-out metrics over one pass of the held-out stream (weighted by objective counts)."""
    model.eval()
    sums: dict[str, float] = {}
    for index in range(stream.batches_per_epoch):
        batch, _ = stream.batch(0, index)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            out = model(**batch.to(device).model_inputs())
        for name in (n for n in OBJECTIVES + ("nce",) if f"{n}_count" in out):
            count = float(out[f"{name}_count"])
            sums[f"{name}_acc"] = sums.get(f"{name}_acc", 0.0) + float(out[f"{name}_acc"]) * count
            sums[f"{name}_n"] = sums.get(f"{name}_n", 0.0) + count
        sums["loss"] = sums.get("loss", 0.0) + float(out["loss"])
    model.train()
    result = {"eval_loss": sums["loss"] / max(1, stream.batches_per_epoch)}
    for name in (n for n in OBJECTIVES + ("nce",) if f"{n}_n" in sums):
        result[f"eval_{name}_acc"] = sums[f"{name}_acc"] / max(1.0, sums[f"{name}_n"])
    return result


def plot_curves(out: Path) -> Optional[Path]:
    """OUT/curves.png from OUT/metrics.jsonl (None when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "eval_loss"):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            left.plot(*zip(*points), label=key, marker="." if key.startswith("eval") else None)
    for key in sorted({k for r in rows for k in r if k.endswith("_acc")}):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            right.plot(*zip(*points), label=key)
    for ax, title in ((left, "loss"), (right, "accuracy")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    return out / "curves.png"


def _loaded(stream, workers: int, pin: bool):
    """(batch, stats) from `stream`'s position on, built by `workers` DataLoader processes (0: this one) in stream
    order, pinned when `pin`; the stream's position (its checkpointed state) follows the batches taken, not the
    ones the workers built ahead."""
    if stream.batches_per_epoch == 0:
        raise ValueError(stream.no_batch_message())
    # A generator of its own: the loader's seed draw must not move the global one (dropout), or a resumed run
    # would differ from the uninterrupted one.
    loader = torch.utils.data.DataLoader(BatchDataset(stream), batch_size=None, num_workers=workers, pin_memory=pin,
                                         generator=torch.Generator())
    for epoch, index, batch, stats in loader:
        stream.epoch, stream.position = epoch, index + 1
        yield batch, stats


def _checked(batches, on_error: Callable[[DataError], None]):
    """`batches`, with `on_error(exc)` called (it raises) when the next batch cannot be built from bad data."""
    while True:
        try:
            item = next(batches)
        except DataError as exc:
            # From a DataLoader worker the message carries the worker's traceback: its last line is the error.
            message = str(exc).strip().splitlines()[-1]
            on_error(DataError(message.split("DataError: ", 1)[-1]) if "Original Traceback" in str(exc) else exc)
        yield item


class _Interrupted(Exception):
    """Raised by a first signal inside `_Signals.abortable()` (the held-out evaluation) to cut it short."""


class _Signals:
    """SIGINT/SIGTERM handling: the first signal is announced at once (`say`) and becomes a flag the loop checks
    after each step (checkpoint, no evaluation, exit), and cuts an evaluation in progress short; a second signal
    exits at once (status 128 + signal, no checkpoint: the previous ones stay intact)."""

    def __init__(self, say: Callable[[str], None]):
        self.received: Optional[int] = None
        self._say, self._previous, self._abortable = say, {}, False

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is not None:
            self._say(f"{name} again: exiting now, without a checkpoint")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + signum)
        self.received = signum
        self._say(f"{name}: checkpointing after this step, then exiting ({name} again exits at once)")
        if self._abortable:
            raise _Interrupted

    @contextlib.contextmanager
    def abortable(self):
        """A block that a first signal ends early (its partial result discarded by the caller)."""
        self._abortable = True
        try:
            yield
        except _Interrupted:
            pass
        finally:
            self._abortable = False

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def pretraining_job(args: TrainArgs, out: Path, rank: int, world: int) -> Job:
    """The pretraining objectives (text and visual MLM, VTM) on the run's data stream."""
    config, _, stream, held_out = build(args, out, rank, world)

    def summary(row: dict) -> str:
        return (f"text {row['text_mlm_acc']:.3f}"
                + (f"  visual {row['visual_mlm_acc']:.3f}" if args.features == "tokens" else "")
                + f"  vtm {row['vtm_acc']:.3f}"
                + (f"  nce {row['nce_acc']:.3f}" if "nce_acc" in row else "")
                + (f"  eval vtm {row['eval_vtm_acc']:.3f}" if "eval_vtm_acc" in row else ""))
    return Job(config, make_model(args, config), stream, lambda model, device: evaluate(model, held_out, device),
               summary, {"args": asdict(args), "config": config.to_dict()},
               make_static=lambda batch: static_batch(batch, config))


def train(args: TrainArgs, log=LOGGER.info) -> dict:
    """Run (or resume) pretraining; returns the last logged metrics (see `run_loop`)."""
    return run_loop(args, lambda out, rank, world: pretraining_job(args, out, rank, world), log)


def _cuda_graph(fn: Callable[[], dict], pool) -> tuple[Callable[[], None], dict]:
    """Capture `fn` (its outputs stay in the graph's memory) into a CUDA graph: (replay, outputs)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = fn()
    return graph.replay, outputs


class GraphedSteps:
    """Training steps replayed from CUDA graphs (`--cuda-graphs`): each batch is made static (`make_static`:
    rows and the heads' capacities rounded up, so a few shapes recur) and the whole step, zeroing the gradients,
    forward, backward, clipping and the optimizer's update, is captured once per shape and then replayed: no
    launch and no read from the host (dropout draws advance a state on the device). The first `warmup` batches
    of a shape run eagerly on a side stream (autotuning, lazy initialisation); the capture's batch is then
    trained on by one replay, so every batch is trained on exactly once. The optimizer must be capturable with
    a tensor learning rate; the gradients stay allocated (zeroed, not freed) and are shared by all graphs.
    `capture(fn, pool) -> (replay, outputs)` is `_cuda_graph` on a GPU (tests pass a stand-in)."""

    def __init__(self, model, optimizer, make_static: Callable, clip: float, device: torch.device,
                 warmup: int = 2, capture: Callable = _cuda_graph):
        self.model, self.optimizer, self.make_static = model, optimizer, make_static
        self.clip, self.device, self.warmup, self.capture = clip, device, warmup, capture
        self.graphs: dict[tuple, tuple] = {}  # shape key -> (replay, static device batch, static outputs)
        self.eager_runs: dict[tuple, int] = {}
        self.pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None

    def _step(self, batch) -> dict:
        self.optimizer.zero_grad(set_to_none=False)
        # cache_enabled=False: a captured autocast must not keep casts of the weights from the capture.
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.device.type == "cuda",
                            cache_enabled=False):
            output = self.model(**batch.model_inputs())
        output["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        return _metrics(output)

    def __call__(self, batch) -> dict:
        """Train on `batch` (on the CPU); returns its metrics as device tensors of its own."""
        static = self.make_static(batch)
        key = static.shape_key()
        if key in self.graphs:
            replay, buffers, outputs = self.graphs[key]
            _copy_batch(buffers, static)
            replay()
            return {k: v.clone() for k, v in outputs.items()}  # the next replay of any graph may overwrite them
        on_device = static.to(self.device)
        runs = self.eager_runs.get(key, 0)
        if runs < self.warmup:
            self.eager_runs[key] = runs + 1
            if self.device.type != "cuda":
                return self._step(on_device)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                metrics = self._step(on_device)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return metrics
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the batch's copy done before the capture reads its buffers
        replay, outputs = self.capture(lambda: self._step(on_device), self.pool)
        self.graphs[key] = (replay, on_device, outputs)
        replay()  # capturing ran nothing: this is the batch's step
        return {k: v.clone() for k, v in outputs.items()}


def _copy_batch(buffers, batch) -> None:
    """Copy a static CPU batch into a captured graph's input buffers (same shapes), without blocking."""
    pairs = [(buffers.input_ids, batch.input_ids), (buffers.token_type_ids, batch.token_type_ids),
             (buffers.segment_ids, batch.segment_ids), (buffers.mlm_labels, batch.mlm_labels),
             (buffers.vtm_labels, batch.vtm_labels), *zip(buffers.head_positions, batch.head_positions)]
    if batch.video_features is not None:
        pairs.append((buffers.video_features, batch.video_features))
    for target, source in pairs:
        target.copy_(source.pin_memory() if target.is_cuda else source, non_blocking=True)


def _check_graphable(args: LoopArgs, job: Job, device: torch.device, world: int) -> None:
    """Raise ValueError naming what --cuda-graphs cannot be combined with."""
    problems = [why for bad, why in (
        (device.type != "cuda", "a GPU"), (world > 1, "a single process (no DDP/FSDP)"),
        (args.grad_accum != 1, "--grad-accum 1"), (args.on_nan != "stop", "--on-nan stop (the loss is read only "
                                                                         "when logged)"),
        (args.compile, "no --compile (it captures the whole step itself)"),
        (job.make_static is None, "a job with static batches (pretraining)")) if bad]
    if problems:
        raise ValueError("--cuda-graphs needs " + ", ".join(problems))


# A run folder's files that belong to one run (OUT also holds other commands' outputs, which stay).
_RUN_FILES = ("run.json", "config.yaml", "metrics.jsonl", "curves.png", "vocab.txt", "tokenizer_config.json")
# Flags that may change when a run is resumed: how long, how fast and with which optimiser settings it runs, not
# what it trains on or as (the data and the model).
RESUME_FREE = {"out", "steps", "resume", "overwrite", "log_every", "eval_every", "keep", "on_nan", "compile",
               "compile_mode", "cuda_graphs", "gradient_checkpointing", "profile_steps", "fsdp", "lr", "warmup",
               "schedule", "num_workers", "report_to", "weight_decay", "clip", "grad_accum", "log_level", "on_bad_data",
               "dist_timeout"}


def _prepare_run_folder(out: Path, args: LoopArgs, rank: int) -> None:
    """Create OUT; a previous run there is continued (--resume) or cleared first (--overwrite), never mixed with
    a new one: without either flag it is refused (ValueError saying both ways)."""
    out.mkdir(parents=True, exist_ok=True)
    previous = [name for name in ("run.json", "metrics.jsonl", "checkpoints") if (out / name).exists()]
    if not previous or args.resume:
        return
    if not args.overwrite:
        raise ValueError(f"{out} holds a previous run ({', '.join(previous)}): pass --resume to continue it, or "
                         "--overwrite to clear it first")
    if rank == 0:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        for name in _RUN_FILES:
            (out / name).unlink(missing_ok=True)


def _check_resume_flags(out: Path, info: dict) -> None:
    """Raise ValueError naming every flag that shapes the data or the model and differs from the run's."""
    path = out / "run.json"
    if not path.is_file() or "args" not in info:
        return
    saved = json.loads(path.read_text()).get("args", {})
    differ = [f"--{name.replace('_', '-')} {value!r} (the run has {saved.get(name)!r})"
              for name, value in info["args"].items() if name not in RESUME_FREE and saved.get(name) != value]
    if differ:
        raise ValueError(f"--resume with flags other than the run's: {'; '.join(differ)}; resume with the run's "
                         f"flags (see {path}) or start another --out")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics.jsonl rows past the resumed step: the steps replayed after a crash are logged once."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


def run_loop(args: LoopArgs, make_job: Callable[[Path, int, int], Job], log=LOGGER.info) -> dict:
    """Train `make_job(out, rank, world)` as `args` say, or resume it; returns the last logged metrics. Raises
    RuntimeError on a non-finite loss (with on_nan="stop"); returns early with "interrupted" set after a signal
    (a checkpoint is written)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=datetime.timedelta(seconds=args.dist_timeout))
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    _prepare_run_folder(out, args, rank)
    if world > 1:
        dist.barrier()  # rank 0 may write the vocabulary the others read
    torch.manual_seed(args.seed)
    manual_seed(args.seed)  # the fused ops' dropout generators on the GPUs
    job = make_job(out, rank, world)
    config, stream = job.config, job.stream
    if world > 1:
        dist.barrier()
    model = job.model.to(device)
    if args.gradient_checkpointing:
        for module in model.modules():
            if isinstance(module, VideoBERTModel):
                module.gradient_checkpointing = True
    sharded = world > 1 and args.fsdp
    if sharded:  # each encoder layer one FSDP unit: its parameters are gathered only while it runs
        from torch.distributed.fsdp import fully_shard

        for layer in model.bert.layers:
            fully_shard(layer)
        fully_shard(model)
    if args.cuda_graphs:
        _check_graphable(args, job, device, world)
    # Captured steps read the learning rate from a tensor the schedule refills (capturable=True).
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay),
                                  lr=torch.tensor(args.lr, device=device) if args.cuda_graphs else args.lr,
                                  fused=device.type == "cuda" and not sharded, capturable=args.cuda_graphs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
        lr_factor, warmup=args.warmup, total=args.steps, kind=args.schedule))
    step = 0
    checkpoint = latest_checkpoint(out, report=log if rank == 0 else None) if args.resume else None
    if args.resume and checkpoint is None and step_folders(out / "checkpoints"):
        raise ValueError(f"--resume: no intact checkpoint in {out / 'checkpoints'} (see the reasons above); "
                         "--overwrite starts the run over")
    if checkpoint is not None:
        _check_resume_flags(out, job.info)
        step = load_checkpoint(checkpoint, model, optimizer, stream, sharded, scheduler)
        if rank == 0:
            _truncate_metrics(out / "metrics.jsonl", step)
            log(f"resumed from {checkpoint} at step {step}")
        if args.cuda_graphs:  # captured steps read the learning rate from a tensor
            for group in optimizer.param_groups:
                group["lr"] = torch.as_tensor(group["lr"], dtype=torch.float32, device=device)
        # --lr, --warmup, --schedule and --steps may differ from the run's: this step's rate as they now say.
        scheduler.base_lrs = [args.lr for _ in optimizer.param_groups]
        scheduler.last_epoch -= 1
        scheduler.step()
    elif rank == 0:
        (out / "metrics.jsonl").write_text("")
        (out / "run.json").write_text(json.dumps(job.info, indent=2))
    if rank == 0:  # this invocation's complete settings: `--config OUT/config.yaml` repeats the run
        write_config(out / "config.yaml", args)
    reporter = open_reporter(args.report_to, out, asdict(args)) if rank == 0 else None
    runner = torch.nn.parallel.DistributedDataParallel(model) if world > 1 and not sharded else model
    runner = torch.compile(runner, mode=args.compile_mode) if args.compile else runner
    graphed = GraphedSteps(model, optimizer, job.make_static, args.clip, device) if args.cuda_graphs else None
    # Inductor's CUDA graphs (reduce-overhead) need recurring shapes too: static batches.
    static = job.make_static if args.compile and args.compile_mode == "reduce-overhead" else None
    profile = tuple(int(x) for x in args.profile_steps.split(":")) if args.profile_steps else None
    per_token = None
    last: dict = {}
    saved = step  # the step of the newest checkpoint
    window_tokens, window_start = 0, time.perf_counter()
    skipped = bad_videos = 0  # steps skipped and bad videos left out since the last logged row
    progress = _Progress(args.steps, step, rank == 0, sys.stderr.isatty(), log)

    def stop_on_bad_data(exc: DataError):
        # Before any step on the bad batch: keep what was trained since the last checkpoint.
        if rank == 0 and step > saved and not sharded:
            save_checkpoint(out, step, *full_state(model, optimizer, False), stream, args.keep, scheduler)
        written = step if rank == 0 and not sharded else saved
        kept = f"checkpoint at step {written}" if written > 0 else "no checkpoint"
        raise DataError(f"{exc}; stopped before step {step + 1} ({kept}): fix or remove the file and --resume, or "
                        "--resume --on-bad-data skip") from None
    batches = _checked(_loaded(stream, args.num_workers, device.type == "cuda"), stop_on_bad_data)
    with _Signals(log) as signals, progress.logging():
        while step < args.steps:
            if profile and step == profile[0] and torch.cuda.is_available():
                torch.cuda.profiler.start()
            totals: dict[str, torch.Tensor] = {}
            if graphed is not None:  # the whole step from a graph; the loss is checked when logged
                with nvtx_range("data"):
                    batch, stats = next(batches)
                window_tokens, bad_videos = window_tokens + stats.tokens, bad_videos + stats.skipped_videos
                progress.tokens += stats.tokens
                with nvtx_range("step"):
                    totals = graphed(batch)
                if per_token is None:
                    per_token = flops_per_token(config, model, allowed_pairs(batch.segment_ids) / stats.tokens)
            learnable = torch.zeros((), device=device)
            for micro in range(args.grad_accum if graphed is None else 0):
                with nvtx_range("data"):
                    batch, stats = next(batches)
                    batch = (batch if static is None else static(batch)).to(device)
                window_tokens, bad_videos = window_tokens + stats.tokens, bad_videos + stats.skipped_videos
                progress.tokens += stats.tokens * world
                with nvtx_range("forward"), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                    output = runner(**batch.model_inputs())
                with nvtx_range("backward"):
                    (output["loss"] / args.grad_accum).backward()
                for key, value in _metrics(output).items():
                    totals[key] = totals.get(key, 0.0) + value / args.grad_accum
                # Masked tokens and matching labels: a batch with none of either has nothing to learn.
                counts = [v.to(device).float() for k, v in output.items() if k.endswith("_count")]
                learnable = learnable + (sum(counts) if counts else 1.0)  # a job without counts always learns
                if per_token is None:
                    per_token = flops_per_token(config, model, allowed_pairs(batch.segment_ids) / stats.tokens)
            if graphed is None:
                # One synchronisation per step (besides the heads' counts of masked positions): the summed loss
                # is finite iff every micro-batch's was; a rank with something to learn makes every rank step.
                flag = torch.stack([torch.isfinite(totals["loss"]).float(), -(learnable > 0).float()])
                if world > 1:
                    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                finite, nothing_to_learn = flag.tolist()
                if nothing_to_learn == 0:  # no update, and logged without losses or accuracies
                    optimizer.zero_grad(set_to_none=True)
                    log(f"step {step + 1}: skipped (the batch has no masked token and no matching label)")
                    skipped += 1
                    totals = {}
                elif not finite:
                    optimizer.zero_grad(set_to_none=True)
                    if args.on_nan == "skip":
                        log(f"step {step + 1}: non-finite loss, step skipped")
                        step += 1
                        scheduler.step()
                        continue
                    raise RuntimeError(f"step {step + 1}: the loss is not finite ({float(totals['loss'])}); "
                                       "stopping without a checkpoint (use --on-nan skip to skip such steps)")
                if totals:
                    with nvtx_range("optimizer"):
                        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
            step += 1
            scheduler.step()
            progress.update(step)
            if profile and step == profile[1] and torch.cuda.is_available():
                torch.cuda.profiler.stop()
            final = step == args.steps or signals.received is not None
            logged = step % args.log_every == 0 or final
            if graphed is not None and logged and not bool(torch.isfinite(totals["loss"])):
                raise RuntimeError(f"step {step}: the loss is not finite ({float(totals['loss'])}); stopping without "
                                   "a checkpoint (with --cuda-graphs the loss is read when logged)")
            evaluated = {}
            if logged and (step % args.eval_every == 0 or final) and (rank == 0 or sharded) and not signals.received:
                if sharded:  # every rank takes part in the forwards: an evaluation is never cut short on one
                    evaluated = job.evaluate(model, device)
                else:
                    with signals.abortable():
                        evaluated = job.evaluate(model, device)
                    model.train()  # a cut-short evaluation leaves eval mode on
            if rank == 0 and logged:
                elapsed = time.perf_counter() - window_start
                row = {"step": step, **{k: float(v) for k, v in totals.items()},
                       "lr": args.lr * scheduler.lr_lambdas[0](step - 1),  # the rate of the step just taken
                       "tokens_per_s": window_tokens * world / max(elapsed, 1e-9)}
                if skipped:
                    row["skipped_steps"], skipped = skipped, 0
                if bad_videos:  # --on-bad-data skip
                    row["skipped_videos"], bad_videos = bad_videos, 0
                if device.type == "cuda":
                    peak = next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name(device)), None)
                    if peak:
                        row["mfu"] = row["tokens_per_s"] * per_token / (peak * 1e12)
                row.update(evaluated)
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                if reporter is not None:
                    reporter.log(row)
                if "loss" in row:  # a skipped step's row has none
                    progress.loss = row["loss"]
                    log(f"step {step:5d}  loss {row['loss']:.4f}  {job.summary(row)}  {row['tokens_per_s']:.0f} tok/s")
                last = row
                window_tokens, window_start = 0, time.perf_counter()
            if final or signals.received is not None or step % (args.eval_every or args.steps) == 0:
                if rank == 0 or sharded:  # gathering FSDP shards is a collective
                    model_state, optimizer_state = full_state(model, optimizer, sharded)
                if rank == 0:
                    save_checkpoint(out, step, model_state, optimizer_state, stream, args.keep, scheduler)
                saved = step
            if signals.received is not None:
                log(f"{signal.Signals(signals.received).name}: checkpoint written at step {step}; exiting")
                last["interrupted"] = signals.received
                break
    progress.close()
    if reporter is not None:
        reporter.close()
    if rank == 0:
        curves = plot_curves(out)
        log(f"metrics in {out / 'metrics.jsonl'}" + (f", curves in {curves}" if curves else ""))
    if world > 1:
        # Every rank reaches teardown together: rank 1 of a 2-process gloo FSDP run once aborted in it ("terminate
        # called without an active exception") while rank 0 was still plotting, in a full test-suite run.
        dist.barrier()
        dist.destroy_process_group()
    return last


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `videobert pretrain` flags: one per TrainArgs field (`videobert.flags`), and --config."""
    add_dataclass_flags(parser, TrainArgs)


def run_command(args: argparse.Namespace, fields: type, run: Callable) -> int:
    """Run `run(fields(**flags))` for a command: exit status 0 when done, 128 + signal when interrupted, 1 on a
    non-finite loss or bad input (the message on stderr). Messages go through `videobert.logs` at --log-level."""
    configure_logging(args.log_level)
    try:
        last = run(fields(**{k: getattr(args, k) for k in asdict(fields())}))
    except (RuntimeError, ValueError, OSError) as exc:
        if dist.is_initialized() and dist.get_world_size() > 1 and isinstance(exc, (dist.DistError, RuntimeError)):
            # A collective that failed or timed out: a peer died or stalls; its own message is library-internal.
            print(f"error: rank {dist.get_rank()}: lost contact with another process (it died, or stalled past "
                  f"--dist-timeout {args.dist_timeout} s): {str(exc).strip().splitlines()[0][:300]}", file=sys.stderr)
            return 1
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 128 + last["interrupted"] if "interrupted" in last else 0


def main(args: argparse.Namespace) -> int:
    """`videobert pretrain` (see `run_command`)."""
    return run_command(args, TrainArgs, train)
