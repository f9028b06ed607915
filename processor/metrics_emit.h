/* metrics_emit.h — emission of metric aggregates (DESIGN §4).  An I/O edge.
 *
 * Every metrics.interval the member that owns partition 0 of the usage topic
 * sums every partition's counters (metrics.h, 6.) and produces one
 * MetricAggregate record per (granularity, period, segment) onto
 * topics.metrics, keyed "granularity|period_start|segment_kind|segment_value"
 * so a compacted topic keeps the latest value of each cell.  Only periods
 * whose summed version changed since the last successful emission are sent,
 * plus the open ones (the periods holding the wall clock; an open period with
 * no counts yet is sent as an all-zero `all` row).
 *
 * The emitter runs on its own thread with its own Redis connection and its
 * own producer, so the event path never waits for it.  A new owner re-emits
 * everything once (it does not know what its predecessor sent).  Before
 * producing, it checks that partition 0's epoch in Redis is still the one it
 * claimed, so a member that lost partition 0 stops emitting; a record sent
 * by a member in the instant before it learns this carries figures read from
 * Redis, never stale in-memory state, and the owner's next emission of a
 * changed period supersedes it. */
#ifndef PQL_METRICS_EMIT_H
#define PQL_METRICS_EMIT_H

#include "config.h"
#include "metrics.h"
#include "metrics_table.h"
#include "store.h"

/* A period with counters, and the sum of its versions over the partitions. */
typedef struct pql_metric_period {
    pql_granularity granularity;
    int64_t start;
    int64_t version;
} pql_metric_period;

/** Reads the version hashes of partitions 0..npartitions-1 (one pipelined
 *  round trip) into *out (malloc'ed, sorted by granularity then start; the
 *  caller frees).  @returns PQL_OK or PQL_ERR_IO with a reason. */
pql_err pql_metrics_read_periods(pql_store *s, const char *group, int32_t npartitions,
                                 pql_metric_period **out, size_t *n, char *errstr,
                                 size_t errstr_size);

/** Reads and sums the counters of `n` periods over every partition
 *  (pipelined, in chunks).  tables[i] receives a new table (caller destroys)
 *  for periods[i].  @returns PQL_OK, or PQL_ERR_IO with tables all NULL. */
pql_err pql_metrics_read_tables(pql_store *s, const char *group, int32_t npartitions,
                                const pql_metric_period *periods, size_t n,
                                pql_metric_table **tables, char *errstr, size_t errstr_size);

typedef struct pql_metrics_emitter pql_metrics_emitter;

/** Connects (Redis at redis_url, a producer at brokers) and starts the
 *  emitter thread for a group of `npartitions` partitions; it emits only
 *  while it owns partition 0.  @returns NULL with a reason. */
pql_metrics_emitter *pql_metrics_emitter_start(const pql_config *cfg, const char *brokers,
                                               const char *redis_url, int32_t npartitions,
                                               char *errstr, size_t errstr_size);

/** Partition 0 was claimed with `epoch` (> 0), or lost (0).  Thread-safe. */
void pql_metrics_emitter_own(pql_metrics_emitter *e, int64_t epoch);

/** Prints a one-line summary of each changed week (segment all) to stdout
 *  after every emission (the embedded default). */
void pql_metrics_emitter_print(pql_metrics_emitter *e, int on);

/** Stops the thread (an emission in progress finishes), flushes the
 *  producer and frees.  NULL is fine. */
void pql_metrics_emitter_stop(pql_metrics_emitter *e);

#endif
