/* workload.c — the benchmark's workload: a SaaS product's usage, skewed the
 * way real accounts are, shaped so every shipped rule (rules/) fires.
 *
 * Accounts "acct-0000001"… have Zipf–Mandelbrot activity: account of rank k
 * (0-based) is picked with weight 1/(k + ZIPF_Q)^s (s = --zipf, 1.0 by
 * default).  The offset ZIPF_Q keeps the busiest account near 0.3% of the
 * events at 50k accounts: a plain Zipf would put ~9% of all events on one
 * account, hence on one partition, past the mock cluster's retention of
 * 100k messages / 5 MB per partition (FACTS.md) — messages would be lost.
 *
 * On first appearance an account gets an AccountUpdate (plan free|team,
 * channel, employees, api_call_limit, product "workspace", seats for teams)
 * and a lifecycle event: `signed_up` (free) or `subscription_started` (team,
 * sales-led).  Then each step is one event of the mix below, for a user of
 * the account (teams have 0.5–1.1× their seats in users, so some saturate):
 *
 *   login 22, feature_used 30 (projects 60%), teammate_invited 4,
 *   pricing_viewed 5, onboarding_completed 2 (once), api_request 22
 *   (properties.calls 1–500), premium_feature_attempted 4 (1 for free
 *   accounts), board_created 3 (properties.product = "whiteboard": another
 *   product), subscription_started 0.4 (free accounts: a conversion, then an
 *   AccountUpdate plan=team with seats), seat change 0.5 (teams: an
 *   AccountUpdate).
 *
 * History is produced in increasing event time over the `days` days before
 * now, with the event time as the record timestamp.  Which account does what
 * is a pure function of the seed (splitmix64). */
#include "bench.h"

#include "decode.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define ZIPF_Q    50.0
#define MAX_PROPS 8

typedef struct bench_account {
    unsigned char introduced, team, onboarded, channel;
    unsigned short seats, users;
} bench_account;

struct bench_workload {
    bench_workload_opts opts;
    bench_account *accts;
    double *cumw;
    uint64_t rng, next_event_id;
    int64_t introduced;
    pql_buf value;
    /* where step() sends its records: Kafka, or a function (bench_workload_generate) */
    bench_sink_fn sink;
    void *sink_opaque;
    rd_kafka_t *rk;
    const char *usage_topic, *accounts_topic;
    int64_t produced_usage, produced_updates, produced_bytes;
    int failed;
};

static const char *const CHANNELS[] = {"organic", "paid_search", "referral", "partner"};

/* ---- randomness ------------------------------------------------------------- */

