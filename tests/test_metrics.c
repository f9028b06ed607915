/* test_metrics.c — the pure core of metric aggregates: UTC periods (Monday
 * weeks, month and year boundaries, before 1970), the histogram's error
 * bound, nearest-rank percentiles, figure formulas with zero denominators,
 * account contributions (order independence, late facts, frozen segments),
 * the account memo round trip, record keys and encodings. */
#include "account.h"
#include "config.h"
#include "metrics.h"
#include "metrics_table.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define H   PQL_MS_HOUR
#define DAY PQL_MS_DAY

/* 2024-01-01T00:00:00Z, a Monday */
#define JAN1 1704067200000LL

static int64_t utc(int y, int mon, int d, int h, int mi, int s)
{
    struct tm tm = {0};
    tm.tm_year = y - 1900;
    tm.tm_mon = mon - 1;
    tm.tm_mday = d;
    tm.tm_hour = h;
    tm.tm_min = mi;
    tm.tm_sec = s;
    return (int64_t)timegm(&tm) * 1000;
}

/* ---- periods ---------------------------------------------------------------- */

Test(periods, hour_day_week_month_of_a_time)
{
    int64_t t = utc(2024, 1, 3, 17, 45, 12) + 345; /* a Wednesday */
    cr_assert_eq(pql_period_start(PQL_GRAN_HOUR, t), utc(2024, 1, 3, 17, 0, 0));
    cr_assert_eq(pql_period_start(PQL_GRAN_DAY, t), utc(2024, 1, 3, 0, 0, 0));
    cr_assert_eq(pql_period_start(PQL_GRAN_WEEK, t), JAN1);
    cr_assert_eq(pql_period_start(PQL_GRAN_MONTH, t), JAN1);
    cr_assert_eq(JAN1, utc(2024, 1, 1, 0, 0, 0));
}

Test(periods, weeks_start_on_monday_utc)
{
    /* Sunday 2023-12-31 23:59:59.999 belongs to the week of Monday 2023-12-25 */
    cr_assert_eq(pql_period_start(PQL_GRAN_WEEK, JAN1 - 1), utc(2023, 12, 25, 0, 0, 0));
    cr_assert_eq(pql_period_start(PQL_GRAN_WEEK, JAN1), JAN1);
    cr_assert_eq(pql_period_start(PQL_GRAN_WEEK, JAN1 + 7 * DAY - 1), JAN1);
    cr_assert_eq(pql_period_start(PQL_GRAN_WEEK, JAN1 + 7 * DAY), JAN1 + 7 * DAY);
    /* 1970-01-01 was a Thursday: its week began on Monday 1969-12-29 */
    cr_assert_eq(pql_period_start(PQL_GRAN_WEEK, 0), -3 * DAY);
    cr_assert_eq(pql_period_start(PQL_GRAN_WEEK, -1), -3 * DAY);
    cr_assert_eq(pql_period_next(PQL_GRAN_WEEK, JAN1), JAN1 + 7 * DAY);
}

Test(periods, month_boundaries_leap_years_and_year_ends)
{
    cr_assert_eq(pql_period_start(PQL_GRAN_MONTH, utc(2024, 2, 29, 23, 59, 59)),
                 utc(2024, 2, 1, 0, 0, 0));
    cr_assert_eq(pql_period_next(PQL_GRAN_MONTH, utc(2024, 2, 1, 0, 0, 0)),
                 utc(2024, 3, 1, 0, 0, 0));
    cr_assert_eq(pql_period_next(PQL_GRAN_MONTH, utc(2023, 2, 1, 0, 0, 0)),
                 utc(2023, 3, 1, 0, 0, 0));
    cr_assert_eq(pql_period_start(PQL_GRAN_MONTH, JAN1 - 1), utc(2023, 12, 1, 0, 0, 0));
    cr_assert_eq(pql_period_next(PQL_GRAN_MONTH, utc(2023, 12, 1, 0, 0, 0)), JAN1);
    cr_assert_eq(pql_period_start(PQL_GRAN_MONTH, -1), utc(1969, 12, 1, 0, 0, 0));
    cr_assert_eq(pql_period_start(PQL_GRAN_DAY, -1), -DAY);
    cr_assert_eq(pql_period_start(PQL_GRAN_HOUR, -1), -H);
}

