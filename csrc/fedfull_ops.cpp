// fedfull_ops: seed-based perturbation ops for zeroth-order training.
//
//   fedfull::noise(int seed, int offset, int n, int kind, Device? device=None) -> Tensor
//   fedfull::noise_fill_(Tensor(a!) out, int seed, int offset, int kind) -> ()
//   fedfull::perturb_(Tensor(a!) p, int seed, int offset, float scale, int kind) -> ()
//   fedfull::apply_seeds_(Tensor(a!) p, int[] seeds, float[] scales, int offset, int kind) -> ()
//   fedfull::perturb_multi_, apply_seeds_multi_, their _copy_ and _masked_ forms (the schemas at the end)
//   fedfull::noise_masked_fill_(Tensor(a!) out, Tensor idx, int seed, int offset, int kind) -> ()
//   fedfull::simd_level(int force=-2) -> int        (debug: query / force the CPU path)
//
// z is defined in philox_gaussian.h. This file holds the op schemas, the CPU kernels and the Meta
// (shape-only) kernels; fedfull_cuda.cu adds the CUDA kernels under the same names.
//
// CPU kernel layout: the flat tensor is cut into blocks of kBlock elements aligned to the *global* index
// (offset + j), so a block's z never depends on where the tensor starts or how many threads run. Each
// thread generates one block of z into an L1-sized buffer, then streams the parameter through it.
// z generation has three bit-identical paths chosen at run time: AVX-512, AVX2 and scalar.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#if defined(__x86_64__) || defined(__i386__)
#define FEDFULL_X86 1
#include <immintrin.h>
#else
#define FEDFULL_X86 0   // other CPUs: the portable path only (the compiler may still vectorize it)
#endif

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "ops_common.h"
#include "philox_gaussian.h"

namespace fedfull {
namespace {

constexpr int64_t kBlock = 4096;            // elements per block: 1024 gaussian counters, 32 rademacher counters
constexpr int64_t kBlockCounters = kBlock / 4;

// ------------------------------------------------------------------------------------------------
// portable path (philox_gaussian.h per element; no instruction-set specific code)
// ------------------------------------------------------------------------------------------------
// Written as two simple loops over arrays (Philox, then Box-Muller) so that the compiler can vectorize
// them for whatever CPU the build targets; the result is the same as gaussian4() per counter.
void gaussian_block_scalar(uint64_t seed, uint64_t ctr0, float* out, const char* pf) {
  if (pf) __builtin_prefetch(pf);
  alignas(64) uint32_t x[4][kBlockCounters];
  for (int64_t c = 0; c < kBlockCounters; ++c) {
    Philox4 r = philox_for_counter(seed, ctr0 + c);
    for (int l = 0; l < 4; ++l) x[l][c] = r.x[l];
  }
  for (int h = 0; h < 2; ++h) {
    for (int64_t c = 0; c < kBlockCounters; ++c) {
      float rad = sqrtf(minus_two_log_uniform(x[2 * h][c])), cs, sn;
      sincos_turn(x[2 * h + 1][c], &cs, &sn);
      out[4 * c + 2 * h] = rad * cs;
      out[4 * c + 2 * h + 1] = rad * sn;
    }
  }
}

// 32 counters x 4 words x 32 bits = kBlock signs
void rademacher_words(uint64_t seed, uint64_t ctr0, uint32_t* words) {
  for (int64_t c = 0; c < kBlock / 128; ++c) {
    Philox4 r = philox_for_counter(seed, ctr0 + c);
    for (int l = 0; l < 4; ++l) words[4 * c + l] = r.x[l];
  }
}

__attribute__((always_inline)) inline void rademacher_expand(const uint32_t* words, float* out) {
  for (int64_t w = 0; w < kBlock / 32; ++w) {
    uint32_t x = words[w];
    uint32_t* o = reinterpret_cast<uint32_t*>(out + 32 * w);
    for (int b = 0; b < 32; ++b) o[b] = 0x3F800000u | (((x >> b) & 1u) << 31);   // +1.0f or -1.0f
  }
}

#if FEDFULL_X86
// ------------------------------------------------------------------------------------------------
// AVX2 path: Philox with each 32-bit word in a 64-bit lane (the 32x32->64 multiply is vpmuludq),
// 8 counters per step, then Box-Muller on 8 floats at once, then a 4x8 transpose to memory order.
// ------------------------------------------------------------------------------------------------
#define FF_AVX2 __attribute__((target("avx2")))

FF_AVX2 static inline __m256 mtlu_avx2(__m256i x) {   // -2 log u
  const __m256i one = _mm256_set1_epi32(1);
  __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_srli_epi32(x, 8), one)),
                           _mm256_set1_ps(5.9604644775390625e-08f));
  __m256i b = _mm256_castps_si256(u);
  __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(b, 23), _mm256_set1_epi32(127));
  __m256i mb = _mm256_or_si256(_mm256_and_si256(b, _mm256_set1_epi32(0x007FFFFF)), _mm256_set1_epi32(0x3F800000));
  __m256i big = _mm256_cmpgt_epi32(mb, _mm256_set1_epi32((int)kSqrt2Bits));   // -1 where m > sqrt 2
  mb = _mm256_sub_epi32(mb, _mm256_and_si256(big, _mm256_set1_epi32(0x00800000)));
  e = _mm256_sub_epi32(e, big);
  __m256 f = _mm256_sub_ps(_mm256_castsi256_ps(mb), _mm256_set1_ps(1.0f));
  __m256 s = _mm256_div_ps(f, _mm256_add_ps(_mm256_set1_ps(2.0f), f));
  __m256 s2 = _mm256_mul_ps(s, s);
  __m256 t = _mm256_add_ps(_mm256_set1_ps(kLogC7), _mm256_mul_ps(s2, _mm256_set1_ps(kLogC9)));
  t = _mm256_add_ps(_mm256_set1_ps(kLogC5), _mm256_mul_ps(s2, t));
  t = _mm256_add_ps(_mm256_set1_ps(kLogC3), _mm256_mul_ps(s2, t));
  t = _mm256_mul_ps(s2, t);
  __m256 logm = _mm256_add_ps(_mm256_add_ps(s, s), _mm256_mul_ps(s, t));
  __m256 ef = _mm256_cvtepi32_ps(e);
  __m256 logu = _mm256_add_ps(_mm256_mul_ps(ef, _mm256_set1_ps(kLn2Hi)),
                              _mm256_add_ps(_mm256_mul_ps(ef, _mm256_set1_ps(kLn2Lo)), logm));
  return _mm256_mul_ps(_mm256_set1_ps(-2.0f), logu);
}

