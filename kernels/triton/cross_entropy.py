"""Triton cross-entropy: fused linear + cross-entropy that never holds the (N, V) logits, and softmax
cross-entropy on given logits.

Linear forward: each program takes BLOCK_M rows and walks the vocabulary in BLOCK_V tiles, computing
`hidden @ weight_tile.T (+ bias)` with fp32 accumulation over BLOCK_K slices of the hidden dimension and keeping
an online max / sum-exp, the target logit and (for label smoothing) the logit sum; only per-row statistics are
written. Row blocks whose rows are all ignored skip every tile. Where the row blocks are too few to fill the GPU,
each one's vocabulary is split between several programs and a second kernel combines their statistics.
Linear backward: dweight and dhidden each reduce over a whole dimension (all rows, all vocabulary entries) that
register tiles cannot hold at hidden sizes near 1k; accumulating tile products with atomics instead took about
200 ms at N=16k, D=1024, V=51k on an H100 (6x eager). So the backward runs chunked GEMMs (cuBLAS on a GPU) around
the Triton gradient kernel: per vocabulary chunk, recompute its logits for all rows, turn them into
`dloss * (softmax - (1 - ls) * onehot - ls / V) + dlse * softmax` in place and take dweight (and dbias) of the
chunk in one GEMM. dhidden sums over every chunk: "one_sweep" adds each chunk's share in the same sweep into an
fp32 (N, D) accumulator (fp16/bf16 GEMMs accumulating in fp32, rounded once at the end: 6 N D V flops in all);
"two_sweeps" recomputes the logits per row chunk over the whole vocabulary instead and takes dhidden of the rows
in one GEMM (8 N D V flops, no accumulator), for when the accumulator would not fit the scratch budget
(SCRATCH_SHARE). A chunk holds a slice of the (N, V) logits in the inputs' dtype; nothing of size (N, V) exists.
Softmax forward/backward: the same online statistics over given logits, and the gradient written once per
element (optionally into the logits buffer).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from videobert._kernels.triton.launch import LOG2E, cdiv, dot_precision, multiprocessors

_LOG2E = tl.constexpr(LOG2E)

# Launch configs on a GPU, from bench/tune.py on an H100 (bf16, N=16k, D=1024, V=51258) and spill-free on sm_80
# and sm_90 (tests/test_compile_triton.py); smaller ones keep the interpreter quick.
# Linear forward (BLOCK_M, BLOCK_V, BLOCK_K, warps, stages): 4.4 ms = 392 TFLOP/s, against 10.6 ms for
# (64, 128, 32, 8, 3) and 13.2 ms for eager F.linear + F.cross_entropy.
LINEAR_CONFIG = {"gpu": (128, 128, 64, 8, 3), "interpret": (16, 64, 32, 4, 1)}
# That GPU config takes a multiprocessor's whole register file (255 registers x 256 threads), so one program runs
# per multiprocessor: N = 4096 gives 32 row blocks for 132 of them, a VideoBERT step's 1-2k masked tokens per head
# 8 to 16, and N = 19k (150 blocks) a second wave of 18. There the forward splits each row block's vocabulary
# between programs (`vocab_splits`), which leave partial statistics for a small combine kernel (COMBINE_ROWS rows
# and COMBINE_SPLITS splits at a time per program), as flash-decoding splits keys.
# The interpreter counts INTERPRET_SLOTS multiprocessors, so the tests' shapes split too.
COMBINE_ROWS, COMBINE_SPLITS = 128, 16
INTERPRET_SLOTS = 4
# Softmax (BLOCK_M, BLOCK_V, warps) per direction: one row per program; the forward at 56% and the backward at
# 78% of copy bandwidth, against 36% and 47% for (4, 1024, 8).
SOFTMAX_CONFIG = {"fwd": {"gpu": (1, 2048, 4), "interpret": (4, 64, 4)},
                  "bwd": {"gpu": (1, 8192, 16), "interpret": (4, 64, 4)}}
# The chunked sweeps: 1/CHUNKS of the vocabulary (or of the rows) each, but at least MIN_CHUNK vocabulary entries
# and rows (GEMMs that fill the GPU; several chunks even at test sizes in the interpreter).
CHUNKS = 16
MIN_CHUNK = {"gpu": (1024, 256), "interpret": (16, 4)}
# The linear backward's scratch memory (chunk buffer and accumulator) as a share of the (N, V) fp32 logits eager
# PyTorch would hold (the MLM-loss issue's budget is 5%): "one_sweep" is the default where its chunks of at least
# MIN_CHUNK entries and its accumulator fit this, "two_sweeps" (1/CHUNKS of bf16 logits: 1/32) elsewhere.
SCRATCH_SHARE = 1 / 25
# Below this many rows the one-sweep budget is that of this many (on a GPU): a VideoBERT step scores ~1k masked
# tokens per head, where 4% of the logits is about 5 MB, chunks of ~400 entries that no default would take;
# two sweeps then ran 20 chunks whose GEMMs take microseconds each against tens of microseconds of launches per
# chunk, the GPU waiting on the host. With the floor (20 MB at V = 30522) one sweep takes 4 chunks of 8k entries
# and 6 N D V flops instead of 8. Every bench/mlm_loss.py shape (N >= 4096) keeps its exact share.
BUDGET_MIN_ROWS = {"gpu": 4096, "interpret": 0}
# Row stride (elements) of the logits chunk buffers: without 16-byte rows cuBLAS falls back to slow kernels for
# V = 30522 or 51258 (the eager F.linear logits of those sizes ran at 17% of the matmul peak on an H100).
ROW_ALIGN = 16
# The softmax kernels start each row's tiles at its offset rounded down to this many elements (16 bytes or more
# in every dtype), so their loads and stores vectorise at any row stride (a launch specialises a stride only
# when it divides by 16: user logits 51258 wide got element loads); at most every BLOCK_V.
TILE_ALIGN = 16
LINEAR_FORWARD = "fused"
LINEAR_BACKWARD_METHODS = ("one_sweep", "two_sweeps")


@triton.jit
def _logit_tile(H, W, Bias, rows, cols, N, V, D, stride_h, stride_w, HAS_BIAS: tl.constexpr,
                DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_K: tl.constexpr, MASKED: tl.constexpr):
    """fp32 logits of rows x cols; a MASKED tile may reach past V (-inf there), others lie inside."""
    acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        h = tl.load(H + rows[:, None] * stride_h + ks[None, :], mask=(rows[:, None] < N) & (ks[None, :] < D),
                    other=0.0)
        w_mask = (cols[:, None] < V) & (ks[None, :] < D) if MASKED else ks[None, :] < D
        w = tl.load(W + cols[:, None] * stride_w + ks[None, :], mask=w_mask, other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if MASKED:
        if HAS_BIAS:
            acc += tl.load(Bias + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
        return tl.where(cols[None, :] < V, acc, float("-inf"))
    if HAS_BIAS:
        acc += tl.load(Bias + cols).to(tl.float32)[None, :]
    return acc


@triton.jit
def _exp(x):
    """e^x as exp2 (`tl.exp` adds a subnormal-range fix-up of three instructions per element; results below
    2^-126 flush to zero, which no softmax sum or gradient here can tell)."""
    return tl.exp2(x * _LOG2E)


@triton.jit
def _has_target(labels, tile_lo, BLOCK_V: tl.constexpr):
    """Whether any row's target column lies in the tile whose first column is `tile_lo` (per row or one)."""
    rel = labels - tile_lo
    return tl.max(((rel >= 0) & (rel < BLOCK_V)).to(tl.int32), axis=0) > 0


