/* test_config.c — defaults, the YAML file, environment, flags, their
 * precedence, error messages with positions, usage and redacted dump. */
#include "config.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char errbuf[512];
static char tmp_path[64];

static const char *write_yaml(const char *text)
{
    snprintf(tmp_path, sizeof(tmp_path), "/tmp/pqlcfg-XXXXXX");
    int fd = mkstemp(tmp_path);
    cr_assert(fd >= 0);
    size_t n = strlen(text);
    cr_assert_eq(write(fd, text, n), (ssize_t)n);
    close(fd);
    return tmp_path;
}

static void cleanup(void)
{
    if (tmp_path[0]) unlink(tmp_path);
    tmp_path[0] = '\0';
    errbuf[0] = '\0';
}

TestSuite(config, .fini = cleanup);

static const char *kafka_get(const pql_config *c, const char *key)
{
    for (size_t i = 0; i < c->nkafka; i++)
        if (strcmp(c->kafka[i].key, key) == 0) return c->kafka[i].value;
    return NULL;
}

/* Calls `fn(c, out)` and returns what it printed (caller frees). */
static char *read_back(FILE *f)
{
    long len = ftell(f);
    char *out = calloc(1, (size_t)len + 1);
    rewind(f);
    cr_assert(out && fread(out, 1, (size_t)len, f) == (size_t)len);
    fclose(f);
    return out;
}

static char *capture_dump(const pql_config *c)
{
    FILE *f = tmpfile();
    cr_assert(f);
    pql_config_dump(c, f);
    return read_back(f);
}

static char *capture_usage(void)
{
    FILE *f = tmpfile();
    cr_assert(f);
    pql_config_usage(f);
    return read_back(f);
}

/* Expects loading `yaml` to fail with exactly "<path>:<expect>". */
static void expect_file_error(const char *yaml, const char *expect)
{
    pql_config c;
    pql_config_init(&c);
    const char *path = write_yaml(yaml);
    cr_assert_eq(pql_config_load_file(&c, path, errbuf, sizeof(errbuf)), -1);
    char want[512];
    snprintf(want, sizeof(want), "%s:%s", path, expect);
    cr_expect_str_eq(errbuf, want);
    pql_config_term(&c);
    unlink(path);
}

Test(config, defaults)
{
    pql_config c;
    pql_config_init(&c);
    cr_expect_str_eq(c.brokers, "");
    cr_expect_str_eq(c.group, "pqlstream");
    cr_expect_str_eq(c.topic_usage, "usage-events");
    cr_expect_str_eq(c.topic_accounts, "account-updates");
    cr_expect_str_eq(c.topic_alerts, "pql-alerts");
    cr_expect_str_eq(c.topic_metrics, "pql-metrics");
    cr_expect_str_eq(c.topic_dlq, "pql-dlq");
    cr_expect_eq(c.nkafka, 0);
    cr_expect_str_eq(c.redis_url, "");
    cr_expect_eq(c.redis_timeout_ms, 2000);
    cr_expect_str_eq(c.rules_path, "rules");
    cr_expect_eq(c.batch_max_messages, 50000);
    cr_expect_eq(c.batch_max_ms, 100);
    cr_expect_eq(c.cache_max_accounts, 200000);
    cr_expect_eq(c.cache_max_memory, (size_t)1 << 30);
    cr_expect_eq(c.lateness_ms, PQL_MS_DAY);
    cr_expect_eq(c.max_future_skew_ms, PQL_MS_HOUR);
    cr_expect_eq(c.state_ttl_ms, 400 * PQL_MS_DAY);
    cr_expect_eq(c.input_format, PQL_WIRE_AUTO);
    cr_expect_str_eq(c.usage_writer_schema, "");
    cr_expect_str_eq(c.accounts_writer_schema, "");
    cr_expect_eq(c.nschema_ids, 0);
    cr_expect_eq(c.limits.max_message, 1024 * 1024);
    cr_expect_eq(c.limits.max_string, 4096);
    cr_expect_eq(c.limits.max_properties, 256);
    cr_expect_eq(c.output_json, 0);
    cr_expect_str_eq(c.data_dir, "pqlstream-data");
    cr_expect_eq(c.embedded_partitions, 4);
    cr_expect_eq(c.sample, 1);
    cr_expect_eq(c.sample_rate, 200);
    cr_expect_str_eq(c.log_level, "info");
    cr_expect_str_eq(c.http, "127.0.0.1:9464");
    pql_config_term(&c);
}

