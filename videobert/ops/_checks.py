"""Input validation shared by the ops: every message names the argument and what was expected.

Shape, dtype and device checks always run (metadata only). Checks that read values (id and label
ranges) would force a device synchronisation, so they run for CPU tensors, and for CUDA tensors
only when VIDEOBERT_CHECKS=1; never while torch.compile traces.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_tensor(name: str, t, *, ndim: Optional[int] = None, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
                 shape: Optional[Sequence[Optional[int]]] = None, device: Optional[torch.device] = None) -> None:
    """Raise TypeError/ValueError unless `t` is a tensor of the given rank, dtype family, shape and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None and (len(shape) != t.dim() or any(want is not None and want != got
                                                            for want, got in zip(shape, t.shape))):
        expected = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on device {device}, got {t.device}")


def check_same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Raise TypeError unless `t` has the dtype of `ref`."""
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")


def check_probability(name: str, p: float) -> None:
    """Raise ValueError unless 0 <= p < 1."""
    if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {p!r}")


def value_checks_enabled(t: torch.Tensor) -> bool:
    """Whether range checks that read tensor values may run now (see module docstring)."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or os.environ.get("VIDEOBERT_CHECKS") == "1"


def check_range(name: str, t: torch.Tensor, low: int, high: int, *, allow: Optional[int] = None) -> None:
    """Raise ValueError unless every value is in [low, high) (or equals `allow`), when value checks are on."""
    if t.numel() == 0 or not value_checks_enabled(t):
        return
    info = torch.iinfo(t.dtype)  # a bound beyond the dtype's range holds trivially (and cannot be compared)
    bad = torch.zeros_like(t, dtype=torch.bool)
    if low > info.min:
        bad |= t < low
    if high <= info.max:
        bad |= t >= high
    if allow is not None:
        bad &= t != allow
    if bool(bad.any()):
        value = t[bad][0].item()
        extra = f" or equal {allow}" if allow is not None else ""
        raise ValueError(f"{name} values must lie in [{low}, {high}){extra}; found {value}")


# Dropout generator state per GPU: int64 (seed, counter) on the device (see make_rng).
_STATES: dict[torch.device, torch.Tensor] = {}
_MANUAL_SEED: list[Optional[int]] = [None]


def _device_key(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def dropout_state(device: torch.device) -> torch.Tensor:
    """The dropout generator of `device`: an int64 (seed, counter) tensor that lives there. Its seed comes from
    `manual_seed` if one was set, else from torch's CPU generator, once, at first use (so torch.manual_seed at
    start makes a run reproducible); each call with dropout takes (seed, counter) and advances the counter on
    the device."""
    key = _device_key(torch.device(device))
    if key not in _STATES:
        manual = _MANUAL_SEED[0]
        seed = (torch.tensor(manual * 1_000_003 + (key.index or 0)) if manual is not None
                else torch.randint(0, 2**62, (), dtype=torch.int64))
        _STATES[key] = torch.stack([seed % 2**62, torch.zeros((), dtype=torch.int64)]).to(key)
    return _STATES[key]


def manual_seed(seed: int) -> None:
    """Seed the dropout generators of every GPU (existing ones restart; new ones derive from `seed`)."""
    _MANUAL_SEED[0] = int(seed)
    for key in list(_STATES):
        del _STATES[key]


def get_dropout_states() -> dict[str, torch.Tensor]:
    """The GPUs' dropout generator states as CPU tensors, by device name (for checkpoints)."""
    return {str(key): state.cpu() for key, state in _STATES.items()}


def set_dropout_states(states: dict[str, torch.Tensor]) -> None:
    """Restore `get_dropout_states()` (a resumed run draws the masks the interrupted one would have)."""
    for name, state in states.items():
        key = _device_key(torch.device(name))
        check_tensor(f"dropout state {name}", state, dtypes=(torch.int64,), shape=(2,))
        if key.type != "cuda" or key.index < torch.cuda.device_count():
            _STATES[key] = state.to(key).clone()


def next_rng(state: torch.Tensor) -> torch.Tensor:
    """This call's (seed, offset): a copy of `state`, whose counter then advances by one in place, on its device
    (no host read: a captured CUDA graph advances it at every replay, drawing fresh masks)."""
    rng = state.clone()
    state[1:].add_(1)
    return rng


def make_rng(dropout_p: float, rng: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    """The int64 (seed, offset) tensor a dropout op runs with, on the op's `device` (the kernels read it there):
    `rng` if given (validated; a CPU one is copied over), else drawn. On a GPU the draw is `next_rng` of the
    device's `dropout_state`, device-side only; on the CPU a fresh 62-bit seed from torch's (seedable) CPU
    generator per call, with offset 0. None without dropout."""
    if dropout_p == 0.0:
        return None
    if rng is None:
        if device.type == "cpu":
            return torch.stack([torch.randint(0, 2**62, (), dtype=torch.int64), torch.zeros((), dtype=torch.int64)])
        return next_rng(dropout_state(device))
    check_tensor("rng", rng, dtypes=(torch.int64,), shape=(2,))
    if rng.device.type != "cpu" and rng.device != device:
        raise ValueError(f"rng must be on the CPU or on the op's device {device}, got {rng.device}")
    return rng if rng.device == device else rng.to(device)


def rng_pair(rng: Optional[torch.Tensor]) -> tuple[int, int]:
    """(seed, offset) as Python ints, (0, 0) when there is no dropout."""
    return (0, 0) if rng is None else tuple(rng.tolist())
