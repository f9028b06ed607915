/* config.c — pqlstream's options: one table, four sources, usage and dump.
 *
 * Every option is one row of `options[]` below: dotted key, short env alias,
 * type, where it lives in pql_config, default text, help.  The row drives
 * everything: pql_config_init() parses the default text through the same
 * setter as the file, the environment and flags, so a default can never be a
 * value the user could not write; usage and dump walk the same rows.
 *
 * Two key families are not rows: `kafka.<property>` (librdkafka pass-through,
 * stored in c->kafka in the order set, a re-set moves the key to the end) and
 * `input.schemas.<id>` (Confluent schema id → .avsc path, in c->schema_ids).
 *
 * The YAML file is read with libfyaml's document API; nested mappings flatten
 * to dotted keys, so `batch: {max_ms: 5}`, `batch.max_ms: 5` and, under
 * kafka, `security: {protocol: SSL}` all meet the same setter.  Errors carry
 * FILE:LINE:COL (1-based) and, for unknown keys, a "did you mean". */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <libfyaml.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

typedef enum opt_type {
    T_STR,   /* char *; with `choices`, one of them */
    T_INT,   /* int, >= min */
    T_SIZE,  /* size_t, >= min */
    T_BYTES, /* size_t bytes: an integer with an optional k, m or g (KiB, MiB, GiB); no min */
    T_DUR,   /* int64_t milliseconds, written with a unit */
    T_BOOL,  /* int 0/1 */
    T_ENUM,  /* int index into `choices` */
} opt_type;

typedef struct opt {
    const char *group; /* usage heading */
    const char *key;
    const char *alias; /* short environment variable, or NULL */
    opt_type type;
    size_t offset;
    const char *def;
    const char *const *choices; /* NULL-terminated, T_ENUM and optional for T_STR */
    long long min;
    const char *help;
} opt;

static const char *const wire_names[] = {"auto", "avro", "confluent", NULL};
static const char *const output_names[] = {"avro", "json", NULL};
static const char *const level_names[] = {"debug", "info", "warn", "error", NULL};

_Static_assert(sizeof(pql_wire) == sizeof(int), "input.format is stored through an int");
_Static_assert(PQL_WIRE_AUTO == 0 && PQL_WIRE_AVRO == 1 && PQL_WIRE_CONFLUENT == 2,
               "wire_names follows pql_wire");

#define OFF(field) offsetof(pql_config, field)