Test(config, yaml_file)
{
    pql_config c;
    pql_config_init(&c);
    const char *path = write_yaml("# pqlstream\n"
                                  "kafka:\n"
                                  "  brokers: k1:9092,k2:9092\n"
                                  "  security.protocol: SASL_SSL\n"
                                  "  sasl:\n"
                                  "    mechanism: PLAIN\n"
                                  "    password: hunter2\n"
                                  "group: g1\n"
                                  "topics: {usage: u, dlq: d}\n"
                                  "batch:\n"
                                  "  max_messages: 5000\n"
                                  "batch.max_ms: 50\n"
                                  "processing:\n"
                                  "  lateness: 2h\n"
                                  "state: {ttl: 30d}\n"
                                  "input:\n"
                                  "  format: confluent\n"
                                  "  schemas:\n"
                                  "    7: /s/usage-v7.avsc\n"
                                  "    \"12\": /s/accounts-v12.avsc\n"
                                  "limits: {max_string: 100}\n"
                                  "output: {format: json}\n"
                                  "embedded: {sample: off}\n"
                                  "redis: {url: 'redis://u:pw@h:6379/0'}\n"
                                  "log:\n"
                                  "  level: debug\n");
    cr_assert_eq(pql_config_load_file(&c, path, errbuf, sizeof(errbuf)), 0, "%s", errbuf);
    cr_expect_str_eq(c.brokers, "k1:9092,k2:9092");
    cr_expect_str_eq(c.group, "g1");
    cr_expect_str_eq(c.topic_usage, "u");
    cr_expect_str_eq(c.topic_dlq, "d");
    cr_expect_str_eq(c.topic_alerts, "pql-alerts");
    cr_expect_eq(c.batch_max_messages, 5000);
    cr_expect_eq(c.batch_max_ms, 50);
    cr_expect_eq(c.lateness_ms, 2 * PQL_MS_HOUR);
    cr_expect_eq(c.state_ttl_ms, 30 * PQL_MS_DAY);
    cr_expect_eq(c.input_format, PQL_WIRE_CONFLUENT);
    cr_expect_eq(c.limits.max_string, 100);
    cr_expect_eq(c.limits.max_message, 1024 * 1024);
    cr_expect_eq(c.output_json, 1);
    cr_expect_eq(c.sample, 0);
    cr_expect_str_eq(c.redis_url, "redis://u:pw@h:6379/0");
    cr_expect_str_eq(c.log_level, "debug");

    cr_assert_eq(c.nkafka, 3);
    cr_expect_str_eq(c.kafka[0].key, "security.protocol");
    cr_expect_str_eq(c.kafka[0].value, "SASL_SSL");
    cr_expect_str_eq(c.kafka[1].key, "sasl.mechanism");
    cr_expect_str_eq(c.kafka[1].value, "PLAIN");
    cr_expect_str_eq(c.kafka[2].key, "sasl.password");
    cr_expect_str_eq(c.kafka[2].value, "hunter2");

    cr_assert_eq(c.nschema_ids, 2);
    cr_expect_str_eq(c.schema_ids[0].key, "7");
    cr_expect_str_eq(c.schema_ids[0].value, "/s/usage-v7.avsc");
    cr_expect_str_eq(c.schema_ids[1].key, "12");
    cr_expect_str_eq(c.schema_ids[1].value, "/s/accounts-v12.avsc");
    pql_config_term(&c);
}

Test(config, empty_file_and_null_string)
{
    pql_config c;
    pql_config_init(&c);
    cr_assert_eq(pql_config_load_file(&c, write_yaml(""), errbuf, sizeof(errbuf)), 0, "%s", errbuf);
    unlink(tmp_path);
    cr_assert_eq(pql_config_set(&c, "kafka.brokers", "b:1", errbuf, sizeof(errbuf)), 0);
    cr_assert_eq(
        pql_config_load_file(&c, write_yaml("kafka:\n  brokers:\n"), errbuf, sizeof(errbuf)), 0,
        "%s", errbuf);
    cr_expect_str_eq(c.brokers, "");
    pql_config_term(&c);
}

