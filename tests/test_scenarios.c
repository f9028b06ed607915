/* test_scenarios.c — the domain scenarios (DESIGN §8), end to end.
 *
 * Every example rule file in rules/examples/ and every rule of the shipped
 * expansion set (rules/expansion.yaml, loaded with the whole rules/
 * directory) gets a story: a scripted stream of events with exact event
 * times, played through the real pipeline (the pqlstream binary, librdkafka's
 * mock cluster, a real redis-server).  Each story first stops just short of
 * the threshold and checks that nothing (new) fired, then crosses it and
 * checks the alert that results, field by field.  A cheap test also checks
 * that every example file loads alone and has its story here.
 *
 * How a story runs:
 *   - run_rules() starts the processor on a rule file;
 *   - usage() / update() produce UsageEvents and AccountUpdates whose Kafka
 *     record timestamp is the event time, as an event-time producer does, so
 *     the processor's merge of the two topics follows the story's order;
 *   - settle() waits until Redis holds every input offset: the batch that
 *     carried them, its alerts and its counters are then written (one atomic
 *     step), so the stored alert counter is exact at that moment;
 *   - expect_alerts(n) checks that counter and reads the n alerts back from
 *     the alert topic (an alert is produced right after its batch is written);
 *   - assert_alert() compares one alert with what the story expects.
 * Event times are relative to `day0`, a fixed hour about 20 days ago, so
 * windows of days mean what they say and no event is in the future. */
#include "alert.h"
#include "harness.h"
#include "rules.h"

#include <criterion/criterion.h>
#include <jansson.h>
#include <hiredis/hiredis.h>
#include <librdkafka/rdkafka.h>
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PARTS  2
#define USAGE  "usage-events"
#define ACCTS  "account-updates"
#define ALERTS "pql-alerts"
#define GROUP  "scenarios"

#define MINUTE PQL_MS_MINUTE
#define HOUR   PQL_MS_HOUR
#define DAY    PQL_MS_DAY

#define EXAMPLE(name) PQL_SOURCE_DIR "/rules/examples/" name
#define SHIPPED       PQL_SOURCE_DIR "/rules"

static h_redis *redis;
static h_kafka *kafka;
static h_proc *proc;
static int64_t day0;          /* event time of the story's start: 09:00 UTC, ~20 days ago */
static int64_t produced;      /* input records produced so far */
static int64_t phase_started; /* wall clock when the first event of the current phase was
                                 produced (a phase ends with settle()) */
static int phase_open;

static void setup(void)
{
    redis = h_redis_start();
    kafka = h_kafka_start(PARTS, USAGE, ACCTS, ALERTS, "pql-dlq", "pql-metrics", NULL);
    h_kafka_event_time_records(kafka, 1); /* the merge of the inputs follows the story */
    int64_t now = pql_now_ms();
    day0 = (now - 20 * DAY) / DAY * DAY + 9 * HOUR;
    produced = 0;
    phase_started = now;
    phase_open = 0;
}

static void teardown(void)
{
    if (proc) h_proc_stop(proc);
    proc = NULL;
    h_kafka_stop(kafka);
    h_redis_stop(redis);
}

TestSuite(scenarios, .init = setup, .fini = teardown, .timeout = 180);

/* ---- driving the pipeline ---------------------------------------------- */

static void run_rules(const char *rules_path)
{
    proc = h_proc_start("PQLSTREAM_BROKERS", h_kafka_bootstraps(kafka), "PQLSTREAM_REDIS",
                        h_redis_url(redis), "PQLSTREAM_RULES", rules_path, "PQLSTREAM_GROUP", GROUP,
                        "PQLSTREAM_KAFKA_SESSION_TIMEOUT_MS", "6000",
                        "PQLSTREAM_KAFKA_HEARTBEAT_INTERVAL_MS", "500", NULL);
}

/* Every input record is counted (settle() waits for them all) and opens the
 * phase whose alerts must be emitted after it started. */
static void produced_one(void)
{
    if (!phase_open) phase_started = pql_now_ms();
    phase_open = 1;
    produced++;
}

/* A UsageEvent: `user` may be NULL; props as H_PROPS(…) or H_NO_PROPS. */
static void usage(const char *account, const char *event, const char *user, int64_t ts,
                  const pql_prop *props, size_t nprops)
{
    produced_one();
    h_produce_usage(kafka, USAGE, -1, account, event, user, ts, props, nprops);
}

/* An AccountUpdate: traits as H_PROPS(…). */
static void update(const char *account, int64_t ts, const pql_prop *traits, size_t ntraits)
{
    produced_one();
    h_produce_account(kafka, ACCTS, -1, account, ts, traits, ntraits);
}

static long long stat_counter(const char *field)
{
    const char *url = h_redis_url(redis);
    redisContext *c = redisConnectUnix(url + strlen("unix://"));
    cr_assert(c && !c->err, "cannot connect to %s", url);
    long long sum = 0;
    for (int p = 0; p < PARTS; p++) {
        redisReply *r = redisCommand(c, "HGET pql:{%s:%d}:c:stats %s", GROUP, p, field);
        if (r && r->type == REDIS_REPLY_STRING) sum += atoll(r->str);
        freeReplyObject(r);
    }
    redisFree(c);
    return sum;
}

/* Waits until the processor has applied and stored everything produced so
 * far; checks nothing was dead-lettered or dropped as late on the way. */
