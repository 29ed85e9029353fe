/* The ASMK scoring loop of lib/index/asmk.py (score_postings), fused into one pass.
 *
 * Why C: numpy scores a posting in about ten passes over temporary arrays (gather the
 * run, gather the signatures, XOR, popcount, table, weights, scatter); this loop reads
 * each posting once. It performs the same float64 operations in the same order as the
 * numpy path (contribution = table[h] * weight [* query weight], summed per doc in
 * posting order, as np.bincount does), so both give bit-identical scores; build it with
 * -ffp-contract=off so that no multiply-add is fused.
 *
 * Loaded through ctypes by lib/index/native.py, which compiles it on first use.
 */
#include <stdint.h>
#include <string.h>

/* How far ahead of the posting being scored its signatures are prefetched, in bytes.
 * Measured (benchmarks/bench_asmk_scoring.py --loop-variants): with the postings cold
 * in memory the loop without the hint waits on misses, not on bandwidth. A likely cause:
 * each word's run is a separate stretch of the memory-mapped signatures, a new stream
 * for the hardware prefetcher, which also does not cross 4 KiB pages. The hint is
 * issued for every posting (several per cache line), which costs less than testing. */
#ifndef PREFETCH_BYTES  /* -DPREFETCH_BYTES=0 builds the loop without the hint */
#define PREFETCH_BYTES 2048
#endif

/* A prefetch hint for the signatures PREFETCH_BYTES past ``at``. The address is formed
 * as an integer, not by pointer arithmetic (which past the array's end would be
 * undefined); a prefetch never faults, even beyond the mapping. */
static inline void prefetch_ahead(const uint8_t *at)
{
#if PREFETCH_BYTES > 0
    __builtin_prefetch((const void *)((uintptr_t)at + PREFETCH_BYTES));
#else
    (void)at;
#endif
}

static inline unsigned popcount_row(const uint8_t *a, const uint8_t *b, int64_t n_bytes)
{
    unsigned h = 0;
    int64_t j = 0;
    for (; j + 8 <= n_bytes; j += 8) {
        uint64_t x, y;
        memcpy(&x, a + j, 8);
        memcpy(&y, b + j, 8);
        h += (unsigned)__builtin_popcountll(x ^ y);
    }
    for (; j + 4 <= n_bytes; j += 4) {
        uint32_t x, y;
        memcpy(&x, a + j, 4);
        memcpy(&y, b + j, 4);
        h += (unsigned)__builtin_popcount(x ^ y);
    }
    return h;
}

/* For each query word i, every posting p in [lo[i], hi[i]):
 *   h = popcount(sigs[p] ^ qsigs[i]);  acc[docs[p]] += table[h] * w(p) [* qwt[i]]
 * with w(p) = weights[docs[p]] when per_doc, else weights[p]. n_bytes is a multiple of 4
 * (the signatures' packed width); qwt may be NULL. A posting whose doc id is not below
 * n_docs is skipped and counted: the return value (0 for a sound index). */
int64_t asmk_accumulate(int64_t n_docs, int64_t n_query, const int64_t *lo, const int64_t *hi,
                     const uint8_t *qsigs, const uint8_t *sigs, int64_t n_bytes,
                     const uint32_t *docs, const float *weights, int per_doc,
                     const double *table, const double *qwt, double *acc)
{
    int64_t bad = 0;
    for (int64_t i = 0; i < n_query; i++) {
        const uint8_t *q = qsigs + i * n_bytes;
        const double qw = qwt ? qwt[i] : 1.0;
        if (n_bytes == 16) {  /* 128 bits, the common case: two fixed loads */
            uint64_t q0, q1;
            memcpy(&q0, q, 8);
            memcpy(&q1, q + 8, 8);
            for (int64_t p = lo[i]; p < hi[i]; p++) {
                prefetch_ahead(sigs + p * 16);
                uint64_t s0, s1;
                memcpy(&s0, sigs + p * 16, 8);
                memcpy(&s1, sigs + p * 16 + 8, 8);
                const unsigned h = (unsigned)(__builtin_popcountll(s0 ^ q0)
                                              + __builtin_popcountll(s1 ^ q1));
                const uint32_t d = docs[p];
                if ((int64_t)d >= n_docs) { bad++; continue; }
                double c = table[h] * (double)(per_doc ? weights[d] : weights[p]);
                if (qwt) c *= qw;
                acc[d] += c;
            }
        } else {
            for (int64_t p = lo[i]; p < hi[i]; p++) {
                prefetch_ahead(sigs + p * n_bytes);
                const unsigned h = popcount_row(sigs + p * n_bytes, q, n_bytes);
                const uint32_t d = docs[p];
                if ((int64_t)d >= n_docs) { bad++; continue; }
                double c = table[h] * (double)(per_doc ? weights[d] : weights[p]);
                if (qwt) c *= qw;
                acc[d] += c;
            }
        }
    }
    return bad;
}