Test(config, precedence)
{
    pql_config c;
    const char *path = write_yaml("batch:\n  max_ms: 20\n");
    char cfgflag[128];
    snprintf(cfgflag, sizeof(cfgflag), "--config=%s", path);
    char *envp_none[] = {NULL};
    char *envp_ms[] = {"PQLSTREAM_BATCH_MAX_MS=30", "HOME=/root", NULL};
    int argi = -1;

    /* defaults only */
    char *argv0[] = {"pqlstream", "run", NULL};
    cr_assert_eq(pql_config_load_all(&c, 2, argv0, envp_none, &argi, errbuf, sizeof(errbuf)), 0,
                 "%s", errbuf);
    cr_expect_eq(c.batch_max_ms, 100);
    cr_expect_eq(argi, 1);
    pql_config_term(&c);

    /* file */
    char *argv1[] = {"pqlstream", cfgflag, "run", NULL};
    cr_assert_eq(pql_config_load_all(&c, 3, argv1, envp_none, &argi, errbuf, sizeof(errbuf)), 0,
                 "%s", errbuf);
    cr_expect_eq(c.batch_max_ms, 20);
    cr_expect_eq(argi, 2);
    pql_config_term(&c);

    /* file < env */
    cr_assert_eq(pql_config_load_all(&c, 3, argv1, envp_ms, &argi, errbuf, sizeof(errbuf)), 0, "%s",
                 errbuf);
    cr_expect_eq(c.batch_max_ms, 30);
    pql_config_term(&c);

    /* env < flag (both flag forms); file named by PQLSTREAM_CONFIG */
    char envcfg[128];
    snprintf(envcfg, sizeof(envcfg), "PQLSTREAM_CONFIG=%s", path);
    char *envp_cfg[] = {envcfg, "PQLSTREAM_BATCH_MAX_MS=30", NULL};
    char *argv2[] = {"pqlstream", "--batch.max_ms", "40", "--group=g", "run", "x", NULL};
    cr_assert_eq(pql_config_load_all(&c, 6, argv2, envp_cfg, &argi, errbuf, sizeof(errbuf)), 0,
                 "%s", errbuf);
    cr_expect_eq(c.batch_max_ms, 40);
    cr_expect_str_eq(c.group, "g");
    cr_expect_eq(argi, 4);
    pql_config_term(&c);

    /* the file from PQLSTREAM_CONFIG alone */
    char *envp_cfg_only[] = {envcfg, NULL};
    cr_assert_eq(pql_config_load_all(&c, 2, argv0, envp_cfg_only, &argi, errbuf, sizeof(errbuf)),
                 0);
    cr_expect_eq(c.batch_max_ms, 20);
    pql_config_term(&c);
}

