// Decoder-block ops on the CPU: RMSNorm (with the residual add before it), rotary embedding and
// SwiGLU, forward and backward. Registered as npu_ft_cpu::* primitives that write into outputs
// allocated by the caller (npu_ft/ops/backends/cpu/block_ops.py):
//
//   rms_norm(x, residual?, weight, eps, y, h, rstd)                  x, residual, h, y: [rows, H]
//   rms_norm_backward(grad_y, grad_h?, h, weight, rstd, dx, dweight_partials)
//   rope(x, cos, sin, transpose, out)                  x, out: [B, heads, S, D] (unit last stride)
//   swiglu(gate, up, out) / swiglu_backward(grad, gate, up, dgate, dup)
//
// Every value is computed in float32 and rounded once into its element type (float32 / bfloat16 /
// float16). Each kernel has a portable version and, on x86-64, an AVX2 version (intrinsics,
// __attribute__((target("avx2,f16c"))), chosen at run time when the CPU has AVX2 and F16C) doing the
// same float operations in the same order, 8 values per register; the portable version finishes
// each row's tail. Reductions keep kLanes interleaved partial sums, added in a fixed order at the end.
// Rows (or element ranges) are split over torch's intra-op threads with at::parallel_for; the
// weight gradient of rms_norm is summed per fixed chunk of kRowsPerChunk rows into
// dweight_partials [chunks, H] (the caller sums those), so results do not depend on the thread count.

#include "common.h"
#include "float_io.h"

#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define NPU_FT_X86 1
#endif

