"""Dropout masks in Triton, bit-identical to the reference: `dropout_keep` (one Philox call per 4 elements, 31-bit
thresholds: add + LayerNorm) and `dropout_keep_bytes` (16 per call, 8-bit thresholds, columns in the order an MMA
accumulator holds them: attention), and `keep_or_zero`, which applies a mask to values about to be cast to 16 bits."""
import triton
import triton.language as tl

from videobert._kernels.reference import ATTENTION_PHILOX_ROUNDS

_ROUNDS = tl.constexpr(ATTENTION_PHILOX_ROUNDS)
# Keys per row whose bytes `dropout_keep_bytes` draws together (the 64 its layout is written for): four threads
# of an MMA accumulator row, sixteen bytes (one Philox call) each. Tiles taking whole groups start at multiples.
DROPOUT_GROUP = tl.constexpr(64)


@triton.jit
def load_seed(Rng, HAS_DROPOUT: tl.constexpr):
    """(seed, offset) of a dropout launch, read from its int64 (seed, offset) tensor when the kernel runs (not
    passed at launch, so a captured CUDA graph replays with what the device holds then); 0, 0 without dropout.
    The offset keeps its low 32 bits, as a signed int32."""
    if HAS_DROPOUT:
        seed = tl.load(Rng)
        offset = tl.load(Rng + 1).to(tl.int32)
    else:
        seed = 0
        offset = 0
    return seed, offset


@triton.jit
def dropout_keep(seed, offset, col_start, rows, c2, threshold, BLOCK_COLS: tl.constexpr):
    """(R, BLOCK_COLS) keep-mask for columns col_start + [0, BLOCK_COLS) (col_start a multiple of 4) of the
    rows given as an (R, 1) tensor: counters (column // 4, row, c2, offset), word column % 4."""
    quads = col_start // 4 + tl.arange(0, BLOCK_COLS // 4)
    c0 = (quads[None, :] + rows * 0).to(tl.uint32)
    c1 = (rows + quads[None, :] * 0).to(tl.uint32)
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero + c2, zero + offset)
    # join(join(r0, r2), join(r1, r3)) has shape (R, Q, 2, 2) with words in order 0, 1, 2, 3 per quad.
    bits = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (rows.shape[0], BLOCK_COLS))
    return (bits >> 1).to(tl.int32) >= threshold


@triton.jit
def dropout_keep_bytes(seed, offset, col_start, rows, c2, threshold, BLOCK_COLS: tl.constexpr,
                       TRANSPOSED: tl.constexpr = False):
    """(R, BLOCK_COLS) keep-mask as `reference.dropout_keep_bytes` for columns col_start + [0, BLOCK_COLS) of the
    rows given as an (R, 1) tensor, or with TRANSPOSED its (BLOCK_COLS, R) transpose; col_start a multiple of 64,
    or of BLOCK_COLS where that is 16 or 32.
    Each Philox call (`reference.ATTENTION_PHILOX_ROUNDS` rounds) gives the 16 columns 8k + 2t + e (k < 8, e < 2)
    of a 64-column group for one row and t: the columns one thread holds of a row in an MMA accumulator (sm_80's
    mma and sm_90's wgmma alike), so the mask is built in the scores' own registers, with no shuffle through
    shared memory. A transposed mask does go through shared memory: its random bytes are moved and compared
    after, which costs fewer instructions than moving booleans (a select to a byte before, a test after)."""
    GROUPS: tl.constexpr = (BLOCK_COLS + 63) // 64
    calls = (col_start // 64) * 4 + tl.arange(0, 4 * GROUPS)
    c0 = (calls[None, :] + rows * 0).to(tl.uint32)
    c1 = (rows + calls[None, :] * 0).to(tl.uint32)
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero + c2, zero + offset, n_rounds=_ROUNDS)
    # (R, 4G, x, y): word 2x + y (join stacks along a new last axis)
    words = tl.join(tl.join(r0, r2), tl.join(r1, r3))
    # (R, 4G, x, y, e, kk) is byte 2 kk + e of word 2x + y
    if TRANSPOSED:
        keep = tl.join(tl.join(words.to(tl.uint8), (words >> 8).to(tl.uint8)),
                       tl.join((words >> 16).to(tl.uint8), (words >> 24).to(tl.uint8)))
    else:  # each byte compared in place, no shift
        t = tl.cast(threshold, tl.uint32)  # not .to: a launch passes a threshold of 1 as a constant
        keep = tl.join(tl.join((words & 0xFF) >= t, (words & 0xFF00) >= (t << 8)),
                       tl.join((words & 0xFF0000) >= (t << 16), words >= (t << 24)))
    # to columns: group, k = 4x + 2y + kk, t, e
    keep = tl.permute(tl.reshape(keep, (rows.shape[0], GROUPS, 4, 2, 2, 2, 2)), (0, 1, 3, 4, 6, 2, 5))
    if BLOCK_COLS < 64:  # a narrower tile takes its part of the group: x (and for 16 columns y) by its start
        part = (col_start % 64) // BLOCK_COLS
        keep = tl.permute(tl.reshape(keep, (rows.shape[0], 2, 2, 16)), (0, 2, 3, 1))  # (R, y, kk t e, x)
        low, high = tl.split(keep)
        keep = tl.where(part // (32 // BLOCK_COLS) == 0, low, high)
        if BLOCK_COLS == 16:
            low, high = tl.split(tl.permute(keep, (0, 2, 1)))
            keep = tl.where(part % 2 == 0, low, high)
    keep = tl.reshape(keep, (rows.shape[0], BLOCK_COLS))
    if TRANSPOSED:
        keep = tl.trans(keep) >= tl.cast(threshold, tl.uint8)
    return keep


@triton.jit
def keep_or_zero(keep, values, scale):
    """`values` where `keep`, else +0.0; `scale` is any positive finite float of the launch (dropout's 1 / (1 - rate)).
    One select per value: the zero is computed (scale * 0.0, which the compiler may not fold), so the select stays
    on the fp32 values; against a constant zero LLVM narrows it past a following cast to 16 bits, onto halves
    packed in pairs (a PRMT per value), and a multiply by the mask as a float costs a second instruction."""
    return tl.where(keep, values, scale * 0.0)