static void settle(void)
{
    h_flush(kafka);
    phase_open = 0;
    H_ASSERT_PROC(proc, h_wait_offsets_of(proc, kafka, h_redis_url(redis), GROUP, USAGE, PARTS,
                                          NULL, 60000) == 0);
    H_ASSERT_PROC(proc, h_wait_offsets_of(proc, kafka, h_redis_url(redis), GROUP, ACCTS, PARTS,
                                          NULL, 60000) == 0);
    H_ASSERT_PROC(proc, stat_counter("consumed") == produced, "consumed %lld of %lld",
                  stat_counter("consumed"), (long long)produced);
    H_ASSERT_PROC(proc, stat_counter("dead_lettered") == 0);
    H_ASSERT_PROC(proc, stat_counter("late") == 0);
}

/* The alerts on the topic so far, decoded, in (partition, offset) order;
 * one per alert_id (a re-delivery carries the same bytes: it is dropped). */
static json_t *read_alerts(void)
{
    h_msgs *m = h_consume_all(h_kafka_bootstraps(kafka), ALERTS, 10000);
    cr_assert_not_null(m, "cannot read the alert topic");
    json_t *out = json_array();
    for (size_t i = 0; i < m->n; i++) {
        char err[256];
        json_t *a = pql_alert_avro_to_json(m->msgs[i].value, m->msgs[i].value_len, err, sizeof err);
        cr_assert_not_null(a, "alert %zu does not decode: %s", i, err);
        const char *account = json_string_value(json_object_get(a, "account_id"));
        cr_assert_str_eq(m->msgs[i].key, account, "alerts are keyed by account");
        const char *id = json_string_value(json_object_get(a, "alert_id"));
        int dup = 0;
        for (size_t k = 0; k < json_array_size(out) && !dup; k++) {
            json_t *o = json_array_get(out, k);
            if (strcmp(json_string_value(json_object_get(o, "alert_id")), id)) continue;
            cr_assert(json_equal(o, a), "alert %s delivered twice with different contents", id);
            dup = 1;
        }
        if (dup)
            json_decref(a);
        else
            json_array_append_new(out, a);
    }
    h_msgs_free(m);
    return out;
}

/* After settle(): exactly `n` alerts have fired since the processor started
 * (the stored counter, written with the offsets) and all `n` are on the
 * alert topic.  @returns them (json_decref), as read_alerts. */
static json_t *expect_alerts(size_t n)
{
    long long fired = stat_counter("alerts_pql") + stat_counter("alerts_expansion");
    H_ASSERT_PROC(proc, fired == (long long)n, "expected %zu alerts to have fired, %lld did", n,
                  fired);
    json_t *alerts = NULL;
    for (int i = 0; i < 100; i++) { /* produced right after the batch is written */
        alerts = read_alerts();
        if (json_array_size(alerts) >= n) break;
        json_decref(alerts);
        alerts = NULL;
        h_sleep_ms(100);
    }
    H_ASSERT_PROC(proc, alerts != NULL, "the %zu alerts did not reach the topic", n);
    H_ASSERT_PROC(proc, json_array_size(alerts) == n, "%zu alerts on the topic, expected %zu",
                  json_array_size(alerts), n);
    return alerts;
}

/* The alert of `rule` for `account` in `alerts` (exactly one), borrowed. */
static json_t *alert_of(json_t *alerts, const char *account, const char *rule, const char *episode)
{
    char id[PQL_ALERT_ID_LEN + 1];
    pql_alert_id(account, strlen(account), rule, episode, id);
    json_t *found = NULL;
    for (size_t i = 0; i < json_array_size(alerts); i++) {
        json_t *a = json_array_get(alerts, i);
        if (strcmp(json_string_value(json_object_get(a, "alert_id")), id)) continue;
        cr_assert_null(found, "two alerts of %s %s #%s", account, rule, episode);
        found = a;
    }
    cr_assert_not_null(found, "no alert of %s %s #%s", account, rule, episode);
    return found;
}

static void finish(void)
{
    cr_assert_eq(h_proc_stop(proc), 0, "SIGTERM must exit 0");
    proc = NULL;
}

/* ---- what an alert must say ---------------------------------------------- */

#define NO_TIME INT64_MIN

typedef struct expected {
    const char *account, *rule;
    const char *episode;  /* the arming sequence number: "1", "2", "1:HIGH" */
    const char *kind;     /* "PQL" | "EXPANSION" */
    const char *model;    /* "threshold" (default) | "weighted" | "logistic" */
    const char *version;  /* ruleset_version */
    int64_t triggered_at; /* event time of the crossing event */
    const char *reasons[8];
    const char *signals; /* JSON object: every signal the rule reads */
    const char *traits;  /* JSON object: the account's traits ("{}" for none) */
    int has_score;
    double score;
    const char *tier;    /* NULL: none */
    int64_t sla_ms;      /* 0: no sla_due_at; else sla_due_at = emitted_at + sla_ms */
    int64_t signed_up;   /* signed_up_at, NO_TIME: null */
    int64_t time_to_pql; /* time_to_pql_ms, NO_TIME: null */
} expected;

/* Equal JSON objects, numbers compared by value (long or double alike). */
static void assert_map_eq(json_t *got, const char *want_text, const char *what)
{
    json_error_t jerr;
    json_t *want = json_loads(want_text, 0, &jerr);
    cr_assert_not_null(want, "bad expected %s: %s", what, jerr.text);
    char *g = json_dumps(got, JSON_SORT_KEYS | JSON_COMPACT);
    cr_assert(json_is_object(got), "%s is not an object: %s", what, g);
    cr_assert_eq(json_object_size(got), json_object_size(want), "%s: got %s, want %s", what, g,
                 want_text);
    const char *key;
    json_t *w;
    json_object_foreach(want, key, w)
    {
        json_t *v = json_object_get(got, key);
        cr_assert_not_null(v, "%s: no '%s' in %s", what, key, g);
        if (json_is_number(w))
            cr_assert(json_is_number(v) && json_number_value(v) == json_number_value(w),
                      "%s.%s: got %s, want %s", what, key, g, want_text);
        else
            cr_assert(json_equal(v, w), "%s.%s: got %s, want %s", what, key, g, want_text);
    }
    free(g);
    json_decref(want);
}

