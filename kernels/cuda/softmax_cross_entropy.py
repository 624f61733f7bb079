"""Launchers of the CUDA C++ softmax cross-entropy (`softmax_cross_entropy.cu` through
`videobert_cuda::softmax_cross_entropy_*`): allocate per-row outputs and pass the current stream."""
from __future__ import annotations

from typing import Optional

import torch

_ops = torch.ops.videobert_cuda


@torch.library.register_fake("videobert_cuda::softmax_cross_entropy_fwd")
def _(logits, labels, loss, lse, correct, ignore_index, label_smoothing, stream):
    return None


@torch.library.register_fake("videobert_cuda::softmax_cross_entropy_bwd")
def _(logits, labels, lse, dloss, dlse, grad, ignore_index, label_smoothing, stream):
    return None


def _rows(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def softmax_cross_entropy_fwd(logits, labels, ignore_index, label_smoothing):
    """Forward launcher: per-row (loss fp32, lse fp32, correct bool), one pass over each row."""
    logits = _rows(logits)
    N = logits.shape[0]
    loss, lse = (torch.empty((N,), device=logits.device, dtype=torch.float32) for _ in range(2))
    correct = torch.empty((N,), device=logits.device, dtype=torch.bool)
    _ops.softmax_cross_entropy_fwd(logits, labels.long(), loss, lse, correct, ignore_index, label_smoothing,
                                   torch.cuda.current_stream(logits.device).cuda_stream)
    return loss, lse, correct


def softmax_cross_entropy_bwd(dloss, dlse, logits, labels, lse, ignore_index, label_smoothing,
                              out: Optional[torch.Tensor] = None):
    """Backward launcher: d(logits) in logits' dtype, written into `out` when given (may be `logits` itself)."""
    logits = _rows(logits)
    grad = torch.empty_like(logits) if out is None else out
    _ops.softmax_cross_entropy_bwd(logits, labels.long(), lse.float().contiguous(), dloss.float().contiguous(),
                                   None if dlse is None else dlse.float().contiguous(), grad, ignore_index,
                                   label_smoothing, torch.cuda.current_stream(logits.device).cuda_stream)
    return grad


def unsupported(device: torch.device, dtype: torch.dtype, **_) -> Optional[str]:
    """Why this backend cannot take these inputs, or None."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} is not supported (float16, bfloat16, float32)"
    return None
