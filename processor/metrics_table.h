/* metrics_table.h — from counters to figures (DESIGN §4).  Pure core.
 *
 * A pql_metric_table holds one period of one granularity: the counters of
 * that period's hash (metrics.h, 6.) summed over every partition, grouped by
 * segment.  Its figures are the ones of docs/metrics.md; a MetricAggregate
 * record (schemas/MetricAggregate.avsc) carries them, keyed
 * "granularity|period_start|segment_kind|segment_value". */
#ifndef PQL_METRICS_TABLE_H
#define PQL_METRICS_TABLE_H

#include "common.h"
#include "metrics.h"

#include <jansson.h>

/* A nullable number: a rate with a zero denominator, a percentile of nothing. */
typedef struct pql_opt {
    int has;
    double v;
} pql_opt;

typedef struct pql_metric_figures {
    int64_t signups, signups_qualified, pqls_new, pqls_open;
    pql_opt pql_rate;
    int64_t time_to_pql_count;
    pql_opt time_to_pql_p50_ms, time_to_pql_p90_ms;
    int64_t conversions, pql_conversions, non_pql_conversions, pqls_converted;
    pql_opt pql_to_paid_rate;
    int64_t signups_not_qualified, signups_not_qualified_converted;
    pql_opt non_pql_to_paid_rate;
    int64_t expansion_alerts;
} pql_metric_figures;

typedef struct pql_metric_table pql_metric_table;

/** @returns an empty table of the period starting at `start`, or NULL. */
pql_metric_table *pql_metric_table_new(pql_granularity g, int64_t start);
void pql_metric_table_destroy(pql_metric_table *t);

pql_granularity pql_metric_table_granularity(const pql_metric_table *t);
int64_t pql_metric_table_start(const pql_metric_table *t);

/** Adds one counter field ("channel|organic|signups", "all|all|ttp:57") of
 *  a partition's hash.  @returns 0, or -1 for a field it does not know
 *  (ignored: written by a newer version). */
int pql_metric_table_add(pql_metric_table *t, const char *field, size_t field_len, int64_t value);

/** Adds every counter of `src` into `dst` (counts are additive over
 *  periods: the figures of the sum are those of the union of the periods).
 *  @returns 0, or -1 when out of memory. */
int pql_metric_table_merge(pql_metric_table *dst, const pql_metric_table *src);

/** Segments present, sorted by kind then value. */
size_t pql_metric_table_size(const pql_metric_table *t);
/** Segment i: its kind and value (owned by the table), and its figures. */
void pql_metric_table_get(const pql_metric_table *t, size_t i, pql_segment *kind,
                          const char **value, pql_metric_figures *f);
/** The index of segment (kind, value), or -1. */
int pql_metric_table_find(const pql_metric_table *t, pql_segment kind, const char *value);

/** The nearest-rank percentile `pct` (1..100) of a histogram given as
 *  `n` (bucket, count) pairs sorted by bucket, as its bucket's value
 *  (metrics.h, 5.).  has = 0 when the histogram is empty. */
pql_opt pql_hist_percentile(const int *buckets, const int64_t *counts, size_t n, int pct);

/* One emitted record. */
typedef struct pql_metric_record {
    pql_granularity granularity;
    int64_t period_start, period_end;
    pql_segment kind;
    const char *value;
    pql_metric_figures f;
    int64_t emitted_at;
} pql_metric_record;

/** Appends the record's key "day|2024-01-01T00:00:00Z|channel|organic". */
int pql_metric_key(const pql_metric_record *r, pql_buf *out);

/** Appends the Avro binary encoding (schemas/MetricAggregate.avsc) or, with
 *  `json`, a JSON object with the same field names (nulls as null). */
pql_err pql_metric_encode(const pql_metric_record *r, int json, pql_buf *out, char *errstr,
                          size_t errstr_size);

/** Decodes an Avro MetricAggregate into a JSON object (tests, tools).
 *  @returns a new reference, or NULL with a reason. */
json_t *pql_metric_avro_to_json(const void *buf, size_t len, char *errstr, size_t errstr_size);

/* ---- for people (the metrics command, the embedded default's summary) ---- */

/** "45s", "12m", "3.5h", "2.1d"; "—" when absent. */
void pql_metric_format_duration(pql_opt ms, char *out, size_t size);
/** "42.0%"; "—" when absent (zero denominator). */
void pql_metric_format_rate(pql_opt rate, char *out, size_t size);
/** The PQL vs non-PQL lift, pql_to_paid_rate / non_pql_to_paid_rate, as
 *  "6.9×"; "—" when either is absent, "∞" when only the PQL side converts. */
void pql_metric_format_lift(const pql_metric_figures *f, char *out, size_t size);

#endif
