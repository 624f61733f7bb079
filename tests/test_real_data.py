"""Real-data folder: parsing jsonl/srt/vtt, streaming videos, and an error naming the file for each bad input."""
import json

import numpy as np
import pytest

from videobert.real_data import DataError, VideoFolder, read_sentences

SRT = """1
00:00:01,000 --> 00:00:03,500
now cut the onion

2
00:00:04,000 --> 00:00:06,000
then <i>fry</i> it
in butter
"""
VTT = """WEBVTT

intro
00:01.000 --> 00:03.500 align:start
now cut the onion

01:00:04.000 --> 01:00:06.000
then fry it
"""


def write_video(root, video_id, clips=6, dim=4, sentences=None, tokens=True):
    """A real-data folder entry: features (and tokens) .npy and a sentences file for `video_id`."""
    (root / "features").mkdir(parents=True, exist_ok=True)
    (root / "text").mkdir(exist_ok=True)
    np.save(root / "features" / f"{video_id}.npy", np.random.default_rng(0).normal(size=(clips, dim)).astype("f4"))
    if tokens:
        (root / "tokens").mkdir(exist_ok=True)
        np.save(root / "tokens" / f"{video_id}.npy", np.arange(clips))
    lines = sentences or [{"start": 0.0, "end": 2.0, "text": "cut the onion"}, {"start": 2.5, "end": 6, "text": "fry"}]
    (root / "text" / f"{video_id}.jsonl").write_text("\n".join(json.dumps(s) for s in lines) + "\n")


def test_subtitles_parse_into_sentences(tmp_path):
    (tmp_path / "a.srt").write_text(SRT)
    (tmp_path / "a.vtt").write_text(VTT)
    srt = read_sentences(tmp_path / "a.srt")
    assert [(s.start, s.end, s.text) for s in srt] == [(1.0, 3.5, "now cut the onion"),
                                                       (4.0, 6.0, "then fry it in butter")]
    vtt = read_sentences(tmp_path / "a.vtt")
    assert [(s.start, s.end) for s in vtt] == [(1.0, 3.5), (3604.0, 3606.0)]


YOUTUBE_VTT = """WEBVTT
Kind: captions
Language: en

00:00:00.160 --> 00:00:02.310 align:start position:0%
 
hello<00:00:00.560><c> everyone</c><00:00:00.960><c> welcome</c>

00:00:02.310 --> 00:00:02.320 align:start position:0%
hello everyone welcome
 

00:00:02.320 --> 00:00:05.030 align:start position:0%
hello everyone welcome
today<00:00:02.720><c> we</c><00:00:03.120><c> season</c><00:00:03.500><c> the</c><00:00:03.900><c> steak</c>

00:00:05.030 --> 00:00:05.040 align:start position:0%
today we season the steak
 

00:00:05.040 --> 00:00:07.000 align:start position:0%
today we season the steak
then<00:00:05.500><c> flip</c><00:00:05.900><c> it</c>
"""


def test_youtube_rolling_cues_give_each_line_once(tmp_path):
    (tmp_path / "auto.vtt").write_text(YOUTUBE_VTT)
    sentences = read_sentences(tmp_path / "auto.vtt")
    assert [(s.start, s.end, s.text) for s in sentences] == [
        (0.16, 2.31, "hello everyone welcome"), (2.32, 5.03, "today we season the steak"), (5.04, 7.0, "then flip it")]


def test_a_video_without_sentences_gives_video_only_samples(tmp_path):
    from videobert.config import VideoBERTConfig
    from videobert.model import IGNORE_INDEX
    from videobert.samples import SampleOptions, make_batch

    write_video(tmp_path, "a", clips=10)
    write_video(tmp_path, "b", clips=10)
    (tmp_path / "text" / "a.jsonl").unlink()
    (tmp_path / "text" / "b.jsonl").write_text("")
    folder = VideoFolder(tmp_path)
    videos = folder.videos(0, 2)
    assert [v.sentences for v in videos] == [[], []] and folder.sentence_file("a") is None
    config = VideoBERTConfig.tiny(num_visual_tokens=16)
    batch, stats = make_batch(videos, lambda text: [7], config, SampleOptions(max_tokens=7), 32, (0,))
    assert stats.samples == 6  # per video, windows of 4 clips (7 - [CLS] [>] [SEP]): 4 + 4 + 2
    assert (batch.vtm_labels == IGNORE_INDEX).all()
    real = batch.segment_ids >= 0
    assert int((batch.token_type_ids[real] == 1).sum()) == 20 + 6  # every clip once, and each sample's [SEP]


