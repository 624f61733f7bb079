"""Using a pretrained VideoBERT: checkpoints, labelled video segments, packed batched inference, and three of
the paper's uses: zero-shot action classification (`videobert zero-shot`), video-text retrieval
(`videobert retrieve`) and contextual feature export (`videobert embed`). Fine-tuning and captioning are in
`videobert.finetune`.

Segments come from the embedded synthetic corpus (whose generator knows each step's action, object and caption;
splits are separate seeds) or from a real data folder (layout in `videobert.real_data`) with task files
`tasks/<split>.jsonl`, split one of train / validation / test, one labelled stretch of a video per line:

    {"video": "<id>", "start": 12.0, "end": 19.5,   # seconds; the clips overlapping [start, end)
     "text": "...",                                 # the sentence said over it: retrieval, captioning
     "verb": "...", "noun": "...",                  # zero-shot action classification
     "label": "...",                                # fine-tuning: video classification
     "question": "...", "answers": ["...", ...], "answer": 0}   # fine-tuning: multiple-choice QA

A task reads only its own fields; a line that lacks one is an error naming the file and line. For a checkpoint
pretrained with `--features continuous` (config.video_feature_dim set), every task feeds the clips' feature vectors
(features/<id>.npy; synthetic: `token_features`) where the others feed visual tokens.
"""
from __future__ import annotations

import json
import logging
import os
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import nn
from tqdm import tqdm

from videobert.checkpoint import latest_checkpoint, load_model_state, verify_checkpoint
from videobert.config import VideoBERTConfig
from videobert.corpus import ACTIONS, CLIP_SECONDS, OBJECTS, Video
from videobert.data import encode_sample, pack_tensors, plan_rows
from videobert.model import VideoBERTForPretraining
from videobert.real_data import DataError, VideoFolder
from videobert.samples import synthetic_videos
from videobert.text_tokenizer import TextTokenizer

SPLITS = ("train", "validation", "test")
SYNTHETIC_SPLIT_SEEDS = {"train": 2_000_003, "validation": 3_000_017, "test": 4_000_037}
TASK_FIELDS = {"zero-shot": ("verb", "noun"), "retrieval": ("text",), "caption": ("text",), "embed": (),
               "classify": ("label",), "multiple-choice": ("question", "answers", "answer")}
ZERO_SHOT_TEMPLATE = "now let me show you how to [MASK] the [MASK]"
SYNTHETIC_QUESTION = "what is the person doing"


# ------------------------------------------------------------------------------------------- segments

@dataclass
class Segment:
    """A labelled stretch of one video: its visual tokens (and, for a continuous-feature checkpoint, the clips'
    features), its sentence and the labels its task file gives."""

    video_id: str
    start: float
    end: float
    clips: list[int]
    text: Optional[str] = None
    verb: Optional[str] = None
    noun: Optional[str] = None
    label: Optional[str] = None
    question: Optional[str] = None
    answers: Optional[list[str]] = None
    answer: Optional[int] = None
    source: str = ""  # where it came from (file:line), for error messages
    features: Optional[torch.Tensor] = None  # (clips, F), continuous-feature checkpoints only

    @property
    def video(self) -> Union[list[int], torch.Tensor]:
        """The clips as the model takes them: the (clips, F) features when loaded with them, else visual tokens."""
        return self.clips if self.features is None else self.features


