"""Dropout masks in Triton, bit-identical to the reference: `philox` (as `tl.philox`, each 32x32-bit product one
wide multiply: attention's), `dropout_keep` (one Philox call per 4 elements, 31-bit thresholds: add + LayerNorm),
`dropout_keep_bytes` (16 per call, 8-bit thresholds, columns in the order an MMA accumulator holds them:
attention), `zero_dropped_16bit` (the same mask applied to 16-bit values two at a time) and `keep_or_zero`, which
applies a boolean mask to values about to be cast to 16 bits."""
import numpy as np
import triton
import triton.language as tl

from videobert._kernels.reference import (ATTENTION_PHILOX_ROUNDS, PHILOX_KEY_A, PHILOX_KEY_B, PHILOX_ROUND_A,
                                          PHILOX_ROUND_B)
from videobert._kernels.triton.launch import interpret_inline_asm

_ROUNDS = tl.constexpr(ATTENTION_PHILOX_ROUNDS)
_KEY_A, _KEY_B = tl.constexpr(PHILOX_KEY_A), tl.constexpr(PHILOX_KEY_B)
_ROUND_A, _ROUND_B = tl.constexpr(PHILOX_ROUND_A), tl.constexpr(PHILOX_ROUND_B)
# Keys per row whose bytes `dropout_keep_bytes` draws together (the 64 its layout is written for): four threads
# of an MMA accumulator row, sixteen bytes (one Philox call) each. Tiles taking whole groups start at multiples.
DROPOUT_GROUP = tl.constexpr(64)

# The high and low words of a 32x32-bit product in one instruction (IMAD.WIDE.U32): `tl.philox` takes them as
# umulhi and mul, two instructions (IMAD.HI, IMAD) that ptxas does not merge.
_MUL_WIDE_ASM = tl.constexpr("{ .reg .b64 t; mul.wide.u32 t, $2, $3; mov.b64 {$1, $0}, t; }")
# A pair of 16-bit values ($1, one register) with each half kept or zeroed by the top bit of the byte of $2 that
# the pair's selector $4 names for it (PRMT's sign-replicating bytes: 8 | byte, twice per half): PRMT and AND.
# With pack=2 each 32-bit operand comes as one register per element: $3 and $5 are the second element's bits and
# selector, equal to the first's within a pair, so unused.
_ZERO_DROPPED_ASM = tl.constexpr("{ .reg .b32 m; prmt.b32 m, $2, 0, $4; and.b32 $0, $1, m; }")
# Selectors of the pairs (columns 8k + 2t, 8k + 2t + 1) of a Philox word: bytes 0 and 1 (k even), 2 and 3 (k odd).
_LOW_BYTES, _HIGH_BYTES = tl.constexpr(0x9988), tl.constexpr(0xBBAA)


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
def _mul_wide(a, b):
    """(high, low) 32-bit words of a * b, uint32 tensors of one shape."""
    return tl.inline_asm_elementwise(_MUL_WIDE_ASM, "=r,=r,r,r", [a, b], dtype=(tl.uint32, tl.uint32),
                                     is_pure=True, pack=1)


@triton.jit
def philox(seed, c0, c1, c2, c3, N_ROUNDS: tl.constexpr):
    """The four words of Philox-4x32 for an integer tensor `seed` (a loaded one; Triton 3.6 has no public
    `tl.to_tensor` for a plain int) and uint32 counters of one shape, as `tl.philox` and `reference.philox`
    (N_ROUNDS rounds)."""
    seed = seed.to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    round_a = tl.full(c0.shape, _ROUND_A, tl.uint32)
    round_b = tl.full(c0.shape, _ROUND_B, tl.uint32)
    for _ in tl.static_range(N_ROUNDS):
        hi_b, lo_b = _mul_wide(c2, round_b)
        hi_a, lo_a = _mul_wide(c0, round_a)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = tl.add(k0, _KEY_A, sanitize_overflow=False)
        k1 = tl.add(k1, _KEY_B, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def dropout_keep(seed, offset, col_start, rows, c2, threshold, BLOCK_COLS: tl.constexpr):
    """(R, BLOCK_COLS) keep-mask for columns col_start + [0, BLOCK_COLS) (col_start a multiple of 4) of the
    rows given as an (R, 1) tensor: counters (column // 4, row, c2, offset), word column % 4."""
    quads = col_start // 4 + tl.arange(0, BLOCK_COLS // 4)
    c0 = (quads[None, :] + rows * 0).to(tl.uint32)
    c1 = (rows + quads[None, :] * 0).to(tl.uint32)
    zero = c0 * 0
    # tl.philox: this is add + LayerNorm's, bound by memory, and a wide product's register pair made its backward
    # spill (8 bytes at 8192 columns on sm_80)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero + c2, zero + offset)
    # join(join(r0, r2), join(r1, r3)) has shape (R, Q, 2, 2) with words in order 0, 1, 2, 3 per quad.
    bits = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (rows.shape[0], BLOCK_COLS))
    return (bits >> 1).to(tl.int32) >= threshold


