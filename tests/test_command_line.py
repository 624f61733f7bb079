"""The command line a practitioner expects: help and defaults on every flag, --version, values checked by the parser
(one error line, exit 2), --config files and the effective config a run writes."""
import argparse
import json

import pytest

from videobert import __version__
from videobert.cli import build_parser, main


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, action.choices


def test_every_flag_of_every_subcommand_has_help_and_shows_its_default(capsys):
    parser, commands = _subcommands()
    assert {"pretrain", "finetune", "retrieve", "zero-shot", "embed", "caption"} <= set(commands)
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help and action.help.strip(), f"videobert {name} {action.option_strings or action.dest}"
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        for action in sub._actions:
            shown = action.option_strings and action.default not in (None, "", argparse.SUPPRESS)
            if shown and action.help is not argparse.SUPPRESS:
                assert f"(default: {action.default})" in text, f"videobert {name} {action.option_strings[0]}"


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"videobert {__version__}\n"


@pytest.mark.parametrize("argv, flag, expected", [
    (["pretrain", "--steps", "0"], "--steps", "an integer >= 1"),
    (["pretrain", "--steps", "-5"], "--steps", "an integer >= 1"),
    (["pretrain", "--grad-accum", "0"], "--grad-accum", "an integer >= 1"),
    (["pretrain", "--videos-per-batch", "two"], "--videos-per-batch", "an integer >= 1"),
    (["pretrain", "--eval-videos", "-1"], "--eval-videos", "an integer >= 0"),
    (["pretrain", "--hidden-dropout", "1"], "--hidden-dropout", "a number in [0, 1)"),
    (["pretrain", "--attention-dropout", "-0.1"], "--attention-dropout", "a number in [0, 1)"),
    (["pretrain", "--lr=-1e-3"], "--lr", "a number >= 0"),
    (["pretrain", "--lr", "nan"], "--lr", "a number >= 0"),
    (["pretrain", "--clip", "0"], "--clip", "a number > 0"),
    (["pretrain", "--negative-rate", "1.5"], "--negative-rate", "a number in [0, 1]"),
    (["pretrain", "--eval-share", "2"], "--eval-share", "a number in [0, 1]"),
    (["finetune", "--ckpt", "x", "--batch-size", "0"], "--batch-size", "an integer >= 1"),
    (["finetune", "--ckpt", "x", "--dropout", "1.2"], "--dropout", "a number in [0, 1)"),
    (["retrieve", "--ckpt", "x", "--candidates", "-3"], "--candidates", "an integer >= 1"),
    (["zero-shot", "--ckpt", "x", "--videos", "0"], "--videos", "an integer >= 1"),
    (["embed", "--ckpt", "x", "--out", "y", "--videos", "-1"], "--videos", "an integer >= 1"),
    (["caption", "--ckpt", "x", "--beam", "0"], "--beam", "an integer >= 1"),
    (["demo", "--samples", "0"], "--samples", "an integer >= 1"),
    (["tokenize-video", "d", "--branching", "1"], "--branching", "an integer >= 2"),
    (["extract-features", "d", "--out", "o", "--thumbnail-size", "-1"], "--thumbnail-size", "an integer >= 0"),
    (["forecast", "--ckpt", "x", "--video", "v", "--clip", "3", "--scales", "1,0"], "--scales",
     "comma-separated integers >= 1"),
])
def test_counts_sizes_and_rates_are_checked_by_the_parser(argv, flag, expected, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"videobert {argv[0]}: error: argument {flag}: expected {expected}, got "), err


