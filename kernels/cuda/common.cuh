// Shared device helpers of the CUDA kernels: float conversions, vector loads/stores, reductions, device scope.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "videobert_kernels.h"

namespace vb {

constexpr int kWarp = 32;

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float(float v) { return v; }
template <> __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float(float v) { return v; }
template <> __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }

// e^x as one MUFU.EX2 (expf's accurate range reduction takes about seven instructions, __expf without -ftz a
// subnormal fix-up of three); results below 2^-126 flush to zero, which no softmax sum or gradient can tell.
__device__ __forceinline__ float fast_exp(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
  return y;
}

// At most 16-byte alignment: wider vectors are loaded as several 16-byte accesses.
template <typename T, int VEC> struct alignas(sizeof(T) * VEC > 16 ? 16 : sizeof(T) * VEC) Vec { T v[VEC]; };

// Loads VEC values at column `col` of `row_ptr` as floats (zeros past n or from a null pointer): one or more
// 16-byte accesses when VECTORIZED (n divides by VEC, pointers aligned), else element by element.
template <typename T, int VEC, bool VECTORIZED>
__device__ __forceinline__ void load(const T* row_ptr, int col, int64_t n, float* out) {
  if (VECTORIZED && row_ptr != nullptr && col < n) {
    Vec<T, VEC> vec = *reinterpret_cast<const Vec<T, VEC>*>(row_ptr + col);
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = to_float(vec.v[j]);
    return;
  }
  const int left = row_ptr == nullptr || VECTORIZED ? 0 : static_cast<int>(n) - col;
  const T* p = row_ptr + col;
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = j < left ? to_float(p[j]) : 0.f;
}

template <typename T, int VEC, bool VECTORIZED>
__device__ __forceinline__ void store(T* row_ptr, int col, int64_t n, const float* in) {
  if (VECTORIZED) {
    if (col < n) {
      Vec<T, VEC> vec;
#pragma unroll
      for (int j = 0; j < VEC; ++j) vec.v[j] = from_float<T>(in[j]);
      *reinterpret_cast<Vec<T, VEC>*>(row_ptr + col) = vec;
    }
    return;
  }
  const int left = static_cast<int>(n) - col;
  T* p = row_ptr + col;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    if (j < left) p[j] = from_float<T>(in[j]);
  }
}

// Sum over the TPR threads of a row group (TPR a power of two >= 32): warp shuffles, then shared memory (one
// float per warp of the block) when the group spans several warps. Every thread of the block must call it
// the same number of times when TPR > 32 (it synchronises the block).
__device__ __forceinline__ float group_sum(float v, int tpr, float* smem) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (tpr == kWarp) return v;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  __syncthreads();  // smem may still be read by the previous reduction
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  const int first = warp / (tpr / kWarp) * (tpr / kWarp);  // this group's first warp
  float total = 0.f;
  for (int w = 0; w < tpr / kWarp; ++w) total += smem[first + w];
  return total;
}

// Whether every pointer (null ones included) is 16-byte aligned, as the vectorised paths need.
inline bool aligned16(std::initializer_list<const void*> pointers) {
  for (const void* p : pointers) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

// f(T{}) for the element type named by a VbDtype code (videobert_kernels.h), or cudaErrorInvalidValue.
template <typename F>
int by_dtype(int dtype, F&& f) {
  switch (dtype) {
    case VB_FLOAT32: return f(float{});
    case VB_FLOAT16: return f(__half{});
    case VB_BFLOAT16: return f(__nv_bfloat16{});
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

// Makes `device` current for its lifetime (kernels launch on the current device), restoring the previous one.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    if (cudaGetDevice(&previous_) == cudaSuccess && previous_ != device) status_ = cudaSetDevice(device);
    else previous_ = -1;
  }
  ~DeviceScope() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  cudaError_t status() const { return status_; }

 private:
  int previous_ = -1;
  cudaError_t status_ = cudaSuccess;
};

}  // namespace vb
