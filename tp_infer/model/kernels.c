/* The CPU kernels of decode and short extends, called by kernels.py through ctypes; it builds this file with -O3
 * -mavx2 -mfma -fopenmp, and OpenMP is then the libgomp torch has loaded (the same soname), so the threads are torch's.
 *
 * small_matmul: y = x w^T for a few rows of x. Each row of w is read once, from memory, for all rows of x, and the
 * rows of w are split over the threads; MKL runs these products on one core at a third of the memory bandwidth. With
 * -mavx512f (kernels.py adds it where the CPU has AVX-512) the products' tiles are 16 floats wide, else 8.
 *
 *   x [m, k] fp32, contiguous, m >= 1             w [n, k] fp32, contiguous      y [m, n] fp32, contiguous
 *
 * swiglu, rms_norm, rope, route, moe: a layer's few rows in one call each, as the PyTorch code they replace computes
 * them (each described above its code).
 * mla_decode, mha_decode: MLA's attention of one new token per row, absorbed or per head, over the paged cache.
 * extend_attention: the attention of one row's new tokens over its positions (prefills and extends), in tiles. */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

static inline float sum8(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float max8(__m256 a) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

/* one row of x: four accumulators, so that the FMAs do not wait on each other */
static inline float dot(const float *w, const float *x, int64_t k) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 8 <= k; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
    float r = sum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < k; i++) r += w[i] * x[i];
    return r;
}

/* M rows of x against one row of w (M a constant where it is inlined, so acc stays in registers) */
static inline void dots(const float *w, const float *x, float *y, int64_t n, int64_t k, const int M) {
    __m256 acc[8];
    for (int j = 0; j < M; j++) acc[j] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
        __m256 wv = _mm256_loadu_ps(w + i);
        for (int j = 0; j < M; j++) acc[j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + j * k + i), acc[j]);
    }
    for (int j = 0; j < M; j++) {
        float r = sum8(acc[j]);
        for (int64_t t = i; t < k; t++) r += w[t] * x[j * k + t];
        y[j * n] = r;
    }
}

/* rows [j, j + M) of x, M <= 8, against one row of w */
static inline void row_block(const float *w, const float *x, float *y, int64_t n, int64_t k, int M) {
    switch (M) {
    case 1: *y = dot(w, x, k); break;
    case 2: dots(w, x, y, n, k, 2); break;
    case 3: dots(w, x, y, n, k, 3); break;
    case 4: dots(w, x, y, n, k, 4); break;
    case 5: dots(w, x, y, n, k, 5); break;
    case 6: dots(w, x, y, n, k, 6); break;
    case 7: dots(w, x, y, n, k, 7); break;
    default: dots(w, x, y, n, k, 8);
    }
}

/* The products' tile: rows [0, MB) of x against rows [0, NB) of w, each output one vector accumulator over k
 * (then summed across its lanes), so a row's result is the same bits in any tile and any m. Per step of k it loads
 * NB vectors of w and MB of x for MB * NB FMAs: with AVX-512's 32 registers 6 x 4 (24 accumulators), with AVX2's 16
 * 4 x 3; the arithmetic, not the loads, then sets the pace. */
#ifdef __AVX512F__
typedef __m512 vec;
#define VLEN 16
#define TILE_M 6
#define TILE_N 4
static inline vec vload(const float *p) { return _mm512_loadu_ps(p); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vset1(float a) { return _mm512_set1_ps(a); }
static inline void vstore(float *p, vec a) { _mm512_storeu_ps(p, a); }
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm512_div_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
static inline vec vmin(vec a, vec b) { return _mm512_min_ps(a, b); }
static inline vec vfnma(vec a, vec b, vec c) { return _mm512_fnmadd_ps(a, b, c); }
static inline float vsum_lanes(vec a) { return _mm512_reduce_add_ps(a); }
static inline float vmax_lanes(vec a) { return _mm512_reduce_max_ps(a); }
static inline vec vround(vec a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
/* p 2^n (as ldexp) for whole n in [-126, 127], 0 where x < lo */
static inline vec vldexp(vec p, vec n, vec x, vec lo) {
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mul_ps(_mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ), p, _mm512_castsi512_ps(e));
}
/* the sums of a, b, c and d across their lanes, in that order: pairs of lanes, then 128-bit quarters */
static inline __m128 sums4(vec a, vec b, vec c, vec d) {
    const __m512d ab = _mm512_castps_pd(_mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b)));
    const __m512d cd = _mm512_castps_pd(_mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d)));
    const __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(ab, cd)),
                                      _mm512_castpd_ps(_mm512_unpackhi_pd(ab, cd)));
    const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd),
                                      _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}
#else
typedef __m256 vec;
#define VLEN 8
#define TILE_M 4
#define TILE_N 3
static inline vec vload(const float *p) { return _mm256_loadu_ps(p); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vset1(float a) { return _mm256_set1_ps(a); }
static inline void vstore(float *p, vec a) { _mm256_storeu_ps(p, a); }
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm256_div_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
static inline vec vmin(vec a, vec b) { return _mm256_min_ps(a, b); }
static inline vec vfnma(vec a, vec b, vec c) { return _mm256_fnmadd_ps(a, b, c); }
static inline float vsum_lanes(vec a) { return sum8(a); }
static inline float vmax_lanes(vec a) { return max8(a); }
static inline vec vround(vec a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec vldexp(vec p, vec n, vec x, vec lo) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}
static inline __m128 sums4(vec a, vec b, vec c, vec d) {
    const __m256d ab = _mm256_castps_pd(_mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b)));
    const __m256d cd = _mm256_castps_pd(_mm256_add_ps(_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d)));
    const __m256 abcd = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(ab, cd)),
                                      _mm256_castpd_ps(_mm256_unpackhi_pd(ab, cd)));
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}
#endif

/* NB (<= 4) accumulators summed across their lanes into y[0 .. NB): one reduction for up to four */
static inline __attribute__((always_inline)) void store_sums(const vec *acc, float *y, const int NB) {
    const vec z = vzero();
    const __m128 s = sums4(acc[0], NB > 1 ? acc[1] : z, NB > 2 ? acc[2] : z, NB > 3 ? acc[3] : z);
    if (NB == 4)
        _mm_storeu_ps(y, s);
    else {
        float out[4];
        _mm_storeu_ps(out, s);
        for (int j = 0; j < NB; j++) y[j] = out[j];
    }
}

/* MB rows of x [., k] against NB rows of w [., k] into y (rows n apart); MB and NB constants where inlined. With
 * `next` (the next rows of w this thread will read, NB of them) it also asks for this tile's share of those, so that
 * memory delivers them while the block's tiles compute: it is tile `pass` of `passes` over the block, and asks for
 * lines pass, pass + passes, ... of each row, a line of each row a step (all tiles asking in the first would stall
 * it on the misses in flight while the others ask for nothing). */
