"""Data semantics of pretraining: negatives always from another video, the negative rate as a flag, and steps
with nothing to learn skipped."""
import dataclasses
import json

import pytest
import torch

from videobert.config import VideoBERTConfig
from videobert.corpus import Sentence, Video
from videobert.data import static_batch
from videobert.model import IGNORE_INDEX
from videobert.samples import PretrainingStream, SampleOptions, synthetic_videos
from videobert.train import Job, LoopArgs, TrainArgs, build, run_loop

CONFIG = VideoBERTConfig.tiny(num_visual_tokens=16, text_vocab_size=200)


def _video(name: str, token: int) -> Video:
    return Video(name, [token] * 8, [Sentence(0.0, 3.0, "a"), Sentence(4.5, 9.0, "b")])


def test_a_one_video_batch_takes_negatives_from_another_video():
    videos = [_video("a", 1), _video("b", 2)]
    options = SampleOptions(mix=(1, 0, 0), negative_prob=1.0, mask_prob=0.0, max_concat=1, max_stride=1)
    stream = PretrainingStream(lambda start, stop: videos[start:stop], 2, lambda text: [7], CONFIG, options,
                               row_length=64, videos_per_batch=1)
    for unit, other_token in ((0, 2), (1, 1)):
        batch, _ = stream.build_unit(unit, (0, 0, unit, 0))
        assert (batch.vtm_labels == 0).all() and batch.vtm_labels.numel() == 2
        visual = batch.input_ids[batch.token_type_ids == 1] - CONFIG.visual_offset
        clips = visual[(visual >= 0) & (visual < CONFIG.num_visual_tokens)]
        assert clips.numel() and (clips == other_token).all()  # the other video's clips, never its own
    alone = PretrainingStream(lambda start, stop: videos[:1], 1, lambda text: [7], CONFIG, options, row_length=64,
                              videos_per_batch=1)
    assert (alone.build_unit(0, (0, 0, 0, 0))[0].vtm_labels == 1).all()  # no other video: no negative


def test_negative_rate_flag_reaches_the_samples(tmp_path):
    import argparse

    from videobert.train import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--negative-rate", "0.25"]).negative_rate == 0.25
    _, _, stream, held_out = build(TrainArgs(out=str(tmp_path), negative_rate=0.0, num_videos=16, eval_videos=8,
                                             vocab_size=200), tmp_path, 0, 1)
    assert stream.options.negative_prob == held_out.options.negative_prob == 0.0
    batch, _ = stream.batch(0, 0)
    assert not (batch.vtm_labels == 0).any()


def test_a_batch_with_nothing_to_learn_is_skipped_not_logged_as_zero(tmp_path):
    """Video-only samples without masking: no masked token and no matching label, so no step and no loss row."""
    from videobert.model import VideoBERTForPretraining

    options = SampleOptions(mix=(0, 0, 1), mask_prob=0.0)
    stream = PretrainingStream(synthetic_videos(0, 16), 8, lambda text: [7], CONFIG, options, row_length=64,
                               videos_per_batch=2)
    model = VideoBERTForPretraining(CONFIG)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    job = Job(CONFIG, model, stream, lambda m, d: {}, lambda row: "", {"config": CONFIG.to_dict()})
    lines = []
    run_loop(LoopArgs(out=str(tmp_path / "run"), steps=2, log_every=1, eval_every=100, warmup=0),
             lambda out, rank, world: job, log=lines.append)
    assert sum("skipped (the batch has no masked token and no matching label)" in line for line in lines) == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # AdamW never stepped
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == [1, 1] and not any("loss" in r or "vtm_acc" in r for r in rows)
    batch, _ = stream.batch(0, 0)
    assert (batch.mlm_labels == IGNORE_INDEX).all() and (batch.vtm_labels == IGNORE_INDEX).all()


def test_contrastive_pairs_hold_each_matched_pair_apart():
    from videobert.samples import make_batch

    videos = [_video("a", 1), _video("b", 2), _video("c", 3)]
    options = SampleOptions(mix=(1, 0, 0), negative_prob=0.0, mask_prob=0.0, max_concat=1, max_stride=1, nce=True)
    batch, stats = make_batch(videos, lambda text: [7, 8], CONFIG, options, 32, (0,))
    assert batch.nce_pairs.shape == (6, 2) and stats.samples == 18  # 6 matched samples, each twice more
    starts = (batch.input_ids.flatten() == CONFIG.cls_token_id).nonzero().flatten()
    ids = batch.input_ids.flatten()

    def sample(k):  # the ids of the k-th sample in [CLS] order, up to its [SEP]
        start = int(starts[k])
        return ids[start:start + int((ids[start:] == CONFIG.sep_token_id).nonzero()[0]) + 1].tolist()
    for text, video in batch.nce_pairs.tolist():
        join = CONFIG.join_token_id
        assert sample(text)[1:] == [7, 8, join, CONFIG.sep_token_id]
        assert sample(video)[:2] == [CONFIG.cls_token_id, join] and len(sample(video)) > 3
    with pytest.raises(ValueError, match="--nce-weight 0"):
        static_batch(batch, CONFIG)


def test_the_contrastive_objective_is_off_by_default_and_logged_when_on(tmp_path):
    from videobert.model import VideoBERTForPretraining
    from videobert.samples import make_batch
    from videobert.train import train

    options = SampleOptions(mix=(1, 0, 0), negative_prob=0.0, max_concat=1, nce=True)
    batch, _ = make_batch([_video(n, t) for n, t in (("a", 1), ("b", 2))], lambda text: [7], CONFIG, options, 64,
                          (0,))
    torch.manual_seed(0)
    on = VideoBERTForPretraining(dataclasses.replace(CONFIG, nce_weight=0.5, hidden_dropout=0.0,
                                                     attention_dropout=0.0))
    off = VideoBERTForPretraining(dataclasses.replace(on.config, nce_weight=0.0))
    off.load_state_dict(on.state_dict())
    with_nce, without = on(**batch.model_inputs()), off(**batch.model_inputs())
    assert "nce_loss" not in without and int(with_nce["nce_count"]) == 4
    torch.testing.assert_close(with_nce["loss"], without["loss"] + 0.5 * with_nce["nce_loss"])
    with_nce["nce_loss"].backward()
    assert on.bert.pooler.weight.grad.abs().sum() > 0
    small = dict(steps=2, videos_per_batch=2, num_videos=8, eval_videos=2, row_length=64, log_every=1, eval_every=2,
                 vocab_size=200)
    rows = train(TrainArgs(out=str(tmp_path / "on"), nce_weight=0.5, **small), log=lambda m: None)
    assert {"nce_loss", "nce_acc", "eval_nce_acc"} <= set(rows)
    assert not any(k.startswith("nce") for k in train(TrainArgs(out=str(tmp_path / "off"), **small),
                                                      log=lambda m: None))
