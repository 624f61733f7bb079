"""The paper's caption metrics through pycocoevalcap: BLEU-3/4, METEOR (Java), ROUGE-L, CIDEr."""
import shutil
import sys

import pytest

from videobert._optional import MissingDependency
from videobert.finetune import caption_metrics

pytest.importorskip("pycocoevalcap.bleu.bleu", reason="the caption metrics need pycocoevalcap (pip install -e "
                                                      "'.[eval]')")

REFERENCES = ["cut the onion", "fry the egg now", "stir the rice slowly"]


def test_metrics_of_perfect_and_mismatched_captions(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)  # METEOR is tested on its own below
    perfect = caption_metrics(["Cut the onion.", "fry the egg now", "stir the rice slowly"], REFERENCES)
    assert perfect["meteor_skipped"] == "METEOR needs Java: no java on PATH" and "meteor" not in perfect
    assert perfect["bleu3"] == pytest.approx(100) and perfect["bleu4"] == pytest.approx(100)  # case, punctuation
    assert perfect["rougeL"] == pytest.approx(100) and perfect["cider"] > 1
    assert perfect["mismatched_rougeL"] < 50 and perfect["mismatched_cider"] < perfect["cider"] / 2
    partial = caption_metrics(["cut an onion", "fry the egg", "stir rice"], REFERENCES)
    assert 0 < partial["rougeL"] < 100 and partial["bleu4"] < partial["bleu3"] <= 100
    with pytest.raises(ValueError, match="one hypothesis per reference"):
        caption_metrics(["a"], [])


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR runs Java; no java on PATH")
def test_meteor_runs_java():
    result = caption_metrics(REFERENCES, REFERENCES)
    assert result["meteor"] > 90 and result["mismatched_meteor"] < 50 and "meteor_skipped" not in result


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocoevalcap.cider.cider", None)
    with pytest.raises(MissingDependency, match=r"pip install 'videobert\[eval\]'"):
        caption_metrics(REFERENCES, REFERENCES)
