// NF4 and 8-bit blockwise (de)quantization on the CPU, bit-exact with the reference kernels in
// npu_ft/ops/nf4.py (hence with bitsandbytes 0.50). Registered as npu_ft_cpu::* primitives that
// write into outputs allocated by the caller (npu_ft/ops/backends/cpu/nf4.py):
//
//   nf4_dequantize(packed u8, absmax f32, code f32[16], blocksize, out f32|bf16|f16)
//   nf4_quantize(A f32|bf16|f16, bounds f32[15], blocksize, packed u8, absmax f32)
//   quantize_blockwise_8bit(A f32|bf16|f16, lut u8[65536], blocksize, q u8, absmax f32)
//   dequantize_blockwise_8bit(q u8, absmax f32, code f32[256], blocksize, out f32|bf16|f16)
//   advise_hugepages(buffer) -> bool
//
// Exactness: every float operation is the one torch does (float32 multiply or divide, then a
// round-to-nearest-even cast giving the bits of c10::BFloat16 / c10::Half); the build uses
// -ffp-contract=off so no multiply-add is fused. Blocks are split over torch's intra-op threads with at::parallel_for.

#include "common.h"
#include "float_io.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>
#include <type_traits>

#ifdef __linux__
#include <sys/mman.h>
#endif

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define NPU_FT_X86 1
#endif

namespace npu_ft_cpu {
namespace {


// ------------------------------------------------------------------------------------------------
// NF4 dequantize. Per block: t[k] = cast(code[k] * absmax[b]) for the 16 codes, then two table
// lookups per packed byte (high nibble = even element). The last block may be partial and n odd.
// ------------------------------------------------------------------------------------------------

template <typename Out>
void nf4_dequant_scalar(const uint8_t* packed, const float* absmax, const float* code, Out* out, i64 n,
                        i64 blocksize, i64 b0, i64 b1) {
    Out t[16];
    for (i64 b = b0; b < b1; ++b) {
        const float s = absmax[b];
        for (int k = 0; k < 16; ++k) t[k] = round_to<Out>(code[k] * s);
        const i64 start = b * blocksize, end = std::min(start + blocksize, n);
        const i64 pairs = (end >> 1) - (start >> 1);
        const uint8_t* p = packed + (start >> 1);
        Out* o = out + start;
        for (i64 j = 0; j < pairs; ++j) {
            const uint8_t byte = p[j];
            o[2 * j] = t[byte >> 4];
            o[2 * j + 1] = t[byte & 15];
        }
        if (end & 1) out[end - 1] = t[packed[end >> 1] >> 4];
    }
}

#ifdef NPU_FT_X86
bool has_avx2() {
    static const bool ok = [] {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") != 0;
    }();
    return ok;
}

// 16-bit outputs (bf16 / fp16), full blocks, blocksize a multiple of 32: the 16-entry table is
// split into a low-byte and a high-byte plane and looked up 16 nibbles at a time with pshufb.
template <typename Out>
__attribute__((target("avx2"))) void nf4_dequant_16_simd(const uint8_t* packed, const float* absmax,
                                                         const float* code, Out* out, i64 n, i64 blocksize,
                                                         i64 b0, i64 b1) {
    alignas(16) uint16_t t[16];
    const __m128i m4 = _mm_set1_epi8(0x0f);
    const __m128i even = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m128i odd = _mm_setr_epi8(1, 3, 5, 7, 9, 11, 13, 15, -1, -1, -1, -1, -1, -1, -1, -1);
    uint16_t* out_bits = reinterpret_cast<uint16_t*>(out);
    for (i64 b = b0; b < b1; ++b) {
        const i64 start = b * blocksize;
        if (start + blocksize > n) {  // partial last block
            nf4_dequant_scalar<Out>(packed, absmax, code, out, n, blocksize, b, b + 1);
            continue;
        }
        const float s = absmax[b];
        for (int k = 0; k < 16; ++k) t[k] = round_to<Out>(code[k] * s).x;
        const __m128i t0 = _mm_load_si128(reinterpret_cast<const __m128i*>(t));
        const __m128i t1 = _mm_load_si128(reinterpret_cast<const __m128i*>(t + 8));
        const __m128i plo = _mm_unpacklo_epi64(_mm_shuffle_epi8(t0, even), _mm_shuffle_epi8(t1, even));
        const __m128i phi = _mm_unpacklo_epi64(_mm_shuffle_epi8(t0, odd), _mm_shuffle_epi8(t1, odd));
        const uint8_t* p = packed + (start >> 1);
        uint16_t* o = out_bits + start;
        for (i64 j = 0; j < (blocksize >> 1); j += 16) {
            const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j));
            const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4), lo = _mm_and_si128(v, m4);
            const __m128i ia = _mm_unpacklo_epi8(hi, lo), ib = _mm_unpackhi_epi8(hi, lo);
            const __m128i la = _mm_shuffle_epi8(plo, ia), ha = _mm_shuffle_epi8(phi, ia);
            const __m128i lb = _mm_shuffle_epi8(plo, ib), hb = _mm_shuffle_epi8(phi, ib);
            _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 2 * j), _mm_unpacklo_epi8(la, ha));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 2 * j + 8), _mm_unpackhi_epi8(la, ha));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 2 * j + 16), _mm_unpacklo_epi8(lb, hb));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 2 * j + 24), _mm_unpackhi_epi8(lb, hb));
        }
    }
}

