"""`linear_cross_entropy` (vocabulary projection + softmax cross-entropy, never holding the logits in the
fused backends) and `softmax_cross_entropy` (on given logits).

Layers: functional API (validation, reduction) -> `videobert::linear_cross_entropy` /
`videobert::softmax_cross_entropy` custom ops returning per-row (loss, lse, correct), each with a fake
and an autograd through its `_backward` op -> the backend's launcher. Reductions happen outside the
ops, so `reduction="none"` with any upstream gradient goes through the same backward.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from videobert._kernels import reference
from videobert.ops import _backend
from videobert.ops._checks import INT_DTYPES, check_range, check_same_dtype, check_tensor

LINEAR_OP = "linear_cross_entropy"
SOFTMAX_OP = "softmax_cross_entropy"
REDUCTIONS = ("mean", "sum", "none")


class CrossEntropyResult(NamedTuple):
    """Loss (reduced as asked), per-row log-sum-exp (differentiable, 0 on ignored rows, for a z-loss),
    and the number of non-ignored rows whose target logit is a maximum (int64 scalar tensor)."""

    loss: torch.Tensor
    lse: torch.Tensor
    num_correct: torch.Tensor


def _row_stats_fake(x: torch.Tensor, n: int):
    stat = x.new_empty((n,), dtype=reference.compute_dtype(x.dtype))
    return stat, torch.empty_like(stat), x.new_empty((n,), dtype=torch.bool)


# ---------------------------------------------------------------- linear_cross_entropy

_backend.register(LINEAR_OP, "torch", _backend.Impl(reference.linear_cross_entropy_fwd,
                                                    reference.linear_cross_entropy_bwd))


@torch.library.custom_op("videobert::linear_cross_entropy", mutates_args=())
def _linear_ce_op(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: Optional[torch.Tensor],
                  ignore_index: int, label_smoothing: float,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward: per-row (loss, lse, correct) of cross-entropy over hidden @ weight.T (+ bias)."""
    return _backend.run(LINEAR_OP, backend, "fwd", hidden, weight, labels, bias, ignore_index,
                                                           label_smoothing)


@_linear_ce_op.register_fake
def _(hidden, weight, labels, bias, ignore_index, label_smoothing, backend):
    return _row_stats_fake(hidden, hidden.shape[0])