namespace npu_ft_cpu {
namespace {

// partial sums of a reduction: rows are summed as kLanes interleaved partial sums, then in order
constexpr int kLanes = 16;
constexpr i64 kRowsPerChunk = 64;

#ifdef NPU_FT_X86
#define NPU_FT_AVX2 inline __attribute__((target("avx2,f16c"), always_inline))
bool has_avx2() {
    static const bool ok = [] {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    }();
    return ok;
}
#else
bool has_avx2() { return false; }
#endif

// ------------------------------------------------------------------------------------------------
// exp in float32: Cephes' expf (Cody-Waite reduction, degree-6 polynomial), ~1 ulp on [-87.33, 88];
// 0 below -87.33 (where the result would be subnormal), exp(88) on (88, 88.72] (only ever used as
// 1 + exp(-g) in a denominator: sigmoid/silu then differ from torch's by < 1e-37) and +inf above;
// NaN stays NaN. The scalar and the AVX2 versions do the same float operations in the same order.
// ------------------------------------------------------------------------------------------------
constexpr float kExpLo = -87.33654022216797f, kExpHi = 88.0f, kUnderflow = -87.33654022216797f, kOverflow = 88.72283935546875f;
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f, kP3 = 4.1665795894e-2f,
                kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;

inline float exp_f32(float x) {
    float xc = x < kExpLo ? kExpLo : x;
    xc = xc > kExpHi ? kExpHi : xc;
    const float n = std::floor(xc * kLog2e + 0.5f);
    float r = xc - n * kLn2Hi;
    r = r - n * kLn2Lo;
    float p = kP0;
    p = p * r + kP1;
    p = p * r + kP2;
    p = p * r + kP3;
    p = p * r + kP4;
    p = p * r + kP5;
    p = p * (r * r) + r + 1.0f;
    float e = p * f32_from_bits(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
    if (x > kOverflow) e = std::numeric_limits<float>::infinity();
    if (x < kUnderflow) e = 0.0f;
    return x != x ? x : e;
}

// sigmoid(g) = 1 / (1 + exp(-g)), silu(g) = g / (1 + exp(-g)) (torch's formulas)
inline float sigmoid_f32(float g) { return 1.0f / (1.0f + exp_f32(-g)); }
inline float silu_f32(float g) { return g / (1.0f + exp_f32(-g)); }

// v rounded to T's precision, as a float
template <typename T>
inline float round_f32(float v) {
    return load_f32(round_to<T>(v));
}

// ------------------------------------------------------------------------------------------------
// Portable row kernels (also the tails of the AVX2 ones)
// ------------------------------------------------------------------------------------------------

// Adds v[i]^2 (i < n) into the kLanes partial sums acc (element i goes to lane i % kLanes).
inline void add_squares(const float* v, i64 n, float* acc) {
    for (i64 i = 0; i < n; ++i) acc[i % kLanes] += v[i] * v[i];
}

inline float sum_lanes(const float* acc) {
    float s = 0.0f;
    for (int j = 0; j < kLanes; ++j) s += acc[j];
    return s;
}

// RMSNorm forward, one row: hf = float(x (+ residual) rounded to T), h = that sum; rstd; y.
template <typename T, typename W, typename Y>
float rms_norm_row(const T* x, const T* res, const W* w, float eps, i64 H, Y* y, T* h, float* hf) {
    for (i64 i = 0; i < H; ++i) {
        const T v = res ? round_to<T>(load_f32(x[i]) + load_f32(res[i])) : x[i];
        if (res) h[i] = v;
        hf[i] = load_f32(v);
    }
    float acc[kLanes] = {};
    add_squares(hf, H, acc);
    const float r = 1.0f / std::sqrt(sum_lanes(acc) / static_cast<float>(H) + eps);
    for (i64 i = 0; i < H; ++i) y[i] = round_to<Y>(load_f32(w[i]) * round_f32<T>(hf[i] * r));
    return r;
}

// RMSNorm backward, one row, with n = float(h) * rstd and g = float(grad_y * w rounded to T):
//   dx = rstd * (g - n * mean(g * n)) (+ grad_h);   dw += grad_y * float(n rounded to T).
template <typename T, typename W, typename Y>
void rms_norm_backward_row(const Y* gy, const T* gh, const T* h, const W* w, float rstd, i64 H, T* dx, float* dw) {
    float acc[kLanes] = {};
    for (i64 i = 0; i < H; ++i) {
        const float n = load_f32(h[i]) * rstd, g = round_f32<T>(load_f32(gy[i]) * load_f32(w[i]));
        if (dw) dw[i] += load_f32(gy[i]) * round_f32<T>(n);
        acc[i % kLanes] += g * n;
    }
    if (!dx) return;
    const float mean = sum_lanes(acc) / static_cast<float>(H);
    for (i64 i = 0; i < H; ++i) {
        const float n = load_f32(h[i]) * rstd, g = round_f32<T>(load_f32(gy[i]) * load_f32(w[i]));
        float d = rstd * (g - n * mean);
        if (gh) d += load_f32(gh[i]);
        dx[i] = round_to<T>(d);
    }
}

// Rotary embedding ("half" rotation) of one row of D = 2 * half values, pairs [from, half).
// Forward: out1 = x1*c1 + (-x2)*s1, out2 = x2*c2 + x1*s2 (transformers' x*cos + rotate_half(x)*sin);
// transposed (backward): out1 = x1*c1 + x2*s2, out2 = x2*c2 + (-x1)*s1.
template <typename T>
void rope_row(const T* x, const T* c, const T* s, i64 half, bool transpose, T* out, i64 from) {
    for (i64 i = from; i < half; ++i) {
        const float x1 = load_f32(x[i]), x2 = load_f32(x[i + half]);
        const float c1 = load_f32(c[i]), c2 = load_f32(c[i + half]);
        const float s1 = load_f32(s[i]), s2 = load_f32(s[i + half]);
        if (transpose) {
            out[i] = round_to<T>(x1 * c1 + x2 * s2);
            out[i + half] = round_to<T>(x2 * c2 + -x1 * s1);
        } else {
            out[i] = round_to<T>(x1 * c1 + -x2 * s1);
            out[i + half] = round_to<T>(x2 * c2 + x1 * s2);
        }
    }
}

template <typename T>
void swiglu_range(const T* g, const T* u, T* out, i64 i0, i64 i1) {
    for (i64 i = i0; i < i1; ++i) out[i] = round_to<T>(silu_f32(load_f32(g[i])) * load_f32(u[i]));
}

template <typename T>
void swiglu_backward_range(const T* dy, const T* g, const T* u, T* dg, T* du, i64 i0, i64 i1) {
    for (i64 i = i0; i < i1; ++i) {
        const float gv = load_f32(g[i]), grad = load_f32(dy[i]);
        const float s = sigmoid_f32(gv);
        if (dg) dg[i] = round_to<T>(grad * load_f32(u[i]) * s * (1.0f + gv * (1.0f - s)));
        if (du) du[i] = round_to<T>(grad * (gv * s));
    }
}

// ------------------------------------------------------------------------------------------------
// AVX2 row kernels: 8 floats per register (16-bit elements converted on load and store); the same
// float operations in the same order as the portable kernels, which finish each row's tail.
// ------------------------------------------------------------------------------------------------
#ifdef NPU_FT_X86
NPU_FT_AVX2 __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
NPU_FT_AVX2 __m256 load8(const BFloat16* p) {
    const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
NPU_FT_AVX2 __m256 load8(const Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// float32 -> bfloat16 bits (round to nearest even, NaN -> 0x7fc0) in the low 16 bits of each lane
NPU_FT_AVX2 __m256i bf16_bits8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
}
NPU_FT_AVX2 void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
NPU_FT_AVX2 void store8(BFloat16* p, __m256 v) {
    const __m256i b = bf16_bits8(v);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
}
NPU_FT_AVX2 void store8(Half* p, __m256 v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
// v rounded to T's precision, as floats
NPU_FT_AVX2 __m256 round8(float*, __m256 v) { return v; }
NPU_FT_AVX2 __m256 round8(BFloat16*, __m256 v) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits8(v), 16));
}
NPU_FT_AVX2 __m256 round8(Half*, __m256 v) {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
template <typename T>
NPU_FT_AVX2 __m256 round8(__m256 v) {
    return round8(static_cast<T*>(nullptr), v);
}

NPU_FT_AVX2 __m256 exp8(__m256 x) {
    const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(kExpLo)), _mm256_set1_ps(kExpHi));
    const __m256 n = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(xc, _mm256_set1_ps(kLog2e)), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_sub_ps(xc, _mm256_mul_ps(n, _mm256_set1_ps(kLn2Hi)));
    r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(kLn2Lo)));
    __m256 p = _mm256_set1_ps(kP0);
    for (const float c : {kP1, kP2, kP3, kP4, kP5}) p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(c));
    p = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(p, _mm256_mul_ps(r, r)), r), _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
    e = _mm256_blendv_ps(e, _mm256_set1_ps(std::numeric_limits<float>::infinity()),
                         _mm256_cmp_ps(x, _mm256_set1_ps(kOverflow), _CMP_GT_OQ));
    e = _mm256_blendv_ps(e, _mm256_setzero_ps(), _mm256_cmp_ps(x, _mm256_set1_ps(kUnderflow), _CMP_LT_OQ));
    return _mm256_blendv_ps(e, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}
