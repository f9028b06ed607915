/* task.h — a task per input partition number (DESIGN §5).
 *
 * Task p owns partition p of both co-partitioned input topics (usage events
 * and account updates): their accounts' in-memory state, the fencing epoch
 * and write sequence from its claim, the offsets it has consumed and those
 * Redis holds, and the alerts of the batch in progress.  The task does no
 * I/O: pipeline.c feeds it decoded events and moves its batches to Redis
 * (store.h) and its alerts to Kafka (sink.h).  See task.c for the lifecycle
 * and the exactly-once argument. */
#ifndef PQL_TASK_H
#define PQL_TASK_H

#include "account.h"
#include "cache.h"
#include "decode.h"
#include "metrics.h"
#include "rules.h"
#include "store.h"

#define PQL_TOPIC_USAGE    0
#define PQL_TOPIC_ACCOUNTS 1
#define PQL_NTOPICS        2

typedef enum pql_task_state {
    PQL_TASK_ASSIGNED = 0, /* created on assignment, not yet claimed */
    PQL_TASK_RUNNING,      /* claimed: consuming and writing */
    PQL_TASK_REVOKING,     /* partition being taken away: finishing its batch */
    PQL_TASK_CLOSED,       /* fenced or revoked: writes nothing more */
} pql_task_state;

/* An alert produced by this batch, or re-sent from the outbox. */
typedef struct pql_task_alert {
    char id[PQL_ALERT_ID_LEN + 1];
    char *key; /* account id */
    size_t key_len;
    char *payload;
    size_t payload_len;
    char *rule;          /* the rule that fired (owned copy: outlives a rule reload) */
    pql_alert_kind kind; /* PQL or EXPANSION */
} pql_task_alert;

/* Per-partition counters, written with the batch (exactly once); the
 * by-topic split (index PQL_TOPIC_*) is for /metrics only. */
typedef struct pql_task_stats {
    int64_t consumed, dead_lettered, late, alerts_pql, alerts_expansion;
    int64_t topic_consumed[PQL_NTOPICS], topic_dead_lettered[PQL_NTOPICS], topic_late[PQL_NTOPICS];
} pql_task_stats;

typedef struct pql_task {
    int32_t partition;
    pql_task_state state;
    uint64_t generation;            /* distinguishes this incarnation from earlier ones */
    pql_claim claim;                /* epoch and seq (seq advances with every write) */
    int64_t next[PQL_NTOPICS];      /* next offset to process per topic (-1 unknown) */
    int64_t committed[PQL_NTOPICS]; /* next offset as stored in Redis */
    pql_cache *cache;
    pql_task_alert *alerts;     /* fired and not yet produced: the built batch's */
    size_t nalerts, alerts_cap; /* first (built_alerts), then those applied since */
    /* The batch built and not yet committed (it may be in flight to Redis
       while the task applies further messages): what it writes of the
       task's progress, so that committing it accounts for exactly that. */
    size_t built_alerts;
    int64_t built_next[PQL_NTOPICS];
    pql_task_stats built_stats;
    char (*delivered)[PQL_ALERT_ID_LEN + 1]; /* delivered: to remove from the outbox */
    size_t ndelivered, delivered_cap;
    size_t delivered_in_batch; /* how many of `delivered` the current batch removes */
    int dlq_outstanding;       /* dead-letter produces not yet acknowledged */
    int dlq_failed;            /* a dead-letter produce failed: the batch must not commit */
    int redis_failed;          /* an account could not be loaded: the same */
    pql_task_stats stats, batch_stats;
    pql_account **touched;        /* accounts adopted or applied to since the last build: */
    size_t ntouched, touched_cap; /* the only ones a batch can have changed */
    unsigned batch_no;            /* their pql_account_mark; never 0 */
    unsigned built_no;            /* the batch_no of the built batch (0: none yet) */
    pql_store_batch *batch;
    int dirty;            /* applied or skipped messages since the last build */
    int64_t outbox;       /* alerts in the partition's Redis outbox not yet known delivered:
                             the claim's scan plus committed puts minus committed deletes */
    pql_metrics *metrics; /* metric counter deltas of the batch (metrics.h); NULL: off */
    struct pql_task_expansion {
        const char *rule; /* the rule set's name: valid during the apply */
        int64_t at;
    } * expansions; /* expansion alerts of the event being applied */
    size_t nexpansions, expansions_cap;
} pql_task;

