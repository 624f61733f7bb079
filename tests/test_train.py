"""The pretraining loop: exact resume, signal checkpoint, NaN handling, 2-process gloo, BERT init, learning."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from videobert.train import TrainArgs, latest_checkpoint, train

SMALL = dict(videos_per_batch=2, num_videos=40, eval_videos=4, row_length=64, log_every=1, eval_every=3,
             vocab_size=200)


def metrics(out):
    """The JSON lines of a run folder's metrics.jsonl."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    train(TrainArgs(steps=6, out=str(tmp_path / "a"), **SMALL), log=lambda m: None)
    train(TrainArgs(steps=3, out=str(tmp_path / "b"), **SMALL), log=lambda m: None)
    assert latest_checkpoint(tmp_path / "b").name == "step-00000003"
    train(TrainArgs(steps=6, out=str(tmp_path / "b"), resume=True, **SMALL), log=lambda m: None)
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"] and ra["text_mlm_acc"] == rb["text_mlm_acc"], (ra["step"], ra, rb)
    ckpt = latest_checkpoint(tmp_path / "b")
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors", "state.json", "state.safetensors"]
    assert len(list((tmp_path / "b" / "checkpoints").iterdir())) == 2  # keep-last-2, no temporaries left
    assert (tmp_path / "a" / "curves.png").exists()


def test_a_run_folder_holds_one_run(tmp_path):
    """A second run into a used folder is refused (the first run's files untouched) unless --overwrite clears it;
    --resume names each flag that would change the data or the model; a resumed run drops the metrics it
    logged past the checkpoint (a crash after logging replays those steps)."""
    out = tmp_path / "run"
    train(TrainArgs(steps=3, out=str(out), **SMALL), log=lambda m: None)
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"holds a previous run .*--resume.*--overwrite"):
        train(TrainArgs(steps=2, out=str(out), **SMALL), log=lambda m: None)
    assert (out / "metrics.jsonl").read_text() == before and latest_checkpoint(out).name == "step-00000003"
    with pytest.raises(ValueError, match=r"--videos-per-batch 3 \(the run has 2\)"):
        train(TrainArgs(steps=4, out=str(out), resume=True, **{**SMALL, "videos_per_batch": 3}), log=lambda m: None)
    with open(out / "metrics.jsonl", "a") as f:  # as if the run had logged step 4 and died before its checkpoint
        f.write(json.dumps({"step": 4, "loss": 1.0}) + "\n")
    train(TrainArgs(steps=5, out=str(out), resume=True, lr=5e-4, **SMALL), log=lambda m: None)  # lr may change
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5] and metrics(out)[3]["loss"] != 1.0
    train(TrainArgs(steps=2, out=str(out), overwrite=True, **SMALL), log=lambda m: None)
    assert [r["step"] for r in metrics(out)] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]


def test_nan_loss_stops_without_checkpoint_or_is_skipped(tmp_path, monkeypatch):
    from videobert.model import VideoBERTForPretraining

    forward = VideoBERTForPretraining.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3 and self.training:
            out["loss"] = out["loss"] * float("nan")
        return out
    monkeypatch.setattr(VideoBERTForPretraining, "forward", poisoned)
    with pytest.raises(RuntimeError, match="loss is not finite"):
        train(TrainArgs(steps=5, out=str(tmp_path / "stop"), **{**SMALL, "eval_every": 100}), log=lambda m: None)
    assert latest_checkpoint(tmp_path / "stop") is None
    calls["n"] = 0
    logs = []
    train(TrainArgs(steps=5, out=str(tmp_path / "skip"), on_nan="skip", **{**SMALL, "eval_every": 100}),
          log=logs.append)
    assert any("non-finite loss, step skipped" in line for line in logs)
    assert latest_checkpoint(tmp_path / "skip").name == "step-00000005"
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in metrics(tmp_path / "skip"))