static const opt options[] = {
    {"Kafka", "kafka.brokers", "PQLSTREAM_BROKERS", T_STR, OFF(brokers), "", NULL, 0,
     "bootstrap servers; empty starts an embedded mock cluster"},
    {"Kafka", "group", NULL, T_STR, OFF(group), "pqlstream", NULL, 0, "consumer group id"},
    {"Kafka", "instance_id", "PQLSTREAM_INSTANCE_ID", T_STR, OFF(instance_id), "", NULL, 0,
     "static group membership (group.instance.id): a name stable across restarts and unique in "
     "the group, e.g. the pod name of a StatefulSet; a restart within the session timeout then "
     "moves no partition.  Empty: dynamic membership"},
    {"Kafka", "topics.usage", "PQLSTREAM_TOPIC_USAGE", T_STR, OFF(topic_usage), "usage-events",
     NULL, 0, "input topic of usage events"},
    {"Kafka", "topics.accounts", "PQLSTREAM_TOPIC_ACCOUNTS", T_STR, OFF(topic_accounts),
     "account-updates", NULL, 0, "input topic of account updates"},
    {"Kafka", "topics.alerts", "PQLSTREAM_TOPIC_ALERTS", T_STR, OFF(topic_alerts), "pql-alerts",
     NULL, 0, "output topic of alerts"},
    {"Kafka", "topics.metrics", "PQLSTREAM_TOPIC_METRICS", T_STR, OFF(topic_metrics), "pql-metrics",
     NULL, 0, "output topic of metric aggregates"},
    {"Kafka", "topics.dlq", "PQLSTREAM_TOPIC_DLQ", T_STR, OFF(topic_dlq), "pql-dlq", NULL, 0,
     "dead-letter topic for bad input"},
    {"Redis", "redis.url", "PQLSTREAM_REDIS", T_STR, OFF(redis_url), "", NULL, 0,
     "redis://[user:password@]host[:port][/db] or unix socket; empty starts a private server"},
    {"Redis", "redis.timeout_ms", NULL, T_INT, OFF(redis_timeout_ms), "2000", NULL, 1,
     "Redis command timeout in milliseconds"},
    {"Rules", "rules", NULL, T_STR, OFF(rules_path), "rules", NULL, 0,
     "rule file or directory of rule files"},
    {"Rules", "rules.watch", "PQLSTREAM_RULES_WATCH", T_DUR, OFF(rules_watch_ms), "2s", NULL, 0,
     "how often to check the rule files and reload them when they change (0: on SIGHUP only)"},
    {"Processing", "batch.max_messages", NULL, T_INT, OFF(batch_max_messages), "50000", NULL, 1,
     "most messages per batch (a batch takes what has arrived, up to this)"},
    {"Processing", "batch.max_ms", NULL, T_INT, OFF(batch_max_ms), "100", NULL, 0,
     "longest wait in milliseconds for the first message of a batch"},
    {"Processing", "cache.max_accounts", NULL, T_INT, OFF(cache_max_accounts), "200000", NULL, 1,
     "accounts kept in memory per process"},
    {"Processing", "cache.max_memory", NULL, T_BYTES, OFF(cache_max_memory), "1g", NULL, 0,
     "heap bytes the cached accounts may hold per process (k, m, g: KiB, MiB, GiB; 0: no "
     "bound but cache.max_accounts)"},
    {"Processing", "processing.lateness", NULL, T_DUR, OFF(lateness_ms), "1d", NULL, 0,
     "how late an event may arrive and still count"},
    {"Processing", "processing.max_future_skew", NULL, T_DUR, OFF(max_future_skew_ms), "1h", NULL,
     0, "how far in the future an event time may be"},
    {"Processing", "processing.max_task_idle", NULL, T_DUR, OFF(max_task_idle_ms), "2s", NULL, 0,
     "how long a task waits for an input partition no fetch has answered yet before going on "
     "without it (a partition known to have messages is always waited for)"},
    {"Processing", "state.ttl", NULL, T_DUR, OFF(state_ttl_ms), "400d", NULL, 0,
     "Redis TTL of an account's state"},
    {"Input", "input.format", NULL, T_ENUM, OFF(input_format), "auto", wire_names, 0,
     "wire format of input messages: auto, avro or confluent"},
    {"Input", "input.usage_writer_schema", NULL, T_STR, OFF(usage_writer_schema), "", NULL, 0,
     ".avsc the usage events were written with; empty: ours"},
    {"Input", "input.accounts_writer_schema", NULL, T_STR, OFF(accounts_writer_schema), "", NULL, 0,
     ".avsc the account updates were written with; empty: ours"},
    {"Input", "limits.max_message", NULL, T_SIZE, OFF(limits.max_message), "1048576", NULL, 1,
     "largest message value in bytes"},
    {"Input", "limits.max_string", NULL, T_SIZE, OFF(limits.max_string), "4096", NULL, 1,
     "longest string in bytes"},
    {"Input", "limits.max_properties", NULL, T_SIZE, OFF(limits.max_properties), "256", NULL, 0,
     "most entries in properties / traits"},
    {"Output", "output.format", NULL, T_ENUM, OFF(output_json), "avro", output_names, 0,
     "alert and metric encoding: avro or json"},
    {"Metrics", "metrics.interval", NULL, T_DUR, OFF(metrics_interval_ms), "60s", NULL, 0,
     "how often the owner of partition 0 emits metric aggregates; 0s: never"},
    {"Metrics", "metrics.channel_trait", NULL, T_STR, OFF(metrics_channel_trait), "channel", NULL,
     0, "account trait of the acquisition-channel segment"},
    {"Metrics", "metrics.plan_trait", NULL, T_STR, OFF(metrics_plan_trait), "plan", NULL, 0,
     "account trait of the plan segment"},
    {"Embedded", "data_dir", NULL, T_STR, OFF(data_dir), "pqlstream-data", NULL, 0,
     "directory of the private redis-server's data"},
    {"Embedded", "embedded.partitions", NULL, T_INT, OFF(embedded_partitions), "4", NULL, 1,
     "partitions per topic of the embedded cluster"},
    {"Embedded", "embedded.sample", NULL, T_BOOL, OFF(sample), "true", NULL, 0,
     "drive the embedded cluster with the sample workload"},
    {"Embedded", "embedded.sample_rate", NULL, T_INT, OFF(sample_rate), "200", NULL, 0,
     "sample workload events per second"},
    {"Operations", "http", NULL, T_STR, OFF(http), "127.0.0.1:9464", NULL, 0,
     "address of /metrics, /healthz, /readyz and /v1/accounts/{id}: host:port (port 0: any "
     "free port) or off"},
    {"Logging", "log.level", NULL, T_STR, OFF(log_level), "info", level_names, 0,
     "debug, info, warn or error"},
};

#define NOPTIONS       (sizeof(options) / sizeof(options[0]))
#define ENV_PREFIX     "PQLSTREAM_"
#define KAFKA_PREFIX   "kafka."
#define SCHEMAS_PREFIX "input.schemas."

/* ---- small helpers ---- */

