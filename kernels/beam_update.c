/* One token of ldlm's beam search for every item of a batch, on the CPU, in one call.

   The algorithm is ldlm.beam_search's (Hugging Face's vectorized beam search), step for step and in the same
   float32 arithmetic; only the order of work differs: per beam row, one pass for the log-softmax's max, one for
   its sum of exponentials, one for the row's 2K best tokens (n-gram bans applied as -inf), then the item's 2K
   best (beam, token) candidates from its K rows' lists. The (rows, vocab) log-probabilities are never written.
   Torch runs the same bookkeeping as about 60 small operators a token (tens of microseconds each on a CPU);
   this is one call.

   Built by ldlm.kernels.native with the system C compiler; no Python or torch headers. */

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define NEG_INF_SCORE (-1.0e9f) /* ldlm.beam_search.NEG_INF: "impossible" in the beam bookkeeping */
#define LANES 16                /* independent partial max and sum per row: what the compiler vectorizes */

/* 16 floats as one value: GCC's and Clang's vector extension, lowered to whatever SIMD the CPU has */
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

static inline f32x16 load16(const float *p) {
    f32x16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline f32x16 select16(i32x16 mask, f32x16 yes, f32x16 no) {
    return (f32x16)((mask & (i32x16)yes) | (~mask & (i32x16)no));
}

static inline int any16(i32x16 mask) {
    int32_t any = 0;
    for (int l = 0; l < LANES; l++) any |= mask[l];
    return any != 0;
}

/* exp(x) for x <= 0, 16 at a time: x = n ln2 + r, 2^n from the exponent bits, exp(r) by Cephes' polynomial;
   within 2 ulp. Only the log-softmax's normalizer sums it. */
static inline f32x16 exp_nonpositive(f32x16 x) {
    const f32x16 lowest = (f32x16){0} - 87.33654f; /* below this exp(x) is under FLT_MIN: count it as 0 */
    const i32x16 under = x < lowest;
    const f32x16 clamped = select16(under, lowest, x);
    const f32x16 n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln2) */
    f32x16 r = clamped - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    f32x16 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const f32x16 scale = (f32x16)((__builtin_convertvector(n, i32x16) + 127) << 23);
    return select16(under, (f32x16){0}, p * scale);
}

/* The log-softmax's max and log of the sum of exp(x - max) over x[0..V); NaN in, NaN out. */
static void log_normalizer(const float *x, int64_t V, float *max_out, float *log_sum_out) {
    float m = x[0], s = 0.0f;
    int64_t v = 0;
    if (V >= LANES) {
        f32x16 lanes = load16(x);
        for (v = LANES; v + LANES <= V; v += LANES) {
            const f32x16 a = load16(x + v);
            lanes = select16(a > lanes, a, lanes);
        }
        for (int l = 0; l < LANES; l++) m = lanes[l] > m ? lanes[l] : m;
        for (int l = 0; l < LANES; l++) m = lanes[l] != lanes[l] ? lanes[l] : m; /* keep a NaN */
    }
    for (; v < V; v++) m = x[v] > m || x[v] != x[v] ? x[v] : m;
    f32x16 sums = {0};
    for (v = 0; v + LANES <= V; v += LANES) sums += exp_nonpositive(load16(x + v) - m);
    for (int l = 0; l < LANES; l++) s += sums[l];
    for (; v < V; v++) {
        f32x16 one = {0};
        one[0] = x[v] - m;
        s += exp_nonpositive(one)[0];
    }
    *max_out = m;
    *log_sum_out = logf(s);
}

/* Insert (key, index) into the descending list keys[0..*count) of capacity cap; an equal key stays behind
   the ones already there, so ties go to the lower index as the list is filled in index order. */
static inline void keep_best(float *keys, int64_t *indices, int64_t *count, int64_t cap, float key, int64_t index) {
    int64_t n = *count;
    if (n == cap) {
        if (!(key > keys[cap - 1])) return;
        n = cap - 1;
    }
    int64_t at = n;
    while (at > 0 && key > keys[at - 1]) {
        keys[at] = keys[at - 1];
        indices[at] = indices[at - 1];
        at--;
    }
    keys[at] = key;
    indices[at] = index;
    *count = n + 1;
}