NPU_FT_AVX2 __m256 one_plus_exp_neg8(__m256 g) {
    return _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g)));
}

// Adds v[i]^2 into the kLanes partial sums (lanes i % kLanes), n a multiple of kLanes.
__attribute__((target("avx2,f16c"))) void add_squares_avx2(const float* v, i64 n, float* acc) {
    __m256 a0 = _mm256_loadu_ps(acc), a1 = _mm256_loadu_ps(acc + 8);
    for (i64 i = 0; i < n; i += kLanes) {
        const __m256 v0 = _mm256_loadu_ps(v + i), v1 = _mm256_loadu_ps(v + i + 8);
        a0 = _mm256_add_ps(a0, _mm256_mul_ps(v0, v0));
        a1 = _mm256_add_ps(a1, _mm256_mul_ps(v1, v1));
    }
    _mm256_storeu_ps(acc, a0);
    _mm256_storeu_ps(acc + 8, a1);
}

template <typename T, typename W, typename Y>
__attribute__((target("avx2,f16c"))) float rms_norm_row_avx2(const T* x, const T* res, const W* w, float eps, i64 H,
                                                           Y* y, T* h, float* hf) {
    const i64 body = H - H % kLanes;
    for (i64 i = 0; i < body; i += 8) {
        __m256 v = load8(x + i);
        if (res) {
            v = round8<T>(_mm256_add_ps(v, load8(res + i)));
            store8(h + i, v);
        }
        _mm256_storeu_ps(hf + i, v);
    }
    for (i64 i = body; i < H; ++i) {  // tail: as the portable kernel
        const T v = res ? round_to<T>(load_f32(x[i]) + load_f32(res[i])) : x[i];
        if (res) h[i] = v;
        hf[i] = load_f32(v);
    }
    float acc[kLanes] = {};
    add_squares_avx2(hf, body, acc);
    for (i64 i = body; i < H; ++i) acc[i % kLanes] += hf[i] * hf[i];
    const float r = 1.0f / std::sqrt(sum_lanes(acc) / static_cast<float>(H) + eps);
    const __m256 rv = _mm256_set1_ps(r);
    i64 i = 0;
    for (; i + 8 <= H; i += 8)
        store8(y + i, _mm256_mul_ps(load8(w + i), round8<T>(_mm256_mul_ps(_mm256_loadu_ps(hf + i), rv))));
    for (; i < H; ++i) y[i] = round_to<Y>(load_f32(w[i]) * round_f32<T>(hf[i] * r));
    return r;
}

