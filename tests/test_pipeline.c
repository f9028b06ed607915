/* test_pipeline.c — end to end on real parts: librdkafka's mock cluster, a
 * real redis-server, and the pqlstream binary as a separate process.
 *
 *  - exact alerts (ids, reasons, signals, times) for a scripted stream, and
 *    the Redis state and outbox they leave;
 *  - every kind of bad input ends in the DLQ with provenance headers while
 *    processing goes on;
 *  - kill -9 mid-stream, several times, ends with exactly the Redis state and
 *    the alert ids of an uninterrupted run. */
#include "alert.h"
#include "harness.h"
#include "sample.h"

#include <criterion/criterion.h>
#include <hiredis/hiredis.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PARTS 4
#define USAGE "usage-events"
#define ACCTS "account-updates"

static const char *rules_yaml =
    "version: 9\n"
    "lifecycle: { signup: signed_up, conversion: subscription_started }\n"
    "traits: { seats: number }\n"
    "signals:\n"
    "  logins:  { count: login, window: 7d }\n"
    "  invites: { count: teammate_invited, window: 14d }\n"
    "  users:   { distinct: user_id, of: '*', window: 30d }\n"
    "pql:\n"
    "  - name: team\n"
    "    when: logins >= 3 and invites >= 1\n"
    "    reasons: ['Logged in {logins} times in 7 days', 'Invited {invites} teammates']\n"
    "expansion:\n"
    "  - name: seats\n"
    "    when: account.seats > 0 and users / account.seats >= 0.8\n"
    "    reasons: ['Seat usage at {pct(users / account.seats)} ({users} of {account.seats} "
    "seats)']\n";

static h_redis *redis;
static h_kafka *kafka;
static char *dir;
static char rules_path[512];

