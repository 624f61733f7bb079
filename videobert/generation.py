"""The paper's signature uses of a pretrained VideoBERT, with pictures: text-to-video generation (`videobert
generate`: per sentence, the most likely visual token after `[CLS] sentence [>]`, and a short sequence drawn
greedily one masked token at a time) and future forecasting (`videobert forecast`: the top visual tokens at a
masked position after a video's clips up to clip T, at several time scales).

A time scale s is a clip stride, as pretraining samples clips with a random stride: the context is clips
T - (n - 1) s, ..., T - s, T and the masked position the clip 1.5 s x s seconds after T.

Pictures show each visual token as the paper does, as the training frame nearest its centroid: the thumbnail of
the clip `tokenize-video` recorded for it in the data folder (token_clips.json, thumbnails/<id>.npy). On the
synthetic corpus (no frames) a token is a tile with its id and the concept it stands for in the generator.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from videobert.corpus import ACTIONS, OBJECTS, concept_tokens, synthetic_video
from videobert.data import encode_sample
from videobert.real_data import DataError, VideoFolder
from videobert.tasks import Checkpoint, clip_budget, encode_samples, sample_budget, text_budget

# A tile: (picture (S, S, 3) uint8 or None, caption)
Tile = tuple[Optional[np.ndarray], str]


def split_sentences(text: str) -> list[str]:
    """The sentences of `text`, split after '.', '!' or '?' (empty ones dropped)."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip(" .!?")]


def require_visual_tokens(checkpoint: Checkpoint, what: str) -> None:
    """ValueError when `checkpoint` is a continuous-feature one: `what` (a command) predicts visual tokens."""
    if checkpoint.config.video_feature_dim is not None:
        raise ValueError(f"{what} predicts visual tokens: {checkpoint.path} is a continuous-feature checkpoint, "
                         "whose masked-token head was not trained on visual tokens")


