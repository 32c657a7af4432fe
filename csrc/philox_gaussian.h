// z(seed, i): the one definition of the perturbation, shared by the CPU (C++) and CUDA kernels.
//
// The pure-PyTorch reference in seedops/reference.py (z_reference) computes exactly the same float32 bits,
// operation for operation. Change one, change all three, and the tests will tell.
//
//   RNG        Philox4x32-10, key = the 64-bit seed (low word first), counter = (i / 4, 0, 0) as a
//              128-bit number, lane i % 4 of its four 32-bit outputs.
//   gaussian   Box-Muller on (x0, x1) -> (z0, z1) and (x2, x3) -> (z2, z3) of one counter.
//              radius  r = sqrt(-2 log u),  u = ((x >> 8) + 1) * 2^-24      in (0, 1]
//              angle   t = 2 pi k 2^-24,    k = x >> 8                       in [0, 2 pi)
//              z_even = r cos t, z_odd = r sin t.  log, sin and cos are the fixed polynomials below:
//              only IEEE + - * / and sqrt, which every device rounds the same way, and never a fused
//              multiply-add (build with -ffp-contract=off / nvcc --fmad=false).
//   rademacher one bit per element: counter = i / 128, word (i / 32) % 4, bit i % 32; z = bit ? -1 : +1.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define FEDFULL_HD __host__ __device__ __forceinline__
#else
#define FEDFULL_HD inline
#endif

namespace fedfull {

enum Kind : int64_t { kGaussian = 0, kRademacher = 1 };

// Philox4x32-10 constants (Salmon et al., SC'11)
constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

// Box-Muller constants, all float32. ln 2 split so that e * kLn2Hi is exact for |e| <= 24.
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kLogC3 = 0.666666667f;   // log m = 2 atanh s = 2 (s + s^3/3 + s^5/5 + s^7/7 + s^9/9)
constexpr float kLogC5 = 0.4f;
constexpr float kLogC7 = 0.285714286f;
constexpr float kLogC9 = 0.222222222f;
constexpr uint32_t kSqrt2Bits = 0x3FB504F3u;   // float bits of sqrt(2)
constexpr float kTwoPiOver2p24 = 3.74507028e-07f;  // 2 pi / 2^24, rounded to float
constexpr float kSin3 = -1.66666667e-1f;  // Taylor coefficients, |x| <= pi/4
constexpr float kSin5 = 8.33333333e-3f;
constexpr float kSin7 = -1.98412698e-4f;
constexpr float kSin9 = 2.75573192e-6f;
constexpr float kCos2 = -0.5f;
constexpr float kCos4 = 4.16666667e-2f;
constexpr float kCos6 = -1.38888889e-3f;
constexpr float kCos8 = 2.48015873e-5f;
constexpr float kCos10 = -2.75573192e-7f;

FEDFULL_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u; __builtin_memcpy(&u, &f, 4); return u;
#endif
}
FEDFULL_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f; __builtin_memcpy(&f, &u, 4); return f;
#endif
}

struct Philox4 { uint32_t x[4]; };

// Philox4x32-10 of the 128-bit counter (c0, c1, c2, c3) under the key (k0, k1).
FEDFULL_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    if (r) { k0 += kPhiloxW0; k1 += kPhiloxW1; }
    uint64_t p0 = (uint64_t)kPhiloxM0 * c0, p1 = (uint64_t)kPhiloxM1 * c2;
    uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0, n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
    c0 = n0; c1 = (uint32_t)p1; c2 = n2; c3 = (uint32_t)p0;
  }
  return Philox4{{c0, c1, c2, c3}};
}

FEDFULL_HD Philox4 philox_for_counter(uint64_t seed, uint64_t counter) {
  return philox4x32_10((uint32_t)counter, (uint32_t)(counter >> 32), 0u, 0u, (uint32_t)seed, (uint32_t)(seed >> 32));
}