FF_AVX2 static inline void sincos_avx2(__m256i x, __m256* c, __m256* s) {
  __m256i k = _mm256_srli_epi32(x, 8);
  __m256i qf = _mm256_srli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(1 << 21)), 22);
  __m256i rem = _mm256_sub_epi32(k, _mm256_slli_epi32(qf, 22));
  __m256i q = _mm256_and_si256(qf, _mm256_set1_epi32(3));
  __m256 a = _mm256_mul_ps(_mm256_cvtepi32_ps(rem), _mm256_set1_ps(kTwoPiOver2p24));
  __m256 a2 = _mm256_mul_ps(a, a);
  __m256 t = _mm256_add_ps(_mm256_set1_ps(kSin7), _mm256_mul_ps(a2, _mm256_set1_ps(kSin9)));
  t = _mm256_add_ps(_mm256_set1_ps(kSin5), _mm256_mul_ps(a2, t));
  t = _mm256_add_ps(_mm256_set1_ps(kSin3), _mm256_mul_ps(a2, t));
  t = _mm256_mul_ps(a2, t);
  __m256 sp = _mm256_add_ps(a, _mm256_mul_ps(a, t));
  __m256 u = _mm256_add_ps(_mm256_set1_ps(kCos8), _mm256_mul_ps(a2, _mm256_set1_ps(kCos10)));
  u = _mm256_add_ps(_mm256_set1_ps(kCos6), _mm256_mul_ps(a2, u));
  u = _mm256_add_ps(_mm256_set1_ps(kCos4), _mm256_mul_ps(a2, u));
  u = _mm256_add_ps(_mm256_set1_ps(kCos2), _mm256_mul_ps(a2, u));
  __m256 cp = _mm256_add_ps(_mm256_set1_ps(1.0f), _mm256_mul_ps(a2, u));
  __m256 swap = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(q, _mm256_set1_epi32(1)), _mm256_set1_epi32(1)));
  __m256 cc = _mm256_blendv_ps(cp, sp, swap), ss = _mm256_blendv_ps(sp, cp, swap);
  __m256i negc = _mm256_slli_epi32(_mm256_and_si256(_mm256_add_epi32(q, _mm256_set1_epi32(1)), _mm256_set1_epi32(2)), 30);
  __m256i negs = _mm256_slli_epi32(_mm256_and_si256(q, _mm256_set1_epi32(2)), 30);
  *c = _mm256_xor_ps(cc, _mm256_castsi256_ps(negc));
  *s = _mm256_xor_ps(ss, _mm256_castsi256_ps(negs));
}

FF_AVX2 static inline __m256i pack_lo32_avx2(__m256i a, __m256i b) {   // low words of 4+4 u64 lanes, in order
  __m256 t = _mm256_shuffle_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(b), _MM_SHUFFLE(2, 0, 2, 0));
  return _mm256_permute4x64_epi64(_mm256_castps_si256(t), _MM_SHUFFLE(3, 1, 2, 0));
}

FF_AVX2 static void philox8_avx2(uint64_t seed, uint64_t base, __m256i x[4]) {   // counters base..base+7
  const __m256i M0 = _mm256_set1_epi64x(kPhiloxM0), M1 = _mm256_set1_epi64x(kPhiloxM1);
  const __m256i iota = _mm256_set_epi64x(3, 2, 1, 0);
  __m256i ca = _mm256_add_epi64(_mm256_set1_epi64x((int64_t)base), iota);
  __m256i cb = _mm256_add_epi64(_mm256_set1_epi64x((int64_t)(base + 4)), iota);
  // only the low 32 bits of each lane matter: vpmuludq ignores the high half, the final pack drops it
  __m256i a0 = ca, a1 = _mm256_srli_epi64(ca, 32), a2 = _mm256_setzero_si256(), a3 = a2;
  __m256i b0 = cb, b1 = _mm256_srli_epi64(cb, 32), b2 = a2, b3 = a2;
  uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    if (r) { k0 += kPhiloxW0; k1 += kPhiloxW1; }
    __m256i K0 = _mm256_set1_epi64x(k0), K1 = _mm256_set1_epi64x(k1);
    __m256i pa0 = _mm256_mul_epu32(a0, M0), pa1 = _mm256_mul_epu32(a2, M1);
    __m256i pb0 = _mm256_mul_epu32(b0, M0), pb1 = _mm256_mul_epu32(b2, M1);
    a0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pa1, 32), a1), K0);
    a2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pa0, 32), a3), K1);
    a1 = pa1; a3 = pa0;
    b0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pb1, 32), b1), K0);
    b2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pb0, 32), b3), K1);
    b1 = pb1; b3 = pb0;
  }
  x[0] = pack_lo32_avx2(a0, b0); x[1] = pack_lo32_avx2(a1, b1);
  x[2] = pack_lo32_avx2(a2, b2); x[3] = pack_lo32_avx2(a3, b3);
}

// pf: memory the caller will stream next (or null): fetched a few lines per step while z is computed,
// so the memory pass that follows finds it in cache. A prefetch never faults, even past the end.
FF_AVX2 static void gaussian_block_avx2(uint64_t seed, uint64_t ctr0, float* out, const char* pf) {
  for (int64_t c = 0; c < kBlockCounters; c += 8) {
    if (pf) { _mm_prefetch(pf + 16 * c, _MM_HINT_T0); _mm_prefetch(pf + 16 * c + 64, _MM_HINT_T0); }
    __m256i x[4];
    philox8_avx2(seed, ctr0 + c, x);
    __m256 z[4];
    for (int h = 0; h < 2; ++h) {
      __m256 r = _mm256_sqrt_ps(mtlu_avx2(x[2 * h]));
      __m256 cs, sn;
      sincos_avx2(x[2 * h + 1], &cs, &sn);
      z[2 * h] = _mm256_mul_ps(r, cs);
      z[2 * h + 1] = _mm256_mul_ps(r, sn);
    }
    // transpose: z[l][c] -> out[4c + l]
    __m256 t0 = _mm256_unpacklo_ps(z[0], z[1]), t1 = _mm256_unpackhi_ps(z[0], z[1]);
    __m256 t2 = _mm256_unpacklo_ps(z[2], z[3]), t3 = _mm256_unpackhi_ps(z[2], z[3]);
    __m256 u0 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
    __m256 u1 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
    __m256 u2 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
    __m256 u3 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
    float* o = out + 4 * c;
    _mm256_store_ps(o + 0, _mm256_permute2f128_ps(u0, u1, 0x20));
    _mm256_store_ps(o + 8, _mm256_permute2f128_ps(u2, u3, 0x20));
    _mm256_store_ps(o + 16, _mm256_permute2f128_ps(u0, u1, 0x31));
    _mm256_store_ps(o + 24, _mm256_permute2f128_ps(u2, u3, 0x31));
  }
}

// ------------------------------------------------------------------------------------------------
// AVX-512 path: same structure, 16 counters per step, 3-way XOR in one vpternlogq.
// ------------------------------------------------------------------------------------------------
#define FF_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl")))

FF_AVX512 static inline __m512 mtlu_avx512(__m512i x) {
  __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_srli_epi32(x, 8), _mm512_set1_epi32(1))),
                           _mm512_set1_ps(5.9604644775390625e-08f));
  __m512i b = _mm512_castps_si512(u);
  __m512i e = _mm512_sub_epi32(_mm512_srli_epi32(b, 23), _mm512_set1_epi32(127));
  __m512i mb = _mm512_or_si512(_mm512_and_si512(b, _mm512_set1_epi32(0x007FFFFF)), _mm512_set1_epi32(0x3F800000));
  __mmask16 big = _mm512_cmpgt_epi32_mask(mb, _mm512_set1_epi32((int)kSqrt2Bits));
  mb = _mm512_mask_sub_epi32(mb, big, mb, _mm512_set1_epi32(0x00800000));
  e = _mm512_mask_add_epi32(e, big, e, _mm512_set1_epi32(1));
  __m512 f = _mm512_sub_ps(_mm512_castsi512_ps(mb), _mm512_set1_ps(1.0f));
  __m512 s = _mm512_div_ps(f, _mm512_add_ps(_mm512_set1_ps(2.0f), f));
  __m512 s2 = _mm512_mul_ps(s, s);
  __m512 t = _mm512_add_ps(_mm512_set1_ps(kLogC7), _mm512_mul_ps(s2, _mm512_set1_ps(kLogC9)));
  t = _mm512_add_ps(_mm512_set1_ps(kLogC5), _mm512_mul_ps(s2, t));
  t = _mm512_add_ps(_mm512_set1_ps(kLogC3), _mm512_mul_ps(s2, t));
  t = _mm512_mul_ps(s2, t);
  __m512 logm = _mm512_add_ps(_mm512_add_ps(s, s), _mm512_mul_ps(s, t));
  __m512 ef = _mm512_cvtepi32_ps(e);
  __m512 logu = _mm512_add_ps(_mm512_mul_ps(ef, _mm512_set1_ps(kLn2Hi)),
                              _mm512_add_ps(_mm512_mul_ps(ef, _mm512_set1_ps(kLn2Lo)), logm));
  return _mm512_mul_ps(_mm512_set1_ps(-2.0f), logu);
}

