// Float loads and stores shared by npu-ft's native CPU kernels: float32 / bfloat16 / float16
// elements read as float32, and float32 rounded into an element (round to nearest even, NaN -> the
// quiet NaN): the bits c10::BFloat16(f) / c10::Half(f) (torch's casts) give, in branch-light integer
// arithmetic that the compiler vectorizes.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace npu_ft_cpu {

using c10::BFloat16;
using c10::Half;

inline float load_f32(float x) { return x; }
inline float load_f32(BFloat16 x) { return static_cast<float>(x); }
inline float load_f32(Half x) { return static_cast<float>(x); }

inline uint32_t f32_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

inline float f32_from_bits(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// float32 -> bfloat16 / float16 bits (NF4 dequantize builds a 16-entry table per block with them).
inline uint16_t bf16_bits(float f) {
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

inline uint16_t f16_bits(float f) {
    const uint32_t x = f32_bits(f);
    const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return sign | 0x7e00;  // NaN
    if (ax >= 0x477ff000u) return sign | 0x7c00;  // >= 65520 rounds to inf
    if (ax < 0x38800000u) {  // below 2^-14: subnormal or zero; ulp(0.5) == 2^-24 == the fp16 subnormal step
        const float a = f32_from_bits(ax) + 0.5f;
        return sign | static_cast<uint16_t>(f32_bits(a) - 0x3f000000u);
    }
    ax += 0xc8000fffu + ((ax >> 13) & 1u);  // rebias the exponent, round half to even
    return sign | static_cast<uint16_t>(ax >> 13);
}

// ``v`` rounded into an output element of type Out (float32, bfloat16, float16).
template <typename Out>
Out round_to(float v);
template <>
inline float round_to<float>(float v) { return v; }
template <>
inline BFloat16 round_to<BFloat16>(float v) { return BFloat16(bf16_bits(v), BFloat16::from_bits()); }
template <>
inline Half round_to<Half>(float v) { return Half(f16_bits(v), Half::from_bits()); }

}  // namespace npu_ft_cpu
