/* sample.c — the bundled sample workload: a small SaaS product's traffic.
 *
 * A generator thread plays events into the usage and account-update topics
 * (plain Avro via pql_event_encode, keyed by account_id) with its own
 * idempotent producer, paced at `rate` records/s by a token bucket.
 *
 * The story.  Accounts "acct-0001"… each get, on first appearance, a short
 * history: an AccountUpdate (plan free|team, seats for team, channel,
 * employees, api_call_limit, product "workspace"), then for free accounts a self-serve `signed_up`
 * event some days ago, for team accounts (sales-led, no self-serve signup) a `subscription_started`
 * (paid from day one), and logins on some of the past days (hot teams also use a second product,
 * "whiteboard", on some of them). The history is the one place event time is not "now":
 * `active_days` in rules/pql.yaml needs logins on 3 distinct days, which wall-clock time alone
 * would take days to produce.  After that every event carries the wall clock: logins, feature_used
 * (projects/docs/chat), teammate_invited, pricing_viewed, onboarding_completed, api_request,
 * premium_feature_attempted (mostly by hot teams), and now and then a free account converting
 * (subscription_started, then plan=team with seats); hot free accounts, the ones the PQL rules
 * catch, convert more often, so the metric aggregates show PQL-to-paid well above non-PQL-to-paid.
 *
 * About 15% of the accounts are "hot" (12× as active, long history, team
 * accounts whose users fill their seats), so at 200 records/s the shipped
 * rules (team-adoption, pricing-intent, seat-saturation-80/90, premium-attempts,
 * cross-product) fire within seconds;
 * the rest trickle.  Which account does what is a pure function of the seed
 * (splitmix64): two runs with the same seed produce the same sequence of
 * (account, event) records; only timestamps differ. */
#include <stddef.h> /* sample.h uses size_t without including it */

#include "sample.h"

#include "common.h"
#include "decode.h"
#include "log.h"

#include <librdkafka/rdkafka.h>

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define HOT_SHARE  0.15
#define HOT_WEIGHT 12.0
#define TEAM_SHARE 0.35
#define MAX_PROPS  6

typedef struct sample_account {
    char id[24];
    int hot, team, introduced, onboarded;
    int users, seats, employees;
    const char *channel;
} sample_account;

/* One encoded record waiting for its token. */
typedef struct pending {
    int usage; /* 1: usage topic, 0: accounts topic */
    int account;
    pql_buf value;
} pending;

#define QUEUE_CAP 64

struct pql_sample {
    rd_kafka_t *rk;
    char *usage_topic, *accounts_topic;
    int rate;
    int64_t max_events;
    uint64_t seed, rng, next_event_id;

    sample_account *accts;
    double *cumw; /* cumulative pick weights */
    int naccts;

    pending queue[QUEUE_CAP];
    int qhead, qlen;

    pthread_t thread;
    int started;
    atomic_int stop;
    atomic_llong produced;
    atomic_llong failed;
};

/* ---- deterministic randomness --------------------------------------------- */

