/* test_rules.c — loading rule files: the shipped set, and every error a rule
 * author can make, reported with file:line:col. */
#include "harness.h"
#include "rules.h"

#include <criterion/criterion.h>
#include <string.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static pql_rules *load(const char *yaml, pql_buf *errors)
{
    return pql_rules_load_string(yaml, "t.yaml", errors);
}

static void expect_error(const char *yaml, const char *needle)
{
    pql_buf errors = {0};
    pql_rules *r = load(yaml, &errors);
    cr_assert_null(r, "expected the rule set to be refused");
    cr_assert_not_null(errors.data);
    cr_assert(strstr(errors.data, needle), "expected '%s' in:\n%s", needle, errors.data);
    pql_buf_free(&errors);
}

Test(rules, shipped_rule_set_loads)
{
    pql_buf errors = {0};
    pql_rules *r = pql_rules_load(PQL_SOURCE_DIR "/rules", &errors);
    cr_assert_not_null(r, "%s", errors.data ? errors.data : "");
    cr_assert_str_eq(pql_rules_version(r), "1+1"); /* expansion.yaml + pql.yaml */
    cr_assert_eq(pql_rules_nsignals(r), 11);
    cr_assert_eq(pql_rules_nrules(r), 7);
    cr_assert_str_eq(pql_rules_signup_event(r), "signed_up");
    cr_assert_str_eq(pql_rules_conversion_event(r), "subscription_started");
    const pql_rule *seat =
        pql_rules_rule(r, (size_t)pql_rules_rule_by_name(r, "seat-saturation-80", 18));
    cr_assert_eq(seat->kind, PQL_ALERT_EXPANSION);
    cr_assert_eq(seat->applies_to, PQL_APPLIES_PAID);
    cr_assert_eq(seat->cooldown_ms, 14 * PQL_MS_DAY);
    cr_assert_not_null(seat->clear);
    cr_assert_eq(pql_rules_max_window(r), 30 * PQL_MS_DAY);
    pql_rules_destroy(r);
    pql_buf_free(&errors);
}

Test(rules, signal_key_changes_with_definition)
{
    pql_buf e = {0};
    pql_rules *a = load("signals: { x: { count: login, window: 7d } }\npql: []\n", &e);
    pql_rules *b = load("signals: { x: { count: login, window: 14d } }\npql: []\n", &e);
    pql_rules *c = load("signals: { x: { count: login, window: 7d } }\npql: []\n", &e);
    cr_assert(a && b && c, "%s", e.data ? e.data : "");
    cr_assert_str_neq(pql_rules_signal(a, 0)->key, pql_rules_signal(b, 0)->key);
    cr_assert_str_eq(pql_rules_signal(a, 0)->key, pql_rules_signal(c, 0)->key);
    cr_assert(strncmp(pql_rules_signal(a, 0)->key, "x#", 2) == 0);
    pql_rules_destroy(a);
    pql_rules_destroy(b);
    pql_rules_destroy(c);
    pql_buf_free(&e);
}

Test(rules, unknown_signal_with_did_you_mean_and_position)
{
    expect_error(
        "signals:\n  core_uses: { count: feature_used, window: 7d }\n"
        "pql:\n  - name: a\n    when: core_use >= 5\n",
        "t.yaml:5:11: error: in when: unknown signal 'core_use' (did you mean 'core_uses'?)");
}

Test(rules, position_inside_quoted_expression)
{
    expect_error("signals:\n  n: { count: x, window: 7d }\n"
                 "pql:\n  - name: a\n    when: 'n >= 1 and bogus'\n",
                 "t.yaml:5:23: error: in when: unknown signal 'bogus'");
}

Test(rules, syntax_error_in_yaml_has_position)
{
    expect_error("signals: { a: [1, 2\n", "t.yaml:");
}

Test(rules, bad_window_and_aggregate)
{
    expect_error("signals:\n  a: { count: x, window: 7 days }\n",
                 "t.yaml:2:26: error: window '7 days' is not a duration");
    expect_error("signals:\n  a: { count: x, sum: properties.y, window: 7d }\n",
                 "needs exactly one of count");
    expect_error("signals:\n  a: { sum: user_id, window: 7d }\n",
                 "cannot aggregate 'user_id' — use properties.<key>");
    expect_error("signals:\n  a: { count: x }\n", "signal 'a' needs a window");
}

Test(rules, unknown_keys_suggest)
{
    expect_error("signals:\n  a: { count: x, windw: 7d, window: 7d }\n",
                 "t.yaml:2:18: error: unknown key 'windw' in a signal (did you mean 'window'?)");
    expect_error("pql:\n  - name: r\n    when: 1 > 0\n    cooldwn: 1d\n",
                 "unknown key 'cooldwn' in a rule (did you mean 'cooldown'?)");
}