static void assert_time(json_t *a, const char *field, int64_t want)
{
    json_t *v = json_object_get(a, field);
    if (want == NO_TIME)
        cr_assert(json_is_null(v), "%s must be null", field);
    else
        cr_assert(json_is_integer(v) && json_integer_value(v) == want, "%s: got %lld, want %lld",
                  field, (long long)json_integer_value(v), (long long)want);
}

/* Checks every field of alert `a` against `e`.  emitted_at is wall clock: it
 * must fall between the start of the phase that crossed and now. */
static void assert_alert(json_t *a, const expected *e)
{
    char id[PQL_ALERT_ID_LEN + 1];
    pql_alert_id(e->account, strlen(e->account), e->rule, e->episode, id);
    cr_assert_str_eq(json_string_value(json_object_get(a, "alert_id")), id);
    cr_assert_str_eq(json_string_value(json_object_get(a, "account_id")), e->account);
    cr_assert_str_eq(json_string_value(json_object_get(a, "kind")), e->kind);
    cr_assert_str_eq(json_string_value(json_object_get(a, "rule")), e->rule);
    cr_assert_str_eq(json_string_value(json_object_get(a, "ruleset_version")), e->version);
    cr_assert_str_eq(json_string_value(json_object_get(a, "model")),
                     e->model ? e->model : "threshold");
    json_t *score = json_object_get(a, "score");
    if (e->has_score)
        cr_assert(json_is_number(score) && fabs(json_number_value(score) - e->score) < 1e-12,
                  "score %.17g, want %.17g", json_number_value(score), e->score);
    else
        cr_assert(json_is_null(score), "score must be null");
    json_t *tier = json_object_get(a, "tier");
    if (e->tier)
        cr_assert_str_eq(json_string_value(tier), e->tier);
    else
        cr_assert(json_is_null(tier), "tier must be null");

    assert_time(a, "triggered_at", e->triggered_at);
    int64_t emitted = json_integer_value(json_object_get(a, "emitted_at"));
    int64_t now = pql_now_ms();
    cr_assert(emitted >= phase_started && emitted <= now,
              "emitted_at %lld is outside the phase that crossed [%lld, %lld]", (long long)emitted,
              (long long)phase_started, (long long)now);
    assert_time(a, "sla_due_at", e->sla_ms ? emitted + e->sla_ms : NO_TIME);
    assert_time(a, "signed_up_at", e->signed_up);
    assert_time(a, "time_to_pql_ms", e->time_to_pql);

    json_t *reasons = json_object_get(a, "reasons");
    size_t nr = 0;
    while (e->reasons[nr])
        nr++;
    char *dump = json_dumps(reasons, JSON_COMPACT);
    cr_assert_eq(json_array_size(reasons), nr, "reasons: %s", dump);
    for (size_t i = 0; i < nr; i++)
        cr_assert_str_eq(json_string_value(json_array_get(reasons, i)), e->reasons[i],
                         "reason %zu of %s", i, dump);
    free(dump);
    assert_map_eq(json_object_get(a, "signals"), e->signals, "signals");
    assert_map_eq(json_object_get(a, "account"), e->traits, "account");
}

/* ======================================================================== */
/* Seed examples (rules/examples/): PQL rules on free accounts               */
/* ======================================================================== */

/* Every example loads on its own (what `pqlstream rules check FILE` does),
 * and every example has its scenario below. */
Test(examples, each_file_loads_alone_and_has_a_scenario)
{
    static const char *const with_scenario[] = {"calendly.yaml", "dropbox.yaml", "logistic.yaml",
                                                "notion.yaml",   "slack.yaml",   "weighted.yaml",
                                                "zoom.yaml"};
    size_t nknown = sizeof(with_scenario) / sizeof(*with_scenario), seen = 0;
    DIR *d = opendir(PQL_SOURCE_DIR "/rules/examples");
    cr_assert_not_null(d);
    struct dirent *de;
    while ((de = readdir(d))) {
        size_t len = strlen(de->d_name);
        if (len < 5 || strcmp(de->d_name + len - 5, ".yaml")) continue;
        int known = 0;
        for (size_t i = 0; i < nknown; i++)
            known |= !strcmp(de->d_name, with_scenario[i]);
        cr_assert(known, "rules/examples/%s has no scenario in tests/test_scenarios.c", de->d_name);
        char path[512];
        snprintf(path, sizeof path, "%s/rules/examples/%s", PQL_SOURCE_DIR, de->d_name);
        pql_buf errors = {0};
        pql_rules *r = pql_rules_load(path, &errors);
        cr_assert_not_null(r, "%s", errors.data ? errors.data : "");
        cr_assert_eq(pql_rules_nrules(r), 1, "%s: one rule per example", de->d_name);
        cr_assert_eq(pql_rules_rule(r, 0)->kind, PQL_ALERT_PQL, "%s: a PQL rule", de->d_name);
        pql_rules_destroy(r);
        pql_buf_free(&errors);
        seen++;
    }
    closedir(d);
    cr_assert_eq(seen, nknown, "every example with a scenario is in rules/examples/");
}

