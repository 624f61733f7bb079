"""The `videobert` command line."""
import json

from videobert.cli import main


def test_info_reports_backends(capsys):
    assert main(["info"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["backends"]["segment_attention"]["torch"] == "available"


def test_demo_trains_the_tiny_model(capsys):
    assert main(["demo", "--steps", "4", "--samples", "6", "--row-length", "64"]) == 0
    out = capsys.readouterr().out
    assert "step   4" in out and "loss" in out
