"""Fused CPU kernels for the layers' elementwise work, the CPU's counterpart of triton_ops: RMSNorm (with the
residual add), SiLU-and-multiply and the rotary embedding of q and k, each one pass over its rows in C++ where torch
makes three to eight (and converts 16-bit rows to fp32 and back between them).

The C++ is compiled for this machine the first time a process needs it (`-march=native`: AVX-512 or AVX2 where the
compiler targets them, portable loops elsewhere; cached by torch under ~/.cache/torch_extensions, about 30 s on two
cores). Where it cannot build (no compiler, ninja or Python headers) the layers keep their torch ops, and the log
says why once. VECTORS, the vector types and the polynomial exp, is shared with CPU_ATTN's kernel.
"""
import functools
import logging

import torch

logger = logging.getLogger(__name__)

VECTORS = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define CPU_AVX2 1
#if defined(__AVX512F__)
#define CPU_AVX512 1
#endif
#endif

namespace {

constexpr float EXP_MIN = -87.33654f;  // e^x underflows the normal floats below this: taken as 0
constexpr float EXP_MAX = 88.f;
constexpr float LOG2E = 1.44269504089f, LN2_HI = 0.693359375f, LN2_LO = -2.12194440e-4f;

inline float from_bits(uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }
template <typename T> inline float widen(T x) { return static_cast<float>(x); }
template <> inline float widen<at::BFloat16>(at::BFloat16 x) { return from_bits(static_cast<uint32_t>(x.x) << 16); }

// e^x: x = n ln2 + r, |r| <= ln2/2, e^r by its Taylor polynomial to r^6 (relative error < 2e-7), times 2^n made in
// the exponent bits; x below -87.3 (-inf and NaN included) gives 0. The vector versions below take the same steps.
inline float exp_approx(float x) {
  const float c = std::min(std::max(x, EXP_MIN), EXP_MAX);
  const float n = (c * LOG2E + 12582912.f) - 12582912.f;  // round to nearest by the 1.5 * 2^23 trick
  const float r = (c - n * LN2_HI) - n * LN2_LO;
  float p = 1.f / 720;
  p = p * r + 1.f / 120; p = p * r + 1.f / 24; p = p * r + 1.f / 6; p = p * r + 0.5f; p = p * r + 1.f; p = p * r + 1.f;
  const float scale = from_bits(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  return x >= EXP_MIN ? p * scale : 0.f;  // NaN and -inf: 0
}

// Portable vectors of N floats: plain loops, which the compiler vectorizes for the CPU at hand (NEON, SSE, ...).
// N = 8 serves head sizes that are a multiple of 8 on CPUs without AVX2, N = 1 any head size.
template <int N>
struct Generic {
  static constexpr int W = N;
  struct V { float v[N]; };
  static V zero() { return set1(0.f); }
  static V set1(float x) { V r; for (int i = 0; i < N; ++i) r.v[i] = x; return r; }
  template <typename T> static V load(const T* p) { V r; for (int i = 0; i < N; ++i) r.v[i] = widen(p[i]); return r; }
  template <typename T> static void store(T* p, V a) { for (int i = 0; i < N; ++i) p[i] = T(a.v[i]); }
  template <typename T> static V round(V a) { for (int i = 0; i < N; ++i) a.v[i] = widen(T(a.v[i])); return a; }
  static V fma(V a, V b, V c) { V r; for (int i = 0; i < N; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i]; return r; }
  static V mul(V a, V b) { V r; for (int i = 0; i < N; ++i) r.v[i] = a.v[i] * b.v[i]; return r; }
  static V add(V a, V b) { V r; for (int i = 0; i < N; ++i) r.v[i] = a.v[i] + b.v[i]; return r; }
  static V sub(V a, V b) { V r; for (int i = 0; i < N; ++i) r.v[i] = a.v[i] - b.v[i]; return r; }
  static V div(V a, V b) { V r; for (int i = 0; i < N; ++i) r.v[i] = a.v[i] / b.v[i]; return r; }
  static bool any_greater(V a, V b) { bool r = false; for (int i = 0; i < N; ++i) r |= a.v[i] > b.v[i]; return r; }
  static V sums(const V* a) {  // lane k: the sum of a[k]'s lanes
    V r;
    for (int k = 0; k < N; ++k) r.v[k] = hsum(a[k]);
    return r;
  }
  static float hsum(V a) { float s = 0.f; for (int i = 0; i < N; ++i) s += a.v[i]; return s; }
  static V exp(V a) { V r; for (int i = 0; i < N; ++i) r.v[i] = exp_approx(a.v[i]); return r; }
  // -inf in the lanes from `used` on, and in those whose key (lane % keys_per_head) is `limit` or more.
  static V mask_lanes(V a, int keys_per_head, int limit, int used) {
    for (int i = 0; i < N; ++i) if (i >= used || i % keys_per_head >= limit) a.v[i] = -INFINITY;
    return a;
  }
  static V keep(V a) { return a; }
  static void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }
};

#ifdef CPU_AVX2
struct Avx2 {
  static constexpr int W = 8;
  using V = __m256;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const at::BFloat16* p) {  // bf16 is the top half of an fp32: zero-extend to 32 bits, shift up
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static V load(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static void store(float* p, V a) { _mm256_storeu_ps(p, a); }
  static void store(at::BFloat16* p, V a) {
    const __m256i h = _mm256_srli_epi32(_mm256_castps_si256(round<at::BFloat16>(a)), 16);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
  }
  static void store(at::Half* p, V a) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT));
  }
  // a as T would hold it, widened again; bf16 rounded to nearest even (add 0x7fff and the kept lowest bit, cut)
  template <typename T> static V round(V a) {
    if constexpr (std::is_same_v<T, float>) {
      return a;
    } else if constexpr (std::is_same_v<T, at::Half>) {
      return _mm256_cvtph_ps(_mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT));
    } else {
      const __m256i b = _mm256_castps_si256(a);
      const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
      const __m256i r = _mm256_add_epi32(b, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
      return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
    }
  }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static bool any_greater(V a, V b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_GT_OQ)) != 0; }
  // Lane k: the sum of a[k]'s 8 lanes: 8 horizontal sums at once (a transpose by pairwise adds).
  static V sums(const V* a) {
    const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // [a0..a3 low halves | high halves]
    return _mm256_add_ps(_mm256_blend_ps(u0, u1, 0xF0), _mm256_permute2f128_ps(u0, u1, 0x21));
  }
  static V exp(V x) {
    const __m256 c = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(EXP_MIN)), _mm256_set1_ps(EXP_MAX));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(c, _mm256_set1_ps(LOG2E)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), c);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    __m256 p = _mm256_set1_ps(1.f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(EXP_MIN), _CMP_GE_OQ);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
  }
  static V mask_lanes(V a, int keys_per_head, int limit, int used) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i key = _mm256_and_si256(lane, _mm256_set1_epi32(keys_per_head - 1));
    const __m256i keep = _mm256_and_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(limit), key),
                                          _mm256_cmpgt_epi32(_mm256_set1_epi32(used), lane));
    return _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), a, _mm256_castsi256_ps(keep));
  }
  static V keep(V a) { asm("" : "+x"(a)); return a; }  // a register, not folded into each use as a memory operand
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
};
#endif

