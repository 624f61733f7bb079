"""Triton residual add + dropout + LayerNorm: one pass over each row forward, one pass backward.

Forward: s = residual + dropout(x) (rounded to x's dtype, as the reference), fp32 mean and rstd, out = LN(s).
Backward: dx and dresidual in one pass per row; dweight and dbias as fp32 per-program partial sums over a
strided set of row tiles, reduced by a second small kernel (no atomics, deterministic).
Dropout regenerates `reference.layer_norm_dropout_keep` (index column, counters row low/high 32 bits).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from videobert._kernels.triton.launch import cdiv, dropout_args, multiprocessors, next_power_of_2
from videobert._kernels.triton.rng import dropout_keep, load_seed

MAX_HIDDEN = 8192


@triton.jit
def _row_tile(pid, M, N, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows (int64, (ROWS, 1)), element offsets and mask of row tile `pid`."""
    rows = (pid * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    return rows, rows * N + cols, (rows < M) & (cols < N)


@triton.jit
def _row_mean(x, N):
    """Row means of a (ROWS, BLOCK_N) tile over N columns, divided with IEEE rounding: a GPU's default fp32
    division is approximate (2 ulp), which at hidden size 1 turns s - mean into a nonzero times 1/sqrt(eps)."""
    total = tl.sum(x, axis=1)
    return tl.div_rn(total, tl.zeros_like(total) + N)  # N may arrive as a constant (Triton specialises 1)


@triton.jit
def _add_layer_norm_fwd_kernel(X, Res, W, Bias, Out, S, Mean, Rstd, M, N, eps, Rng, threshold,
                               drop_scale, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                               HAS_DROPOUT: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    seed, offset = load_seed(Rng, HAS_DROPOUT)
    rows, offs, mask = _row_tile(tl.program_id(0), M, N, ROWS, BLOCK_N)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = dropout_keep(seed, offset, 0, rows, (rows >> 32).to(tl.uint32), threshold, BLOCK_N)
        x = tl.where(keep, x * drop_scale, 0.0)
    if HAS_RESIDUAL:
        x += tl.load(Res + offs, mask=mask, other=0.0).to(tl.float32)
    s = x.to(S.dtype.element_ty)
    tl.store(S + offs, s, mask=mask)
    s = s.to(tl.float32)
    mean = _row_mean(s, N)
    diff = tl.where(mask, s - mean[:, None], 0.0)
    rstd = tl.rsqrt(_row_mean(diff * diff, N) + eps)
    cols = tl.arange(0, BLOCK_N)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    out = diff * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        out += tl.load(Bias + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Out + offs, out.to(Out.dtype.element_ty), mask=mask)
    row_mask = tl.reshape(rows < M, (ROWS,))
    tl.store(Mean + tl.reshape(rows, (ROWS,)), mean, mask=row_mask)
    tl.store(Rstd + tl.reshape(rows, (ROWS,)), rstd, mask=row_mask)


@triton.jit
def _add_layer_norm_bwd_kernel(DOut, DSExtra, S, Mean, Rstd, W, DX, DRes, DWPartial, DBPartial, M, N, num_tiles,
                               Rng, threshold, drop_scale, HAS_DS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                               HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, ROWS: tl.constexpr,
                               BLOCK_N: tl.constexpr, LOOP_STAGES: tl.constexpr):
    pid = tl.program_id(0)
    seed, offset = load_seed(Rng, HAS_DROPOUT)
    cols = tl.arange(0, BLOCK_N)
    dw = tl.zeros([BLOCK_N], tl.float32)
    db = tl.zeros([BLOCK_N], tl.float32)
    # LOOP_STAGES > 1: Triton's pipeliner copies the next tiles' rows into shared memory (cp.async) while this
    # one is reduced, so loads stay in flight across iterations; 1 keeps them in registers, issued per tile.
    for tile in tl.range(pid, num_tiles, tl.num_programs(0), num_stages=LOOP_STAGES):
        rows, offs, mask = _row_tile(tile, M, N, ROWS, BLOCK_N)
        flat_rows = tl.reshape(rows, (ROWS,))
        mean = tl.load(Mean + flat_rows, mask=flat_rows < M, other=0.0)
        rstd = tl.load(Rstd + flat_rows, mask=flat_rows < M, other=0.0)
        s = tl.load(S + offs, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(DOut + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
        w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)  # reloaded (L1): fewer live registers
        dw += tl.sum(dout * xhat, axis=0)
        if HAS_BIAS:
            db += tl.sum(dout, axis=0)
        g = dout * w[None, :]
        c_xhat = _row_mean(xhat * g, N)
        c_mean = _row_mean(g, N)
        ds = rstd[:, None] * (g - c_mean[:, None] - xhat * c_xhat[:, None])
        if HAS_DS:
            ds += tl.load(DSExtra + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            tl.store(DRes + offs, ds.to(DRes.dtype.element_ty), mask=mask)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, offset, 0, rows, (rows >> 32).to(tl.uint32), threshold, BLOCK_N)
            ds = tl.where(keep, ds * drop_scale, 0.0)
        tl.store(DX + offs, ds.to(DX.dtype.element_ty), mask=mask)
    tl.store(DWPartial + pid * N + cols, dw, mask=cols < N)
    if HAS_BIAS:
        tl.store(DBPartial + pid * N + cols, db, mask=cols < N)


@triton.jit
def _column_sum_kernel(Partial, Out0, Out1, G, N, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    """Out_i[c] = sum over g of Partial[i, g, c] in fp32, cast to Out_i's dtype, for i = program_id(1): dweight
    and dbias in one launch."""
    which = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    base = Partial + which.to(tl.int64) * G * N
    acc = tl.zeros([BLOCK_C], tl.float32)
    for start in range(0, G, BLOCK_G):
        g = start + tl.arange(0, BLOCK_G)
        mask = (g[:, None] < G) & (cols[None, :] < N)
        acc += tl.sum(tl.load(base + g[:, None] * N + cols[None, :], mask=mask, other=0.0), axis=0)
    if which == 0:
        tl.store(Out0 + cols, acc.to(Out0.dtype.element_ty), mask=cols < N)
    else:
        tl.store(Out1 + cols, acc.to(Out1.dtype.element_ty), mask=cols < N)


# ---------------------------------------------------------------------------------------------- launchers

def launch_config(N: int, backward: bool = False) -> tuple[int, int, int]:
    """(BLOCK_N, ROWS per program, warps) for hidden size N, whole rows per program. Forward: about 4k elements
    per program. Backward (bench/tune.py's layer_norm_tuning on an H100, then an H200): 4k elements per program
    over 4 warps up to N = 2048 (many loads in flight per thread beat more warps: 16 warps ran at 10-20% of copy
    bandwidth there, 4 warps at 61-81%; 8k elements were a little faster but spill), one row over 16 warps above
    (80-87% at 4096 on the H100; the H200 gave 49% there, and 75% over 8 warps, which spill on sm_80 with
    residual, bias and dropout)."""
    block_n = max(16, next_power_of_2(N))
    if backward:
        return (block_n, max(1, 4096 // block_n), 4) if block_n <= 2048 else (block_n, 1, 16)
    rows = max(1, min(16, 4096 // block_n))
    return block_n, rows, min(32, max(4, block_n * rows // 512))


PROGRAMS_PER_SM = 2  # backward programs (and dweight/dbias partial rows) per multiprocessor: 2 beat 4 and 8


def backward_loop_stages(N: int) -> int:
    """Software-pipelining depth of the backward's loop over row tiles for hidden size N. Three stages (the next
    tile's loads in flight while one is reduced) beat one at every hidden size of bench/tune.py's sweep on an
    H200 (2026-12-04, device time, % of copy bandwidth, 1 -> 3 stages): 768 48 -> 68, 1024 58 -> 75, 2048
    66 -> 80; they spill on sm_90 for the one-row tiles above 2048 (Triton 3.9, with dropout), which keep one."""
    return 3 if next_power_of_2(N) <= 2048 else 1


def add_layer_norm_fwd(x, residual, weight, bias, eps, dropout_p, rng, config=None):
    """Forward launcher: (out, s) shaped like x, (mean, rstd) fp32 per row. `config` (BLOCK_N, ROWS, warps)
    overrides `launch_config` (for tuning)."""
    N = x.shape[-1]
    M = x.numel() // N
    out, s = torch.empty_like(x), torch.empty_like(x)
    mean, rstd = (torch.empty((M,), device=x.device, dtype=torch.float32) for _ in range(2))
    if M == 0:
        return out, s, mean, rstd
    block_n, rows, warps = config or launch_config(N)
    _add_layer_norm_fwd_kernel[(cdiv(M, rows),)](
        x, x if residual is None else residual, weight, weight if bias is None else bias, out, s, mean, rstd, M, N,
        eps, **dropout_args(dropout_p, rng, mean), HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
        HAS_DROPOUT=dropout_p > 0, ROWS=rows, BLOCK_N=block_n, num_warps=warps)
    return out, s, mean, rstd


def add_layer_norm_bwd(dout, ds, s, mean, rstd, weight, has_residual, has_bias, dropout_p, rng, config=None,
                       programs_per_sm=PROGRAMS_PER_SM, loop_stages=None):
    """Backward launcher: (dx, dresidual or None, dweight, dbias or None). `config` (BLOCK_N, ROWS, warps),
    `programs_per_sm` and `loop_stages` override the defaults (`backward_loop_stages`; for tuning)."""
    N = s.shape[-1]
    M = s.numel() // N
    dx = torch.empty_like(s)
    dres = torch.empty_like(s) if has_residual else None
    block_n, rows, warps = config or launch_config(N, backward=True)
    num_tiles = cdiv(M, rows)
    programs = min(num_tiles, programs_per_sm * multiprocessors(s.device))
    programs = max(programs, 1)
    alloc = torch.empty if M > 0 else torch.zeros  # every program writes its partial row
    partial = alloc((2 if has_bias else 1, programs, N), device=s.device, dtype=torch.float32)
    dw_partial, db_partial = partial[0], partial[-1]
    if M > 0:
        _add_layer_norm_bwd_kernel[(programs,)](
            dout, dout if ds is None else ds, s, mean, rstd, weight, dx, dx if dres is None else dres, dw_partial,
            db_partial, M, N, num_tiles, **dropout_args(dropout_p, rng, mean), HAS_DS=ds is not None,
            HAS_RESIDUAL=has_residual, HAS_BIAS=has_bias, HAS_DROPOUT=dropout_p > 0, ROWS=rows, BLOCK_N=block_n,
            LOOP_STAGES=loop_stages or backward_loop_stages(N), num_warps=warps)
    dw = torch.empty_like(weight)
    db = torch.empty_like(weight) if has_bias else None
    _column_sum_kernel[(cdiv(N, 32), partial.shape[0])](partial, dw, dw if db is None else db, programs, N,
                                                        BLOCK_G=64, BLOCK_C=32)
    return dx, dres, dw, db


def unsupported(device: torch.device, dtype: torch.dtype, hidden_size: int = 0, **_) -> Optional[str]:
    """Why this backend cannot take these inputs, or None."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} is not supported (float16, bfloat16, float32)"
    if hidden_size > MAX_HIDDEN:
        return f"hidden size {hidden_size} is larger than {MAX_HIDDEN}"
    return None
