"""Backend registry and selection: which implementation of each op runs for given inputs.

Backends: "torch" (the references, always present), "triton" and "cuda" (registered by their
provider modules when those import). `resolve` turns a requested backend into a registered one or
raises `BackendUnavailableError` saying exactly what is missing.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from videobert.profiling import nvtx_range

BACKENDS = ("torch", "triton", "cuda")
BACKEND_ENV = "VIDEOBERT_BACKEND"

# Provider modules list their implementations in IMPLEMENTATIONS = {op: (fwd, bwd, unsupported)};
# each is imported once, on first use of its backend.
_PROVIDERS = {"triton": "videobert._kernels.triton", "cuda": "videobert._kernels.cuda"}
_provider_errors: dict[str, Optional[str]] = {}


class BackendUnavailableError(RuntimeError):
    """A requested backend cannot run these inputs; the message says what is missing."""


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of an op: forward, backward, and a check for inputs it cannot take."""

    fwd: Callable
    bwd: Callable
    # Returns None when the implementation can run on (device, dtype, **constraints), else the reason.
    unsupported: Callable[..., Optional[str]] = lambda device, dtype, **constraints: None


_REGISTRY: dict[str, dict[str, Impl]] = {}


def register(op: str, backend: str, impl: Impl) -> None:
    """Make `impl` the `backend` implementation of `op`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _REGISTRY.setdefault(op, {})[backend] = impl


def run(op: str, backend: str, direction: str, *args):
    """Call the `direction` ("fwd" or "bwd") of `op` on `backend` inside the NVTX range
    "<op>.<direction>[<backend>]" of the videobert domain (videobert.profiling)."""
    impl = _REGISTRY.get(op, {}).get(backend) or _implementation(op, backend)  # the second: first use of `backend`
    with nvtx_range(f"{op}.{direction}[{backend}]"):
        return getattr(impl, direction)(*args)


def eager_autograd(op: str, setup_context: Callable, backward: Callable, non_differentiable: tuple = (),
                   backward_flags: int = 0):
    """`apply` of an autograd.Function that runs `op`'s backend forward and backward directly, with the custom
    op's own setup_context and backward (given `backward_op=`, the backend's backward). Outside torch.compile
    the ops call this: it skips the custom-op dispatch (about 0.1 ms of host time per call). The inputs are the
    custom op's: the backend's forward arguments, the backend, then `backward_flags` flags that only the
    backward reads."""
    at = -1 - backward_flags

    class EagerFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            """The backend's forward; the custom op's setup_context saves what the backward needs."""
            output = run(op, inputs[at], "fwd", *inputs[:at])
            setup_context(ctx, inputs, output)
            ctx.mark_non_differentiable(*(output[i] for i in non_differentiable))
            return output

        @staticmethod
        def backward(ctx, *grads):
            """The custom op's backward formula with the backend's backward launched directly."""
            return backward(ctx, *grads, backward_op=lambda *args: run(op, args[-1], "bwd", *args[:-1]))

    EagerFunction.__name__ = EagerFunction.__qualname__ = f"Eager_{op}"
    return EagerFunction.apply


def _load_provider(backend: str) -> Optional[str]:
    """Import the provider module of `backend` once; returns why it is unavailable, or None."""
    if backend not in _provider_errors:
        try:
            module = importlib.import_module(_PROVIDERS[backend])
            for op, (fwd, bwd, unsupported) in module.IMPLEMENTATIONS.items():
                register(op, backend, Impl(fwd, bwd, unsupported))
            _provider_errors[backend] = None
        except ImportError as exc:
            _provider_errors[backend] = f"{_PROVIDERS[backend]} could not be imported ({exc})"
    return _provider_errors[backend]


def _implementation(op: str, backend: str) -> Impl:
    """`backend`'s implementation of `op`, its provider module imported first (also when the custom op runs
    before any `resolve`: opcheck, a graph run in a fresh process); BackendUnavailableError saying why if none."""
    reason = _load_provider(backend) if backend in _PROVIDERS else None
    impl = _REGISTRY.get(op, {}).get(backend)
    if impl is None:
        raise BackendUnavailableError(reason or f"no {backend} implementation of {op} is installed")
    return impl


def _why_unavailable(op: str, backend: str, device: torch.device, dtype: torch.dtype,
                     constraints: dict) -> Optional[str]:
    if backend in _PROVIDERS and _load_provider(backend) is None and backend not in _REGISTRY.get(op, {}):
        return f"the {backend} backend has no {op} kernel"  # before any device reason: no device would help
    if backend == "triton":
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs CPU tensors only under the interpreter: set TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"Triton kernels need CUDA tensors, got device {device}"
    if backend == "cuda" and device.type != "cuda":
        return f"the CUDA extension needs CUDA tensors, got device {device}"
    if backend != "torch" and dtype == torch.float64:
        return "float64 is supported by the torch reference only"
    try:
        impl = _implementation(op, backend)
    except BackendUnavailableError as exc:
        return str(exc)
    return impl.unsupported(device, dtype, **constraints)


def resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype, **constraints) -> str:
    """Pick the backend that runs `op` on these inputs.

    "auto" (or the VIDEOBERT_BACKEND environment variable, which overrides it) takes the fastest
    available implementation: on CUDA tensors triton, then cuda, then torch; elsewhere torch.
    A named backend either runs or raises BackendUnavailableError naming what is missing.
    """
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "auto") or "auto"
        if backend not in BACKENDS + ("auto",):
            raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS + ('auto',)}, got {backend!r}")
    elif backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        candidates = ("triton", "cuda") if device.type == "cuda" else ()
        for candidate in candidates:
            if _why_unavailable(op, candidate, device, dtype, constraints) is None:
                return candidate
        return "torch"
    reason = _why_unavailable(op, backend, device, dtype, constraints)
    if reason is not None:
        raise BackendUnavailableError(f"{op}: backend {backend!r} is not available: {reason}")
    return backend


def available_backends() -> dict[str, dict[str, str]]:
    """For each op and backend: "available" or why not, for CUDA tensors if present, else CPU."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for backend in _PROVIDERS:
        _load_provider(backend)
    report = {}
    for op in sorted(_REGISTRY):
        report[op] = {b: (_why_unavailable(op, b, device, torch.float16, {}) or "available") for b in BACKENDS}
    return report
