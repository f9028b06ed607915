/* test_window.c — bucket sizing, reach, the six aggregates, persistence, and a
 * randomized comparison against a naive model that keeps every observation. */
#include <criterion/criterion.h>

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "window.h"

#define DAY  PQL_MS_DAY
#define HOUR PQL_MS_HOUR
#define MIN  PQL_MS_MINUTE

static pql_window *new_window(pql_agg agg, int64_t window_ms)
{
    pql_window_spec spec;
    char err[128];
    cr_assert_eq(pql_window_spec_init(&spec, agg, window_ms, err, sizeof err), 0, "%s", err);
    pql_window *w = pql_window_new(&spec);
    cr_assert_not_null(w);
    return w;
}

static double num_at(pql_window *w, int64_t clock)
{
    pql_value v = pql_window_value(w, clock);
    cr_assert_eq(v.type, PQL_V_NUM, "expected a number at clock %" PRId64, clock);
    return v.u.num;
}

static int null_at(pql_window *w, int64_t clock)
{
    return pql_window_value(w, clock).type == PQL_V_NULL;
}

/* ---- a recorder of flushed pairs (also the store of the round trips) ----- */

typedef struct pair {
    char field[64];
    size_t len;
    double value;
    int deleted;
} pair;

typedef struct pairs {
    pair *v;
    size_t len, cap;
} pairs;

static pair *pairs_find(pairs *p, const char *field, size_t len)
{
    for (size_t i = 0; i < p->len; i++)
        if (p->v[i].len == len && memcmp(p->v[i].field, field, len) == 0) return &p->v[i];
    return NULL;
}

static void pairs_push(pairs *p, const char *field, size_t len, double value, int deleted)
{
    cr_assert_lt(len, sizeof(p->v[0].field));
    if (p->len == p->cap) {
        p->cap = p->cap ? p->cap * 2 : 16;
        p->v = realloc(p->v, p->cap * sizeof(p->v[0]));
        cr_assert_not_null(p->v);
    }
    pair *e = &p->v[p->len++];
    memcpy(e->field, field, len);
    e->len = len;
    e->value = value;
    e->deleted = deleted;
}

/* A log of what one flush reported: each field at most once. */
static void log_set(void *opaque, const char *field, size_t len, double value)
{
    pairs *p = opaque;
    cr_assert_null(pairs_find(p, field, len), "field %.*s reported twice", (int)len, field);
    pairs_push(p, field, len, value, 0);
}

static void log_del(void *opaque, const char *field, size_t len)
{
    pairs *p = opaque;
    cr_assert_null(pairs_find(p, field, len), "field %.*s reported twice", (int)len, field);
    pairs_push(p, field, len, 0, 1);
}

/* A store applying the flushes, like the Redis hash. */
static void store_set(void *opaque, const char *field, size_t len, double value)
{
    pairs *p = opaque;
    pair *e = pairs_find(p, field, len);
    if (e)
        e->value = value;
    else
        pairs_push(p, field, len, value, 0);
}

static void store_del(void *opaque, const char *field, size_t len)
{
    pairs *p = opaque;
    pair *e = pairs_find(p, field, len);
    if (e) *e = p->v[--p->len];
}

static pairs flush_log(pql_window *w)
{
    pairs p = {0};
    pql_window_flush(w, log_set, log_del, &p);
    return p;
}

static void expect_set(pairs *p, const char *field, double value)
{
    pair *e = pairs_find(p, field, strlen(field));
    cr_assert_not_null(e, "field %s not reported", field);
    cr_assert_eq(e->deleted, 0, "field %s reported deleted", field);
    cr_assert_eq(e->value, value, "field %s = %g, expected %g", field, e->value, value);
}

static void expect_del(pairs *p, const char *field)
{
    pair *e = pairs_find(p, field, strlen(field));
    cr_assert_not_null(e, "field %s not reported", field);
    cr_assert_eq(e->deleted, 1, "field %s reported set", field);
}

static pql_window *load_copy(const pql_window_spec *spec, const pairs *store)
{
    pql_window *w = pql_window_new(spec);
    cr_assert_not_null(w);
    for (size_t i = 0; i < store->len; i++)
        cr_assert_eq(pql_window_load(w, store->v[i].field, store->v[i].len, store->v[i].value), 0);
    cr_assert_eq(pql_window_dirty(w), 0);
    return w;
}

/* ---- spec ----------------------------------------------------------------- */

