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
 * Redis unavailable at step 4: the consumer is paused, the same batch is
 * retried with back-off (safe: writes are idempotent by seq), the group
 * membership kept alive by polling; then resumed. */
#ifndef PQL_PIPELINE_H
#define PQL_PIPELINE_H

#include "config.h"
#include "rules.h"

#include <signal.h>

typedef struct pql_pipeline pql_pipeline;

/** Connects to Kafka (`brokers`) and Redis (`redis_url`), checks that the
 *  input topics exist and are co-partitioned, and subscribes.
 *  @returns NULL with a reason a person can act on. */
pql_pipeline *pql_pipeline_new(const pql_config *cfg, const char *brokers, const char *redis_url,
                               pql_rules *rules, char *errstr, size_t errstr_size);

/** Prints each delivered alert to stdout for a person (embedded default). */
void pql_pipeline_print_alerts(pql_pipeline *p, int on);

/** Runs until *stop becomes non-zero, then finishes the batch, flushes,
 *  commits and leaves the group.  @returns 0 on a clean stop. */
int pql_pipeline_run(pql_pipeline *p, volatile sig_atomic_t *stop);

/** Frees everything.  NULL is fine. */
void pql_pipeline_destroy(pql_pipeline *p);

#endif