FF_AVX512 static inline void sincos_avx512(__m512i x, __m512* c, __m512* s) {
  __m512i k = _mm512_srli_epi32(x, 8);
  __m512i qf = _mm512_srli_epi32(_mm512_add_epi32(k, _mm512_set1_epi32(1 << 21)), 22);
  __m512i rem = _mm512_sub_epi32(k, _mm512_slli_epi32(qf, 22));
  __m512i q = _mm512_and_si512(qf, _mm512_set1_epi32(3));
  __m512 a = _mm512_mul_ps(_mm512_cvtepi32_ps(rem), _mm512_set1_ps(kTwoPiOver2p24));
  __m512 a2 = _mm512_mul_ps(a, a);
  __m512 t = _mm512_add_ps(_mm512_set1_ps(kSin7), _mm512_mul_ps(a2, _mm512_set1_ps(kSin9)));
  t = _mm512_add_ps(_mm512_set1_ps(kSin5), _mm512_mul_ps(a2, t));
  t = _mm512_add_ps(_mm512_set1_ps(kSin3), _mm512_mul_ps(a2, t));
  t = _mm512_mul_ps(a2, t);
  __m512 sp = _mm512_add_ps(a, _mm512_mul_ps(a, t));
  __m512 u = _mm512_add_ps(_mm512_set1_ps(kCos8), _mm512_mul_ps(a2, _mm512_set1_ps(kCos10)));
  u = _mm512_add_ps(_mm512_set1_ps(kCos6), _mm512_mul_ps(a2, u));
  u = _mm512_add_ps(_mm512_set1_ps(kCos4), _mm512_mul_ps(a2, u));
  u = _mm512_add_ps(_mm512_set1_ps(kCos2), _mm512_mul_ps(a2, u));
  __m512 cp = _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_mul_ps(a2, u));
  __mmask16 swap = _mm512_test_epi32_mask(q, _mm512_set1_epi32(1));
  __m512 cc = _mm512_mask_blend_ps(swap, cp, sp), ss = _mm512_mask_blend_ps(swap, sp, cp);
  __m512i negc = _mm512_slli_epi32(_mm512_and_si512(_mm512_add_epi32(q, _mm512_set1_epi32(1)), _mm512_set1_epi32(2)), 30);
  __m512i negs = _mm512_slli_epi32(_mm512_and_si512(q, _mm512_set1_epi32(2)), 30);
  *c = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(cc), negc));
  *s = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(ss), negs));
}

FF_AVX512 static inline __m512i pack_lo32_avx512(__m512i a, __m512i b) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(a)), _mm512_cvtepi64_epi32(b), 1);
}

// Philox key schedule: round r uses (k0 + r W0, k1 + r W1) mod 2^32
struct KeySchedule {
  uint64_t k0[10], k1[10];
  explicit KeySchedule(uint64_t seed) {
    uint32_t a = (uint32_t)seed, b = (uint32_t)(seed >> 32);
    for (int r = 0; r < 10; ++r, a += kPhiloxW0, b += kPhiloxW1) { k0[r] = a; k1[r] = b; }
  }
};

// Philox of 32 counters (base .. base + 31): the counters sit in 64-bit lanes (low word, then the 32x32->64-bit
// product's halves) through all 10 rounds, as four independent chains of 8 interleaved round by round so the
// multiplier never waits on one chain's latency (about 15% faster than two chains). Output: xa[w] lane j = word
// w of counter base + j, xb[w] of counter base + 16 + j.
FF_AVX512 static inline void philox32_avx512(const KeySchedule& ks, uint64_t base, __m512i xa[4], __m512i xb[4]) {
  const __m512i M0 = _mm512_set1_epi64(kPhiloxM0), M1 = _mm512_set1_epi64(kPhiloxM1);
  const __m512i iota = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  __m512i w0[4], w1[4], w2[4], w3[4];
  __m512i K0 = _mm512_set1_epi64(ks.k0[0]), K1 = _mm512_set1_epi64(ks.k1[0]);
#pragma GCC unroll 4
  for (int h = 0; h < 4; ++h) {  // round 0 on the counter (lo, hi, 0, 0): the second product is 0
    __m512i c = _mm512_add_epi64(_mm512_set1_epi64((int64_t)(base + 8 * h)), iota);
    __m512i p0 = _mm512_mul_epu32(c, M0);
    w0[h] = _mm512_xor_si512(_mm512_srli_epi64(c, 32), K0);
    w1[h] = _mm512_setzero_si512();
    w2[h] = _mm512_xor_si512(_mm512_srli_epi64(p0, 32), K1);
    w3[h] = p0;
  }
  for (int r = 1; r < 10; ++r) {
    K0 = _mm512_set1_epi64(ks.k0[r]); K1 = _mm512_set1_epi64(ks.k1[r]);
    __m512i p0[4], p1[4];
#pragma GCC unroll 4
    for (int h = 0; h < 4; ++h) { p0[h] = _mm512_mul_epu32(w0[h], M0); p1[h] = _mm512_mul_epu32(w2[h], M1); }
#pragma GCC unroll 4
    for (int h = 0; h < 4; ++h) {
      w0[h] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p1[h], 32), w1[h], K0, 0x96);   // a ^ b ^ c
      w2[h] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0[h], 32), w3[h], K1, 0x96);
      w1[h] = p1[h]; w3[h] = p0[h];
    }
  }
  xa[0] = pack_lo32_avx512(w0[0], w0[1]); xa[1] = pack_lo32_avx512(w1[0], w1[1]);
  xa[2] = pack_lo32_avx512(w2[0], w2[1]); xa[3] = pack_lo32_avx512(w3[0], w3[1]);
  xb[0] = pack_lo32_avx512(w0[2], w0[3]); xb[1] = pack_lo32_avx512(w1[2], w1[3]);
  xb[2] = pack_lo32_avx512(w2[2], w2[3]); xb[3] = pack_lo32_avx512(w3[2], w3[3]);
}

// z of 32 counters from ctr: z[g][l] lane j = z of element 4 (ctr + 16 g + j) + l. The four Box-Muller pairs are
// independent, so they are written side by side for the same reason as the Philox chains.
FF_AVX512 static inline void gaussian32_avx512(const KeySchedule& ks, uint64_t ctr, __m512 z[2][4]) {
  __m512i x[2][4];
  philox32_avx512(ks, ctr, x[0], x[1]);
  __m512 r[4], cs[4], sn[4];
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) r[q] = _mm512_sqrt_ps(mtlu_avx512(x[q >> 1][2 * (q & 1)]));
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) sincos_avx512(x[q >> 1][2 * (q & 1) + 1], &cs[q], &sn[q]);
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) {  // q = 2 g + h: group g, Box-Muller pair h -> z[g][2 h], z[g][2 h + 1]
    z[q >> 1][2 * (q & 1)] = _mm512_mul_ps(r[q], cs[q]);
    z[q >> 1][2 * (q & 1) + 1] = _mm512_mul_ps(r[q], sn[q]);
  }
}

