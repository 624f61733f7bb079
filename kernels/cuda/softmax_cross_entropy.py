"""Launchers of the CUDA C++ softmax cross-entropy (`softmax_cross_entropy.cu` through its C API): allocate
per-row outputs and pass the current stream."""
from __future__ import annotations

from typing import Optional

import torch

from videobert._kernels.cuda import library
from videobert._kernels.cuda.library import DTYPES, call, pointer


def _rows(logits: torch.Tensor) -> torch.Tensor:
    """Logits with unit stride along the vocabulary (a row stride of its own is fine)."""
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def _row_pointer(t: torch.Tensor, name: str, device: torch.device) -> int:
    """A 2-D tensor's pointer after checking what the kernels assume: unit column stride, on `device`."""
    if t.device != device or t.dim() != 2 or (t.shape[0] > 1 and t.stride(1) != 1):
        raise ValueError(f"{name} must be a 2-D tensor on {device} with unit column stride, got {t.device}, "
                         f"shape {tuple(t.shape)}, strides {t.stride()}")
    return t.data_ptr()


def softmax_cross_entropy_fwd(logits, labels, ignore_index, label_smoothing):
    """Forward launcher: per-row (loss fp32, lse fp32, correct bool), one pass over each row."""
    logits = _rows(logits)
    device = logits.device
    N, V = logits.shape
    loss, lse = (torch.empty((N,), device=device, dtype=torch.float32) for _ in range(2))
    correct = torch.empty((N,), device=device, dtype=torch.bool)
    call("vb_softmax_cross_entropy_fwd", _row_pointer(logits, "logits", device),
         pointer(labels.long().contiguous(), "labels", device), loss.data_ptr(), lse.data_ptr(), correct.data_ptr(),
         N, V, logits.stride(0), DTYPES[logits.dtype], ignore_index, label_smoothing, device.index,
         library.stream(device))
    return loss, lse, correct


def softmax_cross_entropy_bwd(dloss, dlse, logits, labels, lse, ignore_index, label_smoothing,
                              out: Optional[torch.Tensor] = None):
    """Backward launcher: d(logits) in logits' dtype, written into `out` when given (may be `logits` itself)."""
    logits = _rows(logits)
    device = logits.device
    N, V = logits.shape
    grad = torch.empty_like(logits) if out is None else out
    if grad.shape != logits.shape or grad.dtype != logits.dtype:
        raise ValueError(f"out must have logits' shape {tuple(logits.shape)} and dtype {logits.dtype}, got "
                         f"{tuple(grad.shape)} and {grad.dtype}")
    call("vb_softmax_cross_entropy_bwd", _row_pointer(logits, "logits", device),
         pointer(labels.long().contiguous(), "labels", device), pointer(lse.float().contiguous(), "lse", device),
         pointer(dloss.float().contiguous(), "dloss", device),
         None if dlse is None else pointer(dlse.float().contiguous(), "dlse", device),
         _row_pointer(grad, "out", device), N, V, logits.stride(0), grad.stride(0), DTYPES[logits.dtype],
         ignore_index, label_smoothing, device.index, library.stream(device))
    return grad


def unsupported(device: torch.device, dtype: torch.dtype, **_) -> Optional[str]:
    """Why this backend cannot take these inputs, or None."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} is not supported (float16, bfloat16, float32)"
    return None