template <typename T, typename W, typename Y>
__attribute__((target("avx2,f16c"))) void rms_norm_backward_row_avx2(const Y* gy, const T* gh, const T* h, const W* w,
                                                                   float rstd, i64 H, T* dx, float* dw) {
    const i64 body = H - H % kLanes;
    const __m256 rv = _mm256_set1_ps(rstd);
    __m256 a[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (i64 i = 0; i < body; i += 8) {
        const __m256 n = _mm256_mul_ps(load8(h + i), rv), gyv = load8(gy + i);
        const __m256 g = round8<T>(_mm256_mul_ps(gyv, load8(w + i)));
        if (dw) _mm256_storeu_ps(dw + i, _mm256_add_ps(_mm256_loadu_ps(dw + i), _mm256_mul_ps(gyv, round8<T>(n))));
        a[(i / 8) & 1] = _mm256_add_ps(a[(i / 8) & 1], _mm256_mul_ps(g, n));
    }
    float acc[kLanes];
    _mm256_storeu_ps(acc, a[0]);
    _mm256_storeu_ps(acc + 8, a[1]);
    for (i64 i = body; i < H; ++i) {
        const float n = load_f32(h[i]) * rstd, g = round_f32<T>(load_f32(gy[i]) * load_f32(w[i]));
        if (dw) dw[i] += load_f32(gy[i]) * round_f32<T>(n);
        acc[i % kLanes] += g * n;
    }
    if (!dx) return;
    const float mean = sum_lanes(acc) / static_cast<float>(H);
    const __m256 mv = _mm256_set1_ps(mean);
    i64 i = 0;
    for (; i + 8 <= H; i += 8) {
        const __m256 n = _mm256_mul_ps(load8(h + i), rv);
        const __m256 g = round8<T>(_mm256_mul_ps(load8(gy + i), load8(w + i)));
        __m256 d = _mm256_mul_ps(rv, _mm256_sub_ps(g, _mm256_mul_ps(n, mv)));
        if (gh) d = _mm256_add_ps(d, load8(gh + i));
        store8(dx + i, d);
    }
    for (; i < H; ++i) {
        const float n = load_f32(h[i]) * rstd, g = round_f32<T>(load_f32(gy[i]) * load_f32(w[i]));
        float d = rstd * (g - n * mean);
        if (gh) d += load_f32(gh[i]);
        dx[i] = round_to<T>(d);
    }
}

template <typename T>
__attribute__((target("avx2,f16c"))) void rope_row_avx2(const T* x, const T* c, const T* s, i64 half, bool transpose,
                                                      T* out) {
    const __m256 zero = _mm256_setzero_ps();
    i64 i = 0;
    for (; i + 8 <= half; i += 8) {
        const __m256 x1 = load8(x + i), x2 = load8(x + i + half);
        const __m256 c1 = load8(c + i), c2 = load8(c + i + half);
        const __m256 s1 = load8(s + i), s2 = load8(s + i + half);
        if (transpose) {
            store8(out + i, _mm256_add_ps(_mm256_mul_ps(x1, c1), _mm256_mul_ps(x2, s2)));
            store8(out + i + half, _mm256_add_ps(_mm256_mul_ps(x2, c2), _mm256_mul_ps(_mm256_sub_ps(zero, x1), s1)));
        } else {
            store8(out + i, _mm256_add_ps(_mm256_mul_ps(x1, c1), _mm256_mul_ps(_mm256_sub_ps(zero, x2), s1)));
            store8(out + i + half, _mm256_add_ps(_mm256_mul_ps(x2, c2), _mm256_mul_ps(x1, s2)));
        }
    }
    rope_row<T>(x, c, s, half, transpose, out, i);
}

template <typename T>
__attribute__((target("avx2,f16c"))) void swiglu_range_avx2(const T* g, const T* u, T* out, i64 i0, i64 i1) {
    i64 i = i0;
    for (; i + 8 <= i1; i += 8) {
        const __m256 gv = load8(g + i);
        store8(out + i, _mm256_mul_ps(_mm256_div_ps(gv, one_plus_exp_neg8(gv)), load8(u + i)));
    }
    swiglu_range<T>(g, u, out, i, i1);
}

template <typename T>
__attribute__((target("avx2,f16c"))) void swiglu_backward_range_avx2(const T* dy, const T* g, const T* u, T* dg, T* du,
                                                                   i64 i0, i64 i1) {
    const __m256 one = _mm256_set1_ps(1.0f);
    i64 i = i0;
    for (; i + 8 <= i1; i += 8) {
        const __m256 gv = load8(g + i), grad = load8(dy + i);
        const __m256 s = _mm256_div_ps(one, one_plus_exp_neg8(gv));
        if (dg) {
            const __m256 t = _mm256_mul_ps(_mm256_mul_ps(grad, load8(u + i)), s);
            store8(dg + i, _mm256_mul_ps(t, _mm256_add_ps(one, _mm256_mul_ps(gv, _mm256_sub_ps(one, s)))));
        }
        if (du) store8(du + i, _mm256_mul_ps(grad, _mm256_mul_ps(gv, s)));
    }
    swiglu_backward_range<T>(dy, g, u, dg, du, i, i1);
}
#endif  // NPU_FT_X86

// ------------------------------------------------------------------------------------------------
// Row loops, split over torch's threads, each row through the AVX2 kernel where the CPU has it
// ------------------------------------------------------------------------------------------------
template <typename T, typename W, typename Y>
void rms_norm_rows(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
                   double eps, const at::Tensor& y, const at::Tensor& h, const at::Tensor& rstd) {
    const i64 H = x.size(-1), rows = x.numel() / H;
    const T* px = static_cast<const T*>(x.data_ptr());
    const T* pr = residual ? static_cast<const T*>(residual->data_ptr()) : nullptr;
    const W* pw = static_cast<const W*>(weight.data_ptr());
    Y* py = static_cast<Y*>(y.data_ptr());
    T* ph = pr ? static_cast<T*>(h.data_ptr()) : nullptr;
    float* ps = rstd.data_ptr<float>();
    const float e = static_cast<float>(eps);
    const bool simd = has_avx2();
    at::parallel_for(0, rows, std::max<i64>(1, kTaskValues / H), [&](i64 r0, i64 r1) {
        std::vector<float> hf(H);
        for (i64 r = r0; r < r1; ++r) {
            const T* rr = pr ? pr + r * H : nullptr;
            T* hr = ph ? ph + r * H : nullptr;
#ifdef NPU_FT_X86
            if (simd) {
                ps[r] = rms_norm_row_avx2<T, W, Y>(px + r * H, rr, pw, e, H, py + r * H, hr, hf.data());
                continue;
            }
#endif
            ps[r] = rms_norm_row<T, W, Y>(px + r * H, rr, pw, e, H, py + r * H, hr, hf.data());
        }
    });
    (void)simd;
}

template <typename T, typename W, typename Y>
void rms_norm_backward_rows(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_h, const at::Tensor& h,
                            const at::Tensor& weight, const at::Tensor& rstd, const at::Tensor& dx,
                            const at::Tensor& dweight_partials) {
    const i64 H = h.size(-1), rows = h.numel() / H;
    const Y* pgy = static_cast<const Y*>(grad_y.data_ptr());
    const T* pgh = grad_h ? static_cast<const T*>(grad_h->data_ptr()) : nullptr;
    const T* ph = static_cast<const T*>(h.data_ptr());
    const W* pw = static_cast<const W*>(weight.data_ptr());
    const float* ps = rstd.data_ptr<float>();
    T* pdx = dx.numel() ? static_cast<T*>(dx.data_ptr()) : nullptr;
    float* pdw = dweight_partials.numel() ? dweight_partials.data_ptr<float>() : nullptr;
    const i64 chunks = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
    if (pdw) std::fill(pdw, pdw + chunks * H, 0.0f);
    const bool simd = has_avx2();
    const i64 grain = std::max<i64>(1, kTaskValues / (H * kRowsPerChunk));
    at::parallel_for(0, chunks, grain, [&](i64 c0, i64 c1) {
        for (i64 c = c0; c < c1; ++c) {
            const i64 end = std::min(rows, (c + 1) * kRowsPerChunk);
            for (i64 r = c * kRowsPerChunk; r < end; ++r) {
                const T* ghr = pgh ? pgh + r * H : nullptr;
                T* dxr = pdx ? pdx + r * H : nullptr;
                float* dwc = pdw ? pdw + c * H : nullptr;
#ifdef NPU_FT_X86
                if (simd) {
                    rms_norm_backward_row_avx2<T, W, Y>(pgy + r * H, ghr, ph + r * H, pw, ps[r], H, dxr, dwc);
                    continue;
                }
#endif
                rms_norm_backward_row<T, W, Y>(pgy + r * H, ghr, ph + r * H, pw, ps[r], H, dxr, dwc);
            }
        }
    });
    (void)simd;
}

template <typename F>
void dispatch_norm(at::ScalarType x, at::ScalarType w, const F& fn) {
    using at::ScalarType;
    if (x == w) {
        if (x == ScalarType::Float) return fn(float{}, float{}, float{});
        if (x == ScalarType::BFloat16) return fn(BFloat16{}, BFloat16{}, BFloat16{});
        if (x == ScalarType::Half) return fn(Half{}, Half{}, Half{});
    } else if (w == ScalarType::Float) {
        if (x == ScalarType::BFloat16) return fn(BFloat16{}, float{}, float{});
        if (x == ScalarType::Half) return fn(Half{}, float{}, float{});
    }
    TORCH_CHECK(false, "rms_norm: unsupported dtypes x ", x, ", weight ", w);
}

void check_rows(const at::Tensor& t, const char* name, at::ScalarType dtype, i64 numel) {
    check_buffer(t, name, dtype, numel);
    TORCH_CHECK(t.numel() == numel, name, ": expected ", numel, " elements, got ", t.numel());
}

void rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight, double eps,
              const at::Tensor& y, const at::Tensor& h, const at::Tensor& rstd) {
    const i64 n = x.numel(), H = weight.numel();
    TORCH_CHECK(H > 0 && x.dim() >= 1 && x.size(-1) == H, "x: last dim must equal weight's length ", H);
    check_rows(x, "x", x.scalar_type(), n);
    check_rows(weight, "weight", weight.scalar_type(), H);
    check_rows(rstd, "rstd", at::kFloat, n / H);
    if (residual) {
        check_rows(*residual, "residual", x.scalar_type(), n);
        check_rows(h, "h", x.scalar_type(), n);
    }
    dispatch_norm(x.scalar_type(), weight.scalar_type(), [&](auto t, auto w, auto o) {
        check_rows(y, "y", c10::CppTypeToScalarType<decltype(o)>::value, n);
        rms_norm_rows<decltype(t), decltype(w), decltype(o)>(x, residual, weight, eps, y, h, rstd);
    });
}

