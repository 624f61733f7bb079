"""Fine-tuning a pretrained VideoBERT (`videobert finetune`) and captioning with it (`videobert caption`), trained
by the pretraining loop itself (`videobert.train.run_loop`: checkpoints, resume, signals, logging, DDP/FSDP).

Tasks, on the segments of `videobert.tasks` (synthetic splits or a data folder's tasks/<split>.jsonl):
- classify: a linear head on each sample's pooled [CLS] over `[CLS] [>] clips [SEP]`; classes are the train
  split's labels.
- multiple-choice: every candidate answer is one sample `[CLS] question answer [>] clips [SEP]`; a scalar
  score from its pooled [CLS]; softmax over each question's candidates.
- caption: the encoder as a prefix language model. Attention rules [[2, 1], [0, 1]] (text = 0 attends earlier
  text causally and all video; video = 1 attends video only), the masked-token head (tied to the word table)
  predicts the next word piece at every text position and [SEP] after the last one. Video positions start at
  a fixed offset (max_caption_tokens + 2), so nothing the video sees depends on the caption, and decoding one
  word piece at a time (greedy or beam search) reproduces the training-time prediction exactly.
Validation metrics are logged during training; at the end the final checkpoint predicts the test split
(OUT/test_predictions.jsonl, OUT/test_metrics.json). A continuous-feature checkpoint takes the clips' features
where the others take visual tokens (see `videobert.tasks`).
"""
from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from videobert._optional import require
from videobert.config import VideoBERTConfig
from videobert.data import pack_tensors, pinned, plan_rows, to_device
from videobert.flags import COUNT, RATE, add_dataclass_flags, flag, override
from videobert.logs import LOGGER
from videobert.model import IGNORE_INDEX, VideoBERTForPretraining, VideoBERTModel, _pooler_moved, init_weights
from videobert.ops import softmax_cross_entropy
from videobert.samples import BatchStats, ShardedBatches
from videobert.tasks import (Checkpoint, Segment, clip_budget, device_of, encode_samples, load_checkpoint,
                             load_segments, sample_budget, shown, text_budget, video_sample, write_atomic)
from videobert.train import Job, LoopArgs, run_command, run_loop

TASKS = ("classify", "multiple-choice", "caption")
PREFIX_LM_RULES = torch.tensor([[2, 1], [0, 1]])  # text (0): causal text + all video; video (1): video only


@dataclass
class FinetuneArgs(LoopArgs):
    """A fine-tuning run (saved in OUT/run.json with the task's labels)."""

    task: str = flag("classify", "what to fine-tune for", choices=TASKS)
    ckpt: str = flag("", "the pretraining run (its newest checkpoint) or step folder to start from")
    data: str = flag("synthetic", "'synthetic' or a data folder with tasks/{train,validation,test}.jsonl")
    out: str = override(LoopArgs, "out", "runs/finetune")
    steps: int = override(LoopArgs, "steps", 200)
    lr: float = override(LoopArgs, "lr", 5e-4)
    warmup: int = override(LoopArgs, "warmup", 20)
    eval_every: int = override(LoopArgs, "eval_every", 50)
    batch_size: int = flag(32, "segments per step", COUNT)
    row_length: int = flag(256, "tokens per packed row", COUNT)
    train_videos: int = flag(400, "synthetic data: videos of the train split", COUNT)
    eval_videos: int = flag(40, "synthetic data: videos of the validation and test splits", COUNT)
    max_caption_tokens: int = flag(24, "caption task: word pieces of a caption at most", COUNT)
    dropout: float = flag(0.1, "dropout rate on the pooled [CLS] before the task head", RATE)


