/* telemetry.c — the metrics registry, health facts and the Prometheus text
 * renderer.  See telemetry.h; docs/operations.md lists every metric.
 *
 * A metric family with labels is a small array of series looked up by their
 * label values (linear search: topics, rules, Redis operations and
 * partitions number in the tens).  Histograms keep per-bucket counts and are
 * made cumulative when rendered. */
#include "telemetry.h"

#include <jansson.h>
#include <librdkafka/rdkafka.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Batch processing time: from 1 ms to 10 s. */
static const double batch_bounds[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                      0.25,  0.5,    1,     2.5,  5,     10};
/* One Redis round trip: from 100 µs to 5 s. */
static const double redis_bounds[] = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                      0.05,   0.1,     0.25,   0.5,   1,      2.5,   5};
#define NBATCH_BOUNDS (sizeof(batch_bounds) / sizeof(batch_bounds[0]))
#define NREDIS_BOUNDS (sizeof(redis_bounds) / sizeof(redis_bounds[0]))

#define DEFAULT_STALL_MS        30000
#define DEFAULT_OUTBOX_STUCK_MS 60000

/* One labelled series: a value, or a histogram (counts non-NULL). */
typedef struct series {
    char *l[2]; /* label values, NULL when the family has fewer labels */
    int64_t value;
    uint64_t *counts; /* nbounds + 1 */
    double sum;
} series;

typedef struct family {
    series *s;
    size_t n, cap;
} family;

/* A consumer lag gauge. */
typedef struct lag {
    char *topic;
    int32_t partition;
    int64_t lag;
} lag;

struct pql_telemetry {
    pthread_mutex_t mu;
    family consumed, dead_lettered, late; /* by topic */
    family alerts;                        /* by rule, kind */
    family redis;                         /* histograms by operation */
    family rebalances;                    /* by kind */
    family reloads;                       /* by result */
    uint64_t batch_counts[NBATCH_BOUNDS + 1];
    double batch_sum;
    int64_t fenced;
    lag *lags;
    size_t nlags;
    /* gauges and health facts */
    pql_telemetry_loop loop;
    int64_t heartbeat_ms;      /* last loop iteration or back-off beat; 0: not running yet */
    int redis_up;              /* -1 unknown, 0 down, 1 up: the latest Redis outcome */
    char redis_error[160];     /* why the latest Redis call failed */
    char redis_error_op[32];   /* which operation it was */
    int64_t outbox_since_ms;   /* outbox non-empty and not shrinking since; 0: empty */
    int64_t write_retrying_ms; /* a batch write has been retrying since; 0: not */
    int64_t dlq_failed_ms;     /* last dead letter that could not be delivered */
    int64_t dlq_ok_ms;         /* last one delivered */
    int64_t started_s;         /* wall clock at creation */
    pql_rules *rules;          /* the set in force (a reference) */
    char rules_version[64];
};