#ifdef CPU_AVX512
struct Avx512 {
  static constexpr int W = 16;
  using V = __m512;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const at::BFloat16* p) {  // as _mm512_cvtpbh_ps does it
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static V load(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static void store(float* p, V a) { _mm512_storeu_ps(p, a); }
  static void store(at::BFloat16* p, V a) {
    const __m512i h = _mm512_srli_epi32(_mm512_castps_si512(round<at::BFloat16>(a)), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(h));
  }
  static void store(at::Half* p, V a) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT));
  }
  template <typename T> static V round(V a) {
    if constexpr (std::is_same_v<T, float>) {
      return a;
    } else if constexpr (std::is_same_v<T, at::Half>) {
      return _mm512_cvtph_ps(_mm512_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT));
    } else {
      const __m512i b = _mm512_castps_si512(a);
      const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
      const __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
      return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
    }
  }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static bool any_greater(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ) != 0; }
  // Lane k: the sum of a[k]'s 16 lanes. Each step adds pairs of halves while interleaving two vectors' halves, so
  // that 16 vectors become 8, 4, 2, 1; a last permutation puts the sums in order.
  static V sums(const V* a) {
    V b[8], c[4], d[2];
    for (int i = 0; i < 8; ++i)  // 256-bit halves: [a_i | a_i+8], each 8 partial sums
      b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 8], 0x44), _mm512_shuffle_f32x4(a[i], a[i + 8], 0xEE));
    for (int i = 0; i < 4; ++i)  // 128-bit quarters: [a_i, a_i+8, a_i+4, a_i+12], 4 partial sums each
      c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[i], b[i + 4], 0x88), _mm512_shuffle_f32x4(b[i], b[i + 4], 0xDD));
    for (int i = 0; i < 2; ++i)  // in each quarter q: [key(c_i, q) x2, key(c_i+2, q) x2]
      d[i] = _mm512_add_ps(_mm512_shuffle_ps(c[i], c[i + 2], 0x44), _mm512_shuffle_ps(c[i], c[i + 2], 0xEE));
    const __m512 e = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x88), _mm512_shuffle_ps(d[0], d[1], 0xDD));
    // e holds the sums of a0 a2 a1 a3, a8 a10 a9 a11, a4 a6 a5 a7, a12 a14 a13 a15
    const __m512i order = _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);
    return _mm512_permutexvar_ps(order, e);
  }
  static V exp(V x) {
    const __m512 c = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(EXP_MIN)), _mm512_set1_ps(EXP_MAX));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(c, _mm512_set1_ps(LOG2E)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), c);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    __m512 p = _mm512_set1_ps(1.f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(EXP_MIN), _CMP_GE_OQ);
    return _mm512_maskz_mul_ps(keep, p, _mm512_castsi512_ps(e));
  }
  static V mask_lanes(V a, int keys_per_head, int limit, int used) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i key = _mm512_and_si512(lane, _mm512_set1_epi32(keys_per_head - 1));
    const __mmask16 keep = _mm512_cmpgt_epi32_mask(_mm512_set1_epi32(limit), key) &
                           _mm512_cmpgt_epi32_mask(_mm512_set1_epi32(used), lane);
    return _mm512_mask_blend_ps(keep, _mm512_set1_ps(-INFINITY), a);
  }
  static V keep(V a) { asm("" : "+v"(a)); return a; }
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
};
#endif

}  // namespace
"""

OPS = r"""
namespace {

#if defined(CPU_AVX512)
using Vec = Avx512;
#elif defined(CPU_AVX2)
using Vec = Avx2;
#else
using Vec = Generic<8>;
#endif
using Scalar = Generic<1>;

// Calls fn with a value of x's element type (its type picks the kernel's instantiation).
template <class F>
void dispatch_dtype(const torch::Tensor& x, const char* op, F&& fn) {
  switch (x.scalar_type()) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(at::BFloat16{}); break;
    case at::kHalf: fn(at::Half{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", x.scalar_type());
  }
}

// Calls step(I, i) for i = 0, W, 2W, ... over whole vectors of `size`, then step(Scalar, i) for the tail.
template <class F>
inline void over_row(int64_t size, F&& step) {
  int64_t i = 0;
  for (; i + Vec::W <= size; i += Vec::W) step(Vec(), i);
  for (; i < size; ++i) step(Scalar(), i);
}

template <typename T>
void silu_and_mul_rows(const torch::Tensor& x, torch::Tensor& out) {
  const int64_t rows = x.size(0), size = out.size(1), sx = x.stride(0), so = out.stride(0);
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = xp + r * sx;
      const T* up = gate + size;
      T* o = op + r * so;
      over_row(size, [&](auto isa, int64_t i) {
        using I = decltype(isa);
        const auto g = I::load(gate + i);
        I::store(o + i, I::div(I::mul(g, I::load(up + i)), I::add(I::set1(1.f), I::exp(I::sub(I::zero(), g)))));
      });
    }
  });
}