def test_finetune_requires_a_checkpoint_from_the_flags_or_the_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["finetune"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "videobert finetune: error: the following arguments are required: --ckpt\n"
    (tmp_path / "c.json").write_text(json.dumps({"ckpt": "runs/x", "task": "caption"}))
    args = build_parser().parse_args  # the plain parse, before --config, needs no --ckpt either
    assert args(["finetune"]).ckpt == ""
    from videobert.flags import parse_args

    parsed = parse_args(build_parser(), ["finetune", "--config", str(tmp_path / "c.json")])
    assert parsed.ckpt == "runs/x" and parsed.task == "caption"


@pytest.mark.parametrize("text, message", [
    ("steps: 0\n", "argument --steps (in {path}): expected an integer >= 1, got '0'"),
    ("stepz: 3\n", "argument --config: {path} has the unknown key 'stepz' (no flag --stepz)"),
    ("resume: yes please\n", "argument --resume (in {path}): expected true or false, got 'yes please'"),
    ("preset: huge\n", "argument --preset (in {path}): invalid choice 'huge' (choose from tiny, base, large)"),
    ("[1, 2]\n", "argument --config: {path} must hold a mapping of flag names to values"),
    ("steps: [\n", "argument --config: cannot read {path}: "),
])
def test_a_bad_config_file_is_one_error_line(text, message, tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", "--config", str(path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("videobert pretrain: error: " + message.format(path=path)), err


def test_flags_override_the_config_file(tmp_path):
    from videobert.flags import parse_args

    (tmp_path / "c.yaml").write_text("steps: 7\nlr: 3e-3\nvideos-per-batch: 4\ncompile: true\n")
    args = parse_args(build_parser(), ["pretrain", "--steps", "9", "--config", str(tmp_path / "c.yaml")])
    assert (args.steps, args.lr, args.videos_per_batch, args.compile, args.row_length) == (9, 3e-3, 4, True, 128)


def test_config_round_trip_reproduces_the_run(tmp_path, capsys):
    """A run writes its complete effective config; `pretrain --config RUN/config.yaml` makes the same run."""
    import yaml

    from videobert.train import TrainArgs

    small = ["--videos-per-batch", "2", "--num-videos", "8", "--eval-videos", "2", "--row-length", "64",
             "--vocab-size", "200", "--steps", "2", "--lr", "3e-3", "--sample-mix", "0.8,0.1,0.1", "--log-every", "1"]
    assert main(["pretrain", *small, "--out", str(tmp_path / "a")]) == 0
    config = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert set(config) == set(TrainArgs.__dataclass_fields__) - {"resume", "overwrite"}
    assert (config["lr"], config["sample_mix"], config["steps"]) == (3e-3, "0.8,0.1,0.1", 2)
    assert main(["pretrain", "--config", str(tmp_path / "a" / "config.yaml"), "--out", str(tmp_path / "b")]) == 0
    again = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert again == {**config, "out": str(tmp_path / "b")}
    runs = [json.loads((tmp_path / name / "run.json").read_text()) for name in "ab"]
    assert runs[1]["args"] == {**runs[0]["args"], "out": str(tmp_path / "b")}
    rows = [[json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in "ab"]
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]]


def test_log_level_and_the_rank_filter(capsys, monkeypatch):
    """Messages go through the `videobert` logger: at --log-level and above, rank 0's, other ranks' warnings only."""
    from videobert.logs import LOGGER, configure_logging

    monkeypatch.setattr(LOGGER, "handlers", [])
    configure_logging("warning")
    LOGGER.info("hidden")
    LOGGER.warning("shown")
    monkeypatch.setenv("RANK", "3")
    configure_logging("info")
    LOGGER.info("rank 3 info")
    LOGGER.error("lost the data")
    assert capsys.readouterr().out == "shown\nrank 3: lost the data\n"
    with pytest.raises(SystemExit):
        main(["pretrain", "--log-level", "chatty"])
    assert "argument --log-level: invalid choice: 'chatty'" in capsys.readouterr().err


def test_info_says_whether_the_cuda_extension_is_built_and_loadable(capsys):
    assert main(["info"]) == 0
    status = json.loads(capsys.readouterr().out)["cuda_extension"]
    assert status == "built and loadable" or "is not built" in status or "does not load" in status, status
