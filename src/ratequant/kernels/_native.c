/* Fused unpack + min-max decode of bit-packed KV blocks, in one pass over the packed bytes, and attention
 * straight from the packed blocks.
 *
 * decode_minmax computes for every stored element
 *
 *     out = value(code) * (float)scale + (float)zero        (two separately rounded float32 operations)
 *
 * where value(code) is the code itself on a min-max grid, or levels[code] when the block comes with a codebook
 * of 2^bits float32 levels (turbo's Lloyd-Max levels after its rotation; levels address 0: none)
 *
 * and rounds the float32 result to the output dtype (float32, float16 or bfloat16, round to nearest even),
 * exactly as the PyTorch reference path (ratequant.quantizers._minmax.minmax_values_into) does, so both
 * paths are bit-identical. Build with -ffp-contract=off: a fused multiply-add would change the rounding.
 *
 * Layout (see ratequant/kernels/native.py for the Python side, which checks every assumption before calling):
 *   codes  uint8, contiguous rows of ceil(D * bits / 8) bytes; row r = ((i * H + h) * T + t) for block row
 *          i in 0..N-1 (N = n * B, i = c * B + b), head h in 0..H-1, token t in 0..T-1. Code j of a row is
 *          bits [j * bits, (j + 1) * bits) of the row read as a little-endian, LSB-first bit stream
 *          (ratequant.kernels.packing).
 *   scale, zero  contiguous, dtype meta_dtype; the pair for element (r, d) is at index
 *          (r / meta_rows) * meta_cols + d / meta_group. Per-token groups of g along D: meta_rows = 1,
 *          meta_cols = D / g, meta_group = g. Per channel over G tokens (KIVI keys): meta_rows = G,
 *          meta_cols = D, meta_group = 1.
 *   out    element (c, b, h, t, d) at out + c*s_n + b*s_b + h*s_h + t*s_t + d (element strides; d contiguous).
 *
 * attend_minmax reads the same blocks without writing them out, each row (a token of a head) once for all G
 * query rows of its kv head (grouped-query attention and several query positions share it). For keys per
 * channel or in per-token groups and values in per-token groups (every design's default layout) the scale and
 * zero are folded into the query, the partial dot products or the weights, so rows are only converted from codes to float32 (see "The folded paths"); other layouts decode
 * each row into a float32 scratch row first:
 *   mode 0 (scores):   scores[b, h, g, c * T + t] = sum_d q[b, h, g, d] * k[row, d]
 *   mode 1 (weighted): acc[b, h, g, d] += sum over rows of p[b, h, g, c * T + t] * v[row, d]
 * with q, p, scores and acc contiguous float32 ([B, H, G, D] and [B, H, G, n * T]); block row i = c * B + b.
 * attend_layer composes a layer's whole decode step from such blocks (every bit group of keys and values,
 * their heads placed in the layer's), the sink tokens, the full-precision tail and a softmax: one call per
 * layer and step instead of a dozen small PyTorch operations.
 *
 * No Python objects are touched while decoding, so the GIL is released. The module has no dependency on
 * PyTorch: tensors arrive as addresses and integers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__)
#define ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ALWAYS_INLINE inline
#endif

enum { DT_FLOAT32 = 0, DT_FLOAT16 = 1, DT_BFLOAT16 = 2 };

static inline float bits_to_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t f32_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0) { /* zero or subnormal: m * 2^-24, exact in float32 */
        float v = (float)m * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    if (e == 31) return bits_to_f32(sign | 0x7F800000u | (m << 13));
    return bits_to_f32(sign | ((e + 112u) << 23) | (m << 13));
}

static inline uint16_t f32_to_f16(float f) { /* round to nearest even, overflow to inf */
    uint32_t x = f32_to_bits(f), sign = (x >> 16) & 0x8000u, a = x & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return (uint16_t)(sign | 0x7E00u);            /* NaN */
    if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);           /* >= 65520 rounds to inf */
    if (a < 0x38800000u) {                                              /* below 2^-14: subnormal */
        float v = bits_to_f32(a) * 16777216.0f;                         /* exact: a power-of-two scaling */
        return (uint16_t)(sign | (uint32_t)nearbyintf(v));              /* default rounding: to even */
    }
    uint32_t m = a - (112u << 23);                                      /* rebias the exponent */
    return (uint16_t)(sign | ((m + 0xFFFu + ((m >> 13) & 1u)) >> 13));
}

static inline float bf16_to_f32(uint16_t h) { return bits_to_f32((uint32_t)h << 16); }

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_to_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline float meta_value(const void *p, Py_ssize_t i, int dtype) {
    switch (dtype) {
    case DT_FLOAT16: return f16_to_f32(((const uint16_t *)p)[i]);
    case DT_BFLOAT16: return bf16_to_f32(((const uint16_t *)p)[i]);
    default: return ((const float *)p)[i];
    }
}

/* Packed rows (ratequant.kernels.packing): code j of a row is bits [j * bits, (j + 1) * bits) of the row read as a
 * little-endian, LSB-first bit stream. The 8 codes 8m..8m+7 occupy exactly bytes [m * bits, (m + 1) * bits):
 * read as a little-endian word w, codes 0-3 lie in its low 4 * bits <= 32 bits and codes 4-7 in the next
 * 4 * bits, so two 32-bit halves shifted by 0, b, 2b, 3b give all eight (the AVX2 path). */

/* Code j of a row, reading only the row's own bytes. */
static inline uint32_t code_at(const uint8_t *row, Py_ssize_t j, int bits) {
    const Py_ssize_t bit = j * bits, byte = bit >> 3;
    const int shift = (int)(bit & 7);
    uint32_t v = (uint32_t)row[byte] >> shift;
    if (shift + bits > 8) v |= (uint32_t)row[byte + 1] << (8 - shift);
    return v & ((1u << bits) - 1u);
}

/* What code c stands for: c itself (min-max grids), or levels[c] (a codebook, e.g. turbo's Lloyd-Max levels). */
static inline float code_value(uint32_t c, const float *levels) { return levels != NULL ? levels[c] : (float)c; }

typedef struct {
    const uint8_t *codes;
    const float *levels; /* NULL: codes are grid steps; else code c stands for levels[c] (max(2^bits, 16) floats) */
    int bits;
    Py_ssize_t D, n, B, H, T;
    const void *scale, *zero;
    int meta_dtype;
    Py_ssize_t meta_rows, meta_cols, meta_group;
    void *out;
    int out_dtype;
    Py_ssize_t s_n, s_b, s_h, s_t;
} DecodeArgs;

/* Metadata row m as float32 into scale[0..meta_cols), zero[0..meta_cols). */
static inline void load_meta(const DecodeArgs *a, Py_ssize_t m, float *scale, float *zero) {
    for (Py_ssize_t k = 0; k < a->meta_cols; ++k) {
        scale[k] = meta_value(a->scale, m * a->meta_cols + k, a->meta_dtype);
        zero[k] = meta_value(a->zero, m * a->meta_cols + k, a->meta_dtype);
    }
}

/* Element offset in out of the first token of (block i, head h); token t adds t * s_t. */
static inline Py_ssize_t row_offset(const DecodeArgs *a, Py_ssize_t i, Py_ssize_t h) {
    return (i / a->B) * a->s_n + (i % a->B) * a->s_b + h * a->s_h;
}