// float32 outputs: the 16 table floats are split into four byte planes (a 4x4 dword transpose),
// looked up with pshufb and re-interleaved into floats.
__attribute__((target("avx2"))) void nf4_dequant_f32_simd(const uint8_t* packed, const float* absmax,
                                                          const float* code, float* out, i64 n, i64 blocksize,
                                                          i64 b0, i64 b1) {
    const __m128i m4 = _mm_set1_epi8(0x0f);
    // bytes of each float grouped by significance: [b0 x4][b1 x4][b2 x4][b3 x4]
    const __m128i grp = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m128 c0 = _mm_loadu_ps(code), c1 = _mm_loadu_ps(code + 4);
    const __m128 c2 = _mm_loadu_ps(code + 8), c3 = _mm_loadu_ps(code + 12);
    for (i64 b = b0; b < b1; ++b) {
        const i64 start = b * blocksize;
        if (start + blocksize > n) {
            nf4_dequant_scalar<float>(packed, absmax, code, out, n, blocksize, b, b + 1);
            continue;
        }
        const __m128 s = _mm_set1_ps(absmax[b]);
        const __m128i r0 = _mm_shuffle_epi8(_mm_castps_si128(_mm_mul_ps(c0, s)), grp);
        const __m128i r1 = _mm_shuffle_epi8(_mm_castps_si128(_mm_mul_ps(c1, s)), grp);
        const __m128i r2 = _mm_shuffle_epi8(_mm_castps_si128(_mm_mul_ps(c2, s)), grp);
        const __m128i r3 = _mm_shuffle_epi8(_mm_castps_si128(_mm_mul_ps(c3, s)), grp);
        // 4x4 transpose of dwords: plane k = byte k of the 16 table floats
        const __m128i a01l = _mm_unpacklo_epi32(r0, r1), a01h = _mm_unpackhi_epi32(r0, r1);
        const __m128i a23l = _mm_unpacklo_epi32(r2, r3), a23h = _mm_unpackhi_epi32(r2, r3);
        const __m128i q0 = _mm_unpacklo_epi64(a01l, a23l), q1 = _mm_unpackhi_epi64(a01l, a23l);
        const __m128i q2 = _mm_unpacklo_epi64(a01h, a23h), q3 = _mm_unpackhi_epi64(a01h, a23h);
        const uint8_t* p = packed + (start >> 1);
        float* o = out + start;
        for (i64 j = 0; j < (blocksize >> 1); j += 16) {
            const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j));
            const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4), lo = _mm_and_si128(v, m4);
            for (int h = 0; h < 2; ++h) {
                const __m128i idx = h ? _mm_unpackhi_epi8(hi, lo) : _mm_unpacklo_epi8(hi, lo);
                const __m128i x0 = _mm_shuffle_epi8(q0, idx), x1 = _mm_shuffle_epi8(q1, idx);
                const __m128i x2 = _mm_shuffle_epi8(q2, idx), x3 = _mm_shuffle_epi8(q3, idx);
                const __m128i w01l = _mm_unpacklo_epi8(x0, x1), w01h = _mm_unpackhi_epi8(x0, x1);
                const __m128i w23l = _mm_unpacklo_epi8(x2, x3), w23h = _mm_unpackhi_epi8(x2, x3);
                __m128i* oo = reinterpret_cast<__m128i*>(o + 2 * j + 16 * h);
                _mm_storeu_si128(oo, _mm_unpacklo_epi16(w01l, w23l));
                _mm_storeu_si128(oo + 1, _mm_unpackhi_epi16(w01l, w23l));
                _mm_storeu_si128(oo + 2, _mm_unpacklo_epi16(w01h, w23h));
                _mm_storeu_si128(oo + 3, _mm_unpackhi_epi16(w01h, w23h));
            }
        }
    }
}
#endif  // NPU_FT_X86

