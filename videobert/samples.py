"""Training samples from videos, as in the VideoBERT paper, and a deterministic, resumable, sharded stream of
packed batches.

Per sentence (or a random run of 1 to `max_concat` neighbouring sentences): a joint sample
`[CLS] text [>] video [SEP]` with the clips of its time span (subsampled with a random stride 1 to
`max_stride`), matched or, with probability `negative_prob`, paired with a span of another video (VTM label
0; always a different video: with one video per batch, the next batch's); or a text-only or video-only sample (VTM ignored), in the `mix` proportions. Masking: 15% of word pieces
and visual tokens, 80/10/10. Batch b of a shard is built from a fixed run of that shard's videos with a
generator seeded by (seed, epoch, b), so any position can be resumed without replaying the ones before it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch

from videobert.config import VideoBERTConfig
from videobert.corpus import CLIP_SECONDS, Video, synthetic_video, token_features
from videobert.data import PackedBatch, encode_sample, mask_tokens, pack_samples, plan_rows
from videobert.model import IGNORE_INDEX
from videobert.real_data import DataError


@dataclass
class SampleOptions:
    """How samples are drawn from a video."""

    mix: tuple[float, float, float] = (0.6, 0.2, 0.2)  # joint, text-only, video-only
    negative_prob: float = 0.5
    max_concat: int = 3
    max_stride: int = 5
    mask_prob: float = 0.15
    max_tokens: int = 128  # a sample's budget, specials included; longer text/video is cut
    continuous: bool = False  # clips go in as [FEAT] positions with their feature vectors (text MLM and VTM only)
    nce: bool = False  # each matched pair also as a text-only and a video-only sample (the contrastive objective)

    def __post_init__(self) -> None:
        if len(self.mix) != 3 or min(self.mix) < 0 or sum(self.mix) <= 0:
            raise ValueError(f"mix must be three non-negative weights with a positive sum, got {self.mix}")
        if not 0 <= self.negative_prob <= 1 or self.max_concat < 1 or self.max_stride < 1 or self.max_tokens < 4:
            raise ValueError("need 0 <= negative_prob <= 1, max_concat >= 1, max_stride >= 1, max_tokens >= 4")


def build_samples(video: Video, other: Optional[Video], encode_text: Callable[[str], list[int]],
                  config: VideoBERTConfig, options: SampleOptions, rng: random.Random) -> list[tuple]:
    """(input_ids, token_type_ids, vtm_label, clip features or None) of every sample drawn from `video`;
    `other`, a different video, supplies negatives (none without it). A video without sentences gives video-only samples: consecutive windows of its
    clips, each as long as a sample's budget allows."""
    if not video.sentences:
        width = options.max_tokens - 3
        return [_video_only(video, range(first, min(first + width, len(video.visual_tokens))), config, options)
                for first in range(0, len(video.visual_tokens), width)]
    samples = []
    i = 0
    while i < len(video.sentences):
        run = video.sentences[i:i + rng.randint(1, options.max_concat)]
        i += len(run)
        text = [t for s in run for t in encode_text(s.text)]
        start, end = run[0].start, max(s.end for s in run)
        kind = rng.choices(("joint", "text", "video"), weights=options.mix)[0]
        label = IGNORE_INDEX
        source = video
        if kind == "joint":
            label = 1
            if rng.random() < options.negative_prob and other is not None and other.visual_tokens:
                label, source = 0, other
                shift = rng.uniform(0, max(0.0, len(other.visual_tokens) * CLIP_SECONDS - (end - start)))
                start, end = shift, shift + (end - start)
        indices = list(source.clip_range(start, end))[::rng.randint(1, options.max_stride)]
        if kind == "text":
            indices = []
        if kind == "video":
            text = []
        budget = options.max_tokens - 3
        text = text[:budget // 2] if indices else text[:budget]
        indices = indices[:budget - len(text)]
        if not text and not indices:
            continue
        features = _clip_features(source, indices, options)
        ids, types = encode_sample(config, text, [source.visual_tokens[c] for c in indices], options.continuous)
        samples.append((ids, types, label, features))
    return samples


def _clip_features(video: Video, indices: Sequence[int], options: SampleOptions) -> Optional[torch.Tensor]:
    """The clip features of `indices` in the continuous mode (None otherwise)."""
    if not options.continuous:
        return None
    if video.features is None:
        raise ValueError(f"video {video.video_id} has no clip features; continuous mode needs them")
    return video.features[list(indices)]


def _video_only(video: Video, indices: range, config: VideoBERTConfig, options: SampleOptions) -> tuple:
    """A video-only sample of the clips `indices` (no matching label)."""
    ids, types = encode_sample(config, [], [video.visual_tokens[c] for c in indices], options.continuous)
    return ids, types, IGNORE_INDEX, _clip_features(video, indices, options)


@dataclass
class BatchStats:
    """What one batch holds: samples, rows, and the share of row positions that are real tokens."""

    samples: int
    rows: int
    tokens: int
    efficiency: float
    skipped_videos: int = 0  # videos of the batch left out as bad data (--on-bad-data skip)


def make_batch(videos: Sequence[Video], encode_text: Callable[[str], list[int]], config: VideoBERTConfig,
               options: SampleOptions, row_length: int, seed: Sequence[int],
               packed: bool = True, spare: Optional[Video] = None) -> tuple[PackedBatch, BatchStats]:
    """Every sample of `videos` in rows of `row_length` (no sample split, none dropped), masked: packed
    first-fit, or one sample per row (the padded layout, for comparisons). Negatives pair a video with the next
    one of the batch; a batch of one video takes them from `spare` (another batch's video), or has none."""
    rng = random.Random("/".join(map(str, seed)))
    samples = []
    for index, video in enumerate(videos):
        other = videos[(index + 1) % len(videos)] if len(videos) > 1 else spare
        samples += build_samples(video, other, encode_text, config, options, rng)
    pairs = []
    if options.nce:  # the matched pairs' text and video apart, each with its own [CLS]
        for ids, types, label, features in list(samples):
            if label == 1:
                cut = int((ids == config.join_token_id).nonzero()[0]) + 1
                pairs.append((len(samples), len(samples) + 1))
                samples.append((torch.cat([ids[:cut], ids[-1:]]), torch.cat([types[:cut], types[-1:]]), IGNORE_INDEX,
                                None if features is None else features[:0]))
                samples.append((torch.cat([ids[:1], ids[cut - 1:]]), torch.cat([types[:1], types[cut - 1:]]),
                                IGNORE_INDEX, features))
    if not samples:
        raise ValueError("the videos of this batch yield no samples (no sentences and no clips)")
    rows = plan_rows([sample[0].numel() for sample in samples], row_length, packed)
    input_ids, token_types, segment_ids = pack_samples([(sample[0], sample[1]) for sample in samples], row_length,
                                                       config.pad_token_id, rows)
    gen = torch.Generator().manual_seed(rng.getrandbits(62))
    masked, labels = mask_tokens(config, input_ids, token_types, options.mask_prob, gen)
    # VTM labels go in [CLS] order, which is row-major over the packed rows.
    vtm = torch.tensor([samples[i][2] for row in rows for i in row], dtype=torch.long)
    cls_order = {i: position for position, i in enumerate(i for row in rows for i in row)}
    nce_pairs = (torch.tensor([(cls_order[t], cls_order[v]) for t, v in pairs], dtype=torch.long).reshape(-1, 2)
                 if options.nce else None)
    video_features = None
    if options.continuous:
        dim = next(s[3].shape[-1] for s in samples if s[3] is not None and s[3].numel())
        video_features = torch.zeros(*input_ids.shape, dim)
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                ids, features = samples[i][0], samples[i][3]
                positions = start + (ids == config.feature_token_id).nonzero().flatten()
                video_features[r, positions] = features.float()
                start += ids.numel()
    tokens = int((segment_ids >= 0).sum())
    stats = BatchStats(len(samples), input_ids.shape[0], tokens, tokens / max(1, input_ids.numel()))
    return PackedBatch(masked, token_types, segment_ids, labels, vtm, video_features, nce_pairs=nce_pairs), stats


class ShardedBatches:
    """Batch b of epoch e, deterministic given `seed`, resumable at any batch, sharded by rank: each epoch
    shuffles the `num_units` units of work (runs of videos, groups of examples) and shard `rank` of
    `world_size` takes every world_size-th. Subclasses (dataclasses with the fields seed, rank, world_size,
    epoch, position) say how many units there are and build one (`build_unit(unit, seed)`)."""

    @property
    def num_units(self) -> int:
        """Units of work per epoch (each one batch)."""
        raise NotImplementedError

    def build_unit(self, unit: int, seed: tuple) -> tuple:
        """(batch, BatchStats) of unit `unit`, drawn with the generator seed (seed, epoch, index, rank)."""
        raise NotImplementedError

    def no_batch_message(self) -> str:
        """Why an epoch has no batch on this rank."""
        return f"{self.num_units} units of work make no batch per rank for {self.world_size} rank(s)"

    def _check_shard(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")

    @property
    def batches_per_epoch(self) -> int:
        """Batches this shard yields per epoch (units beyond an even split across ranks are dropped)."""
        return self.num_units // self.world_size

    def batch(self, epoch: int, index: int) -> tuple:
        """Batch `index` of `epoch` of this shard, independent of any other."""
        units = list(range(self.num_units))
        random.Random(f"{self.seed}/epoch/{epoch}").shuffle(units)
        return self.build_unit(units[index * self.world_size + self.rank], (self.seed, epoch, index, self.rank))

    def __iter__(self) -> Iterator[tuple]:
        """Batches from the saved position on, epoch after epoch (advancing the position as it goes)."""
        if self.batches_per_epoch == 0:
            raise ValueError(self.no_batch_message())
        while True:
            while self.position < self.batches_per_epoch:
                item = self.batch(self.epoch, self.position)
                self.position += 1
                yield item
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        """Where the stream is: enough to resume exactly."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position (the seed and the number of shards must match). The saving rank may be
        another one: every shard has batches_per_epoch batches and the ranks move through them in lockstep, so
        rank 0's position is every rank's."""
        for key in ("seed", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume: saved {key}={state[key]}, this stream has {getattr(self, key)}")
        self.epoch, self.position = state["epoch"], state["position"]


@dataclass
class PretrainingStream(ShardedBatches):
    """Packed pretraining batches from a corpus (see `ShardedBatches`).

    `videos(start, stop)` returns the corpus' videos [start, stop) (a synthetic generator or a real loader);
    a unit is a run of `videos_per_batch` videos.
    """

    videos: Callable[[int, int], Sequence[Video]]
    num_videos: int
    encode_text: Callable[[str], list[int]]
    config: VideoBERTConfig
    options: SampleOptions = field(default_factory=SampleOptions)
    row_length: int = 128
    packed: bool = True  # False: one sample per row (padded), for comparisons
    videos_per_batch: int = 8
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    epoch: int = 0
    position: int = 0  # next batch index within the epoch

    def __post_init__(self) -> None:
        self._check_shard()
        if self.videos_per_batch < 1 or self.num_videos < 1:
            raise ValueError("videos_per_batch and num_videos must be >= 1")

    @property
    def num_units(self) -> int:
        """Runs of videos_per_batch videos."""
        return self.num_videos // self.videos_per_batch

    def no_batch_message(self) -> str:
        """Why an epoch has no batch on this rank."""
        return f"{self.num_videos} videos make no batch of {self.videos_per_batch} per rank"

    def build_unit(self, unit: int, seed: tuple) -> tuple[PackedBatch, BatchStats]:
        """Every sample of run `unit`, packed and masked."""
        start = unit * self.videos_per_batch
        videos = self.videos(start, start + self.videos_per_batch)
        if not videos:
            raise DataError(f"all {self.videos_per_batch} videos of batch {unit} are bad data (named above)")
        spare = None
        if len(videos) == 1 and self.num_videos > 1:  # negatives from another batch's video, never this one
            for offset in range(self.videos_per_batch, self.num_videos):  # the videos of the other batches
                other = self.videos((start + offset) % self.num_videos, (start + offset) % self.num_videos + 1)
                if other:  # none when that video is bad data and skipped
                    spare = other[0]
                    break
        batch, stats = make_batch(videos, self.encode_text, self.config, self.options, self.row_length, seed,
                                  self.packed, spare)
        stats.skipped_videos = self.videos_per_batch - len(videos)
        return batch, stats


class BatchDataset(torch.utils.data.IterableDataset):
    """A stream's batches for a `torch.utils.data.DataLoader(batch_size=None, num_workers=W)`: from the stream's
    saved position on, worker w builds every W-th batch, so the loader yields them in stream order. Items are
    (epoch, index, batch, stats): the consumer saves (epoch, index + 1) as the position to resume from."""

    def __init__(self, stream: PretrainingStream, num_batches: Optional[int] = None):
        super().__init__()
        self.stream, self.num_batches = stream, num_batches

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        per_epoch = self.stream.batches_per_epoch
        if per_epoch == 0:
            raise ValueError("the stream has no batch per epoch on this rank")
        start = self.stream.epoch * per_epoch + self.stream.position
        step = worker
        while self.num_batches is None or step < self.num_batches:
            epoch, index = divmod(start + step, per_epoch)
            yield (epoch, index, *self.stream.batch(epoch, index))
            step += workers


def synthetic_videos(seed: int = 0, num_visual_tokens: int = 20736,
                     feature_dim: Optional[int] = None) -> Callable[[int, int], list[Video]]:
    """`videos(start, stop)` over the embedded synthetic corpus (each video generated on demand), with clip
    features of `feature_dim` for the continuous mode when given."""
    def videos(start: int, stop: int) -> list[Video]:
        out = [synthetic_video(seed, i, num_visual_tokens) for i in range(start, stop)]
        if feature_dim is not None:
            for i, video in zip(range(start, stop), out):
                video.features = token_features(video.visual_tokens, feature_dim, seed=seed * 1_000_003 + i)
        return out
    return videos


def sentences_of(videos: Iterable[Video]) -> Iterator[str]:
    """Every sentence text of `videos` (to train a text tokenizer on)."""
    for video in videos:
        for sentence in video.sentences:
            yield sentence.text
