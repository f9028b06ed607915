/* test_rule_skip.c — skipping rules nothing can have changed (account.c,
 * evaluate) is invisible: two accounts fed the same random events, one
 * skipping and one evaluating every rule on every event, emit the same alerts
 * byte for byte, write the same fields, and go on equal after being flushed,
 * dropped and loaded again from those fields (eviction).
 *
 * The rule set reaches every input a rule can read: signals of each aggregate
 * and bucket size (minutes, hours, days, lifetime), traits in when/fit/clear,
 * the paid expression and the conversion event (applies_to), since_signup,
 * held_for and cooldown (the clock), weighted tiers (a rise while fired), a
 * logistic score, and a clear that overlaps its when (a rule whose own state
 * change is all that changed).  Events come late, out of order, across bucket and day
 * edges; traits are set, changed and deleted. */
#include "account.h"
#include "harness.h"

#include <criterion/criterion.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define T0     1700000000000LL
#define MINUTE 60000LL
#define HOUR   (60 * MINUTE)
#define DAY    (24 * HOUR)

static const char *rules_yaml =
    "lifecycle: { signup: signed_up, conversion: subscription_started,\n"
    "             paid: 'account.plan != \"free\"' }\n"
    "traits: { plan: string, seats: number, limit: number, product: string,\n"
    "          employees: number }\n"
    "signals:\n"
    "  logins:    { count: login, window: 2d }\n"
    "  recent:    { count: login, window: 90m }\n"
    "  uses:      { count: feature_used, where: 'properties.feature == \"projects\"',"
    " window: 7d }\n"
    "  users:     { distinct: user_id, of: '*', window: 3d }\n"
    "  calls:     { sum: properties.calls, of: api_request, window: 6h }\n"
    "  biggest:   { max: properties.calls, of: api_request, window: 1d }\n"
    "  lastcalls: { last: properties.calls, of: api_request, window: 2h }\n"
    "  days:      { days_active: '*', window: 7d }\n"
    "  other:     { days_active: '*', where: 'properties.product != account.product',"
    " window: 14d }\n"
    "  ever:      { count: onboarding_completed, window: lifetime }\n"
    "pql:\n"
    "  - name: active\n"
    "    when: logins >= 3 and users >= 2\n"
    "  - name: heavy\n"
    "    when: uses >= 4\n"
    "    clear: uses < 2\n"
    "    cooldown: 1d\n"
    "  - name: held\n"
    "    when: calls >= 60\n"
    "    held_for: 2h\n"
    "  - name: young\n"
    "    when: since_signup <= 1d and recent >= 2\n"
    "  - name: veteran\n" /* rises with the clock alone */
    "    when: since_signup >= 3d and ever >= 1\n"
    "  - name: flappy\n" /* clear overlaps when: clears, then fires again, event after event */
    "    when: logins >= 2\n"
    "    clear: logins >= 4\n"
    "  - name: engaged\n"
    "    model: weighted\n"
    "    points:\n"
    "      - { when: logins >= 2, points: 30 }\n"
    "      - { when: days >= 2, points: 30 }\n"
    "      - { when: ever >= 1, points: 20 }\n"
    "      - { when: biggest >= 30, points: 20 }\n"
    "    tiers: { high: 90, medium: 60 }\n"
    "  - name: propensity\n"
    "    model: logistic\n"
    "    intercept: -3\n"
    "    weights: { logins: 0.4, 'log1p(calls)': 0.3, lastcalls: 0.02 }\n"
    "    threshold: 0.7\n"
    "expansion:\n"
    "  - name: seats\n"
    "    when: account.seats > 0 and users / account.seats >= 0.8\n"
    "    clear: users / account.seats < 0.6\n"
    "    cooldown: 12h\n"
    "  - name: limit\n"
    "    fit: account.employees >= 10\n"
    "    when: account.limit > 0 and calls >= 0.8 * account.limit\n"
    "    held_for: 1h\n"
    "    cooldown: 1d\n"
    "  - name: cross\n"
    "    when: other >= 2\n"
    "    cooldown: 2d\n";

static uint64_t rng;

static uint64_t rnd(uint64_t n)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return n ? rng % n : 0;
}

/* ---- what each account emits and writes, as text ---- */

static void on_alert(void *opaque, const pql_alert *al)
{
    pql_buf *log = opaque;
    pql_buf_printf(log, "alert %s %s kind=%d at=%" PRId64 " score=%d:%.17g tier=%s", al->alert_id,
                   al->rule, (int)al->kind, al->triggered_at, al->has_score, al->score,
                   al->tier ? al->tier : "-");
    for (size_t i = 0; i < al->nreasons; i++)
        pql_buf_printf(log, " | %s", al->reasons[i]);
    for (size_t i = 0; i < al->nsignals; i++)
        pql_buf_printf(log, " %s=%.17g", al->signal_names[i], al->signal_values[i]);
    pql_buf_append(log, "\n", 1);
}

