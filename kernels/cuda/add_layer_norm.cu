// Residual add + dropout + LayerNorm, forward and backward, in CUDA C++ (no framework headers).
//
// A row is handled by a group of TPR threads: one warp per row (4 rows per 128-thread block) for small hidden
// sizes, one block of up to 512 threads per row for large ones (hidden <= 8192; 4096 unvectorised). Each thread
// keeps up to 16 values of its row in registers, loaded as 16-byte vectors when the hidden size divides by the
// vector width (groups of 4 scalar accesses otherwise); reductions are warp shuffles plus shared memory across
// warps. The backward runs blocks of at least 256 threads (several row groups when rows are short), as many
// as fill the device once, each writing fp32 partial sums of dweight/dbias that a second kernel reduces over
// blocks (no atomics).
#include <algorithm>

#include "common.cuh"
#include "philox.cuh"
#include "videobert_kernels.h"

namespace {

using namespace vb;

constexpr int kItems = 16;  // values of a row per thread
// Threads per row at most: 16 values x 512 threads cover hidden sizes up to 8192 on the vectorised path; the
// scalar path keeps more addresses live, so it is capped at 256 threads (255 registers, no spills): 4096.
constexpr int max_threads(bool vectorized) { return vectorized ? 512 : 256; }

// Drop-mask multipliers (0 or drop_scale) of VEC consecutive columns starting at `col` (a multiple of VEC):
// one Philox call per 4 columns.
template <int VEC>
__device__ __forceinline__ void dropout_scale(uint64_t seed, uint32_t offset, int64_t row, int col,
                                              int32_t threshold, float drop_scale, float* out) {
  PhiloxWords words{};
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const int c = col + j;
    if (j % 4 == 0) {
      words = philox4x32_10(seed, static_cast<uint32_t>(c >> 2), static_cast<uint32_t>(row),
                            static_cast<uint32_t>(static_cast<uint64_t>(row) >> 32), offset);
    }
    // For VEC >= 4, col is a multiple of 4, so the word index is the constant j % 4.
    const uint32_t word = VEC >= 4 ? words[j % 4] : words[c & 3];
    out[j] = (word >> 1) >= static_cast<uint32_t>(threshold) ? drop_scale : 0.f;
  }
}

template <typename T, typename W, int VEC, bool VECTORIZED>
__global__ void __launch_bounds__(max_threads(VECTORIZED)) add_layer_norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ residual,
                                          const W* __restrict__ weight, const W* __restrict__ bias,
                                          T* __restrict__ out, T* __restrict__ s_out, float* __restrict__ mean_out,
                                          float* __restrict__ rstd_out, int64_t rows, int64_t n, int tpr, float eps,
                                          const int64_t* __restrict__ rng, int32_t threshold, float drop_scale,
                                          int has_dropout) {
  constexpr int kVecs = kItems / VEC;
  __shared__ float smem[kWarp];
  const int groups = blockDim.x / tpr, group = threadIdx.x / tpr, t = threadIdx.x % tpr;
  const uint64_t seed = has_dropout ? static_cast<uint64_t>(rng[0]) : 0;  // read here, not at launch: graph-safe
  const uint32_t offset = has_dropout ? static_cast<uint32_t>(rng[1]) : 0;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * groups + group; row < rows;
       row += static_cast<int64_t>(gridDim.x) * groups) {
    const int64_t base = row * n;
    float v[kVecs][VEC];
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < kVecs; ++k) {
      const int col = (k * tpr + t) * VEC;  // < 2^31: n <= 8192
      float r[VEC], keep[VEC];
      load<T, VEC, VECTORIZED>(x + base, col, n, v[k]);
      load<T, VEC, VECTORIZED>(residual == nullptr ? nullptr : residual + base, col, n, r);
      if (has_dropout) {
        dropout_scale<VEC>(seed, offset, row, col, threshold, drop_scale, keep);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) keep[j] = 1.f;
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        v[k][j] = to_float(from_float<T>(v[k][j] * keep[j] + r[j]));  // s is rounded to T, as stored
        sum += v[k][j];
      }
      store<T, VEC, VECTORIZED>(s_out + base, col, n, v[k]);
    }
    const float mean = group_sum(sum, tpr, smem) / n;
    float sq = 0.f;