def _cli(out, *extra):
    return [sys.executable, "-m", "videobert.cli", "pretrain", "--out", str(out), "--videos-per-batch", "2",
            "--num-videos", "40", "--eval-videos", "4", "--row-length", "64", "--vocab-size", "200", *extra]


def test_sigterm_writes_a_checkpoint_and_resume_finishes(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli(out, "--steps", "1000", "--log-every", "1", "--eval-every", "1000"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and metrics(out)):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output
    step = metrics(out)[-1]["step"]
    assert latest_checkpoint(out).name == f"step-{step:08d}" and "checkpoint written" in output
    done = subprocess.run(_cli(out, "--steps", str(step + 2), "--resume"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert metrics(out)[-1]["step"] == step + 2


def _two_process_run(out, port: int, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), "-m", "videobert.cli", "pretrain", "--out", str(out),
                           "--videos-per-batch", "2", "--num-videos", "40", "--eval-videos", "4",
                           "--row-length", "64", "--vocab-size", "200", "--log-every", "1", "--eval-every", "2",
                           *extra], capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_process_gloo_run(tmp_path, sharding):
    """Two gloo processes with DDP or FSDP2: rank 0 logs, held-out evaluation and checkpoints work (with FSDP
    all ranks gather), and a resumed FSDP run continues from the full-tensor checkpoint."""
    out = tmp_path / sharding
    flags = ("--fsdp",) if sharding == "fsdp" else ()
    port = 29517 if sharding == "ddp" else 29518
    result = _two_process_run(out, port, "--steps", "3", *flags)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]  # rank 0 alone logs
    assert "eval_vtm_acc" in rows[1] and "eval_vtm_acc" in rows[2]
    assert latest_checkpoint(out).name == "step-00000003"
    from safetensors.torch import load_file

    weights = load_file(latest_checkpoint(out) / "model.safetensors")
    assert weights["bert.embeddings.word_embeddings.weight"].shape[0] > 200  # whole tensors, not shards
    if sharding == "fsdp":
        result = _two_process_run(out, port, "--steps", "4", "--resume", *flags)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]


def test_init_from_a_local_hugging_face_bert(tmp_path):
    transformers = pytest.importorskip("transformers")
    from videobert.corpus import synthetic_corpus
    from videobert.text_tokenizer import TextTokenizer

    tok = TextTokenizer.train((s.text for v in synthetic_corpus(50) for s in v.sentences), vocab_size=200)
    bert_dir = tmp_path / "bert"
    tok.save(bert_dir)
    bert_config = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.BertForPreTraining(bert_config).save_pretrained(bert_dir)
    last = train(TrainArgs(steps=2, out=str(tmp_path / "run"), init_from_bert=str(bert_dir), **SMALL),
                 log=lambda m: None)
    assert last["step"] == 2
    saved = json.loads((tmp_path / "run" / "run.json").read_text())["config"]
    assert saved["hidden_size"] == 32 and saved["text_vocab_size"] == tok.vocab_size


def test_a_short_run_learns(tmp_path):
    train(TrainArgs(steps=60, out=str(tmp_path), lr=2e-3, warmup=10, videos_per_batch=4, num_videos=400,
                    eval_videos=8, row_length=128, log_every=10, eval_every=60, vocab_size=200), log=lambda m: None)
    rows = metrics(tmp_path)
    assert rows[-1]["step"] == 60
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    # held-out text MLM accuracy (over all held-out batches) at five times chance (1/117, the vocabulary)
    assert rows[-1]["eval_text_mlm_acc"] > 5 / 117, rows[-1]  # measured 0.07 at this seed


def test_training_on_a_real_data_folder_and_its_errors(tmp_path):
    from test_real_data import write_video

    from videobert.corpus import synthetic_corpus
    from videobert.text_tokenizer import TextTokenizer

    data = tmp_path / "data"
    for index in range(10):
        write_video(data, f"v{index:02d}", clips=8)
    TextTokenizer.train((s.text for v in synthetic_corpus(20) for s in v.sentences), vocab_size=200).save(data)
    last = train(TrainArgs(steps=2, data=str(data), out=str(tmp_path / "run"), **{**SMALL, "eval_videos": 2}),
                 log=lambda m: None)
    assert last["step"] == 2 and "eval_loss" in last
    with pytest.raises(ValueError, match="10 videos leave too few for training after 9 held out"):
        train(TrainArgs(steps=2, data=str(data), out=str(tmp_path / "bad"), **{**SMALL, "eval_videos": 9}),
              log=lambda m: None)


