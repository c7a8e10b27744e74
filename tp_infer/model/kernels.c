/* The CPU kernels of decode, called by kernels.py through ctypes; it builds this file with -O3 -mavx2 -mfma -fopenmp,
 * and OpenMP is then the libgomp torch has loaded (the same soname), so the threads are torch's.
 *
 * small_matmul: y = x w^T for a few rows of x. Each row of w is read once, from memory, for all rows of x, and the
 * rows of w are split over the threads; MKL runs these products on one core at a third of the memory bandwidth.
 *
 *   x [m, k] fp32, contiguous, m >= 1             w [n, k] fp32, contiguous      y [m, n] fp32, contiguous
 *
 * mla_decode: MLA's attention of one new token per row, in the absorbed form, over the paged cache (below). */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

static inline float sum8(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
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

/* 0, or -1 (nothing written) when m < 1; kernels.py decides up to how many rows this beats MKL */
int small_matmul(const float *x, const float *w, float *y, int64_t m, int64_t n, int64_t k, int threads) {
    if (m < 1) return -1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; r++)  /* blocks of 8 rows of x while this row of w stays in L1 */
        for (int64_t j = 0; j < m; j += 8) row_block(w + r * k, x + j * k, y + j * n + r, n, k, m - j < 8 ? m - j : 8);
    return 0;
}

/* MLA's decode in the absorbed form, one new token per row, over the paged cache in place:
 *
 *   q_nope [R, H, D], q_pe [R, H, P]          the new tokens' queries (q_pe rotated)
 *   wkv_b [H, D + V, C]                        per head: D rows that take q_nope to latent space, V rows from it
 *   latent [slots, C], pe [slots, P]           the pool, slot = block * bs + offset
 *   block_table [R, nb] int64, lengths [R]     row r attends over its positions 0 .. lengths[r] - 1
 *   out [R, H, V]                              the attention output, per head
 *
 * Per row: q_latent = scale q_nope w_k; scores = q_latent . latent + scale q_pe . pe; softmax; out = (probabilities
 * . latent) w_v^T. Each cached latent row is read once for the scores (every head against it while it is in L1) and
 * once more, from the cache, for the output, where the threads split the latent dimension between them. */
static inline const float *row_at(const float *pool, const int64_t *table, int64_t bs, int64_t width, int64_t s) {
    return pool + (table[s / bs] * bs + s % bs) * width;
}

int mla_decode(const float *q_nope, const float *q_pe, const float *wkv_b, const float *latent, const float *pe,
               const int64_t *block_table, const int64_t *lengths, float *out, int64_t R, int64_t H, int64_t D,
               int64_t V, int64_t C, int64_t P, int64_t nb, int64_t bs, float scale, int threads) {
    const int64_t S = nb * bs;
    if (C % 16) return -1;
    for (int64_t r = 0; r < R; r++)
        if (lengths[r] < 1 || lengths[r] > S) return -1;
    float *q_latent = malloc(sizeof(float) * H * (C + P + S + C));
    if (!q_latent) return -2;
    float *qp = q_latent + H * C, *sc = qp + H * P, *o_latent = sc + H * S;
    for (int64_t r = 0; r < R; r++) {
        const int64_t *table = block_table + r * nb;
        const int64_t len = lengths[r];
        const float *qn = q_nope + r * H * D;
        for (int64_t i = 0; i < H * P; i++) qp[i] = scale * q_pe[r * H * P + i];
#pragma omp parallel num_threads(threads)
        {
            /* q_latent[h, c .. c + 16) = scale sum_d q_nope[h, d] w_k[h, d, c .. c + 16) */
#pragma omp for collapse(2) schedule(static)
            for (int64_t h = 0; h < H; h++) {
                for (int64_t c = 0; c < C; c += 16) {
                    __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
                    for (int64_t d = 0; d < D; d++) {
                        const float *w = wkv_b + (h * (D + V) + d) * C + c;
                        __m256 q = _mm256_set1_ps(qn[h * D + d]);
                        lo = _mm256_fmadd_ps(q, _mm256_loadu_ps(w), lo);
                        hi = _mm256_fmadd_ps(q, _mm256_loadu_ps(w + 8), hi);
                    }
                    __m256 sv = _mm256_set1_ps(scale);
                    _mm256_storeu_ps(q_latent + h * C + c, _mm256_mul_ps(lo, sv));
                    _mm256_storeu_ps(q_latent + h * C + c + 8, _mm256_mul_ps(hi, sv));
                }
            }
            /* scores, heads 8 at a time against each cached row */
#pragma omp for schedule(static)
            for (int64_t s = 0; s < len; s++) {
                const float *lat = row_at(latent, table, bs, C, s), *p = row_at(pe, table, bs, P, s);
                for (int64_t h = 0; h < H; h += 8) {
                    int m = H - h < 8 ? (int)(H - h) : 8;
                    float a[8], b[8];
                    row_block(lat, q_latent + h * C, a, 1, C, m);
                    row_block(p, qp + h * P, b, 1, P, m);
                    for (int j = 0; j < m; j++) sc[(h + j) * S + s] = a[j] + b[j];
                }
            }
#pragma omp for schedule(static)
            for (int64_t h = 0; h < H; h++) { /* softmax over the row's positions */
                float *x = sc + h * S, mx = x[0], sum = 0.f;
                for (int64_t s = 1; s < len; s++) mx = x[s] > mx ? x[s] : mx;
                for (int64_t s = 0; s < len; s++) sum += (x[s] = expf(x[s] - mx));
                for (int64_t s = 0; s < len; s++) x[s] /= sum;
            }
            /* o_latent[h, c .. c + 16): 16-column stripes (a cache line of each latent row), heads 8 at a time */
#pragma omp for collapse(2) schedule(static)
            for (int64_t c = 0; c < C; c += 16) {
                for (int64_t h = 0; h < H; h += 8) {
                    int m = H - h < 8 ? (int)(H - h) : 8;
                    __m256 lo[8], hi[8];
                    for (int j = 0; j < m; j++) lo[j] = hi[j] = _mm256_setzero_ps();
                    for (int64_t s = 0; s < len; s++) {
                        const float *lat = row_at(latent, table, bs, C, s) + c;
                        __m256 l0 = _mm256_loadu_ps(lat), l1 = _mm256_loadu_ps(lat + 8);
                        for (int j = 0; j < m; j++) {
                            __m256 pr = _mm256_set1_ps(sc[(h + j) * S + s]);
                            lo[j] = _mm256_fmadd_ps(pr, l0, lo[j]);
                            hi[j] = _mm256_fmadd_ps(pr, l1, hi[j]);
                        }
                    }
                    for (int j = 0; j < m; j++) {
                        _mm256_storeu_ps(o_latent + (h + j) * C + c, lo[j]);
                        _mm256_storeu_ps(o_latent + (h + j) * C + c + 8, hi[j]);
                    }
                }
            }
            /* out[h, v] = o_latent[h] . w_v[h, v] */
#pragma omp for collapse(2) schedule(static)
            for (int64_t h = 0; h < H; h++)
                for (int64_t v = 0; v < V; v++)
                    out[(r * H + h) * V + v] = dot(wkv_b + (h * (D + V) + D + v) * C, o_latent + h * C, C);
        }
    }
    free(q_latent);
    return 0;
}