@torch.no_grad()
def _masked_visual(checkpoint: Checkpoint, samples: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                   allowed: Optional[Sequence[int]]) -> torch.Tensor:
    """(len(samples), num_visual_tokens) log-probabilities at each sample's last position before [SEP] (a mask),
    over the `allowed` tokens only when given (the others -inf)."""
    model, config = checkpoint.model.to(device), checkpoint.config
    masked = []
    for ids, types in samples:
        ids = ids.clone()
        ids[-2] = config.mask_token_id
        masked.append({"input_ids": ids, "token_type_ids": types})
    states = torch.stack([h[-2] for _, h in encode_samples(model.bert, masked, 256, device)])
    logits = model.visual_logits(states.to(device)).float().cpu()
    if allowed is not None:
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool)
        keep[torch.as_tensor(list(allowed), dtype=torch.long)] = True
        logits = logits.masked_fill(~keep, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def generate(checkpoint: Checkpoint, sentences: Sequence[str], length: int = 4,
             device: torch.device = torch.device("cpu"), allowed: Optional[Sequence[int]] = None) -> list[dict]:
    """Per sentence: {"sentence", "token" (the argmax visual token after `[CLS] sentence [>]`), "sequence" (`length`
    tokens, each the argmax at a mask after the sentence and the tokens before it)}; among the `allowed` tokens
    when given."""
    require_visual_tokens(checkpoint, "generate")
    if not sentences or length < 1:
        raise ValueError("generate needs at least one sentence and length >= 1")
    config, budget = checkpoint.config, sample_budget(checkpoint)
    texts = [checkpoint.tokenizer.encode(s)[:text_budget(budget)] for s in sentences]
    for sentence, text in zip(sentences, texts):
        if not text:
            raise ValueError(f"--text: the sentence {sentence!r} encodes to no word piece")
    length = min(length, clip_budget(budget, max(map(len, texts))))
    sequences: list[list[int]] = [[] for _ in sentences]
    for _ in range(length):  # the mask takes the place of a clip after the ones drawn so far
        logp = _masked_visual(checkpoint, [encode_sample(config, t, s + [0]) for t, s in zip(texts, sequences)],
                              device, allowed)
        for sequence, best in zip(sequences, logp.argmax(-1).tolist()):
            sequence.append(best)
    return [{"sentence": s, "token": q[0], "sequence": q} for s, q in zip(sentences, sequences)]


def forecast(checkpoint: Checkpoint, tokens: Sequence[int], clip: int, scales: Sequence[int] = (1, 2, 3),
             context: int = 4, top: int = 3, device: torch.device = torch.device("cpu"),
             allowed: Optional[Sequence[int]] = None) -> list[dict]:
    """Per time scale s: {"scale", "seconds_ahead", "context" (the clips' tokens, oldest first), "top" (the `top`
    most likely visual tokens 1.5 s x s after clip `clip`, among the `allowed` ones when given), "logp"};
    `tokens` are the video's visual tokens."""
    require_visual_tokens(checkpoint, "forecast")
    if not 0 <= clip < len(tokens):
        raise ValueError(f"--clip {clip}: the video has clips 0 to {len(tokens) - 1}")
    if not scales or min(scales) < 1 or context < 1:
        raise ValueError("--scales must be positive clip strides and --context at least 1")
    context = min(context, clip_budget(sample_budget(checkpoint), 0) - 1)
    windows = [[tokens[c] for c in range(clip, -1, -s)][:context][::-1] for s in scales]
    logp = _masked_visual(checkpoint, [encode_sample(checkpoint.config, [], w + [0]) for w in windows], device,
                          allowed)
    best = logp.topk(min(top, logp.shape[-1] if allowed is None else len(allowed)), dim=-1)
    return [{"scale": s, "seconds_ahead": 1.5 * s, "context": w, "top": t, "logp": [round(v, 4) for v in p]}
            for s, w, t, p in zip(scales, windows, best.indices.tolist(), best.values.tolist())]


def video_tokens(data: str, video_id: str, num_visual_tokens: int) -> list[int]:
    """The visual tokens of a video: of a data folder (tokens/<id>.npy), or a synthetic one named
    synthetic-<seed>-<index>."""
    if data == "synthetic":
        match = re.fullmatch(r"synthetic-(\d+)-(\d+)", video_id)
        if match is None:
            raise ValueError(f"--video {video_id!r}: a synthetic video is named synthetic-<seed>-<index>, "
                             "e.g. synthetic-4000037-000000 (the test split's first)")
        return synthetic_video(int(match[1]), int(match[2]), num_visual_tokens).visual_tokens
    return VideoFolder(data).tokens(video_id)


def token_tiles(data: str, num_visual_tokens: int) -> tuple[Callable[[int], Tile], Optional[list[int]]]:
    """(`tile(token)`: the picture and caption that show a visual token (module docstring), the tokens the data
    holds (None for the synthetic corpus): a data folder's tokenizer may have fewer words than the model)."""
    if data == "synthetic":
        concepts: dict[int, str] = {}
        for kind, names in (("action", ACTIONS), ("object", OBJECTS)):
            for index, name in enumerate(names):
                for token in concept_tokens(kind, index, num_visual_tokens):
                    concepts.setdefault(token, name)
        return (lambda token: (None, f"#{token}\n{concepts.get(token, '-')}")), None
    root = Path(data)
    path = root / "token_clips.json"
    if not path.is_file():
        raise DataError(f"{path}: no token pictures (run `videobert tokenize-video {root}` after extract-features "
                        "wrote thumbnails/)")
    try:
        nearest = json.loads(path.read_text())["tokens"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: expected {{\"tokens\": {{token: {{\"video\", \"clip\"}}}}}} ({exc})") from None
    thumbnails: dict[str, np.ndarray] = {}

    def tile(token: int) -> Tile:
        entry = nearest.get(str(token))
        if entry is None:
            return None, f"#{token}\n(no clip)"
        video = entry["video"]
        if video not in thumbnails:
            file = root / "thumbnails" / f"{video}.npy"
            if not file.is_file():
                raise DataError(f"{file}: thumbnail file does not exist (extract-features writes one per video)")
            thumbnails[video] = np.load(file, mmap_mode="r")
        return np.asarray(thumbnails[video][entry["clip"]]), f"#{token}"
    known = sorted(int(t) for t in nearest)
    if not known or known[-1] >= num_visual_tokens:
        raise DataError(f"{path}: tokens outside the model's visual vocabulary [0, {num_visual_tokens})")
    return tile, known


def draw(rows: Sequence[tuple[str, Sequence[int]]], tile: Callable[[int], Tile], path: Path, title: str) -> Path:
    """A PNG at `path` with one row of token tiles per (label, tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(len(tokens) for _, tokens in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.3 * columns + 2.6, 1.45 * len(rows) + 0.5),
                             squeeze=False)
    for r, (label, tokens) in enumerate(rows):
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(tokens):
                ax.axis("off")
                continue
            picture, caption = tile(tokens[c])
            if picture is None:  # a tile coloured by the token, its caption inside
                ax.set_facecolor(plt.cm.tab20(tokens[c] % 20))
                ax.text(0.5, 0.5, caption, ha="center", va="center", fontsize=8, transform=ax.transAxes)
            else:
                ax.imshow(picture)
                ax.set_xlabel(caption, fontsize=7)
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
