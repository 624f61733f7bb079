"""`segment_attention`: attention over packed video-and-text rows with segment and modality masks, and
`segment_attention_varlen` for samples packed without padding (flash-attn's cu_seqlens layout).

Layers: functional API (validation, backend choice) -> `videobert::segment_attention` custom op
(+ fake + autograd through `videobert::segment_attention_backward`) -> the backend's launcher.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from videobert._kernels import reference
from videobert._kernels.reference import RULE_CAUSAL
from videobert.ops import _backend
from videobert.ops._checks import (INT_DTYPES, check_probability, check_range, check_same_dtype, check_tensor,
                                   make_rng, rng_pair, value_checks_enabled)

OP = "segment_attention"


def _torch_fwd(q, k, v, segment_ids, modality_ids, modality_rules, dropout_p, softmax_scale, rng):
    return reference.segment_attention_fwd(q, k, v, segment_ids, modality_ids, modality_rules, dropout_p,
                                           softmax_scale, *rng_pair(rng))


def _torch_bwd(dout, q, k, v, out, lse, segment_ids, modality_ids, modality_rules, dropout_p, softmax_scale, rng,
               deterministic):
    # The reference is deterministic either way.
    return reference.segment_attention_bwd(dout, q, k, v, out, lse, segment_ids, modality_ids, modality_rules,
                                           dropout_p, softmax_scale, *rng_pair(rng))


_backend.register(OP, "torch", _backend.Impl(_torch_fwd, _torch_bwd))


@torch.library.custom_op("videobert::segment_attention", mutates_args=())
def _segment_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor,
                          modality_ids: Optional[torch.Tensor], modality_rules: Optional[torch.Tensor],
                          dropout_p: float, softmax_scale: float, rng: Optional[torch.Tensor],
                          backend: str, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: (out (B, L, H, D), lse (B, H, L) fp32, +inf on rows with no allowed key); `deterministic` is for
    the backward (saved with the context)."""
    return _backend.run(OP, backend, "fwd", q, k, v, segment_ids, modality_ids, modality_rules,
                                                    dropout_p, softmax_scale, rng)


@_segment_attention_op.register_fake
def _(q, k, v, segment_ids, modality_ids, modality_rules, dropout_p, softmax_scale, rng, backend,
      deterministic=False):
    B, L, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, L), dtype=reference.compute_dtype(q.dtype))


