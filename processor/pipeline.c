/* pipeline.c — the run loop: consumer, rebalances, batches.  See pipeline.h. */
#include "pipeline.h"

#include "account.h"
#include "decode.h"
#include "log.h"
#include "metrics_emit.h"
#include "sink.h"
#include "store.h"
#include "task.h"
#include "telemetry.h"

#include <librdkafka/rdkafka.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_BACKOFF_MS 5000
#define STOP_GRACE_MS  5000 /* SIGTERM: longest wait for Redis and the alert topic */
#define WRITE_AHEAD    4    /* batches of messages applied ahead of the write in flight */

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
    rd_kafka_queue_t *queue; /* the consumer queue (poll_batch drains it) */
    pql_sink *sink;
    pql_store *store;  /* claims, loads, outbox scans, pings */
    pql_store *wstore; /* batch writes: used by the writer thread alone */
    struct {           /* the writer thread and the write in flight (see "writing") */
        pthread_t thread;
        int started, quit;
        pthread_mutex_t mu;
        pthread_cond_t cv;
        int job, done; /* a write handed over / its outcome ready (under mu) */
        pql_store_batch **batches;
        pql_task **owners;
        pql_err *results;
        size_t n;      /* batches in flight (main thread only) */
        char err[512]; /* why the write failed, if it did */
        size_t ahead;  /* messages applied since the last build (main thread) */
    } flight;
    struct { /* where the main thread's time went, logged at stop (bench/) */
        uint64_t passes, empty_passes, builds, built, poll_wait_ns, idle_ns, write_wait_ns;
    } totals;
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
    int cooperative;               /* incremental (cooperative) rebalance protocol */
    int assigned_once;             /* a first assignment arrived (librdkafka#4312) */
    unsigned char *pending;        /* by partition: a built batch waits for Redis */
    int redis_down;                /* a Redis call failed: all paused, retrying */
    int64_t redis_retry_at;        /* when to try again (wall clock, ms) */
    int redis_backoff;             /* the back-off after the next failure (ms) */
    pql_telemetry *tel;            /* what /metrics and /readyz show; NULL: none */
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

/* ---- pausing -------------------------------------------------------------
 *
 * A partition is paused, so rd_kafka_consumer_poll() keeps being called (the
 * membership stays alive, rebalances are served) without fetching, when:
 *   - Redis is unavailable (every partition: nothing can be loaded or
 *     written until a retry succeeds);
 *   - its task is not claimed yet (the claim decides where to read from);
 *   - its task waits for dead letters to be acknowledged (flush_batches);
 *   - its inbox is long (back-pressure: paused past 4 batches, resumed below
 *     one). */

static int want_paused(const pql_pipeline *p, int32_t part, int ti)
{
    const pql_task *t = p->tasks[part];
    const inbox *q = &p->inboxes[part][ti];
    size_t max = (size_t)p->cfg->batch_max_messages;
    if (p->redis_down || t->state != PQL_TASK_RUNNING || t->dlq_outstanding) return 1;
    return q->paused ? inbox_len(q) >= max : inbox_len(q) > max * 4;
}

/* Brings every assigned partition's pause state in line with want_paused(),
 * in at most two librdkafka calls. */
static void update_pauses(pql_pipeline *p)
{
    rd_kafka_topic_partition_list_t *pause = NULL, *resume = NULL;
    for (int32_t part = 0; part < p->npartitions; part++) {
        if (!p->tasks[part]) continue;
        for (int ti = 0; ti < PQL_NTOPICS; ti++) {
            inbox *q = &p->inboxes[part][ti];
            int want = want_paused(p, part, ti);
            if (want == q->paused) continue;
            rd_kafka_topic_partition_list_t **l = want ? &pause : &resume;
            if (!*l) *l = rd_kafka_topic_partition_list_new(8);
            rd_kafka_topic_partition_list_add(*l, p->topics[ti], part);
            q->paused = want;
        }
    }
    if (pause) {
        rd_kafka_pause_partitions(p->consumer, pause);
        rd_kafka_topic_partition_list_destroy(pause);
    }
    if (resume) {
        rd_kafka_resume_partitions(p->consumer, resume);
        rd_kafka_topic_partition_list_destroy(resume);
    }
}

/* A Redis call failed: stop processing until a retry succeeds.  The back-off
 * doubles from 100 ms up to MAX_BACKOFF_MS. */
static void redis_failed(pql_pipeline *p, const char *op, const char *err)
{
    int pending = 0; /* built batches waiting for Redis (written as built on recovery) */
    for (int32_t i = 0; i < p->npartitions; i++)
        pending += p->pending[i];
    pql_warn("redis unavailable; partitions paused, retrying",
             "op=%s error=\"%s\" retry_ms=%d pending_batches=%d", op, err, p->redis_backoff,
             pending);
    p->redis_down = 1;
    p->redis_retry_at = pql_now_ms() + p->redis_backoff;
    p->redis_backoff =
        p->redis_backoff * 2 > MAX_BACKOFF_MS ? MAX_BACKOFF_MS : p->redis_backoff * 2;
}

static void redis_recovered(pql_pipeline *p)
{
    if (!p->redis_down) return;
    p->redis_down = 0;
    p->redis_backoff = 100;
    pql_info("redis reachable again; resuming", "%s", "");
}

/* Whether topic ti's half of task t is known to hold messages not received
 * yet: librdkafka's high watermark for it (updated by every fetch response)
 * is past the next offset the task needs.  Where the task starts is not
 * known before its first message: from the earliest offset (0 while the low
 * watermark is unknown; a partition emptied by retention reaches its end at
 * once) unless auto.offset.reset=latest, where nothing old is awaited. */
static int known_lag(pql_pipeline *p, const pql_task *t, int ti)
{
    int64_t lo = -1, hi = -1;
    if (rd_kafka_get_watermark_offsets(p->consumer, p->topics[ti], t->partition, &lo, &hi) !=
            RD_KAFKA_RESP_ERR_NO_ERROR ||
        hi < 0)
        return 0;
    int64_t next = t->next[ti];
    if (next < 0) {
        if (p->reset_latest) return 0;
        next = lo > 0 ? lo : 0;
    }
    return hi > next;
}