def test_tokenize_video_records_the_clip_nearest_each_centroid(tmp_path):
    from videobert.visual_tokenizer import HierarchicalKMeans, tokenize_folder

    rng = np.random.default_rng(2)
    for index in range(3):
        write_video(tmp_path, f"v{index}", tokens=False)
        np.save(tmp_path / "features" / f"v{index}.npy", rng.normal(size=(9, 4)).astype("f4"))
    tokenize_folder(tmp_path, tmp_path / "tok.pt", levels=1, branching=3, iterations=3, log=lambda m: None)
    recorded = json.loads((tmp_path / "token_clips.json").read_text())["tokens"]
    tokenizer = HierarchicalKMeans.load(tmp_path / "tok.pt")
    members = {}
    for index in range(3):
        tokens = np.load(tmp_path / "tokens" / f"v{index}.npy")
        features = np.load(tmp_path / "features" / f"v{index}.npy")
        for clip, token in enumerate(tokens):
            distance = float(((features[clip] - tokenizer.decode([int(token)])[0].numpy()) ** 2).sum())
            members.setdefault(str(token), []).append((distance, f"v{index}", clip))
    assert set(recorded) == set(members)
    for token, entries in members.items():
        best = min(entries)
        assert (recorded[token]["video"], recorded[token]["clip"]) == best[1:]


def test_folder_streams_videos(tmp_path):
    for name in ("b", "a"):
        write_video(tmp_path, name)
    folder = VideoFolder(tmp_path)
    assert folder.ids == ["a", "b"] and len(folder) == 2
    video = folder.videos(0, 5)[1]
    assert video.video_id == "b" and video.visual_tokens == list(range(6))
    assert [s.text for s in video.sentences] == ["cut the onion", "fry"]
    assert video.clips_between(0.0, 2.0) == [0, 1]


@pytest.mark.parametrize("content, match", [
    ('{"start": 0, "end": 1, "text": "a"}\n{"start": 0.5, "end": 2, "text": "b"}', "before the previous sentence ends"),
    ('{"start": -1, "end": 1, "text": "a"}', "needs 0 <= start < end"),
    ('{"start": 2, "end": 1, "text": "a"}', "needs 0 <= start < end"),
    ('{"start": 0, "end": 1, "text": "a"}\n{"start": 2, "end": 3, "text": oops}', r"v\.jsonl:2: expected"),
    ('{"start": 0, "text": "a"}', r"v\.jsonl:1: expected"),
])
def test_bad_sentences_name_file_and_line(tmp_path, content, match):
    (tmp_path / "v.jsonl").write_text(content)
    with pytest.raises(DataError, match=match):
        read_sentences(tmp_path / "v.jsonl")


def test_bad_folders_and_features_name_the_file(tmp_path):
    with pytest.raises(DataError, match="data folder does not exist"):
        VideoFolder(tmp_path / "nope")
    with pytest.raises(DataError, match="neither tokens/ nor features/"):
        VideoFolder(tmp_path)
    write_video(tmp_path, "a", dim=4, tokens=False)
    write_video(tmp_path, "b", dim=5, tokens=False)
    folder = VideoFolder(tmp_path)
    folder.features("a")
    with pytest.raises(DataError, match=r"b\.npy: feature dimension 5, expected 4"):
        folder.features("b")
    np.save(tmp_path / "features" / "c.npy", np.zeros((3,), "f4"))
    with pytest.raises(DataError, match=r"c\.npy: expected a non-empty float \(clips, F\) array"):
        folder.features("c")
    with pytest.raises(DataError, match="tokenize the features first"):
        folder.video(0)
    with pytest.raises(DataError, match="unknown sentence format"):
        (tmp_path / "x.txt").write_text("hi")
        read_sentences(tmp_path / "x.txt")
    with pytest.raises(DataError, match="bad timestamp"):
        (tmp_path / "y.srt").write_text("1\n00:00:xx,000 --> 00:00:01,000\nhi\n")
        read_sentences(tmp_path / "y.srt")


