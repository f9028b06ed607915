/* pipeline.c — the run loop: consumer, rebalances, batches.  See pipeline.h. */
#include "pipeline.h"

#include "account.h"
#include "decode.h"
#include "log.h"
#include "metrics_emit.h"
#include "sink.h"
#include "store.h"
#include "task.h"

#include <librdkafka/rdkafka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_BACKOFF_MS 5000

/* Messages polled for one input partition and not yet processed (FIFO). */
typedef struct inbox {
    rd_kafka_message_t **m;
    size_t head, len, cap;
    int64_t eof_at; /* >= 0: the partition's end was reached at this offset and
                       nothing arrived since: provably nothing more to merge */
    int paused;
} inbox;

struct pql_pipeline {
    const pql_config *cfg;
    pql_rules *rules;           /* owned; replaced on reload */
    uint64_t rules_fingerprint; /* of the files `rules` came from (rules.watch) */
    int64_t rules_checked_at;   /* wall clock of the last look at them */
    rd_kafka_t *consumer;
    pql_sink *sink;
    pql_store *store;
    pql_decoder *decoders[PQL_NTOPICS];
    const char *topics[PQL_NTOPICS];
    int32_t npartitions;
    pql_task **tasks;              /* by partition number; NULL when not ours */
    inbox (*inboxes)[PQL_NTOPICS]; /* by partition number and topic */
    int64_t *blocked_since;        /* by partition: merge waiting since (ms), 0 if not */
    uint64_t generation;
    int print_alerts;
    int64_t ttl_ms;
    int reset_latest; /* auto.offset.reset=latest: start there when Redis has no offset */
    volatile sig_atomic_t *stop;   /* set by SIGTERM/SIGINT */
    volatile sig_atomic_t *reload; /* set by SIGHUP */
    pql_metrics_emitter *emitter;  /* emits while we own partition 0; NULL: off */
};

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static int topic_index(const pql_pipeline *p, const char *name)
{
    for (int i = 0; i < PQL_NTOPICS; i++)
        if (strcmp(p->topics[i], name) == 0) return i;
    return -1;
}

static pql_task *task_of(pql_pipeline *p, int32_t partition, uint64_t generation)
{
    if (partition < 0 || partition >= p->npartitions) return NULL;
    pql_task *t = p->tasks[partition];
    return t && (generation == 0 || t->generation == generation) ? t : NULL;
}

/* ---- inboxes: the deterministic merge of a task's two partitions -------- */

static size_t inbox_len(const inbox *q)
{
    return q->len;
}

static rd_kafka_message_t *inbox_peek(const inbox *q)
{
    return q->len ? q->m[q->head] : NULL;
}

static void inbox_push(inbox *q, rd_kafka_message_t *m)
{
    if (q->head + q->len == q->cap) {
        if (q->head) { /* compact */
            memmove(q->m, q->m + q->head, q->len * sizeof(*q->m));
            q->head = 0;
        } else {
            q->cap = q->cap ? q->cap * 2 : 1024;
            q->m = realloc(q->m, q->cap * sizeof(*q->m));
            if (!q->m) abort();
        }
    }
    q->m[q->head + q->len++] = m;
    q->eof_at = -1;
}

static void inbox_pop(inbox *q)
{
    rd_kafka_message_destroy(q->m[q->head]);
    q->head++;
    if (!--q->len) q->head = 0;
}

static void inbox_clear(inbox *q)
{
    while (q->len)
        inbox_pop(q);
    q->eof_at = -1;
}

static void inbox_free(inbox *q)
{
    inbox_clear(q);
    free(q->m);
    q->m = NULL;
    q->cap = 0;
}

static void set_paused(pql_pipeline *p, int32_t part, int ti, int pause)
{
    inbox *q = &p->inboxes[part][ti];
    if (q->paused == pause) return;
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(l, p->topics[ti], part);
    if (pause)
        rd_kafka_pause_partitions(p->consumer, l);
    else
        rd_kafka_resume_partitions(p->consumer, l);
    rd_kafka_topic_partition_list_destroy(l);
    q->paused = pause;
}

/* Chooses the next message of task `part` in the merge order: the smaller
 * record timestamp first, account updates before usage on a tie, each
 * partition in offset order.  The choice is a function of the logs alone —
 * so every run, interrupted or not, applies the same sequence — except when
 * one side has no message yet and is not known to be at its end: then the
 * task waits, up to processing.max_task_idle, before going on without it.
 * @returns the topic index to take from, or -1 to wait. */
