"""Dropout masks in Triton, bit-identical to `reference.dropout_keep`: one Philox call per 4 elements."""
import triton
import triton.language as tl


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