class VideoBERTForTask(nn.Module):
    """Encoder + pooled [CLS] + a linear head: class logits per sample (classify), or a score per candidate
    answer, compared within each question (multiple-choice)."""

    def __init__(self, config: VideoBERTConfig, task: str, num_labels: int, dropout: float = 0.1):
        super().__init__()
        if task not in ("classify", "multiple-choice"):
            raise ValueError(f"task must be 'classify' or 'multiple-choice', got {task!r}")
        self.config, self.task = config, task
        self.bert = VideoBERTModel(config, add_pooling_layer=False)
        self.bert.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(config.hidden_size, num_labels if task == "classify" else 1)
        for module in (self.bert.pooler, self.head):
            module.apply(lambda m: init_weights(m, config))
        self._register_load_state_dict_pre_hook(_pooler_moved)

    def forward(self, input_ids, token_type_ids, segment_ids, labels=None, question_index=None,
                choice_index=None, video_features=None) -> dict[str, torch.Tensor]:
        """`logits` per sample in [CLS] order (classify: (S, classes)) or per question (multiple-choice:
        (Q, most candidates), -inf where a question has fewer); with `labels` (S,) or (Q,) also loss,
        task_loss, task_acc, task_count. question_index / choice_index (S,): each candidate's question and place;
        video_features (B, L, F): the clips' vectors at [FEAT] positions (continuous-feature models)."""
        hidden = self.bert(input_ids, token_type_ids=token_type_ids, segment_ids=segment_ids,
                           video_features=video_features).last_hidden_state
        hidden = hidden.flatten(0, 1)
        cls = (input_ids.flatten() == self.config.cls_token_id).nonzero().squeeze(1)
        logits = self.head(self.dropout(torch.tanh(self.bert.pooler(hidden[cls])))).float()
        if self.task == "multiple-choice":
            matrix = logits.new_full((int(question_index.max()) + 1 if question_index.numel() else 0,
                                      int(choice_index.max()) + 1 if choice_index.numel() else 0), float("-inf"))
            logits = matrix.index_put((question_index, choice_index), logits[:, 0])
        out = {"logits": logits}
        if labels is not None:
            res = softmax_cross_entropy(logits.masked_fill(torch.isinf(logits), -1e9), labels, return_stats=True,
                                        backend=self.config.backend)
            count = (labels != IGNORE_INDEX).sum()
            out.update(loss=res.loss, task_loss=res.loss, task_acc=res.num_correct / count.clamp_min(1),
                       task_count=count)
        return out


def build_model(config: VideoBERTConfig, info: dict, task: Optional[str] = None) -> nn.Module:
    """The module a fine-tuning run of `info` (its run.json) trains; with `task`, the run must be of that task."""
    args = info["args"]
    if args.get("task") not in TASKS or (task is not None and args["task"] != task):
        wanted = f"a {task} fine-tune" if task else "a fine-tuning run"
        raise ValueError(f"the checkpoint is not {wanted} (videobert finetune --task {task or '...'}); its run "
                         f"has task {args.get('task')!r}")
    if args["task"] == "caption":
        model = VideoBERTForPretraining(config)
        # The matching head takes no part in captioning; frozen, DDP does not wait for its gradients.
        for module in (model.bert.pooler, model.vtm_head):
            module.requires_grad_(False)
        return model
    return VideoBERTForTask(config, args["task"], len(info.get("labels") or [0]), args.get("dropout", 0.1))


# ------------------------------------------------------------------------------------------- batches

@dataclass
class TaskBatch:
    """Packed rows of task samples: (B, L) input_ids, token_type_ids, segment_ids and the model's other inputs."""

    input_ids: torch.Tensor
    token_type_ids: torch.Tensor
    segment_ids: torch.Tensor
    extra: dict
    order: list  # the samples' indices in [CLS] (row-major) order

    def to(self, device) -> "TaskBatch":
        """The same batch on `device` (`to_device`)."""
        return self._map(lambda t: to_device(t, device))

    def pin_memory(self) -> "TaskBatch":
        """The same batch in pinned host memory: a DataLoader(pin_memory=True) pins it off the training thread."""
        return self._map(pinned)

    def _map(self, fn) -> "TaskBatch":
        return TaskBatch(fn(self.input_ids), fn(self.token_type_ids), fn(self.segment_ids),
                         {k: fn(v) for k, v in self.extra.items()}, self.order)

    def model_inputs(self) -> dict:
        """Keyword arguments of the task model's forward."""
        return dict(input_ids=self.input_ids, token_type_ids=self.token_type_ids, segment_ids=self.segment_ids,
                    **self.extra)