// out = RMSNorm(x (+ residual)): the sum rounded to T and written back into residual; then, as the torch path does,
// weight * (normalised x rounded to T) rounded to T, or with an offset (Gemma) normalised x * (weight + offset).
template <typename T>
void rms_norm_rows(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual, const torch::Tensor& weight,
                   torch::Tensor& out, double eps, double offset) {
  const int64_t rows = x.size(0), size = x.size(1), sx = x.stride(0), so = out.stride(0);
  const T* xp = x.data_ptr<T>();
  T* rp = residual ? residual->data_ptr<T>() : nullptr;
  const int64_t sr = residual ? residual->stride(0) : 0;
  const T* w = weight.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const float off = static_cast<float>(offset);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* src = xp + r * sx;
      T* o = op + r * so;
      if (rp) {  // x + residual, rounded as T, kept in residual and read back from there
        T* res = rp + r * sr;
        over_row(size, [&](auto isa, int64_t i) {
          using I = decltype(isa);
          I::store(res + i, I::add(I::load(src + i), I::load(res + i)));
        });
        src = res;
      }
      float squares = 0.f;
      {
        auto acc = Vec::zero();
        int64_t i = 0;
        for (; i + Vec::W <= size; i += Vec::W) { const auto v = Vec::load(src + i); acc = Vec::fma(v, v, acc); }
        alignas(64) float lanes[Vec::W];
        Vec::store(lanes, acc);
        for (int j = 0; j < Vec::W; ++j) squares += lanes[j];
        for (; i < size; ++i) squares += widen(src[i]) * widen(src[i]);
      }
      const float inv = 1.f / std::sqrt(squares / static_cast<float>(size) + static_cast<float>(eps));
      over_row(size, [&](auto isa, int64_t i) {
        using I = decltype(isa);
        const auto normed = I::mul(I::load(src + i), I::set1(inv));
        if (off != 0.f) {
          I::store(o + i, I::mul(normed, I::add(I::load(w + i), I::set1(off))));
        } else {
          I::store(o + i, I::mul(I::load(w + i), I::template round<T>(normed)));
        }
      });
    }
  });
}

