// The native float vector of jpaged's CPU kernels and its loads (jpaged/ops/build.py puts this
// folder on every kernel's include path). The kernels are built with -march=native for the
// CPU they run on: 16 floats with AVX-512, else 8 (AVX2), and register tiles are sized for it
// (32 registers with AVX-512, 16 with AVX2, where a tile made for 32 spills).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
constexpr int VW = 16;
#else
constexpr int VW = 8;
#endif
typedef float vf __attribute__((vector_size(VW * 4)));
typedef uint32_t vu __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
typedef uint16_t vh __attribute__((vector_size(VW * 2)));

// A vector of floats from float32 or bfloat16 (uint16_t) memory: bfloat16 widens exactly
// (its bits are a float32's top half), so bfloat16 data is read at half the bytes.
template <typename T>
inline vf loadv(const T* p);
template <>
inline vf loadv<float>(const float* p) { vf x; std::memcpy(&x, p, sizeof(x)); return x; }
template <>
inline vf loadv<uint16_t>(const uint16_t* p) {
  vh h;
  std::memcpy(&h, p, sizeof(h));
  const vu w = __builtin_convertvector(h, vu) << 16;
  vf x;
  std::memcpy(&x, &w, sizeof(x));
  return x;
}
inline void storev(float* p, vf x) { std::memcpy(p, &x, sizeof(x)); }

// *x in every lane, in one instruction (`vf{} + *x` is an add first: 0 + x is not x for -0).
inline vf broadcast(const float* x) {
#if defined(__AVX512F__)
  return reinterpret_cast<vf>(_mm512_set1_ps(*x));
#else
  return reinterpret_cast<vf>(_mm256_broadcast_ss(x));
#endif
}