@torch.library.custom_op("videobert::linear_cross_entropy_backward", mutates_args=())
def _linear_ce_backward_op(dloss: torch.Tensor, dlse: Optional[torch.Tensor], hidden: torch.Tensor,
                           weight: torch.Tensor, labels: torch.Tensor, bias: Optional[torch.Tensor],
                           lse: torch.Tensor, ignore_index: int, label_smoothing: float,
                           backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: (dhidden, dweight, dbias); dbias is empty when there is no bias."""
    dh, dw, db = _backend.run(LINEAR_OP, backend, "bwd", dloss, dlse, hidden, weight, labels, bias, lse,
                                                                 ignore_index, label_smoothing)
    return dh, dw, hidden.new_empty((0,)) if db is None else db


@_linear_ce_backward_op.register_fake
def _(dloss, dlse, hidden, weight, labels, bias, lse, ignore_index, label_smoothing, backend):
    return torch.empty_like(hidden), torch.empty_like(weight), (
        hidden.new_empty((0,)) if bias is None else torch.empty_like(bias))


def _linear_setup(ctx, inputs, output):
    hidden, weight, labels, bias, ignore_index, label_smoothing, backend = inputs
    ctx.save_for_backward(hidden, weight, labels, bias, output[1])
    ctx.ignore_index, ctx.label_smoothing, ctx.backend = ignore_index, label_smoothing, backend


def _linear_backward(ctx, dloss, dlse, dcorrect, backward_op=_linear_ce_backward_op):
    hidden, weight, labels, bias, lse = ctx.saved_tensors
    dloss = torch.zeros_like(lse) if dloss is None else dloss.contiguous()
    dh, dw, db = backward_op(dloss, None if dlse is None else dlse.contiguous(), hidden, weight, labels,
                                        bias, lse, ctx.ignore_index, ctx.label_smoothing, ctx.backend)
    return dh, dw, None, None if bias is None else db, None, None, None


_linear_ce_op.register_autograd(_linear_backward, setup_context=_linear_setup)
_linear_eager = _backend.eager_autograd(LINEAR_OP, _linear_setup, _linear_backward, non_differentiable=(2,))


# ---------------------------------------------------------------- softmax_cross_entropy

_backend.register(SOFTMAX_OP, "torch", _backend.Impl(reference.softmax_cross_entropy_fwd,
                                                     reference.softmax_cross_entropy_bwd))


@torch.library.custom_op("videobert::softmax_cross_entropy", mutates_args=())
def _softmax_ce_op(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, label_smoothing: float,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward: per-row (loss, lse, correct) of cross-entropy over the given logits."""
    return _backend.run(SOFTMAX_OP, backend, "fwd", logits, labels, ignore_index, label_smoothing)


@_softmax_ce_op.register_fake
def _(logits, labels, ignore_index, label_smoothing, backend):
    return _row_stats_fake(logits, logits.shape[0])


@torch.library.custom_op("videobert::softmax_cross_entropy_backward", mutates_args=())
def _softmax_ce_backward_op(dloss: torch.Tensor, dlse: Optional[torch.Tensor], logits: torch.Tensor,
                            labels: torch.Tensor, lse: torch.Tensor, ignore_index: int, label_smoothing: float,
                            backend: str) -> torch.Tensor:
    """Backward: d(logits) in the logits' dtype."""
    grad = _backend.run(SOFTMAX_OP, backend, "bwd", dloss, dlse, logits, labels, lse, ignore_index,
                                                            label_smoothing)
    return grad.to(logits.dtype)


@_softmax_ce_backward_op.register_fake
def _(dloss, dlse, logits, labels, lse, ignore_index, label_smoothing, backend):
    return torch.empty_like(logits)


def _softmax_setup(ctx, inputs, output):
    logits, labels, ignore_index, label_smoothing, backend = inputs
    ctx.save_for_backward(logits, labels, output[1])
    ctx.ignore_index, ctx.label_smoothing, ctx.backend = ignore_index, label_smoothing, backend


def _softmax_backward(ctx, dloss, dlse, dcorrect, backward_op=_softmax_ce_backward_op):
    logits, labels, lse = ctx.saved_tensors
    dloss = torch.zeros_like(lse) if dloss is None else dloss.contiguous()
    grad = backward_op(dloss, None if dlse is None else dlse.contiguous(), logits, labels, lse, ctx.ignore_index,
                       ctx.label_smoothing, ctx.backend)
    return grad.to(logits.dtype), None, None, None, None


_softmax_ce_op.register_autograd(_softmax_backward, setup_context=_softmax_setup)
_softmax_eager = _backend.eager_autograd(SOFTMAX_OP, _softmax_setup, _softmax_backward, non_differentiable=(2,))


# ---------------------------------------------------------------- functional API

def _check_common(labels, n_rows: int, n_classes: int, device, ignore_index, label_smoothing, reduction) -> None:
    check_tensor("labels", labels, dtypes=INT_DTYPES, ndim=1, shape=(n_rows,), device=device)
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if n_classes == 0:
        raise ValueError("the number of classes (vocabulary size) must be >= 1, got 0")
    check_range("labels", labels, 0, n_classes, allow=ignore_index)


def _reduce(loss, lse, correct, labels, ignore_index, reduction, return_stats):
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        # Divide on the device by max(count, 1): no host sync, and 0 (not NaN) when all rows are ignored.
        loss = loss.sum() / (labels != ignore_index).sum().clamp_min(1)
    if not return_stats:
        return loss
    return CrossEntropyResult(loss, lse, correct.sum())


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, *, ignore_index: int = -100,
                         label_smoothing: float = 0.0, reduction: str = "mean", return_stats: bool = False,
                         backend: str = "auto") -> Union[torch.Tensor, CrossEntropyResult]:
    """Cross-entropy of hidden (N, D) @ weight (V, D).T (+ bias (V,)) against labels (N,), like
    `F.cross_entropy(F.linear(hidden, weight, bias), labels, ...)` with fp32 loss; the fused backends never
    hold the (N, V) logits. `mean` averages over non-ignored rows (0 if none). With `return_stats`, returns a
    CrossEntropyResult (loss, per-row lse, num_correct).
    """
    check_tensor("hidden", hidden, ndim=2)
    N, D = hidden.shape
    check_tensor("weight", weight, ndim=2, shape=(None, D), device=hidden.device)
    check_same_dtype("weight", weight, "hidden", hidden)
    V = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, ndim=1, shape=(V,), device=hidden.device)
        check_same_dtype("bias", bias, "hidden", hidden)
    _check_common(labels, N, V, hidden.device, ignore_index, label_smoothing, reduction)
    resolved = _backend.resolve(LINEAR_OP, backend, hidden.device, hidden.dtype, hidden_size=D, vocab_size=V)
    op = _linear_ce_op if torch.compiler.is_compiling() else _linear_eager
    loss, lse, correct = op(hidden, weight, labels, bias, ignore_index, float(label_smoothing), resolved)
    return _reduce(loss, lse, correct, labels, ignore_index, reduction, return_stats)


def softmax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                          label_smoothing: float = 0.0, reduction: str = "mean", return_stats: bool = False,
                          backend: str = "auto") -> Union[torch.Tensor, CrossEntropyResult]:
    """Cross-entropy of logits (N, V) against labels (N,), as `F.cross_entropy` but with an fp32 loss,
    fp32 math for low-precision logits and 0 (not NaN) for `mean` over all-ignored rows."""
    check_tensor("logits", logits, ndim=2)
    N, V = logits.shape
    _check_common(labels, N, V, logits.device, ignore_index, label_smoothing, reduction)
    resolved = _backend.resolve(SOFTMAX_OP, backend, logits.device, logits.dtype, vocab_size=V)
    op = _softmax_ce_op if torch.compiler.is_compiling() else _softmax_eager
    loss, lse, correct = op(logits, labels, ignore_index, float(label_smoothing), resolved)
    return _reduce(loss, lse, correct, labels, ignore_index, reduction, return_stats)
