"""Continuous clip features end to end: `pretrain --features continuous` on a folder of features/<id>.npy (and on
the synthetic corpus), then every downstream command on such a checkpoint."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from videobert.cli import main
from videobert.config import VideoBERTConfig
from videobert.corpus import synthetic_video, token_features
from videobert.finetune import build_model
from videobert.real_data import DataError, build_vocab
from videobert.tasks import load_checkpoint, load_segments, video_sample
from videobert.train import TrainArgs, train

DIM = 16
FAST = ["--steps", "2", "--log-every", "1", "--eval-every", "2"]


def write_feature_folder(root: Path, num_videos: int = 8, dim: int = DIM) -> None:
    """A data folder without tokens/: features/<id>.npy (random vectors per synthetic visual token, plus noise),
    text/, tasks/<split>.jsonl (train: the first half of the videos) and a WordPiece vocab.txt."""
    for name in ("features", "text", "tasks"):
        (root / name).mkdir(parents=True, exist_ok=True)
    splits = {"train": [], "validation": [], "test": []}
    for index in range(num_videos):
        video = synthetic_video(77, index, 20736)
        vid = f"v{index:02d}"
        np.save(root / "features" / f"{vid}.npy", token_features(video.visual_tokens, dim, seed=index).numpy())
        (root / "text" / f"{vid}.jsonl").write_text("".join(
            json.dumps({"start": s.start, "end": s.end, "text": s.text}) + "\n" for s in video.sentences
            if s.step >= 0))
        split = "train" if index < num_videos // 2 else ("validation" if index < 3 * num_videos // 4 else "test")
        for k, step in enumerate(video.steps):  # every video has both labels, so every split has them all
            splits[split].append({"video": vid, "start": step.first_clip * 1.5, "end": (step.last_clip + 1) * 1.5,
                                  "text": step.caption, "verb": step.action, "noun": step.object,
                                  "label": "odd" if k % 2 else "even", "question": "what is the person doing",
                                  "answers": [f"{step.action} the {step.object}", "peel the egg", "stir it"],
                                  "answer": 0})
    for split, records in splits.items():
        (root / "tasks" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    build_vocab(root, 200)


def test_every_command_on_a_continuous_feature_checkpoint(tmp_path, capsys, monkeypatch):
    which = shutil.which  # METEOR's Java takes seconds to start per caption evaluation, and is not under test here
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kw: None if name == "java" else which(name, *args, **kw))
    data, run = tmp_path / "data", tmp_path / "run"
    write_feature_folder(data)
    assert main(["pretrain", "--data", str(data), "--features", "continuous", "--out", str(run),
                 "--videos-per-batch", "2", "--eval-videos", "2", *FAST]) == 0
    assert "visual MLM predicts visual tokens, so it is off" in capsys.readouterr().out
    checkpoint = load_checkpoint(run)
    assert checkpoint.config.video_feature_dim == DIM
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["text_mlm_loss"]) and np.isfinite(r["vtm_loss"]) for r in rows)

    (tmp_path / "verbs.txt").write_text("cut\npour\nstir\nfry\nbake\npeel\nmix\nboil\nslice\ngrate\nwhisk\nseason\n")
    (tmp_path / "nouns.txt").write_text("onion\ntomato\negg\nflour\nbutter\ngarlic\ncarrot\npotato\nrice\nmilk\n"
                                        "cheese\npepper\nchicken\npasta\nsugar\nlemon\n")
    flags = ["--ckpt", str(run), "--data", str(data)]
    assert main(["zero-shot", *flags, "--verbs", str(tmp_path / "verbs.txt"),
                 "--nouns", str(tmp_path / "nouns.txt")]) == 0
    assert json.loads(capsys.readouterr().out)["segments"] > 0
    assert main(["retrieve", *flags]) == 0
    assert json.loads(capsys.readouterr().out)["candidates"] > 2
    for task in ("classify", "multiple-choice", "caption"):
        out = tmp_path / task
        short = ["--max-caption-tokens", "4"] if task == "caption" else []  # decoding stops there: a quick test
        assert main(["finetune", "--task", task, *flags, "--out", str(out), "--batch-size", "2", *FAST, *short]) == 0
        assert (out / "test_metrics.json").is_file()
        assert load_checkpoint(out, build_model).config.video_feature_dim == DIM
    capsys.readouterr()
    assert main(["caption", "--ckpt", str(tmp_path / "caption"), "--data", str(data)]) == 0
    assert "bleu4" in json.loads(capsys.readouterr().out)

    # embed: each clip's state is the encoder's over [CLS] [>] [FEAT]... [SEP] with the clips' vectors
    from safetensors.torch import load_file

    assert main(["embed", *flags, "--out", str(tmp_path / "emb")]) == 0
    saved = load_file(tmp_path / "emb" / "v00.safetensors")
    features = torch.from_numpy(np.load(data / "features" / "v00.npy"))
    assert saved["clips"].shape == (features.shape[0], checkpoint.config.hidden_size)
    count = int(saved["window_clips"][0, 1])
    sample = video_sample(checkpoint.config, [], features[:count])
    with torch.no_grad():
        states = checkpoint.model.bert(sample["input_ids"][None], token_type_ids=sample["token_type_ids"][None],
                                       video_features=sample["video_features"][None]).last_hidden_state[0]
    torch.testing.assert_close(saved["clips"][:count], states[2:-1], rtol=1e-4, atol=1e-5)

    # generate and forecast predict visual tokens: one error line each, saying why
    assert main(["generate", "--ckpt", str(run), "--text", "cut the onion."]) == 1
    assert main(["forecast", "--ckpt", str(run), "--video", "v00", "--clip", "3"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") and "is a continuous-feature checkpoint" in line
                                 for line in err)
    assert err[0].startswith("error: generate predicts visual tokens") and "forecast" in err[1]


def test_continuous_pretraining_on_the_synthetic_corpus(tmp_path, capsys):
    run = tmp_path / "run"
    train(TrainArgs(out=str(run), features="continuous", steps=1, num_videos=4, eval_videos=4, videos_per_batch=4,
                    log_every=1, eval_every=1), log=lambda m: None)
    dim = load_checkpoint(run).config.video_feature_dim
    assert dim == 64
    segment = load_segments("synthetic", "test", "retrieval", load_checkpoint(run).config, num_videos=1)[0]
    assert segment.features.shape == (len(segment.clips), dim) and segment.video is segment.features
    capsys.readouterr()
    assert main(["retrieve", "--ckpt", str(run), "--videos", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["candidates"] >= 2


def test_continuous_feature_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="--features must be one of tokens, continuous, got 'pixels'"):
        train(TrainArgs(out=str(tmp_path / "a"), features="pixels"))
    data = tmp_path / "data"
    write_feature_folder(data, num_videos=4)
    (data / "features").rename(data / "tokens")  # a folder without features/ (its tokens/ are not read here)
    assert main(["pretrain", "--data", str(data), "--features", "continuous", "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--features continuous" in err and "features does not exist" in err
    (data / "tokens").rename(data / "features")
    with pytest.raises(DataError, match=f"feature dimension {DIM}, expected {DIM + 1}"):
        load_segments(str(data), "test", "retrieval", VideoBERTConfig.tiny(video_feature_dim=DIM + 1))
