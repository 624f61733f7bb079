"""Faults a run must survive, tried on purpose: damaged and stray checkpoints, strict loads, a failing checkpoint
write, signals, bad data files, kill -9 at random moments, and a dead process under torchrun."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from videobert import cli
from videobert.checkpoint import CheckpointError, latest_checkpoint, verify_checkpoint
from videobert.real_data import DataError
from videobert.tasks import load_checkpoint
from videobert.train import TrainArgs, _Signals, train

SMALL = dict(videos_per_batch=2, num_videos=40, eval_videos=4, row_length=64, log_every=1, eval_every=2,
             vocab_size=200)
QUIET = dict(log=lambda message: None)


def metrics(out):
    """The JSON lines of a run folder's metrics.jsonl."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 (to copy and damage)."""
    out = tmp_path_factory.mktemp("run4") / "run"
    train(TrainArgs(steps=4, out=str(out), keep=3, **SMALL), **QUIET)
    return out


def _copy(run, tmp_path):
    import shutil

    return Path(shutil.copytree(run, tmp_path / "run"))


def test_resume_takes_the_newest_intact_checkpoint(run4, tmp_path):
    """A truncated newest checkpoint, a stray folder and an unfinished write are each named and passed over;
    the run resumes from the older intact checkpoint and reproduces the uninterrupted run."""
    out = _copy(run4, tmp_path)
    root = out / "checkpoints"
    newest = root / "step-00000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-100])
    (root / "step-old-backup").mkdir()
    (root / ".step-00000006.tmp").mkdir()
    said = []
    assert latest_checkpoint(out, report=said.append).name == "step-00000002"
    assert any("step-old-backup (not a step-NNNNNNNN folder)" in s for s in said)
    assert any(".step-00000006.tmp (an unfinished write)" in s for s in said)
    assert any("skipping checkpoint step-00000004" in s and "truncated" in s for s in said), said
    logs = []
    train(TrainArgs(steps=4, out=str(out), keep=3, resume=True, **SMALL), log=logs.append)
    assert any("resumed from" in line and "step-00000002" in line for line in logs), logs
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(run4)]
    assert (root / "step-old-backup").is_dir()  # not ours to delete
    verify_checkpoint(root / "step-00000004")  # rewritten whole


def test_resume_without_an_intact_checkpoint_is_refused(run4, tmp_path):
    out = _copy(run4, tmp_path)
    for step in ("step-00000002", "step-00000004"):
        (out / "checkpoints" / step / "state.json").unlink()
    with pytest.raises(ValueError, match="no intact checkpoint"):
        train(TrainArgs(steps=5, out=str(out), resume=True, **SMALL), **QUIET)


@pytest.mark.parametrize("damage, message", [
    ("flip", "does not match its SHA-256"),
    ("truncate", "truncated or replaced"),
    ("fewer_layers", "unexpected"),
    ("hidden_size", "mis-shaped"),
    ("run_json", "run.json is damaged"),
])
def test_loading_a_damaged_or_edited_checkpoint_names_the_problem(run4, tmp_path, damage, message):
    out = _copy(run4, tmp_path)
    weights = out / "checkpoints" / "step-00000004" / "model.safetensors"
    info = json.loads((out / "run.json").read_text())
    if damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-5] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "fewer_layers":
        info["config"]["num_layers"] -= 1
    elif damage == "hidden_size":
        info["config"]["intermediate_size"] += 8
    if damage in ("fewer_layers", "hidden_size"):
        (out / "run.json").write_text(json.dumps(info))
    if damage == "run_json":
        (out / "run.json").write_text("{")
    with pytest.raises(ValueError, match=message) as caught:
        load_checkpoint(weights.parent)
    assert "\n" not in str(caught.value)
    if damage == "fewer_layers":
        assert isinstance(caught.value, CheckpointError) and "model.safetensors" in str(caught.value)


