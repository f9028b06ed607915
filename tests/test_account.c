/* test_account.c — applying events to an account: windows, lifecycle, edge-
 * triggered firing and re-arm, cooldown, held_for, applies_to, exact alerts,
 * and the write-behind field round trip. */
#include "account.h"
#include "harness.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define T0  1700000000000LL /* 2023-11-14T22:13:20Z */
#define DAY PQL_MS_DAY

typedef struct fired {
    int n;
    char rule[8][64];
    char id[8][PQL_ALERT_ID_LEN + 1];
    char reason[8][256];
    int64_t triggered_at[8];
    double sig0[8];
    int has_ttp[8];
    int64_t ttp[8];
    char model[8][16];
    int has_score[8];
    double score[8];
    char tier[8][8];
    int has_sla[8];
    int64_t sla_in[8]; /* sla_due_at - emitted_at */
    size_t nreasons[8];
    char reason2[8][256];
} fired;

static void on_alert(void *opaque, const pql_alert *a)
{
    fired *f = opaque;
    cr_assert_lt(f->n, 8);
    snprintf(f->rule[f->n], 64, "%s", a->rule);
    memcpy(f->id[f->n], a->alert_id, sizeof(f->id[0]));
    snprintf(f->reason[f->n], 256, "%s", a->nreasons ? a->reasons[0] : "");
    f->triggered_at[f->n] = a->triggered_at;
    f->sig0[f->n] = a->nsignals ? a->signal_values[0] : -1;
    f->has_ttp[f->n] = a->has_time_to_pql_ms;
    f->ttp[f->n] = a->time_to_pql_ms;
    snprintf(f->model[f->n], 16, "%s", a->model);
    f->has_score[f->n] = a->has_score;
    f->score[f->n] = a->score;
    snprintf(f->tier[f->n], 8, "%s", a->tier ? a->tier : "");
    f->has_sla[f->n] = a->has_sla_due_at;
    f->sla_in[f->n] = a->sla_due_at - a->emitted_at;
    f->nreasons[f->n] = a->nreasons;
    snprintf(f->reason2[f->n], 256, "%s", a->nreasons > 1 ? a->reasons[1] : "");
    f->n++;
}

static pql_apply usage(pql_account *a, const char *event, const char *user, int64_t ts, fired *f)
{
    pql_event ev = {0};
    ev.kind = PQL_INPUT_USAGE;
    ev.account_id = "acme";
    ev.account_id_len = 4;
    ev.event = event;
    ev.event_len = strlen(event);
    ev.event_id = "e";
    ev.event_id_len = 1;
    ev.user_id = user;
    ev.user_id_len = user ? strlen(user) : 0;
    ev.timestamp = ts;
    return pql_account_apply(a, &ev, 0, on_alert, f);
}

static void trait(pql_account *a, const char *key, pql_value v, int64_t ts, fired *f)
{
    pql_prop p = {key, strlen(key), v};
    pql_event ev = {0};
    ev.kind = PQL_INPUT_ACCOUNT;
    ev.account_id = "acme";
    ev.account_id_len = 4;
    ev.timestamp = ts;
    ev.props = &p;
    ev.nprops = 1;
    pql_account_apply(a, &ev, 0, on_alert, f);
}

static const char *simple = "version: 3\n"
                            "lifecycle: { signup: signed_up, conversion: paid }\n"
                            "signals:\n"
                            "  logins: { count: login, window: 7d }\n"
                            "pql:\n"
                            "  - name: active\n"
                            "    when: logins >= 3\n"
                            "    reasons: ['Logged in {logins} times in 7 days']\n";

Test(account, fires_once_on_the_edge_with_exact_alert)
{
    pql_rules *r = h_rules(simple);
    pql_account *a = pql_account_new(r, "acme", 4);
    fired f = {0};
    usage(a, "signed_up", "u1", T0, &f);
    usage(a, "login", "u1", T0 + 1000, &f);
    usage(a, "login", "u1", T0 + 2000, &f);
    cr_assert_eq(f.n, 0);
    usage(a, "login", "u1", T0 + 3000, &f);
    cr_assert_eq(f.n, 1);
    cr_assert_str_eq(f.rule[0], "active");
    cr_assert_str_eq(f.reason[0], "Logged in 3 times in 7 days");
    cr_assert_eq(f.triggered_at[0], T0 + 3000);
    cr_assert_eq(f.sig0[0], 3);
    cr_assert_eq(f.has_ttp[0], 1);
    cr_assert_eq(f.ttp[0], 3000);
    char expect[PQL_ALERT_ID_LEN + 1];
    pql_alert_id("acme", 4, "active", "1", expect);
    cr_assert_str_eq(f.id[0], expect);
    usage(a, "login", "u1", T0 + 4000, &f); /* still true: no second alert */
    cr_assert_eq(f.n, 1);
    pql_account_destroy(a);
    pql_rules_destroy(r);
}