void rms_norm_backward(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_h, const at::Tensor& h,
                       const at::Tensor& weight, const at::Tensor& rstd, const at::Tensor& dx,
                       const at::Tensor& dweight_partials) {
    const i64 n = h.numel(), H = weight.numel();
    TORCH_CHECK(H > 0 && h.dim() >= 1 && h.size(-1) == H, "h: last dim must equal weight's length ", H);
    check_rows(h, "h", h.scalar_type(), n);
    check_rows(weight, "weight", weight.scalar_type(), H);
    check_rows(rstd, "rstd", at::kFloat, n / H);
    if (grad_h) check_rows(*grad_h, "grad_h", h.scalar_type(), n);
    if (dx.numel()) check_rows(dx, "dx", h.scalar_type(), n);
    if (dweight_partials.numel())
        check_rows(dweight_partials, "dweight_partials", at::kFloat, ((n / H + kRowsPerChunk - 1) / kRowsPerChunk) * H);
    dispatch_norm(h.scalar_type(), weight.scalar_type(), [&](auto t, auto w, auto o) {
        check_rows(grad_y, "grad_y", c10::CppTypeToScalarType<decltype(o)>::value, n);
        rms_norm_backward_rows<decltype(t), decltype(w), decltype(o)>(grad_y, grad_h, h, weight, rstd, dx,
                                                                      dweight_partials);
    });
}