/* Chooses the next message of task `part` in the merge order: the smaller
 * record timestamp first, account updates before usage on a tie, each
 * partition in offset order.  The choice is a function of the logs alone —
 * so every run, interrupted or not, fetched fast or slowly, applies the same
 * sequence — whenever both sides are known: a side with no message waits
 * while it is known to have more (known_lag: the next fetch brings it, however
 * long that takes) and is passed over once it is at its end (eof_at).  Only a
 * side whose state is unknown (no fetch answered yet) is waited for up to
 * processing.max_task_idle, then gone on without (the one timing-dependent
 * case, as Kafka Streams' max.task.idle.ms after KIP-695).
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
    if (known_lag(p, p->tasks[part], mu ? PQL_TOPIC_ACCOUNTS : PQL_TOPIC_USAGE)) {
        p->blocked_since[part] = 0; /* not idle: its messages are on the way */
        return -1;
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
    pql_telemetry_dlq_outcome(p->tel, ok, pql_now_ms());
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
    t->outbox++;
}

/* Drops what task t's inboxes hold and seeks both its partitions back to the
 * offsets stored in Redis (-1: where auto.offset.reset says), so reading
 * resumes right after the last written batch. */
static void rewind_task(pql_pipeline *p, pql_task *t)
{
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(PQL_NTOPICS);
    for (int k = 0; k < PQL_NTOPICS; k++) {
        inbox_clear(&p->inboxes[t->partition][k]);
        int64_t off = t->committed[k];
        rd_kafka_topic_partition_list_add(l, p->topics[k], t->partition)->offset =
            off >= 0 ? off : (p->reset_latest ? RD_KAFKA_OFFSET_END : RD_KAFKA_OFFSET_BEGINNING);
    }
    rd_kafka_error_t *e = rd_kafka_seek_partitions(p->consumer, l, 5000);
    if (e) {
        pql_warn("seek failed", "partition=%d usage_offset=%lld accounts_offset=%lld error=\"%s\"",
                 t->partition, (long long)t->committed[0], (long long)t->committed[1],
                 rd_kafka_error_string(e));
        rd_kafka_error_destroy(e);
    }
    rd_kafka_topic_partition_list_destroy(l);
}

/* Claims task t's partition in Redis (bumping its epoch fences every older
 * owner) and re-sends its outbox.  On success t is RUNNING with the offsets
 * to resume from; on failure (Redis unavailable) t stays ASSIGNED, its
 * partitions paused, and the claim is retried with the Redis back-off.
 * @returns 0 or -1. */
static int try_claim(pql_pipeline *p, pql_task *t)
{
    pql_claim claim;
    char err[512];
    int32_t part = t->partition;
    uint64_t start = pql_telemetry_ticks();
    int ok = pql_store_claim(p->store, p->cfg->group, part, p->topics, PQL_NTOPICS, &claim, err,
                             sizeof(err)) == PQL_OK;
    pql_telemetry_redis(p->tel, "claim", start, ok, err);
    if (!ok) {
        redis_failed(p, "claim", err);
        return -1;
    }
    void *ctx[2] = {t, p};
    t->outbox = 0; /* counted by the scan */
    start = pql_telemetry_ticks();
    ok = pql_store_outbox_scan(p->store, p->cfg->group, part, resend_outbox_item, ctx, err,
                               sizeof(err)) == PQL_OK;
    pql_telemetry_redis(p->tel, "outbox_scan", start, ok, err);
    if (!ok) {
        /* claimed but the outbox was not read: claim again (a second epoch
           bump is harmless; re-sent alerts carry the same ids) */
        redis_failed(p, "outbox", err);
        return -1;
    }
    pql_task_claimed(t, &claim);
    if (pql_task_track_metrics(t, p->cfg->metrics_channel_trait, p->cfg->metrics_plan_trait))
        abort();
    if (part == 0) pql_metrics_emitter_own(p->emitter, claim.epoch);
    pql_info("partition claimed",
             "partition=%d epoch=%lld seq=%lld usage_offset=%lld accounts_offset=%lld", part,
             (long long)claim.epoch, (long long)claim.seq, (long long)claim.offsets[0],
             (long long)claim.offsets[1]);
    return 0;
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
        /* librdkafka keeps an application pause across unassign and assign:
           resume now, or a partition revoked while paused (Redis down, back-
           pressure) would never be fetched again should it come back here */
        if (p->inboxes[part][i].paused) {
            rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
            rd_kafka_topic_partition_list_add(l, p->topics[i], part);
            rd_kafka_resume_partitions(p->consumer, l);
            rd_kafka_topic_partition_list_destroy(l);
        }
        p->inboxes[part][i].paused = 0;
    }
    p->blocked_since[part] = 0;
    p->pending[part] = 0;
}

/* Creates and claims the tasks of newly assigned partitions and fills in
 * the offset each topic partition starts from: the one stored in Redis with
 * the state.  When Redis is unavailable the partition is assigned at
 * RD_KAFKA_OFFSET_INVALID, kept paused, and its messages dropped until the
 * claim succeeds and seeks (retry_redis). */
static void on_assign(pql_pipeline *p, rd_kafka_topic_partition_list_t *parts)
{
    for (int i = 0; i < parts->cnt; i++) {
        rd_kafka_topic_partition_t *tp = &parts->elems[i];
        int ti = topic_index(p, tp->topic);
        pql_task *t = task_of(p, tp->partition, 0);
        if (!t) {
            t = p->tasks[tp->partition] = pql_task_new(tp->partition, ++p->generation);
            if (!t) abort();
            pql_info("partition assigned", "partition=%d", tp->partition);
            if (!p->redis_down) try_claim(p, t);
        }
        tp->offset = RD_KAFKA_OFFSET_INVALID;
        if (t->state == PQL_TASK_RUNNING) {
            int64_t off = t->committed[ti];
            tp->offset = off >= 0
                             ? off
                             : (p->reset_latest ? RD_KAFKA_OFFSET_END : RD_KAFKA_OFFSET_BEGINNING);
        }
    }
}

