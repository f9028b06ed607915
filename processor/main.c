/* main.c — the pqlstream program: subcommands over the core library.
 *
 *   pqlstream run [--key=value …]     the main job (embedded default when no
 *                                     brokers / redis are configured)
 *   pqlstream rules check FILE|DIR…  validate rule files, file:line:col errors
 *   pqlstream rules explain --account ID   an account's rules, from live Redis
 *   pqlstream metrics [--granularity G] [--segment S] [--since WHEN]
 *                                     the metric aggregates in Redis, as a table
 *   pqlstream version
 */
#include "config.h"
#include "embedded_kafka.h"
#include "explain.h"
#include "http.h"
#include "log.h"
#include "metrics_report.h"
#include "pipeline.h"
#include "redis_child.h"
#include "rules.h"
#include "sample.h"
#include "store.h"
#include "telemetry.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

extern char **environ;

static volatile sig_atomic_t stop_requested, reload_requested;

static void on_stop(int sig)
{
    (void)sig;
    stop_requested = 1;
}

static void on_reload(int sig)
{
    (void)sig;
    reload_requested = 1;
}

static void usage(FILE *out)
{
    fprintf(
        out,
        "pqlstream %s — product-qualified-lead and expansion alerts from product usage\n\n"
        "usage:\n"
        "  pqlstream run [--option=value …]   run the stream processor\n"
        "  pqlstream run --help               list every option, its environment variable and "
        "default\n"
        "  pqlstream rules check PATH…        validate rule files or directories\n"
        "  pqlstream rules explain --account ID [--json]\n"
        "                                     what each rule makes of an account, from Redis\n"
        "  pqlstream metrics [--granularity day] [--segment channel] [--since 30d]\n"
        "                                     PQL rate, time to PQL, PQL vs non-PQL conversion\n"
        "  pqlstream config [--option=value …]\n"
        "                                     the effective configuration, secrets redacted\n"
        "  pqlstream version                  print the version\n\n"
        "With no brokers configured (PQLSTREAM_BROKERS) `run` starts an embedded Kafka "
        "(librdkafka's\n"
        "mock cluster) and with no Redis (PQLSTREAM_REDIS) a private redis-server, and drives a\n"
        "sample workload so alerts appear within seconds.\n",
        PQL_VERSION);
}

/* Loads a command's configuration from every source (file, environment,
 * the arguments); every argument must be an option.  `see` names where the
 * usage is.  @returns 0, or 2 (the exit code) after saying why on stderr;
 * either way cfg is to be released with pql_config_term. */
static int load_config(pql_config *cfg, int argc, char **argv, const char *see)
{
    char err[1024];
    int argi = 0;
    if (pql_config_load_all(cfg, argc, argv, environ, &argi, err, sizeof(err)) < 0) {
        fprintf(stderr, "pqlstream: %s\n", err);
        return 2;
    }
    if (argi < argc) {
        fprintf(stderr, "pqlstream: unexpected argument '%s' (see %s)\n", argv[argi], see);
        return 2;
    }
    return 0;
}

static int cmd_rules_check(int argc, char **argv)
{
    if (argc < 1) {
        fprintf(stderr, "usage: pqlstream rules check FILE|DIR…\n");
        return 2;
    }
    int bad = 0;
    for (int i = 0; i < argc; i++) {
        pql_buf errors = {0};
        pql_rules *r = pql_rules_load(argv[i], &errors);
        if (r) {
            size_t ns = pql_rules_nsignals(r), nr = pql_rules_nrules(r);
            printf("%s: ok — version %s, %zu signal%s, %zu rule%s\n", argv[i], pql_rules_version(r),
                   ns, ns == 1 ? "" : "s", nr, nr == 1 ? "" : "s");
            pql_rules_destroy(r);
        } else {
            fputs(errors.data ? errors.data : "unknown error\n", stderr);
            bad = 1;
        }
        pql_buf_free(&errors);
    }
    return bad ? 1 : 0;
}

