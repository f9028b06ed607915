/* test_cache.c — the account cache: look-ups among many accounts, removal
 * keeping every probe run reachable, least-recently-used eviction that never
 * drops a dirty account or one the caller keeps, and the byte count that
 * eviction keeps under a budget. */
#include "cache.h"
#include "harness.h"

#include <criterion/criterion.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

static const char *rules_yaml = "signals:\n  logins: { count: login, window: 7d }\n";

static pql_account *acct(pql_rules *r, int i)
{
    char id[32];
    int n = snprintf(id, sizeof id, "acct-%d", i);
    return pql_account_new(r, id, (size_t)n);
}

static pql_account *get(pql_cache *c, int i)
{
    char id[32];
    int n = snprintf(id, sizeof id, "acct-%d", i);
    return pql_cache_get(c, id, (size_t)n);
}

static void check_id(pql_account *a, int i)
{
    char id[32];
    size_t len;
    snprintf(id, sizeof id, "acct-%d", i);
    const char *got = pql_account_id(a, &len);
    cr_assert(len == strlen(id) && memcmp(got, id, len) == 0, "acct-%d: got %.*s", i, (int)len,
              got);
}

Test(cache, finds_each_of_many_accounts_and_nothing_else)
{
    pql_rules *r = h_rules(rules_yaml);
    pql_cache *c = pql_cache_new();
    for (int i = 0; i < 20000; i++)
        pql_cache_put(c, acct(r, i));
    cr_assert_eq(pql_cache_count(c), 20000);
    for (int i = 0; i < 20000; i++) {
        pql_account *a = get(c, i);
        cr_assert_not_null(a, "acct-%d", i);
        check_id(a, i);
    }
    cr_assert_null(get(c, 20000));
    cr_assert_null(pql_cache_get(c, "acct-1", 5), "a prefix of an id is another id");
    pql_cache_destroy(c);
    pql_rules_destroy(r);
}

Test(cache, evicts_the_least_recently_used_first)
{
    pql_rules *r = h_rules(rules_yaml);
    pql_cache *c = pql_cache_new();
    for (int i = 0; i < 100; i++) /* acct-99 is the most recent */
        pql_cache_put(c, acct(r, i));
    for (int i = 0; i < 10; i++) /* the ten oldest are used again */
        cr_assert_not_null(get(c, i));
    cr_assert_eq(pql_cache_evict(c, 50, SIZE_MAX, NULL, NULL), 50);
    for (int i = 0; i < 100; i++) {
        int want = i < 10 || i >= 60;
        cr_assert_eq(get(c, i) != NULL, want, "acct-%d %s", i, want ? "evicted" : "kept");
    }
    pql_cache_destroy(c);
    pql_rules_destroy(r);
}

static int keep_even(void *opaque, const pql_account *a)
{
    (void)opaque;
    size_t len;
    const char *id = pql_account_id(a, &len);
    return (id[len - 1] - '0') % 2 == 0;
}

static void on_alert(void *opaque, const pql_alert *al)
{
    (void)opaque;
    (void)al;
}

Test(cache, never_evicts_a_dirty_account_or_one_kept)
{
    pql_rules *r = h_rules(rules_yaml);
    pql_cache *c = pql_cache_new();
    for (int i = 0; i < 10; i++)
        pql_cache_put(c, acct(r, i));
    pql_event ev = {0};
    ev.kind = PQL_INPUT_USAGE;
    ev.account_id = "acct-3";
    ev.account_id_len = 6;
    ev.event = "login";
    ev.event_len = 5;
    ev.event_id = "e";
    ev.event_id_len = 1;
    ev.timestamp = 1700000000000LL;
    pql_account_apply(get(c, 3), &ev, 0, on_alert, NULL); /* acct-3 now has unwritten state */
    cr_assert_eq(pql_cache_evict(c, 0, SIZE_MAX, keep_even, NULL), 4, "1, 5, 7 and 9 go");
    for (int i = 0; i < 10; i++)
        cr_assert_eq(get(c, i) != NULL, i % 2 == 0 || i == 3, "acct-%d", i);
    pql_cache_destroy(c);
    pql_rules_destroy(r);
}

/* Random puts, gets and evictions: whatever eviction picks, the map and the
 * count agree, and every account left is found under its own id (a removal
 * that broke a probe run would hide one). */
