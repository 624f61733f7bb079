"""Optional dependencies: `require(module, extra, purpose)` imports one or raises MissingDependency, an
ImportError whose message names the pip install that fixes it (the CLI prints it as one `error:` line)."""
from __future__ import annotations

import importlib
from types import ModuleType


class MissingDependency(ImportError):
    """An optional package a feature needs is not installed; the message says how to install it."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """`import module`, or MissingDependency("<purpose> needs <package>: pip install 'videobert[<extra>]'")."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = exc.name or module.split(".")[0]
        raise MissingDependency(f"{purpose} needs {package}, which is not installed: pip install "
                                f"'videobert[{extra}]' (or pip install -e '.[{extra}]' in a checkout)") from exc