def caption_sample(config: VideoBERTConfig, pieces: Sequence[int], clips: Union[Sequence[int], torch.Tensor],
                   max_caption_tokens: int, with_labels: bool) -> dict[str, torch.Tensor]:
    """`[CLS] pieces [>] clips [SEP]` as the prefix LM sees it (`video_sample`: clips are visual tokens or clip
    features) with position_ids (text 0.., video from max_caption_tokens + 2) and, `with_labels`, mlm_labels (the
    next piece at [CLS] and each piece, [SEP] after the last)."""
    sample = video_sample(config, pieces, clips)
    ids, n = sample["input_ids"], len(pieces)
    video = max_caption_tokens + 2 + torch.arange(ids.numel() - n - 2)
    sample["position_ids"] = torch.cat([torch.arange(n + 2), video])
    if with_labels:
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:n + 1] = torch.tensor([*pieces, config.sep_token_id])
        sample["mlm_labels"] = labels
    return sample


class TaskData:
    """Turns a task's segments into model samples and packed batches."""

    def __init__(self, task: str, config: VideoBERTConfig, encode_text: Callable[[str], list[int]], budget: int,
                 row_length: int, labels: Optional[list[str]] = None, max_caption_tokens: int = 24):
        self.task, self.config, self.encode_text, self.budget = task, config, encode_text, budget
        self.row_length, self.labels, self.max_caption_tokens = row_length, labels, max_caption_tokens
        if task == "caption" and max_caption_tokens + 2 + budget > config.max_position_embeddings:
            raise ValueError(f"max_caption_tokens ({max_caption_tokens}) + 2 + the sample budget ({budget}) exceeds "
                             f"max_position_embeddings ({config.max_position_embeddings})")

    def caption_input(self, segment: Segment, pieces: Sequence[int], with_labels: bool) -> dict[str, torch.Tensor]:
        """The prefix-LM sample of a segment's clips after caption `pieces` (training: the whole caption with
        labels; decoding: a hypothesis so far), the clips cut to leave room for the longest caption."""
        clips = segment.video[:clip_budget(self.budget, self.max_caption_tokens)]
        return caption_sample(self.config, pieces, clips, self.max_caption_tokens, with_labels)

    def samples(self, segment: Segment) -> list[dict[str, torch.Tensor]]:
        """The model samples of one segment (one, or one per candidate answer)."""
        cfg = self.config
        if self.task == "classify":
            return [video_sample(cfg, [], segment.video[:clip_budget(self.budget, 0)])]
        if self.task == "multiple-choice":
            out = []
            question = self.encode_text(segment.question)
            for answer in segment.answers:
                text = (question + self.encode_text(answer))[:text_budget(self.budget)]
                out.append(video_sample(cfg, text, segment.video[:clip_budget(self.budget, len(text))]))
            return out
        return [self.caption_input(segment, self.encode_text(segment.text)[:self.max_caption_tokens], True)]

    def label(self, segment: Segment) -> int:
        """The class index (classify) or right answer (multiple-choice) of a segment."""
        if self.task == "multiple-choice":
            return segment.answer
        if segment.label not in self.labels:
            raise ValueError(f"{segment.source}: label {segment.label!r} is not among the train split's "
                             f"{len(self.labels)} labels")
        return self.labels.index(segment.label)

    def batch(self, segments: Sequence[Segment]) -> tuple[TaskBatch, BatchStats]:
        """Every segment's samples packed first-fit into rows, with the labels in [CLS] order."""
        samples, owner, choice = [], [], []
        for s, segment in enumerate(segments):
            for c, sample in enumerate(self.samples(segment)):
                samples.append(sample)
                owner.append(s)
                choice.append(c)
        rows = plan_rows([x["input_ids"].numel() for x in samples], self.row_length)
        fill = {"input_ids": self.config.pad_token_id, "token_type_ids": 0}
        if self.task == "caption":
            fill.update(position_ids=0, mlm_labels=IGNORE_INDEX)
        if "video_features" in samples[0]:
            fill["video_features"] = 0
        packed = pack_tensors(samples, self.row_length, fill, rows)
        order = [i for row in rows for i in row]  # [CLS] order is row-major
        extra = {k: v for k, v in packed.items() if k not in ("input_ids", "token_type_ids", "segment_ids")}
        if self.task == "caption":
            extra["modality_rules"] = PREFIX_LM_RULES.clone()
        elif self.task == "classify":
            extra["labels"] = torch.tensor([self.label(segments[owner[i]]) for i in order], dtype=torch.long)
        else:
            extra["labels"] = torch.tensor([self.label(s) for s in segments], dtype=torch.long)
            extra["question_index"] = torch.tensor([owner[i] for i in order], dtype=torch.long)
            extra["choice_index"] = torch.tensor([choice[i] for i in order], dtype=torch.long)
        tokens = int((packed["segment_ids"] >= 0).sum())
        stats = BatchStats(len(samples), len(rows), tokens, tokens / max(1, packed["segment_ids"].numel()))
        return TaskBatch(packed["input_ids"], packed["token_type_ids"], packed["segment_ids"], extra, order), stats