static inline __attribute__((always_inline)) void tile(const float *x, const float *w, float *y, int64_t n,
                                                      int64_t k, const int MB, const int NB, const float *next,
                                                      int pass, int passes) {
    vec acc[TILE_M][TILE_N];
    for (int i = 0; i < MB; i++)
        for (int j = 0; j < NB; j++) acc[i][j] = vzero();
    int64_t t = 0;
    int due = next ? pass : -1; /* lines of 16 floats until this tile's next one to ask for */
    for (; t + VLEN <= k; t += VLEN) {
        vec wv[TILE_N];
        for (int j = 0; j < NB; j++) wv[j] = vload(w + j * k + t);
        if (t % 16 == 0 && due >= 0 && due-- == 0) {
            for (int j = 0; j < NB; j++) _mm_prefetch((const char *)(next + j * k + t), _MM_HINT_T0);
            due = passes - 1;
        }
        for (int i = 0; i < MB; i++) {
            const vec xv = vload(x + i * k + t);
            for (int j = 0; j < NB; j++) acc[i][j] = vfma(xv, wv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < MB; i++) {
        store_sums(acc[i], y + i * n, NB);
        for (int j = 0; j < NB; j++)
            for (int64_t s = t; s < k; s++) y[i * n + j] += x[i * k + s] * w[j * k + s];
    }
}

/* the tiles with their sizes made constants (mb <= TILE_M, nb <= TILE_N) */
#define SIZES(CALL, nb)                                                                                                \
    switch (nb) {                                                                                                      \
    case 1: SIZES_M(CALL, 1) break;                                                                                    \
    case 2: SIZES_M(CALL, 2) break;                                                                                    \
    case 3: SIZES_M(CALL, 3 < TILE_N ? 3 : TILE_N) break;                                                              \
    default: SIZES_M(CALL, TILE_N)                                                                                     \
    }
#define SIZES_M(CALL, NB)                                                                                              \
    switch (mb) {                                                                                                      \
    case 1: CALL(1, NB); break;                                                                                        \
    case 2: CALL(2, NB); break;                                                                                        \
    case 3: CALL(3, NB); break;                                                                                        \
    case 4: CALL(4, NB); break;                                                                                        \
    case 5: CALL(5 < TILE_M ? 5 : TILE_M, NB); break;                                                                  \
    default: CALL(TILE_M, NB);                                                                                         \
    }

static void any_tile(const float *x, const float *w, float *y, int64_t n, int64_t k, int mb, int nb,
                     const float *next, int pass, int passes) {
#define CALL(MB, NB) tile(x, w, y, n, k, MB, NB, next, pass, passes)
    SIZES(CALL, nb)
#undef CALL
}

/* Products of m rows share out the n rows of w in blocks: up to STREAM_ROWS rows of x, where memory sets the pace,
 * single rows (one stream, which memory delivers faster), else TILE_N rows. This thread's rows [r0, r1): whole
 * blocks, its even share of them, in thread order. */
#define STREAM_ROWS 4
static inline int64_t rows_per_block(int64_t m) { return m <= STREAM_ROWS ? 1 : TILE_N; }

static inline void rows_of_thread(int64_t m, int64_t n, int64_t *r0, int64_t *r1) {
    const int64_t per_block = rows_per_block(m), blocks = (n + per_block - 1) / per_block;
    const int64_t t = omp_get_thread_num(), threads = omp_get_num_threads();
    const int64_t each = blocks / threads, extra = blocks % threads, b0 = t * each + (t < extra ? t : extra);
    const int64_t b1 = b0 + each + (t < extra);
    *r0 = b0 * per_block < n ? b0 * per_block : n;
    *r1 = b1 * per_block < n ? b1 * per_block : n;
}

/* y = x w^T for rows [0, m) of x and this thread's rows of w, inside a parallel region (no barrier at the end). Each
 * block of w is read from memory once and stays in L1 while every row of x passes it. */
static inline void matmul_rows(const float *x, const float *w, float *y, int64_t m, int64_t n, int64_t k) {
    const int64_t per_block = rows_per_block(m);
    int64_t r0, r1;
    rows_of_thread(m, n, &r0, &r1);
    for (int64_t r = r0; r < r1; r += per_block) {
        const int64_t nb = n - r < per_block ? n - r : per_block;
        const float *next = r + per_block < n ? w + (r + per_block) * k : NULL;
        for (int64_t j = 0; j < m; j += TILE_M)
            any_tile(x + j * k, w + r * k, y + j * n + r, n, k, m - j < TILE_M ? (int)(m - j) : TILE_M, (int)nb,
                     next, (int)(j / TILE_M), (int)((m + TILE_M - 1) / TILE_M));
    }
}

/* 0, or -1 (nothing written) when m < 1; kernels.py decides up to how many rows this beats MKL */
int small_matmul(const float *x, const float *w, float *y, int64_t m, int64_t n, int64_t k, int threads) {
    if (m < 1) return -1;
#pragma omp parallel num_threads(threads)
    matmul_rows(x, w, y, m, n, k);
    return 0;
}

/* e^x, a vector at a time: x = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial (under 2 ulp),
 * times 2^n; below -87.3 it gives 0 (expf would give subnormals), above 88 e^88 */
static inline vec vexp(vec x) {
    const vec lo = vset1(-87.33654f), clamped = vmin(vmax(x, lo), vset1(88.f));
    const vec n = vround(vmul(clamped, vset1(1.44269504f)));
    const vec r = vfnma(n, vset1(-2.12194440e-4f), vfnma(n, vset1(0.693359375f), clamped));
    vec p = vset1(1.f / 720);
    p = vfma(p, r, vset1(1.f / 120));
    p = vfma(p, r, vset1(1.f / 24));
    p = vfma(p, r, vset1(1.f / 6));
    p = vfma(p, r, vset1(0.5f));
    p = vfma(p, r, vset1(1.f));
    p = vfma(p, r, vset1(1.f));
    return vldexp(p, n, x, lo);
}

/* softmax of scale * x [n] in place, a vector at a time (scale > 0: the largest x gives the largest scale * x) */
static void softmax(float *x, int64_t n, float scale) {
    int64_t s = 0;
    vec vmx = vset1(x[0]), vsum = vzero();
    for (; s + VLEN <= n; s += VLEN) vmx = vmax(vmx, vload(x + s));
    float mx = vmax_lanes(vmx), sum;
    for (int64_t t = s; t < n; t++) mx = x[t] > mx ? x[t] : mx;
    const float shift = -scale * mx;
    const vec vscale = vset1(scale), vshift = vset1(shift);
    for (s = 0; s + VLEN <= n; s += VLEN) {
        const vec e = vexp(vfma(vload(x + s), vscale, vshift));
        vstore(x + s, e);
        vsum = vadd(vsum, e);
    }
    sum = vsum_lanes(vsum);
    for (int64_t t = s; t < n; t++) sum += (x[t] = expf(fmaf(x[t], scale, shift)));
    const vec inv = vset1(1.f / sum);
    for (s = 0; s + VLEN <= n; s += VLEN) vstore(x + s, vmul(vload(x + s), inv));
    for (int64_t t = s; t < n; t++) x[t] *= 1.f / sum;
}

/* h = silu(g) h = g h / (1 + e^-g) for the columns of g and h [m, inter] this thread's products with w1 and w3 wrote
 * (rows_of_thread's), so that no thread waits for another's first */
static inline void silu_own_columns(const float *g, float *h, int64_t m, int64_t inter) {
    int64_t c0, c1;
    rows_of_thread(m, inter, &c0, &c1);
    for (int64_t j = 0; j < m; j++) {
        const float *a = g + j * inter;
        float *b = h + j * inter;
        int64_t c = c0;
        for (; c + VLEN <= c1; c += VLEN) {
            const vec v = vload(a + c), den = vadd(vset1(1.f), vexp(vmul(v, vset1(-1.f))));
            vstore(b + c, vmul(vdiv(v, den), vload(b + c)));
        }
        for (; c < c1; c++) b[c] = a[c] / (1.f + expf(-a[c])) * b[c];
    }
}

/* SwiGLU of m rows inside a parallel region, y = (silu(x w1^T) * x w3^T) w2^T, through scratch g and h [m, inter]:
 * one barrier (all of h before w2); every thread returns once y is complete.
 *
 *   x [m, dim]   w1, w3 [inter, dim]   w2 [dim, inter]   y [m, dim]   all fp32, contiguous */
static void swiglu_rows(const float *x, const float *w1, const float *w3, const float *w2, float *g, float *h,
                        float *y, int64_t m, int64_t inter, int64_t dim) {
    matmul_rows(x, w1, g, m, inter, dim);
    matmul_rows(x, w3, h, m, inter, dim);
    silu_own_columns(g, h, m, inter);
#pragma omp barrier
    matmul_rows(h, w2, y, m, dim, inter);
#pragma omp barrier
}

/* SwiGLU for a few rows in one parallel region: 0, -1 when m < 1, -2 out of memory */
int swiglu(const float *x, const float *w1, const float *w3, const float *w2, float *y, int64_t m, int64_t inter,
           int64_t dim, int threads) {
    if (m < 1) return -1;
    float *g = malloc(sizeof(float) * 2 * m * inter);
    if (!g) return -2;
#pragma omp parallel num_threads(threads)
    swiglu_rows(x, w1, w3, w2, g, g + m * inter, y, m, inter, dim);
    free(g);
    return 0;
}

/* the index of the largest of n values not yet taken (the first of equals), marking it taken */
static int64_t take_largest(const float *v, char *taken, int64_t n) {
    int64_t best = -1;
    for (int64_t i = 0; i < n; i++)
        if (!taken[i] && (best < 0 || v[i] > v[best])) best = i;
    taken[best] = 1;
    return best;
}

/* The router for m tokens over E experts, as MoE's Gate computes it: scores (sigmoid, else softmax) of x gate^T; the
 * choice adds the bias (if any); with groups > 1 only the best topk_groups groups (by their best score, or best two
 * with a bias) stay in the running; the topk chosen experts' scores (renormalised if norm) times scale.
 *
 *   x [m, dim]   gate [E, dim]   bias [E] or NULL   weights [m, topk] fp32   indices [m, topk] int64
 * 0, -2 out of memory. */
typedef struct {
    const float *x, *gate, *bias;
    float *weights;
    int64_t *indices;
    int64_t m, dim, E, groups, topk_groups, topk;
    int sigmoid, norm;
    float scale;
} Route;

int route(const Route *a, int threads) {
    const float *x = a->x, *gate = a->gate, *bias = a->bias;
    float *weights = a->weights;
    int64_t *indices = a->indices;
    const int64_t m = a->m, dim = a->dim, E = a->E, groups = a->groups, topk_groups = a->topk_groups, topk = a->topk;
    const int sigmoid = a->sigmoid, norm = a->norm;
    const float scale = a->scale;
    float *logits = malloc(sizeof(float) * (m * E + E + groups)), *choice = logits + m * E, *group_scores = choice + E;
    char *taken = malloc(E + groups);
    if (!logits || !taken) return free(logits), free(taken), -2;
#pragma omp parallel num_threads(threads)
    matmul_rows(x, gate, logits, m, E, dim);
    const int64_t per_group = E / groups;
    for (int64_t t = 0; t < m; t++) {
        float *score = logits + t * E;
        if (sigmoid)
            for (int64_t e = 0; e < E; e++) score[e] = 1.f / (1.f + expf(-score[e]));
        else
            softmax(score, E, 1.f);
        for (int64_t e = 0; e < E; e++) choice[e] = bias ? score[e] + bias[e] : score[e];
        if (groups > 1) {
            for (int64_t i = 0; i < E; i++) taken[i] = 0;
            for (int64_t k = 0; k < groups; k++) {
                const float *c = choice + k * per_group;
                if (bias) {
                    int64_t a = take_largest(c, taken + k * per_group, per_group);
                    int64_t b = take_largest(c, taken + k * per_group, per_group);
                    group_scores[k] = c[a] + c[b];
                } else
                    group_scores[k] = c[take_largest(c, taken + k * per_group, per_group)];
            }
            char *kept = taken + E;
            for (int64_t k = 0; k < groups; k++) kept[k] = 0;
            for (int64_t k = 0; k < topk_groups; k++) take_largest(group_scores, kept, groups);
            for (int64_t e = 0; e < E; e++)
                if (!kept[e / per_group]) choice[e] = -INFINITY;
        }
        for (int64_t e = 0; e < E; e++) taken[e] = 0;
        float *w = weights + t * topk, sum = 0.f;
        for (int64_t k = 0; k < topk; k++) {
            const int64_t e = take_largest(choice, taken, E);
            indices[t * topk + k] = e;
            sum += (w[k] = score[e]);
        }
        for (int64_t k = 0; k < topk; k++) w[k] = (norm ? w[k] / sum : w[k]) * scale;
    }
    free(logits), free(taken);
    return 0;
}

/* This rank's part of a mixture of experts for m tokens: the shared expert (if sw1) on every token, plus, expert by
 * expert in ascending order, each chosen local expert's output on the tokens routed to it, times their weight.
 *
 *   x [m, dim]   weights, indices [m, topk] (the router's)   y [m, dim]
 *   ids [n]: the local experts some token chose, ascending; w1s, w3s, w2s [n]: their weights (as swiglu's)
 *   sw1, sw3, sw2: the shared expert's, inner size shared_inter, or NULL
 *
 * The threads share each expert's rows of w1, w3 and w2, and meet once an expert, before w2 (which reads every
 * column of h). Around that barrier each works on what it wrote itself: its copy of the expert's tokens, the SiLU of
 * its columns of g and h, and the sum into y of its columns of the expert's output. Experts alternate between two
 * pairs of g and h, so that one thread's w1 and w3 for the next expert never overwrite an h another still reads.
 * Each element of y gets the experts in ascending order: the thread adding expert e's passed the barrier of e only
 * after every thread had added e - 1's.
 * 0, -2 out of memory. */
typedef struct {
    const float *x, *weights;
    const int64_t *indices, *ids;
    const float *const *w1s, *const *w3s, *const *w2s;
    const float *sw1, *sw3, *sw2;
    float *y;
    int64_t n, m, topk, dim, inter, shared_inter;
} Moe;

int moe(const Moe *a, int threads) {
    const float *x = a->x, *weights = a->weights, *sw1 = a->sw1, *sw3 = a->sw3, *sw2 = a->sw2;
    const int64_t *indices = a->indices, *ids = a->ids;
    const float *const *w1s = a->w1s, *const *w3s = a->w3s, *const *w2s = a->w2s;
    float *y = a->y;
    const int64_t n = a->n, m = a->m, topk = a->topk, dim = a->dim, inter = a->inter, shared_inter = a->shared_inter;
    /* the (token, weight) pairs by expert: expert e's from start[e], count[e] of them */
    int64_t *start = malloc(sizeof(int64_t) * (2 * n + m * topk)), *count = start + n, *tokens = count + n;
    float *wt = malloc(sizeof(float) * m * topk);
    const int64_t wide = inter > shared_inter ? inter : shared_inter;
    float *buf = malloc(sizeof(float) * ((threads + 1) * m * dim + 4 * m * wide));
    if (!start || !wt || !buf) return free(start), free(wt), free(buf), -2;
    for (int64_t e = 0, pairs = 0; e < n; e++) {
        start[e] = pairs;
        for (int64_t t = 0; t < m; t++)
            for (int64_t k = 0; k < topk; k++)
                if (indices[t * topk + k] == ids[e]) tokens[pairs] = t, wt[pairs++] = weights[t * topk + k];
        count[e] = pairs - start[e];
    }
#pragma omp parallel num_threads(threads)
    {
        float *xs = buf + omp_get_thread_num() * m * dim, *ys = buf + threads * m * dim, *gh = ys + m * dim;
        if (sw1)
            swiglu_rows(x, sw1, sw3, sw2, gh, gh + m * wide, y, m, shared_inter, dim);
        else {
#pragma omp for schedule(static)
            for (int64_t i = 0; i < m * dim; i++) y[i] = 0.f;
        }
        for (int64_t e = 0, done = 0; e < n; e++) {
            const int64_t c = count[e], *tok = tokens + start[e];
            if (c == 0) continue;
            float *g = gh + (done++ % 2) * 2 * m * wide, *h = g + m * wide;
            for (int64_t j = 0; j < c; j++)
                for (int64_t i = 0; i < dim; i++) xs[j * dim + i] = x[tok[j] * dim + i];
            matmul_rows(xs, w1s[e], g, c, inter, dim);
            matmul_rows(xs, w3s[e], h, c, inter, dim);
            silu_own_columns(g, h, c, inter);
#pragma omp barrier
            matmul_rows(h, w2s[e], ys, c, dim, inter);
            int64_t c0, c1; /* the columns of ys this thread wrote */
            rows_of_thread(c, dim, &c0, &c1);
            for (int64_t j = 0; j < c; j++)
                for (int64_t i = c0; i < c1; i++) y[tok[j] * dim + i] += ys[j * dim + i] * wt[start[e] + j];
        }
    }
    free(start), free(wt), free(buf);
    return 0;
}

/* RMSNorm of m rows: y = x / sqrt(mean(x^2) + eps) * w. x [m, n] with rows `stride` floats apart, y [m, n]. */
void rms_norm(const float *x, const float *w, float *y, int64_t m, int64_t n, int64_t stride, float eps) {
    for (int64_t j = 0; j < m; j++) {
        const float *row = x + j * stride;
        float *out = y + j * n;
        const float scale = 1.f / sqrtf(dot(row, row, n) / (float)n + eps);
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) {
            __m256 v = _mm256_mul_ps(_mm256_loadu_ps(row + i), _mm256_set1_ps(scale));
            _mm256_storeu_ps(out + i, _mm256_mul_ps(v, _mm256_loadu_ps(w + i)));
        }
        for (; i < n; i++) out[i] = row[i] * scale * w[i];
    }
}

/* Rotary embedding: row i's vectors x[i, h] (at x + i * row_stride + h * head_stride), pairs (a, b) of 2 * pairs
 * floats, each turned by rot[i, k] = (cos, sin) to (a cos - b sin, a sin + b cos), the complex product; y [m, nh,
 * 2 * pairs] contiguous. Four pairs at a time: (a, b) (cos, cos) -+ (b, a) (sin, sin). */
void rope(const float *x, const float *rot, float *y, int64_t m, int64_t nh, int64_t pairs, int64_t row_stride,
          int64_t head_stride) {
    for (int64_t i = 0; i < m; i++)
        for (int64_t h = 0; h < nh; h++) {
            const float *in = x + i * row_stride + h * head_stride, *r = rot + i * 2 * pairs;
            float *o = y + (i * nh + h) * 2 * pairs;
            int64_t k = 0;
            for (; k + 4 <= pairs; k += 4) {
                __m256 v = _mm256_loadu_ps(in + 2 * k), t = _mm256_loadu_ps(r + 2 * k);
                __m256 swapped = _mm256_permute_ps(v, 0xB1);
                __m256 turned = _mm256_fmaddsub_ps(v, _mm256_moveldup_ps(t), _mm256_mul_ps(swapped, _mm256_movehdup_ps(t)));
                _mm256_storeu_ps(o + 2 * k, turned);
            }
            for (; k < pairs; k++) {
                const float a = in[2 * k], b = in[2 * k + 1], c = r[2 * k], s = r[2 * k + 1];
                o[2 * k] = a * c - b * s, o[2 * k + 1] = a * s + b * c;
            }
        }
}

/* The rows of a decode kernel over `threads` threads, ROW(r, tid, nt, buf) doing row r as thread tid of nt: with at
 * least as many rows as threads (whole), each thread takes whole rows alone, in per_row floats of scratch of its
 * own; else all threads work on each row in turn, sharing the scratch. */
#define SHARE_ROWS(R, whole, scratch, per_row)                                                                          \
    if (whole) {                                                                                                       \
        _Pragma("omp parallel for num_threads(threads) schedule(dynamic, 1)")                                         \
        for (int64_t r = 0; r < (R); r++) ROW(r, 0, 1, (scratch) + (per_row) * omp_get_thread_num());                  \
    } else                                                                                                             \
        for (int64_t r = 0; r < (R); r++) {                                                                            \
            _Pragma("omp parallel num_threads(threads)")                                                               \
            ROW(r, omp_get_thread_num(), omp_get_num_threads(), (scratch));                                            \
        }

/* positions ahead whose cache rows the attention kernels ask for before reading them: the pool's blocks lie
 * anywhere, so the hardware's prefetcher loses the stream at every block boundary, and a cold cache was read at
 * 14 GB/s where a plain stream reads 34 */
#define PREFETCH_ROWS 16

static inline void prefetch(const float *p, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) _mm_prefetch((const char *)(p + i), _MM_HINT_T0);
}

