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



def test_bench_runs_a_benchmark_script(capfd, tmp_path, monkeypatch):
    """`videobert bench NAME ARGS` runs bench/NAME.py with ARGS in its own process."""
    import torch

    monkeypatch.setenv("VIDEOBERT_BENCH_OUT", str(tmp_path))
    assert main(["bench", "tune", "--quick", "--budget-s", "1"]) == 0
    out = capfd.readouterr().out
    assert "== bench/tune.py --quick --budget-s 1" in out
    if not torch.cuda.is_available():
        assert "needs a GPU" in out