static int starts_with(const char *s, const char *prefix)
{
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

static const opt *find_option(const char *key)
{
    for (size_t i = 0; i < NOPTIONS; i++)
        if (strcmp(options[i].key, key) == 0) return &options[i];
    return NULL;
}

/* "batch.max_ms" → "PQLSTREAM_BATCH_MAX_MS" */
static void env_name(const char *key, char *out, size_t size)
{
    size_t n = (size_t)snprintf(out, size, ENV_PREFIX);
    for (const char *p = key; *p && n + 1 < size; p++)
        out[n++] = *p == '.' ? '_' : (char)toupper((unsigned char)*p);
    out[n] = '\0';
}

/* Writes " (did you mean 'X'?)" for the closest option key (or its env name
 * when `as_env`) within distance 2, else "". */
static void did_you_mean(const char *word, int as_env, const char *quote_prefix, char *out,
                         size_t size)
{
    const char *best = NULL;
    char best_env[128], name[128];
    size_t best_d = 3;
    out[0] = '\0';
    for (size_t i = 0; i < NOPTIONS; i++) {
        const char *cands[2] = {options[i].key, as_env ? options[i].alias : NULL};
        if (as_env) {
            env_name(options[i].key, name, sizeof(name));
            cands[0] = name;
        }
        for (int k = 0; k < 2; k++) {
            if (!cands[k]) continue;
            size_t d = (size_t)pql_edit_distance(word, strlen(word), cands[k], strlen(cands[k]));
            if (d < best_d) {
                best_d = d;
                snprintf(best_env, sizeof(best_env), "%s", cands[k]);
                best = best_env;
            }
        }
    }
    if (best) snprintf(out, size, " (did you mean '%s%s'?)", quote_prefix, best);
}

static int replace_str(char **slot, const char *value)
{
    char *dup = strdup(value);
    if (!dup) return -1;
    free(*slot);
    *slot = dup;
    return 0;
}

/* Appends key=value to a kv list; an existing key is removed first, so the
 * list keeps the order in which keys were last set. */
static int kv_set(pql_kv **list, size_t *n, const char *key, const char *value)
{
    char *k = strdup(key), *v = strdup(value);
    pql_kv *grown = k && v ? realloc(*list, (*n + 1) * sizeof(**list)) : NULL;
    if (!grown) {
        free(k);
        free(v);
        return -1;
    }
    *list = grown;
    for (size_t i = 0; i < *n; i++) {
        if (strcmp(grown[i].key, key) != 0) continue;
        free(grown[i].key);
        free(grown[i].value);
        memmove(&grown[i], &grown[i + 1], (*n - i - 1) * sizeof(*grown));
        (*n)--;
        break;
    }
    grown[*n].key = k;
    grown[*n].value = v;
    (*n)++;
    return 0;
}

static void kv_free(pql_kv *list, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(list[i].key);
        free(list[i].value);
    }
    free(list);
}

static int parse_bool(const char *s, int *out)
{
    static const char *const yes[] = {"true", "yes", "on", "1"};
    static const char *const no[] = {"false", "no", "off", "0"};
    for (size_t i = 0; i < 4; i++) {
        if (strcasecmp(s, yes[i]) == 0) return *out = 1, 0;
        if (strcasecmp(s, no[i]) == 0) return *out = 0, 0;
    }
    return -1;
}

/* "123", "64k", "512m", "1g" (binary units, either case) → bytes. */
static int parse_bytes(const char *s, size_t *out)
{
    char *end;
    if (!isdigit((unsigned char)s[0])) return -1;
    errno = 0;
    unsigned long long n = strtoull(s, &end, 10);
    if (errno == ERANGE) return -1;
    unsigned shift = 0;
    switch (*end) {
    case 'k':
    case 'K':
        shift = 10, end++;
        break;
    case 'm':
    case 'M':
        shift = 20, end++;
        break;
    case 'g':
    case 'G':
        shift = 30, end++;
        break;
    default:
        break;
    }
    if (*end || n > (SIZE_MAX >> shift)) return -1;
    *out = (size_t)n << shift;
    return 0;
}

static void format_bytes(size_t n, char *out, size_t size)
{
    static const char units[] = "gmk";
    for (int i = 0; i < 3; i++) {
        size_t unit = (size_t)1 << (30 - 10 * i);
        if (n && n % unit == 0) {
            snprintf(out, size, "%zu%c", n / unit, units[i]);
            return;
        }
    }
    snprintf(out, size, "%zu", n);
}

static int choice_index(const char *const *choices, const char *s)
{
    for (int i = 0; choices[i]; i++)
        if (strcmp(choices[i], s) == 0) return i;
    return -1;
}

static void join_choices(const char *const *choices, char *out, size_t size)
{
    size_t n = 0;
    out[0] = '\0';
    for (int i = 0; choices[i] && n < size; i++)
        n += (size_t)snprintf(out + n, size - n, "%s%s", i ? ", " : "", choices[i]);
}

/* ---- setting one value ---- */

