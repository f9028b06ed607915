/* test_cli.c — the pqlstream program as a user meets it: subcommands, exit
 * codes, and the messages of refusals (rules, config, topics). */
#include "harness.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Runs pqlstream with args; returns exit code and the combined output. */
static int run(char **out, const char *const *argv, const char *const *env)
{
    h_proc *p = h_proc_start_argv(argv, env);
    int rc = h_proc_wait(p, 60000);
    *out = h_proc_log(p);
    if (rc < 0) h_proc_dump_log(p, 40);
    h_proc_stop(p);
    return rc;
}

static const char *const no_env[] = {NULL};

Test(cli, version)
{
    char *out;
    const char *argv[] = {"pqlstream", "version", NULL};
    cr_assert_eq(run(&out, argv, no_env), 0);
    cr_assert(strstr(out, "pqlstream 0.1.0"), "%s", out);
    free(out);
}

Test(cli, rules_check_ok_and_errors_with_position)
{
    char *out;
    const char *ok[] = {"pqlstream", "rules", "check", PQL_SOURCE_DIR "/rules", NULL};
    cr_assert_eq(run(&out, ok, no_env), 0);
    cr_assert(strstr(out, "ok — version 1+1, 11 signals, 7 rules"), "%s", out);
    free(out);

    char *dir = h_mkdtemp(), path[512];
    snprintf(path, sizeof(path), "%s/bad.yaml", dir);
    h_write_file(path, "signals:\n  invites: { count: teammate_invited, window: 14d }\npql:\n"
                       "  - name: r\n    when: invite >= 1\n");
    const char *bad[] = {"pqlstream", "rules", "check", path, NULL};
    cr_assert_eq(run(&out, bad, no_env), 1);
    char want[700];
    snprintf(want, sizeof(want),
             "%s:5:11: error: in when: unknown signal 'invite' (did you mean 'invites'?)", path);
    cr_assert(strstr(out, want), "%s", out);
    free(out);
    h_rmtree(dir);
    free(dir);
}

Test(cli, run_help_documents_options_with_env_and_defaults)
{
    char *out;
    const char *argv[] = {"pqlstream", "run", "--help", NULL};
    cr_assert_eq(run(&out, argv, no_env), 0);
    static const char *needles[] = {"PQLSTREAM_BROKERS",
                                    "PQLSTREAM_REDIS",
                                    "PQLSTREAM_RULES",
                                    "PQLSTREAM_GROUP",
                                    "PQLSTREAM_TOPIC_USAGE",
                                    "PQLSTREAM_TOPIC_ACCOUNTS",
                                    "PQLSTREAM_TOPIC_ALERTS",
                                    "PQLSTREAM_TOPIC_METRICS",
                                    "PQLSTREAM_TOPIC_DLQ",
                                    "PQLSTREAM_KAFKA_<PROPERTY>",
                                    "usage-events"};
    for (size_t i = 0; i < sizeof(needles) / sizeof(*needles); i++)
        cr_assert(strstr(out, needles[i]), "missing %s", needles[i]);
    free(out);
}

Test(cli, bad_configuration_is_refused_with_the_reason)
{
    char *out;
    const char *argv[] = {"pqlstream", "run", "--batch.max_ms=soon", NULL};
    cr_assert_eq(run(&out, argv, no_env), 2);
    cr_assert(strstr(out, "batch.max_ms"), "%s", out);
    free(out);
    const char *env[] = {"PQLSTREAM_BROKRS=x", NULL};
    const char *argv2[] = {"pqlstream", "run", NULL};
    cr_assert_eq(run(&out, argv2, env), 2);
    cr_assert(strstr(out, "PQLSTREAM_BROKRS"), "%s", out);
    free(out);
}