/* Round a decoded float32 row into the output dtype (float32 rows are decoded in place). */
static inline void store_row(const DecodeArgs *a, Py_ssize_t offset, const float *vals) {
    uint16_t *o = (uint16_t *)a->out + offset;
    if (a->out_dtype == DT_FLOAT16)
        for (Py_ssize_t d = 0; d < a->D; ++d) o[d] = f32_to_f16(vals[d]);
    else
        for (Py_ssize_t d = 0; d < a->D; ++d) o[d] = f32_to_bf16(vals[d]);
}

/* dst[d] = code_value(code_d) * scale[d / g] + zero[d / g], the product and the sum rounded separately. */
static void decode_row_scalar(const uint8_t *row, int bits, const float *levels, Py_ssize_t D, Py_ssize_t g,
                              const float *scale, const float *zero, float *restrict dst) {
    for (Py_ssize_t k = 0; k < D / g; ++k) {
        const float s = scale[k], z = zero[k];
        for (Py_ssize_t d = k * g; d < (k + 1) * g; ++d) {
            float v = code_value(code_at(row, d, bits), levels) * s;
            dst[d] = v + z;
        }
    }
}

/* Decodes one packed row with the current metadata row into the output at element `offset`, in the output
 * dtype (vals: a float32 scratch row of D values). */
typedef void (*RowDecoder)(const DecodeArgs *a, const uint8_t *row, const uint8_t *end, const float *scale,
                           const float *zero, Py_ssize_t offset, float *vals);

/* Every row in storage order, with its metadata row loaded and its output place found. Always inlined, so
 * each caller's decode_row is inlined in turn and compiled for that caller's instruction set. */
static ALWAYS_INLINE void for_each_row(const DecodeArgs *a, float *scale, float *zero, float *vals,
                                       RowDecoder decode_row) {
    const Py_ssize_t row_bytes = (a->D * a->bits + 7) / 8;
    const uint8_t *row = a->codes, *end = a->codes + a->n * a->B * a->H * a->T * row_bytes;
    Py_ssize_t m = 0, left = 0; /* metadata row m - 1 serves `left` more code rows */
    for (Py_ssize_t i = 0; i < a->n * a->B; ++i)
        for (Py_ssize_t h = 0; h < a->H; ++h)
            for (Py_ssize_t t = 0, offset = row_offset(a, i, h); t < a->T;
                 ++t, row += row_bytes, offset += a->s_t, --left) {
                if (left == 0) load_meta(a, m++, scale, zero), left = a->meta_rows;
                decode_row(a, row, end, scale, zero, offset, vals);
            }
}

/* A float32 row decodes in place; others go through vals and are rounded to the output dtype. */
static inline void row_scalar(const DecodeArgs *a, const uint8_t *row, const uint8_t *end, const float *scale,
                              const float *zero, Py_ssize_t offset, float *vals) {
    (void)end;
    float *dst = a->out_dtype == DT_FLOAT32 ? (float *)a->out + offset : vals;
    decode_row_scalar(row, a->bits, a->levels, a->D, a->meta_group, scale, zero, dst);
    if (a->out_dtype != DT_FLOAT32) store_row(a, offset, vals);
}

static void decode_rows_scalar(const DecodeArgs *a, float *scale, float *zero, float *vals) {
    for_each_row(a, scale, zero, vals, row_scalar);
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_AVX2_PATH 1
#define AVX2 __attribute__((target("avx2,f16c")))

/* True when codes8 on the last group of a row would read past the end of the packed buffer: such rows are read
 * code by code. */
static inline int group_loads_pass_end(const uint8_t *row, const uint8_t *end, int bits, Py_ssize_t D) {
    return row + (D / 8 - 1) * bits + 8 > end;
}

/* The shifts that place code i of a group of 8 in lane i for codes8_int: a group of widths up to 4 bits fits in
 * the 32-bit word at its first byte, a wider one in the 64-bit word, its upper half from bit 4 * bits. */
AVX2 static inline __m256i code_shifts(int bits) {
    if (bits <= 4) return _mm256_setr_epi32(0, bits, 2 * bits, 3 * bits, 4 * bits, 5 * bits, 6 * bits, 7 * bits);
    return _mm256_setr_epi32(0, bits, 2 * bits, 3 * bits, 0, bits, 2 * bits, 3 * bits);
}

/* The 8 codes of the group at p (see the packed-row note above) as int32 lanes; reads 4 bytes at p for widths up
 * to 4 bits, else 8. shifts = code_shifts(bits). */
AVX2 static inline __m256i codes8_int(const uint8_t *p, int bits, __m256i shifts, __m256i mask) {
    __m256i v;
    if (bits <= 4) {
        uint32_t w;
        memcpy(&w, p, 4);
        v = _mm256_set1_epi32((int)w);
    } else {
        uint64_t w;
        memcpy(&w, p, 8);
        v = _mm256_set_m128i(_mm_set1_epi32((int)(uint32_t)(w >> (4 * bits))), _mm_set1_epi32((int)(uint32_t)w));
    }
    return _mm256_and_si256(_mm256_srlv_epi32(v, shifts), mask);
}

/* levels[c] for 8 codes below 16, the levels held in two registers (low: levels 0-7, high: 8-15): two permutes
 * and a blend on bit 3. */
AVX2 static inline __m256 lookup16(__m256 low, __m256 high, __m256i c) {
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(low, c), _mm256_permutevar8x32_ps(high, c),
                            _mm256_castsi256_ps(_mm256_slli_epi32(c, 28)));
}

/* What the 8 codes c of a group stand for (code_value) as float32: the codes themselves, or a codebook's levels,
 * up to 8 in one register permute, 16 by lookup16 (the table is padded to at least 16 floats), more by a gather. */
AVX2 static inline __m256 code_values8(__m256i c, int bits, const float *levels) {
    if (levels == NULL) return _mm256_cvtepi32_ps(c);
    if (bits <= 3) return _mm256_permutevar8x32_ps(_mm256_loadu_ps(levels), c);
    if (bits == 4) return lookup16(_mm256_loadu_ps(levels), _mm256_loadu_ps(levels + 8), c);
    return _mm256_i32gather_ps(levels, c, 4);
}

/* The values of the 8 codes of the group at p as float32. */
AVX2 static inline __m256 codes8(const uint8_t *p, int bits, __m256i shifts, __m256i mask, const float *levels) {
    return code_values8(codes8_int(p, bits, shifts, mask), bits, levels);
}

/* Store 8 float32 values at element `at` of the output, rounded to its dtype to nearest even (F16C for
 * float16; for bfloat16 the same integer rounding as f32_to_bf16, NaN to 0x7FC0). */
AVX2 static inline void store8(const DecodeArgs *a, Py_ssize_t at, __m256 v) {
    if (a->out_dtype == DT_FLOAT32) {
        _mm256_storeu_ps((float *)a->out + at, v);
    } else if (a->out_dtype == DT_FLOAT16) {
        _mm_storeu_si128((__m128i *)((uint16_t *)a->out + at), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    } else {
        const __m256i u = _mm256_castps_si256(v);
        const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
        const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)),
                                               _mm256_set1_epi32(0x7F800000));
        r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
        const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
        _mm_storeu_si128((__m128i *)((uint16_t *)a->out + at), packed);
    }
}

