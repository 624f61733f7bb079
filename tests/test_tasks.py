"""Using a pretrained VideoBERT: zero-shot classification, retrieval, fine-tuning heads, captioning and feature
export, end to end on a briefly pretrained tiny model (synthetic data and a real-data folder), and their errors."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from videobert.cli import main
from videobert.finetune import (PREFIX_LM_RULES, FinetuneArgs, build_model, caption_sample,
                                finetune, generate_captions)
from videobert.real_data import DataError
from videobert.tasks import (encode_samples, load_checkpoint, load_segments, retrieval, synthetic_segments,
                             zero_shot)
from videobert.train import TrainArgs, train

# Close to the demo's settings (Makefile DEMO_FLAGS), at a size the test suite affords: only joint samples and no
# attention dropout (the reference Philox masks were half of a step's CPU time). About 3 minutes on 2 cores;
# measured there: retrieval R@5 0.82 (chance 0.125), zero-shot verb/noun top-1 0.22/0.20 (chance 0.083/0.063).
PRETRAIN = dict(steps=300, videos_per_batch=24, max_stride=1, max_concat=1, sample_mix="1,0,0", vtm_weight=3.0,
                lr=3e-3, attention_dropout=0.0, num_videos=8000, eval_videos=24, log_every=100, eval_every=10000,
                vocab_size=400)


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory) -> Path:
    """A tiny model pretrained briefly on the synthetic corpus (its run folder)."""
    out = tmp_path_factory.mktemp("pretrained")
    train(TrainArgs(out=str(out), **PRETRAIN), log=lambda m: None)
    return out


def _json_out(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------------------------------- no training needed

def test_synthetic_segments_carry_every_task_field():
    segments = synthetic_segments("test", 3)
    assert segments and all(s.text and s.verb and s.noun and s.label == s.verb for s in segments)
    for s in segments:
        assert len(s.answers) == 4 == len(set(s.answers)) and s.answers[s.answer] == f"{s.verb} the {s.noun}"
    assert [s.clips for s in synthetic_segments("test", 3)] == [s.clips for s in segments]  # deterministic
    assert {s.video_id for s in synthetic_segments("train", 3)}.isdisjoint({s.video_id for s in segments})
    with pytest.raises(ValueError, match="split must be one of"):
        synthetic_segments("dev", 3)


def test_packed_inference_equals_one_sample_per_forward():
    """Samples packed several to a row give each sample's own states (and come back in sample order)."""
    from videobert import VideoBERTConfig, VideoBERTModel
    from videobert.tasks import video_sample

    torch.manual_seed(0)
    config = VideoBERTConfig.tiny(num_visual_tokens=50, text_vocab_size=200)
    model = VideoBERTModel(config).eval()
    gen = torch.Generator().manual_seed(1)
    samples = [video_sample(config, torch.randint(5, 200, (int(n),), generator=gen).tolist(),
                            torch.randint(0, 50, (int(m),), generator=gen).tolist())
               for n, m in torch.randint(0, 20, (9, 2), generator=gen)]
    got = list(encode_samples(model, samples, row_length=64, device=torch.device("cpu"), tokens_per_batch=70))
    assert [i for i, _ in got] == list(range(len(samples)))
    with torch.no_grad():
        for sample, (_, hidden) in zip(samples, got):
            alone = model(sample["input_ids"][None], token_type_ids=sample["token_type_ids"][None]).last_hidden_state[0]
            torch.testing.assert_close(hidden, alone, rtol=1e-4, atol=1e-5)


