"""Triton segment attention, FlashAttention-2 style: forward with online softmax saving the log-sum-exp,
backward as preprocess (delta = rowsum(dO * O)), dK/dV per key block and dQ per query block.

The mask is never materialised. Each kernel evaluates it per tile from `segment_ids`, `modality_ids` and
the rules table (read on the device as one 32-bit code, 2 bits per entry). Block skipping uses
per-token windows built on the device from the ids (`attention_metadata`, one launch): query i may only attend keys
in [key_lo[i], key_hi[i]) and key j is only attended by queries in [query_lo[j], query_hi[j]). A query
block then visits just the key blocks covering the union of its rows' windows, so for packed samples the
work scales with the sum of squared sample lengths; the exact per-element mask keeps any id layout correct.
Windows do not depend on the block size, so block sizes can be autotuned freely. Each kernel's own blocks (query
blocks of the forward and dQ, key blocks of dK/dV) are work items aligned to sample starts (`work_items`): a block
then holds one sample's positions, whose window is that sample alone (the key-side kernels under dropout keep
fixed blocks, on its 64-key groups: `fixed_key_blocks`). Without rules, tiles that a block may attend whole (the
block inside one contiguous sample) skip the mask: each kernel loops over that unmasked interior, then over the
masked edge tiles, as FlashAttention splits off the causal diagonal; this saves the compare-and-select per score
that the softmax's ALU budget cannot spare.

Two load paths share each kernel: pointer loads (cp.async on sm_80 and sm_90, every GPU) and, with USE_TMA,
tensor descriptors built on the device per (batch, head) slice (sm_90's TMA: bulk copies into shared memory that
wgmma reads in place, zero fill past the row end; the atomic backward also adds its dQ tiles with bulk tensor
reduce-adds). On sm_90 the autotuner times both and keeps the faster
(`tma_mode`; VIDEOBERT_ATTENTION_TMA=0 or 1 pins one).

Dropout regenerates the reference's Philox mask (`reference.dropout_keep_bytes`: index key j, counters
query i and b * H + h), sixteen decisions per Philox call on 8-bit thresholds (the rate rounded to 1/256), each
call's keys those a thread holds of a score row in the MMA accumulator (key tiles then start at 64-key groups).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from videobert._kernels.reference import RULE_CAUSAL, RULE_FULL
from videobert._kernels.triton.launch import (LOG2E, arch_major, cdiv, dot_precision, dropout_args,
                                              ensure_allocator, next_power_of_2)
from videobert._kernels.triton.rng import (DROPOUT_GROUP, dropout_keep_bytes, keep_or_zero, load_seed,
                                           zero_dropped_16bit)

MAX_HEAD_DIM = 128
MAX_MODALITIES = 4  # M * M rules of 2 bits each fit one 32-bit word
_RULE_SLOTS = tl.constexpr(MAX_MODALITIES * MAX_MODALITIES)
_FULL, _CAUSAL = tl.constexpr(RULE_FULL), tl.constexpr(RULE_CAUSAL)
_LOG2E = tl.constexpr(LOG2E)
# Tiles of a block's loop start at its window's low end rounded down to this, not to the tile size: the compiler
# keeps 16-row alignment for its loads. With dropout, key tiles start at multiples of 64 (of the tile where it is
# narrower): dropout draws its bytes per 64-key group (`rng.DROPOUT_GROUP`).
_TILE_ALIGN = tl.constexpr(16)

# Block sizes used under TRITON_INTERPRET=1 (CPU tests); autotuning needs a GPU.
INTERPRET_CONFIG = {"fwd": (32, 16), "bwd": (16, 32), "dkdv": (16, 32), "dq": (32, 16)}


# ---------------------------------------------------------------------------------------------- jit helpers

@triton.jit
def _tile_allowed(seg_q, seg_k, mod_q, mod_k, pos_q, pos_k, rules_code,
                  HAS_RULES: tl.constexpr, NUM_MODALITIES: tl.constexpr):
    """Mask of a tile from broadcastable row/column vectors (works for (M, N) and transposed (N, M) tiles).
    One side is the kernel's own block, whose padding reads -1 (`_block_prologue`); the other side's padding
    and positions past the row end read 0, so equal ids always mean one real segment."""
    allowed = seg_q == seg_k
    if HAS_RULES:
        rule = (rules_code >> ((mod_q * NUM_MODALITIES + mod_k) * 2).to(tl.uint32)) & 3
        allowed = allowed & ((rule == _FULL) | ((rule == _CAUSAL) & (pos_k <= pos_q)))
    return allowed


@triton.jit
def _load_rows(base, pos, stride_l, offs_d, L, HEAD_DIM: tl.constexpr, IN_ROW: tl.constexpr = False):
    """Rows `pos` of a (L, HEAD_DIM) slice, zero past either end; IN_ROW promises pos < L (no row mask)."""
    ptrs = base + pos[:, None] * stride_l + offs_d[None, :]
    if IN_ROW:
        if HEAD_DIM == offs_d.shape[0]:
            return tl.load(ptrs)
        return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return tl.load(ptrs, mask=(pos[:, None] < L) & (offs_d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _rows_source(base, stride_l, L, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                 USE_TMA: tl.constexpr):
    """How a kernel reaches tiles of BLOCK rows of the (L, HEAD_DIM) slice at `base`: with USE_TMA a tensor
    descriptor (sm_90's bulk tensor copies, TMA: rows past L and columns past HEAD_DIM read as zero and are never
    written; the launcher checks 16-byte alignment), else the base pointer itself."""
    if USE_TMA:
        source = tl.make_tensor_descriptor(base, shape=[L, HEAD_DIM], strides=[stride_l, 1],
                                           block_shape=[BLOCK, BLOCK_D])
    else:
        source = base
    return source


@triton.jit
def _load_tile(source, start, stride_l, offs_d, L, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
               IN_ROW: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows [start, start + BLOCK) of a `_rows_source`, zero past either end (IN_ROW: see `_load_rows`)."""
    if USE_TMA:
        rows = source.load([start, 0])
    else:
        rows = _load_rows(source, start + tl.arange(0, BLOCK), stride_l, offs_d, L, HEAD_DIM, IN_ROW)
    return rows


@triton.jit
def _load_ids(Seg, Mod, row, pos, L, HAS_RULES: tl.constexpr):
    """Canonical segment ids (0 on padding and past the row end: a zero fill, no select per id after the
    load) and modality ids (0 without rules) of positions `pos`."""
    seg = tl.load(Seg + row + pos, mask=pos < L, other=0)
    mod = tl.load(Mod + row + pos, mask=pos < L, other=0) if HAS_RULES else pos * 0
    return seg, mod


@triton.jit
def _window(win, row, pos, end, L, IS_LOW: tl.constexpr):
    """Union of the per-token windows of a block's positions before `end`: (min of lows, max of highs)."""
    if IS_LOW:
        return tl.min(tl.load(win + row + pos, mask=pos < end, other=L), axis=0)
    return tl.max(tl.load(win + row + pos, mask=pos < end, other=0), axis=0)


@triton.jit
def _block_prologue(Seg, Mod, Win, Rules, row, pos, end, B, L, HAS_RULES: tl.constexpr,
                    NUM_MODALITIES: tl.constexpr):
    """What every kernel loads first for its own block of positions (those from `end` on, at most L, belong to
    no one: a work item's tail): their ids (padding and positions from `end` on as -1), the rules code, and the
    union [lo, hi) of their windows (lows at Win, highs in the next plane)."""
    seg, mod = _load_ids(Seg, Mod, row, pos, end, HAS_RULES)
    seg = tl.where(seg == 0, -1, seg)  # never equal to a tile's 0: padding needs no test per score
    rules_code = _rules_code(Rules, NUM_MODALITIES) if HAS_RULES else 0
    return seg, mod, rules_code, _window(Win, row, pos, end, L, True), _window(Win + B * L, row, pos, end, L, False)