static int merge_next(pql_pipeline *p, int32_t part, int64_t now)
{
    inbox *u = &p->inboxes[part][PQL_TOPIC_USAGE], *a = &p->inboxes[part][PQL_TOPIC_ACCOUNTS];
    rd_kafka_message_t *mu = inbox_peek(u), *ma = inbox_peek(a);
    int pick = -1;
    if (mu && ma)
        pick = rd_kafka_message_timestamp(ma, NULL) <= rd_kafka_message_timestamp(mu, NULL)
                   ? PQL_TOPIC_ACCOUNTS
                   : PQL_TOPIC_USAGE;
    else if (mu && a->eof_at >= 0)
        pick = PQL_TOPIC_USAGE;
    else if (ma && u->eof_at >= 0)
        pick = PQL_TOPIC_ACCOUNTS;
    else if (!mu && !ma)
        return -1;
    if (pick >= 0) {
        p->blocked_since[part] = 0;
        return pick;
    }
    if (!p->blocked_since[part]) p->blocked_since[part] = now;
    if (now - p->blocked_since[part] < p->cfg->max_task_idle_ms) return -1;
    pql_debug("merge idle: going on without the other partition", "partition=%d", part);
    return mu ? PQL_TOPIC_USAGE : PQL_TOPIC_ACCOUNTS;
}

/* ---- delivery callbacks ------------------------------------------------ */

static void print_alert(const char *payload, size_t len, int json_payload)
{
    char err[256];
    json_t *j = json_payload ? json_loadb(payload, len, 0, NULL)
                             : pql_alert_avro_to_json(payload, len, err, sizeof(err));
    if (!j) return;
    const char *kind = json_string_value(json_object_get(j, "kind"));
    printf("\n  %s %-9s %-20s account=%s\n", kind && !strcmp(kind, "PQL") ? "★" : "▲",
           kind ? kind : "?", json_string_value(json_object_get(j, "rule")),
           json_string_value(json_object_get(j, "account_id")));
    size_t i;
    json_t *v;
    json_array_foreach(json_object_get(j, "reasons"), i, v)
        printf("      · %s\n", json_string_value(v));
    const char *k;
    printf("      signals:");
    json_object_foreach(json_object_get(j, "signals"), k, v)
        printf(" %s=%g", k, json_number_value(v));
    printf("\n      alert_id=%s ruleset=%s\n", json_string_value(json_object_get(j, "alert_id")),
           json_string_value(json_object_get(j, "ruleset_version")));
    fflush(stdout);
    json_decref(j);
}

static void on_alert_delivered(void *opaque, int32_t partition, uint64_t generation,
                               const char *alert_id, const char *payload, size_t len)
{
    pql_pipeline *p = opaque;
    pql_task *t = task_of(p, partition, generation);
    if (t) pql_task_delivered(t, alert_id);
    if (p->print_alerts) print_alert(payload, len, p->cfg->output_json);
}

static void on_dlq_done(void *opaque, int32_t partition, uint64_t generation, int ok)
{
    pql_pipeline *p = opaque;
    pql_task *t = task_of(p, partition, generation);
    if (!t) return;
    t->dlq_outstanding--;
    if (!ok) t->dlq_failed = 1;
}

/* ---- assignment -------------------------------------------------------- */

static void resend_outbox_item(void *opaque, const char *id, size_t id_len, const char *payload,
                               size_t payload_len)
{
    pql_task *t = ((void **)opaque)[0];
    pql_pipeline *p = ((void **)opaque)[1];
    char err[256], aid[PQL_ALERT_ID_LEN + 1];
    snprintf(aid, sizeof(aid), "%.*s", (int)id_len, id);
    /* the key is the account id, which the alert carries */
    json_t *j = p->cfg->output_json
                    ? json_loadb(payload, payload_len, 0, NULL)
                    : pql_alert_avro_to_json(payload, payload_len, err, sizeof(err));
    const char *acct = j ? json_string_value(json_object_get(j, "account_id")) : NULL;
    pql_sink_alert(p->sink, t->partition, t->generation, aid, acct ? acct : "",
                   acct ? strlen(acct) : 0, payload, payload_len);
    json_decref(j);
}

/* Claims partition `part` in Redis, retrying while Redis is unavailable. */
static pql_task *claim_task(pql_pipeline *p, int32_t part)
{
    pql_task *t = pql_task_new(part, ++p->generation);
    if (!t) abort();
    pql_claim claim;
    char err[512];
    int backoff = 100;
    while (pql_store_claim(p->store, p->cfg->group, part, p->topics, PQL_NTOPICS, &claim, err,
                           sizeof(err)) != PQL_OK) {
        pql_warn("claim failed, retrying", "partition=%d error=\"%s\" retry_ms=%d", part, err,
                 backoff);
        sleep_ms(backoff);
        backoff = backoff * 2 > MAX_BACKOFF_MS ? MAX_BACKOFF_MS : backoff * 2;
    }
    pql_task_claimed(t, &claim);
    if (pql_task_track_metrics(t, p->cfg->metrics_channel_trait, p->cfg->metrics_plan_trait))
        abort();
    if (part == 0) pql_metrics_emitter_own(p->emitter, claim.epoch);
    void *ctx[2] = {t, p};
    if (pql_store_outbox_scan(p->store, p->cfg->group, part, resend_outbox_item, ctx, err,
                              sizeof(err)) != PQL_OK)
        pql_warn("outbox scan failed; it is retried at the next assignment",
                 "partition=%d error=\"%s\"", part, err);
    pql_info("partition assigned",
             "partition=%d epoch=%lld seq=%lld usage_offset=%lld accounts_offset=%lld", part,
             (long long)claim.epoch, (long long)claim.seq, (long long)claim.offsets[0],
             (long long)claim.offsets[1]);
    return t;
}