Test(account, rearms_when_condition_clears_and_fires_with_next_id)
{
    pql_rules *r = h_rules(simple);
    pql_account *a = pql_account_new(r, "acme", 4);
    fired f = {0};
    for (int i = 0; i < 3; i++)
        usage(a, "login", "u1", T0 + i, &f);
    cr_assert_eq(f.n, 1);
    /* 8 days later the window is empty: the condition clears */
    usage(a, "other", "u1", T0 + 8 * DAY, &f);
    unsigned seq;
    int isfired;
    pql_account_rule_state(a, 0, &seq, &isfired);
    cr_assert_eq(seq, 1);
    cr_assert_eq(isfired, 0);
    for (int i = 0; i < 3; i++)
        usage(a, "login", "u1", T0 + 8 * DAY + i, &f);
    cr_assert_eq(f.n, 2);
    char expect[PQL_ALERT_ID_LEN + 1];
    pql_alert_id("acme", 4, "active", "2", expect);
    cr_assert_str_eq(f.id[1], expect);
    cr_assert_str_neq(f.id[0], f.id[1]);
    pql_account_destroy(a);
    pql_rules_destroy(r);
}

Test(account, converted_accounts_get_no_pql_alert)
{
    pql_rules *r = h_rules(simple);
    pql_account *a = pql_account_new(r, "acme", 4);
    fired f = {0};
    usage(a, "paid", "u1", T0, &f);
    for (int i = 0; i < 5; i++)
        usage(a, "login", "u1", T0 + i, &f);
    cr_assert_eq(f.n, 0);
    pql_account_destroy(a);
    pql_rules_destroy(r);
}

Test(account, late_events_are_reported_and_not_counted)
{
    pql_rules *r = h_rules(simple);
    pql_account *a = pql_account_new(r, "acme", 4);
    fired f = {0};
    cr_assert_eq(usage(a, "login", "u1", T0 + 10 * DAY, &f), PQL_APPLIED);
    cr_assert_eq(usage(a, "login", "u1", T0, &f), PQL_APPLY_LATE);
    cr_assert_eq(usage(a, "login", "u1", T0 + 9 * DAY, &f),
                 PQL_APPLIED); /* out of order, in reach */
    cr_assert_eq(usage(a, "nothing", "u1", T0 + 9 * DAY, &f), PQL_APPLY_UNMATCHED);
    cr_assert_eq(pql_account_signal(a, 0).u.num, 2);
    pql_account_destroy(a);
    pql_rules_destroy(r);
}

static const char *expansion = "traits: { seats: number }\n"
                               "signals:\n"
                               "  users: { distinct: user_id, of: '*', window: 30d }\n"
                               "expansion:\n"
                               "  - name: seats\n"
                               "    applies_to: all\n"
                               "    when: account.seats > 0 and users / account.seats >= 0.8\n"
                               "    clear: users / account.seats < 0.5\n"
                               "    cooldown: 14d\n"
                               "    reasons: ['Seat usage at {pct(users / account.seats)} ({users} "
                               "of {account.seats} seats)']\n"
                               "  - name: held\n"
                               "    applies_to: all\n"
                               "    when: users >= 1\n"
                               "    held_for: 2d\n";