// Rows are (batch, position) pairs; each covers every head of that position, so the position's
// cos/sin stay in L1 and, in transformers' [B, S, heads, D] memory layout, x is read in order.
template <typename T>
void rope_rows(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool transpose,
               const at::Tensor& out) {
    const i64 B = x.size(0), heads = x.size(1), S = x.size(2), D = x.size(3);
    const bool shared = cos.size(0) == 1, simd = has_avx2();
    const T* px = static_cast<const T*>(x.data_ptr());
    const T* pc = static_cast<const T*>(cos.data_ptr());
    const T* ps = static_cast<const T*>(sin.data_ptr());
    T* po = static_cast<T*>(out.data_ptr());
    const i64 sxb = x.stride(0), sxh = x.stride(1), sxs = x.stride(2);
    const i64 sob = out.stride(0), soh = out.stride(1), sos = out.stride(2);
    at::parallel_for(0, B * S, std::max<i64>(1, kTaskValues / (D * heads)), [&](i64 r0, i64 r1) {
        for (i64 r = r0; r < r1; ++r) {
            const i64 b = r / S, t = r % S;
            const i64 cs = ((shared ? 0 : b) * S + t) * D;
            for (i64 hh = 0; hh < heads; ++hh) {
                const T* xr = px + b * sxb + hh * sxh + t * sxs;
                T* outr = po + b * sob + hh * soh + t * sos;
#ifdef NPU_FT_X86
                if (simd) {
                    rope_row_avx2<T>(xr, pc + cs, ps + cs, D / 2, transpose, outr);
                    continue;
                }
#endif
                rope_row<T>(xr, pc + cs, ps + cs, D / 2, transpose, outr, 0);
            }
        }
    });
    (void)simd;
}

