/* config.h — pqlstream's configuration: one YAML file, environment variables,
 * flags; later sources override earlier ones:
 *
 *     built-in defaults  <  YAML file (--config / PQLSTREAM_CONFIG)
 *                        <  PQLSTREAM_* environment  <  command-line flags
 *
 * Every option has one dotted key (`batch.max_messages`), which is its path
 * in the YAML file (batch: {max_messages: 5000}), its environment variable
 * (PQLSTREAM_BATCH_MAX_MESSAGES: upper case, dots → underscores; a few short
 * aliases such as PQLSTREAM_BROKERS are listed in the table) and its flag
 * (--batch.max_messages=5000 or --batch.max_messages 5000).
 *
 * librdkafka pass-through: `kafka.<property>` in the file (kafka:
 * {security.protocol: SASL_SSL} or nested kafka: {security: {protocol: …}}),
 * PQLSTREAM_KAFKA_<PROPERTY> in the environment (SECURITY_PROTOCOL →
 * security.protocol: lower case, '_' → '.'), --kafka.<property>=V as a flag.
 * They are handed to librdkafka as is (it validates them).
 *
 * Secrets: values of keys containing "password", "secret", "sasl.jaas" or
 * "sasl.oauthbearer", and the password part of redis URLs, print as "***"
 * in pql_config_dump(). */
#ifndef PQL_CONFIG_H
#define PQL_CONFIG_H

#include "common.h"
#include "decode.h"

#include <stdio.h>

typedef struct pql_kv {
    char *key;
    char *value;
} pql_kv;

typedef struct pql_config {
    /* Kafka */
    char *brokers;     /* kafka.brokers / PQLSTREAM_BROKERS; "" = embedded mock cluster */
    char *group;       /* group / PQLSTREAM_GROUP, default "pqlstream" */
    char *instance_id; /* static membership (group.instance.id); "" dynamic */
    char *topic_usage; /* topics.usage / PQLSTREAM_TOPIC_USAGE, default "usage-events" */
    char
        *topic_accounts; /* topics.accounts / PQLSTREAM_TOPIC_ACCOUNTS, default "account-updates" */
    char *topic_alerts;  /* topics.alerts / PQLSTREAM_TOPIC_ALERTS, default "pql-alerts" */
    char *topic_metrics; /* topics.metrics / PQLSTREAM_TOPIC_METRICS, default "pql-metrics" */
    char *topic_dlq;     /* topics.dlq / PQLSTREAM_TOPIC_DLQ, default "pql-dlq" */
    pql_kv *kafka;       /* kafka.<property> pass-through, in order set (later wins);
                          * a key appears once: re-setting it moves it to the end */
    size_t nkafka;

    /* Redis */
    char *redis_url;      /* redis.url / PQLSTREAM_REDIS; "" = private redis-server child */
    int redis_timeout_ms; /* redis.timeout_ms, default 2000 */

    /* Rules */
    char *rules_path;       /* rules / PQLSTREAM_RULES: file or directory, default "rules" */
    int64_t rules_watch_ms; /* rules.watch: poll the files for changes; 0 = SIGHUP only */

    /* Processing */
    int batch_max_messages;     /* batch.max_messages, default 10000 */
    int batch_max_ms;           /* batch.max_ms, default 100 */
    int cache_max_accounts;     /* cache.max_accounts (per process), default 200000 */
    size_t cache_max_memory;    /* cache.max_memory (per process, bytes; 0: none), default 1 GiB */
    int64_t lateness_ms;        /* processing.lateness, duration, default "1d" */
    int64_t max_future_skew_ms; /* processing.max_future_skew, default "1h" */
    int64_t max_task_idle_ms;   /* processing.max_task_idle, default "2s": see pipeline.h */
    int64_t state_ttl_ms;       /* state.ttl: Redis TTL of account state, default "400d" */

    /* Input decoding */
    pql_wire input_format;        /* input.format: auto | avro | confluent, default auto */
    char *usage_writer_schema;    /* input.usage_writer_schema: .avsc path, "" = ours */
    char *accounts_writer_schema; /* input.accounts_writer_schema: .avsc path, "" = ours */
    pql_kv *schema_ids;           /* input.schemas: {"<id>": "<path.avsc>"} (Confluent ids);
                                   * also PQLSTREAM_INPUT_SCHEMAS_<ID>, --input.schemas.<id> */
    size_t nschema_ids;
    pql_limits limits; /* limits.max_message / max_string / max_properties */

    /* Output */
    int output_json; /* output.format: avro (0, default) | json (1) */

    /* Metric aggregates (docs/metrics.md) */
    int64_t metrics_interval_ms; /* metrics.interval, default "60s"; 0s: counted, not emitted */
    char *metrics_channel_trait; /* metrics.channel_trait, default "channel" */
    char *metrics_plan_trait;    /* metrics.plan_trait, default "plan" */

    /* Embedded default (used only when brokers and/or redis are unset) */
    char *data_dir;          /* data_dir / PQLSTREAM_DATA_DIR, default "pqlstream-data" */
    int embedded_partitions; /* embedded.partitions, default 4 */
    int sample;              /* embedded.sample: bool, default true (drive the sample workload) */
    int sample_rate;         /* embedded.sample_rate: events/s, default 200 */

    /* Operations */
    char *http; /* http / PQLSTREAM_HTTP: host:port of the HTTP endpoints, "off" = none,
                 * default "127.0.0.1:9464"; port 0 binds any free port */

    /* Logging */
    char
        *log_level; /* log.level / PQLSTREAM_LOG_LEVEL: debug | info | warn | error, default info */
} pql_config;