Test(account, hysteresis_cooldown_and_reason)
{
    pql_rules *r = h_rules(expansion);
    pql_account *a = pql_account_new(r, "acme", 4);
    fired f = {0};
    trait(a, "seats", pql_num(5), T0, &f);
    usage(a, "x", "u1", T0, &f);
    usage(a, "x", "u2", T0, &f);
    usage(a, "x", "u3", T0, &f);
    cr_assert_eq(f.n, 0);
    usage(a, "x", "u4", T0 + 1, &f);
    cr_assert_eq(f.n, 1);
    cr_assert_str_eq(f.rule[0], "seats");
    cr_assert_str_eq(f.reason[0], "Seat usage at 80% (4 of 5 seats)");
    /* more seats bought: 4/10 = 40% < 50% clears; back to 80% within the
       cooldown does not fire */
    trait(a, "seats", pql_num(10), T0 + 2, &f);
    for (int i = 5; i <= 8; i++) {
        char u[8];
        snprintf(u, sizeof(u), "u%d", i);
        usage(a, "x", u, T0 + 3, &f);
    }
    cr_assert_eq(f.n, 1, "cooldown must hold it back");
    /* after the cooldown, the next event fires it (episode 2) */
    usage(a, "x", "u1", T0 + 15 * DAY, &f);
    int seats_alerts = 0;
    for (int i = 0; i < f.n; i++)
        seats_alerts += !strcmp(f.rule[i], "seats");
    cr_assert_eq(seats_alerts, 2);
    pql_account_destroy(a);
    pql_rules_destroy(r);
}

Test(account, held_for_needs_the_condition_to_hold_in_event_time)
{
    pql_rules *r = h_rules(expansion);
    pql_account *a = pql_account_new(r, "acme", 4);
    fired f = {0};
    usage(a, "x", "u1", T0, &f);
    usage(a, "x", "u1", T0 + DAY, &f);
    cr_assert_eq(f.n, 0);
    usage(a, "x", "u1", T0 + 2 * DAY, &f);
    cr_assert_eq(f.n, 1);
    cr_assert_str_eq(f.rule[0], "held");
    cr_assert_eq(f.triggered_at[0], T0 + 2 * DAY);
    pql_account_destroy(a);
    pql_rules_destroy(r);
}

/* ---- write-behind round trip ---- */

typedef struct store {
    int n;
    char f[256][128];
    char v[256][128];
} store;

static void st_set(void *o, const char *f, size_t fl, const char *v, size_t vl)
{
    store *s = o;
    for (int i = 0; i < s->n; i++)
        if (!strncmp(s->f[i], f, fl) && s->f[i][fl] == 0) {
            snprintf(s->v[i], 128, "%.*s", (int)vl, v);
            return;
        }
    snprintf(s->f[s->n], 128, "%.*s", (int)fl, f);
    snprintf(s->v[s->n++], 128, "%.*s", (int)vl, v);
}

static void st_del(void *o, const char *f, size_t fl)
{
    store *s = o;
    for (int i = 0; i < s->n; i++)
        if (!strncmp(s->f[i], f, fl) && s->f[i][fl] == 0) {
            s->n--;
            memcpy(s->f[i], s->f[s->n], 128);
            memcpy(s->v[i], s->v[s->n], 128);
            return;
        }
}

Test(account, flush_then_load_restores_state_and_firing)
{
    pql_rules *r = h_rules(simple);
    pql_account *a = pql_account_new(r, "acme", 4);
    fired f = {0};
    store s = {0};
    usage(a, "signed_up", "u1", T0, &f);
    trait(a, "plan", pql_str("free", 4), T0, &f);
    trait(a, "seats", pql_num(3), T0, &f);
    for (int i = 0; i < 3; i++)
        usage(a, "login", "u1", T0 + i, &f);
    cr_assert_eq(f.n, 1);
    cr_assert(pql_account_dirty(a));
    pql_account_flush(a, st_set, st_del, &s);
    cr_assert_not(pql_account_dirty(a));
    trait(a, "seats", pql_null(), T0 + 5, &f); /* null deletes a trait */
    pql_account_flush(a, st_set, st_del, &s);

    pql_account *b = pql_account_new(r, "acme", 4);
    for (int i = 0; i < s.n; i++)
        cr_assert_eq(pql_account_load_field(b, s.f[i], strlen(s.f[i]), s.v[i], strlen(s.v[i])), 0,
                     "field %s", s.f[i]);
    cr_assert_not(pql_account_dirty(b));
    cr_assert_eq(pql_account_clock(b), T0 + 5);
    cr_assert_eq(pql_account_signal(b, 0).u.num, 3);
    unsigned seq;
    int isfired;
    pql_account_rule_state(b, 0, &seq, &isfired);
    cr_assert_eq(seq, 1);
    cr_assert_eq(isfired, 1);
    int has_seats = 0, has_plan = 0;
    for (int i = 0; i < s.n; i++) {
        has_seats |= !strcmp(s.f[i], "t:seats");
        has_plan |= !strcmp(s.f[i], "t:plan") && !strcmp(s.v[i], "sfree");
    }
    cr_assert_not(has_seats);
    cr_assert(has_plan);
    /* the restored account does not fire again */
    usage(b, "login", "u1", T0 + 10, &f);
    cr_assert_eq(f.n, 1);
    pql_account_destroy(a);
    pql_account_destroy(b);
    pql_rules_destroy(r);
}