/* row_scalar with AVX2, 8 codes per step, for D a multiple of 8 and g == 1 or a multiple of 8 (decode_rows
 * checks). A row whose last 8-byte load could pass the end of the packed buffer takes the scalar decode. */
AVX2 static inline void row_avx2(const DecodeArgs *a, const uint8_t *row, const uint8_t *end, const float *scale,
                                 const float *zero, Py_ssize_t offset, float *vals) {
    const int bits = a->bits;
    const Py_ssize_t D = a->D, g = a->meta_group;
    const __m256i mask = _mm256_set1_epi32((1 << bits) - 1), shifts = code_shifts(bits);
    const uint8_t *p = row;
    if (group_loads_pass_end(row, end, bits, D)) {
        row_scalar(a, row, end, scale, zero, offset, vals);
    } else if (g == 1) {
        for (Py_ssize_t d = 0; d < D; d += 8, p += bits) {
            const __m256 prod = _mm256_mul_ps(codes8(p, bits, shifts, mask, a->levels), _mm256_loadu_ps(scale + d));
            store8(a, offset + d, _mm256_add_ps(prod, _mm256_loadu_ps(zero + d)));
        }
    } else {
        for (Py_ssize_t k = 0; k < D / g; ++k) {
            const __m256 s = _mm256_set1_ps(scale[k]), z = _mm256_set1_ps(zero[k]);
            for (Py_ssize_t d = k * g; d < (k + 1) * g; d += 8, p += bits)
                store8(a, offset + d, _mm256_add_ps(_mm256_mul_ps(codes8(p, bits, shifts, mask, a->levels), s), z));
        }
    }
}

AVX2 static void decode_rows_avx2(const DecodeArgs *a, float *scale, float *zero, float *vals) {
    for_each_row(a, scale, zero, vals, row_avx2);
}
#endif

static void decode_rows(const DecodeArgs *a, float *scale, float *zero, float *vals) {
#ifdef HAVE_AVX2_PATH
    if (a->D % 8 == 0 && (a->meta_group == 1 || a->meta_group % 8 == 0) && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("f16c")) {
        decode_rows_avx2(a, scale, zero, vals);
        return;
    }
#endif
    decode_rows_scalar(a, scale, zero, vals);
}

static PyObject *decode_minmax(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t codes, scale, zero, levels, out;
    DecodeArgs a;
    if (!PyArg_ParseTuple(args, "nin(nnnn)nninnnnni(nnnn)", &codes, &a.bits, &a.D, &a.n, &a.B, &a.H, &a.T,
                          &scale, &zero, &a.meta_dtype, &a.meta_rows, &a.meta_cols, &a.meta_group, &levels, &out,
                          &a.out_dtype, &a.s_n, &a.s_b, &a.s_h, &a.s_t))
        return NULL;
    if (a.bits < 1 || a.bits > 8 || a.D < 1 || a.n < 0 || a.B < 0 || a.H < 0 ||
        a.T < 0 || a.meta_rows < 1 || a.meta_group < 1 || a.meta_cols < 1 || a.meta_cols * a.meta_group != a.D ||
        a.meta_dtype < 0 || a.meta_dtype > 2 || a.out_dtype < 0 || a.out_dtype > 2) {
        PyErr_SetString(PyExc_ValueError, "decode_minmax: invalid layout arguments");
        return NULL;
    }
    a.codes = (const uint8_t *)codes;
    a.levels = (const float *)levels;
    a.scale = (const void *)scale;
    a.zero = (const void *)zero;
    a.out = (void *)out;
    float *work = (float *)malloc((2 * (size_t)a.meta_cols + (size_t)a.D) * sizeof(float));
    if (work == NULL) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS decode_rows(&a, work, work + a.meta_cols, work + 2 * a.meta_cols);
    Py_END_ALLOW_THREADS free(work);
    Py_RETURN_NONE;
}

/* sum_d x[d] * y[d] in four interleaved partial sums (the compiler may not reorder a float reduction). */
static ALWAYS_INLINE float dot_scalar(const float *x, const float *y, Py_ssize_t D) {
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
    Py_ssize_t d = 0;
    for (; d + 4 <= D; d += 4) s0 += x[d] * y[d], s1 += x[d + 1] * y[d + 1], s2 += x[d + 2] * y[d + 2], s3 += x[d + 3] * y[d + 3];
    for (; d < D; ++d) s0 += x[d] * y[d];
    return (s0 + s1) + (s2 + s3);
}

/* The folded paths (below) take rows in tiles of up to TILE tokens of one head, under one metadata row for
 * scores: the tile's codes are converted once, and its query (or output) vectors are loaded once per tile. */
enum { TILE = 4 };

typedef struct {
    int mode;               /* 0: scores, 1: weighted sum */
    Py_ssize_t G;           /* query rows per kv head */
    const float *q;         /* mode 0: [B, Hf, G, D]; mode 1: p [B, Hf, G, L] */
    float *out;             /* mode 0: scores [B, Hf, G, L]; mode 1: acc [B, Hf, G, D] (accumulated) */
    const Py_ssize_t *heads; /* head h of the block is head heads[h] of q and out (NULL: head h) */
    Py_ssize_t Hf, L, off;  /* heads of q and out, their rows' length in tokens, the block's first column */
} AttendArgs;

/* The first of the G rows of q and out that head h of batch row b of the block serves. */
static inline Py_ssize_t out_rows(const AttendArgs *w, Py_ssize_t b, Py_ssize_t h) {
    return (b * w->Hf + (w->heads != NULL ? w->heads[h] : h)) * w->G;
}

typedef void (*RowToF32)(const DecodeArgs *a, const uint8_t *row, const uint8_t *end, const float *scale,
                         const float *zero, float *vals);
typedef float (*Dot)(const float *x, const float *y, Py_ssize_t D);

/* Every row in storage order: decoded once into vals (a->out points there), then used by the G query rows. */
static ALWAYS_INLINE void attend_rows(const DecodeArgs *a, const AttendArgs *w, float *scale, float *zero,
                                      float *vals, RowToF32 decode_row, Dot dot) {
    const Py_ssize_t row_bytes = (a->D * a->bits + 7) / 8, D = a->D, G = w->G, L = w->L;
    const uint8_t *row = a->codes, *end = a->codes + a->n * a->B * a->H * a->T * row_bytes;
    Py_ssize_t m = 0, left = 0;
    for (Py_ssize_t i = 0; i < a->n * a->B; ++i) {
        const Py_ssize_t c = i / a->B, b = i % a->B;
        for (Py_ssize_t h = 0; h < a->H; ++h) {
            const Py_ssize_t bh = out_rows(w, b, h);
            for (Py_ssize_t t = 0; t < a->T; ++t, row += row_bytes, --left) {
                if (left == 0) load_meta(a, m++, scale, zero), left = a->meta_rows;
                decode_row(a, row, end, scale, zero, vals);
                const Py_ssize_t pos = w->off + c * a->T + t;
                for (Py_ssize_t g = 0; g < G; ++g) {
                    if (w->mode == 0) {
                        w->out[(bh + g) * L + pos] = dot(w->q + (bh + g) * D, vals, D);
                    } else {
                        const float p = w->q[(bh + g) * L + pos];
                        float *restrict o = w->out + (bh + g) * D;
                        for (Py_ssize_t d = 0; d < D; ++d) o[d] += p * vals[d];
                    }
                }
            }
        }
    }
}