@triton.jit
def _philox_words(seed, offset, col_start, rows, c2, threshold, BLOCK_COLS: tl.constexpr, KEEP_BITS: tl.constexpr):
    """The Philox words of `reference.dropout_keep_bytes` for columns col_start + [0, BLOCK_COLS) of the rows given
    as an (R, 1) tensor: word 2x + y of call 4g + t at [:, 4g + t, x, y], shape (R, 4 GROUPS, 2, 2) for tiles of
    GROUPS 64-column groups; a narrower tile's part of its group: (R, 4, 2) (32 columns, its x) or (R, 4) (16,
    its x and y). With KEEP_BITS, each byte's top bit says whether it keeps its column (>= threshold), its other
    bits undefined: four bytes compared at once in three instructions. The top bit of (byte | 0x80) -
    (threshold & 0x7F) is whether the byte's low 7 bits reach the threshold's (no byte borrows from the next),
    which decides where the top bits agree; where they differ the byte's own does: the majority of (byte, that
    bit, ~threshold)."""
    calls = (col_start // 64) * 4 + tl.arange(0, 4 * ((BLOCK_COLS + 63) // 64))
    c0 = (calls[None, :] + rows * 0).to(tl.uint32)
    c1 = (rows + calls[None, :] * 0).to(tl.uint32)
    zero = c0 * 0
    r0, r1, r2, r3 = philox(seed, c0, c1, zero + c2, zero + offset, _ROUNDS)
    words = tl.join(tl.join(r0, r2), tl.join(r1, r3))  # join stacks along a new last axis
    if BLOCK_COLS < 64:  # a narrower tile takes its part of the group: x (and for 16 columns y) by its start
        part = (col_start % 64) // BLOCK_COLS
        low, high = tl.split(tl.permute(words, (0, 1, 3, 2)))
        words = tl.where(part // (32 // BLOCK_COLS) == 0, low, high)
        if BLOCK_COLS == 16:
            low, high = tl.split(words)
            words = tl.where(part % 2 == 0, low, high)
    if KEEP_BITS:
        spread = tl.cast(threshold, tl.uint32) * 0x01010101  # not .to: a launch passes a threshold of 1 as a constant
        low = (words | 0x80808080) - (spread & 0x7F7F7F7F)
        words = (words & low) | ((words | low) & ~spread)
    return words


@triton.jit
def _to_columns(x, BLOCK_COLS: tl.constexpr):
    """(R, BLOCK_COLS) from a tensor of `_philox_words`'s shape with two more axes, one value per byte (byte 2 kk +
    e at [..., e, kk]): column 64 g + 8 k + 2 t + e of the tile is byte 2 kk + e of word 2x + y of call 4 g + t,
    with k = 4x + 2y + kk (within a narrower tile's part, k = 2y + kk for 32 columns, kk for 16)."""
    R: tl.constexpr = x.shape[0]
    if BLOCK_COLS >= 64:  # (R, g, t, x, y, e, kk) to (R, g, x, y, kk, t, e)
        x = tl.permute(tl.reshape(x, (R, BLOCK_COLS // 64, 4, 2, 2, 2, 2)), (0, 1, 3, 4, 6, 2, 5))
    elif BLOCK_COLS == 32:  # (R, t, y, e, kk) to (R, y, kk, t, e)
        x = tl.permute(x, (0, 2, 4, 1, 3))
    else:  # (R, t, e, kk) to (R, kk, t, e)
        x = tl.permute(x, (0, 3, 1, 2))
    return tl.reshape(x, (R, BLOCK_COLS))


@triton.jit
def dropout_keep_bytes(seed, offset, col_start, rows, c2, threshold, BLOCK_COLS: tl.constexpr,
                       TRANSPOSED: tl.constexpr = False):
    """(R, BLOCK_COLS) keep-mask as `reference.dropout_keep_bytes` for columns col_start + [0, BLOCK_COLS) of the
    rows given as an (R, 1) tensor, or with TRANSPOSED its (BLOCK_COLS, R) transpose; col_start a multiple of 64,
    or of BLOCK_COLS where that is 16 or 32.
    Each Philox call (`reference.ATTENTION_PHILOX_ROUNDS` rounds) gives the 16 columns 8k + 2t + e (k < 8, e < 2)
    of a 64-column group for one row and t: the columns one thread holds of a row in an MMA accumulator (sm_80's
    mma and sm_90's wgmma alike), so the mask is built in the scores' own registers, with no shuffle through
    shared memory. A transposed mask does go through shared memory: its bytes are moved and tested after, which
    costs fewer instructions than moving booleans (a select to a byte before, a test after)."""
    words = _philox_words(seed, offset, col_start, rows, c2, threshold, BLOCK_COLS, not TRANSPOSED)
    if TRANSPOSED:  # the raw bytes, compared after the move: the compared bits need a test after it anyway, and
        # comparing before cost the atomic backward 37 more instructions per tile
        keep = tl.join(tl.join(words.to(tl.uint8), (words >> 8).to(tl.uint8)),
                       tl.join((words >> 16).to(tl.uint8), (words >> 24).to(tl.uint8)))
        keep = tl.trans(_to_columns(keep, BLOCK_COLS)) >= tl.cast(threshold, tl.uint8)
    else:
        keep = tl.join(tl.join((words & 0x80) != 0, (words & 0x8000) != 0),
                       tl.join((words & 0x800000) != 0, (words & 0x80000000) != 0))
        keep = _to_columns(keep, BLOCK_COLS)
    return keep


@triton.jit
def zero_dropped_16bit(values, seed, offset, col_start, rows, c2, threshold, BLOCK_COLS: tl.constexpr):
    """(R, BLOCK_COLS) 16-bit `values` with the elements `dropout_keep_bytes` drops (same arguments) set to +0.0;
    `values` must be in an MMA accumulator's layout (as the forward's probabilities are), whose consecutive elements
    in a thread are columns 2i, 2i + 1 of a row, the pair the inline PTX takes as one register: in another layout
    Triton may pair other elements, and the mask would be misapplied (tests/test_compile_triton.py checks every
    shipped forward config). Two instructions per pair (PRMT, AND), where booleans cost two per value (a test of
    the compared bit, a select) and a select on 16-bit values two more (LLVM unpacks the pair and packs it again)."""
    bits = _philox_words(seed, offset, col_start, rows, c2, threshold, BLOCK_COLS, True)
    low = tl.full(bits.shape, _LOW_BYTES, tl.uint32)
    high = tl.full(bits.shape, _HIGH_BYTES, tl.uint32)
    selectors = _to_columns(tl.join(tl.join(low, low), tl.join(high, high)), BLOCK_COLS)
    bits = _to_columns(tl.join(tl.join(bits, bits), tl.join(bits, bits)), BLOCK_COLS)
    return tl.inline_asm_elementwise(_ZERO_DROPPED_ASM, "=r,r,r,r,r,r", [values, bits, selectors],
                                     dtype=values.dtype, is_pure=True, pack=2)


@triton.jit
def keep_or_zero(keep, values, scale):
    """`values` where `keep`, else +0.0; `scale` is any positive finite float of the launch (dropout's 1 / (1 - rate)).
    One select per value: the zero is computed (scale * 0.0, which the compiler may not fold), so the select stays
    on the fp32 values; against a constant zero LLVM narrows it past a following cast to 16 bits, onto halves
    packed in pairs (a PRMT per value), and a multiply by the mask as a float costs a second instruction."""
    return tl.where(keep, values, scale * 0.0)


# ---------------------------------------------------------------------------------------------- the interpreter

def _prmt(a: np.ndarray, b, selector: np.ndarray) -> np.ndarray:
    """PTX prmt.b32 (default mode) of uint32 arrays: result byte i is byte (s & 7) of the eight bytes b:a, or that
    byte's top bit copied through it where s & 8, for s the selector's nibble i."""
    source = (np.asarray(b, np.uint64) << np.uint64(32)) | a.astype(np.uint64)
    out = np.zeros(np.broadcast(source, selector).shape, np.uint64)
    for i in range(4):
        nibble = (selector.astype(np.uint64) >> np.uint64(4 * i)) & np.uint64(0xF)
        byte = (source >> (np.uint64(8) * (nibble & np.uint64(7)))) & np.uint64(0xFF)
        signed = np.where(byte & np.uint64(0x80), np.uint64(0xFF), np.uint64(0))
        out |= np.where(nibble & np.uint64(8), signed, byte) << np.uint64(8 * i)
    return out.astype(np.uint32)


def _emulate_mul_wide(pack: int, a: np.ndarray, b: np.ndarray) -> tuple:
    product = a.astype(np.uint64) * b.astype(np.uint64)
    return (product >> np.uint64(32)).astype(np.uint32), product.astype(np.uint32)


def _emulate_zero_dropped(pack: int, values: np.ndarray, bits: np.ndarray, selectors: np.ndarray) -> tuple:
    """Pairs are consecutive elements along the last axis (on a GPU: of a thread's registers in the layout's
    order, the columns 2i, 2i + 1 of an MMA accumulator row); the first element's bits and selector serve both."""
    assert pack == 2
    halves = values.view(np.uint16).astype(np.uint32)
    pairs = (halves[..., 0::2] | (halves[..., 1::2] << np.uint32(16))) & _prmt(bits[..., 0::2], 0,
                                                                                selectors[..., 0::2])
    out = np.empty_like(values.view(np.uint16))
    out[..., 0::2], out[..., 1::2] = pairs & np.uint32(0xFFFF), pairs >> np.uint32(16)
    return (out.view(values.dtype),)


interpret_inline_asm(_MUL_WIDE_ASM.value, _emulate_mul_wide)
interpret_inline_asm(_ZERO_DROPPED_ASM.value, _emulate_zero_dropped)