/* ------------------------------------------------------------------------ */
/* ======================================================================== */

Test(scenarios, slack_team_sends_2000_messages)
{
    run_rules(EXAMPLE("slack.yaml"));
    static const char *const users[] = {"ana", "ben", "cho", "dev", "eli"};
    update("northwind", day0 - MINUTE, H_PROPS(H_STR("plan", "free"), H_NUM("employees", 40)));
    usage("northwind", "workspace_created", "ana", day0, H_NO_PROPS);
    /* 1,999 messages, one a minute, from five people: not yet */
    for (int i = 0; i < 1999; i++)
        usage("northwind", "message_sent", users[i % 5], day0 + (i + 1) * MINUTE, H_NO_PROPS);
    settle();
    json_decref(expect_alerts(0));

    /* the 2,000th fires; the 2,001st does not fire again */
    usage("northwind", "message_sent", "ben", day0 + 2 * DAY, H_NO_PROPS);
    usage("northwind", "message_sent", "cho", day0 + 2 * DAY + MINUTE, H_NO_PROPS);
    settle();
    json_t *alerts = expect_alerts(1);
    assert_alert(alert_of(alerts, "northwind", "slack-2000-messages", "1"),
                 &(expected){.account = "northwind",
                             .rule = "slack-2000-messages",
                             .episode = "1",
                             .kind = "PQL",
                             .version = "1",
                             .triggered_at = day0 + 2 * DAY,
                             .reasons = {"The team sent 2,000 messages",
                                         "5 people sent messages in the last 30 days"},
                             .signals = "{\"messages\": 2000, \"senders\": 5}",
                             .traits = "{\"plan\": \"free\", \"employees\": 40}",
                             .signed_up = day0,
                             .time_to_pql = 2 * DAY});
    json_decref(alerts);
    finish();
}

Test(scenarios, dropbox_uploads_from_a_second_device)
{
    run_rules(EXAMPLE("dropbox.yaml"));
    usage("fabrikam", "signed_up", "kim", day0, H_NO_PROPS);
    for (int i = 0; i < 4; i++)
        usage("fabrikam", "file_uploaded", "kim", day0 + (i + 1) * HOUR,
              H_PROPS(H_STR("device_id", "laptop-7f3a"), H_NUM("bytes", 52000)));
    /* the phone opens a file: a second device, but not an upload */
    usage("fabrikam", "file_viewed", "kim", day0 + DAY, H_PROPS(H_STR("device_id", "phone-19c2")));
    settle();
    json_decref(expect_alerts(0));

    usage("fabrikam", "file_uploaded", "kim", day0 + DAY + HOUR,
          H_PROPS(H_STR("device_id", "phone-19c2"), H_NUM("bytes", 2100000)));
    settle();
    json_t *alerts = expect_alerts(1);
    assert_alert(
        alert_of(alerts, "fabrikam", "dropbox-multi-device", "1"),
        &(expected){.account = "fabrikam",
                    .rule = "dropbox-multi-device",
                    .episode = "1",
                    .kind = "PQL",
                    .version = "1",
                    .triggered_at = day0 + DAY + HOUR,
                    .reasons = {"Uploaded files from 2 devices in 30 days", "5 uploads in 30 days"},
                    .signals = "{\"upload_devices\": 2, \"uploads\": 5}",
                    .traits = "{}",
                    .signed_up = day0,
                    .time_to_pql = DAY + HOUR});
    json_decref(alerts);
    finish();
}

Test(scenarios, notion_three_pages_and_two_collaborators)
{
    run_rules(EXAMPLE("notion.yaml"));
    update("contoso", day0 - MINUTE, H_PROPS(H_STR("plan", "free")));
    usage("contoso", "signed_up", "lea", day0, H_NO_PROPS);
    for (int i = 0; i < 3; i++)
        usage("contoso", "page_created", "lea", day0 + (i + 1) * HOUR,
              H_PROPS(H_STR("template", "meeting-notes")));
    /* a second person reads, but does not write: still one collaborator */
    usage("contoso", "page_viewed", "max", day0 + DAY, H_NO_PROPS);
    settle();
    json_decref(expect_alerts(0));

    usage("contoso", "page_edited", "max", day0 + DAY + 30 * MINUTE, H_NO_PROPS);
    settle();
    json_t *alerts = expect_alerts(1);
    assert_alert(
        alert_of(alerts, "contoso", "notion-team-workspace", "1"),
        &(expected){.account = "contoso",
                    .rule = "notion-team-workspace",
                    .episode = "1",
                    .kind = "PQL",
                    .version = "1",
                    .triggered_at = day0 + DAY + 30 * MINUTE,
                    .reasons = {"Created 3 pages in 30 days", "2 people wrote in the workspace"},
                    .signals = "{\"pages\": 3, \"collaborators\": 2}",
                    .traits = "{\"plan\": \"free\"}",
                    .signed_up = day0,
                    .time_to_pql = DAY + 30 * MINUTE});
    json_decref(alerts);
    finish();
}

/* Everything the rule wants except the fifth meeting, on the given days. */
static void calendly_setup(const char *account, int invite_day, const int *meeting_days, int n)
{
    usage(account, "signed_up", "joe", day0, H_NO_PROPS);
    usage(account, "calendar_connected", "joe", day0 + HOUR, H_PROPS(H_STR("provider", "google")));
    usage(account, "teammate_invited", "joe", day0 + invite_day * DAY, H_NO_PROPS);
    for (int i = 0; i < n; i++)
        usage(account, "meeting_scheduled", "joe", day0 + meeting_days[i] * DAY + 2 * HOUR,
              H_NO_PROPS);
}