/* Parses `value` for `o` and stores it.  On error writes "<who>: '<value>' <why>". */
static int set_option(pql_config *c, const opt *o, const char *value, const char *who, char *errstr,
                      size_t errstr_size)
{
    char *base = (char *)c + o->offset;
    char why[160], names[128];
    if (o->choices) {
        int i = choice_index(o->choices, value);
        if (i < 0) {
            join_choices(o->choices, names, sizeof(names));
            snprintf(why, sizeof(why), "is not one of %s", names);
            goto bad;
        }
        if (o->type == T_ENUM) *(int *)(void *)base = i;
    }
    switch (o->type) {
    case T_ENUM:
        return 0;
    case T_STR:
        if (replace_str((char **)(void *)base, value) == 0) return 0;
        pql_set_err(errstr, errstr_size, "%s: out of memory", who);
        return -1;
    case T_INT:
    case T_SIZE: {
        char *end;
        errno = 0;
        long long n = strtoll(value, &end, 10);
        long long max = o->type == T_INT ? INT_MAX : LLONG_MAX;
        if (end == value || *end || isspace((unsigned char)value[0]))
            snprintf(why, sizeof(why), "is not an integer");
        else if (errno == ERANGE || n > max)
            snprintf(why, sizeof(why), "is too large (at most %lld)", max);
        else if (n < o->min)
            snprintf(why, sizeof(why), "is too small (at least %lld)", o->min);
        else if (o->type == T_INT)
            return *(int *)(void *)base = (int)n, 0;
        else
            return *(size_t *)(void *)base = (size_t)n, 0;
        goto bad;
    }
    case T_BYTES:
        if (parse_bytes(value, (size_t *)(void *)base) == 0) return 0;
        snprintf(why, sizeof(why), "is not a size in bytes (examples: 1073741824, 512m, 1g)");
        goto bad;
    case T_DUR:
        if (!strcmp(value, "0")) return *(int64_t *)(void *)base = 0, 0; /* off / none */
        if (pql_parse_duration(value, strlen(value), (int64_t *)(void *)base) == 0) return 0;
        snprintf(why, sizeof(why), "is not a duration (examples: 7d, 24h, 30m, 90s, 500ms, 0)");
        goto bad;
    case T_BOOL:
        if (parse_bool(value, (int *)(void *)base) == 0) return 0;
        snprintf(why, sizeof(why), "is not a boolean (true/false, yes/no, on/off, 1/0)");
        goto bad;
    }
    snprintf(why, sizeof(why), "has an unknown type");
bad:
    pql_set_err(errstr, errstr_size, "%s: '%s' %s", who, value, why);
    return -1;
}

static int set_schema_id(pql_config *c, const char *id, const char *path, const char *who,
                         char *errstr, size_t errstr_size)
{
    char *end;
    errno = 0;
    unsigned long long n = strtoull(id, &end, 10);
    if (!isdigit((unsigned char)id[0]) || *end || errno == ERANGE || n > UINT32_MAX) {
        pql_set_err(errstr, errstr_size, "%s: '%s' is not a schema id (a number up to %" PRIu32 ")",
                    who, id, UINT32_MAX);
        return -1;
    }
    if (!path[0]) {
        pql_set_err(errstr, errstr_size, "%s: needs the path of an .avsc file", who);
        return -1;
    }
    char canon[16];
    snprintf(canon, sizeof(canon), "%llu", n);
    if (kv_set(&c->schema_ids, &c->nschema_ids, canon, path) < 0) {
        pql_set_err(errstr, errstr_size, "%s: out of memory", who);
        return -1;
    }
    return 0;
}

/* Applies dotted `key`.  `who` names the source in value errors ("--key",
 * "FILE:L:C: key"); unknown keys are reported as "<where>unknown option
 * '<dashes><key>'" with a suggestion written the same way. */
static int set_key(pql_config *c, const char *key, const char *value, const char *who,
                   const char *where, const char *dashes, char *errstr, size_t errstr_size)
{
    const opt *o = find_option(key);
    if (o) return set_option(c, o, value, who, errstr, errstr_size);
    if (starts_with(key, KAFKA_PREFIX) && key[strlen(KAFKA_PREFIX)]) {
        if (kv_set(&c->kafka, &c->nkafka, key + strlen(KAFKA_PREFIX), value) < 0) {
            pql_set_err(errstr, errstr_size, "%s: out of memory", who);
            return -1;
        }
        return 0;
    }
    if (starts_with(key, SCHEMAS_PREFIX))
        return set_schema_id(c, key + strlen(SCHEMAS_PREFIX), value, who, errstr, errstr_size);
    char hint[192];
    did_you_mean(key, 0, dashes, hint, sizeof(hint));
    pql_set_err(errstr, errstr_size, "%sunknown option '%s%s'%s", where, dashes, key, hint);
    return -1;
}

/* ---- init / term ---- */