static void drop_task(pql_pipeline *p, int32_t part, const char *why)
{
    pql_task *t = task_of(p, part, 0);
    if (!t) return;
    pql_info("partition released", "partition=%d reason=%s", part, why);
    if (part == 0) pql_metrics_emitter_own(p->emitter, 0);
    pql_task_destroy(t);
    p->tasks[part] = NULL;
    for (int i = 0; i < PQL_NTOPICS; i++) {
        inbox_clear(&p->inboxes[part][i]);
        p->inboxes[part][i].paused = 0; /* an unassigned partition is not paused */
    }
    p->blocked_since[part] = 0;
}

static void on_assign(pql_pipeline *p, rd_kafka_topic_partition_list_t *parts)
{
    for (int i = 0; i < parts->cnt; i++) {
        rd_kafka_topic_partition_t *tp = &parts->elems[i];
        int ti = topic_index(p, tp->topic);
        if (ti < 0 || tp->partition >= p->npartitions) continue;
        pql_task *t = task_of(p, tp->partition, 0);
        if (!t) t = p->tasks[tp->partition] = claim_task(p, tp->partition);
        int64_t off = t->committed[ti];
        tp->offset =
            off >= 0 ? off : (p->reset_latest ? RD_KAFKA_OFFSET_END : RD_KAFKA_OFFSET_BEGINNING);
    }
}

static void flush_batches(pql_pipeline *p); /* below */

static void rebalance_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                         rd_kafka_topic_partition_list_t *parts, void *opaque)
{
    pql_pipeline *p = opaque;
    int cooperative = !strcmp(rd_kafka_rebalance_protocol(rk), "COOPERATIVE");
    if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
        on_assign(p, parts);
        if (cooperative)
            rd_kafka_incremental_assign(rk, parts);
        else
            rd_kafka_assign(rk, parts);
        return;
    }
    /* Revoke: everything applied so far is already written (batches are
       flushed before every poll), so finishing means flushing deliveries. */
    flush_batches(p);
    for (int i = 0; i < parts->cnt; i++)
        drop_task(p, parts->elems[i].partition, "revoked");
    if (cooperative)
        rd_kafka_incremental_unassign(rk, parts);
    else
        rd_kafka_assign(rk, NULL);
}

/* ---- batches ----------------------------------------------------------- */

typedef struct load_ctx {
    pql_pipeline *p;
    pql_account **accts;
} load_ctx;

static void load_field(void *opaque, size_t i, const char *f, size_t flen, const char *v,
                       size_t vlen)
{
    load_ctx *c = opaque;
    pql_account_load_field(c->accts[i], f, flen, v, vlen);
}

/* Fills n fresh accounts, already adopted by task t, from Redis in one
 * pipelined round trip.  On failure they stay empty in the cache: the caller
 * marks the batch failed, and abandoning it drops the whole cache before any
 * of them is used.  @returns 0 or -1 (Redis). */
static int load_accounts(pql_pipeline *p, pql_task *t, pql_account **accts, size_t n)
{
    const char **ids = malloc(n * sizeof(*ids));
    size_t *lens = malloc(n * sizeof(*lens));
    if (!ids || !lens) abort();
    for (size_t i = 0; i < n; i++)
        ids[i] = pql_account_id(accts[i], &lens[i]);
    char err[512];
    load_ctx c = {p, accts};
    int rc = pql_store_load_accounts(p->store, p->cfg->group, t->partition, ids, lens, n,
                                     load_field, &c, err, sizeof(err)) == PQL_OK
                 ? 0
                 : -1;
    if (rc < 0) pql_warn("account load failed", "partition=%d error=\"%s\"", t->partition, err);
    free(ids);
    free(lens);
    return rc;
}

/* A new account of task t, adopted by its cache (which dedupes later lookups). */
static pql_account *adopt_new(pql_pipeline *p, pql_task *t, const char *id, size_t len)
{
    pql_account *a = pql_account_new(p->rules, id, len);
    if (!a) abort();
    pql_task_adopt(t, a);
    return a;
}

/* Loads the accounts of the task's queued messages that are not in cache,
 * keyed by the message key (= account_id), in one round trip.
 * @returns 0 or -1 (Redis). */
static int prefetch(pql_pipeline *p, pql_task *t)
{
    size_t n = 0;
    for (int ti = 0; ti < PQL_NTOPICS; ti++)
        n += inbox_len(&p->inboxes[t->partition][ti]);
    if (!n) return 0;
    pql_account **accts = malloc(n * sizeof(*accts));
    if (!accts) abort();
    size_t k = 0;
    for (int ti = 0; ti < PQL_NTOPICS; ti++) {
        inbox *q = &p->inboxes[t->partition][ti];
        for (size_t i = 0; i < q->len; i++) {
            rd_kafka_message_t *m = q->m[q->head + i];
            if (m->key && m->key_len && !pql_task_account(t, m->key, m->key_len))
                accts[k++] = adopt_new(p, t, m->key, m->key_len);
        }
    }
    int rc = k ? load_accounts(p, t, accts, k) : 0;
    free(accts);
    return rc;
}

