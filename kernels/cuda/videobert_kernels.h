// Framework-free entry points of the CUDA kernels: raw device pointers, sizes, the device index and a stream
// (as void*, so that callers need no CUDA headers). Each returns 0 or a CUDA error code (vb_error_string names
// it) and leaves the calling thread's current device as it found it.
#pragma once
#include <cstdint>

extern "C" {

// Element types of tensors, as the binding passes them.
enum VbDtype { VB_FLOAT32 = 0, VB_FLOAT16 = 1, VB_BFLOAT16 = 2 };

const char* vb_error_string(int code);

// Largest hidden size the LayerNorm kernels take: with 16-byte vectors (hidden divisible by 16 / element
// size, 16-byte aligned pointers) or without.
int vb_layer_norm_max_hidden(int vectorized);

// s = residual + dropout(x) (rounded to x's type), out = LN(s) * weight + bias, fp32 mean/rstd per row.
// x, residual, out, s: rows x n of `dtype`; weight, bias: n of `weight_dtype` (x's type or float32).
// residual and bias may be null. Dropout keeps element (row, col) iff the Philox-4x32-10 word
// (col % 4) of counters (col / 4, row low, row high, offset) under key `seed` has top 31 bits >= threshold,
// where rng is a device pointer to int64 (seed, offset), read by the kernel when it runs (so a captured CUDA
// graph replays with whatever the device holds then); null without dropout.
int vb_add_layer_norm_fwd(const void* x, const void* residual, const void* weight, const void* bias, void* out,
                          void* s, float* mean, float* rstd, int64_t rows, int64_t n, int dtype, int weight_dtype,
                          float eps, const int64_t* rng, int32_t threshold, float drop_scale,
                          int has_dropout, int device, void* stream);

// dx (and dresidual, if non-null) from dout, the optional extra gradient of s (ds, may be null), the saved s,
// mean and rstd; per-block fp32 partial sums of dweight and dbias (dbias_partial may be null) in
// partial_rows x n buffers, reduced into dweight/dbias (weight_dtype). partial_rows is the grid size.
int vb_add_layer_norm_bwd(const void* dout, const void* ds, const void* s, const float* mean, const float* rstd,
                          const void* weight, void* dx, void* dresidual, float* dweight_partial,
                          float* dbias_partial, void* dweight, void* dbias, int64_t rows, int64_t n,
                          int64_t partial_rows, int dtype, int weight_dtype, const int64_t* rng,
                          int32_t threshold, float drop_scale, int has_dropout, int device, void* stream);

// Grid (and partial_rows) that vb_add_layer_norm_bwd should be given for `rows` rows of n on `device`: the
// blocks that fill the device once, at most one per row group, at least 1; written to *blocks.
int vb_add_layer_norm_bwd_blocks(int64_t rows, int64_t n, int dtype, int weight_dtype, int device,
                                 int64_t* blocks);

// Per-row softmax cross-entropy of rows x v logits (row stride `stride` elements, of `dtype`) with int64
// labels: loss and lse in float32 (0 on rows whose label is ignore_index), correct = the target logit is a
// maximum (1 byte per row). An out-of-range label gives a NaN loss.
int vb_softmax_cross_entropy_fwd(const void* logits, const int64_t* labels, float* loss, float* lse,
                                 uint8_t* correct, int64_t rows, int64_t v, int64_t stride, int dtype,
                                 int64_t ignore_index, float label_smoothing, int device, void* stream);

// grad = d(loss * dloss + lse * dlse)/d(logits), zero on ignored rows; dlse may be null. grad may be the
// logits buffer itself.
int vb_softmax_cross_entropy_bwd(const void* logits, const int64_t* labels, const float* lse, const float* dloss,
                                 const float* dlse, void* grad, int64_t rows, int64_t v, int64_t stride,
                                 int64_t grad_stride, int dtype, int64_t ignore_index, float label_smoothing,
                                 int device, void* stream);

}  // extern "C"