/* MLA's decode in the absorbed form, one new token per row, over the paged cache in place:
 *
 *   q_nope [R, H, D], q_pe [R, H, P]          the new tokens' queries: row r, head h at r * q_rs + h * q_hs
 *                                              (nope) and r * p_rs + h * p_hs (pe), contiguous within
 *   kv [R, C + P] or NULL                      the new tokens' latent and rope key as wkv_a gives them: normalised
 *                                              (norm, eps) and rotated (rot [R, P / 2] pairs (cos, sin)) into the
 *                                              pool at slots [R], and q_pe rotated likewise; NULL: all done already
 *   wkv_b [H, D + V, C]                        per head: D rows that take q_nope to latent space, V rows from it
 *   latent [slots, C], pe [slots, P]           the pool, slot = block * bs + offset
 *   block_table [R, nb] int64, lengths [R]     row r attends over its positions 0 .. lengths[r] - 1
 *   out [R, H, V]                              the attention output, per head
 *
 * Per row: q_latent = scale q_nope w_k; scores = q_latent . latent + scale q_pe . pe; softmax; out = (probabilities
 * . latent) w_v^T. Each cached latent row is read once for the scores (every head against it while it is in L1) and
 * once more, block by block, for the output, where the threads split the latent dimension between them. With at
 * least as many rows as threads, each thread takes whole rows instead. */