/* An account whose id differs from the message key (or no key): load alone. */
static int ensure_account(pql_pipeline *p, pql_task *t, const pql_event *ev)
{
    if (pql_task_account(t, ev->account_id, ev->account_id_len)) return 0;
    pql_account *a = adopt_new(p, t, ev->account_id, ev->account_id_len);
    return load_accounts(p, t, &a, 1);
}

static void dead_letter(pql_pipeline *p, pql_task *t, rd_kafka_message_t *m, int ti, pql_err code,
                        const char *reason)
{
    pql_warn("dead-lettered", "topic=%s partition=%d offset=%lld code=%s reason=\"%s\"",
             p->topics[ti], m->partition, (long long)m->offset, pql_err_str(code), reason);
    if (pql_sink_dlq(p->sink, t->generation, m, code, reason) != PQL_OK) {
        t->dlq_failed = 1;
        return;
    }
    t->dlq_outstanding++;
    pql_task_skip(t, ti, m->offset, 1);
}

static void process_message(pql_pipeline *p, pql_task *t, rd_kafka_message_t *m, int ti,
                            int64_t now)
{
    pql_event ev;
    char err[512];
    pql_err rc = pql_decoder_decode(p->decoders[ti], m->payload, m->len, &ev, err, sizeof(err));
    if (rc != PQL_OK) {
        dead_letter(p, t, m, ti, rc, err);
        return;
    }
    if (ev.timestamp > now + p->cfg->max_future_skew_ms) {
        snprintf(err, sizeof(err),
                 "timestamp %lld is %lld ms ahead of the wall clock "
                 "(processing.max_future_skew=%lld ms): "
                 "fix the producer's clock",
                 (long long)ev.timestamp, (long long)(ev.timestamp - now),
                 (long long)p->cfg->max_future_skew_ms);
        dead_letter(p, t, m, ti, PQL_ERR_INVALID, err);
        return;
    }
    if (ensure_account(p, t, &ev) < 0) {
        t->dlq_failed = 1; /* Redis failed: abandon the batch, retry later */
        return;
    }
    pql_task_apply(t, &ev, ti, m->offset, now, p->cfg->output_json);
}

/* A dead letter of t's batch was not delivered: the batch must not be
 * written (its offsets would pass the message).  Drops it and seeks back to
 * the stored offsets, so the batch is read and applied again. */
static void abandon_batch(pql_pipeline *p, pql_task *t)
{
    pql_warn("batch abandoned: a dead letter was not delivered; re-reading", "partition=%d",
             t->partition);
    pql_task_abandon(t);
    for (int k = 0; k < PQL_NTOPICS; k++) {
        inbox_clear(&p->inboxes[t->partition][k]);
        if (t->committed[k] < 0) continue;
        rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
        rd_kafka_topic_partition_list_add(l, p->topics[k], t->partition)->offset = t->committed[k];
        rd_kafka_error_t *e = rd_kafka_seek_partitions(p->consumer, l, 5000);
        if (e) rd_kafka_error_destroy(e);
        rd_kafka_topic_partition_list_destroy(l);
    }
}

/* Redis applied t's batch: produce its alerts (already in the outbox) and
 * commit its offsets to Kafka for lag tools. */
static void publish(pql_pipeline *p, pql_task *t)
{
    pql_task_committed(t);
    for (size_t k = 0; k < t->nalerts; k++)
        pql_sink_alert(p->sink, t->partition, t->generation, t->alerts[k].id, t->alerts[k].key,
                       t->alerts[k].key_len, t->alerts[k].payload, t->alerts[k].payload_len);
    pql_task_alerts_clear(t);
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(2);
    for (int k = 0; k < PQL_NTOPICS; k++)
        if (t->committed[k] >= 0)
            rd_kafka_topic_partition_list_add(l, p->topics[k], t->partition)->offset =
                t->committed[k];
    if (l->cnt) rd_kafka_commit(p->consumer, l, 1);
    rd_kafka_topic_partition_list_destroy(l);
}

static void pause_all(pql_pipeline *p, int pause)
{
    rd_kafka_topic_partition_list_t *a = NULL;
    if (rd_kafka_assignment(p->consumer, &a) || !a) return;
    if (pause)
        rd_kafka_pause_partitions(p->consumer, a);
    else
        rd_kafka_resume_partitions(p->consumer, a);
    rd_kafka_topic_partition_list_destroy(a);
}

/* Writes every task's batch to Redis in one round trip; then produces the
 * alerts and commits offsets to Kafka.  Each batch is built once: building
 * flushes the accounts (marks them clean), so after an I/O error the very
 * same batches are sent again — safe, the script recognises an applied one
 * by its seq — until each is applied or fenced. */