static void setup(void)
{
    redis = h_redis_start();
    kafka = h_kafka_start(PARTS, USAGE, ACCTS, "pql-alerts", "pql-dlq", "pql-metrics", "alerts-a",
                          "alerts-b", NULL);
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

/* rules.watch for the next start(): off unless a test watches the files */
static const char *rules_watch = "0";
/* max.poll.interval.ms for the next start() */
static const char *max_poll_ms = "300000";
/* cache.max_memory for the next start() */
static const char *cache_max_memory = "1g";

static h_proc *start(const char *group, const char *alerts, const char *batch)
{
    return h_proc_start(
        "PQLSTREAM_BROKERS", h_kafka_bootstraps(kafka), "PQLSTREAM_REDIS", h_redis_url(redis),
        "PQLSTREAM_RULES", rules_path, "PQLSTREAM_GROUP", group, "PQLSTREAM_TOPIC_ALERTS", alerts,
        "PQLSTREAM_BATCH_MAX_MESSAGES", batch, "PQLSTREAM_KAFKA_SESSION_TIMEOUT_MS", "6000",
        "PQLSTREAM_KAFKA_HEARTBEAT_INTERVAL_MS", "500", "PQLSTREAM_KAFKA_MAX_POLL_INTERVAL_MS",
        max_poll_ms, "PQLSTREAM_RULES_WATCH", rules_watch, "PQLSTREAM_CACHE_MAX_MEMORY",
        cache_max_memory, NULL);
}

/* Waits until Redis holds every input offset of `group`, failing at once
 * (with the processor's log) if the processor dies meanwhile. */
static void wait_done(h_proc *p, const char *group, int timeout_ms)
{
    H_ASSERT_PROC(p, h_wait_offsets_of(p, kafka, h_redis_url(redis), group, USAGE, PARTS, NULL,
                                       timeout_ms) == 0);
    H_ASSERT_PROC(p, h_wait_offsets_of(p, kafka, h_redis_url(redis), group, ACCTS, PARTS, NULL,
                                       timeout_ms) == 0);
}

static redisContext *rc_connect(void)
{
    const char *url = h_redis_url(redis);
    cr_assert(!strncmp(url, "unix://", 7));
    redisContext *c = redisConnectUnix(url + 7);
    cr_assert(c && !c->err);
    return c;
}

static long long sum_counter(const char *group, const char *field)
{
    redisContext *c = rc_connect();
    long long sum = 0;
    for (int p = 0; p < PARTS; p++) {
        redisReply *r = redisCommand(c, "HGET pql:{%s:%d}:c:stats %s", group, p, field);
        if (r && r->type == REDIS_REPLY_STRING) sum += atoll(r->str);
        freeReplyObject(r);
    }
    redisFree(c);
    return sum;
}

static long long outbox_len(const char *group)
{
    redisContext *c = rc_connect();
    long long n = 0;
    for (int p = 0; p < PARTS; p++) {
        redisReply *r = redisCommand(c, "HLEN pql:{%s:%d}:outbox", group, p);
        if (r && r->type == REDIS_REPLY_INTEGER) n += r->integer;
        freeReplyObject(r);
    }
    redisFree(c);
    return n;
}

static json_t *find_alert(h_msgs *m, const char *account, const char *rule, int *count)
{
    json_t *found = NULL;
    *count = 0;
    for (size_t i = 0; i < m->n; i++) {
        char err[256];
        json_t *j =
            pql_alert_avro_to_json(m->msgs[i].value, m->msgs[i].value_len, err, sizeof(err));
        cr_assert_not_null(j, "alert %zu does not decode: %s", i, err);
        if (!strcmp(json_string_value(json_object_get(j, "account_id")), account) &&
            !strcmp(json_string_value(json_object_get(j, "rule")), rule)) {
            cr_assert_str_eq(m->msgs[i].key, account, "alerts are keyed by account");
            (*count)++;
            if (!found) {
                found = j;
                continue;
            }
        }
        json_decref(j);
    }
    return found;
}

TestSuite(pipeline, .init = setup, .fini = teardown, .timeout = 240);

/* The scripted stream, in event order per account: acme signs up, logs in 3
 * times, then an invite crosses `team` (the last login does not re-fire);
 * globex: only 2 logins, nothing; initech converted, so a PQL rule does not
 * apply; hooli (an AccountUpdate first: paid, 2 seats) has 2 active users,
 * seats at 100%. */
static const struct {
    const char *account, *event, *user; /* event NULL: hooli's AccountUpdate */
    int64_t dt;                         /* event time - t */
} script[17] = {
    {"acme", "signed_up", "u1", 0},
    {"acme", "login", "u1", 1000},
    {"acme", "login", "u2", 2000},
    {"acme", "login", "u1", 3000},
    {"acme", "teammate_invited", "u1", 4000}, /* with an email property */
    {"acme", "login", "u2", 5000},
    {"globex", "login", "u1", 0},
    {"globex", "login", "u1", 1},
    {"initech", "subscription_started", "u1", 0},
    {"initech", "login", "u1", 1},
    {"initech", "login", "u1", 2},
    {"initech", "login", "u1", 3},
    {"initech", "teammate_invited", "u1", 9},
    {"hooli", NULL, NULL, 0},
    {"hooli", "subscription_started", "u1", 0},
    {"hooli", "login", "u1", 10},
    {"hooli", "login", "u2", 20},
};

/* Produces script[k] to partition `part` (-1: by key). */
static void produce_scripted(int k, int32_t part, int64_t t)
{
    const char *acct = script[k].account;
    int64_t ts = t + script[k].dt;
    if (!script[k].event)
        h_produce_account(kafka, ACCTS, part, acct, ts,
                          H_PROPS(H_NUM("seats", 2), H_STR("plan", "team")));
    else if (k == 4)
        h_produce_usage(kafka, USAGE, part, acct, script[k].event, script[k].user, ts,
                        H_PROPS(H_STR("email", "b@acme.io")));
    else
        h_produce_usage(kafka, USAGE, part, acct, script[k].event, script[k].user, ts, H_NO_PROPS);
}

/* The stream of exact_alerts_for_a_scripted_stream, processed by group
 * `group` in batches of up to `batch` messages: its alerts, counters and
 * outbox, checked exactly.  Produced to partition `part` (-1: by key), all
 * before the processor starts, or with `rounds`, one event per account at a
 * time (each account keeps its own order), each round processed and written
 * before the next is produced. */
static void scripted_stream(const char *group, const char *batch, int32_t part, int rounds)
{
    static const int round_of[][5] = {{0, 6, 8, 13, -1}, {1, 7, 9, 14, -1}, {2, 10, 15, -1},
                                      {3, 11, 16, -1},   {4, 12, -1},       {5, -1}};
    int64_t t = pql_now_ms() - PQL_MS_HOUR;
    h_proc *p = NULL;
    if (rounds) {
        p = start(group, "pql-alerts", batch);
        for (size_t r = 0; r < sizeof round_of / sizeof round_of[0]; r++) {
            for (int i = 0; round_of[r][i] >= 0; i++)
                produce_scripted(round_of[r][i], part, t);
            h_flush(kafka);
            wait_done(p, group, 60000);
        }
    } else {
        for (int k = 0; k < 17; k++)
            produce_scripted(k, part, t);
        h_flush(kafka);
        p = start(group, "pql-alerts", batch);
        wait_done(p, group, 60000);
    }

    h_msgs *m = NULL;
    for (int i = 0; i < 100; i++) { /* alerts are produced right after the write */
        m = h_consume_all(h_kafka_bootstraps(kafka), "pql-alerts", 5000);
        if (m->n >= 2) break;
        h_msgs_free(m);
        m = NULL;
        h_sleep_ms(100);
    }
    H_ASSERT_PROC(p, m != NULL && m->n == 2, "expected exactly 2 alerts");

    int count;
    json_t *a = find_alert(m, "acme", "team", &count);
    cr_assert_not_null(a);
    cr_assert_eq(count, 1);
    char id[PQL_ALERT_ID_LEN + 1];
    pql_alert_id("acme", 4, "team", "1", id);
    cr_assert_str_eq(json_string_value(json_object_get(a, "alert_id")), id);
    cr_assert_str_eq(json_string_value(json_object_get(a, "kind")), "PQL");
    cr_assert_str_eq(json_string_value(json_object_get(a, "ruleset_version")), "9");
    cr_assert_str_eq(json_string_value(json_object_get(a, "model")), "threshold");
    cr_assert(json_is_null(json_object_get(a, "score")));
    cr_assert(json_is_null(json_object_get(a, "tier")));
    cr_assert_eq(json_integer_value(json_object_get(a, "triggered_at")), t + 4000);
    cr_assert_eq(json_integer_value(json_object_get(a, "signed_up_at")), t);
    cr_assert_eq(json_integer_value(json_object_get(a, "time_to_pql_ms")), 4000);
    json_t *reasons = json_object_get(a, "reasons");
    cr_assert_eq(json_array_size(reasons), 2);
    cr_assert_str_eq(json_string_value(json_array_get(reasons, 0)), "Logged in 3 times in 7 days");
    cr_assert_str_eq(json_string_value(json_array_get(reasons, 1)), "Invited 1 teammates");
    json_t *sig = json_object_get(a, "signals");
    cr_assert_eq(json_object_size(sig), 2);
    cr_assert_eq(json_number_value(json_object_get(sig, "logins")), 3);
    cr_assert_eq(json_number_value(json_object_get(sig, "invites")), 1);
    json_decref(a);

    json_t *s = find_alert(m, "hooli", "seats", &count);
    cr_assert_not_null(s);
    cr_assert_str_eq(json_string_value(json_object_get(s, "kind")), "EXPANSION");
    cr_assert_str_eq(json_string_value(json_array_get(json_object_get(s, "reasons"), 0)),
                     "Seat usage at 100% (2 of 2 seats)");
    cr_assert_eq(json_integer_value(json_object_get(json_object_get(s, "account"), "seats")), 2);
    cr_assert_str_eq(json_string_value(json_object_get(json_object_get(s, "account"), "plan")),
                     "team");
    cr_assert_eq(json_integer_value(json_object_get(s, "triggered_at")), t + 20);
    json_decref(s);
    h_msgs_free(m);

    /* state: acme's rule fired once and is waiting to clear; counters exact */
    cr_assert_eq(sum_counter(group, "consumed"), 17);
    cr_assert_eq(sum_counter(group, "alerts_pql"), 1);
    cr_assert_eq(sum_counter(group, "alerts_expansion"), 1);
    cr_assert_eq(sum_counter(group, "dead_lettered"), 0);
    /* delivered alerts leave the outbox (removed with a later write) */
    int empty = 0;
    for (int i = 0; i < 100 && !(empty = outbox_len(group) == 0); i++)
        h_sleep_ms(100);
    H_ASSERT_PROC(p, empty, "outbox not emptied after delivery");
    cr_assert_eq(h_proc_stop(p), 0, "SIGTERM must exit 0");
}

Test(pipeline, exact_alerts_for_a_scripted_stream)
{
    scripted_stream("g1", "1000", -1, 0);
}

/* Redis's count of a command since it started (INFO commandstats). */
static long long redis_calls(const char *cmd)
{
    redisContext *c = rc_connect();
    redisReply *r = redisCommand(c, "INFO commandstats");
    cr_assert(r && r->type == REDIS_REPLY_STRING);
    char key[64];
    snprintf(key, sizeof key, "cmdstat_%s:calls=", cmd);
    const char *at = strstr(r->str, key);
    long long n = at ? atoll(at + strlen(key)) : 0;
    freeReplyObject(r);
    redisFree(c);
    return n;
}

/* cache.max_memory of 1 byte: every clean account leaves the cache after
 * each build but for those of the batch in flight, and is loaded again from
 * Redis at its next event.  The four accounts on one partition, one message
 * per batch, produced in rounds of one event each: in each round the first
 * message's build evicts the others, so rounds 2 to 5 (each with two
 * accounts or more) reload at least one account.  The alerts, counters and
 * outbox are those of the run that keeps everything. */
Test(pipeline, evicting_every_account_after_each_write_changes_no_alert)
{
    cache_max_memory = "1";
    scripted_stream("g-evict", "1", 0, 1);
    long long loads = redis_calls("hgetall");
    cr_assert_geq(loads, 4 + 4, "4 first loads and a reload in each of rounds 2-5: %lld HGETALL",
                  loads);
}

Test(pipeline, bad_input_goes_to_the_dlq_with_headers)
{
    int64_t t = pql_now_ms() - PQL_MS_HOUR;
    h_produce_raw(kafka, USAGE, 0, "acme", "\x02garbage!", 9);          /* not Avro */
    h_produce_usage(kafka, USAGE, 0, "", "login", "u1", t, H_NO_PROPS); /* no account */
    h_produce_usage(kafka, USAGE, 0, "acme", "", "u1", t, H_NO_PROPS);  /* no event */
    h_produce_usage(kafka, USAGE, 0, "acme", "login", "u1", t + 48 * PQL_MS_HOUR + PQL_MS_HOUR,
                    H_NO_PROPS); /* future */
    char *huge = malloc(10000);
    memset(huge, 'x', 9999);
    huge[9999] = 0;
    h_produce_usage(kafka, USAGE, 0, "acme", "login", "u1", t, H_PROPS(H_STR("note", huge)));
    free(huge);
    h_produce_usage(kafka, USAGE, 0, "acme", "login", "u1", t, H_NO_PROPS); /* good: counted */
    h_flush(kafka);

    h_proc *p = start("g2", "pql-alerts", "1000");
    wait_done(p, "g2", 60000);
    h_msgs *d = h_consume_all(h_kafka_bootstraps(kafka), "pql-dlq", 10000);
    H_ASSERT_PROC(p, d->n == 5, "expected 5 dead letters, got %zu", d->n);
    static const char *codes[] = {"decode", "invalid", "invalid", "invalid", "limit"};
    /* the DLQ is partitioned by key: find each dead letter by its source offset */
    const h_msg *by_offset[5] = {0};
    for (size_t i = 0; i < d->n; i++) {
        const h_msg *msg = &d->msgs[i];
        cr_assert_str_eq(h_msg_header(msg, "pql.source.topic"), USAGE);
        cr_assert_str_eq(h_msg_header(msg, "pql.source.partition"), "0");
        int off = atoi(h_msg_header(msg, "pql.source.offset"));
        cr_assert(off >= 0 && off < 5 && !by_offset[off], "source offset %d", off);
        by_offset[off] = msg;
    }
    for (int i = 0; i < 5; i++) {
        cr_assert_str_eq(h_msg_header(by_offset[i], "pql.error.code"), codes[i], "offset %d", i);
        cr_assert(strlen(h_msg_header(by_offset[i], "pql.error")) > 10);
    }
    cr_assert_eq(by_offset[0]->value_len, 9, "the original bytes, unchanged");
    cr_assert(!memcmp(by_offset[0]->value, "\x02garbage!", 9));
    cr_assert_str_eq(by_offset[0]->key, "acme", "the original key");
    cr_assert(strstr(h_msg_header(by_offset[1], "pql.error"), "account_id"));
    cr_assert(strstr(h_msg_header(by_offset[3], "pql.error"), "ahead of the wall clock"));
    cr_assert(strstr(h_msg_header(by_offset[4], "pql.error"), "limits.max_string"));
    h_msgs_free(d);
    cr_assert_eq(sum_counter("g2", "dead_lettered"), 5);
    cr_assert_eq(sum_counter("g2", "consumed"), 6);
    /* the good event after them was applied */
    char *clock = h_redis_hget(h_redis_url(redis), "pql:{g2:0}:a:acme", "c");
    cr_assert_not_null(clock);
    cr_assert_eq(atoll(clock), t);
    free(clock);
    cr_assert_eq(h_proc_stop(p), 0);
}

static size_t ids_of(h_msgs *m, char ***out)
{
    char **ids = calloc(m->n + 1, sizeof(*ids));
    size_t n = 0;
    for (size_t i = 0; i < m->n; i++) {
        char err[256];
        json_t *j =
            pql_alert_avro_to_json(m->msgs[i].value, m->msgs[i].value_len, err, sizeof(err));
        cr_assert_not_null(j);
        const char *id = json_string_value(json_object_get(j, "alert_id"));
        int dup = 0;
        for (size_t k = 0; k < n && !dup; k++)
            dup = !strcmp(ids[k], id);
        if (!dup) ids[n++] = strdup(id);
        json_decref(j);
    }
    *out = ids;
    return n;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

Test(pipeline, kill_9_mid_stream_ends_in_the_state_of_an_uninterrupted_run, .timeout = 420)
{
    /* 60k events of the sample workload over 300 accounts */
    pql_sample_opts so = {.bootstraps = h_kafka_bootstraps(kafka),
                          .usage_topic = USAGE,
                          .accounts_topic = ACCTS,
                          .rate = 200000,
                          .accounts = 300,
                          .seed = 7,
                          .max_events = 60000};
    char err[256];
    pql_sample *s = pql_sample_start(&so, err, sizeof(err));
    cr_assert_not_null(s, "%s", err);
    while (pql_sample_produced(s) < so.max_events)
        h_sleep_ms(50);
    pql_sample_stop(s);
    int64_t total = 0;
    for (int p = 0; p < PARTS; p++)
        total += h_high_watermark(kafka, USAGE, p) + h_high_watermark(kafka, ACCTS, p);
    cr_assert_eq(total, so.max_events);

    /* A: uninterrupted */
    h_proc *a = start("ga", "alerts-a", "500");
    wait_done(a, "ga", 180000);
    cr_assert_eq(h_proc_stop(a), 0);

    /* B: killed -9 three times at moments picked from its progress */
    unsigned seed = (unsigned)pql_now_ms();
    fprintf(stderr, "kill test seed=%u\n", seed);
    srand(seed);
    int kills = 0;
    h_proc *b = start("gb", "alerts-b", "500");
    for (int k = 0; k < 3; k++) {
        /* wait until this incarnation has written at least one batch */
        int64_t goal = 1;
        for (int i = 0; i < 600; i++) {
            char *v = h_redis_hget(h_redis_url(redis), "pql:{gb:0}:meta", "seq");
            int64_t seq = v ? atoll(v) : 0;
            free(v);
            if (i == 0) goal = seq + 1 + rand() % 5;
            if (seq >= goal) break;
            h_sleep_ms(20);
        }
        h_proc_kill(b, SIGKILL);
        cr_assert_eq(h_proc_wait(b, 10000), 128 + SIGKILL);
        h_proc_stop(b);
        kills++;
        b = start("gb", "alerts-b", "500");
    }
    wait_done(b, "gb", 240000);
    cr_assert_eq(h_proc_stop(b), 0);
    fprintf(stderr, "kill test: %d kills over %lld events\n", kills, (long long)total);

    /* same state, partition by partition, field by field */
    for (int p = 0; p < PARTS; p++) {
        h_lines *la = h_redis_dump_partition(h_redis_url(redis), "ga", p);
        h_lines *lb = h_redis_dump_partition(h_redis_url(redis), "gb", p);
        cr_assert_gt(la->n, 100, "partition %d has state", p);
        cr_assert_eq(h_lines_compare(la, lb), 0, "partition %d differs", p);
        h_lines_free(la);
        h_lines_free(lb);
    }
    cr_assert_eq(sum_counter("ga", "consumed"), total);
    cr_assert_eq(sum_counter("gb", "consumed"), total, "nothing counted twice, nothing lost");
    cr_assert_eq(sum_counter("gb", "alerts_pql"), sum_counter("ga", "alerts_pql"));

    /* same alert ids (B may deliver one twice, always with the same id) */
    h_msgs *ma = h_consume_all(h_kafka_bootstraps(kafka), "alerts-a", 10000);
    h_msgs *mb = h_consume_all(h_kafka_bootstraps(kafka), "alerts-b", 10000);
    char **ia, **ib;
    size_t na = ids_of(ma, &ia), nb = ids_of(mb, &ib);
    cr_assert_gt(na, 10, "the workload fires alerts");
    cr_assert_eq(na,
                 (size_t)(sum_counter("ga", "alerts_pql") + sum_counter("ga", "alerts_expansion")));
    cr_assert_eq(nb, na, "alert ids: uninterrupted %zu, killed %zu", na, nb);
    qsort(ia, na, sizeof(*ia), cmp_str);
    qsort(ib, nb, sizeof(*ib), cmp_str);
    for (size_t i = 0; i < na; i++)
        cr_assert_str_eq(ia[i], ib[i]);
    for (size_t i = 0; i < na; i++)
        free(ia[i]);
    for (size_t i = 0; i < nb; i++)
        free(ib[i]);
    free(ia);
    free(ib);
    h_msgs_free(ma);
    h_msgs_free(mb);
}

static void write_rules(const char *text)
{
    h_write_file(rules_path, text);
}

static int count_alerts(const char *rule, const char *version)
{
    h_msgs *m = h_consume_all(h_kafka_bootstraps(kafka), "pql-alerts", 5000);
    int n = 0;
    for (size_t i = 0; i < m->n; i++) {
        char err[256];
        json_t *j =
            pql_alert_avro_to_json(m->msgs[i].value, m->msgs[i].value_len, err, sizeof(err));
        n += !strcmp(json_string_value(json_object_get(j, "rule")), rule) &&
             !strcmp(json_string_value(json_object_get(j, "ruleset_version")), version);
        json_decref(j);
    }
    h_msgs_free(m);
    return n;
}

/* A reload story, triggered by SIGHUP (by_signal) or by the file watch:
 * an invalid set is refused whole with file:line:col and the running one
 * stays; a valid set with a new version takes over, the alerts carry the
 * version, a rule that still exists keeps its fired state, a new rule fires,
 * and a signal whose definition changed is named in the log. */
static void reload_story(const char *group, int by_signal)
{
    int64_t t = pql_now_ms() - PQL_MS_HOUR;
    rules_watch = by_signal ? "0" : "200ms";
    h_proc *p = start(group, "pql-alerts", "1000");
    H_ASSERT_PROC(p, h_proc_wait_log(p, "partition assigned", 30000) == 0);
    for (int i = 0; i < 3; i++)
        h_produce_usage(kafka, USAGE, -1, "acme", "login", "u1", t + i, H_NO_PROPS);
    h_produce_usage(kafka, USAGE, -1, "acme", "teammate_invited", "u1", t + 10, H_NO_PROPS);
    h_flush(kafka);
    wait_done(p, group, 60000);

    write_rules("pql:\n  - name: x\n    when: nope >= 1\n");
    if (by_signal) h_proc_kill(p, SIGHUP);
    H_ASSERT_PROC(p, h_proc_wait_log(p, "rules reload refused", 30000) == 0);
    char *log = h_proc_log(p);
    cr_assert(strstr(log, "rules.yaml:3:11: error: in when: unknown signal 'nope'"), "%s", log);
    cr_assert(by_signal || strstr(log, "rule files changed; reloading"), "%s", log);
    free(log);

    write_rules("version: 10\n"
                "signals:\n"
                "  logins:  { count: login, window: 7d }\n"
                "  users:   { distinct: user_id, of: '*', window: 14d }\n"
                "  invites: { count: teammate_invited, window: 14d }\n"
                "pql:\n"
                "  - name: team\n"
                "    when: logins >= 3 and invites >= 1\n"
                "  - name: busy\n"
                "    when: logins >= 4\n");
    if (by_signal) h_proc_kill(p, SIGHUP);
    H_ASSERT_PROC(p, h_proc_wait_log(p, "rules reloaded", 30000) == 0);
    h_produce_usage(kafka, USAGE, -1, "acme", "login", "u1", t + 20, H_NO_PROPS);
    h_flush(kafka);
    wait_done(p, group, 60000);
    int busy = 0;
    for (int i = 0; i < 100 && !(busy = count_alerts("busy", "10")); i++)
        h_sleep_ms(100);
    H_ASSERT_PROC(p, busy == 1, "the new rule fires with the new version");
    cr_assert_eq(count_alerts("team", "9"), 1);
    cr_assert_eq(count_alerts("team", "10"), 0, "a rule that still exists keeps its state");
    log = h_proc_log(p);
    cr_assert(strstr(log, "old_version=9 version=10"), "%s", log);
    cr_assert(strstr(log, "signal definition changed: it starts empty for every account\" "
                          "signal=users"),
              "the 30d -> 14d window change is logged: %s", log);
    free(log);
    cr_assert_eq(h_proc_stop(p), 0);
}

Test(pipeline, sighup_reloads_rules_and_refuses_an_invalid_set)
{
    reload_story("g3", 1);
}

Test(pipeline, edited_rule_files_reload_without_a_signal)
{
    reload_story("g5", 0);
}

/* The account hash of `account` in whichever partition holds it, field `f`. */
static char *account_field(const char *group, const char *account, const char *f)
{
    for (int p = 0; p < PARTS; p++) {
        char key[256];
        snprintf(key, sizeof(key), "pql:{%s:%d}:a:%s", group, p, account);
        char *v = h_redis_hget(h_redis_url(redis), key, f);
        if (v) return v;
    }
    return NULL;
}

/* acme's four events (login, teammate_invited, login, login at t … t+3)
 * applied exactly once in `group`: its clock is the last one's, `team`
 * fired once (the 2nd login crosses it), 4 consumed, 1 PQL alert. */
static void assert_acme_applied_once(h_proc *p, const char *group, int64_t t)
{
    char *clock = account_field(group, "acme", "c");
    char *team = account_field(group, "acme", "r:team");
    H_ASSERT_PROC(p, clock && atoll(clock) == t + 3, "clock %s", clock ? clock : "(none)");
    H_ASSERT_PROC(p, team && !strncmp(team, "1 1 ", 4), "r:team %s", team ? team : "(none)");
    free(clock);
    free(team);
    cr_assert_eq(sum_counter(group, "consumed"), 4);
    cr_assert_eq(sum_counter(group, "alerts_pql"), 1);
}

Test(pipeline, a_batch_written_while_redis_is_down_is_retried_whole, .timeout = 240)
{
    /* this test needs a Redis whose data survives a kill: swap in an AOF one */
    h_redis_stop(redis);
    redis = h_redis_start_aof();
    int64_t t = pql_now_ms() - PQL_MS_HOUR;
    h_produce_usage(kafka, USAGE, -1, "acme", "login", "u1", t, H_NO_PROPS);
    h_produce_usage(kafka, USAGE, -1, "acme", "teammate_invited", "u1", t + 1, H_NO_PROPS);
    h_flush(kafka);
    max_poll_ms = "7000"; /* the outage below outlasts it: the consumer must keep polling */
    h_proc *p = start("g4", "pql-alerts", "1000");
    wait_done(p, "g4", 60000);
    h_sleep_ms(1500); /* appendfsync everysec: let the AOF catch up before the kill */

    /* Redis dies; acme (cached) gets two more logins: the second crosses `team` */
    kill(pql_redis_child_pid(h_redis_child(redis)), SIGKILL);
    h_produce_usage(kafka, USAGE, -1, "acme", "login", "u1", t + 2, H_NO_PROPS);
    h_produce_usage(kafka, USAGE, -1, "acme", "login", "u1", t + 3, H_NO_PROPS);
    h_flush(kafka);
    H_ASSERT_PROC(p, h_proc_wait_log(p, "op=write", 30000) == 0);
    h_sleep_ms(10000); /* several failed attempts, longer than max.poll.interval.ms */
    char err[256];
    cr_assert_eq(pql_redis_child_restart(h_redis_child(redis), err, sizeof(err)), 0, "%s", err);
    wait_done(p, "g4", 60000);

    /* the retried write carried the batch's state, not just its offsets */
    assert_acme_applied_once(p, "g4", t);
    /* paused, not starved: still a member, never revoked, resumed (the line
       follows the write, which the checks above may have seen first) */
    H_ASSERT_PROC(p, h_proc_wait_log(p, "redis reachable again; resuming", 10000) == 0);
    char *log = h_proc_log(p);
    H_ASSERT_PROC(p, !strstr(log, "maximum poll interval"), "max.poll.interval.ms was exceeded");
    H_ASSERT_PROC(p, !strstr(log, "partitions revoked"), "the outage cost the membership");
    free(log);
    cr_assert_eq(h_proc_stop(p), 0);
}

/* While Redis runs a write, the loop applies what arrives and otherwise waits
 * in its poll: the writer thread wakes it when the write ends.  It used to
 * poll with a zero timeout meanwhile, spinning a core away from Redis and
 * the broker (3.5 million passes in this test's stopped second); then, once
 * it blocked in the poll, a pass that came up empty waited for the write
 * instead, with the fetch stopped (the loop took turns with Redis).  Here
 * Redis is stopped (SIGSTOP) for 1.5 s: a first burst of 100 events
 * (batch.max_messages) makes a write that hangs; the passes that follow find
 * nothing; 300 ms later a second burst of 50 arrives and is applied ahead of
 * the write, and then there is nothing to do but wait for Redis.  The loop
 * waits in its poll, never in the write (write_wait_ms; the old wait took
 * the rest of the stop, ~1.2 s). */
Test(pipeline, the_loop_waits_not_spins_while_a_write_is_in_flight, .timeout = 240)
{
    int64_t t = pql_now_ms() - PQL_MS_HOUR;
    h_produce_usage(kafka, USAGE, -1, "acme", "login", "u1", t, H_NO_PROPS);
    h_flush(kafka);
    h_proc *p = start("g10", "pql-alerts", "100");
    wait_done(p, "g10", 60000);

    pid_t rpid = pql_redis_child_pid(h_redis_child(redis));
    kill(rpid, SIGSTOP);
    for (int i = 1; i <= 100; i++)
        h_produce_usage(kafka, USAGE, -1, "acme", "login", "u1", t + i, H_NO_PROPS);
    h_flush(kafka);
    h_sleep_ms(300); /* empty passes: the write of the 100 hangs */
    for (int i = 101; i <= 150; i++)
        h_produce_usage(kafka, USAGE, -1, "acme", "login", "u1", t + i, H_NO_PROPS);
    h_flush(kafka);
    h_sleep_ms(1200); /* under redis.timeout_ms: the write waits, it does not fail */
    kill(rpid, SIGCONT);
    wait_done(p, "g10", 60000);
    h_proc_kill(p, SIGTERM);
    H_ASSERT_PROC(p, h_proc_wait(p, 10000) == 0);
    cr_assert_eq(sum_counter("g10", "consumed"), 151);

    char *log = h_proc_log(p);
    const char *line = log ? strstr(log, "msg=\"loop totals\"") : NULL;
    const char *f = line ? strstr(line, " passes=") : NULL;
    const char *w = line ? strstr(line, " write_wait_ms=") : NULL;
    H_ASSERT_PROC(p, f && w, "no loop totals on stop");
    long long passes = atoll(f + strlen(" passes=")),
              write_wait = atoll(w + strlen(" write_wait_ms="));
    /* ~10 passes per idle second (batch.max_ms 100): a hundred or so over
       this test */
    H_ASSERT_PROC(p, passes > 0 && passes < 2000, "%lld loop passes", passes);
    /* what is left: collecting writes already done, and the final flush */
    H_ASSERT_PROC(p, write_wait < 600, "the loop waited %lld ms in writes, not in its poll",
                  write_wait);
    H_ASSERT_PROC(p, !strstr(log, "redis unavailable"), "the write was meant to wait, not fail");
    free(log);
    h_proc_stop(p);
}

/* Redis loses writes it had acknowledged (here all of them, as a restart
 * without its data would): nobody else holds the partitions, so the member
 * must not drop them as fenced (they would sit unprocessed until a
 * rebalance) but claim them again and re-read them from the offsets Redis
 * now holds — none: from the start — reaching the state of an
 * uninterrupted run. */
Test(pipeline, redis_losing_acknowledged_writes_is_read_again_not_abandoned, .timeout = 240)
{
    int64_t t = pql_now_ms() - PQL_MS_HOUR;
    h_produce_usage(kafka, USAGE, -1, "acme", "login", "u1", t, H_NO_PROPS);
    h_produce_usage(kafka, USAGE, -1, "acme", "teammate_invited", "u1", t + 1, H_NO_PROPS);
    h_flush(kafka);
    h_proc *p = start("g9", "pql-alerts", "1000");
    wait_done(p, "g9", 60000);
    h_redis_flushall(h_redis_url(redis));
    h_produce_usage(kafka, USAGE, -1, "acme", "login", "u1", t + 2, H_NO_PROPS);
    h_produce_usage(kafka, USAGE, -1, "acme", "login", "u1", t + 3, H_NO_PROPS);
    h_flush(kafka);
    H_ASSERT_PROC(p, h_proc_wait_log(p, "redis lost writes it had acknowledged", 30000) == 0);
    wait_done(p, "g9", 60000);
    assert_acme_applied_once(p, "g9", t);
    char *log = h_proc_log(p);
    H_ASSERT_PROC(p, !strstr(log, "partition released"), "a partition was dropped");
    free(log);
    cr_assert_eq(h_proc_stop(p), 0);
}

/* Partitions "partition claimed … partition=N" in a log, as a bit set. */
static unsigned claimed_in(const char *log)
{
    unsigned set = 0;
    for (const char *s = log; s && (s = strstr(s, "msg=\"partition claimed\" partition=")); s++)
        set |= 1u << atoi(s + strlen("msg=\"partition claimed\" partition="));
    return set;
}

static int64_t produce_logins(int round, int64_t t)
{
    int64_t n = 0;
    for (int a = 0; a < 40; a++) {
        char acct[32];
        snprintf(acct, sizeof acct, "acct-%d", a);
        for (int i = 0; i < 5; i++, n++)
            h_produce_usage(kafka, USAGE, -1, acct, "login", "u1", t + round * 100 + i, H_NO_PROPS);
    }
    h_flush(kafka);
    return n;
}

Test(pipeline, a_joining_member_takes_half_and_a_leaving_one_hands_over, .timeout = 240)
{
    int64_t t = pql_now_ms() - PQL_MS_HOUR, total = 0;
    total += produce_logins(0, t);
    h_proc *a = start("g5", "alerts-g5", "100");
    wait_done(a, "g5", 60000);

    /* cooperative-sticky: B takes half, A keeps the other half throughout */
    h_proc *b = start("g5", "alerts-g5", "100");
    H_ASSERT_PROC(b, h_proc_wait_log(b, "partition claimed", 60000) == 0);
    H_ASSERT_PROC(a, h_proc_wait_log(a, "partitions revoked\" count=2 lost=0", 60000) == 0);
    total += produce_logins(1, t);
    wait_done(b, "g5", 60000);
    char *la = h_proc_log(a), *lb = h_proc_log(b);
    unsigned first = claimed_in(la), joined = claimed_in(lb);
    H_ASSERT_PROC(a, first == 0xf, "A claimed every partition first (0x%x)", first);
    H_ASSERT_PROC(b, __builtin_popcount(joined) == 2, "B claimed two partitions (0x%x)", joined);
    H_ASSERT_PROC(a, !strstr(la, "count=4"), "A never gave up all of its partitions");
    free(la);
    free(lb);

    /* B leaves on SIGTERM: exit 0 within seconds; A takes its partitions back */
    int64_t t0 = pql_now_ms();
    h_proc_kill(b, SIGTERM);
    int rc = h_proc_wait(b, 10000);
    H_ASSERT_PROC(b, rc == 0, "exit status %d", rc);
    H_ASSERT_PROC(b, pql_now_ms() - t0 < 5000, "stopped in %lld ms",
                  (long long)(pql_now_ms() - t0));
    H_ASSERT_PROC(b, h_proc_wait_log(b, "leaving the group", 1000) == 0);
    h_proc_stop(b);
    total += produce_logins(2, t);
    wait_done(a, "g5", 60000);
    la = h_proc_log(a);
    char *second = strstr(la, "partitions revoked\" count=2");
    H_ASSERT_PROC(a, second && claimed_in(second) == joined, "A claimed B's partitions again");
    free(la);
    cr_assert_eq(sum_counter("g5", "consumed"), total, "nothing lost, nothing counted twice");
    cr_assert_eq(h_proc_stop(a), 0);
}

Test(pipeline, partitions_assigned_while_redis_is_down_are_claimed_when_it_returns, .timeout = 240)
{
    h_redis_stop(redis);
    redis = h_redis_start_aof(); /* its data survives the kill below */
    int64_t t = pql_now_ms() - PQL_MS_HOUR, total = 0;
    total += produce_logins(0, t);
    h_proc *a = start("g6", "alerts-g6", "100");
    wait_done(a, "g6", 60000);
    h_sleep_ms(1500); /* appendfsync everysec */

    /* Redis dies, then B starts and joins: it waits for Redis (paused,
       polling); its claims are retried */
    kill(pql_redis_child_pid(h_redis_child(redis)), SIGKILL);
    total += produce_logins(1, t);
    h_proc *b = start("g6", "alerts-g6", "100");
    H_ASSERT_PROC(b, h_proc_wait_log(b, "redis unavailable", 60000) == 0);
    H_ASSERT_PROC(a, h_proc_wait_log(a, "partitions revoked", 60000) == 0);
    h_sleep_ms(2000); /* B's claims fail meanwhile */
    char err[256];
    cr_assert_eq(pql_redis_child_restart(h_redis_child(redis), err, sizeof(err)), 0, "%s", err);

    /* B claims, seeks to the stored offsets and processes its half */
    H_ASSERT_PROC(b, h_proc_wait_log(b, "partition claimed", 60000) == 0);
    wait_done(b, "g6", 60000);
    cr_assert_eq(sum_counter("g6", "consumed"), total, "nothing lost, nothing counted twice");
    cr_assert_eq(h_proc_stop(b), 0);
    cr_assert_eq(h_proc_stop(a), 0);
}

Test(pipeline, a_member_stopped_while_joining_exits_cleanly, .timeout = 240)
{
    /* librdkafka 2.0.2 aborts when a cooperative-sticky consumer is
       destroyed between joining and its first assignment (librdkafka#4312);
       SIGTERM in that window must still end in exit 0 */
    int64_t t = pql_now_ms() - PQL_MS_HOUR;
    produce_logins(0, t);
    h_proc *a = start("g7", "alerts-g7", "100");
    wait_done(a, "g7", 60000);
    for (int round = 0; round < 5; round++) {
        h_proc *b = start("g7", "alerts-g7", "100");
        /* the mock answers a JoinGroup after about session.timeout.ms - 1 s
           (5 s here): stop B around then, before its first assignment */
        H_ASSERT_PROC(b, h_proc_wait_log(b, "running", 30000) == 0);
        h_sleep_ms(3800 + round * 400);
        h_proc_kill(b, SIGTERM);
        int rc = h_proc_wait(b, 15000);
        H_ASSERT_PROC(b, rc == 0, "round %d: exit status %d", round, rc);
        h_proc_stop(b);
    }
    cr_assert_eq(h_proc_stop(a), 0);
}