@dataclass
class SegmentStream(ShardedBatches):
    """Training batches of `batch_size` segments, reshuffled every epoch (see `ShardedBatches`)."""

    segments: Sequence[Segment]
    data: TaskData
    batch_size: int = 32
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    epoch: int = 0
    position: int = 0

    def __post_init__(self) -> None:
        self._check_shard()
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def num_units(self) -> int:
        """Whole batches of segments per epoch."""
        return len(self.segments) // self.batch_size

    def no_batch_message(self) -> str:
        """Why an epoch has no batch on this rank."""
        return f"{len(self.segments)} training segments make no batch of {self.batch_size} per rank"

    def build_unit(self, unit: int, seed: tuple) -> tuple[TaskBatch, BatchStats]:
        """Batch `unit` of this epoch's shuffled segments."""
        order = list(range(len(self.segments)))
        random.Random(f"{self.seed}/segments/{seed[1]}").shuffle(order)
        chosen = order[unit * self.batch_size:(unit + 1) * self.batch_size]
        return self.data.batch([self.segments[i] for i in chosen])


# ------------------------------------------------------------------------------------------- evaluation

def _objective(task: str) -> str:
    return "text_mlm" if task == "caption" else "task"


@torch.no_grad()
def evaluate_segments(model: nn.Module, data: TaskData, segments: Sequence[Segment], device: torch.device,
                      batch_size: int = 64) -> dict:
    """Mean loss and accuracy over `segments` (accuracy: of classes, answers, or next word pieces)."""
    name = _objective(data.task)
    was_training = model.training
    model.eval()
    loss = correct = count = 0.0
    for first in range(0, len(segments), batch_size):
        batch, _ = data.batch(segments[first:first + batch_size])
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            out = model(**batch.to(device).model_inputs())
        n = float(out[f"{name}_count"])
        loss, correct, count = loss + float(out[f"{name}_loss"]) * n, correct + float(out[f"{name}_acc"]) * n, count + n
    model.train(was_training)
    return {"eval_loss": loss / max(count, 1.0), f"eval_{name}_acc": correct / max(count, 1.0)}