/* The group assigns partitions of the usage topic only (pql_pipeline_new
 * subscribes to it alone); partition p of the account-update topic follows
 * usage partition p onto the same member.  So whatever the assignor — the
 * default cooperative-sticky, which moves only what must move, or range,
 * roundrobin — task p owns both halves of its partition.
 * @returns the usage partitions of `parts` and their followers (caller
 * destroys). */
static rd_kafka_topic_partition_list_t *with_followers(pql_pipeline *p,
                                                       const rd_kafka_topic_partition_list_t *parts)
{
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(parts->cnt * 2 + 1);
    for (int i = 0; i < parts->cnt; i++) {
        const rd_kafka_topic_partition_t *tp = &parts->elems[i];
        if (topic_index(p, tp->topic) != PQL_TOPIC_USAGE || tp->partition < 0 ||
            tp->partition >= p->npartitions) {
            pql_warn("ignoring an assigned partition that is not ours", "topic=%s partition=%d",
                     tp->topic, tp->partition);
            continue;
        }
        rd_kafka_topic_partition_list_add(l, p->topics[PQL_TOPIC_USAGE], tp->partition);
        rd_kafka_topic_partition_list_add(l, p->topics[PQL_TOPIC_ACCOUNTS], tp->partition);
    }
    return l;
}

static void flush_batches(pql_pipeline *p, int force); /* below */

static void log_assignment_error(const char *what, rd_kafka_error_t *e, rd_kafka_resp_err_t err)
{
    if (e) {
        pql_error("rebalance: assignment call failed", "call=%s error=\"%s\"", what,
                  rd_kafka_error_string(e));
        rd_kafka_error_destroy(e);
    } else if (err) {
        pql_error("rebalance: assignment call failed", "call=%s error=\"%s\"", what,
                  rd_kafka_err2str(err));
    }
}

static void rebalance_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                         rd_kafka_topic_partition_list_t *parts, void *opaque)
{
    pql_pipeline *p = opaque;
    p->cooperative = !strcmp(rd_kafka_rebalance_protocol(rk), "COOPERATIVE");
    if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) p->assigned_once = 1;
    rd_kafka_topic_partition_list_t *l = with_followers(p, parts);
    pql_telemetry_rebalance(p->tel,
                            err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS ? "assign" : "revoke");
    if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
        on_assign(p, l);
        if (p->cooperative)
            log_assignment_error("incremental_assign", rd_kafka_incremental_assign(rk, l), 0);
        else
            log_assignment_error("assign", NULL, rd_kafka_assign(rk, l));
        update_pauses(p); /* unclaimed ones, or all while Redis is down */
        rd_kafka_topic_partition_list_destroy(l);
        return;
    }
    /* Revoke (or lost): finish the batch — everything applied is written,
       or, Redis being unavailable, abandoned (the next owner re-reads it
       from the offsets in Redis) — then drop the partitions' caches. */
    pql_info("partitions revoked", "count=%d lost=%d", l->cnt / 2, rd_kafka_assignment_lost(rk));
    flush_batches(p, !(p->stop && *p->stop && p->redis_down));
    for (int i = 0; i < l->cnt; i += 2)
        drop_task(p, l->elems[i].partition, "revoked");
    if (p->cooperative)
        log_assignment_error("incremental_unassign", rd_kafka_incremental_unassign(rk, l), 0);
    else
        log_assignment_error("assign", NULL, rd_kafka_assign(rk, NULL));
    rd_kafka_topic_partition_list_destroy(l);
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

/* Fills n fresh accounts, already adopted by their tasks (account i by the
 * task of partition parts[i]), from Redis in one pipelined round trip.  On
 * failure they stay empty in the caches: the caller marks those batches
 * failed, and abandoning one drops its whole cache before any of them is
 * used.  @returns 0 or -1 (Redis). */