void pql_config_init(pql_config *c)
{
    memset(c, 0, sizeof(*c));
    for (size_t i = 0; i < NOPTIONS; i++) {
        char e[128];
        if (set_option(c, &options[i], options[i].def, options[i].key, e, sizeof(e)) < 0) {
            /* only out of memory: a default that does not parse is a bug */
            fprintf(stderr, "pqlstream: config default: %s\n", e);
            abort();
        }
    }
}

void pql_config_term(pql_config *c)
{
    if (!c) return;
    for (size_t i = 0; i < NOPTIONS; i++) {
        if (options[i].type != T_STR) continue;
        char **slot = (char **)(void *)((char *)c + options[i].offset);
        free(*slot);
        *slot = NULL;
    }
    kv_free(c->kafka, c->nkafka);
    kv_free(c->schema_ids, c->nschema_ids);
    c->kafka = c->schema_ids = NULL;
    c->nkafka = c->nschema_ids = 0;
}

/* ---- YAML file ---- */

typedef struct file_ctx {
    pql_config *c;
    const char *path;
    char *errstr;
    size_t errstr_size;
} file_ctx;

/* 1-based line:col of a node: its own token, else that of `fallback`. */
static void node_pos(struct fy_node *n, struct fy_node *fallback, int *line, int *col)
{
    struct fy_token *t = n ? fy_node_get_scalar_token(n) : NULL;
    if (!t && fallback) t = fy_node_get_scalar_token(fallback);
    const struct fy_mark *m = t ? fy_token_start_mark(t) : NULL;
    *line = m ? m->line + 1 : 1;
    *col = m ? m->column + 1 : 1;
}

static int is_yaml_null(struct fy_node *v, const char *s, size_t len)
{
    if (fy_node_get_style(v) != FYNS_PLAIN) return 0;
    return len == 0 || (len == 1 && s[0] == '~') || (len == 4 && memcmp(s, "null", 4) == 0);
}

static int is_section(const char *key)
{
    size_t n = strlen(key);
    if (strcmp(key, "kafka") == 0 || strcmp(key, "input.schemas") == 0) return 1;
    for (size_t i = 0; i < NOPTIONS; i++)
        if (strncmp(options[i].key, key, n) == 0 && options[i].key[n] == '.') return 1;
    return 0;
}

static int walk_mapping(file_ctx *f, struct fy_node *map, const char *prefix);

static int walk_pair(file_ctx *f, struct fy_node *k, struct fy_node *v, const char *prefix)
{
    int line, col, rc = -1;
    node_pos(k, NULL, &line, &col);
    size_t klen;
    const char *ks = fy_node_get_type(k) == FYNT_SCALAR ? fy_node_get_scalar(k, &klen) : NULL;
    if (!ks || klen == 0) {
        pql_set_err(f->errstr, f->errstr_size, "%s:%d:%d: option names must be plain words",
                    f->path, line, col);
        return -1;
    }
    char *key = NULL, *value = NULL, who[512];
    size_t keysize = strlen(prefix) + klen + 2;
    if (!(key = malloc(keysize))) goto nomem;
    snprintf(key, keysize, "%s%s%.*s", prefix, prefix[0] ? "." : "", (int)klen, ks);
    const opt *o = find_option(key);
    enum fy_node_type vt = v ? fy_node_get_type(v) : FYNT_SCALAR;
    if (vt == FYNT_MAPPING && !o) {
        if (fy_node_mapping_item_count(v) > 0 || is_section(key)) {
            rc = walk_mapping(f, v, key);
            goto out;
        }
    } else if (vt != FYNT_SCALAR) {
        snprintf(who, sizeof(who), "%s:%d:%d: %s", f->path, line, col, key);
        pql_set_err(f->errstr, f->errstr_size, "%s: expected a single value, not a %s", who,
                    vt == FYNT_MAPPING ? "mapping" : "list");
        goto out;
    } else if (!o && is_section(key) && !starts_with(key, KAFKA_PREFIX) &&
               !starts_with(key, SCHEMAS_PREFIX)) {
        pql_set_err(f->errstr, f->errstr_size,
                    "%s:%d:%d: '%s' is a section: expected a mapping (%s: {…})", f->path, line, col,
                    key, key);
        goto out;
    }
    size_t vlen = 0;
    const char *vs = v ? fy_node_get_scalar(v, &vlen) : NULL;
    if (!vs || (v && is_yaml_null(v, vs, vlen))) vs = "", vlen = 0;
    if (!(value = strndup(vs, vlen))) goto nomem;
    int vline, vcol;
    node_pos(v, k, &vline, &vcol);
    snprintf(who, sizeof(who), "%s:%d:%d: %s", f->path, vline, vcol, key);
    char where[300];
    snprintf(where, sizeof(where), "%s:%d:%d: ", f->path, line, col);
    rc = set_key(f->c, key, value, who, where, "", f->errstr, f->errstr_size);
    goto out;
nomem:
    pql_set_err(f->errstr, f->errstr_size, "%s: out of memory", f->path);
out:
    free(key);
    free(value);
    return rc;
}

