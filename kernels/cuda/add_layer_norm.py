"""Launchers of the CUDA C++ add_layer_norm (`add_layer_norm.cu` through its C API): allocate outputs, pass the
current stream, and size the backward's partial dweight/dbias buffers."""
from __future__ import annotations

from typing import Optional

import torch

from videobert._kernels.cuda import library
from videobert._kernels.cuda.library import DTYPES, call, pointer
from videobert._kernels.reference import dropout_threshold

# Hidden sizes the kernels take with 16-byte vectors and without (fixed by the compiled library).
MAX_HIDDEN, MAX_HIDDEN_UNVECTORIZED = library.layer_norm_max_hidden(True), library.layer_norm_max_hidden(False)


def _rng(dropout_p: float, rng: Optional[torch.Tensor], device: torch.device) -> tuple:
    """(rng pointer, threshold, scale, has_dropout): the kernels read (seed, offset) from the device tensor when
    they run, so nothing is read on the host and a captured graph replays with the state of that moment."""
    if dropout_p == 0:
        return None, 0, 1.0, 0
    return pointer(rng, "rng", device), dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p), 1


def add_layer_norm_fwd(x, residual, weight, bias, eps, dropout_p, rng):
    """Forward launcher: (out, s) shaped like x, (mean, rstd) fp32 per row."""
    n = x.shape[-1]
    rows = x.numel() // n
    out, s = torch.empty_like(x), torch.empty_like(x)
    mean, rstd = (torch.empty((rows,), device=x.device, dtype=torch.float32) for _ in range(2))
    device = x.device
    call("vb_add_layer_norm_fwd", pointer(x, "x", device), pointer(residual, "residual", device),
         pointer(weight, "weight", device), pointer(bias, "bias", device), out.data_ptr(), s.data_ptr(),
         mean.data_ptr(), rstd.data_ptr(), rows, n, DTYPES[x.dtype], DTYPES[weight.dtype], eps,
         *_rng(dropout_p, rng, device), device.index, library.stream(device))
    return out, s, mean, rstd


def add_layer_norm_bwd(dout, ds, s, mean, rstd, weight, has_residual, has_bias, dropout_p, rng):
    """Backward launcher: (dx, dresidual or None, dweight, dbias or None)."""
    n = s.shape[-1]
    rows = s.numel() // n
    device = s.device
    dx = torch.empty_like(s)
    dres = torch.empty_like(s) if has_residual else None
    blocks = library.add_layer_norm_bwd_blocks(rows, n, s.dtype, weight.dtype, device)
    dw_partial = torch.empty((blocks, n), device=device, dtype=torch.float32)
    db_partial = torch.empty((blocks, n), device=device, dtype=torch.float32) if has_bias else None
    dw = torch.empty_like(weight)
    db = torch.empty_like(weight) if has_bias else None
    call("vb_add_layer_norm_bwd", pointer(dout, "dout", device), pointer(ds, "ds", device), pointer(s, "s", device),
         pointer(mean, "mean", device), pointer(rstd, "rstd", device), pointer(weight, "weight", device),
         dx.data_ptr(), None if dres is None else dres.data_ptr(), dw_partial.data_ptr(),
         None if db_partial is None else db_partial.data_ptr(), dw.data_ptr(), None if db is None else db.data_ptr(),
         rows, n, blocks, DTYPES[s.dtype], DTYPES[weight.dtype], *_rng(dropout_p, rng, device), device.index,
         library.stream(device))
    return dx, dres, dw, db


def unsupported(device: torch.device, dtype: torch.dtype, hidden_size: int = 0, **_) -> Optional[str]:
    """Why this backend cannot take these inputs, or None."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} is not supported (float16, bfloat16, float32)"
    if hidden_size > MAX_HIDDEN:
        return f"hidden size {hidden_size} is larger than {MAX_HIDDEN}"
    vector = 4 if dtype == torch.float32 else 8
    if hidden_size > MAX_HIDDEN_UNVECTORIZED and hidden_size % vector:
        return (f"hidden size {hidden_size} is not a multiple of {vector}, which the CUDA kernel takes up to "
                f"{MAX_HIDDEN_UNVECTORIZED}")
    return None
