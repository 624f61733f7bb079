"""Data semantics of pretraining: negatives always from another video, the negative rate as a flag, and steps
with nothing to learn skipped."""
import json

import torch

from videobert.config import VideoBERTConfig
from videobert.corpus import Sentence, Video
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