#pragma unroll
    for (int k = 0; k < kVecs; ++k) {
      const int col = (k * tpr + t) * VEC;  // < 2^31: n <= 8192
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = col + j < n ? v[k][j] - mean : 0.f;
        sq += d * d;
      }
    }
    const float rstd = rsqrtf(group_sum(sq, tpr, smem) / n + eps);
#pragma unroll
    for (int k = 0; k < kVecs; ++k) {
      const int col = (k * tpr + t) * VEC;  // < 2^31: n <= 8192
      float w[VEC], b[VEC], o[VEC];
      load<W, VEC, VECTORIZED>(weight, col, n, w);
      load<W, VEC, VECTORIZED>(bias, col, n, b);
#pragma unroll
      for (int j = 0; j < VEC; ++j) o[j] = (v[k][j] - mean) * rstd * w[j] + b[j];
      store<T, VEC, VECTORIZED>(out + base, col, n, o);
    }
    if (t == 0) {
      mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
  }
}

template <typename T, typename W, int VEC, bool VECTORIZED>
__global__ void __launch_bounds__(max_threads(VECTORIZED)) add_layer_norm_bwd_kernel(const T* __restrict__ dout, const T* __restrict__ ds_extra,
                                          const T* __restrict__ s, const float* __restrict__ mean_in,
                                          const float* __restrict__ rstd_in, const W* __restrict__ weight,
                                          T* __restrict__ dx, T* __restrict__ dresidual,
                                          float* __restrict__ dw_partial, float* __restrict__ db_partial,
                                          int64_t rows, int64_t n, int tpr, const int64_t* __restrict__ rng,
                                          int32_t threshold, float drop_scale, int has_dropout) {
  constexpr int kVecs = kItems / VEC;
  __shared__ float smem[kWarp];
  const int groups = blockDim.x / tpr, group = threadIdx.x / tpr, t = threadIdx.x % tpr;
  const uint64_t seed = has_dropout ? static_cast<uint64_t>(rng[0]) : 0;
  const uint32_t offset = has_dropout ? static_cast<uint32_t>(rng[1]) : 0;
  float dw[kVecs][VEC], db[kVecs][VEC];
#pragma unroll
  for (int k = 0; k < kVecs; ++k) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) dw[k][j] = db[k][j] = 0.f;
  }
  // Every group of the block runs the same number of iterations (group_sum synchronises the block); a group
  // past the last row works on an empty row (row_n = 0: loads give zeros, stores write nothing).
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * groups; first < rows;
       first += static_cast<int64_t>(gridDim.x) * groups) {
    const int64_t row = first + group, row_n = row < rows ? n : 0, base = row < rows ? row * n : 0;
    const float mean = row_n ? mean_in[row] : 0.f, rstd = row_n ? rstd_in[row] : 0.f;
    float xhat[kVecs][VEC];
    float sum_g = 0.f, sum_gx = 0.f;
#pragma unroll
    for (int k = 0; k < kVecs; ++k) {
      const int col = (k * tpr + t) * VEC;  // < 2^31: n <= 8192
      float sv[VEC], dov[VEC], w[VEC];
      load<T, VEC, VECTORIZED>(s + base, col, row_n, sv);
      load<T, VEC, VECTORIZED>(dout + base, col, row_n, dov);
      load<W, VEC, VECTORIZED>(weight, col, n, w);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        xhat[k][j] = col + j < row_n ? (sv[j] - mean) * rstd : 0.f;
        const float g = __fmul_rn(dov[j], w[j]);  // rounded exactly as in the second pass (no FMA contraction)
        sum_g += g;
        sum_gx += g * xhat[k][j];
        dw[k][j] += dov[j] * xhat[k][j];
        db[k][j] += dov[j];
      }
    }
    const float c_mean = group_sum(sum_g, tpr, smem) / n;
    const float c_xhat = group_sum(sum_gx, tpr, smem) / n;