/** Fills built-in defaults (every string non-NULL, owned by the config). */
void pql_config_init(pql_config *c);

/** Frees everything `c` owns (not `c` itself).  Safe after init only. */
void pql_config_term(pql_config *c);

/** Reads a YAML file.  @returns 0, or -1 with "FILE:LINE:COL: unknown option
 *  'bach.max_messages' (did you mean 'batch.max_messages'?)" and the like. */
int pql_config_load_file(pql_config *c, const char *path, char *errstr, size_t errstr_size);

/** Applies PQLSTREAM_* variables from `envp` (NULL-terminated "K=V" array;
 *  pass `environ`).  Unknown PQLSTREAM_ variables are an error (a typo must
 *  not be silently ignored), except PQLSTREAM_CONFIG.  When a short alias and
 *  the full name are both set (PQLSTREAM_BROKERS, PQLSTREAM_KAFKA_BROKERS),
 *  the full name wins.  @returns 0 or -1. */
int pql_config_load_env(pql_config *c, char *const *envp, char *errstr, size_t errstr_size);

/** Sets one option by dotted key (flags).  Validates the value (numbers,
 *  durations with a unit, enums, booleans: true/false/yes/no/on/off/1/0).
 *  kafka.<property> and input.schemas.<id> are accepted.  @returns 0 or -1 with
 *  "--batch.max_ms: 'ten' is not an integer". */
int pql_config_set(pql_config *c, const char *key, const char *value, char *errstr,
                   size_t errstr_size);

/** Parses argv flags (--key=value, --key value, --config FILE is handled by the
 *  caller before: see pql_config_load_all, and skipped here).  Like getopt,
 *  scanning starts at argv[1] (argv[0] is the program or subcommand name).
 *  Stops at the first non-flag argument and returns its index ("--" ends the
 *  flags: the index after it); -1 on error.  Every flag needs a value;
 *  --help is not handled here (an unknown option). */
int pql_config_parse_flags(pql_config *c, int argc, char **argv, char *errstr, size_t errstr_size);

/** The whole sequence: defaults, file (from --config in argv or
 *  PQLSTREAM_CONFIG; none is fine), environment, flags.  *argi receives the
 *  index of the first non-flag argument.  @returns 0 or -1 with errstr.
 *  Calls pql_config_init(c) itself (do not init before); call
 *  pql_config_term(c) afterwards whether it succeeded or not. */
int pql_config_load_all(pql_config *c, int argc, char **argv, char *const *envp, int *argi,
                        char *errstr, size_t errstr_size);

/** Prints every option: key, environment variable, default, one-line help. */
void pql_config_usage(FILE *out);

/** Prints the effective configuration, secrets redacted, one key=value a line. */
void pql_config_dump(const pql_config *c, FILE *out);

#endif
