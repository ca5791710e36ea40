"""CPU kernels of the NF4 / 8-bit blockwise ops.

Two tiers, both bit-exact with the reference kernels in :mod:`npu_ft.ops.nf4` (hence with
bitsandbytes 0.50):

* **native**: a few small C loops (source below), compiled on first use with the system C compiler
  (``cc -O3``, well under a second) into ``$NPU_FT_CACHE_DIR`` (default
  ``~/.cache/npu_ft/cpu_kernels``), keyed by a hash of the source and flags, and called through
  ctypes. ctypes releases the GIL, so large tensors are split by blocks across
  ``torch.get_num_threads()`` Python threads. No torch headers are needed, so there is no
  cpp_extension build. Dequantize builds, per block, the 16 scaled NF4 values already rounded to
  the output dtype (the same float32 multiply and round-to-nearest-even cast torch does) and then
  writes two outputs per packed byte with one table lookup each.
* **torch**: used where no C compiler works (or ``NPU_FT_CPU_NATIVE=0``): dequantize gathers
  ``(code[hi], code[lo])`` pairs from a 256-entry table viewed as int64, in cache-sized chunks,
  then multiplies by absmax straight into the output dtype; the other ops run the reference.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading

import torch

from ... import _registry
from ... import nf4 as _nf4

log = logging.getLogger(__name__)

ENV_NATIVE = "NPU_FT_CPU_NATIVE"
ENV_CACHE = "NPU_FT_CACHE_DIR"

_C_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

typedef int64_t i64;

static inline float f32_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* float32 -> bfloat16, round to nearest even; NaN -> 0x7fc0 (as c10::BFloat16). */
static inline uint16_t to_bf16(float f) {
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* float32 -> IEEE binary16, round to nearest even (subnormals, overflow to inf, NaN -> 0x7e00). */
static inline uint16_t to_f16(float f) {
    uint32_t x = f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return sign | 0x7e00;
    if (ax >= 0x477ff000u) return sign | 0x7c00;          /* >= 65520 rounds to inf */
    if (ax < 0x38800000u) {                               /* below 2^-14: subnormal or zero */
        float a = f32_from_bits(ax) + 0.5f;               /* ulp(0.5) == 2^-24 == fp16 subnormal step */
        return sign | (uint16_t)(f32_bits(a) - 0x3f000000u);
    }
    ax += 0xc8000fffu + ((ax >> 13) & 1u);                /* rebias exponent, round half to even */
    return sign | (uint16_t)(ax >> 13);
}

static inline float bf16_to_f32(uint16_t h) { return f32_from_bits(((uint32_t)h) << 16); }

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = ((uint32_t)(h & 0x8000u)) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return f32_from_bits(sign | 0x7f800000u | (m << 13));
    if (e == 0) {                                          /* zero / subnormal: m * 2^-24 exactly */
        float v = (float)m * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    return f32_from_bits(sign | ((e + 112u) << 23) | (m << 13));
}

/* ---------------- NF4 dequantize: blocks [b0, b1) of n values ----------------
   Per block: t[k] = cast(code[k] * absmax[b]) for the 16 codes, then two table lookups per byte.
   On x86-64 with AVX2 available at run time the table is split into byte planes and looked up 16
   nibbles at a time with pshufb (full blocks; blocksize is a multiple of 32). */

#define DEQ_NF4_SCALAR(NAME, OUT_T, CONV)                                                       \
static void NAME(const uint8_t* packed, const float* absmax, const float* code, OUT_T* out,    \
                 i64 n, i64 blocksize, i64 b0, i64 b1) {                                        \
    OUT_T t[16];                                                                                \
    for (i64 b = b0; b < b1; ++b) {                                                             \
        const float s = absmax[b];                                                              \
        for (int k = 0; k < 16; ++k) { float v = code[k] * s; t[k] = CONV; }                    \
        i64 start = b * blocksize, end = start + blocksize;                                     \
        if (end > n) end = n;                                                                   \
        i64 j0 = start >> 1, j1 = end >> 1;                                                     \
        OUT_T* o = out + start;                                                                 \
        const uint8_t* p = packed + j0;                                                         \
        for (i64 j = 0; j < j1 - j0; ++j) {                                                     \
            uint8_t byte = p[j];                                                                \
            o[2 * j] = t[byte >> 4];                                                            \
            o[2 * j + 1] = t[byte & 15];                                                        \
        }                                                                                       \
        if (end & 1) out[end - 1] = t[packed[end >> 1] >> 4];                                   \
    }                                                                                           \
}

DEQ_NF4_SCALAR(nf4_dequant_f32_scalar, float, v)
DEQ_NF4_SCALAR(nf4_dequant_bf16_scalar, uint16_t, to_bf16(v))
DEQ_NF4_SCALAR(nf4_dequant_f16_scalar, uint16_t, to_f16(v))

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define NPU_FT_X86 1

static int has_avx2(void) {
    static int cached = -1;
    if (cached < 0) { __builtin_cpu_init(); cached = __builtin_cpu_supports("avx2") ? 1 : 0; }
    return cached;
}

/* 16-bit outputs (bf16 when is_f16 == 0, fp16 otherwise). */
__attribute__((target("avx2")))
static void nf4_dequant_16_simd(const uint8_t* packed, const float* absmax, const float* code, uint16_t* out,
                                i64 n, i64 blocksize, i64 b0, i64 b1, int is_f16) {
    uint16_t t[16] __attribute__((aligned(16)));
    const __m128i m4 = _mm_set1_epi8(0x0f);
    const __m128i even = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m128i odd = _mm_setr_epi8(1, 3, 5, 7, 9, 11, 13, 15, -1, -1, -1, -1, -1, -1, -1, -1);
    for (i64 b = b0; b < b1; ++b) {
        i64 start = b * blocksize;
        if (start + blocksize > n) {  /* partial last block */
            if (is_f16) nf4_dequant_f16_scalar(packed, absmax, code, out, n, blocksize, b, b + 1);
            else nf4_dequant_bf16_scalar(packed, absmax, code, out, n, blocksize, b, b + 1);
            continue;
        }
        const float s = absmax[b];
        if (is_f16) { for (int k = 0; k < 16; ++k) t[k] = to_f16(code[k] * s); }
        else { for (int k = 0; k < 16; ++k) t[k] = to_bf16(code[k] * s); }
        const __m128i t0 = _mm_load_si128((const __m128i*)t), t1 = _mm_load_si128((const __m128i*)(t + 8));
        const __m128i plo = _mm_unpacklo_epi64(_mm_shuffle_epi8(t0, even), _mm_shuffle_epi8(t1, even));
        const __m128i phi = _mm_unpacklo_epi64(_mm_shuffle_epi8(t0, odd), _mm_shuffle_epi8(t1, odd));
        const uint8_t* p = packed + (start >> 1);
        uint16_t* o = out + start;
        for (i64 j = 0; j < (blocksize >> 1); j += 16) {
            const __m128i v = _mm_loadu_si128((const __m128i*)(p + j));
            const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4), lo = _mm_and_si128(v, m4);
            const __m128i ia = _mm_unpacklo_epi8(hi, lo), ib = _mm_unpackhi_epi8(hi, lo);
            const __m128i la = _mm_shuffle_epi8(plo, ia), ha = _mm_shuffle_epi8(phi, ia);
            const __m128i lb = _mm_shuffle_epi8(plo, ib), hb = _mm_shuffle_epi8(phi, ib);
            _mm_storeu_si128((__m128i*)(o + 2 * j), _mm_unpacklo_epi8(la, ha));
            _mm_storeu_si128((__m128i*)(o + 2 * j + 8), _mm_unpackhi_epi8(la, ha));
            _mm_storeu_si128((__m128i*)(o + 2 * j + 16), _mm_unpacklo_epi8(lb, hb));
            _mm_storeu_si128((__m128i*)(o + 2 * j + 24), _mm_unpackhi_epi8(lb, hb));
        }
    }
}

__attribute__((target("avx2")))
static void nf4_dequant_f32_simd(const uint8_t* packed, const float* absmax, const float* code, float* out,
                                 i64 n, i64 blocksize, i64 b0, i64 b1) {
    const __m128i m4 = _mm_set1_epi8(0x0f);
    /* bytes of each float grouped by significance: [b0 x4][b1 x4][b2 x4][b3 x4] */
    const __m128i grp = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m128 c0 = _mm_loadu_ps(code), c1 = _mm_loadu_ps(code + 4);
    const __m128 c2 = _mm_loadu_ps(code + 8), c3 = _mm_loadu_ps(code + 12);
    for (i64 b = b0; b < b1; ++b) {
        i64 start = b * blocksize;
        if (start + blocksize > n) {
            nf4_dequant_f32_scalar(packed, absmax, code, out, n, blocksize, b, b + 1);
            continue;
        }
        const __m128 s = _mm_set1_ps(absmax[b]);
        __m128i r0 = _mm_shuffle_epi8(_mm_castps_si128(_mm_mul_ps(c0, s)), grp);
        __m128i r1 = _mm_shuffle_epi8(_mm_castps_si128(_mm_mul_ps(c1, s)), grp);
        __m128i r2 = _mm_shuffle_epi8(_mm_castps_si128(_mm_mul_ps(c2, s)), grp);
        __m128i r3 = _mm_shuffle_epi8(_mm_castps_si128(_mm_mul_ps(c3, s)), grp);
        /* 4x4 transpose of dwords: plane k = byte k of the 16 table floats */
        const __m128i a01l = _mm_unpacklo_epi32(r0, r1), a01h = _mm_unpackhi_epi32(r0, r1);
        const __m128i a23l = _mm_unpacklo_epi32(r2, r3), a23h = _mm_unpackhi_epi32(r2, r3);
        const __m128i q0 = _mm_unpacklo_epi64(a01l, a23l), q1 = _mm_unpackhi_epi64(a01l, a23l);
        const __m128i q2 = _mm_unpacklo_epi64(a01h, a23h), q3 = _mm_unpackhi_epi64(a01h, a23h);
        const uint8_t* p = packed + (start >> 1);
        float* o = out + start;
        for (i64 j = 0; j < (blocksize >> 1); j += 16) {
            const __m128i v = _mm_loadu_si128((const __m128i*)(p + j));
            const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4), lo = _mm_and_si128(v, m4);
            for (int h = 0; h < 2; ++h) {
                const __m128i idx = h ? _mm_unpackhi_epi8(hi, lo) : _mm_unpacklo_epi8(hi, lo);
                const __m128i x0 = _mm_shuffle_epi8(q0, idx), x1 = _mm_shuffle_epi8(q1, idx);
                const __m128i x2 = _mm_shuffle_epi8(q2, idx), x3 = _mm_shuffle_epi8(q3, idx);
                const __m128i w01l = _mm_unpacklo_epi8(x0, x1), w01h = _mm_unpackhi_epi8(x0, x1);
                const __m128i w23l = _mm_unpacklo_epi8(x2, x3), w23h = _mm_unpackhi_epi8(x2, x3);
                float* oo = o + 2 * j + 16 * h;
                _mm_storeu_si128((__m128i*)(oo), _mm_unpacklo_epi16(w01l, w23l));
                _mm_storeu_si128((__m128i*)(oo + 4), _mm_unpackhi_epi16(w01l, w23l));
                _mm_storeu_si128((__m128i*)(oo + 8), _mm_unpacklo_epi16(w01h, w23h));
                _mm_storeu_si128((__m128i*)(oo + 12), _mm_unpackhi_epi16(w01h, w23h));
            }
        }
    }
}
#endif

void nf4_dequant_f32(const uint8_t* packed, const float* absmax, const float* code, float* out,
                     i64 n, i64 blocksize, i64 b0, i64 b1) {
#ifdef NPU_FT_X86
    if (has_avx2() && blocksize % 32 == 0) { nf4_dequant_f32_simd(packed, absmax, code, out, n, blocksize, b0, b1);
        return; }
#endif
    nf4_dequant_f32_scalar(packed, absmax, code, out, n, blocksize, b0, b1);
}

void nf4_dequant_bf16(const uint8_t* packed, const float* absmax, const float* code, uint16_t* out,
                      i64 n, i64 blocksize, i64 b0, i64 b1) {
#ifdef NPU_FT_X86
    if (has_avx2() && blocksize % 32 == 0) { nf4_dequant_16_simd(packed, absmax, code, out, n, blocksize, b0, b1, 0);
        return; }
#endif
    nf4_dequant_bf16_scalar(packed, absmax, code, out, n, blocksize, b0, b1);
}

void nf4_dequant_f16(const uint8_t* packed, const float* absmax, const float* code, uint16_t* out,
                     i64 n, i64 blocksize, i64 b0, i64 b1) {
#ifdef NPU_FT_X86
    if (has_avx2() && blocksize % 32 == 0) { nf4_dequant_16_simd(packed, absmax, code, out, n, blocksize, b0, b1, 1);
        return; }
#endif
    nf4_dequant_f16_scalar(packed, absmax, code, out, n, blocksize, b0, b1);
}

/* Ask Linux for transparent huge pages on the 2 MiB-aligned interior of a fresh, untouched output
   buffer: with THP in "madvise" mode this turns 512 page faults (each zeroing 4 KiB) into one.
   Advisory only; errors are ignored. Returns 1 if the advice was accepted. */
int advise_hugepages(void* ptr, i64 nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)1 << 21;
    uintptr_t lo = ((uintptr_t)ptr + huge - 1) & ~(huge - 1);
    uintptr_t hi = ((uintptr_t)ptr + (uintptr_t)nbytes) & ~(huge - 1);
    if (hi > lo) return madvise((void*)lo, hi - lo, MADV_HUGEPAGE) == 0;
#endif
    (void)ptr; (void)nbytes;
    return 0;
}

/* ---------------- NF4 quantize: blocks [b0, b1) of n values ----------------
   Full blocks: x * (1 / max(absmax, 1e-38)); the last partial block: x / max(absmax, 1e-38), and
   its stored absmax is the clamped one. Code = number of the 15 midpoints strictly below x. */

static inline uint8_t nf4_code_of(float x, const float* bounds) {
    x = x < -1.0f ? -1.0f : x;
    x = x > 1.0f ? 1.0f : x;
    uint8_t q = 0;
    for (int k = 0; k < 15; ++k) q += (uint8_t)(x > bounds[k]);
    return q;
}

#define Q_NF4(NAME, IN_T, LOAD)                                                                 \
void NAME(const IN_T* A, const float* bounds, float* absmax, uint8_t* packed,                  \
          i64 n, i64 blocksize, i64 b0, i64 b1) {                                               \
    for (i64 b = b0; b < b1; ++b) {                                                             \
        i64 start = b * blocksize, end = start + blocksize;                                     \
        int partial = end > n;                                                                  \
        if (partial) end = n;                                                                   \
        float am = 0.0f;                                                                        \
        for (i64 i = start; i < end; ++i) {                                                     \
            float v = LOAD(A[i]);                                                               \
            v = v < 0.0f ? -v : v;                                                              \
            am = (v > am || v != v) ? v : am;                                                   \
        }                                                                                       \
        float amc = am > 1e-38f ? am : 1e-38f;                                                  \
        if (am != am) amc = am;                                                                 \
        absmax[b] = partial ? amc : am;                                                         \
        float inv = 1.0f / amc;                                                                 \
        i64 i = start;                                                                          \
        for (; i + 1 < end; i += 2) {                                                           \
            float x0 = LOAD(A[i]), x1 = LOAD(A[i + 1]);                                         \
            x0 = partial ? x0 / amc : x0 * inv;                                                 \
            x1 = partial ? x1 / amc : x1 * inv;                                                 \
            packed[i >> 1] = (uint8_t)((nf4_code_of(x0, bounds) << 4) | nf4_code_of(x1, bounds)); \
        }                                                                                       \
        if (i < end) {                                                                          \
            float x0 = LOAD(A[i]);                                                              \
            x0 = partial ? x0 / amc : x0 * inv;                                                 \
            packed[i >> 1] = (uint8_t)((nf4_code_of(x0, bounds) << 4) | 7);                     \
        }                                                                                       \
    }                                                                                           \
}

#define LOAD_F32(x) (x)
Q_NF4(nf4_quant_f32, float, LOAD_F32)
Q_NF4(nf4_quant_bf16, uint16_t, bf16_to_f32)
Q_NF4(nf4_quant_f16, uint16_t, f16_to_f32)

/* ---------------- 8-bit blockwise (bitsandbytes CPU semantics) ---------------- */

#define Q_8BIT(NAME, IN_T, LOAD)                                                                \
void NAME(const IN_T* A, const uint8_t* lut, float* absmax, uint8_t* out,                      \
          i64 n, i64 blocksize, i64 b0, i64 b1) {                                               \
    for (i64 b = b0; b < b1; ++b) {                                                             \
        i64 start = b * blocksize, end = start + blocksize;                                     \
        if (end > n) end = n;                                                                   \
        float am = 0.0f;                                                                        \
        for (i64 i = start; i < end; ++i) {                                                     \
            float v = LOAD(A[i]);                                                               \
            v = v < 0.0f ? -v : v;                                                              \
            am = (v > am || v != v) ? v : am;                                                   \
        }                                                                                       \
        absmax[b] = am;                                                                         \
        if (am == 0.0f) { memset(out + start, 0, (size_t)(end - start)); continue; }            \
        float inv = 1.0f / am;                                                                  \
        for (i64 i = start; i < end; ++i) {                                                     \
            float x = LOAD(A[i]) * inv;                                                         \
            x = x < -1.0f ? -1.0f : x;                                                          \
            x = x > 1.0f ? 1.0f : x;                                                            \
            float t = (x + 1.0f) * 0.5f;                                                        \
            t = t * 65535.0f;                                                                   \
            t = t + 0.5f;                                                                       \
            out[i] = lut[(uint32_t)t];                                                          \
        }                                                                                       \
    }                                                                                           \
}

Q_8BIT(q8_quant_f32, float, LOAD_F32)
Q_8BIT(q8_quant_bf16, uint16_t, bf16_to_f32)
Q_8BIT(q8_quant_f16, uint16_t, f16_to_f32)

#define DEQ_8BIT(NAME, OUT_T, CONV)                                                             \
void NAME(const uint8_t* q, const float* absmax, const float* code, OUT_T* out,                \
          i64 n, i64 blocksize, i64 b0, i64 b1) {                                               \
    for (i64 b = b0; b < b1; ++b) {                                                             \
        i64 start = b * blocksize, end = start + blocksize;                                     \
        if (end > n) end = n;                                                                   \
        const float s = absmax[b];                                                              \
        for (i64 i = start; i < end; ++i) { float v = code[q[i]] * s; out[i] = CONV; }          \
    }                                                                                           \
}

DEQ_8BIT(q8_dequant_f32, float, v)
DEQ_8BIT(q8_dequant_bf16, uint16_t, to_bf16(v))
DEQ_8BIT(q8_dequant_f16, uint16_t, to_f16(v))
"""