@triton.jit
def _unmasked_span(Dense, row, pos, seg, lo, hi, end, L, HAS_RULES: tl.constexpr, BLOCK: tl.constexpr,
                   ALIGN: tl.constexpr):
    """How a block's loop over tiles of BLOCK positions covering [lo, hi) splits: (start, mid_lo, mid_hi,
    masked). Tiles start at `start`, lo rounded down to ALIGN (`_tile_align`; with 16, at most 15 positions
    before the window, where rounding to BLOCK wastes up to BLOCK - 1), and follow every BLOCK positions;
    [mid_lo, mid_hi) holds the tiles every pair of which is allowed (no rules, and the block's positions before
    `end` all in one contiguous segment; empty otherwise) and `masked` tiles remain, from `start` on, jumping
    over [mid_lo, mid_hi) (see `_masked_tile_start`)."""
    start = (lo // ALIGN) * ALIGN
    mid_lo, mid_hi = start, start
    if not HAS_RULES:  # with rules the mask stays on: a table of only full rules is the one case it could go
        # 0 on padding and past L; an item's tail (from `end` on, before L) does not count
        contiguous = tl.min(tl.load(Dense + row + pos, mask=pos < end, other=(pos < L).to(tl.int32)), axis=0)
        seg_max = tl.max(seg, axis=0)
        inner_lo = start + tl.cdiv(lo - start, BLOCK) * BLOCK
        inner_hi = start + ((hi - start) // BLOCK) * BLOCK
        whole = (contiguous == 1) & (tl.min(tl.where(pos < end, seg, seg_max), axis=0) == seg_max) \
            & (inner_lo < inner_hi)
        mid_lo, mid_hi = tl.where(whole, inner_lo, start), tl.where(whole, inner_hi, start)
    return start, mid_lo, mid_hi, tl.cdiv(hi - start, BLOCK) - (mid_hi - mid_lo) // BLOCK


@triton.constexpr_function
def _tile_align(key_tiles_with_dropout, block):
    """Where a loop's tiles may start (`_unmasked_span`): multiples of 16, or for key tiles under dropout of its
    byte group (64 keys), or of the tile where that is narrower."""
    return min(block, DROPOUT_GROUP.value) if key_tiles_with_dropout else _TILE_ALIGN.value


@triton.constexpr_function
def fixed_key_blocks(dropout):
    """Whether the key-side kernels (dK/dV, the atomic backward) take fixed key blocks, at multiples of BLOCK_N,
    instead of work items: under dropout, whose bytes come in 64-key groups that a key block must start on (a
    narrower block on a multiple of its width). A fixed block has no tail of another sample's keys (`_dkdv_tile`)
    and one program each (`_programs`)."""
    return bool(dropout)


@triton.jit
def _masked_tile_start(start, mid_lo, mid_hi, index, BLOCK: tl.constexpr):
    """First position of the index-th masked tile: tiles from `start` on, jumping over [mid_lo, mid_hi)."""
    first = start + index * BLOCK
    return tl.where(first >= mid_lo, first + (mid_hi - mid_lo), first)


@triton.jit
def _rules_code(Rules, NUM_MODALITIES: tl.constexpr):
    """The (M, M) rules table (contiguous ints in {0, 1, 2}) as one 32-bit code, 2 bits per entry."""
    idx = tl.arange(0, _RULE_SLOTS)
    entries = tl.load(Rules + idx, mask=idx < NUM_MODALITIES * NUM_MODALITIES, other=0)
    return tl.sum(entries.to(tl.uint32) << (2 * idx).to(tl.uint32), axis=0)  # disjoint bits: sum == or


# ---------------------------------------------------------------------------------------------- kernels

@triton.jit
def _segment_metadata_kernel(Seg, Mod, Rules, Meta, stride_sb, stride_sl, stride_mb, stride_ml, B, L,
                             NUM_MODALITIES: tl.constexpr, HAS_RULES: tl.constexpr, BLOCK: tl.constexpr):
    """Per token of one block: canonical segment id, modality id, the four windows and whether its segment
    is contiguous (see `attention_metadata`). Each program compares its ids with every chunk of the row whose
    id range overlaps its own, so contiguous samples cost O(L * sample length) and any layout stays exact."""
    pid, b = tl.program_id(0), tl.program_id(1)
    pos = pid * BLOCK + tl.arange(0, BLOCK)
    seg_row = Seg + b.to(tl.int64) * stride_sb
    seg = tl.load(seg_row + pos * stride_sl, mask=pos < L, other=-1)
    valid = seg >= 0
    block_max = tl.max(seg, axis=0)
    block_min = tl.min(tl.where(valid, seg, block_max), axis=0)
    lo = tl.zeros([BLOCK], tl.int32) + L
    hi = tl.zeros([BLOCK], tl.int32)
    count = tl.zeros([BLOCK], tl.int32)
    if block_max >= 0:
        for start in range(0, L, BLOCK):
            pos_o = start + tl.arange(0, BLOCK)
            other = tl.load(seg_row + pos_o * stride_sl, mask=pos_o < L, other=-1)
            other_max = tl.max(other, axis=0)
            other_min = tl.min(tl.where(other >= 0, other, other_max), axis=0)
            if (other_max >= block_min) & (other_min <= block_max):
                same = seg[:, None] == other[None, :]
                lo = tl.minimum(lo, tl.min(tl.where(same, pos_o[None, :], L), axis=1))
                hi = tl.maximum(hi, tl.max(tl.where(same, pos_o[None, :] + 1, 0), axis=1))
                count += tl.sum(same.to(tl.int32), axis=1)
    key_lo, key_hi, query_lo, query_hi = lo, hi, lo, hi
    valid_q, valid_k = valid, valid
    mod = tl.zeros([BLOCK], tl.int32)
    if HAS_RULES:
        mod = tl.load(Mod + b.to(tl.int64) * stride_mb + pos * stride_ml, mask=pos < L, other=0).to(tl.int32)
        code = _rules_code(Rules, NUM_MODALITIES)
        q_full, q_causal = mod < 0, mod < 0  # all False
        k_full, k_causal = mod < 0, mod < 0
        for m in tl.static_range(NUM_MODALITIES):
            as_query = (code >> ((mod * NUM_MODALITIES + m) * 2).to(tl.uint32)) & 3
            as_key = (code >> ((m * NUM_MODALITIES + mod) * 2).to(tl.uint32)) & 3
            q_full, q_causal = q_full | (as_query == _FULL), q_causal | (as_query == _CAUSAL)
            k_full, k_causal = k_full | (as_key == _FULL), k_causal | (as_key == _CAUSAL)
        # A query with only causal rules sees keys up to itself; a key, queries from itself on.
        key_hi = tl.where(q_full, hi, tl.minimum(hi, pos + 1))
        query_lo = tl.where(k_full, lo, tl.maximum(lo, pos))
        valid_q, valid_k = valid & (q_full | q_causal), valid & (k_full | k_causal)
    out = Meta + b.to(tl.int64) * L + pos
    plane = B * L  # B == 1 arrives as a constexpr (Triton specialises 1), so no .to() here
    inside = pos < L
    tl.store(out, tl.where(valid, lo + 1, 0), mask=inside)
    tl.store(out + plane, mod, mask=inside)
    tl.store(out + 2 * plane, tl.where(valid_q, key_lo, L), mask=inside)
    tl.store(out + 3 * plane, tl.where(valid_q, key_hi, 0), mask=inside)
    tl.store(out + 4 * plane, tl.where(valid_k, query_lo, L), mask=inside)
    tl.store(out + 5 * plane, tl.where(valid_k, query_hi, 0), mask=inside)
    tl.store(out + 6 * plane, (valid & (hi - lo == count)).to(tl.int32), mask=inside)


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _work_items_kernel(Canon, Items, B, L, stride_items, CHUNK: tl.constexpr, MAX_RATIO: tl.constexpr):
    """The work items of one row for blocks of 16 << program_id(1) positions (see `work_items`): runs
    of equal canonical ids (a packed sample, a padding run) cut into blocks from each run's start; fixed blocks
    when that makes more than MAX_RATIO times as many items as fixed blocks (short runs: interleaved ids)."""
    b, k = tl.program_id(0), tl.program_id(1)
    block = 16 << k
    row = Canon + b.to(tl.int64) * L
    out = Items + (k * B + b).to(tl.int64) * stride_items
    run_start = 0  # where the run that the previous chunk ended in started
    count = 0
    for c0 in range(0, L, CHUNK):
        pos = c0 + tl.arange(0, CHUNK)
        ids = tl.load(row + pos, mask=pos < L, other=0)
        prev = tl.load(row + pos - 1, mask=(pos > 0) & (pos < L), other=0)
        run = tl.maximum(tl.associative_scan(tl.where((pos == 0) | (ids != prev), pos, -1), 0, _max_combine),
                         run_start)
        first = ((pos - run) % block == 0) & (pos < L)
        index = count + tl.cumsum(first.to(tl.int32), 0) - 1
        tl.store(out + 1 + index, pos, mask=first & (index < stride_items - 2))
        count += tl.sum(first.to(tl.int32), 0)
        run_start = tl.max(run, 0)
    fixed = tl.cdiv(L, block)
    if count > MAX_RATIO * fixed:
        tl.debug_barrier()
        for c0 in range(0, fixed, CHUNK):
            i = c0 + tl.arange(0, CHUNK)
            tl.store(out + 1 + i, i * block, mask=i < fixed)
        count = fixed
    tl.debug_barrier()
    tl.store(out, count)
    tl.store(out + 1 + count, L)


@triton.jit
def _work_item(Items, b, B, stride_items, index, L, BLOCK: tl.constexpr, FIXED: tl.constexpr):
    """[start, end) of row b's index-th block of BLOCK positions: its work item (`work_items`), or with FIXED the
    fixed block at index * BLOCK; empty (end <= start) past the row's last. One program takes one item: a loop over
    several keeps the launch's state live across the item body, which costs registers (25 to 45 per thread)."""
    if FIXED:
        start = index * BLOCK
        end = tl.minimum(start + BLOCK, L)
    else:
        tl.static_assert((BLOCK == 16) | (BLOCK == 32) | (BLOCK == 64) | (BLOCK == 128))  # ITEM_BLOCKS
        items = Items + (((BLOCK >= 32) + (BLOCK >= 64) + (BLOCK >= 128)) * B + b).to(tl.int64) * stride_items
        listed = index < tl.load(items)
        start = tl.load(items + 1 + index, mask=listed, other=0)
        end = tl.load(items + 2 + index, mask=listed, other=0)
    return start, end


@triton.jit
def _key_tile(q, k_src, v_src, start_n, pos_m, offs_d, seg_q, mod_q, rules_code, Seg, Mod, row, L, stride_kl,
              stride_vl, HEAD_DIM: tl.constexpr, NUM_MODALITIES: tl.constexpr, HAS_RULES: tl.constexpr,
              DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    """A query block's view of one key tile (forward and dQ): K, V, the raw scores q k^T and, in masked tiles,
    which pairs are allowed (a constant True in interior tiles, where all are)."""
    pos_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(k_src, start_n, stride_kl, offs_d, L, HEAD_DIM, BLOCK_N, not MASKED, USE_TMA)  # interior: in row
    v = _load_tile(v_src, start_n, stride_vl, offs_d, L, HEAD_DIM, BLOCK_N, not MASKED, USE_TMA)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    allowed = True
    if MASKED:
        seg_k, mod_k = _load_ids(Seg, Mod, row, pos_n, L, HAS_RULES)
        allowed = _tile_allowed(seg_q[:, None], seg_k[None, :], mod_q[:, None], mod_k[None, :], pos_m[:, None],
                                pos_n[None, :], rules_code, HAS_RULES, NUM_MODALITIES)
    return k, v, s, allowed


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_src, v_src, start_n, pos_m, offs_d, seg_q, mod_q, rules_code, Seg, Mod, row, L,
              stride_kl, stride_vl, scale_log2, seed, offset, pid_bh, threshold, drop_scale,
              HEAD_DIM: tl.constexpr, NUM_MODALITIES: tl.constexpr, HAS_RULES: tl.constexpr,
              HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              USE_TMA: tl.constexpr):
    """One key tile of the online softmax: the updated (acc, l_i, m_i); m_i is in log2 units (scaled)."""
    k, v, s, allowed = _key_tile(q, k_src, v_src, start_n, pos_m, offs_d, seg_q, mod_q, rules_code, Seg, Mod,
                                 row, L, stride_kl, stride_vl, HEAD_DIM, NUM_MODALITIES, HAS_RULES, DOT_PRECISION,
                                 BLOCK_N, MASKED, USE_TMA)
    if MASKED:
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * scale_log2)
    if MASKED:
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked so far: avoid -inf - -inf
    else:
        m_new_safe = m_new  # every row has an allowed key in this tile
    p = tl.exp2(s * scale_log2 - m_new_safe[:, None])  # one FMA per score
    alpha = tl.exp2(m_i - m_new_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    # with dropout, 1 / (1 - rate) is applied to the output once (`_fwd_item`)
    if HAS_DROPOUT and v.dtype.primitive_bitwidth == 16:
        p = zero_dropped_16bit(p.to(v.dtype), seed, offset, start_n, pos_m[:, None], pid_bh, threshold, BLOCK_N)
    elif HAS_DROPOUT:
        keep = dropout_keep_bytes(seed, offset, start_n, pos_m[:, None], pid_bh, threshold, BLOCK_N)
        p = keep_or_zero(keep, p, drop_scale)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _segment_attention_fwd_kernel(
        Q, K, V, Out, Lse, Seg, Mod, Win, Rules, Items,
        stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
        stride_ob, stride_ol, stride_oh, stride_items,
        B, H, L, scale_log2, Rng, threshold, drop_scale, L_BUCKET, TMA_MODE, WS_MODE,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_MODALITIES: tl.constexpr, HAS_RULES: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        USE_TMA: tl.constexpr = False, WARP_SPECIALIZE: tl.constexpr = False, MIXED_ITEMS: tl.constexpr = False):
    """Out and the log-sum-exp of one work item (`work_items`: up to BLOCK_M queries from a sample's start) of one
    (batch, head): item program_id(0), if the row has that many. WARP_SPECIALIZE serves only items of one id (one
    sample or padding, `_one_id`) through one warp-specialised loop (TMA, no rules); MIXED_ITEMS only the others,
    the launch that completes it. L_BUCKET, TMA_MODE and WS_MODE only key the autotuner."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    seed, offset = load_seed(Rng, HAS_DROPOUT)
    b, h = pid_bh // H, pid_bh % H
    row = b.to(tl.int64) * L
    offs_d = tl.arange(0, BLOCK_D)
    q_src = _rows_source(Q + b * stride_qb + h * stride_qh, stride_ql, L, HEAD_DIM, BLOCK_M, BLOCK_D, USE_TMA)
    k_src = _rows_source(K + b * stride_kb + h * stride_kh, stride_kl, L, HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA)
    v_src = _rows_source(V + b * stride_vb + h * stride_vh, stride_vl, L, HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA)
    o_base = Out + b * stride_ob + h * stride_oh
    start_m, end_m = _work_item(Items, b, B, stride_items, pid_m, L, BLOCK_M, False)
    todo = start_m < end_m
    if MIXED_ITEMS:
        todo = todo & ~_one_id(Seg, row, start_m, end_m, BLOCK_M)
    if todo:
        _fwd_item(q_src, k_src, v_src, o_base, Lse, Seg, Mod, Win, Rules, start_m, end_m, row, pid_bh, offs_d,
                  stride_ql, stride_kl, stride_vl, stride_ol, B, L, scale_log2, seed, offset, threshold, drop_scale,
                  HEAD_DIM, BLOCK_D, NUM_MODALITIES, HAS_RULES, HAS_DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N,
                  USE_TMA, WARP_SPECIALIZE)


@triton.jit
def _one_id(Seg, row, start, end, BLOCK: tl.constexpr):
    """Whether positions [start, end) (at most BLOCK, start < L) all hold one canonical id: one sample's or padding.
    Work items hold one run of ids each, except in rows that keep fixed blocks (`work_items`)."""
    pos = start + tl.arange(0, BLOCK)
    ids = tl.load(Seg + row + pos, mask=pos < end, other=tl.load(Seg + row + start))
    return tl.min(ids, axis=0) == tl.max(ids, axis=0)


@triton.jit
def _fwd_item(q_src, k_src, v_src, o_base, Lse, Seg, Mod, Win, Rules, start_m, end_m, row, pid_bh, offs_d,
              stride_ql, stride_kl, stride_vl, stride_ol, B, L, scale_log2, seed, offset, threshold, drop_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_MODALITIES: tl.constexpr, HAS_RULES: tl.constexpr,
              HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              USE_TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    """Out and the log-sum-exp of queries [start_m, end_m) (end_m - start_m <= BLOCK_M); with WARP_SPECIALIZE only
    if they hold one id (see the kernel)."""
    pos_m = start_m + tl.arange(0, BLOCK_M)
    seg_q, mod_q, rules_code, lo, hi = _block_prologue(Seg, Mod, Win, Rules, row, pos_m, end_m, B, L, HAS_RULES,
                                                       NUM_MODALITIES)
    start, mid_lo, mid_hi, masked = _unmasked_span(Win + 4 * B * L, row, pos_m, seg_q, lo, hi, end_m, L,
                                                   HAS_RULES, BLOCK_N, _tile_align(HAS_DROPOUT, BLOCK_N))
    q = _load_tile(q_src, start_m, stride_ql, offs_d, L, HEAD_DIM, BLOCK_M, False, USE_TMA)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    rows = pos_m < end_m  # those stored
    if WARP_SPECIALIZE:
        # Triton's Hopper warp specialisation (a producer warpgroup issuing the copies, two 64-row consumer
        # warpgroups) takes a kernel with one loop, tiles at its induction variable, no branch that yields a value
        # and no per-row loads feeding the loop (README): one loop over every tile, masked from the item's one id.
        tl.static_assert(USE_TMA and not HAS_RULES, "warp specialisation needs the TMA path and no rules")
        item_id = tl.load(Seg + row + start_m)
        # One id for every row (the tail's rows are computed and never stored): the mask is one compare per key
        rows_id = tl.full([BLOCK_M], tl.where(item_id != 0, item_id, -1), tl.int32)  # padding: -1, as seg_q
        served = _one_id(Seg, row, start_m, end_m, BLOCK_M)
        rows = tl.where(served, rows, False)  # `rows & served` has a mask dtype the interpreter refuses
        stop = tl.where(served, start + tl.cdiv(hi - start, BLOCK_N) * BLOCK_N, start)
        for start_n in tl.range(start, stop, BLOCK_N, warp_specialize=True):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_src, v_src, start_n, pos_m, offs_d, rows_id, mod_q,
                                      rules_code, Seg, Mod, row, L, stride_kl, stride_vl, scale_log2, seed, offset,
                                      pid_bh, threshold, drop_scale, HEAD_DIM, NUM_MODALITIES, HAS_RULES,
                                      HAS_DROPOUT, DOT_PRECISION, BLOCK_N, True, USE_TMA)
    else:  # the unmasked interior, then the masked tiles around it (at most two when the interior is not empty)
        if not HAS_RULES:
            for start_n in range(mid_lo, mid_hi, BLOCK_N):
                acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_src, v_src, start_n, pos_m, offs_d, seg_q, mod_q,
                                          rules_code, Seg, Mod, row, L, stride_kl, stride_vl, scale_log2, seed,
                                          offset, pid_bh, threshold, drop_scale, HEAD_DIM, NUM_MODALITIES, HAS_RULES,
                                          HAS_DROPOUT, DOT_PRECISION, BLOCK_N, False, USE_TMA)
        for index in range(0, masked):
            start_n = _masked_tile_start(start, mid_lo, mid_hi, index, BLOCK_N)
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_src, v_src, start_n, pos_m, offs_d, seg_q, mod_q,
                                      rules_code, Seg, Mod, row, L, stride_kl, stride_vl, scale_log2, seed, offset,
                                      pid_bh, threshold, drop_scale, HEAD_DIM, NUM_MODALITIES, HAS_RULES,
                                      HAS_DROPOUT, DOT_PRECISION, BLOCK_N, True, USE_TMA)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if HAS_DROPOUT:
        out = out * drop_scale
    out = out.to(o_base.dtype.element_ty)
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    # A whole item: one bulk store (a part one must not pass end_m). Not in the warp-specialised kernel, which may
    # have no if with an else.
    if (USE_TMA and not WARP_SPECIALIZE) and end_m - start_m == BLOCK_M:
        _rows_source(o_base, stride_ol, L, HEAD_DIM, BLOCK_M, BLOCK_D, True).store([start_m, 0], out)
    else:
        tl.store(o_base + pos_m[:, None] * stride_ol + offs_d[None, :], out,
                 mask=rows[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(Lse + pid_bh.to(tl.int64) * L + pos_m, lse, mask=rows)


@triton.jit
def _segment_attention_bwd_preprocess_kernel(Out, DO, Delta, DQ, stride_ob, stride_ol, stride_oh, stride_db,
                                             stride_dl, stride_dh, H, L, HEAD_DIM: tl.constexpr,
                                             BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, ZERO_DQ: tl.constexpr):
    """delta = rowsum(dO * O) of a block of rows; with ZERO_DQ also zeroes their rows of the fp32 dQ accumulator
    (contiguous (B, L, H, HEAD_DIM)), which saves the atomic backward a memset launch."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    pos_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(Out + b * stride_ob + h * stride_oh, pos_m, stride_ol, offs_d, L, HEAD_DIM)
    do = _load_rows(DO + b * stride_db + h * stride_dh, pos_m, stride_dl, offs_d, L, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + pid_bh.to(tl.int64) * L + pos_m, delta, mask=pos_m < L)
    if ZERO_DQ:
        rows = (b.to(tl.int64) * L + pos_m) * H + h
        tl.store(DQ + rows[:, None] * HEAD_DIM + offs_d[None, :], tl.zeros([BLOCK_M, BLOCK_D], tl.float32),
                 mask=(pos_m[:, None] < L) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _scale_cast_kernel(X, Y, n, scale, BLOCK: tl.constexpr):
    """Y = X * scale in Y's dtype, over n contiguous elements (the atomic backward's dQ accumulator; Y may be X)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n)
    tl.store(Y + offs, (x * scale).to(Y.dtype.element_ty), mask=offs < n)


@triton.jit
def _dkdv_tile(dk, dv, k, v, q_src, do_src, dq_dst, Lse, Delta, stats, start_m, pos_n, end_n, offs_d, seg_k, mod_k,
               rules_code, Seg, Mod, row, L, stride_ql, stride_dl, stride_gl, scale_log2, seed, offset, start_n,
               pid_bh, threshold, drop_scale, HEAD_DIM: tl.constexpr, NUM_MODALITIES: tl.constexpr,
               HAS_RULES: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, ATOMIC_DQ: tl.constexpr, USE_TMA: tl.constexpr):
    """One query tile's contribution to a key block's (dk, dv), computed transposed (keys along rows); with
    ATOMIC_DQ also its keys' share of the tile's dq (unscaled), added to the fp32 rows of dq_dst (a base pointer, or
    with USE_TMA a tensor descriptor: one bulk reduce-add per tile). Keys from end_n on (a work item's tail) add
    nothing to dq."""
    pos_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_tile(q_src, start_m, stride_ql, offs_d, L, HEAD_DIM, BLOCK_M, not MASKED, USE_TMA)  # interior: in row
    do = _load_tile(do_src, start_m, stride_dl, offs_d, L, HEAD_DIM, BLOCK_M, not MASKED, USE_TMA)
    if MASKED:  # rows past the row end read id 0, which the mask never allows: a zero fill is enough
        lse = tl.load(Lse + stats + pos_m, mask=pos_m < L, other=0.0) * _LOG2E
        delta = tl.load(Delta + stats + pos_m, mask=pos_m < L, other=0.0)
    else:
        lse = tl.load(Lse + stats + pos_m) * _LOG2E
        delta = tl.load(Delta + stats + pos_m)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
    p_t = tl.exp2(s_t * scale_log2 - lse[None, :])
    if MASKED:  # the tail's keys read id -1 (`_block_prologue`): never allowed
        seg_q, mod_q = _load_ids(Seg, Mod, row, pos_m, L, HAS_RULES)
        allowed_t = _tile_allowed(seg_q[None, :], seg_k[:, None], mod_q[None, :], mod_k[:, None], pos_m[None, :],
                                  pos_n[:, None], rules_code, HAS_RULES, NUM_MODALITIES)
        p_t = tl.where(allowed_t, p_t, 0.0)
    elif ATOMIC_DQ and not fixed_key_blocks(HAS_DROPOUT):  # work items: an interior tile's tail keys are another
        # sample's, whose scores with these queries may overflow; their dq terms must be exact zeros
        p_t = tl.where(pos_n[:, None] < end_n, p_t, 0.0)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        keep_t = dropout_keep_bytes(seed, offset, start_n, pos_m[:, None], pid_bh, threshold, BLOCK_N, True)
        dv += tl.dot(keep_or_zero(keep_t, p_t, drop_scale).to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.where(keep_t, dp_t, 0.0) * drop_scale  # scaled after the select: an FFMA with the - delta below
    else:
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
    dk += tl.dot(ds_t, q, input_precision=DOT_PRECISION)
    if ATOMIC_DQ:  # the fifth GEMM, transposed so that its M side is the head dim (wgmma takes BLOCK_M = 32)
        dq_t = tl.dot(tl.trans(k), ds_t, input_precision=DOT_PRECISION)
        if USE_TMA:  # FlashAttention-3's reduce-add: the tile through shared memory, added in L2 by the TMA unit
            # (rows past L and columns past HEAD_DIM dropped) instead of a RED per element and its address
            dq_dst.atomic_add([start_m, 0], tl.trans(dq_t))
        else:
            ptrs = dq_dst + pos_m[None, :] * stride_gl + offs_d[:, None]
            if MASKED or HEAD_DIM != offs_d.shape[0]:
                tl.atomic_add(ptrs, dq_t, mask=(pos_m[None, :] < L) & (offs_d[:, None] < HEAD_DIM), sem="relaxed")
            else:  # interior tiles lie inside the row
                tl.atomic_add(ptrs, dq_t, sem="relaxed")
    return dk, dv


@triton.jit
def _segment_attention_bwd_dkdv_kernel(
        Q, K, V, DO, Lse, Delta, DK, DV, DQ, Seg, Mod, Win, Rules, Items,
        stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
        stride_db, stride_dl, stride_dh, stride_gb, stride_gl, stride_gh, stride_items,
        B, H, L, scale, scale_log2, Rng, threshold, drop_scale, L_BUCKET, TMA_MODE,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_MODALITIES: tl.constexpr, HAS_RULES: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        ATOMIC_DQ: tl.constexpr, USE_TMA: tl.constexpr = False):
    """dK and dV of one key block of one (batch, head), the program_id(0)-th: a work item as the forward's
    (`work_items`), or under dropout a fixed block at a multiple of BLOCK_N (`fixed_key_blocks`). With ATOMIC_DQ
    (FlashAttention-2's backward) also their dQ terms, added into the zeroed fp32 DQ (dk's strides) with atomics, so
    one kernel does 5 GEMMs per tile pair where the dK/dV and dQ kernels together do 7 (each recomputes S and P)."""
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    seed, offset = load_seed(Rng, HAS_DROPOUT)
    b, h = pid_bh // H, pid_bh % H
    row = b.to(tl.int64) * L
    offs_d = tl.arange(0, BLOCK_D)
    q_src = _rows_source(Q + b * stride_qb + h * stride_qh, stride_ql, L, HEAD_DIM, BLOCK_M, BLOCK_D, USE_TMA)
    do_src = _rows_source(DO + b * stride_db + h * stride_dh, stride_dl, L, HEAD_DIM, BLOCK_M, BLOCK_D, USE_TMA)
    start_n, end_n = _work_item(Items, b, B, stride_items, pid_n, L, BLOCK_N, fixed_key_blocks(HAS_DROPOUT))
    dq_dst = _rows_source(DQ + b * stride_gb + h * stride_gh, stride_gl, L, HEAD_DIM, BLOCK_M, BLOCK_D,
                          USE_TMA and ATOMIC_DQ)
    if start_n < end_n:  # g_base repeats dq_dst's offset for DK and DV (same strides): one base pointer for all
        # three, offset in _dkdv_block, spilled 8 bytes in the TMA 16x64 tile at D=128
        _dkdv_block(q_src, do_src, K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
                    Lse, Delta, DK, DV, dq_dst, Seg, Mod, Win, Rules, start_n, end_n,
                    row, b * stride_gb + h * stride_gh, pid_bh, offs_d, stride_ql, stride_kl, stride_vl, stride_dl,
                    stride_gl, B, L, scale, scale_log2, seed, offset, threshold, drop_scale, HEAD_DIM, BLOCK_D,
                    NUM_MODALITIES, HAS_RULES, HAS_DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N, ATOMIC_DQ, USE_TMA)


@triton.jit
def _dkdv_block(q_src, do_src, k_base, v_base, Lse, Delta, DK, DV, dq_dst, Seg, Mod, Win, Rules, start_n, end_n,
                row, g_base, pid_bh, offs_d, stride_ql, stride_kl, stride_vl, stride_dl, stride_gl, B, L, scale,
                scale_log2, seed, offset, threshold, drop_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                NUM_MODALITIES: tl.constexpr, HAS_RULES: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                USE_TMA: tl.constexpr):
    """dK and dV (and with ATOMIC_DQ their dQ terms) of keys [start_n, end_n) (end_n - start_n <= BLOCK_N)."""
    stats = pid_bh.to(tl.int64) * L
    pos_n = start_n + tl.arange(0, BLOCK_N)
    seg_k, mod_k, rules_code, lo, hi = _block_prologue(Seg, Mod, Win + 2 * B * L, Rules, row, pos_n, end_n, B, L,
                                                       HAS_RULES, NUM_MODALITIES)
    start, mid_lo, mid_hi, masked = _unmasked_span(Win + 4 * B * L, row, pos_n, seg_k, lo, hi, end_n, L, HAS_RULES,
                                                   BLOCK_M, _tile_align(False, BLOCK_M))
    k = _load_rows(k_base, pos_n, stride_kl, offs_d, L, HEAD_DIM)
    v = _load_rows(v_base, pos_n, stride_vl, offs_d, L, HEAD_DIM)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if not HAS_RULES:  # unmasked, then masked query tiles (see the forward)
        for start_m in range(mid_lo, mid_hi, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, q_src, do_src, dq_dst, Lse, Delta, stats, start_m, pos_n, end_n,
                                offs_d, seg_k, mod_k, rules_code, Seg, Mod, row, L, stride_ql, stride_dl, stride_gl,
                                scale_log2, seed, offset, start_n, pid_bh, threshold, drop_scale, HEAD_DIM,
                                NUM_MODALITIES, HAS_RULES, HAS_DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N, False,
                                ATOMIC_DQ, USE_TMA)
    for index in range(0, masked):
        start_m = _masked_tile_start(start, mid_lo, mid_hi, index, BLOCK_M)
        dk, dv = _dkdv_tile(dk, dv, k, v, q_src, do_src, dq_dst, Lse, Delta, stats, start_m, pos_n, end_n, offs_d,
                            seg_k, mod_k, rules_code, Seg, Mod, row, L, stride_ql, stride_dl, stride_gl, scale_log2,
                            seed, offset, start_n, pid_bh, threshold, drop_scale, HEAD_DIM, NUM_MODALITIES,
                            HAS_RULES, HAS_DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N, True, ATOMIC_DQ, USE_TMA)

    mask = (pos_n[:, None] < end_n) & (offs_d[None, :] < HEAD_DIM)
    g_off = g_base + pos_n[:, None] * stride_gl + offs_d[None, :]
    tl.store(DK + g_off, (dk * scale).to(DK.dtype.element_ty), mask=mask)
    if HAS_DROPOUT:
        dv = dv * drop_scale
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, k_src, v_src, start_n, pos_m, offs_d, seg_q, mod_q, rules_code, Seg, Mod,
             row, L, stride_kl, stride_vl, scale_log2, seed, offset, pid_bh, threshold, drop_scale,
             HEAD_DIM: tl.constexpr, NUM_MODALITIES: tl.constexpr, HAS_RULES: tl.constexpr,
             HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
             USE_TMA: tl.constexpr):
    """One key tile's contribution to a query block's dq."""
    k, v, s, allowed = _key_tile(q, k_src, v_src, start_n, pos_m, offs_d, seg_q, mod_q, rules_code, Seg, Mod,
                                 row, L, stride_kl, stride_vl, HEAD_DIM, NUM_MODALITIES, HAS_RULES, DOT_PRECISION,
                                 BLOCK_N, MASKED, USE_TMA)
    p = tl.exp2(s * scale_log2 - lse[:, None])
    if MASKED:
        p = tl.where(allowed, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        keep = dropout_keep_bytes(seed, offset, start_n, pos_m[:, None], pid_bh, threshold, BLOCK_N)
        dp = tl.where(keep, dp, 0.0) * drop_scale  # scaled after the select: an FFMA with the - delta below
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)


@triton.jit
def _segment_attention_bwd_dq_kernel(
        Q, K, V, DO, Lse, Delta, DQ, Seg, Mod, Win, Rules, Items,
        stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
        stride_db, stride_dl, stride_dh, stride_gb, stride_gl, stride_gh, stride_items,
        B, H, L, scale, scale_log2, Rng, threshold, drop_scale, L_BUCKET, TMA_MODE,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_MODALITIES: tl.constexpr, HAS_RULES: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        USE_TMA: tl.constexpr = False):
    """dQ of one work item (`work_items`, as the forward's) of one (batch, head), the program_id(0)-th (the
    deterministic backward's second kernel)."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    seed, offset = load_seed(Rng, HAS_DROPOUT)
    b, h = pid_bh // H, pid_bh % H
    row = b.to(tl.int64) * L
    offs_d = tl.arange(0, BLOCK_D)
    k_src = _rows_source(K + b * stride_kb + h * stride_kh, stride_kl, L, HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA)
    v_src = _rows_source(V + b * stride_vb + h * stride_vh, stride_vl, L, HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA)
    start_m, end_m = _work_item(Items, b, B, stride_items, pid_m, L, BLOCK_M, False)
    if start_m < end_m:
        _dq_block(Q + b * stride_qb + h * stride_qh, DO + b * stride_db + h * stride_dh, k_src, v_src, Lse, Delta,
                  DQ + b * stride_gb + h * stride_gh, Seg, Mod, Win, Rules, start_m, end_m, row, pid_bh, offs_d,
                  stride_ql, stride_kl, stride_vl, stride_dl, stride_gl, B, L, scale, scale_log2, seed, offset,
                  threshold, drop_scale, HEAD_DIM, BLOCK_D, NUM_MODALITIES, HAS_RULES, HAS_DROPOUT, DOT_PRECISION,
                  BLOCK_M, BLOCK_N, USE_TMA)


@triton.jit
def _dq_block(q_base, do_base, k_src, v_src, Lse, Delta, dq_base, Seg, Mod, Win, Rules, start_m, end_m, row, pid_bh,
              offs_d, stride_ql, stride_kl, stride_vl, stride_dl, stride_gl, B, L, scale, scale_log2, seed, offset,
              threshold, drop_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_MODALITIES: tl.constexpr,
              HAS_RULES: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr):
    """dQ of queries [start_m, end_m) (end_m - start_m <= BLOCK_M)."""
    stats = pid_bh.to(tl.int64) * L
    pos_m = start_m + tl.arange(0, BLOCK_M)
    seg_q, mod_q, rules_code, lo, hi = _block_prologue(Seg, Mod, Win, Rules, row, pos_m, end_m, B, L, HAS_RULES,
                                                       NUM_MODALITIES)
    start, mid_lo, mid_hi, masked = _unmasked_span(Win + 4 * B * L, row, pos_m, seg_q, lo, hi, end_m, L, HAS_RULES,
                                                   BLOCK_N, _tile_align(HAS_DROPOUT, BLOCK_N))
    q = _load_rows(q_base, pos_m, stride_ql, offs_d, L, HEAD_DIM)
    do = _load_rows(do_base, pos_m, stride_dl, offs_d, L, HEAD_DIM)
    # an infinite lse makes p zero: rows past the row end and an item's tail (another sample's queries, which
    # interior tiles do not mask) add nothing
    lse = tl.load(Lse + stats + pos_m, mask=pos_m < end_m, other=float("inf")) * _LOG2E
    delta = tl.load(Delta + stats + pos_m, mask=pos_m < end_m, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if not HAS_RULES:  # unmasked, then masked key tiles (see the forward)
        for start_n in range(mid_lo, mid_hi, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse, delta, k_src, v_src, start_n, pos_m, offs_d, seg_q, mod_q, rules_code,
                          Seg, Mod, row, L, stride_kl, stride_vl, scale_log2, seed, offset, pid_bh, threshold,
                          drop_scale, HEAD_DIM, NUM_MODALITIES, HAS_RULES, HAS_DROPOUT, DOT_PRECISION, BLOCK_N,
                          False, USE_TMA)
    for index in range(0, masked):
        start_n = _masked_tile_start(start, mid_lo, mid_hi, index, BLOCK_N)
        dq = _dq_tile(dq, q, do, lse, delta, k_src, v_src, start_n, pos_m, offs_d, seg_q, mod_q, rules_code, Seg,
                      Mod, row, L, stride_kl, stride_vl, scale_log2, seed, offset, pid_bh, threshold, drop_scale,
                      HEAD_DIM, NUM_MODALITIES, HAS_RULES, HAS_DROPOUT, DOT_PRECISION, BLOCK_N, True, USE_TMA)

    g_ptrs = dq_base + pos_m[:, None] * stride_gl + offs_d[None, :]
    tl.store(g_ptrs, (dq * scale).to(dq_base.dtype.element_ty),
             mask=(pos_m[:, None] < end_m) & (offs_d[None, :] < HEAD_DIM))


# ---------------------------------------------------------------------------------------------- autotuning

# Each entry: (BLOCK_M, BLOCK_N, warps, stages), then the padded head dims (BLOCK_D, 16 counting as 32) it serves
# on sm_8x and on sm_9x: exactly those where it compiles, as a launch specialises it (aligned pointers, strides
# that divide by 16), without register spills in any of the four variants (with and without rules, with and
# without dropout; rules without dropout is not always the lighter, see compile_check.VARIANTS)
# (tests/test_compile_triton.py checks every entry, `python -m videobert._kernels.triton.compile_check` derives
# them; sm_8x keeps MMA accumulators in registers, sm_9x has wgmma, hence the different sets). Triton versions
# allocate registers differently: the tables are the intersection of the sweeps under Triton 3.6 (the GPU
# machines' image) and 3.9 (this project's CPU machine, where CI checks them). An optional fourth
# element names more head dims (sm_8x, sm_9x) served only without dropout (its Philox state does not fit beside
# those tiles without spilling; the autotune key holds HAS_DROPOUT). The first entry serving a launch is its
# untuned default (VIDEOBERT_AUTOTUNE=0). The forward's last two entries are for sm_90 at D=64: the 128x128 tile
# at two stages, and 64x128 at 4 warps, small enough (at most 230 registers, 106 KiB) for two blocks per
# multiprocessor, whose independent softmax and wgmma phases can overlap. On sm_9x every entry uses wgmma (HGMMA
# in its SASS; tests/test_compile_triton.py checks): configs whose GEMMs have a 32-row side compile to mma.sync
# there and serve sm_8x only. Programs take one work item each (`_work_item`; a loop over several kept 25 to 45
# more registers per thread live). Last derived for dropout's wide Philox multiplies, four-byte compares and the
# forward's zeroing of 16-bit pairs (`rng`): 4 (entry, arch) head dims more with dropout (the 128x128 forward at
# D=64 on both archs and D=128 on sm_9x, 64x128 at D=64 on sm_9x), 2 fewer, each at the 255-register limit (the
# 64x64 4-warp forward at D=128 on sm_8x, spilling 40 bytes with rules; the 32x128 dK/dV tile at D=128 on sm_9x),
# both still served without dropout.
FWD_TABLE = [((128, 64, 8, 3), (64, 128), (32, 64, 128)), ((64, 64, 4, 3), (32, 64), (32, 64, 128), ((128,), ())),
             ((64, 32, 8, 3), (64, 128), (32, 64, 128), ((32,), ())), ((64, 32, 4, 4), (32, 64, 128), (32, 64, 128)),
             ((64, 64, 8, 3), (32, 64, 128), (32, 64, 128)), ((32, 64, 4, 3), (64, 128), (), ((32,), ())),
             ((128, 128, 8, 3), (32, 64), (32, 64)), ((128, 128, 8, 2), (32, 64), (32, 64, 128)),
             ((64, 128, 4, 3), (32,), (32, 64))]
DKDV_TABLE = [((32, 128, 8, 3), (32, 64), (32, 64), ((), (128,))), ((16, 64, 8, 3), (32, 64, 128), (32, 64, 128)),
              ((32, 64, 8, 3), (32, 128), (32, 64, 128), ((64,), ())), ((32, 32, 4, 4), (32, 64, 128), ()),
              ((16, 64, 4, 4), (32, 64), (32, 64, 128), ((128,), ())),
              ((64, 64, 8, 3), (128,), (32, 64), ((32, 64), ())), ((32, 32, 8, 3), (32, 64), ())]
# The atomic backward holds dK and dV beside the dQ tile and its atomics: it serves fewer head dims than the
# dK/dV kernel, and launches it does not serve take the deterministic kernels (`atomic_backward_serves`: D = 32
# on sm_9x, D = 128 with dropout on sm_8x). Its dQ GEMM runs transposed (M = the head dim), so 16- and 32-row
# query tiles use wgmma at D >= 64; at D = 32 that GEMM is mma.sync on sm_90 (Triton 3.9 sweep).
BWD_TABLE = [((32, 128, 8, 2), (32,), (64,), ((64,), (128,))), ((16, 128, 8, 2), (32, 64), (64, 128), ((128,), ())),
             ((16, 64, 8, 2), (32, 64), (64, 128), ((128,), ())), ((16, 64, 4, 3), (32, 64), (64,), ((128,), (128,))),
             ((32, 128, 8, 3), (32,), (64,), ((64,), (128,))), ((32, 64, 8, 2), (32,), (64, 128), ((64,), ())),
             ((64, 64, 8, 2), (32,), (), ((), (64,))), ((64, 128, 8, 2), (), (), ((32,), (64,))),
             ((32, 64, 4, 3), (32,), (64,), ((64,), ()))]
DQ_TABLE = [((64, 32, 8, 3), (32, 64, 128), (32, 64, 128)), ((64, 64, 8, 3), (64, 128), (32, 64, 128)),
            ((32, 64, 8, 3), (32, 64, 128), ()), ((32, 32, 4, 4), (32, 64, 128), ()),
            ((32, 64, 4, 4), (32, 64, 128), ()), ((128, 32, 8, 3), (32, 64, 128), (32, 64, 128))]


# The TMA path (Q, K, V and dO tiles, the forward's output and the atomic backward's dQ terms, through tensor
# descriptors: bulk copies into shared memory that wgmma reads in place, and out as stores or reduce-adds, with no
# address arithmetic or bounds masks per element) ships for sm_9x only: its
# entries (their sm_8x sets are empty) join the pointer entries of the same kernel, and on sm_9x the autotuner
# times both (`tma_mode`), so it runs only where it wins; the first entry is the default of VIDEOBERT_ATTENTION_TMA=1
# untuned. Derived as the tables above (`compile_check --kind fwd_tma --config ...`, Triton 3.6 and 3.9); every
# entry has bulk tensor loads (UTMALDG) and wgmma in its SASS (tests/test_compile_triton.py). The deterministic
# backward has no TMA entries.
FWD_TMA_TABLE = [((128, 64, 8, 3), (), (32, 64, 128)), ((128, 128, 8, 2), (), (32, 64, 128)),
                 ((128, 128, 8, 3), (), (32, 64, 128)), ((128, 64, 8, 2), (), (32, 64, 128)),
                 ((128, 64, 8, 4), (), (32, 64, 128)), ((64, 64, 4, 3), (), (32, 64, 128)),
                 ((64, 128, 4, 3), (), (32, 64), ((), (128,)))]
BWD_TMA_TABLE = [((32, 128, 8, 2), (), (64,)), ((16, 128, 8, 2), (), (64,)), ((16, 64, 8, 2), (), (64, 128)),
                 ((32, 128, 8, 3), (), (64,)), ((32, 64, 8, 2), (), (64, 128)),
                 ((16, 64, 4, 3), (), (64,), ((), (128,))), ((32, 64, 4, 3), (), (64,)),
                 ((64, 128, 8, 2), (), (), ((), (64,)))]

# The warp-specialised forward (`VIDEOBERT_ATTENTION_WS`, off by default until a GPU has timed it): TMA tiles and
# Triton's automatic Hopper warp specialisation, a producer warpgroup issuing the copies beside two consumer
# warpgroups (warps: per consumer group; the kernel runs 12). Derived as the tables above, with and without dropout
# (never rules); every entry has register reallocation between its warpgroups (USETMAXREG) in its SASS. Under
# Triton 3.6 the pass fails on the 128-row tiles with dropout, under 3.9 on 128x128 at any head dim.
FWD_WS_TABLE = [((128, 64, 4, 2), (), (), ((), (32, 64, 128))), ((128, 64, 4, 3), (), (), ((), (32, 64, 128))),
                ((64, 64, 4, 2), (), (32, 64, 128)), ((64, 64, 4, 3), (), (32, 64, 128))]
PATHS = ("pointer", "tma", "ws")


def _configs(table, path: str = "pointer"):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "USE_TMA": path != "pointer",
                           **({"WARP_SPECIALIZE": True} if path == "ws" else {})}, num_warps=w, num_stages=s)
            for (m, n, w, s), *_ in table]


def path_table(kind: str, path: str) -> list:
    """The config table of a kernel's path (one of PATHS): TABLES[kind] for pointers, else TABLES[kind_path] (empty
    where the kernel has none)."""
    return TABLES.get(kind if path == "pointer" else f"{kind}_{path}", [])


def config_path(config: triton.Config) -> str:
    """Which of PATHS a config of TUNED takes."""
    return "ws" if config.kwargs.get("WARP_SPECIALIZE") else "tma" if config.kwargs["USE_TMA"] else "pointer"


def serves(entry, block_d: int, arch_major: int, dropout: bool = True) -> bool:
    """Whether a table entry is shipped for this padded head dim on this GPU generation, for launches with
    dropout or (dropout=False) without."""
    _, dims_sm8x, dims_sm9x, *without_dropout = entry
    dims = dims_sm8x if arch_major < 9 else dims_sm9x
    if not dropout and without_dropout:
        dims = dims + without_dropout[0][arch_major >= 9]
    return max(block_d, 32) in dims


def candidates(table, block_d: int, l_bucket: int, arch_major: int, dropout: bool = True) -> list:
    """(BLOCK_M, BLOCK_N, warps, stages) of the entries shipped for this head dim, GPU and dropout whose blocks
    fit the row, best first (at least one: the last shipped entry when none fits)."""
    shipped = [entry[0] for entry in table if serves(entry, block_d, arch_major, dropout)]
    fitting = [c for c in shipped if max(c[0], c[1]) <= max(l_bucket, 32)]
    return fitting or shipped[-1:]


def atomic_backward_serves(block_d: int, arch_major: int, dropout: bool) -> bool:
    """Whether the atomic one-kernel backward ships a config for this padded head dim, GPU and dropout."""
    return any(serves(entry, block_d, arch_major, dropout) for entry in BWD_TABLE)


def path_candidates(kind: str, block_d: int, l_bucket: int, arch_major: int, dropout: bool, mode: int,
                    ws_mode: int = 0) -> list:
    """`candidates` of a kernel for a launch in TMA mode `mode` (`tma_mode`) and warp-specialisation mode `ws_mode`
    (`ws_mode`, the forward's), each with its path (one of PATHS): ((BLOCK_M, BLOCK_N, warps, stages), path), the
    pointer path's first unless a mode is 2 (then that path's alone, where it serves the launch)."""
    def served(path: str) -> list:
        table = path_table(kind, path)
        if not any(serves(e, block_d, arch_major, dropout) for e in table):
            return []
        return [(c, path) for c in candidates(table, block_d, l_bucket, arch_major, dropout)]

    ws = served("ws") if ws_mode else []
    if ws_mode == 2 and ws:
        return ws
    pointer = served("pointer") if mode != 2 else []
    tma = served("tma") if mode else []
    return pointer + tma + ws or served("pointer")


def _pruner(kind):
    def prune(configs, named_args, **kwargs):
        """Keep the configs `path_candidates` names for this launch."""
        args = {**named_args, **kwargs}  # Triton passes positional and keyword arguments separately
        keep = path_candidates(kind, args["BLOCK_D"], args["L_BUCKET"], torch.cuda.get_device_capability()[0],
                               args["HAS_DROPOUT"], args["TMA_MODE"], args.get("WS_MODE", 0))
        by_blocks = {((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages), config_path(c)): c
                     for c in configs}
        return [by_blocks[c] for c in keep]
    return prune


def autotune_enabled() -> bool:
    """Whether CUDA launches benchmark their candidate configs (default) or take the first one untimed
    (VIDEOBERT_AUTOTUNE=0: quick start-up and the same config on every run, e.g. for tests)."""
    return os.environ.get("VIDEOBERT_AUTOTUNE", "1") != "0"


TABLES = {"fwd": FWD_TABLE, "bwd": BWD_TABLE, "dkdv": DKDV_TABLE, "dq": DQ_TABLE, "fwd_tma": FWD_TMA_TABLE,
          "bwd_tma": BWD_TMA_TABLE, "fwd_ws": FWD_WS_TABLE}
_AUTOTUNE_KEY = ["HEAD_DIM", "L_BUCKET", "TMA_MODE", "HAS_RULES", "HAS_DROPOUT", "DOT_PRECISION"]


def _tuned(fn, kind, **options):
    configs = [c for path in PATHS for c in _configs(path_table(kind, path), path)]
    key = _AUTOTUNE_KEY + (["WS_MODE"] if path_table(kind, "ws") else [])
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": _pruner(kind)}, **options)(fn)


# Tuning reruns a kernel: the others write their outputs whole, the atomic backward adds into a dQ accumulator,
# which is zeroed before every run then.
TUNED = {"fwd": _tuned(_segment_attention_fwd_kernel, "fwd"),
         "bwd": _tuned(_segment_attention_bwd_dkdv_kernel, "bwd", reset_to_zero=["DQ"]),
         "dkdv": _tuned(_segment_attention_bwd_dkdv_kernel, "dkdv"),
         "dq": _tuned(_segment_attention_bwd_dq_kernel, "dq")}


def reset_autotuning() -> None:
    """Forget the configs tuned so far. The tuning key holds shapes and flags, not the id layout (reading it
    would need a host sync), so a new workload at the same shapes (e.g. one sample per row after packed rows)
    calls this to be tuned on its own data."""
    for tuned in TUNED.values():
        tuned.cache.clear()


def tuned_configs() -> str:
    """The configs the autotuner chose so far, per kernel ("fwd 128x64 w8 s3 tma; bwd ...; dkdv ...; dq ...", "ws"
    for the warp-specialised forward), for benchmark tables; "untuned" when none was (VIDEOBERT_AUTOTUNE=0 takes
    each table's first entry, or no CUDA launch yet)."""
    chosen = [f"{kind} {c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}"
              f"{'' if config_path(c) == 'pointer' else ' ' + config_path(c)}"
              for kind, tuned in TUNED.items() for c in tuned.cache.values()]
    return "; ".join(dict.fromkeys(chosen)) or "untuned"


# ---------------------------------------------------------------------------------------------- launchers

def attention_metadata(segment_ids: torch.Tensor, modality_ids: Optional[torch.Tensor],
                       modality_rules: Optional[torch.Tensor]) -> torch.Tensor:
    """(7, B, L) int32 per token, from one kernel launch (no host sync): the canonical segment id (one more
    than the first position of the token's segment in its row, 0 for padding, so any int64 ids work), the modality
    id (0 without rules), the windows key_lo, key_hi, query_lo, query_hi, and 1 where the token's segment
    is contiguous (its positions fill its span; 0 on padding).

    Query i may only attend keys in [key_lo, key_hi) and key j is only attended by queries in
    [query_lo, query_hi). A segment's span is [first, last + 1) of its positions (ids need not be
    contiguous or sorted). Rules narrow it: a query whose modality row has no full rule but a causal one
    sees keys up to itself; a row of only blocked rules sees nothing; likewise per key column. Tokens that
    see nothing get the empty window [L, 0).
    """
    B, L = segment_ids.shape
    meta = torch.empty((7, B, L), device=segment_ids.device, dtype=torch.int32)
    if meta.numel() == 0:
        return meta
    has_rules = modality_rules is not None
    mod = modality_ids if has_rules else segment_ids
    rules = modality_rules.contiguous() if has_rules else segment_ids
    block = 64 if segment_ids.is_cuda else 32
    _segment_metadata_kernel[(cdiv(L, block), B)](
        segment_ids, mod, rules, meta, segment_ids.stride(0), segment_ids.stride(1), mod.stride(0), mod.stride(1),
        B, L, NUM_MODALITIES=modality_rules.shape[0] if has_rules else 1, HAS_RULES=has_rules, BLOCK=block)
    return meta


# Block sizes (a kernel's own BLOCK_M or BLOCK_N) that `work_items` cuts items for, one list each: 16 << index.
ITEM_BLOCKS = (16, 32, 64, 128)
# Most work items per fixed block of a row: rows that would have more (interleaved ids) get fixed blocks, and a
# kernel launches this many programs per fixed block, one per item.
MAX_ITEMS_PER_BLOCK = 2


def work_items(canonical_ids: torch.Tensor) -> torch.Tensor:
    """(4, B, W) int32 work items of the kernels' own blocks (the forward's and dQ's queries, dK/dV's keys), from one
    launch on `attention_metadata`'s canonical ids (B, L): per block size 16 << k and row, [count, start_0, ...,
    start_{count-1}, L], item i covering positions [start_i, start_{i+1}). Each run of equal ids (a packed sample, a
    run of padding) is cut into blocks from its own start, so a block's window is its sample's span, not the union
    of the samples a fixed block straddles (VideoBERT-like rows: 1.2x fewer (query, key) pairs computed by the
    forward's 128-row blocks and the atomic backward's 128-key blocks, bench/attention_internals.py);
    rows where that gives more than MAX_ITEMS_PER_BLOCK times as many items as fixed blocks (interleaved ids) get
    fixed blocks. W is MAX_ITEMS_PER_BLOCK * ceil(L / 16) + 2 (room for the most items of any size) rounded up to
    a multiple of 16, so that launches specialise its stride as they do the tensors' (`compile_check`)."""
    B, L = canonical_ids.shape
    width = cdiv(MAX_ITEMS_PER_BLOCK * cdiv(L, 16) + 2, 16) * 16
    items = torch.empty((len(ITEM_BLOCKS), B, width), dtype=torch.int32, device=canonical_ids.device)
    if B and L:
        _work_items_kernel[(B, len(ITEM_BLOCKS))](canonical_ids, items, B, L, width,
                                                  CHUNK=1024 if canonical_ids.is_cuda else 64,
                                                  MAX_RATIO=MAX_ITEMS_PER_BLOCK)
    return items


# The last ids given to `reused_metadata`, their version counters and metadata planes.
_last_metadata: Optional[tuple] = None


def _planes(meta: torch.Tensor) -> tuple:
    """(canonical ids, modality ids, the five window planes, the work items) of `attention_metadata`'s
    tensor."""
    return meta[0], meta[1], meta[2:], work_items(meta[0])


def reused_metadata(segment_ids: torch.Tensor, modality_ids: Optional[torch.Tensor],
                    modality_rules: Optional[torch.Tensor]) -> tuple:
    """`attention_metadata` of these ids as its planes with their work items (`_planes`), reused while the very
    same id tensors come back unchanged (same objects, same version counters), as they do for every layer of a
    model's forward and backward: two launches per batch instead of three per layer. Recomputed for any other
    tensors, after any in-place change, during CUDA graph capture (a replay must rebuild it from the graph's own
    ids) and for inference tensors (which have no version counter)."""
    global _last_metadata
    ids = (segment_ids, modality_ids, modality_rules)
    present = [t for t in ids if t is not None]
    if any(t.is_inference() for t in present) or (segment_ids.is_cuda and torch.cuda.is_current_stream_capturing()):
        return _planes(attention_metadata(*ids))
    versions = tuple(t._version for t in present)
    last = _last_metadata  # one read: another thread may replace it meanwhile
    if last is not None and all(a is b for a, b in zip(last[0], ids)) and last[1] == versions:
        return last[2]
    planes = _planes(attention_metadata(*ids))
    _last_metadata = (ids, versions, planes)  # holds the ids alive, so no other tensor can take their place
    return planes


def forget_metadata() -> None:
    """Drop the reused metadata (and the ids it holds alive)."""
    global _last_metadata
    _last_metadata = None


def _common(q, segment_ids, modality_ids, modality_rules, dropout_p, rng):
    """Kernel arguments shared by the forward and backward launches."""
    B, L, H, D = q.shape
    has_rules = modality_rules is not None
    seg, mod, windows, items = reused_metadata(segment_ids, modality_ids, modality_rules)
    rules = modality_rules.contiguous() if has_rules else seg
    scalars = dict(B=B, H=H, L=L, **dropout_args(dropout_p, rng, seg, byte_threshold=True),
                   L_BUCKET=next_power_of_2(max(L, 1)), TMA_MODE=0)
    consts = dict(HEAD_DIM=D, BLOCK_D=max(16, next_power_of_2(D)),
                  NUM_MODALITIES=modality_rules.shape[0] if has_rules else 1, HAS_RULES=has_rules,
                  HAS_DROPOUT=dropout_p > 0, DOT_PRECISION=dot_precision(q.dtype))
    return seg, mod, windows, items, rules, scalars, consts


def _strides(*tensors):
    return [s for t in tensors for s in t.stride()[:3]]


def tma_setting() -> str:
    """VIDEOBERT_ATTENTION_TMA: "auto" (default: on sm_90 and newer the autotuner times the TMA path beside the
    pointer path), "1" (the TMA path wherever a launch allows it, also under the interpreter; the first TMA config
    untuned) or "0" (the pointer path only)."""
    setting = os.environ.get("VIDEOBERT_ATTENTION_TMA", "auto")
    if setting not in ("auto", "0", "1"):
        raise ValueError(f"VIDEOBERT_ATTENTION_TMA must be auto, 0 or 1, got {setting!r}")
    return setting


def tma_aligned(*tensors: torch.Tensor) -> bool:
    """Whether (B, L, H, D) tensors suit tensor descriptors: unit head-dim stride, 16-byte aligned start and
    batch, row and head strides (a descriptor per (batch, head) slice starts at a 16-byte boundary)."""
    return all(t.stride(3) == 1 and t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0
                                                                    for s in t.stride()[:3]) for t in tensors)


def tma_mode(*tensors: torch.Tensor) -> int:
    """How a launch on these (B, L, H, D) tensors may use the TMA path: 0 never, 1 the autotuner chooses, 2 always
    (see `tma_setting`). Needs sm_90 or newer (or the interpreter, when asked for) and `tma_aligned` tensors."""
    setting = tma_setting()
    device = tensors[0].device
    if setting == "0" or (device.type == "cuda" and arch_major(device) < 9) \
            or (device.type != "cuda" and setting == "auto") or not tma_aligned(*tensors):
        return 0
    return 2 if setting == "1" else 1


def ws_setting() -> str:
    """VIDEOBERT_ATTENTION_WS: "0" (default: the warp-specialised forward has compiled, not yet run, on this code),
    "auto" (on sm_90 the autotuner times its configs beside the others) or "1" (it wherever a launch allows it,
    also under the interpreter; the first config untuned)."""
    setting = os.environ.get("VIDEOBERT_ATTENTION_WS", "0")
    if setting not in ("auto", "0", "1"):
        raise ValueError(f"VIDEOBERT_ATTENTION_WS must be auto, 0 or 1, got {setting!r}")
    return setting


def ws_mode(tma: int, has_rules: bool, q: torch.Tensor) -> int:
    """How a forward launch on `q` in TMA mode `tma` may take the warp-specialised path: 0 never, 1 the autotuner
    chooses, 2 always (see `ws_setting`). Needs the TMA path, no rules, and on a GPU sm_90 (Triton's Hopper pass;
    newer GPUs have another) and 16-bit inputs (with fp32 ones the pass fails on TF32 dots and leaves IEEE ones
    alone); the interpreter takes it when asked for."""
    setting = ws_setting()
    if setting == "0" or not tma or has_rules:
        return 0
    if q.is_cuda and (arch_major(q.device) != 9 or q.dtype not in (torch.float16, torch.bfloat16)):
        return 0
    if not q.is_cuda and setting == "auto":
        return 0
    return 2 if setting == "1" else 1


def _programs(kind: str, L: int, block: int, dropout: bool) -> int:
    """Programs per (batch, head) of a kernel whose own blocks hold `block` positions: one per work item, so
    MAX_ITEMS_PER_BLOCK per fixed block (those past a row's last item return at once), or one per fixed block where
    the kernel takes fixed blocks (the key-side kernels under dropout, `fixed_key_blocks`)."""
    return cdiv(L, block) * (1 if kind in ("bwd", "dkdv") and fixed_key_blocks(dropout) else MAX_ITEMS_PER_BLOCK)


def _launch(tuned, kind, grid_dim, args, scalars, consts, device_is_cuda) -> tuple:
    """Launch a kernel of TUNED (autotuned, or untuned its first candidate); returns (BLOCK_M, path) of the launch."""
    B, H, L, dropout = scalars["B"], scalars["H"], scalars["L"], consts["HAS_DROPOUT"]
    if device_is_cuda and scalars["TMA_MODE"]:
        ensure_allocator()  # descriptors are built on the device, in a scratch buffer per launch
    if device_is_cuda and autotune_enabled():
        grid = lambda meta: (_programs(kind, L, meta[grid_dim], dropout), B * H)  # noqa: E731
        tuned[grid](*args, **scalars, **consts)
        return tuned.best_config.kwargs["BLOCK_M"], config_path(tuned.best_config)
    if device_is_cuda:
        (block_m, block_n, warps, stages), path = path_candidates(
            kind, consts["BLOCK_D"], scalars["L_BUCKET"], arch_major(args[0].device), consts["HAS_DROPOUT"],
            scalars["TMA_MODE"], scalars.get("WS_MODE", 0))[0]
        options = dict(num_warps=warps, num_stages=stages)
    else:
        (block_m, block_n), options = INTERPRET_CONFIG[kind], {}
        path = "ws" if scalars.get("WS_MODE") == 2 else "tma" if scalars["TMA_MODE"] == 2 else "pointer"
    if path == "ws":
        options["WARP_SPECIALIZE"] = True
    block = block_m if grid_dim == "BLOCK_M" else block_n
    tuned.fn[(_programs(kind, L, block, dropout), B * H)](*args, **scalars, **consts, BLOCK_M=block_m,
                                                          BLOCK_N=block_n, USE_TMA=path != "pointer", **options)
    return block_m, path


def segment_attention_fwd(q, k, v, segment_ids, modality_ids, modality_rules, dropout_p, softmax_scale, rng):
    """Forward launcher: (out (B, L, H, D) contiguous, lse (B, H, L) fp32, +inf on rows with no allowed key)."""
    B, L, H, D = q.shape
    out = torch.empty((B, L, H, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, L), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse.fill_(float("inf"))
    seg, mod, windows, items, rules, scalars, consts = _common(q, segment_ids, modality_ids, modality_rules,
                                                               dropout_p, rng)
    tma = tma_mode(q, k, v, out)
    scalars = dict(scalars, scale_log2=softmax_scale * LOG2E, TMA_MODE=tma,
                   WS_MODE=ws_mode(tma, consts["HAS_RULES"], q))
    args = [q, k, v, out, lse, seg, mod, windows, rules, items, *_strides(q, k, v, out), items.stride(1)]
    block_m, path = _launch(TUNED["fwd"], "fwd", "BLOCK_M", args, scalars, consts, q.is_cuda)
    if path == "ws":  # its items of more than one id (rows that keep fixed blocks): the pointer kernel, same blocks
        if q.is_cuda:
            block_n, warps, stages = next(
                e[0] for e in FWD_TABLE if e[0][0] == block_m
                and serves(e, consts["BLOCK_D"], arch_major(q.device), consts["HAS_DROPOUT"]))[1:]
            options = dict(num_warps=warps, num_stages=stages)
        else:
            block_n, options = INTERPRET_CONFIG["fwd"][1], {}
        TUNED["fwd"].fn[(_programs("fwd", L, block_m, False), B * H)](
            *args, **scalars, **consts, BLOCK_M=block_m, BLOCK_N=block_n, USE_TMA=False, MIXED_ITEMS=True, **options)
    return out, lse


def segment_attention_bwd(dout, q, k, v, out, lse, segment_ids, modality_ids, modality_rules, dropout_p,
                          softmax_scale, rng, deterministic):
    """Backward launcher: (dq, dk, dv) contiguous in q's dtype. One kernel per key block adds dQ into an fp32
    buffer with atomics (summation order varies from run to run); `deterministic`, and launches the atomic
    kernel has no spill-free config for, run a dK/dV kernel and a dQ kernel instead (bit-reproducible, two more
    GEMMs per tile pair)."""
    B, L, H, D = q.shape
    dk, dv = (torch.empty((B, L, H, D), device=q.device, dtype=q.dtype) for _ in range(2))
    if dk.numel() == 0:
        return torch.empty_like(dk), dk, dv
    seg, mod, windows, items, rules, scalars, consts = _common(q, segment_ids, modality_ids, modality_rules,
                                                               dropout_p, rng)
    if q.is_cuda and not atomic_backward_serves(consts["BLOCK_D"], arch_major(q.device),
                                                consts["HAS_DROPOUT"]):
        deterministic = True
    delta = torch.empty((B, H, L), device=q.device, dtype=torch.float32)
    dq = torch.empty((B, L, H, D), device=q.device, dtype=q.dtype if deterministic else torch.float32)
    block = 64 if q.is_cuda else 32
    _segment_attention_bwd_preprocess_kernel[(cdiv(L, block), B * H)](
        out, dout, delta, dq, *_strides(out, dout), H, L, HEAD_DIM=D, BLOCK_D=consts["BLOCK_D"], BLOCK_M=block,
        ZERO_DQ=not deterministic)
    scalars = dict(scalars, scale=softmax_scale, scale_log2=softmax_scale * LOG2E)
    strides = _strides(q, k, v, dout)
    kind = "dkdv" if deterministic else "bwd"
    _launch(TUNED[kind], kind, "BLOCK_N", [q, k, v, dout, lse, delta, dk, dv, dq, seg, mod, windows, rules, items,
                                           *strides, *_strides(dk), items.stride(1)],
            dict(scalars, TMA_MODE=tma_mode(q, dout)), dict(consts, ATOMIC_DQ=not deterministic), q.is_cuda)
    if deterministic:
        _launch(TUNED["dq"], "dq", "BLOCK_M", [q, k, v, dout, lse, delta, dq, seg, mod, windows, rules, items,
                                               *strides, *_strides(dq), items.stride(1)],
                dict(scalars, TMA_MODE=tma_mode(k, v)), consts, q.is_cuda)
        return dq, dk, dv
    grad = dq if q.dtype == torch.float32 else torch.empty_like(dk)
    block = 1024
    _scale_cast_kernel[(cdiv(dq.numel(), block),)](dq, grad, dq.numel(), softmax_scale, BLOCK=block)
    return grad, dk, dv


def unsupported(device: torch.device, dtype: torch.dtype, head_dim: int = 0, num_modalities: int = 0,
                **_) -> Optional[str]:
    """Why this backend cannot take these inputs, or None."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} is not supported (float16, bfloat16, float32)"
    if head_dim > MAX_HEAD_DIM:
        return f"head dim {head_dim} is larger than {MAX_HEAD_DIM}"
    if num_modalities > MAX_MODALITIES:
        return f"{num_modalities} modalities; the Triton kernel takes at most {MAX_MODALITIES}"
    return None
