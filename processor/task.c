/* task.c — per-partition state and batch assembly.  See task.h.
 *
 * Lifecycle (checked by assert_task_state in debug builds):
 *
 *   ASSIGNED --claim ok--> RUNNING --revoke--> REVOKING --> CLOSED
 *                             |                                ^
 *                             +------- fenced / abandoned -----+
 *
 * 1. ASSIGNED: the consumer group gave us partition p of both input topics.
 *    pipeline.c claims it in Redis: the epoch is bumped (fencing every older
 *    owner) and seq plus the stored next offsets come back.  The outbox is
 *    re-sent (alerts written by a previous owner but maybe never delivered).
 *    Consumption starts at the stored offsets, never at Kafka's.
 * 2. RUNNING: messages are decoded and applied to in-memory accounts (loaded
 *    from Redis on first touch).  After each poll batch, the task's net
 *    changes, the alerts it fired, the outbox removals of delivered alerts,
 *    its counters and the next offsets go to Redis in ONE atomic script call,
 *    accepted only if the epoch is still ours and seq is the one we read.
 *    Only then are the alerts produced (they are in the outbox already) and
 *    the offsets committed to Kafka (for lag tools only).
 * 3. REVOKING/CLOSED: the task writes nothing more.
 *
 * Exactly-once argument.  State S_n and offsets O_n are written together
 * atomically, so Redis always holds a pair (S, O) where S is exactly the
 * effect of the input before O.  A crash at any instant leaves such a pair;
 * the next owner loads S lazily and consumes from O, so every message counts
 * once.  A retried write after a lost reply is recognised by seq and not
 * applied twice.  A zombie holds a stale epoch and its writes are refused.
 * Alerts are in the same atomic write (outbox), so none is lost; they are
 * produced at least once with ids derived from state (account, rule, seq),
 * so a re-delivery carries the same id.  Metric counters (metrics.h) are
 * deltas between an account's state before and after each event, carried by
 * the same write: exactly once like the state they are computed from. */
#include "task.h"

#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef NDEBUG
static int assert_task_state(const pql_task *t)
{
    assert(t->state <= PQL_TASK_CLOSED);
    if (t->state == PQL_TASK_RUNNING) assert(t->claim.epoch >= 1);
    assert(t->nalerts <= t->alerts_cap);
    assert(t->delivered_in_batch <= t->ndelivered);
    return 1;
}
#define CHECK(t) assert(assert_task_state(t))
#else
#define CHECK(t) ((void)0)
#endif

pql_task *pql_task_new(int32_t partition, uint64_t generation)
{
    pql_task *t = calloc(1, sizeof(*t));
    if (!t) return NULL;
    t->partition = partition;
    t->generation = generation;
    t->state = PQL_TASK_ASSIGNED;
    t->batch_no = 1;
    for (int i = 0; i < PQL_NTOPICS; i++)
        t->next[i] = t->committed[i] = -1;
    t->cache = pql_cache_new();
    t->batch = pql_store_batch_new();
    if (!t->cache || !t->batch) {
        pql_task_destroy(t);
        return NULL;
    }
    return t;
}

/* Frees alerts [0, n) and moves the rest to the front. */
static void alerts_drop(pql_task *t, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(t->alerts[i].key);
        free(t->alerts[i].payload);
        free(t->alerts[i].rule);
    }
    if (t->nalerts > n) memmove(t->alerts, t->alerts + n, (t->nalerts - n) * sizeof(*t->alerts));
    t->nalerts -= n;
}

void pql_task_alerts_published(pql_task *t)
{
    alerts_drop(t, t->built_alerts);
    t->built_alerts = 0;
}

void pql_task_destroy(pql_task *t)
{
    if (!t) return;
    alerts_drop(t, t->nalerts);
    free(t->alerts);
    free(t->delivered);
    free(t->touched);
    pql_cache_destroy(t->cache);
    pql_store_batch_destroy(t->batch);
    pql_metrics_destroy(t->metrics);
    free(t->expansions);
    free(t);
}

int pql_task_track_metrics(pql_task *t, const char *channel_trait, const char *plan_trait)
{
    pql_metrics_destroy(t->metrics);
    t->metrics = pql_metrics_new(channel_trait, plan_trait);
    return t->metrics ? 0 : -1;
}