static int load_accounts(pql_pipeline *p, pql_account **accts, const int32_t *parts, size_t n)
{
    const char **ids = malloc(n * sizeof(*ids));
    size_t *lens = malloc(n * sizeof(*lens));
    if (!ids || !lens) abort();
    for (size_t i = 0; i < n; i++)
        ids[i] = pql_account_id(accts[i], &lens[i]);
    char err[512];
    load_ctx c = {p, accts};
    uint64_t start = pql_telemetry_ticks();
    int rc = pql_store_load_accounts(p->store, p->cfg->group, parts, ids, lens, n, load_field, &c,
                                     err, sizeof(err)) == PQL_OK
                 ? 0
                 : -1;
    pql_telemetry_redis(p->tel, "load", start, rc == 0, err);
    if (rc < 0) redis_failed(p, "load", err);
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

/* Loads the accounts of every running task's queued messages that are not
 * in its cache, keyed by the message key (= account_id): one round trip for
 * the whole pass, not one per task.  On failure every task with an account
 * in it is marked redis_failed (its batch is abandoned, re-read later).
 * @returns 0 or -1 (Redis). */
static int prefetch(pql_pipeline *p)
{
    size_t n = 0;
    for (int32_t part = 0; part < p->npartitions; part++)
        if (p->tasks[part] && p->tasks[part]->state == PQL_TASK_RUNNING)
            for (int ti = 0; ti < PQL_NTOPICS; ti++)
                n += inbox_len(&p->inboxes[part][ti]);
    if (!n) return 0;
    pql_account **accts = malloc(n * sizeof(*accts));
    int32_t *parts = malloc(n * sizeof(*parts));
    if (!accts || !parts) abort();
    size_t k = 0;
    for (int32_t part = 0; part < p->npartitions; part++) {
        pql_task *t = p->tasks[part];
        if (!t || t->state != PQL_TASK_RUNNING) continue;
        for (int ti = 0; ti < PQL_NTOPICS; ti++) {
            inbox *q = &p->inboxes[part][ti];
            for (size_t i = 0; i < q->len; i++) {
                rd_kafka_message_t *m = q->m[q->head + i];
                if (m->key && m->key_len && !pql_task_account(t, m->key, m->key_len)) {
                    parts[k] = part;
                    accts[k++] = adopt_new(p, t, m->key, m->key_len);
                }
            }
        }
    }
    int rc = k ? load_accounts(p, accts, parts, k) : 0;
    for (size_t i = 0; rc < 0 && i < k; i++)
        p->tasks[parts[i]]->redis_failed = 1;
    free(accts);
    free(parts);
    return rc;
}

/* The event's account: cached (prefetch loaded it by the message key), or
 * else, when its id differs from the key (or there is none), loaded alone.
 * NULL when Redis failed. */
static pql_account *ensure_account(pql_pipeline *p, pql_task *t, const pql_event *ev)
{
    pql_account *a = pql_task_account(t, ev->account_id, ev->account_id_len);
    if (a) return a;
    a = adopt_new(p, t, ev->account_id, ev->account_id_len);
    return load_accounts(p, &a, &t->partition, 1) < 0 ? NULL : a;
}

static void dead_letter(pql_pipeline *p, pql_task *t, rd_kafka_message_t *m, int ti, pql_err code,
                        const char *reason)
{
    pql_warn("dead-lettered", "topic=%s partition=%d offset=%lld code=%s reason=\"%s\"",
             p->topics[ti], m->partition, (long long)m->offset, pql_err_str(code), reason);
    if (pql_sink_dlq(p->sink, t->generation, m, code, reason) != PQL_OK) {
        t->dlq_failed = 1;
        pql_telemetry_dlq_outcome(p->tel, 0, pql_now_ms());
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
    p->flight.ahead++;
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
    pql_account *a = ensure_account(p, t, &ev);
    if (!a) {
        t->redis_failed = 1; /* abandon the batch, re-read it when Redis is back */
        return;
    }
    pql_task_apply(t, a, &ev, ti, m->offset, now, p->cfg->output_json);
}

/* t's batch cannot be written: a dead letter was not delivered (its offsets
 * would pass the message), or an account could not be loaded.  Drops it and
 * seeks back to the stored offsets, so the batch is read and applied again. */
static void abandon_batch(pql_pipeline *p, pql_task *t)
{
    pql_warn("batch abandoned; re-reading it", "partition=%d reason=%s", t->partition,
             t->redis_failed ? "redis" : "dead letter not delivered");
    pql_task_abandon(t);
    t->redis_failed = 0;
    rewind_task(p, t);
}

/* Redis applied t's batch: produce its alerts (already in the outbox) and
 * commit its offsets to Kafka for lag tools. */
static void publish(pql_pipeline *p, pql_task *t)
{
    pql_telemetry_batch(p->tel, p->topics, t); /* before committed() resets the batch */
    pql_task_committed(t);
    for (size_t k = 0; k < t->built_alerts; k++)
        pql_sink_alert(p->sink, t->partition, t->generation, t->alerts[k].id, t->alerts[k].key,
                       t->alerts[k].key_len, t->alerts[k].payload, t->alerts[k].payload_len);
    pql_task_alerts_published(t);
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(2);
    for (int k = 0; k < PQL_NTOPICS; k++)
        if (t->committed[k] >= 0)
            rd_kafka_topic_partition_list_add(l, p->topics[k], t->partition)->offset =
                t->committed[k];
    if (l->cnt) rd_kafka_commit(p->consumer, l, 1);
    rd_kafka_topic_partition_list_destroy(l);
}

/* ---- writing -------------------------------------------------------------
 *
 * A built batch is pending (p->pending) until Redis has applied it.  Writes
 * overlap processing: flush_batches() collects the outcome of the write in
 * flight (write_finish), builds the next batches and hands them to the
 * writer thread (write_start), which sends them and reads the replies on a
 * connection of its own (p->wstore) while the loop polls and applies the
 * next messages: pqlstream and Redis each busy on their core instead of
 * taking turns.  (A non-blocking send alone would not do: a large pipeline
 * fills the socket buffer and the sender waits while Redis executes.)
 *
 * The main thread owns everything else.  The writer touches only p->wstore,
 * the batches handed over (not modified until their outcome is collected)
 * and the flight fields under the mutex.  A task applies on while its batch
 * is in flight: what it applies goes to its next batch (task.h: built_next,
 * built_alerts, built_stats), and the accounts of the batch in flight stay
 * cached (pql_task_trim), so no load on p->store reads Redis from before
 * that write. */

static void *writer_main(void *opaque)
{
    pql_pipeline *p = opaque;
    pthread_setname_np(pthread_self(), "pql-writer"); /* top -H, perf, gdb */
    pthread_mutex_lock(&p->flight.mu);
    for (;;) {
        while (!p->flight.job && !p->flight.quit)
            pthread_cond_wait(&p->flight.cv, &p->flight.mu);
        if (p->flight.quit) break;
        size_t n = p->flight.n;
        pthread_mutex_unlock(&p->flight.mu);
        char err[512] = "";
        uint64_t start = pql_telemetry_ticks();
        pql_err io =
            pql_store_commit(p->wstore, p->flight.batches, n, p->flight.results, err, sizeof(err));
        pql_telemetry_redis(p->tel, "commit", start, io == PQL_OK, err);
        pthread_mutex_lock(&p->flight.mu);
        memcpy(p->flight.err, err, sizeof(err));
        p->flight.job = 0;
        p->flight.done = 1;
        pthread_cond_broadcast(&p->flight.cv);
        rd_kafka_queue_yield(p->queue); /* wakes the main thread's poll */
    }
    pthread_mutex_unlock(&p->flight.mu);
    return NULL;
}

/* Collects the outcome of the write in flight (waiting for it): produces
 * the alerts of each applied batch and commits its offsets to Kafka; drops
 * a fenced task.  A batch that failed on I/O stays pending, unchanged, for
 * the next try (safe: the script recognises an applied batch by its seq).
 * @returns 0, or -1 when Redis failed (redis_failed was called). */
static int write_finish(pql_pipeline *p)
{
    size_t n = p->flight.n;
    if (!n) return 0;
    uint64_t start = pql_telemetry_ticks();
    pthread_mutex_lock(&p->flight.mu);
    while (!p->flight.done)
        pthread_cond_wait(&p->flight.cv, &p->flight.mu);
    p->flight.done = 0;
    pthread_mutex_unlock(&p->flight.mu);
    p->totals.write_wait_ns += pql_telemetry_ticks() - start;
    p->flight.n = 0;
    int rc = 0;
    for (size_t i = 0; i < n; i++) {
        pql_task *t = p->flight.owners[i];
        if (p->flight.results[i] == PQL_OK) {
            p->pending[t->partition] = 0;
            publish(p, t);
        } else if (p->flight.results[i] == PQL_ERR_FENCED) {
            pql_error("fenced: another member owns this partition now; dropping it",
                      "partition=%d epoch=%lld seq=%lld error=\"%s\"", t->partition,
                      (long long)t->claim.epoch, (long long)t->claim.seq,
                      pql_store_batch_refusal(t->batch));
            p->pending[t->partition] = 0;
            pql_telemetry_fenced(p->tel);
            pql_task_abandon(t);
            drop_task(p, t->partition, "fenced");
        } else if (p->flight.results[i] == PQL_ERR_REWOUND) {
            /* Redis's (state, offsets) pair is consistent, only older than
               ours: claim again and re-read from its offsets (alerts fired
               again carry the same ids) */
            pql_error("redis lost writes it had acknowledged (restarted without them?); claiming "
                      "the partition again and re-reading it from the offsets redis holds",
                      "partition=%d epoch=%lld seq=%lld error=\"%s\"", t->partition,
                      (long long)t->claim.epoch, (long long)t->claim.seq,
                      pql_store_batch_refusal(t->batch));
            p->pending[t->partition] = 0;
            pql_task_abandon(t);
            t->state = PQL_TASK_ASSIGNED; /* paused; retry_redis claims it if this fails */
            if (!p->redis_down && try_claim(p, t) == 0) rewind_task(p, t);
        } else {
            rc = -1;
        }
    }
    if (rc < 0) redis_failed(p, "write", p->flight.err);
    return rc;
}

/* Hands every pending batch to the writer thread: one pipelined round trip
 * (pql_store_commit), whose outcome write_finish() collects. */
static void write_start(pql_pipeline *p)
{
    if (p->flight.n) return; /* one write in flight at a time */
    size_t n = 0;
    for (int32_t i = 0; i < p->npartitions; i++)
        if (p->pending[i]) {
            p->flight.batches[n] = p->tasks[i]->batch;
            p->flight.owners[n++] = p->tasks[i];
        }
    if (!n) return;
    pthread_mutex_lock(&p->flight.mu);
    p->flight.n = n;
    p->flight.job = 1;
    pthread_cond_broadcast(&p->flight.cv);
    pthread_mutex_unlock(&p->flight.mu);
}

/* @returns whether the write in flight has its outcome (no wait). */
static int write_done(pql_pipeline *p)
{
    pthread_mutex_lock(&p->flight.mu);
    int done = p->flight.done;
    pthread_mutex_unlock(&p->flight.mu);
    return done;
}

/* Writes every pending batch and waits for the outcome.
 * @returns 0, or -1 when Redis failed (redis_failed was called). */
static int write_pending(pql_pipeline *p)
{
    if (write_finish(p) < 0) return -1;
    write_start(p);
    return write_finish(p);
}

/* Ends the batch of every running task: dead letters acknowledged, then one
 * atomic write per task, all in one round trip, sent while the previous
 * one's outcome has been read (see "writing" above).  Each batch is built
 * once: building marks its accounts clean, so after an I/O error the very
 * same batch is sent again, and until then its task builds nothing more.
 * While Redis is down the write waits for the back-off, unless `force`
 * (revocation, stopping, reloading: finish now — written or failed — before
 * returning). */
static void flush_batches(pql_pipeline *p, int force)
{
    /* Dead letters must be acknowledged before the offset moves past them:
       a task waiting for acknowledgements keeps its batch open (and its
       partitions paused, see want_paused) while the loop goes on polling;
       when it must finish now, it waits a little, then abandons. */
    for (int32_t i = 0; force && i < p->npartitions; i++)
        if (p->tasks[i] && p->tasks[i]->dlq_outstanding) {
            pql_sink_flush(p->sink, 2000);
            break;
        }
    /* Natural batching: while Redis runs the write in flight, go on applying
       what arrives instead of waiting for it (the writer thread wakes the
       loop's poll when the write ends), up to WRITE_AHEAD batches of messages;
       the next write then carries all of it, in as many commands as one.
       With nothing new applied, too: the poll, not this, waits for the
       write (it blocks until a message or the writer's wake-up arrives).
       Waiting here instead stopped the fetch for a whole write whenever a
       pass came up empty, e.g. on the wake-up of a write already collected:
       the loop then took turns with Redis instead of overlapping it. */
    if (!force && p->flight.n &&
        p->flight.ahead < WRITE_AHEAD * (size_t)p->cfg->batch_max_messages && !write_done(p))
        return;
    write_finish(p); /* the previous write: its tasks can build again */
    int64_t now = pql_now_ms();
    if (p->flight.ahead) { /* a build that carries messages (idle passes come here too) */
        p->totals.builds++;
        p->totals.built += p->flight.ahead;
    }
    p->flight.ahead = 0;
    size_t max = (size_t)p->cfg->cache_max_accounts / (size_t)p->npartitions + 1;
    size_t max_bytes =
        p->cfg->cache_max_memory ? p->cfg->cache_max_memory / (size_t)p->npartitions : SIZE_MAX;
    for (int32_t i = 0; i < p->npartitions; i++) {
        pql_task *t = p->tasks[i];
        if (!t || t->state != PQL_TASK_RUNNING || p->pending[i]) continue;
        if (t->dlq_outstanding && !t->dlq_failed && !force) continue;
        if (t->dlq_failed || t->dlq_outstanding || t->redis_failed) {
            abandon_batch(p, t);
        } else if (t->dirty || t->ntouched || t->ndelivered) { /* else nothing to write */
            p->pending[i] =
                (unsigned char)pql_task_build_batch(t, p->cfg->group, p->topics, p->ttl_ms, now);
            pql_task_trim(t, max, max_bytes);
        }
    }
    if (p->redis_down && !force) return;
    if (force)
        write_pending(p);
    else
        write_start(p);
}

/* While Redis is down: at each back-off, claim the unclaimed tasks (seeking
 * their partitions to the stored offsets) and write the pending batches;
 * when all of it succeeds, processing resumes. */
static void retry_redis(pql_pipeline *p)
{
    char err[512];
    if (pql_now_ms() < p->redis_retry_at) return;
    uint64_t start = pql_telemetry_ticks();
    int ok = pql_store_ping(p->store, err, sizeof(err)) == PQL_OK;
    pql_telemetry_redis(p->tel, "ping", start, ok, err);
    if (!ok) {
        redis_failed(p, "ping", err);
        return;
    }
    for (int32_t i = 0; i < p->npartitions; i++) {
        pql_task *t = p->tasks[i];
        if (!t || t->state != PQL_TASK_ASSIGNED) continue;
        if (try_claim(p, t) < 0) return; /* Redis, not the task: one try per round */
        rewind_task(p, t);
    }
    if (write_pending(p) < 0) return;
    redis_recovered(p);
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
    inbox_push(q, m); /* back-pressure: update_pauses() */
}

/* Messages taken from the consumer queue per librdkafka call. */
#define POLL_CHUNK 512

/* Fills the inboxes by natural batching: waits up to batch.max_ms for a
 * first message, then takes what the consumer queue already holds, up to
 * batch.max_messages, without waiting again.  Under load the queue is never
 * empty and batches grow to batch.max_messages (few, large Redis writes);
 * at low load a message is processed as soon as it arrives instead of
 * waiting out a timer (latency); with a write in flight the wait also ends
 * when the write does (the writer thread yields the queue), and not at all
 * when it has ended already.  The queue is drained by
 * rd_kafka_consume_batch_queue (FACTS.md: several times the message rate of
 * rd_kafka_consumer_poll); both serve rebalances and reset the
 * max.poll.interval.ms timer.  @returns how many messages were polled. */
static size_t poll_batch(pql_pipeline *p)
{
    size_t n = 0, max = (size_t)p->cfg->batch_max_messages;
    /* Waits for a message, or for the write in flight to finish: the writer
       thread yields the queue then (polling with a zero timeout instead spun
       a core away from Redis and the broker threads while it waited).  A
       yield taken by the batch reads below is made up for by write_done. */
    int timeout = p->flight.n && write_done(p) ? 0 : p->cfg->batch_max_ms;
    uint64_t start = pql_telemetry_ticks();
    rd_kafka_message_t *m = rd_kafka_consumer_poll(p->consumer, timeout);
    /* a wait that ended empty is idleness (or a yield); one that a message
       ended is a starved fetch (see kafka.queued.min.messages) */
    *(m ? &p->totals.poll_wait_ns : &p->totals.idle_ns) += pql_telemetry_ticks() - start;
    p->totals.passes++;
    p->totals.empty_passes += !m;
    if (!m) return 0;
    n += !m->err;
    route(p, m);
    rd_kafka_message_t *chunk[POLL_CHUNK];
    while (n < max) {
        size_t want = max - n < POLL_CHUNK ? max - n : POLL_CHUNK;
        ssize_t got = rd_kafka_consume_batch_queue(p->queue, 0, chunk, want);
        if (got <= 0) break;
        for (ssize_t i = 0; i < got; i++) {
            n += !chunk[i]->err;
            route(p, chunk[i]);
        }
    }
    return n;
}

/* Applies what the merge order allows of every task's inboxes, then writes.
 * A Redis failure stops at once (the other tasks' messages wait in their
 * inboxes): each further call would wait for redis.timeout_ms. */
static void process_inboxes(pql_pipeline *p)
{
    int64_t now = pql_now_ms();
    prefetch(p); /* on failure: Redis is down, its tasks redis_failed */
    for (int32_t part = 0; part < p->npartitions && !p->redis_down; part++) {
        pql_task *t = p->tasks[part];
        if (!t || t->state != PQL_TASK_RUNNING) continue;
        int ti;
        while (!t->dlq_failed && !t->redis_failed && (ti = merge_next(p, part, now)) >= 0) {
            inbox *q = &p->inboxes[part][ti];
            process_message(p, t, inbox_peek(q), ti, now);
            inbox_pop(q);
        }
    }
    flush_batches(p, 0);
}

/* Loads the rule files again; if valid, swaps them in at this batch boundary.
 * Everything applied is written already, so every cached account is clean:
 * the caches are dropped and accounts reload under the new set — firing
 * states of rules that still exist are kept (by name), signals whose
 * definition changed start empty (their storage key changed). */
static int any_pending(const pql_pipeline *p); /* below */

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
        pql_telemetry_rules_reload(p->tel, 0);
        return;
    }
    pql_buf_free(&errors);
    /* accounts reload from Redis: everything applied must be there first */
    flush_batches(p, 1);
    if (p->redis_down || any_pending(p)) {
        pql_warn("rules reload postponed: the last batch is not written yet (redis unavailable)",
                 "path=%s", p->cfg->rules_path);
        pql_rules_destroy(fresh);
        p->rules_fingerprint = 0; /* the file watch tries again */
        if (p->reload) *p->reload = 1;
        return;
    }
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
    pql_telemetry_set_rules(p->tel, fresh);
    pql_telemetry_rules_reload(p->tel, 1);
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

static int any_pending(const pql_pipeline *p)
{
    for (int32_t i = 0; i < p->npartitions; i++)
        if (p->pending[i]) return 1;
    return 0;
}

/* librdkafka before 2.3.0 aborts (assertion `assignor_state`) when a
 * cooperative-sticky consumer is destroyed after its JoinGroup response (an
 * assignor chosen) but before its first assignment: librdkafka#4312, fixed
 * by librdkafka PR #4381.  The response may arrive while closing, so every
 * consumer that never had an assignment counts as in that window.
 * @returns whether p's consumer must not be destroyed. */
static int in_first_join(const pql_pipeline *p)
{
    return rd_kafka_version() < 0x020300ff && !p->assigned_once;
}

/* A consumer handle kept, not destroyed, at exit (in_first_join): reachable
 * here, so it is not reported as a leak. */
static rd_kafka_t *kept_consumer;

/* SIGTERM/SIGINT: finish the batch, flush the alerts, commit, leave the
 * group — within STOP_GRACE_MS when Redis or the alert topic is down.  What
 * cannot be finished is not lost: an unwritten batch is re-read by the next
 * owner from the offsets in Redis, undelivered alerts stay in the outbox and
 * the next owner sends them. */
static void stop_cleanly(pql_pipeline *p)
{
    int64_t deadline = pql_now_ms() + STOP_GRACE_MS;
    pql_info("stopping: finishing the batch, flushing alerts, leaving the group", "%s", "");
    flush_batches(p, 1);
    while (any_pending(p) && pql_now_ms() < deadline) {
        pql_sink_poll(p->sink, 100);
        if (pql_now_ms() >= p->redis_retry_at) write_pending(p);
    }
    if (any_pending(p))
        pql_error("stopping without writing the last batch: redis unavailable; the next owner "
                  "of its partitions re-reads it from the offsets stored in Redis",
                  "%s", "");
    else
        redis_recovered(p);
    int64_t left_ms = deadline - pql_now_ms();
    int in_flight = pql_sink_flush(p->sink, left_ms > 1000 ? (int)left_ms : 1000);
    if (in_flight)
        pql_warn("stopping with alerts undelivered: they stay in the outbox, the next owner of "
                 "their partitions sends them",
                 "in_flight=%d", in_flight);
    if (!p->redis_down) flush_batches(p, 1); /* record the last deliveries */
    rd_kafka_consumer_close(p->consumer);    /* revokes (rebalance_cb), leaves the group */
    if (in_first_join(p)) {
        pql_warn("stopped before the first assignment: the consumer handle is left to the exit "
                 "(librdkafka < 2.3.0 aborts destroying it: librdkafka#4312)",
                 "librdkafka=%s", rd_kafka_version_str());
        kept_consumer = p->consumer;
        p->consumer = NULL;
    }
}

/* Once per loop pass: liveness and the gauges of /metrics and /readyz. */
static void report(pql_pipeline *p)
{
    if (!p->tel) return;
    pql_telemetry_loop l = {.partitions = p->npartitions,
                            .alerts_retrying = (int64_t)pql_sink_retrying(p->sink)};
    for (int32_t i = 0; i < p->npartitions; i++) {
        const pql_task *t = p->tasks[i];
        if (!t || t->state != PQL_TASK_RUNNING) continue;
        l.assigned++;
        l.cached_accounts += (int64_t)pql_cache_count(t->cache);
        l.cached_bytes += (int64_t)pql_cache_bytes(t->cache);
        l.outbox += t->outbox;
    }
    int64_t now = pql_now_ms();
    pql_telemetry_write_retrying(p->tel, p->redis_down && any_pending(p), now);
    pql_telemetry_loop_done(p->tel, &l, now);
}

int pql_pipeline_run(pql_pipeline *p, volatile sig_atomic_t *stop, volatile sig_atomic_t *reload)
{
    p->stop = stop;
    p->reload = reload;
    pql_info("running", "group=%s usage=%s accounts=%s alerts=%s dlq=%s partitions=%d",
             p->cfg->group, p->topics[0], p->topics[1], p->cfg->topic_alerts, p->cfg->topic_dlq,
             p->npartitions);
    while (!*stop) {
        /* Every pass polls the consumer (at most batch.max_ms) and makes at
           most one bounded Redis attempt, so rd_kafka_consumer_poll is never
           starved past max.poll.interval.ms, whatever Redis does. */
        size_t polled = poll_batch(p);
        uint64_t start = pql_telemetry_ticks();
        pql_sink_poll(p->sink, 0);
        if (p->redis_down)
            retry_redis(p);
        else
            process_inboxes(p); /* also writes outbox removals of delivered alerts */
        if (polled && !p->redis_down) pql_telemetry_batch_done(p->tel, start);
        update_pauses(p);
        report(p);
        if (p->redis_down) continue; /* reloads wait for a clean, written state */
        if (reload && *reload) {
            *reload = 0;
            reload_rules(p);
        }
        if (p->cfg->rules_watch_ms > 0 && rules_changed(p)) {
            pql_info("rule files changed; reloading", "path=%s", p->cfg->rules_path);
            reload_rules(p);
        }
    }
    stop_cleanly(p);
    /* Totals for benchmarks and capacity planning (bench/, docs/performance.md). */
    uint64_t round_trips = 0, commands = 0, wround_trips = 0, wcommands = 0;
    pql_store_stats(p->store, &round_trips, &commands);
    pql_store_stats(p->wstore, &wround_trips, &wcommands);
    round_trips += wround_trips;
    commands += wcommands;
    pql_info("redis client totals", "round_trips=%llu commands=%llu",
             (unsigned long long)round_trips, (unsigned long long)commands);
    pql_info("loop totals",
             "passes=%llu empty_passes=%llu builds=%llu messages_per_build=%.0f "
             "poll_wait_ms=%.0f idle_ms=%.0f write_wait_ms=%.0f",
             (unsigned long long)p->totals.passes, (unsigned long long)p->totals.empty_passes,
             (unsigned long long)p->totals.builds,
             p->totals.builds ? (double)p->totals.built / (double)p->totals.builds : 0.0,
             (double)p->totals.poll_wait_ns / 1e6, (double)p->totals.idle_ns / 1e6,
             (double)p->totals.write_wait_ns / 1e6);
    return 0;
}

/* librdkafka statistics (every statistics.interval.ms, on the polling
 * thread): consumer lag per partition.  @returns 0: librdkafka frees json. */
static int stats_cb(rd_kafka_t *rk, char *json, size_t len, void *opaque)
{
    (void)rk;
    pql_pipeline *p = opaque;
    if (pql_telemetry_kafka_stats(p->tel, json, len) < 0)
        pql_debug("unreadable librdkafka statistics", "bytes=%zu", len);
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

    p->store = pql_store_new(redis_url, cfg->redis_timeout_ms, e, sizeof(e));
    if (!p->store) {
        snprintf(errstr, errstr_size, "redis: %s (check PQLSTREAM_REDIS)", e);
        goto fail;
    }
    p->wstore = pql_store_new(redis_url, cfg->redis_timeout_ms, e, sizeof(e));
    if (!p->wstore) {
        snprintf(errstr, errstr_size, "redis: %s (check PQLSTREAM_REDIS)", e);
        goto fail;
    }
    pthread_mutex_init(&p->flight.mu, NULL);
    pthread_cond_init(&p->flight.cv, NULL);
    if (pthread_create(&p->flight.thread, NULL, writer_main, p) != 0) {
        snprintf(errstr, errstr_size, "cannot start the writer thread");
        goto fail;
    }
    p->flight.started = 1;
    p->redis_backoff = 100;
    pql_err perr = pql_store_ping(p->store, e, sizeof(e));
    if (perr == PQL_ERR_IO) {
        redis_failed(p, "connect", e); /* start anyway, paused: it may be restarting */
    } else if (perr != PQL_OK) {
        snprintf(errstr, errstr_size, "%s (check the user and password in PQLSTREAM_REDIS)", e);
        goto fail;
    }

    if (rd_kafka_conf_set(conf, "bootstrap.servers", brokers, errstr, errstr_size) ||
        rd_kafka_conf_set(conf, "group.id", cfg->group, errstr, errstr_size) ||
        rd_kafka_conf_set(conf, "enable.auto.commit", "false", errstr, errstr_size) ||
        rd_kafka_conf_set(conf, "enable.auto.offset.store", "false", errstr, errstr_size) ||
        /* incremental rebalances: a join or leave moves only what must move,
           the other members keep processing (see with_followers) */
        rd_kafka_conf_set(conf, "partition.assignment.strategy", "cooperative-sticky", errstr,
                          errstr_size) ||
        (cfg->instance_id[0] &&
         rd_kafka_conf_set(conf, "group.instance.id", cfg->instance_id, errstr, errstr_size)) ||
        rd_kafka_conf_set(conf, "auto.offset.reset", "earliest", errstr, errstr_size) ||
        rd_kafka_conf_set(conf, "fetch.wait.max.ms", "10", errstr, errstr_size) ||
        /* The pre-fetch must hold more than a second of processing: with
           the partitions forwarded to one consumer queue, librdkafka 2.0.2
           compares that whole queue with queued.min.messages, and a broker
           thread that found it full looks again only about once a second.
           At the default 100,000 the loop drained it and waited ~1 s at a
           time (bench/: idle 1-4 s of a 12 s run, throughput bimodal). */
        rd_kafka_conf_set(conf, "queued.min.messages", "500000", errstr, errstr_size) ||
        /* consumer lag for /metrics (kafka.statistics.interval.ms overrides) */
        rd_kafka_conf_set(conf, "statistics.interval.ms", "5000", errstr, errstr_size) ||
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
    rd_kafka_conf_set_stats_cb(conf, stats_cb);
    rd_kafka_conf_set_opaque(conf, p);
    rd_kafka_conf_set_log_cb(conf, pql_log_kafka);
    p->consumer = rd_kafka_new(RD_KAFKA_CONSUMER, conf, errstr, errstr_size);
    if (!p->consumer) goto fail;
    conf = NULL;
    rd_kafka_poll_set_consumer(p->consumer);
    p->queue = rd_kafka_queue_get_consumer(p->consumer);

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
    p->pending = calloc((size_t)p->npartitions, sizeof(*p->pending));
    p->flight.batches = calloc((size_t)p->npartitions, sizeof(*p->flight.batches));
    p->flight.owners = calloc((size_t)p->npartitions, sizeof(*p->flight.owners));
    p->flight.results = calloc((size_t)p->npartitions, sizeof(*p->flight.results));
    if (!p->tasks || !p->inboxes || !p->blocked_since || !p->pending || !p->flight.batches ||
        !p->flight.owners || !p->flight.results)
        goto fail;
    for (int32_t i = 0; i < p->npartitions; i++)
        for (int k = 0; k < PQL_NTOPICS; k++)
            p->inboxes[i][k].eof_at = -1;

    /* the usage topic only: account-update partitions follow (with_followers) */
    rd_kafka_topic_partition_list_t *sub = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(sub, cfg->topic_usage, RD_KAFKA_PARTITION_UA);
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

void pql_pipeline_set_telemetry(pql_pipeline *p, pql_telemetry *tel)
{
    p->tel = tel;
    for (int i = 0; i < PQL_NTOPICS; i++) /* every input topic shows, from zero */
        pql_telemetry_events(tel, p->topics[i], 0, 0, 0);
}

void pql_pipeline_print_alerts(pql_pipeline *p, int on)
{
    p->print_alerts = on;
    pql_metrics_emitter_print(p->emitter, on);
}

void pql_pipeline_destroy(pql_pipeline *p)
{
    if (!p) return;
    if (p->flight.started) { /* a write in flight (none after a clean stop) ends first */
        pthread_mutex_lock(&p->flight.mu);
        while (p->flight.job)
            pthread_cond_wait(&p->flight.cv, &p->flight.mu);
        p->flight.quit = 1;
        pthread_cond_broadcast(&p->flight.cv);
        pthread_mutex_unlock(&p->flight.mu);
        pthread_join(p->flight.thread, NULL);
        pthread_cond_destroy(&p->flight.cv);
        pthread_mutex_destroy(&p->flight.mu);
    }
    pql_metrics_emitter_stop(p->emitter);
    p->emitter = NULL; /* a late revoke must not reach it */
    for (int32_t i = 0; p->tasks && i < p->npartitions; i++)
        pql_task_destroy(p->tasks[i]);
    for (int32_t i = 0; p->inboxes && i < p->npartitions; i++)
        for (int k = 0; k < PQL_NTOPICS; k++)
            inbox_free(&p->inboxes[i][k]);
    free(p->inboxes);
    free(p->blocked_since);
    free(p->pending);
    free(p->tasks);
    pql_sink_destroy(p->sink, 1000); /* pql_pipeline_run flushed already */
    if (p->queue) rd_kafka_queue_destroy(p->queue);
    if (p->consumer) rd_kafka_destroy(p->consumer);
    pql_store_close(p->store);
    pql_store_close(p->wstore);
    free(p->flight.batches);
    free(p->flight.owners);
    free(p->flight.results);
    for (int i = 0; i < PQL_NTOPICS; i++)
        pql_decoder_destroy(p->decoders[i]);
    pql_rules_destroy(p->rules);
    free(p);
}
