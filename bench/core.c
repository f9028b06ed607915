/* core.c — what the pure core costs per event, on one thread, without Kafka
 * or Redis: the workload's messages (the same generator, seed and mix as the
 * topic) are held in memory and run through what pqlstream's main thread
 * does with each one:
 *
 *   decode   pql_decoder_decode (Avro bytes → pql_event)
 *   apply    the account found or adopted in its partition's task, then
 *            pql_task_apply: windows, every rule, alerts encoded, metric
 *            counter deltas
 *   build    every pass of `batch` messages, each touched task's batch
 *            write built (pql_task_build_batch: dirty fields formatted),
 *            then committed as if Redis applied it, and the cache trimmed
 *
 * Memory, from malloc's count of bytes in use (mallinfo2): exact, where a
 * process's RSS carries the allocator's and librdkafka's noise.
 *   - per cached account: what emptying the caches at the end frees, ÷ the
 *     accounts they held (accounts, windows, members, traits, cache nodes);
 *   - what the caches count for the same accounts (cache.h: the figure
 *     cache.max_memory bounds);
 *   - per task: what the second run left allocated besides the accounts
 *     (batch, alert and metric buffers kept for reuse, the cache tables).
 * Where another allocator serves malloc (a sanitizer's, a preloaded one),
 * mallinfo2 sees none of it: the heap figures are then NAN, "not measured".
 *
 * Each stage is timed in thread CPU time.  Decode is timed alone in a first
 * run over all the messages; the second run does all three and times the
 * builds, so apply = second run - decode - build.  The sum is the main
 * thread's per-event work: when 1/sum is well above what the consumer and
 * Redis sustain, decoding and rule evaluation are not the bottleneck. */
#include "bench.h"

#include "decode.h"
#include "rules.h"
#include "task.h"

#include <malloc.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct msg {
    int kind;
    int32_t partition;
    size_t off, len; /* value bytes in the arena */
} msg;

typedef struct held {
    msg *msgs;
    size_t n, cap;
    pql_buf arena;
    int partitions;
    int failed;
} held;

static double thread_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* FNV-1a: any stable spread of accounts over the partitions will do. */
static int32_t partition_of(const char *key, size_t len, int partitions)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < len; i++)
        h = (h ^ (uint8_t)key[i]) * 16777619u;
    return (int32_t)(h % (uint32_t)partitions);
}

static void hold(void *opaque, int kind, const char *key, size_t key_len, const void *value,
                 size_t value_len)
{
    held *h = opaque;
    if (h->n == h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 65536;
        msg *m = realloc(h->msgs, cap * sizeof *m);
        if (!m) {
            h->failed = 1;
            return;
        }
        h->msgs = m;
        h->cap = cap;
    }
    msg *m = &h->msgs[h->n];
    m->kind = kind;
    m->partition = partition_of(key, key_len, h->partitions);
    m->off = h->arena.len;
    m->len = value_len;
    if (pql_buf_append(&h->arena, value, value_len) < 0) {
        h->failed = 1;
        return;
    }
    h->n++;
}