/* The positions of the k largest of values[0..n) into out, best first, ties to the lower position. */
static void top_positions(const float *values, int64_t n, int64_t k, int64_t *out, float *keys) {
    int64_t count = 0;
    for (int64_t i = 0; i < n; i++) keep_best(keys, out, &count, k, values[i], i);
}

/* Scratch bytes ldlm_beam_update needs for B items of K beams, T tokens and V vocabulary entries. */
int64_t ldlm_beam_scratch_bytes(int64_t B, int64_t K, int64_t T, int64_t V) {
    int64_t M = 2 * K;
    return (int64_t)(2 * B * K * sizeof(float)                    /* each row's log-softmax max and log-sum */
                     + K * M * (sizeof(float) + sizeof(int64_t))   /* each row's M best */
                     + 4 * M * sizeof(float) + 3 * M * sizeof(int64_t) /* the item's candidates */
                     + (M + K) * T * sizeof(int64_t)              /* candidate tokens, new finished tokens */
                     + (3 * K) * (sizeof(float) + sizeof(int64_t)) /* merge of finished and new */
                     + K * (sizeof(float) + 1)                    /* new finished scores and flags */
                     + T * sizeof(int64_t)                        /* a row's banned tokens */
                     + V + 64);                                   /* the ban mask; alignment slack */
}

static unsigned char *take(unsigned char **cursor, int64_t bytes) {
    unsigned char *at = *cursor;
    *cursor += (bytes + 7) & ~(int64_t)7;
    return at;
}

/* One beam-search token for B items of K beams: the state arrays are updated in place exactly as one
   iteration of ldlm.beam_search's loop at position `cur` updates them.

   logits (B*K, V) float32: next-token logits of every beam row.
   running (B, K, T), finished (B, K, T) int64; running_scores, finished_scores (B, K) float32;
   is_finished (B, K), improvable (B) uint8.
   source_rows (B*K) out: the cache row each new beam row continues (the reorder for the KV cache);
   next_tokens (B*K) out: the token each new row chose at `cur` (the next decoder input).

   Returns 0 to go on, 1 where the reference loop stops after this token, and -(1 + row) when that row's
   logits are not all finite (nothing is updated then). */