static inline const float *row_at(const float *pool, const int64_t *table, int64_t bs, int64_t width, int64_t s) {
    return pool + (table[s / bs] * bs + s % bs) * width;
}

/* q_latent[h, c0 .. c0 + 8 NV) = sum_d q[h, d] w_k[h, d, c0 .. c0 + 8 NV): NV vectors of columns, one accumulator
 * each, so that NV independent FMAs issue per step of d */
static inline void absorb_query(const float *q, const float *w_k, float *out, int64_t D, int64_t C, float scale,
                                const int NV) {
    __m256 acc[8];
    for (int v = 0; v < NV; v++) acc[v] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d++) {
        __m256 qd = _mm256_set1_ps(q[d]);
        for (int v = 0; v < NV; v++) acc[v] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(w_k + d * C + 8 * v), acc[v]);
    }
    for (int v = 0; v < NV; v++) _mm256_storeu_ps(out + 8 * v, _mm256_mul_ps(acc[v], _mm256_set1_ps(scale)));
}

/* t[j * 3 + p] = q_latent[j] . lat[p] over C (a multiple of 8), NH <= 4 heads by NP <= 3 cached rows: 12
 * accumulators, each loaded vector used 3 or 4 times */
static inline void score_tile(const float *q, const float *const *lat, float *t, int64_t C, const int NH,
                              const int NP) {
    __m256 acc[4][3];
    for (int j = 0; j < NH; j++)
        for (int p = 0; p < NP; p++) acc[j][p] = _mm256_setzero_ps();
    for (int64_t c = 0; c < C; c += 8) {
        __m256 l[3];
        for (int p = 0; p < NP; p++) l[p] = _mm256_loadu_ps(lat[p] + c);
        for (int j = 0; j < NH; j++) {
            __m256 qv = _mm256_loadu_ps(q + j * C + c);
            for (int p = 0; p < NP; p++) acc[j][p] = _mm256_fmadd_ps(qv, l[p], acc[j][p]);
        }
    }
    for (int j = 0; j < NH; j++)
        for (int p = 0; p < NP; p++) t[j * 3 + p] = sum8(acc[j][p]);
}

static inline void score_tiles(const float *q, const float *const *lat, float *t, int64_t C, int nh, int np) {
#define TILE(NH)                                                                                                       \
    case NH:                                                                                                           \
        if (np == 3) score_tile(q, lat, t, C, NH, 3);                                                                  \
        else if (np == 2) score_tile(q, lat, t, C, NH, 2);                                                             \
        else score_tile(q, lat, t, C, NH, 1);                                                                          \
        break;
    switch (nh) { TILE(1) TILE(2) TILE(3) TILE(4) }
#undef TILE
}

/* o[j, 0 .. 16) += sum over n rows of p[j * S + s] lat[s, 0 .. 16), NH <= 4 heads: the rows are bs floats apart
 * (one block of the pool), 8 accumulators */
static inline void weigh_rows(const float *p, int64_t S, const float *lat, int64_t C, int64_t n, float *o,
                              int64_t ostride, const int NH) {
    __m256 lo[4], hi[4];
    for (int j = 0; j < NH; j++) lo[j] = _mm256_loadu_ps(o + j * ostride), hi[j] = _mm256_loadu_ps(o + j * ostride + 8);
    for (int64_t s = 0; s < n; s++) {
        __m256 l0 = _mm256_loadu_ps(lat + s * C), l1 = _mm256_loadu_ps(lat + s * C + 8);
        for (int j = 0; j < NH; j++) {
            __m256 pr = _mm256_set1_ps(p[j * S + s]);
            lo[j] = _mm256_fmadd_ps(pr, l0, lo[j]);
            hi[j] = _mm256_fmadd_ps(pr, l1, hi[j]);
        }
    }
    for (int j = 0; j < NH; j++) _mm256_storeu_ps(o + j * ostride, lo[j]), _mm256_storeu_ps(o + j * ostride + 8, hi[j]);
}