static uint64_t next_u64(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static double rnd01(bench_workload *w)
{
    return (double)(next_u64(&w->rng) >> 11) * 0x1.0p-53;
}

static int rnd_int(bench_workload *w, int lo, int hi)
{
    return lo + (int)(next_u64(&w->rng) % (uint64_t)(hi - lo + 1));
}

bench_workload *bench_workload_new(const bench_workload_opts *opts)
{
    bench_workload *w = calloc(1, sizeof *w);
    if (!w) return NULL;
    w->opts = *opts;
    if (w->opts.accounts < 1) w->opts.accounts = 1;
    if (w->opts.days < 1) w->opts.days = 1;
    w->rng = opts->seed;
    w->accts = calloc((size_t)w->opts.accounts, sizeof *w->accts);
    w->cumw = calloc((size_t)w->opts.accounts, sizeof *w->cumw);
    if (!w->accts || !w->cumw) {
        bench_workload_destroy(w);
        return NULL;
    }
    double total = 0;
    for (int k = 0; k < w->opts.accounts; k++) {
        total += 1.0 / pow(k + ZIPF_Q, w->opts.zipf);
        w->cumw[k] = total;
    }
    return w;
}

void bench_workload_destroy(bench_workload *w)
{
    if (!w) return;
    free(w->accts);
    free(w->cumw);
    pql_buf_free(&w->value);
    free(w);
}

static int pick_account(bench_workload *w)
{
    double r = rnd01(w) * w->cumw[w->opts.accounts - 1];
    int lo = 0, hi = w->opts.accounts - 1;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        if (w->cumw[mid] > r)
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

/* ---- producing one record ------------------------------------------------- */

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

/* Encodes ev into w->value and produces it keyed by its account id, with
 * its event time as record timestamp; waits while the queue is full. */
static void send_event(bench_workload *w, const pql_event *ev)
{
    char err[256];
    pql_buf_reset(&w->value);
    if (pql_event_encode(ev, &w->value, err, sizeof err) != PQL_OK) {
        fprintf(stderr, "pqlbench: cannot encode an event: %s\n", err);
        w->failed = 1;
        return;
    }
    int usage = ev->kind == PQL_INPUT_USAGE;
    for (; !w->sink;) {
        rd_kafka_resp_err_t e = rd_kafka_producev(
            w->rk, RD_KAFKA_V_TOPIC(usage ? w->usage_topic : w->accounts_topic),
            RD_KAFKA_V_KEY(ev->account_id, ev->account_id_len),
            RD_KAFKA_V_VALUE(w->value.data, w->value.len), RD_KAFKA_V_TIMESTAMP(ev->timestamp),
            RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_END);
        if (!e) break;
        if (e != RD_KAFKA_RESP_ERR__QUEUE_FULL) {
            fprintf(stderr, "pqlbench: produce failed: %s\n", rd_kafka_err2str(e));
            w->failed = 1;
            return;
        }
        rd_kafka_poll(w->rk, 10);
    }
    if (w->sink)
        w->sink(w->sink_opaque, ev->kind, ev->account_id, ev->account_id_len, w->value.data,
                w->value.len);
    if (usage)
        w->produced_usage++;
    else
        w->produced_updates++;
    w->produced_bytes += (int64_t)(w->value.len + ev->account_id_len);
}

static void send_usage(bench_workload *w, const char *account, int user, int64_t ts,
                       const char *event, const pql_prop *props, size_t nprops)
{
    char event_id[48], user_id[48];
    snprintf(event_id, sizeof event_id, "e%" PRIx64 "-%" PRIu64, w->opts.seed, ++w->next_event_id);
    snprintf(user_id, sizeof user_id, "%s-u%d", account, user);
    pql_event ev = {0};
    ev.kind = PQL_INPUT_USAGE;
    ev.event_id = event_id;
    ev.event_id_len = strlen(event_id);
    ev.account_id = account;
    ev.account_id_len = strlen(account);
    ev.user_id = user_id;
    ev.user_id_len = strlen(user_id);
    ev.event = event;
    ev.event_len = strlen(event);
    ev.timestamp = ts;
    ev.props = (pql_prop *)props;
    ev.nprops = nprops;
    send_event(w, &ev);
}

static void send_traits(bench_workload *w, const char *account, const bench_account *a, int64_t ts)
{
    pql_prop t[MAX_PROPS];
    size_t n = 0;
    t[n++] = prop_str("plan", a->team ? "team" : "free");
    t[n++] = prop_str("channel", CHANNELS[a->channel]);
    t[n++] = prop_num("employees", 5 + (a->seats + a->users) * 7);
    t[n++] = prop_num("api_call_limit", a->team ? 100000 : 10000);
    t[n++] = prop_str("product", "workspace");
    if (a->team) t[n++] = prop_num("seats", a->seats);
    pql_event ev = {0};
    ev.kind = PQL_INPUT_ACCOUNT;
    ev.account_id = account;
    ev.account_id_len = strlen(account);
    ev.timestamp = ts;
    ev.props = t;
    ev.nprops = n;
    send_event(w, &ev);
}

/* ---- the story ------------------------------------------------------------- */

static void introduce(bench_workload *w, int i, const char *id, int64_t ts)
{
    bench_account *a = &w->accts[i];
    a->introduced = 1;
    w->introduced++;
    a->team = rnd01(w) < 0.3;
    a->channel = (unsigned char)rnd_int(w, 0, 3);
    if (a->team) {
        a->seats = (unsigned short)rnd_int(w, 5, 50);
        a->users = (unsigned short)(a->seats * (0.5 + 0.6 * rnd01(w)));
        if (a->users < 1) a->users = 1;
    } else {
        a->users = (unsigned short)rnd_int(w, 1, 6);
    }
    send_traits(w, id, a, ts);
    pql_prop p[2] = {prop_str("channel", CHANNELS[a->channel])};
    if (a->team) {
        p[0] = prop_str("plan", "team");
        p[1] = prop_num("seats", a->seats);
        send_usage(w, id, 1, ts + 1, "subscription_started", p, 2);
    } else {
        send_usage(w, id, 1, ts + 1, "signed_up", p, 1);
    }
}

static void ordinary_event(bench_workload *w, int i, const char *id, int64_t ts)
{
    static const char *const features[] = {"projects", "projects", "projects",
                                           "docs",     "docs",     "chat"};
    static const char *const premium[] = {"sso", "audit_log", "advanced_permissions"};
    bench_account *a = &w->accts[i];
    const double weights[] = {22,
                              30,
                              4,
                              5,
                              a->onboarded ? 0 : 2,
                              22,
                              a->team ? 4 : 1,
                              3,
                              a->team ? 0 : 0.4,
                              a->team ? 0.5 : 0};
    double total = 0;
    for (size_t k = 0; k < sizeof weights / sizeof weights[0]; k++)
        total += weights[k];
    double r = rnd01(w) * total;
    int kind = 0;
    while (kind < 9 && r >= weights[kind])
        r -= weights[kind++];
    int user = rnd_int(w, 1, a->users);
    pql_prop p[MAX_PROPS];
    switch (kind) {
    case 0:
        p[0] = prop_str("method", rnd01(w) < 0.7 ? "password" : "sso");
        send_usage(w, id, user, ts, "login", p, 1);
        break;
    case 1:
        p[0] = prop_str("feature", features[rnd_int(w, 0, 5)]);
        send_usage(w, id, user, ts, "feature_used", p, 1);
        break;
    case 2:
        p[0] = prop_str("role", rnd01(w) < 0.8 ? "member" : "admin");
        send_usage(w, id, user, ts, "teammate_invited", p, 1);
        if (!a->team && a->users < 60000) a->users++; /* the invitee joins */
        break;
    case 3:
        p[0] = prop_str("page", rnd01(w) < 0.6 ? "/pricing" : "/pricing/team");
        send_usage(w, id, user, ts, "pricing_viewed", p, 1);
        break;
    case 4:
        a->onboarded = 1;
        send_usage(w, id, user, ts, "onboarding_completed", NULL, 0);
        break;
    case 5:
        p[0] = prop_num("calls", rnd_int(w, 1, 500));
        p[1] = prop_str("endpoint", rnd01(w) < 0.5 ? "/v1/projects" : "/v1/docs");
        send_usage(w, id, user, ts, "api_request", p, 2);
        break;
    case 6:
        p[0] = prop_str("feature", premium[rnd_int(w, 0, 2)]);
        send_usage(w, id, user, ts, "premium_feature_attempted", p, 1);
        break;
    case 7:
        p[0] = prop_str("product", "whiteboard");
        send_usage(w, id, user, ts, "board_created", p, 1);
        break;
    case 8: /* a free account converts */
        a->team = 1;
        a->seats = (unsigned short)(a->users + rnd_int(w, 0, 4));
        if (a->seats < 5) a->seats = 5;
        p[0] = prop_str("plan", "team");
        p[1] = prop_num("seats", a->seats);
        send_usage(w, id, user, ts, "subscription_started", p, 2);
        send_traits(w, id, a, ts + 1);
        break;
    default: /* a team buys or drops seats */
        a->seats = (unsigned short)(a->seats + rnd_int(w, -2, 5));
        if (a->seats < 3) a->seats = 3;
        send_traits(w, id, a, ts);
        break;
    }
}

/* One step at event time ts: an account is introduced, or does something. */
static void step(bench_workload *w, int64_t ts)
{
    char id[24];
    int i = pick_account(w);
    snprintf(id, sizeof id, "acct-%07d", i + 1);
    if (!w->accts[i].introduced)
        introduce(w, i, id, ts);
    else
        ordinary_event(w, i, id, ts);
}

/* ---- history --------------------------------------------------------------- */

/* A failed delivery is reported (the watermark check then catches the gap). */
static void count_failures(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    (void)rk;
    (void)opaque;
    if (m->err) fprintf(stderr, "pqlbench: delivery failed: %s\n", rd_kafka_err2str(m->err));
}

static rd_kafka_t *producer(const char *bootstraps, const char *linger, char *errstr,
                            size_t errstr_size)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set_dr_msg_cb(conf, count_failures);
    const char *props[][2] = {{"bootstrap.servers", bootstraps},
                              {"client.id", "pqlbench"},
                              {"linger.ms", linger},
                              {"batch.num.messages", "10000"},
                              {"queue.buffering.max.messages", "1000000"},
                              {"queue.buffering.max.kbytes", "1048576"}};
    for (size_t i = 0; i < sizeof props / sizeof props[0]; i++)
        if (rd_kafka_conf_set(conf, props[i][0], props[i][1], errstr, errstr_size) !=
            RD_KAFKA_CONF_OK) {
            rd_kafka_conf_destroy(conf);
            return NULL;
        }
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, errstr_size);
    if (!rk) rd_kafka_conf_destroy(conf);
    return rk;
}

