/* test_embedded.c — the embedded default's parts: the mock-cluster broker
 * round-trips messages exactly (through the test harness), and the sample
 * workload produces exactly max_events valid records, deterministically. */
#include <criterion/criterion.h>

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "decode.h"
#include "embedded_kafka.h"
#include "harness.h"
#include "sample.h"

Test(embedded, produce_and_consume_back_exactly)
{
    h_kafka *k = h_kafka_start(4, "in-a", "in-b", NULL);
    cr_assert(strstr(h_kafka_bootstraps(k), "127.0.0.1:") != NULL);
    enum { N = 200 };
    char key[32], val[64];
    for (int i = 0; i < N; i++) {
        snprintf(key, sizeof key, "acct-%d", i % 17);
        snprintf(val, sizeof val, "value-%d", i);
        h_produce_raw(k, i % 2 ? "in-b" : "in-a", -1, key, val, strlen(val));
    }
    h_produce_raw(k, "in-a", 3, NULL, "\x00\x01\xff", 3); /* no key, binary, fixed partition */
    h_flush(k);

    int64_t total = 0;
    for (int p = 0; p < 4; p++)
        total += h_high_watermark(k, "in-a", p);
    cr_assert_eq(total, N / 2 + 1);

    const char *topics[] = {"in-a", "in-b"};
    for (int t = 0; t < 2; t++) {
        h_msgs *ms = h_consume_all(h_kafka_bootstraps(k), topics[t], 10000);
        cr_assert_not_null(ms, "consume %s", topics[t]);
        cr_assert_eq(ms->n, (size_t)(N / 2 + (t == 0)), "%s: %zu messages", topics[t], ms->n);
        int seen[N] = {0};
        int32_t partition_of[17];
        memset(partition_of, -1, sizeof partition_of);
        for (size_t i = 0; i < ms->n; i++) {
            const h_msg *m = &ms->msgs[i];
            if (!m->key) { /* the unkeyed binary one */
                cr_assert_eq(t, 0);
                cr_assert_eq(m->partition, 3);
                cr_assert_eq(m->value_len, 3);
                cr_assert(memcmp(m->value, "\x00\x01\xff", 3) == 0);
                continue;
            }
            int n = -1, a = -1;
            cr_assert_eq(sscanf(m->value, "value-%d", &n), 1, "value %s", m->value);
            cr_assert_eq(sscanf(m->key, "acct-%d", &a), 1);
            cr_assert(n >= 0 && n < N && n % 2 == t && !seen[n], "value %d", n);
            seen[n] = 1;
            cr_assert_eq(a, n % 17, "key %s for value %d", m->key, n);
            cr_assert_eq(m->value_len, strlen(m->value));
            /* the default partitioner keeps a key on one partition */
            if (partition_of[a] < 0) partition_of[a] = m->partition;
            cr_assert_eq(partition_of[a], m->partition);
            if (i > 0 && ms->msgs[i - 1].partition == m->partition)
                cr_assert_eq(ms->msgs[i - 1].offset + 1, m->offset);
        }
        h_msgs_free(ms);
    }
    h_kafka_stop(k);
}

Test(embedded, same_keys_land_on_same_partitions_across_topics)
{
    h_kafka *k = h_kafka_start(4, "usage", "accounts", NULL);
    for (int i = 0; i < 40; i++) {
        char acct[16];
        snprintf(acct, sizeof acct, "acct-%02d", i);
        h_produce_usage(k, "usage", -1, acct, "login", "u1", 1000 + i,
                        H_PROPS(H_STR("method", "sso"), H_NUM("n", i)));
        h_produce_account(k, "accounts", -1, acct, 1000 + i, H_PROPS(H_STR("plan", "free")));
    }
    h_flush(k);
    h_msgs *u = h_consume_all(h_kafka_bootstraps(k), "usage", 10000);
    h_msgs *a = h_consume_all(h_kafka_bootstraps(k), "accounts", 10000);
    cr_assert(u && a && u->n == 40 && a->n == 40);
    for (size_t i = 0; i < u->n; i++)
        for (size_t j = 0; j < a->n; j++)
            if (!strcmp(u->msgs[i].key, a->msgs[j].key))
                cr_assert_eq(u->msgs[i].partition, a->msgs[j].partition, "%s", u->msgs[i].key);
    h_msgs_free(u);
    h_msgs_free(a);
    h_kafka_stop(k);
}

/* ---- the sample workload ------------------------------------------------- */

typedef struct sample_run {
    char **pairs; /* "usage|acct-0001|login" or "account|acct-0001|" in produced order */
    size_t n;
    int usage, accounts;
} sample_run;

