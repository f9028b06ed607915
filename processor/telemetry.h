/* telemetry.h — what the SRE surface reports: a metrics registry and the
 * health facts behind /healthz and /readyz (DESIGN §6, docs/operations.md).
 *
 * Two threads meet here.  The pipeline thread writes: counts are added once
 * per batch (never per event), gauges are set once per loop iteration, and
 * librdkafka's statistics (consumer lag) arrive every
 * statistics.interval.ms.  The HTTP thread reads: it renders the registry as
 * Prometheus text and evaluates health.  One mutex guards everything; every
 * call holds it for a few microseconds.
 *
 * The renderer is pure (a registry in, text out, no I/O), so unit tests check
 * its exact output.  Every writer accepts a NULL registry and does nothing,
 * so the pipeline's hooks need no `if`.
 *
 * The registry also holds the current rule set for the HTTP thread: the
 * pipeline publishes each set it swaps in (pql_telemetry_set_rules), the HTTP
 * thread takes a reference (pql_telemetry_rules) for the length of a request,
 * so a hot reload never frees a set that a request is reading. */
#ifndef PQL_TELEMETRY_H
#define PQL_TELEMETRY_H

#include "common.h"
#include "rules.h"
#include "task.h"

typedef struct pql_telemetry pql_telemetry;

/** @returns an empty registry, or NULL when out of memory. */
pql_telemetry *pql_telemetry_new(void);
/** Frees the registry and releases its rule set.  NULL is fine. */
void pql_telemetry_destroy(pql_telemetry *t);

/** A monotonic clock in nanoseconds: take it before a timed operation and
 *  pass it to pql_telemetry_batch_done / pql_telemetry_redis. */
uint64_t pql_telemetry_ticks(void);

/* ---- counters (the pipeline thread) ---------------------------------- */

/** Adds to the per-topic event counters: consumed (applied, dead-lettered or
 *  skipped), dead-lettered, too late.  Adding zeros registers the topic. */
void pql_telemetry_events(pql_telemetry *t, const char *topic, int64_t consumed,
                          int64_t dead_lettered, int64_t late);

/** Adds `n` alerts fired by `rule` of `kind` ("PQL" | "EXPANSION"). */
void pql_telemetry_alerts(pql_telemetry *t, const char *rule, const char *kind, int64_t n);

/** Counts a batch that Redis has just applied: its per-topic events
 *  (task->built_stats, topic names in `topics`, PQL_NTOPICS of them) and its
 *  alerts (the first task->built_alerts of task->alerts).  Call before
 *  pql_task_committed() resets them. */
void pql_telemetry_batch(pql_telemetry *t, const char *const *topics, const pql_task *task);

/** Observes a batch's processing time (apply and write), from `start` ticks. */
void pql_telemetry_batch_done(pql_telemetry *t, uint64_t start);

/** Observes one Redis round trip of operation `op` ("commit", "load",
 *  "claim", "outbox_scan", "ping", "account") from `start` ticks; `ok` sets
 *  the Redis-up fact, `err` (NULL is fine) says why it failed. */
void pql_telemetry_redis(pql_telemetry *t, const char *op, uint64_t start, int ok, const char *err);

/** Counts a rebalance event, `kind` "assign" or "revoke". */
void pql_telemetry_rebalance(pql_telemetry *t, const char *kind);

/** Counts a rule reload: accepted (ok) or refused. */
void pql_telemetry_rules_reload(pql_telemetry *t, int ok);

/** Counts a batch refused by Redis because another member owns the partition. */
void pql_telemetry_fenced(pql_telemetry *t);

/** A dead letter was acknowledged (ok) or could not be delivered. */
void pql_telemetry_dlq_outcome(pql_telemetry *t, int ok, int64_t now_ms);

/* ---- gauges and liveness (the pipeline thread) ----------------------- */

/* What the run loop reports once per iteration. */
typedef struct pql_telemetry_loop {
    int32_t assigned;        /* input partition numbers owned (tasks) */
    int32_t partitions;      /* input partitions of the topics */
    int64_t cached_accounts; /* accounts in the task caches */
    int64_t cached_bytes;    /* heap bytes they hold, as the caches count them (cache.h) */
    int64_t outbox;          /* alerts in the owned outboxes, not yet delivered */
    int64_t alerts_retrying; /* alert produces waiting for a retry */
} pql_telemetry_loop;