template <typename Out>
void nf4_dequant_blocks(const uint8_t* packed, const float* absmax, const float* code, Out* out, i64 n,
                        i64 blocksize, i64 b0, i64 b1) {
#ifdef NPU_FT_X86
    if (blocksize % 32 == 0 && has_avx2()) {
        if constexpr (std::is_same_v<Out, float>) {
            nf4_dequant_f32_simd(packed, absmax, code, out, n, blocksize, b0, b1);
        } else {
            nf4_dequant_16_simd<Out>(packed, absmax, code, out, n, blocksize, b0, b1);
        }
        return;
    }
#endif
    nf4_dequant_scalar<Out>(packed, absmax, code, out, n, blocksize, b0, b1);
}

// ------------------------------------------------------------------------------------------------
// NF4 quantize. Full blocks: x * (1 / max(absmax, 1e-38)); the last partial block: x / max(absmax,
// 1e-38), and its stored absmax is the clamped one. Code = number of the 15 midpoints below x.
// ------------------------------------------------------------------------------------------------

constexpr float kTiny = 1e-38f;

inline uint8_t nf4_code_of(float x, const float* bounds) {
    x = x < -1.0f ? -1.0f : x;
    x = x > 1.0f ? 1.0f : x;
    uint8_t q = 0;
    for (int k = 0; k < 15; ++k) q += static_cast<uint8_t>(x > bounds[k]);
    return q;
}

// max |A[start:end]|, NaN-propagating like torch's amax.
template <typename In>
float block_absmax(const In* A, i64 start, i64 end) {
    float am = 0.0f;
    for (i64 i = start; i < end; ++i) {
        float v = load_f32(A[i]);
        v = v < 0.0f ? -v : v;
        am = (v > am || v != v) ? v : am;
    }
    return am;
}

template <typename In>
void nf4_quant_blocks(const In* A, const float* bounds, float* absmax, uint8_t* packed, i64 n, i64 blocksize,
                      i64 b0, i64 b1) {
    for (i64 b = b0; b < b1; ++b) {
        const i64 start = b * blocksize;
        const bool partial = start + blocksize > n;
        const i64 end = partial ? n : start + blocksize;
        const float am = block_absmax(A, start, end);
        float amc = am > kTiny ? am : kTiny;
        if (am != am) amc = am;
        absmax[b] = partial ? amc : am;
        const float inv = 1.0f / amc;
        auto code = [&](i64 i) {
            const float x = load_f32(A[i]);
            return nf4_code_of(partial ? x / amc : x * inv, bounds);
        };
        i64 i = start;
        for (; i + 1 < end; i += 2) packed[i >> 1] = static_cast<uint8_t>((code(i) << 4) | code(i + 1));
        if (i < end) packed[i >> 1] = static_cast<uint8_t>((code(i) << 4) | 7);  // pad: the code of 0.0
    }
}

// ------------------------------------------------------------------------------------------------
// 8-bit blockwise (bitsandbytes' CPU semantics: a 65536-entry lookup table of code indices)
// ------------------------------------------------------------------------------------------------

template <typename In>
void q8_quant_blocks(const In* A, const uint8_t* lut, float* absmax, uint8_t* out, i64 n, i64 blocksize, i64 b0,
                     i64 b1) {
    for (i64 b = b0; b < b1; ++b) {
        const i64 start = b * blocksize, end = std::min(start + blocksize, n);
        const float am = block_absmax(A, start, end);
        absmax[b] = am;
        if (am == 0.0f) {
            std::memset(out + start, 0, static_cast<size_t>(end - start));
            continue;
        }
        const float inv = 1.0f / am;
        for (i64 i = start; i < end; ++i) {
            float x = load_f32(A[i]) * inv;
            x = x < -1.0f ? -1.0f : x;
            x = x > 1.0f ? 1.0f : x;
            float t = (x + 1.0f) * 0.5f;
            t = t * 65535.0f;
            t = t + 0.5f;
            out[i] = lut[static_cast<uint32_t>(t)];
        }
    }
}

