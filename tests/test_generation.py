"""Text-to-video generation and forecasting with pictures (`videobert generate`, `videobert forecast`)."""
import json

import numpy as np
import pytest

from test_real_data import write_video
from videobert.cli import main
from videobert.generation import split_sentences, token_tiles
from videobert.train import TrainArgs, train

TINY = dict(steps=2, videos_per_batch=2, eval_videos=2, row_length=64, log_every=1, eval_every=2, vocab_size=200)


def _is_png(path) -> bool:
    import matplotlib.image

    return path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and \
        matplotlib.image.imread(path).ndim == 3


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic-run")
    train(TrainArgs(out=str(out), num_videos=4, **TINY), log=lambda m: None)
    return out


def test_split_sentences():
    assert split_sentences("season the steak. flip it.  ") == ["season the steak.", "flip it."]
    assert split_sentences("Stir! Now wait? ...") == ["Stir!", "Now wait?"]


def test_generate_on_the_synthetic_corpus_draws_token_tiles(synthetic_run, tmp_path, capsys):
    png = tmp_path / "gen.png"
    assert main(["generate", "--ckpt", str(synthetic_run), "--text", "season the steak. flip it.", "--length", "3",
                 "--out", str(png)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["sentence"] for r in result["generated"]] == ["season the steak.", "flip it."]
    for row in result["generated"]:
        assert len(row["sequence"]) == 3 and row["token"] == row["sequence"][0]
        assert all(0 <= t < 20736 for t in row["sequence"])
    assert result["picture"] == str(png) and _is_png(png)
    tile, known = token_tiles("synthetic", 20736)
    assert known is None
    from videobert.corpus import concept_tokens

    assert tile(concept_tokens("action", 0, 20736)[0]) == (None, f"#{concept_tokens('action', 0, 20736)[0]}\ncut")


def test_forecast_on_the_synthetic_corpus(synthetic_run, tmp_path, capsys):
    assert main(["forecast", "--ckpt", str(synthetic_run), "--video", "synthetic-4000037-000000", "--clip", "5",
                 "--scales", "1,2", "--out", str(tmp_path / "f.png")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [(r["scale"], r["seconds_ahead"], len(r["top"])) for r in result["forecast"]] == [(1, 1.5, 3), (2, 3.0, 3)]
    assert len(result["forecast"][0]["context"]) == 4 and len(result["forecast"][1]["context"]) == 3  # 5, 3, 1
    assert result["forecast"][0]["logp"] == sorted(result["forecast"][0]["logp"], reverse=True)
    assert _is_png(tmp_path / "f.png")
    for argv, message in ((["--video", "nope", "--clip", "0"], "a synthetic video is named synthetic-<seed>-<index>"),
                          (["--video", "synthetic-4000037-000000", "--clip", "999"], "--clip 999: the video has")):
        assert main(["forecast", "--ckpt", str(synthetic_run), *argv]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err


def test_generate_and_forecast_on_a_data_folder_show_training_frames(tmp_path, capsys):
    from videobert.real_data import build_vocab

    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for index in range(5):
        write_video(data, f"v{index}", clips=8, tokens=False)
        np.save(data / "features" / f"v{index}.npy", rng.normal(size=(8, 4)).astype("f4"))
        (data / "thumbnails").mkdir(exist_ok=True)
        np.save(data / "thumbnails" / f"v{index}.npy", np.full((8, 16, 16, 3), 40 * index, np.uint8))
    assert main(["tokenize-video", str(data), "--levels", "2", "--branching", "3", "--iterations", "3"]) == 0
    build_vocab(data, 100)
    run = tmp_path / "run"
    train(TrainArgs(out=str(run), data=str(data), preset="tiny", **{**TINY, "videos_per_batch": 1, "eval_videos": 1}),
          log=lambda m: None)
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(run), "--text", "cut the onion", "--out", str(tmp_path / "g.png")]) == 0
    generated = json.loads(capsys.readouterr().out)["generated"]
    assert len(generated) == 1 and all(0 <= t < 9 for t in generated[0]["sequence"])  # the folder's 3 x 3 tokens
    assert _is_png(tmp_path / "g.png")
    assert main(["forecast", "--ckpt", str(run), "--video", "v1", "--clip", "6"]) == 0
    assert _is_png(run / "forecast.png")  # the default: beside the run's checkpoints
    nearest = json.loads((data / "token_clips.json").read_text())["tokens"]
    token, entry = next(iter(nearest.items()))
    tile, known = token_tiles(str(data), 20736)
    assert known == sorted(int(t) for t in nearest)
    picture, caption = tile(int(token))
    assert caption == f"#{token}" and picture.shape == (16, 16, 3)
    assert (picture == 40 * int(entry["video"][1:])).all()  # the thumbnail of the clip nearest the centroid