static inline void row_f32_scalar(const DecodeArgs *a, const uint8_t *row, const uint8_t *end, const float *scale,
                                  const float *zero, float *vals) {
    (void)end;
    decode_row_scalar(row, a->bits, a->levels, a->D, a->meta_group, scale, zero, vals);
}

static void attend_rows_scalar(const DecodeArgs *a, const AttendArgs *w, float *scale, float *zero, float *vals) {
    attend_rows(a, w, scale, zero, vals, row_f32_scalar, dot_scalar);
}

#ifdef HAVE_AVX2_PATH
AVX2 static inline void row_f32_avx2(const DecodeArgs *a, const uint8_t *row, const uint8_t *end, const float *scale,
                                     const float *zero, float *vals) {
    row_avx2(a, row, end, scale, zero, 0, vals); /* a->out is vals, a float32 row at offset 0 */
}

/* sum_d x[d] * y[d] with eight lanes (D a multiple of 8, as the AVX2 path requires). */
AVX2 static inline float hsum8(__m256 v) {
    const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 quad = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(quad, _mm_shuffle_ps(quad, quad, 1)));
}

AVX2 static inline float dot_avx2(const float *x, const float *y, Py_ssize_t D) {
    __m256 acc = _mm256_setzero_ps();
    for (Py_ssize_t d = 0; d < D; d += 8) acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(x + d), _mm256_loadu_ps(y + d)));
    return hsum8(acc);
}

AVX2 static void attend_rows_avx2(const DecodeArgs *a, const AttendArgs *w, float *scale, float *zero, float *vals) {
    attend_rows(a, w, scale, zero, vals, row_f32_avx2, dot_avx2);
}

/* The folded paths: the metadata moves onto the query (scores) or the weights (values), so each row is only
 * converted from codes to float32 and never decoded. They serve KIVI's layouts, which the min-max designs
 * store: keys per channel over meta_rows tokens, values in per-token groups along D; and the rotated designs'
 * keys in per-token groups.
 *
 *   scores, per-channel keys:  q . (s * c + z) = (q * s) . c + q . z, with q * s and q . z computed once per
 *                              metadata row (every meta_rows tokens) for the G query rows;
 *   scores, per-token groups:  q . (s_k * c + z_k) over the groups k = sum_k s_k * (q_k . c_k) + z_k * sum(q_k);
 *   values, per-token groups:  p * (s_k * c + z_k) = (p * s_k) * c + p * z_k, the second term summed over the
 *                              tokens apart ([B, H, G, D / g] sums) and added to the output once at the end.
 *
 * The arithmetic is float32 with fused multiply-adds, so results equal decode-then-attend to float32 rounding,
 * not bit for bit (the decode kernel above stays bit-identical to PyTorch; these paths need not). */
#define FOLDED __attribute__((target("avx2,fma,f16c")))

/* The values of a row's D codes (code_value: no scale, no zero) as float32 into cf. Widths up to 4 bits take a
 * loop specialised to the row's kind of code value, the codebook held in registers (codes8_int is given a constant
 * width up to 4 there: it only picks the 4-byte load, which the compiler then needs not test). */
FOLDED static inline void codes_f32(const uint8_t *row, const uint8_t *end, int bits, const float *levels,
                                    Py_ssize_t D, float *cf) {
    if (group_loads_pass_end(row, end, bits, D)) {
        for (Py_ssize_t d = 0; d < D; ++d) cf[d] = code_value(code_at(row, d, bits), levels);
        return;
    }
    const __m256i mask = _mm256_set1_epi32((1 << bits) - 1), shifts = code_shifts(bits);
    if (bits <= 4 && levels == NULL) {
        for (Py_ssize_t d = 0; d < D; d += 8, row += bits)
            _mm256_storeu_ps(cf + d, _mm256_cvtepi32_ps(codes8_int(row, 4, shifts, mask)));
    } else if (bits <= 3) {
        const __m256 table = _mm256_loadu_ps(levels);
        for (Py_ssize_t d = 0; d < D; d += 8, row += bits)
            _mm256_storeu_ps(cf + d, _mm256_permutevar8x32_ps(table, codes8_int(row, 3, shifts, mask)));
    } else if (bits == 4) {
        const __m256 low = _mm256_loadu_ps(levels), high = _mm256_loadu_ps(levels + 8);
        for (Py_ssize_t d = 0; d < D; d += 8, row += bits)
            _mm256_storeu_ps(cf + d, lookup16(low, high, codes8_int(row, 4, shifts, mask)));
    } else {
        for (Py_ssize_t d = 0; d < D; d += 8, row += bits) _mm256_storeu_ps(cf + d, codes8(row, bits, shifts, mask, levels));
    }
}

/* count metadata values from index first as float32 into dst: load_meta's conversion, 8 or 4 at a time for
 * float16 (F16C converts exactly, as f16_to_f32 does). */
FOLDED static inline void meta_f32(const void *p, int dtype, Py_ssize_t first, Py_ssize_t count, float *dst) {
    Py_ssize_t k = 0;
    if (dtype == DT_FLOAT16) {
        const uint16_t *h = (const uint16_t *)p + first;
        for (; k + 8 <= count; k += 8) _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + k))));
        for (; k + 4 <= count; k += 4) _mm_storeu_ps(dst + k, _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(h + k))));
    }
    for (; k < count; ++k) dst[k] = meta_value(p, first + k, dtype);
}

/* The sums of four vectors' lanes: {sum a, sum b, sum c, sum d}. */
FOLDED static inline __m128 hsum8x4(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

/* mode 0 with meta_group == 1. work: cf [TILE, D], qs [G, D], qz [G]. */
FOLDED static void scores_folded(const DecodeArgs *a, const AttendArgs *w, float *scale, float *zero, float *work) {
    const Py_ssize_t row_bytes = (a->D * a->bits + 7) / 8, D = a->D, G = w->G, L = w->L;
    float *cf = work, *qs = work + TILE * D, *qz = qs + G * D;
    const uint8_t *row = a->codes, *end = a->codes + a->n * a->B * a->H * a->T * row_bytes;
    Py_ssize_t m = 0, left = 0;
    for (Py_ssize_t i = 0; i < a->n * a->B; ++i) {
        const Py_ssize_t c = i / a->B, b = i % a->B;
        for (Py_ssize_t h = 0; h < a->H; ++h) {
            const Py_ssize_t bh = out_rows(w, b, h);
            for (Py_ssize_t t = 0, n; t < a->T; t += n, row += n * row_bytes, left -= n) {
                const int fresh = left == 0;
                if (fresh) {
                    meta_f32(a->scale, a->meta_dtype, m * D, D, scale);
                    meta_f32(a->zero, a->meta_dtype, m * D, D, zero);
                    ++m, left = a->meta_rows;
                }
                if (fresh || t == 0) /* new metadata, or a new head under the same metadata row */
                    for (Py_ssize_t g = 0; g < G; ++g) {
                        const float *q = w->q + (bh + g) * D;
                        __m256 z = _mm256_setzero_ps();
                        for (Py_ssize_t d = 0; d < D; d += 8) {
                            const __m256 qv = _mm256_loadu_ps(q + d);
                            _mm256_storeu_ps(qs + g * D + d, _mm256_mul_ps(qv, _mm256_loadu_ps(scale + d)));
                            z = _mm256_fmadd_ps(qv, _mm256_loadu_ps(zero + d), z);
                        }
                        qz[g] = hsum8(z);
                    }
                n = left >= TILE && t + TILE <= a->T ? TILE : 1;
                for (Py_ssize_t j = 0; j < n; ++j) codes_f32(row + j * row_bytes, end, a->bits, a->levels, D, cf + j * D);
                float *o = w->out + bh * L + w->off + c * a->T + t;
                for (Py_ssize_t g = 0; g < G; ++g, o += L) {
                    const float *qg = qs + g * D;
                    if (n == TILE) {
                        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
                        for (Py_ssize_t d = 0; d < D; d += 8) {
                            const __m256 qv = _mm256_loadu_ps(qg + d);
                            s0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(cf + d), s0);
                            s1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(cf + D + d), s1);
                            s2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(cf + 2 * D + d), s2);
                            s3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(cf + 3 * D + d), s3);
                        }
                        _mm_storeu_ps(o, _mm_add_ps(hsum8x4(s0, s1, s2, s3), _mm_set1_ps(qz[g])));
                    } else {
                        __m256 s0 = _mm256_setzero_ps();
                        for (Py_ssize_t d = 0; d < D; d += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + d), _mm256_loadu_ps(cf + d), s0);
                        *o = hsum8(s0) + qz[g];
                    }
                }
            }
        }
    }
}