// counter-major z[l][j] -> element order o[4 j + l], 64 floats: within 128-bit lanes first, then the 4x4 of
// 128-bit lanes. Moves values only, so it changes no bits.
FF_AVX512 static inline void to_element_order_avx512(const __m512 z[4], float* o) {
  __m512 t0 = _mm512_unpacklo_ps(z[0], z[1]), t1 = _mm512_unpackhi_ps(z[0], z[1]);
  __m512 t2 = _mm512_unpacklo_ps(z[2], z[3]), t3 = _mm512_unpackhi_ps(z[2], z[3]);
  __m512 u0 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));  // counters 4k
  __m512 u1 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));  // 4k + 1
  __m512 u2 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));  // 4k + 2
  __m512 u3 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));  // 4k + 3
  __m512 v0 = _mm512_shuffle_f32x4(u0, u1, 0x44), v1 = _mm512_shuffle_f32x4(u2, u3, 0x44);
  __m512 v2 = _mm512_shuffle_f32x4(u0, u1, 0xEE), v3 = _mm512_shuffle_f32x4(u2, u3, 0xEE);
  _mm512_store_ps(o + 0, _mm512_shuffle_f32x4(v0, v1, 0x88));
  _mm512_store_ps(o + 16, _mm512_shuffle_f32x4(v0, v1, 0xDD));
  _mm512_store_ps(o + 32, _mm512_shuffle_f32x4(v2, v3, 0x88));
  _mm512_store_ps(o + 48, _mm512_shuffle_f32x4(v2, v3, 0xDD));
}

FF_AVX512 static void gaussian_block_avx512(uint64_t seed, uint64_t ctr0, float* out, const char* pf) {
  const KeySchedule ks(seed);
  for (int64_t c = 0; c < kBlockCounters; c += 32) {
    if (pf) {   // 32 counters = 128 floats = 8 cache lines
      for (int l = 0; l < 8; ++l) _mm_prefetch(pf + 16 * c + 64 * l, _MM_HINT_T0);
    }
    __m512 z[2][4];
    gaussian32_avx512(ks, ctr0 + c, z);
    to_element_order_avx512(z[0], out + 4 * c);
    to_element_order_avx512(z[1], out + 4 * (c + 16));
  }
}

// apply_seeds_'s Gaussian step for one seed: acc += s * z over a whole block, with acc kept in the generator's
// counter-major order (acc[4 c + 16 l + j] belongs to element 4 (c + j) + l), so z never goes through a buffer
// or a transpose. Each element gets acc + s * z, the same two roundings as acc_axpy, in the same seed order.
FF_AVX512 static void gaussian_acc_block_avx512(uint64_t seed, uint64_t ctr0, float* acc, float s) {
  const KeySchedule ks(seed);
  const __m512 sv = _mm512_set1_ps(s);
  for (int64_t c = 0; c < kBlockCounters; c += 32) {
    __m512 z[2][4];
    gaussian32_avx512(ks, ctr0 + c, z);
    for (int g = 0; g < 2; ++g)
      for (int l = 0; l < 4; ++l) {
        float* a = acc + 4 * (c + 16 * g) + 16 * l;
        _mm512_store_ps(a, _mm512_add_ps(_mm512_load_ps(a), _mm512_mul_ps(sv, z[g][l])));
      }
  }
}

// a block accumulated by gaussian_acc_block_avx512 -> element order
FF_AVX512 static void gaussian_acc_order_avx512(const float* acc, float* out) {
  for (int64_t c = 0; c < kBlockCounters; c += 16) {
    __m512 z[4];
    for (int l = 0; l < 4; ++l) z[l] = _mm512_load_ps(acc + 4 * c + 16 * l);
    to_element_order_avx512(z, out + 4 * c);
  }
}

#endif  // FEDFULL_X86

// ------------------------------------------------------------------------------------------------
// run-time path selection: 2 = AVX-512, 1 = AVX2, 0 = scalar. FEDFULL_SIMD=0/1/2 or simd_level() caps it.
// ------------------------------------------------------------------------------------------------
int detect_level() {
#if !FEDFULL_X86
  return 0;
#else
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    return 2;
  if (__builtin_cpu_supports("avx2")) return 1;
  return 0;
#endif
}
const int kBestLevel = detect_level();
int initial_level() {
  const char* env = std::getenv("FEDFULL_SIMD");
  if (env && *env) return std::max(0, std::min(kBestLevel, std::atoi(env)));
  return kBestLevel;
}
std::atomic<int> g_level{initial_level()};

int64_t simd_level(int64_t force) {
  // force = -2: query; -1: back to the best this CPU supports; 0/1/2: cap to that path
  if (force == -1) g_level = kBestLevel;
  else if (force >= 0) g_level = (int)std::min<int64_t>(force, kBestLevel);
  return g_level.load();
}

using GenFn = void (*)(uint64_t, uint64_t, float*, const char*);

// ------------------------------------------------------------------------------------------------
// the block loop shared by all ops: z for a global-aligned block, then a per-element update
// ------------------------------------------------------------------------------------------------
// Calls body(b0, j0, j1, zoff) for each block [b0, b0 + kBlock) of global indices that meets [offset, offset + n):
// local indices j0 .. j1 of the tensor, which start at index zoff of the block. Blocks are split among threads.
template <class Body>
void for_blocks(int64_t offset, int64_t n, Body body) {
  if (n <= 0) return;
  int64_t first = offset / kBlock, last = (offset + n - 1) / kBlock;
  at::parallel_for(first, last + 1, 8, [&](int64_t bs, int64_t be) {
    for (int64_t b = bs; b < be; ++b) {
      int64_t g0 = std::max(b * kBlock, offset), g1 = std::min((b + 1) * kBlock, offset + n);
      body(b * kBlock, g0 - offset, g1 - offset, g0 - b * kBlock);
    }
  });
}

// p[j] = round(float(p[j]) + s * z[j]) for j in [0, m). Compiled once per instruction set so that the
// float loop vectorizes for the path in use; every variant does the same IEEE operations.
template <class T>
__attribute__((always_inline)) inline void axpy_round(T* p, const float* z, float s, int64_t m) {
  for (int64_t j = 0; j < m; ++j) p[j] = static_cast<T>(static_cast<float>(p[j]) + s * z[j]);
}
template <class T>
__attribute__((always_inline)) inline void acc_axpy(float* acc, const float* z, float s, int64_t m) {
  for (int64_t j = 0; j < m; ++j) acc[j] = acc[j] + s * z[j];
}
template <class T>
__attribute__((always_inline)) inline void add_round(T* p, const float* acc, int64_t m) {
  for (int64_t j = 0; j < m; ++j) p[j] = static_cast<T>(static_cast<float>(p[j]) + acc[j]);
}

// Rademacher perturb_ of one whole block, straight from the bits: s * (+-1) is s with its sign bit flipped,
// exactly, so no z buffer is needed and the pass stays memory-bound.
template <class T>
__attribute__((always_inline)) inline void rademacher_axpy_block(T* p, const uint32_t* words, float s) {
  const uint32_t sb = float_bits(s);
  for (int64_t w = 0; w < kBlock / 32; ++w) {
    const uint32_t x = words[w];
    T* q = p + 32 * w;
    for (int b = 0; b < 32; ++b) q[b] = static_cast<T>(static_cast<float>(q[b]) + bits_float(sb ^ (((x >> b) & 1u) << 31)));
  }
}

template <class T> void axpy_round_scalar(T* p, const float* z, float s, int64_t m) { axpy_round(p, z, s, m); }
void acc_scalar(float* a, const float* z, float s, int64_t m) { acc_axpy<float>(a, z, s, m); }
template <class T> void add_round_scalar(T* p, const float* a, int64_t m) { add_round(p, a, m); }
void expand_scalar(const uint32_t* w, float* z) { rademacher_expand(w, z); }
template <class T> void rad_block_scalar(T* p, const uint32_t* w, float s) { rademacher_axpy_block(p, w, s); }
#if FEDFULL_X86
template <class T> FF_AVX2 void axpy_round_avx2(T* p, const float* z, float s, int64_t m) { axpy_round(p, z, s, m); }
template <class T> FF_AVX512 void axpy_round_avx512(T* p, const float* z, float s, int64_t m) { axpy_round(p, z, s, m); }
FF_AVX2 void acc_avx2(float* a, const float* z, float s, int64_t m) { acc_axpy<float>(a, z, s, m); }
FF_AVX512 void acc_avx512(float* a, const float* z, float s, int64_t m) { acc_axpy<float>(a, z, s, m); }
template <class T> FF_AVX2 void add_round_avx2(T* p, const float* a, int64_t m) { add_round(p, a, m); }
template <class T> FF_AVX512 void add_round_avx512(T* p, const float* a, int64_t m) { add_round(p, a, m); }
FF_AVX2 void expand_avx2(const uint32_t* w, float* z) { rademacher_expand(w, z); }
FF_AVX512 void expand_avx512(const uint32_t* w, float* z) { rademacher_expand(w, z); }
template <class T> FF_AVX2 void rad_block_avx2(T* p, const uint32_t* w, float s) { rademacher_axpy_block(p, w, s); }
template <class T> FF_AVX512 void rad_block_avx512(T* p, const uint32_t* w, float s) { rademacher_axpy_block(p, w, s); }
#endif