static uint64_t next_u64(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static double rnd01(pql_sample *s)
{
    return (double)(next_u64(&s->rng) >> 11) * 0x1.0p-53;
}

/* Uniform in [lo, hi]. */
static int rnd_int(pql_sample *s, int lo, int hi)
{
    return lo + (int)(next_u64(&s->rng) % (uint64_t)(hi - lo + 1));
}

static const char *pick(pql_sample *s, const char *const *items, const double *weights, int n)
{
    double total = 0;
    for (int i = 0; i < n; i++)
        total += weights[i];
    double r = rnd01(s) * total;
    for (int i = 0; i < n; i++) {
        if (r < weights[i]) return items[i];
        r -= weights[i];
    }
    return items[n - 1];
}

/* ---- building records ----------------------------------------------------- */

static pql_prop prop_str(const char *key, const char *val)
{
    pql_prop p = {key, strlen(key), pql_str(val, strlen(val))};
    return p;
}

static pql_prop prop_num(const char *key, double val)
{
    pql_prop p = {key, strlen(key), pql_num(val)};
    return p;
}

static pending *queue_push(pql_sample *s)
{
    if (s->qlen == QUEUE_CAP) return NULL; /* cannot happen: a step pushes < 30 */
    pending *p = &s->queue[(s->qhead + s->qlen++) % QUEUE_CAP];
    pql_buf_reset(&p->value);
    return p;
}

static void emit(pql_sample *s, int account, const pql_event *ev)
{
    char err[128];
    pending *p = queue_push(s);
    if (!p) return;
    p->usage = ev->kind == PQL_INPUT_USAGE;
    p->account = account;
    if (pql_event_encode(ev, &p->value, err, sizeof err) != PQL_OK) s->qlen--;
}

static void emit_usage(pql_sample *s, int account, int64_t ts, const char *event, int user,
                       const pql_prop *props, size_t nprops)
{
    const sample_account *a = &s->accts[account];
    char event_id[64], user_id[40];
    snprintf(event_id, sizeof event_id, "evt-%" PRIu64 "-%" PRIu64, s->seed, ++s->next_event_id);
    snprintf(user_id, sizeof user_id, "%s-u%02d", a->id, user);
    pql_event ev = {0};
    ev.kind = PQL_INPUT_USAGE;
    ev.event_id = event_id;
    ev.event_id_len = strlen(event_id);
    ev.account_id = a->id;
    ev.account_id_len = strlen(a->id);
    ev.user_id = user_id;
    ev.user_id_len = strlen(user_id);
    ev.event = event;
    ev.event_len = strlen(event);
    ev.timestamp = ts;
    ev.props = (pql_prop *)props;
    ev.nprops = nprops;
    emit(s, account, &ev);
}

static void emit_traits(pql_sample *s, int account, int64_t ts)
{
    const sample_account *a = &s->accts[account];
    pql_prop t[MAX_PROPS];
    size_t n = 0;
    t[n++] = prop_str("plan", a->team ? "team" : "free");
    t[n++] = prop_str("channel", a->channel);
    t[n++] = prop_num("employees", a->employees);
    t[n++] = prop_num("api_call_limit", a->team ? 100000 : 10000);
    if (a->team) t[n++] = prop_num("seats", a->seats);
    t[n++] = prop_str("product", "workspace"); /* what it pays for (rules/expansion.yaml) */
    pql_event ev = {0};
    ev.kind = PQL_INPUT_ACCOUNT;
    ev.account_id = a->id;
    ev.account_id_len = strlen(a->id);
    ev.timestamp = ts;
    ev.props = t;
    ev.nprops = n;
    emit(s, account, &ev);
}

/* ---- the story -------------------------------------------------------------- */

static void make_accounts(pql_sample *s)
{
    static const char *const channels[] = {"organic", "paid_search", "referral", "partner"};
    static const double channel_w[] = {4, 3, 2, 1};
    double total = 0;
    for (int i = 0; i < s->naccts; i++) {
        sample_account *a = &s->accts[i];
        snprintf(a->id, sizeof a->id, "acct-%04d", i + 1);
        a->hot = rnd01(s) < HOT_SHARE;
        a->team = rnd01(s) < TEAM_SHARE;
        if (i == 0) a->hot = 1, a->team = 0; /* at least one hot account of each plan */
        if (i == 1) a->hot = 1, a->team = 1;
        a->channel = pick(s, channels, channel_w, 4);
        a->employees = (int)(5 * (1 + rnd01(s) * rnd01(s) * 400)); /* 5 .. ~2000, skewed low */
        if (a->team) {
            a->seats = rnd_int(s, 5, 20);
            /* hot teams use every seat (saturation); others about half */
            a->users = a->hot ? a->seats : (a->seats + 1) / 2;
        } else {
            a->users = a->hot ? rnd_int(s, 3, 8) : rnd_int(s, 1, 4);
        }
        total += a->hot ? HOT_WEIGHT : 1.0;
        s->cumw[i] = total;
    }
}

static int pick_account(pql_sample *s)
{
    double r = rnd01(s) * s->cumw[s->naccts - 1];
    int lo = 0, hi = s->naccts - 1;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        if (s->cumw[mid] > r)
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

static int pick_user(pql_sample *s, const sample_account *a)
{
    return rnd_int(s, 1, a->users);
}

/* First appearance: traits, sign-up some days ago, logins on past days, all
 * in increasing event time and before `now`. */
static void introduce(pql_sample *s, int i, int64_t now)
{
    sample_account *a = &s->accts[i];
    int age = a->hot ? rnd_int(s, 3, 6) : rnd_int(s, 0, 13);
    int64_t signup = now - age * PQL_MS_DAY - rnd_int(s, 15, 75) * PQL_MS_MINUTE;
    a->introduced = 1;
    emit_traits(s, i, signup);
    pql_prop p[MAX_PROPS];
    p[0] = prop_str("channel", a->channel);
    if (!a->team) emit_usage(s, i, signup + 1000, "signed_up", 1, p, 1);
    if (a->team) {
        p[0] = prop_str("plan", "team");
        p[1] = prop_num("seats", a->seats);
        emit_usage(s, i, signup + PQL_MS_MINUTE, "subscription_started", 1, p, 2);
    }
    if (rnd01(s) < (a->hot ? 0.5 : 0.2)) {
        a->onboarded = 1;
        emit_usage(s, i, signup + 10 * PQL_MS_MINUTE, "onboarding_completed", 1, NULL, 0);
    }
    /* Whole days back from now, so the login days are distinct calendar days. */
    for (int d = age - 1; d >= 1; d--) {
        if (!a->hot && rnd01(s) >= 0.4) continue;
        int n = a->hot ? rnd_int(s, 1, 3) : 1;
        for (int k = 0; k < n; k++) {
            p[0] = prop_str("method", rnd01(s) < 0.7 ? "password" : "sso");
            emit_usage(s, i, now - d * PQL_MS_DAY + k * 1000, "login", pick_user(s, a), p, 1);
        }
        /* hot teams try the second product (cross-product exploration) */
        if (a->team && a->hot && rnd01(s) < 0.7) {
            p[0] = prop_str("product", "whiteboard");
            emit_usage(s, i, now - d * PQL_MS_DAY + 5000, "board_created", pick_user(s, a), p, 1);
        }
    }
}

static void convert(pql_sample *s, int i, int64_t now)
{
    sample_account *a = &s->accts[i];
    a->team = 1;
    a->seats = a->users + rnd_int(s, 0, 4);
    if (a->seats < 5) a->seats = 5;
    pql_prop p[2] = {prop_str("plan", "team"), prop_num("seats", a->seats)};
    emit_usage(s, i, now, "subscription_started", pick_user(s, a), p, 2);
    emit_traits(s, i, now + 1);
}

/* One ordinary event of an introduced account, at `now`. */
static void live_event(pql_sample *s, int i, int64_t now)
{
    static const char *const events[] = {"login",
                                         "feature_used",
                                         "teammate_invited",
                                         "pricing_viewed",
                                         "onboarding_completed",
                                         "api_request",
                                         "subscription_started",
                                         "premium_feature_attempted"};
    static const char *const features[] = {"projects", "docs", "chat"};
    static const double feature_w[] = {6, 2.5, 1.5};
    static const char *const premium[] = {"sso", "audit_log", "advanced_permissions"};
    static const double premium_w[] = {3, 1, 1};
    sample_account *a = &s->accts[i];
    double w[] = {24,
                  34,
                  5,
                  6,
                  a->onboarded ? 0 : 4,
                  20,
                  a->team  ? 0
                  : a->hot ? 0.6
                           : 0.3,
                  a->team && a->hot ? 1.5 : 0.3};
    const char *ev = pick(s, events, w, 8);
    int user = pick_user(s, a);
    pql_prop p[MAX_PROPS];
    size_t n = 0;
    if (!strcmp(ev, "subscription_started")) {
        convert(s, i, now);
        return;
    }
    if (!strcmp(ev, "login")) {
        p[n++] = prop_str("method", rnd01(s) < 0.7 ? "password" : "sso");
    } else if (!strcmp(ev, "feature_used")) {
        p[n++] = prop_str("feature", pick(s, features, feature_w, 3));
    } else if (!strcmp(ev, "teammate_invited")) {
        p[n++] = prop_str("role", rnd01(s) < 0.8 ? "member" : "admin");
    } else if (!strcmp(ev, "pricing_viewed")) {
        p[n++] = prop_str("page", rnd01(s) < 0.6 ? "/pricing" : "/pricing/team");
    } else if (!strcmp(ev, "premium_feature_attempted")) {
        p[n++] = prop_str("feature", pick(s, premium, premium_w, 3));
    } else if (!strcmp(ev, "onboarding_completed")) {
        a->onboarded = 1;
    } else if (!strcmp(ev, "api_request")) {
        p[n++] = prop_num("calls", rnd_int(s, 1, 500));
        p[n++] = prop_str("endpoint", rnd01(s) < 0.5 ? "/v1/projects" : "/v1/docs");
    }
    emit_usage(s, i, now, ev, user, p, n);
}

/* Generates the next step (one or more records) into the queue. */
static void generate(pql_sample *s)
{
    int64_t now = pql_now_ms();
    int i = pick_account(s);
    if (!s->accts[i].introduced)
        introduce(s, i, now);
    else
        live_event(s, i, now);
}

/* ---- the thread ------------------------------------------------------------- */

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void sleep_ns(int64_t ns)
{
    struct timespec ts = {ns / 1000000000LL, ns % 1000000000LL};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
    }
}

/* @returns 0 when handed to librdkafka, 1 when dropped (counted as failed),
 * -1 when stopping. */
static int produce(pql_sample *s, const pending *p)
{
    const sample_account *a = &s->accts[p->account];
    for (;;) {
        rd_kafka_resp_err_t err = rd_kafka_producev(
            s->rk, RD_KAFKA_V_TOPIC(p->usage ? s->usage_topic : s->accounts_topic),
            RD_KAFKA_V_KEY(a->id, strlen(a->id)), RD_KAFKA_V_VALUE(p->value.data, p->value.len),
            RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_END);
        if (!err) return 0;
        if (atomic_load(&s->stop)) return -1;
        if (err != RD_KAFKA_RESP_ERR__QUEUE_FULL) {
            if (atomic_fetch_add(&s->failed, 1) == 0)
                fprintf(stderr, "sample: produce failed: %s\n", rd_kafka_err2str(err));
            return 1;
        }
        rd_kafka_poll(s->rk, 100);
    }
}

static void *run(void *opaque)
{
    pql_sample *s = opaque;
    const double burst = s->rate >= 20 ? s->rate / 20.0 : 1.0;
    double tokens = 1.0;
    int64_t last = mono_ns();
    while (!atomic_load(&s->stop)) {
        if (s->max_events > 0 && atomic_load(&s->produced) >= s->max_events) break;
        int64_t t = mono_ns();
        tokens += (double)(t - last) * s->rate / 1e9;
        if (tokens > burst) tokens = burst;
        last = t;
        if (tokens < 1.0) {
            int64_t wait = (int64_t)((1.0 - tokens) / s->rate * 1e9);
            sleep_ns(wait < 50000000 ? wait : 50000000); /* stay responsive to stop */
            rd_kafka_poll(s->rk, 0);
            continue;
        }
        if (s->qlen == 0) generate(s);
        if (s->qlen == 0) continue;
        pending *p = &s->queue[s->qhead];
        int rc = produce(s, p);
        if (rc < 0) break;
        s->qhead = (s->qhead + 1) % QUEUE_CAP;
        s->qlen--;
        tokens -= 1.0;
        if (rc == 0) atomic_fetch_add(&s->produced, 1);
        rd_kafka_poll(s->rk, 0);
    }
    return NULL;
}

static void on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    (void)rk;
    pql_sample *s = opaque;
    if (m->err && atomic_fetch_add(&s->failed, 1) == 0)
        fprintf(stderr, "sample: delivery to %s failed: %s\n", rd_kafka_topic_name(m->rkt),
                rd_kafka_err2str(m->err));
}