static void flush_batches(pql_pipeline *p)
{
    pql_store_batch **batches = malloc((size_t)p->npartitions * sizeof(*batches));
    pql_task **owners = malloc((size_t)p->npartitions * sizeof(*owners));
    pql_err *results = malloc((size_t)p->npartitions * sizeof(*results));
    if (!batches || !owners || !results) abort();

    /* dead letters must be acknowledged before the offset moves past them */
    for (int32_t i = 0; i < p->npartitions; i++)
        if (p->tasks[i] && p->tasks[i]->dlq_outstanding) {
            pql_sink_flush(p->sink, 10000);
            break;
        }
    size_t n = 0;
    for (int32_t i = 0; i < p->npartitions; i++) {
        pql_task *t = p->tasks[i];
        if (!t || t->state != PQL_TASK_RUNNING) continue;
        if (t->dlq_failed || t->dlq_outstanding)
            abandon_batch(p, t);
        else if (pql_task_build_batch(t, p->cfg->group, p->topics, p->ttl_ms)) {
            batches[n] = t->batch;
            owners[n++] = t;
        }
    }

    int backoff = 100, paused = 0;
    while (n) {
        char err[512];
        /* per-batch outcomes are in results[]; a lost connection marks them IO */
        pql_store_commit(p->store, batches, n, results, err, sizeof(err));
        size_t left = 0;
        for (size_t i = 0; i < n; i++) {
            pql_task *t = owners[i];
            if (results[i] == PQL_OK) {
                publish(p, t);
            } else if (results[i] == PQL_ERR_FENCED) {
                pql_error("fenced: another member owns this partition now; dropping it",
                          "partition=%d epoch=%lld", t->partition, (long long)t->claim.epoch);
                t->state = PQL_TASK_CLOSED;
                pql_task_abandon(t);
            } else {
                batches[left] = batches[i];
                owners[left++] = t;
            }
        }
        n = left;
        if (!n) break;
        if (p->stop && *p->stop && backoff >= MAX_BACKOFF_MS) {
            /* Stopping and Redis still down: give up these batches.  Nothing
               is lost: Redis keeps the last written offsets, the next owner
               re-reads from there. */
            pql_error("stopping without writing the last batch: redis unavailable", "error=\"%s\"",
                      err);
            for (size_t i = 0; i < n; i++)
                owners[i]->state = PQL_TASK_CLOSED;
            break;
        }
        pql_warn("redis write failed, retrying", "error=\"%s\" retry_ms=%d", err, backoff);
        if (!paused) pause_all(p, 1);
        paused = 1;
        pql_sink_poll(p->sink, backoff);
        backoff = backoff * 2 > MAX_BACKOFF_MS ? MAX_BACKOFF_MS : backoff * 2;
    }
    if (paused) {
        pause_all(p, 0);
        pql_info("redis write succeeded again; resumed", "%s", "");
    }
    for (int32_t i = 0; i < p->npartitions; i++) {
        if (p->tasks[i] && p->tasks[i]->state == PQL_TASK_CLOSED)
            drop_task(p, i, "fenced");
        else if (p->tasks[i])
            pql_task_trim(p->tasks[i],
                          (size_t)p->cfg->cache_max_accounts / (size_t)p->npartitions + 1);
    }
    free(batches);
    free(owners);
    free(results);
}

/* Routes a polled message (or partition-EOF event) to its task's inbox. */
static void route(pql_pipeline *p, rd_kafka_message_t *m)
{
    int ti = m->rkt ? topic_index(p, rd_kafka_topic_name(m->rkt)) : -1;
    pql_task *t = ti >= 0 ? task_of(p, m->partition, 0) : NULL;
    if (m->err == RD_KAFKA_RESP_ERR__PARTITION_EOF) {
        if (t) p->inboxes[m->partition][ti].eof_at = m->offset;
        rd_kafka_message_destroy(m);
        return;
    }
    if (m->err) {
        pql_warn("consumer error", "error=\"%s\"", rd_kafka_message_errstr(m));
        rd_kafka_message_destroy(m);
        return;
    }
    /* not ours (any more), or re-delivered below what was already processed */
    if (!t || t->state != PQL_TASK_RUNNING || (t->next[ti] >= 0 && m->offset < t->next[ti])) {
        rd_kafka_message_destroy(m);
        return;
    }
    inbox *q = &p->inboxes[m->partition][ti];
    inbox_push(q, m);
    if (inbox_len(q) > (size_t)p->cfg->batch_max_messages * 4) set_paused(p, m->partition, ti, 1);
}

/* Polls up to batch.max_messages messages or batch.max_ms into the inboxes.
 * @returns how many messages were polled. */
static size_t poll_batch(pql_pipeline *p)
{
    size_t n = 0, max = (size_t)p->cfg->batch_max_messages;
    int64_t deadline = pql_now_ms() + p->cfg->batch_max_ms;
    while (n < max) {
        int64_t left = deadline - pql_now_ms();
        if (left < 0) left = 0;
        rd_kafka_message_t *m = rd_kafka_consumer_poll(p->consumer, (int)left);
        if (!m) {
            if (left == 0) break;
            continue;
        }
        n += !m->err;
        route(p, m);
        if (left == 0) break;
    }
    return n;
}