/** @returns a new task in state ASSIGNED, or NULL. */
pql_task *pql_task_new(int32_t partition, uint64_t generation);
void pql_task_destroy(pql_task *t);

/** Keeps metric counters (metrics.h) with this task's batches from now on,
 *  segmenting by the traits named `channel_trait` and `plan_trait`.
 *  @returns 0, or -1 when out of memory. */
int pql_task_track_metrics(pql_task *t, const char *channel_trait, const char *plan_trait);

/** Records a successful claim: state RUNNING, offsets to resume from. */
void pql_task_claimed(pql_task *t, const pql_claim *claim);

/** Looks up an account in the cache (NULL if not cached). */
pql_account *pql_task_account(pql_task *t, const char *id, size_t len);

/** Adds a new account (about to be loaded from Redis) to the cache; the task
 *  owns it. */
void pql_task_adopt(pql_task *t, pql_account *a);

/** Applies a decoded event read at (topic, offset) to its account `a`, which
 *  must be in the task's cache (pipeline.c loads it first and passes what
 *  pql_task_account() returned: one look-up per event).  Alerts fired are
 *  encoded (JSON if `json`, else Avro) and kept for the batch.  @returns the
 *  apply outcome. */
pql_apply pql_task_apply(pql_task *t, pql_account *a, const pql_event *ev, int topic,
                         int64_t offset, int64_t now_ms, int json);

/** Records that the message at (topic, offset) was consumed without state
 *  change (dead-lettered or skipped), so the stored offset moves past it. */
void pql_task_skip(pql_task *t, int topic, int64_t offset, int dead_lettered);

/** Builds this batch's atomic write into t->batch: every dirty account's
 *  fields, the next offsets, outbox puts (new alerts) and deletes (delivered
 *  alerts), counters (and metric counters, when tracked).  `topics` names the
 *  two input topics.  `ttl_ms` is the account key TTL: an account's expiry is
 *  set when this process first writes it, then again only once `ttl_ms`/64
 *  has passed (wall clock `now_ms`), so a key expires between 63/64 and all
 *  of `ttl_ms` after its last write, and Redis runs a PEXPIRE per account per
 *  ttl/64 instead of per batch.  @returns 1 if there is anything to write. */
int pql_task_build_batch(pql_task *t, const char *group, const char *const *topics, int64_t ttl_ms,
                         int64_t now_ms);

/** After Redis applied t->batch: seq advances, committed offsets catch up
 *  with the built ones, the outbox deletes are done (t->outbox follows),
 *  t->stats adds t->built_stats (read the batch's figures before calling
 *  this).  The batch's alerts stay first in t->alerts (t->built_alerts of
 *  them) for the caller to produce, then pql_task_alerts_published().
 *  Messages applied after the build stay for the next batch. */
void pql_task_committed(pql_task *t);

/** Forgets the built batch's alerts (produced): the first t->built_alerts. */
void pql_task_alerts_published(pql_task *t);

/** Abandons the batch in progress: drops the cache (accounts reload from
 *  Redis), pending alerts and counters; processing resumes at the committed
 *  offsets (the caller seeks there). */
void pql_task_abandon(pql_task *t);

/** An alert of this task was delivered to Kafka: remove it from the outbox
 *  with the next batch. */
void pql_task_delivered(pql_task *t, const char *alert_id);

/** Drops every cached account (all must be clean: call after a write); they
 *  reload from Redis on next touch (a rule-set reload). */
void pql_task_drop_cache(pql_task *t);

/** Evicts clean accounts beyond `max`, or beyond `max_bytes` of counted
 *  memory (cache.h), from the cache, except those of the batch just built
 *  (until it is committed, a reload from Redis could miss it).  Only between
 *  a batch build and the next apply (nothing touched and unbuilt). */
void pql_task_trim(pql_task *t, size_t max, size_t max_bytes);

#endif