template <typename Out>
void q8_dequant_blocks(const uint8_t* q, const float* absmax, const float* code, Out* out, i64 n, i64 blocksize,
                       i64 b0, i64 b1) {
    for (i64 b = b0; b < b1; ++b) {
        const i64 start = b * blocksize, end = std::min(start + blocksize, n);
        const float s = absmax[b];
        for (i64 i = start; i < end; ++i) out[i] = round_to<Out>(code[q[i]] * s);
    }
}

// ------------------------------------------------------------------------------------------------
// checks, then the blocks in parallel, per dtype
// ------------------------------------------------------------------------------------------------

// Runs fn(T{}, b0, b1) over the block ranges of n values, in parallel tasks of values_per_task, with
// T the C++ type of a float32 / bfloat16 / float16 tensor of dtype ``dtype`` (argument ``name``).
template <typename F>
void for_each_float_block_range(at::ScalarType dtype, const char* name, i64 n, i64 blocksize, i64 values_per_task,
                                const F& fn) {
    auto run = [&](auto tag) {
        for_each_block_range(n, blocksize, values_per_task, [&](i64 b0, i64 b1) { fn(tag, b0, b1); });
    };
    switch (dtype) {
        case at::kFloat: run(float{}); break;
        case at::kBFloat16: run(BFloat16{}); break;
        case at::kHalf: run(Half{}); break;
        default: TORCH_CHECK(false, name, ": dtype ", dtype, " not supported (expected float32, bfloat16, float16)");
    }
}

i64 num_blocks(i64 n, i64 blocksize) { return (n + blocksize - 1) / blocksize; }

// The buffers of a dequantize primitive: out (n values), codes (min_codes bytes), one absmax per
// block, a code table of table_size floats.
void check_dequantize_args(const at::Tensor& codes, const char* codes_name, i64 min_codes, const at::Tensor& absmax,
                           const at::Tensor& code, i64 table_size, int64_t blocksize, const at::Tensor& out) {
    check_blocksize(blocksize);
    TORCH_CHECK(out.device().is_cpu() && out.is_contiguous(), "out: expected a contiguous CPU tensor");
    check_buffer(codes, codes_name, at::kByte, min_codes);
    check_buffer(absmax, "absmax", at::kFloat, num_blocks(out.numel(), blocksize));
    check_buffer(code, "code", at::kFloat, table_size);
}

// The buffers of a quantize primitive: A (n values), a float32 or uint8 table, codes (min_codes
// bytes), one absmax per block.
void check_quantize_args(const at::Tensor& A, const at::Tensor& table, const char* table_name,
                         at::ScalarType table_dtype, i64 table_size, int64_t blocksize, const at::Tensor& codes,
                         const char* codes_name, i64 min_codes, const at::Tensor& absmax) {
    check_blocksize(blocksize);
    TORCH_CHECK(A.device().is_cpu() && A.is_contiguous(), "A: expected a contiguous CPU tensor");
    check_buffer(table, table_name, table_dtype, table_size);
    check_buffer(codes, codes_name, at::kByte, min_codes);
    check_buffer(absmax, "absmax", at::kFloat, num_blocks(A.numel(), blocksize));
}

void nf4_dequantize(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
                    const at::Tensor& out) {
    const i64 n = out.numel();
    check_dequantize_args(packed, "packed", (n + 1) / 2, absmax, code, 16, blocksize, out);
    for_each_float_block_range(out.scalar_type(), "out", n, blocksize, kCheapTaskValues, [&](auto tag, i64 b0, i64 b1) {
        using Out = decltype(tag);
        nf4_dequant_blocks<Out>(packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), code.data_ptr<float>(),
                                static_cast<Out*>(out.data_ptr()), n, blocksize, b0, b1);
    });
}