Test(cache, random_operations_keep_the_map_consistent)
{
    pql_rules *r = h_rules(rules_yaml);
    pql_cache *c = pql_cache_new();
    enum { IDS = 3000 };
    static unsigned char in[IDS];
    memset(in, 0, sizeof in);
    uint64_t x = 0x2545f4914f6cdd1dULL;
    for (int step = 0; step < 60000; step++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        int i = (int)(x % IDS);
        int op = (int)((x >> 32) % 100);
        if (op < 50) {
            if (!in[i]) {
                pql_cache_put(c, acct(r, i));
                in[i] = 1;
            }
        } else if (op < 99) {
            pql_account *a = get(c, i);
            cr_assert_eq(a != NULL, in[i], "step %d: acct-%d", step, i);
            if (a) check_id(a, i);
        } else {
            size_t max = (size_t)((x >> 16) % (pql_cache_count(c) + 1));
            pql_cache_evict(c, max, SIZE_MAX, NULL, NULL);
            cr_assert_eq(pql_cache_count(c), max, "step %d", step);
            size_t found = 0;
            for (int k = 0; k < IDS; k++) {
                pql_account *a = get(c, k);
                if (a) check_id(a, k);
                in[k] = a != NULL;
                found += in[k];
            }
            cr_assert_eq(found, max, "step %d: %zu found, count %zu", step, found, max);
        }
    }
    pql_cache_destroy(c);
    pql_rules_destroy(r);
}

static void no_set(void *o, const char *f, size_t fl, const char *v, size_t vl)
{
    (void)o, (void)f, (void)fl, (void)v, (void)vl;
}

static void no_del(void *o, const char *f, size_t fl)
{
    (void)o, (void)f, (void)fl;
}

/* Ten accounts of one size s, then one grows by 20 distinct users: a byte
 * budget evicts the least recently used until the count is under it, and the
 * count is exact (evicting everything leaves 0). */
Test(cache, a_byte_budget_evicts_the_least_recently_used_until_under_it)
{
    pql_rules *r = h_rules("signals:\n  users: { distinct: user_id, of: \"*\", window: 7d }\n");
    pql_cache *c = pql_cache_new();
    cr_assert_eq(pql_cache_bytes(c), 0);
    pql_account *a[10];
    char id[10][16];
    for (int i = 0; i < 10; i++) { /* acct-000 is the least recent */
        snprintf(id[i], sizeof id[i], "acct-%03d", i);
        pql_cache_put(c, a[i] = pql_account_new(r, id[i], 8));
    }
    size_t s = pql_cache_bytes(c) / 10, m0 = pql_account_memory(a[9]);
    cr_assert_eq(pql_cache_bytes(c), 10 * s, "equal accounts count equal bytes");
    cr_assert_gt(s, pql_account_memory(a[0]), "the node and its slots count too");
    cr_assert_eq(pql_cache_evict(c, SIZE_MAX, 10 * s, NULL, NULL), 0, "at the budget: none");
    cr_assert_eq(pql_cache_evict(c, SIZE_MAX, 10 * s - 1, NULL, NULL), 1);
    cr_assert_null(pql_cache_get(c, id[0], 8));
    cr_assert_eq(pql_cache_bytes(c), 9 * s);

    pql_event ev = {0};
    ev.kind = PQL_INPUT_USAGE;
    ev.account_id = id[9];
    ev.account_id_len = 8;
    ev.event = "login";
    ev.event_len = 5;
    ev.timestamp = 1700000000000LL;
    char user[16];
    for (int u = 0; u < 20; u++) {
        ev.user_id = user;
        ev.user_id_len = (size_t)snprintf(user, sizeof user, "user-%d", u);
        pql_account_apply(a[9], &ev, 0, on_alert, NULL);
    }
    pql_account_flush(a[9], no_set, no_del, NULL);
    cr_assert_eq(pql_cache_bytes(c), 9 * s, "growth counts once measured");
    pql_cache_measure(c, a[9]);
    size_t delta = pql_cache_bytes(c) - 9 * s;
    cr_assert_eq(delta, pql_account_memory(a[9]) - m0);
    cr_assert_gt(delta, 20 * 24, "20 members: at least their slots (%zu)", delta);
    /* shedding `delta` takes ceil(delta / s) of the least recent, not acct-009 */
    size_t want = (delta + s - 1) / s;
    cr_assert_lt(want, 9, "s %zu, delta %zu: the budget can be met without acct-009", s, delta);
    size_t got = pql_cache_evict(c, SIZE_MAX, 9 * s, NULL, NULL);
    cr_assert_eq(got, want, "s %zu delta %zu: %zu evicted, want %zu", s, delta, got, want);
    cr_assert_leq(pql_cache_bytes(c), 9 * s);
    for (int i = 1; i < 10; i++)
        cr_assert_eq(pql_cache_get(c, id[i], 8) != NULL, i > (int)want, "%s", id[i]);
    cr_assert_eq(pql_cache_evict(c, 0, SIZE_MAX, NULL, NULL), 10 - 1 - want);
    cr_assert_eq(pql_cache_bytes(c), 0, "every byte counted in is counted out");
    pql_cache_destroy(c);
    pql_rules_destroy(r);
}