#pragma unroll
    for (int k = 0; k < kVecs; ++k) {
      const int col = (k * tpr + t) * VEC;
      // dout and weight are read again (L1-resident) rather than held in registers across the reduction.
      float dov[VEC], w[VEC], extra[VEC], ds[VEC], keep[VEC];
      load<T, VEC, VECTORIZED>(dout + base, col, row_n, dov);
      load<W, VEC, VECTORIZED>(weight, col, n, w);
      load<T, VEC, VECTORIZED>(ds_extra == nullptr ? nullptr : ds_extra + base, col, row_n, extra);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        ds[j] = rstd * (__fmul_rn(dov[j], w[j]) - c_mean - xhat[k][j] * c_xhat) + extra[j];
      }
      if (dresidual != nullptr) store<T, VEC, VECTORIZED>(dresidual + base, col, row_n, ds);
      if (has_dropout) {
        dropout_scale<VEC>(seed, offset, row, col, threshold, drop_scale, keep);
#pragma unroll
        for (int j = 0; j < VEC; ++j) ds[j] *= keep[j];
      }
      store<T, VEC, VECTORIZED>(dx + base, col, row_n, ds);
    }
  }
  // Combine the row groups of this block (one per warp in warp-per-row mode), then write the block's partials.
  extern __shared__ float partial[];  // groups x (n) floats when groups > 1
  for (int pass = 0; pass < (db_partial != nullptr ? 2 : 1); ++pass) {
    float* dst = (pass == 0 ? dw_partial : db_partial) + static_cast<int64_t>(blockIdx.x) * n;
#pragma unroll
    for (int k = 0; k < kVecs; ++k) {
      const int col = (k * tpr + t) * VEC;  // < 2^31: n <= 8192
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        if (col + j >= n) continue;
        const float value = pass == 0 ? dw[k][j] : db[k][j];
        if (groups == 1) dst[col + j] = value;
        else partial[group * n + col + j] = value;
      }
    }
    if (groups > 1) {
      __syncthreads();
      for (int64_t c = threadIdx.x; c < n; c += blockDim.x) {
        float total = 0.f;
        for (int gi = 0; gi < groups; ++gi) total += partial[gi * n + c];
        dst[c] = total;
      }
      __syncthreads();
    }
  }
}

// out[c] = sum over g < partial_rows of partial[g, c], in W. A block of kSumCols x kSumRows threads takes
// kSumCols columns: each thread sums a strided subset of the partial rows, then shared memory adds those up
// (a thousand partial rows would otherwise be a serial loop per column).
constexpr int kSumCols = 32, kSumRows = 16;

template <typename W>
__global__ void __launch_bounds__(kSumCols * kSumRows) column_sum_kernel(const float* __restrict__ partial,
                                                                       W* __restrict__ out, int64_t partial_rows,
                                                                       int64_t n) {
  __shared__ float sums[kSumRows][kSumCols + 1];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kSumCols + threadIdx.x;
  float total = 0.f;
  if (c < n) {
#pragma unroll 4
    for (int64_t g = threadIdx.y; g < partial_rows; g += kSumRows) total += partial[g * n + c];
  }
  sums[threadIdx.y][threadIdx.x] = total;
  __syncthreads();
  if (threadIdx.y == 0 && c < n) {
    for (int r = 1; r < kSumRows; ++r) total += sums[r][threadIdx.x];
    out[c] = from_float<W>(total);
  }
}

// Threads per row: a warp while 16 values per thread cover the row, else the smallest block that does.
int threads_per_row(int64_t n) {
  int tpr = kWarp;
  while (static_cast<int64_t>(tpr) * kItems < n) tpr *= 2;
  return tpr;
}

int block_threads(int tpr) { return tpr == kWarp ? 4 * kWarp : tpr; }

// The backward's launch shape for hidden size n: blocks of at least 256 threads (several row groups when a row
// needs fewer), so that a few blocks per multiprocessor fill it and the per-block dweight/dbias partials stay few;
// shared memory for combining the groups' partials, groups x n floats, at most 256 / tpr x 16 tpr floats = 16 KiB.
struct BwdShape {
  int tpr, threads, groups;
  size_t smem;
};

BwdShape bwd_shape(int64_t n) {
  const int tpr = threads_per_row(n), threads = tpr < 256 ? 256 : tpr, groups = threads / tpr;
  return {tpr, threads, groups, groups > 1 ? static_cast<size_t>(groups) * n * sizeof(float) : 0};
}

// Resident threads per multiprocessor the backward aims for: enough 16-value rows in flight to cover memory
// latency, without so many blocks that the partials' traffic grows.
constexpr int kBwdThreadsPerSm = 1024;