// Rotates each head of q [T, heads, >= 2 half] and k [T, kv_heads, ...] in place: the first `half` values against the
// next `half`, by cos/sin [positions, half] (fp32) at each token's position.
template <typename T>
void rotary_rows(torch::Tensor& q, torch::Tensor& k, const torch::Tensor& cos, const torch::Tensor& sin,
                 const torch::Tensor& positions) {
  const int64_t tokens = q.size(0), half = cos.size(1);
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  struct Heads { T* data; int64_t count, token_stride, head_stride; };
  const Heads both[2] = {{q.data_ptr<T>(), q.size(1), q.stride(0), q.stride(1)},
                         {k.data_ptr<T>(), k.size(1), k.stride(0), k.stride(1)}};
  at::parallel_for(0, tokens, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cp + pos[t] * half;
      const float* s = sp + pos[t] * half;
      for (const Heads& x : both) {
        for (int64_t h = 0; h < x.count; ++h) {
          T* first = x.data + t * x.token_stride + h * x.head_stride;
          T* second = first + half;
          over_row(half, [&](auto isa, int64_t i) {
            using I = decltype(isa);
            const auto x1 = I::load(first + i), x2 = I::load(second + i), ci = I::load(c + i), si = I::load(s + i);
            I::store(first + i, I::sub(I::mul(x1, ci), I::mul(x2, si)));
            I::store(second + i, I::fma(x1, si, I::mul(x2, ci)));
          });
        }
      }
    }
  });
}