def test_caption_decoding_step_equals_the_training_prediction():
    """The prefix LM sees neither later words nor anything the video computed from text: the state at piece t
    of the full caption equals the state at the end of the prefix of t pieces (what decoding uses)."""
    from videobert import VideoBERTConfig, VideoBERTForPretraining

    torch.manual_seed(0)
    config = VideoBERTConfig.tiny(num_visual_tokens=50, text_vocab_size=200, hidden_dropout=0.0)
    model = VideoBERTForPretraining(config).eval()
    pieces, clips = [11, 42, 7, 99, 13], [3, 4, 4, 9, 30, 2]
    full = caption_sample(config, pieces, clips, max_caption_tokens=8, with_labels=True)
    assert full["mlm_labels"][:6].tolist() == [*pieces, config.sep_token_id]
    assert (full["mlm_labels"][6:] == -100).all()
    with torch.no_grad():
        states = model.bert(full["input_ids"][None], token_type_ids=full["token_type_ids"][None],
                            position_ids=full["position_ids"][None],
                            modality_rules=PREFIX_LM_RULES).last_hidden_state[0]
        for t in range(len(pieces) + 1):
            part = caption_sample(config, pieces[:t], clips, max_caption_tokens=8, with_labels=False)
            prefix = model.bert(part["input_ids"][None], token_type_ids=part["token_type_ids"][None],
                                position_ids=part["position_ids"][None],
                                modality_rules=PREFIX_LM_RULES).last_hidden_state[0]
            torch.testing.assert_close(prefix[t], states[t], rtol=1e-4, atol=1e-5)
            # video positions do not move with the caption's length
            assert part["position_ids"][-len(clips) - 1:].tolist() == full["position_ids"][-len(clips) - 1:].tolist()