template <typename T, typename W, int VEC, bool VECTORIZED>
int launch_fwd(const void* x, const void* residual, const void* weight, const void* bias, void* out, void* s,
               float* mean, float* rstd, int64_t rows, int64_t n, float eps, const int64_t* rng,
               int32_t threshold, float drop_scale, int has_dropout, cudaStream_t stream) {
  const int tpr = threads_per_row(n), threads = block_threads(tpr), groups = threads / tpr;
  const int64_t blocks = (rows + groups - 1) / groups;
  add_layer_norm_fwd_kernel<T, W, VEC, VECTORIZED><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(residual), static_cast<const W*>(weight),
      static_cast<const W*>(bias), static_cast<T*>(out), static_cast<T*>(s), mean, rstd, rows, n, tpr, eps, rng,
      threshold, drop_scale, has_dropout);
  return static_cast<int>(cudaGetLastError());
}

template <typename T, typename W, int VEC, bool VECTORIZED>
int launch_bwd(const void* dout, const void* ds, const void* s, const float* mean, const float* rstd,
               const void* weight, void* dx, void* dresidual, float* dw_partial, float* db_partial, void* dweight,
               void* dbias, int64_t rows, int64_t n, int64_t partial_rows, const int64_t* rng,
               int32_t threshold, float drop_scale, int has_dropout, cudaStream_t stream) {
  const BwdShape shape = bwd_shape(n);
  add_layer_norm_bwd_kernel<T, W, VEC, VECTORIZED>
      <<<static_cast<unsigned>(partial_rows), shape.threads, shape.smem, stream>>>(
          static_cast<const T*>(dout), static_cast<const T*>(ds), static_cast<const T*>(s), mean, rstd,
          static_cast<const W*>(weight), static_cast<T*>(dx), static_cast<T*>(dresidual), dw_partial, db_partial,
          rows, n, shape.tpr, rng, threshold, drop_scale, has_dropout);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return static_cast<int>(err);
  const unsigned col_blocks = static_cast<unsigned>((n + kSumCols - 1) / kSumCols);
  const dim3 sum_threads(kSumCols, kSumRows);
  column_sum_kernel<W><<<col_blocks, sum_threads, 0, stream>>>(dw_partial, static_cast<W*>(dweight), partial_rows, n);
  if (db_partial != nullptr) {
    column_sum_kernel<W><<<col_blocks, sum_threads, 0, stream>>>(db_partial, static_cast<W*>(dbias), partial_rows,
                                                                 n);
  }
  return static_cast<int>(cudaGetLastError());
}

// Grid of the backward for `rows` rows: the blocks resident at once at about kBwdThreadsPerSm threads per
// multiprocessor (fewer where registers allow fewer), never more than there are row groups; 0 or a CUDA error.
template <typename T, typename W, int VEC, bool VECTORIZED>
int bwd_blocks(int64_t rows, int64_t n, int device, int64_t* blocks) {
  const BwdShape shape = bwd_shape(n);
  int sms = 0, resident = 0;
  cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) {
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, add_layer_norm_bwd_kernel<T, W, VEC, VECTORIZED>,
                                                        shape.threads, shape.smem);
  }
  if (err != cudaSuccess) return static_cast<int>(err);
  const int64_t per_sm = std::max(1, std::min(resident, kBwdThreadsPerSm / shape.threads));
  *blocks = std::max<int64_t>(1, std::min<int64_t>((rows + shape.groups - 1) / shape.groups, per_sm * sms));
  return 0;
}

int max_hidden(bool vectorized) { return max_threads(vectorized) * kItems; }

// Calls F<T, W, VEC, VECTORIZED>::run(args...) for the runtime (dtype, weight_dtype) pair: 16-byte vectors
// when n divides by their width and every pointer is 16-byte aligned, groups of 4 scalar accesses otherwise.
template <template <typename, typename, int, bool> class F, typename T, typename... Args>
int dispatch_vec(int weight_dtype, int64_t n, bool aligned, Args... args) {
  constexpr int kVec = 16 / sizeof(T);
  if (n > max_hidden(aligned && n % kVec == 0)) return static_cast<int>(cudaErrorInvalidValue);
  if (weight_dtype == VB_FLOAT32) {
    return aligned && n % kVec == 0 ? F<T, float, kVec, true>::run(args...) : F<T, float, 4, false>::run(args...);
  }
  return aligned && n % kVec == 0 ? F<T, T, kVec, true>::run(args...) : F<T, T, 4, false>::run(args...);
}