/* One row of mla_decode on thread `tid` of `nt` (nt = 1: alone); the scratch q_latent [H, C], qp [H, P], sc [H, S],
 * o_latent [H, C] is shared by the nt threads. */
static void decode_row(const float *qn, const float *qpe, int64_t q_hs, int64_t p_hs, const float *rot,
                       const float *wkv_b, const float *latent, const float *pe, const int64_t *table, int64_t len,
                       float *out, int64_t H, int64_t D, int64_t V, int64_t C, int64_t P, int64_t S, int64_t bs,
                       float scale, float *q_latent, float *qp, float *sc, float *o_latent, int tid, int nt) {
#define SHARE(n) const int64_t first = (n) * tid / nt, last = (n) * (tid + 1) / nt
#define SYNC() if (nt > 1) { _Pragma("omp barrier") }
    { /* the scaled rope query, rotated here if rot; zeroed output accumulators */
        SHARE(H);
        for (int64_t h = first; h < last; h++) {
            if (rot)
                rope(qpe + h * p_hs, rot, qp + h * P, 1, 1, P / 2, 0, 0);
            else
                for (int64_t i = 0; i < P; i++) qp[h * P + i] = qpe[h * p_hs + i];
            for (int64_t i = 0; i < P; i++) qp[h * P + i] *= scale;
            for (int64_t i = 0; i < C; i++) o_latent[h * C + i] = 0.f;
        }
    }
    { /* q_latent[h] = scale q_nope[h] w_k[h], in tiles of 64 columns (16 past the last multiple of 64) */
        const int64_t wide = C / 64, tiles = wide + (C - 64 * wide) / 16;
        SHARE(H * tiles);
        for (int64_t i = first; i < last; i++) {
            const int64_t h = i / tiles, tile = i % tiles, c = tile < wide ? 64 * tile : 64 * wide + 16 * (tile - wide);
            const float *w_k = wkv_b + h * (D + V) * C + c;
            if (tile < wide) absorb_query(qn + h * q_hs, w_k, q_latent + h * C + c, D, C, scale, 8);
            else absorb_query(qn + h * q_hs, w_k, q_latent + h * C + c, D, C, scale, 2);
        }
    }
    SYNC();
    { /* scores, 3 cached rows at a time against the heads 4 at a time, plus their rope parts */
        const int64_t triples = (len + 2) / 3;
        SHARE(triples);
        for (int64_t s0 = 3 * first; s0 < 3 * last && s0 < len; s0 += 3) {
            const int np = len - s0 < 3 ? (int)(len - s0) : 3;
            const float *lat[3], *rope_key[3];
            for (int p = 0; p < np; p++)
                lat[p] = row_at(latent, table, bs, C, s0 + p), rope_key[p] = row_at(pe, table, bs, P, s0 + p);
            for (int64_t s = s0 + PREFETCH_ROWS; s < s0 + PREFETCH_ROWS + np && s < len; s++)
                prefetch(row_at(latent, table, bs, C, s), C), prefetch(row_at(pe, table, bs, P, s), P);
            for (int64_t h = 0; h < H; h += 4) {
                const int nh = H - h < 4 ? (int)(H - h) : 4;
                float t[12], b[4];
                score_tiles(q_latent + h * C, lat, t, C, nh, np);
                for (int p = 0; p < np; p++) {
                    row_block(rope_key[p], qp + h * P, b, 1, P, nh);
                    for (int j = 0; j < nh; j++) sc[(h + j) * S + s0 + p] = t[j * 3 + p] + b[j];
                }
            }
        }
    }
    SYNC();
    { /* softmax over the row's positions */
        SHARE(H);
        for (int64_t h = first; h < last; h++) softmax(sc + h * S, len, 1.f);
    }
    SYNC();
    { /* o_latent = probabilities . latent: each thread its share of the 16-column stripes, walking the row's
       * blocks in order so that each streams in once, heads 4 at a time */
        SHARE(C / 16);
        for (int64_t s0 = 0; s0 < len; s0 += bs) {
            const int64_t n = len - s0 < bs ? len - s0 : bs;
            const float *block = latent + table[s0 / bs] * bs * C;
            if (s0 + bs < len) /* this thread's stripes of the next block */
                for (int64_t i = 0; i < bs; i++)
                    prefetch(latent + (table[s0 / bs + 1] * bs + i) * C + 16 * first, 16 * (last - first));
            for (int64_t c = 16 * first; c < 16 * last; c += 16)
                for (int64_t h = 0; h < H; h += 4) {
                    const float *p = sc + h * S + s0;
                    float *o = o_latent + h * C + c;
                    switch (H - h < 4 ? H - h : 4) {
                    case 1: weigh_rows(p, S, block + c, C, n, o, C, 1); break;
                    case 2: weigh_rows(p, S, block + c, C, n, o, C, 2); break;
                    case 3: weigh_rows(p, S, block + c, C, n, o, C, 3); break;
                    default: weigh_rows(p, S, block + c, C, n, o, C, 4);
                    }
                }
        }
    }
    SYNC();
    { /* out[h, v] = o_latent[h] . w_v[h, v] */
        SHARE(H * V);
        for (int64_t i = first; i < last; i++) {
            const int64_t h = i / V, v = i % V;
            out[h * V + v] = dot(wkv_b + (h * (D + V) + D + v) * C, o_latent + h * C, C);
        }
    }
    SYNC();
#undef SHARE
#undef SYNC
}

/* this row's new latent (normalised) and rope key (rotated) into the pool at its slot */
static void write_new(const float *kv, const float *norm, float eps, const float *rot, int64_t slot, float *latent,
                      float *pe, int64_t C, int64_t P) {
    rms_norm(kv, norm, latent + slot * C, 1, C, C, eps);
    rope(kv + C, rot, pe + slot * P, 1, 1, P / 2, 0, 0);
}

/* The operands of mla_decode and mha_decode (each described above its function): cache0 and cache1 are the pool's
 * first two quantities, the latent and rope key (absorbed) or the per-head keys and values (naive); kv NULL when the
 * new entries are stored already. */
typedef struct {
    const float *q_nope, *q_pe, *kv, *norm, *rot;
    const int64_t *slots;
    const float *wkv_b;
    float *cache0, *cache1;
    const int64_t *block_table, *lengths;
    float *out;
    int64_t R, H, D, P, V, C, nb, bs, q_rs, q_hs, p_rs, p_hs;
    float scale, eps;
} Decode;

/* the operands' fields under the names the kernels' bodies use */
#define DECODE_FIELDS(a)                                                                                               \
    const float *q_nope = (a)->q_nope, *q_pe = (a)->q_pe, *kv = (a)->kv, *norm = (a)->norm, *rot = (a)->rot;           \
    const int64_t *slots = (a)->slots, *block_table = (a)->block_table, *lengths = (a)->lengths;                       \
    const float *wkv_b = (a)->wkv_b;                                                                                   \
    float *out = (a)->out;                                                                                             \
    const int64_t R = (a)->R, H = (a)->H, D = (a)->D, P = (a)->P, V = (a)->V, C = (a)->C, nb = (a)->nb, bs = (a)->bs;  \
    const int64_t q_rs = (a)->q_rs, q_hs = (a)->q_hs, p_rs = (a)->p_rs, p_hs = (a)->p_hs;                              \
    const float scale = (a)->scale, eps = (a)->eps

int mla_decode(const Decode *a, int threads) {
    DECODE_FIELDS(a);
    float *latent = a->cache0, *pe = a->cache1;
    const int64_t S = nb * bs, per_row = H * (C + P + S + C);
    if (C % 16) return -1;
    for (int64_t r = 0; r < R; r++)
        if (lengths[r] < 1 || lengths[r] > S) return -1;
    const int whole_rows = R >= threads;  /* each thread its own rows, with scratch of its own */
    float *scratch = malloc(sizeof(float) * per_row * (whole_rows ? threads : 1));
    if (!scratch) return -2;
    if (kv)
        for (int64_t r = 0; r < R; r++)
            write_new(kv + r * (C + P), norm, eps, rot + r * P, slots[r], latent, pe, C, P);
#define ROW(r, tid, nt, buf)                                                                                           \
    decode_row(q_nope + (r) * q_rs, q_pe + (r) * p_rs, q_hs, p_hs, kv ? rot + (r) * P : NULL, wkv_b, latent, pe,       \
               block_table + (r) * nb, lengths[r], out + (r) * H * V, H, D, V, C, P, S, bs, scale, buf,                \
               buf + H * C, buf + H * (C + P), buf + H * (C + P + S), tid, nt)
    SHARE_ROWS(R, whole_rows, scratch, per_row);
#undef ROW
    free(scratch);
    return 0;
}

