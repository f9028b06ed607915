/* test_explain.c — `rules explain`'s core: an account built by applying
 * events, explained as JSON and as text, asserted exactly.  (The Redis edge,
 * pql_explain_fetch and the CLI, is covered in test_cli.) */
#include "account.h"
#include "explain.h"
#include "harness.h"

#include <criterion/criterion.h>
#include <math.h>
#include <string.h>

#define T0   1793491200000LL /* 2026-11-01 00:00 UTC */
#define HOUR 3600000LL

static const char *yaml = "version: 4\n"
                          "lifecycle: { signup: signed_up, conversion: paid }\n"
                          "traits: { seats: number, employees: number }\n"
                          "signals:\n"
                          "  logins:  { count: login, window: 7d }\n"
                          "  invites: { count: teammate_invited, window: 14d }\n"
                          "  users:   { distinct: user_id, of: '*', window: 30d }\n"
                          "pql:\n"
                          "  - name: team\n"
                          "    when: logins >= 3 and invites >= 1\n"
                          "  - name: engaged\n"
                          "    model: weighted\n"
                          "    points:\n"
                          "      - { when: logins >= 1, points: 40 }\n"
                          "      - { when: invites >= 1, points: 40 }\n"
                          "    tiers: { high: 80, medium: 40 }\n"
                          "  - name: likely\n"
                          "    model: logistic\n"
                          "    intercept: -2\n"
                          "    weights: { logins: 0.5, 'log1p(invites)': 1 }\n"
                          "    threshold: 0.6\n"
                          "  - name: big\n"
                          "    when: logins >= 1\n"
                          "    fit: account.employees >= 50\n"
                          "expansion:\n"
                          "  - name: seats\n"
                          "    when: users >= account.seats\n"
                          "    held_for: 2d\n"
                          "    applies_to: all\n";

static void no_alert(void *opaque, const pql_alert *a)
{
    (void)a;
    (*(int *)opaque)++;
}

static void apply(pql_account *a, int kind, const char *event, const char *user, int64_t ts,
                  pql_prop *props, size_t nprops, int *alerts)
{
    pql_event ev = {0};
    ev.kind = kind;
    ev.account_id = "acme";
    ev.account_id_len = 4;
    ev.event = event;
    ev.event_len = event ? strlen(event) : 0;
    ev.event_id = "e";
    ev.event_id_len = 1;
    ev.user_id = user;
    ev.user_id_len = user ? strlen(user) : 0;
    ev.timestamp = ts;
    ev.props = props;
    ev.nprops = nprops;
    pql_account_apply(a, &ev, 0, no_alert, alerts);
}

static pql_account *scripted(pql_rules **rp, int *alerts)
{
    pql_rules *r = h_rules(yaml);
    pql_account *a = pql_account_new(r, "acme", 4);
    pql_prop traits[] = {{"seats", 5, pql_num(2)}, {"employees", 9, pql_num(10)}};
    apply(a, PQL_INPUT_ACCOUNT, NULL, NULL, T0, traits, 2, alerts);
    apply(a, PQL_INPUT_USAGE, "signed_up", "u1", T0, NULL, 0, alerts);
    apply(a, PQL_INPUT_USAGE, "login", "u1", T0 + HOUR, NULL, 0, alerts);
    apply(a, PQL_INPUT_USAGE, "login", "u2", T0 + 2 * HOUR, NULL, 0, alerts);
    *rp = r;
    return a;
}

static json_t *rule_of(json_t *doc, const char *name)
{
    size_t i;
    json_t *r;
    json_array_foreach(json_object_get(doc, "rules"), i, r)
    {
        if (!strcmp(json_string_value(json_object_get(r, "name")), name)) return r;
    }
    cr_assert_fail("no rule %s", name);
    return NULL;
}