Test(scenarios, calendly_fast_start_within_14_days_of_signup)
{
    run_rules(EXAMPLE("calendly.yaml"));
    /* slowpoke gets there too, but on day 15: past the first 14 days */
    calendly_setup("slowpoke", 9, (const int[]){9, 10, 11, 12}, 4);
    usage("slowpoke", "meeting_scheduled", "joe", day0 + 15 * DAY, H_NO_PROPS);
    /* speedy: four meetings by day 5 */
    calendly_setup("speedy", 1, (const int[]){2, 3, 4, 5}, 4);
    settle();
    json_decref(expect_alerts(0));

    /* speedy's fifth meeting, 6 days after signing up */
    usage("speedy", "meeting_scheduled", "joe", day0 + 6 * DAY, H_NO_PROPS);
    settle();
    json_t *alerts = expect_alerts(1);
    assert_alert(alert_of(alerts, "speedy", "calendly-fast-start", "1"),
                 &(expected){.account = "speedy",
                             .rule = "calendly-fast-start",
                             .episode = "1",
                             .kind = "PQL",
                             .version = "1",
                             .triggered_at = day0 + 6 * DAY,
                             .reasons = {"Scheduled 5 meetings within 6 days of signing up",
                                         "Invited teammates (1) and connected a calendar"},
                             .signals = "{\"meetings\": 5, \"invites\": 1, \"calendars\": 1}",
                             .traits = "{}",
                             .signed_up = day0,
                             .time_to_pql = 6 * DAY});
    json_decref(alerts);
    finish();
}

Test(scenarios, zoom_three_meetings_with_three_participants)
{
    run_rules(EXAMPLE("zoom.yaml"));
    usage("tailspin", "signed_up", "raj", day0, H_NO_PROPS);
    static const int participants[] = {2, 5, 2, 3, 1};
    for (int i = 0; i < 5; i++)
        usage("tailspin", "meeting_ended", "raj", day0 + (i + 1) * HOUR,
              H_PROPS(H_NUM("participants", participants[i]), H_NUM("minutes", 40)));
    /* a meeting whose size is unknown does not count as a group meeting */
    usage("tailspin", "meeting_ended", "raj", day0 + DAY, H_PROPS(H_NUM("minutes", 12)));
    settle();
    json_decref(expect_alerts(0));

    usage("tailspin", "meeting_ended", "raj", day0 + 2 * DAY,
          H_PROPS(H_NUM("participants", 3), H_NUM("minutes", 55)));
    settle();
    json_t *alerts = expect_alerts(1);
    assert_alert(alert_of(alerts, "tailspin", "zoom-group-meetings", "1"),
                 &(expected){.account = "tailspin",
                             .rule = "zoom-group-meetings",
                             .episode = "1",
                             .kind = "PQL",
                             .version = "1",
                             .triggered_at = day0 + 2 * DAY,
                             .reasons = {"Held 3 meetings with 3 or more participants in 30 days",
                                         "7 meetings in all"},
                             .signals = "{\"group_meetings\": 3, \"meetings\": 7}",
                             .traits = "{}",
                             .signed_up = day0,
                             .time_to_pql = 2 * DAY});
    json_decref(alerts);
    finish();
}

Test(scenarios, weighted_table_medium_at_70_then_high_at_90)
{
    run_rules(EXAMPLE("weighted.yaml"));
    update("adatum", day0 - MINUTE, H_PROPS(H_STR("plan", "free"), H_STR("channel", "organic")));
    usage("adatum", "signed_up", "sam", day0, H_NO_PROPS);                   /* 10 */
    usage("adatum", "onboarding_completed", "sam", day0 + HOUR, H_NO_PROPS); /* 30 */
    usage("adatum", "feature_used", "sam", day0 + 2 * HOUR,
          H_PROPS(H_STR("feature", "projects"))); /* 45 */
    usage("adatum", "feature_used", "sam", day0 + 3 * HOUR,
          H_PROPS(H_STR("feature", "docs"))); /* not the core feature: 45 */
    settle();
    json_decref(expect_alerts(0));

    /* an invite: 75 points, a PQL of tier MEDIUM */
    usage("adatum", "teammate_invited", "sam", day0 + DAY, H_NO_PROPS);
    settle();
    json_t *alerts = expect_alerts(1);
    assert_alert(alert_of(alerts, "adatum", "engagement", "1"),
                 &(expected){.account = "adatum",
                             .rule = "engagement",
                             .episode = "1",
                             .kind = "PQL",
                             .model = "weighted",
                             .version = "1",
                             .triggered_at = day0 + DAY,
                             .reasons = {"Score 75 (tier MEDIUM)", "signups >= 1 (+10 points)",
                                         "onboarded >= 1 (+20 points)", "core >= 1 (+15 points)",
                                         "invites >= 1 (+30 points)"},
                             .signals = "{\"signups\": 1, \"onboarded\": 1, \"core\": 1,"
                                        " \"invites\": 1, \"pricing\": 0, \"limits\": 0}",
                             .traits = "{\"plan\": \"free\", \"channel\": \"organic\"}",
                             .has_score = 1,
                             .score = 75,
                             .tier = "MEDIUM",
                             .sla_ms = 24 * HOUR,
                             .signed_up = day0,
                             .time_to_pql = DAY});
    json_decref(alerts);

    /* pricing: 100 points, the tier rises to HIGH: one more alert; hitting a
       usage limit then (135) changes no tier: no alert */
    usage("adatum", "pricing_viewed", "sam", day0 + 2 * DAY, H_PROPS(H_STR("page", "/pricing")));
    usage("adatum", "usage_limit_reached", "sam", day0 + 3 * DAY, H_NO_PROPS);
    settle();
    alerts = expect_alerts(2);
    assert_alert(alert_of(alerts, "adatum", "engagement", "1:HIGH"),
                 &(expected){.account = "adatum",
                             .rule = "engagement",
                             .episode = "1:HIGH",
                             .kind = "PQL",
                             .model = "weighted",
                             .version = "1",
                             .triggered_at = day0 + 2 * DAY,
                             .reasons = {"Score 100 (tier HIGH)", "signups >= 1 (+10 points)",
                                         "onboarded >= 1 (+20 points)", "core >= 1 (+15 points)",
                                         "invites >= 1 (+30 points)", "pricing >= 1 (+25 points)"},
                             .signals = "{\"signups\": 1, \"onboarded\": 1, \"core\": 1,"
                                        " \"invites\": 1, \"pricing\": 1, \"limits\": 0}",
                             .traits = "{\"plan\": \"free\", \"channel\": \"organic\"}",
                             .has_score = 1,
                             .score = 100,
                             .tier = "HIGH",
                             .sla_ms = 4 * HOUR,
                             .signed_up = day0,
                             .time_to_pql = DAY}); /* qualified at the first alert */
    json_decref(alerts);
    finish();
}

