// Philox-4x32-10, bit-identical to tl.philox and to reference.philox (the dropout masks of every backend).
#pragma once
#include <cstdint>

struct PhiloxWords {
  uint32_t w0, w1, w2, w3;
  // Word i (0..3) without indexing a register array (which would move it to local memory).
  __device__ __forceinline__ uint32_t operator[](int64_t i) const {
    return i == 0 ? w0 : i == 1 ? w1 : i == 2 ? w2 : w3;
  }
};

__device__ __forceinline__ PhiloxWords philox4x32_10(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2,
                                                     uint32_t c3) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi_b = __umulhi(0xCD9E8D57u, c2), lo_b = 0xCD9E8D57u * c2;
    const uint32_t hi_a = __umulhi(0xD2511F53u, c0), lo_a = 0xD2511F53u * c0;
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {c0, c1, c2, c3};
}
