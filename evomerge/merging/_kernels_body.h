/* One element type's kernels; included by _kernels.c with BITS, MAG_MASK, LOAD, STORE, SFX set.
 * (No include guard: it is meant to be included once per type.) */

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define ROUND(f) LOAD(STORE(f)) /* round a float to the storage precision, as torch does per op */

/* How many of x[s, e) have magnitude bits equal to `bits`; 32-bit lanes keep it at memory speed. */
static inline int64_t CAT(count_equal, SFX)(const BITS *x, int64_t s, int64_t e, int32_t bits) {
    uint32_t count = 0;
    for (int64_t j = s; j < e; j++) count += (int32_t)(x[j] & MAG_MASK) == bits;
    return count;
}

/* The flat index just past the `wanted`-th entry whose magnitude bits equal `bits`. When the
 * caller knows how many such entries there are (`total` >= 0) and the wanted one lies in the
 * second half, the scan runs from the end: a quarter of the tensor is read on average, not half. */
static HOT int64_t CAT(tie_cut, SFX)(const BITS *x, int64_t n, int32_t bits, int64_t wanted,
                                      int64_t total) {
    const int64_t step = 4096;
    if (wanted <= 0) return 0;
    if (total >= wanted && wanted > total / 2) {
        int64_t from_end = total - wanted + 1, seen = 0; /* the same entry, counted from the end */
        for (int64_t e = n; e > 0; e -= step) {
            int64_t s = e > step ? e - step : 0, count = CAT(count_equal, SFX)(x, s, e, bits);
            if (seen + count >= from_end) {
                for (int64_t j = e - 1; j >= s; j--)
                    if ((int32_t)(x[j] & MAG_MASK) == bits && ++seen == from_end) return j + 1;
            }
            seen += count;
        }
        return n;
    }
    int64_t seen = 0;
    for (int64_t s = 0; s < n; s += step) {
        int64_t e = min64(n, s + step), count = CAT(count_equal, SFX)(x, s, e, bits);
        if (seen + count >= wanted) {
            for (int64_t j = s; j < e; j++)
                if ((int32_t)(x[j] & MAG_MASK) == bits && ++seen == wanted) return j + 1;
        }
        seen += count;
    }
    return n;
}

/* One source's share of a TIES block: x = round(w * (t < |row| bits <= most ? row : 0)),
 * sum += x. */
static inline void CAT(trim_weigh, SFX)(const BITS *row, int64_t from, int64_t to, int32_t t,
                                        int32_t most, float w, float *x, float *sum) {
    for (int64_t j = from; j < to; j++) {
        int32_t mag = (int32_t)(row[j] & MAG_MASK);
        BITS keep = (BITS)0 - (BITS)((mag > t) & (mag <= most));
        x[j] = ROUND(LOAD(row[j] & keep) * w); /* trimmed entries are +0 */
        sum[j] += x[j];
    }
}

/* TIES on columns [start, start + len) of n_src stacked task vectors (row i at deltas + i*stride).
 * Source i keeps entries whose magnitude bits exceed threshold[i], plus those equal to it at
 * flat index < cut[i]; kept entries are weighted, the sign of their sum is elected, entries of
 * that sign are summed (divided by the sum of their weights if normalize, times lam if use_lam)
 * and added to base (when given) into out. The same steps, in the same order, as methods.ties. */
static HOT void CAT(ties, SFX)(int64_t n_src, const BITS *deltas, int64_t stride, const BITS *base,
                                BITS *out, int64_t start, int64_t len, const int32_t *threshold,
                                const int64_t *cut, const float *weight, int32_t normalize,
                                float lam, int32_t use_lam) {
    /* Branch-free on purpose (masks and multiplies by 0/1, as torch's ops are), so that
     * every loop vectorizes, AVX2 included. */
    float x[MAX_SOURCES][BLOCK], sum[BLOCK], sign[BLOCK], mixed[BLOCK], divisor[BLOCK];
    for (int64_t b0 = start; b0 < start + len; b0 += BLOCK) {
        int64_t width = min64(BLOCK, start + len - b0);
        for (int64_t j = 0; j < width; j++) sum[j] = mixed[j] = divisor[j] = 0.0f;
        for (int64_t i = 0; i < n_src; i++) {
            const BITS *row = deltas + i * stride + b0;
            /* entries at the threshold are kept below index `tied` (mag > t - 1), not after */
            int64_t tied = clamp64(cut[i] - b0, 0, width);
            /* a trim never keeps a NaN (torch's `magnitude > threshold` is false for it);
             * threshold < 0, no trim, keeps everything */
            int32_t most = threshold[i] < 0 ? (int32_t)MAG_MASK : (int32_t)MAG_INF;
            CAT(trim_weigh, SFX)(row, 0, tied, threshold[i] - 1, most, weight[i], x[i], sum);
            CAT(trim_weigh, SFX)(row, tied, width, threshold[i], most, weight[i], x[i], sum);
        }
        /* the elected sign is that of the (rounded) sum, zero counting as positive */
        for (int64_t j = 0; j < width; j++) sign[j] = 1.0f - 2.0f * (float)(ROUND(sum[j]) < 0.0f);
        for (int64_t i = 0; i < n_src; i++) {
            const float *xi = x[i], w = weight[i];
            for (int64_t j = 0; j < width; j++) {
                float agree = (float)(xi[j] * sign[j] > 0.0f); /* zeros never agree */
                mixed[j] += xi[j] * agree;
                divisor[j] += w * agree;
            }
        }
        for (int64_t j = 0; j < width; j++) mixed[j] = ROUND(mixed[j]);
        if (normalize)
            for (int64_t j = 0; j < width; j++) {
                float d = ROUND(divisor[j]);
                mixed[j] = ROUND(mixed[j] / (d + (float)(d == 0.0f))); /* no agreeing weight: 1 */
            }
        if (use_lam)
            for (int64_t j = 0; j < width; j++) mixed[j] = ROUND(mixed[j] * lam);
        if (base)
            for (int64_t j = 0; j < width; j++) out[b0 + j] = STORE(LOAD(base[b0 + j]) + mixed[j]);
        else
            for (int64_t j = 0; j < width; j++) out[b0 + j] = STORE(mixed[j]);
    }
}

/* Weighted sum of n_src rows accumulated in float32 with fused multiply-adds (torch's addcmul),
 * divided by total if normalize, rounded once into out. */
static HOT void CAT(linear, SFX)(int64_t n_src, const BITS *x, int64_t stride, BITS *out,
                                  int64_t start, int64_t len, const float *weight,
                                  int32_t normalize, float total) {
    float acc[BLOCK];
    for (int64_t b0 = start; b0 < start + len; b0 += BLOCK) {
        int64_t width = min64(BLOCK, start + len - b0);
        for (int64_t j = 0; j < width; j++) acc[j] = 0.0f;
        for (int64_t i = 0; i < n_src; i++) {
            const BITS *row = x + i * stride + b0;
            const float w = weight[i];
            for (int64_t j = 0; j < width; j++) acc[j] = fmaf(LOAD(row[j]), w, acc[j]);
        }
        if (normalize)
            for (int64_t j = 0; j < width; j++) acc[j] /= total;
        for (int64_t j = 0; j < width; j++) out[b0 + j] = STORE(acc[j]);
    }
}

#undef ROUND
#undef BITS
#undef MAG_MASK
#undef MAG_INF
#undef LOAD
#undef STORE
#undef SFX