int64_t ldlm_beam_update(const float *logits, int64_t B, int64_t K, int64_t T, int64_t V, int64_t cur,
                         int64_t eos, int64_t ngram, double length_penalty, int64_t early_stopping,
                         int64_t *running, float *running_scores, int64_t *finished, float *finished_scores,
                         uint8_t *is_finished, uint8_t *improvable, int64_t *source_rows, int64_t *next_tokens,
                         unsigned char *scratch) {
    const int64_t M = 2 * K;
    unsigned char *cursor = scratch;
    float *row_max = (float *)take(&cursor, B * K * sizeof(float));
    float *row_log_sum = (float *)take(&cursor, B * K * sizeof(float));
    float *row_keys = (float *)take(&cursor, K * M * sizeof(float));
    int64_t *row_tokens = (int64_t *)take(&cursor, K * M * sizeof(int64_t));
    float *cand_scores = (float *)take(&cursor, M * sizeof(float));
    float *live = (float *)take(&cursor, M * sizeof(float));
    float *work = (float *)take(&cursor, 2 * M * sizeof(float)); /* also 3K for the finished merge */
    int64_t *cand_beam = (int64_t *)take(&cursor, M * sizeof(int64_t));
    int64_t *cand_token = (int64_t *)take(&cursor, M * sizeof(int64_t));
    int64_t *picked = (int64_t *)take(&cursor, M * sizeof(int64_t));
    int64_t *candidates = (int64_t *)take(&cursor, M * T * sizeof(int64_t));
    int64_t *new_finished = (int64_t *)take(&cursor, K * T * sizeof(int64_t));
    float *merged = (float *)take(&cursor, 3 * K * sizeof(float));
    int64_t *best = (int64_t *)take(&cursor, 3 * K * sizeof(int64_t));
    float *new_finished_scores = (float *)take(&cursor, K * sizeof(float));
    uint8_t *new_is_finished = (uint8_t *)take(&cursor, K);
    int64_t *banned = (int64_t *)take(&cursor, T * sizeof(int64_t));
    uint8_t *ban_mask = (uint8_t *)take(&cursor, V);
    memset(ban_mask, 0, (size_t)V);

    /* the log-softmax normalizer of every row first, so non-finite logits change nothing */
    for (int64_t r = 0; r < B * K; r++) {
        log_normalizer(logits + r * V, V, row_max + r, row_log_sum + r);
        if (!isfinite(row_max[r]) || !isfinite(row_log_sum[r])) return -(1 + r);
    }

    const float length = (float)pow((double)(cur + 1), length_penalty);
    int any_improvable = 0, all_full = 1, all_ended = 1;
    for (int64_t b = 0; b < B; b++) {
        /* each row's M best tokens, scored as the reference scores them: log_softmax + the beam's score */
        for (int64_t k = 0; k < K; k++) {
            const int64_t r = b * K + k;
            const float *x = logits + r * V;
            const int64_t *tokens = running + r * T;
            const float m = row_max[r], log_sum = row_log_sum[r];

            int64_t n_banned = 0; /* ldlm.beam_search.ban_repeated_ngrams on tokens[0..cur) */
            if (ngram == 1) {
                for (int64_t i = 0; i < cur; i++) banned[n_banned++] = tokens[i];
            } else if (ngram > 1 && cur >= ngram) {
                const int64_t *last = tokens + cur - ngram + 1; /* the last n-1 tokens */
                for (int64_t i = 0; i + ngram <= cur; i++)
                    if (memcmp(tokens + i, last, (size_t)(ngram - 1) * sizeof(int64_t)) == 0)
                        banned[n_banned++] = tokens[i + ngram - 1];
            }
            for (int64_t i = 0; i < n_banned; i++)
                if (banned[i] >= 0 && banned[i] < V) ban_mask[banned[i]] = 1;

            float *keys = row_keys + k * M;
            int64_t *toks = row_tokens + k * M, count = 0;
            float threshold = -INFINITY; /* the M-th best so far, once there are M */
            int64_t v = 0;
            for (; v + LANES <= V; v += LANES) { /* a vectorized test per block; few blocks hold a better one */
                if (count == M && !any16(load16(x + v) > threshold)) continue;
                for (int l = 0; l < LANES; l++) {
                    const float key = ban_mask[v + l] ? -INFINITY : x[v + l];
                    if (count < M || key > threshold) {
                        keep_best(keys, toks, &count, M, key, v + l);
                        if (count == M) threshold = keys[M - 1];
                    }
                }
            }
            for (; v < V; v++) {
                const float key = ban_mask[v] ? -INFINITY : x[v];
                if (count < M || key > threshold) {
                    keep_best(keys, toks, &count, M, key, v);
                    if (count == M) threshold = keys[M - 1];
                }
            }
            for (int64_t i = 0; i < n_banned; i++)
                if (banned[i] >= 0 && banned[i] < V) ban_mask[banned[i]] = 0;
            const float beam_score = running_scores[r];
            for (int64_t j = 0; j < M; j++) /* the row's log-prob plus its beam's running score */
                keys[j] = keys[j] == -INFINITY ? -INFINITY : ((keys[j] - m) - log_sum) + beam_score;
        }

        /* the item's 2K best candidates over its K rows, ties to the lower (beam, token) position as in the
           flattened (K * V) scores; each row's list is sorted, so the merge reads them in position order */
        int64_t count = 0;
        for (int64_t k = 0; k < K; k++) {
            for (int64_t j = 0; j < M; j++) {
                keep_best(cand_scores, picked, &count, M, row_keys[k * M + j], k * V + row_tokens[k * M + j]);
            }
        }
        /* equal scores from one row arrive in key order, which is token order only within the row's ties:
           restore position order among equal scores */
        for (int64_t j = 1; j < M; j++) {
            for (int64_t i = j; i > 0 && cand_scores[i] == cand_scores[i - 1] && picked[i] < picked[i - 1]; i--) {
                int64_t t = picked[i]; picked[i] = picked[i - 1]; picked[i - 1] = t;
            }
        }
        for (int64_t j = 0; j < M; j++) {
            cand_beam[j] = picked[j] / V;
            cand_token[j] = picked[j] % V;
            memcpy(candidates + j * T, running + (b * K + cand_beam[j]) * T, (size_t)T * sizeof(int64_t));
            candidates[j * T + cur] = cand_token[j];
        }

        /* next live beams: the K best candidates that did not end */
        int64_t ended[64]; /* M <= 64: the loader refuses more than 32 beams */
        for (int64_t j = 0; j < M; j++) {
            ended[j] = cand_token[j] == eos || cur + 1 >= T;
            all_ended &= (int)ended[j];
            live[j] = ended[j] ? cand_scores[j] + NEG_INF_SCORE : cand_scores[j];
        }
        top_positions(live, M, K, picked, work);
        for (int64_t k = 0; k < K; k++) {
            const int64_t j = picked[k], r = b * K + k;
            memcpy(running + r * T, candidates + j * T, (size_t)T * sizeof(int64_t));
            running_scores[r] = live[j];
            source_rows[r] = b * K + cand_beam[j];
            next_tokens[r] = cand_token[j];
        }

        /* finished hypotheses: merge the newly ended top-K candidates, keep the K best */
        int all_done = 1;
        for (int64_t k = 0; k < K; k++) all_done &= is_finished[b * K + k] != 0;
        for (int64_t k = 0; k < K; k++) merged[k] = finished_scores[b * K + k];
        for (int64_t j = 0; j < M; j++) {
            float score = cand_scores[j] / length;
            if (early_stopping && all_done) score = score + NEG_INF_SCORE;
            if (!improvable[b]) score = score + NEG_INF_SCORE;
            if (!(ended[j] && j < K)) score = score + NEG_INF_SCORE;
            merged[K + j] = score;
        }
        top_positions(merged, 3 * K, K, best, work);
        for (int64_t k = 0; k < K; k++) {
            const int64_t j = best[k];
            const int64_t *from = j < K ? finished + (b * K + j) * T : candidates + (j - K) * T;
            memcpy(new_finished + k * T, from, (size_t)T * sizeof(int64_t));
            new_finished_scores[k] = merged[j];
            new_is_finished[k] = j < K ? is_finished[b * K + j] : (uint8_t)(ended[j - K] && j - K < K);
        }
        memcpy(finished + b * K * T, new_finished, (size_t)(K * T) * sizeof(int64_t));
        float worst = new_finished_scores[0];
        for (int64_t k = 0; k < K; k++) {
            finished_scores[b * K + k] = new_finished_scores[k];
            is_finished[b * K + k] = new_is_finished[k];
            worst = new_finished_scores[k] < worst ? new_finished_scores[k] : worst;
            all_full &= new_is_finished[k] != 0;
        }

        /* could a live beam still beat the finished? */
        const float best_live = running_scores[b * K] / length;
        int beatable = 0;
        for (int64_t k = 0; k < K; k++) beatable |= best_live > (is_finished[b * K + k] ? worst : NEG_INF_SCORE);
        improvable[b] = improvable[b] && beatable;
        any_improvable |= improvable[b];
    }
    return (!any_improvable || (early_stopping && all_full) || all_ended) ? 1 : 0;
}