def test_sample_flags_reach_the_streams(tmp_path):
    from videobert.train import build

    args = TrainArgs(out=str(tmp_path), sample_mix="1,0,0", max_concat=1, max_stride=2, num_videos=20,
                     eval_videos=4, videos_per_batch=4, vocab_size=200)
    _, _, train_stream, held_out = build(args, tmp_path, 0, 1)
    for stream in (train_stream, held_out):
        assert (stream.options.mix, stream.options.max_concat, stream.options.max_stride) == ((1.0, 0.0, 0.0), 1, 2)
    with pytest.raises(ValueError, match="sample_mix must be three comma-separated numbers"):
        build(TrainArgs(out=str(tmp_path), sample_mix="joint"), tmp_path, 0, 1)
    with pytest.raises(ValueError, match=r"eval_videos \(4\) must be at least videos_per_batch \(8\)"):
        build(TrainArgs(out=str(tmp_path), eval_videos=4, videos_per_batch=8), tmp_path, 0, 1)


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_elsewhere(capsys):
    from videobert.train import _Progress

    bar = _Progress(total=10, first=0, show=True, terminal=True, log=print)
    bar.tokens, bar.loss = 500, 3.25
    bar.update(5)
    bar.close()
    drawn = capsys.readouterr()
    assert "5/10" in drawn.err and "loss 3.2500" in drawn.err and "tok/s" in drawn.err and drawn.out == ""
    lines = []
    plain = _Progress(total=10, first=0, show=True, terminal=False, log=lines.append, every=0)
    plain.update(5)
    assert len(lines) == 1 and lines[0].startswith("progress: step 5/10 (50%), ") and "s left" in lines[0]
    quiet = _Progress(total=10, first=0, show=False, terminal=True, log=lines.append)  # ranks other than 0
    quiet.update(5)
    quiet.close()
    assert capsys.readouterr().err == "" and len(lines) == 1


def test_a_run_without_a_terminal_prints_periodic_progress_lines(tmp_path, monkeypatch):
    """Where stderr is not a terminal (CI, nohup), progress comes as plain log lines, one per interval."""
    import videobert.train as loop

    monkeypatch.setattr(loop, "PLAIN_PROGRESS_SECONDS", 0.0)
    lines = []
    train(TrainArgs(steps=3, out=str(tmp_path), **{**SMALL, "log_every": 3}), log=lines.append)
    progress = [line for line in lines if line.startswith("progress: ")]
    expected = [f"progress: step {s}/3 ({100 * s / 3:.0f}%)" for s in (1, 2, 3)]
    assert [line.split(",")[0] for line in progress] == expected
    assert all("tok/s" in line and "s left" in line for line in progress)


def _replaying_capture(fn, pool):
    """A stand-in for CUDA-graph capture on the CPU: nothing runs at capture; each replay reruns the captured
    step on the very buffers it was captured with and refreshes the same output dict, as a graph replay does."""
    outputs: dict = {}

    def replay():
        outputs.clear()
        outputs.update(fn())
    return replay, outputs