Test(scenarios, logistic_propensity_crosses_60_percent)
{
    run_rules(EXAMPLE("logistic.yaml"));
    usage("litware", "signed_up", "zoe", day0, H_NO_PROPS);
    for (int i = 0; i < 5; i++)
        usage("litware", "feature_used", "zoe", day0 + (i + 1) * HOUR,
              H_PROPS(H_STR("feature", "projects")));
    usage("litware", "api_request", "zoe", day0 + DAY, H_PROPS(H_NUM("calls", 1500)));
    usage("litware", "api_request", "zoe", day0 + DAY + HOUR, H_PROPS(H_NUM("calls", 499)));
    /* one invite: p = sigmoid(-4.2 + 0.3·5 + 0.8·1 + 0.2·log1p(1999)) ≈ 40.6% */
    usage("litware", "teammate_invited", "zoe", day0 + 2 * DAY, H_NO_PROPS);
    settle();
    json_decref(expect_alerts(0));

    /* the second invite: ≈ 60.4%, past the 60% threshold */
    usage("litware", "teammate_invited", "zoe", day0 + 3 * DAY, H_NO_PROPS);
    settle();
    double z = -4.2 + 0.30 * 5 + 0.80 * 2 + 0.20 * log1p(1999);
    json_t *alerts = expect_alerts(1);
    assert_alert(
        alert_of(alerts, "litware", "propensity", "1"),
        &(expected){.account = "litware",
                    .rule = "propensity",
                    .episode = "1",
                    .kind = "PQL",
                    .model = "logistic",
                    .version = "1",
                    .triggered_at = day0 + 3 * DAY,
                    .reasons = {"Propensity 60.4% (fires at 60%)", "core_uses = 5 (weight 0.3)",
                                "invites = 2 (weight 0.8)", "log1p(api_calls) = 7.6 (weight 0.2)"},
                    .signals = "{\"core_uses\": 5, \"invites\": 2, \"api_calls\": 1999}",
                    .traits = "{}",
                    .has_score = 1,
                    .score = 1.0 / (1.0 + exp(-z)),
                    .signed_up = day0,
                    .time_to_pql = 3 * DAY});
    json_decref(alerts);
    finish();
}

/* ======================================================================== */
/* The shipped expansion set (rules/expansion.yaml, with rules/pql.yaml)     */
/* ======================================================================== */

#define SHIPPED_VERSION "1+1" /* expansion.yaml's version + pql.yaml's */

/* A paying team: signed up 10 days before day0, converted on day0. */
static void paid_account(const char *account, const pql_prop *traits, size_t ntraits)
{
    usage(account, "signed_up", "u1", day0 - 10 * DAY, H_NO_PROPS);
    update(account, day0 - MINUTE, traits, ntraits);
    usage(account, "subscription_started", "u1", day0, H_PROPS(H_STR("plan", "team")));
}

/* Logins of users u<from>…u<to>, one a minute from `at`. */
static void logins(const char *account, int from, int to, int64_t at)
{
    for (int u = from; u <= to; u++) {
        char user[16];
        snprintf(user, sizeof user, "u%d", u);
        usage(account, "login", user, at + (u - from) * MINUTE, H_NO_PROPS);
    }
}

static const char *const seat_reason_80_of_10 =
    "Seat usage at 80% (8 of 10 seats active in 30 days)";