/* Applies what the merge order allows of every task's inboxes, then writes. */
static void process_inboxes(pql_pipeline *p)
{
    int64_t now = pql_now_ms();
    for (int32_t part = 0; part < p->npartitions; part++) {
        pql_task *t = p->tasks[part];
        if (!t || t->state != PQL_TASK_RUNNING) continue;
        if (prefetch(p, t) < 0) {
            t->dlq_failed = 1; /* Redis failed: abandon this batch, re-read later */
            continue;
        }
        int ti;
        while (!t->dlq_failed && (ti = merge_next(p, part, now)) >= 0) {
            inbox *q = &p->inboxes[part][ti];
            process_message(p, t, inbox_peek(q), ti, now);
            inbox_pop(q);
        }
        for (int k = 0; k < PQL_NTOPICS; k++)
            if (p->inboxes[part][k].paused &&
                inbox_len(&p->inboxes[part][k]) < (size_t)p->cfg->batch_max_messages)
                set_paused(p, part, k, 0);
    }
    flush_batches(p);
}

/* Loads the rule files again; if valid, swaps them in at this batch boundary.
 * Everything applied is written already, so every cached account is clean:
 * the caches are dropped and accounts reload under the new set — firing
 * states of rules that still exist are kept (by name), signals whose
 * definition changed start empty (their storage key changed). */
static void reload_rules(pql_pipeline *p)
{
    pql_buf errors = {0};
    p->rules_fingerprint = pql_rules_fingerprint(p->cfg->rules_path);
    pql_rules *fresh = pql_rules_load(p->cfg->rules_path, &errors);
    if (!fresh) {
        pql_error("rules reload refused; the running rule set stays", "path=%s errors=\"%s\"",
                  p->cfg->rules_path, errors.data ? errors.data : "");
        fprintf(stderr, "%s", errors.data ? errors.data : "");
        pql_buf_free(&errors);
        return;
    }
    pql_buf_free(&errors);
    flush_batches(p);
    for (int32_t i = 0; i < p->npartitions; i++)
        if (p->tasks[i]) pql_task_drop_cache(p->tasks[i]);
    pql_info("rules reloaded", "path=%s old_version=%s version=%s signals=%zu rules=%zu",
             p->cfg->rules_path, pql_rules_version(p->rules), pql_rules_version(fresh),
             pql_rules_nsignals(fresh), pql_rules_nrules(fresh));
    for (size_t i = 0; i < pql_rules_nsignals(fresh); i++) {
        const pql_signal *ns = pql_rules_signal(fresh, i);
        for (size_t j = 0; j < pql_rules_nsignals(p->rules); j++) {
            const pql_signal *os = pql_rules_signal(p->rules, j);
            if (!strcmp(os->name, ns->name) && strcmp(os->key, ns->key))
                pql_warn("signal definition changed: it starts empty for every account",
                         "signal=%s old_key=%s key=%s", ns->name, os->key, ns->key);
        }
    }
    pql_rules_destroy(p->rules);
    p->rules = fresh;
}

/* rules.watch: at most every rules_watch_ms, stat the rule files; a change
 * (edited, added, removed) triggers the same reload as SIGHUP.  A refused
 * set is not retried until the files change again. */
static int rules_changed(pql_pipeline *p)
{
    int64_t now = pql_now_ms();
    if (now - p->rules_checked_at < p->cfg->rules_watch_ms) return 0;
    p->rules_checked_at = now;
    return pql_rules_fingerprint(p->cfg->rules_path) != p->rules_fingerprint;
}

int pql_pipeline_run(pql_pipeline *p, volatile sig_atomic_t *stop, volatile sig_atomic_t *reload)
{
    p->stop = stop;
    p->reload = reload;
    pql_info("running", "group=%s usage=%s accounts=%s alerts=%s dlq=%s partitions=%d",
             p->cfg->group, p->topics[0], p->topics[1], p->cfg->topic_alerts, p->cfg->topic_dlq,
             p->npartitions);
    while (!*stop) {
        poll_batch(p);
        pql_sink_poll(p->sink, 0);
        process_inboxes(p); /* also writes outbox removals of delivered alerts */
        if (reload && *reload) {
            *reload = 0;
            reload_rules(p);
        }
        if (p->cfg->rules_watch_ms > 0 && rules_changed(p)) {
            pql_info("rule files changed; reloading", "path=%s", p->cfg->rules_path);
            reload_rules(p);
        }
    }
    pql_info("stopping: finishing the batch, flushing alerts, leaving the group", "%s", "");
    flush_batches(p);
    pql_sink_flush(p->sink, 10000);
    flush_batches(p); /* record the last deliveries */
    rd_kafka_consumer_close(p->consumer);
    return 0;
}

/* ---- construction ------------------------------------------------------ */

/* @returns the whole file as a NUL-terminated string (caller frees), or NULL. */
static char *read_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *data = NULL;
    long len = fseek(f, 0, SEEK_END) == 0 ? ftell(f) : -1;
    if (len >= 0 && fseek(f, 0, SEEK_SET) == 0 && (data = calloc(1, (size_t)len + 1)) &&
        fread(data, 1, (size_t)len, f) != (size_t)len) {
        free(data);
        data = NULL;
    }
    fclose(f);
    return data;
}

