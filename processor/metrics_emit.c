/* metrics_emit.c — reading the group's metric counters and the emitter
 * thread (metrics_emit.h).
 *
 * One emission: (1) one pipelined round trip reads every partition's version
 * hash (pql:{g:p}:c:mv) and sums it per period; (2) the periods whose sum
 * differs from the last successful emission, plus the open ones, are read
 * (HGETALL of each period hash of each partition, pipelined in chunks) and
 * summed into tables; (3) partition 0's epoch is checked; (4) the records
 * are produced and the producer flushed.  Only when every record was
 * delivered do the versions of (1) become the "emitted" ones, so a failed
 * emission is repeated whole next time. */
#include "metrics_emit.h"

#include "log.h"
#include "sink.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define READ_CHUNK 1024 /* HGETALLs per round trip */

/* ---- reading ------------------------------------------------------------------ */

typedef struct period_vec {
    pql_metric_period *v;
    size_t n, cap;
} period_vec;

static void period_push(period_vec *pv, pql_granularity g, int64_t start, int64_t version)
{
    if (pv->n == pv->cap) {
        pv->cap = pv->cap ? pv->cap * 2 : 64;
        pv->v = realloc(pv->v, pv->cap * sizeof(*pv->v));
        if (!pv->v) abort();
    }
    pv->v[pv->n++] = (pql_metric_period){g, start, version};
}

static int cmp_period(const void *a, const void *b)
{
    const pql_metric_period *x = a, *y = b;
    if (x->granularity != y->granularity) return x->granularity < y->granularity ? -1 : 1;
    return (x->start > y->start) - (x->start < y->start);
}

/* "day:1704067200000" */
static int parse_period(const char *f, size_t len, pql_granularity *g, int64_t *start)
{
    char buf[64], *end;
    if (len >= sizeof buf) return -1;
    memcpy(buf, f, len);
    buf[len] = '\0';
    char *colon = strchr(buf, ':');
    if (!colon) return -1;
    *colon = '\0';
    int gi = pql_granularity_parse(buf);
    *start = strtoll(colon + 1, &end, 10);
    if (gi < 0 || end == colon + 1 || *end) return -1;
    *g = (pql_granularity)gi;
    return 0;
}

static void on_version(void *opaque, size_t i, const char *f, size_t flen, int64_t v)
{
    (void)i;
    pql_granularity g;
    int64_t start;
    if (parse_period(f, flen, &g, &start) == 0) period_push(opaque, g, start, v);
}

pql_err pql_metrics_read_periods(pql_store *s, const char *group, int32_t npartitions,
                                 pql_metric_period **out, size_t *n, char *errstr,
                                 size_t errstr_size)
{
    int32_t *parts = malloc(((size_t)npartitions + 1) * sizeof(*parts));
    const char **names = malloc(((size_t)npartitions + 1) * sizeof(*names));
    period_vec pv = {0};
    if (!parts || !names) abort();
    for (int32_t p = 0; p < npartitions; p++) {
        parts[p] = p;
        names[p] = "mv";
    }
    pql_err err = pql_store_read_counters(s, group, (size_t)npartitions, parts, names, on_version,
                                          &pv, errstr, errstr_size);
    free(parts);
    free(names);
    if (err) {
        free(pv.v);
        return err;
    }
    qsort(pv.v, pv.n, sizeof(*pv.v), cmp_period);
    size_t k = 0; /* sum the partitions' versions of each period */
    for (size_t i = 0; i < pv.n; i++) {
        if (k > 0 && cmp_period(&pv.v[k - 1], &pv.v[i]) == 0)
            pv.v[k - 1].version += pv.v[i].version;
        else
            pv.v[k++] = pv.v[i];
    }
    *out = pv.v;
    *n = k;
    return PQL_OK;
}

typedef struct table_ctx {
    pql_metric_table **tables;
    const size_t *owner; /* chunk entry → period index */
} table_ctx;

static void on_counter(void *opaque, size_t i, const char *f, size_t flen, int64_t v)
{
    table_ctx *c = opaque;
    pql_metric_table_add(c->tables[c->owner[i]], f, flen, v); /* unknown fields: newer writer */
}

