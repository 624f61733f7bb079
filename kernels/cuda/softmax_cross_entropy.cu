// Softmax cross-entropy on given logits, forward and backward, in CUDA C++ (no framework headers).
//
// One block per row. The forward streams the row once with 16-byte loads (when the row length and stride
// divide by the vector width and the pointer is aligned; 4 scalar accesses otherwise), keeping a per-thread
// online (max, sum of exp) and logit sum, merged across the block with warp shuffles and shared memory; the
// target logit is read once. The backward writes each gradient element once and may write into the logits
// buffer itself (every element is read before the same thread overwrites it).
#include <cmath>

#include "common.cuh"
#include "videobert_kernels.h"

namespace {

using namespace vb;

constexpr int kThreads = 256;

struct Stats {
  float m, s, total;  // running max, sum of exp(z - m), sum of z
};

__device__ __forceinline__ Stats merge(Stats a, Stats b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.f, a.total + b.total};
  return {m, a.s * fast_exp(a.m - m) + b.s * fast_exp(b.m - m), a.total + b.total};
}

__device__ __forceinline__ Stats block_merge(Stats v, Stats* smem) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) {
    Stats other{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o),
                __shfl_xor_sync(0xffffffffu, v.total, o)};
    v = merge(v, other);
  }
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  Stats total{-INFINITY, 0.f, 0.f};
  for (int w = 0; w < blockDim.x / kWarp; ++w) total = merge(total, smem[w]);
  return total;
}

template <typename T, int VEC, bool VECTORIZED>
__global__ void __launch_bounds__(kThreads) softmax_ce_fwd_kernel(
    const T* __restrict__ logits, const int64_t* __restrict__ labels, float* __restrict__ loss_out,
    float* __restrict__ lse_out, uint8_t* __restrict__ correct_out, int64_t v, int64_t stride, int64_t ignore_index,
    float label_smoothing) {
  __shared__ Stats smem[kThreads / kWarp];
  const int64_t row = blockIdx.x;
  const int64_t label = labels[row];
  if (label == ignore_index) {  // ignored rows cost one label read
    if (threadIdx.x == 0) {
      loss_out[row] = 0.f;
      lse_out[row] = 0.f;
      correct_out[row] = 0;
    }
    return;
  }
  const T* z = logits + row * stride;
  Stats st{-INFINITY, 0.f, 0.f};
  for (int col = threadIdx.x * VEC; col < v; col += blockDim.x * VEC) {
    float x[VEC];
    load<T, VEC, VECTORIZED>(z, col, v, x);
    float tile_max = -INFINITY, tile_total = 0.f;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if (VECTORIZED || col + j < v) {  // vectorised rows hold whole vectors: no test per element
        tile_max = fmaxf(tile_max, x[j]);
        tile_total += x[j];
      }
    }
    const float m = fmaxf(st.m, tile_max);
    const float shift = m == -INFINITY ? 0.f : m;  // columns all -inf so far (masked logits): exp(-inf) = 0
    float s = st.s * fast_exp(st.m - shift);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if (VECTORIZED || col + j < v) s += fast_exp(x[j] - shift);
    }
    st = {m, s, st.total + tile_total};
  }
  st = block_merge(st, smem);
  if (threadIdx.x == 0) {
    const bool in_range = label >= 0 && label < v;
    const float target = in_range ? to_float(z[label]) : NAN;  // an out-of-range label gives NaN, not a guess
    const float lse = st.m + logf(st.s);
    const float nll = lse - target;
    // Without smoothing the logit sum must not enter: masked (-inf) logits make it -inf, and 0 * inf is NaN.
    loss_out[row] = label_smoothing == 0.f
                        ? nll
                        : (1.f - label_smoothing) * nll + label_smoothing * (lse - st.total / static_cast<float>(v));
    lse_out[row] = lse;
    correct_out[row] = in_range && target >= st.m;
  }
}