static int check_topics(pql_pipeline *p, char *errstr, size_t errstr_size)
{
    int counts[PQL_NTOPICS] = {0};
    for (int attempt = 0; attempt < 20; attempt++) {
        const struct rd_kafka_metadata *md = NULL;
        rd_kafka_resp_err_t err = rd_kafka_metadata(p->consumer, 1, NULL, &md, 5000);
        if (err) {
            snprintf(errstr, errstr_size, "cannot read Kafka metadata from %s: %s",
                     p->cfg->brokers[0] ? p->cfg->brokers : "the embedded cluster",
                     rd_kafka_err2str(err));
            sleep_ms(500);
            continue;
        }
        for (int i = 0; i < md->topic_cnt; i++) {
            int ti = topic_index(p, md->topics[i].topic);
            if (ti >= 0 && !md->topics[i].err) counts[ti] = md->topics[i].partition_cnt;
        }
        rd_kafka_metadata_destroy(md);
        if (counts[0] && counts[1]) break;
        sleep_ms(500);
    }
    for (int i = 0; i < PQL_NTOPICS; i++) {
        if (!counts[i]) {
            snprintf(errstr, errstr_size,
                     "input topic '%s' does not exist: create it (with the same partition count as "
                     "'%s'), or set PQLSTREAM_TOPIC_%s",
                     p->topics[i], p->topics[1 - i], i ? "ACCOUNTS" : "USAGE");
            return -1;
        }
    }
    if (counts[0] != counts[1]) {
        snprintf(errstr, errstr_size,
                 "input topics are not co-partitioned: '%s' has %d partitions, '%s' has %d. Both "
                 "must have the same count (and the same key partitioner) so an account's events "
                 "and updates reach the same task: recreate or expand one of them",
                 p->topics[0], counts[0], p->topics[1], counts[1]);
        return -1;
    }
    p->npartitions = counts[0];
    return 0;
}