static int cmd_rules_explain(int argc, char **argv)
{
    const char *account = NULL;
    int json = 0, max_partitions = 1024;
    char **rest = calloc((size_t)argc + 1, sizeof(*rest));
    int nrest = 0;
    if (!rest) return 1;
    rest[nrest++] = argv[0];
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--account") && i + 1 < argc)
            account = argv[++i];
        else if (!strncmp(argv[i], "--account=", 10))
            account = argv[i] + 10;
        else if (!strcmp(argv[i], "--json"))
            json = 1;
        else if (!strcmp(argv[i], "--partitions") && i + 1 < argc)
            max_partitions = atoi(argv[++i]);
        else if (!strncmp(argv[i], "--partitions=", 13))
            max_partitions = atoi(argv[i] + 13);
        else
            rest[nrest++] = argv[i];
    }
    if (!account || !*account || max_partitions <= 0) {
        fprintf(stderr, "usage: pqlstream rules explain --account ID [--json] [--partitions N] "
                        "[--option=value …]\n"
                        "  Reads the account's state from the Redis of the configuration (the "
                        "same options as `run`:\n"
                        "  group, redis, rules) and shows, for each rule, whether it applies, "
                        "holds and why.\n"
                        "  --partitions N: look in partitions 0…N-1 (default 1024).\n");
        free(rest);
        return 2;
    }
    pql_config cfg;
    char err[1024];
    int rc = 1;
    pql_rules *rules = NULL;
    pql_store *store = NULL;
    pql_redis_child *child = NULL;
    pql_account *a = NULL;
    if ((rc = load_config(&cfg, nrest, rest, "pqlstream rules explain")) != 0) goto out;
    rc = 1;
    pql_log_set_level("warn");
    pql_buf errors = {0};
    rules = pql_rules_load(cfg.rules_path, &errors);
    if (!rules) {
        fprintf(stderr, "pqlstream: the rule set %s is invalid:\n%s", cfg.rules_path, errors.data);
        pql_buf_free(&errors);
        goto out;
    }
    pql_buf_free(&errors);
    char url[1200];
    if (pql_redis_for_tool(cfg.redis_url, cfg.data_dir, url, sizeof(url), &child, err,
                           sizeof(err)) < 0 ||
        !(store = pql_store_open(url, 5000, err, sizeof(err)))) {
        fprintf(stderr, "pqlstream: %s\n", err);
        goto out;
    }
    int32_t partition = -1;
    err[0] = '\0';
    a = pql_explain_fetch(store, rules, cfg.group, account, max_partitions, &partition, err,
                          sizeof(err));
    if (!a && partition < 0 && !err[0]) {
        fprintf(stderr,
                "pqlstream: no state for account '%s' in group '%s' (partitions 0-%d of the "
                "configured Redis): it has had no event yet, or the group differs (--group=NAME, "
                "PQLSTREAM_GROUP)\n",
                account, cfg.group, max_partitions - 1);
        goto out;
    }
    if (!a) {
        fprintf(stderr, "pqlstream: %s\n", err);
        goto out;
    }
    json_t *doc = pql_explain_json(a, rules);
    if (json) {
        char *text = json_dumps(doc, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
        printf("%s\n", text);
        free(text);
    } else {
        char where[256];
        pql_buf out = {0};
        snprintf(where, sizeof(where), "group %s, partition %d", cfg.group, (int)partition);
        pql_explain_text(doc, where, &out);
        fputs(out.data, stdout);
        pql_buf_free(&out);
    }
    json_decref(doc);
    rc = 0;
out:
    pql_account_destroy(a);
    pql_store_close(store);
    pql_redis_child_stop(child);
    pql_rules_destroy(rules);
    pql_config_term(&cfg);
    free(rest);
    return rc;
}

/* pqlstream config: the effective configuration from every source (file,
 * environment, flags), as `key=value` lines with passwords, SASL secrets
 * and Redis credentials replaced by ***; exit 2 when it does not load or
 * the Redis URL cannot be parsed. */