/* A tile of n rows in per-token groups (meta_rows == 1): metadata rows m .. m + n - 1 (contiguous) into scale and
 * zero ([n, meta_cols] each) and the rows' code values at row into cf ([n, D]). */
FOLDED static inline void token_tile(const DecodeArgs *a, const uint8_t *row, const uint8_t *end, Py_ssize_t m,
                                     Py_ssize_t n, float *scale, float *zero, float *cf) {
    const Py_ssize_t K = a->meta_cols, row_bytes = (a->D * a->bits + 7) / 8;
    meta_f32(a->scale, a->meta_dtype, m * K, n * K, scale);
    meta_f32(a->zero, a->meta_dtype, m * K, n * K, zero);
    for (Py_ssize_t j = 0; j < n; ++j) codes_f32(row + j * row_bytes, end, a->bits, a->levels, a->D, cf + j * a->D);
}

/* mode 0 with meta_rows == 1 (per-token groups of meta_group >= 8 along D: the rotated designs' keys): over the
 * groups k of a row, q . (s_k * c + z_k) = sum_k s_k * (q_k . c_k) + z_k * sum(q_k), the query's group sums taken
 * once per head. work: cf [TILE, D], qsum [G, meta_cols]; scale and zero hold TILE metadata rows. */
FOLDED static void scores_folded_tokens(const DecodeArgs *a, const AttendArgs *w, float *scale, float *zero,
                                        float *work) {
    const Py_ssize_t row_bytes = (a->D * a->bits + 7) / 8, D = a->D, G = w->G, L = w->L;
    const Py_ssize_t K = a->meta_cols, gk = a->meta_group;
    float *cf = work, *qsum = work + TILE * D;
    const uint8_t *row = a->codes, *end = a->codes + a->n * a->B * a->H * a->T * row_bytes;
    Py_ssize_t m = 0;
    for (Py_ssize_t i = 0; i < a->n * a->B; ++i) {
        const Py_ssize_t c = i / a->B, b = i % a->B;
        for (Py_ssize_t h = 0; h < a->H; ++h) {
            const Py_ssize_t bh = out_rows(w, b, h);
            for (Py_ssize_t g = 0; g < G; ++g)
                for (Py_ssize_t k = 0; k < K; ++k) {
                    const float *q = w->q + (bh + g) * D + k * gk;
                    __m256 s = _mm256_setzero_ps();
                    for (Py_ssize_t d = 0; d < gk; d += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(q + d));
                    qsum[g * K + k] = hsum8(s);
                }
            for (Py_ssize_t t = 0, n; t < a->T; t += n, row += n * row_bytes) {
                n = t + TILE <= a->T ? TILE : 1;
                token_tile(a, row, end, m, n, scale, zero, cf);
                m += n;
                float *o = w->out + bh * L + w->off + c * a->T + t;
                for (Py_ssize_t g = 0; g < G; ++g, o += L) {
                    const float *q = w->q + (bh + g) * D, *qs = qsum + g * K;
                    if (n == TILE) {
                        __m128 acc = _mm_setzero_ps();
                        for (Py_ssize_t k = 0; k < K; ++k) {
                            __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
                            for (Py_ssize_t d = k * gk; d < (k + 1) * gk; d += 8) {
                                const __m256 qv = _mm256_loadu_ps(q + d);
                                s0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(cf + d), s0);
                                s1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(cf + D + d), s1);
                                s2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(cf + 2 * D + d), s2);
                                s3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(cf + 3 * D + d), s3);
                            }
                            const __m128 sk = _mm_setr_ps(scale[k], scale[K + k], scale[2 * K + k], scale[3 * K + k]);
                            const __m128 zk = _mm_setr_ps(zero[k], zero[K + k], zero[2 * K + k], zero[3 * K + k]);
                            acc = _mm_fmadd_ps(sk, hsum8x4(s0, s1, s2, s3), _mm_fmadd_ps(zk, _mm_set1_ps(qs[k]), acc));
                        }
                        _mm_storeu_ps(o, acc);
                    } else {
                        float acc = 0.0f;
                        for (Py_ssize_t k = 0; k < K; ++k) {
                            __m256 s0 = _mm256_setzero_ps();
                            for (Py_ssize_t d = k * gk; d < (k + 1) * gk; d += 8)
                                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(cf + d), s0);
                            acc += scale[k] * hsum8(s0) + zero[k] * qs[k];
                        }
                        *o = acc;
                    }
                }
            }
        }
    }
}

/* The values' zero terms, summed apart over the tokens (zsum [B, H, G, K] in the block's heads), into out. */
FOLDED static void add_zero_sums(const DecodeArgs *a, const AttendArgs *w, const float *zsum) {
    const Py_ssize_t D = a->D, G = w->G, K = a->meta_cols, gk = a->meta_group;
    for (Py_ssize_t b = 0; b < a->B; ++b)
        for (Py_ssize_t h = 0; h < a->H; ++h)
            for (Py_ssize_t g = 0; g < G; ++g) {
                float *o = w->out + (out_rows(w, b, h) + g) * D;
                const float *zs = zsum + ((b * a->H + h) * G + g) * K;
                for (Py_ssize_t d = 0; d < D; ++d) o[d] += zs[d / gk];
            }
}

/* mode 1 with meta_rows == 1 (groups of meta_group >= 8 along D). work: cf [TILE, D], zsum [B, H, G, meta_cols];
 * scale and zero hold TILE metadata rows. */