/* Multi-head attention of one new token per row over per-head keys and values, the paged cache read in place (MLA's
 * naive form):
 *
 *   q_nope [R, H, D], q_pe [R, H, P]           row r, head h at r * q_rs + h * q_hs (nope) and r * p_rs + h * p_hs
 *                                              (pe), contiguous within; keys are nope then pe
 *   kv [R, C + P] or NULL                      the new tokens' latent and rope key as wkv_a gives them: the latent
 *                                              normalised (norm, eps) and taken to each head's key and value by
 *                                              wkv_b [H, D + V, C], the rope key rotated (rot [R, P / 2] pairs), all
 *                                              into the pool at slots [R], and q_pe rotated; NULL: all done already
 *   keys [slots, H, D + P], values [slots, H, V] the pool, slot = block * bs + offset; V a multiple of 8
 *   block_table [R, nb] int64, lengths [R]     row r attends over its positions 0 .. lengths[r] - 1
 *   out [R, H, V]
 *
 * Per row and head: softmax(scale q . keys) . values, every step of it on one thread: the heads are shared out
 * between the threads, or, with at least as many rows as threads, whole rows. Positions are walked in order, a
 * thread's heads together, so that the cache streams in. 0, -1 for a length out of range or
 * V not a multiple of 8, -2 out of memory. */
static void mha_row(const float *qn, const float *qpe, int64_t q_hs, int64_t p_hs, const float *rot,
                    const float *keys, const float *values, const int64_t *table, int64_t len, float *out, int64_t H,
                    int64_t D, int64_t P, int64_t V, int64_t S, int64_t bs, float scale, float *sc, float *qp, int tid,
                    int nt) {
    const int64_t K = D + P, first = H * tid / nt, last = H * (tid + 1) / nt;
    for (int64_t h = first; h < last; h++) { /* the rope query, rotated here if rot */
        if (rot)
            rope(qpe + h * p_hs, rot, qp + h * P, 1, 1, P / 2, 0, 0);
        else
            for (int64_t i = 0; i < P; i++) qp[h * P + i] = qpe[h * p_hs + i];
        for (int64_t i = 0; i < V; i++) out[h * V + i] = 0.f;
    }
    /* position by position, this thread's heads together: their keys (and below their values) lie side by side, so
     * the cache streams in order */
    for (int64_t s = 0; s < len; s++) {
        const float *key = row_at(keys, table, bs, H * K, s);
        if (s + PREFETCH_ROWS < len)
            prefetch(row_at(keys, table, bs, H * K, s + PREFETCH_ROWS) + first * K, (last - first) * K);
        for (int64_t h = first; h < last; h++)
            sc[h * S + s] = scale * (dot(key + h * K, qn + h * q_hs, D) + dot(key + h * K + D, qp + h * P, P));
    }
    for (int64_t h = first; h < last; h++) softmax(sc + h * S, len, 1.f);
    for (int64_t s = 0; s < len; s++) {
        const float *value = row_at(values, table, bs, H * V, s);
        if (s + PREFETCH_ROWS < len)
            prefetch(row_at(values, table, bs, H * V, s + PREFETCH_ROWS) + first * V, (last - first) * V);
        for (int64_t h = first; h < last; h++) {
            __m256 pr = _mm256_set1_ps(sc[h * S + s]);
            for (int64_t c = 0; c < V; c += 8) {
                float *o = out + h * V + c;
                _mm256_storeu_ps(o, _mm256_fmadd_ps(pr, _mm256_loadu_ps(value + h * V + c), _mm256_loadu_ps(o)));
            }
        }
    }
}

int mha_decode(const Decode *a, int threads) {
    DECODE_FIELDS(a);
    float *keys = a->cache0, *values = a->cache1;
    const int64_t S = nb * bs, K = D + P, per_row = H * (S + P);
    if (V % 8) return -1;
    for (int64_t r = 0; r < R; r++)
        if (lengths[r] < 1 || lengths[r] > S) return -1;
    const int whole_rows = R >= threads;
    float *scratch = malloc(sizeof(float) * (per_row * (whole_rows ? threads : 1) + C + H * (D + V)));
    if (!scratch) return -2;
    float *latent = scratch + per_row * (whole_rows ? threads : 1), *up = latent + C;
    for (int64_t r = 0; kv && r < R; r++) { /* the new entries: normalised latent up to each head, rotated rope key */
        rms_norm(kv + r * (C + P), norm, latent, 1, C, C, eps);
#pragma omp parallel num_threads(threads)
        matmul_rows(latent, wkv_b, up, 1, H * (D + V), C);
        float *key = keys + slots[r] * H * K, *value = values + slots[r] * H * V;
        for (int64_t h = 0; h < H; h++) {
            for (int64_t i = 0; i < D; i++) key[h * K + i] = up[h * (D + V) + i];
            for (int64_t i = 0; i < V; i++) value[h * V + i] = up[h * (D + V) + D + i];
        }
        rope(kv + r * (C + P) + C, rot + r * P, key + D, 1, 1, P / 2, 0, 0);
        for (int64_t h = 1; h < H; h++)
            for (int64_t i = 0; i < P; i++) key[h * K + D + i] = key[D + i];
    }
#define ROW(r, tid, nt, buf)                                                                                           \
    mha_row(q_nope + (r) * q_rs, q_pe + (r) * p_rs, q_hs, p_hs, kv ? rot + (r) * P : NULL, keys, values,               \
            block_table + (r) * nb, lengths[r], out + (r) * H * V, H, D, P, V, S, bs, scale, buf, buf + H * S, tid, nt)
    SHARE_ROWS(R, whole_rows, scratch, per_row);
#undef ROW
    free(scratch);
    return 0;
}

/* Attention of one row's T new tokens over its S = first + T positions, causal among the new ones (new token t sees
 * positions 0 .. first + t), in tiles over the keys and values where they lie:
 *
 *   q1 [T, H, D1], q2 [T, H, D2]     token t, head h at t * ts + h * hs (each its own strides); q2 may be absent
 *   k1 [S, G, D1], k2 [S, G, D2]     position s, kv head g at s * ss + g * hs; k2 with q2
 *   v [S, G, Dv]                      likewise; out [T, H, Dv] at t * o_ts + h * o_hs
 *
 * Query head h reads kv head h / (H / G): naive MLA has G = H (per-head keys k1 and values v), absorbed MLA G = 1
 * (keys the latent k1 and the rope key k2, values the latent again). D1, D2 and Dv are multiples of VLEN.
 * The work is shared out in blocks of up to EXTEND_ROWS query rows of one kv head (token-major: (t, h) for the heads
 * that read it). A block takes its scores over the keys its last token sees, EXTEND_KEYS keys at a time, transposed
 * first so that a tile of 6 query rows x 4 vectors of keys is a broadcast query dimension times a vector of keys, with
 * no sums across lanes; each row's softmax of scale x scores over the positions it sees; then each row's weighted sum
 * of the values, in tiles of 6 rows x 4 vectors of values. 0, -1 for dimensions this does not cover, -2 out of
 * memory. */
typedef struct {
    const float *q1, *q2, *k1, *k2, *v;
    float *out;
    int64_t q1_ts, q1_hs, q2_ts, q2_hs, k1_ss, k1_hs, k2_ss, k2_hs, v_ss, v_hs, o_ts, o_hs;
    int64_t T, H, G, D1, D2, Dv, first;
    float scale;
} Extend;

#define EXTEND_ROWS 96
#define EXTEND_KEYS 128

/* n <= VLEN keys (rows ss apart) of D dimensions (a multiple of VLEN) transposed into dst[d * ld + key], keys n and on
 * zero: VLEN x VLEN blocks turned in registers, pairs of floats, then of pairs, then of 128-bit lanes */
