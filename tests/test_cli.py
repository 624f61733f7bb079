"""The `videobert` command line."""
import json
import subprocess
import sys

import pytest

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


BLOCK = ("import sys\n"
         "class Block:\n"
         "    def find_spec(self, name, path=None, target=None):\n"
         "        if name.split('.')[0] in sys.argv[1].split(','):\n"
         "            raise ImportError(f'No module named {name!r}', name=name)\n"
         "sys.meta_path.insert(0, Block())\n"
         "from videobert.cli import main\n"
         "sys.exit(main(sys.argv[2:]))\n")


@pytest.mark.parametrize("blocked, argv, extra", [
    ("transformers", ["pretrain", "--init-from-bert", "{tmp}/bert", "--steps", "1", "--out", "{tmp}/run"], "hf"),
    ("av,torchvision", ["extract-features", "{tmp}", "--out", "{tmp}/features"], "video"),
    ("wandb", ["pretrain", "--report-to", "wandb", "--steps", "1", "--out", "{tmp}/run"], "wandb")])
def test_missing_optional_package_is_one_error_line(blocked, argv, extra, tmp_path):
    """A flag whose optional package is not installed ends in one `error:` line naming the pip install."""
    argv = [a.format(tmp=tmp_path) for a in argv]
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"]))
    run = subprocess.run([sys.executable, "-c", BLOCK, blocked, *argv], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1 and len(lines) == 1, run.stderr[-2000:]
    assert lines[0].startswith("error: ") and f"pip install 'videobert[{extra}]'" in lines[0]
    assert any(name in lines[0] for name in blocked.split(","))


def test_bench_outside_a_checkout_says_where_benchmarks_live(tmp_path, monkeypatch, capsys):
    """`videobert bench` from an installed package (no bench/ folder beside it) is a one-line error, exit 2."""
    import videobert.cli as cli

    monkeypatch.setattr(cli, "__file__", str(tmp_path / "videobert" / "cli.py"))
    assert main(["bench", "attention"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the benchmarks run from a source checkout") and err.count("\n") == 1