template <template <typename, typename, int, bool> class F, typename... Args>
int dispatch(int dtype, int weight_dtype, int64_t n, bool aligned, Args... args) {
  switch (dtype) {
    case VB_FLOAT32: return dispatch_vec<F, float>(VB_FLOAT32, n, aligned, args...);
    case VB_FLOAT16: return dispatch_vec<F, __half>(weight_dtype, n, aligned, args...);
    case VB_BFLOAT16: return dispatch_vec<F, __nv_bfloat16>(weight_dtype, n, aligned, args...);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

template <typename T, typename W, int VEC, bool VECTORIZED> struct Fwd {
  template <typename... Args> static int run(Args... args) { return launch_fwd<T, W, VEC, VECTORIZED>(args...); }
};
template <typename T, typename W, int VEC, bool VECTORIZED> struct Bwd {
  template <typename... Args> static int run(Args... args) { return launch_bwd<T, W, VEC, VECTORIZED>(args...); }
};
template <typename T, typename W, int VEC, bool VECTORIZED> struct BwdBlocks {
  template <typename... Args> static int run(Args... args) { return bwd_blocks<T, W, VEC, VECTORIZED>(args...); }
};

bool valid_types(int dtype, int weight_dtype) {
  return (dtype == VB_FLOAT32 || dtype == VB_FLOAT16 || dtype == VB_BFLOAT16) &&
         (weight_dtype == dtype || weight_dtype == VB_FLOAT32);
}

}  // namespace

extern "C" {

const char* vb_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int vb_layer_norm_max_hidden(int vectorized) { return max_hidden(vectorized != 0); }

int vb_add_layer_norm_fwd(const void* x, const void* residual, const void* weight, const void* bias, void* out,
                          void* s, float* mean, float* rstd, int64_t rows, int64_t n, int dtype, int weight_dtype,
                          float eps, const int64_t* rng, int32_t threshold, float drop_scale,
                          int has_dropout, int device, void* stream) {
  if (!valid_types(dtype, weight_dtype) || n < 1 || rows < 0 || (has_dropout && rng == nullptr)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (rows == 0) return 0;
  DeviceScope scope(device);
  if (scope.status() != cudaSuccess) return static_cast<int>(scope.status());
  const bool aligned = aligned16({x, residual, weight, bias, out, s});
  return dispatch<Fwd>(dtype, weight_dtype, n, aligned, x, residual, weight, bias, out, s, mean, rstd, rows, n, eps, rng,
                       threshold, drop_scale, has_dropout, static_cast<cudaStream_t>(stream));
}

int vb_add_layer_norm_bwd_blocks(int64_t rows, int64_t n, int dtype, int weight_dtype, int device,
                                 int64_t* blocks) {
  if (!valid_types(dtype, weight_dtype) || n < 1 || rows < 0 || blocks == nullptr) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  DeviceScope scope(device);  // occupancy is queried for the current device
  if (scope.status() != cudaSuccess) return static_cast<int>(scope.status());
  // Sized for the vectorised kernel where n allows it: the scalar one (misaligned pointers) just runs in waves.
  return dispatch<BwdBlocks>(dtype, weight_dtype, n, true, rows, n, device, blocks);
}

int vb_add_layer_norm_bwd(const void* dout, const void* ds, const void* s, const float* mean, const float* rstd,
                          const void* weight, void* dx, void* dresidual, float* dweight_partial,
                          float* dbias_partial, void* dweight, void* dbias, int64_t rows, int64_t n,
                          int64_t partial_rows, int dtype, int weight_dtype, const int64_t* rng,
                          int32_t threshold, float drop_scale, int has_dropout, int device, void* stream) {
  if (!valid_types(dtype, weight_dtype) || n < 1 || rows < 0 || partial_rows < 1 ||
      (has_dropout && rng == nullptr)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  DeviceScope scope(device);
  if (scope.status() != cudaSuccess) return static_cast<int>(scope.status());
  const bool aligned = aligned16({dout, ds, s, weight, dx, dresidual});
  return dispatch<Bwd>(dtype, weight_dtype, n, aligned, dout, ds, s, mean, rstd, weight, dx, dresidual, dweight_partial,
                       dbias_partial, dweight, dbias, rows, n, partial_rows, rng, threshold, drop_scale,
                       has_dropout, static_cast<cudaStream_t>(stream));
}

}  // extern "C"