/* A window no event touched since the last flush still expires when the
 * clock moves its reach: its old buckets are deleted at the next flush. */
Test(account, an_untouched_window_expires_when_the_clock_moves_on)
{
    pql_rules *r = h_rules("signals:\n"
                           "  logins: { count: login, window: 7d }\n"
                           "  views: { count: pricing_viewed, window: 7d }\n");
    pql_account *a = pql_account_new(r, "acme", 4);
    fired f = {0};
    store s = {0};
    usage(a, "login", "u1", T0, &f);
    pql_account_flush(a, st_set, st_del, &s);
    int logins = 0;
    for (int i = 0; i < s.n; i++)
        logins += !strncmp(s.f[i], "s:logins#", 9);
    cr_assert_eq(logins, 1, "the login's bucket is written");
    usage(a, "pricing_viewed", "u1", T0 + 3 * DAY, &f);
    pql_account_flush(a, st_set, st_del, &s);
    logins = 0;
    for (int i = 0; i < s.n; i++)
        logins += !strncmp(s.f[i], "s:logins#", 9);
    cr_assert_eq(logins, 1, "3 days on, the login is within 7 days");
    usage(a, "pricing_viewed", "u1", T0 + 10 * DAY, &f);
    pql_account_flush(a, st_set, st_del, &s);
    for (int i = 0; i < s.n; i++)
        cr_assert(strncmp(s.f[i], "s:logins#", 9), "10 days on, %s should be deleted", s.f[i]);
    pql_account_destroy(a);
    pql_rules_destroy(r);
}

/* A signal's value is kept while the clock stays in the same bucket, and
 * read again from the window the moment the clock enters the next one: the
 * last millisecond of a 7-day window still counts the first day's login,
 * the next one does not (and back in reach if the clock were earlier). */
Test(account, a_kept_signal_value_moves_on_exactly_at_the_bucket_boundary)
{
    pql_rules *r = h_rules("signals:\n"
                           "  logins: { count: login, window: 7d }\n"
                           "  hourly: { count: login, window: 2h }\n");
    pql_account *a = pql_account_new(r, "acme", 4);
    fired f = {0};
    int64_t day0 = T0 / DAY * DAY, hour0 = T0 / PQL_MS_HOUR * PQL_MS_HOUR;
    usage(a, "login", "u1", hour0, &f);
    cr_assert_eq(pql_account_signal(a, 0).u.num, 1);
    cr_assert_eq(pql_account_signal(a, 1).u.num, 1);
    /* hour buckets: in reach up to the last ms of the next hour */
    usage(a, "pricing_viewed", "u1", hour0 + 2 * PQL_MS_HOUR - 1, &f);
    cr_assert_eq(pql_account_signal(a, 1).u.num, 1);
    usage(a, "pricing_viewed", "u1", hour0 + 2 * PQL_MS_HOUR, &f);
    cr_assert_eq(pql_account_signal(a, 1).u.num, 0, "the 2h window moved past the login");
    /* day buckets: the login's day is in reach for 7 days, to the ms */
    usage(a, "pricing_viewed", "u1", day0 + 7 * DAY - 1, &f);
    cr_assert_eq(pql_account_signal(a, 0).u.num, 1);
    usage(a, "pricing_viewed", "u1", day0 + 7 * DAY, &f);
    cr_assert_eq(pql_account_signal(a, 0).u.num, 0, "the 7d window moved past the login");
    pql_account_destroy(a);
    pql_rules_destroy(r);
}

Test(account, fields_of_changed_signals_are_deleted_on_load)
{
    pql_rules *r = h_rules(simple);
    pql_account *a = pql_account_new(r, "acme", 4);
    store s = {0};
    cr_assert_eq(pql_account_load_field(a, "s:logins#deadbeef|19000", 23, "4", 1), 0);
    cr_assert(pql_account_dirty(a));
    snprintf(s.f[0], 128, "s:logins#deadbeef|19000");
    s.n = 1;
    pql_account_flush(a, st_set, st_del, &s);
    cr_assert_eq(s.n, 0);
    pql_account_destroy(a);
    pql_rules_destroy(r);
}