FOLDED static void values_folded(const DecodeArgs *a, const AttendArgs *w, float *scale, float *zero, float *work) {
    const Py_ssize_t row_bytes = (a->D * a->bits + 7) / 8, D = a->D, G = w->G, L = w->L;
    const Py_ssize_t K = a->meta_cols, gk = a->meta_group;
    float *cf = work, *zsum = work + TILE * D;
    memset(zsum, 0, (size_t)(a->B * a->H * G * K) * sizeof(float));
    const uint8_t *row = a->codes, *end = a->codes + a->n * a->B * a->H * a->T * row_bytes;
    Py_ssize_t m = 0;
    for (Py_ssize_t i = 0; i < a->n * a->B; ++i) {
        const Py_ssize_t c = i / a->B, b = i % a->B;
        for (Py_ssize_t h = 0; h < a->H; ++h) {
            const Py_ssize_t bh = out_rows(w, b, h), local = (b * a->H + h) * G; /* zsum's rows are the block's */
            for (Py_ssize_t t = 0, n; t < a->T; t += n, row += n * row_bytes) {
                n = t + TILE <= a->T ? TILE : 1;
                token_tile(a, row, end, m, n, scale, zero, cf);
                m += n;
                for (Py_ssize_t g = 0; g < G; ++g) {
                    const float *p = w->q + (bh + g) * L + w->off + c * a->T + t;
                    float *o = w->out + (bh + g) * D, *zs = zsum + (local + g) * K;
                    for (Py_ssize_t k = 0; k < K; ++k) {
                        for (Py_ssize_t j = 0; j < n; ++j) zs[k] += p[j] * zero[j * K + k];
                        if (n == TILE) {
                            const __m256 p0 = _mm256_set1_ps(p[0] * scale[k]), p1 = _mm256_set1_ps(p[1] * scale[K + k]);
                            const __m256 p2 = _mm256_set1_ps(p[2] * scale[2 * K + k]), p3 = _mm256_set1_ps(p[3] * scale[3 * K + k]);
                            for (Py_ssize_t d = k * gk; d < (k + 1) * gk; d += 8) {
                                __m256 acc = _mm256_loadu_ps(o + d);
                                acc = _mm256_fmadd_ps(p0, _mm256_loadu_ps(cf + d), acc);
                                acc = _mm256_fmadd_ps(p1, _mm256_loadu_ps(cf + D + d), acc);
                                acc = _mm256_fmadd_ps(p2, _mm256_loadu_ps(cf + 2 * D + d), acc);
                                acc = _mm256_fmadd_ps(p3, _mm256_loadu_ps(cf + 3 * D + d), acc);
                                _mm256_storeu_ps(o + d, acc);
                            }
                        } else {
                            const __m256 p0 = _mm256_set1_ps(p[0] * scale[k]);
                            for (Py_ssize_t d = k * gk; d < (k + 1) * gk; d += 8)
                                _mm256_storeu_ps(o + d, _mm256_fmadd_ps(p0, _mm256_loadu_ps(cf + d), _mm256_loadu_ps(o + d)));
                        }
                    }
                }
            }
        }
    }
    add_zero_sums(a, w, zsum);
}

static int folded_supported(void) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#endif

static int layout_valid(const DecodeArgs *a) {
    return a->bits >= 1 && a->bits <= 8 && a->D >= 1 && a->n >= 0 && a->B >= 0 && a->H >= 0 && a->T >= 0 &&
           a->meta_rows >= 1 && a->meta_group >= 1 && a->meta_cols >= 1 && a->meta_cols * a->meta_group == a->D &&
           a->meta_dtype >= 0 && a->meta_dtype <= 2;
}

/* One block's scores (mode 0) or weighted values (mode 1), by the fastest path its layout allows. Touches no
 * Python object (called with the GIL released); returns 0 when out of memory. */