static int walk_mapping(file_ctx *f, struct fy_node *map, const char *prefix)
{
    void *iter = NULL;
    struct fy_node_pair *p;
    while ((p = fy_node_mapping_iterate(map, &iter)))
        if (walk_pair(f, fy_node_pair_key(p), fy_node_pair_value(p), prefix) < 0) return -1;
    return 0;
}

int pql_config_load_file(pql_config *c, const char *path, char *errstr, size_t errstr_size)
{
    FILE *fp = fopen(path, "r");
    if (!fp) {
        pql_set_err(errstr, errstr_size, "%s: cannot open: %s", path, strerror(errno));
        return -1;
    }
    struct fy_diag_cfg dcfg;
    fy_diag_cfg_default(&dcfg);
    dcfg.fp = NULL;
    dcfg.colorize = false;
    struct fy_diag *diag = fy_diag_create(&dcfg);
    if (!diag) {
        fclose(fp);
        pql_set_err(errstr, errstr_size, "%s: out of memory", path);
        return -1;
    }
    fy_diag_set_collect_errors(diag, true);
    /* The parser API (not fy_document_build_from_fp) tells an empty stream,
     * which is a valid empty configuration, from a syntax error. */
    struct fy_parse_cfg pcfg = {.flags = FYPCF_QUIET, .diag = diag};
    struct fy_parser *parser = fy_parser_create(&pcfg);
    struct fy_document *doc = NULL;
    if (parser && fy_parser_set_input_fp(parser, path, fp) == 0)
        doc = fy_parse_load_document(parser);

    int rc = 0;
    void *iter = NULL;
    struct fy_diag_error *e;
    while ((e = fy_diag_errors_iterate(diag, &iter))) {
        if (e->type < FYET_ERROR) continue;
        /* libfyaml's collected positions are already 1-based */
        pql_set_err(errstr, errstr_size, "%s:%d:%d: YAML syntax error: %s", path, e->line,
                    e->column, e->msg ? e->msg : "invalid YAML");
        rc = -1;
        break;
    }
    if (rc == 0 && doc) {
        struct fy_node *root = fy_document_root(doc);
        if (root && fy_node_get_type(root) != FYNT_MAPPING) {
            int line, col;
            node_pos(root, NULL, &line, &col);
            pql_set_err(errstr, errstr_size, "%s:%d:%d: expected a mapping of options (key: value)",
                        path, line, col);
            rc = -1;
        } else if (root) {
            file_ctx f = {c, path, errstr, errstr_size};
            rc = walk_mapping(&f, root, "");
        }
    } else if (rc == 0 && (!parser || fy_parser_get_stream_error(parser))) {
        pql_set_err(errstr, errstr_size, "%s: %s", path,
                    parser ? "not valid YAML" : "out of memory");
        rc = -1;
    }
    /* no document and no error: an empty file, nothing to set */
    if (doc) fy_parse_document_destroy(parser, doc);
    if (parser) fy_parser_destroy(parser);
    fclose(fp);
    fy_diag_destroy(diag);
    return rc;
}

/* ---- environment ---- */

/* PQLSTREAM_SECURITY_PROTOCOL-style tail → "security.protocol" */
static char *env_tail_to_key(const char *tail, size_t len)
{
    char *k = malloc(len + 1);
    if (!k) return NULL;
    for (size_t i = 0; i < len; i++)
        k[i] = tail[i] == '_' ? '.' : (char)tolower((unsigned char)tail[i]);
    k[len] = '\0';
    return k;
}

/* Applies one "NAME=VALUE" whose NAME starts with PQLSTREAM_.  Aliases and
 * pass-through names go in pass 0, canonical names in pass 1, so that when a
 * short alias and the full name are both set the full name wins. */
static int env_apply(pql_config *c, const char *name, size_t nlen, const char *value, int pass,
                     char *errstr, size_t errstr_size)
{
    char who[256], canon[128];
    snprintf(who, sizeof(who), "%.*s", (int)nlen, name);
    if (strcmp(who, "PQLSTREAM_CONFIG") == 0) return 0;
    for (size_t i = 0; i < NOPTIONS; i++) {
        env_name(options[i].key, canon, sizeof(canon));
        if (strcmp(who, canon) == 0)
            return pass == 1 ? set_option(c, &options[i], value, who, errstr, errstr_size) : 0;
        if (options[i].alias && strcmp(who, options[i].alias) == 0)
            return pass == 0 ? set_option(c, &options[i], value, who, errstr, errstr_size) : 0;
    }
    if (pass == 1) return 0;
    static const char kafka_env[] = ENV_PREFIX "KAFKA_";
    static const char schema_env[] = ENV_PREFIX "INPUT_SCHEMAS_";
    if (starts_with(who, kafka_env) && who[sizeof(kafka_env) - 1]) {
        const char *tail = who + sizeof(kafka_env) - 1;
        char *prop = env_tail_to_key(tail, strlen(tail));
        int rc = prop ? kv_set(&c->kafka, &c->nkafka, prop, value) : -1;
        free(prop);
        if (rc < 0) pql_set_err(errstr, errstr_size, "%s: out of memory", who);
        return rc;
    }
    if (starts_with(who, schema_env))
        return set_schema_id(c, who + sizeof(schema_env) - 1, value, who, errstr, errstr_size);
    char hint[192];
    did_you_mean(who, 1, "", hint, sizeof(hint));
    pql_set_err(errstr, errstr_size, "unknown environment variable %s%s", who, hint);
    return -1;
}