template <typename T, int VEC, bool VECTORIZED>
__global__ void __launch_bounds__(kThreads) softmax_ce_bwd_kernel(
    const T* logits, const int64_t* __restrict__ labels, const float* __restrict__ lse_in,
    const float* __restrict__ dloss_in, const float* __restrict__ dlse_in, T* grad, int64_t v, int64_t stride,
    int64_t grad_stride, int64_t ignore_index, float label_smoothing) {
  const int64_t row = blockIdx.x;
  const int64_t label = labels[row];
  const bool valid = label != ignore_index;
  // An ignored row gets lse = +inf and zero upstream gradients: every term vanishes, no select per element.
  const float lse = valid ? lse_in[row] : INFINITY, dloss = valid ? dloss_in[row] : 0.f;
  const float scale = dloss + (valid && dlse_in != nullptr ? dlse_in[row] : 0.f);
  const float uniform = label_smoothing / static_cast<float>(v) * dloss;
  const float hit = (1.f - label_smoothing) * dloss;
  const T* z = logits + row * stride;
  T* g = grad + row * grad_stride;
  for (int col = threadIdx.x * VEC; col < v; col += blockDim.x * VEC) {
    float x[VEC], out[VEC];
    load<T, VEC, VECTORIZED>(z, col, v, x);
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = fast_exp(x[j] - lse) * scale - uniform;
    if (label >= col && label < col + VEC) {  // the target lies in this thread's vector
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[j] -= col + j == label ? hit : 0.f;
    }
    store<T, VEC, VECTORIZED>(g, col, v, out);
  }
}

template <typename T>
int launch_fwd(const void* logits, const int64_t* labels, float* loss, float* lse, uint8_t* correct, int64_t rows,
               int64_t v, int64_t stride, int64_t ignore_index, float label_smoothing, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const T* z = static_cast<const T*>(logits);
  if (aligned16({logits}) && v % kVec == 0 && stride % kVec == 0) {
    softmax_ce_fwd_kernel<T, kVec, true><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        z, labels, loss, lse, correct, v, stride, ignore_index, label_smoothing);
  } else {
    softmax_ce_fwd_kernel<T, 4, false><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        z, labels, loss, lse, correct, v, stride, ignore_index, label_smoothing);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_bwd(const void* logits, const int64_t* labels, const float* lse, const float* dloss, const float* dlse,
               void* grad, int64_t rows, int64_t v, int64_t stride, int64_t grad_stride, int64_t ignore_index,
               float label_smoothing, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const T* z = static_cast<const T*>(logits);
  T* g = static_cast<T*>(grad);
  if (aligned16({logits, grad}) && v % kVec == 0 && stride % kVec == 0 && grad_stride % kVec == 0) {
    softmax_ce_bwd_kernel<T, kVec, true><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        z, labels, lse, dloss, dlse, g, v, stride, grad_stride, ignore_index, label_smoothing);
  } else {
    softmax_ce_bwd_kernel<T, 4, false><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        z, labels, lse, dloss, dlse, g, v, stride, grad_stride, ignore_index, label_smoothing);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" {

int vb_softmax_cross_entropy_fwd(const void* logits, const int64_t* labels, float* loss, float* lse,
                                 uint8_t* correct, int64_t rows, int64_t v, int64_t stride, int dtype,
                                 int64_t ignore_index, float label_smoothing, int device, void* stream) {
  if (rows < 0 || rows > 0x7fffffff || v < 1 || v > 0x7fffffff || stride < v) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (rows == 0) return 0;
  DeviceScope scope(device);
  if (scope.status() != cudaSuccess) return static_cast<int>(scope.status());
  return by_dtype(dtype, [&](auto tag) {
    return launch_fwd<decltype(tag)>(logits, labels, loss, lse, correct, rows, v, stride, ignore_index,
                                     label_smoothing, static_cast<cudaStream_t>(stream));
  });
}

int vb_softmax_cross_entropy_bwd(const void* logits, const int64_t* labels, const float* lse, const float* dloss,
                                 const float* dlse, void* grad, int64_t rows, int64_t v, int64_t stride,
                                 int64_t grad_stride, int dtype, int64_t ignore_index, float label_smoothing,
                                 int device, void* stream) {
  if (rows < 0 || rows > 0x7fffffff || v < 1 || v > 0x7fffffff || stride < v || grad_stride < v) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (rows == 0) return 0;
  DeviceScope scope(device);
  if (scope.status() != cudaSuccess) return static_cast<int>(scope.status());
  return by_dtype(dtype, [&](auto tag) {
    return launch_bwd<decltype(tag)>(logits, labels, lse, dloss, dlse, grad, rows, v, stride, grad_stride,
                                     ignore_index, label_smoothing, static_cast<cudaStream_t>(stream));
  });
}

}  // extern "C"