/* The weighted table of the product seeds: signed up 10, onboarding 20, core
 * feature 15, invited teammate 30, viewed pricing 25, hit usage limit 35;
 * MEDIUM at 70, HIGH at 90. */
static const char *weighted = "lifecycle: { signup: signed_up }\n"
                              "signals:\n"
                              "  signups:    { count: signed_up, window: lifetime }\n"
                              "  onboarded:  { count: onboarding_completed, window: lifetime }\n"
                              "  core:       { count: feature_used, window: 14d }\n"
                              "  invites:    { count: teammate_invited, window: 14d }\n"
                              "  pricing:    { count: pricing_viewed, window: 14d }\n"
                              "  limits:     { count: usage_limit_hit, window: 14d }\n"
                              "pql:\n"
                              "  - name: engagement\n"
                              "    model: weighted\n"
                              "    points:\n"
                              "      - { when: signups >= 1,   points: 10 }\n"
                              "      - { when: onboarded >= 1, points: 20 }\n"
                              "      - { when: core >= 1,      points: 15 }\n"
                              "      - { when: invites >= 1,   points: 30 }\n"
                              "      - { when: pricing >= 1,   points: 25 }\n"
                              "      - { when: limits >= 1,    points: 35 }\n"
                              "    tiers: { high: 90, medium: 70 }\n"
                              "    sla: { high: 4h, medium: 24h }\n";

Test(account, weighted_fires_at_the_lowest_tier_then_on_the_rise)
{
    pql_rules *r = h_rules(weighted);
    pql_account *a = pql_account_new(r, "acme", 4);
    fired f = {0};
    usage(a, "signed_up", "u1", T0, &f);                /* 10 */
    usage(a, "onboarding_completed", "u1", T0 + 1, &f); /* 30 */
    usage(a, "teammate_invited", "u1", T0 + 2, &f);     /* 60 */
    cr_assert_eq(f.n, 0, "below the medium tier: no alert");
    usage(a, "pricing_viewed", "u1", T0 + 3, &f); /* 85: MEDIUM */
    cr_assert_eq(f.n, 1);
    cr_assert_str_eq(f.model[0], "weighted");
    cr_assert_eq(f.has_score[0], 1);
    cr_assert_eq(f.score[0], 85);
    cr_assert_str_eq(f.tier[0], "MEDIUM");
    cr_assert_eq(f.has_sla[0], 1);
    cr_assert_eq(f.sla_in[0], 24 * PQL_MS_HOUR);
    cr_assert_str_eq(f.reason[0], "Score 85 (tier MEDIUM)");
    cr_assert_str_eq(f.reason2[0], "signups >= 1 (+10 points)");
    cr_assert_eq(f.nreasons[0], 5);
    char id[PQL_ALERT_ID_LEN + 1];
    pql_alert_id("acme", 4, "engagement", "1", id);
    cr_assert_str_eq(f.id[0], id);
    usage(a, "feature_used", "u1", T0 + 4, &f); /* 100: HIGH — the tier rose */
    cr_assert_eq(f.n, 2);
    cr_assert_eq(f.score[1], 100);
    cr_assert_str_eq(f.tier[1], "HIGH");
    cr_assert_eq(f.sla_in[1], 4 * PQL_MS_HOUR);
    pql_alert_id("acme", 4, "engagement", "1:HIGH", id);
    cr_assert_str_eq(f.id[1], id);
    usage(a, "usage_limit_hit", "u1", T0 + 5, &f); /* 135: still HIGH */
    cr_assert_eq(f.n, 2);
    pql_account_destroy(a);
    pql_rules_destroy(r);
}

static const char *logistic = "signals:\n"
                              "  core_uses: { count: feature_used, window: 7d }\n"
                              "  invites:   { count: teammate_invited, window: 14d }\n"
                              "pql:\n"
                              "  - name: propensity\n"
                              "    model: logistic\n"
                              "    intercept: -4.2\n"
                              "    weights: { core_uses: 0.30, invites: 0.80 }\n"
                              "    threshold: 0.6\n";