Test(scenarios, seat_saturation_80_fires_at_8_of_10_seats_on_paid_accounts_only)
{
    run_rules(SHIPPED);
    paid_account("globex", H_PROPS(H_NUM("seats", 10), H_STR("plan", "team")));
    logins("globex", 1, 7, day0 + HOUR); /* 70% */
    /* a free account at 80%: expansion rules are for paying accounts */
    update("freebie", day0 - MINUTE, H_PROPS(H_NUM("seats", 10)));
    logins("freebie", 1, 8, day0 + HOUR);
    settle();
    json_decref(expect_alerts(0));

    logins("globex", 8, 8, day0 + DAY); /* 80% */
    settle();
    json_t *alerts = expect_alerts(1);
    assert_alert(alert_of(alerts, "globex", "seat-saturation-80", "1"),
                 &(expected){.account = "globex",
                             .rule = "seat-saturation-80",
                             .episode = "1",
                             .kind = "EXPANSION",
                             .version = SHIPPED_VERSION,
                             .triggered_at = day0 + DAY,
                             .reasons = {seat_reason_80_of_10},
                             .signals = "{\"active_users\": 8}",
                             .traits = "{\"seats\": 10, \"plan\": \"team\"}",
                             .signed_up = day0 - 10 * DAY,
                             .time_to_pql = NO_TIME});
    json_decref(alerts);

    /* hysteresis: 8 of 11 seats is 73%, not below 70%: the rule stays fired,
       so back at 8 of 10 nothing fires again */
    update("globex", day0 + 2 * DAY, H_PROPS(H_NUM("seats", 11)));
    update("globex", day0 + 3 * DAY, H_PROPS(H_NUM("seats", 10)));
    settle();
    json_decref(expect_alerts(1));
    finish();
}

/* Paid without a conversion event: the shipped lifecycle.paid reads the plan
 * trait, so an account imported from billing on a team plan gets expansion
 * alerts; one on the free plan does not. */
Test(scenarios, seat_saturation_80_for_an_account_paid_by_its_plan_trait)
{
    run_rules(SHIPPED);
    update("hooli", day0 - MINUTE, H_PROPS(H_NUM("seats", 10), H_STR("plan", "team")));
    update("piedpiper", day0 - MINUTE, H_PROPS(H_NUM("seats", 10), H_STR("plan", "free")));
    logins("hooli", 1, 7, day0 + HOUR);
    logins("piedpiper", 1, 8, day0 + HOUR);
    settle();
    json_decref(expect_alerts(0));

    logins("hooli", 8, 8, day0 + DAY);
    settle();
    json_t *alerts = expect_alerts(1);
    assert_alert(alert_of(alerts, "hooli", "seat-saturation-80", "1"),
                 &(expected){.account = "hooli",
                             .rule = "seat-saturation-80",
                             .episode = "1",
                             .kind = "EXPANSION",
                             .version = SHIPPED_VERSION,
                             .triggered_at = day0 + DAY,
                             .reasons = {seat_reason_80_of_10},
                             .signals = "{\"active_users\": 8}",
                             .traits = "{\"seats\": 10, \"plan\": \"team\"}",
                             .signed_up = NO_TIME,
                             .time_to_pql = NO_TIME});
    json_decref(alerts);
    finish();
}

Test(scenarios, seat_saturation_80_rearms_below_70_and_waits_out_the_cooldown)
{
    run_rules(SHIPPED);
    paid_account("globex", H_PROPS(H_NUM("seats", 10), H_STR("plan", "team")));
    logins("globex", 1, 8, day0 + HOUR); /* fires: 80% on day 0 */
    int64_t first = day0 + HOUR + 7 * MINUTE;
    /* 20 seats: 40%, clears and re-arms; back to 10 on day 3: 80% again, but
       within the 14-day cooldown */
    update("globex", day0 + 2 * DAY, H_PROPS(H_NUM("seats", 20)));
    update("globex", day0 + 3 * DAY, H_PROPS(H_NUM("seats", 10)));
    usage("globex", "login", "u3", first + 14 * DAY - 1, H_NO_PROPS);
    settle();
    json_t *alerts = expect_alerts(1);
    alert_of(alerts, "globex", "seat-saturation-80", "1");
    json_decref(alerts);

    /* 14 days after the first alert: the second arming fires */
    usage("globex", "login", "u4", first + 14 * DAY, H_NO_PROPS);
    settle();
    alerts = expect_alerts(2);
    assert_alert(alert_of(alerts, "globex", "seat-saturation-80", "2"),
                 &(expected){.account = "globex",
                             .rule = "seat-saturation-80",
                             .episode = "2",
                             .kind = "EXPANSION",
                             .version = SHIPPED_VERSION,
                             .triggered_at = first + 14 * DAY,
                             .reasons = {seat_reason_80_of_10},
                             .signals = "{\"active_users\": 8}",
                             .traits = "{\"seats\": 10, \"plan\": \"team\"}",
                             .signed_up = day0 - 10 * DAY,
                             .time_to_pql = NO_TIME});
    json_decref(alerts);
    finish();
}

Test(scenarios, seat_saturation_90_fires_at_9_of_10_seats)
{
    run_rules(SHIPPED);
    paid_account("initech", H_PROPS(H_NUM("seats", 10), H_STR("plan", "team")));
    logins("initech", 1, 8, day0 + HOUR); /* 80%: only the 80% rule */
    settle();
    json_t *alerts = expect_alerts(1);
    alert_of(alerts, "initech", "seat-saturation-80", "1");
    json_decref(alerts);

    logins("initech", 9, 9, day0 + 2 * DAY); /* 90% */
    settle();
    alerts = expect_alerts(2);
    assert_alert(alert_of(alerts, "initech", "seat-saturation-90", "1"),
                 &(expected){.account = "initech",
                             .rule = "seat-saturation-90",
                             .episode = "1",
                             .kind = "EXPANSION",
                             .version = SHIPPED_VERSION,
                             .triggered_at = day0 + 2 * DAY,
                             .reasons = {"Seat usage at 90% (9 of 10 seats active in 30 days)",
                                         "1 of 10 seats still free"},
                             .signals = "{\"active_users\": 9}",
                             .traits = "{\"seats\": 10, \"plan\": \"team\"}",
                             .signed_up = day0 - 10 * DAY,
                             .time_to_pql = NO_TIME});
    json_decref(alerts);
    finish();
}