void pql_task_claimed(pql_task *t, const pql_claim *claim)
{
    t->claim = *claim;
    for (int i = 0; i < PQL_NTOPICS; i++)
        t->next[i] = t->committed[i] = claim->offsets[i];
    t->state = PQL_TASK_RUNNING;
    CHECK(t);
}

pql_account *pql_task_account(pql_task *t, const char *id, size_t len)
{
    return pql_cache_get(t->cache, id, len);
}

/* Lists `a` among the accounts of the batch in progress, once. */
static void touch(pql_task *t, pql_account *a)
{
    if (pql_account_mark(a, t->batch_no) == t->batch_no) return;
    if (t->ntouched == t->touched_cap) {
        t->touched_cap = t->touched_cap ? t->touched_cap * 2 : 256;
        t->touched = realloc(t->touched, t->touched_cap * sizeof(*t->touched));
        if (!t->touched) abort();
    }
    t->touched[t->ntouched++] = a;
}

/* Starts a new list of touched accounts (after a build, or when the cache goes). */
static void untouch_all(pql_task *t)
{
    t->ntouched = 0;
    if (++t->batch_no == 0) t->batch_no = 1;
}

void pql_task_adopt(pql_task *t, pql_account *a)
{
    pql_cache_put(t->cache, a);
    touch(t, a); /* loading may schedule deletions of stale fields */
}

typedef struct alert_ctx {
    pql_task *t;
    int json;
} alert_ctx;

static void on_alert(void *opaque, const pql_alert *al)
{
    alert_ctx *c = opaque;
    pql_task *t = c->t;
    pql_buf b = {0};
    char err[256];
    pql_err rc = c->json ? pql_alert_encode_json(al, &b, err, sizeof(err))
                         : pql_alert_encode_avro(al, &b, err, sizeof(err));
    if (rc != PQL_OK) abort(); /* our own record, built from our own schema */
    if (t->nalerts == t->alerts_cap) {
        t->alerts_cap = t->alerts_cap ? t->alerts_cap * 2 : 16;
        t->alerts = realloc(t->alerts, t->alerts_cap * sizeof(*t->alerts));
        if (!t->alerts) abort();
    }
    pql_task_alert *ta = &t->alerts[t->nalerts++];
    memcpy(ta->id, al->alert_id, sizeof(ta->id));
    ta->key = malloc(al->account_id_len + 1);
    if (!ta->key) abort();
    memcpy(ta->key, al->account_id, al->account_id_len);
    ta->key[al->account_id_len] = '\0';
    ta->key_len = al->account_id_len;
    ta->payload = b.data; /* ownership moves from the buffer */
    ta->payload_len = b.len;
    ta->rule = strdup(al->rule);
    if (!ta->rule) abort();
    ta->kind = al->kind;
    if (al->kind == PQL_ALERT_PQL) {
        t->batch_stats.alerts_pql++;
        return;
    }
    t->batch_stats.alerts_expansion++;
    if (!t->metrics) return;
    if (t->nexpansions == t->expansions_cap) {
        t->expansions_cap = t->expansions_cap ? t->expansions_cap * 2 : 8;
        t->expansions = realloc(t->expansions, t->expansions_cap * sizeof(*t->expansions));
        if (!t->expansions) abort();
    }
    t->expansions[t->nexpansions++] = (struct pql_task_expansion){al->rule, al->triggered_at};
}

static void advance(pql_task *t, int topic, int64_t offset)
{
    if (offset + 1 > t->next[topic]) t->next[topic] = offset + 1;
    t->dirty = 1;
}