template <class T>
struct Kernels {
  GenFn gen;
  void (*expand)(const uint32_t*, float*);
  void (*axpy)(T*, const float*, float, int64_t);
  void (*acc)(float*, const float*, float, int64_t);
  void (*add)(T*, const float*, int64_t);
  void (*rad_block)(T*, const uint32_t*, float);
  // AVX-512 only (nullptr elsewhere): apply_seeds_'s Gaussian accumulation without a z buffer, and its reorder
  void (*gauss_acc)(uint64_t, uint64_t, float*, float) = nullptr;
  void (*gauss_acc_order)(const float*, float*) = nullptr;
  static Kernels pick() {
#if FEDFULL_X86
    int l = g_level.load();
    if (l >= 2) return {gaussian_block_avx512, expand_avx512, axpy_round_avx512<T>, acc_avx512, add_round_avx512<T>,
                       rad_block_avx512<T>, gaussian_acc_block_avx512, gaussian_acc_order_avx512};
    if (l == 1) return {gaussian_block_avx2, expand_avx2, axpy_round_avx2<T>, acc_avx2, add_round_avx2<T>, rad_block_avx2<T>};
#endif
    return {gaussian_block_scalar, expand_scalar, axpy_round_scalar<T>, acc_scalar, add_round_scalar<T>,
            rad_block_scalar<T>};
  }
  void z(uint64_t seed, int64_t b0, int64_t kind, float* zbuf, uint32_t* words, const void* pf = nullptr) const {
    if (kind == kGaussian) {
      gen(seed, (uint64_t)b0 / 4, zbuf, static_cast<const char*>(pf));
    } else {
      rademacher_words(seed, (uint64_t)b0 / 128, words);
      expand(words, zbuf);
    }
  }
};

// after(j0, j1) runs once a block's elements j0..j1 are final, while they are in cache: nothing for the plain ops,
// the rounding into the compute copy for the *_copy_ ops.
struct NoAfter { void operator()(int64_t, int64_t) const {} };

template <class T, class After = NoAfter>
void perturb_cpu_typed(T* p, uint64_t seed, int64_t offset, int64_t n, float s, int64_t kind, After after = {}) {
  const Kernels<T> k = Kernels<T>::pick();
  for_blocks(offset, n, [&](int64_t b0, int64_t j0, int64_t j1, int64_t zoff) {
    alignas(64) float zbuf[kBlock];
    alignas(64) uint32_t words[kBlock / 32];
    if (kind == kRademacher && j1 - j0 == kBlock) {   // a whole block: no z buffer
      rademacher_words(seed, (uint64_t)b0 / 128, words);
      k.rad_block(p + j0, words, s);
      after(j0, j1);
      return;
    }
    k.z(seed, b0, kind, zbuf, words, p + j0);   // p's block is fetched while its z is computed
    k.axpy(p + j0, zbuf + zoff, s, j1 - j0);
    after(j0, j1);
  });
}

template <class T, class After = NoAfter>
void apply_seeds_cpu_typed(T* p, const std::vector<uint64_t>& seeds, const std::vector<float>& scales, int64_t offset,
                           int64_t n, int64_t kind, After after = {}) {
  const Kernels<T> k = Kernels<T>::pick();
  for_blocks(offset, n, [&](int64_t b0, int64_t j0, int64_t j1, int64_t zoff) {
    alignas(64) float zbuf[kBlock];
    alignas(64) float acc[kBlock];
    alignas(64) uint32_t words[kBlock / 32];
    int64_t m = j1 - j0;
    if (kind == kGaussian && k.gauss_acc) {   // AVX-512: accumulate in the generator's order, reorder once
      std::memset(zbuf, 0, sizeof(zbuf));
      for (size_t s = 0; s < seeds.size(); ++s) k.gauss_acc(seeds[s], (uint64_t)b0 / 4, zbuf, scales[s]);
      k.gauss_acc_order(zbuf, acc);
      k.add(p + j0, acc + zoff, m);
      after(j0, j1);
      return;
    }
    std::memset(acc, 0, sizeof(float) * m);
    for (size_t s = 0; s < seeds.size(); ++s) {   // sum in fp32, in seed order
      k.z(seeds[s], b0, kind, zbuf, words, s + 1 == seeds.size() ? p + j0 : nullptr);
      k.acc(acc, zbuf + zoff, scales[s], m);
    }
    k.add(p + j0, acc, m);
    after(j0, j1);
  });
}

// The compute copy: c[j] = p[j] rounded to nearest even into bfloat16 / float16 (c10's conversions, the same as
// torch's .to()), compiled once per instruction set like the other element loops.
template <class C>
__attribute__((always_inline)) inline void round_into(C* c, const float* p, int64_t m) {
  for (int64_t j = 0; j < m; ++j) c[j] = static_cast<C>(p[j]);
}
template <class C> void round_into_scalar(C* c, const float* p, int64_t m) { round_into(c, p, m); }
#if FEDFULL_X86
template <class C> FF_AVX2 void round_into_avx2(C* c, const float* p, int64_t m) { round_into(c, p, m); }
template <class C> FF_AVX512 void round_into_avx512(C* c, const float* p, int64_t m) { round_into(c, p, m); }
#endif
template <class C>
auto pick_round_into() -> void (*)(C*, const float*, int64_t) {
#if FEDFULL_X86
  int l = g_level.load();
  if (l >= 2) return round_into_avx512<C>;
  if (l == 1) return round_into_avx2<C>;
#endif
  return round_into_scalar<C>;
}

#define FEDFULL_DISPATCH(TYPE, NAME, ...)                                                       \
  switch (TYPE) {                                                                               \
    case at::kFloat: { using scalar_t = float; __VA_ARGS__(); break; }                          \
    case at::kBFloat16: { using scalar_t = at::BFloat16; __VA_ARGS__(); break; }                \
    case at::kHalf: { using scalar_t = at::Half; __VA_ARGS__(); break; }                        \
    default: TORCH_CHECK(false, "fedfull.", NAME, ": unsupported dtype ", TYPE);                \
  }

// ------------------------------------------------------------------------------------------------
// the ops
// ------------------------------------------------------------------------------------------------
void perturb_cpu(const at::Tensor& p, int64_t seed, int64_t offset, double scale, int64_t kind) {
  check_param("perturb_", p); check_offset("perturb_", offset); check_kind("perturb_", kind);
  float s = static_cast<float>(scale);
  FEDFULL_DISPATCH(p.scalar_type(), "perturb_", [&] {
    perturb_cpu_typed<scalar_t>(p.data_ptr<scalar_t>(), (uint64_t)seed, offset, p.numel(), s, kind);
  });
}