Test(cli, topics_that_are_not_co_partitioned_are_refused, .timeout = 120)
{
    h_redis *r = h_redis_start();
    h_kafka *k4 = h_kafka_start(4, "usage-events", NULL);
    /* a second cluster cannot share topics; create the other topic with 6
       partitions on the same mock cluster instead */
    cr_assert_eq(rd_kafka_mock_topic_create(h_kafka_mock(k4), "account-updates", 6, 1), 0);
    char brokers[512], redis[512], rules[512];
    snprintf(brokers, sizeof(brokers), "PQLSTREAM_BROKERS=%s", h_kafka_bootstraps(k4));
    snprintf(redis, sizeof(redis), "PQLSTREAM_REDIS=%s", h_redis_url(r));
    snprintf(rules, sizeof(rules), "PQLSTREAM_RULES=%s/rules", PQL_SOURCE_DIR);
    const char *env[] = {brokers, redis, rules, NULL};
    const char *argv[] = {"pqlstream", "run", NULL};
    char *out;
    cr_assert_eq(run(&out, argv, env), 1);
    cr_assert(strstr(out, "input topics are not co-partitioned: 'usage-events' has 4 partitions, "
                          "'account-updates' has 6"),
              "%s", out);
    free(out);
    h_kafka_stop(k4);
    h_redis_stop(r);
}

Test(cli, invalid_rules_refuse_to_start)
{
    char *dir = h_mkdtemp(), path[512], env_rules[600];
    snprintf(path, sizeof(path), "%s/r.yaml", dir);
    h_write_file(path, "pql:\n  - name: x\n    when: (1 > 0\n");
    snprintf(env_rules, sizeof(env_rules), "PQLSTREAM_RULES=%s", path);
    const char *env[] = {env_rules, NULL};
    const char *argv[] = {"pqlstream", "run", NULL};
    char *out;
    cr_assert_eq(run(&out, argv, env), 1);
    cr_assert(strstr(out, "the rule set is invalid; nothing started"), "%s", out);
    cr_assert(strstr(out, "r.yaml:3:11: error: in when:"), "%s", out);
    free(out);
    h_rmtree(dir);
    free(dir);
}

/* `rules explain` reads the state a real run left in Redis. */
Test(cli, rules_explain_reads_live_state, .timeout = 180)
{
    const int64_t t0 = 1793491200000LL; /* 2026-11-01 00:00 UTC */
    h_redis *r = h_redis_start();
    h_kafka *k = h_kafka_start(4, "usage-events", "account-updates", "pql-alerts", "pql-dlq",
                               "pql-metrics", NULL);
    char *dir = h_mkdtemp(), path[512];
    snprintf(path, sizeof(path), "%s/r.yaml", dir);
    h_write_file(path, "version: 5\n"
                       "lifecycle: { signup: signed_up, conversion: subscription_started }\n"
                       "traits: { seats: number }\n"
                       "signals:\n"
                       "  logins:  { count: login, window: 7d }\n"
                       "  invites: { count: teammate_invited, window: 14d }\n"
                       "pql:\n"
                       "  - name: team\n"
                       "    when: logins >= 2 and invites >= 1\n");
    h_produce_account(k, "account-updates", -1, "acme", t0, H_PROPS(H_NUM("seats", 3)));
    h_produce_usage(k, "usage-events", -1, "acme", "signed_up", "u1", t0, H_NO_PROPS);
    h_produce_usage(k, "usage-events", -1, "acme", "login", "u1", t0 + 3600000, H_NO_PROPS);
    h_flush(k);
    h_proc *p = h_proc_start("PQLSTREAM_BROKERS", h_kafka_bootstraps(k), "PQLSTREAM_REDIS",
                             h_redis_url(r), "PQLSTREAM_RULES", path, "PQLSTREAM_GROUP", "gx",
                             "PQLSTREAM_KAFKA_SESSION_TIMEOUT_MS", "6000", NULL);
    H_ASSERT_PROC(
        p, h_wait_offsets_of(p, k, h_redis_url(r), "gx", "usage-events", 4, NULL, 60000) == 0);
    cr_assert_eq(h_proc_stop(p), 0);

    char redis[512], rules[600];
    snprintf(redis, sizeof(redis), "PQLSTREAM_REDIS=%s", h_redis_url(r));
    snprintf(rules, sizeof(rules), "PQLSTREAM_RULES=%s", path);
    const char *env[] = {redis, rules, NULL};
    const char *argv[] = {"pqlstream", "rules", "explain", "--account", "acme", "--group=gx", NULL};
    char *out;
    cr_assert_eq(run(&out, argv, env), 0, "%s", out);
    const char *want[] = {
        "rule set version 5)\n",
        "  latest event           2026-11-01 01:00 UTC",
        "  signed up              2026-11-01 00:00 UTC\n",
        "Traits\n  seats  3\n",
        "Signals\n  logins   1\n  invites  0\n",
        "  team (PQL, threshold, for free accounts)\n"
        "    → does not hold: logins >= 2, invites >= 1\n"
        "      ✗ logins >= 2\n"
        "      ✗ invites >= 1\n",
    };
    for (size_t i = 0; i < sizeof(want) / sizeof(*want); i++)
        cr_assert(strstr(out, want[i]), "missing:\n%s\nin:\n%s", want[i], out);
    free(out);

    const char *json[] = {"pqlstream", "rules",   "explain", "--account=acme",
                          "--json",    "--group", "gx",      NULL};
    cr_assert_eq(run(&out, json, env), 0, "%s", out);
    cr_assert(strstr(out, "\"account_id\": \"acme\""), "%s", out);
    cr_assert(strstr(out, "\"verdict\": \"does not hold: logins >= 2, invites >= 1\""), "%s", out);
    free(out);

    const char *none[] = {"pqlstream", "rules",      "explain", "--account",
                          "nobody",    "--group=gx", NULL};
    cr_assert_eq(run(&out, none, env), 1);
    cr_assert(strstr(out, "no state for account 'nobody' in group 'gx' (partitions 0-1023"), "%s",
              out);
    free(out);
    h_kafka_stop(k);
    h_redis_stop(r);
    h_rmtree(dir);
    free(dir);
}