pql_apply pql_task_apply(pql_task *t, pql_account *a, const pql_event *ev, int topic,
                         int64_t offset, int64_t now_ms, int json)
{
    CHECK(t);
    assert(a && "pipeline loads the account before applying");
#ifndef NDEBUG
    size_t id_len;
    const char *id = pql_account_id(a, &id_len);
    assert(id_len == ev->account_id_len && memcmp(id, ev->account_id, id_len) == 0 &&
           "the account is the event's");
#endif
    alert_ctx c = {t, json};
    pql_metrics_mark before;
    if (t->metrics) pql_metrics_mark_of(a, &before);
    t->nexpansions = 0;
    pql_apply res = pql_account_apply(a, ev, now_ms, on_alert, &c);
    if (t->metrics) { /* the event's change of the account's contribution */
        pql_metrics_account_changed(t->metrics, a, &before);
        for (size_t i = 0; i < t->nexpansions; i++)
            pql_metrics_expansion(t->metrics, a, t->expansions[i].rule, t->expansions[i].at);
    }
    touch(t, a);
    t->batch_stats.consumed++;
    t->batch_stats.topic_consumed[topic]++;
    if (res == PQL_APPLY_LATE) {
        t->batch_stats.late++;
        t->batch_stats.topic_late[topic]++;
    }
    advance(t, topic, offset);
    return res;
}

void pql_task_skip(pql_task *t, int topic, int64_t offset, int dead_lettered)
{
    t->batch_stats.consumed++;
    t->batch_stats.topic_consumed[topic]++;
    if (dead_lettered) {
        t->batch_stats.dead_lettered++;
        t->batch_stats.topic_dead_lettered[topic]++;
    }
    advance(t, topic, offset);
}

typedef struct build_ctx {
    pql_task *t;
    const char *group;
    int64_t ttl_ms, now_ms;
    int any;
} build_ctx;

static void field_set(void *opaque, const char *f, size_t flen, const char *v, size_t vlen)
{
    build_ctx *c = opaque;
    if (pql_store_batch_hset(c->t->batch, f, flen, v, vlen) != PQL_OK) abort();
}

static void field_del(void *opaque, const char *f, size_t flen)
{
    build_ctx *c = opaque;
    if (pql_store_batch_hdel(c->t->batch, f, flen) != PQL_OK) abort();
}

static void build_account(build_ctx *c, pql_account *a)
{
    if (!pql_account_dirty(a)) { /* unchanged, or just loaded */
        pql_cache_measure(c->t->cache, a);
        return;
    }
    size_t len;
    const char *id = pql_account_id(a, &len);
    int64_t ttl = 0; /* 0: the script leaves the expiry as it is */
    int64_t set_at = pql_account_ttl_set_at(a);
    if (c->ttl_ms > 0 && (set_at == 0 || c->now_ms - set_at >= c->ttl_ms / 64)) {
        ttl = c->ttl_ms;
        pql_account_set_ttl_set_at(a, c->now_ms);
    }
    if (pql_store_batch_account(c->t->batch, id, len, ttl) != PQL_OK) abort();
    pql_account_flush(a, field_set, field_del, c);
    pql_cache_measure(c->t->cache, a); /* after the flush, which frees what expired */
    c->any = 1;
}

static void add_counter(pql_task *t, const char *field, int64_t v)
{
    if (v && pql_store_batch_incr(t->batch, "stats", field, v) != PQL_OK) abort();
}

static void add_metric(void *opaque, const char *hash, const char *field, int64_t delta)
{
    build_ctx *c = opaque;
    if (pql_store_batch_incr(c->t->batch, hash, field, delta) != PQL_OK) abort();
    c->any = 1;
}

int pql_task_build_batch(pql_task *t, const char *group, const char *const *topics, int64_t ttl_ms,
                         int64_t now_ms)
{
    CHECK(t);
    if (t->state != PQL_TASK_RUNNING) return 0;
    pql_store_batch_begin(t->batch, group, t->partition, t->claim.epoch, t->claim.seq);
    build_ctx c = {t, group, ttl_ms, now_ms > 0 ? now_ms : 1, 0};
    for (size_t i = 0; i < t->ntouched; i++)
        build_account(&c, t->touched[i]);
    t->built_no = t->batch_no;
    untouch_all(t);
    for (int i = 0; i < PQL_NTOPICS; i++)
        if (t->next[i] >= 0 && t->next[i] != t->committed[i]) {
            pql_store_batch_offset(t->batch, topics[i], t->next[i]);
            c.any = 1;
        }
    for (size_t i = 0; i < t->nalerts; i++) {
        pql_store_batch_outbox_put(t->batch, t->alerts[i].id, t->alerts[i].payload,
                                   t->alerts[i].payload_len);
        c.any = 1;
    }
    t->delivered_in_batch = t->ndelivered;
    for (size_t i = 0; i < t->ndelivered; i++) {
        pql_store_batch_outbox_del(t->batch, t->delivered[i]);
        c.any = 1;
    }
    add_counter(t, "consumed", t->batch_stats.consumed);
    add_counter(t, "dead_lettered", t->batch_stats.dead_lettered);
    add_counter(t, "late", t->batch_stats.late);
    add_counter(t, "alerts_pql", t->batch_stats.alerts_pql);
    add_counter(t, "alerts_expansion", t->batch_stats.alerts_expansion);
    if (t->metrics) pql_metrics_drain(t->metrics, add_metric, &c);
    /* What this batch writes; what is applied from now on is the next one's. */
    t->built_alerts = t->nalerts;
    memcpy(t->built_next, t->next, sizeof(t->next));
    t->built_stats = t->batch_stats;
    memset(&t->batch_stats, 0, sizeof(t->batch_stats));
    t->dirty = 0;
    return c.any;
}