void apply_seeds_cpu(const at::Tensor& p, at::IntArrayRef seeds, at::ArrayRef<double> scales, int64_t offset,
                     int64_t kind) {
  check_param("apply_seeds_", p); check_seeds("apply_seeds_", seeds, scales);
  check_offset("apply_seeds_", offset); check_kind("apply_seeds_", kind);
  if (seeds.empty()) return;
  std::vector<uint64_t> sd(seeds.begin(), seeds.end());
  std::vector<float> sc(scales.size());
  for (size_t i = 0; i < sc.size(); ++i) sc[i] = static_cast<float>(scales[i]);
  FEDFULL_DISPATCH(p.scalar_type(), "apply_seeds_", [&] {
    apply_seeds_cpu_typed<scalar_t>(p.data_ptr<scalar_t>(), sd, sc, offset, p.numel(), kind);
  });
}

// a whole model in one call: on CPU a loop over the tensors (each op already splits its tensor among threads);
// on CUDA one launch (csrc/fedfull_cuda.cu)
void perturb_multi_cpu(at::TensorList ps, int64_t seed, at::IntArrayRef offsets, double scale, int64_t kind) {
  check_kind("perturb_multi_", kind); check_many("perturb_multi_", ps, offsets);
  for (size_t i = 0; i < ps.size(); ++i) perturb_cpu(ps[i], seed, offsets[i], scale, kind);
}

void apply_seeds_multi_cpu(at::TensorList ps, at::IntArrayRef seeds, at::ArrayRef<double> scales,
                           at::IntArrayRef offsets, int64_t kind) {
  check_kind("apply_seeds_multi_", kind); check_seeds("apply_seeds_multi_", seeds, scales);
  check_many("apply_seeds_multi_", ps, offsets);
  for (size_t i = 0; i < ps.size(); ++i) apply_seeds_cpu(ps[i], seeds, scales, offsets[i], kind);
}

// The *_copy_multi_ ops (fedkseed --compute_dtype): ps float32, copies bfloat16/float16 of the same sizes. The float32
// result is exactly perturb_multi_'s / apply_seeds_multi_'s; each finished block is rounded into its copy in the
// same pass, so the forwards can read the copy without another pass over memory.
#define FEDFULL_COPY_DISPATCH(TYPE, NAME, ...)                                                  \
  switch (TYPE) {                                                                               \
    case at::kBFloat16: { using copy_t = at::BFloat16; __VA_ARGS__(); break; }                  \
    case at::kHalf: { using copy_t = at::Half; __VA_ARGS__(); break; }                          \
    default: TORCH_CHECK(false, "fedfull.", NAME, ": copies must be bfloat16 or float16, got ", TYPE); \
  }

void perturb_copy_multi_cpu(at::TensorList ps, at::TensorList copies, int64_t seed, at::IntArrayRef offsets,
                            double scale, int64_t kind) {
  check_kind("perturb_copy_multi_", kind); check_many("perturb_copy_multi_", ps, offsets);
  check_copies("perturb_copy_multi_", ps, copies);
  if (ps.empty()) return;
  float s = static_cast<float>(scale);
  FEDFULL_COPY_DISPATCH(copies[0].scalar_type(), "perturb_copy_multi_", [&] {
    const auto round = pick_round_into<copy_t>();
    for (size_t i = 0; i < ps.size(); ++i) {
      float* p = ps[i].data_ptr<float>();
      copy_t* c = copies[i].data_ptr<copy_t>();
      perturb_cpu_typed<float>(p, (uint64_t)seed, offsets[i], ps[i].numel(), s, kind,
                               [&](int64_t j0, int64_t j1) { round(c + j0, p + j0, j1 - j0); });
    }
  });
}

void apply_seeds_copy_multi_cpu(at::TensorList ps, at::TensorList copies, at::IntArrayRef seeds,
                                at::ArrayRef<double> scales, at::IntArrayRef offsets, int64_t kind) {
  check_kind("apply_seeds_copy_multi_", kind); check_seeds("apply_seeds_copy_multi_", seeds, scales);
  check_many("apply_seeds_copy_multi_", ps, offsets); check_copies("apply_seeds_copy_multi_", ps, copies);
  if (ps.empty()) return;
  std::vector<uint64_t> sd(seeds.begin(), seeds.end());
  std::vector<float> sc(scales.size());
  for (size_t i = 0; i < sc.size(); ++i) sc[i] = static_cast<float>(scales[i]);
  FEDFULL_COPY_DISPATCH(copies[0].scalar_type(), "apply_seeds_copy_multi_", [&] {
    const auto round = pick_round_into<copy_t>();
    for (size_t i = 0; i < ps.size(); ++i) {
      float* p = ps[i].data_ptr<float>();
      copy_t* c = copies[i].data_ptr<copy_t>();
      auto after = [&](int64_t j0, int64_t j1) { round(c + j0, p + j0, j1 - j0); };
      if (sd.empty()) after(0, ps[i].numel());   // no seed: the copy still follows the weights
      else apply_seeds_cpu_typed<float>(p, sd, sc, offsets[i], ps[i].numel(), kind, after);
    }
  });
}

// Other devices (CUDA): the plain op, then the copies by torch's own rounding (the same bits; one more pass over
// memory until a fused CUDA kernel lands).
void perturb_copy_multi_composite(at::TensorList ps, at::TensorList copies, int64_t seed, at::IntArrayRef offsets,
                                  double scale, int64_t kind) {
  check_kind("perturb_copy_multi_", kind); check_many("perturb_copy_multi_", ps, offsets);
  check_copies("perturb_copy_multi_", ps, copies);
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fedfull::perturb_multi_", "").typed<void(
      at::TensorList, int64_t, at::IntArrayRef, double, int64_t)>();
  op.call(ps, seed, offsets, scale, kind);
  for (size_t i = 0; i < ps.size(); ++i) copies[i].copy_(ps[i]);
}

void apply_seeds_copy_multi_composite(at::TensorList ps, at::TensorList copies, at::IntArrayRef seeds,
                                      at::ArrayRef<double> scales, at::IntArrayRef offsets, int64_t kind) {
  check_kind("apply_seeds_copy_multi_", kind); check_seeds("apply_seeds_copy_multi_", seeds, scales);
  check_many("apply_seeds_copy_multi_", ps, offsets); check_copies("apply_seeds_copy_multi_", ps, copies);
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fedfull::apply_seeds_multi_", "").typed<void(
      at::TensorList, at::IntArrayRef, at::ArrayRef<double>, at::IntArrayRef, int64_t)>();
  op.call(ps, seeds, scales, offsets, kind);
  for (size_t i = 0; i < ps.size(); ++i) copies[i].copy_(ps[i]);
}

// ------------------------------------------------------------------------------------------------
// masked ops (fedkseed --mask): the same z at a set of each tensor's elements, p[j] += s z(seed, offset + j) for j
// in its mask, nothing elsewhere. A masked element computes its own counter's Philox (consecutive elements of one
// counter share it), so a pass costs in proportion to the mask, not the tensor. The arithmetic per element is the
// dense ops': the same bits at the masked positions.
// ------------------------------------------------------------------------------------------------
struct ZAt {   // z(seed, i) for increasing i: the last counter's Philox and the last Box-Muller pair kept
  uint64_t seed;
  int64_t kind;
  uint64_t ctr = ~0ull;
  int pair = -1;
  Philox4 r{};
  float rad = 0.f, c = 0.f, s = 0.f;
  float operator()(uint64_t i) {
    if (kind == kGaussian) {
      if ((i >> 2) != ctr) { ctr = i >> 2; r = philox_for_counter(seed, ctr); pair = -1; }
      const int l = (int)(i & 3), h = l >> 1;
      if (h != pair) { pair = h; rad = sqrtf(minus_two_log_uniform(r.x[2 * h])); sincos_turn(r.x[2 * h + 1], &c, &s); }
      return (l & 1) ? rad * s : rad * c;   // gaussian_z's value, computed once per pair
    }
    if ((i >> 7) != ctr) { ctr = i >> 7; r = philox_for_counter(seed, ctr); }
    return ((r.x[(i >> 5) & 3] >> (i & 31)) & 1u) ? -1.0f : 1.0f;
  }
};