Test(account, logistic_fires_when_the_probability_crosses_the_threshold)
{
    pql_rules *r = h_rules(logistic);
    pql_account *a = pql_account_new(r, "acme", 4);
    fired f = {0};
    usage(a, "teammate_invited", "u1", T0, &f);
    for (int i = 0; i < 12; i++)
        usage(a, "feature_used", "u1", T0 + 1 + i, &f);
    cr_assert_eq(f.n, 0, "z = -4.2 + 3.6 + 0.8 = 0.2: p = 0.55 < 0.6");
    usage(a, "feature_used", "u1", T0 + 20, &f);
    cr_assert_eq(f.n, 1, "z = 0.5: p = 0.6225 >= 0.6");
    cr_assert_str_eq(f.model[0], "logistic");
    cr_assert_float_eq(f.score[0], 1.0 / (1.0 + exp(-0.5)), 1e-12);
    cr_assert_str_eq(f.tier[0], "");
    cr_assert_eq(f.has_sla[0], 0);
    cr_assert_str_eq(f.reason[0], "Propensity 62.2% (fires at 60%)");
    cr_assert_str_eq(f.reason2[0], "core_uses = 13 (weight 0.3)");
    pql_account_destroy(a);
    pql_rules_destroy(r);
}

Test(account, scored_rule_state_survives_flush_and_load)
{
    pql_rules *r = h_rules(weighted);
    pql_account *a = pql_account_new(r, "acme", 4);
    fired f = {0};
    store s = {0};
    usage(a, "signed_up", "u1", T0, &f);
    usage(a, "teammate_invited", "u1", T0 + 1, &f);
    usage(a, "pricing_viewed", "u1", T0 + 2, &f);
    usage(a, "onboarding_completed", "u1", T0 + 3, &f); /* 85: MEDIUM */
    cr_assert_eq(f.n, 1);
    pql_account_flush(a, st_set, st_del, &s);
    pql_account *b = pql_account_new(r, "acme", 4);
    for (int i = 0; i < s.n; i++)
        pql_account_load_field(b, s.f[i], strlen(s.f[i]), s.v[i], strlen(s.v[i]));
    usage(b, "feature_used", "u1", T0 + 4, &f); /* 100: HIGH rise, not a new MEDIUM */
    cr_assert_eq(f.n, 2);
    cr_assert_str_eq(f.tier[1], "HIGH");
    char id[PQL_ALERT_ID_LEN + 1];
    pql_alert_id("acme", 4, "engagement", "1:HIGH", id);
    cr_assert_str_eq(f.id[1], id);
    pql_account_destroy(a);
    pql_account_destroy(b);
    pql_rules_destroy(r);
}

Test(account, fit_gates_a_rule_on_traits)
{
    pql_rules *r =
        h_rules("traits: { employees: number, industry: string }\n"
                "signals:\n  logins: { count: login, window: 7d }\n"
                "pql:\n  - name: big\n    when: logins >= 1\n"
                "    fit: account.employees >= 50 and account.industry == \"fintech\"\n");
    pql_account *a = pql_account_new(r, "acme", 4);
    fired f = {0};
    trait(a, "employees", pql_num(80), T0, &f);
    usage(a, "login", "u1", T0 + 1, &f);
    cr_assert_eq(f.n, 0, "industry missing: null == \"fintech\" is false");
    trait(a, "industry", pql_str("fintech", 7), T0 + 2, &f);
    cr_assert_eq(f.n, 1, "the trait update makes it fit: fires on the update");
    cr_assert_eq(f.triggered_at[0], T0 + 2);
    pql_account_destroy(a);
    pql_rules_destroy(r);
}

/* Deleting a trait moves the last one into its place: rules must read the
 * moved trait's new value, not where it used to be. */
Test(account, a_trait_moved_by_a_deletion_is_read_where_it_is_now)
{
    pql_rules *r = h_rules("traits: { employees: number }\n"
                           "pql:\n  - name: big\n    when: account.employees >= 50\n");
    pql_account *a = pql_account_new(r, "acme", 4);
    fired f = {0};
    trait(a, "region", pql_str("emea", 4), T0, &f);
    trait(a, "employees", pql_num(10), T0 + 1, &f);
    cr_assert_eq(f.n, 0);
    trait(a, "region", pql_null(), T0 + 2, &f); /* employees moves to the first place */
    trait(a, "employees", pql_num(80), T0 + 3, &f);
    cr_assert_eq(f.n, 1, "80 employees after the move: fires");
    cr_assert_eq(f.triggered_at[0], T0 + 3);
    pql_account_destroy(a);
    pql_rules_destroy(r);
}