Test(config, env_aliases_and_passthrough)
{
    pql_config c;
    pql_config_init(&c);
    char *envp[] = {"PQLSTREAM_BROKERS=b1:9092",
                    "PQLSTREAM_REDIS=redis://r:6379",
                    "PQLSTREAM_RULES=/etc/pql/rules",
                    "PQLSTREAM_GROUP=grp",
                    "PQLSTREAM_INSTANCE_ID=pqlstream-2",
                    "PQLSTREAM_TOPIC_USAGE=tu",
                    "PQLSTREAM_TOPIC_ACCOUNTS=ta",
                    "PQLSTREAM_TOPIC_ALERTS=tal",
                    "PQLSTREAM_TOPIC_METRICS=tm",
                    "PQLSTREAM_TOPIC_DLQ=td",
                    "PQLSTREAM_DATA_DIR=/var/lib/pql",
                    "PQLSTREAM_LOG_LEVEL=warn",
                    "PQLSTREAM_KAFKA_SECURITY_PROTOCOL=SSL",
                    "PQLSTREAM_INPUT_SCHEMAS_42=/s/42.avsc",
                    "PQLSTREAM_EMBEDDED_SAMPLE=no",
                    "PQLSTREAM_CONFIG=/nonexistent-is-not-read-here.yaml",
                    "PATH=/bin",
                    NULL};
    cr_assert_eq(pql_config_load_env(&c, envp, errbuf, sizeof(errbuf)), 0, "%s", errbuf);
    cr_expect_str_eq(c.brokers, "b1:9092");
    cr_expect_str_eq(c.redis_url, "redis://r:6379");
    cr_expect_str_eq(c.rules_path, "/etc/pql/rules");
    cr_expect_str_eq(c.group, "grp");
    cr_expect_str_eq(c.instance_id, "pqlstream-2");
    cr_expect_str_eq(c.topic_usage, "tu");
    cr_expect_str_eq(c.topic_accounts, "ta");
    cr_expect_str_eq(c.topic_alerts, "tal");
    cr_expect_str_eq(c.topic_metrics, "tm");
    cr_expect_str_eq(c.topic_dlq, "td");
    cr_expect_str_eq(c.data_dir, "/var/lib/pql");
    cr_expect_str_eq(c.log_level, "warn");
    cr_expect_eq(c.sample, 0);
    cr_assert_eq(c.nkafka, 1);
    cr_expect_str_eq(kafka_get(&c, "security.protocol"), "SSL");
    cr_assert_eq(c.nschema_ids, 1);
    cr_expect_str_eq(c.schema_ids[0].key, "42");
    pql_config_term(&c);

    /* the full name beats the short alias whatever their order */
    pql_config_init(&c);
    char *both[] = {"PQLSTREAM_KAFKA_BROKERS=full:1", "PQLSTREAM_BROKERS=alias:1", NULL};
    cr_assert_eq(pql_config_load_env(&c, both, errbuf, sizeof(errbuf)), 0, "%s", errbuf);
    cr_expect_str_eq(c.brokers, "full:1");
    cr_expect_eq(c.nkafka, 0);
    pql_config_term(&c);
}

Test(config, kafka_passthrough_later_wins)
{
    pql_config c;
    pql_config_init(&c);
    const char *path = write_yaml("kafka: {security: {protocol: PLAINTEXT}, acks: all}\n");
    cr_assert_eq(pql_config_load_file(&c, path, errbuf, sizeof(errbuf)), 0, "%s", errbuf);
    char *envp[] = {"PQLSTREAM_KAFKA_SECURITY_PROTOCOL=SSL", NULL};
    cr_assert_eq(pql_config_load_env(&c, envp, errbuf, sizeof(errbuf)), 0);
    char *argv[] = {"pqlstream", "--kafka.acks=1", NULL};
    cr_assert_eq(pql_config_parse_flags(&c, 2, argv, errbuf, sizeof(errbuf)), 2, "%s", errbuf);
    cr_assert_eq(c.nkafka, 2);
    cr_expect_str_eq(c.kafka[0].key, "security.protocol");
    cr_expect_str_eq(c.kafka[0].value, "SSL");
    cr_expect_str_eq(c.kafka[1].key, "acks");
    cr_expect_str_eq(c.kafka[1].value, "1");
    pql_config_term(&c);
}

Test(config, unknown_key_in_file)
{
    expect_file_error("group: g1\n"
                      "bach:\n"
                      "  max_messages: 5\n",
                      "3:3: unknown option 'bach.max_messages' (did you mean "
                      "'batch.max_messages'?)");
    expect_file_error("grup: g1\n", "1:1: unknown option 'grup' (did you mean 'group'?)");
    expect_file_error("completely_wrong: 1\n", "1:1: unknown option 'completely_wrong'");
}

Test(config, bad_values_in_file)
{
    expect_file_error("batch:\n  max_ms: ten\n", "2:11: batch.max_ms: 'ten' is not an integer");
    expect_file_error("processing: {lateness: 7}\n",
                      "1:24: processing.lateness: '7' is not a duration (examples: 7d, 24h, "
                      "30m, 90s, 500ms, 0)");
    expect_file_error("embedded:\n  sample: maybe\n",
                      "2:11: embedded.sample: 'maybe' is not a boolean (true/false, yes/no, "
                      "on/off, 1/0)");
    expect_file_error("input:\n  format: xml\n",
                      "2:11: input.format: 'xml' is not one of auto, avro, confluent");
    expect_file_error("log: {level: loud}\n",
                      "1:14: log.level: 'loud' is not one of debug, info, warn, error");
    expect_file_error("batch: 5\n", "1:1: 'batch' is a section: expected a mapping (batch: {…})");
    expect_file_error("group: [a, b]\n", "1:1: group: expected a single value, not a list");
    expect_file_error("input:\n  schemas: {abc: x.avsc}\n",
                      "2:18: input.schemas.abc: 'abc' is not a schema id (a number up to "
                      "4294967295)");
    expect_file_error("- a\n- b\n", "1:1: expected a mapping of options (key: value)");
}