static int cmd_config(int argc, char **argv)
{
    pql_config cfg;
    char err[1024];
    int rc = load_config(&cfg, argc, argv, "pqlstream run --help");
    if (rc == 0) {
        pql_config_dump(&cfg, stdout);
        /* the Redis URL is parsed when used; check it now (no connection) */
        pql_store *st =
            cfg.redis_url[0] ? pql_store_new(cfg.redis_url, 1000, err, sizeof(err)) : NULL;
        if (cfg.redis_url[0] && !st) {
            fprintf(stderr, "pqlstream: redis.url: %s\n", err);
            rc = 2;
        }
        pql_store_close(st);
    }
    pql_config_term(&cfg);
    return rc;
}

static int cmd_run(int argc, char **argv)
{
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: pqlstream run [--config FILE] [--option=value …]\n\n"
                   "A YAML config file comes from --config or PQLSTREAM_CONFIG.\n");
            pql_config_usage(stdout);
            return 0;
        }
    pql_config cfg;
    char err[1024];
    int rc = 1;
    pql_embedded_kafka *kafka = NULL;
    pql_redis_child *redis = NULL;
    pql_sample *sample = NULL;
    pql_rules *rules = NULL;
    pql_pipeline *p = NULL;
    pql_telemetry *tel = NULL;
    pql_http *http = NULL;

    /* First thing: a SIGTERM during start-up (a supervisor giving up, a
       scale-in) becomes a clean stop (exit 0) once the loop starts, instead
       of a death by the signal. */
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_stop;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sa.sa_handler = on_reload;
    sigaction(SIGHUP, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    if (load_config(&cfg, argc, argv, "pqlstream run --help") != 0) {
        pql_config_term(&cfg);
        return 2;
    }
    if (pql_log_set_level(cfg.log_level) < 0) {
        fprintf(stderr, "pqlstream: log.level '%s' must be debug, info, warn or error\n",
                cfg.log_level);
        pql_config_term(&cfg);
        return 2;
    }

    pql_buf errors = {0};
    rules = pql_rules_load(cfg.rules_path, &errors);
    if (!rules) {
        fprintf(stderr, "pqlstream: the rule set is invalid; nothing started:\n%s", errors.data);
        pql_buf_free(&errors);
        goto out;
    }
    pql_buf_free(&errors);
    pql_info("rules loaded", "path=%s version=%s signals=%zu rules=%zu", cfg.rules_path,
             pql_rules_version(rules), pql_rules_nsignals(rules), pql_rules_nrules(rules));
    tel = pql_telemetry_new();
    if (!tel) {
        fprintf(stderr, "pqlstream: out of memory\n");
        goto out;
    }
    pql_telemetry_set_rules(tel, rules);

    const char *redis_url = cfg.redis_url;
    if (!redis_url[0]) {
        char dir[1024];
        mkdir(cfg.data_dir, 0700);
        snprintf(dir, sizeof(dir), "%s/redis", cfg.data_dir);
        pql_redis_child_opts ro = {.dir = dir, .appendonly = 1};
        redis = pql_redis_child_start(&ro, err, sizeof(err));
        if (!redis) {
            fprintf(stderr, "pqlstream: cannot start the private redis-server: %s\n", err);
            goto out;
        }
        redis_url = pql_redis_child_url(redis);
        pql_info("embedded redis started", "url=%s data_dir=%s", redis_url, dir);
    }
    const char *brokers = cfg.brokers;
    int embedded = !brokers[0];
    if (embedded) {
        const char *topics[] = {cfg.topic_usage,   cfg.topic_accounts, cfg.topic_alerts,
                                cfg.topic_metrics, cfg.topic_dlq,      NULL};
        kafka = pql_embedded_kafka_start(3, topics, cfg.embedded_partitions, err, sizeof(err));
        if (!kafka) {
            fprintf(stderr, "pqlstream: cannot start the embedded Kafka: %s\n", err);
            goto out;
        }
        brokers = pql_embedded_kafka_bootstraps(kafka);
        printf("\nEmbedded Kafka (librdkafka mock cluster) at %s\n"
               "  watch the alerts:  kcat -b %s -t %s -C -f '%%k offset=%%o %%S bytes\\n'\n"
               "  (Avro values; run with --output.format=json to read them in kcat as JSON)\n"
               "  topics: %s, %s → %s (dead letters: %s)\n\n",
               brokers, brokers, cfg.topic_alerts, cfg.topic_usage, cfg.topic_accounts,
               cfg.topic_alerts, cfg.topic_dlq);
        fflush(stdout);
    }

    if (strcmp(cfg.http, "off")) {
        pql_http_opts ho = {.addr = cfg.http,
                            .telemetry = tel,
                            .redis_url = redis_url,
                            .redis_timeout_ms = cfg.redis_timeout_ms,
                            .group = cfg.group};
        http = pql_http_start(&ho, err, sizeof(err));
        if (!http) {
            fprintf(stderr, "pqlstream: %s\n", err);
            goto out;
        }
    }

    p = pql_pipeline_new(&cfg, brokers, redis_url, rules, err, sizeof(err));
    if (!p) {
        fprintf(stderr, "pqlstream: %s\n", err);
        goto out;
    }
    rules = NULL; /* the pipeline owns it now */
    pql_pipeline_set_telemetry(p, tel);
    if (embedded) {
        pql_pipeline_print_alerts(p, 1);
        if (cfg.sample) {
            pql_sample_opts so = {.bootstraps = brokers,
                                  .usage_topic = cfg.topic_usage,
                                  .accounts_topic = cfg.topic_accounts,
                                  .rate = cfg.sample_rate,
                                  .accounts = 200};
            sample = pql_sample_start(&so, err, sizeof(err));
            if (!sample) {
                fprintf(stderr, "pqlstream: cannot start the sample workload: %s\n", err);
                goto out;
            }
            printf(
                "Sample workload: %d events/s over 200 accounts; alerts print below as they fire.\n"
                "Press Ctrl-C to stop.\n",
                cfg.sample_rate);
            fflush(stdout);
        }
    }
    rc = pql_pipeline_run(p, &stop_requested, &reload_requested);
    if (sample)
        pql_info("sample workload stopped", "events=%lld", (long long)pql_sample_produced(sample));
out:
    pql_sample_stop(sample);
    pql_http_stop(http); /* before the pipeline: the server reads what it feeds */
    pql_pipeline_destroy(p);
    pql_embedded_kafka_stop(kafka);
    pql_redis_child_stop(redis);
    pql_rules_destroy(rules);
    pql_telemetry_destroy(tel);
    pql_config_term(&cfg);
    if (rc == 0) pql_info("stopped", "%s", "");
    return rc;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2 || !strcmp(argv[1], "help") || !strcmp(argv[1], "--help") ||
        !strcmp(argv[1], "-h")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "version") || !strcmp(argv[1], "--version")) {
        printf("pqlstream %s (librdkafka %s)\n", PQL_VERSION, rd_kafka_version_str());
        return 0;
    }
    if (!strcmp(argv[1], "run")) return cmd_run(argc - 1, argv + 1);
    if (!strcmp(argv[1], "config")) return cmd_config(argc - 1, argv + 1);
    if (!strcmp(argv[1], "metrics"))
        return pql_metrics_command(argc - 1, argv + 1, environ, stdout, stderr);
    if (!strcmp(argv[1], "rules") && argc >= 3 && !strcmp(argv[2], "check"))
        return cmd_rules_check(argc - 3, argv + 3);
    if (!strcmp(argv[1], "rules") && argc >= 3 && !strcmp(argv[2], "explain"))
        return cmd_rules_explain(argc - 2, argv + 2);
    fprintf(stderr, "pqlstream: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return 2;
}
