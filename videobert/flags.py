"""Command-line flags from run dataclasses: a field declared with `flag(default, help, type)` becomes `--field-name`
with its help line, its default shown and its value checked by the parser (bad input: one `error:` line, exit 2);
`--config FILE` (YAML or JSON) supplies values that flags given on the command line override, and `write_config`
writes a run's effective configuration in that form."""
from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

# Per-invocation switches: how to treat OUT's previous run, not what the run is (left out of config.yaml).
NOT_CONFIG = ("resume", "overwrite")


class _DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """Help lines end with "(default: X)", except where there is no default to show (None or empty)."""

    def _get_help_string(self, action):
        if action.default is None or action.default == "":
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with every default shown in --help and a bad command line reported as one line
    `prog: error: message` (exit status 2) instead of the usage block."""

    def __init__(self, *args, formatter_class=_DefaultsShown, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message: str):
        """Print `prog: error: message` on one line and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


@dataclasses.dataclass(frozen=True)
class Range:
    """An argparse `type`: an int or a finite float within bounds, else ArgumentTypeError saying what was
    expected ("an integer >= 1", "a number in [0, 1)")."""

    kind: type
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def __call__(self, text) -> Any:
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            value = None
        if value is None or (self.kind is float and not math.isfinite(value)) or not self.contains(value):
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {str(text)!r}")
        return value

    def contains(self, value) -> bool:
        """Whether `value` lies within the bounds."""
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self) -> str:
        """What the flag expects, in words."""
        noun = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            return (f"{noun} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '>='} {self.low:g}"
        return noun


COUNT = Range(int, 1)  # steps, videos, sizes
NATURAL = Range(int, 0)  # counts where 0 means none or "derive it"
POSITIVE = Range(float, 0, low_open=True)
NON_NEGATIVE = Range(float, 0)  # learning rates, weights, decay
RATE = Range(float, 0, 1, high_open=True)  # dropout probabilities
SHARE = Range(float, 0, 1)  # fractions and probabilities


def flag(default, help: str, type: Optional[Callable] = None, choices=None):
    """A run-dataclass field that is a flag: its default, help line, argparse `type` (check) and choices."""
    return dataclasses.field(default=default, metadata={"help": help, "type": type, "choices": choices})


def override(cls: type, name: str, default):
    """Field `name` of the flag dataclass `cls` with another default (a subclass's), keeping its help and check."""
    parent = next(f for f in dataclasses.fields(cls) if f.name == name)
    return dataclasses.field(default=default, metadata=parent.metadata)


def add_dataclass_flags(parser: argparse.ArgumentParser, fields: type, required: tuple = ()) -> None:
    """One flag per field of the dataclass `fields` (`--field-name`; booleans as switches), the fields named in
    `required` without a default, and `--config FILE`."""
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of flag values (keys: flag names, "
                                                          "e.g. a run's OUT/config.yaml); flags given here override it")
    for field in dataclasses.fields(fields):
        meta, flag_name = field.metadata, "--" + field.name.replace("_", "-")
        help_text = meta.get("help", "")
        if isinstance(field.default, bool):
            parser.add_argument(flag_name, action="store_true", help=help_text)
            continue
        # Checked after --config is applied, so a required value may come from the file.
        help_text += " (required)" if field.name in required else ""
        kind = meta.get("type") or (type(field.default) if field.default is not None else str)
        parser.add_argument(flag_name, type=kind, default=field.default, choices=meta.get("choices"), help=help_text)
    parser.set_defaults(flag_parser=(parser, tuple(required)))


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """`parser.parse_args(argv)`, with a subcommand's `--config FILE` applied under its flags and its required
    fields checked (any problem: the parser's one-line error, exit 2)."""
    args = parser.parse_args(argv)
    if not hasattr(args, "flag_parser"):
        return args
    owner, required = args.flag_parser
    if args.config:
        owner.set_defaults(**read_config(owner, args.config))
        args = parser.parse_args(argv)
    missing = ["--" + name.replace("_", "-") for name in required if not getattr(args, name)]
    if missing:
        owner.error(f"the following arguments are required: {', '.join(missing)}")
    return args


def read_config(parser: argparse.ArgumentParser, path: str) -> dict:
    """The flag values of the YAML or JSON file `path`, each checked as its flag's command-line value would be."""
    try:
        values = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        parser.error(f"argument --config: cannot read {path}: {exc}")
    if not isinstance(values, dict):
        parser.error(f"argument --config: {path} must hold a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions}
    checked = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        action = actions.get(dest)
        if action is None or dest in ("help", "config") or not action.option_strings:
            parser.error(f"argument --config: {path} has the unknown key {key!r} (no flag --{dest.replace('_', '-')})")
        where = f"argument {action.option_strings[0]} (in {path})"
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                parser.error(f"{where}: expected true or false, got {value!r}")
        elif value is None:
            if action.default is not None:
                parser.error(f"{where}: expected a value, got null")
        else:
            try:
                value = action.type(str(value)) if action.type else value
            except (argparse.ArgumentTypeError, ValueError) as exc:
                parser.error(f"{where}: {exc}")
            if action.choices is not None and value not in action.choices:
                parser.error(f"{where}: invalid choice {value!r} (choose from {', '.join(map(str, action.choices))})")
        checked[dest] = value
    return checked


def write_config(path: Path, args) -> None:
    """Write the run dataclass `args` as YAML: `--config path` then gives the same run (switches that only say how
    to treat the folder's previous run, --resume and --overwrite, are left out)."""
    values = {k: v for k, v in dataclasses.asdict(args).items() if k not in NOT_CONFIG}
    path.write_text(yaml.safe_dump(values, sort_keys=False))