template <typename F>
void dispatch_float(at::ScalarType dtype, const char* name, const F& fn) {
    switch (dtype) {
        case at::kFloat: return fn(float{});
        case at::kBFloat16: return fn(BFloat16{});
        case at::kHalf: return fn(Half{});
        default: TORCH_CHECK(false, name, ": unsupported dtype ", dtype);
    }
}

void rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool transpose, const at::Tensor& out) {
    TORCH_CHECK(x.dim() == 4 && x.size(3) % 2 == 0, "x: expected [B, heads, S, D] with an even D");
    TORCH_CHECK(x.device().is_cpu() && out.device().is_cpu(), "x, out: expected CPU tensors");
    TORCH_CHECK(x.stride(3) == 1 && out.stride(3) == 1, "x, out: the last dim must be contiguous");
    TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type(), "out: must match x");
    const i64 S = x.size(2), D = x.size(3);
    for (const at::Tensor* t : {&cos, &sin}) {
        TORCH_CHECK(t->dim() == 3 && (t->size(0) == 1 || t->size(0) == x.size(0)) && t->size(1) == S &&
                        t->size(2) == D,
                    "cos/sin: expected [B or 1, S, D]");
        check_rows(*t, "cos/sin", x.scalar_type(), t->numel());
    }
    TORCH_CHECK(cos.size(0) == sin.size(0), "cos/sin: batch dims differ");
    dispatch_float(x.scalar_type(), "x", [&](auto tag) {
        using T = decltype(tag);
        rope_rows<T>(x, cos, sin, transpose, out);
    });
}