# -ffp-contract=off: no fused multiply-add, so every float op rounds exactly as torch's does.
_CFLAGS = ["-O3", "-fPIC", "-shared", "-std=gnu99", "-ffp-contract=off", "-fno-fast-math"]

_FUNCS = [
    f"{kind}_{dt}"
    for kind in ("nf4_dequant", "nf4_quant", "q8_quant", "q8_dequant")
    for dt in ("f32", "bf16", "f16")
]
_DT_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}

_LIB_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None = None
_LIB_ERROR: str | None = None
_POOL: concurrent.futures.ThreadPoolExecutor | None = None

# Below this many values a single call on the calling thread is faster than fanning out.
_PARALLEL_MIN = 1 << 16


def _cache_dir() -> str:
    root = os.environ.get(ENV_CACHE) or os.path.join(os.path.expanduser("~"), ".cache", "npu_ft")
    return os.path.join(root, "cpu_kernels")


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        if name:
            exe = shutil.which(name.split()[0])
            if exe:
                return exe
    return None


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    key = hashlib.sha256("\0".join([_C_SOURCE, cc, *_CFLAGS, sys.platform]).encode()).hexdigest()[:16]
    folder = _cache_dir()
    path = os.path.join(folder, f"npu_ft_nf4_{key}.so")
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            src = os.path.join(tmp, "nf4.c")
            with open(src, "w") as f:
                f.write(_C_SOURCE)
            tmp_lib = os.path.join(tmp, "nf4.so")
            proc = subprocess.run([cc, *_CFLAGS, src, "-o", tmp_lib], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
            os.replace(tmp_lib, path)  # atomic: concurrent builders race harmlessly
        log.debug("built %s", path)
    lib = ctypes.CDLL(path)
    lib.advise_hugepages.restype = ctypes.c_int
    lib.advise_hugepages.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    for name in _FUNCS:
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4
    return lib


def native_library() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (see :func:`native_unavailable_reason`)."""
    global _LIB, _LIB_ERROR
    if os.environ.get(ENV_NATIVE, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if _LIB is not None or _LIB_ERROR is not None:
        return _LIB
    with _LIB_LOCK:
        if _LIB is None and _LIB_ERROR is None:
            try:
                _LIB = _build()
            except Exception as exc:  # no compiler, read-only cache, ...: fall back to torch
                _LIB_ERROR = f"{type(exc).__name__}: {exc}"
                log.warning("npu_ft: native CPU NF4 kernels unavailable, using torch ops (%s)", _LIB_ERROR)
    return _LIB


def native_unavailable_reason() -> str | None:
    if os.environ.get(ENV_NATIVE, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"disabled by {ENV_NATIVE}"
    native_library()
    return _LIB_ERROR


def _run_blocks(fn, ptrs: tuple[int, int, int, int], n: int, blocksize: int) -> None:
    """Call ``fn(*ptrs, n, blocksize, b0, b1)`` over all blocks, split across threads."""
    global _POOL
    nblocks = (n + blocksize - 1) // blocksize
    threads = max(1, torch.get_num_threads())
    if threads == 1 or n < _PARALLEL_MIN or nblocks < 2:
        fn(*ptrs, n, blocksize, 0, nblocks)
        return
    if _POOL is None or _POOL._max_workers < threads:  # noqa: SLF001 - grow the pool if needed
        with _LIB_LOCK:
            if _POOL is None or _POOL._max_workers < threads:  # noqa: SLF001
                _POOL = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="npu_ft_nf4")
    parts = min(threads, nblocks)
    bounds = [nblocks * i // parts for i in range(parts + 1)]
    futures = [
        _POOL.submit(fn, *ptrs, n, blocksize, bounds[i], bounds[i + 1]) for i in range(1, parts)
    ]
    fn(*ptrs, n, blocksize, bounds[0], bounds[1])
    for fut in futures:
        fut.result()


# ------------------------------------------------------------------------------------------
# torch fallback for dequantize
# ------------------------------------------------------------------------------------------

_PAIRS: torch.Tensor | None = None
_CHUNK_BYTES = 1 << 14  # packed bytes per chunk: ~128 KiB of float32 pairs, stays in L2


def _nf4_pairs_int64() -> torch.Tensor:
    """int64 [256]: each entry holds the float32 pair (code[byte >> 4], code[byte & 15])."""
    global _PAIRS
    if _PAIRS is None:
        code = _nf4.NF4_CODE
        pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1).contiguous()
        _PAIRS = pairs.view(torch.int64).reshape(256)
    return _PAIRS


def _torch_path_ok(n: int, blocksize: int) -> bool:
    return not (blocksize % 2 or n % blocksize or n % 2)


def _nf4_dequantize_torch(packed, absmax, blocksize, shape, dtype, out=None):
    n = 1
    for d in shape:
        n *= int(d)
    if not _torch_path_ok(n, blocksize):
        ref = _nf4.nf4_dequantize_reference(packed, absmax, blocksize, shape, dtype)
        return ref if out is None else out.view(tuple(shape)).copy_(ref)
    p = packed.reshape(-1)
    out = torch.empty(n, dtype=dtype) if out is None else out.view(-1)
    pairs = _nf4_pairs_int64()
    half = blocksize // 2
    chunk = max(_CHUNK_BYTES // half, 1) * half  # whole blocks per chunk
    absmax = absmax.reshape(-1, 1)
    for s in range(0, p.numel(), chunk):
        idx = p[s : s + chunk].to(torch.int32)
        vals = torch.index_select(pairs, 0, idx).view(torch.float32).view(-1, blocksize)
        b0 = (2 * s) // blocksize
        torch.mul(vals, absmax[b0 : b0 + vals.shape[0]], out=out[2 * s : 2 * s + vals.numel()].view(-1, blocksize))
    return out.view(tuple(shape))


# ------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


_HUGE_MIN_BYTES = 8 << 20


def _empty_output(lib, shape, dtype) -> torch.Tensor:
    """torch.empty, with huge pages requested for large buffers before their first touch."""
    out = torch.empty(shape, dtype=dtype)
    nbytes = out.numel() * out.element_size()
    if nbytes >= _HUGE_MIN_BYTES:
        lib.advise_hugepages(out.data_ptr(), nbytes)
    return out


def nf4_dequantize_cpu(packed, absmax, blocksize, shape, dtype):
    lib = native_library()
    if lib is None:
        return _nf4_dequantize_torch(packed, absmax, blocksize, shape, dtype)
    n = 1
    for d in shape:
        n *= int(d)
    packed = packed.contiguous()
    absmax = absmax.to(torch.float32).contiguous()
    out = _empty_output(lib, tuple(shape), dtype)
    code = _nf4.nf4_code("cpu")
    fn = getattr(lib, f"nf4_dequant_{_DT_SUFFIX[dtype]}")
    _run_blocks(fn, (_ptr(packed), _ptr(absmax), _ptr(code), _ptr(out)), n, blocksize)
    return out


def nf4_dequantize_into(packed, absmax, blocksize, shape, dtype, out: torch.Tensor) -> torch.Tensor:
    """:func:`nf4_dequantize_cpu` written into ``out`` (a contiguous CPU tensor of ``prod(shape)``
    elements of ``dtype``, e.g. a reused workspace) instead of a new tensor; returns ``out`` viewed
    as ``shape``. Same values, bit for bit, as ``nf4_dequantize_cpu``."""
    n = 1
    for d in shape:
        n *= int(d)
    if out.dtype != dtype or out.numel() != n or not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError(f"out: expected a contiguous cpu tensor of {n} {dtype}, got {tuple(out.shape)} {out.dtype}")
    lib = native_library()
    if lib is None:
        return _nf4_dequantize_torch(packed, absmax, blocksize, shape, dtype, out=out)
    packed = packed.contiguous()
    absmax = absmax.to(torch.float32).contiguous()
    code = _nf4.nf4_code("cpu")
    fn = getattr(lib, f"nf4_dequant_{_DT_SUFFIX[dtype]}")
    _run_blocks(fn, (_ptr(packed), _ptr(absmax), _ptr(code), _ptr(out)), n, blocksize)
    return out.view(tuple(shape))


def nf4_quantize_cpu(A, blocksize):
    lib = native_library()
    if lib is None:
        return _nf4.nf4_quantize_reference(A, blocksize)
    A = A.contiguous()
    n = A.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = torch.empty(((n + blocksize - 1) // blocksize,), dtype=torch.float32)
    bounds = _nf4.nf4_bounds("cpu")
    fn = getattr(lib, f"nf4_quant_{_DT_SUFFIX[A.dtype]}")
    _run_blocks(fn, (_ptr(A), _ptr(bounds), _ptr(absmax), _ptr(packed)), n, blocksize)
    return packed, absmax


_LUT_CACHE: dict[bytes, torch.Tensor] = {}


def _lut_for(code: torch.Tensor) -> torch.Tensor:
    key = code.to(torch.float32).contiguous().numpy().tobytes()
    lut = _LUT_CACHE.get(key)
    if lut is None:
        if len(_LUT_CACHE) > 8:
            _LUT_CACHE.clear()
        lut = _LUT_CACHE[key] = _nf4._lut_8bit(code.to(torch.float32)).contiguous()
    return lut


def quantize_blockwise_8bit_cpu(A, code, blocksize):
    lib = native_library()
    if lib is None or A.dtype not in _DT_SUFFIX:
        return _nf4.quantize_blockwise_8bit_reference(A, code, blocksize)
    A = A.contiguous()
    n = A.numel()
    q = torch.empty(A.shape, dtype=torch.uint8)
    absmax = torch.empty(((n + blocksize - 1) // blocksize,), dtype=torch.float32)
    lut = _lut_for(code)
    fn = getattr(lib, f"q8_quant_{_DT_SUFFIX[A.dtype]}")
    _run_blocks(fn, (_ptr(A), _ptr(lut), _ptr(absmax), _ptr(q)), n, blocksize)
    return q, absmax


def dequantize_blockwise_8bit_cpu(q, absmax, code, blocksize, dtype):
    lib = native_library()
    if lib is None:
        return _nf4.dequantize_blockwise_8bit_reference(q, absmax, code, blocksize, dtype)
    q = q.contiguous()
    absmax = absmax.to(torch.float32).contiguous()
    code = code.to(torch.float32).contiguous()
    out = _empty_output(lib, q.shape, dtype)
    fn = getattr(lib, f"q8_dequant_{_DT_SUFFIX[dtype]}")
    _run_blocks(fn, (_ptr(q), _ptr(absmax), _ptr(code), _ptr(out)), q.numel(), blocksize)
    return out


def register() -> None:
    _registry.register_kernel("nf4_quantize", "cpu", nf4_quantize_cpu)
    _registry.register_kernel("nf4_dequantize", "cpu", nf4_dequantize_cpu)
    _registry.register_kernel("quantize_blockwise_8bit", "cpu", quantize_blockwise_8bit_cpu)
    _registry.register_kernel("dequantize_blockwise_8bit", "cpu", dequantize_blockwise_8bit_cpu)
