/* Fused CPU kernels for the merge hot loop, called from evomerge/merging/kernels.py (ctypes).
 *
 * Why C: torch runs a merge op by op, one pass over memory per op; TIES takes a dozen ops, so
 * on a CPU it runs far from the memory-bandwidth floor. Here each element is read once and all
 * the arithmetic happens in registers.
 *
 * Bit-exact with the torch code in methods.py: every value is rounded to the storage dtype
 * exactly where torch rounds it (torch computes a bf16/fp16 op in float32 and rounds the
 * result), sums run in the same order (0 + x0 + x1 + ...), and nothing is contracted into an
 * FMA unless torch fuses too (build with -ffp-contract=off; linear uses fmaf as the AVX2 and
 * AVX-512 addcmul does, so against torch's scalar-only builds its last float32 bit can differ).
 * NaN payloads may differ (torch's own differ between its scalar and vector code).
 *
 * The element types share one body, _kernels_body.h, included once per type:
 * BITS is the storage type (raw bits), LOAD/STORE convert to and from float, MAG_MASK clears
 * the sign bit (non-negative floats order like their bits), MAG_INF is infinity's magnitude
 * (above it: NaN).
 */

#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(_WIN32)
#define EXPORT __declspec(dllexport)
#else
#define EXPORT __attribute__((visibility("default")))
#endif

/* One binary runs everywhere; on x86-64 Linux, gcc (12 and newer: `arch=` clones) also builds
 * AVX2 and AVX-512 versions of each hot loop and picks one at load time. */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HOT
#endif

/* Bump whenever an exported function's name, arguments or meaning changes: kernels.py refuses a
 * build whose em_abi_version() differs from its own ABI_VERSION (a stale .so), rather than call
 * it with the wrong arguments. 2: em_sub removed, em_abi_version added. */
#define EM_ABI_VERSION 2

#define BLOCK 256        /* elements per step: all sources' floats stay in L1 */
#define MAX_SOURCES 64

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : v > hi ? hi : v; }

/* bfloat16: the high half of a float32; rounding to nearest even as c10::BFloat16 does.
 * No NaN test: every NaN met here came from a bf16 value or is the CPU's default NaN, so its
 * low 16 bits are zero and rounding leaves it a NaN (torch itself returns either 0x7FC0 or
 * 0xFFFF for a NaN, scalar or vector code; only the payload can differ). */
static inline float bf16_load(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline uint16_t bf16_store(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline float f32_load(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_store(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

#define BITS uint16_t
#define MAG_MASK 0x7FFF
#define MAG_INF 0x7F80
#define LOAD bf16_load
#define STORE bf16_store
#define SFX bf16
#include "_kernels_body.h"

#define BITS uint32_t
#define MAG_MASK 0x7FFFFFFF
#define MAG_INF 0x7F800000
#define LOAD f32_load
#define STORE f32_store
#define SFX f32
#include "_kernels_body.h"

#if defined(__FLT16_MAX__)
#define HAVE_F16 1
static inline float f16_load(uint16_t h) { _Float16 x; memcpy(&x, &h, 2); return (float)x; }
static inline uint16_t f16_store(float f) { _Float16 x = (_Float16)f; uint16_t h; memcpy(&h, &x, 2); return h; }
#define BITS uint16_t
#define MAG_MASK 0x7FFF
#define MAG_INF 0x7C00
#define LOAD f16_load
#define STORE f16_store
#define SFX f16
#include "_kernels_body.h"
#else
#define HAVE_F16 0
#endif

/* 16-bit magnitude histogram: counts[bits & 0x7FFF] += 1, added into the caller's 32768 counts.
 * Four interleaved sub-histograms so runs of equal values don't serialise on one counter; they
 * live per thread and are zeroed as they are summed, so a call costs no allocation. */
#if defined(_MSC_VER)
#define THREAD_LOCAL __declspec(thread)
#else
#define THREAD_LOCAL _Thread_local
#endif
static THREAD_LOCAL uint32_t sub_histograms[4 * 32768];

EXPORT int em_histogram16(const uint16_t *x, int64_t n, int64_t *counts) {
    uint32_t *sub = sub_histograms;
    for (int64_t piece = 0; piece < n; piece += (int64_t)1 << 30) { /* uint32 never overflows */
        int64_t end = min64(n, piece + ((int64_t)1 << 30)), j = piece;
        for (; j + 4 <= end; j += 4) {
            sub[x[j] & 0x7FFF]++;
            sub[32768 + (x[j + 1] & 0x7FFF)]++;
            sub[65536 + (x[j + 2] & 0x7FFF)]++;
            sub[98304 + (x[j + 3] & 0x7FFF)]++;
        }
        for (; j < end; j++) sub[x[j] & 0x7FFF]++;
        for (int b = 0; b < 32768; b++) {
            counts[b] += (int64_t)sub[b] + sub[32768 + b] + sub[65536 + b] + sub[98304 + b];
            sub[b] = sub[32768 + b] = sub[65536 + b] = sub[98304 + b] = 0;
        }
    }
    return 0;
}

/* dtype codes shared with kernels.py */
enum { EM_BF16 = 0, EM_F16 = 1, EM_F32 = 2 };

EXPORT int em_has_dtype(int dtype) { return dtype == EM_BF16 || dtype == EM_F32 || (dtype == EM_F16 && HAVE_F16); }

/* Call fn_<type>(...) for the dtype code and return 0; -1 for a dtype this build lacks. */
#if HAVE_F16
#define F16_CASE(fn, ...) case EM_F16: fn##_f16(__VA_ARGS__); return 0;
#else
#define F16_CASE(fn, ...)
#endif
#define DISPATCH(fn, ...)                                                         \
    switch (dtype) {                                                              \
    case EM_BF16: fn##_bf16(__VA_ARGS__); return 0;                               \
    F16_CASE(fn, __VA_ARGS__)                                                     \
    case EM_F32: fn##_f32(__VA_ARGS__); return 0;                                 \
    }                                                                             \
    return -1;

EXPORT int64_t em_tie_cut(int dtype, const void *x, int64_t n, int32_t bits, int64_t wanted,
                          int64_t total) {
    switch (dtype) {
    case EM_BF16: return tie_cut_bf16(x, n, bits, wanted, total);
#if HAVE_F16
    case EM_F16: return tie_cut_f16(x, n, bits, wanted, total);
#endif
    case EM_F32: return tie_cut_f32(x, n, bits, wanted, total);
    }
    return -1;
}

EXPORT int em_ties(int dtype, int64_t n_src, const void *deltas, int64_t stride, const void *base,
                   void *out, int64_t start, int64_t len, const int32_t *threshold,
                   const int64_t *cut, const float *weight, int32_t normalize, float lam,
                   int32_t use_lam) {
    if (n_src > MAX_SOURCES) return -2;
    DISPATCH(ties, n_src, deltas, stride, base, out, start, len, threshold, cut, weight,
             normalize, lam, use_lam)
}

EXPORT int em_linear(int dtype, int64_t n_src, const void *x, int64_t stride, void *out,
                     int64_t start, int64_t len, const float *weight, int32_t normalize,
                     float total) {
    DISPATCH(linear, n_src, x, stride, out, start, len, weight, normalize, total)
}

EXPORT int em_max_sources(void) { return MAX_SOURCES; }

EXPORT int em_abi_version(void) { return EM_ABI_VERSION; }

/* A real (empty) extension module, so the build tools treat this file like any other. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, .m_name = "_kernels",
                                    .m_doc = "evomerge's fused merge kernels (loaded with ctypes).",
                                    .m_size = -1};
PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