static int attend_block(DecodeArgs *a, const AttendArgs *w) {
    /* TILE scale and zero rows, then TILE scratch rows, then the folded paths' query (G * D + G) or their
     * sums (B * H * G * meta_cols) */
    const size_t cols = (size_t)a->meta_cols * TILE;
    const size_t extra = (size_t)w->G * (size_t)(w->mode == 0 ? a->D + 1 : a->B * a->H * a->meta_cols);
    float *work = (float *)malloc((2 * cols + TILE * (size_t)a->D + extra) * sizeof(float));
    if (work == NULL) return 0;
    float *srow = work, *zrow = work + cols, *rest = work + 2 * cols;
    a->out = rest; /* the unfolded paths decode rows into this scratch row */
    a->out_dtype = DT_FLOAT32;
    a->s_n = a->s_b = a->s_h = a->s_t = 0;
#ifdef HAVE_AVX2_PATH
    const int vector = a->D % 8 == 0 && (a->meta_group == 1 || a->meta_group % 8 == 0);
    if (vector && w->mode == 0 && a->meta_group == 1 && folded_supported())
        scores_folded(a, w, srow, zrow, rest);
    else if (vector && w->mode == 0 && a->meta_rows == 1 && folded_supported())
        scores_folded_tokens(a, w, srow, zrow, rest);
    else if (vector && w->mode == 1 && a->meta_rows == 1 && a->meta_group % 8 == 0 && folded_supported())
        values_folded(a, w, srow, zrow, rest);
    else if (vector && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c"))
        attend_rows_avx2(a, w, srow, zrow, rest);
    else
#endif
        attend_rows_scalar(a, w, srow, zrow, rest);
    free(work);
    return 1;
}

static PyObject *attend_minmax(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t codes, scale, zero, levels, q, out;
    DecodeArgs a;
    AttendArgs w;
    if (!PyArg_ParseTuple(args, "nin(nnnn)nninnnninnn", &codes, &a.bits, &a.D, &a.n, &a.B, &a.H, &a.T, &scale,
                          &zero, &a.meta_dtype, &a.meta_rows, &a.meta_cols, &a.meta_group, &levels, &w.mode, &w.G,
                          &q, &out))
        return NULL;
    if (!layout_valid(&a) || w.mode < 0 || w.mode > 1 || w.G < 1) {
        PyErr_SetString(PyExc_ValueError, "attend_minmax: invalid layout arguments");
        return NULL;
    }
    a.codes = (const uint8_t *)codes;
    a.levels = (const float *)levels;
    a.scale = (const void *)scale;
    a.zero = (const void *)zero;
    w.q = (const float *)q;
    w.out = (float *)out;
    w.heads = NULL, w.Hf = a.H, w.L = a.n * a.T, w.off = 0;
    int ok;
    Py_BEGIN_ALLOW_THREADS ok = attend_block(&a, &w);
    Py_END_ALLOW_THREADS if (!ok) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------------------------
 * attend_layer: one layer's whole attention step in one call. For each kind (keys, values) it takes the sink
 * tokens and the full-precision tail (dense [B, H, len, D] tensors in the model's dtype, any strides with D
 * contiguous) and every bit group of the stored chunks (blocks as attend_minmax takes them, with the kv heads
 * each group holds); then, for every query row:
 *
 *   scores over sinks | stored chunks | tail, optional soft-capping (tanh(x / c) * c), the boolean mask
 *   (false: -inf), softmax (a row that sees nothing gets all-zero weights), and the weighted values.
 *
 * Token positions: sinks 0..s-1, a kind's stored chunks s..s+P-1 (P = chunks * T, per kind), its tail after
 * them; both kinds span the same n tokens. q is [B, H, R, D] float32 (scaled), R rows per kv head, row r of
 * query token r % t; the mask (uint8, or none) is [B or 1, t, n]; out is [B, H, R, D] float32. */

enum { MAX_GROUPS = 8, MAX_GROUP_HEADS = 64 }; /* groups: one per width 1..8 */

typedef struct {
    const void *p;
    Py_ssize_t len, sb, sh, st; /* tokens; element strides of batch, head, token */
} Dense;

typedef struct {
    int dtype;
    Dense sink, tail;
    Py_ssize_t groups, P;
    DecodeArgs block[MAX_GROUPS];
    Py_ssize_t heads[MAX_GROUPS][MAX_GROUP_HEADS];
} Kind;

/* Row t of (b, h) of a dense part as float32 in dst. */
static inline const float *dense_row(const Dense *x, int dtype, Py_ssize_t b, Py_ssize_t h, Py_ssize_t t,
                                     Py_ssize_t D, float *dst) {
    const Py_ssize_t at = b * x->sb + h * x->sh + t * x->st;
    if (dtype == DT_FLOAT32) return (const float *)x->p + at;
    for (Py_ssize_t d = 0; d < D; ++d) dst[d] = meta_value(x->p, at + d, dtype);
    return dst;
}

typedef void (*Axpy)(float a, const float *x, float *y, Py_ssize_t D);
typedef float (*RowMax)(const float *x, Py_ssize_t n);        /* NaN when any element is NaN */
typedef float (*ExpSum)(float *x, Py_ssize_t n, float shift); /* x = exp(x - shift); returns the sum */

static ALWAYS_INLINE void axpy_scalar(float a, const float *x, float *y, Py_ssize_t D) {
    for (Py_ssize_t d = 0; d < D; ++d) y[d] += a * x[d];
}

static float row_max_scalar(const float *x, Py_ssize_t n) {
    float top = -INFINITY;
    for (Py_ssize_t k = 0; k < n; ++k) {
        if (x[k] != x[k]) return x[k];
        top = x[k] > top ? x[k] : top;
    }
    return top;
}

static float exp_sum_scalar(float *x, Py_ssize_t n, float shift) {
    float sum = 0.0f;
    for (Py_ssize_t k = 0; k < n; ++k) sum += x[k] = expf(x[k] - shift);
    return sum;
}

/* Softmax of one row of n scores in place, after soft-capping and the mask row (NULL: no mask). */
static ALWAYS_INLINE void softmax_row(float *x, Py_ssize_t n, const uint8_t *mask, float softcap, RowMax row_max,
                                      ExpSum exp_sum) {
    if (softcap > 0.0f)
        for (Py_ssize_t k = 0; k < n; ++k) x[k] = tanhf(x[k] / softcap) * softcap;
    if (mask != NULL)
        for (Py_ssize_t k = 0; k < n; ++k)
            if (!mask[k]) x[k] = -INFINITY;
    const float top = row_max(x, n);
    if (top == -INFINITY) { /* sees nothing */
        memset(x, 0, (size_t)n * sizeof(float));
        return;
    }
    const float inv = 1.0f / exp_sum(x, n, top); /* exp(-inf - top) = 0 */
    for (Py_ssize_t k = 0; k < n; ++k) x[k] *= inv;
}

/* Scores of the dense tokens of keys (mode 0) into S, or their weighted values into out (mode 1). */
static ALWAYS_INLINE void attend_dense(const Kind *k, int mode, Py_ssize_t B, Py_ssize_t H, Py_ssize_t R,
                                       Py_ssize_t D, Py_ssize_t n, const float *q, float *S, float *out,
                                       float *row, Dot dot, Axpy axpy) {
    const Py_ssize_t s = k->sink.len;
    for (int part = 0; part < 2; ++part) {
        const Dense *x = part == 0 ? &k->sink : &k->tail;
        const Py_ssize_t first = part == 0 ? 0 : s + k->P;
        for (Py_ssize_t b = 0; b < B; ++b)
            for (Py_ssize_t h = 0; h < H; ++h)
                for (Py_ssize_t t = 0; t < x->len; ++t) {
                    const float *v = dense_row(x, k->dtype, b, h, t, D, row);
                    const Py_ssize_t r0 = (b * H + h) * R;
                    for (Py_ssize_t r = r0; r < r0 + R; ++r) {
                        if (mode == 0)
                            S[r * n + first + t] = dot(q + r * D, v, D);
                        else
                            axpy(S[r * n + first + t], v, out + r * D, D);
                    }
                }
    }
}

typedef struct {
    Py_ssize_t B, H, R, D, t, n;
    const float *q;
    float *out, *S, *row;
    const uint8_t *mask;
    Py_ssize_t mask_sb;
    float softcap;
} Layer;

/* The whole step; 0 when out of memory. */
static ALWAYS_INLINE int attend_layer_rows(const Layer *l, Kind *keys, Kind *values, Dot dot, Axpy axpy,
                                           RowMax row_max, ExpSum exp_sum) {
    const Py_ssize_t B = l->B, H = l->H, R = l->R, D = l->D, n = l->n;
    for (Py_ssize_t g = 0; g < keys->groups; ++g) {
        const AttendArgs w = {0, R, l->q, l->S, keys->heads[g], H, n, keys->sink.len};
        if (!attend_block(&keys->block[g], &w)) return 0;
    }
    attend_dense(keys, 0, B, H, R, D, n, l->q, l->S, NULL, l->row, dot, axpy);
    for (Py_ssize_t b = 0; b < B; ++b)
        for (Py_ssize_t r = 0; r < H * R; ++r) {
            const uint8_t *mask = l->mask != NULL ? l->mask + b * l->mask_sb + (r % R % l->t) * n : NULL;
            softmax_row(l->S + (b * H * R + r) * n, n, mask, l->softcap, row_max, exp_sum);
        }
    memset(l->out, 0, (size_t)(B * H * R * D) * sizeof(float));
    for (Py_ssize_t g = 0; g < values->groups; ++g) {
        const AttendArgs w = {1, R, l->S, l->out, values->heads[g], H, n, values->sink.len};
        if (!attend_block(&values->block[g], &w)) return 0;
    }
    attend_dense(values, 1, B, H, R, D, n, NULL, l->S, l->out, l->row, dot, axpy);
    return 1;
}

static int attend_layer_scalar(const Layer *l, Kind *keys, Kind *values) {
    return attend_layer_rows(l, keys, values, dot_scalar, axpy_scalar, row_max_scalar, exp_sum_scalar);
}

#ifdef HAVE_AVX2_PATH
FOLDED static inline void axpy_avx2(float a, const float *x, float *y, Py_ssize_t D) {
    const __m256 av = _mm256_set1_ps(a);
    for (Py_ssize_t d = 0; d < D; d += 8) _mm256_storeu_ps(y + d, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + d), _mm256_loadu_ps(y + d)));
}

/* exp of 8 lanes at x <= 0 (softmax's shifted scores): exp(x) = 2^k * exp(r), k = round(x / ln 2), |r| <= ln 2 / 2,
 * exp(r) by its degree-6 Taylor polynomial (relative error below 2e-7, about float32 rounding); lanes under -87
 * give 2^-126-ish instead of the tiny exact value, -inf gives 0, NaN stays NaN. */
FOLDED static inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f);
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(lo, x); /* NaN passes (max returns its second operand) */
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);  /* ln 2 in two parts: exact k * hi */
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