void check_rows(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, name, ": rows with a contiguous last dimension expected");
}

}  // namespace

torch::Tensor silu_and_mul(torch::Tensor x) {
  check_rows(x, "silu_and_mul");
  auto out = torch::empty({x.size(0), x.size(1) / 2}, x.options());
  dispatch_dtype(x, "silu_and_mul", [&](auto element) { silu_and_mul_rows<decltype(element)>(x, out); });
  return out;
}

torch::Tensor rms_norm(torch::Tensor x, c10::optional<torch::Tensor> residual, torch::Tensor weight, double eps,
                       double offset) {
  check_rows(x, "rms_norm");
  if (residual) check_rows(*residual, "rms_norm residual");
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == x.scalar_type(), "rms_norm: weight of x's dtype");
  auto out = torch::empty_like(x, at::MemoryFormat::Contiguous);
  dispatch_dtype(x, "rms_norm", [&](auto element) {
    rms_norm_rows<decltype(element)>(x, residual, weight, out, eps, offset);
  });
  return out;
}

void qk_rotary(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin, torch::Tensor positions) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1 &&
              k.scalar_type() == q.scalar_type(),
              "qk_rotary: q and k as [tokens, heads, head_dim] of one dtype, head_dim contiguous");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous() &&
              positions.scalar_type() == at::kLong && positions.is_contiguous(),
              "qk_rotary: fp32 tables, int64 positions");
  dispatch_dtype(q, "qk_rotary", [&](auto element) { rotary_rows<decltype(element)>(q, k, cos, sin, positions); });
}
"""

FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math"]


def build(name: str, source: str, functions: list[str]):
    """An extension compiled from `source` for this CPU (with OpenMP: at::parallel_for in an extension runs on torch's
    threads only when built with it), or the exception that kept it from building."""
    from torch.utils.cpp_extension import load_inline

    try:
        try:
            return load_inline(name, cpp_sources=source, functions=functions, extra_cflags=FLAGS + ["-fopenmp"],
                               extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as e:  # a compiler without OpenMP (Apple's clang): one thread
            logger.warning("%s did not build with OpenMP (%s); building it single-threaded", name, e)
            return load_inline(name + "_serial", cpp_sources=source, functions=functions, extra_cflags=FLAGS,
                               verbose=False)
    except Exception as e:
        logger.warning("%s did not build (%s: %s)", name, type(e).__name__, e)
        return e


@functools.cache
def kernel():
    logger.info("loading the CPU layer kernels (built for this CPU the first time: about 30 s)")
    built = build("llmserve_cpu_ops", VECTORS + OPS, ["rms_norm", "silu_and_mul", "qk_rotary"])
    if isinstance(built, Exception):
        logger.warning("the layers' elementwise work stays in torch ops on the CPU")
    return built


def fused(x: torch.Tensor) -> bool:
    """Whether x's layer math should run as these kernels: on the CPU, in a dtype they take, once they built."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16) \
        and not isinstance(kernel(), Exception)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
             residual: torch.Tensor | None) -> torch.Tensor:
    """As triton_ops.rms_norm: with `residual`, x + residual is normalised and written back into `residual`."""
    size = x.shape[-1]
    res = residual.view(-1, size) if residual is not None else None
    return kernel().rms_norm(x.reshape(-1, size), res, weight.to(x.dtype), eps, offset).view(x.shape)


def qk_rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
               norms: tuple | None = None) -> None:
    """As triton_ops.qk_rotary_: q and k rotated in place (each head RMS-normalised first with `norms`)."""
    if norms:
        q.copy_(norms[0](q))
        k.copy_(norms[1](k))
    kernel().qk_rotary(q, k, cos, sin, positions)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x [T, 2 * size] = [gate | up]."""
    return kernel().silu_and_mul(x)