def synthetic_segments(split: str, num_videos: int, num_visual_tokens: int = 20736,
                       feature_dim: Optional[int] = None) -> list[Segment]:
    """Every step of `num_videos` synthetic videos of `split` (its own seed) with its ground truth: verb and noun,
    the caption as text, the action as class label, and a four-way multiple-choice question whose answers are
    "<action> the <object>" phrases (the true one at a random place); with `feature_dim`, the clip features the
    continuous mode pretrains on (`synthetic_videos`)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    out = []
    videos = synthetic_videos(SYNTHETIC_SPLIT_SEEDS[split], num_visual_tokens, feature_dim)
    for index in range(num_videos):
        video = videos(index, index + 1)[0]
        for k, step in enumerate(video.steps):
            rng = random.Random(f"choices/{video.video_id}/{k}")
            truth = f"{step.action} the {step.object}"
            answers = {truth}
            while len(answers) < 4:
                answers.add(f"{rng.choice(ACTIONS)} the {rng.choice(OBJECTS)}")
            answers = sorted(answers - {truth})
            position = rng.randrange(4)
            answers.insert(position, truth)
            out.append(Segment(video.video_id, step.first_clip * CLIP_SECONDS, (step.last_clip + 1) * CLIP_SECONDS,
                               video.visual_tokens[step.first_clip:step.last_clip + 1], step.caption, step.action,
                               step.object, step.action, SYNTHETIC_QUESTION, answers, position,
                               f"synthetic {split} video {index} step {k}",
                               None if video.features is None else video.features[step.first_clip:step.last_clip + 1]))
    return out


def folder_segments(root: Union[str, Path], split: str, feature_dim: Optional[int] = None) -> list[Segment]:
    """The segments of `root/tasks/<split>.jsonl` with the visual tokens of their clips (see the module doc) and,
    with `feature_dim`, their features (features/<id>.npy, of that dimension)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    folder = VideoFolder(root, feature_dim, with_features=feature_dim is not None)
    path = folder.root / "tasks" / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: task file does not exist (one JSON segment per line; see videobert.tasks)")
    known, videos = {video_id: index for index, video_id in enumerate(folder.ids)}, {}
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
            video_id, start, end = str(record["video"]), float(record["start"]), float(record["end"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{where}: expected {{\"video\": id, \"start\": s, \"end\": s, ...}} "
                            f"({type(exc).__name__}: {exc})") from exc
        if video_id not in known:
            raise DataError(f"{where}: video {video_id!r} is not in {folder.root} (tokens/ or features/)")
        if not 0 <= start < end:
            raise DataError(f"{where}: needs 0 <= start < end, got start={start}, end={end}")
        if video_id not in videos:
            videos[video_id] = folder.video(known[video_id])
        span = videos[video_id].clip_range(start, end)
        clips = videos[video_id].visual_tokens[span.start:span.stop]
        if not clips:
            raise DataError(f"{where}: [{start}, {end}) s lies past the video's "
                            f"{len(videos[video_id].visual_tokens)} clips")
        answers = record.get("answers")
        if answers is not None and (not isinstance(answers, list) or len(answers) < 2
                                    or not all(isinstance(a, str) and a.strip() for a in answers)):
            raise DataError(f"{where}: answers must be a list of at least two non-empty strings")
        answer = record.get("answer")
        if answer is not None and (not isinstance(answer, int) or answers is None
                                   or not 0 <= answer < len(answers)):
            raise DataError(f"{where}: answer must be the index of the right entry of answers")
        text_fields = {}
        for name in ("text", "verb", "noun", "label", "question"):
            value = record.get(name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise DataError(f"{where}: {name} must be a non-empty string")
            text_fields[name] = value.strip() if value is not None else None
        features = videos[video_id].features
        out.append(Segment(video_id, start, end, clips, answers=answers, answer=answer, source=where,
                           # a copy: a view would keep the whole video's features alive
                           features=None if features is None else features[span.start:span.stop].clone(),
                           **text_fields))
    if not out:
        raise DataError(f"{path}: no segments")
    return out


def load_segments(data: str, split: str, task: str, config: VideoBERTConfig, num_videos: int = 64) -> list[Segment]:
    """`split`'s segments of `data` ("synthetic", with `num_videos` videos, or a data folder), checked to carry
    what `task` reads and visual tokens inside `config`'s vocabulary; with clip features when the config has a
    video_feature_dim."""
    segments = (synthetic_segments(split, num_videos, config.num_visual_tokens, config.video_feature_dim)
                if data == "synthetic" else folder_segments(data, split, config.video_feature_dim))
    for segment in segments:
        for name in TASK_FIELDS[task]:
            if getattr(segment, name) is None:
                raise DataError(f"{segment.source}: the {task} task needs {name!r} on every segment")
        bad = [t for t in segment.clips if not 0 <= t < config.num_visual_tokens]
        if bad:
            raise DataError(f"{segment.source}: visual token {bad[0]} is outside the checkpoint's visual vocabulary "
                            f"[0, {config.num_visual_tokens}) (tokenized with another visual tokenizer?)")
    return segments


# ------------------------------------------------------------------------------------------- checkpoints

@dataclass
class Checkpoint:
    """A trained model with the config, text tokenizer and run description (run.json) it was trained with."""

    model: nn.Module
    config: VideoBERTConfig
    tokenizer: TextTokenizer
    info: dict
    path: Path  # the step folder the weights came from


def checkpoint_folders(ckpt: Union[str, Path]) -> tuple[Path, Path]:
    """(run folder, step folder) of `ckpt`: a run folder (its newest checkpoints/step-*) or one step folder."""
    path = Path(ckpt)
    if (path / "model.safetensors").is_file():
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return run, path
    step = latest_checkpoint(path, report=logging.getLogger("videobert").warning)
    if step is None:
        raise FileNotFoundError(f"--ckpt {path}: no checkpoint there (expected a run folder with "
                                "checkpoints/step-*/model.safetensors, or one such step folder)")
    return path, step


def load_checkpoint(ckpt: Union[str, Path], build: Optional[Callable[[VideoBERTConfig, dict], nn.Module]] = None,
                    data: Optional[str] = None) -> Checkpoint:
    """The model of a training run's checkpoint (`build(config, run_info)` makes the module; by default a
    VideoBERTForPretraining), in eval mode on the CPU. With `data` a data folder, its vocab.txt must be the
    checkpoint's (else the word-piece ids would be misread)."""
    from safetensors.torch import load_file

    run, step = checkpoint_folders(ckpt)
    if not (run / "run.json").is_file() or not (run / "vocab.txt").is_file():
        raise FileNotFoundError(f"--ckpt {ckpt}: {run} lacks run.json or vocab.txt (written by videobert pretrain "
                                "and videobert finetune)")
    try:
        info = json.loads((run / "run.json").read_text())
        config = VideoBERTConfig.from_dict(info["config"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{run / 'run.json'} is damaged ({type(exc).__name__}: {exc})") from None
    tokenizer = TextTokenizer.from_vocab(run / "vocab.txt")
    tokenizer.check_config(config)
    if data not in (None, "synthetic") and (Path(data) / "vocab.txt").is_file():
        theirs = TextTokenizer.from_vocab(Path(data) / "vocab.txt")
        if theirs.vocabulary() != tokenizer.vocabulary():
            raise ValueError(f"vocabulary mismatch: {Path(data) / 'vocab.txt'} ({theirs.vocab_size} word pieces) is "
                             f"not the checkpoint's {run / 'vocab.txt'} ({tokenizer.vocab_size}); use the "
                             "vocabulary the model was pretrained with")
    model = build(config, info) if build is not None else VideoBERTForPretraining(config)
    verify_checkpoint(step)
    load_model_state(model, load_file(step / "model.safetensors"), step / "model.safetensors")
    return Checkpoint(model.eval(), config, tokenizer, info, step)


def sample_budget(checkpoint: Checkpoint) -> int:
    """Tokens per sample the checkpoint was trained with (specials included)."""
    args = checkpoint.info.get("args", {})
    return int(args.get("max_tokens", min(int(args.get("row_length", 128)), 128)))


# ------------------------------------------------------------------------------------------- packed inference

def device_of(name: str = "auto") -> torch.device:
    """The device `name` says ("auto": the GPU when there is one)."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"--device {name}: not a device (expected auto, cpu, cuda or cuda:N)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is available here (use --device cpu or auto)")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def encode_samples(encoder: nn.Module, samples: Sequence[dict[str, torch.Tensor]], row_length: int,
                   device: torch.device, tokens_per_batch: int = 16384, modality_rules: Optional[torch.Tensor] = None
                   ) -> Iterator[tuple[int, torch.Tensor]]:
    """Final encoder states of many samples (per-token tensors input_ids, token_type_ids and optionally
    position_ids and video_features, as `video_sample` makes), run packed several to a row of `row_length`, about
    `tokens_per_batch` tokens per forward; yields (index, (len, hidden) fp32 CPU tensor) in sample order. Position
    ids default to 0, 1, ... per sample; all samples carry video_features or none does."""
    chunk: list[int] = []
    size = 0
    for index, sample in enumerate(samples):
        n = sample["input_ids"].numel()
        if n > row_length:
            raise ValueError(f"sample {index} has {n} tokens, more than row_length ({row_length})")
        if chunk and size + n > tokens_per_batch:
            yield from _encode_chunk(encoder, samples, chunk, row_length, device, modality_rules)
            chunk, size = [], 0
        chunk.append(index)
        size += n
    if chunk:
        yield from _encode_chunk(encoder, samples, chunk, row_length, device, modality_rules)


def _encode_chunk(encoder, samples, chunk, row_length, device, modality_rules):
    rows = plan_rows([samples[i]["input_ids"].numel() for i in chunk], row_length)
    fields = [{"position_ids": torch.arange(samples[i]["input_ids"].numel()), **samples[i]} for i in chunk]
    fill = {"input_ids": 0, "token_type_ids": 0, "position_ids": 0}
    if "video_features" in fields[0]:
        fill["video_features"] = 0
    packed = pack_tensors(fields, row_length, fill, rows)
    rules = None if modality_rules is None else modality_rules.to(device)
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        hidden = encoder(**{k: v.to(device) for k, v in packed.items()}, modality_rules=rules).last_hidden_state
    hidden = hidden.float().cpu()
    states = {}
    for r, members in enumerate(rows):
        start = 0
        for member in members:
            n = fields[member]["input_ids"].numel()
            states[chunk[member]] = hidden[r, start:start + n]
            start += n
    for index in chunk:  # first-fit may place a later sample in an earlier row: back to sample order
        yield index, states[index]


def text_budget(budget: int) -> int:
    """Word pieces a sample of `budget` tokens keeps of its text when it has video too (half the room)."""
    return (budget - 3) // 2


def clip_budget(budget: int, text_len: int) -> int:
    """Clips that fit a sample of `budget` tokens next to `text_len` word pieces ([CLS], [>], [SEP] included)."""
    return max(0, budget - 3 - text_len)


def video_sample(config: VideoBERTConfig, text_ids: Sequence[int], video: Union[Sequence[int], torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
    """`[CLS] text [>] video [SEP]` as per-token tensors input_ids and token_type_ids: `video` is visual tokens, or
    a (clips, F) tensor of clip features (a continuous-feature model: [FEAT] positions, and video_features
    holding each one's vector, zeros elsewhere)."""
    if not torch.is_tensor(video):
        ids, types = encode_sample(config, text_ids, video)
        return {"input_ids": ids, "token_type_ids": types}
    if config.video_feature_dim is None:
        raise ValueError("clip features given to a model without video_feature_dim (a visual-token checkpoint)")
    ids, types = encode_sample(config, text_ids, [0] * len(video), as_features=True)
    features = torch.zeros(ids.numel(), video.shape[-1])
    features[ids == config.feature_token_id] = video.float()
    return {"input_ids": ids, "token_type_ids": types, "video_features": features}


# ------------------------------------------------------------------------------------------- zero-shot

def read_word_list(path: Union[str, Path], what: str) -> list[str]:
    """Words of a list file (one per line; blank lines and '#' comments skipped); an empty list is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} list {path} does not exist")
    words = [w.strip() for w in path.read_text(encoding="utf-8").splitlines()]
    words = [w for w in words if w and not w.startswith("#")]
    if not words:
        raise ValueError(f"{what} list {path} is empty")
    if len(set(words)) != len(words):
        raise ValueError(f"{what} list {path} repeats a word")
    return words


def zero_shot(checkpoint: Checkpoint, segments: Sequence[Segment], verbs: Sequence[str], nouns: Sequence[str],
              template: str = ZERO_SHOT_TEMPLATE, device: torch.device = torch.device("cpu"),
              row_length: int = 256) -> dict:
    """Zero-shot action classification as in the paper: each segment's video after the template sentence (its
    first [MASK] the verb slot, its second the noun slot), verbs and nouns ranked by the masked-token
    probabilities. A candidate of k word pieces fills its slot with k masks and scores the mean log-probability
    of its pieces. Returns top-1/top-5 accuracies (a truth missing from a list counts as wrong), chance levels
    and per-segment predictions."""
    if not verbs or not nouns:
        raise ValueError("the verb and noun lists must not be empty")
    if template.count("[MASK]") != 2:
        raise ValueError(f"the template needs exactly two [MASK] slots (verb, then noun), got {template!r}")
    model, config, tok = checkpoint.model.to(device), checkpoint.config, checkpoint.tokenizer
    parts = [tok.encode(part) for part in template.split("[MASK]")]
    pieces = {"verb": [tok.encode(w) for w in verbs], "noun": [tok.encode(w) for w in nouns]}
    for slot, words in (("verb", verbs), ("noun", nouns)):
        empty = [w for w, p in zip(words, pieces[slot]) if not p]
        if empty:
            raise ValueError(f"{slot} list: {empty[:3]} encode to no word piece")
    # One prompt per (slot, piece count): the slot scored gets k masks, the other one mask.
    prompts = {(slot, k) for slot in pieces for k in {len(p) for p in pieces[slot]}}
    prompts = sorted(prompts)
    budget = sample_budget(checkpoint)
    samples, layout = [], []
    for segment in segments:
        for slot, k in prompts:
            verb_k, noun_k = (k, 1) if slot == "verb" else (1, k)
            text = (parts[0] + [config.mask_token_id] * verb_k + parts[1] + [config.mask_token_id] * noun_k
                    + parts[2])
            first = 1 + len(parts[0]) if slot == "verb" else 1 + len(parts[0]) + verb_k + len(parts[1])
            samples.append(video_sample(config, text, segment.video[:clip_budget(budget, len(text))]))
            layout.append((slot, k, list(range(first, first + k))))
    scores = {"verb": torch.full((len(segments), len(verbs)), float("-inf")),
              "noun": torch.full((len(segments), len(nouns)), float("-inf"))}
    for index, hidden in shown(encode_samples(model.bert, samples, row_length, device), len(samples), "prompts"):
        slot, k, positions = layout[index]
        with torch.no_grad():
            logp = torch.log_softmax(model.text_logits(hidden[positions].to(device)).float().cpu(), dim=-1)
        for c, p in enumerate(pieces[slot]):
            if len(p) == k:
                scores[slot][index // len(prompts), c] = logp[torch.arange(k), torch.tensor(p)].mean()
    result: dict = {"segments": len(segments), "verbs": len(verbs), "nouns": len(nouns)}
    predictions = [{"video": s.video_id, "start": s.start, "end": s.end, "verb": s.verb, "noun": s.noun}
                   for s in segments]
    for slot, words in (("verb", verbs), ("noun", nouns)):
        ranked = scores[slot].argsort(dim=1, descending=True)
        truth = torch.tensor([words.index(getattr(s, slot)) if getattr(s, slot) in words else -1 for s in segments])
        for k in (1, 5):
            hits = (ranked[:, :k] == truth[:, None]).any(dim=1)
            result[f"{slot}_top{k}"] = float(hits.float().mean()) if segments else 0.0
            result[f"{slot}_top{k}_chance"] = min(k, len(words)) / len(words)
        result[f"{slot}_not_in_list"] = int((truth < 0).sum())
        for p, row in zip(predictions, ranked[:, :5].tolist()):
            p[f"{slot}_top5"] = [words[i] for i in row]
    result["predictions"] = predictions
    return result


# ------------------------------------------------------------------------------------------- retrieval

def shown(items: Iterable, total: int, what: str) -> Iterable:
    """`items`, counted on a progress bar on a terminal's stderr as they are taken (nothing elsewhere)."""
    return tqdm(items, total=total, desc=what, disable=None, leave=False, dynamic_ncols=True)


def retrieval(checkpoint: Checkpoint, segments: Sequence[Segment], device: torch.device = torch.device("cpu"),
              row_length: int = 256) -> dict:
    """Video-text retrieval by the matching head: every (sentence i, video j) pair of the segments is scored by
    log P(match), all pairs batched through the packed encoder. Segment i's own video is sentence i's answer
    (and its sentence the video's). Returns Recall@1/5/10 and median rank both ways, the chance levels, and
    the (sentences x videos) score matrix."""
    n = len(segments)
    if n < 2:
        raise ValueError(f"retrieval needs at least 2 segments, got {n}")
    model, config, tok = checkpoint.model.to(device), checkpoint.config, checkpoint.tokenizer
    budget = sample_budget(checkpoint)
    texts = [tok.encode(s.text)[:text_budget(budget)] for s in segments]
    samples = [video_sample(config, texts[i], segments[j].video[:clip_budget(budget, len(texts[i]))])
               for i in range(n) for j in range(n)]
    pairs = shown(encode_samples(model.bert, samples, row_length, device), len(samples), "pairs")
    cls = torch.stack([hidden[0] for _, hidden in pairs])
    with torch.no_grad():
        scores = torch.log_softmax(model.match_logits(cls.to(device)).float(), dim=-1)[:, 1].cpu().view(n, n)
    result: dict = {"candidates": n}
    for name, matrix in (("text_to_video", scores), ("video_to_text", scores.T)):
        # rank of the right answer: 1 + how many candidates score strictly higher
        ranks = 1 + (matrix > matrix.diagonal()[:, None]).sum(dim=1)
        for k in (1, 5, 10):
            result[f"{name}_R@{k}"] = float((ranks <= k).float().mean())
            result[f"{name}_R@{k}_chance"] = min(k, n) / n
        result[f"{name}_median_rank"] = float(statistics.median(ranks.tolist()))
    result["median_rank_chance"] = (n + 1) / 2
    result["scores"] = scores
    return result


# ------------------------------------------------------------------------------------------- embeddings

def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` a temporary file beside `path`, then rename it into place (no half-written file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_npy(path: Path, array) -> None:
    """`array` as a .npy file at `path`, written atomically."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array))
    write_atomic(path, write)


@dataclass
class VideoEmbeddings:
    """Contextual embeddings of one video: per clip, per window of clips (its [CLS]) and per sentence."""

    video_id: str
    clips: torch.Tensor  # (clips, hidden): each clip's state in its window
    windows: torch.Tensor  # (windows, hidden): [CLS] of each video-only window
    window_clips: torch.Tensor  # (windows, 2): first clip, clip count
    sentences: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # (sentences, hidden): [CLS] of text+video
    sentence_times: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 2))  # (sentences, 2): start, end


def embed_videos(checkpoint: Checkpoint, videos: Iterable[Video], device: torch.device = torch.device("cpu"),
                 row_length: int = 256) -> Iterator[VideoEmbeddings]:
    """Per video: its clips in consecutive video-only windows
    `[CLS] [>] clips [SEP]` of the checkpoint's sample budget (each clip's contextual state; each window's
    [CLS]), and each sentence with the clips it spans (the joint sample's [CLS]); one video at a time. A
    continuous-feature checkpoint reads the videos' clip features (ValueError naming a video without)."""
    model, config, tok = checkpoint.model.to(device), checkpoint.config, checkpoint.tokenizer
    budget = sample_budget(checkpoint)
    width = clip_budget(budget, 0)
    for video in videos:
        clips = video.visual_tokens if config.video_feature_dim is None else video.features
        if clips is None:
            raise ValueError(f"video {video.video_id} has no clip features; {checkpoint.path} is a "
                             "continuous-feature checkpoint")
        sentences = video.sentences
        samples, spans = [], []
        for first in range(0, len(clips), width):
            samples.append(video_sample(config, [], clips[first:first + width]))
            spans.append((first, len(clips[first:first + width])))
        for sentence in sentences:
            ids = tok.encode(sentence.text)[:text_budget(budget)]
            span = video.clip_range(sentence.start, sentence.end)
            samples.append(video_sample(config, ids, clips[span.start:span.stop][:clip_budget(budget, len(ids))]))
        states = [h for _, h in encode_samples(model.bert, samples, row_length, device)]
        windows = states[:len(spans)]
        hidden = config.hidden_size
        yield VideoEmbeddings(
            video.video_id,
            torch.cat([h[2:-1] for h in windows]) if windows else torch.zeros(0, hidden),
            torch.stack([h[0] for h in windows]) if windows else torch.zeros(0, hidden),
            torch.tensor(spans, dtype=torch.long).reshape(-1, 2),
            torch.stack([h[0] for h in states[len(spans):]]) if sentences else torch.zeros(0, hidden),
            torch.tensor([(s.start, s.end) for s in sentences], dtype=torch.float32).reshape(-1, 2))


def save_embeddings(emb: VideoEmbeddings, out: Union[str, Path], fmt: str = "safetensors") -> list[Path]:
    """Write one video's embeddings into `out`: `<id>.safetensors` (tensors clips, windows, window_clips,
    sentences, sentence_times) or `<id>.<tensor>.npy` each; every file written atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: getattr(emb, name).contiguous() for name in
               ("clips", "windows", "window_clips", "sentences", "sentence_times")}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = out / f"{emb.video_id}.safetensors"
        write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"video_id": emb.video_id}))
        return [path]
    if fmt != "npy":
        raise ValueError(f"format must be 'safetensors' or 'npy', got {fmt!r}")
    paths = [out / f"{emb.video_id}.{name}.npy" for name in tensors]
    for path, tensor in zip(paths, tensors.values()):
        save_npy(path, tensor.numpy())
    return paths
