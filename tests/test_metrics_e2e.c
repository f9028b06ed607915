/* test_metrics_e2e.c — metric aggregates end to end: the pqlstream binary on
 * librdkafka's mock cluster and a real redis-server.
 *
 * A scripted cohort (several channels and plans, two PQL rules, an expansion
 * rule, a qualification without signup, conversions without qualifying, a
 * channel that arrives after the signup, late conversions and a late signup)
 * is played in three phases: the first by one process; the second while a
 * second process joins the group and takes half the partitions; the third
 * after the first leaves, so every partition has moved at least once.  Every
 * figure of every (granularity, period, segment) cell, in Redis and on the
 * metric topic, is compared with a reference model written from DESIGN §4's
 * definitions (percentiles within 2% of the exact nearest-rank ones):
 * nothing counted twice, nothing lost.  Then: a quiet emission sends only the
 * open periods, and `pqlstream metrics` prints the table. */
#include "harness.h"
#include "metrics_emit.h"
#include "metrics_table.h"
#include "sample.h"

#include <criterion/criterion.h>
#include <hiredis/hiredis.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define PARTS   4
#define USAGE   "usage-events"
#define ACCTS   "account-updates"
#define METRICS "pql-metrics"
#define GROUP   "gm"

#define M    PQL_MS_MINUTE
#define H    PQL_MS_HOUR
#define D    PQL_MS_DAY
#define JAN1 1704067200000LL /* Monday 2024-01-01T00:00:00Z */
#define NONE PQL_NO_TIME

static const char *rules_yaml =
    "version: 3\n"
    "lifecycle: { signup: signed_up, conversion: subscription_started }\n"
    "traits: { seats: number }\n"
    "signals:\n"
    "  logins:  { count: login, window: 30d }\n"
    "  invites: { count: teammate_invited, window: 30d }\n"
    "  users:   { distinct: user_id, of: '*', window: 30d }\n"
    "pql:\n"
    "  - name: active\n"
    "    when: logins >= 3\n"
    "  - name: inviter\n"
    "    when: invites >= 2\n"
    "expansion:\n"
    "  - name: seats\n"
    "    when: account.seats > 0 and users >= account.seats\n";

static h_redis *redis;
static h_kafka *kafka;
static char *dir;
static char rules_path[512];

static void setup(void)
{
    redis = h_redis_start();
    kafka = h_kafka_start(PARTS, USAGE, ACCTS, "pql-alerts", "pql-dlq", METRICS, NULL);
    dir = h_mkdtemp();
    snprintf(rules_path, sizeof(rules_path), "%s/rules.yaml", dir);
    h_write_file(rules_path, rules_yaml);
}

static void teardown(void)
{
    h_kafka_stop(kafka);
    h_redis_stop(redis);
    h_rmtree(dir);
    free(dir);
}

static h_proc *start(void)
{
    return h_proc_start("PQLSTREAM_BROKERS", h_kafka_bootstraps(kafka), "PQLSTREAM_REDIS",
                        h_redis_url(redis), "PQLSTREAM_RULES", rules_path, "PQLSTREAM_GROUP", GROUP,
                        "PQLSTREAM_TOPIC_METRICS", METRICS, "PQLSTREAM_METRICS_INTERVAL", "1s",
                        "PQLSTREAM_METRICS_CHANNEL_TRAIT", "source", "PQLSTREAM_BATCH_MAX_MESSAGES",
                        "25", "PQLSTREAM_KAFKA_SESSION_TIMEOUT_MS", "6000",
                        "PQLSTREAM_KAFKA_HEARTBEAT_INTERVAL_MS", "500", NULL);
}

/* ---- the reference model: DESIGN §4 restated over per-account facts ------- */

typedef struct fact {
    char id[16];
    int64_t s, q, c; /* signup, first qualification, conversion; NONE if never */
    char rule[16], channel[16], plan[16];
} fact;

typedef struct expansion_fact {
    int64_t at;
    char channel[16], plan[16], rule[16];
} expansion_fact;

static fact facts[64];
static size_t nfacts;
static expansion_fact expansions[8];
static size_t nexpansions;

static fact *fact_of(const char *id)
{
    for (size_t i = 0; i < nfacts; i++)
        if (!strcmp(facts[i].id, id)) return &facts[i];
    cr_assert_lt(nfacts, 64);
    fact *f = &facts[nfacts++];
    memset(f, 0, sizeof *f);
    snprintf(f->id, sizeof f->id, "%s", id);
    f->s = f->q = f->c = NONE;
    return f;
}

static int64_t model_period(int g, int64_t t)
{
    time_t sec = (time_t)(t / 1000);
    struct tm tm;
    gmtime_r(&sec, &tm);
    int64_t day = t - t % D;
    switch (g) {
    case PQL_GRAN_HOUR:
        return t - t % H;
    case PQL_GRAN_DAY:
        return day;
    case PQL_GRAN_WEEK:
        return day - ((tm.tm_wday + 6) % 7) * D; /* back to Monday */
    default:
        tm.tm_mday = 1;
        tm.tm_hour = tm.tm_min = tm.tm_sec = 0;
        return (int64_t)timegm(&tm) * 1000;
    }
}

static int in_period(int g, int64_t start, int64_t t)
{
    return t != NONE && model_period(g, t) == start;
}

static const char *seg_value(const char *v)
{
    return v[0] ? v : "(none)";
}

static int matches(const char *channel, const char *plan, const char *rule, int kind,
                   const char *value)
{
    switch (kind) {
    case PQL_SEG_ALL:
        return 1;
    case PQL_SEG_CHANNEL:
        return !strcmp(seg_value(channel), value);
    case PQL_SEG_PLAN:
        return !strcmp(seg_value(plan), value);
    default:
        return rule[0] && !strcmp(rule, value);
    }
}

typedef struct expected {
    int64_t signups, signups_qualified, pqls_new, pqls_open, pqls_converted, conversions,
        pql_conversions, snq_converted, expansion;
    int64_t ttp[64];
    size_t nttp;
} expected;