int bench_workload_produce(bench_workload *w, const char *bootstraps, const char *usage_topic,
                           const char *accounts_topic, int64_t events, bench_produced *out,
                           char *errstr, size_t errstr_size)
{
    rd_kafka_t *rk = producer(bootstraps, "20", errstr, errstr_size);
    if (!rk) return -1;
    double t0 = bench_mono_s();
    int64_t span = (int64_t)w->opts.days * PQL_MS_DAY;
    int64_t start = pql_now_ms() - span - PQL_MS_MINUTE;
    w->rk = rk;
    w->usage_topic = usage_topic;
    w->accounts_topic = accounts_topic;
    w->produced_usage = w->produced_updates = w->produced_bytes = 0;
    int64_t before = w->introduced;
    while (w->produced_usage + w->produced_updates < events && !w->failed) {
        int64_t n = w->produced_usage + w->produced_updates;
        step(w, start + (int64_t)((double)n / (double)events * (double)span));
        if ((n & 1023) == 0) rd_kafka_poll(rk, 0);
    }
    rd_kafka_resp_err_t ferr = rd_kafka_flush(rk, 120000);
    out->usage = w->produced_usage;
    out->updates = w->produced_updates;
    out->bytes = w->produced_bytes;
    out->accounts = w->introduced - before;
    out->seconds = bench_mono_s() - t0;
    rd_kafka_destroy(rk);
    w->rk = NULL;
    if (w->failed || ferr) {
        snprintf(errstr, errstr_size, "producing the workload to %s failed (%s)", usage_topic,
                 ferr ? rd_kafka_err2str(ferr) : "see above");
        return -1;
    }
    return 0;
}