typedef struct field {
    char *f, *v;
    size_t flen, vlen;
} field;

typedef struct store {
    field *v;
    size_t n, cap;
    pql_buf log; /* every set and del, in order */
} store;

static field *store_find(store *s, const char *f, size_t flen)
{
    for (size_t i = 0; i < s->n; i++)
        if (s->v[i].flen == flen && memcmp(s->v[i].f, f, flen) == 0) return &s->v[i];
    return NULL;
}

static void st_set(void *o, const char *f, size_t flen, const char *v, size_t vlen)
{
    store *s = o;
    pql_buf_printf(&s->log, "set %.*s=%.*s\n", (int)flen, f, (int)vlen, v);
    field *x = store_find(s, f, flen);
    if (!x) {
        if (s->n == s->cap) {
            s->cap = s->cap ? 2 * s->cap : 64;
            s->v = realloc(s->v, s->cap * sizeof(*s->v));
            cr_assert_not_null(s->v);
        }
        x = &s->v[s->n++];
        x->f = malloc(flen);
        memcpy(x->f, f, flen);
        x->flen = flen;
    } else {
        free(x->v);
    }
    x->v = malloc(vlen ? vlen : 1);
    memcpy(x->v, v, vlen);
    x->vlen = vlen;
}

static void st_del(void *o, const char *f, size_t flen)
{
    store *s = o;
    pql_buf_printf(&s->log, "del %.*s\n", (int)flen, f);
    field *x = store_find(s, f, flen);
    if (!x) return;
    free(x->f);
    free(x->v);
    *x = s->v[--s->n];
}

static void store_free(store *s)
{
    for (size_t i = 0; i < s->n; i++) {
        free(s->v[i].f);
        free(s->v[i].v);
    }
    free(s->v);
    pql_buf_free(&s->log);
}

/** A fresh account loaded from the store, as after an eviction. */
static pql_account *reload(pql_rules *r, const store *s, int skipping)
{
    pql_account *a = pql_account_new(r, "acme", 4);
    pql_account_set_rule_skipping(a, skipping);
    for (size_t i = 0; i < s->n; i++)
        cr_assert_eq(pql_account_load_field(a, s->v[i].f, s->v[i].flen, s->v[i].v, s->v[i].vlen), 0,
                     "field %.*s", (int)s->v[i].flen, s->v[i].f);
    return a;
}

/* ---- random events ---- */

typedef struct gen {
    int64_t clock;
    pql_prop props[4];
    char member[16];
} gen;

static const char *pick(const char *const *v, size_t n)
{
    return v[rnd(n)];
}

/** Fills ev with the next random event. */
static void next_event(gen *g, pql_event *ev)
{
    static const char *const names[] = {"login",          "login",
                                        "feature_used",   "feature_used",
                                        "api_request",    "api_request",
                                        "pricing_viewed", "onboarding_completed",
                                        "signed_up",      "subscription_started"};
    static const char *const users[] = {"u0", "u1", "u2", "u3", "u4", "u5"};
    static const char *const plans[] = {"free", "free", "team"};
    static const char *const products[] = {"docs", "chat"};
    static const char *const features[] = {"projects", "projects", "search"};
    static const char *const keys[] = {"plan", "seats", "limit", "product", "employees", "region"};
    uint64_t gap = rnd(100);
    if (gap < 60)
        g->clock += (int64_t)rnd(20 * MINUTE);
    else if (gap < 85)
        g->clock += (int64_t)rnd(6 * HOUR);
    else if (gap < 95)
        g->clock += (int64_t)rnd(2 * DAY);
    int64_t ts = g->clock;
    if (rnd(100) < 8) ts -= (int64_t)rnd(4 * DAY); /* late, maybe out of reach */
    memset(ev, 0, sizeof(*ev));
    ev->account_id = "acme";
    ev->account_id_len = 4;
    ev->timestamp = ts;
    ev->props = g->props;
    if (rnd(100) < 12) { /* an account update: one or two traits set, changed or deleted */
        ev->kind = PQL_INPUT_ACCOUNT;
        ev->nprops = 1 + (size_t)rnd(2);
        for (size_t i = 0; i < ev->nprops; i++) {
            const char *k = pick(keys, 6);
            pql_value v;
            if (rnd(10) == 0) {
                v = pql_null();
            } else if (!strcmp(k, "plan")) {
                const char *p = pick(plans, 3);
                v = pql_str(p, strlen(p));
            } else if (!strcmp(k, "product") || !strcmp(k, "region")) {
                v = pql_str(pick(products, 2), 4);
            } else if (!strcmp(k, "seats")) {
                v = pql_num((double)(1 + rnd(6)));
            } else if (!strcmp(k, "limit")) {
                v = pql_num((double)(20 + rnd(150)));
            } else {
                v = pql_num((double)rnd(30));
            }
            g->props[i] = (pql_prop){k, strlen(k), v};
        }
        return;
    }
    ev->kind = PQL_INPUT_USAGE;
    ev->event = names[rnd(rnd(50) == 0 ? 10 : 8)]; /* signup and conversion are rare */
    ev->event_len = strlen(ev->event);
    ev->event_id = "e";
    ev->event_id_len = 1;
    if (rnd(10)) {
        ev->user_id = pick(users, 6);
        ev->user_id_len = 2;
    }
    size_t n = 0;
    if (rnd(3)) {
        const char *p = pick(products, 2);
        g->props[n++] = (pql_prop){"product", 7, pql_str(p, 4)};
    }
    if (!strcmp(ev->event, "feature_used")) {
        const char *f = pick(features, 3);
        g->props[n++] = (pql_prop){"feature", 7, pql_str(f, strlen(f))};
    } else if (!strcmp(ev->event, "api_request")) {
        g->props[n++] =
            (pql_prop){"calls", 5, rnd(20) ? pql_num((double)rnd(40)) : pql_str("many", 4)};
    }
    ev->nprops = n;
}

