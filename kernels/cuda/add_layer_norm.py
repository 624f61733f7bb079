"""Launchers of the CUDA C++ add_layer_norm (`add_layer_norm.cu` through `videobert_cuda::add_layer_norm_*`):
allocate outputs, pass the current stream, and size the backward's partial dweight/dbias buffers."""
from __future__ import annotations

from typing import Optional

import torch

from videobert._kernels.reference import dropout_threshold

_ops = torch.ops.videobert_cuda
# Hidden sizes the kernels take with 16-byte vectors and without (fixed by the compiled library): read once,
# not on every call's backend check.
MAX_HIDDEN, MAX_HIDDEN_UNVECTORIZED = _ops.layer_norm_max_hidden(True), _ops.layer_norm_max_hidden(False)


@torch.library.register_fake("videobert_cuda::add_layer_norm_fwd")
def _(x, residual, weight, bias, out, s, mean, rstd, eps, seed, offset, threshold, drop_scale, has_dropout, stream):
    return None


@torch.library.register_fake("videobert_cuda::add_layer_norm_bwd")
def _(dout, ds, s, mean, rstd, weight, dx, dresidual, dweight_partial, dbias_partial, dweight, dbias, seed, offset,
      threshold, drop_scale, has_dropout, stream):
    return None


def _rng(dropout_p: float, rng: Optional[torch.Tensor]) -> tuple[int, int, int, float]:
    seed, offset = (int(rng[0]), int(rng[1]) & 0xFFFFFFFF) if (rng is not None and dropout_p > 0) else (0, 0)
    return seed, offset, dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def add_layer_norm_fwd(x, residual, weight, bias, eps, dropout_p, rng):
    """Forward launcher: (out, s) shaped like x, (mean, rstd) fp32 per row."""
    rows = x.numel() // x.shape[-1]
    out, s = torch.empty_like(x), torch.empty_like(x)
    mean, rstd = (torch.empty((rows,), device=x.device, dtype=torch.float32) for _ in range(2))
    _ops.add_layer_norm_fwd(x, residual, weight, bias, out, s, mean, rstd, eps, *_rng(dropout_p, rng),
                            dropout_p > 0, _stream(x.device))
    return out, s, mean, rstd


def add_layer_norm_bwd(dout, ds, s, mean, rstd, weight, has_residual, has_bias, dropout_p, rng):
    """Backward launcher: (dx, dresidual or None, dweight, dbias or None)."""
    N = s.shape[-1]
    dx = torch.empty_like(s)
    dres = torch.empty_like(s) if has_residual else None
    blocks = _ops.add_layer_norm_bwd_blocks(s, weight)  # the grid, and rows of the partial buffers
    dw_partial = torch.empty((blocks, N), device=s.device, dtype=torch.float32)
    db_partial = torch.empty((blocks, N), device=s.device, dtype=torch.float32) if has_bias else None
    dw = torch.empty_like(weight)
    db = torch.empty_like(weight) if has_bias else None
    _ops.add_layer_norm_bwd(dout, ds, s, mean, rstd, weight, dx, dres, dw_partial, db_partial, dw, db,
                            *_rng(dropout_p, rng), dropout_p > 0, _stream(s.device))
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