@torch.no_grad()
def predict(model: nn.Module, data: TaskData, segments: Sequence[Segment], device: torch.device,
            batch_size: int = 64) -> list[int]:
    """The predicted class (classify) or answer index (multiple-choice) of every segment."""
    model.eval()
    out: list[int] = []
    for first in range(0, len(segments), batch_size):
        batch, _ = data.batch(segments[first:first + batch_size])
        inputs = {k: v for k, v in batch.to(device).model_inputs().items() if k != "labels"}
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(**inputs)["logits"]
        if data.task == "classify":  # logits come in [CLS] order, which packing may permute
            pred = torch.empty(len(batch.order), dtype=torch.long)
            pred[torch.tensor(batch.order)] = logits.argmax(dim=1).cpu()
            out += pred.tolist()
        else:
            out += logits.argmax(dim=1).cpu().tolist()
    return out


# ------------------------------------------------------------------------------------------- captioning

@torch.no_grad()
def generate_captions(checkpoint: Checkpoint, segments: Sequence[Segment], beam: int = 1,
                      device: torch.device = torch.device("cpu"), max_length: Optional[int] = None,
                      length_penalty: float = 1.0) -> list[str]:
    """Captions of the segments' clips from a captioning fine-tune: greedy (beam=1) or beam search of width
    `beam`, one word piece per step for every live hypothesis of every segment in one packed batch, until
    [SEP] or `max_length` pieces (default the run's max_caption_tokens). Finished hypotheses rank by
    total log-probability / length ** length_penalty."""
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    model, config = checkpoint.model.to(device), checkpoint.config
    args = checkpoint.info["args"]
    cap = int(args["max_caption_tokens"])
    max_length = cap if max_length is None else min(max_length, cap)
    data = TaskData("caption", config, checkpoint.tokenizer.encode, sample_budget(checkpoint),
                    int(args.get("row_length", 256)), max_caption_tokens=cap)
    banned = torch.tensor([config.pad_token_id, config.cls_token_id, config.mask_token_id, config.unk_token_id])
    live = [[([], 0.0)] for _ in segments]  # per segment: (pieces, summed log-probability)
    done: list[list[tuple[list[int], float]]] = [[] for _ in segments]
    for length in shown(range(max_length + 1), max_length + 1, "caption pieces"):
        owners = [(s, h) for s in range(len(segments)) for h in range(len(live[s]))]
        if not owners:
            break
        samples = [data.caption_input(segments[s], live[s][h][0], with_labels=False) for s, h in owners]
        states = torch.stack([hidden[length] for _, hidden in
                              encode_samples(model.bert, samples, data.row_length, device,
                                             modality_rules=PREFIX_LM_RULES)])
        logp = torch.log_softmax(model.text_logits(states.to(device)).float().cpu(), dim=-1)
        logp[:, banned] = float("-inf")
        if length == max_length:  # out of room: only the end can follow
            keep = logp[:, config.sep_token_id].clone()
            logp.fill_(float("-inf"))
            logp[:, config.sep_token_id] = keep
        new_live: list[list[tuple[list[int], float]]] = [[] for _ in segments]
        rows_of: dict[int, list[int]] = {}
        for i, (s, _) in enumerate(owners):
            rows_of.setdefault(s, []).append(i)
        for s, rows in rows_of.items():
            base = torch.tensor([live[s][owners[i][1]][1] for i in rows])
            total = (base[:, None] + logp[rows]).flatten()
            best = total.topk(min(2 * beam, total.numel())).indices.tolist()
            for rank, flat in enumerate(best):
                h, piece = divmod(flat, logp.shape[1])
                pieces, score = live[s][owners[rows[h]][1]][0], float(total[flat])
                if score == float("-inf"):
                    continue
                if piece == config.sep_token_id:
                    if rank < beam:  # an end outside the best `beam` continuations would cut a better one short
                        done[s].append((pieces, score))
                elif len(new_live[s]) < beam:
                    new_live[s].append((pieces + [piece], score))
            if len(done[s]) >= beam:
                new_live[s] = []
        live = new_live
    tok = checkpoint.tokenizer
    out = []
    for s in range(len(segments)):
        pool = done[s] or live[s]
        pieces, _ = max(pool, key=lambda item: item[1] / max(1, len(item[0]) + 1) ** length_penalty)
        out.append(tok.decode(pieces))
    return out