static void transpose_keys(const float *src, int64_t ss, int64_t n, int64_t D, float *dst, int64_t ld) {
    for (int64_t d0 = 0; d0 < D; d0 += VLEN) {
        vec r[VLEN], a[VLEN], b[VLEN];
        for (int k = 0; k < VLEN; k++) r[k] = k < n ? vload(src + k * ss + d0) : vzero();
#ifdef __AVX512F__
        for (int k = 0; k < 16; k += 2) a[k] = _mm512_unpacklo_ps(r[k], r[k + 1]), a[k + 1] = _mm512_unpackhi_ps(r[k], r[k + 1]);
        for (int k = 0; k < 16; k += 4) { /* b[k + m], lane L: dimension 4 L + m of keys k .. k + 3 */
            const __m512d a0 = _mm512_castps_pd(a[k]), a1 = _mm512_castps_pd(a[k + 1]);
            const __m512d a2 = _mm512_castps_pd(a[k + 2]), a3 = _mm512_castps_pd(a[k + 3]);
            b[k] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, a2)), b[k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, a2));
            b[k + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, a3)), b[k + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, a3));
        }
        for (int m = 0; m < 4; m++) { /* dimension 4 L + m: lane L of b[m], b[4 + m], b[8 + m], b[12 + m] */
            const vec c0 = _mm512_shuffle_f32x4(b[m], b[4 + m], 0x44), c1 = _mm512_shuffle_f32x4(b[m], b[4 + m], 0xEE);
            const vec c2 = _mm512_shuffle_f32x4(b[8 + m], b[12 + m], 0x44), c3 = _mm512_shuffle_f32x4(b[8 + m], b[12 + m], 0xEE);
            vstore(dst + (d0 + m) * ld, _mm512_shuffle_f32x4(c0, c2, 0x88));
            vstore(dst + (d0 + 4 + m) * ld, _mm512_shuffle_f32x4(c0, c2, 0xDD));
            vstore(dst + (d0 + 8 + m) * ld, _mm512_shuffle_f32x4(c1, c3, 0x88));
            vstore(dst + (d0 + 12 + m) * ld, _mm512_shuffle_f32x4(c1, c3, 0xDD));
        }
#else
        for (int k = 0; k < 8; k += 2) a[k] = _mm256_unpacklo_ps(r[k], r[k + 1]), a[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
        for (int k = 0; k < 8; k += 4) {
            const __m256d a0 = _mm256_castps_pd(a[k]), a1 = _mm256_castps_pd(a[k + 1]);
            const __m256d a2 = _mm256_castps_pd(a[k + 2]), a3 = _mm256_castps_pd(a[k + 3]);
            b[k] = _mm256_castpd_ps(_mm256_unpacklo_pd(a0, a2)), b[k + 1] = _mm256_castpd_ps(_mm256_unpackhi_pd(a0, a2));
            b[k + 2] = _mm256_castpd_ps(_mm256_unpacklo_pd(a1, a3)), b[k + 3] = _mm256_castpd_ps(_mm256_unpackhi_pd(a1, a3));
        }
        for (int m = 0; m < 4; m++) {
            vstore(dst + (d0 + m) * ld, _mm256_permute2f128_ps(b[m], b[4 + m], 0x20));
            vstore(dst + (d0 + 4 + m) * ld, _mm256_permute2f128_ps(b[m], b[4 + m], 0x31));
        }
#endif
    }
}

/* MB query rows (their vectors at q1[i], q2[i]) against NV vectors of keys transposed (kt [D1 + D2][EXTEND_KEYS]
 * from the first of them) into sc (rows ld apart): a broadcast of each query's dimension times a vector of keys */