FOLDED static float row_max_avx2(const float *x, Py_ssize_t n) {
    __m256 top = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
    Py_ssize_t k = 0;
    for (; k + 8 <= n; k += 8) {
        const __m256 v = _mm256_loadu_ps(x + k);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        top = _mm256_max_ps(top, v);
    }
    float lanes[8], rest = row_max_scalar(x + k, n - k);
    if (_mm256_movemask_ps(nan) || rest != rest) return NAN;
    _mm256_storeu_ps(lanes, top);
    for (int j = 0; j < 8; ++j) rest = lanes[j] > rest ? lanes[j] : rest;
    return rest;
}

FOLDED static float exp_sum_avx2(float *x, Py_ssize_t n, float shift) {
    const __m256 sv = _mm256_set1_ps(shift);
    __m256 acc = _mm256_setzero_ps();
    Py_ssize_t k = 0;
    for (; k + 8 <= n; k += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + k), sv));
        _mm256_storeu_ps(x + k, e);
        acc = _mm256_add_ps(acc, e);
    }
    return hsum8(acc) + exp_sum_scalar(x + k, n - k, shift);
}

FOLDED static int attend_layer_avx2(const Layer *l, Kind *keys, Kind *values) {
    return attend_layer_rows(l, keys, values, dot_avx2, axpy_avx2, row_max_avx2, exp_sum_avx2);
}
#endif

/* A kind's arguments: (dtype, (sink address, length, strides b, h, t), (tail ...), groups), each group
 * (codes, bits, chunks, T, scale, zero, meta_dtype, meta_rows, meta_cols, meta_group, levels, heads). */
static int parse_kind(PyObject *arg, Kind *k, Py_ssize_t B, Py_ssize_t H, Py_ssize_t D, Py_ssize_t n) {
    Py_ssize_t sink, tail;
    PyObject *groups;
    if (!PyArg_ParseTuple(arg, "i(nnnnn)(nnnnn)O!", &k->dtype, &sink, &k->sink.len, &k->sink.sb, &k->sink.sh,
                          &k->sink.st, &tail, &k->tail.len, &k->tail.sb, &k->tail.sh, &k->tail.st, &PyTuple_Type,
                          &groups))
        return 0;
    k->sink.p = (const void *)sink, k->tail.p = (const void *)tail;
    k->groups = PyTuple_GET_SIZE(groups);
    int ok = k->dtype >= 0 && k->dtype <= 2 && k->groups <= MAX_GROUPS && k->sink.len >= 0 && k->tail.len >= 0;
    Py_ssize_t seen = 0, P = -1;
    for (Py_ssize_t g = 0; ok && g < k->groups; ++g) {
        DecodeArgs *a = &k->block[g];
        Py_ssize_t codes, scale, zero, levels;
        PyObject *heads;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(groups, g), "ninnnninnnnO!", &codes, &a->bits, &a->n, &a->T, &scale,
                              &zero, &a->meta_dtype, &a->meta_rows, &a->meta_cols, &a->meta_group, &levels,
                              &PyTuple_Type, &heads))
            return 0;
        a->codes = (const uint8_t *)codes, a->scale = (const void *)scale, a->zero = (const void *)zero;
        a->levels = (const float *)levels;
        a->D = D, a->B = B, a->H = PyTuple_GET_SIZE(heads);
        ok = layout_valid(a) && a->H <= MAX_GROUP_HEADS && (P < 0 || P == a->n * a->T);
        P = a->n * a->T;
        for (Py_ssize_t h = 0; ok && h < a->H; ++h) {
            const Py_ssize_t head = PyLong_AsSsize_t(PyTuple_GET_ITEM(heads, h));
            ok = head >= 0 && head < H;
            k->heads[g][h] = head;
        }
        seen += a->H;
    }
    k->P = P < 0 ? 0 : P;
    if (!ok || (k->groups && seen != H) || k->sink.len + k->P + k->tail.len != n) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "attend_layer: invalid layout arguments");
        return 0;
    }
    return 1;
}

static PyObject *attend_layer(PyObject *self, PyObject *args) {
    (void)self;
    Layer l;
    Py_ssize_t q, out, mask;
    PyObject *key_arg, *value_arg;
    if (!PyArg_ParseTuple(args, "nn(nnnnnn)OOnnf", &q, &out, &l.B, &l.H, &l.R, &l.D, &l.t, &l.n, &key_arg,
                          &value_arg, &mask, &l.mask_sb, &l.softcap))
        return NULL;
    if (l.B < 1 || l.H < 1 || l.R < 1 || l.D < 1 || l.t < 1 || l.R % l.t || l.n < 1) {
        PyErr_SetString(PyExc_ValueError, "attend_layer: invalid shape arguments");
        return NULL;
    }
    Kind *kinds = (Kind *)malloc(2 * sizeof(Kind));
    if (kinds == NULL) return PyErr_NoMemory();
    if (!parse_kind(key_arg, &kinds[0], l.B, l.H, l.D, l.n) || !parse_kind(value_arg, &kinds[1], l.B, l.H, l.D, l.n) ||
        kinds[0].sink.len != kinds[1].sink.len) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "attend_layer: keys and values differ in sinks");
        free(kinds);
        return NULL;
    }
    l.q = (const float *)q, l.out = (float *)out, l.mask = (const uint8_t *)mask;
    int ok = 0;
    Py_BEGIN_ALLOW_THREADS
    l.S = (float *)malloc(((size_t)(l.B * l.H * l.R * l.n) + (size_t)l.D) * sizeof(float));
    if (l.S != NULL) {
        l.row = l.S + l.B * l.H * l.R * l.n;
#ifdef HAVE_AVX2_PATH
        if (l.D % 8 == 0 && folded_supported())
            ok = attend_layer_avx2(&l, &kinds[0], &kinds[1]);
        else
#endif
            ok = attend_layer_scalar(&l, &kinds[0], &kinds[1]);
        free(l.S);
    }
    Py_END_ALLOW_THREADS free(kinds);
    if (!ok) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef METHODS[] = {
    {"decode_minmax", decode_minmax, METH_VARARGS,
     "decode_minmax(codes, bits, D, (n, B, H, T), scale, zero, meta_dtype, meta_rows, meta_cols, meta_group, "
     "levels, out, out_dtype, (s_n, s_b, s_h, s_t)): fused unpack + min-max decode; see ratequant.kernels.native."},
    {"attend_minmax", attend_minmax, METH_VARARGS,
     "attend_minmax(codes, bits, D, (n, B, H, T), scale, zero, meta_dtype, meta_rows, meta_cols, meta_group, "
     "levels, mode, G, q_or_p, out): attention scores (mode 0) or weighted values (mode 1) from packed rows."},
    {"attend_layer", attend_layer, METH_VARARGS,
     "attend_layer(q, out, (B, H, R, D, t, n), keys, values, mask, mask_batch_stride, softcap): one layer's "
     "attention step from sinks, packed bit groups and tail; see ratequant.kernels.native."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_native",
    .m_doc = "Fused decode kernels of ratequant.",
    .m_size = -1,
    .m_methods = METHODS,
};

/* Raised whenever the functions' arguments change, so that ratequant.kernels.native refuses a stale build. */
#define NATIVE_ABI 4

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *module = PyModule_Create(&MODULE);
    if (module != NULL && (PyModule_AddIntConstant(module, "ABI", NATIVE_ABI) < 0 ||
                           PyModule_AddIntConstant(module, "MAX_GROUP_HEADS", MAX_GROUP_HEADS) < 0)) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