// -2 log u for u = ((x >> 8) + 1) 2^-24: split u = m 2^e with m in [sqrt(1/2), sqrt(2)], then log m by
// the atanh series in s = (m - 1) / (m + 1), |s| <= 0.1716.
FEDFULL_HD float minus_two_log_uniform(uint32_t x) {
  float u = (float)((x >> 8) + 1u) * 5.9604644775390625e-08f;   // exact: 24-bit integer times 2^-24
  uint32_t b = float_bits(u);
  int32_t e = (int32_t)(b >> 23) - 127;
  uint32_t mb = (b & 0x007FFFFFu) | 0x3F800000u;
  if (mb > kSqrt2Bits) { mb -= 0x00800000u; e += 1; }           // m / 2, exactly
  float f = bits_float(mb) - 1.0f;
  float s = f / (2.0f + f);
  float s2 = s * s;
  float t = s2 * (kLogC3 + s2 * (kLogC5 + s2 * (kLogC7 + s2 * kLogC9)));
  float logm = (s + s) + s * t;
  float ef = (float)e;
  float logu = ef * kLn2Hi + (ef * kLn2Lo + logm);
  return -2.0f * logu;
}

// (cos, sin) of 2 pi k 2^-24 for the top 24 bits k of x: quadrant from the top 2 bits (rounded),
// remainder |x| <= pi/4 from the rest (exact), then Taylor polynomials.
FEDFULL_HD void sincos_turn(uint32_t x, float* c, float* s) {
  int32_t k = (int32_t)(x >> 8);
  int32_t qf = (k + (1 << 21)) >> 22;         // 0..4
  int32_t rem = k - (qf << 22);               // [-2^21, 2^21)
  int32_t q = qf & 3;
  float a = (float)rem * kTwoPiOver2p24;
  float a2 = a * a;
  float sp = a + a * (a2 * (kSin3 + a2 * (kSin5 + a2 * (kSin7 + a2 * kSin9))));
  float cp = 1.0f + a2 * (kCos2 + a2 * (kCos4 + a2 * (kCos6 + a2 * (kCos8 + a2 * kCos10))));
  float cc = (q & 1) ? sp : cp, ss = (q & 1) ? cp : sp;
  if (((q + 1) & 2) != 0) cc = -cc;   // q = 1, 2
  if ((q & 2) != 0) ss = -ss;         // q = 2, 3
  *c = cc; *s = ss;
}

// The four gaussian z of one counter: z[4 * counter + l] for l = 0..3.
FEDFULL_HD void gaussian4(uint64_t seed, uint64_t counter, float z[4]) {
  Philox4 r = philox_for_counter(seed, counter);
  for (int h = 0; h < 2; ++h) {
    float rad = sqrtf(minus_two_log_uniform(r.x[2 * h]));
    float c, s;
    sincos_turn(r.x[2 * h + 1], &c, &s);
    z[2 * h] = rad * c;
    z[2 * h + 1] = rad * s;
  }
}

// One gaussian z for global index i: lane i % 4 of counter i / 4, the Box-Muller pair of that lane only. The same
// operations as gaussian4 for that lane, so the same bits (the masked ops compute z one element at a time).
FEDFULL_HD float gaussian_z(uint64_t seed, uint64_t i) {
  Philox4 r = philox_for_counter(seed, i >> 2);
  int l = (int)(i & 3), h = l >> 1;
  float rad = sqrtf(minus_two_log_uniform(r.x[2 * h])), c, s;
  sincos_turn(r.x[2 * h + 1], &c, &s);
  return (l & 1) ? rad * s : rad * c;
}

// One z of either kind for global index i (used by the CUDA kernel's edges and by simple loops).
FEDFULL_HD float rademacher_z(uint64_t seed, uint64_t i) {
  Philox4 r = philox_for_counter(seed, i >> 7);
  uint32_t w = r.x[(i >> 5) & 3];
  return ((w >> (i & 31)) & 1u) ? -1.0f : 1.0f;
}

}  // namespace fedfull