Test(rules, duplicates_and_missing_parts)
{
    expect_error("pql:\n  - name: r\n    when: 1 > 0\n  - name: r\n    when: 1 > 0\n",
                 "rule 'r' is declared twice");
    expect_error("pql:\n  - name: r\n", "rule 'r' needs a 'when' condition");
    expect_error("pql:\n  - when: 1 > 0\n", "every rule needs a name");
}

Test(rules, where_filter_cannot_read_signals)
{
    expect_error(
        "signals:\n  a: { count: x, window: 7d }\n  b: { count: y, where: 'a > 1', window: 7d }\n",
        "a where filter reads the event, not signals");
}

Test(rules, type_error_is_caught)
{
    expect_error(
        "signals:\n  a: { count: x, window: 7d }\npql:\n  - name: r\n    when: a == \"x\"\n",
        "t.yaml:5:11: error: in when:");
}

Test(rules, all_errors_reported_not_just_first)
{
    pql_buf errors = {0};
    pql_rules *r =
        load("signals:\n  a: { count: x, window: nope }\npql:\n  - name: r\n    when: zz > 1\n",
             &errors);
    cr_assert_null(r);
    cr_assert(strstr(errors.data, "window 'nope'"));
    cr_assert(strstr(errors.data, "unknown signal 'zz'"));
    pql_buf_free(&errors);
}

Test(rules, scored_models_are_validated)
{
    const char *sig = "signals:\n  a: { count: x, window: 7d }\n";
    char y[1024];
    snprintf(y, sizeof(y),
             "%spql:\n  - name: w\n    model: weighted\n"
             "    points: [ { when: a >= 1, points: 30 }, { when: a >= 2, points: 40 } ]\n"
             "    tiers: { high: 90, medium: 70 }\n",
             sig);
    expect_error(y, "tier high (90) is unreachable: the points add up to at most 70");
    snprintf(y, sizeof(y),
             "%spql:\n  - name: w\n    model: weighted\n"
             "    points: [ { when: a >= 1, points: 30 } ]\n",
             sig);
    expect_error(y, "weighted rule 'w' needs tiers");
    snprintf(y, sizeof(y),
             "%spql:\n  - name: w\n    model: weighted\n    when: a > 1\n"
             "    points: [ { when: a >= 1, points: 30 } ]\n    tiers: { medium: 20 }\n",
             sig);
    expect_error(y, "t.yaml:6:5: error: 'when' is not part of a weighted rule");
    snprintf(y, sizeof(y),
             "%spql:\n  - name: w\n    model: weighted\n"
             "    points: [ { when: a >= 1, points: 30 } ]\n    tiers: { medium: 20, high: 10 }\n",
             sig);
    expect_error(y, "tiers must decrease from high to low");
    snprintf(y, sizeof(y),
             "%spql:\n  - name: w\n    model: weighted\n"
             "    points: [ { when: a >= 1, points: 30 } ]\n    tiers: { medium: 20 }\n"
             "    sla: { high: 4h }\n",
             sig);
    expect_error(y, "sla for tier 'high', which the rule's tiers do not define");
    snprintf(y, sizeof(y),
             "%spql:\n  - name: l\n    model: logistic\n"
             "    weights: { a: 0.5 }\n    threshold: 1.5\n",
             sig);
    expect_error(y, "threshold 1.5 must be a probability between 0 and 1");
    snprintf(y, sizeof(y),
             "%spql:\n  - name: l\n    model: logistic\n"
             "    weights: { 'log1p(b)': 0.5 }\n    threshold: 0.5\n",
             sig);
    expect_error(y, "unknown signal 'b'");
    snprintf(y, sizeof(y), "%spql:\n  - name: l\n    model: logistic\n    threshold: 0.5\n", sig);
    expect_error(y, "logistic rule 'l' needs weights");
}

Test(rules, logistic_terms_may_be_expressions)
{
    pql_buf e = {0};
    pql_rules *r = load("signals:\n  a: { count: x, window: 7d }\n  b: { count: y, window: 7d }\n"
                        "pql:\n  - name: l\n    model: logistic\n    intercept: -1\n"
                        "    weights: { 'log1p(a)': 0.5, b: 2 }\n    threshold: 0.5\n"
                        "    tiers: { high: 0.9 }\n",
                        &e);
    cr_assert_not_null(r, "%s", e.data ? e.data : "");
    const pql_rule *l = pql_rules_rule(r, 0);
    cr_assert_eq(l->model, PQL_MODEL_LOGISTIC);
    cr_assert_eq(l->nterms, 2);
    cr_assert_str_eq(l->term_src[0], "log1p(a)");
    cr_assert_eq(l->weights[1], 2);
    cr_assert_eq(l->intercept, -1);
    cr_assert_eq(l->tier_min[PQL_TIER_HIGH], 0.9);
    cr_assert_eq(l->nsignals, 2, "both signals are in the alert's signals map");
    pql_rules_destroy(r);
    pql_buf_free(&e);
}