uint64_t pql_telemetry_ticks(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static double seconds_since(uint64_t start)
{
    uint64_t now = pql_telemetry_ticks();
    return now > start ? (double)(now - start) / 1e9 : 0.0;
}

static void add(family *f, const char *l0, const char *l1, int64_t n); /* below */

pql_telemetry *pql_telemetry_new(void)
{
    pql_telemetry *t = calloc(1, sizeof(*t));
    if (!t) return NULL;
    if (pthread_mutex_init(&t->mu, NULL)) {
        free(t);
        return NULL;
    }
    t->redis_up = -1;
    t->started_s = pql_now_ms() / 1000;
    add(&t->reloads, "ok", NULL, 0); /* both results show from zero */
    add(&t->reloads, "refused", NULL, 0);
    return t;
}

static void family_free(family *f)
{
    for (size_t i = 0; i < f->n; i++) {
        free(f->s[i].l[0]);
        free(f->s[i].l[1]);
        free(f->s[i].counts);
    }
    free(f->s);
    memset(f, 0, sizeof(*f));
}

static void lags_free(lag *l, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(l[i].topic);
    free(l);
}

void pql_telemetry_destroy(pql_telemetry *t)
{
    if (!t) return;
    family *fs[] = {&t->consumed, &t->dead_lettered, &t->late,   &t->alerts,
                    &t->redis,    &t->rebalances,    &t->reloads};
    for (size_t i = 0; i < sizeof(fs) / sizeof(fs[0]); i++)
        family_free(fs[i]);
    lags_free(t->lags, t->nlags);
    pql_rules_destroy(t->rules);
    pthread_mutex_destroy(&t->mu);
    free(t);
}

static int same(const char *a, const char *b)
{
    return (!a && !b) || (a && b && !strcmp(a, b));
}

/* The series of `f` with label values (l0, l1), created (zero) when absent;
 * a histogram gets nbounds+1 bucket counts.  NULL when out of memory. */
static series *series_of(family *f, const char *l0, const char *l1, size_t nbounds)
{
    for (size_t i = 0; i < f->n; i++)
        if (same(f->s[i].l[0], l0) && same(f->s[i].l[1], l1)) return &f->s[i];
    if (f->n == f->cap) {
        size_t cap = f->cap ? f->cap * 2 : 8;
        series *grown = realloc(f->s, cap * sizeof(*grown));
        if (!grown) return NULL;
        f->s = grown;
        f->cap = cap;
    }
    series *s = &f->s[f->n];
    memset(s, 0, sizeof(*s));
    s->l[0] = l0 ? strdup(l0) : NULL;
    s->l[1] = l1 ? strdup(l1) : NULL;
    s->counts = nbounds ? calloc(nbounds + 1, sizeof(*s->counts)) : NULL;
    if ((l0 && !s->l[0]) || (l1 && !s->l[1]) || (nbounds && !s->counts)) {
        free(s->l[0]);
        free(s->l[1]);
        free(s->counts);
        return NULL;
    }
    f->n++;
    return s;
}

static void add(family *f, const char *l0, const char *l1, int64_t n)
{
    series *s = series_of(f, l0, l1, 0);
    if (s) s->value += n; /* out of memory: the count is lost, nothing else */
}

static void observe(uint64_t *counts, double *sum, const double *bounds, size_t nbounds, double v)
{
    size_t i = 0;
    while (i < nbounds && v > bounds[i])
        i++;
    counts[i]++;
    *sum += v;
}

#define LOCKED(t, body)                                                                            \
    do {                                                                                           \
        if (!(t)) return;                                                                          \
        pthread_mutex_lock(&(t)->mu);                                                              \
        body;                                                                                      \
        pthread_mutex_unlock(&(t)->mu);                                                            \
    } while (0)

void pql_telemetry_events(pql_telemetry *t, const char *topic, int64_t consumed,
                          int64_t dead_lettered, int64_t late)
{
    LOCKED(t, {
        add(&t->consumed, topic, NULL, consumed);
        add(&t->dead_lettered, topic, NULL, dead_lettered);
        add(&t->late, topic, NULL, late);
    });
}

void pql_telemetry_alerts(pql_telemetry *t, const char *rule, const char *kind, int64_t n)
{
    LOCKED(t, add(&t->alerts, rule, kind, n));
}

void pql_telemetry_batch(pql_telemetry *t, const char *const *topics, const pql_task *task)
{
    LOCKED(t, {
        const pql_task_stats *b = &task->built_stats;
        for (int i = 0; i < PQL_NTOPICS; i++) {
            add(&t->consumed, topics[i], NULL, b->topic_consumed[i]);
            add(&t->dead_lettered, topics[i], NULL, b->topic_dead_lettered[i]);
            add(&t->late, topics[i], NULL, b->topic_late[i]);
        }
        for (size_t i = 0; i < task->built_alerts; i++)
            add(&t->alerts, task->alerts[i].rule,
                task->alerts[i].kind == PQL_ALERT_PQL ? "PQL" : "EXPANSION", 1);
    });
}

void pql_telemetry_batch_done(pql_telemetry *t, uint64_t start)
{
    double v = seconds_since(start);
    LOCKED(t, observe(t->batch_counts, &t->batch_sum, batch_bounds, NBATCH_BOUNDS, v));
}

void pql_telemetry_redis(pql_telemetry *t, const char *op, uint64_t start, int ok, const char *err)
{
    double v = seconds_since(start);
    LOCKED(t, {
        series *s = series_of(&t->redis, op, NULL, NREDIS_BOUNDS);
        if (s) observe(s->counts, &s->sum, redis_bounds, NREDIS_BOUNDS, v);
        t->redis_up = ok ? 1 : 0;
        if (!ok) {
            snprintf(t->redis_error, sizeof(t->redis_error), "%s", err ? err : "failed");
            snprintf(t->redis_error_op, sizeof(t->redis_error_op), "%s", op);
        }
    });
}

void pql_telemetry_rebalance(pql_telemetry *t, const char *kind)
{
    LOCKED(t, add(&t->rebalances, kind, NULL, 1));
}

void pql_telemetry_rules_reload(pql_telemetry *t, int ok)
{
    LOCKED(t, {
        add(&t->reloads, "ok", NULL, ok ? 1 : 0);
        add(&t->reloads, "refused", NULL, ok ? 0 : 1);
    });
}

void pql_telemetry_fenced(pql_telemetry *t)
{
    LOCKED(t, t->fenced++);
}

void pql_telemetry_dlq_outcome(pql_telemetry *t, int ok, int64_t now_ms)
{
    LOCKED(t, {
        if (ok)
            t->dlq_ok_ms = now_ms;
        else
            t->dlq_failed_ms = now_ms;
    });
}

void pql_telemetry_loop_done(pql_telemetry *t, const pql_telemetry_loop *l, int64_t now_ms)
{
    LOCKED(t, {
        if (l->outbox <= 0)
            t->outbox_since_ms = 0;
        else if (t->loop.outbox <= 0 || l->outbox < t->loop.outbox || !t->outbox_since_ms)
            t->outbox_since_ms = now_ms; /* began filling, or delivery made progress */
        t->loop = *l;
        t->heartbeat_ms = now_ms;
    });
}

void pql_telemetry_heartbeat(pql_telemetry *t, int64_t now_ms)
{
    LOCKED(t, t->heartbeat_ms = now_ms);
}

void pql_telemetry_write_retrying(pql_telemetry *t, int on, int64_t now_ms)
{
    LOCKED(t, {
        if (!on)
            t->write_retrying_ms = 0;
        else if (!t->write_retrying_ms)
            t->write_retrying_ms = now_ms;
        t->heartbeat_ms = now_ms;
    });
}

static int lag_cmp(const void *a, const void *b)
{
    const lag *x = a, *y = b;
    int c = strcmp(x->topic, y->topic);
    return c ? c : (x->partition > y->partition) - (x->partition < y->partition);
}

int pql_telemetry_kafka_stats(pql_telemetry *t, const char *json, size_t len)
{
    if (!t) return 0;
    json_t *root = json_loadb(json, len, 0, NULL);
    json_t *topics = root ? json_object_get(root, "topics") : NULL;
    if (!json_is_object(topics)) {
        json_decref(root);
        return -1;
    }
    lag *lags = NULL;
    size_t n = 0, cap = 0;
    const char *tname, *pname;
    json_t *tv, *pv;
    json_object_foreach(topics, tname, tv)
    {
        json_object_foreach(json_object_get(tv, "partitions"), pname, pv)
        {
            char *end;
            long part = strtol(pname, &end, 10);
            json_t *lv = json_object_get(pv, "consumer_lag");
            if (*end || part < 0 || !json_is_integer(lv) || json_integer_value(lv) < 0) continue;
            if (n == cap) {
                cap = cap ? cap * 2 : 16;
                lag *grown = realloc(lags, cap * sizeof(*grown));
                if (!grown) goto fail;
                lags = grown;
            }
            lags[n].topic = strdup(tname);
            if (!lags[n].topic) goto fail;
            lags[n].partition = (int32_t)part;
            lags[n++].lag = json_integer_value(lv);
        }
    }
    json_decref(root);
    if (n) qsort(lags, n, sizeof(*lags), lag_cmp);
    pthread_mutex_lock(&t->mu);
    lag *old = t->lags;
    size_t nold = t->nlags;
    t->lags = lags;
    t->nlags = n;
    pthread_mutex_unlock(&t->mu);
    lags_free(old, nold);
    return 0;
fail:
    json_decref(root);
    lags_free(lags, n);
    return -1;
}

void pql_telemetry_set_rules(pql_telemetry *t, pql_rules *r)
{
    if (!t) return;
    pql_rules_retain(r);
    pthread_mutex_lock(&t->mu);
    pql_rules *old = t->rules;
    t->rules = r;
    snprintf(t->rules_version, sizeof(t->rules_version), "%s", r ? pql_rules_version(r) : "");
    pthread_mutex_unlock(&t->mu);
    pql_rules_destroy(old);
}

pql_rules *pql_telemetry_rules(pql_telemetry *t)
{
    if (!t) return NULL;
    pthread_mutex_lock(&t->mu);
    pql_rules *r = pql_rules_retain(t->rules);
    pthread_mutex_unlock(&t->mu);
    return r;
}

int32_t pql_telemetry_partitions(pql_telemetry *t)
{
    if (!t) return 0;
    pthread_mutex_lock(&t->mu);
    int32_t n = t->loop.partitions;
    pthread_mutex_unlock(&t->mu);
    return n;
}

/* ---- health ------------------------------------------------------------ */

static void check(pql_health *h, const char *name, int ok, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void check(pql_health *h, const char *name, int ok, const char *fmt, ...)
{
    if (h->nchecks == PQL_HEALTH_MAX_CHECKS) return;
    pql_health_check *c = &h->checks[h->nchecks++];
    c->name = name;
    c->ok = ok;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->detail, sizeof(c->detail), fmt, ap);
    va_end(ap);
    if (!ok) h->ready = 0;
}

static void health_locked(const pql_telemetry *t, int64_t now, const pql_health_limits *lim,
                          pql_health *h)
{
    int64_t stall = lim && lim->stall_ms > 0 ? lim->stall_ms : DEFAULT_STALL_MS;
    int64_t stuck =
        lim && lim->outbox_stuck_ms > 0 ? lim->outbox_stuck_ms : DEFAULT_OUTBOX_STUCK_MS;
    memset(h, 0, sizeof(*h));
    h->ready = 1;

    if (!t->heartbeat_ms) {
        h->live = 1;
        snprintf(h->live_detail, sizeof(h->live_detail),
                 "starting: the run loop has not begun yet");
    } else if (now - t->heartbeat_ms > stall) {
        snprintf(h->live_detail, sizeof(h->live_detail),
                 "stuck: the run loop has not iterated for %.1f s (limit %.0f s)",
                 (double)(now - t->heartbeat_ms) / 1000.0, (double)stall / 1000.0);
    } else {
        h->live = 1;
        snprintf(h->live_detail, sizeof(h->live_detail), "the run loop iterated %.1f s ago",
                 (double)(now - t->heartbeat_ms) / 1000.0);
    }

    const pql_telemetry_loop *l = &t->loop;
    if (l->assigned > 0)
        check(h, "partitions", 1, "%d of %d input partitions assigned", l->assigned, l->partitions);
    else if (l->partitions > 0)
        check(h, "partitions", 0,
              "none of the %d input partitions is assigned to this member (a rebalance is in "
              "progress, or the group has more members than partitions)",
              l->partitions);
    else
        check(h, "partitions", 0, "no input partition assigned yet (joining the consumer group)");

    if (t->redis_up == 1)
        check(h, "redis", 1, "reachable");
    else if (t->redis_up == 0)
        check(h, "redis", 0, "unreachable: %s failed: %s", t->redis_error_op, t->redis_error);
    else
        check(h, "redis", 0, "not contacted yet");

    check(h, "run_loop", t->heartbeat_ms && h->live, "%s",
          t->heartbeat_ms ? h->live_detail : "not running yet");

    if (l->alerts_retrying > 0)
        check(h, "alert_delivery", 0,
              "%lld alerts failed to reach the alert topic and are being retried",
              (long long)l->alerts_retrying);
    else
        check(h, "alert_delivery", 1, "no alert waiting for a retry");

    if (t->dlq_failed_ms && t->dlq_failed_ms >= t->dlq_ok_ms)
        check(h, "dlq_delivery", 0,
              "a dead letter could not be delivered %.1f s ago; its batch is re-read",
              (double)(now - t->dlq_failed_ms) / 1000.0);
    else
        check(h, "dlq_delivery", 1, "no failed dead letter");

    if (t->outbox_since_ms && now - t->outbox_since_ms > stuck)
        check(h, "outbox", 0, "%lld alerts in the outbox, none delivered for %.1f s (limit %.0f s)",
              (long long)l->outbox, (double)(now - t->outbox_since_ms) / 1000.0,
              (double)stuck / 1000.0);
    else
        check(h, "outbox", 1, "%lld alerts waiting for delivery", (long long)l->outbox);

    if (t->write_retrying_ms)
        check(h, "batch_write", 0, "a batch write to Redis has been retrying for %.1f s",
              (double)(now - t->write_retrying_ms) / 1000.0);
    else
        check(h, "batch_write", 1, "batch writes go through");
}

void pql_telemetry_health(pql_telemetry *t, int64_t now_ms, const pql_health_limits *lim,
                          pql_health *out)
{
    pthread_mutex_lock(&t->mu);
    health_locked(t, now_ms, lim, out);
    pthread_mutex_unlock(&t->mu);
}

/* ---- the Prometheus text format ---------------------------------------- */

static int put(pql_buf *out, const char *s)
{
    return pql_buf_append(out, s, strlen(s));
}

static int put_escaped(pql_buf *out, const char *s, int quotes)
{
    for (; *s; s++) {
        const char *e = *s == '\\'            ? "\\\\"
                        : *s == '\n'          ? "\\n"
                        : quotes && *s == '"' ? "\\\""
                                              : NULL;
        if (e ? put(out, e) : pql_buf_append(out, s, 1)) return -1;
    }
    return 0;
}

/* A sample value: integers exactly, others with 9 significant digits. */
static int put_value(pql_buf *out, double v)
{
    if (isnan(v)) return put(out, "NaN");
    if (isinf(v)) return put(out, v > 0 ? "+Inf" : "-Inf");
    if (v == floor(v) && fabs(v) < 1e15) return pql_buf_printf(out, "%.0f", v);
    return pql_buf_printf(out, "%.9g", v);
}

int pql_prom_family(pql_buf *out, const char *name, const char *type, const char *help)
{
    if (pql_buf_printf(out, "# HELP %s ", name) || put_escaped(out, help, 0) ||
        pql_buf_printf(out, "\n# TYPE %s %s\n", name, type))
        return -1;
    return 0;
}

int pql_prom_label_value(pql_buf *out, const char *s)
{
    return put_escaped(out, s, 1);
}

/* name{k="v",…,extra_key="extra"} — extra_key NULL: none. */
static int put_name_labels(pql_buf *out, const char *name, const char *suffix,
                           const char *const *labels, size_t nlabels, const char *extra_key,
                           const char *extra)
{
    if (put(out, name) || put(out, suffix)) return -1;
    if (!nlabels && !extra_key) return 0;
    if (put(out, "{")) return -1;
    for (size_t i = 0; i < nlabels; i++)
        if ((i && put(out, ",")) || put(out, labels[2 * i]) || put(out, "=\"") ||
            put_escaped(out, labels[2 * i + 1], 1) || put(out, "\""))
            return -1;
    if (extra_key && ((nlabels && put(out, ",")) || put(out, extra_key) || put(out, "=\"") ||
                      put(out, extra) || put(out, "\"")))
        return -1;
    return put(out, "}");
}

int pql_prom_sample(pql_buf *out, const char *name, const char *const *labels, size_t nlabels,
                    double value)
{
    if (put_name_labels(out, name, "", labels, nlabels, NULL, NULL) || put(out, " ") ||
        put_value(out, value) || put(out, "\n"))
        return -1;
    return 0;
}

int pql_prom_histogram(pql_buf *out, const char *name, const char *const *labels, size_t nlabels,
                       const double *bounds, const uint64_t *counts, size_t nbounds, double sum)
{
    uint64_t cum = 0;
    char le[32];
    for (size_t i = 0; i <= nbounds; i++) {
        cum += counts[i];
        if (i < nbounds)
            snprintf(le, sizeof(le), "%g", bounds[i]);
        else
            snprintf(le, sizeof(le), "+Inf");
        if (put_name_labels(out, name, "_bucket", labels, nlabels, "le", le) ||
            pql_buf_printf(out, " %llu\n", (unsigned long long)cum))
            return -1;
    }
    if (put_name_labels(out, name, "_sum", labels, nlabels, NULL, NULL) || put(out, " ") ||
        put_value(out, sum) || put(out, "\n") ||
        put_name_labels(out, name, "_count", labels, nlabels, NULL, NULL) ||
        pql_buf_printf(out, " %llu\n", (unsigned long long)cum))
        return -1;
    return 0;
}

/* A family of counters or gauges with up to two labels named k0, k1. */
static int render_family(pql_buf *out, const char *name, const char *type, const char *help,
                         const family *f, const char *k0, const char *k1)
{
    if (pql_prom_family(out, name, type, help)) return -1;
    for (size_t i = 0; i < f->n; i++) {
        const char *labels[4] = {k0, f->s[i].l[0], k1, f->s[i].l[1]};
        if (pql_prom_sample(out, name, labels, k1 ? 2 : k0 ? 1 : 0, (double)f->s[i].value))
            return -1;
    }
    return 0;
}

static int render_scalar(pql_buf *out, const char *name, const char *type, const char *help,
                         double v)
{
    return pql_prom_family(out, name, type, help) || pql_prom_sample(out, name, NULL, 0, v) ? -1
                                                                                            : 0;
}

static int render_locked(const pql_telemetry *t, int64_t now_ms, pql_buf *out)
{
    pql_health h;
    health_locked(t, now_ms, NULL, &h);
    const char *build[] = {"version", PQL_VERSION, "librdkafka", rd_kafka_version_str()};
    const char *ruleset[] = {"version", t->rules_version};

    if (pql_prom_family(out, "pqlstream_build_info", "gauge",
                        "Build information: the pqlstream and librdkafka versions (always 1).") ||
        pql_prom_sample(out, "pqlstream_build_info", build, 2, 1) ||
        render_scalar(out, "pqlstream_start_time_seconds", "gauge",
                      "When the process started, in seconds since the epoch.",
                      (double)t->started_s) ||
        render_family(out, "pqlstream_events_consumed_total", "counter",
                      "Input messages consumed (applied, dead-lettered or too late), by topic; "
                      "counted when their batch is written to Redis.",
                      &t->consumed, "topic", NULL) ||
        render_family(out, "pqlstream_events_dead_lettered_total", "counter",
                      "Input messages sent to the dead-letter topic, by source topic.",
                      &t->dead_lettered, "topic", NULL) ||
        render_family(out, "pqlstream_events_late_total", "counter",
                      "Input messages older than their windows' reach plus the allowed "
                      "lateness (they change nothing), by topic.",
                      &t->late, "topic", NULL) ||
        render_family(out, "pqlstream_alerts_total", "counter",
                      "Alerts fired and written to the outbox, by rule and kind (PQL, "
                      "EXPANSION).",
                      &t->alerts, "rule", "kind") ||
        pql_prom_family(out, "pqlstream_batch_duration_seconds", "histogram",
                        "Time to apply a polled batch and write it to Redis.") ||
        pql_prom_histogram(out, "pqlstream_batch_duration_seconds", NULL, 0, batch_bounds,
                           t->batch_counts, NBATCH_BOUNDS, t->batch_sum) ||
        pql_prom_family(out, "pqlstream_redis_duration_seconds", "histogram",
                        "Redis round trips by operation (commit, load, claim, outbox_scan, "
                        "ping, account), failed ones included."))
        return -1;
    for (size_t i = 0; i < t->redis.n; i++) {
        const char *labels[] = {"operation", t->redis.s[i].l[0]};
        if (pql_prom_histogram(out, "pqlstream_redis_duration_seconds", labels, 1, redis_bounds,
                               t->redis.s[i].counts, NREDIS_BOUNDS, t->redis.s[i].sum))
            return -1;
    }
    if (render_scalar(out, "pqlstream_redis_up", "gauge",
                      "1 when the latest Redis call succeeded, 0 when it failed.",
                      t->redis_up == 1) ||
        render_scalar(out, "pqlstream_assigned_partitions", "gauge",
                      "Input partitions (of each co-partitioned input topic) this member owns and "
                      "has claimed.",
                      t->loop.assigned) ||
        pql_prom_family(out, "pqlstream_consumer_lag", "gauge",
                        "Messages between the consumed position and the end of the partition, "
                        "from librdkafka statistics."))
        return -1;
    for (size_t i = 0; i < t->nlags; i++) {
        char part[16];
        snprintf(part, sizeof(part), "%d", (int)t->lags[i].partition);
        const char *labels[] = {"topic", t->lags[i].topic, "partition", part};
        if (pql_prom_sample(out, "pqlstream_consumer_lag", labels, 2, (double)t->lags[i].lag))
            return -1;
    }
    if (render_scalar(out, "pqlstream_cached_accounts", "gauge",
                      "Accounts held in memory by this member's tasks.",
                      (double)t->loop.cached_accounts) ||
        render_scalar(out, "pqlstream_cached_account_bytes", "gauge",
                      "Heap bytes the cached accounts hold, as the caches count them "
                      "(bounded by cache.max_memory).",
                      (double)t->loop.cached_bytes) ||
        render_family(out, "pqlstream_rebalances_total", "counter",
                      "Consumer group rebalance events, by kind (assign, revoke).", &t->rebalances,
                      "kind", NULL) ||
        render_scalar(out, "pqlstream_outbox_alerts", "gauge",
                      "Alerts written to the Redis outbox of owned partitions and not yet "
                      "delivered to the alert topic.",
                      (double)t->loop.outbox) ||
        render_scalar(out, "pqlstream_alerts_retrying", "gauge",
                      "Alert produces that failed and wait for a retry.",
                      (double)t->loop.alerts_retrying) ||
        render_family(out, "pqlstream_rule_reloads_total", "counter",
                      "Rule set reloads, by result (ok, refused: the running set stays).",
                      &t->reloads, "result", NULL) ||
        pql_prom_family(out, "pqlstream_ruleset_info", "gauge",
                        "The rule set in force, by version (always 1).") ||
        (t->rules_version[0] && pql_prom_sample(out, "pqlstream_ruleset_info", ruleset, 1, 1)) ||
        render_scalar(out, "pqlstream_fenced_batches_total", "counter",
                      "Batch writes refused because another member owns the partition now.",
                      (double)t->fenced) ||
        render_scalar(out, "pqlstream_ready", "gauge",
                      "1 when /readyz answers 200: partitions assigned, Redis reachable, "
                      "nothing stuck.",
                      h.ready))
        return -1;
    return 0;
}

int pql_telemetry_render(pql_telemetry *t, int64_t now_ms, pql_buf *out)
{
    pthread_mutex_lock(&t->mu);
    int rc = render_locked(t, now_ms, out);
    pthread_mutex_unlock(&t->mu);
    return rc;
}