def test_tokenize_video_command_writes_tokens_and_reuses_the_tokenizer(tmp_path):
    from videobert.cli import main

    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 6)) * 20
    for index in range(5):
        write_video(tmp_path, f"v{index}", tokens=False)
        clips = centres[rng.integers(0, 4, size=12)] + 0.01 * rng.normal(size=(12, 6))
        np.save(tmp_path / "features" / f"v{index}.npy", clips.astype("f4"))
    args = ["tokenize-video", str(tmp_path), "--levels", "2", "--branching", "2", "--iterations", "5"]
    assert main(args) == 0
    first = {p.name: np.load(p) for p in (tmp_path / "tokens").glob("*.npy")}
    assert sorted(first) == [f"v{i}.npy" for i in range(5)] and (tmp_path / "visual_tokenizer.safetensors").exists()
    assert all(a.dtype == np.int64 and a.shape == (12,) and a.max() < 4 for a in first.values())
    assert main(args) == 0  # loads the saved tokenizer: same tokens
    assert all(np.array_equal(np.load(tmp_path / "tokens" / name), a) for name, a in first.items())
    video = VideoFolder(tmp_path).video(0)
    assert video.visual_tokens == first["v0.npy"].tolist()


def test_folder_with_features_for_the_continuous_mode(tmp_path):
    write_video(tmp_path, "a", clips=5, dim=3, tokens=False)
    video = VideoFolder(tmp_path, with_features=True).video(0)
    assert video.features.shape == (5, 3) and len(video.visual_tokens) == 5


def test_build_vocab_command_trains_or_copies_a_vocabulary(tmp_path, capsys):
    from videobert.cli import main
    from videobert.text_tokenizer import TextTokenizer

    for name in ("a", "b"):
        write_video(tmp_path / "data", name, sentences=[{"start": 0, "end": 2, "text": "season the steak"}])
    assert main(["build-vocab", str(tmp_path / "data"), "--size", "60"]) == 0
    tokenizer = TextTokenizer.from_vocab(tmp_path / "data" / "vocab.txt")
    assert tokenizer.vocab_size <= 60 and {"season", "steak"} <= set(tokenizer.vocabulary())
    assert "word pieces (WordPiece on the folder's sentences)" in capsys.readouterr().out
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "steak"]) + "\n")
    assert main(["build-vocab", str(tmp_path / "data"), "--from-bert", str(bert)]) == 0
    assert (tmp_path / "data" / "vocab.txt").read_text() == (bert / "vocab.txt").read_text()
    (tmp_path / "empty" / "features").mkdir(parents=True)
    np.save(tmp_path / "empty" / "features" / "x.npy", np.zeros((2, 3), "f4"))
    assert main(["build-vocab", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no sentences to train a vocabulary on; pass --from-bert DIR" in err


def test_pretraining_a_data_folder_picks_its_vocabulary_and_a_share_held_out(tmp_path):
    from videobert.real_data import build_vocab
    from videobert.train import TrainArgs, build

    data = tmp_path / "data"
    for index in range(3):
        write_video(data, f"v{index}", clips=8)
    args = TrainArgs(data=str(data), out=str(tmp_path / "run"), videos_per_batch=1, row_length=64)
    with pytest.raises(DataError, match=r"vocab.txt: no vocabulary; make one with `videobert build-vocab"):
        build(args, tmp_path / "run", 0, 1)
    build_vocab(data, 100)
    _, _, train_stream, held_out = build(args, tmp_path / "run", 0, 1)
    assert (train_stream.num_videos, held_out.num_videos) == (2, 1)  # 10% of 3, but at least one batch
    with pytest.raises(ValueError, match=r"3 videos cannot give a held-out batch and a training batch per rank of "
                                         r"--videos-per-batch 2 \(that needs 4\); lower --videos-per-batch"):
        build(TrainArgs(data=str(data), out=str(tmp_path / "run"), videos_per_batch=2), tmp_path / "run", 0, 1)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "steak"]) + "\n")
    with pytest.raises(ValueError, match=r"--init-from-bert .*bert: .*vocab.txt is another vocabulary .* run "
                                         r"`videobert build-vocab .*data --from-bert .*bert`"):
        build(TrainArgs(data=str(data), out=str(tmp_path / "run"), videos_per_batch=1, init_from_bert=str(bert)),
              tmp_path / "run", 0, 1)