// ------------------------------------------------------------------------------------------------
// SwiGLU
// ------------------------------------------------------------------------------------------------
void swiglu(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out) {
    const i64 n = gate.numel();
    check_rows(gate, "gate", gate.scalar_type(), n);
    check_rows(up, "up", gate.scalar_type(), n);
    check_rows(out, "out", gate.scalar_type(), n);
    dispatch_float(gate.scalar_type(), "gate", [&](auto tag) {
        using T = decltype(tag);
        const T* pg = static_cast<const T*>(gate.data_ptr());
        const T* pu = static_cast<const T*>(up.data_ptr());
        T* po = static_cast<T*>(out.data_ptr());
        const bool simd = has_avx2();
        at::parallel_for(0, n, kTaskValues, [&](i64 i0, i64 i1) {
#ifdef NPU_FT_X86
            if (simd) return swiglu_range_avx2<T>(pg, pu, po, i0, i1);
#endif
            swiglu_range<T>(pg, pu, po, i0, i1);
        });
        (void)simd;
    });
}

void swiglu_backward(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& dgate,
                     const at::Tensor& dup) {
    const i64 n = gate.numel();
    for (const at::Tensor* t : {&grad, &gate, &up}) check_rows(*t, "grad/gate/up", gate.scalar_type(), n);
    if (dgate.numel()) check_rows(dgate, "dgate", gate.scalar_type(), n);
    if (dup.numel()) check_rows(dup, "dup", gate.scalar_type(), n);
    dispatch_float(gate.scalar_type(), "gate", [&](auto tag) {
        using T = decltype(tag);
        const T* pdy = static_cast<const T*>(grad.data_ptr());
        const T* pg = static_cast<const T*>(gate.data_ptr());
        const T* pu = static_cast<const T*>(up.data_ptr());
        T* pdg = dgate.numel() ? static_cast<T*>(dgate.data_ptr()) : nullptr;
        T* pdu = dup.numel() ? static_cast<T*>(dup.data_ptr()) : nullptr;
        const bool simd = has_avx2();
        at::parallel_for(0, n, kTaskValues, [&](i64 i0, i64 i1) {
#ifdef NPU_FT_X86
            if (simd) return swiglu_backward_range_avx2<T>(pdy, pg, pu, pdg, pdu, i0, i1);
#endif
            swiglu_backward_range<T>(pdy, pg, pu, pdg, pdu, i0, i1);
        });
        (void)simd;
    });
}

}  // namespace
}  // namespace npu_ft_cpu

TORCH_LIBRARY_FRAGMENT(npu_ft_cpu, m) {
    m.def("rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps, Tensor(a!) y, Tensor(b!) h, "
          "Tensor(c!) rstd) -> ()");
    m.def("rms_norm_backward(Tensor grad_y, Tensor? grad_h, Tensor h, Tensor weight, Tensor rstd, Tensor(a!) dx, "
          "Tensor(b!) dweight_partials) -> ()");
    m.def("rope(Tensor x, Tensor cos, Tensor sin, bool transpose, Tensor(a!) out) -> ()");
    m.def("swiglu(Tensor gate, Tensor up, Tensor(a!) out) -> ()");
    m.def("swiglu_backward(Tensor grad, Tensor gate, Tensor up, Tensor(a!) dgate, Tensor(b!) dup) -> ()");
}

TORCH_LIBRARY_IMPL(npu_ft_cpu, CPU, m) {
    m.impl("rms_norm", &npu_ft_cpu::rms_norm);
    m.impl("rms_norm_backward", &npu_ft_cpu::rms_norm_backward);
    m.impl("rope", &npu_ft_cpu::rope);
    m.impl("swiglu", &npu_ft_cpu::swiglu);
    m.impl("swiglu_backward", &npu_ft_cpu::swiglu_backward);
}