/* The counts of cell (g, start, kind, value), straight from the definitions. */
static expected model_cell(int g, int64_t start, int kind, const char *value)
{
    expected e;
    memset(&e, 0, sizeof e);
    for (size_t i = 0; i < nfacts; i++) {
        const fact *f = &facts[i];
        int qualified = f->q != NONE, pql_conv = qualified && f->c != NONE && f->q <= f->c;
        /* signup cohort (no signups by rule: an unqualified account has none) */
        if (kind != PQL_SEG_RULE && in_period(g, start, f->s) &&
            matches(f->channel, f->plan, f->rule, kind, value)) {
            e.signups++;
            e.signups_qualified += qualified;
            e.snq_converted += !qualified && f->c != NONE;
        }
        /* qualification cohort */
        if (in_period(g, start, f->q) && matches(f->channel, f->plan, f->rule, kind, value)) {
            e.pqls_new++;
            e.pqls_open += f->c == NONE;
            e.pqls_converted += f->c != NONE && f->c >= f->q;
            if (f->s != NONE && f->q >= f->s) e.ttp[e.nttp++] = f->q - f->s;
        }
        /* conversions (by rule: PQL conversions of the rule) */
        if (in_period(g, start, f->c) && matches(f->channel, f->plan, f->rule, kind, value) &&
            (kind != PQL_SEG_RULE || pql_conv)) {
            e.conversions++;
            e.pql_conversions += pql_conv;
        }
    }
    for (size_t i = 0; i < nexpansions; i++) {
        const expansion_fact *x = &expansions[i];
        if (in_period(g, start, x->at) && matches(x->channel, x->plan, x->rule, kind, value))
            e.expansion++;
    }
    return e;
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Exact nearest-rank percentile. */
static double exact_pct(expected *e, int pct)
{
    qsort(e->ttp, e->nttp, sizeof(*e->ttp), cmp_i64);
    size_t rank = (size_t)ceil(pct / 100.0 * (double)e->nttp);
    return (double)e->ttp[(rank ? rank : 1) - 1];
}

/* Compares an opt against num/den (null when den is 0); appends a diff. */
static void check_rate(pql_buf *diff, const char *what, pql_opt got, int64_t num, int64_t den)
{
    if (!den) {
        if (got.has) pql_buf_printf(diff, " %s=%g want null;", what, got.v);
        return;
    }
    double want = (double)num / (double)den;
    if (!got.has || fabs(got.v - want) > 1e-12)
        pql_buf_printf(diff, " %s=%s%g want %g;", what, got.has ? "" : "null/", got.v, want);
}

static void check_count(pql_buf *diff, const char *what, int64_t got, int64_t want)
{
    if (got != want)
        pql_buf_printf(diff, " %s=%lld want %lld;", what, (long long)got, (long long)want);
}

/* Appends to `diff` every figure of `f` that is not the model's. */
static void check_figures(pql_buf *diff, int g, int64_t start, int kind, const char *value,
                          const pql_metric_figures *f)
{
    expected e = model_cell(g, start, kind, value);
    size_t before = diff->len;
    check_count(diff, "signups", f->signups, e.signups);
    check_count(diff, "signups_qualified", f->signups_qualified, e.signups_qualified);
    check_count(diff, "pqls_new", f->pqls_new, e.pqls_new);
    check_count(diff, "pqls_open", f->pqls_open, e.pqls_open);
    check_rate(diff, "pql_rate", f->pql_rate, e.signups_qualified, e.signups);
    check_count(diff, "time_to_pql_count", f->time_to_pql_count, (int64_t)e.nttp);
    pql_opt p[2] = {f->time_to_pql_p50_ms, f->time_to_pql_p90_ms};
    int pcts[2] = {50, 90};
    for (int k = 0; k < 2; k++) {
        if (!e.nttp) {
            if (p[k].has) pql_buf_printf(diff, " p%d=%g want null;", pcts[k], p[k].v);
            continue;
        }
        double x = exact_pct(&e, pcts[k]);
        if (!p[k].has || fabs(p[k].v - x) > PQL_HIST_ALPHA * x)
            pql_buf_printf(diff, " p%d=%g want %g ±2%%;", pcts[k], p[k].v, x);
    }
    check_count(diff, "conversions", f->conversions, e.conversions);
    check_count(diff, "pql_conversions", f->pql_conversions, e.pql_conversions);
    check_count(diff, "non_pql_conversions", f->non_pql_conversions,
                e.conversions - e.pql_conversions);
    check_count(diff, "pqls_converted", f->pqls_converted, e.pqls_converted);
    check_rate(diff, "pql_to_paid_rate", f->pql_to_paid_rate, e.pqls_converted, e.pqls_new);
    check_count(diff, "signups_not_qualified", f->signups_not_qualified,
                e.signups - e.signups_qualified);
    check_count(diff, "signups_not_qualified_converted", f->signups_not_qualified_converted,
                e.snq_converted);
    check_rate(diff, "non_pql_to_paid_rate", f->non_pql_to_paid_rate, e.snq_converted,
               e.signups - e.signups_qualified);
    check_count(diff, "expansion_alerts", f->expansion_alerts, e.expansion);
    if (diff->len != before) {
        char iso[40];
        pql_format_utc(start, iso, sizeof iso);
        pql_buf_printf(diff, " <- %s|%s|%s|%s\n", pql_granularity_name(g), iso,
                       pql_segment_name(kind), value);
    }
}

/* The cells the model has counts in: every (g, period, segment) an account
 * fact or an expansion touches.  Calls fn for each, once. */
typedef struct cell_key {
    int g, kind;
    int64_t start;
    char value[16];
} cell_key;

static size_t model_cells(cell_key *out, size_t max)
{
    size_t n = 0;
    for (int g = 0; g < PQL_NGRAN; g++) {
        for (size_t i = 0; i < nfacts + nexpansions; i++) {
            const fact *f = i < nfacts ? &facts[i] : NULL;
            const expansion_fact *x = f ? NULL : &expansions[i - nfacts];
            int64_t times[3] = {f ? f->s : x->at, f ? f->q : NONE, f ? f->c : NONE};
            const char *vals[4] = {"all", seg_value(f ? f->channel : x->channel),
                                   seg_value(f ? f->plan : x->plan), f ? f->rule : x->rule};
            for (int t = 0; t < 3; t++) {
                if (times[t] == NONE) continue;
                for (int k = 0; k < PQL_NSEG; k++) {
                    if (!vals[k][0]) continue;
                    cell_key key = {g, k, model_period(g, times[t]), ""};
                    snprintf(key.value, sizeof key.value, "%s", vals[k]);
                    expected e = model_cell(g, key.start, k, key.value);
                    if (!e.signups && !e.pqls_new && !e.conversions && !e.expansion) continue;
                    int dup = 0;
                    for (size_t j = 0; j < n && !dup; j++)
                        dup = out[j].g == g && out[j].kind == k && out[j].start == key.start &&
                              !strcmp(out[j].value, key.value);
                    if (!dup) {
                        cr_assert_lt(n, max);
                        out[n++] = key;
                    }
                }
            }
        }
    }
    return n;
}

/* ---- the script ---------------------------------------------------------------- */

/* Events are buffered and produced in timestamp order (as a producer would):
 * a task then applies them in that order whatever the partitioning. */
typedef struct pending_ev {
    int usage;
    char id[16], event[32], user[8], source[16], plan[16];
    int seats;
    int64_t ts;
    size_t seq;
} pending_ev;

static pending_ev pending[512];
static size_t npending;

static void usage_ev(const char *id, const char *event, const char *user, int64_t ts)
{
    cr_assert_lt(npending, 512);
    pending_ev *e = &pending[npending];
    memset(e, 0, sizeof *e);
    e->usage = 1;
    snprintf(e->id, sizeof e->id, "%s", id);
    snprintf(e->event, sizeof e->event, "%s", event);
    snprintf(e->user, sizeof e->user, "%s", user);
    e->ts = ts;
    e->seq = npending++;
}

/* Traits at `ts`; empty strings and 0 seats are not sent. */
static void traits(const char *id, int64_t ts, const char *source, const char *plan, int seats)
{
    cr_assert_lt(npending, 512);
    pending_ev *e = &pending[npending];
    memset(e, 0, sizeof *e);
    snprintf(e->id, sizeof e->id, "%s", id);
    snprintf(e->source, sizeof e->source, "%s", source);
    snprintf(e->plan, sizeof e->plan, "%s", plan);
    e->seats = seats;
    e->ts = ts;
    e->seq = npending++;
}

static int cmp_pending(const void *a, const void *b)
{
    const pending_ev *x = a, *y = b;
    if (x->ts != y->ts) return x->ts < y->ts ? -1 : 1;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

static void produce_pending(void)
{
    qsort(pending, npending, sizeof *pending, cmp_pending);
    for (size_t i = 0; i < npending; i++) {
        const pending_ev *e = &pending[i];
        if (e->usage) {
            h_produce_usage(kafka, USAGE, -1, e->id, e->event, e->user, e->ts, H_NO_PROPS);
            continue;
        }
        pql_prop p[3];
        size_t n = 0;
        if (e->source[0]) p[n++] = H_STR("source", e->source);
        if (e->plan[0]) p[n++] = H_STR("plan", e->plan);
        if (e->seats) p[n++] = H_NUM("seats", e->seats);
        h_produce_account(kafka, ACCTS, -1, e->id, e->ts, p, n);
    }
    npending = 0;
    h_flush(kafka);
}

/* An account that signs up at `s` with its traits a minute before. */
static fact *signup(const char *id, int64_t s, const char *source, const char *plan)
{
    fact *f = fact_of(id);
    traits(id, s - M, source, plan, 0);
    usage_ev(id, "signed_up", "u1", s);
    f->s = f->s == NONE || s < f->s ? s : f->s;
    snprintf(f->channel, sizeof f->channel, "%s", source);
    snprintf(f->plan, sizeof f->plan, "%s", plan);
    return f;
}

static void convert(const char *id, int64_t c)
{
    usage_ev(id, "subscription_started", "u1", c);
    fact *f = fact_of(id);
    f->c = f->c == NONE || c < f->c ? c : f->c;
}

/* Three logins ending at `q`: rule `active` qualifies the account then. */
static void qualify_active(const char *id, int64_t q)
{
    usage_ev(id, "login", "u1", q - 2 * M);
    usage_ev(id, "login", "u1", q - M);
    usage_ev(id, "login", "u1", q);
    fact *f = fact_of(id);
    f->q = q;
    snprintf(f->rule, sizeof f->rule, "active");
}

/* Two invites ending at `q`: rule `inviter`. */
static void qualify_inviter(const char *id, int64_t q)
{
    usage_ev(id, "teammate_invited", "u1", q - 5 * M);
    usage_ev(id, "teammate_invited", "u1", q);
    fact *f = fact_of(id);
    f->q = q;
    snprintf(f->rule, sizeof f->rule, "inviter");
}

static void phase1(void)
{
    /* a01 signs up on Sunday Dec 31 and qualifies on Monday: its late
       qualification counts in December's signup cohort and January's PQLs */
    signup("a01", JAN1 - 14 * H, "organic", "free");
    qualify_active("a01", JAN1 + 10 * H);
    signup("a02", JAN1 + 8 * H, "organic", "free"); /* qualifies in 30 min, stays open */
    qualify_active("a02", JAN1 + 8 * H + 30 * M);
    signup("a03", JAN1 + 9 * H, "ads", "trial");
    qualify_inviter("a03", JAN1 + D + 9 * H + 5 * M);
    convert("a03", JAN1 + D + 10 * H);
    signup("a04", JAN1 + 12 * H, "ads", "free"); /* converts without qualifying */
    convert("a04", JAN1 + 13 * H);
    signup("a05", JAN1 + D + 15 * H, "partner", "trial"); /* neither */
    usage_ev("a05", "login", "u1", JAN1 + D + 16 * H);
    signup("a06", JAN1 - 4 * H, "partner", "free"); /* converts late: phase 3 */
    /* a07 qualifies without a signup event; converts in phase 2 */
    traits("a07", JAN1 + D, "organic", "", 0);
    snprintf(fact_of("a07")->channel, 16, "organic");
    qualify_active("a07", JAN1 + D + 12 * H);
    /* a08 pays at once, then fills its 2 seats: an expansion alert */
    signup("a08", JAN1 + 14 * H, "ads", "free");
    convert("a08", JAN1 + 14 * H + 25 * M);
    traits("a08", JAN1 + 14 * H + 30 * M, "", "", 2);
    usage_ev("a08", "login", "u1", JAN1 + 15 * H);
    usage_ev("a08", "login", "u2", JAN1 + 15 * H + 10 * M);
    expansions[nexpansions++] = (expansion_fact){JAN1 + 15 * H + 10 * M, "ads", "free", "seats"};
    /* a09 signs up with no traits; its channel and plan come 12 h later */
    usage_ev("a09", "signed_up", "u1", JAN1 + D + 8 * H);
    traits("a09", JAN1 + D + 20 * H, "partner", "free", 0);
    fact *f = fact_of("a09");
    f->s = JAN1 + D + 8 * H;
    snprintf(f->channel, 16, "partner");
    snprintf(f->plan, 16, "free");
    qualify_active("a09", JAN1 + 2 * D + 10 * H);
    signup("a10", JAN1 + 23 * H + 30 * M, "organic", "free"); /* converts late: phase 3 */
    qualify_inviter("a10", JAN1 + 2 * D + 2 * H);
    signup("a11", JAN1 + D + 6 * H, "ads", "free"); /* qualifies in 3 min, converts */
    qualify_active("a11", JAN1 + D + 6 * H + 3 * M);
    convert("a11", JAN1 + D + 7 * H);
    /* a13 converts; its signup event arrives late (phase 3) */
    traits("a13", JAN1 + 3 * D + 9 * H, "ads", "trial", 0);
    snprintf(fact_of("a13")->channel, 16, "ads");
    snprintf(fact_of("a13")->plan, 16, "trial");
    convert("a13", JAN1 + 3 * D + 10 * H);
    produce_pending();
}

/* Filler accounts, 10 per chunk: signups on Friday Jan 5, some qualify, some convert. */
static void phase2_chunk(int chunk)
{
    for (int i = chunk * 10; i < chunk * 10 + 10; i++) {
        char id[16];
        snprintf(id, sizeof id, "f%02d", i);
        int64_t s = JAN1 + 4 * D + i * 37 * M;
        signup(id, s, i % 2 ? "referral" : "organic", "free");
        if (i % 3 == 0) qualify_active(id, s + (i * 7 + 3) * M);
        if (i % 4 == 1) convert(id, s + 2 * D);
    }
    if (chunk == 1) { /* late conversions of earlier cohorts */
        convert("a01", JAN1 + 2 * D + 12 * H);
        convert("a07", JAN1 + D + 18 * H);
    }
    produce_pending();
}

static void phase3(void)
{
    convert("a06", JAN1 + 7 * D + 9 * H); /* Monday Jan 8: next week */
    convert("a10", JAN1 + 9 * D);
    usage_ev("a13", "signed_up", "u1", JAN1 + 2 * D + 8 * H); /* before its conversion */
    fact_of("a13")->s = JAN1 + 2 * D + 8 * H;
    produce_pending();
}

/* ---- checks ----------------------------------------------------------------------- */

static void wait_done(h_proc *p)
{
    H_ASSERT_PROC(
        p, h_wait_offsets_of(p, kafka, h_redis_url(redis), GROUP, USAGE, PARTS, NULL, 90000) == 0);
    H_ASSERT_PROC(
        p, h_wait_offsets_of(p, kafka, h_redis_url(redis), GROUP, ACCTS, PARTS, NULL, 90000) == 0);
}

static int is_scripted(int64_t start)
{
    return start < JAN1 + 90 * D; /* later periods are the open ones (wall clock) */
}

/* Every cell in Redis, summed over the partitions, against the model. */
static void check_redis(void)
{
    char err[512];
    pql_store *st = pql_store_open(h_redis_url(redis), 5000, err, sizeof err);
    cr_assert_not_null(st, "%s", err);
    pql_metric_period *periods;
    size_t n;
    cr_assert_eq(pql_metrics_read_periods(st, GROUP, PARTS, &periods, &n, err, sizeof err), 0);
    pql_metric_table **tables = calloc(n + 1, sizeof(*tables));
    cr_assert_eq(pql_metrics_read_tables(st, GROUP, PARTS, periods, n, tables, err, sizeof err), 0);
    pql_buf diff = {0};
    static cell_key keys[4096];
    size_t nkeys = model_cells(keys, 4096), seen = 0;
    for (size_t i = 0; i < n; i++) {
        cr_assert(is_scripted(periods[i].start), "counts outside the script's periods");
        for (size_t c = 0; c < pql_metric_table_size(tables[i]); c++) {
            pql_segment k;
            const char *v;
            pql_metric_figures f;
            pql_metric_table_get(tables[i], c, &k, &v, &f);
            check_figures(&diff, periods[i].granularity, periods[i].start, k, v, &f);
            for (size_t j = 0; j < nkeys; j++)
                seen += keys[j].g == (int)periods[i].granularity &&
                        keys[j].start == periods[i].start && keys[j].kind == (int)k &&
                        !strcmp(keys[j].value, v);
        }
        pql_metric_table_destroy(tables[i]);
    }
    cr_assert_eq(diff.len, 0, "Redis figures differ from the model:\n%s", diff.data);
    cr_assert_eq(seen, nkeys, "Redis has %zu of the model's %zu cells", seen, nkeys);
    cr_assert_gt(nkeys, 200, "the script covers many cells (%zu)", nkeys);
    fprintf(stderr, "metrics e2e: %zu cells in %zu periods match the model\n", nkeys, n);
    free(tables);
    free(periods);
    pql_buf_free(&diff);
    pql_store_close(st);
}

/* The latest record of every key of the metric topic. */
typedef struct latest {
    char **keys;
    json_t **values;
    size_t n;
} latest;

static void latest_free(latest *l)
{
    for (size_t i = 0; i < l->n; i++) {
        free(l->keys[i]);
        json_decref(l->values[i]);
    }
    free(l->keys);
    free(l->values);
    memset(l, 0, sizeof *l);
}

static void read_latest(latest *l, int64_t *records)
{
    h_msgs *m = h_consume_all(h_kafka_bootstraps(kafka), METRICS, 20000);
    cr_assert_not_null(m);
    l->keys = calloc(m->n + 1, sizeof(char *));
    l->values = calloc(m->n + 1, sizeof(json_t *));
    l->n = 0;
    for (size_t i = 0; i < m->n; i++) { /* one key lives in one partition, in order */
        char err[256];
        json_t *j =
            pql_metric_avro_to_json(m->msgs[i].value, m->msgs[i].value_len, err, sizeof err);
        cr_assert_not_null(j, "metric record %zu does not decode: %s", i, err);
        size_t k = 0;
        while (k < l->n && strcmp(l->keys[k], m->msgs[i].key))
            k++;
        if (k == l->n) {
            l->keys[l->n] = strdup(m->msgs[i].key);
            l->values[l->n++] = j;
        } else {
            json_decref(l->values[k]);
            l->values[k] = j;
        }
    }
    if (records) *records = (int64_t)m->n;
    h_msgs_free(m);
}

static pql_opt opt_of(json_t *j, const char *name)
{
    json_t *v = json_object_get(j, name);
    pql_opt o = {v && !json_is_null(v), v ? json_number_value(v) : 0};
    return o;
}

static int64_t long_of(json_t *j, const char *name)
{
    return json_integer_value(json_object_get(j, name));
}

/* Compares the topic's latest records with the model; @returns the diff. */
static void check_topic(const latest *l, pql_buf *diff)
{
    static cell_key keys[4096];
    size_t nkeys = model_cells(keys, 4096);
    for (size_t j = 0; j < nkeys; j++) {
        char key[128], iso[40];
        pql_format_utc(keys[j].start, iso, sizeof iso);
        snprintf(key, sizeof key, "%s|%s|%s|%s", pql_granularity_name(keys[j].g), iso,
                 pql_segment_name(keys[j].kind), keys[j].value);
        size_t k = 0;
        while (k < l->n && strcmp(l->keys[k], key))
            k++;
        if (k == l->n) pql_buf_printf(diff, " missing %s\n", key);
    }
    for (size_t i = 0; i < l->n; i++) {
        json_t *r = l->values[i];
        int g = pql_granularity_parse(json_string_value(json_object_get(r, "granularity")));
        int kind = pql_segment_parse(json_string_value(json_object_get(r, "segment_kind")));
        const char *value = json_string_value(json_object_get(r, "segment_value"));
        int64_t start = long_of(r, "period_start");
        char key[128], iso[40];
        pql_format_utc(start, iso, sizeof iso);
        snprintf(key, sizeof key, "%s|%s|%s|%s", pql_granularity_name(g), iso,
                 pql_segment_name(kind), value);
        cr_assert_str_eq(l->keys[i], key, "the key is granularity|period_start|kind|value");
        cr_assert_eq(long_of(r, "period_end"), pql_period_next(g, start));
        pql_metric_figures f = {
            .signups = long_of(r, "signups"),
            .signups_qualified = long_of(r, "signups_qualified"),
            .pqls_new = long_of(r, "pqls_new"),
            .pqls_open = long_of(r, "pqls_open"),
            .pql_rate = opt_of(r, "pql_rate"),
            .time_to_pql_count = long_of(r, "time_to_pql_count"),
            .time_to_pql_p50_ms = opt_of(r, "time_to_pql_p50_ms"),
            .time_to_pql_p90_ms = opt_of(r, "time_to_pql_p90_ms"),
            .conversions = long_of(r, "conversions"),
            .pql_conversions = long_of(r, "pql_conversions"),
            .non_pql_conversions = long_of(r, "non_pql_conversions"),
            .pqls_converted = long_of(r, "pqls_converted"),
            .pql_to_paid_rate = opt_of(r, "pql_to_paid_rate"),
            .signups_not_qualified = long_of(r, "signups_not_qualified"),
            .signups_not_qualified_converted = long_of(r, "signups_not_qualified_converted"),
            .non_pql_to_paid_rate = opt_of(r, "non_pql_to_paid_rate"),
            .expansion_alerts = long_of(r, "expansion_alerts"),
        };
        if (!is_scripted(start)) { /* an open period: nothing happened in it */
            if (f.signups || f.pqls_new || f.conversions || f.expansion_alerts)
                pql_buf_printf(diff, " open period %s has counts\n", key);
            continue;
        }
        check_figures(diff, g, start, kind, value, &f);
    }
}

static int count_of(const char *hay, const char *needle)
{
    int n = 0;
    for (const char *p = hay; hay && (p = strstr(p, needle)) != NULL; p += strlen(needle))
        n++;
    return n;
}

/* Waits (polling the log) until `p` has logged `needle` at least `n` times. */
static void wait_count(h_proc *p, const char *needle, int n, int timeout_ms)
{
    int got = 0;
    for (int waited = 0; waited < timeout_ms; waited += 50) {
        char *log = h_proc_log(p);
        got = count_of(log, needle);
        free(log);
        if (got >= n) return;
        h_sleep_ms(50);
    }
    H_ASSERT_PROC(p, got >= n, "waited for %d \"%s\", saw %d", n, needle, got);
}

TestSuite(metrics_e2e, .init = setup, .fini = teardown, .timeout = 400);

Test(metrics_e2e, a_scripted_cohort_across_a_partition_move_gives_exact_figures)
{
    phase1();
    h_proc *p1 = start();
    wait_done(p1);

    /* phase 2: a second member joins mid-stream and takes half the partitions */
    phase2_chunk(0);
    h_proc *p2 = start();
    phase2_chunk(1);
    H_ASSERT_PROC(p2, h_proc_wait_log(p2, "partition assigned", 60000) == 0);
    H_ASSERT_PROC(p1, h_proc_wait_log(p1, "partition released", 60000) == 0);
    phase2_chunk(2);
    wait_done(p2);

    /* phase 3: the first member leaves; the second takes every partition */
    cr_assert_eq(h_proc_stop(p1), 0);
    phase3();
    wait_done(p2);
    for (int p = 0; p < PARTS; p++) {
        char key[64];
        snprintf(key, sizeof key, "pql:{%s:%d}:meta", GROUP, p);
        char *epoch = h_redis_hget(h_redis_url(redis), key, "epoch");
        /* claimed by p1, then by p2 (when it joined — cooperative-sticky moves
           half — or when p1 left) */
        cr_assert(epoch && atoll(epoch) >= 2, "partition %d was claimed %s times, want >= 2", p,
                  epoch ? epoch : "0");
        free(epoch);
    }

    check_redis();

    /* the metric topic converges to the same figures */
    pql_buf diff = {0};
    latest l = {0};
    for (int i = 0; i < 600; i++) {
        read_latest(&l, NULL);
        pql_buf_reset(&diff);
        check_topic(&l, &diff);
        if (diff.len == 0) break;
        latest_free(&l);
        h_sleep_ms(100);
    }
    H_ASSERT_PROC(p2, diff.len == 0, "the metric topic differs from the model:\n%s", diff.data);
    pql_buf_free(&diff);

    /* hand-checked cells (the model could share a misreading with the code) */
    json_t *r = NULL;
    for (size_t i = 0; i < l.n; i++)
        if (!strcmp(l.keys[i], "day|2024-01-01T00:00:00Z|all|all")) r = l.values[i];
    cr_assert_not_null(r);
    cr_assert_eq(long_of(r, "signups"), 5);           /* a02 a03 a04 a08 a10 */
    cr_assert_eq(long_of(r, "signups_qualified"), 3); /* a02 a03 a10 */
    cr_assert_eq(opt_of(r, "pql_rate").v, 0.6);
    cr_assert_eq(long_of(r, "pqls_new"), 2); /* a01 a02 */
    cr_assert_eq(long_of(r, "pqls_open"), 1);
    cr_assert_eq(opt_of(r, "pql_to_paid_rate").v, 0.5);
    cr_assert_leq(fabs(opt_of(r, "time_to_pql_p50_ms").v - 30 * M), 0.02 * 30 * M);
    cr_assert_leq(fabs(opt_of(r, "time_to_pql_p90_ms").v - 24 * H), 0.02 * 24 * H);
    cr_assert_eq(long_of(r, "conversions"), 2); /* a04 a08 */
    cr_assert_eq(long_of(r, "non_pql_conversions"), 2);
    cr_assert_eq(opt_of(r, "non_pql_to_paid_rate").v, 1.0);
    cr_assert_eq(long_of(r, "expansion_alerts"), 1);
    r = NULL;
    for (size_t i = 0; i < l.n; i++)
        if (!strcmp(l.keys[i], "week|2023-12-25T00:00:00Z|all|all")) r = l.values[i];
    cr_assert_not_null(r, "the cohort of Sunday Dec 31 is in the week of Monday Dec 25");
    cr_assert_eq(long_of(r, "signups"), 2); /* a01 a06 */
    cr_assert_eq(opt_of(r, "pql_rate").v, 0.5);
    cr_assert_eq(long_of(r, "pqls_new"), 0);
    cr_assert(json_is_null(json_object_get(r, "pql_to_paid_rate")), "0 PQLs: null");
    cr_assert(json_is_null(json_object_get(r, "time_to_pql_p50_ms")));
    cr_assert_eq(opt_of(r, "non_pql_to_paid_rate").v, 1.0, "a06's late conversion counts here");
    r = NULL;
    for (size_t i = 0; i < l.n; i++)
        if (!strcmp(l.keys[i], "month|2024-01-01T00:00:00Z|channel|partner")) r = l.values[i];
    cr_assert_not_null(r);
    cr_assert_eq(long_of(r, "signups"), 2, "a05, and a09 whose channel came after its signup");
    r = NULL;
    for (size_t i = 0; i < l.n; i++)
        if (!strcmp(l.keys[i], "day|2024-01-02T00:00:00Z|rule|inviter")) r = l.values[i];
    cr_assert_not_null(r);
    cr_assert_eq(long_of(r, "pqls_new"), 1); /* a03 */
    cr_assert_eq(long_of(r, "pql_conversions"), 1);
    cr_assert(json_is_null(json_object_get(r, "pql_rate")), "no signups by rule: null");
    latest_free(&l);

    /* a quiet interval re-sends only the open periods */
    char *log = h_proc_log(p2);
    int emitted = count_of(log, "metrics emitted");
    free(log);
    wait_count(p2, "metrics emitted", emitted + 2, 30000);
    int64_t before = 0, after = 0;
    for (int p = 0; p < PARTS; p++)
        before += h_high_watermark(kafka, METRICS, p);
    wait_count(p2, "metrics emitted", emitted + 3, 30000);
    h_msgs *m = h_consume_all(h_kafka_bootstraps(kafka), METRICS, 20000);
    cr_assert_not_null(m);
    for (int p = 0; p < PARTS; p++)
        after += h_high_watermark(kafka, METRICS, p);
    cr_assert_gt(after, before, "open periods are sent every interval");
    int64_t now = pql_now_ms();
    size_t fresh = 0;
    for (size_t i = 0; i < m->n; i++) {
        char err[256];
        json_t *j =
            pql_metric_avro_to_json(m->msgs[i].value, m->msgs[i].value_len, err, sizeof err);
        cr_assert_not_null(j);
        int64_t start = long_of(j, "period_start"), end = long_of(j, "period_end");
        if (long_of(j, "emitted_at") >= now - 1500 && (start > now || end <= now - 1500)) {
            fprintf(stderr, "re-sent unchanged: %s\n", m->msgs[i].key);
            fresh++;
        }
        json_decref(j);
    }
    cr_assert_eq(fresh, 0, "only open periods are re-sent when nothing changed");
    h_msgs_free(m);

    /* the table for a person */
    char env_redis[600];
    snprintf(env_redis, sizeof env_redis, "PQLSTREAM_REDIS=%s", h_redis_url(redis));
    const char *env[] = {env_redis, "PQLSTREAM_GROUP=" GROUP, NULL};
    const char *argv[] = {"pqlstream", "metrics", "--granularity", "day", "--segment",
                          "channel",   "--since", "2023-12-25",    NULL};
    h_proc *cli = h_proc_start_argv(argv, env);
    cr_assert_eq(h_proc_wait(cli, 30000), 0);
    char *out = h_proc_log(cli);
    /* day Jan 1, channel ads: a03 a04 a08 signed up; a03 qualified later; a04
       and a08 converted without qualifying; a08 fired an expansion alert */
    const char *line = strstr(out, "\n2024-01-01  ads ");
    cr_assert_not_null(line, "%s", out);
    char row[512];
    sscanf(line + 1, "%511[^\n]", row);
    static const char *const want[] = {"2024-01-01", "ads", "3", "1", "33.3%", "0",      "0", "—",
                                       "—",          "2",   "0", "2", "—",     "100.0%", "—", "1"};
    char *save = NULL, *tok = strtok_r(row, " ", &save);
    for (size_t i = 0; i < sizeof want / sizeof *want; i++, tok = strtok_r(NULL, " ", &save))
        cr_assert(tok && !strcmp(tok, want[i]), "column %zu: '%s' want '%s' in\n%s", i,
                  tok ? tok : "(none)", want[i], out);
    cr_assert(strstr(out, "\ntotal       organic "), "%s", out);
    cr_assert(strstr(out, "PQL vs non-PQL: "), "%s", out);
    free(out);
    h_proc_stop(cli);
    cr_assert_eq(h_proc_stop(p2), 0);
}

Test(metrics_e2e, the_command_says_what_is_wrong)
{
    char env_redis[600];
    snprintf(env_redis, sizeof env_redis, "PQLSTREAM_REDIS=%s", h_redis_url(redis));
    const char *env[] = {env_redis, "PQLSTREAM_GROUP=nobody", NULL};
    const char *argv[] = {"pqlstream", "metrics", NULL};
    h_proc *p = h_proc_start_argv(argv, env);
    cr_assert_eq(h_proc_wait(p, 30000), 1);
    char *out = h_proc_log(p);
    cr_assert(strstr(out, "Redis has no state for group 'nobody'"), "%s", out);
    cr_assert(strstr(out, "PQLSTREAM_GROUP"), "%s", out);
    free(out);
    h_proc_stop(p);

    const char *bad[] = {"pqlstream", "metrics", "--granularity", "fortnight", NULL};
    p = h_proc_start_argv(bad, env);
    cr_assert_eq(h_proc_wait(p, 30000), 2);
    out = h_proc_log(p);
    cr_assert(strstr(out, "--granularity 'fortnight' must be hour, day, week or month"), "%s", out);
    free(out);
    h_proc_stop(p);

    const char *since[] = {"pqlstream", "metrics", "--since", "yesterday", NULL};
    p = h_proc_start_argv(since, env);
    cr_assert_eq(h_proc_wait(p, 30000), 2);
    out = h_proc_log(p);
    cr_assert(strstr(out, "--since 'yesterday' is neither a date"), "%s", out);
    free(out);
    h_proc_stop(p);

    char dir_env[600], *d = h_mkdtemp();
    snprintf(dir_env, sizeof dir_env, "PQLSTREAM_DATA_DIR=%s", d);
    const char *no_redis_env[] = {dir_env, NULL};
    const char *plain[] = {"pqlstream", "metrics", NULL};
    p = h_proc_start_argv(plain, no_redis_env);
    cr_assert_eq(h_proc_wait(p, 30000), 1);
    out = h_proc_log(p);
    cr_assert(strstr(out, "no Redis is configured (redis.url, PQLSTREAM_REDIS)"), "%s", out);
    cr_assert(strstr(out, "run `pqlstream run` in this directory first"), "%s", out);
    free(out);
    h_proc_stop(p);
    h_rmtree(d);
    free(d);
}

/* ---- kill -9 ------------------------------------------------------------------------ */

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Every non-zero metric counter of the group, as sorted "p<n> <hash> <field> <value>"
 * lines (zero fields are left out: whether a count that moved away leaves a 0
 * behind depends on batch boundaries). */
static h_lines *dump_metrics(const char *group)
{
    const char *url = h_redis_url(redis);
    redisContext *c = redisConnectUnix(url + strlen("unix://"));
    cr_assert(c && !c->err);
    h_lines *out = calloc(1, sizeof *out);
    size_t cap = 0;
    for (int p = 0; p < PARTS; p++) {
        char cursor[32] = "0";
        do {
            redisReply *r =
                redisCommand(c, "SCAN %s MATCH pql:{%s:%d}:c:m:* COUNT 1000", cursor, group, p);
            cr_assert(r && r->type == REDIS_REPLY_ARRAY && r->elements == 2);
            snprintf(cursor, sizeof cursor, "%s", r->element[0]->str);
            for (size_t i = 0; i < r->element[1]->elements; i++) {
                const char *key = r->element[1]->element[i]->str;
                redisReply *h = redisCommand(c, "HGETALL %s", key);
                cr_assert(h && h->type == REDIS_REPLY_ARRAY);
                for (size_t j = 0; j + 1 < h->elements; j += 2) {
                    if (!strcmp(h->element[j + 1]->str, "0")) continue;
                    if (out->n == cap) {
                        cap = cap ? cap * 2 : 1024;
                        out->lines = realloc(out->lines, cap * sizeof(char *));
                    }
                    char line[512];
                    snprintf(line, sizeof line, "p%d %s %s %s", p, strstr(key, "}:") + 2,
                             h->element[j]->str, h->element[j + 1]->str);
                    out->lines[out->n++] = strdup(line);
                }
                freeReplyObject(h);
            }
            freeReplyObject(r);
        } while (strcmp(cursor, "0"));
    }
    redisFree(c);
    qsort(out->lines, out->n, sizeof(char *), cmp_str);
    return out;
}

static h_proc *start_group(const char *group)
{
    return h_proc_start("PQLSTREAM_BROKERS", h_kafka_bootstraps(kafka), "PQLSTREAM_REDIS",
                        h_redis_url(redis), "PQLSTREAM_RULES", PQL_SOURCE_DIR "/rules",
                        "PQLSTREAM_GROUP", group, "PQLSTREAM_METRICS_INTERVAL", "0s",
                        "PQLSTREAM_BATCH_MAX_MESSAGES", "300", "PQLSTREAM_KAFKA_SESSION_TIMEOUT_MS",
                        "6000", "PQLSTREAM_KAFKA_HEARTBEAT_INTERVAL_MS", "500", NULL);
}

static void wait_group(h_proc *p, const char *group)
{
    H_ASSERT_PROC(
        p, h_wait_offsets_of(p, kafka, h_redis_url(redis), group, USAGE, PARTS, NULL, 240000) == 0);
    H_ASSERT_PROC(
        p, h_wait_offsets_of(p, kafka, h_redis_url(redis), group, ACCTS, PARTS, NULL, 240000) == 0);
}

Test(metrics_e2e, kill_9_mid_stream_leaves_the_counters_of_an_uninterrupted_run)
{
    /* the sample workload: signups over two weeks, qualifications, conversions */
    pql_sample_opts so = {.bootstraps = h_kafka_bootstraps(kafka),
                          .usage_topic = USAGE,
                          .accounts_topic = ACCTS,
                          .rate = 200000,
                          .accounts = 300,
                          .seed = 11,
                          .max_events = 25000};
    char err[256];
    pql_sample *s = pql_sample_start(&so, err, sizeof(err));
    cr_assert_not_null(s, "%s", err);
    while (pql_sample_produced(s) < so.max_events)
        h_sleep_ms(50);
    pql_sample_stop(s);

    h_proc *a = start_group("ka");
    wait_group(a, "ka");
    cr_assert_eq(h_proc_stop(a), 0);

    unsigned seed = (unsigned)pql_now_ms();
    fprintf(stderr, "metrics kill test seed=%u\n", seed);
    srand(seed);
    h_proc *b = start_group("kb");
    for (int k = 0; k < 2; k++) {
        int64_t goal = 1;
        for (int i = 0; i < 600; i++) { /* a few more batches written by this incarnation */
            char *v = h_redis_hget(h_redis_url(redis), "pql:{kb:0}:meta", "seq");
            int64_t seq = v ? atoll(v) : 0;
            free(v);
            if (i == 0) goal = seq + 1 + rand() % 4;
            if (seq >= goal) break;
            h_sleep_ms(20);
        }
        h_proc_kill(b, SIGKILL);
        cr_assert_eq(h_proc_wait(b, 10000), 128 + SIGKILL);
        h_proc_stop(b);
        b = start_group("kb");
    }
    wait_group(b, "kb");
    cr_assert_eq(h_proc_stop(b), 0);

    h_lines *la = dump_metrics("ka"), *lb = dump_metrics("kb");
    cr_assert_gt(la->n, 1000, "the workload fills the counters (%zu)", la->n);
    cr_assert_eq(h_lines_compare(la, lb), 0, "metric counters differ after kill -9");
    int signups = 0, pqls = 0, conv = 0;
    for (size_t i = 0; i < la->n; i++) {
        if (!strstr(la->lines[i], ":month:")) continue;
        const char *v = strrchr(la->lines[i], ' ') + 1;
        signups += strstr(la->lines[i], " all|all|signups ") ? atoi(v) : 0;
        pqls += strstr(la->lines[i], " all|all|pqls_new ") ? atoi(v) : 0;
        conv += strstr(la->lines[i], " all|all|conv ") ? atoi(v) : 0;
    }
    fprintf(stderr, "metrics kill test: %zu counters equal; %d signups, %d PQLs, %d conversions\n",
            la->n, signups, pqls, conv);
    cr_assert_gt(signups, 50);
    cr_assert_gt(pqls, 5);
    cr_assert_gt(conv, 5);
    h_lines_free(la);
    h_lines_free(lb);
}

/* ---- the embedded default ------------------------------------------------------------ */

/* The last summary's numbers: signups, PQLs; -1 when none printed yet. */
static void last_summary(const char *log, long *signups, long *pqls)
{
    *signups = *pqls = -1;
    for (const char *p = log; p && (p = strstr(p, "◆ METRICS   since ")) != NULL; p++) {
        char date[16];
        double rate;
        long s, q;
        if (sscanf(p, "◆ METRICS   since %15[^:]: %ld signups, %lf%% of them qualified; %ld PQLs",
                   date, &s, &rate, &q) == 4) {
            *signups = s;
            *pqls = q;
        }
    }
}

Test(metrics_e2e, the_embedded_default_shows_figures_and_the_command_reads_them)
{
    char *d = h_mkdtemp(), data_dir[600];
    snprintf(data_dir, sizeof data_dir, "PQLSTREAM_DATA_DIR=%s", d);
    char rules[600];
    snprintf(rules, sizeof rules, "PQLSTREAM_RULES=%s/rules", PQL_SOURCE_DIR);
    const char *env[] = {data_dir, rules, "PQLSTREAM_METRICS_INTERVAL=2s",
                         "PQLSTREAM_EMBEDDED_SAMPLE_RATE=1000", NULL};
    const char *argv[] = {"pqlstream", "run", NULL};
    h_proc *p = h_proc_start_argv(argv, env);
    long signups = -1, pqls = -1;
    for (int i = 0; i < 1200 && pqls <= 0; i++) { /* summaries every 2 s; PQLs within seconds */
        char *log = h_proc_log(p);
        last_summary(log, &signups, &pqls);
        free(log);
        if (pqls <= 0) h_sleep_ms(50);
    }
    H_ASSERT_PROC(p, signups > 20 && pqls > 0, "summary: %ld signups, %ld PQLs", signups, pqls);

    const char *cli_argv[] = {"pqlstream", "metrics", "--segment", "channel", NULL};
    const char *cli_env[] = {data_dir, NULL};
    h_proc *cli = h_proc_start_argv(cli_argv, cli_env);
    cr_assert_eq(h_proc_wait(cli, 30000), 0);
    char *out = h_proc_log(cli);
    cr_assert(strstr(out, "segment channel"), "%s", out);
    cr_assert(strstr(out, "\ntotal       organic "), "%s", out);
    cr_assert(strstr(out, "\ntotal       paid_search "), "%s", out);
    cr_assert(strstr(out, "PQL vs non-PQL: "), "%s", out);
    free(out);
    h_proc_stop(cli);
    cr_assert_eq(h_proc_stop(p), 0);

    /* with the processor stopped, the command serves its data itself */
    cli = h_proc_start_argv(cli_argv, cli_env);
    cr_assert_eq(h_proc_wait(cli, 30000), 0);
    out = h_proc_log(cli);
    cr_assert(strstr(out, "\ntotal       organic "), "%s", out);
    free(out);
    h_proc_stop(cli);
    h_rmtree(d);
    free(d);
}