/* applies_to: paid means converted (the conversion event) or lifecycle.paid
 * holding on the traits; PQL rules (free by default) stop applying then. */
Test(account, paid_by_conversion_event_or_by_plan_trait)
{
    pql_rules *r = h_rules("lifecycle: { conversion: subscription_started, "
                           "paid: 'account.plan != \"free\"' }\n"
                           "traits: { plan: string }\n"
                           "signals:\n  logins: { count: login, window: 7d }\n"
                           "pql:\n  - name: lead\n    when: logins >= 2\n"
                           "expansion:\n  - name: grow\n    when: logins >= 2\n");
    /* by the plan trait */
    pql_account *a = pql_account_new(r, "acme", 4);
    fired f = {0};
    trait(a, "plan", pql_str("free", 4), T0, &f);
    usage(a, "login", "u1", T0 + 1, &f);
    usage(a, "login", "u1", T0 + 2, &f);
    cr_assert_eq(f.n, 1);
    cr_assert_str_eq(f.rule[0], "lead", "a free account gets the PQL rule only");
    trait(a, "plan", pql_str("team", 4), T0 + 3, &f);
    cr_assert_eq(f.n, 2, "the plan change makes it paid: the expansion rule fires at once");
    cr_assert_str_eq(f.rule[1], "grow");
    cr_assert_eq(f.triggered_at[1], T0 + 3);
    pql_account_destroy(a);

    /* by the conversion event, with no plan trait at all */
    a = pql_account_new(r, "acme", 4);
    memset(&f, 0, sizeof(f));
    usage(a, "subscription_started", "u1", T0, &f);
    usage(a, "login", "u1", T0 + 1, &f);
    usage(a, "login", "u1", T0 + 2, &f);
    cr_assert_eq(f.n, 1);
    cr_assert_str_eq(f.rule[0], "grow", "a converted account gets the expansion rule only");
    pql_account_destroy(a);
    pql_rules_destroy(r);
}

/* ---- traits: many, changed in type and length, deleted and set again ---- */

static void trait_key(int i, char *key, size_t size)
{
    /* keys of 8 to 40 bytes: some short, some past any small-size path */
    snprintf(key, size, "trait_%02d%.*s", i, i % 33, "_abcdefghijklmnopqrstuvwxyz012345");
}

/* Trait i's value after the story below: phase 0 sets it, phase 1 changes
 * three in four (to a number, a longer string, a deletion), phase 2 sets the
 * deleted ones again to a string. */
static pql_value trait_expected(int i, int phase, char *buf, size_t size)
{
    snprintf(buf, size, "value-%d-%.*s", i, i % 20, "xxxxxxxxxxxxxxxxxxxx");
    pql_value v = i % 3 == 0   ? pql_str(buf, strlen(buf))
                  : i % 3 == 1 ? pql_num(i * 1.5)
                               : pql_bool(i % 2);
    if (phase >= 1 && i % 4 == 0) v = pql_num(-i);
    if (phase >= 1 && i % 4 == 1) {
        snprintf(buf, size, "a longer value for %d: %.*s", i, i,
                 "yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy");
        v = pql_str(buf, strlen(buf));
    }
    if (phase == 1 && i % 4 == 2) v = pql_null();
    if (phase == 2 && i % 4 == 2) {
        snprintf(buf, size, "again %d", i);
        v = pql_str(buf, strlen(buf));
    }
    return v;
}

static int value_eq(pql_value x, pql_value y)
{
    if (x.type != y.type) return 0;
    if (x.type == PQL_V_NUM) return x.u.num == y.u.num;
    if (x.type == PQL_V_BOOL) return x.u.b == y.u.b;
    if (x.type == PQL_V_STR)
        return x.u.str.len == y.u.str.len && !memcmp(x.u.str.ptr, y.u.str.ptr, x.u.str.len) &&
               x.u.str.ptr[x.u.str.len] == '\0';
    return 1;
}

