/* pipeline.h — the main job: consume, process, write, produce (pqlstream run).
 *
 * Data flow of one batch (see task.c for the lifecycle and the exactly-once
 * argument):
 *
 *   Kafka (usage p, accounts p) --poll up to batch.max_messages / max_ms-->
 *     1. route each message to task p; skip offsets already processed
 *     2. prefetch: accounts of the batch missing from the cache, one
 *        pipelined HGETALL round trip per task (store.h)
 *     3. decode (decode.h) + validate; bad input → DLQ (sink.h), else apply
 *        to the account (account.h): windows, rules, alerts
 *     4. wait for the batch's dead letters; one atomic Lua write per task,
 *        all tasks pipelined in one round trip (store.h)
 *     5. produce the batch's alerts (already in the outbox); commit offsets
 *        to Kafka for lag tools
 *
 * Step 1 keeps per-task inboxes and merges the two partitions of a task by
 * record timestamp (account updates first on ties), so the sequence applied
 * is a function of the logs: an interrupted run applies exactly what an
 * uninterrupted one does.  A side that has no message waits for one, or for
 * its end-of-partition event, up to processing.max_task_idle.
 *
 * Group: the group assigns usage partitions (cooperative-sticky by default);
 * account-update partition p follows usage partition p.  Assignment claims
 * the partition in Redis (epoch bump: older owners are fenced) and seeks to
 * the offsets stored with the state; revocation finishes the batch (or
 * abandons it when Redis is down) and drops the partition's cache.
 *
 * Redis unavailable (any step): every partition is paused and processing
 * stops; the loop keeps calling rd_kafka_consumer_poll (so the membership
 * survives an outage of any length) and retries with back-off — unclaimed
 * partitions are claimed, the pending batches written as built (safe: writes
 * are idempotent by seq), a batch whose accounts could not be loaded is
 * re-read — then resumes. */
#ifndef PQL_PIPELINE_H
#define PQL_PIPELINE_H

#include "config.h"
#include "rules.h"
#include "telemetry.h"

#include <signal.h>

typedef struct pql_pipeline pql_pipeline;

/** Connects to Kafka (`brokers`) and Redis (`redis_url`), checks that the
 *  input topics exist and are co-partitioned, and subscribes.  Takes
 *  ownership of `rules` on success (it is replaced on reload).
 *  @returns NULL with a reason a person can act on (rules not taken). */
pql_pipeline *pql_pipeline_new(const pql_config *cfg, const char *brokers, const char *redis_url,
                               pql_rules *rules, char *errstr, size_t errstr_size);

/** Feeds `tel` (not owned; it must outlive the pipeline) from now on: counts
 *  per batch, Redis latencies, rebalances, consumer lag, liveness and the
 *  facts of readiness (telemetry.h).  Publishes each reloaded rule set. */
void pql_pipeline_set_telemetry(pql_pipeline *p, pql_telemetry *tel);

/** Prints each delivered alert, and a summary of each metric emission, to
 *  stdout for a person (embedded default). */
void pql_pipeline_print_alerts(pql_pipeline *p, int on);

/** Runs until *stop becomes non-zero, then finishes the batch, flushes,
 *  commits and leaves the group.  Whenever *reload is non-zero (SIGHUP) the
 *  rule files are loaded again and, if valid, swapped in at the next batch
 *  boundary; an invalid set is logged with file:line:col and the running set
 *  stays.  @returns 0 on a clean stop. */
int pql_pipeline_run(pql_pipeline *p, volatile sig_atomic_t *stop, volatile sig_atomic_t *reload);

/** Frees everything.  NULL is fine. */
void pql_pipeline_destroy(pql_pipeline *p);

#endif