pql_err pql_metrics_read_tables(pql_store *s, const char *group, int32_t npartitions,
                                const pql_metric_period *periods, size_t n,
                                pql_metric_table **tables, char *errstr, size_t errstr_size)
{
    char(*names)[48] = malloc((n + 1) * sizeof(*names));
    int32_t *parts = malloc(READ_CHUNK * sizeof(*parts));
    const char **chunk_names = malloc(READ_CHUNK * sizeof(*chunk_names));
    size_t *owner = malloc(READ_CHUNK * sizeof(*owner));
    if (!names || !parts || !chunk_names || !owner) abort();
    for (size_t i = 0; i < n; i++) {
        snprintf(names[i], sizeof names[i], "m:%s:%lld",
                 pql_granularity_name(periods[i].granularity), (long long)periods[i].start);
        tables[i] = pql_metric_table_new(periods[i].granularity, periods[i].start);
        if (!tables[i]) abort();
    }
    pql_err err = PQL_OK;
    table_ctx ctx = {tables, owner};
    size_t total = n * (size_t)npartitions, k = 0;
    for (size_t done = 0; !err && done < total; done += k) {
        for (k = 0; k < READ_CHUNK && done + k < total; k++) {
            size_t i = (done + k) / (size_t)npartitions;
            parts[k] = (int32_t)((done + k) % (size_t)npartitions);
            chunk_names[k] = names[i];
            owner[k] = i;
        }
        err = pql_store_read_counters(s, group, k, parts, chunk_names, on_counter, &ctx, errstr,
                                      errstr_size);
    }
    if (err)
        for (size_t i = 0; i < n; i++) {
            pql_metric_table_destroy(tables[i]);
            tables[i] = NULL;
        }
    free(names);
    free(parts);
    free(chunk_names);
    free(owner);
    return err;
}

/* ---- the emitter -------------------------------------------------------------- */

struct pql_metrics_emitter {
    const pql_config *cfg;
    int32_t npartitions;
    pql_store *store; /* the thread's own connection */
    pql_sink *sink;   /* the thread's own producer */
    pthread_t thread;
    int started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int stop;            /* under mu */
    int64_t owner_epoch; /* under mu: our epoch of partition 0, 0 when not ours */
    atomic_int print;
    /* the thread's own */
    int64_t emitted_epoch;      /* the ownership `emitted` belongs to */
    pql_metric_period *emitted; /* versions of the last successful emission, sorted */
    size_t nemitted;
    int failed; /* deliveries that failed in this emission */
};

static void on_metric_done(void *opaque, int ok)
{
    pql_metrics_emitter *e = opaque;
    if (!ok) e->failed++;
}

static const pql_metric_period *find_emitted(const pql_metrics_emitter *e,
                                             const pql_metric_period *p)
{
    return e->nemitted ? bsearch(p, e->emitted, e->nemitted, sizeof(*p), cmp_period) : NULL;
}

/* Produces the records of one table; an empty table as an all-zero `all` row. */
static size_t produce_table(pql_metrics_emitter *e, const pql_metric_table *t, int64_t now)
{
    pql_metric_record r = {.granularity = pql_metric_table_granularity(t),
                           .period_start = pql_metric_table_start(t),
                           .emitted_at = now};
    r.period_end = pql_period_next(r.granularity, r.period_start);
    size_t n = pql_metric_table_size(t), sent = 0;
    pql_buf key = {0}, value = {0};
    for (size_t i = 0; i < (n ? n : 1); i++) {
        if (n) {
            pql_metric_table_get(t, i, &r.kind, &r.value, &r.f);
        } else {
            r.kind = PQL_SEG_ALL;
            r.value = "all";
            memset(&r.f, 0, sizeof r.f);
        }
        char err[256];
        pql_buf_reset(&key);
        pql_buf_reset(&value);
        if (pql_metric_key(&r, &key) < 0 ||
            pql_metric_encode(&r, e->cfg->output_json, &value, err, sizeof err) != PQL_OK ||
            pql_sink_metric(e->sink, key.data, key.len, value.data, value.len) != PQL_OK) {
            e->failed++;
            continue;
        }
        sent++;
    }
    pql_buf_free(&key);
    pql_buf_free(&value);
    return sent;
}