def caption_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """The paper's caption metrics by pycocoevalcap (the COCO caption evaluation): BLEU-3, BLEU-4, METEOR and
    ROUGE-L (x 100) and CIDEr of captions against one reference each, and the same against other segments'
    references ("mismatched_": what a caption reaches without the right video). Text is lower-cased and split
    into words without punctuation, as COCO's tokenizer does. METEOR runs Java: without it the score is left out
    and "meteor_skipped" says why."""
    import re
    import shutil

    modules = {name: require(f"pycocoevalcap.{name}.{name}", "eval", "caption metrics")
               for name in ("bleu", "rouge", "cider", "meteor")}
    punctuation = set(require("pycocoevalcap.tokenizer.ptbtokenizer", "eval", "caption metrics").PUNCTUATIONS)
    if len(hypotheses) != len(references) or not references:
        raise ValueError(f"need one hypothesis per reference, got {len(hypotheses)} and {len(references)}")

    def words(text: str) -> list[str]:
        return [" ".join(w for w in re.findall(r"\w+|[^\w\s]", text.lower()) if w not in punctuation)]
    shifted = list(references[1:]) + list(references[:1])
    res = {i: words(h) for i, h in enumerate(hypotheses)}
    meteor, result = None, {}
    if shutil.which("java") is None:
        result["meteor_skipped"] = "METEOR needs Java: no java on PATH"
    else:
        try:
            meteor = modules["meteor"].Meteor()
        except OSError as exc:
            result["meteor_skipped"] = f"METEOR needs Java, which did not start ({exc})"
    for name, refs in (("", references), ("mismatched_", shifted)):
        gts = {i: words(r) for i, r in enumerate(refs)}
        bleu, _ = modules["bleu"].Bleu(4).compute_score(gts, res, verbose=0)
        result[f"{name}bleu3"], result[f"{name}bleu4"] = 100 * bleu[2], 100 * bleu[3]
        if meteor is not None:
            result[f"{name}meteor"] = 100 * meteor.compute_score(gts, res)[0]
        result[f"{name}rougeL"] = 100 * modules["rouge"].Rouge().compute_score(gts, res)[0]
        result[f"{name}cider"] = float(modules["cider"].Cider().compute_score(gts, res)[0])
    del meteor  # its __del__ ends the Java process
    return result


def evaluate_captions(checkpoint: Checkpoint, segments: Sequence[Segment], out: Optional[Path], beam: int = 1,
                      device: torch.device = torch.device("cpu")) -> dict:
    """Decode every segment, score against its sentence, and write `out` (JSON lines of video, start, end,
    reference, caption) when given."""
    captions = generate_captions(checkpoint, segments, beam, device)
    result = {"segments": len(segments), "beam": beam,
              **caption_metrics(captions, [s.text for s in segments])}
    if out is not None:
        lines = "".join(json.dumps({"video": s.video_id, "start": s.start, "end": s.end, "reference": s.text,
                                    "caption": c}) + "\n" for s, c in zip(segments, captions))
        write_atomic(out, lambda tmp: tmp.write_text(lines))
    return result


# ------------------------------------------------------------------------------------------- the run

def _task_data(args, config: VideoBERTConfig, checkpoint: Checkpoint, labels) -> TaskData:
    return TaskData(args.task, config, checkpoint.tokenizer.encode, sample_budget(checkpoint), args.row_length,
                    labels, args.max_caption_tokens)