@triton.jit
def _online_update(z, cols, tile_lo, labels, in_row, m, s, target, total, HAS_SMOOTHING: tl.constexpr,
                   MASKED: tl.constexpr, BLOCK_V: tl.constexpr):
    """Fold a logit tile into the running max m, sum of exp(z - m), target logit and (label smoothing) logit
    sum. `cols` (one row for all rows) numbers the tile's columns from `tile_lo` on, as `labels` number the
    targets; a MASKED tile holds -inf where `in_row` is False, others lie inside the rows. Per element: the max,
    one exp and the sum, plus a compare and select only in tiles holding some row's target, and the logit sum
    only with smoothing."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * _exp(m - m_safe) + tl.sum(_exp(z - m_safe[:, None]), axis=1)
    if _has_target(labels, tile_lo, BLOCK_V):
        target += tl.sum(tl.where(cols == labels[:, None], z, 0.0), axis=1)
    if HAS_SMOOTHING:
        total += tl.sum(tl.where(in_row, z, 0.0) if MASKED else z, axis=1)
    return m_new, s, target, total


@triton.jit
def _finish_rows(Loss, Lse, Correct, rows, valid, N, V, m, s, target, total, label_smoothing):
    """Store per-row loss, lse (0 on ignored rows) and whether the target logit is a maximum."""
    lse = m + tl.log(s)
    loss = lse - target
    loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - total / V)
    tl.store(Loss + rows, tl.where(valid, loss, 0.0), mask=rows < N)
    tl.store(Lse + rows, tl.where(valid, lse, 0.0), mask=rows < N)
    tl.store(Correct + rows, (valid & (target >= m)).to(tl.int8), mask=rows < N)


@triton.jit
def _grad_tile(z, cols, tile_lo, labels, lse, dloss, dlse, V, label_smoothing, BLOCK_V: tl.constexpr):
    """d(loss * dloss + lse * dlse)/dz of a tile in fp32 (`cols` numbers its columns from `tile_lo` on, as
    `labels` number the targets); `lse`, `dloss` and `dlse` come from `_grad_rows` (ignored rows give zeros
    without a select per element)."""
    g = _exp(z - lse[:, None]) * (dloss + dlse)[:, None] - (label_smoothing / V) * dloss[:, None]
    if _has_target(labels, tile_lo, BLOCK_V):
        g -= tl.where(cols == labels[:, None], (1.0 - label_smoothing) * dloss[:, None], 0.0)
    return g


@triton.jit
def _grad_rows(Lse, DLoss, DLse, rows, valid, N, HAS_DLSE: tl.constexpr):
    """Per-row (lse, dloss, dlse) for `_grad_tile`: on ignored rows lse = +inf and zero upstream gradients, so
    their softmax and every term vanish."""
    lse = tl.load(Lse + rows, mask=rows < N, other=0.0)
    dloss = tl.load(DLoss + rows, mask=rows < N, other=0.0)
    dlse = tl.load(DLse + rows, mask=rows < N, other=0.0) if HAS_DLSE else dloss * 0.0
    return tl.where(valid, lse, float("inf")), tl.where(valid, dloss, 0.0), tl.where(valid, dlse, 0.0)


@triton.jit
def _row_block(Labels, pid, N, ignore_index, BLOCK_M: tl.constexpr):
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    labels = tl.load(Labels + rows, mask=rows < N, other=ignore_index)
    valid = (labels != ignore_index) & (rows < N)
    return rows, labels, valid


@triton.jit
def _linear_ce_fwd_kernel(H, W, Bias, Labels, Loss, Lse, Correct, Partial, N, V, D, stride_h, stride_w, split_v,
                          ignore_index, label_smoothing, HAS_BIAS: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                          SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (row block, split) walks vocabulary entries [split * split_v, + split_v) (split_v a multiple of
    BLOCK_V); SPLIT programs leave their rows' partial statistics in Partial (4, splits, N) for
    `_linear_ce_combine_kernel`, otherwise the one split covers V and finishes its rows."""
    rows, labels, valid = _row_block(Labels, tl.program_id(0), N, ignore_index, BLOCK_M)
    v_lo = tl.program_id(1) * split_v
    v_hi = tl.minimum(V, v_lo + split_v)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    target = tl.zeros([BLOCK_M], tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    if tl.max(valid.to(tl.int32), axis=0) > 0:  # blocks of ignored rows cost nothing
        # Whole tiles without column masks, then the partial last one (only where v_hi is V).
        for v0 in range(v_lo, v_hi - BLOCK_V + 1, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            z = _logit_tile(H, W, Bias, rows, cols, N, V, D, stride_h, stride_w, HAS_BIAS, DOT_PRECISION,
                            BLOCK_M, BLOCK_V, BLOCK_K, False)
            m, s, target, total = _online_update(z, cols[None, :], v0, labels, True, m, s, target, total,
                                                 HAS_SMOOTHING, False, BLOCK_V)
        for v0 in range((v_hi // BLOCK_V) * BLOCK_V, v_hi, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            z = _logit_tile(H, W, Bias, rows, cols, N, V, D, stride_h, stride_w, HAS_BIAS, DOT_PRECISION,
                            BLOCK_M, BLOCK_V, BLOCK_K, True)
            m, s, target, total = _online_update(z, cols[None, :], v0, labels, cols[None, :] < V, m, s, target,
                                                 total, HAS_SMOOTHING, True, BLOCK_V)
    if SPLIT:
        at = Partial + tl.program_id(1) * N + rows
        plane = (tl.num_programs(1) * N).to(tl.int64)
        tl.store(at, m, mask=rows < N)
        tl.store(at + plane, s, mask=rows < N)
        tl.store(at + 2 * plane, target, mask=rows < N)
        tl.store(at + 3 * plane, total, mask=rows < N)
    else:
        _finish_rows(Loss, Lse, Correct, rows, valid, N, V, m, s, target, total, label_smoothing)


@triton.jit
def _linear_ce_combine_kernel(Partial, Labels, Loss, Lse, Correct, N, V, splits, ignore_index, label_smoothing,
                              BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr):
    """Finish rows from the splits' partial statistics (Partial (4, splits, N): max, sum of exp(z - max),
    target logit, logit sum), BLOCK_S splits per step (one load per plane for all of them, so a hundred splits
    cost a few dependent loads, not a hundred)."""
    rows, labels, valid = _row_block(Labels, tl.program_id(0), N, ignore_index, BLOCK_M)
    plane = (splits * N).to(tl.int64)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    target = tl.zeros([BLOCK_M], tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        ks = s0 + tl.arange(0, BLOCK_S)
        at = Partial + ks[:, None] * N + rows[None, :]
        inside = (ks[:, None] < splits) & (rows[None, :] < N)
        m_k = tl.load(at, mask=inside, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(m_k, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_k = tl.load(at + plane, mask=inside, other=0.0)
        s = s * _exp(m - m_safe) + tl.sum(s_k * _exp(m_k - m_safe[None, :]), axis=0)
        m = m_new
        target += tl.sum(tl.load(at + 2 * plane, mask=inside, other=0.0), axis=0)
        total += tl.sum(tl.load(at + 3 * plane, mask=inside, other=0.0), axis=0)
    _finish_rows(Loss, Lse, Correct, rows, valid, N, V, m, s, target, total, label_smoothing)


@triton.jit
def _row_tiles(rows, stride, n, ALIGN: tl.constexpr, BLOCK_V: tl.constexpr):
    """Each row's start offset rounded down to ALIGN elements (`base`) and the start's distance past it
    (`shift`): tiles at base + t * BLOCK_V are 16-byte aligned whatever the row stride (a user's 51258-wide
    logits), so their loads vectorise. Tile 0 and tiles from `tail` to `count` hold row ends (masked); tiles
    1 .. tail - 1 lie inside every row of the block (no column mask, which would also stop vectorisation)."""
    start = rows * stride
    shift = start % ALIGN
    base = tl.multiple_of(start - shift, ALIGN)
    tail = tl.maximum((n + tl.min(shift, axis=0).to(tl.int32)) // BLOCK_V, 1)
    count = tl.cdiv(n + tl.max(shift, axis=0).to(tl.int32), BLOCK_V)
    return base, shift, tail, count


@triton.jit
def _tile_offsets(base, shift, rows, t, n, N, MASKED: tl.constexpr, BLOCK_V: tl.constexpr):
    """Tile t's offsets, its positions from the aligned row bases (a row's element j sits at j + shift; one row
    for all rows, so per-element work needs no per-row term), and the load/store mask: the block's rows and, in
    MASKED tiles, positions inside the rows' n elements."""
    idx = (t * BLOCK_V + tl.arange(0, BLOCK_V))[None, :]
    mask = (rows < N)[:, None]
    if MASKED:
        mask = mask & (idx >= shift[:, None]) & (idx < (shift + n)[:, None])
    return base[:, None] + idx, idx, mask


@triton.jit
def _softmax_fwd_tile(Z, base, shift, rows, labels, t, N, V, m, s, target, total, HAS_SMOOTHING: tl.constexpr,
                      MASKED: tl.constexpr, BLOCK_V: tl.constexpr):
    offsets, idx, mask = _tile_offsets(base, shift, rows, t, V, N, MASKED, BLOCK_V)
    z = tl.load(Z + offsets, mask=mask, other=float("-inf")).to(tl.float32)
    return _online_update(z, idx, t * BLOCK_V, labels + shift, mask, m, s, target, total, HAS_SMOOTHING, MASKED,
                          BLOCK_V)


@triton.jit
def _softmax_ce_fwd_kernel(Z, Labels, Loss, Lse, Correct, N, V, stride_z, ignore_index, label_smoothing,
                           HAS_SMOOTHING: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_V: tl.constexpr):
    rows, labels, valid = _row_block(Labels, tl.program_id(0), N, ignore_index, BLOCK_M)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    target = tl.zeros([BLOCK_M], tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    if tl.max(valid.to(tl.int32), axis=0) > 0:
        base, shift, tail, count = _row_tiles(rows, stride_z, V, ALIGN, BLOCK_V)
        m, s, target, total = _softmax_fwd_tile(Z, base, shift, rows, labels, 0, N, V, m, s, target, total,
                                                HAS_SMOOTHING, True, BLOCK_V)
        for t in range(1, tail):
            m, s, target, total = _softmax_fwd_tile(Z, base, shift, rows, labels, t, N, V, m, s, target, total,
                                                    HAS_SMOOTHING, False, BLOCK_V)
        for t in range(tail, count):
            m, s, target, total = _softmax_fwd_tile(Z, base, shift, rows, labels, t, N, V, m, s, target, total,
                                                    HAS_SMOOTHING, True, BLOCK_V)
    _finish_rows(Loss, Lse, Correct, rows, valid, N, V, m, s, target, total, label_smoothing)


@triton.jit
def _softmax_bwd_tile(Z, DZ, base, shift, rows, labels, lse, dloss, dlse, t, N, width, V, stride_dz,
                      label_smoothing, SAME_STRIDE: tl.constexpr, MASKED: tl.constexpr, BLOCK_V: tl.constexpr):
    """`labels`: the targets' positions from the aligned row bases (see `_softmax_ce_bwd_kernel`)."""
    offsets, idx, mask = _tile_offsets(base, shift, rows, t, width, N, MASKED, BLOCK_V)
    z = tl.load(Z + offsets, mask=mask, other=float("-inf")).to(tl.float32)
    g = _grad_tile(z, idx, t * BLOCK_V, labels, lse, dloss, dlse, V, label_smoothing, BLOCK_V)
    # With the logits' row stride the gradient's tiles are aligned as theirs are (in place, or a dense copy).
    dz = DZ + offsets if SAME_STRIDE else DZ + rows[:, None] * stride_dz + (idx - shift[:, None])
    tl.store(dz, g.to(DZ.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_ce_bwd_kernel(Z, Labels, Lse, DLoss, DLse, DZ, N, width, col0, V, stride_z, stride_dz, ignore_index,
                           label_smoothing, HAS_DLSE: tl.constexpr, SAME_STRIDE: tl.constexpr, ALIGN: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    """Gradient of `width` columns of logits, vocabulary entries col0 .. col0 + width - 1 of V."""
    rows, labels, valid = _row_block(Labels, tl.program_id(0), N, ignore_index, BLOCK_M)
    lse, dloss, dlse = _grad_rows(Lse, DLoss, DLse, rows, valid, N, HAS_DLSE)
    base, shift, tail, count = _row_tiles(rows, stride_z, width, ALIGN, BLOCK_V)
    at = labels - col0 + shift  # targets as positions from the aligned row bases
    _softmax_bwd_tile(Z, DZ, base, shift, rows, at, lse, dloss, dlse, 0, N, width, V, stride_dz, label_smoothing,
                      SAME_STRIDE, True, BLOCK_V)
    for t in range(1, tail):
        _softmax_bwd_tile(Z, DZ, base, shift, rows, at, lse, dloss, dlse, t, N, width, V, stride_dz,
                          label_smoothing, SAME_STRIDE, False, BLOCK_V)
    for t in range(tail, count):
        _softmax_bwd_tile(Z, DZ, base, shift, rows, at, lse, dloss, dlse, t, N, width, V, stride_dz,
                          label_smoothing, SAME_STRIDE, True, BLOCK_V)


# ---------------------------------------------------------------------------------------------- launchers

def _config(table: dict, device: torch.device) -> tuple:
    return table["gpu" if device.type == "cuda" else "interpret"]


def _row_stats(n: int, device: torch.device):
    loss, lse = (torch.empty((n,), device=device, dtype=torch.float32) for _ in range(2))
    return loss, lse, torch.empty((n,), device=device, dtype=torch.int8)


def linear_cross_entropy_fwd(hidden, weight, labels, bias, ignore_index, label_smoothing, method=None,
                             splits=None):
    """Forward launcher: per-row (loss fp32, lse fp32, correct bool); the logits never exist. `method` (default
    LINEAR_FORWARD): "fused", the one kernel over vocabulary tiles, or "chunked", a GEMM per row chunk and the
    softmax forward kernel on it (bench/tune.py times both). `splits` overrides the fused kernel's vocabulary
    splits per row block (`vocab_splits`; for tuning and tests)."""
    N, D = hidden.shape
    V = weight.shape[0]
    hidden, weight = hidden.contiguous(), weight.contiguous()
    loss, lse, correct = _row_stats(N, hidden.device)
    if splits is not None and splits < 1:
        raise ValueError(f"splits must be a positive number of vocabulary splits, got {splits!r}")
    if (method or LINEAR_FORWARD) == "chunked":
        rows = _chunk_rows(N, hidden.device)
        buffer = torch.empty((rows, _round_up(V, ROW_ALIGN)), device=hidden.device, dtype=hidden.dtype)
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            _softmax_fwd_launch(_chunk_logits(hidden[r0:r1], weight, bias, buffer[:r1 - r0, :V]), labels[r0:r1],
                                loss[r0:r1], lse[r0:r1], correct[r0:r1], ignore_index, label_smoothing)
    elif N:
        bm, bv, bk, warps, stages = _config(LINEAR_CONFIG, hidden.device)
        split_v, splits = forward_splits(N, V, hidden.device, splits)
        partial = torch.empty((4, splits, N), device=hidden.device, dtype=torch.float32) if splits > 1 else loss
        _linear_ce_fwd_kernel[(cdiv(N, bm), splits)](
            hidden, weight, weight if bias is None else bias, labels, loss, lse, correct, partial, N, V, D,
            hidden.stride(0), weight.stride(0), split_v, ignore_index, label_smoothing, HAS_BIAS=bias is not None,
            HAS_SMOOTHING=label_smoothing > 0, SPLIT=splits > 1, DOT_PRECISION=dot_precision(hidden.dtype),
            BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk, num_warps=warps, num_stages=stages)
        if splits > 1:
            _linear_ce_combine_kernel[(cdiv(N, COMBINE_ROWS),)](partial, labels, loss, lse, correct, N, V, splits,
                                                                ignore_index, label_smoothing, BLOCK_M=COMBINE_ROWS,
                                                                BLOCK_S=COMBINE_SPLITS)
    return loss, lse, correct.bool()


def forward_splits(N: int, V: int, device: torch.device, splits: Optional[int] = None) -> tuple[int, int]:
    """(vocabulary entries per split, splits) of the fused forward over N rows with LINEAR_CONFIG on `device`:
    `splits` if given (at most one tile each), else `vocab_splits`' choice; never an empty split."""
    bm, bv = _config(LINEAR_CONFIG, device)[:2]
    row_blocks, tiles = cdiv(N, bm), cdiv(V, bv)
    slots = multiprocessors(device) if device.type == "cuda" else INTERPRET_SLOTS
    split_v = cdiv(tiles, min(tiles, splits or vocab_splits(row_blocks, tiles, slots))) * bv
    return split_v, cdiv(V, split_v)


@functools.lru_cache(maxsize=4096)
def vocab_splits(row_blocks: int, tiles: int, slots: int) -> int:
    """Programs per row block of the fused forward, each over an equal share of the `tiles` vocabulary tiles: the
    count minimising waves (ceil(row_blocks * splits / slots)) times the longest share plus one tile (a program's
    fixed cost and the combine), the fewest on ties. So 1 where the row blocks fill whole waves (N = 16k and 64k
    on an H100), a few where the last wave would run nearly empty, more where the row blocks are few."""
    return min(range(1, min(tiles, slots) + 1),
               key=lambda n: (cdiv(row_blocks * n, slots) * (cdiv(tiles, n) + 1), n))


def _chunk_logits(hidden, weight, bias, out):
    """out = hidden @ weight.T (+ bias) in the inputs' dtype, fp32 accumulation (one GEMM); `out` may be a view
    with a padded row stride, which cuBLAS writes in place."""
    return torch.mm(hidden, weight.T, out=out) if bias is None else torch.addmm(bias, hidden, weight.T, out=out)


def _round_up(n: int, multiple: int) -> int:
    return cdiv(n, multiple) * multiple


def _chunk_rows(N: int, device: torch.device) -> int:
    """Rows per chunk of the whole-vocabulary sweeps (chunked forward, dhidden): 1/CHUNKS of them, at least the
    minimum."""
    return min(N, max(_config(MIN_CHUNK, device)[1], cdiv(N, CHUNKS)))


# fp16/bf16 GEMMs accumulating into an fp32 `self` (torch.addmm(..., out_dtype=torch.float32)) run on CUDA from
# PyTorch 2.10 on (2.8 and 2.9 took out_dtype only with `self` in the operands' dtype).
_MIXED_ADDMM = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 10)


def _accumulate_mm(acc, a, b, first: bool) -> None:
    """acc = (0 if first else acc) + a @ b for an fp32 `acc`; fp16/bf16 operands are multiplied and accumulated in
    fp32 by the GEMM itself, so no product is rounded to their dtype."""
    beta = 0 if first else 1
    if a.dtype == acc.dtype:
        torch.addmm(acc, a, b, beta=beta, out=acc)
    elif a.is_cuda and _MIXED_ADDMM:
        torch.addmm(acc, a, b, out_dtype=torch.float32, beta=beta, out=acc)
    else:  # the CPU (the interpreter's tests) and older PyTorch have no mixed-precision GEMM
        torch.addmm(acc, a.float(), b.float(), beta=beta, out=acc)


def _one_sweep_cols(N: int, D: int, V: int, dtype: torch.dtype, device: torch.device) -> Optional[int]:
    """Vocabulary entries per chunk of the one-sweep backward within SCRATCH_SHARE of the fp32 logits of
    max(N, BUDGET_MIN_ROWS) rows (a multiple of ROW_ALIGN, at most V), or None where not even MIN_CHUNK entries fit
    beside the accumulator or the GPU's PyTorch cannot accumulate fp16/bf16 products in fp32."""
    half = dtype != torch.float32
    if half and device.type == "cuda" and not _MIXED_ADDMM:
        return None
    N = max(N, 1)
    budget = SCRATCH_SHARE * 4 * V * max(N, _config(BUDGET_MIN_ROWS, device)) - (4 * N * D if half else 0)  # bytes
    cols = int(budget // (N * dtype.itemsize)) // ROW_ALIGN * ROW_ALIGN
    return min(V, cols) if cols >= min(V, _config(MIN_CHUNK, device)[0]) else None


def _default_backward(N: int, D: int, V: int, dtype: torch.dtype, device: torch.device) -> tuple[str, Optional[int]]:
    """(the default method, the one-sweep chunk width or None): "one_sweep" where `_one_sweep_cols` finds a width
    within the budget, else "two_sweeps"."""
    cols = _one_sweep_cols(N, D, V, dtype, device)
    return ("two_sweeps" if cols is None else "one_sweep"), cols


def default_backward_method(N: int, D: int, V: int, dtype: torch.dtype, device: torch.device) -> str:
    """The method `linear_cross_entropy_bwd` takes unless told: "one_sweep" where `_one_sweep_cols` finds a chunk
    width within SCRATCH_SHARE, else "two_sweeps"."""
    return _default_backward(N, D, V, dtype, device)[0]


def linear_cross_entropy_bwd(dloss, dlse, hidden, weight, labels, bias, lse, ignore_index, label_smoothing,
                             method: Optional[str] = None, chunk: Optional[int] = None):
    """Backward launcher: (dhidden, dweight, dbias or None) in the inputs' dtypes, by chunked GEMMs around the
    gradient kernel (module docstring). `method`: "one_sweep" or "two_sweeps"; by default one sweep where it fits
    SCRATCH_SHARE. `chunk` overrides the vocabulary entries per chunk (for tuning). One buffer holds the current
    chunk of logits, its rows padded to ROW_ALIGN elements."""
    N, D = hidden.shape
    V = weight.shape[0]
    hidden, weight = hidden.contiguous(), weight.contiguous()
    dloss = dloss.float().contiguous()
    dlse = None if dlse is None else dlse.float().contiguous()
    dh, dw = torch.empty_like(hidden), torch.empty_like(weight)
    db = None if bias is None else torch.empty_like(bias)
    if N == 0:
        dw.zero_()
        return dh, dw, None if db is None else db.zero_()
    if method not in (None,) + LINEAR_BACKWARD_METHODS:
        raise ValueError(f"method must be one of {LINEAR_BACKWARD_METHODS} or None, got {method!r}")
    default, fitted = _default_backward(N, D, V, hidden.dtype, hidden.device)
    method = method or default
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be a positive number of vocabulary entries, got {chunk!r}")
    min_cols = _config(MIN_CHUNK, hidden.device)[0]
    one_sweep = method == "one_sweep"
    if one_sweep:
        # bench/tune.py may ask for one sweep where it does not fit: then chunks of the minimum width
        cols = fitted or min(V, _round_up(min_cols, ROW_ALIGN))
        acc = dh if hidden.dtype == torch.float32 else torch.empty((N, D), device=dh.device, dtype=torch.float32)
    else:
        cols = min(V, _round_up(max(min_cols, cdiv(V, CHUNKS)), 64))
    cols = cols if chunk is None else min(V, chunk)
    rows = _chunk_rows(N, hidden.device)
    col_stride, row_stride = _round_up(cols, ROW_ALIGN), _round_up(V, ROW_ALIGN)
    buffer = torch.empty(max(N * col_stride, 0 if one_sweep else rows * row_stride), device=hidden.device,
                         dtype=hidden.dtype)
    by_cols = buffer[:N * col_stride].view(N, col_stride)
    for c0 in range(0, V, cols):  # dweight (and dbias) of each vocabulary chunk: all rows in one GEMM
        c1 = min(V, c0 + cols)
        g = _chunk_logits(hidden, weight[c0:c1], None if bias is None else bias[c0:c1], by_cols[:, :c1 - c0])
        softmax_cross_entropy_bwd(dloss, dlse, g, labels, lse, ignore_index, label_smoothing, out=g, col0=c0,
                                  vocab=V)
        torch.mm(g.T, hidden, out=dw[c0:c1])
        if db is not None:
            db[c0:c1] = g.sum(0, dtype=torch.float32)
        if one_sweep:  # and this chunk's share of dhidden
            _accumulate_mm(acc, g, weight[c0:c1], first=c0 == 0)
    if one_sweep:
        if acc is not dh:
            dh.copy_(acc)
        return dh, dw, db
    by_rows = buffer[:rows * row_stride].view(rows, row_stride)
    for r0 in range(0, N, rows):  # dhidden of each row chunk: the whole vocabulary in one GEMM
        r1 = min(N, r0 + rows)
        g = _chunk_logits(hidden[r0:r1], weight, bias, by_rows[:r1 - r0, :V])
        softmax_cross_entropy_bwd(dloss[r0:r1], None if dlse is None else dlse[r0:r1], g, labels[r0:r1],
                                  lse[r0:r1], ignore_index, label_smoothing, out=g)
        torch.mm(g, weight, out=dh[r0:r1])
    return dh, dw, db


def _softmax_fwd_launch(logits, labels, loss, lse, correct, ignore_index, label_smoothing):
    """Fill the per-row loss, lse and correct (int8) of logits (N, V), unit column stride."""
    N, V = logits.shape
    if N:
        bm, bv, warps = _config(SOFTMAX_CONFIG["fwd"], logits.device)
        _softmax_ce_fwd_kernel[(cdiv(N, bm),)](logits, labels, loss, lse, correct, N, V, logits.stride(0),
                                               ignore_index, label_smoothing,
                                               HAS_SMOOTHING=label_smoothing > 0, ALIGN=TILE_ALIGN,
                                               BLOCK_M=bm, BLOCK_V=bv, num_warps=warps)


def softmax_cross_entropy_fwd(logits, labels, ignore_index, label_smoothing):
    """Forward launcher: per-row (loss fp32, lse fp32, correct bool) in one pass over each row."""
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    loss, lse, correct = _row_stats(logits.shape[0], logits.device)
    _softmax_fwd_launch(logits, labels, loss, lse, correct, ignore_index, label_smoothing)
    return loss, lse, correct.bool()


def softmax_cross_entropy_bwd(dloss, dlse, logits, labels, lse, ignore_index, label_smoothing,
                              out: Optional[torch.Tensor] = None, col0: int = 0, vocab: Optional[int] = None):
    """Backward launcher: d(logits) in logits' dtype, written into `out` when given (it may be `logits`
    itself: each element is read before it is overwritten by the same program). `logits` may be the columns
    col0 .. of a `vocab`-wide vocabulary (the linear backward's chunks)."""
    N, width = logits.shape
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    grad = torch.empty_like(logits) if out is None else out
    if N:
        bm, bv, warps = _config(SOFTMAX_CONFIG["bwd"], logits.device)
        _softmax_ce_bwd_kernel[(cdiv(N, bm),)](
            logits, labels, lse, dloss.float().contiguous(), dloss if dlse is None else dlse.float().contiguous(),
            grad, N, width, col0, width if vocab is None else vocab, logits.stride(0), grad.stride(0), ignore_index,
            label_smoothing, HAS_DLSE=dlse is not None, SAME_STRIDE=grad.stride(0) == logits.stride(0),
            ALIGN=TILE_ALIGN, BLOCK_M=bm, BLOCK_V=bv, num_warps=warps)
    return grad


def unsupported(device: torch.device, dtype: torch.dtype, **_) -> Optional[str]:
    """Why this backend cannot take these inputs, or None."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} is not supported (float16, bfloat16, float32)"
    return None