/* The copies of a row gather, applied to buffers first, first + step, ... */
struct copy_plan {
    void *const *buffers;
    const int64_t *row_bytes;
    int64_t n_buffers;
    const int64_t *to, *from; /* row copies in order; -1: the spare row */
    int64_t n;
    unsigned char *spare;
    int64_t first, step;
};

static void *copy_buffers(void *arg) {
    const struct copy_plan *p = (const struct copy_plan *)arg;
    for (int64_t i = p->first; i < p->n_buffers; i += p->step) {
        unsigned char *buffer = (unsigned char *)p->buffers[i];
        const int64_t bytes = p->row_bytes[i];
        for (int64_t c = 0; c < p->n; c++)
            memcpy(p->to[c] < 0 ? p->spare : buffer + p->to[c] * bytes,
                   p->from[c] < 0 ? p->spare : buffer + p->from[c] * bytes, (size_t)bytes);
    }
    return NULL;
}

static int64_t max_row_bytes(const int64_t *row_bytes, int64_t n_buffers) {
    int64_t most = 0;
    for (int64_t i = 0; i < n_buffers; i++) most = row_bytes[i] > most ? row_bytes[i] : most;
    return most;
}

/* Copy row source[r] of each buffer into its row r (a gather along the first axis, in place), as
   `buffer.index_select(0, source)` would, copying each changed row once: a row is overwritten only after every
   row that reads it has been written, and each cycle of rows that read one another goes through a spare row.
   buffers[i] holds `rows` rows of row_bytes[i] bytes; scratch holds 7 * rows int64 and two of the largest
   row. With threads > 1, large gathers split the buffers between two threads.
   Returns 0, or -1 (copying nothing) when a source row lies outside [0, rows). */