Test(explain, json_document)
{
    pql_rules *r;
    int alerts = 0;
    pql_account *a = scripted(&r, &alerts);
    cr_assert_eq(alerts, 1, "only `engaged` fired (MEDIUM at 40 points)");
    json_t *doc = pql_explain_json(a, r);

    cr_assert_str_eq(json_string_value(json_object_get(doc, "account_id")), "acme");
    cr_assert_str_eq(json_string_value(json_object_get(doc, "ruleset_version")), "4");
    cr_assert_eq(json_integer_value(json_object_get(doc, "clock")), T0 + 2 * HOUR);
    cr_assert_eq(json_integer_value(json_object_get(doc, "signed_up_at")), T0);
    cr_assert(json_is_null(json_object_get(doc, "converted_at")));
    cr_assert_eq(json_integer_value(json_object_get(doc, "qualified_at")), T0 + HOUR);
    cr_assert_str_eq(json_string_value(json_object_get(doc, "qualified_by")), "engaged");
    cr_assert(json_is_false(json_object_get(doc, "paid")));
    cr_assert_eq(json_number_value(json_object_get(json_object_get(doc, "signals"), "logins")), 2);
    cr_assert_eq(json_number_value(json_object_get(json_object_get(doc, "traits"), "seats")), 2);

    json_t *team = rule_of(doc, "team");
    cr_assert(json_is_false(json_object_get(team, "holds")));
    cr_assert_str_eq(json_string_value(json_object_get(team, "state")), "ARMED");
    json_t *conds = json_object_get(team, "conditions");
    cr_assert_eq(json_array_size(conds), 2);
    cr_assert_str_eq(json_string_value(json_object_get(json_array_get(conds, 0), "text")),
                     "logins >= 3");
    cr_assert(json_is_false(json_object_get(json_array_get(conds, 0), "holds")));
    cr_assert_str_eq(json_string_value(json_object_get(team, "verdict")),
                     "does not hold: logins >= 3, invites >= 1");

    json_t *eng = rule_of(doc, "engaged");
    cr_assert_eq(json_number_value(json_object_get(eng, "score")), 40);
    cr_assert_str_eq(json_string_value(json_object_get(eng, "tier")), "MEDIUM");
    cr_assert_str_eq(json_string_value(json_object_get(eng, "state")), "FIRED");
    cr_assert_eq(json_integer_value(json_object_get(eng, "fired_count")), 1);
    cr_assert_eq(json_integer_value(json_object_get(eng, "last_fired_at")), T0 + HOUR);

    json_t *likely = rule_of(doc, "likely");
    double z = -2 + 0.5 * 2 + 0; /* log1p(0) = 0 */
    cr_assert_float_eq(json_number_value(json_object_get(likely, "score")), 1 / (1 + exp(-z)),
                       1e-12);
    cr_assert_str_eq(json_string_value(json_object_get(likely, "verdict")),
                     "probability 26.9% is below the threshold 60%");

    json_t *big = rule_of(doc, "big");
    cr_assert(json_is_false(json_object_get(big, "fit")));
    cr_assert(json_is_false(json_object_get(big, "applies")));
    cr_assert_str_eq(json_string_value(json_object_get(big, "verdict")),
                     "does not apply: the account does not fit");

    json_t *seats = rule_of(doc, "seats");
    cr_assert(json_is_true(json_object_get(seats, "holds")));
    cr_assert_eq(json_integer_value(json_object_get(seats, "held_since")), T0 + 2 * HOUR);
    json_decref(doc);

    /* a day later the expansion rule is still waiting; after 2 days it fires */
    apply(a, PQL_INPUT_USAGE, "login", "u1", T0 + 26 * HOUR, NULL, 0, &alerts);
    doc = pql_explain_json(a, r);
    cr_assert_str_eq(json_string_value(json_object_get(rule_of(doc, "seats"), "verdict")),
                     "holds for 1 day so far; must hold for 2 days: fires on an event at or "
                     "after 2026-11-03 02:00 UTC if it still holds");
    json_decref(doc);
    apply(a, PQL_INPUT_USAGE, "login", "u1", T0 + 50 * HOUR, NULL, 0, &alerts);
    doc = pql_explain_json(a, r);
    cr_assert_str_eq(json_string_value(json_object_get(rule_of(doc, "seats"), "verdict")),
                     "fired (1 time, last for an event at 2026-11-03 02:00 UTC); re-arms when its "
                     "condition stops holding");
    json_decref(doc);
    pql_account_destroy(a);
    pql_rules_destroy(r);
}

Test(explain, text_for_a_person)
{
    pql_rules *r;
    int alerts = 0;
    pql_account *a = scripted(&r, &alerts);
    json_t *doc = pql_explain_json(a, r);
    pql_buf out = {0};
    pql_explain_text(doc, "group g, partition 1", &out);
    const char *want =
        "Account acme (group g, partition 1, rule set version 4)\n"
        "  latest event           2026-11-01 02:00 UTC   (rules are evaluated at this event "
        "time)\n"
        "  signed up              2026-11-01 00:00 UTC\n"
        "  converted              -\n"
        "  qualified (first PQL)  2026-11-01 01:00 UTC by engaged\n"
        "  counts as              free\n"
        "\n"
        "Traits\n"
        "  seats      2\n"
        "  employees  10\n"
        "\n"
        "Signals\n"
        "  logins   2\n"
        "  invites  0\n"
        "  users    2\n"
        "\n"
        "Rules\n"
        "  team (PQL, threshold, for free accounts)\n"
        "    → does not hold: logins >= 3, invites >= 1\n"
        "      ✗ logins >= 3\n"
        "      ✗ invites >= 1\n"
        "  engaged (PQL, weighted, for free accounts): score 40, tier MEDIUM\n"
        "    → fired (1 time, last for an event at 2026-11-01 01:00 UTC); re-arms when its "
        "condition stops holding\n"
        "      ✓ +40 points  logins >= 1\n"
        "      ✗ +40 points  invites >= 1\n"
        "  likely (PQL, logistic, for free accounts): probability 26.9%\n"
        "    → probability 26.9% is below the threshold 60%\n"
        "      logins = 2  (weight 0.5)\n"
        "      log1p(invites) = 0  (weight 1)\n"
        "  big (PQL, threshold, for free accounts)\n"
        "    → does not apply: the account does not fit\n"
        "      ✗ fit\n"
        "      ✓ logins >= 1\n"
        "  seats (EXPANSION, threshold, for all accounts)\n"
        "    → holds for 0 seconds so far; must hold for 2 days: fires on an event at or after "
        "2026-11-03 02:00 UTC if it still holds\n"
        "      ✓ users >= account.seats\n";
    cr_assert_str_eq(out.data, want);
    pql_buf_free(&out);
    json_decref(doc);
    pql_account_destroy(a);
    pql_rules_destroy(r);
}