Test(periods, agree_with_gmtime_on_random_times)
{
    srand(42);
    for (int i = 0; i < 20000; i++) {
        int64_t t = ((int64_t)rand() << 20 ^ rand()) % (4102444800000LL); /* < 2100 */
        time_t sec = (time_t)(t / 1000);
        struct tm tm;
        gmtime_r(&sec, &tm);
        int64_t day = utc(tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, 0, 0, 0);
        int64_t hour = day + tm.tm_hour * H;
        int64_t week = day - ((tm.tm_wday + 6) % 7) * DAY;
        int64_t month = utc(tm.tm_year + 1900, tm.tm_mon + 1, 1, 0, 0, 0);
        cr_assert_eq(pql_period_start(PQL_GRAN_HOUR, t), hour, "t=%lld", (long long)t);
        cr_assert_eq(pql_period_start(PQL_GRAN_DAY, t), day, "t=%lld", (long long)t);
        cr_assert_eq(pql_period_start(PQL_GRAN_WEEK, t), week, "t=%lld", (long long)t);
        cr_assert_eq(pql_period_start(PQL_GRAN_MONTH, t), month, "t=%lld", (long long)t);
        int64_t next = pql_period_next(PQL_GRAN_MONTH, month);
        cr_assert_eq(pql_period_start(PQL_GRAN_MONTH, next - 1), month);
        cr_assert_eq(pql_period_start(PQL_GRAN_MONTH, next), next);
    }
}

Test(periods, names_and_iso_format)
{
    char buf[40];
    pql_format_utc(JAN1 + 13 * H + 5 * PQL_MS_MINUTE + 9000 + 999, buf, sizeof buf);
    cr_assert_str_eq(buf, "2024-01-01T13:05:09Z");
    pql_format_utc(-DAY, buf, sizeof buf);
    cr_assert_str_eq(buf, "1969-12-31T00:00:00Z");
    for (int g = 0; g < PQL_NGRAN; g++)
        cr_assert_eq(pql_granularity_parse(pql_granularity_name(g)), g);
    cr_assert_eq(pql_granularity_parse("weekly"), -1);
    for (int k = 0; k < PQL_NSEG; k++)
        cr_assert_eq(pql_segment_parse(pql_segment_name(k)), k);
    cr_assert_eq(pql_segment_parse("country"), -1);
}

/* ---- histogram ---------------------------------------------------------------- */

static void check_error(int64_t v)
{
    int b = pql_hist_bucket(v);
    double r = pql_hist_value(b);
    cr_assert_leq(fabs(r - (double)v), PQL_HIST_ALPHA * (double)v * (1 + 1e-12),
                  "v=%lld bucket=%d value=%.6f", (long long)v, b, r);
}