int64_t ldlm_gather_rows(void *const *buffers, const int64_t *row_bytes, int64_t n_buffers, int64_t rows,
                         const int64_t *source, unsigned char *scratch, int64_t threads) {
    for (int64_t r = 0; r < rows; r++)
        if (source[r] < 0 || source[r] >= rows) return -1;
    int64_t *readers = (int64_t *)scratch;   /* rows not yet written that read this row */
    int64_t *written = readers + rows;       /* 1 once this row holds its source's contents */
    int64_t *stack = written + rows;         /* rows free to be written */
    int64_t *to = stack + rows, *from = to + 2 * rows; /* the copies in order; -1: the spare row */
    unsigned char *spare = (unsigned char *)(from + 2 * rows);
    int64_t n = 0, depth = 0;
    memset(readers, 0, (size_t)(2 * rows) * sizeof(int64_t));
    for (int64_t r = 0; r < rows; r++)
        if (source[r] != r) readers[source[r]]++;
    for (int64_t r = 0; r < rows; r++)
        if (source[r] != r && readers[r] == 0) stack[depth++] = r;
    while (depth > 0) { /* write rows nobody still reads; each write may free its source */
        const int64_t r = stack[--depth], s = source[r];
        to[n] = r, from[n] = s, n++;
        written[r] = 1;
        if (--readers[s] == 0 && source[s] != s) stack[depth++] = s;
    }
    for (int64_t r = 0; r < rows; r++) { /* what is left are cycles: r to the spare, round the cycle, back */
        if (source[r] == r || written[r]) continue;
        to[n] = -1, from[n] = r, n++;
        for (int64_t at = r;;) {
            const int64_t s = source[at];
            to[n] = at, from[n] = s == r ? -1 : s, n++;
            written[at] = 1;
            if (s == r) break;
            at = s;
        }
    }
    struct copy_plan plan = {buffers, row_bytes, n_buffers, to, from, n, spare, 0, 1};
    int64_t total = 0;
    for (int64_t i = 0; i < n_buffers; i++) total += row_bytes[i] * n;
    pthread_t helper;
    /* a second thread pays for itself from a few MB (a thread starts in tens of microseconds) */
    if (threads > 1 && n_buffers > 1 && total >= (4 << 20)) {
        struct copy_plan other = plan;
        other.first = 1, plan.step = other.step = 2;
        other.spare = spare + max_row_bytes(row_bytes, n_buffers);
        if (pthread_create(&helper, NULL, copy_buffers, &other) == 0) {
            copy_buffers(&plan);
            pthread_join(helper, NULL);
            return 0;
        }
        plan.step = 1;
    }
    copy_buffers(&plan);
    return 0;
}
