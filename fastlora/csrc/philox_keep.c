/* fastlora's dropout keep-mask on the CPU, bit-packed: one Philox4x32-10 call per group of 8
 * columns gives that group's byte (bit b = column 8g + b kept).
 *
 * The contract is kernels/dropout.py's (and fastlora.dropout_mask's): counter
 * (c0, c1, c2, c3) = (g, row, 0, 0), key (seed mod 2^32, seed >> 32); column 8g + 2j + h takes the
 * 16-bit half h (0 = low) of word j; kept iff that value < keep_thresh. Salmon et al., SC'11.
 *
 * out: uint8 [M, G] row-major; rows row0 .. row0 + M - 1. Compiled and loaded by fastlora/cpu.py.
 */
#include <stdint.h>

static inline uint8_t keep_byte(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1, uint32_t thresh) {
    uint32_t c2 = 0, c3 = 0;
    for (int i = 0; i < 10; ++i) {
        uint64_t p0 = (uint64_t)0xD2511F53u * c0;
        uint64_t p1 = (uint64_t)0xCD9E8D57u * c2;
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
        uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        c1 = (uint32_t)p1;
        c3 = (uint32_t)p0;
        c0 = n0;
        c2 = n2;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    return (uint8_t)(((c0 & 0xFFFFu) < thresh) | (((c0 >> 16) < thresh) << 1) |
                     (((c1 & 0xFFFFu) < thresh) << 2) | (((c1 >> 16) < thresh) << 3) |
                     (((c2 & 0xFFFFu) < thresh) << 4) | (((c2 >> 16) < thresh) << 5) |
                     (((c3 & 0xFFFFu) < thresh) << 6) | (((c3 >> 16) < thresh) << 7));
}

void fastlora_keep_packed(uint8_t *out, int64_t M, int64_t G, int64_t row0, uint32_t k0, uint32_t k1,
                          uint32_t thresh, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t m = 0; m < M; ++m) {
        uint8_t *o = out + m * G;
        uint32_t row = (uint32_t)(row0 + m);
        for (int64_t g = 0; g < G; ++g)
            o[g] = keep_byte((uint32_t)g, row, k0, k1, thresh);
    }
}

/* Elementwise steps of the CPU path, fp32 rows of length K, from a bit-packed mask [M, G]
 * (G = ceil(K / 8); leading dimensions in elements). A multiply by 0 / 1, so NaN·0 = NaN as in
 * torch's dropout.
 *   packed_mul:     xk = keep ⊙ x           (the LoRA input, forward; for dA, backward)
 *   packed_addcmul: dx += alpha · keep ⊙ t  (dx's LoRA term t = dS·A, backward)
 *   packed_to_f32:  out = keep as 0 / 1     (the mask itself, for the other dtypes' torch ops) */
#define FOR_ROW_BITS(BODY)                                                                     \
    for (int64_t g = 0; g < K / 8; ++g) {                                                      \
        uint32_t byte = p[g];                                                                  \
        for (int b = 0; b < 8; ++b) {                                                          \
            int64_t k = 8 * g + b;                                                             \
            float keep = (float)((byte >> b) & 1u);                                            \
            BODY;                                                                              \
        }                                                                                      \
    }                                                                                          \
    for (int64_t k = (K / 8) * 8; k < K; ++k) {                                                \
        float keep = (float)((p[k >> 3] >> (k & 7)) & 1u);                                     \
        BODY;                                                                                  \
    }

void fastlora_packed_mul_f32(float *xk, const float *x, const uint8_t *packed, int64_t M, int64_t K, int64_t ldx,
                             int nthreads) {
    int64_t G = (K + 7) / 8;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t m = 0; m < M; ++m) {
        const uint8_t *p = packed + m * G;
        const float *xr = x + m * ldx;
        float *o = xk + m * K;
        FOR_ROW_BITS(o[k] = xr[k] * keep)
    }
}

void fastlora_packed_addcmul_f32(float *dx, const float *t, const uint8_t *packed, int64_t M, int64_t K, float alpha,
                                 int nthreads) {
    int64_t G = (K + 7) / 8;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t m = 0; m < M; ++m) {
        const uint8_t *p = packed + m * G;
        const float *tr = t + m * K;
        float *d = dx + m * K;
        FOR_ROW_BITS(d[k] += alpha * (tr[k] * keep))
    }
}

void fastlora_packed_to_f32(float *out, const uint8_t *packed, int64_t M, int64_t K, int nthreads) {
    int64_t G = (K + 7) / 8;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t m = 0; m < M; ++m) {
        const uint8_t *p = packed + m * G;
        float *o = out + m * K;
        FOR_ROW_BITS(o[k] = keep)
    }
}