def test_a_failing_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    """The disk fills during the second checkpoint: one error line, exit status 1, the first checkpoint intact and
    no temporary folder left."""
    import safetensors.torch

    real_save, calls = safetensors.torch.save_file, []

    def save_file(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 2:  # the first checkpoint writes two files
            raise OSError(28, "No space left on device")
        return real_save(tensors, path, *args, **kwargs)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    out = tmp_path / "run"
    status = cli.main(["pretrain", "--out", str(out), "--steps", "4", "--eval-every", "2", "--videos-per-batch", "2",
                       "--num-videos", "40", "--eval-videos", "4", "--row-length", "64", "--vocab-size", "200"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1, err
    assert err[0].startswith("error: writing checkpoint") and "No space left on device" in err[0]
    assert "previous checkpoints are kept" in err[0]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]
    verify_checkpoint(out / "checkpoints" / "step-00000002")


def test_signals_announce_at_once_and_a_second_exits(monkeypatch):
    said, exits = [], []
    monkeypatch.setattr(os, "_exit", lambda code: exits.append(code))
    with _Signals(said.append) as signals:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs at the next bytecode boundary
        assert signals.received == signal.SIGINT and exits == []
        assert "SIGINT: checkpointing after this step" in said[0]
        with signals.abortable():  # a second signal inside an evaluation still exits at once
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
        assert exits == [128 + signal.SIGTERM] and "SIGTERM again: exiting now" in said[1]
    with _Signals(said.append) as signals:
        reached = False
        with signals.abortable():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            reached = True  # pragma: no cover - the first signal ends the block
        assert not reached and signals.received == signal.SIGTERM


def _token_folder(root: Path, videos: int = 8, bad: dict = None) -> Path:
    """A data folder of token files and jsonl sentences; `bad` maps a video index to what its token file holds
    instead (an array, or bytes written raw)."""
    from videobert.corpus import synthetic_video

    (root / "tokens").mkdir(parents=True)
    (root / "text").mkdir()
    for i in range(videos):
        video = synthetic_video(7, i, 20736)
        tokens = (bad or {}).get(i, np.asarray(video.visual_tokens, dtype=np.int64))
        if isinstance(tokens, bytes):
            (root / "tokens" / f"v{i:02d}.npy").write_bytes(tokens)
        else:
            np.save(root / "tokens" / f"v{i:02d}.npy", tokens)
        with open(root / "text" / f"v{i:02d}.jsonl", "w") as f:
            end = 0.0
            for s in sorted(video.sentences, key=lambda s: s.start):
                if s.start >= end:  # the generator's asides may overlap the steps: subtitles do not
                    f.write(json.dumps({"start": s.start, "end": s.end, "text": s.text}) + "\n")
                    end = s.end
    from videobert.real_data import build_vocab

    build_vocab(root, size=200)
    return root


@pytest.mark.parametrize("content, message", [
    (np.array([1, 2, 99999]), r"v01\.npy: visual token 99999 at clip 2 is outside the model's visual vocabulary"),
    (b"\x93NUMPY garbage", r"v01\.npy: not a readable numeric \.npy array"),
    (np.array([[1.5, 2.0]]), r"v01\.npy: expected a 1-D array of non-negative integers"),
])
def test_a_bad_video_file_stops_the_run_before_a_step_or_is_skipped(tmp_path, content, message):
    """The bad video sits in the third batch (epoch 0 takes units 2, 1, 0): the run stops before step 3 naming the file, with the two steps
    trained kept in a checkpoint; with on_bad_data="skip" it finishes and counts the video in the log."""
    data = _token_folder(tmp_path / "data", bad={1: content})
    args = dict(data=str(data), videos_per_batch=2, eval_videos=2, row_length=64, log_every=1, eval_every=10,
                steps=4, vocab_size=200)
    out = tmp_path / "stop"
    with pytest.raises(DataError, match=message) as caught:
        train(TrainArgs(out=str(out), **args), **QUIET)
    assert "stopped before step 3 (checkpoint at step 2)" in str(caught.value) and "--on-bad-data skip" in str(
        caught.value)
    assert latest_checkpoint(out).name == "step-00000002"
    train(TrainArgs(out=str(out), resume=True, on_bad_data="skip", **args), **QUIET)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[2]["skipped_videos"] == 1
    assert all("skipped_videos" not in r for r in rows[:2] + rows[3:])


def _cli(out, *extra):
    return [sys.executable, "-m", "videobert.cli", "pretrain", "--out", str(out), "--videos-per-batch", "2",
            "--num-videos", "40", "--eval-videos", "4", "--row-length", "64", "--vocab-size", "200",
            "--log-every", "1", "--eval-every", "2", "--keep", "2", *extra]


def test_kill_9_at_random_moments_then_resume_matches_the_uninterrupted_run(tmp_path):
    """SIGKILL at random moments (start-up, steps, evaluation, checkpoint writes), resuming after each: the final
    metrics are the uninterrupted run's, each step logged once."""
    steps = 8
    reference = subprocess.run(_cli(tmp_path / "reference", "--steps", str(steps)), capture_output=True, text=True,
                               timeout=600)
    assert reference.returncode == 0, reference.stderr[-2000:]
    seed = int(time.time())
    rng = random.Random(seed)
    out = tmp_path / "killed"
    for _ in range(5):
        proc = subprocess.Popen(_cli(out, "--steps", str(steps), "--resume"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 9.0))
        proc.kill()
        proc.wait()
    done = subprocess.run(_cli(out, "--steps", str(steps), "--resume"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (seed, done.stderr[-2000:])
    assert [r["step"] for r in metrics(out)] == list(range(1, steps + 1)), seed
    for a, b in zip(metrics(tmp_path / "reference"), metrics(out)):
        assert a["loss"] == b["loss"] and a.get("eval_loss") == b.get("eval_loss"), (seed, a, b)


def test_a_killed_rank_stops_the_other_within_the_timeout(tmp_path):
    """Two gloo processes under torchrun; rank 1 is killed (-9) mid-run: the whole run ends, non-zero, within
    --dist-timeout plus start-up, rank 0 saying why in one line, never hanging."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29533", *_cli(out, "--steps", "100000", "--dist-timeout", "20")[1:]],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and metrics(out)):
        time.sleep(0.5)
    assert metrics(out), "the run did not start"
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    rank1 = [pid for pid in workers if "RANK=1\0" in Path(f"/proc/{pid}/environ").read_text(errors="replace")]
    assert len(rank1) == 1, workers
    killed = time.time()
    os.kill(int(rank1[0]), signal.SIGKILL)
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the surviving rank hung")
    assert proc.returncode != 0 and time.time() - killed < 120
    assert "lost contact with another process" in output or "SIGTERM" in output, output[-3000:]


def test_the_command_line_answers_every_broken_input_in_one_line(run4, tmp_path, capsys):
    """A table of broken inputs: each ends with its exit status (2 for a flag the parser refuses, 1 otherwise) and
    one line on stderr saying what is wrong."""
    damaged = _copy(run4, tmp_path)
    weights = damaged / "checkpoints" / "step-00000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    data = _token_folder(tmp_path / "data", bad={1: np.array([5, 99999])})
    run = ["--videos-per-batch", "2", "--num-videos", "40", "--eval-videos", "4", "--row-length", "64",
           "--vocab-size", "200", "--steps", "5"]
    cases = [
        (["pretrain", "--steps", "0"], 2, "--steps"),
        (["pretrain", "--steps", "-5"], 2, "--steps"),
        (["pretrain", "--attention-dropout", "1.5"], 2, "--attention-dropout"),
        (["retrieve", "--ckpt", str(run4), "--candidates", "-3"], 2, "--candidates"),
        (["zero-shot", "--ckpt", str(run4), "--videos", "0"], 2, "--videos"),
        (["embed", "--ckpt", str(run4), "--videos", "-1"], 2, "--videos"),
        (["pretrain", "--out", str(run4), *run], 1, "holds a previous run"),
        (["pretrain", "--out", str(_copy(run4, tmp_path / "b")), "--resume", *run[:-1], "6", "--videos-per-batch",
          "3"], 1, "--videos-per-batch 3 (the run has 2)"),
        (["zero-shot", "--ckpt", str(weights.parent)], 1, "truncated or replaced"),
        (["zero-shot", "--ckpt", str(run4), "--device", "cuda:7"], 1, "--device cuda:7"),
        (["pretrain", "--out", str(tmp_path / "bad"), "--data", str(data), "--videos-per-batch", "2",
          "--eval-videos", "2", "--row-length", "64", "--steps", "4"], 1, "v01.npy: visual token 99999"),
    ]
    for argv, status, message in cases:
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # the parser's refusals
            code = exc.code
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == status and len(err) == 1 and message in err[0], (argv, code, err)