constexpr int64_t kMaskChunk = 2048;   // masked elements a thread takes at a time

// the mask's values: in [0, n), strictly increasing (checked here, while the CPU kernels read them)
inline void check_mask_values(const char* op, size_t t, const int64_t* idx, int64_t m, int64_t n) {
  for (int64_t k = 0; k < m; ++k)
    TORCH_CHECK(idx[k] >= 0 && idx[k] < n && (k == 0 || idx[k] > idx[k - 1]), "fedfull.", op, ": mask ", t,
                " must hold strictly increasing indices in [0, ", n, "); element ", k, " is ", idx[k]);
}

// z of masked elements [a, b) (global indices offset + idx[k]) into out[k - a], or added: out += s z. Where a
// kBlock-aligned block holds at least 1/kDenseShare masked elements, the block's z comes from the dense generator
// (vectorized) and is gathered; elsewhere each element computes its own (ZAt). The same bits either way.
constexpr int64_t kDenseShare = 24;

template <class Zgen>
void masked_z(const Zgen& k, uint64_t seed, int64_t kind, const int64_t* idx, int64_t a, int64_t b, int64_t offset,
              float s, float* out, bool add) {
  alignas(64) float zbuf[kBlock];
  alignas(64) uint32_t words[kBlock / 32];
  ZAt z{seed, kind};
  for (int64_t q = a; q < b;) {
    const int64_t blk = (offset + idx[q]) / kBlock;
    int64_t e = q + 1;
    while (e < b && (offset + idx[e]) / kBlock == blk) ++e;
    if ((e - q) * kDenseShare >= kBlock) {
      k.z(seed, blk * kBlock, kind, zbuf, words);
      for (int64_t r = q; r < e; ++r) {
        const float v = s * zbuf[offset + idx[r] - blk * kBlock];
        out[r - a] = add ? out[r - a] + v : v;
      }
    } else {
      for (int64_t r = q; r < e; ++r) {
        const float v = s * z((uint64_t)(offset + idx[r]));
        out[r - a] = add ? out[r - a] + v : v;
      }
    }
    q = e;
  }
}

// One tensor's masked elements, split among threads in chunks. sum = false: perturb_'s p + s z (one seed); sum = true:
// apply_seeds_'s acc = 0, acc = acc + s_q z_q in seed order, p + acc (no seed: p is left as it is). Then the copy.
template <class T, class C>
void masked_pass(const char* op, size_t t, T* p, C* c, const int64_t* idx, int64_t m, int64_t n, int64_t offset,
                 const std::vector<uint64_t>& seeds, const std::vector<float>& scales, int64_t kind, bool sum) {
  check_mask_values(op, t, idx, m, n);
  const Kernels<float> k = Kernels<float>::pick();
  at::parallel_for(0, m, kMaskChunk, [&](int64_t k0, int64_t k1) {
    for (int64_t a = k0; a < k1; a += kMaskChunk) {
      const int64_t b = std::min(k1, a + kMaskChunk);
      float acc[kMaskChunk];
      if (!sum) {
        masked_z(k, seeds[0], kind, idx, a, b, offset, scales[0], acc, false);
      } else {
        std::fill(acc, acc + (b - a), 0.0f);
        for (size_t q = 0; q < seeds.size(); ++q) masked_z(k, seeds[q], kind, idx, a, b, offset, scales[q], acc, true);
      }
      for (int64_t r = a; r < b; ++r) {
        const int64_t j = idx[r];
        if (!sum || !seeds.empty()) p[j] = static_cast<T>(static_cast<float>(p[j]) + acc[r - a]);
        if (c) c[j] = static_cast<C>(static_cast<float>(p[j]));
      }
    }
  });
}

void masked_multi_cpu(const char* op, at::TensorList ps, at::TensorList copies, at::TensorList masks,
                      const std::vector<uint64_t>& seeds, const std::vector<float>& scales, at::IntArrayRef offsets,
                      int64_t kind, bool sum) {
  for (size_t i = 0; i < ps.size(); ++i) {
    const int64_t* idx = masks[i].data_ptr<int64_t>();
    const int64_t m = masks[i].numel(), n = ps[i].numel();
    if (copies.empty()) {
      FEDFULL_DISPATCH(ps[i].scalar_type(), op, [&] {
        masked_pass<scalar_t, float>(op, i, ps[i].data_ptr<scalar_t>(), nullptr, idx, m, n, offsets[i], seeds, scales,
                                     kind, sum);
      });
    } else {
      FEDFULL_COPY_DISPATCH(copies[i].scalar_type(), op, [&] {
        masked_pass<float, copy_t>(op, i, ps[i].data_ptr<float>(), copies[i].data_ptr<copy_t>(), idx, m, n,
                                   offsets[i], seeds, scales, kind, sum);
      });
    }
  }
}

void perturb_masked_multi_cpu(at::TensorList ps, at::TensorList copies, at::TensorList masks, int64_t seed,
                              at::IntArrayRef offsets, double scale, int64_t kind) {
  const char* op = "perturb_masked_multi_";
  check_kind(op, kind); check_many(op, ps, offsets); check_masks(op, ps, masks, copies);
  masked_multi_cpu(op, ps, copies, masks, {(uint64_t)seed}, {static_cast<float>(scale)}, offsets, kind, false);
}

void apply_seeds_masked_multi_cpu(at::TensorList ps, at::TensorList copies, at::TensorList masks, at::IntArrayRef seeds,
                                  at::ArrayRef<double> scales, at::IntArrayRef offsets, int64_t kind) {
  const char* op = "apply_seeds_masked_multi_";
  check_kind(op, kind); check_seeds(op, seeds, scales); check_many(op, ps, offsets); check_masks(op, ps, masks, copies);
  std::vector<uint64_t> sd(seeds.begin(), seeds.end());
  std::vector<float> sc(scales.size());
  for (size_t i = 0; i < sc.size(); ++i) sc[i] = static_cast<float>(scales[i]);
  masked_multi_cpu(op, ps, copies, masks, sd, sc, offsets, kind, true);
}

void noise_masked_fill_cpu(const at::Tensor& out, const at::Tensor& idx, int64_t seed, int64_t offset, int64_t kind) {
  const char* op = "noise_masked_fill_";
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 1, "fedfull.", op,
              ": out must be a contiguous 1-D float32 tensor");
  check_masks(op, {out}, {idx}, {}); check_offset(op, offset); check_kind(op, kind);
  TORCH_CHECK(idx.numel() == out.numel(), "fedfull.", op, ": out must have one element per index");
  const int64_t* ix = idx.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  for (int64_t k = 0; k < idx.numel(); ++k)
    TORCH_CHECK(ix[k] >= 0, "fedfull.", op, ": indices must be >= 0, element ", k, " is ", ix[k]);
  at::parallel_for(0, idx.numel(), kMaskChunk, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k)
      o[k] = kind == kGaussian ? gaussian_z((uint64_t)seed, (uint64_t)(offset + ix[k]))
                               : rademacher_z((uint64_t)seed, (uint64_t)(offset + ix[k]));
  });
}

void noise_fill_cpu(const at::Tensor& out, int64_t seed, int64_t offset, int64_t kind) {
  TORCH_CHECK(out.scalar_type() == at::kFloat, "fedfull.noise_fill_: out must be float32, got ", out.scalar_type());
  check_param("noise_fill_", out); check_offset("noise_fill_", offset); check_kind("noise_fill_", kind);
  float* o = out.data_ptr<float>();
  const Kernels<float> k = Kernels<float>::pick();
  for_blocks(offset, out.numel(), [&](int64_t b0, int64_t j0, int64_t j1, int64_t zoff) {
    alignas(64) float zbuf[kBlock];
    alignas(64) uint32_t words[kBlock / 32];
    k.z((uint64_t)seed, b0, kind, zbuf, words);
    std::memcpy(o + j0, zbuf + zoff, sizeof(float) * (j1 - j0));
  });
}

