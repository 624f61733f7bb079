"""NVTX ranges for Nsight Systems in the `videobert` domain: `nvtx_range(name)` uses the nvtx package when it is
importable (a real domain, filterable in Nsight), else torch.cuda.nvtx on a GPU ("videobert.<name>"), else does
nothing; never inside torch.compile tracing (a Python side effect would break the graph). Without a profiler
attached the ranges cost a few microseconds of host time each."""
from __future__ import annotations

import contextlib
import functools

import torch

DOMAIN = "videobert"

try:
    import nvtx as _nvtx
except ImportError:
    _nvtx = None


@functools.lru_cache(maxsize=None)
def _cuda() -> bool:
    return torch.cuda.is_available()


def nvtx_range(name: str):
    """A context manager marking `name` on the `videobert` NVTX domain (see the module docstring)."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    if _nvtx is not None:
        return _nvtx.annotate(name, domain=DOMAIN)
    if _cuda():
        return torch.cuda.nvtx.range(f"{DOMAIN}.{name}")
    return contextlib.nullcontext()