Test(scenarios, limit_nearing_held_for_14_days)
{
    run_rules(SHIPPED);
    paid_account("umbrella", H_PROPS(H_NUM("api_call_limit", 100000), H_STR("plan", "business")));
    /* 79,999 of 100,000: under 80% */
    usage("umbrella", "api_request", "svc", day0 + HOUR, H_PROPS(H_NUM("calls", 79999)));
    /* one more call: 80% from day0 + 2h on */
    int64_t since = day0 + 2 * HOUR;
    usage("umbrella", "api_request", "svc", since, H_PROPS(H_NUM("calls", 1)));
    usage("umbrella", "api_request", "svc", since + 7 * DAY, H_PROPS(H_NUM("calls", 1000)));
    /* one millisecond short of 14 days at 80%+: not yet */
    usage("umbrella", "login", "u1", since + 14 * DAY - 1, H_NO_PROPS);
    settle();
    json_decref(expect_alerts(0));

    usage("umbrella", "api_request", "svc", since + 14 * DAY, H_PROPS(H_NUM("calls", 500)));
    settle();
    json_t *alerts = expect_alerts(1);
    assert_alert(
        alert_of(alerts, "umbrella", "limit-nearing", "1"),
        &(expected){
            .account = "umbrella",
            .rule = "limit-nearing",
            .episode = "1",
            .kind = "EXPANSION",
            .version = SHIPPED_VERSION,
            .triggered_at = since + 14 * DAY,
            .reasons = {"API calls at 81.5% of the plan limit (81,500 of 100,000 in 30 days)",
                        "Above 80% of the limit for 14 days"},
            .signals = "{\"api_calls\": 81500}",
            .traits = "{\"api_call_limit\": 100000, \"plan\": \"business\"}",
            .signed_up = day0 - 10 * DAY,
            .time_to_pql = NO_TIME});
    json_decref(alerts);
    finish();
}

Test(scenarios, premium_attempts_three_within_7_days)
{
    run_rules(SHIPPED);
    paid_account("stark", H_PROPS(H_NUM("seats", 50), H_STR("plan", "team")));
    /* three attempts, but the first is 8 days before the others: 2 in 7 days */
    usage("stark", "premium_feature_attempted", "u1", day0 + HOUR,
          H_PROPS(H_STR("feature", "sso")));
    usage("stark", "premium_feature_attempted", "u2", day0 + 8 * DAY,
          H_PROPS(H_STR("feature", "audit_log")));
    usage("stark", "premium_feature_attempted", "u1", day0 + 9 * DAY,
          H_PROPS(H_STR("feature", "sso")));
    settle();
    json_decref(expect_alerts(0));

    usage("stark", "premium_feature_attempted", "u3", day0 + 10 * DAY,
          H_PROPS(H_STR("feature", "sso")));
    settle();
    json_t *alerts = expect_alerts(1);
    assert_alert(alert_of(alerts, "stark", "premium-attempts", "1"),
                 &(expected){.account = "stark",
                             .rule = "premium-attempts",
                             .episode = "1",
                             .kind = "EXPANSION",
                             .version = SHIPPED_VERSION,
                             .triggered_at = day0 + 10 * DAY,
                             .reasons = {"Tried premium features 3 times in 7 days",
                                         "Distinct premium features tried: 2"},
                             .signals = "{\"premium_attempts\": 3, \"premium_features\": 2}",
                             .traits = "{\"seats\": 50, \"plan\": \"team\"}",
                             .signed_up = day0 - 10 * DAY,
                             .time_to_pql = NO_TIME});
    json_decref(alerts);
    finish();
}

Test(scenarios, cross_product_exploration_on_3_days_by_2_people)
{
    run_rules(SHIPPED);
    paid_account("hooli", H_PROPS(H_STR("product", "chat"), H_NUM("seats", 50)));
    for (int d = 0; d < 4; d++) { /* the product they pay for: not exploration */
        usage("hooli", "message_sent", "u1", day0 + d * DAY + HOUR,
              H_PROPS(H_STR("product", "chat")));
        usage("hooli", "message_sent", "u2", day0 + d * DAY + 2 * HOUR,
              H_PROPS(H_STR("product", "chat")));
    }
    /* u1 tries docs on three days; u2 does something untagged */
    for (int d = 1; d <= 3; d++)
        usage("hooli", "doc_edited", "u1", day0 + d * DAY + 3 * HOUR,
              H_PROPS(H_STR("product", "docs")));
    usage("hooli", "export_requested", "u2", day0 + 3 * DAY + 4 * HOUR, H_NO_PROPS);
    settle();
    json_decref(expect_alerts(0));

    /* a second person in docs */
    usage("hooli", "doc_viewed", "u2", day0 + 3 * DAY + 5 * HOUR,
          H_PROPS(H_STR("product", "docs")));
    settle();
    json_t *alerts = expect_alerts(1);
    assert_alert(alert_of(alerts, "hooli", "cross-product", "1"),
                 &(expected){.account = "hooli",
                             .rule = "cross-product",
                             .episode = "1",
                             .kind = "EXPANSION",
                             .version = SHIPPED_VERSION,
                             .triggered_at = day0 + 3 * DAY + 5 * HOUR,
                             .reasons = {"Used another product than chat on 3 of the last 14 days",
                                         "2 people explored it"},
                             .signals = "{\"other_product_days\": 3, \"other_product_users\": 2}",
                             .traits = "{\"product\": \"chat\", \"seats\": 50}",
                             .signed_up = day0 - 10 * DAY,
                             .time_to_pql = NO_TIME});
    json_decref(alerts);
    finish();
}
