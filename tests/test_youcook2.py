"""YouCook2's published annotation layout into a data folder (`videobert import-youcook2`)."""
import json
import re

import numpy as np
import pytest

from videobert.cli import main
from videobert.tasks import folder_segments, read_word_list
from videobert.youcook2 import verb_and_noun

ANNOTATIONS = {"database": {
    "GLd3aX16zBg": {"duration": 12.0, "subset": "training", "recipe_type": "113", "video_url": "https://youtu.be/x",
                    "annotations": [{"segment": [0, 4], "id": 0, "sentence": "season the steak with salt"},
                                    {"segment": [3, 8], "id": 1, "sentence": "then add chopped onions to the pan"},
                                    {"segment": [9, 11], "id": 2, "sentence": "stir"}]},
    "0O4bxhpFX9o": {"duration": 9.0, "subset": "validation", "recipe_type": "201", "video_url": "https://youtu.be/y",
                    "annotations": [{"segment": [1, 5], "id": 0, "sentence": "Slice the tomatoes."}]},
    "noFeatures1": {"duration": 5.0, "subset": "training", "recipe_type": "113", "video_url": "https://youtu.be/z",
                    "annotations": [{"segment": [0, 3], "id": 0, "sentence": "boil the eggs"}]},
    "testVideo01": {"duration": 5.0, "subset": "testing", "recipe_type": "113", "video_url": "https://youtu.be/t"}}}


def test_import_youcook2_writes_a_data_folder(tmp_path, capsys):
    (tmp_path / "ann.json").write_text(json.dumps(ANNOTATIONS))
    (tmp_path / "feat").mkdir()
    for video_id, clips in (("GLd3aX16zBg", 8), ("0O4bxhpFX9o", 6)):
        features = np.random.default_rng(clips).normal(size=(clips, 4)).astype("f4")
        np.save(tmp_path / "feat" / f"{video_id}.npy", features)
    data = tmp_path / "data"
    assert main(["import-youcook2", str(tmp_path / "ann.json"), str(tmp_path / "feat"), str(data)]) == 0
    out = capsys.readouterr().out
    assert "2 videos (1 annotated ones without features skipped), 4 segments" in out
    assert "(1 without a verb and a noun left out)" in out
    assert sorted(p.name for p in (data / "features").iterdir()) == ["0O4bxhpFX9o.npy", "GLd3aX16zBg.npy"]
    text = [json.loads(line) for line in (data / "text" / "GLd3aX16zBg.jsonl").read_text().splitlines()]
    assert [(t["start"], t["end"]) for t in text] == [(0, 4), (4, 8), (9, 11)]  # the overlap starts where 0 ends
    assert main(["tokenize-video", str(data), "--levels", "1", "--branching", "2", "--iterations", "2"]) == 0
    train = folder_segments(data, "train")
    assert [(s.start, s.end, s.verb, s.noun) for s in train] == [(0, 4, "season", "steak"), (3, 8, "add", "onion")]
    validation = folder_segments(data, "validation")
    assert [(s.video_id, s.verb, s.noun, s.text) for s in validation] == [
        ("0O4bxhpFX9o", "slice", "tomato", "Slice the tomatoes.")]
    assert read_word_list(data / "verbs.txt", "verb") == ["add", "season", "slice"]
    assert read_word_list(data / "nouns.txt", "noun") == ["onion", "steak", "tomato"]


@pytest.mark.parametrize("content, match", [
    ("not json", "expected YouCook2's"),
    ('{"database": {"v": {"subset": "training"}}}', r"video v: expected an object with an \"annotations\" list"),
    ('{"database": {"v": {"subset": "training", "annotations": [{"segment": [2, 1], "sentence": "a"}]}}}',
     "video v, annotation 1: needs 0 <= start < end"),
    ('{"database": {"v": {"subset": "training", "annotations": [{"segment": [0, 1], "sentence": "cut it"}]}}}',
     "none of the 1 annotated videos"),
])
def test_import_youcook2_errors_name_the_file(tmp_path, capsys, content, match):
    (tmp_path / "ann.json").write_text(content)
    (tmp_path / "feat").mkdir()
    assert main(["import-youcook2", str(tmp_path / "ann.json"), str(tmp_path / "feat"), str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(match, err), err


@pytest.mark.parametrize("sentence, expected", [
    ("season the steak", ("season", "steak")), ("then add chopped onions and garlic to the pan", ("add", "onion")),
    ("pour it into a bowl", ("pour", "bowl")), ("Now you can slice the tomatoes.", ("slice", "tomato")),
    ("put the berries in a pot", ("put", "berry")), ("stir", ("stir", None)), ("", (None, None))])
def test_verb_and_noun_of_recipe_steps(sentence, expected):
    assert verb_and_noun(sentence) == expected