Test(rules, traits_are_declared_with_types)
{
    const char *head = "traits: { seats: number, plan: string, trial: bool }\n"
                       "signals:\n  users: { distinct: user_id, window: 30d }\n"
                       "expansion:\n  - name: r\n";
    char yaml[512];
    /* a typo gets a did-you-mean with the position of the name */
    snprintf(yaml, sizeof yaml, "%s    when: users >= account.seets\n", head);
    expect_error(yaml, "t.yaml:6:20: error: in when: unknown trait 'account.seets' (did you mean "
                       "'account.seats'?)");
    /* an undeclared one says how to declare it */
    snprintf(yaml, sizeof yaml, "%s    fit: account.employees >= 50\n    when: users >= 1\n", head);
    expect_error(yaml, "t.yaml:6:10: error: in fit: unknown trait 'account.employees' — declare "
                       "the traits rules read under 'traits:'");
    /* the declared type is checked: a string trait compared with a number */
    snprintf(yaml, sizeof yaml, "%s    when: account.plan > 5\n", head);
    expect_error(yaml, "t.yaml:6:11: error: in when: cannot compare a string (account.plan) with "
                       "a number (5)");
    snprintf(yaml, sizeof yaml, "%s    when: users / account.plan >= 0.8\n", head);
    expect_error(yaml, "expects a number but found a string (account.plan)");
    snprintf(yaml, sizeof yaml, "%s    when: account.trial == \"yes\"\n", head);
    expect_error(yaml, "cannot compare a boolean (account.trial) with a string");
    /* a bad type name */
    expect_error("traits: { seats: numbr }\n",
                 "t.yaml:1:18: error: trait 'seats' has type 'numbr': use number, string or bool "
                 "(did you mean 'number'?)");
    expect_error("traits: [seats]\n", "t.yaml:1:10: error: traits must be a mapping");
}

Test(rules, traits_merge_across_files_and_conflicts_are_refused)
{
    pql_buf errors = {0};
    char *dir = strdup("/tmp/pqlrules-XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    char path[512];
    snprintf(path, sizeof path, "%s/a.yaml", dir);
    h_write_file(path,
                 "traits: { seats: number }\nsignals:\n  u: { distinct: user_id, window: 30d }\n");
    snprintf(path, sizeof path, "%s/b.yaml", dir);
    h_write_file(path, "traits: { plan: string }\nexpansion:\n  - name: r\n"
                       "    when: 'u >= account.seats and account.plan == \"team\"'\n");
    pql_rules *r = pql_rules_load(dir, &errors);
    cr_assert_not_null(r, "%s", errors.data ? errors.data : "");
    cr_assert_eq(pql_rules_ntraits(r), 2);
    pql_rules_destroy(r);

    h_write_file(path, "traits: { seats: string }\n");
    cr_assert_null(pql_rules_load(dir, &errors));
    cr_assert(strstr(errors.data, "b.yaml:1:11: error: trait 'seats' is declared twice with "
                                  "different types"),
              "%s", errors.data);
    pql_buf_free(&errors);
    remove(path);
    snprintf(path, sizeof path, "%s/a.yaml", dir);
    remove(path);
    rmdir(dir);
    free(dir);
}

Test(rules, held_for_longer_than_a_window_is_refused)
{
    expect_error("signals:\n  calls: { sum: properties.n, of: api, window: 7d }\n"
                 "expansion:\n  - name: r\n    when: calls >= 100\n    held_for: 14d\n",
                 "t.yaml:6:15: error: held_for 14d is longer than the window (7 days) of signal "
                 "'calls' that the rule reads: lengthen the window or shorten held_for");
    /* lifetime signals and a window at least as long are fine */
    pql_buf errors = {0};
    pql_rules *r = load("signals:\n  calls: { sum: properties.n, of: api, window: 30d }\n"
                        "  ever: { count: x, window: lifetime }\n"
                        "expansion:\n  - name: r\n    when: calls >= 100 and ever >= 1\n"
                        "    held_for: 14d\n",
                        &errors);
    cr_assert_not_null(r, "%s", errors.data ? errors.data : "");
    pql_rules_destroy(r);
    pql_buf_free(&errors);
}

Test(rules, since_signup_and_duration_literals)
{
    pql_buf errors = {0};
    pql_rules *r = load("lifecycle: { signup: signed_up }\n"
                        "signals:\n  m: { count: meeting_scheduled, window: 14d }\n"
                        "pql:\n  - name: r\n    when: m >= 5 and since_signup <= 14d\n"
                        "    reasons: ['Signed up {duration(since_signup)} ago']\n",
                        &errors);
    cr_assert_not_null(r, "%s", errors.data ? errors.data : "");
    pql_rules_destroy(r);
    expect_error("signals:\n  m: { count: x, window: 14d }\n"
                 "pql:\n  - name: r\n    when: since_signup <= \"14d\"\n",
                 "cannot compare a number (since_signup) with a string");
    pql_buf_free(&errors);
}