int bench_workload_generate(bench_workload *w, int64_t events, bench_sink_fn sink, void *opaque)
{
    int64_t span = (int64_t)w->opts.days * PQL_MS_DAY;
    int64_t start = pql_now_ms() - span - PQL_MS_MINUTE;
    w->sink = sink;
    w->sink_opaque = opaque;
    w->produced_usage = w->produced_updates = w->produced_bytes = 0;
    while (w->produced_usage + w->produced_updates < events && !w->failed) {
        int64_t n = w->produced_usage + w->produced_updates;
        step(w, start + (int64_t)((double)n / (double)events * (double)span));
    }
    w->sink = NULL;
    return w->failed ? -1 : 0;
}

/* ---- live load --------------------------------------------------------------- */

rd_kafka_t *bench_live_producer(const char *bootstraps, char *errstr, size_t errstr_size)
{
    return producer(bootstraps, "5", errstr, errstr_size); /* librdkafka's default linger */
}

int bench_live_step(bench_workload *w, rd_kafka_t *rk, const char *usage_topic,
                    const char *accounts_topic, int64_t now, int probe)
{
    w->rk = rk;
    w->usage_topic = usage_topic;
    w->accounts_topic = accounts_topic;
    int64_t before = w->produced_usage + w->produced_updates;
    if (probe >= 0) {
        static const char *const premium[] = {"sso", "audit_log", "advanced_permissions"};
        char id[32];
        snprintf(id, sizeof id, "probe-%d", probe);
        pql_prop p[2] = {prop_str("plan", "team"), prop_num("seats", 1000)};
        send_usage(w, id, 1, now, "subscription_started", p, 2);
        for (int k = 0; k < 3; k++) {
            p[0] = prop_str("feature", premium[k]);
            send_usage(w, id, 1, now, "premium_feature_attempted", p, 1);
        }
    } else {
        step(w, now);
    }
    rd_kafka_poll(rk, 0);
    w->rk = NULL;
    if (w->failed) return -1;
    return (int)(w->produced_usage + w->produced_updates - before);
}