/* The embedded default's summary: the `all` figures of the last four weeks. */
static void print_summary(pql_metrics_emitter *e, int64_t now)
{
    pql_metric_period weeks[4];
    pql_metric_table *tables[4], *sum = NULL;
    char err[512];
    int64_t start = pql_period_start(PQL_GRAN_WEEK, now) - 3 * 7 * PQL_MS_DAY;
    for (int i = 0; i < 4; i++)
        weeks[i] = (pql_metric_period){PQL_GRAN_WEEK, start + i * 7 * PQL_MS_DAY, 0};
    if (pql_metrics_read_tables(e->store, e->cfg->group, e->npartitions, weeks, 4, tables, err,
                                sizeof err))
        return;
    sum = tables[0];
    for (int i = 1; i < 4; i++) {
        if (pql_metric_table_merge(sum, tables[i])) abort();
        pql_metric_table_destroy(tables[i]);
    }
    int i = pql_metric_table_find(sum, PQL_SEG_ALL, "all");
    pql_metric_figures f;
    if (i >= 0) {
        pql_metric_table_get(sum, (size_t)i, NULL, NULL, &f);
        char when[40], rate[16], p50[16], p90[16], paid[16], np[16], lift[16];
        pql_format_utc(start, when, sizeof when);
        when[10] = '\0';
        pql_metric_format_rate(f.pql_rate, rate, sizeof rate);
        pql_metric_format_duration(f.time_to_pql_p50_ms, p50, sizeof p50);
        pql_metric_format_duration(f.time_to_pql_p90_ms, p90, sizeof p90);
        pql_metric_format_rate(f.pql_to_paid_rate, paid, sizeof paid);
        pql_metric_format_rate(f.non_pql_to_paid_rate, np, sizeof np);
        pql_metric_format_lift(&f, lift, sizeof lift);
        printf("\n  ◆ METRICS   since %s: %lld signups, %s of them qualified; %lld PQLs, time to "
               "PQL p50 %s p90 %s\n"
               "      converted: %s of PQLs vs %s of signups that never qualified (lift %s); "
               "%lld expansion alerts.  More: pqlstream metrics --segment channel\n",
               when, (long long)f.signups, rate, (long long)f.pqls_new, p50, p90, paid, np, lift,
               (long long)f.expansion_alerts);
        fflush(stdout);
    }
    pql_metric_table_destroy(sum);
}

static void emit_once(pql_metrics_emitter *e, int64_t epoch)
{
    const char *group = e->cfg->group;
    char err[512];
    int64_t t0 = pql_now_ms();
    if (epoch != e->emitted_epoch) { /* newly ours: send everything once */
        free(e->emitted);
        e->emitted = NULL;
        e->nemitted = 0;
        e->emitted_epoch = epoch;
    }
    pql_metric_period *all = NULL;
    size_t nall = 0;
    if (pql_metrics_read_periods(e->store, group, e->npartitions, &all, &nall, err, sizeof err)) {
        pql_warn("metrics: reading counters failed; retrying next interval", "error=\"%s\"", err);
        return;
    }
    period_vec chosen = {0};
    for (size_t i = 0; i < nall; i++) {
        const pql_metric_period *was = find_emitted(e, &all[i]);
        if (!was || was->version != all[i].version)
            period_push(&chosen, all[i].granularity, all[i].start, all[i].version);
    }
    for (int g = 0; g < PQL_NGRAN; g++) { /* the open periods, always */
        pql_metric_period open = {g, pql_period_start(g, t0), 0};
        int found = 0;
        for (size_t i = 0; i < chosen.n && !found; i++)
            found = !cmp_period(&chosen.v[i], &open);
        if (!found) period_push(&chosen, g, open.start, 0);
    }
    qsort(chosen.v, chosen.n, sizeof(*chosen.v), cmp_period);
    pql_metric_table **tables = calloc(chosen.n + 1, sizeof(*tables));
    if (!tables) abort();
    size_t sent = 0;
    int64_t stored_epoch = -1;
    if (pql_metrics_read_tables(e->store, group, e->npartitions, chosen.v, chosen.n, tables, err,
                                sizeof err) != PQL_OK ||
        pql_store_epoch(e->store, group, 0, &stored_epoch, err, sizeof err) != PQL_OK) {
        pql_warn("metrics: reading counters failed; retrying next interval", "error=\"%s\"", err);
        goto out;
    }
    if (stored_epoch != epoch) {
        pql_info("metrics: partition 0 has a newer owner; not emitting", "epoch=%lld stored=%lld",
                 (long long)epoch, (long long)stored_epoch);
        goto out;
    }
    e->failed = 0;
    for (size_t i = 0; i < chosen.n; i++)
        sent += produce_table(e, tables[i], t0);
    int left = pql_sink_flush(e->sink, 10000);
    if (e->failed || left) {
        pql_warn("metrics: some records were not delivered; emitting them again next interval",
                 "failed=%d in_flight=%d", e->failed, left);
        goto out;
    }
    free(e->emitted);
    e->emitted = all; /* these versions are now on the topic */
    e->nemitted = nall;
    all = NULL;
    pql_info("metrics emitted", "periods=%zu records=%zu ms=%lld", chosen.n, sent,
             (long long)(pql_now_ms() - t0));
    if (atomic_load(&e->print)) print_summary(e, t0);
out:
    for (size_t i = 0; i < chosen.n; i++)
        pql_metric_table_destroy(tables[i]);
    free(tables);
    free(chosen.v);
    free(all);
}

