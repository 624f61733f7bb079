"""`add_layer_norm`: residual add + dropout + LayerNorm (BERT's post-norm sublayer output), fused.

Layers: functional API -> `videobert::add_layer_norm` custom op (+ fake + autograd through
`videobert::add_layer_norm_backward`) -> the backend's launcher.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from videobert._kernels import reference
from videobert.ops import _backend
from videobert.ops._checks import check_probability, check_same_dtype, check_tensor, make_rng, rng_pair

OP = "add_layer_norm"


def _torch_fwd(x, residual, weight, bias, eps, dropout_p, rng):
    return reference.add_layer_norm_fwd(x, residual, weight, bias, eps, dropout_p, *rng_pair(rng))


def _torch_bwd(dout, ds, s, mean, rstd, weight, has_residual, has_bias, dropout_p, rng):
    return reference.add_layer_norm_bwd(dout, ds, s, mean, rstd, weight, has_residual, has_bias, dropout_p,
                                        *rng_pair(rng))


_backend.register(OP, "torch", _backend.Impl(_torch_fwd, _torch_bwd))


@torch.library.custom_op("videobert::add_layer_norm", mutates_args=())
def _add_layer_norm_op(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                       bias: Optional[torch.Tensor], eps: float, dropout_p: float, rng: Optional[torch.Tensor],
                       backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward: (out, s, mean, rstd); s = residual + dropout(x), out = LayerNorm(s); fp32 (fp64) row stats."""
    return _backend.run(OP, backend, "fwd", x, residual, weight, bias, eps, dropout_p, rng)


@_add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps, dropout_p, rng, backend):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    stats = x.new_empty((rows,), dtype=reference.compute_dtype(x.dtype))
    return torch.empty_like(x), torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("videobert::add_layer_norm_backward", mutates_args=())
def _add_layer_norm_backward_op(dout: torch.Tensor, ds: Optional[torch.Tensor], s: torch.Tensor,
                                mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor, has_residual: bool,
                                has_bias: bool, dropout_p: float, rng: Optional[torch.Tensor],
                                backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: (dx, dresidual, dweight, dbias); dresidual/dbias are empty when there is no residual/bias."""
    dx, dres, dw, db = _backend.run(OP, backend, "bwd", dout, ds, s, mean, rstd, weight, has_residual,
                                                                has_bias, dropout_p, rng)
    return dx, s.new_empty((0,)) if dres is None else dres, dw, s.new_empty((0,)) if db is None else db


@_add_layer_norm_backward_op.register_fake
def _(dout, ds, s, mean, rstd, weight, has_residual, has_bias, dropout_p, rng, backend):
    return (s.new_empty(s.shape), s.new_empty(s.shape if has_residual else (0,)), weight.new_empty(weight.shape),
            weight.new_empty(weight.shape if has_bias else (0,)))


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, dropout_p, rng, backend = inputs
    _, s, mean, rstd = output
    ctx.save_for_backward(s, mean, rstd, weight, rng)
    ctx.has_residual, ctx.has_bias = residual is not None, bias is not None
    ctx.dropout_p, ctx.backend = dropout_p, backend


def _backward(ctx, dout, ds, dmean, drstd, backward_op=_add_layer_norm_backward_op):
    s, mean, rstd, weight, rng = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(s)
    dx, dres, dw, db = backward_op(dout.contiguous(), None if ds is None else ds.contiguous(), s, mean, rstd,
                                   weight, ctx.has_residual, ctx.has_bias, ctx.dropout_p, rng, ctx.backend)
    return (dx, dres if ctx.has_residual else None, dw, db if ctx.has_bias else None, None, None, None, None)


_add_layer_norm_op.register_autograd(_backward, setup_context=_setup_context)


_eager = _backend.eager_autograd(OP, _setup_context, _backward, non_differentiable=(2, 3))


def _validate(x, residual, weight, bias, eps, dropout_p) -> None:
    check_tensor("x", x)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last (normalised) dimension, got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous; call .contiguous()")
    N = x.shape[-1]
    if residual is not None:
        check_tensor("residual", residual, shape=tuple(x.shape), ndim=x.dim(), device=x.device)
        check_same_dtype("residual", residual, "x", x)
        if not residual.is_contiguous():
            raise ValueError("residual must be contiguous; call .contiguous()")
    check_tensor("weight", weight, ndim=1, shape=(N,), device=x.device)
    if bias is not None:
        check_tensor("bias", bias, ndim=1, shape=(N,), device=x.device)
        check_same_dtype("bias", bias, "weight", weight)
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    check_probability("dropout_p", dropout_p)


def add_layer_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                   bias: Optional[torch.Tensor], eps: float = 1e-12, *, dropout_p: float = 0.0,
                   return_residual: bool = False, rng: Optional[torch.Tensor] = None,
                   backend: str = "auto") -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """out = LayerNorm(residual + dropout(x)) over the last dim with fp32 statistics, in x's dtype;
    returns (out, s) with s = residual + dropout(x) when `return_residual`. residual may be None.

    `rng` is an optional int64 tensor (seed, offset), on the CPU or x's device, fixing the dropout mask; by default
    it is drawn (on a GPU from a generator state kept on the device: no host read, graph-safe).
    """
    _validate(x, residual, weight, bias, eps, dropout_p)
    resolved = _backend.resolve(OP, backend, x.device, x.dtype, hidden_size=x.shape[-1])
    op = _add_layer_norm_op if torch.compiler.is_compiling() else _eager
    out, s, _, _ = op(x, residual, weight, bias, float(eps), float(dropout_p), make_rng(dropout_p, rng, x.device),
                      resolved)
    return (out, s) if return_residual else out