def finetune_job(args: FinetuneArgs, out: Path, rank: int, world: int) -> Job:
    """The task model initialised from the pretrained checkpoint, its training stream and validation."""
    if args.task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {args.task!r}")
    if not args.ckpt:
        raise ValueError("--ckpt is required: the pretraining run to fine-tune")
    pretrained = load_checkpoint(args.ckpt, data=args.data)
    config = pretrained.config
    train_segments = load_segments(args.data, "train", args.task, config, args.train_videos)
    val_segments = load_segments(args.data, "validation", args.task, config, args.eval_videos)
    labels = sorted({s.label for s in train_segments}) if args.task == "classify" else None
    info = {"args": {**asdict(args), "max_tokens": sample_budget(pretrained)}, "config": config.to_dict(),
            "labels": labels, "pretrained": str(pretrained.path)}
    model = build_model(config, info)
    if args.task == "caption":
        model.load_state_dict(pretrained.model.state_dict())
    else:
        model.bert.load_state_dict(pretrained.model.bert.state_dict())  # the pooler with it
    model.train()
    if rank == 0:
        pretrained.tokenizer.save(out)
    data = _task_data(args, config, pretrained, labels)
    stream = SegmentStream(train_segments, data, args.batch_size, args.seed, rank, world)
    name = _objective(args.task)

    def summary(row: dict) -> str:
        text = f"{'next-piece' if args.task == 'caption' else args.task} acc {row[f'{name}_acc']:.3f}"
        return text + (f"  eval acc {row[f'eval_{name}_acc']:.3f}" if f"eval_{name}_acc" in row else "")
    return Job(config, model, stream, lambda m, device: evaluate_segments(m, data, val_segments, device),
               summary, info)


def test_predictions(args: FinetuneArgs, device: torch.device) -> dict:
    """Score the run's final checkpoint on the test split; writes OUT/test_predictions.jsonl (captions for the
    caption task) and OUT/test_metrics.json."""
    out = Path(args.out)
    checkpoint = load_checkpoint(out, build_model, data=args.data)
    segments = load_segments(args.data, "test", args.task, checkpoint.config, args.eval_videos)
    if args.task == "caption":
        result = evaluate_captions(checkpoint, segments, out / "test_predictions.jsonl", device=device)
    else:
        data = _task_data(args, checkpoint.config, checkpoint, checkpoint.info["labels"])
        model = checkpoint.model.to(device)
        predicted = predict(model, data, segments, device)
        truth = [data.label(s) for s in segments]
        labels = checkpoint.info["labels"]
        lines = []
        for s, p, t in zip(segments, predicted, truth):
            shown = (lambda i: labels[i]) if args.task == "classify" else (lambda i: s.answers[i])
            lines.append(json.dumps({"video": s.video_id, "start": s.start, "end": s.end, "prediction": shown(p),
                                     "truth": shown(t), "correct": p == t}) + "\n")
        write_atomic(out / "test_predictions.jsonl", lambda tmp: tmp.write_text("".join(lines)))
        choices = len(labels) if args.task == "classify" else sum(len(s.answers) for s in segments) / len(segments)
        result = {"segments": len(segments), "test_acc": sum(p == t for p, t in zip(predicted, truth)) / len(segments),
                  "chance": 1.0 / choices}
        if args.task == "classify":  # the majority class of the test split is the other trivial baseline
            result["majority"] = max(truth.count(c) for c in set(truth)) / len(truth)
    text = json.dumps(result, indent=2)
    write_atomic(out / "test_metrics.json", lambda tmp: tmp.write_text(text))
    return result


def finetune(args: FinetuneArgs, log=LOGGER.info) -> dict:
    """Fine-tune (or resume), then predict the test split with the final checkpoint (rank 0); returns the last
    logged metrics with the test metrics under "test"."""
    last = run_loop(args, lambda out, rank, world: finetune_job(args, out, rank, world), log)
    if "interrupted" not in last and int(os.environ.get("RANK", "0")) == 0:
        last["test"] = test_predictions(args, device_of())
        log(f"test: {json.dumps(last['test'])}")
    return last


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `videobert finetune` flags: one per FinetuneArgs field (`videobert.flags`), and --config."""
    add_dataclass_flags(parser, FinetuneArgs, required=("ckpt",))


def main(args: argparse.Namespace) -> int:
    """`videobert finetune` (see `videobert.train.run_command`)."""
    return run_command(args, FinetuneArgs, finetune)