Test(config, yaml_syntax_error)
{
    expect_file_error("group: g1\nbatch:\n  max_ms: [1\n",
                      "4:1: YAML syntax error: flow sequence without a closing bracket");
    expect_file_error("group: a\ngroup: b\n", "2:1: YAML syntax error: duplicate key");
}

Test(config, missing_file)
{
    pql_config c;
    pql_config_init(&c);
    cr_assert_eq(pql_config_load_file(&c, "/nonexistent/pql.yaml", errbuf, sizeof(errbuf)), -1);
    cr_expect_str_eq(errbuf, "/nonexistent/pql.yaml: cannot open: No such file or directory");
    pql_config_term(&c);
}

Test(config, bad_values_by_flag_and_env)
{
    pql_config c;
    pql_config_init(&c);
    cr_expect_eq(pql_config_set(&c, "batch.max_ms", "ten", errbuf, sizeof(errbuf)), -1);
    cr_expect_str_eq(errbuf, "--batch.max_ms: 'ten' is not an integer");
    cr_expect_eq(pql_config_set(&c, "batch.max_messages", "0", errbuf, sizeof(errbuf)), -1);
    cr_expect_str_eq(errbuf, "--batch.max_messages: '0' is too small (at least 1)");
    cr_expect_eq(pql_config_set(&c, "batch.max_ms", "99999999999", errbuf, sizeof(errbuf)), -1);
    cr_expect_str_eq(errbuf, "--batch.max_ms: '99999999999' is too large (at most 2147483647)");
    cr_expect_eq(pql_config_set(&c, "state.ttl", "400", errbuf, sizeof(errbuf)), -1);
    cr_expect_str_eq(errbuf,
                     "--state.ttl: '400' is not a duration (examples: 7d, 24h, 30m, 90s, 500ms, "
                     "0)");
    cr_expect_eq(pql_config_set(&c, "output.format", "xml", errbuf, sizeof(errbuf)), -1);
    cr_expect_str_eq(errbuf, "--output.format: 'xml' is not one of avro, json");
    cr_expect_eq(pql_config_set(&c, "bach.max_ms", "1", errbuf, sizeof(errbuf)), -1);
    cr_expect_str_eq(errbuf, "unknown option '--bach.max_ms' (did you mean '--batch.max_ms'?)");

    cr_expect_eq(pql_config_set(&c, "embedded.sample", "off", errbuf, sizeof(errbuf)), 0);
    cr_expect_eq(c.sample, 0);
    cr_expect_eq(pql_config_set(&c, "embedded.sample", "YES", errbuf, sizeof(errbuf)), 0);
    cr_expect_eq(c.sample, 1);
    cr_expect_eq(pql_config_set(&c, "state.ttl", "2w", errbuf, sizeof(errbuf)), 0);
    cr_expect_eq(c.state_ttl_ms, 14 * PQL_MS_DAY);

    char *envp[] = {"PQLSTREAM_EMBEDDED_SAMPLE=sometimes", NULL};
    cr_expect_eq(pql_config_load_env(&c, envp, errbuf, sizeof(errbuf)), -1);
    cr_expect_str_eq(errbuf, "PQLSTREAM_EMBEDDED_SAMPLE: 'sometimes' is not a boolean "
                             "(true/false, yes/no, on/off, 1/0)");

    char *argv[] = {"pqlstream", "--batch.max_ms", NULL};
    cr_expect_eq(pql_config_parse_flags(&c, 2, argv, errbuf, sizeof(errbuf)), -1);
    cr_expect_str_eq(errbuf, "--batch.max_ms: needs a value (--batch.max_ms=VALUE)");
    char *argv2[] = {"pqlstream", "-v", NULL};
    cr_expect_eq(pql_config_parse_flags(&c, 2, argv2, errbuf, sizeof(errbuf)), -1);
    cr_expect_str_eq(errbuf, "unknown flag '-v' (options are --key=value)");
    char *argv3[] = {"pqlstream", "--group=a", "--", "--not-a-flag", NULL};
    cr_expect_eq(pql_config_parse_flags(&c, 4, argv3, errbuf, sizeof(errbuf)), 3);
    pql_config_term(&c);
}