/* Whether two buffers hold the same bytes (an empty one may have no data:
 * memcmp must not see its NULL). */
static int same_bytes(const pql_buf *x, const pql_buf *y)
{
    return x->len == y->len && (x->len == 0 || memcmp(x->data, y->data, x->len) == 0);
}

/* ---- the comparison ---- */

static void run(uint64_t seed, int events)
{
    pql_rules *r = h_rules(rules_yaml);
    rng = seed;
    pql_account *a = pql_account_new(r, "acme", 4), *b = pql_account_new(r, "acme", 4);
    pql_account_set_rule_skipping(a, 1);
    pql_account_set_rule_skipping(b, 0);
    pql_buf alog = {0}, blog = {0};
    store as = {0}, bs = {0};
    gen g = {.clock = T0};
    size_t nalerts = 0;
    for (int i = 0; i < events; i++) {
        pql_event ev;
        next_event(&g, &ev);
        size_t before = alog.len;
        pql_apply ra = pql_account_apply(a, &ev, 0, on_alert, &alog);
        pql_apply rb = pql_account_apply(b, &ev, 0, on_alert, &blog);
        cr_assert_eq(ra, rb, "seed %#" PRIx64 " event %d: apply %d, evaluating all %d", seed, i,
                     (int)ra, (int)rb);
        cr_assert(same_bytes(&alog, &blog),
                  "seed %#" PRIx64 " event %d (%s at %" PRId64 "): skipping emitted\n%.*s"
                  "evaluating every rule emitted\n%.*s",
                  seed, i, ev.kind == PQL_INPUT_ACCOUNT ? "account update" : ev.event, ev.timestamp,
                  (int)(alog.len - before), alog.data + before,
                  (int)(blog.len > before ? blog.len - before : 0),
                  blog.data + (blog.len > before ? before : blog.len));
        nalerts += alog.len > before;
        if (rnd(40) == 0) { /* a batch boundary */
            pql_account_flush(a, st_set, st_del, &as);
            pql_account_flush(b, st_set, st_del, &bs);
            cr_assert(same_bytes(&as.log, &bs.log), "seed %#" PRIx64 " event %d: the writes differ",
                      seed, i);
            if (rnd(4) == 0) { /* evicted, then loaded again */
                pql_account_destroy(a);
                pql_account_destroy(b);
                a = reload(r, &as, 1);
                b = reload(r, &bs, 0);
            }
        }
    }
    cr_assert_gt(nalerts, 10, "seed %#" PRIx64 ": only %zu events fired (the rules are too strict)",
                 seed, nalerts);
    pql_account_destroy(a);
    pql_account_destroy(b);
    pql_buf_free(&alog);
    pql_buf_free(&blog);
    store_free(&as);
    store_free(&bs);
    pql_rules_destroy(r);
}

Test(rule_skip, skipping_quiet_rules_changes_no_alert_and_no_write)
{
    uint64_t seed = 0x51c1e7a5ULL;
    const char *env = getenv("PQL_TEST_SEED");
    if (env) seed = strtoull(env, NULL, 0);
    for (int k = 0; k < 40; k++)
        run(seed + (uint64_t)k * 0x9e3779b97f4a7c15ULL, 3000);
}