void pql_task_committed(pql_task *t)
{
    CHECK(t);
    t->claim.seq++;
    for (int i = 0; i < PQL_NTOPICS; i++)
        t->committed[i] = t->built_next[i];
    /* deliveries reported while the batch was in flight stay for the next one */
    if (t->delivered_in_batch)
        memmove(t->delivered, t->delivered + t->delivered_in_batch,
                (t->ndelivered - t->delivered_in_batch) * sizeof(*t->delivered));
    t->ndelivered -= t->delivered_in_batch;
    t->outbox += (int64_t)t->built_alerts - (int64_t)t->delivered_in_batch;
    if (t->outbox < 0) t->outbox = 0; /* an alert delivered twice (re-sent) is deleted twice */
    t->delivered_in_batch = 0;
    t->stats.consumed += t->built_stats.consumed;
    t->stats.dead_lettered += t->built_stats.dead_lettered;
    t->stats.late += t->built_stats.late;
    t->stats.alerts_pql += t->built_stats.alerts_pql;
    t->stats.alerts_expansion += t->built_stats.alerts_expansion;
    for (int i = 0; i < PQL_NTOPICS; i++) {
        t->stats.topic_consumed[i] += t->built_stats.topic_consumed[i];
        t->stats.topic_dead_lettered[i] += t->built_stats.topic_dead_lettered[i];
        t->stats.topic_late[i] += t->built_stats.topic_late[i];
    }
    memset(&t->built_stats, 0, sizeof(t->built_stats));
}

void pql_task_abandon(pql_task *t)
{
    pql_task_drop_cache(t);
    alerts_drop(t, t->nalerts);
    t->built_alerts = 0;
    for (int i = 0; i < PQL_NTOPICS; i++)
        t->next[i] = t->committed[i];
    memset(&t->batch_stats, 0, sizeof(t->batch_stats));
    memset(&t->built_stats, 0, sizeof(t->built_stats));
    if (t->metrics) pql_metrics_clear(t->metrics); /* the accounts reload: so do their counts */
    t->delivered_in_batch = 0;
    t->dlq_failed = 0;
    t->redis_failed = 0;
    t->dirty = 0;
}

void pql_task_delivered(pql_task *t, const char *alert_id)
{
    if (t->ndelivered == t->delivered_cap) {
        t->delivered_cap = t->delivered_cap ? t->delivered_cap * 2 : 64;
        t->delivered = realloc(t->delivered, t->delivered_cap * sizeof(*t->delivered));
        if (!t->delivered) abort();
    }
    snprintf(t->delivered[t->ndelivered++], PQL_ALERT_ID_LEN + 1, "%s", alert_id);
}

void pql_task_drop_cache(pql_task *t)
{
    untouch_all(t);
    pql_cache_destroy(t->cache);
    t->cache = pql_cache_new();
    if (!t->cache) abort();
}

static int in_built_batch(void *opaque, const pql_account *a)
{
    const pql_task *t = opaque;
    return t->built_no && pql_account_batch_mark(a) == t->built_no;
}

void pql_task_trim(pql_task *t, size_t max, size_t max_bytes)
{
    assert(t->ntouched == 0 && "trim only between a build and the next apply");
    pql_cache_evict(t->cache, max, max_bytes, in_built_batch, t);
}