Test(cli, rules_explain_without_redis_or_data_says_what_to_do)
{
    char *dir = h_mkdtemp(), data[600];
    snprintf(data, sizeof(data), "PQLSTREAM_DATA_DIR=%s/none", dir);
    const char *env[] = {data, "PQLSTREAM_RULES=" PQL_SOURCE_DIR "/rules", NULL};
    const char *argv[] = {"pqlstream", "rules", "explain", "--account", "acme", NULL};
    char *out;
    cr_assert_eq(run(&out, argv, env), 1);
    cr_assert(strstr(out, "no Redis is configured (redis.url, PQLSTREAM_REDIS) and the embedded "
                          "default has no data in "),
              "%s", out);
    cr_assert(strstr(out, "run `pqlstream run` in this directory first, or set PQLSTREAM_REDIS"),
              "%s", out);
    free(out);
    h_rmtree(dir);
    free(dir);
}

Test(cli, config_prints_the_effective_configuration_with_secrets_redacted)
{
    char *out;
    const char *env[] = {"PQLSTREAM_REDIS=redis://ops:hunter2@redis.internal:6380/2",
                         "PQLSTREAM_KAFKA_SASL_PASSWORD=s3cr3t-sasl",
                         "PQLSTREAM_KAFKA_SASL_USERNAME=svc-pql", "PQLSTREAM_INSTANCE_ID=pod-3",
                         NULL};
    const char *argv[] = {"pqlstream", "config", "--batch.max_ms=250", NULL};
    cr_assert_eq(run(&out, argv, env), 0, "%s", out);
    cr_assert(strstr(out, "redis.url=redis://ops:***@redis.internal:6380/2\n"), "%s", out);
    cr_assert(strstr(out, "kafka.sasl.password=***\n"), "%s", out);
    cr_assert(strstr(out, "kafka.sasl.username=svc-pql\n"), "%s", out);
    cr_assert(strstr(out, "instance_id=pod-3\n"), "%s", out);
    cr_assert(strstr(out, "batch.max_ms=250\n"), "%s", out);
    cr_assert(!strstr(out, "hunter2") && !strstr(out, "s3cr3t"), "a secret leaked:\n%s", out);
    free(out);
}