Test(config, byte_sizes_take_binary_units)
{
    static const struct {
        const char *in;
        size_t bytes;
        const char *dumped;
    } ok[] = {{"0", 0, "0"},
              {"1000", 1000, "1000"},
              {"64k", 64 << 10, "64k"},
              {"512M", (size_t)512 << 20, "512m"},
              {"2g", (size_t)2 << 30, "2g"},
              {"1536m", (size_t)1536 << 20, "1536m"},
              {"1048576", 1 << 20, "1m"}};
    pql_config c;
    pql_config_init(&c);
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        cr_assert_eq(pql_config_set(&c, "cache.max_memory", ok[i].in, errbuf, sizeof(errbuf)), 0,
                     "%s: %s", ok[i].in, errbuf);
        cr_expect_eq(c.cache_max_memory, ok[i].bytes, "%s", ok[i].in);
        char *out = capture_dump(&c), want[64];
        snprintf(want, sizeof want, "\ncache.max_memory=%s\n", ok[i].dumped);
        cr_expect_not_null(strstr(out, want), "%s dumped as: %s", ok[i].in, out);
        free(out);
    }
    static const char *bad[] = {"", "1.5g", "-1", "1t", "1gb", " 1g", "g", "99999999999g"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        cr_expect_eq(pql_config_set(&c, "cache.max_memory", bad[i], errbuf, sizeof(errbuf)), -1,
                     "'%s' accepted", bad[i]);
        char want[160];
        snprintf(want, sizeof want,
                 "--cache.max_memory: '%s' is not a size in bytes (examples: 1073741824, 512m, 1g)",
                 bad[i]);
        cr_expect_str_eq(errbuf, want);
    }
    pql_config_term(&c);
}

Test(config, unknown_env_var)
{
    pql_config c;
    pql_config_init(&c);
    char *envp[] = {"PQLSTREAM_BROKER=b:1", NULL};
    cr_expect_eq(pql_config_load_env(&c, envp, errbuf, sizeof(errbuf)), -1);
    cr_expect_str_eq(errbuf, "unknown environment variable PQLSTREAM_BROKER (did you mean "
                             "'PQLSTREAM_BROKERS'?)");
    char *envp2[] = {"PQLSTREAM_BATCH_MAX_MSG=1", NULL};
    cr_expect_eq(pql_config_load_env(&c, envp2, errbuf, sizeof(errbuf)), -1);
    cr_expect_str_eq(errbuf, "unknown environment variable PQLSTREAM_BATCH_MAX_MSG (did you "
                             "mean 'PQLSTREAM_BATCH_MAX_MS'?)");
    char *envp3[] = {"PQLSTREAM_WHATEVER=1", NULL};
    cr_expect_eq(pql_config_load_env(&c, envp3, errbuf, sizeof(errbuf)), -1);
    cr_expect_str_eq(errbuf, "unknown environment variable PQLSTREAM_WHATEVER");
    pql_config_term(&c);
}