Test(histogram, every_value_is_within_two_percent_of_its_bucket_value)
{
    cr_assert_eq(pql_hist_bucket(0), -1);
    cr_assert_eq(pql_hist_value(-1), 0.0);
    cr_assert_eq(pql_hist_bucket(1), 0);
    int last = -1;
    for (int64_t v = 1; v <= 200000; v++) { /* every ms up to 200 s, buckets monotone */
        check_error(v);
        int b = pql_hist_bucket(v);
        cr_assert_geq(b, last);
        last = b;
    }
    srand(7);
    for (int i = 0; i < 100000; i++) /* up to ~3 years */
        check_error(1 + (((int64_t)rand() << 16) ^ rand()) % (100LL * 365 * DAY));
    /* a year needs about 600 buckets */
    cr_assert_lt(pql_hist_bucket(365 * DAY), 650);
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Builds the (bucket, count) histogram of values. */
static size_t hist_of(const int64_t *v, size_t n, int *buckets, int64_t *counts)
{
    size_t nb = 0;
    for (size_t i = 0; i < n; i++) {
        int b = pql_hist_bucket(v[i]);
        size_t k = 0;
        while (k < nb && buckets[k] < b)
            k++;
        if (k < nb && buckets[k] == b) {
            counts[k]++;
            continue;
        }
        memmove(&buckets[k + 1], &buckets[k], (nb - k) * sizeof(*buckets));
        memmove(&counts[k + 1], &counts[k], (nb - k) * sizeof(*counts));
        buckets[k] = b;
        counts[k] = 1;
        nb++;
    }
    return nb;
}

Test(histogram, percentiles_are_nearest_rank_within_two_percent)
{
    static int64_t v[5000];
    static int buckets[5000];
    static int64_t counts[5000];
    cr_assert_not(pql_hist_percentile(buckets, counts, 0, 50).has, "empty: null");
    srand(11);
    for (int round = 0; round < 50; round++) {
        size_t n = 1 + (size_t)(rand() % 5000);
        for (size_t i = 0; i < n; i++)
            v[i] = (int64_t)(rand() % 1000) * (rand() % 1000) * 60; /* skewed, zeros too */
        size_t nb = hist_of(v, n, buckets, counts);
        qsort(v, n, sizeof(*v), cmp_i64);
        int pcts[] = {1, 50, 90, 99, 100};
        for (size_t k = 0; k < 5; k++) {
            size_t rank = (size_t)ceil(pcts[k] / 100.0 * (double)n);
            double exact = (double)v[(rank ? rank : 1) - 1];
            pql_opt p = pql_hist_percentile(buckets, counts, nb, pcts[k]);
            cr_assert(p.has);
            cr_assert_leq(fabs(p.v - exact), 0.02 * exact + 1e-9, "p%d n=%zu exact=%f got=%f",
                          pcts[k], n, exact, p.v);
        }
    }
    /* small cases by hand: 1, 2, 3 → p50 is 2 (rank 2), p90 is 3 */
    int64_t three[] = {1000, 2000, 3000};
    size_t nb = hist_of(three, 3, buckets, counts);
    cr_assert_leq(fabs(pql_hist_percentile(buckets, counts, nb, 50).v - 2000), 40);
    cr_assert_leq(fabs(pql_hist_percentile(buckets, counts, nb, 90).v - 3000), 60);
}

/* ---- figures -------------------------------------------------------------------- */

static void add(pql_metric_table *t, const char *field, int64_t v)
{
    cr_assert_eq(pql_metric_table_add(t, field, strlen(field), v), 0, "%s", field);
}

static pql_metric_figures figures_of(pql_metric_table *t, pql_segment k, const char *value)
{
    int i = pql_metric_table_find(t, k, value);
    cr_assert_geq(i, 0, "segment %s|%s missing", pql_segment_name(k), value);
    pql_metric_figures f;
    pql_metric_table_get(t, (size_t)i, NULL, NULL, &f);
    return f;
}

Test(figures, formulas_sum_partitions_and_null_on_zero_denominators)
{
    pql_metric_table *t = pql_metric_table_new(PQL_GRAN_DAY, JAN1);
    /* partition 0 */
    add(t, "all|all|signups", 6);
    add(t, "all|all|signups_pql", 2);
    add(t, "all|all|signups_np_conv", 1);
    add(t, "all|all|pqls_new", 3);
    add(t, "all|all|pqls_open", 1);
    add(t, "all|all|pqls_conv", 2);
    add(t, "all|all|conv", 4);
    add(t, "all|all|conv_pql", 1);
    add(t, "all|all|ttp:100", 2);
    /* partition 1 */
    add(t, "all|all|signups", 4);
    add(t, "all|all|signups_pql", 1);
    add(t, "all|all|signups_np_conv", 2);
    add(t, "all|all|ttp:100", 1);
    add(t, "all|all|expansion", 5);
    /* a rule segment: qualification figures only */
    add(t, "rule|team|pqls_new", 2);
    add(t, "rule|team|pqls_conv", 1);
    /* a segment whose counts moved away (all zero) */
    add(t, "channel|(none)|signups", 0);
    /* newer versions' counters are ignored, not fatal */
    cr_assert_eq(pql_metric_table_add(t, "all|all|future", 6, 1), -1);
    cr_assert_eq(pql_metric_table_add(t, "nope|x|signups", 14, 1), -1);
    cr_assert_eq(pql_metric_table_add(t, "signups", 7, 1), -1);

    cr_assert_eq(pql_metric_table_size(t), 3);
    pql_segment k;
    const char *v;
    pql_metric_table_get(t, 0, &k, &v, NULL); /* sorted: all, channel, rule */
    cr_assert_eq(k, PQL_SEG_ALL);
    pql_metric_table_get(t, 2, &k, &v, NULL);
    cr_assert_eq(k, PQL_SEG_RULE);
    cr_assert_str_eq(v, "team");

    pql_metric_figures f = figures_of(t, PQL_SEG_ALL, "all");
    cr_assert_eq(f.signups, 10);
    cr_assert_eq(f.signups_qualified, 3);
    cr_assert(f.pql_rate.has && f.pql_rate.v == 0.3);
    cr_assert_eq(f.pqls_new, 3);
    cr_assert_eq(f.pqls_open, 1);
    cr_assert_eq(f.pqls_converted, 2);
    cr_assert(f.pql_to_paid_rate.has && fabs(f.pql_to_paid_rate.v - 2.0 / 3) < 1e-12);
    cr_assert_eq(f.conversions, 4);
    cr_assert_eq(f.pql_conversions, 1);
    cr_assert_eq(f.non_pql_conversions, 3);
    cr_assert_eq(f.signups_not_qualified, 7);
    cr_assert_eq(f.signups_not_qualified_converted, 3);
    cr_assert(f.non_pql_to_paid_rate.has && fabs(f.non_pql_to_paid_rate.v - 3.0 / 7) < 1e-12);
    cr_assert_eq(f.time_to_pql_count, 3);
    cr_assert(f.time_to_pql_p50_ms.has && f.time_to_pql_p50_ms.v == pql_hist_value(100));
    cr_assert_eq(f.expansion_alerts, 5);

    f = figures_of(t, PQL_SEG_RULE, "team");
    cr_assert_eq(f.signups, 0);
    cr_assert_not(f.pql_rate.has, "0 signups: pql_rate is null, not NaN or 0");
    cr_assert_not(f.non_pql_to_paid_rate.has);
    cr_assert_not(f.time_to_pql_p50_ms.has, "no histogram: null percentiles");
    cr_assert_not(f.time_to_pql_p90_ms.has);
    cr_assert(f.pql_to_paid_rate.has && f.pql_to_paid_rate.v == 0.5);

    f = figures_of(t, PQL_SEG_CHANNEL, PQL_SEG_NONE);
    cr_assert_eq(f.signups, 0);
    cr_assert_not(f.pql_rate.has);
    cr_assert_not(f.pql_to_paid_rate.has);
    cr_assert_not(f.non_pql_to_paid_rate.has);
    pql_metric_table_destroy(t);

    /* every signup qualified: non_pql_to_paid_rate's denominator is 0 → null */
    t = pql_metric_table_new(PQL_GRAN_HOUR, JAN1);
    add(t, "plan|free|signups", 2);
    add(t, "plan|free|signups_pql", 2);
    f = figures_of(t, PQL_SEG_PLAN, "free");
    cr_assert(f.pql_rate.has && f.pql_rate.v == 1.0);
    cr_assert_not(f.non_pql_to_paid_rate.has);
    pql_metric_table_destroy(t);
}

/* ---- contributions ---------------------------------------------------------------- */

typedef struct deltas {
    char lines[4096][160];
    size_t n;
} deltas;

static void collect(void *opaque, const char *hash, const char *field, int64_t delta)
{
    deltas *d = opaque;
    cr_assert_lt(d->n, 4096);
    snprintf(d->lines[d->n++], 160, "%s %s %lld", hash, field, (long long)delta);
}

static int has_line(const deltas *d, const char *line)
{
    for (size_t i = 0; i < d->n; i++)
        if (!strcmp(d->lines[i], line)) return 1;
    return 0;
}

static pql_metrics_state state(int64_t s, int64_t q, const char *rule, int64_t c,
                               const char *channel, const char *plan)
{
    pql_metrics_state st;
    memset(&st, 0, sizeof st);
    st.signup = s;
    st.pql_at = q;
    st.conversion = c;
    snprintf(st.rule, sizeof st.rule, "%s", rule);
    snprintf(st.channel, sizeof st.channel, "%s", channel);
    snprintf(st.plan, sizeof st.plan, "%s", plan);
    return st;
}

#define NONE PQL_NO_TIME

Test(contributions, a_qualified_converted_account_counts_in_its_periods)
{
    pql_metrics *m = pql_metrics_new("channel", "plan");
    static deltas d;
    d.n = 0;
    pql_metrics_state empty = state(NONE, NONE, "", NONE, "", "");
    /* signed up Sun 2023-12-31 10:00, qualified Mon 10:00 (24 h), converted Wed */
    pql_metrics_state s = state(JAN1 - 14 * H, JAN1 + 10 * H, "team", JAN1 + 2 * DAY, "ads", "");
    pql_metrics_change(m, &empty, &s);
    pql_metrics_drain(m, collect, &d);
    char line[160];
    int b = pql_hist_bucket(DAY);
    /* signup cohort: December, week of Dec 25 */
    cr_assert(has_line(&d, "m:month:1701388800000 all|all|signups 1"));
    cr_assert(has_line(&d, "m:week:1703462400000 channel|ads|signups_pql 1"));
    cr_assert(has_line(&d, "m:day:1703980800000 plan|(none)|signups 1"));
    cr_assert_not(has_line(&d, "m:day:1703980800000 rule|team|signups 1"), "no signups by rule");
    /* qualification: Jan 1, every segment including the rule; converted since */
    cr_assert(has_line(&d, "m:day:1704067200000 rule|team|pqls_new 1"));
    cr_assert(has_line(&d, "m:week:1704067200000 all|all|pqls_conv 1"));
    cr_assert_not(has_line(&d, "m:week:1704067200000 all|all|pqls_open 1"));
    snprintf(line, sizeof line, "m:hour:1704103200000 rule|team|ttp:%d 1", b);
    cr_assert(has_line(&d, line), "%s", line);
    /* conversion: Jan 3, a PQL conversion, by rule too */
    cr_assert(has_line(&d, "m:day:1704240000000 channel|ads|conv_pql 1"));
    cr_assert(has_line(&d, "m:day:1704240000000 rule|team|conv 1"));
    /* versions: one bump per period hash changed */
    cr_assert(has_line(&d, "mv day:1704240000000 1"));
    cr_assert(has_line(&d, "mv month:1701388800000 1"));
    /* sorted by (hash, field) */
    for (size_t i = 1; i < d.n; i++)
        if (strncmp(d.lines[i], "mv ", 3) && strncmp(d.lines[i - 1], "mv ", 3))
            cr_assert_lt(strcmp(d.lines[i - 1], d.lines[i]), 0);
    pql_metrics_destroy(m);
}

/* The deltas of a sequence of states telescope: they equal empty → last. */
Test(contributions, deltas_telescope_whatever_the_order_of_facts)
{
    pql_metrics *m = pql_metrics_new("channel", "plan");
    static deltas a, b;
    a.n = b.n = 0;
    pql_metrics_state seq[] = {
        state(NONE, NONE, "", NONE, "", ""),
        state(NONE, NONE, "", JAN1 + 5 * DAY, "", ""),            /* conversion first */
        state(JAN1 + H, NONE, "", JAN1 + 5 * DAY, "", ""),        /* late signup */
        state(JAN1 + H, NONE, "", JAN1 + 5 * DAY, "partner", ""), /* channel arrives */
        state(JAN1 + H, JAN1 + 2 * DAY, "x", JAN1 + 5 * DAY, "partner", "free"), /* late PQL */
        state(JAN1, JAN1 + 2 * DAY, "x", JAN1 + 5 * DAY, "partner", "free"), /* earlier signup */
    };
    size_t n = sizeof seq / sizeof seq[0];
    for (size_t i = 1; i < n; i++)
        pql_metrics_change(m, &seq[i - 1], &seq[i]);
    pql_metrics_drain(m, collect, &a);
    pql_metrics_change(m, &seq[0], &seq[n - 1]);
    pql_metrics_drain(m, collect, &b);
    /* the counters are equal; versions may differ (more periods touched) */
    size_t ca = 0, cb = 0;
    for (size_t i = 0; i < a.n; i++)
        if (strncmp(a.lines[i], "mv ", 3)) {
            cr_assert(has_line(&b, a.lines[i]), "%s", a.lines[i]);
            ca++;
        }
    for (size_t i = 0; i < b.n; i++)
        cb += strncmp(b.lines[i], "mv ", 3) != 0;
    cr_assert_eq(ca, cb);
    cr_assert(has_line(&b, "m:day:1704067200000 channel|partner|signups_pql 1"));
    cr_assert(has_line(&b, "m:day:1704499200000 all|all|conv_pql 1"));
    /* the same state again changes nothing */
    pql_metrics_change(m, &seq[n - 1], &seq[n - 1]);
    cr_assert_eq(pql_metrics_pending(m), 0);
    pql_metrics_destroy(m);
}

Test(contributions, a_conversion_before_qualifying_is_non_pql)
{
    pql_metrics *m = pql_metrics_new("channel", "plan");
    static deltas d;
    d.n = 0;
    pql_metrics_state empty = state(NONE, NONE, "", NONE, "", "");
    pql_metrics_state s = state(JAN1, JAN1 + 3 * H, "team", JAN1 + 2 * H, "", "");
    pql_metrics_change(m, &empty, &s);
    pql_metrics_drain(m, collect, &d);
    cr_assert(has_line(&d, "m:day:1704067200000 all|all|conv 1"));
    cr_assert_not(has_line(&d, "m:day:1704067200000 all|all|conv_pql 1"));
    cr_assert_not(has_line(&d, "m:day:1704067200000 rule|team|conv 1"));
    cr_assert_not(has_line(&d, "m:day:1704067200000 all|all|pqls_open 1"), "converted");
    cr_assert_not(has_line(&d, "m:day:1704067200000 all|all|pqls_conv 1"), "not since");
    pql_metrics_destroy(m);
}

/* ---- with real accounts ------------------------------------------------------------ */

static const char *rules_yaml = "lifecycle: { signup: signed_up, conversion: paid }\n"
                                "traits: { seats: number }\n"
                                "signals:\n"
                                "  logins: { count: login, window: 30d }\n"
                                "  users: { distinct: user_id, of: '*', window: 30d }\n"
                                "pql:\n"
                                "  - name: active\n"
                                "    when: logins >= 2\n"
                                "expansion:\n"
                                "  - name: seats\n"
                                "    when: account.seats > 0 and users >= account.seats\n";

static void noop_alert(void *opaque, const pql_alert *a)
{
    (void)opaque;
    (void)a;
}

static void apply(pql_metrics *m, pql_account *a, int account_update, const char *event, int64_t ts,
                  const pql_prop *props, size_t n)
{
    pql_event ev = {0};
    ev.kind = account_update ? PQL_INPUT_ACCOUNT : PQL_INPUT_USAGE;
    ev.account_id = "acme";
    ev.account_id_len = 4;
    ev.event = event ? event : "";
    ev.event_len = strlen(ev.event);
    ev.event_id = "e";
    ev.event_id_len = 1;
    ev.user_id = "u1";
    ev.user_id_len = 2;
    ev.timestamp = ts;
    ev.props = (pql_prop *)props;
    ev.nprops = n;
    pql_metrics_mark before;
    pql_metrics_mark_of(a, &before);
    pql_account_apply(a, &ev, 0, noop_alert, NULL);
    pql_metrics_account_changed(m, a, &before);
}

#define STR(k, v) ((pql_prop){(k), strlen(k), pql_str((v), strlen(v))})

static void memo_set(void *opaque, const char *f, size_t flen, const char *v, size_t vlen)
{
    pql_account *copy = opaque;
    pql_account_load_field(copy, f, flen, v, vlen);
}

static void memo_del(void *opaque, const char *f, size_t flen)
{
    (void)opaque;
    (void)f;
    (void)flen;
}

Test(contributions, segment_values_freeze_at_the_first_lifecycle_fact)
{
    pql_buf e = {0};
    pql_rules *r = pql_rules_load_string(rules_yaml, "t.yaml", &e);
    cr_assert_not_null(r, "%s", e.data);
    pql_buf_free(&e);
    pql_metrics *m = pql_metrics_new("source", "plan");
    pql_account *a = pql_account_new(r, "acme", 4);
    static deltas d;
    d.n = 0;

    /* traits before any lifecycle fact: nothing frozen, nothing counted */
    pql_prop t1[] = {STR("plan", "free")};
    apply(m, a, 1, NULL, JAN1, t1, 1);
    cr_assert_null(pql_account_memo(a, "plan", NULL));
    cr_assert_eq(pql_metrics_pending(m), 0);
    /* signup: plan frozen as free; no `source` trait yet → (none) */
    apply(m, a, 0, "signed_up", JAN1 + H, NULL, 0);
    cr_assert_str_eq(pql_account_memo(a, "plan", NULL), "free");
    cr_assert_null(pql_account_memo(a, "channel", NULL));
    /* the channel trait (configured as `source`) arrives: counts move */
    pql_prop t2[] = {STR("source", "ads|social\n")};
    apply(m, a, 1, NULL, JAN1 + 2 * H, t2, 1);
    cr_assert_str_eq(pql_account_memo(a, "channel", NULL), "ads_social_", "sanitised");
    /* two logins qualify; a conversion with plan=team keeps plan=free */
    apply(m, a, 0, "login", JAN1 + 3 * H, NULL, 0);
    apply(m, a, 0, "login", JAN1 + 4 * H, NULL, 0);
    pql_prop t3[] = {STR("plan", "team")};
    apply(m, a, 1, NULL, JAN1 + 5 * H, t3, 1);
    apply(m, a, 0, "paid", JAN1 + 6 * H, NULL, 0);
    cr_assert_str_eq(pql_account_memo(a, "plan", NULL), "free");
    pql_metrics_drain(m, collect, &d);
    cr_assert(has_line(&d, "m:day:1704067200000 channel|ads_social_|signups 1"));
    cr_assert_not(has_line(&d, "m:day:1704067200000 channel|(none)|signups 1"), "moved away");
    cr_assert(has_line(&d, "m:day:1704067200000 plan|free|pqls_conv 1"));
    cr_assert(has_line(&d, "m:day:1704067200000 rule|active|conv_pql 1"));
    cr_assert_not(has_line(&d, "m:day:1704067200000 plan|team|conv 1"));
    char line[160];
    snprintf(line, sizeof line, "m:day:1704067200000 all|all|ttp:%d 1",
             pql_hist_bucket(3 * H)); /* signup 01:00, qualified at 04:00 */
    cr_assert(has_line(&d, line), "%s", line);

    /* memo fields flush as m:<name> and load back */
    pql_account *copy = pql_account_new(r, "acme", 4);
    pql_account_flush(a, memo_set, memo_del, copy);
    cr_assert_str_eq(pql_account_memo(copy, "plan", NULL), "free");
    cr_assert_str_eq(pql_account_memo(copy, "channel", NULL), "ads_social_");
    cr_assert_not(pql_account_dirty(copy), "loaded memos are clean");
    pql_metrics_state sa, sb;
    pql_metrics_read(m, a, &sa);
    pql_metrics_read(m, copy, &sb);
    cr_assert_eq(memcmp(&sa, &sb, sizeof sa), 0, "the same facts after a reload");
    pql_account_destroy(copy);
    pql_account_destroy(a);
    pql_metrics_destroy(m);
    pql_rules_destroy(r);
}

Test(contributions, expansion_alerts_count_by_rule_and_frozen_segments)
{
    pql_metrics *m = pql_metrics_new("channel", "plan");
    pql_buf e = {0};
    pql_rules *r = pql_rules_load_string(rules_yaml, "t.yaml", &e);
    cr_assert_not_null(r);
    pql_account *a = pql_account_new(r, "acme", 4);
    pql_prop t[] = {STR("channel", "partner"), STR("plan", "team")};
    apply(m, a, 1, NULL, JAN1, t, 2);
    pql_metrics_expansion(m, a, "seats", JAN1 + 30 * H); /* no lifecycle: the current traits */
    static deltas d;
    d.n = 0;
    pql_metrics_drain(m, collect, &d);
    cr_assert(has_line(&d, "m:day:1704153600000 all|all|expansion 1"));
    cr_assert(has_line(&d, "m:day:1704153600000 channel|partner|expansion 1"));
    cr_assert(has_line(&d, "m:month:1704067200000 plan|team|expansion 1"));
    cr_assert(has_line(&d, "m:hour:1704175200000 rule|seats|expansion 1"));
    pql_account_destroy(a);
    pql_rules_destroy(r);
    pql_metrics_destroy(m);
}

/* ---- records ------------------------------------------------------------------------ */

Test(records, key_avro_and_json_round_trip_with_nulls)
{
    pql_metric_record rec = {.granularity = PQL_GRAN_WEEK,
                             .period_start = JAN1,
                             .period_end = JAN1 + 7 * DAY,
                             .kind = PQL_SEG_CHANNEL,
                             .value = "organic",
                             .emitted_at = JAN1 + 99};
    rec.f.signups = 10;
    rec.f.signups_qualified = 4;
    rec.f.pql_rate = (pql_opt){1, 0.4};
    rec.f.pqls_new = 5;
    rec.f.time_to_pql_p50_ms = (pql_opt){1, 3600000.5};
    rec.f.pql_to_paid_rate = (pql_opt){0, 0};
    rec.f.non_pql_conversions = 3;
    rec.f.expansion_alerts = 2;
    pql_buf key = {0}, avro = {0}, js = {0};
    cr_assert_eq(pql_metric_key(&rec, &key), 0);
    cr_assert_str_eq(key.data, "week|2024-01-01T00:00:00Z|channel|organic");
    char err[256];
    cr_assert_eq(pql_metric_encode(&rec, 0, &avro, err, sizeof err), PQL_OK, "%s", err);
    json_t *j = pql_metric_avro_to_json(avro.data, avro.len, err, sizeof err);
    cr_assert_not_null(j, "%s", err);
    cr_assert_eq(pql_metric_encode(&rec, 1, &js, err, sizeof err), PQL_OK, "%s", err);
    json_t *j2 = json_loadb(js.data, js.len, 0, NULL);
    cr_assert_not_null(j2);
    cr_assert(json_equal(j, j2), "avro and json agree:\n%s\n%s", json_dumps(j, 0), js.data);
    cr_assert_str_eq(json_string_value(json_object_get(j, "granularity")), "week");
    cr_assert_str_eq(json_string_value(json_object_get(j, "segment_kind")), "channel");
    cr_assert_eq(json_integer_value(json_object_get(j, "period_end")), JAN1 + 7 * DAY);
    cr_assert_eq(json_integer_value(json_object_get(j, "signups")), 10);
    cr_assert_eq(json_real_value(json_object_get(j, "pql_rate")), 0.4);
    cr_assert_eq(json_real_value(json_object_get(j, "time_to_pql_p50_ms")), 3600000.5);
    cr_assert(json_is_null(json_object_get(j, "time_to_pql_p90_ms")));
    cr_assert(json_is_null(json_object_get(j, "pql_to_paid_rate")));
    cr_assert(json_is_null(json_object_get(j, "non_pql_to_paid_rate")));
    cr_assert_eq(json_integer_value(json_object_get(j, "expansion_alerts")), 2);
    cr_assert_eq(json_integer_value(json_object_get(j, "emitted_at")), JAN1 + 99);
    cr_assert_eq(json_object_size(j), 23, "every schema field");
    /* a truncated record is refused, not misread */
    cr_assert_null(pql_metric_avro_to_json(avro.data, avro.len - 1, err, sizeof err));
    json_decref(j);
    json_decref(j2);
    pql_buf_free(&key);
    pql_buf_free(&avro);
    pql_buf_free(&js);
}

Test(records, dates_for_since_and_table_merges)
{
    int64_t t;
    cr_assert_eq(pql_parse_utc("2024-01-01", &t), 0);
    cr_assert_eq(t, JAN1);
    cr_assert_eq(pql_parse_utc("2024-02-29T13:05Z", &t), 0);
    cr_assert_eq(t, utc(2024, 2, 29, 13, 5, 0));
    cr_assert_eq(pql_parse_utc("2024-01-01T00:00:09Z", &t), 0);
    cr_assert_eq(t, JAN1 + 9000);
    static const char *const bad[] = {"2024-1-1",          "2023-02-29",  "2024-04-31",
                                      "2024-01-01T25:00Z", "2024-01-01 ", "yesterday",
                                      "2024-01-01T10:00",  "2024-13-01"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        cr_assert_eq(pql_parse_utc(bad[i], &t), -1, "%s", bad[i]);

    /* counts add up over periods: the merge's figures are the union's */
    pql_metric_table *a = pql_metric_table_new(PQL_GRAN_DAY, JAN1);
    pql_metric_table *b = pql_metric_table_new(PQL_GRAN_DAY, JAN1 + DAY);
    add(a, "all|all|pqls_new", 1);
    add(a, "all|all|ttp:10", 1);
    add(b, "all|all|pqls_new", 2);
    add(b, "all|all|pqls_conv", 1);
    add(b, "all|all|ttp:20", 2);
    add(b, "plan|free|signups", 4);
    cr_assert_eq(pql_metric_table_merge(a, b), 0);
    pql_metric_figures f = figures_of(a, PQL_SEG_ALL, "all");
    cr_assert_eq(f.pqls_new, 3);
    cr_assert(f.pql_to_paid_rate.has && fabs(f.pql_to_paid_rate.v - 1.0 / 3) < 1e-12);
    cr_assert_eq(f.time_to_pql_count, 3);
    cr_assert_eq(f.time_to_pql_p50_ms.v, pql_hist_value(20));
    cr_assert_eq(figures_of(a, PQL_SEG_PLAN, "free").signups, 4);
    char buf[32];
    pql_metric_format_lift(&f, buf, sizeof buf);
    cr_assert_str_eq(buf, "—", "no non-PQL rate: no lift");
    f.non_pql_to_paid_rate = (pql_opt){1, 0.05};
    f.pql_to_paid_rate = (pql_opt){1, 0.4};
    pql_metric_format_lift(&f, buf, sizeof buf);
    cr_assert_str_eq(buf, "8.0×");
    pql_metric_format_duration((pql_opt){1, 36.0 * PQL_MS_HOUR}, buf, sizeof buf);
    cr_assert_str_eq(buf, "1.5d");
    pql_metric_format_rate((pql_opt){0, 0}, buf, sizeof buf);
    cr_assert_str_eq(buf, "—");
    pql_metric_table_destroy(a);
    pql_metric_table_destroy(b);
}

Test(records, configuration_keys_and_defaults)
{
    pql_config c;
    char err[256];
    pql_config_init(&c);
    cr_assert_eq(c.metrics_interval_ms, 60000);
    cr_assert_str_eq(c.metrics_channel_trait, "channel");
    cr_assert_str_eq(c.metrics_plan_trait, "plan");
    char *env[] = {"PQLSTREAM_METRICS_INTERVAL=5s", "PQLSTREAM_METRICS_PLAN_TRAIT=tier", NULL};
    cr_assert_eq(pql_config_load_env(&c, env, err, sizeof err), 0, "%s", err);
    cr_assert_eq(c.metrics_interval_ms, 5000);
    cr_assert_str_eq(c.metrics_plan_trait, "tier");
    cr_assert_eq(pql_config_set(&c, "metrics.channel_trait", "utm_source", err, sizeof err), 0);
    cr_assert_str_eq(c.metrics_channel_trait, "utm_source");
    cr_assert_eq(pql_config_set(&c, "metrics.interval", "often", err, sizeof err), -1);
    cr_assert(strstr(err, "metrics.interval"), "%s", err);
    cr_assert_eq(pql_config_set(&c, "metrics.intervall", "5s", err, sizeof err), -1);
    cr_assert(strstr(err, "did you mean '--metrics.interval'"), "%s", err);
    pql_config_term(&c);
}