// noise has no tensor argument, so the dispatcher cannot choose a device from its inputs: it is a
// composite op that allocates on `device` (default CPU) and calls noise_fill_, which dispatches.
at::Tensor noise(int64_t seed, int64_t offset, int64_t n, int64_t kind, std::optional<at::Device> device) {
  TORCH_CHECK(n >= 0, "fedfull.noise: n must be >= 0, got ", n);
  check_offset("noise", offset); check_kind("noise", kind);
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kFloat).device(device.value_or(at::kCPU)));
  static auto fill = c10::Dispatcher::singleton().findSchemaOrThrow("fedfull::noise_fill_", "").typed<void(
      const at::Tensor&, int64_t, int64_t, int64_t)>();
  fill.call(out, seed, offset, kind);
  return out;
}

// Meta kernels: checks only (the ops mutate in place and allocate nothing), for FakeTensor / torch.compile.
void perturb_meta(const at::Tensor& p, int64_t, int64_t offset, double, int64_t kind) {
  check_param("perturb_", p); check_offset("perturb_", offset); check_kind("perturb_", kind);
}
void apply_seeds_meta(const at::Tensor& p, at::IntArrayRef seeds, at::ArrayRef<double> scales, int64_t offset,
                      int64_t kind) {
  check_param("apply_seeds_", p); check_seeds("apply_seeds_", seeds, scales);
  check_offset("apply_seeds_", offset); check_kind("apply_seeds_", kind);
}
void perturb_multi_meta(at::TensorList ps, int64_t, at::IntArrayRef offsets, double, int64_t kind) {
  check_kind("perturb_multi_", kind); check_many("perturb_multi_", ps, offsets);
}
void apply_seeds_multi_meta(at::TensorList ps, at::IntArrayRef seeds, at::ArrayRef<double> scales,
                            at::IntArrayRef offsets, int64_t kind) {
  check_kind("apply_seeds_multi_", kind); check_seeds("apply_seeds_multi_", seeds, scales);
  check_many("apply_seeds_multi_", ps, offsets);
}
void perturb_masked_multi_meta(at::TensorList ps, at::TensorList copies, at::TensorList masks, int64_t,
                               at::IntArrayRef offsets, double, int64_t kind) {
  check_kind("perturb_masked_multi_", kind); check_many("perturb_masked_multi_", ps, offsets);
  check_masks("perturb_masked_multi_", ps, masks, copies);
}
void apply_seeds_masked_multi_meta(at::TensorList ps, at::TensorList copies, at::TensorList masks, at::IntArrayRef seeds,
                                   at::ArrayRef<double> scales, at::IntArrayRef offsets, int64_t kind) {
  check_kind("apply_seeds_masked_multi_", kind); check_seeds("apply_seeds_masked_multi_", seeds, scales);
  check_many("apply_seeds_masked_multi_", ps, offsets); check_masks("apply_seeds_masked_multi_", ps, masks, copies);
}
void noise_fill_meta(const at::Tensor& out, int64_t, int64_t offset, int64_t kind) {
  TORCH_CHECK(out.scalar_type() == at::kFloat, "fedfull.noise_fill_: out must be float32, got ", out.scalar_type());
  check_param("noise_fill_", out); check_offset("noise_fill_", offset); check_kind("noise_fill_", kind);
}

}  // namespace
}  // namespace fedfull

TORCH_LIBRARY(fedfull, m) {
  m.def("noise_fill_(Tensor(a!) out, int seed, int offset, int kind) -> ()");
  m.def("perturb_(Tensor(a!) p, int seed, int offset, float scale, int kind) -> ()");
  m.def("apply_seeds_(Tensor(a!) p, int[] seeds, float[] scales, int offset, int kind) -> ()");
  // the same over a list of tensors (a model's parameters, each with its global offset): one call, one launch on CUDA
  m.def("perturb_multi_(Tensor(a!)[] ps, int seed, int[] offsets, float scale, int kind) -> ()");
  m.def("apply_seeds_multi_(Tensor(a!)[] ps, int[] seeds, float[] scales, int[] offsets, int kind) -> ()");
  m.def("perturb_copy_multi_(Tensor(a!)[] ps, Tensor(b!)[] copies, int seed, int[] offsets, float scale, int kind) -> ()");
  m.def("apply_seeds_copy_multi_(Tensor(a!)[] ps, Tensor(b!)[] copies, int[] seeds, float[] scales, int[] offsets, "
        "int kind) -> ()");
  // the masked forms (fedkseed --mask): z only at each tensor's mask, a 1-D int64 tensor of its local indices; copies
  // empty, or one bfloat16/float16 copy per float32 tensor, written at the mask in the same pass
  m.def("perturb_masked_multi_(Tensor(a!)[] ps, Tensor(b!)[] copies, Tensor[] masks, int seed, int[] offsets, "
        "float scale, int kind) -> ()");
  m.def("apply_seeds_masked_multi_(Tensor(a!)[] ps, Tensor(b!)[] copies, Tensor[] masks, int[] seeds, float[] scales, "
        "int[] offsets, int kind) -> ()");
  m.def("noise_masked_fill_(Tensor(a!) out, Tensor idx, int seed, int offset, int kind) -> ()");
  m.def("noise(int seed, int offset, int n, int kind, Device? device=None) -> Tensor", &fedfull::noise);
  m.def("simd_level(int force=-2) -> int", &fedfull::simd_level);
}

TORCH_LIBRARY_IMPL(fedfull, CPU, m) {
  m.impl("noise_fill_", &fedfull::noise_fill_cpu);
  m.impl("perturb_", &fedfull::perturb_cpu);
  m.impl("apply_seeds_", &fedfull::apply_seeds_cpu);
  m.impl("perturb_multi_", &fedfull::perturb_multi_cpu);
  m.impl("apply_seeds_multi_", &fedfull::apply_seeds_multi_cpu);
  m.impl("perturb_copy_multi_", &fedfull::perturb_copy_multi_cpu);
  m.impl("apply_seeds_copy_multi_", &fedfull::apply_seeds_copy_multi_cpu);
  m.impl("perturb_masked_multi_", &fedfull::perturb_masked_multi_cpu);
  m.impl("apply_seeds_masked_multi_", &fedfull::apply_seeds_masked_multi_cpu);
  m.impl("noise_masked_fill_", &fedfull::noise_masked_fill_cpu);
}

// every other device (CUDA): the composite above (a backend's own kernel, here CPU's, takes precedence)
TORCH_LIBRARY_IMPL(fedfull, CompositeExplicitAutograd, m) {
  m.impl("perturb_copy_multi_", &fedfull::perturb_copy_multi_composite);
  m.impl("apply_seeds_copy_multi_", &fedfull::apply_seeds_copy_multi_composite);
}

TORCH_LIBRARY_IMPL(fedfull, Meta, m) {
  m.impl("noise_fill_", &fedfull::noise_fill_meta);
  m.impl("perturb_", &fedfull::perturb_meta);
  m.impl("apply_seeds_", &fedfull::apply_seeds_meta);
  m.impl("perturb_multi_", &fedfull::perturb_multi_meta);
  m.impl("apply_seeds_multi_", &fedfull::apply_seeds_multi_meta);
  m.impl("perturb_masked_multi_", &fedfull::perturb_masked_multi_meta);
  m.impl("apply_seeds_masked_multi_", &fedfull::apply_seeds_masked_multi_meta);
}

// The module must be importable as `fedfull_ops`; importing it runs the registrations above.
#include <Python.h>
static struct PyModuleDef fedfull_module = {PyModuleDef_HEAD_INIT, "fedfull_ops", "fedfull seed-based ops (torch.ops.fedfull)", -1, nullptr};
PyMODINIT_FUNC PyInit_fedfull_ops(void) { return PyModule_Create(&fedfull_module); }