Test(config, dump_redacts_secrets)
{
    pql_config c;
    pql_config_init(&c);
    cr_assert_eq(
        pql_config_set(&c, "redis.url", "redis://app:s3cret@redis:6379/0", errbuf, sizeof(errbuf)),
        0);
    cr_assert_eq(pql_config_set(&c, "kafka.sasl.password", "hunter2", errbuf, sizeof(errbuf)), 0);
    cr_assert_eq(pql_config_set(&c, "kafka.ssl.key.password", "k3y", errbuf, sizeof(errbuf)), 0);
    cr_assert_eq(pql_config_set(&c, "kafka.sasl.username", "app", errbuf, sizeof(errbuf)), 0);
    cr_assert_eq(pql_config_set(&c, "input.schemas.7", "/s/7.avsc", errbuf, sizeof(errbuf)), 0);
    char *out = capture_dump(&c);
    cr_expect(strstr(out, "redis.url=redis://app:***@redis:6379/0\n") != NULL, "%s", out);
    cr_expect(strstr(out, "kafka.sasl.password=***\n") != NULL, "%s", out);
    cr_expect(strstr(out, "kafka.ssl.key.password=***\n") != NULL, "%s", out);
    cr_expect(strstr(out, "kafka.sasl.username=app\n") != NULL, "%s", out);
    cr_expect(strstr(out, "input.schemas.7=/s/7.avsc\n") != NULL, "%s", out);
    cr_expect(strstr(out, "state.ttl=400d\n") != NULL, "%s", out);
    cr_expect(strstr(out, "processing.max_future_skew=1h\n") != NULL, "%s", out);
    cr_expect(strstr(out, "embedded.sample=true\n") != NULL, "%s", out);
    cr_expect(strstr(out, "input.format=auto\n") != NULL, "%s", out);
    cr_expect(strstr(out, "limits.max_message=1048576\n") != NULL, "%s", out);
    cr_expect(strstr(out, "s3cret") == NULL && strstr(out, "hunter2") == NULL &&
                  strstr(out, "k3y") == NULL,
              "%s", out);
    free(out);

    cr_assert_eq(pql_config_set(&c, "redis.url", "redis://:pw@h", errbuf, sizeof(errbuf)), 0);
    out = capture_dump(&c);
    cr_expect(strstr(out, "redis.url=redis://:***@h\n") != NULL, "%s", out);
    free(out);
    cr_assert_eq(pql_config_set(&c, "redis.url", "unix:///run/redis.sock", errbuf, sizeof(errbuf)),
                 0);
    out = capture_dump(&c);
    cr_expect(strstr(out, "redis.url=unix:///run/redis.sock\n") != NULL, "%s", out);
    free(out);
    pql_config_term(&c);
}

Test(config, usage_lists_every_option)
{
    char *out = capture_usage();
    static const char *const keys[] = {
        "--kafka.brokers",
        "--group",
        "--topics.usage",
        "--topics.accounts",
        "--topics.alerts",
        "--topics.metrics",
        "--topics.dlq",
        "--redis.url",
        "--redis.timeout_ms",
        "--rules",
        "--batch.max_messages",
        "--batch.max_ms",
        "--cache.max_accounts",
        "--processing.lateness",
        "--processing.max_future_skew",
        "--state.ttl",
        "--input.format",
        "--input.usage_writer_schema",
        "--input.accounts_writer_schema",
        "--limits.max_message",
        "--limits.max_string",
        "--limits.max_properties",
        "--output.format",
        "--data_dir",
        "--embedded.partitions",
        "--embedded.sample",
        "--embedded.sample_rate",
        "--log.level",
        "--kafka.<property>",
    };
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
        cr_expect(strstr(out, keys[i]) != NULL, "missing %s", keys[i]);

    /* one line per option: key, env var, default, help — in that order */
    struct {
        const char *key, *env, *def;
    } rows[] = {
        {"--kafka.brokers ", "PQLSTREAM_BROKERS ", "\"\" "},
        {"--batch.max_messages ", "PQLSTREAM_BATCH_MAX_MESSAGES ", "50000 "},
        {"--state.ttl ", "PQLSTREAM_STATE_TTL ", "400d "},
        {"--topics.dlq ", "PQLSTREAM_TOPIC_DLQ ", "pql-dlq "},
        {"--log.level ", "PQLSTREAM_LOG_LEVEL ", "info "},
    };
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        const char *line = strstr(out, rows[i].key);
        cr_assert(line, "missing %s", rows[i].key);
        const char *eol = strchr(line, '\n');
        const char *env = strstr(line, rows[i].env);
        cr_expect(env && env < eol, "%s: no env var on its line", rows[i].key);
        const char *def = env ? strstr(env, rows[i].def) : NULL;
        cr_expect(def && def < eol, "%s: no default on its line", rows[i].key);
    }
    /* columns line up: the env column starts at the same offset on every row */
    const char *a = strstr(out, "--group ");
    const char *b = strstr(out, "--redis.url ");
    cr_assert(a && b);
    const char *la = a, *lb = b;
    while (la > out && la[-1] != '\n')
        la--;
    while (lb > out && lb[-1] != '\n')
        lb--;
    cr_expect_eq(strstr(a, "PQLSTREAM_GROUP") - la, strstr(b, "PQLSTREAM_REDIS") - lb);
    free(out);
}