int pql_config_load_env(pql_config *c, char *const *envp, char *errstr, size_t errstr_size)
{
    if (!envp) return 0;
    for (int pass = 0; pass < 2; pass++) {
        for (char *const *e = envp; *e; e++) {
            const char *eq = strchr(*e, '=');
            if (!eq || !starts_with(*e, ENV_PREFIX)) continue;
            if (env_apply(c, *e, (size_t)(eq - *e), eq + 1, pass, errstr, errstr_size) < 0)
                return -1;
        }
    }
    return 0;
}

/* ---- flags ---- */

int pql_config_set(pql_config *c, const char *key, const char *value, char *errstr,
                   size_t errstr_size)
{
    char who[256];
    snprintf(who, sizeof(who), "--%s", key);
    return set_key(c, key, value, who, "", "--", errstr, errstr_size);
}

static int is_flag(const char *a)
{
    return a[0] == '-' && a[1] != '\0';
}

int pql_config_parse_flags(pql_config *c, int argc, char **argv, char *errstr, size_t errstr_size)
{
    int i = 1;
    while (i < argc && is_flag(argv[i])) {
        const char *arg = argv[i], *eq = strchr(arg, '=');
        if (strcmp(arg, "--") == 0) return i + 1;
        if (arg[1] != '-' || arg[2] == '\0') {
            pql_set_err(errstr, errstr_size, "unknown flag '%s' (options are --key=value)", arg);
            return -1;
        }
        if (!eq && i + 1 >= argc) {
            pql_set_err(errstr, errstr_size, "%s: needs a value (%s=VALUE)", arg, arg);
            return -1;
        }
        const char *value = eq ? eq + 1 : argv[i + 1];
        char *key = strndup(arg + 2, eq ? (size_t)(eq - arg - 2) : strlen(arg + 2));
        if (!key) {
            pql_set_err(errstr, errstr_size, "out of memory");
            return -1;
        }
        i += eq ? 1 : 2;
        int rc = strcmp(key, "config") == 0 ? 0 /* read by pql_config_load_all */
                                            : pql_config_set(c, key, value, errstr, errstr_size);
        free(key);
        if (rc < 0) return -1;
    }
    return i;
}

int pql_config_load_all(pql_config *c, int argc, char **argv, char *const *envp, int *argi,
                        char *errstr, size_t errstr_size)
{
    pql_config_init(c);
    const char *path = NULL;
    for (char *const *e = envp; e && *e; e++)
        if (starts_with(*e, "PQLSTREAM_CONFIG=")) path = *e + strlen("PQLSTREAM_CONFIG=");
    for (int i = 1; i < argc && is_flag(argv[i]) && strcmp(argv[i], "--") != 0;) {
        if (strcmp(argv[i], "--config") == 0 && i + 1 < argc)
            path = argv[i + 1];
        else if (starts_with(argv[i], "--config="))
            path = argv[i] + strlen("--config=");
        i += strchr(argv[i], '=') || i + 1 >= argc ? 1 : 2;
    }
    if (path && path[0] && pql_config_load_file(c, path, errstr, errstr_size) < 0) return -1;
    if (pql_config_load_env(c, envp, errstr, errstr_size) < 0) return -1;
    int next = pql_config_parse_flags(c, argc, argv, errstr, errstr_size);
    if (next < 0) return -1;
    if (argi) *argi = next;
    return 0;
}

/* ---- usage and dump ---- */

static void format_duration(int64_t ms, char *out, size_t size)
{
    static const struct {
        const char *unit;
        int64_t ms;
    } units[] = {{"w", 7 * PQL_MS_DAY}, {"d", PQL_MS_DAY}, {"h", PQL_MS_HOUR},
                 {"m", PQL_MS_MINUTE},  {"s", 1000},       {"ms", 1}};
    for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
        if (ms != 0 && ms % units[i].ms != 0) continue;
        if (ms == 0 && units[i].ms != 1000) continue;
        snprintf(out, size, "%" PRId64 "%s", ms / units[i].ms, units[i].unit);
        return;
    }
}

