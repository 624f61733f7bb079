"""The compiled CUDA kernels (`libvideobert_kernels.so`: the `.cu` files and their C API, videobert_kernels.h)
loaded with ctypes, so that nothing compiled depends on a torch build: one library serves every torch.

`VIDEOBERT_CUDA_LIBRARY` names another build of the same library (e.g. CMake's). Importing this module raises
ImportError saying how to build the library when it is missing or does not load.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

LIBRARY_NAME = "libvideobert_kernels.so"
_PATH = Path(os.environ.get("VIDEOBERT_CUDA_LIBRARY") or Path(__file__).resolve().with_name(LIBRARY_NAME))
if not _PATH.is_file():
    raise ImportError(f"the CUDA extension is not built ({_PATH} is missing): install with nvcc on PATH "
                      "(pip install -e .), or set VIDEOBERT_BUILD_CUDA=1 to make a failed build an error")
try:
    _lib = ctypes.CDLL(str(_PATH))
except OSError as exc:
    raise ImportError(f"the CUDA extension {_PATH.name} does not load: {exc}") from exc

_p, _i, _i64, _f = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
# Argument types of each entry point, in videobert_kernels.h's order (pointers as void*).
_SIGNATURES = {
    "vb_add_layer_norm_fwd": [_p, _p, _p, _p, _p, _p, _p, _p, _i64, _i64, _i, _i, _f, _p, ctypes.c_int32, _f, _i, _i,
                              _p],
    "vb_add_layer_norm_bwd": [_p, _p, _p, _p, _p, _p, _p, _p, _p, _p, _p, _p, _i64, _i64, _i64, _i, _i, _p,
                              ctypes.c_int32, _f, _i, _i, _p],
    "vb_add_layer_norm_bwd_blocks": [_i64, _i64, _i, _i, _i, ctypes.POINTER(_i64)],
    "vb_softmax_cross_entropy_fwd": [_p, _p, _p, _p, _p, _i64, _i64, _i64, _i, _i64, _f, _i, _p],
    "vb_softmax_cross_entropy_bwd": [_p, _p, _p, _p, _p, _p, _i64, _i64, _i64, _i64, _i, _i64, _f, _i, _p],
    "vb_layer_norm_max_hidden": [_i],
}
for _name, _args in _SIGNATURES.items():
    _fn = getattr(_lib, _name)
    _fn.argtypes, _fn.restype = _args, _i
_lib.vb_error_string.argtypes, _lib.vb_error_string.restype = [_i], ctypes.c_char_p

# C API element type codes (VbDtype).
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def call(name: str, *args) -> None:
    """Call the C entry point `name`; a non-zero status raises RuntimeError with CUDA's name for it."""
    status = getattr(_lib, name)(*args)
    if status:
        raise RuntimeError(f"videobert CUDA {name} failed: {_lib.vb_error_string(status).decode()}")


def layer_norm_max_hidden(vectorized: bool) -> int:
    """Largest hidden size the LayerNorm kernels take, with 16-byte vectors or without."""
    return _lib.vb_layer_norm_max_hidden(int(vectorized))


def add_layer_norm_bwd_blocks(rows: int, n: int, dtype: torch.dtype, weight_dtype: torch.dtype,
                              device: torch.device) -> int:
    """The grid (and rows of the partial dweight/dbias buffers) of the LayerNorm backward on `device`."""
    blocks = ctypes.c_int64(0)
    call("vb_add_layer_norm_bwd_blocks", rows, n, DTYPES[dtype], DTYPES[weight_dtype], device.index,
         ctypes.byref(blocks))
    return blocks.value


def pointer(t: torch.Tensor | None, name: str, device: torch.device) -> int | None:
    """`t`'s data pointer (None for None) after checking what the kernels assume: contiguous, on `device`."""
    if t is None:
        return None
    if t.device != device or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous tensor on {device}, got {t.device} with strides {t.stride()}")
    return t.data_ptr()


def stream(device: torch.device) -> int:
    """The current CUDA stream of `device`, as the C API takes it."""
    return torch.cuda.current_stream(device).cuda_stream