static void quiet_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    (void)rk;
    (void)level;
    (void)fac;
    (void)buf;
}

pql_sample *pql_sample_start(const pql_sample_opts *opts, char *errstr, size_t errstr_size)
{
    pql_sample *s = calloc(1, sizeof *s);
    rd_kafka_conf_t *conf = NULL;
    if (!s) goto nomem;
    s->rate = opts->rate > 0 ? opts->rate : 200;
    s->naccts = opts->accounts > 0 ? opts->accounts : 200;
    s->max_events = opts->max_events;
    s->seed = opts->seed ? opts->seed : (uint64_t)mono_ns() ^ ((uint64_t)getpid() << 32);
    s->rng = s->seed;
    s->usage_topic = strdup(opts->usage_topic ? opts->usage_topic : "");
    s->accounts_topic = strdup(opts->accounts_topic ? opts->accounts_topic : "");
    s->accts = calloc((size_t)s->naccts, sizeof *s->accts);
    s->cumw = calloc((size_t)s->naccts, sizeof *s->cumw);
    if (!s->usage_topic || !s->accounts_topic || !s->accts || !s->cumw) goto nomem;
    if (!opts->bootstraps || !*s->usage_topic || !*s->accounts_topic) {
        snprintf(errstr, errstr_size, "sample workload: bootstraps and both topics are required");
        goto fail;
    }
    make_accounts(s);

    conf = rd_kafka_conf_new();
    rd_kafka_conf_set_opaque(conf, s);
    rd_kafka_conf_set_log_cb(conf, pql_log_kafka);
    rd_kafka_conf_set_dr_msg_cb(conf, on_delivery);
    rd_kafka_conf_set_log_cb(conf, quiet_log);
    const char *props[][2] = {{"bootstrap.servers", opts->bootstraps},
                              {"client.id", "pqlstream-sample"},
                              {"enable.idempotence", "true"},
                              {"linger.ms", "5"}};
    for (size_t i = 0; i < sizeof props / sizeof props[0]; i++)
        if (rd_kafka_conf_set(conf, props[i][0], props[i][1], errstr, errstr_size) !=
            RD_KAFKA_CONF_OK)
            goto fail;
    s->rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, errstr_size);
    if (!s->rk) goto fail;
    conf = NULL;

    if (pthread_create(&s->thread, NULL, run, s) != 0) {
        snprintf(errstr, errstr_size, "sample workload: cannot start its thread");
        goto fail;
    }
    s->started = 1;
    return s;

nomem:
    snprintf(errstr, errstr_size, "out of memory");
fail:
    if (conf) rd_kafka_conf_destroy(conf);
    pql_sample_stop(s);
    return NULL;
}

int64_t pql_sample_produced(const pql_sample *s)
{
    return atomic_load(&((pql_sample *)s)->produced);
}

void pql_sample_stop(pql_sample *s)
{
    if (!s) return;
    atomic_store(&s->stop, 1);
    if (s->started) pthread_join(s->thread, NULL);
    if (s->rk) {
        rd_kafka_flush(s->rk, 10000);
        rd_kafka_destroy(s->rk);
    }
    for (int i = 0; i < QUEUE_CAP; i++)
        pql_buf_free(&s->queue[i].value);
    free(s->accts);
    free(s->cumw);
    free(s->usage_topic);
    free(s->accounts_topic);
    free(s);
}