static inline __attribute__((always_inline)) void scores_tile(const float *const *q1, const float *const *q2,
                                                            const float *kt, int64_t D1, int64_t D2, float *sc,
                                                            int64_t ld, const int MB, const int NV) {
    vec acc[TILE_M][TILE_N];
    for (int i = 0; i < MB; i++)
        for (int j = 0; j < NV; j++) acc[i][j] = vzero();
    for (int64_t d = 0; d < D1 + D2; d++) {
        vec kv[TILE_N];
        for (int j = 0; j < NV; j++) kv[j] = vload(kt + d * EXTEND_KEYS + j * VLEN);
        for (int i = 0; i < MB; i++) {
            const vec qv = vset1(d < D1 ? q1[i][d] : q2[i][d - D1]);
            for (int j = 0; j < NV; j++) acc[i][j] = vfma(qv, kv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < MB; i++)
        for (int j = 0; j < NV; j++) vstore(sc + i * ld + j * VLEN, acc[i][j]);
}

/* out rows o[i] (NC vectors from column c) += sum over s in [s0, s1) of p[i * ld + s] v[s] (rows v_ss apart), MB
 * rows */
static inline __attribute__((always_inline)) void values_tile(const float *p, int64_t ld, const float *v,
                                                            int64_t v_ss, int64_t s0, int64_t s1, float *const *o,
                                                            int64_t c, const int MB, const int NC) {
    vec acc[TILE_M][TILE_N];
    for (int i = 0; i < MB; i++)
        for (int j = 0; j < NC; j++) acc[i][j] = vload(o[i] + c + j * VLEN);
    for (int64_t s = s0; s < s1; s++) {
        vec vv[TILE_N];
        for (int j = 0; j < NC; j++) vv[j] = vload(v + s * v_ss + c + j * VLEN);
        for (int i = 0; i < MB; i++) {
            const vec pv = vset1(p[i * ld + s]);
            for (int j = 0; j < NC; j++) acc[i][j] = vfma(pv, vv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < MB; i++)
        for (int j = 0; j < NC; j++) vstore(o[i] + c + j * VLEN, acc[i][j]);
}

static void any_scores_tile(const float *const *q1, const float *const *q2, const float *kt, int64_t D1, int64_t D2,
                            float *sc, int64_t ld, int mb, int nb) {
#define CALL(MB, NB) scores_tile(q1, q2, kt, D1, D2, sc, ld, MB, NB)
    SIZES(CALL, nb)
#undef CALL
}

static void any_values_tile(const float *p, int64_t ld, const float *v, int64_t v_ss, int64_t s0, int64_t s1,
                            float *const *o, int64_t c, int mb, int nb) {
#define CALL(MB, NB) values_tile(p, ld, v, v_ss, s0, s1, o, c, MB, NB)
    SIZES(CALL, nb)
#undef CALL
}

/* floats between rows of extend_attention's scores: the positions, up to a whole vector */
static inline int64_t scores_stride(const Extend *a) { return (a->first + a->T + VLEN - 1) / VLEN * VLEN; }

/* query rows [j0, j1) of kv head g (row j: token j / per_group, head g * per_group + j % per_group); scratch: sc for
 * EXTEND_ROWS rows of scores, kt for a chunk of keys transposed, [D1 + D2][EXTEND_KEYS] */
static void extend_block(const Extend *a, int64_t g, int64_t j0, int64_t j1, float *sc, float *kt) {
    const int64_t per_group = a->H / a->G, ld = scores_stride(a);
    const float *q1[EXTEND_ROWS], *q2[EXTEND_ROWS];
    float *o[EXTEND_ROWS];
    int64_t seen[EXTEND_ROWS]; /* positions each row sees */
    for (int64_t j = j0; j < j1; j++) {
        const int64_t t = j / per_group, h = g * per_group + j % per_group, i = j - j0;
        q1[i] = a->q1 + t * a->q1_ts + h * a->q1_hs;
        q2[i] = a->q2 ? a->q2 + t * a->q2_ts + h * a->q2_hs : NULL;
        o[i] = a->out + t * a->o_ts + h * a->o_hs;
        seen[i] = a->first + t + 1;
    }
    const int64_t rows = j1 - j0, D2 = a->q2 ? a->D2 : 0;
    const float *k1 = a->k1 + g * a->k1_hs, *k2 = a->k2 ? a->k2 + g * a->k2_hs : NULL, *v = a->v + g * a->v_hs;
    const int64_t len = seen[rows - 1]; /* positions the block's last row sees */
    for (int64_t s0 = 0; s0 < len; s0 += EXTEND_KEYS) { /* scores, a chunk of keys at a time, transposed into kt */
        const int64_t chunk = len - s0 < EXTEND_KEYS ? len - s0 : EXTEND_KEYS;
        for (int64_t s = 0; s < chunk; s += VLEN) {
            const int64_t n = chunk - s < VLEN ? chunk - s : VLEN;
            transpose_keys(k1 + (s0 + s) * a->k1_ss, a->k1_ss, n, a->D1, kt + s, EXTEND_KEYS);
            if (k2) transpose_keys(k2 + (s0 + s) * a->k2_ss, a->k2_ss, n, D2, kt + a->D1 * EXTEND_KEYS + s, EXTEND_KEYS);
        }
        for (int64_t i0 = 0; i0 < rows; i0 += TILE_M) {
            const int mb = rows - i0 < TILE_M ? (int)(rows - i0) : TILE_M;
            const int64_t s1 = s0 + chunk < seen[i0 + mb - 1] ? s0 + chunk : seen[i0 + mb - 1];
            for (int64_t s = s0; s < s1; s += TILE_N * VLEN) {
                const int64_t vectors = (s1 - s + VLEN - 1) / VLEN;
                const int nv = vectors < TILE_N ? (int)vectors : TILE_N;
                any_scores_tile(q1 + i0, q2 + i0, kt + (s - s0), a->D1, D2, sc + i0 * ld + s, ld, mb, nv);
            }
        }
    }
    for (int64_t i = 0; i < rows; i++) { /* softmax over what each row sees, zeros past it to its tile's last row's */
        const int64_t tile_len = seen[(i / TILE_M) * TILE_M + TILE_M - 1 < rows ? (i / TILE_M) * TILE_M + TILE_M - 1
                                                                                 : rows - 1];
        softmax(sc + i * ld, seen[i], a->scale);
        for (int64_t s = seen[i]; s < tile_len; s++) sc[i * ld + s] = 0.f;
        for (int64_t c = 0; c < a->Dv; c++) o[i][c] = 0.f;
    }
    for (int64_t s0 = 0; s0 < len; s0 += EXTEND_KEYS) /* values, a chunk at a time likewise */
        for (int64_t i0 = 0; i0 < rows; i0 += TILE_M) {
            const int mb = rows - i0 < TILE_M ? (int)(rows - i0) : TILE_M;
            const int64_t s1 = s0 + EXTEND_KEYS < seen[i0 + mb - 1] ? s0 + EXTEND_KEYS : seen[i0 + mb - 1];
            for (int64_t c = 0; s0 < s1 && c < a->Dv; c += TILE_N * VLEN) {
                const int nc = (a->Dv - c) / VLEN < TILE_N ? (int)((a->Dv - c) / VLEN) : TILE_N;
                any_values_tile(sc + i0 * ld, ld, v, a->v_ss, s0, s1, o + i0, c, mb, nc);
            }
        }
}

/* Query rows per block of a kv head's `rows`, in whole tiles: as many as fit in EXTEND_ROWS (a block transposes its
 * keys), unless the blocks of all G heads then fall to the threads unevenly (one's share over 5% above the mean). */
static int64_t block_rows(int64_t rows, int64_t G, int threads) {
    int64_t per_head = (rows + EXTEND_ROWS - 1) / EXTEND_ROWS;
    for (; per_head * TILE_M < rows; per_head++) {
        const int64_t blocks = G * per_head, rounds = (blocks + threads - 1) / threads;
        if (rounds * threads * 20 <= blocks * 21) break;
    }
    const int64_t block = (rows + per_head - 1) / per_head;
    return (block + TILE_M - 1) / TILE_M * TILE_M;
}

int extend_attention(const Extend *a, int threads) {
    if (a->D1 % VLEN || (a->q2 && a->D2 % VLEN) || a->Dv % VLEN || a->H % a->G) return -1;
    const int64_t rows = a->T * (a->H / a->G), block = block_rows(rows, a->G, threads);
    const int64_t per_head = (rows + block - 1) / block;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        const int64_t dims = a->D1 + (a->q2 ? a->D2 : 0);
        float *sc = malloc(sizeof(float) * (block * scores_stride(a) + dims * EXTEND_KEYS));
        if (!sc) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < a->G * per_head; b++) {
            if (!sc) continue;
            const int64_t g = b / per_head, j0 = (b % per_head) * block;
            extend_block(a, g, j0, j0 + block < rows ? j0 + block : rows, sc, sc + block * scores_stride(a));
        }
        free(sc);
    }
    return failed ? -2 : 0;
}

/* DeepSeek-V3.2's lightning indexer for decode rows: each row's index scores over the indexer keys it may see, read
 * in place from the pool, and the positions of its K best, ties to the earlier position (as the torch backend's
 * stable sort chooses them):
 *
 *   q [R, H, D]              the rows' indexer queries (rope part rotated), contiguous
 *   weights [R, H]           per-head weights, the scales folded in
 *   keys [slots, D]          the pool's indexer keys, slot = block * bs + offset
 *   block_table [R, nb]      int64; row r sees its positions 0 .. lengths[r] - 1
 *   scores [R, nb * bs]      scratch: score[s] = sum_h weights[h] * relu(q[h] . key[s])
 *   positions [R, K]         out: the chosen positions, ascending (all a row sees while that is at most K), then 0
 *   counts [R]               out: how many, min(lengths[r], K)
 *
 * The threads split each row's positions for the scores; the K-th largest score is found by selection (a copy of the
 * scores partitioned in place), then one pass takes every position above it and those equal to it, earliest first,
 * until K. */
typedef struct {
    const float *q, *weights, *keys;
    const int64_t *block_table, *lengths;
    float *scores, *spare;
    int64_t *positions, *counts;
    int64_t R, H, D, nb, bs, K;
} IndexTopk;

/* the k-th largest (k from 0) of v[0 .. n), v reordered */
static float kth_largest(float *v, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        const float pivot = v[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (v[i] > pivot) i++;
            while (v[j] < pivot) j--;
            if (i <= j) {
                const float t = v[i];
                v[i++] = v[j];
                v[j--] = t;
            }
        }
        if (k <= j) hi = j;
        else if (k >= i) lo = i;
        else return v[k];
    }
    return v[lo];
}

int index_topk(const IndexTopk *a, int threads) {
    const int64_t S = a->nb * a->bs, H = a->H, D = a->D, K = a->K;
    if (D % 8) return -1;
    for (int64_t r = 0; r < a->R; r++) {
        const int64_t len = a->lengths[r];
        int64_t *chosen = a->positions + r * K;
        if (len < 1 || len > S) return -1;
        a->counts[r] = len < K ? len : K;
        if (len <= K) {
            for (int64_t s = 0; s < K; s++) chosen[s] = s < len ? s : 0;
            continue;
        }
        const float *q = a->q + r * H * D, *w = a->weights + r * H;
        const int64_t *table = a->block_table + r * a->nb;
        float *score = a->scores + r * S;
        const int64_t bs = a->bs, blocks = (len + bs - 1) / bs;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t b = 0; b < blocks; b++) { /* a block's keys are contiguous: products in tiles, heads x keys */
            const int64_t s0 = b * bs, n = len - s0 < bs ? len - s0 : bs;
            const float *block = a->keys + table[b] * bs * D;
            float products[H * bs];
            for (int64_t j = 0; j < n; j += TILE_N)
                for (int64_t h = 0; h < H; h += TILE_M)
                    any_tile(q + h * D, block + j * D, products + h * bs + j, bs, D,
                             H - h < TILE_M ? (int)(H - h) : TILE_M, n - j < TILE_N ? (int)(n - j) : TILE_N, NULL, 0,
                             1);
            for (int64_t j = 0; j < n; j++) {
                float sum = 0.f;
                for (int64_t h = 0; h < H; h++) {
                    const float product = products[h * bs + j];
                    sum += product > 0.f ? w[h] * product : 0.f;
                }
                score[s0 + j] = sum;
            }
        }
        for (int64_t s = 0; s < len; s++) a->spare[s] = score[s];
        const float cut = kth_largest(a->spare, len, K - 1);
        int64_t above = 0;
        for (int64_t s = 0; s < len; s++) above += score[s] > cut;
        int64_t ties = K - above, n = 0;
        for (int64_t s = 0; s < len && n < K; s++)
            if (score[s] > cut || (score[s] == cut && ties-- > 0)) chosen[n++] = s;
    }
    return 0;
}