static const char *display_env(const opt *o, char *buf, size_t size)
{
    if (o->alias) return o->alias;
    env_name(o->key, buf, size);
    return buf;
}

void pql_config_usage(FILE *out)
{
    int wkey = (int)strlen("--kafka.<property>"), wenv = 0, wdef = 0;
    char env[128];
    for (size_t i = 0; i < NOPTIONS; i++) {
        int k = (int)strlen(options[i].key) + 2;
        int e = (int)strlen(display_env(&options[i], env, sizeof(env)));
        int d = options[i].def[0] ? (int)strlen(options[i].def) : 2;
        if (k > wkey) wkey = k;
        if (e > wenv) wenv = e;
        if (d > wdef) wdef = d;
    }
    fprintf(out, "Options (precedence: defaults < --config FILE < environment < flags):\n");
    const char *group = NULL;
    for (size_t i = 0; i < NOPTIONS; i++) {
        const opt *o = &options[i];
        if (!group || strcmp(group, o->group) != 0) {
            group = o->group;
            fprintf(out, "\n%s:\n", group);
        }
        char flag[128];
        snprintf(flag, sizeof(flag), "--%s", o->key);
        fprintf(out, "  %-*s  %-*s  %-*s  %s\n", wkey, flag, wenv, display_env(o, env, sizeof(env)),
                wdef, o->def[0] ? o->def : "\"\"", o->help);
    }
    fprintf(out, "\nPass-through:\n");
    fprintf(out, "  %-*s  %-*s  %-*s  %s\n", wkey, "--kafka.<property>", wenv,
            "PQLSTREAM_KAFKA_<PROPERTY>", wdef, "",
            "any librdkafka property, e.g. kafka.sasl.mechanism");
    fprintf(out, "  %-*s  %-*s  %-*s  %s\n", wkey, "--input.schemas.<id>", wenv,
            "PQLSTREAM_INPUT_SCHEMAS_<ID>", wdef, "", "writer .avsc of a Confluent schema id");
    fprintf(out, "\nBooleans: true/false, yes/no, on/off, 1/0.  Durations: 500ms, 90s, 30m, "
                 "24h, 7d, 2w.\n");
}

static int is_secret_key(const char *key)
{
    return strstr(key, "password") || strstr(key, "secret") || strstr(key, "sasl.jaas") ||
           strstr(key, "sasl.oauthbearer");
}

/* Prints a URL with the password of its user-info replaced by "***". */
static void print_url_redacted(FILE *out, const char *url)
{
    const char *scheme = strstr(url, "://");
    const char *auth = scheme ? scheme + 3 : url;
    size_t hostpart = strcspn(auth, "/?#");
    const char *at = NULL;
    for (const char *p = auth; p < auth + hostpart; p++)
        if (*p == '@') at = p;
    if (!at) {
        fputs(url, out);
        return;
    }
    const char *colon = memchr(auth, ':', (size_t)(at - auth));
    if (colon)
        fprintf(out, "%.*s:***%s", (int)(colon - url), url, at);
    else
        fprintf(out, "%.*s***%s", (int)(auth - url), url, at);
}

void pql_config_dump(const pql_config *c, FILE *out)
{
    for (size_t i = 0; i < NOPTIONS; i++) {
        const opt *o = &options[i];
        const char *base = (const char *)c + o->offset;
        char buf[64];
        fprintf(out, "%s=", o->key);
        switch (o->type) {
        case T_STR: {
            const char *s = *(char *const *)(const void *)base;
            if (is_secret_key(o->key) && s[0])
                fputs("***", out);
            else if (strcmp(o->key, "redis.url") == 0)
                print_url_redacted(out, s);
            else
                fputs(s, out);
            break;
        }
        case T_INT:
            fprintf(out, "%d", *(const int *)(const void *)base);
            break;
        case T_SIZE:
            fprintf(out, "%zu", *(const size_t *)(const void *)base);
            break;
        case T_BYTES:
            format_bytes(*(const size_t *)(const void *)base, buf, sizeof(buf));
            fputs(buf, out);
            break;
        case T_DUR:
            format_duration(*(const int64_t *)(const void *)base, buf, sizeof(buf));
            fputs(buf, out);
            break;
        case T_BOOL:
            fputs(*(const int *)(const void *)base ? "true" : "false", out);
            break;
        case T_ENUM:
            fputs(o->choices[*(const int *)(const void *)base], out);
            break;
        }
        fputc('\n', out);
    }
    for (size_t i = 0; i < c->nkafka; i++)
        fprintf(out, KAFKA_PREFIX "%s=%s\n", c->kafka[i].key,
                is_secret_key(c->kafka[i].key) ? "***" : c->kafka[i].value);
    for (size_t i = 0; i < c->nschema_ids; i++)
        fprintf(out, SCHEMAS_PREFIX "%s=%s\n", c->schema_ids[i].key, c->schema_ids[i].value);
}