@torch.library.custom_op("videobert::segment_attention_backward", mutates_args=())
def _segment_attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   out: torch.Tensor, lse: torch.Tensor, segment_ids: torch.Tensor,
                                   modality_ids: Optional[torch.Tensor], modality_rules: Optional[torch.Tensor],
                                   dropout_p: float, softmax_scale: float, rng: Optional[torch.Tensor],
                                   deterministic: bool,
                                   backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: (dq, dk, dv) from the saved out and lse; the dropout mask is regenerated from rng; bit-reproducible
    with `deterministic`."""
    return _backend.run(OP, backend, "bwd", dout, q, k, v, out, lse, segment_ids, modality_ids,
                        modality_rules, dropout_p, softmax_scale, rng, deterministic)


@_segment_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, segment_ids, modality_ids, modality_rules, dropout_p, softmax_scale, rng, deterministic,
      backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, segment_ids, modality_ids, modality_rules, dropout_p, softmax_scale, rng, backend, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, segment_ids, modality_ids, modality_rules, rng)
    ctx.dropout_p, ctx.softmax_scale, ctx.backend = dropout_p, softmax_scale, backend
    ctx.deterministic = deterministic


def _backward(ctx, dout, dlse, backward_op=_segment_attention_backward_op):
    q, k, v, out, lse, segment_ids, modality_ids, modality_rules, rng = ctx.saved_tensors
    dq, dk, dv = backward_op(dout.contiguous(), q, k, v, out, lse, segment_ids, modality_ids, modality_rules,
                             ctx.dropout_p, ctx.softmax_scale, rng, ctx.deterministic, ctx.backend)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_segment_attention_op.register_autograd(_backward, setup_context=_setup_context)
_eager = _backend.eager_autograd(OP, _setup_context, _backward, non_differentiable=(1,), backward_flags=1)


def _validate(q, k, v, segment_ids, modality_ids, modality_rules, dropout_p) -> None:
    check_tensor("q", q, ndim=4)
    B, L, H, D = q.shape
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, shape=(B, L, H, D), device=q.device)
        check_same_dtype(name, t, "q", q)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1 and t.numel() > 0:
            raise ValueError(f"{name} must have unit stride in its last (head) dimension; call .contiguous()")
    if D == 0:
        raise ValueError("q must have a head dimension D >= 1, got D = 0")
    check_tensor("segment_ids", segment_ids, dtypes=INT_DTYPES, shape=(B, L), ndim=2, device=q.device)
    if modality_rules is not None:
        if modality_ids is None:
            raise ValueError("modality_ids is required when modality_rules is given")
        check_tensor("modality_rules", modality_rules, dtypes=INT_DTYPES, ndim=2, device=q.device)
        M = modality_rules.shape[0]
        if modality_rules.shape != (M, M) or M == 0:
            raise ValueError(f"modality_rules must be a square (M, M) table with M >= 1, "
                             f"got shape {tuple(modality_rules.shape)}")
        check_range("modality_rules", modality_rules, 0, 3)
    if modality_ids is not None:
        check_tensor("modality_ids", modality_ids, dtypes=INT_DTYPES, shape=(B, L), ndim=2, device=q.device)
        if modality_rules is not None:
            check_range("modality_ids", modality_ids, 0, modality_rules.shape[0])
    check_probability("dropout_p", dropout_p)


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor,
                      modality_ids: Optional[torch.Tensor] = None, modality_rules: Optional[torch.Tensor] = None,
                      *, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                      rng: Optional[torch.Tensor] = None, backend: str = "auto",
                      deterministic: bool = False) -> torch.Tensor:
    """Masked attention on (B, L, H, D) q/k/v; query i sees key j iff segment_ids match, are >= 0 and the
    modality rule (0 blocked, 1 full, 2 causal j <= i) allows it. Rows with no allowed key give zeros.

    `rng` is an optional int64 tensor (seed, offset), on the CPU or q's device, fixing the dropout mask; drawn
    when omitted (on a GPU from a generator state kept on the device: no host read, graph-safe). The Triton
    backward adds dq up with atomics, in an order that varies between runs; `deterministic=True` makes gradients
    bit-reproducible (a slower backward). Returns (B, L, H, D) in q's dtype.
    """
    return _attention(q, k, v, segment_ids, modality_ids, modality_rules, dropout_p, softmax_scale, rng, backend,
                      deterministic)[0]


def _attention(q, k, v, segment_ids, modality_ids, modality_rules, dropout_p, softmax_scale, rng, backend,
               deterministic):
    """(out (B, L, H, D), lse (B, H, L) fp32, detached) of `segment_attention`."""
    _validate(q, k, v, segment_ids, modality_ids, modality_rules, dropout_p)
    if not isinstance(deterministic, bool):
        raise ValueError(f"deterministic must be a bool, got {deterministic!r}")
    D = q.shape[-1]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(D)
    elif not isinstance(softmax_scale, (int, float)) or not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale must be a finite number > 0, got {softmax_scale!r}")
    if modality_rules is None:
        modality_ids = None  # without rules every modality pair is allowed: nothing to evaluate
    resolved = _backend.resolve(OP, backend, q.device, q.dtype, head_dim=D,
                                num_modalities=0 if modality_rules is None else modality_rules.shape[0])
    op = _segment_attention_op if torch.compiler.is_compiling() else _eager
    out, lse = op(q, k, v, segment_ids, modality_ids, modality_rules, float(dropout_p), float(softmax_scale),
                  make_rng(dropout_p, rng, q.device), resolved, deterministic)
    return out, lse.detach()


# flash_attn_varlen_func arguments with no counterpart here, and the value that means "not used".
_FLASH_ONLY = {"window_size": (-1, -1), "softcap": 0.0, "alibi_slopes": None, "block_table": None}


def segment_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                             cu_seqlens_k: Optional[torch.Tensor] = None, max_seqlen_q: Optional[int] = None,
                             max_seqlen_k: Optional[int] = None, dropout_p: float = 0.0,
                             softmax_scale: Optional[float] = None, causal: bool = False,
                             return_attn_probs: bool = False, *, modality_ids: Optional[torch.Tensor] = None,
                             modality_rules: Optional[torch.Tensor] = None, rng: Optional[torch.Tensor] = None,
                             backend: str = "auto", deterministic: bool = False, **flash_only):
    """`segment_attention` over samples packed without padding, called as flash-attn's `flash_attn_varlen_func`:
    q, k, v (T, H, D) holding the samples back to back, `cu_seqlens_q` (S + 1,) their cumulative lengths from 0 to
    T (empty samples allowed); self-attention within each sample, so `cu_seqlens_k` (if given) must be the same
    tensor or equal; `max_seqlen_*` are accepted (not needed); `causal` restricts each token to the keys at or
    before it in its sample; `modality_ids` (T,) and `modality_rules` as in `segment_attention` (not with
    `causal`); `deterministic` as flash-attn's and `segment_attention`'s (bit-reproducible gradients). Returns
    (T, H, D), or with `return_attn_probs` (out, softmax_lse (H, T) fp32, None) as flash-attn does. What
    flash-attn has and this does not (different key/value head counts, windows, softcap, ALiBi, paged keys) raises
    ValueError.
    """
    check_tensor("q", q, ndim=3)
    T, H, _ = q.shape
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ndim=3, device=q.device)
        if t.shape[1] != H:
            raise ValueError(f"{name} must have q's {H} heads (grouped-query attention is not supported), got "
                             f"shape {tuple(t.shape)}")
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)} (self-attention), got {tuple(t.shape)}")
    unknown = set(flash_only) - set(_FLASH_ONLY)
    if unknown:
        raise TypeError(f"segment_attention_varlen got unexpected arguments {sorted(unknown)}")
    used = [name for name, value in flash_only.items() if value != _FLASH_ONLY[name]]
    if used:
        raise ValueError(f"segment_attention_varlen does not support {', '.join(used)} (only their defaults "
                         f"{', '.join(f'{n}={_FLASH_ONLY[n]!r}' for n in used)})")
    check_tensor("cu_seqlens_q", cu_seqlens_q, dtypes=INT_DTYPES, ndim=1, device=q.device)
    if cu_seqlens_q.numel() == 0:
        raise ValueError("cu_seqlens_q must hold at least one offset (0), got an empty tensor")
    if cu_seqlens_k is not None and cu_seqlens_k is not cu_seqlens_q:
        check_tensor("cu_seqlens_k", cu_seqlens_k, dtypes=INT_DTYPES, shape=tuple(cu_seqlens_q.shape),
                     device=q.device)
        if value_checks_enabled(cu_seqlens_k) and not torch.equal(cu_seqlens_k, cu_seqlens_q):
            raise ValueError("cu_seqlens_k must equal cu_seqlens_q: self-attention within each sample")
    if value_checks_enabled(cu_seqlens_q):
        ends_ok = int(cu_seqlens_q[0]) == 0 and int(cu_seqlens_q[-1]) == T
        if not ends_ok or bool((cu_seqlens_q[1:] < cu_seqlens_q[:-1]).any()):
            raise ValueError(f"cu_seqlens_q must rise from 0 to the number of tokens ({T}) without decreasing, "
                             f"got {cu_seqlens_q[:8].tolist()}{' ...' if cu_seqlens_q.numel() > 8 else ''}")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if causal:
        if modality_rules is not None or modality_ids is not None:
            raise ValueError("causal=True and modality_rules both give the mask; pass one")
        modality_rules = torch.tensor([[RULE_CAUSAL]], dtype=torch.int32, device=q.device)
    if modality_ids is not None:
        check_tensor("modality_ids", modality_ids, dtypes=INT_DTYPES, shape=(T,), ndim=1, device=q.device)
        modality_ids = modality_ids[None]
    elif causal:
        modality_ids = torch.zeros((1, T), dtype=torch.int32, device=q.device)
    # Token i belongs to sample s where cu_seqlens[s] <= i < cu_seqlens[s + 1]: one search on the device.
    positions = torch.arange(T, device=q.device, dtype=cu_seqlens_q.dtype)
    segment_ids = torch.searchsorted(cu_seqlens_q, positions, right=True)[None] - 1
    out, lse = _attention(q[None], k[None], v[None], segment_ids, modality_ids, modality_rules, dropout_p,
                          softmax_scale, rng, backend, deterministic)
    return (out[0], lse[0], None) if return_attn_probs else out[0]
