"""Samples and the packed-batch stream: layout, VTM labels, masking, packing invariants, determinism, resume,
sharding."""
import random

import pytest
import torch

from videobert.config import VideoBERTConfig
from videobert.corpus import synthetic_corpus
from videobert.model import IGNORE_INDEX, VideoBERTForPretraining
from videobert.samples import PretrainingStream, SampleOptions, build_samples, make_batch, synthetic_videos
from videobert.text_tokenizer import TextTokenizer


@pytest.fixture(scope="module")
def tokenizer():
    """A WordPiece vocabulary of 300 trained on the synthetic corpus."""
    return TextTokenizer.train((s.text for v in synthetic_corpus(50) for s in v.sentences), vocab_size=300)


@pytest.fixture(scope="module")
def config(tokenizer):
    """The tiny preset with the tokenizer's vocabulary."""
    return VideoBERTConfig.tiny(**tokenizer.config_overrides())


def stream(tokenizer, config, **kw):
    """A pretraining stream over 64 seeded synthetic videos."""
    return PretrainingStream(synthetic_videos(seed=5, num_visual_tokens=config.num_visual_tokens), 64,
                             tokenizer.encode, config, **kw)


def test_samples_follow_the_paper_layout(tokenizer, config):
    videos = list(synthetic_corpus(6, seed=2))
    rng = random.Random(0)
    samples = [s for v, o in zip(videos, videos[1:] + videos[:1])
               for s in build_samples(v, o, tokenizer.encode, config, SampleOptions(max_tokens=40), rng)]
    kinds = set()
    for ids, types, vtm, _ in samples:
        assert ids[0] == config.cls_token_id and ids[-1] == config.sep_token_id and ids.numel() <= 40
        join = (ids == config.join_token_id).nonzero().flatten()
        assert join.numel() == 1
        text, video = ids[1:join], ids[join + 1:-1]
        assert (text < config.text_vocab_size).all() and (video >= config.visual_offset).all()
        assert (types[:join + 1] == 0).all() and (types[join + 1:] == 1).all()
        kinds.add(("text" if text.numel() else "") + ("video" if video.numel() else ""))
        assert vtm in (0, 1, IGNORE_INDEX) and (vtm == IGNORE_INDEX) == (not (text.numel() and video.numel()))
    assert kinds == {"text", "video", "textvideo"}
    labels = [s[2] for s in samples if s[2] != IGNORE_INDEX]
    assert 0 < sum(labels) < len(labels)  # matched and mismatched pairs both occur


def test_batches_pack_every_sample_whole_and_mask_within_bounds(tokenizer, config):
    videos = list(synthetic_corpus(8, seed=3))
    batch, stats = make_batch(videos, tokenizer.encode, config, SampleOptions(max_tokens=64), 128, (1, 2))
    cls = batch.input_ids == config.cls_token_id  # [CLS] is never masked
    assert stats.samples == int((batch.segment_ids.unsqueeze(-1) == torch.arange(64)).any(1).sum())
    assert batch.vtm_labels.numel() == stats.samples == int(cls.sum())
    assert 0.5 < stats.efficiency <= 1 and stats.tokens == int((batch.segment_ids >= 0).sum())
    for row in batch.segment_ids:  # samples are contiguous runs numbered 0, 1, ... then padding
        ids = row[row >= 0]
        assert torch.equal(ids, torch.sort(ids).values) and (row[ids.numel():] == -1).all()
    masked = batch.mlm_labels != IGNORE_INDEX
    rate = masked.sum() / (batch.segment_ids >= 0).sum()
    assert 0.08 < rate < 0.22


def test_stream_is_deterministic_resumable_and_sharded(tokenizer, config):
    first = next(iter(stream(tokenizer, config, videos_per_batch=4)))[0]
    it = iter(stream(tokenizer, config, videos_per_batch=4))
    batches = [next(it)[0] for _ in range(5)]
    assert torch.equal(first.input_ids, batches[0].input_ids)
    resumed = stream(tokenizer, config, videos_per_batch=4)
    replay = stream(tokenizer, config, videos_per_batch=4)
    r = iter(replay)
    for _ in range(3):
        next(r)
    resumed.load_state_dict(replay.state_dict())
    assert torch.equal(next(iter(resumed))[0].input_ids, batches[3].input_ids)
    # an epoch visits every run of videos once, split across ranks without overlap
    runs = []
    for rank in range(2):
        s = stream(tokenizer, config, videos_per_batch=4, rank=rank, world_size=2)
        assert s.batches_per_epoch == 8
        runs += [(rank, s.batch(0, i)[0].input_ids.sum().item()) for i in range(s.batches_per_epoch)]
    assert len({v for _, v in runs}) == len(runs)
    with pytest.raises(ValueError, match="cannot resume: saved world_size=2"):
        stream(tokenizer, config).load_state_dict({"epoch": 0, "position": 1, "seed": 0, "rank": 1,
                                                   "world_size": 2})
    # rank 0's saved position is rank 1's too (the ranks move through equal shards in lockstep)
    second = stream(tokenizer, config, videos_per_batch=4, rank=1, world_size=2)
    second.load_state_dict({"epoch": 0, "position": 5, "seed": 0, "rank": 0, "world_size": 2})
    assert (second.epoch, second.position) == (0, 5)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\)"):
        stream(tokenizer, config, rank=2, world_size=2)