void dequantize_blockwise_8bit(const at::Tensor& q, const at::Tensor& absmax, const at::Tensor& code,
                               int64_t blocksize, const at::Tensor& out) {
    const i64 n = out.numel();
    check_dequantize_args(q, "q", n, absmax, code, 256, blocksize, out);
    for_each_float_block_range(out.scalar_type(), "out", n, blocksize, kCheapTaskValues, [&](auto tag, i64 b0, i64 b1) {
        using Out = decltype(tag);
        q8_dequant_blocks<Out>(q.data_ptr<uint8_t>(), absmax.data_ptr<float>(), code.data_ptr<float>(),
                               static_cast<Out*>(out.data_ptr()), n, blocksize, b0, b1);
    });
}

void nf4_quantize(const at::Tensor& A, const at::Tensor& bounds, int64_t blocksize, const at::Tensor& packed,
                  const at::Tensor& absmax) {
    const i64 n = A.numel();
    check_quantize_args(A, bounds, "bounds", at::kFloat, 15, blocksize, packed, "packed", (n + 1) / 2, absmax);
    for_each_float_block_range(A.scalar_type(), "A", n, blocksize, kTaskValues, [&](auto tag, i64 b0, i64 b1) {
        using In = decltype(tag);
        nf4_quant_blocks<In>(static_cast<const In*>(A.data_ptr()), bounds.data_ptr<float>(), absmax.data_ptr<float>(),
                             packed.data_ptr<uint8_t>(), n, blocksize, b0, b1);
    });
}

void quantize_blockwise_8bit(const at::Tensor& A, const at::Tensor& lut, int64_t blocksize, const at::Tensor& q,
                             const at::Tensor& absmax) {
    const i64 n = A.numel();
    check_quantize_args(A, lut, "lut", at::kByte, 65536, blocksize, q, "q", n, absmax);
    for_each_float_block_range(A.scalar_type(), "A", n, blocksize, kTaskValues, [&](auto tag, i64 b0, i64 b1) {
        using In = decltype(tag);
        q8_quant_blocks<In>(static_cast<const In*>(A.data_ptr()), lut.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                            q.data_ptr<uint8_t>(), n, blocksize, b0, b1);
    });
}

// Asks Linux for transparent huge pages on the 2 MiB-aligned interior of a fresh, untouched
// buffer: with THP in "madvise" mode this turns 512 page faults (each zeroing 4 KiB) into one.
// Advisory only; returns whether the advice was accepted.
bool advise_hugepages(const at::Tensor& buffer) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = uintptr_t{1} << 21;
    const uintptr_t ptr = reinterpret_cast<uintptr_t>(buffer.data_ptr());
    const uintptr_t lo = (ptr + huge - 1) & ~(huge - 1);
    const uintptr_t hi = (ptr + static_cast<uintptr_t>(buffer.nbytes())) & ~(huge - 1);
    if (hi > lo) return madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE) == 0;
#endif
    (void)buffer;
    return false;
}

}  // namespace
}  // namespace npu_ft_cpu

TORCH_LIBRARY_FRAGMENT(npu_ft_cpu, m) {
    m.def("nf4_dequantize(Tensor packed, Tensor absmax, Tensor code, int blocksize, Tensor(a!) out) -> ()");
    m.def("nf4_quantize(Tensor A, Tensor bounds, int blocksize, Tensor(a!) packed, Tensor(b!) absmax) -> ()");
    m.def("quantize_blockwise_8bit(Tensor A, Tensor lut, int blocksize, Tensor(a!) q, Tensor(b!) absmax) -> ()");
    m.def("dequantize_blockwise_8bit(Tensor q, Tensor absmax, Tensor code, int blocksize, Tensor(a!) out) -> ()");
    m.def("advise_hugepages(Tensor(a!) buffer) -> bool");
}

TORCH_LIBRARY_IMPL(npu_ft_cpu, CPU, m) {
    m.impl("nf4_dequantize", &npu_ft_cpu::nf4_dequantize);
    m.impl("nf4_quantize", &npu_ft_cpu::nf4_quantize);
    m.impl("quantize_blockwise_8bit", &npu_ft_cpu::quantize_blockwise_8bit);
    m.impl("dequantize_blockwise_8bit", &npu_ft_cpu::dequantize_blockwise_8bit);
    m.impl("advise_hugepages", &npu_ft_cpu::advise_hugepages);
}