def test_the_triton_kernel_serves_the_prefix_lm_pattern():
    """The captioning model's attention rules through the fused Triton kernel (interpreter on the CPU) match the
    PyTorch reference, forward and gradients."""
    pytest.importorskip("triton")
    from videobert import VideoBERTConfig, VideoBERTModel

    rows = []
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        config = VideoBERTConfig.tiny(num_visual_tokens=50, text_vocab_size=200, num_layers=1, hidden_dropout=0.0,
                                      attention_dropout=0.0, backend=backend)
        model = VideoBERTModel(config)
        samples = [caption_sample(config, [11, 12, 13][:n], [1, 2, 3, 4][:m], 6, True) for n, m in ((3, 4), (1, 2))]
        from videobert.data import pack_tensors

        packed = pack_tensors(samples, 40, {"input_ids": 0, "token_type_ids": 0, "position_ids": 0}, [[0, 1]])
        hidden = model(packed["input_ids"], token_type_ids=packed["token_type_ids"], segment_ids=packed["segment_ids"],
                       position_ids=packed["position_ids"], modality_rules=PREFIX_LM_RULES).last_hidden_state
        hidden.square().sum().backward()
        rows.append((hidden.detach(), model.layers[0].qkv.weight.grad.clone()))
    torch.testing.assert_close(rows[1][0], rows[0][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rows[1][1], rows[0][1], rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------------------------------- errors

def test_missing_checkpoint_and_empty_word_lists_are_clear_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no checkpoint there"):
        load_checkpoint(tmp_path)
    assert main(["zero-shot", "--ckpt", str(tmp_path / "none")]) == 1
    assert "no checkpoint there" in capsys.readouterr().err
    (tmp_path / "verbs.txt").write_text("# nothing\n\n")
    assert main(["zero-shot", "--ckpt", str(tmp_path), "--verbs", str(tmp_path / "verbs.txt"),
                 "--nouns", str(tmp_path / "verbs.txt")]) == 1
    err = capsys.readouterr().err
    assert "verb list" in err and "is empty" in err
    assert main(["finetune", "--task", "classify", "--ckpt", str(tmp_path), "--out", str(tmp_path / "ft")]) == 1
    assert "no checkpoint there" in capsys.readouterr().err


def write_task_folder(root: Path, vocab: Path, num_videos: int = 12) -> None:
    """A real-data folder in the documented layout (tokens/, text/, vocab.txt, tasks/<split>.jsonl) made from
    synthetic videos, so its labels are learnable."""
    import numpy as np

    from videobert.corpus import synthetic_video

    for name in ("tokens", "text", "tasks"):
        (root / name).mkdir(parents=True, exist_ok=True)
    shutil.copy(vocab, root / "vocab.txt")
    splits = {"train": [], "validation": [], "test": []}
    for index in range(num_videos):
        video = synthetic_video(77, index, 20736)
        vid = f"real{index:03d}"
        np.save(root / "tokens" / f"{vid}.npy", np.array(video.visual_tokens))
        (root / "text" / f"{vid}.jsonl").write_text("".join(
            json.dumps({"start": s.start, "end": s.end, "text": s.text}) + "\n" for s in video.sentences
            if s.step >= 0))  # the chatter overlaps steps, which subtitle files may not
        split = "train" if index < num_videos // 2 else ("validation" if index < 3 * num_videos // 4 else "test")
        for step in video.steps:
            answers = [f"{step.action} the {step.object}", "peel the egg", "stir the milk"]
            if answers[0] in answers[1:]:
                answers[1] = "fry the rice"
            splits[split].append({"video": vid, "start": step.first_clip * 1.5, "end": (step.last_clip + 1) * 1.5,
                                  "text": step.caption, "verb": step.action, "noun": step.object,
                                  "label": step.action, "question": "what is the person doing",
                                  "answers": answers, "answer": 0})
    for split, records in splits.items():
        (root / "tasks" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_bad_task_files_name_the_file_and_line(tmp_path, pretrained):
    data = tmp_path / "data"
    write_task_folder(data, pretrained / "vocab.txt", num_videos=4)
    config = load_checkpoint(pretrained).config
    lines = (data / "tasks" / "test.jsonl").read_text().splitlines()
    record = json.loads(lines[1])
    del record["verb"]
    (data / "tasks" / "test.jsonl").write_text("\n".join([lines[0], json.dumps(record)]) + "\n")
    with pytest.raises(DataError, match=r"test.jsonl:2: the zero-shot task needs 'verb'"):
        load_segments(str(data), "test", "zero-shot", config)
    (data / "tasks" / "test.jsonl").write_text(json.dumps({**record, "video": "nope"}) + "\n")
    with pytest.raises(DataError, match=r"test.jsonl:1: video 'nope' is not in"):
        load_segments(str(data), "test", "retrieval", config)
    (data / "tasks" / "test.jsonl").write_text(json.dumps({**record, "answer": 7}) + "\n")
    with pytest.raises(DataError, match="answer must be the index"):
        load_segments(str(data), "test", "multiple-choice", config)
    (data / "tasks" / "test.jsonl").unlink()
    with pytest.raises(DataError, match="task file does not exist"):
        load_segments(str(data), "test", "retrieval", config)


def test_vocabulary_mismatch_between_checkpoint_and_data(tmp_path, pretrained, capsys):
    data = tmp_path / "data"
    write_task_folder(data, pretrained / "vocab.txt", num_videos=4)
    pieces = (data / "vocab.txt").read_text().splitlines()
    (data / "vocab.txt").write_text("\n".join(pieces[:-1]) + "\n")  # one word piece fewer
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        load_checkpoint(pretrained, data=str(data))
    assert main(["retrieve", "--ckpt", str(pretrained), "--data", str(data)]) == 1
    assert "vocabulary mismatch" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- on a pretrained model

def test_zero_shot_classification_beats_chance(pretrained, tmp_path, capsys):
    (tmp_path / "verbs.txt").write_text("cut\npour\nstir\nfry\nbake\npeel\nmix\nboil\nslice\ngrate\nwhisk\nseason\n")
    (tmp_path / "nouns.txt").write_text("onion\ntomato\negg\nflour\nbutter\ngarlic\ncarrot\npotato\nrice\nmilk\n"
                                        "cheese\npepper\nchicken\npasta\nsugar\nlemon\n")
    assert main(["zero-shot", "--ckpt", str(pretrained), "--videos", "30", "--verbs", str(tmp_path / "verbs.txt"),
                 "--nouns", str(tmp_path / "nouns.txt"), "--out", str(tmp_path / "zs.jsonl")]) == 0
    result = _json_out(capsys)
    assert result["segments"] > 100 and result["verb_not_in_list"] == 0
    for slot in ("verb", "noun"):
        assert result[f"{slot}_top5"] > 1.3 * result[f"{slot}_top5_chance"], result
        assert result[f"{slot}_top1"] > 1.5 * result[f"{slot}_top1_chance"], result
    first = json.loads((tmp_path / "zs.jsonl").read_text().splitlines()[0])
    assert len(first["verb_top5"]) == 5 and first["verb"] in first["verb_top5"] + [first["verb"]]


def test_zero_shot_ranks_by_the_masked_token_probabilities(pretrained):
    """A segment's ranking is the masked-token head's probabilities at the template's masks, read off one
    plain forward of `[CLS] template [>] clips [SEP]`."""
    from videobert.data import encode_sample

    checkpoint = load_checkpoint(pretrained)
    segment = load_segments("synthetic", "test", "zero-shot", checkpoint.config, 1)[0]
    verbs, nouns = ["cut", "pour", "stir", "fry", "bake", "peel"], ["onion", "egg", "rice", "milk", "lemon", "flour"]
    result = zero_shot(checkpoint, [segment], verbs, nouns)
    tok, config = checkpoint.tokenizer, checkpoint.config
    text = tok.encode("now let me show you how to") + [config.mask_token_id] + tok.encode("the") + [
        config.mask_token_id]
    ids, types = encode_sample(config, text, segment.clips)
    with torch.no_grad():
        states = checkpoint.model.bert(ids[None], token_type_ids=types[None]).last_hidden_state[0]
        logp = torch.log_softmax(checkpoint.model.text_logits(states), dim=-1)
    for slot, words, position in (("verb", verbs, 1 + text.index(config.mask_token_id)), ("noun", nouns, len(text))):
        direct = sorted(words, key=lambda w: -float(logp[position, tok.token_id(w)]))[:5]
        assert result["predictions"][0][f"{slot}_top5"] == direct


def test_zero_shot_scores_words_of_several_pieces(pretrained):
    checkpoint = load_checkpoint(pretrained)
    assert len(checkpoint.tokenizer.encode("stirring")) > 1  # not a whole word of the synthetic vocabulary
    segments = load_segments("synthetic", "test", "zero-shot", checkpoint.config, 2)
    result = zero_shot(checkpoint, segments, ["stir", "stirring", "cut"], ["egg", "eggplant"])
    assert result["verb_top1_chance"] == pytest.approx(1 / 3) and 0 <= result["noun_top1"] <= 1
    assert all(p["verb_top5"][0] in ("stir", "stirring", "cut") for p in result["predictions"])
    with pytest.raises(ValueError, match="exactly two \\[MASK\\] slots"):
        zero_shot(checkpoint, segments, ["cut"], ["egg"], template="now [MASK] it")


def test_retrieval_beats_chance(pretrained, tmp_path, capsys):
    assert main(["retrieve", "--ckpt", str(pretrained), "--videos", "12", "--candidates", "40",
                 "--out", str(tmp_path / "scores.npy")]) == 0
    result = _json_out(capsys)
    assert result["candidates"] == 40
    for way in ("text_to_video", "video_to_text"):
        assert result[f"{way}_R@5"] > 3 * result[f"{way}_R@5_chance"], result
        assert result[f"{way}_median_rank"] < 0.5 * result["median_rank_chance"], result
    import numpy as np

    assert np.load(tmp_path / "scores.npy").shape == (40, 40)


def test_retrieval_batches_all_pairs_through_the_packed_encoder(pretrained, monkeypatch):
    import videobert.tasks as tasks

    calls = []
    original = tasks._encode_chunk

    def counting(encoder, samples, chunk, row_length, device, rules):
        calls.append(len(chunk))
        yield from original(encoder, samples, chunk, row_length, device, rules)
    monkeypatch.setattr(tasks, "_encode_chunk", counting)
    checkpoint = load_checkpoint(pretrained)
    segments = load_segments("synthetic", "test", "retrieval", checkpoint.config, 3)[:10]
    result = retrieval(checkpoint, segments)
    assert sum(calls) == 100 and len(calls) < 10  # 100 pairs in a few packed forwards
    assert result["scores"].shape == (10, 10)


def test_finetune_classify_beats_chance_and_writes_test_predictions(pretrained, tmp_path):
    out = tmp_path / "cls"
    last = finetune(FinetuneArgs(task="classify", ckpt=str(pretrained), out=str(out), steps=60, lr=1e-3,
                                 train_videos=150, eval_videos=15, batch_size=32, log_every=20, eval_every=30),
                    log=lambda m: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "eval_task_acc" in rows[-1]  # validation metrics during training
    test = json.loads((out / "test_metrics.json").read_text())
    assert test == last["test"] and test["chance"] == pytest.approx(1 / 12)
    assert test["test_acc"] > 3 * test["chance"] and test["test_acc"] > 2 * test["majority"], test
    predictions = [json.loads(line) for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == test["segments"]
    assert sum(p["correct"] for p in predictions) / len(predictions) == pytest.approx(test["test_acc"])


def test_finetune_resumes_exactly(pretrained, tmp_path):
    common = dict(task="multiple-choice", ckpt=str(pretrained), train_videos=20, eval_videos=3, batch_size=8,
                  log_every=1, eval_every=2)
    finetune(FinetuneArgs(out=str(tmp_path / "a"), steps=4, **common), log=lambda m: None)
    finetune(FinetuneArgs(out=str(tmp_path / "b"), steps=2, **common), log=lambda m: None)
    finetune(FinetuneArgs(out=str(tmp_path / "b"), steps=4, resume=True, **common), log=lambda m: None)
    a, b = ([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("a", "b"))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_finetune_multiple_choice_beats_chance(pretrained, tmp_path, capsys):
    out = tmp_path / "mc"
    assert main(["finetune", "--task", "multiple-choice", "--ckpt", str(pretrained), "--out", str(out),
                 "--steps", "60", "--lr", "1e-3", "--train-videos", "150", "--eval-videos", "15",
                 "--batch-size", "16", "--log-every", "20", "--eval-every", "60"]) == 0
    test = json.loads((out / "test_metrics.json").read_text())
    assert test["chance"] == pytest.approx(0.25) and test["test_acc"] > 2 * test["chance"], test
    first = json.loads((out / "test_predictions.jsonl").read_text().splitlines()[0])
    assert {"prediction", "truth", "correct"} <= set(first)


def test_captioning_fine_tune_and_decode(pretrained, tmp_path, capsys):
    pytest.importorskip("pycocoevalcap.bleu.bleu", reason="the caption metrics need pycocoevalcap "
                                                          "(pip install -e '.[eval]')")
    out = tmp_path / "cap"
    finetune(FinetuneArgs(task="caption", ckpt=str(pretrained), out=str(out), steps=80, lr=1e-3, train_videos=150,
                          eval_videos=10, batch_size=32, log_every=20, eval_every=40), log=lambda m: None)
    checkpoint = load_checkpoint(out, build_model)
    segments = load_segments("synthetic", "test", "caption", checkpoint.config, 10)
    greedy = generate_captions(checkpoint, segments, beam=1)
    beam = generate_captions(checkpoint, segments, beam=3)
    assert len(greedy) == len(beam) == len(segments) and all(isinstance(c, str) for c in greedy)
    assert all(len(checkpoint.tokenizer.encode(c)) <= 24 for c in beam)
    assert main(["caption", "--ckpt", str(out), "--videos", "10", "--beam", "2",
                 "--out", str(tmp_path / "captions.jsonl")]) == 0
    result = _json_out(capsys)
    assert {"bleu3", "bleu4", "rougeL", "cider", "mismatched_bleu4", "mismatched_rougeL"} <= set(result)
    assert result["rougeL"] > 30, result  # the template words and the object are learned quickly
    lines = (tmp_path / "captions.jsonl").read_text().splitlines()
    assert len(lines) == result["segments"] and {"reference", "caption"} <= set(json.loads(lines[0]))
    assert main(["caption", "--ckpt", str(pretrained), "--videos", "2"]) == 1  # not a captioning fine-tune
    assert "the checkpoint is not a caption fine-tune" in capsys.readouterr().err


def test_embed_writes_contextual_states(pretrained, tmp_path, capsys):
    from safetensors.torch import load_file

    assert main(["embed", "--ckpt", str(pretrained), "--videos", "2", "--out", str(tmp_path / "emb")]) == 0
    files = sorted((tmp_path / "emb").glob("*.safetensors"))
    assert len(files) == 2
    checkpoint = load_checkpoint(pretrained)
    from videobert.corpus import synthetic_video
    from videobert.data import encode_sample
    from videobert.tasks import SYNTHETIC_SPLIT_SEEDS

    video = synthetic_video(SYNTHETIC_SPLIT_SEEDS["test"], 0, checkpoint.config.num_visual_tokens)
    saved = load_file(files[0])
    hidden = checkpoint.config.hidden_size
    assert saved["clips"].shape == (len(video.visual_tokens), hidden)
    assert saved["sentences"].shape == (len(video.sentences), hidden)
    assert saved["window_clips"][:, 1].sum() == len(video.visual_tokens)
    first = saved["window_clips"][0].tolist()
    ids, types = encode_sample(checkpoint.config, [], video.visual_tokens[first[0]:first[0] + first[1]])
    with torch.no_grad():
        states = checkpoint.model.bert(ids[None], token_type_ids=types[None]).last_hidden_state[0]
    torch.testing.assert_close(saved["clips"][:first[1]], states[2:-1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(saved["windows"][0], states[0], rtol=1e-4, atol=1e-5)
    assert main(["embed", "--ckpt", str(pretrained), "--videos", "1", "--out", str(tmp_path / "npy"),
                 "--format", "npy"]) == 0
    assert len(list((tmp_path / "npy").glob("*.npy"))) == 5


def test_every_command_on_a_real_data_folder(pretrained, tmp_path, capsys):
    data = tmp_path / "data"
    write_task_folder(data, pretrained / "vocab.txt")
    (tmp_path / "verbs.txt").write_text("cut\npour\nstir\nfry\nbake\npeel\nmix\nboil\nslice\ngrate\nwhisk\nseason\n")
    (tmp_path / "nouns.txt").write_text("onion\ntomato\negg\nflour\nbutter\ngarlic\ncarrot\npotato\nrice\nmilk\n")
    flags = ["--ckpt", str(pretrained), "--data", str(data)]
    assert main(["zero-shot", *flags, "--verbs", str(tmp_path / "verbs.txt"), "--nouns",
                 str(tmp_path / "nouns.txt")]) == 0
    assert _json_out(capsys)["segments"] > 0
    assert main(["zero-shot", *flags]) == 1 and "--verbs FILE and --nouns FILE are required" in capsys.readouterr().err
    assert main(["retrieve", *flags, "--split", "validation"]) == 0
    assert _json_out(capsys)["candidates"] > 2
    for task in ("classify", "multiple-choice", "caption"):
        out = tmp_path / task
        assert main(["finetune", "--task", task, *flags, "--out", str(out), "--steps", "2", "--batch-size", "4",
                     "--log-every", "1", "--eval-every", "2"]) == 0, task
        assert (out / "test_metrics.json").is_file() and (out / "test_predictions.jsonl").is_file()
    capsys.readouterr()
    assert main(["caption", "--ckpt", str(tmp_path / "caption"), "--data", str(data)]) == 0
    assert "bleu4" in _json_out(capsys)
    assert main(["embed", *flags, "--out", str(tmp_path / "emb")]) == 0
    assert len(list((tmp_path / "emb").glob("*.safetensors"))) == 12


@pytest.mark.parametrize("task", ["caption", "multiple-choice"])
def test_finetune_under_two_process_ddp(pretrained, tmp_path, task):
    """torchrun with 2 gloo processes: the pretraining loop's DDP serves fine-tuning (rank 0 logs, checkpoints and
    predicts the test split; the caption model's unused matching head is frozen so DDP does not wait for it)."""
    import os
    import subprocess
    import sys

    out = tmp_path / task
    port = 29531 if task == "caption" else 29532
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(port), "-m", "videobert.cli", "finetune", "--task", task, "--ckpt", str(pretrained),
                             "--out", str(out), "--steps", "2", "--batch-size", "4", "--train-videos", "8",
                             "--eval-videos", "2", "--log-every", "1", "--eval-every", "2"],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and "eval_loss" in rows[-1]
    assert (out / "test_metrics.json").is_file()