def test_a_model_trains_on_the_stream(tokenizer, config):
    torch.manual_seed(0)
    model = VideoBERTForPretraining(config)
    batch, _ = next(iter(stream(tokenizer, config, videos_per_batch=4)))
    out = model(**batch.model_inputs())
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad


def test_dataloader_workers_yield_the_stream_in_order(tokenizer, config):
    from videobert.samples import BatchDataset

    s = stream(tokenizer, config, videos_per_batch=4)
    s.load_state_dict({**s.state_dict(), "epoch": 0, "position": 14})  # spans the epoch boundary (16 per epoch)
    loader = torch.utils.data.DataLoader(BatchDataset(s, num_batches=5), batch_size=None, num_workers=2)
    got = [(epoch, index, batch.input_ids) for epoch, index, batch, _ in loader]
    assert [(e, i) for e, i, _ in got] == [(0, 14), (0, 15), (1, 0), (1, 1), (1, 2)]
    for epoch, index, ids in got:
        assert torch.equal(ids, s.batch(epoch, index)[0].input_ids)


def test_continuous_feature_mode(tokenizer):
    config = VideoBERTConfig.tiny(**tokenizer.config_overrides(), video_feature_dim=12)
    s = PretrainingStream(synthetic_videos(seed=5, num_visual_tokens=config.num_visual_tokens, feature_dim=12), 16,
                          tokenizer.encode, config, options=SampleOptions(continuous=True), videos_per_batch=4)
    batch, _ = s.batch(0, 0)
    feat = batch.input_ids == config.feature_token_id
    assert feat.any() and not (batch.input_ids >= config.visual_offset).any()  # no visual tokens, only [FEAT]
    assert batch.video_features.shape == (*batch.input_ids.shape, 12)
    assert (batch.video_features[feat].abs().sum(-1) > 0).all() and (batch.video_features[~feat] == 0).all()
    masked = batch.mlm_labels != IGNORE_INDEX
    assert masked.any() and (batch.token_type_ids[masked] == 0).all()  # text masking only
    torch.manual_seed(0)
    out = VideoBERTForPretraining(config)(**batch.model_inputs())
    assert torch.isfinite(out["loss"])
    with pytest.raises(ValueError, match="has no clip features; continuous mode needs them"):
        PretrainingStream(synthetic_videos(seed=5), 16, tokenizer.encode, config,
                          options=SampleOptions(continuous=True), videos_per_batch=4).batch(0, 0)


def test_an_epoch_uses_every_video_run_once_and_padded_mode_holds_one_sample_per_row(tokenizer, config):
    requested = []
    source = synthetic_videos(seed=5, num_visual_tokens=config.num_visual_tokens)

    def videos(start, stop):
        requested.append((start, stop))
        return source(start, stop)
    for rank in range(2):
        s = PretrainingStream(videos, 64, tokenizer.encode, config, videos_per_batch=4, rank=rank, world_size=2)
        for index in range(s.batches_per_epoch):
            s.batch(0, index)
    assert sorted(requested) == [(start, start + 4) for start in range(0, 64, 4)]
    packed, packed_stats = PretrainingStream(source, 64, tokenizer.encode, config, videos_per_batch=4).batch(0, 0)
    padded, padded_stats = PretrainingStream(source, 64, tokenizer.encode, config, videos_per_batch=4,
                                             packed=False).batch(0, 0)
    assert padded.input_ids.shape[0] == padded_stats.samples == packed_stats.samples > packed.input_ids.shape[0]
    assert (padded.segment_ids <= 0).all() and padded_stats.efficiency < packed_stats.efficiency


@pytest.mark.parametrize("options, match", [
    (dict(mix=(1.0, 0.0)), "mix must be three non-negative weights"),
    (dict(mix=(0.0, 0.0, 0.0)), "mix must be three non-negative weights"),
    (dict(negative_prob=1.5), "0 <= negative_prob <= 1"),
    (dict(max_stride=0), "max_stride >= 1"),
    (dict(max_tokens=3), "max_tokens >= 4"),
])
def test_bad_sample_options_are_rejected(options, match):
    with pytest.raises(ValueError, match=match):
        SampleOptions(**options)


def test_bad_stream_settings_are_rejected(tokenizer, config):
    with pytest.raises(ValueError, match="videos_per_batch and num_videos must be >= 1"):
        stream(tokenizer, config, videos_per_batch=0)
    tiny = PretrainingStream(synthetic_videos(seed=5), 3, tokenizer.encode, config, videos_per_batch=4)
    with pytest.raises(ValueError, match="3 videos make no batch of 4 per rank"):
        next(iter(tiny))