def test_graphed_steps_train_as_eager_steps():
    """GraphedSteps (the --cuda-graphs loop) trains on every batch exactly once with the eager step's losses
    and parameters: warmup steps, the capture's own batch, and replays with new batches copied into the captured
    buffers; shapes are bucketed, so few graphs are captured."""
    from videobert.config import VideoBERTConfig
    from videobert.data import random_pretraining_batch, static_batch
    from videobert.model import VideoBERTForPretraining
    from videobert.train import GraphedSteps

    config = VideoBERTConfig.preset("tiny", hidden_dropout=0.0, attention_dropout=0.0)
    batches = [random_pretraining_batch(config, 6, 64, seed=i) for i in range(6)]
    torch.manual_seed(0)
    eager_model = VideoBERTForPretraining(config)
    graphed_model = VideoBERTForPretraining(config)
    graphed_model.load_state_dict(eager_model.state_dict())
    # SGD: Adam's normalisation would turn rounding-level gradient differences (the static batch sums its padded
    # rows in another order) into whole-step differences of near-zero-gradient entries.
    eager_opt = torch.optim.SGD(eager_model.parameters(), lr=0.1)
    graphed_opt = torch.optim.SGD(graphed_model.parameters(), lr=0.1)
    steps = GraphedSteps(graphed_model, graphed_opt, lambda b: static_batch(b, config, capacity_multiple=64), 1.0,
                         torch.device("cpu"), warmup=1, capture=_replaying_capture)
    for batch in batches:
        eager_opt.zero_grad()
        want = eager_model(**batch.model_inputs())
        want["loss"].backward()
        torch.nn.utils.clip_grad_norm_(eager_model.parameters(), 1.0)
        eager_opt.step()
        got = steps(batch)
        torch.testing.assert_close(got["loss"], want["loss"].detach(), rtol=1e-5, atol=1e-6)
    assert len(steps.graphs) == 1 and sum(steps.eager_runs.values()) == 1  # one shape: one warmup, one capture
    for (name, p), q in zip(eager_model.named_parameters(), graphed_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


def test_cuda_graphs_flag_says_what_it_needs(tmp_path):
    """--cuda-graphs refuses what it cannot capture, naming each: here no GPU, gradient accumulation, skip."""
    with pytest.raises(ValueError, match="--cuda-graphs needs") as info:
        train(TrainArgs(out=str(tmp_path), steps=2, cuda_graphs=True, grad_accum=2, on_nan="skip"))
    message = str(info.value)
    assert "--grad-accum 1" in message and "--on-nan stop" in message
    if not torch.cuda.is_available():
        assert "a GPU" in message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_steps_match_eager_steps_on_the_gpu():
    """Real CUDA graphs: captured steps (fused ops, dropout off for comparability) give the eager steps' losses,
    and with dropout on, replays draw fresh masks (the losses of two replays of one batch differ)."""
    from videobert.config import VideoBERTConfig
    from videobert.data import random_pretraining_batch, static_batch
    from videobert.model import VideoBERTForPretraining
    from videobert.train import GraphedSteps

    device = torch.device("cuda")
    config = VideoBERTConfig.preset("tiny", hidden_dropout=0.0, attention_dropout=0.0)
    batches = [random_pretraining_batch(config, 6, 64, seed=i) for i in range(6)]
    torch.manual_seed(0)
    eager_model = VideoBERTForPretraining(config).to(device)
    graphed_model = VideoBERTForPretraining(config).to(device)
    graphed_model.load_state_dict(eager_model.state_dict())
    eager_opt = torch.optim.SGD(eager_model.parameters(), lr=0.1)
    graphed_opt = torch.optim.SGD(graphed_model.parameters(), lr=0.1)
    steps = GraphedSteps(graphed_model, graphed_opt, lambda b: static_batch(b, config, capacity_multiple=64), 1.0,
                         device)
    for batch in batches:
        eager_opt.zero_grad()
        with torch.autocast("cuda", torch.bfloat16):
            want = eager_model(**static_batch(batch, config, capacity_multiple=64).to(device).model_inputs())
        want["loss"].backward()
        torch.nn.utils.clip_grad_norm_(eager_model.parameters(), 1.0)
        eager_opt.step()
        got = steps(batch)
        torch.testing.assert_close(got["loss"], want["loss"].detach(), rtol=2e-2, atol=2e-2)
    assert steps.graphs  # the later batches replayed a captured graph
    dropout = VideoBERTConfig.preset("tiny")
    model = VideoBERTForPretraining(dropout).to(device)
    steps = GraphedSteps(model, torch.optim.SGD(model.parameters(), lr=0.0), lambda b: static_batch(b, dropout),
                         1.0, device, warmup=1)
    batch = random_pretraining_batch(dropout, 6, 64, seed=9)
    losses = [float(steps(batch)["loss"]) for _ in range(4)]  # warmup, capture + replay, two replays
    assert len(set(losses[1:])) == 3, losses


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_static_pretraining_step_never_synchronises():
    """Forward and backward of the fused path on a static batch read nothing on the host (no sync at all)."""
    from videobert.config import VideoBERTConfig
    from videobert.data import random_pretraining_batch, static_batch
    from videobert.model import VideoBERTForPretraining

    config = VideoBERTConfig.preset("tiny")
    model = VideoBERTForPretraining(config).cuda()
    batch = static_batch(random_pretraining_batch(config, 6, 64, seed=2), config).to("cuda")
    model(**batch.model_inputs())["loss"].backward()  # autotune, lazy state (these may synchronise)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(**batch.model_inputs())["loss"].backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cosine_schedule_is_saved_in_checkpoints_and_resumes_exactly(tmp_path):
    """--schedule cosine through torch's LambdaLR: the rates logged are warmup then cosine decay, the scheduler's
    state is in state.json, and a resumed run repeats the uninterrupted one's losses and rates."""
    from videobert.train import lr_factor

    args = {**SMALL, "warmup": 2, "schedule": "cosine", "eval_every": 2}
    train(TrainArgs(steps=5, out=str(tmp_path / "a"), **args), log=lambda m: None)
    train(TrainArgs(steps=2, out=str(tmp_path / "b"), **args), log=lambda m: None)
    state = json.loads((latest_checkpoint(tmp_path / "b") / "state.json").read_text())
    assert state["schedule"]["last_epoch"] == 2
    train(TrainArgs(steps=5, out=str(tmp_path / "b"), resume=True, **args), log=lambda m: None)
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [r["lr"] for r in a] == pytest.approx([1e-3 * lr_factor(s, 2, 5, "cosine") for s in range(5)])
    assert [(r["loss"], r["lr"]) for r in a] == [(r["loss"], r["lr"]) for r in b]
    assert lr_factor(4, 2, 5, "cosine") < lr_factor(4, 2, 5, "linear") < lr_factor(2, 2, 5, "cosine") == 1.0


def test_dataloader_workers_train_the_same_batches_and_resume_exactly(tmp_path):
    """--num-workers 2: the batches come from DataLoader processes in stream order; a run resumed with workers (which
    had built batches past the checkpoint) continues from the checkpoint's position, as the uninterrupted run did."""
    train(TrainArgs(steps=4, out=str(tmp_path / "a"), **SMALL), log=lambda m: None)
    workers = {**SMALL, "num_workers": 2, "eval_every": 2}
    train(TrainArgs(steps=2, out=str(tmp_path / "b"), **workers), log=lambda m: None)
    assert json.loads((latest_checkpoint(tmp_path / "b") / "state.json").read_text())["data"]["position"] == 2
    train(TrainArgs(steps=4, out=str(tmp_path / "b"), resume=True, **workers), log=lambda m: None)
    assert [r["loss"] for r in metrics(tmp_path / "a")] == [r["loss"] for r in metrics(tmp_path / "b")]


def test_report_to_tensorboard_writes_the_logged_metrics(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'videobert[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(TrainArgs(steps=2, out=str(tmp_path), report_to="tensorboard", **SMALL), log=lambda m: None)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    rows = metrics(tmp_path)
    for key in ("loss", "vtm_acc", "lr", "tokens_per_s"):
        assert [e.step for e in events.Scalars(key)] == [1, 2]
        assert [e.value for e in events.Scalars(key)] == pytest.approx([r[key] for r in rows], rel=1e-6)
    assert [e.step for e in events.Scalars("eval_loss")] == [2]
