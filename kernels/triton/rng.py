"""Dropout masks in Triton, bit-identical to the reference: `dropout_keep` (one Philox call per 4 elements, 31-bit
thresholds: add + LayerNorm) and `dropout_keep_bytes` (16 per call, 8-bit thresholds: attention)."""
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


@triton.jit
def dropout_keep_bytes(seed, offset, col_start, rows, c2, threshold, BLOCK_COLS: tl.constexpr):
    """(R, BLOCK_COLS) keep-mask as `reference.dropout_keep_bytes`, for columns col_start + [0, BLOCK_COLS)
    (col_start a multiple of 16) of the rows given as an (R, 1) tensor: counters (column // 16, row, c2,
    offset), word (column % 16) // 4, byte column % 4; keep iff byte >= threshold. A quarter of the Philox calls
    of `dropout_keep`."""
    groups = col_start // 16 + tl.arange(0, BLOCK_COLS // 16)
    c0 = (groups[None, :] + rows * 0).to(tl.uint32)
    c1 = (rows + groups[None, :] * 0).to(tl.uint32)
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero + c2, zero + offset)
    # (R, G, 4): the four words of each group in order (see dropout_keep), then their bytes, lowest first.
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (rows.shape[0], BLOCK_COLS // 16, 4))
    b0, b1, b2, b3 = words & 255, (words >> 8) & 255, (words >> 16) & 255, words >> 24
    bytes_ = tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), (rows.shape[0], BLOCK_COLS))
    return bytes_.to(tl.int32) >= threshold