/** The run loop iterated at now_ms (liveness) and reports its gauges. */
void pql_telemetry_loop_done(pql_telemetry *t, const pql_telemetry_loop *l, int64_t now_ms);

/** The run loop is alive but waiting (a retry back-off): liveness only. */
void pql_telemetry_heartbeat(pql_telemetry *t, int64_t now_ms);

/** A batch write to Redis is being retried (on) or went through (off). */
void pql_telemetry_write_retrying(pql_telemetry *t, int on, int64_t now_ms);

/** Reads librdkafka's statistics JSON (stats_cb) and replaces the consumer
 *  lag gauges with topics.<t>.partitions.<p>.consumer_lag, skipping
 *  partition -1 and negative (unknown) lags.  @returns 0, or -1 when the
 *  text is not the expected JSON (the gauges are kept). */
int pql_telemetry_kafka_stats(pql_telemetry *t, const char *json, size_t len);

/** Publishes the rule set now in force (takes a reference; releases the one
 *  it held).  NULL clears it. */
void pql_telemetry_set_rules(pql_telemetry *t, pql_rules *r);

/** @returns a reference to the rule set in force (release it with
 *  pql_rules_destroy), or NULL when none was published. */
pql_rules *pql_telemetry_rules(pql_telemetry *t);

/* ---- reading (the HTTP thread) --------------------------------------- */

/** @returns the input partition count the run loop last reported, 0 before. */
int32_t pql_telemetry_partitions(pql_telemetry *t);

/* Limits of health; 0 picks the default. */
typedef struct pql_health_limits {
    int64_t stall_ms;        /* no loop iteration for this long: not live (30 s) */
    int64_t outbox_stuck_ms; /* outbox non-empty and not shrinking this long (60 s) */
} pql_health_limits;

#define PQL_HEALTH_MAX_CHECKS 8

typedef struct pql_health_check {
    const char *name; /* "partitions", "redis", "run_loop", "alert_delivery",
                         "dlq_delivery", "outbox", "batch_write" */
    int ok;
    char detail[200]; /* for a person: what holds, or what is wrong */
} pql_health_check;

typedef struct pql_health {
    int live;              /* /healthz */
    char live_detail[200]; /* why (not) */
    int ready;             /* /readyz: every check ok */
    pql_health_check checks[PQL_HEALTH_MAX_CHECKS];
    size_t nchecks;
} pql_health;

/** Evaluates liveness and readiness at now_ms.  `lim` NULL: defaults. */
void pql_telemetry_health(pql_telemetry *t, int64_t now_ms, const pql_health_limits *lim,
                          pql_health *out);

/** Appends the registry in the Prometheus text format 0.0.4 to `out`
 *  (pqlstream_ready is evaluated at now_ms with default limits).
 *  @returns 0, or -1 when out of memory (out holds a prefix). */
int pql_telemetry_render(pql_telemetry *t, int64_t now_ms, pql_buf *out);

/* ---- the renderer's pieces (pure; exposed for tests) ----------------- */

/** Appends "# HELP name help\n# TYPE name type\n" (help escaped). */
int pql_prom_family(pql_buf *out, const char *name, const char *type, const char *help);

/** Appends `s` escaped as a label value (\\, \", \n). */
int pql_prom_label_value(pql_buf *out, const char *s);

/** Appends one sample: name{k1="v1",k2="v2"} value.  `labels` holds
 *  nlabels (key, value) pairs; values are escaped. */
int pql_prom_sample(pql_buf *out, const char *name, const char *const *labels, size_t nlabels,
                    double value);

/** Appends a histogram's samples: name_bucket{…,le="…"} cumulative for each
 *  bound and +Inf, name_sum, name_count.  counts[i] is the number of
 *  observations in (bounds[i-1], bounds[i]]; counts[nbounds] those above. */
int pql_prom_histogram(pql_buf *out, const char *name, const char *const *labels, size_t nlabels,
                       const double *bounds, const uint64_t *counts, size_t nbounds, double sum);

#endif
