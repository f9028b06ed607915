/* sink.h — Kafka out: alerts, dead letters and metric aggregates, through one
 * idempotent producer.
 *
 * An I/O edge.  Alerts are produced keyed by account id; the sink retries a
 * failed alert delivery forever (with back-off) because the alert is in the
 * partition's outbox and must reach the topic — no alert is ever lost.  Dead
 * letters carry the original key and value unchanged, the original headers,
 * and pql.error, pql.error.code, pql.source.topic, pql.source.partition,
 * pql.source.offset headers.  Delivery outcomes come back through callbacks
 * called from pql_sink_poll()/pql_sink_flush() on the caller's thread. */
#ifndef PQL_SINK_H
#define PQL_SINK_H

#include "alert.h"
#include "common.h"
#include "config.h"

#include <librdkafka/rdkafka.h>

typedef struct pql_sink pql_sink;

typedef struct pql_sink_callbacks {
    /* An alert reached the topic. */
    void (*alert_delivered)(void *opaque, int32_t partition, uint64_t generation,
                            const char *alert_id, const char *payload, size_t payload_len);
    /* A dead letter reached the DLQ topic (ok=1) or could not (ok=0). */
    void (*dlq_done)(void *opaque, int32_t partition, uint64_t generation, int ok);
    void *opaque;
    /* A metric aggregate reached the metric topic (ok=1) or could not (ok=0). */
    void (*metric_done)(void *opaque, int ok);
} pql_sink_callbacks;

/** Creates the producer for `brokers` with the kafka.* pass-through of cfg.
 *  @returns NULL with a reason. */
pql_sink *pql_sink_new(const pql_config *cfg, const char *brokers, const pql_sink_callbacks *cb,
                       char *errstr, size_t errstr_size);

/** Flushes what is in flight (up to timeout_ms) and frees.  NULL is fine. */
void pql_sink_destroy(pql_sink *s, int timeout_ms);

/** Produces an alert of task (partition, generation).  Copies everything. */
pql_err pql_sink_alert(pql_sink *s, int32_t partition, uint64_t generation, const char *alert_id,
                       const char *key, size_t key_len, const char *payload, size_t payload_len);

/** Dead-letters `msg` (read from partition `partition` of its topic) with a
 *  reason.  The caller must not commit past msg until dlq_done says ok. */
pql_err pql_sink_dlq(pql_sink *s, uint64_t generation, const rd_kafka_message_t *msg, pql_err code,
                     const char *reason);

/** Produces a metric aggregate onto topics.metrics (copied).  No retry: the
 *  outcome comes back through metric_done.  @returns PQL_OK, or PQL_ERR_IO
 *  when librdkafka refused it at once (queue full). */
pql_err pql_sink_metric(pql_sink *s, const char *key, size_t key_len, const void *payload,
                        size_t payload_len);

/** Serves delivery reports and re-sends failed alerts whose back-off passed. */
void pql_sink_poll(pql_sink *s, int timeout_ms);

/** Waits until nothing is in flight or timeout.  @returns messages still in flight. */
int pql_sink_flush(pql_sink *s, int timeout_ms);

/** Alerts waiting for a retry (for readiness and /metrics). */
size_t pql_sink_retrying(const pql_sink *s);

#endif