static void *run(void *opaque)
{
    pql_metrics_emitter *e = opaque;
    pthread_mutex_lock(&e->mu);
    while (!e->stop) {
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        int64_t ns = until.tv_nsec + (e->cfg->metrics_interval_ms % 1000) * 1000000;
        until.tv_sec += e->cfg->metrics_interval_ms / 1000 + ns / 1000000000;
        until.tv_nsec = ns % 1000000000;
        int rc = 0;
        while (!e->stop && rc == 0)
            rc = pthread_cond_timedwait(&e->cv, &e->mu, &until);
        if (e->stop) break;
        int64_t epoch = e->owner_epoch;
        pthread_mutex_unlock(&e->mu);
        if (epoch > 0) emit_once(e, epoch);
        pthread_mutex_lock(&e->mu);
    }
    pthread_mutex_unlock(&e->mu);
    return NULL;
}

pql_metrics_emitter *pql_metrics_emitter_start(const pql_config *cfg, const char *brokers,
                                               const char *redis_url, int32_t npartitions,
                                               char *errstr, size_t errstr_size)
{
    pql_metrics_emitter *e = calloc(1, sizeof(*e));
    char why[512];
    pthread_condattr_t ca;
    if (!e) {
        pql_set_err(errstr, errstr_size, "metrics: out of memory");
        return NULL;
    }
    e->cfg = cfg;
    e->npartitions = npartitions;
    pthread_mutex_init(&e->mu, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&e->cv, &ca);
    pthread_condattr_destroy(&ca);
    if (!(e->store = pql_store_new(redis_url, cfg->redis_timeout_ms, why, sizeof why))) {
        pql_set_err(errstr, errstr_size, "metrics: redis: %s", why);
        goto fail;
    }
    pql_sink_callbacks cb = {NULL, NULL, e, on_metric_done};
    if (!(e->sink = pql_sink_new(cfg, brokers, &cb, why, sizeof why))) {
        pql_set_err(errstr, errstr_size, "metrics: producer: %s", why);
        goto fail;
    }
    if (pthread_create(&e->thread, NULL, run, e) != 0) {
        pql_set_err(errstr, errstr_size, "metrics: cannot start the emitter thread");
        goto fail;
    }
    e->started = 1;
    return e;
fail:
    pql_metrics_emitter_stop(e);
    return NULL;
}

void pql_metrics_emitter_own(pql_metrics_emitter *e, int64_t epoch)
{
    if (!e) return;
    pthread_mutex_lock(&e->mu);
    e->owner_epoch = epoch;
    pthread_mutex_unlock(&e->mu);
}

void pql_metrics_emitter_print(pql_metrics_emitter *e, int on)
{
    if (e) atomic_store(&e->print, on);
}

void pql_metrics_emitter_stop(pql_metrics_emitter *e)
{
    if (!e) return;
    if (e->started) {
        pthread_mutex_lock(&e->mu);
        e->stop = 1;
        pthread_cond_signal(&e->cv);
        pthread_mutex_unlock(&e->mu);
        pthread_join(e->thread, NULL);
    }
    pql_sink_destroy(e->sink, 5000);
    pql_store_close(e->store);
    pthread_cond_destroy(&e->cv);
    pthread_mutex_destroy(&e->mu);
    free(e->emitted);
    free(e);
}