int bench_core(const bench_workload_opts *wo, int64_t events, int partitions,
               const char *rules_path, int batch, size_t cache_max, bench_core_result *out,
               char *errstr, size_t errstr_size)
{
    held h = {.partitions = partitions};
    pql_decoder *dec[2] = {NULL, NULL};
    pql_task **tasks = calloc((size_t)partitions, sizeof *tasks);
    pql_buf errs = {0};
    pql_rules *rules = pql_rules_load(rules_path, &errs);
    bench_workload *w = bench_workload_new(wo);
    int rc = -1;
    memset(out, 0, sizeof *out);
    if (!rules) {
        snprintf(errstr, errstr_size, "rules %s: %s", rules_path, errs.data ? errs.data : "?");
        goto out;
    }
    if (!tasks || !w || bench_workload_generate(w, events, hold, &h) < 0 || h.failed) {
        snprintf(errstr, errstr_size, "generating the workload in memory failed");
        goto out;
    }
    for (int k = 0; k < 2; k++)
        if (!(dec[k] = pql_decoder_new(k ? PQL_INPUT_ACCOUNT : PQL_INPUT_USAGE, PQL_WIRE_AUTO, NULL,
                                       NULL, errstr, errstr_size)))
            goto out;
    for (int i = 0; i < partitions; i++) {
        pql_claim claim = {.epoch = 1, .seq = 0, .offsets = {-1, -1}};
        if (!(tasks[i] = pql_task_new(i, 1)) ||
            pql_task_track_metrics(tasks[i], "channel", "plan") < 0) {
            snprintf(errstr, errstr_size, "out of memory");
            goto out;
        }
        pql_task_claimed(tasks[i], &claim);
    }

    /* Run 1: decoding alone. */
    pql_event ev;
    char err[512];
    double t0 = thread_s();
    for (size_t i = 0; i < h.n; i++) {
        const msg *m = &h.msgs[i];
        if (pql_decoder_decode(dec[m->kind], h.arena.data + m->off, m->len, &ev, err, sizeof err) !=
            PQL_OK) {
            snprintf(errstr, errstr_size, "message %zu does not decode: %s", i, err);
            goto out;
        }
    }
    double decode_s = thread_s() - t0;

    struct mallinfo2 heap0 = mallinfo2();
    size_t counted = 0;
    /* Run 2: decode, apply, build every `batch` messages. */
    const char *topics[PQL_NTOPICS] = {"bench-usage", "bench-accounts"};
    int64_t offsets[PQL_NTOPICS] = {0, 0};
    size_t per_task = cache_max / (size_t)partitions + 1;
    double build_s = 0;
    int64_t now = pql_now_ms();
    t0 = thread_s();
    for (size_t start = 0; start < h.n; start += (size_t)batch) {
        size_t end = start + (size_t)batch < h.n ? start + (size_t)batch : h.n;
        for (size_t i = start; i < end; i++) {
            const msg *m = &h.msgs[i];
            pql_task *t = tasks[m->partition];
            if (pql_decoder_decode(dec[m->kind], h.arena.data + m->off, m->len, &ev, err,
                                   sizeof err) != PQL_OK)
                goto out;
            pql_account *a = pql_task_account(t, ev.account_id, ev.account_id_len);
            if (!a) {
                if (!(a = pql_account_new(rules, ev.account_id, ev.account_id_len))) goto out;
                pql_task_adopt(t, a);
            }
            pql_task_apply(t, a, &ev, m->kind, offsets[m->kind]++, now, 0);
        }
        double b0 = thread_s();
        for (int p = 0; p < partitions; p++) {
            pql_task *t = tasks[p];
            if (!t->dirty && !t->ntouched) continue;
            out->batches += pql_task_build_batch(t, "bench", topics, 400LL * PQL_MS_DAY, now);
            pql_task_trim(t, per_task, SIZE_MAX);
            out->alerts += (int64_t)t->built_alerts;
            pql_task_committed(t);
            pql_task_alerts_published(t);
        }
        build_s += thread_s() - b0;
    }
    double all_s = thread_s() - t0;
    struct mallinfo2 heap1 = mallinfo2();
    for (int p = 0; p < partitions; p++) {
        out->accounts_cached += (int64_t)pql_cache_count(tasks[p]->cache);
        counted += pql_cache_bytes(tasks[p]->cache);
        pql_cache_evict(tasks[p]->cache, 0, 0, NULL, NULL); /* all clean: committed */
        if (pql_cache_count(tasks[p]->cache)) {
            snprintf(errstr, errstr_size, "task %d kept %zu accounts after its last commit", p,
                     pql_cache_count(tasks[p]->cache));
            goto out;
        }
    }
    struct mallinfo2 heap2 = mallinfo2();
    double held = (double)(heap1.uordblks + heap1.hblkhd) - (double)(heap0.uordblks + heap0.hblkhd);
    double freed =
        (double)(heap1.uordblks + heap1.hblkhd) - (double)(heap2.uordblks + heap2.hblkhd);
    out->heap_per_account = out->heap_per_task = NAN; /* malloc did not count them */
    if (out->accounts_cached) {
        out->counted_per_account = (double)counted / (double)out->accounts_cached;
        if (freed > 0) {
            out->heap_per_account = freed / (double)out->accounts_cached;
            out->heap_per_task = (held - freed) / partitions;
        }
    }
    out->events = (int64_t)h.n;
    out->decode_us = decode_s * 1e6 / (double)h.n;
    out->build_us = build_s * 1e6 / (double)h.n;
    out->apply_us = (all_s - decode_s - build_s) * 1e6 / (double)h.n;
    if (out->apply_us < 0) out->apply_us = 0;
    out->total_us = all_s * 1e6 / (double)h.n;
    rc = 0;
out:
    for (int i = 0; tasks && i < partitions; i++)
        pql_task_destroy(tasks[i]);
    free(tasks);
    for (int k = 0; k < 2; k++)
        pql_decoder_destroy(dec[k]);
    pql_rules_destroy(rules);
    pql_buf_free(&errs);
    bench_workload_destroy(w);
    free(h.msgs);
    pql_buf_free(&h.arena);
    return rc;
}