Test(cli, redis_credentials_never_reach_the_log, .timeout = 120)
{
    /* a refused password stops start-up with a message that names the
       server and the fix, not the password */
    h_redis *r = h_redis_start();
    char url[600], *dir = h_mkdtemp(), data[600], env_url[700], env_data[700];
    snprintf(url, sizeof url, "unix://:hunter2@%s", h_redis_url(r) + strlen("unix://"));
    snprintf(env_url, sizeof env_url, "PQLSTREAM_REDIS=%s", url);
    snprintf(data, sizeof data, "%s/data", dir);
    snprintf(env_data, sizeof env_data, "PQLSTREAM_DATA_DIR=%s", data);
    const char *env[] = {env_url, env_data, "PQLSTREAM_EMBEDDED_SAMPLE=false",
                         "PQLSTREAM_RULES=" PQL_SOURCE_DIR "/rules", NULL};
    const char *argv[] = {"pqlstream", "run", NULL};
    char *out;
    cr_assert_eq(run(&out, argv, env), 1, "%s", out);
    cr_assert(strstr(out, "AUTH refused"), "%s", out);
    cr_assert(strstr(out, "check the user and password in PQLSTREAM_REDIS"), "%s", out);
    cr_assert(!strstr(out, "hunter2"), "the password leaked:\n%s", out);
    free(out);

    /* an unreachable server: it waits (paused), logging each retry, and
       never the password */
    snprintf(env_url, sizeof env_url, "PQLSTREAM_REDIS=redis://:hunter2@127.0.0.1:1");
    h_proc *p = h_proc_start_argv(argv, env);
    H_ASSERT_PROC(p, h_proc_wait_log(p, "retry_ms=400", 30000) == 0);
    char *log = h_proc_log(p);
    H_ASSERT_PROC(p, strstr(log, "127.0.0.1:1"), "the log names the server");
    H_ASSERT_PROC(p, !strstr(log, "hunter2"), "the password leaked");
    free(log);
    cr_assert_eq(h_proc_stop(p), 0, "SIGTERM while waiting for Redis exits 0");
    h_redis_stop(r);
    h_rmtree(dir);
    free(dir);
}

Test(cli, the_shipped_example_configuration_loads)
{
    char *out;
    const char *argv[] = {"pqlstream", "config", "--config",
                          PQL_SOURCE_DIR "/deploy/pqlstream.yaml", NULL};
    cr_assert_eq(run(&out, argv, no_env), 0, "%s", out);
    cr_assert(strstr(out, "kafka.brokers=kafka-1:9092,kafka-2:9092,kafka-3:9092\n"), "%s", out);
    cr_assert(strstr(out, "kafka.session.timeout.ms=10000\n"), "%s", out);
    cr_assert(strstr(out, "redis.url=redis://redis.internal:6379/0\n"), "%s", out);
    free(out);

    /* a URL the processor would refuse is refused here too */
    const char *env[] = {"PQLSTREAM_REDIS=redis://pqlstream@redis.internal:6379/0", NULL};
    cr_assert_eq(run(&out, argv, env), 2, "%s", out);
    cr_assert(strstr(out, "redis.url: Redis URL: credentials need a password"), "%s", out);
    free(out);
}

Test(cli, the_shipped_prometheus_alerting_rules_pass_promtool)
{
    if (system("command -v promtool >/dev/null 2>&1") != 0)
        cr_skip_test("promtool is not installed (Debian package prometheus; scripts/setup installs "
                     "it)");
    FILE *f =
        popen("promtool check rules " PQL_SOURCE_DIR "/deploy/prometheus/alerts.yaml 2>&1", "r");
    cr_assert_not_null(f);
    char out[4096];
    size_t n = fread(out, 1, sizeof(out) - 1, f);
    out[n] = '\0';
    cr_assert_eq(pclose(f), 0, "%s", out);
    cr_assert(strstr(out, "SUCCESS: 8 rules found"), "%s", out);
}