/* Decodes every record of `topic`, checking validity, into run->pairs. */
static void collect(sample_run *run, h_msgs *ms, pql_input_kind kind)
{
    char err[256];
    pql_decoder *d = pql_decoder_new(kind, PQL_WIRE_AVRO, NULL, NULL, err, sizeof err);
    cr_assert_not_null(d, "%s", err);
    for (size_t i = 0; i < ms->n; i++) {
        pql_event ev;
        pql_err rc =
            pql_decoder_decode(d, ms->msgs[i].value, ms->msgs[i].value_len, &ev, err, sizeof err);
        cr_assert_eq(rc, PQL_OK, "record %zu: %s", i, err);
        cr_assert_eq(ev.kind, kind);
        cr_assert(ev.account_id_len > 0);
        cr_assert_eq(ev.account_id_len, ms->msgs[i].key_len, "key is the account id");
        cr_assert(memcmp(ev.account_id, ms->msgs[i].key, ev.account_id_len) == 0);
        cr_assert(ev.timestamp > 1600000000000LL && ev.timestamp <= pql_now_ms());
        char *pair = NULL;
        if (kind == PQL_INPUT_USAGE) {
            cr_assert(ev.event_len > 0 && ev.user_id != NULL && ev.event_id_len > 4);
            cr_assert(!strncmp(ev.event_id, "evt-", 4));
            cr_assert_geq(asprintf(&pair, "usage|%.*s|%.*s", (int)ev.account_id_len, ev.account_id,
                                   (int)ev.event_len, ev.event),
                          0);
            run->usage++;
        } else {
            cr_assert(ev.nprops > 0, "an account update carries traits");
            cr_assert_geq(asprintf(&pair, "account|%.*s|", (int)ev.account_id_len, ev.account_id),
                          0);
            run->accounts++;
        }
        run->pairs[run->n++] = pair;
    }
    pql_decoder_destroy(d);
}

static sample_run run_sample(uint64_t seed, int64_t max_events)
{
    h_kafka *k = h_kafka_start(4, "usage", "accounts", NULL);
    pql_sample_opts o = {.bootstraps = h_kafka_bootstraps(k),
                         .usage_topic = "usage",
                         .accounts_topic = "accounts",
                         .rate = 5000,
                         .accounts = 50,
                         .seed = seed,
                         .max_events = max_events};
    char err[256];
    pql_sample *s = pql_sample_start(&o, err, sizeof err);
    cr_assert_not_null(s, "%s", err);
    for (int i = 0; i < 600 && pql_sample_produced(s) < max_events; i++)
        h_sleep_ms(50);
    cr_assert_eq(pql_sample_produced(s), max_events);
    h_sleep_ms(100); /* it must stop by itself at max_events */
    cr_assert_eq(pql_sample_produced(s), max_events);
    pql_sample_stop(s);

    sample_run run = {0};
    run.pairs = calloc((size_t)max_events + 1, sizeof *run.pairs);
    h_msgs *u = h_consume_all(h_kafka_bootstraps(k), "usage", 10000);
    h_msgs *a = h_consume_all(h_kafka_bootstraps(k), "accounts", 10000);
    cr_assert(u && a);
    cr_assert_eq(u->n + a->n, (size_t)max_events, "%zu + %zu records", u->n, a->n);
    collect(&run, u, PQL_INPUT_USAGE);
    collect(&run, a, PQL_INPUT_ACCOUNT);
    h_msgs_free(u);
    h_msgs_free(a);
    h_kafka_stop(k);
    return run;
}

static void free_run(sample_run *r)
{
    for (size_t i = 0; i < r->n; i++)
        free(r->pairs[i]);
    free(r->pairs);
}

Test(sample, produces_exactly_max_events_valid_records_deterministically, .timeout = 120)
{
    sample_run a = run_sample(42, 500), b = run_sample(42, 500);
    cr_assert_eq(a.n, 500);
    cr_assert(a.usage > 0 && a.accounts > 0);
    /* Records are read back by (partition, offset), which is the produced
     * order per account; same seed, same partitioner, so the same sequence. */
    cr_assert_eq(a.n, b.n);
    for (size_t i = 0; i < a.n; i++)
        cr_assert_str_eq(a.pairs[i], b.pairs[i], "record %zu differs", i);
    int signups = 0, logins = 0, core = 0;
    for (size_t i = 0; i < a.n; i++) {
        signups += strstr(a.pairs[i], "|signed_up") != NULL;
        logins += strstr(a.pairs[i], "|login") != NULL;
        core += strstr(a.pairs[i], "|feature_used") != NULL;
    }
    cr_assert(signups > 0 && logins > 0 && core > 0, "%d signups %d logins %d feature_used",
              signups, logins, core);
    free_run(&a);
    free_run(&b);
}

Test(sample, different_seeds_differ)
{
    sample_run a = run_sample(1, 100), b = run_sample(2, 100);
    int differ = 0;
    for (size_t i = 0; i < a.n && i < b.n; i++)
        differ |= strcmp(a.pairs[i], b.pairs[i]) != 0;
    cr_assert(differ);
    free_run(&a);
    free_run(&b);
}