pql_pipeline *pql_pipeline_new(const pql_config *cfg, const char *brokers, const char *redis_url,
                               pql_rules *rules, char *errstr, size_t errstr_size)
{
    pql_pipeline *p = calloc(1, sizeof(*p));
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    char e[512];
    if (!p) goto fail;
    p->cfg = cfg;
    p->rules = rules;
    p->rules_fingerprint = pql_rules_fingerprint(cfg->rules_path);
    p->rules_checked_at = pql_now_ms();
    p->topics[PQL_TOPIC_USAGE] = cfg->topic_usage;
    p->topics[PQL_TOPIC_ACCOUNTS] = cfg->topic_accounts;
    p->ttl_ms = cfg->state_ttl_ms;
    if (pql_rules_max_window(rules) + cfg->lateness_ms > p->ttl_ms)
        p->ttl_ms = pql_rules_max_window(rules) + cfg->lateness_ms;

    for (int i = 0; i < PQL_NTOPICS; i++) {
        const char *path = i ? cfg->accounts_writer_schema : cfg->usage_writer_schema;
        char *schema = NULL;
        if (path[0] && !(schema = read_file(path))) {
            snprintf(errstr, errstr_size, "cannot read writer schema %s: %m", path);
            goto fail;
        }
        p->decoders[i] = pql_decoder_new(i ? PQL_INPUT_ACCOUNT : PQL_INPUT_USAGE, cfg->input_format,
                                         schema, &cfg->limits, e, sizeof(e));
        free(schema);
        if (!p->decoders[i]) {
            snprintf(errstr, errstr_size, "%s schema: %s", p->topics[i], e);
            goto fail;
        }
    }
    /* Confluent schema ids: each writer schema serves both inputs' decoders,
       which take the ones that resolve against their reader schema. */
    for (size_t k = 0; k < cfg->nschema_ids; k++) {
        char *schema = read_file(cfg->schema_ids[k].value);
        if (!schema) {
            snprintf(errstr, errstr_size, "input.schemas.%s: cannot read %s: %m",
                     cfg->schema_ids[k].key, cfg->schema_ids[k].value);
            goto fail;
        }
        int ok = 0;
        char e2[512] = "";
        for (int i = 0; i < PQL_NTOPICS; i++)
            ok |= pql_decoder_register_schema(p->decoders[i],
                                              (uint32_t)strtoul(cfg->schema_ids[k].key, NULL, 10),
                                              schema, i ? e2 : e, sizeof(e)) == PQL_OK;
        free(schema);
        if (!ok) {
            snprintf(errstr, errstr_size, "input.schemas.%s (%s) fits neither input: %s; %s",
                     cfg->schema_ids[k].key, cfg->schema_ids[k].value, e, e2);
            goto fail;
        }
    }

    p->store = pql_store_open(redis_url, cfg->redis_timeout_ms, e, sizeof(e));
    if (!p->store) {
        snprintf(errstr, errstr_size, "redis: %s", e);
        goto fail;
    }
    if (pql_store_ping(p->store, e, sizeof(e)) != PQL_OK) {
        snprintf(errstr, errstr_size, "redis is not answering: %s (check PQLSTREAM_REDIS)", e);
        goto fail;
    }

    if (rd_kafka_conf_set(conf, "bootstrap.servers", brokers, errstr, errstr_size) ||
        rd_kafka_conf_set(conf, "group.id", cfg->group, errstr, errstr_size) ||
        rd_kafka_conf_set(conf, "enable.auto.commit", "false", errstr, errstr_size) ||
        rd_kafka_conf_set(conf, "enable.auto.offset.store", "false", errstr, errstr_size) ||
        /* range keeps partition p of both co-partitioned topics on one member */
        rd_kafka_conf_set(conf, "partition.assignment.strategy", "range", errstr, errstr_size) ||
        rd_kafka_conf_set(conf, "auto.offset.reset", "earliest", errstr, errstr_size) ||
        rd_kafka_conf_set(conf, "fetch.wait.max.ms", "10", errstr, errstr_size) ||
        /* end-of-partition events tell the merge that one side has nothing more */
        rd_kafka_conf_set(conf, "enable.partition.eof", "true", errstr, errstr_size))
        goto fail;
    for (size_t i = 0; i < cfg->nkafka; i++) {
        if (rd_kafka_conf_set(conf, cfg->kafka[i].key, cfg->kafka[i].value, e, sizeof(e))) {
            snprintf(errstr, errstr_size, "kafka.%s: %s", cfg->kafka[i].key, e);
            goto fail;
        }
        if (!strcmp(cfg->kafka[i].key, "auto.offset.reset"))
            p->reset_latest =
                !strcmp(cfg->kafka[i].value, "latest") || !strcmp(cfg->kafka[i].value, "end");
    }
    rd_kafka_conf_set_rebalance_cb(conf, rebalance_cb);
    rd_kafka_conf_set_opaque(conf, p);
    p->consumer = rd_kafka_new(RD_KAFKA_CONSUMER, conf, errstr, errstr_size);
    if (!p->consumer) goto fail;
    conf = NULL;
    rd_kafka_poll_set_consumer(p->consumer);

    pql_sink_callbacks cb = {on_alert_delivered, on_dlq_done, p, NULL};
    p->sink = pql_sink_new(cfg, brokers, &cb, errstr, errstr_size);
    if (!p->sink) goto fail;

    if (check_topics(p, errstr, errstr_size) < 0) goto fail;
    if (cfg->metrics_interval_ms > 0 &&
        !(p->emitter = pql_metrics_emitter_start(cfg, brokers, redis_url, p->npartitions, errstr,
                                                 errstr_size)))
        goto fail;
    p->tasks = calloc((size_t)p->npartitions, sizeof(*p->tasks));
    p->inboxes = calloc((size_t)p->npartitions, sizeof(*p->inboxes));
    p->blocked_since = calloc((size_t)p->npartitions, sizeof(*p->blocked_since));
    if (!p->tasks || !p->inboxes || !p->blocked_since) goto fail;
    for (int32_t i = 0; i < p->npartitions; i++)
        for (int k = 0; k < PQL_NTOPICS; k++)
            p->inboxes[i][k].eof_at = -1;

    rd_kafka_topic_partition_list_t *sub = rd_kafka_topic_partition_list_new(2);
    rd_kafka_topic_partition_list_add(sub, cfg->topic_usage, RD_KAFKA_PARTITION_UA);
    rd_kafka_topic_partition_list_add(sub, cfg->topic_accounts, RD_KAFKA_PARTITION_UA);
    rd_kafka_resp_err_t err = rd_kafka_subscribe(p->consumer, sub);
    rd_kafka_topic_partition_list_destroy(sub);
    if (err) {
        snprintf(errstr, errstr_size, "subscribe: %s", rd_kafka_err2str(err));
        goto fail;
    }
    return p;
fail:
    if (conf) rd_kafka_conf_destroy(conf);
    if (p) p->rules = NULL; /* not ours until success: the caller still owns it */
    pql_pipeline_destroy(p);
    return NULL;
}

void pql_pipeline_print_alerts(pql_pipeline *p, int on)
{
    p->print_alerts = on;
    pql_metrics_emitter_print(p->emitter, on);
}

void pql_pipeline_destroy(pql_pipeline *p)
{
    if (!p) return;
    pql_metrics_emitter_stop(p->emitter);
    p->emitter = NULL; /* a late revoke must not reach it */
    for (int32_t i = 0; p->tasks && i < p->npartitions; i++)
        pql_task_destroy(p->tasks[i]);
    for (int32_t i = 0; p->inboxes && i < p->npartitions; i++)
        for (int k = 0; k < PQL_NTOPICS; k++)
            inbox_free(&p->inboxes[i][k]);
    free(p->inboxes);
    free(p->blocked_since);
    free(p->tasks);
    pql_sink_destroy(p->sink, 5000);
    if (p->consumer) rd_kafka_destroy(p->consumer);
    pql_store_close(p->store);
    for (int i = 0; i < PQL_NTOPICS; i++)
        pql_decoder_destroy(p->decoders[i]);
    pql_rules_destroy(p->rules);
    free(p);
}