Test(window, spec_init_buckets)
{
    static const struct {
        pql_agg agg;
        int64_t window, bucket, n;
    } cases[] = {
        {PQL_AGG_COUNT, 30 * MIN, MIN, 30},
        {PQL_AGG_COUNT, HOUR, MIN, 60},
        {PQL_AGG_SUM, 90 * MIN, MIN, 90},
        {PQL_AGG_COUNT, 24 * HOUR, HOUR, 24},
        {PQL_AGG_MAX, 36 * HOUR, HOUR, 36},
        {PQL_AGG_COUNT, 48 * HOUR, HOUR, 48},
        {PQL_AGG_DISTINCT, 7 * DAY, DAY, 7},
        {PQL_AGG_COUNT, 30 * DAY, DAY, 30},
        {PQL_AGG_LAST, 3 * DAY + 12 * HOUR, HOUR, 84},
        {PQL_AGG_COUNT, 0, 0, 1},
        {PQL_AGG_DAYS_ACTIVE, 36 * HOUR, DAY, 2},
        {PQL_AGG_DAYS_ACTIVE, 7 * DAY, DAY, 7},
        {PQL_AGG_DAYS_ACTIVE, 0, DAY, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        pql_window_spec s;
        char err[128] = "";
        cr_assert_eq(pql_window_spec_init(&s, cases[i].agg, cases[i].window, err, sizeof err), 0);
        cr_expect_eq(s.bucket_ms, cases[i].bucket, "case %zu: bucket %" PRId64, i, s.bucket_ms);
        cr_expect_eq(s.nbuckets, cases[i].n, "case %zu: nbuckets %" PRId64, i, s.nbuckets);
        cr_expect_eq(s.window_ms, cases[i].window);
        cr_expect_eq(s.agg, cases[i].agg);
    }
}

Test(window, spec_init_rejects)
{
    pql_window_spec s;
    char err[128] = "";
    cr_assert_eq(pql_window_spec_init(&s, PQL_AGG_COUNT, 90 * 1000, err, sizeof err), -1);
    cr_assert(strstr(err, "90s") && strstr(err, "whole minutes"), "errstr: %s", err);
    err[0] = '\0';
    cr_assert_eq(pql_window_spec_init(&s, PQL_AGG_SUM, 1500, err, sizeof err), -1);
    cr_assert(strstr(err, "1500ms"), "errstr: %s", err);
    cr_assert_eq(pql_window_spec_init(&s, PQL_AGG_COUNT, -MIN, err, sizeof err), -1);
    cr_assert_eq(pql_window_spec_init(&s, (pql_agg)42, DAY, err, sizeof err), -1);
}

Test(window, bucket_floor_division)
{
    pql_window_spec s;
    char err[64];
    pql_window_spec_init(&s, PQL_AGG_COUNT, HOUR, err, sizeof err);
    cr_expect_eq(pql_window_bucket(&s, 0), 0);
    cr_expect_eq(pql_window_bucket(&s, MIN - 1), 0);
    cr_expect_eq(pql_window_bucket(&s, MIN), 1);
    cr_expect_eq(pql_window_bucket(&s, -1), -1);
    cr_expect_eq(pql_window_bucket(&s, -MIN), -1);
    cr_expect_eq(pql_window_bucket(&s, -MIN - 1), -2);
    pql_window_spec_init(&s, PQL_AGG_COUNT, 0, err, sizeof err);
    cr_expect_eq(pql_window_bucket(&s, -123456789), 0);
    cr_expect_eq(pql_window_bucket(&s, 123456789), 0);
}

/* ---- reach ----------------------------------------------------------------- */

Test(window, bucket_edges_and_coverage)
{
    pql_window *w = new_window(PQL_AGG_COUNT, 7 * DAY);
    int64_t day = 20000, clock = day * DAY + 5 * HOUR; /* bucket(clock) = day */
    /* the window covers days day-6 .. day */
    cr_assert_eq(pql_window_add(w, clock, (day - 6) * DAY, 0, NULL, 0), 1);     /* first ms */
    cr_assert_eq(pql_window_add(w, clock, (day - 6) * DAY - 1, 0, NULL, 0), 0); /* last ms before */
    cr_assert_eq(pql_window_add(w, clock, clock - 7 * DAY, 0, NULL, 0), 0);     /* exactly 7 days */
    cr_assert_eq(pql_window_add(w, clock, (day - 7) * DAY, 0, NULL, 0), 0);
    cr_assert_eq(pql_window_add(w, clock, day * DAY + DAY - 1, 0, NULL, 0), 1); /* last ms today */
    cr_assert_eq(num_at(w, clock), 2);
    /* at the last ms of the day both still count; one ms later day-6 drops */
    cr_assert_eq(num_at(w, day * DAY + DAY - 1), 2);
    cr_assert_eq(num_at(w, (day + 1) * DAY), 1);
    cr_assert_eq(num_at(w, (day + 7) * DAY - 1), 1);
    cr_assert_eq(num_at(w, (day + 7) * DAY), 0);
    pql_window_destroy(w);
}

Test(window, negative_timestamps)
{
    pql_window *w = new_window(PQL_AGG_COUNT, HOUR);
    int64_t clock = -1; /* bucket -1: the window covers minute buckets -60 .. -1 */
    cr_assert_eq(pql_window_add(w, clock, -1, 0, NULL, 0), 1);
    cr_assert_eq(pql_window_add(w, clock, -HOUR, 0, NULL, 0), 1);
    cr_assert_eq(pql_window_add(w, clock, -HOUR - 1, 0, NULL, 0), 0);
    cr_assert_eq(num_at(w, clock), 2);
    cr_assert_eq(num_at(w, 0), 1); /* bucket 0: -60 falls out */
    pairs p = flush_log(w);
    expect_set(&p, "-1", 1);
    expect_set(&p, "-60", 1);
    cr_assert_eq(p.len, 2);
    free(p.v);
    pql_window_destroy(w);
}

Test(window, out_of_order_and_late)
{
    pql_window *w = new_window(PQL_AGG_COUNT, 24 * HOUR);
    int64_t clock = 1000 * DAY;
    cr_assert_eq(pql_window_add(w, clock, clock, 0, NULL, 0), 1);
    cr_assert_eq(pql_window_add(w, clock, clock - 5 * HOUR, 0, NULL, 0), 1);
    cr_assert_eq(pql_window_add(w, clock, clock - 23 * HOUR, 0, NULL, 0), 1);
    cr_assert_eq(pql_window_add(w, clock, clock - 24 * HOUR, 0, NULL, 0), 0);
    cr_assert_eq(pql_window_add(w, clock, clock - 30 * DAY, 0, NULL, 0), 0);
    cr_assert_eq(num_at(w, clock), 3);
    /* a future event lands in a later bucket */
    cr_assert_eq(pql_window_add(w, clock, clock + 2 * HOUR, 0, NULL, 0), 1);
    cr_assert_eq(num_at(w, clock + 2 * HOUR), 3); /* clock - 23h is out of reach there */
    cr_assert_eq(num_at(w, clock + HOUR), 3);
    /* the clock advancing makes values drop */
    cr_assert_eq(num_at(w, clock + 18 * HOUR), 3);
    cr_assert_eq(num_at(w, clock + 23 * HOUR), 2);
    cr_assert_eq(num_at(w, clock + 24 * HOUR), 1);
    cr_assert_eq(num_at(w, clock + 26 * HOUR), 0);
    pql_window_destroy(w);
}

/* ---- aggregates -------------------------------------------------------------- */

Test(window, sum_ignores_non_finite)
{
    pql_window *w = new_window(PQL_AGG_SUM, 7 * DAY);
    int64_t c = 50 * DAY;
    cr_assert_eq(num_at(w, c), 0);
    cr_assert_eq(pql_window_add(w, c, c, 2.5, NULL, 0), 1);
    cr_assert_eq(pql_window_add(w, c, c - DAY, 4, NULL, 0), 1);
    cr_assert_eq(pql_window_add(w, c, c, NAN, NULL, 0), 0);
    cr_assert_eq(pql_window_add(w, c, c, INFINITY, NULL, 0), 0);
    cr_assert_eq(pql_window_add(w, c, c, -INFINITY, NULL, 0), 0);
    cr_assert_eq(pql_window_add(w, c, c, -1, NULL, 0), 1);
    cr_assert_eq(num_at(w, c), 5.5);
    cr_assert_eq(num_at(w, c + 6 * DAY), 1.5);
    pql_window_destroy(w);
}

Test(window, distinct_members)
{
    pql_window *w = new_window(PQL_AGG_DISTINCT, 7 * DAY);
    int64_t c = 100 * DAY;
    cr_assert_eq(num_at(w, c), 0);
    cr_assert_eq(pql_window_add(w, c, c - 5 * DAY, 0, "alice", 5), 1);
    cr_assert_eq(pql_window_add(w, c, c - 3 * DAY, 0, "alice", 5), 1);
    cr_assert_eq(pql_window_add(w, c, c, 0, "alice", 5), 1);
    cr_assert_eq(pql_window_add(w, c, c - 4 * DAY, 0, "bob", 3), 1);
    cr_assert_eq(pql_window_add(w, c, c - 1 * DAY, 0, "a\0b", 3), 1); /* binary-safe */
    cr_assert_eq(pql_window_add(w, c, c - 1 * DAY, 0, "a", 1), 1);
    cr_assert_eq(pql_window_add(w, c, c - 8 * DAY, 0, "carol", 5), 0);
    cr_assert_eq(num_at(w, c), 4);
    cr_assert_eq(num_at(w, c + 2 * DAY), 4);
    cr_assert_eq(num_at(w, c + 3 * DAY), 3); /* bob falls out */
    cr_assert_eq(num_at(w, c + 6 * DAY), 1); /* alice, seen at c */
    cr_assert_eq(num_at(w, c + 7 * DAY), 0);
    pairs p = flush_log(w);
    expect_set(&p, "m:alice", 100);
    expect_set(&p, "m:bob", 96);
    expect_set(&p, "m:a", 99);
    cr_assert_not_null(pairs_find(&p, "m:a\0b", 5));
    cr_assert_eq(p.len, 4);
    free(p.v);
    /* expire: bob's and the two a's last-seen days leave reach */
    pql_window_expire(w, c + 4 * DAY);
    cr_assert_eq(num_at(w, c + 4 * DAY), 3); /* bob out, the a's (day 99) still in */
    pql_window_expire(w, c + 6 * DAY);
    cr_assert_eq(num_at(w, c + 6 * DAY), 1);
    p = flush_log(w);
    expect_del(&p, "m:bob");
    expect_del(&p, "m:a");
    cr_assert_eq(p.len, 3);
    free(p.v);
    /* bob comes back */
    cr_assert_eq(pql_window_add(w, c + 6 * DAY, c + 6 * DAY, 0, "bob", 3), 1);
    cr_assert_eq(num_at(w, c + 6 * DAY), 2);
    p = flush_log(w);
    expect_set(&p, "m:bob", 106);
    cr_assert_eq(p.len, 1);
    free(p.v);
    pql_window_destroy(w);
}

Test(window, distinct_many_members)
{
    pql_window *w = new_window(PQL_AGG_DISTINCT, 30 * DAY);
    int64_t c = 500 * DAY;
    size_t before = pql_window_memory(w);
    char m[32];
    for (int i = 0; i < 1000; i++) {
        int n = snprintf(m, sizeof m, "user-%d", i);
        cr_assert_eq(pql_window_add(w, c, c - (i % 30) * DAY, 0, m, (size_t)n), 1);
    }
    for (int i = 0; i < 1000; i += 2) {
        int n = snprintf(m, sizeof m, "user-%d", i);
        cr_assert_eq(pql_window_add(w, c, c, 0, m, (size_t)n), 1);
    }
    cr_assert_eq(num_at(w, c), 1000);
    cr_assert_gt(pql_window_memory(w), before + 1000 * 8);
    /* at c + 29d only bucket c stays: the 500 even users and the odd ones seen at c */
    int odd_at_c = 0;
    for (int i = 1; i < 1000; i += 2)
        odd_at_c += i % 30 == 0;
    cr_assert_eq(num_at(w, c + 29 * DAY), 500 + odd_at_c);
    pql_window_expire(w, c + 29 * DAY);
    pairs p = flush_log(w);
    size_t dels = 0;
    for (size_t i = 0; i < p.len; i++)
        dels += p.v[i].deleted;
    cr_assert_eq(dels, 500 - (size_t)odd_at_c);
    cr_assert_eq(p.len, 1000);
    free(p.v);
    cr_assert_eq(num_at(w, c + 29 * DAY), 500 + odd_at_c);
    pql_window_destroy(w);
}

Test(window, days_active)
{
    pql_window *w = new_window(PQL_AGG_DAYS_ACTIVE, 7 * DAY);
    int64_t c = 300 * DAY + 20 * HOUR;
    for (int h = 0; h < 5; h++)
        cr_assert_eq(pql_window_add(w, c, c - h * HOUR, 0, NULL, 0), 1);
    cr_assert_eq(num_at(w, c), 1);
    cr_assert_eq(pql_window_add(w, c, c - 2 * DAY, 0, NULL, 0), 1);
    cr_assert_eq(pql_window_add(w, c, c - 2 * DAY - HOUR, 0, NULL, 0), 1);
    cr_assert_eq(pql_window_add(w, c, c - 6 * DAY - 20 * HOUR, 0, NULL, 0), 1); /* day start */
    cr_assert_eq(pql_window_add(w, c, c - 6 * DAY - 21 * HOUR, 0, NULL, 0), 0);
    cr_assert_eq(num_at(w, c), 3);
    pairs p = flush_log(w);
    expect_set(&p, "300", 1);
    expect_set(&p, "298", 1);
    expect_set(&p, "294", 1);
    cr_assert_eq(p.len, 3);
    free(p.v);
    /* another event on an active day changes nothing to persist */
    cr_assert_eq(pql_window_add(w, c, c - HOUR, 0, NULL, 0), 1);
    cr_assert_eq(pql_window_dirty(w), 0);
    pql_window_destroy(w);
}

Test(window, days_active_lifetime)
{
    pql_window *w = new_window(PQL_AGG_DAYS_ACTIVE, 0);
    for (int d = -3; d < 40; d += 2)
        cr_assert_eq(pql_window_add(w, d * DAY, d * DAY, 0, NULL, 0), 1);
    cr_assert_eq(num_at(w, 40 * DAY), 22);
    cr_assert_eq(num_at(w, 4000 * DAY), 22);
    pql_window_expire(w, 4000 * DAY);
    cr_assert_eq(num_at(w, 4000 * DAY), 22);
    pql_window_destroy(w);
}

Test(window, max)
{
    pql_window *w = new_window(PQL_AGG_MAX, HOUR);
    int64_t c = 10 * DAY;
    cr_assert(null_at(w, c));
    cr_assert_eq(pql_window_add(w, c, c - 30 * MIN, 7, NULL, 0), 1);
    cr_assert_eq(pql_window_add(w, c, c, 3, NULL, 0), 1);
    cr_assert_eq(pql_window_add(w, c, c, -2, NULL, 0), 1);
    cr_assert_eq(pql_window_add(w, c, c, NAN, NULL, 0), 0);
    cr_assert_eq(num_at(w, c), 7);
    cr_assert_eq(num_at(w, c + 30 * MIN), 3);
    cr_assert(null_at(w, c + HOUR));
    pql_window_destroy(w);
}

Test(window, last)
{
    pql_window *w = new_window(PQL_AGG_LAST, 24 * HOUR);
    int64_t c = 10 * DAY;
    cr_assert(null_at(w, c));
    cr_assert_eq(pql_window_add(w, c, c, 5, NULL, 0), 1);
    cr_assert_eq(pql_window_add(w, c, c - HOUR, 9, NULL, 0), 1); /* older: counted, not last */
    cr_assert_eq(num_at(w, c), 5);
    cr_assert_eq(pql_window_add(w, c, c, 6, NULL, 0), 1); /* tie: the later arrival wins */
    cr_assert_eq(num_at(w, c), 6);
    cr_assert_eq(pql_window_add(w, c, c, INFINITY, NULL, 0), 0);
    cr_assert_eq(pql_window_add(w, c, c - DAY, 1, NULL, 0), 0);
    cr_assert_eq(num_at(w, c + 23 * HOUR), 6);
    cr_assert(null_at(w, c + 24 * HOUR)); /* out of reach */
    pairs p = flush_log(w);
    expect_set(&p, "t", (double)c);
    expect_set(&p, "v", 6);
    cr_assert_eq(p.len, 2);
    free(p.v);
    pql_window_expire(w, c + 23 * HOUR);
    cr_assert_eq(pql_window_dirty(w), 0);
    pql_window_expire(w, c + 24 * HOUR);
    p = flush_log(w);
    expect_del(&p, "t");
    expect_del(&p, "v");
    cr_assert_eq(p.len, 2);
    free(p.v);
    pql_window_destroy(w);
}

Test(window, lifetime_never_expires)
{
    static const pql_agg aggs[] = {PQL_AGG_COUNT, PQL_AGG_SUM, PQL_AGG_DISTINCT, PQL_AGG_MAX,
                                   PQL_AGG_LAST};
    for (size_t i = 0; i < sizeof aggs / sizeof aggs[0]; i++) {
        pql_window *w = new_window(aggs[i], 0);
        cr_assert_eq(pql_window_add(w, -5 * DAY, -5 * DAY, 4, "x", 1), 1);
        cr_assert_eq(pql_window_add(w, 100 * DAY, 100 * DAY, 1, "y", 1), 1);
        cr_assert_eq(pql_window_add(w, 100 * DAY, -900 * DAY, 2, "x", 1), 1); /* never late */
        pql_window_expire(w, 100000 * DAY);
        double expect[] = {3, 7, 2, 0, 4, 1};
        cr_assert_eq(num_at(w, 100000 * DAY), expect[aggs[i]], "agg %d", (int)aggs[i]);
        pairs p = flush_log(w);
        for (size_t j = 0; j < p.len; j++)
            cr_assert_eq(p.v[j].deleted, 0);
        cr_assert_eq(p.len, aggs[i] == PQL_AGG_DISTINCT || aggs[i] == PQL_AGG_LAST ? 2 : 1);
        free(p.v);
        pql_window_destroy(w);
    }
}

/* ---- persistence ---------------------------------------------------------------- */

Test(window, flush_reports_net_changes)
{
    pql_window *w = new_window(PQL_AGG_COUNT, 7 * DAY);
    int64_t c = 100 * DAY;
    cr_assert_eq(pql_window_dirty(w), 0);
    pql_window_add(w, c, c, 0, NULL, 0);
    pql_window_add(w, c, c, 0, NULL, 0);
    pql_window_add(w, c, c - DAY, 0, NULL, 0);
    cr_assert_neq(pql_window_dirty(w), 0);
    pairs p = flush_log(w);
    expect_set(&p, "100", 2);
    expect_set(&p, "99", 1);
    cr_assert_eq(p.len, 2);
    free(p.v);
    cr_assert_eq(pql_window_dirty(w), 0);
    p = flush_log(w);
    cr_assert_eq(p.len, 0);
    /* only the touched bucket is reported */
    pql_window_add(w, c, c - DAY, 0, NULL, 0);
    p = flush_log(w);
    expect_set(&p, "99", 2);
    cr_assert_eq(p.len, 1);
    free(p.v);
    /* set then expired before the flush: reported once, as deleted */
    pql_window_add(w, c + DAY, c + DAY, 0, NULL, 0);
    pql_window_expire(w, c + 7 * DAY); /* drops 99 (flushed) and 100 (flushed) */
    p = flush_log(w);
    expect_del(&p, "99");
    expect_del(&p, "100");
    expect_set(&p, "101", 1);
    cr_assert_eq(p.len, 3);
    free(p.v);
    pql_window_add(w, c + 8 * DAY, c + 8 * DAY, 0, NULL, 0);
    pql_window_expire(w, c + 20 * DAY);
    p = flush_log(w);
    expect_del(&p, "101");
    expect_del(&p, "108");
    cr_assert_eq(p.len, 2);
    free(p.v);
    cr_assert_eq(num_at(w, c + 20 * DAY), 0);
    pql_window_destroy(w);
}

Test(window, deleted_then_set_reported_as_set)
{
    pql_window *w = new_window(PQL_AGG_COUNT, HOUR);
    int64_t c = 10 * HOUR;
    pql_window_add(w, c, c, 0, NULL, 0);
    pairs p = flush_log(w);
    free(p.v);
    /* expired at a later clock, then counted again from the earlier clock */
    pql_window_expire(w, c + 2 * HOUR);
    cr_assert_eq(pql_window_add(w, c, c, 0, NULL, 0), 1);
    cr_assert_eq(num_at(w, c), 1);
    p = flush_log(w);
    expect_set(&p, "600", 1);
    cr_assert_eq(p.len, 1);
    free(p.v);
    pql_window_destroy(w);
}

Test(window, round_trip)
{
    static const pql_agg aggs[] = {PQL_AGG_COUNT,       PQL_AGG_SUM, PQL_AGG_DISTINCT,
                                   PQL_AGG_DAYS_ACTIVE, PQL_AGG_MAX, PQL_AGG_LAST};
    for (size_t i = 0; i < sizeof aggs / sizeof aggs[0]; i++) {
        pql_window *w = new_window(aggs[i], 7 * DAY);
        int64_t c = 1000 * DAY;
        char m[8];
        for (int k = 0; k < 60; k++) {
            int64_t ts = c - (k * 7919 % 6) * DAY - (k * 31 % 24) * HOUR;
            int n = snprintf(m, sizeof m, "u%d", k % 9);
            cr_assert_eq(pql_window_add(w, c, ts, k % 13, m, (size_t)n), 1);
        }
        pairs store = {0};
        pql_window_flush(w, store_set, store_del, &store);
        pql_window_spec spec;
        char err[64];
        pql_window_spec_init(&spec, aggs[i], 7 * DAY, err, sizeof err);
        pql_window *copy = load_copy(&spec, &store);
        for (int64_t at = c; at <= c + 8 * DAY; at += 5 * HOUR) {
            pql_value a = pql_window_value(w, at), b = pql_window_value(copy, at);
            cr_assert_eq(a.type, b.type, "agg %d at %" PRId64, (int)aggs[i], at);
            if (a.type == PQL_V_NUM) cr_assert_eq(a.u.num, b.u.num);
        }
        pql_window_destroy(copy);
        pql_window_destroy(w);
        free(store.v);
    }
}

Test(window, load_rejects_foreign_fields)
{
    pql_window *w = new_window(PQL_AGG_COUNT, 7 * DAY);
    cr_expect_eq(pql_window_load(w, "m:x", 3, 1), -1);
    cr_expect_eq(pql_window_load(w, "t", 1, 1), -1);
    cr_expect_eq(pql_window_load(w, "12a", 3, 1), -1);
    cr_expect_eq(pql_window_load(w, "", 0, 1), -1);
    cr_expect_eq(pql_window_load(w, "-", 1, 1), -1);
    cr_expect_eq(pql_window_load(w, "012", 3, 1), -1);
    cr_expect_eq(pql_window_load(w, "99999999999999999999", 20, 1), -1);
    cr_expect_eq(pql_window_load(w, "12", 2, NAN), -1);
    cr_expect_eq(pql_window_load(w, "12", 2, 3), 0);
    cr_expect_eq(pql_window_load(w, "-3", 2, 1), 0);
    cr_expect_eq(num_at(w, 12 * DAY), 3);
    cr_expect_eq(num_at(w, 0), 4);
    cr_expect_eq(pql_window_dirty(w), 0);
    pql_window_destroy(w);

    w = new_window(PQL_AGG_DISTINCT, 7 * DAY);
    cr_expect_eq(pql_window_load(w, "12", 2, 1), -1);
    cr_expect_eq(pql_window_load(w, "x:a", 3, 1), -1);
    cr_expect_eq(pql_window_load(w, "m:a", 3, 1.5), -1);
    cr_expect_eq(pql_window_load(w, "m:a", 3, 12), 0);
    cr_expect_eq(pql_window_load(w, "m:", 2, 12), 0); /* the empty member */
    cr_expect_eq(num_at(w, 12 * DAY), 2);
    pql_window_destroy(w);

    w = new_window(PQL_AGG_LAST, 7 * DAY);
    cr_expect_eq(pql_window_load(w, "12", 2, 1), -1);
    cr_expect_eq(pql_window_load(w, "tv", 2, 1), -1);
    cr_expect_eq(pql_window_load(w, "t", 1, 0.5), -1);
    cr_expect_eq(pql_window_load(w, "t", 1, 100), 0);
    cr_expect(null_at(w, 100)); /* half loaded */
    cr_expect_eq(pql_window_load(w, "v", 1, 4), 0);
    cr_expect_eq(num_at(w, 100), 4);
    pql_window_destroy(w);

    w = new_window(PQL_AGG_COUNT, 0);
    cr_expect_eq(pql_window_load(w, "5", 1, 1), -1);
    cr_expect_eq(pql_window_load(w, "0", 1, 9), 0);
    cr_expect_eq(num_at(w, 5), 9);
    pql_window_destroy(w);
}

/* Entries keep a bucket in 62 bits (window.c, Size): the most extreme event
 * times still get their own bucket, flush under it and load back; a stored
 * bucket no event time can produce is refused, not cut short. */
Test(window, extreme_event_times_keep_their_bucket)
{
    static const int64_t times[] = {INT64_MIN, INT64_MIN + 1, INT64_MAX - 1, INT64_MAX};
    for (size_t i = 0; i < sizeof times / sizeof times[0]; i++) {
        int64_t ts = times[i];
        char want[32];
        int64_t b = ts / MIN - (ts % MIN != 0 && ts < 0);
        snprintf(want, sizeof want, "%" PRId64, b);
        pql_window *w = new_window(PQL_AGG_COUNT, 5 * MIN);
        cr_assert_eq(pql_window_add(w, ts, ts, 0, NULL, 0), 1);
        cr_assert_eq(pql_window_add(w, ts, ts, 0, NULL, 0), 1);
        cr_assert_eq(num_at(w, ts), 2);
        pairs log = flush_log(w);
        cr_assert_eq(log.len, 1);
        expect_set(&log, want, 2);
        pql_window_spec spec;
        char err[64];
        cr_assert_eq(pql_window_spec_init(&spec, PQL_AGG_COUNT, 5 * MIN, err, sizeof err), 0);
        pql_window *copy = load_copy(&spec, &log);
        cr_assert_eq(num_at(copy, ts), 2, "%s", want);
        pql_window_destroy(copy);
        pql_window_destroy(w);
        free(log.v);

        w = new_window(PQL_AGG_DISTINCT, 5 * MIN);
        cr_assert_eq(pql_window_add(w, ts, ts, 0, "u1", 2), 1);
        log = flush_log(w);
        cr_assert_eq(log.len, 1);
        expect_set(&log, "m:u1", (double)b);
        pql_window_destroy(w);
        free(log.v);
    }

    pql_window *w = new_window(PQL_AGG_COUNT, 7 * DAY);
    cr_expect_eq(pql_window_load(w, "2305843009213693952", 19, 1), -1);  /* 2^61 */
    cr_expect_eq(pql_window_load(w, "-2305843009213693952", 20, 1), -1); /* -2^61 */
    cr_expect_eq(pql_window_load(w, "9223372036854775807", 19, 1), -1);  /* INT64_MAX */
    cr_expect_eq(pql_window_load(w, "2305843009213693951", 19, 1), 0);   /* 2^61 - 1 */
    cr_expect_eq(num_at(w, 0), 1); /* a bucket after the clock's counts (window.h) */
    pql_window_destroy(w);
    w = new_window(PQL_AGG_DISTINCT, 7 * DAY);
    cr_expect_eq(pql_window_load(w, "m:a", 3, 2305843009213693952.0), -1);
    cr_expect_eq(pql_window_load(w, "m:a", 3, -2305843009213693952.0), -1);
    cr_expect_eq(pql_window_load(w, "m:a", 3, 1e15), 0);
    pql_window_destroy(w);
}

Test(window, destroy_null)
{
    pql_window_destroy(NULL);
}

/* ---- randomized comparison with a naive model -------------------------------------- */

typedef struct obs {
    int64_t ts;
    double value;
    int member;
} obs;

typedef struct model {
    pql_window_spec spec;
    obs *v; /* counted observations, in arrival order */
    size_t len, cap;
} model;

static uint64_t rng_state;

static uint64_t rng(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static int64_t rng_range(int64_t n) /* [0, n) */
{
    return n <= 0 ? 0 : (int64_t)(rng() % (uint64_t)n);
}

static size_t member_bytes(int id, char *buf)
{
    if (id == 0) return 0;
    if (id == 1) {
        memcpy(buf, "a\0b", 3);
        return 3;
    }
    return (size_t)sprintf(buf, "member-%d", id);
}

enum { NMEMBERS = 150 };

/* The model's own bucket arithmetic (not pql_window_bucket). */
static int64_t model_bucket(const pql_window_spec *s, int64_t ts)
{
    return s->bucket_ms ? (int64_t)floor((double)ts / (double)s->bucket_ms) : 0;
}

/** @returns the first bucket in reach at clock (INT64_MIN for lifetime). */
static int64_t model_first(const pql_window_spec *s, int64_t clock)
{
    return s->window_ms ? model_bucket(s, clock) - s->nbuckets + 1 : INT64_MIN;
}

static int in_reach(const pql_window_spec *s, int64_t clock, int64_t ts)
{
    return model_bucket(s, ts) >= model_first(s, clock);
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static pql_value model_value(const model *m, int64_t clock)
{
    double acc = 0;
    int any = 0;
    if (m->spec.agg == PQL_AGG_LAST) {
        const obs *best = NULL;
        for (size_t i = 0; i < m->len; i++)
            if (!best || m->v[i].ts >= best->ts) best = &m->v[i];
        if (!best || !in_reach(&m->spec, clock, best->ts)) return pql_null();
        return pql_num(best->value);
    }
    int seen[NMEMBERS] = {0};
    int64_t *days = malloc((m->len + 1) * sizeof(*days));
    size_t ndays = 0;
    for (size_t i = 0; i < m->len; i++) {
        const obs *o = &m->v[i];
        if (!in_reach(&m->spec, clock, o->ts)) continue;
        switch (m->spec.agg) {
        case PQL_AGG_COUNT:
            acc += 1;
            break;
        case PQL_AGG_SUM:
            acc += o->value;
            break;
        case PQL_AGG_DISTINCT:
            acc += !seen[o->member];
            seen[o->member] = 1;
            break;
        case PQL_AGG_DAYS_ACTIVE:
            days[ndays++] = model_bucket(&m->spec, o->ts);
            break;
        case PQL_AGG_MAX:
            acc = any && acc > o->value ? acc : o->value;
            break;
        default:
            break;
        }
        any = 1;
    }
    if (m->spec.agg == PQL_AGG_DAYS_ACTIVE) {
        qsort(days, ndays, sizeof(*days), cmp_i64);
        for (size_t i = 0; i < ndays; i++)
            acc += i == 0 || days[i] != days[i - 1];
    }
    free(days);
    if (m->spec.agg == PQL_AGG_MAX && !any) return pql_null();
    return pql_num(acc);
}

/** The exact pairs the store must hold after a flush, `first` being the first
 *  bucket in reach at the last expire. */
static pairs model_pairs(const model *m, int64_t first)
{
    pairs p = {0};
    char field[64];
    if (m->spec.agg == PQL_AGG_LAST) {
        const obs *best = NULL;
        for (size_t i = 0; i < m->len; i++)
            if (!best || m->v[i].ts >= best->ts) best = &m->v[i];
        if (best && model_bucket(&m->spec, best->ts) >= first) {
            pairs_push(&p, "t", 1, (double)best->ts, 0);
            pairs_push(&p, "v", 1, best->value, 0);
        }
        return p;
    }
    if (m->spec.agg == PQL_AGG_DISTINCT) {
        int64_t lastseen[NMEMBERS];
        for (int k = 0; k < NMEMBERS; k++)
            lastseen[k] = INT64_MIN;
        for (size_t i = 0; i < m->len; i++) {
            int64_t b = model_bucket(&m->spec, m->v[i].ts);
            if (b > lastseen[m->v[i].member]) lastseen[m->v[i].member] = b;
        }
        for (int k = 0; k < NMEMBERS; k++) {
            if (lastseen[k] == INT64_MIN || lastseen[k] < first) continue;
            memcpy(field, "m:", 2);
            size_t n = member_bytes(k, field + 2);
            pairs_push(&p, field, n + 2, (double)lastseen[k], 0);
        }
        return p;
    }
    for (size_t i = 0; i < m->len; i++) {
        const obs *o = &m->v[i];
        int64_t b = model_bucket(&m->spec, o->ts);
        if (b < first) continue;
        int n = snprintf(field, sizeof field, "%" PRId64, b);
        pair *e = pairs_find(&p, field, (size_t)n);
        if (!e) {
            double init = m->spec.agg == PQL_AGG_MAX ? o->value : 0;
            pairs_push(&p, field, (size_t)n, init, 0);
            e = &p.v[p.len - 1];
        }
        switch (m->spec.agg) {
        case PQL_AGG_COUNT:
            e->value += 1;
            break;
        case PQL_AGG_SUM:
            e->value += o->value;
            break;
        case PQL_AGG_DAYS_ACTIVE:
            e->value = 1;
            break;
        case PQL_AGG_MAX:
            e->value = e->value > o->value ? e->value : o->value;
            break;
        default:
            break;
        }
    }
    return p;
}

static void check_store(const model *m, int64_t first, pairs *store, int step)
{
    pairs want = model_pairs(m, first);
    for (size_t i = 0; i < want.len; i++) {
        pair *got = pairs_find(store, want.v[i].field, want.v[i].len);
        cr_assert_not_null(got, "agg %d window %" PRId64 " step %d: store lacks %.*s",
                           (int)m->spec.agg, m->spec.window_ms, step, (int)want.v[i].len,
                           want.v[i].field);
        cr_assert_eq(got->value, want.v[i].value,
                     "agg %d window %" PRId64 " step %d: store %.*s = %g, want %g",
                     (int)m->spec.agg, m->spec.window_ms, step, (int)want.v[i].len, want.v[i].field,
                     got->value, want.v[i].value);
    }
    cr_assert_eq(store->len, want.len,
                 "agg %d window %" PRId64 " step %d: store has %zu pairs, want %zu",
                 (int)m->spec.agg, m->spec.window_ms, step, store->len, want.len);
    free(want.v);
}

static void check_values(pql_window *w, const model *m, int64_t clock, const char *what, int step)
{
    int64_t reach = m->spec.window_ms ? m->spec.window_ms : 10 * DAY;
    /* the last ask repeats the first: a value kept from an ask at another
     * clock, or from before a change, would differ from the model */
    for (int k = 0; k < 5; k++) {
        int64_t at = clock + (k == 0 || k == 4 ? 0 : rng_range(reach + reach / 4));
        pql_value got = pql_window_value(w, at), want = model_value(m, at);
        cr_assert_eq(got.type, want.type,
                     "agg %d window %" PRId64 " step %d (%s) clock %" PRId64 ": type %d, want %d",
                     (int)m->spec.agg, m->spec.window_ms, step, what, at, (int)got.type,
                     (int)want.type);
        if (got.type == PQL_V_NUM)
            cr_assert_eq(got.u.num, want.u.num,
                         "agg %d window %" PRId64 " step %d (%s) clock %" PRId64 ": %g, want %g",
                         (int)m->spec.agg, m->spec.window_ms, step, what, at, got.u.num,
                         want.u.num);
    }
}

static void run_random(pql_agg agg, int64_t window_ms, int steps)
{
    model m = {0};
    char err[128], buf[32];
    cr_assert_eq(pql_window_spec_init(&m.spec, agg, window_ms, err, sizeof err), 0);
    pql_window *w = pql_window_new(&m.spec);
    pairs store = {0};
    int64_t reach = window_ms ? window_ms : 10 * DAY;
    int64_t clock = -(int64_t)rng_range(3 * reach) - 1; /* start in negative time */
    int64_t last_ts = clock;
    int64_t first = INT64_MIN; /* first bucket in reach at the last expire */
    for (int step = 0; step < steps; step++) {
        int64_t r = rng_range(100);
        if (r < 70) {
            int64_t ts;
            int64_t kind = rng_range(10);
            if (kind < 6)
                ts = clock - rng_range(reach / 2 + 1);
            else if (kind < 8)
                ts = clock - rng_range(reach + reach / 2); /* some late */
            else
                ts = clock + rng_range(reach / 3 + 1); /* moves the clock */
            int64_t snap = rng_range(10);
            if (snap < 3)
                ts -= ts % MIN; /* bucket edges (also for negative ts) */
            else if (snap < 4)
                ts = last_ts; /* ties */
            else if (snap < 5)
                ts = ts - ts % MIN - 1;
            last_ts = ts;
            clock = ts > clock ? ts : clock;
            double value = (double)(rng_range(41) - 10);
            if (rng_range(50) == 0) value = rng_range(2) ? NAN : -INFINITY;
            int member = (int)rng_range(NMEMBERS);
            size_t mlen = member_bytes(member, buf);
            int want = in_reach(&m.spec, clock, ts);
            if (!isfinite(value) &&
                (agg == PQL_AGG_SUM || agg == PQL_AGG_MAX || agg == PQL_AGG_LAST))
                want = 0;
            int got = pql_window_add(w, clock, ts, value, buf, mlen);
            cr_assert_eq(got, want, "step %d: add ts %" PRId64 " clock %" PRId64 " = %d", step, ts,
                         clock, got);
            if (got == 1) {
                if (m.len == m.cap) {
                    m.cap = m.cap ? m.cap * 2 : 64;
                    m.v = realloc(m.v, m.cap * sizeof(*m.v));
                }
                m.v[m.len++] = (obs){ts, value, member};
            }
        } else if (r < 80) {
            check_values(w, &m, clock, "query", step);
        } else if (r < 87) {
            pql_window_expire(w, clock);
            first = model_first(&m.spec, clock);
            check_values(w, &m, clock, "expire", step);
        } else if (r < 95) {
            pql_window_flush(w, store_set, store_del, &store);
            cr_assert_eq(pql_window_dirty(w), 0);
            check_store(&m, first, &store, step);
            pairs again = flush_log(w);
            cr_assert_eq(again.len, 0, "step %d: a second flush reported %zu pairs", step,
                         again.len);
            pql_window *copy = load_copy(&m.spec, &store);
            check_values(copy, &m, clock, "loaded copy", step);
            pql_window_destroy(copy);
        } else {
            /* continue with a window loaded from the store, as after eviction */
            pql_window_flush(w, store_set, store_del, &store);
            pql_window_destroy(w);
            check_store(&m, first, &store, step);
            w = load_copy(&m.spec, &store);
            check_values(w, &m, clock, "reloaded", step);
        }
    }
    check_values(w, &m, clock, "end", steps);
    pql_window_destroy(w);
    free(store.v);
    free(m.v);
}

Test(window, randomized_against_model)
{
    uint64_t seed = 0x5eed2024ULL;
    const char *env = getenv("PQL_TEST_SEED");
    if (env) seed = strtoull(env, NULL, 0);
    fprintf(stderr, "test_window: randomized seed %" PRIu64 " (set PQL_TEST_SEED to replay)\n",
            seed);
    rng_state = seed ? seed : 1;
    static const pql_agg aggs[] = {PQL_AGG_COUNT,       PQL_AGG_SUM, PQL_AGG_DISTINCT,
                                   PQL_AGG_DAYS_ACTIVE, PQL_AGG_MAX, PQL_AGG_LAST};
    static const int64_t windows[] = {30 * MIN, HOUR, 36 * HOUR, 7 * DAY, 0};
    for (size_t a = 0; a < sizeof aggs / sizeof aggs[0]; a++)
        for (size_t i = 0; i < sizeof windows / sizeof windows[0]; i++)
            run_random(aggs[a], windows[i], 2000);
}