/* Checks that account a holds exactly the traits of the story at `phase`. */
static void assert_traits(pql_account *a, int n, int phase)
{
    char key[64], buf[128];
    size_t held = 0;
    for (int i = 0; i < n; i++) {
        trait_key(i, key, sizeof key);
        pql_value want = trait_expected(i, phase, buf, sizeof buf), got = pql_null();
        for (size_t k = 0; k < pql_account_ntraits(a); k++) {
            pql_value v;
            const char *name = pql_account_trait(a, k, &v);
            if (!strcmp(name, key)) got = v;
        }
        cr_assert(value_eq(got, want), "trait %s at phase %d", key, phase);
        held += want.type != PQL_V_NULL;
    }
    cr_assert_eq(pql_account_ntraits(a), held);
}

Test(account, many_traits_set_changed_deleted_and_set_again_survive_flush_and_load)
{
    enum { N = 40 };
    pql_rules *r = h_rules(simple);
    pql_account *a = pql_account_new(r, "acme", 4);
    fired f = {0};
    static store s; /* 256 fields of 128 bytes: too large for the stack */
    memset(&s, 0, sizeof s);
    char key[64], buf[128];
    for (int phase = 0; phase < 3; phase++) {
        for (int i = 0; i < N; i++) {
            trait_key(i, key, sizeof key);
            /* unchanged values are set again too: that changes nothing */
            trait(a, key, trait_expected(i, phase, buf, sizeof buf), T0 + phase, &f);
        }
        assert_traits(a, N, phase);
        pql_account_flush(a, st_set, st_del, &s);
        cr_assert_not(pql_account_dirty(a));
    }
    int ntrait_fields = 0;
    for (int i = 0; i < s.n; i++)
        ntrait_fields += !strncmp(s.f[i], "t:", 2);
    cr_assert_eq(ntrait_fields, (int)pql_account_ntraits(a), "deleted traits are deleted");

    pql_account *b = pql_account_new(r, "acme", 4);
    for (int i = 0; i < s.n; i++)
        cr_assert_eq(pql_account_load_field(b, s.f[i], strlen(s.f[i]), s.v[i], strlen(s.v[i])), 0,
                     "field %s", s.f[i]);
    assert_traits(b, N, 2);
    cr_assert_not(pql_account_dirty(b));
    /* written again from the loaded account, every trait reads the same */
    trait(b, "extra", pql_num(1), T0 + 3, &f); /* makes b dirty: flush writes only it */
    static store s2;
    memset(&s2, 0, sizeof s2);
    pql_account_flush(b, st_set, st_del, &s2);
    cr_assert_eq(s2.n, 2, "the clock and the new trait");
    pql_account_destroy(a);
    pql_account_destroy(b);
    pql_rules_destroy(r);
}

/* A rule that never fired has no tier (-1; 0 is PQL_TIER_HIGH), in a new
 * account and in one loaded from a stored state written before it fired. */
Test(account, a_rule_that_never_fired_has_no_tier)
{
    pql_rules *r = h_rules("version: 1\n"
                           "signals:\n"
                           "  logins: { count: login, window: 7d }\n"
                           "pql:\n"
                           "  - name: steady\n"
                           "    when: logins >= 2\n"
                           "    held_for: 1d\n");
    pql_account *a = pql_account_new(r, "acme", 4);
    pql_rule_view v;
    pql_account_rule_view(a, 0, &v);
    cr_assert_eq(v.fired_tier, -1);
    fired f = {0};
    usage(a, "login", "u1", T0, &f);
    usage(a, "login", "u1", T0 + 1, &f); /* holds from now: the state is written, no alert */
    cr_assert_eq(f.n, 0);
    static store s;
    memset(&s, 0, sizeof s);
    pql_account_flush(a, st_set, st_del, &s);
    int rule_fields = 0;
    for (int i = 0; i < s.n; i++)
        rule_fields += !strcmp(s.f[i], "r:steady");
    cr_assert_eq(rule_fields, 1, "the held state is stored");
    pql_account *b = pql_account_new(r, "acme", 4);
    for (int i = 0; i < s.n; i++)
        cr_assert_eq(pql_account_load_field(b, s.f[i], strlen(s.f[i]), s.v[i], strlen(s.v[i])), 0);
    pql_account_rule_view(b, 0, &v);
    cr_assert_eq(v.fired_tier, -1);
    cr_assert_eq(v.fired, 0);
    pql_account_destroy(a);
    pql_account_destroy(b);
    pql_rules_destroy(r);
}
