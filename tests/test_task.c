/* test_task.c — the task's batch building (pure: no Kafka, no Redis). */
#include "harness.h"
#include "task.h"

#include <criterion/criterion.h>
#include <string.h>

#define TTL_MS (64LL * 1000 * 1000) /* ttl/64 = 1,000,000 ms */

static pql_task *running_task(void)
{
    pql_task *t = pql_task_new(3, 1);
    cr_assert_not_null(t);
    pql_claim claim = {.epoch = 1, .seq = 0, .offsets = {-1, -1}};
    pql_task_claimed(t, &claim);
    return t;
}

/* Applies a login by `user` (NULL: none) at event time 1700000000000 +
 * offset, at input offset `offset`. */
static void visit(pql_task *t, pql_account *a, const char *user, int64_t offset)
{
    pql_event ev = {0};
    size_t len;
    ev.kind = PQL_INPUT_USAGE;
    ev.account_id = pql_account_id(a, &len);
    ev.account_id_len = len;
    ev.user_id = user;
    ev.user_id_len = user ? strlen(user) : 0;
    ev.event = "login";
    ev.event_len = 5;
    ev.event_id = "e";
    ev.event_id_len = 1;
    ev.timestamp = 1700000000000LL + offset;
    pql_task_apply(t, a, &ev, PQL_TOPIC_USAGE, offset, 1700000000000LL, 1);
}

static void login(pql_task *t, pql_account *a, int64_t offset)
{
    visit(t, a, NULL, offset);
}

/* The expiry of an account's hash is set at its first write by this process,
 * then only once ttl/64 has passed: Redis does not run a PEXPIRE per account
 * per batch. */
Test(task, account_expiry_is_refreshed_once_per_ttl_64th)
{
    pql_rules *rules = h_rules("version: 1\n"
                               "signals:\n"
                               "  logins: { count: login, window: 7d }\n"
                               "pql:\n"
                               "  - name: busy\n"
                               "    when: logins >= 1000\n");
    pql_task *t = running_task();
    pql_account *a = pql_account_new(rules, "acme", 4);
    cr_assert_not_null(a);
    pql_task_adopt(t, a);
    cr_assert_eq(pql_account_ttl_set_at(a), 0, "a new account's expiry was never set");
    const char *topics[PQL_NTOPICS] = {"usage", "accounts"};

    int64_t t0 = 5000000;
    login(t, a, 0);
    cr_assert(pql_task_build_batch(t, "g", topics, TTL_MS, t0));
    cr_assert_eq(pql_account_ttl_set_at(a), t0, "the first write sets the expiry");
    pql_task_committed(t);

    login(t, a, 1);
    cr_assert(pql_task_build_batch(t, "g", topics, TTL_MS, t0 + TTL_MS / 64 - 1));
    cr_assert_eq(pql_account_ttl_set_at(a), t0, "within ttl/64 the expiry is left alone");
    pql_task_committed(t);

    login(t, a, 2);
    cr_assert(pql_task_build_batch(t, "g", topics, TTL_MS, t0 + TTL_MS / 64));
    cr_assert_eq(pql_account_ttl_set_at(a), t0 + TTL_MS / 64, "after ttl/64 it is set again");
    pql_task_committed(t);

    login(t, a, 3);
    cr_assert(pql_task_build_batch(t, "g", topics, 0, t0 + TTL_MS));
    cr_assert_eq(pql_account_ttl_set_at(a), t0 + TTL_MS / 64, "no TTL configured: never set");

    pql_task_destroy(t);
    pql_rules_destroy(rules);
}

/* What a batch adds to its accounts is counted at its build, and trimming to
 * a byte budget spares the batch not yet committed, then evicts the least
 * recently used down to the budget. */
Test(task, trim_keeps_the_cache_under_a_byte_budget_but_spares_the_batch_in_flight)
{
    pql_rules *rules = h_rules("version: 1\n"
                               "signals:\n"
                               "  users: { distinct: user_id, of: \"*\", window: 30d }\n");
    pql_task *t = running_task();
    const char *topics[PQL_NTOPICS] = {"usage", "accounts"};
    pql_account *a[40];
    int64_t off = 0;
    char id[16], user[16];
    for (int i = 0; i < 40; i++) {
        int n = snprintf(id, sizeof id, "acct-%02d", i);
        pql_task_adopt(t, a[i] = pql_account_new(rules, id, (size_t)n));
    }
    size_t empty = pql_cache_bytes(t->cache);
    for (int i = 0; i < 40; i++) /* acct-39 is the most recent */
        for (int u = 0; u < 10; u++) {
            snprintf(user, sizeof user, "u%d", u);
            visit(t, a[i], user, off++);
        }
    cr_assert_eq(pql_cache_bytes(t->cache), empty, "not counted before the build");
    cr_assert(pql_task_build_batch(t, "g", topics, TTL_MS, 5000000));
    size_t full = pql_cache_bytes(t->cache);
    cr_assert_gt(full, empty + 40 * 10 * 24, "ten members each: %zu -> %zu", empty, full);

    pql_task_trim(t, SIZE_MAX, full / 4);
    cr_assert_eq(pql_cache_count(t->cache), 40, "the batch in flight stays");
    pql_task_committed(t);
    visit(t, a[39], "u10", off++); /* the next batch: acct-39 alone */
    cr_assert(pql_task_build_batch(t, "g", topics, TTL_MS, 5000001));
    pql_task_trim(t, SIZE_MAX, full / 4);
    size_t left = pql_cache_count(t->cache);
    cr_assert_leq(pql_cache_bytes(t->cache), full / 4);
    cr_assert(left >= 9 && left <= 10, "a quarter of 40 about equal accounts: %zu", left);
    for (int i = 0; i < 40; i++) {
        snprintf(id, sizeof id, "acct-%02d", i);
        cr_assert_eq(pql_task_account(t, id, 7) != NULL, i >= 40 - (int)left, "%s", id);
    }
    pql_task_destroy(t);
    pql_rules_destroy(rules);
}
