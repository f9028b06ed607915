/* harness.h — what every end-to-end test uses: a private redis-server, an
 * embedded Kafka (librdkafka's mock cluster), producing test input, running
 * the pqlstream binary as a child process, and reading back results.
 *
 * Conventions.
 *   - Set-up calls (h_redis_start, h_kafka_start, h_produce_*, h_proc_start)
 *     fail the running Criterion test (cr_assert_fail) with the reason: a test
 *     never has to check them.
 *   - Waits take a timeout in milliseconds, poll in 50 ms steps, and return -1
 *     on timeout after printing what they were still waiting for; the test
 *     asserts on the result (see H_ASSERT_PROC to print the processor's log).
 *   - Every object comes with its stop/free function; all accept NULL.
 *     Children get PR_SET_PDEATHSIG, so a test that aborts leaves no process
 *     behind (its temp directory, holding the logs, is then kept).
 *
 * A typical test:
 *
 *     h_redis *r = h_redis_start();
 *     h_kafka *k = h_kafka_start(4, "usage", "accounts", "alerts", "dlq", NULL);
 *     h_produce_account(k, "accounts", -1, "acct-1", now, H_PROPS(H_STR("plan", "free")));
 *     h_produce_usage(k, "usage", -1, "acct-1", "login", "u1", now, H_NO_PROPS);
 *     h_flush(k);
 *     h_proc *p = h_proc_start("PQLSTREAM_BROKERS", h_kafka_bootstraps(k),
 *                              "PQLSTREAM_REDIS", h_redis_url(r), …, NULL);
 *     H_ASSERT_PROC(p, h_wait_offsets(k, h_redis_url(r), "g1", "usage", 4, NULL, 30000) == 0);
 *     h_msgs *alerts = h_consume_all(h_kafka_bootstraps(k), "alerts", 10000);
 *     …
 *     h_msgs_free(alerts); h_proc_stop(p); h_kafka_stop(k); h_redis_stop(r);
 */
#ifndef PQL_TEST_HARNESS_H
#define PQL_TEST_HARNESS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>

#include "common.h"
#include "decode.h"
#include "embedded_kafka.h"
#include "redis_child.h"
#include "rules.h"

/* ---- Redis ---------------------------------------------------------------- */

typedef struct h_redis h_redis;

/** Starts a private redis-server on a unix socket in a fresh temp directory
 *  (no persistence). */
h_redis *h_redis_start(void);
/** Same, with appendonly yes (appendfsync everysec), for restart tests. */
h_redis *h_redis_start_aof(void);
/** @returns "unix:///tmp/…/redis.sock". */
const char *h_redis_url(const h_redis *r);
/** The child, for fault tests (pql_redis_child_restart, its pid). */
pql_redis_child *h_redis_child(h_redis *r);
/** Stops the server and removes its directory. */
void h_redis_stop(h_redis *r);

/** HGET key field as a NUL-terminated string (caller frees), or NULL when
 *  absent.  Harness functions taking a Redis `url` accept unix:// URLs only
 *  (what h_redis_url returns); they fail the test if Redis is unreachable. */
char *h_redis_hget(const char *url, const char *key, const char *field);
/** FLUSHALL: Redis loses every key (as a restart without its data would). */
void h_redis_flushall(const char *url);
/** ms > 0: CLIENT PAUSE ms WRITE: every client's writes and scripts
 *  (EVAL/EVALSHA, read-only ones too) wait while reads and PING are served;
 *  ms == 0: CLIENT UNPAUSE.  A paused command whose client gives up and
 *  closes its connection is never run (checked on redis-server 7.0). */
void h_redis_pause_writes(const char *url, int ms);

/* ---- Kafka ---------------------------------------------------------------- */

typedef struct h_kafka h_kafka;

/** Starts a 1-broker mock cluster and creates the NULL-terminated list of
 *  topics, each with `partitions` partitions; also opens the producer the
 *  h_produce_* calls use (idempotent, so order per partition is kept). */
h_kafka *h_kafka_start(int partitions, const char *topic, ...) __attribute__((sentinel));
/** Same with a cluster of `nbrokers` brokers, the partitions' leaders spread
 *  over them (replication 1): for broker faults and leader changes through
 *  h_kafka_mock() (rd_kafka_mock_broker_set_down, _partition_set_leader…). */
h_kafka *h_kafka_start_brokers(int nbrokers, int partitions, const char *topic, ...)
    __attribute__((sentinel));
const char *h_kafka_bootstraps(const h_kafka *k);
rd_kafka_mock_cluster_t *h_kafka_mock(h_kafka *k);
/** The harness's producer handle (e.g. for metadata or watermark queries). */
rd_kafka_t *h_kafka_producer(h_kafka *k);
/** Destroys the producer (after a flush) and the cluster. */
void h_kafka_stop(h_kafka *k);

/* Event properties / traits for h_produce_*: */
#define H_STR(k, v)  ((pql_prop){(k), strlen(k), pql_str((v), strlen(v))})
#define H_NUM(k, n)  ((pql_prop){(k), strlen(k), pql_num(n)})
#define H_BOOL(k, b) ((pql_prop){(k), strlen(k), pql_bool(b)})
#define H_NULL(k)    ((pql_prop){(k), strlen(k), pql_null()})
/* …passed as a (props, count) pair: */
#define H_PROPS(...)                                                                               \
    (const pql_prop[]){__VA_ARGS__}, (sizeof((const pql_prop[]){__VA_ARGS__}) / sizeof(pql_prop))
#define H_NO_PROPS NULL, 0

/* `partition` -1 everywhere means: librdkafka's default partitioner decides
 * by key (what real producers do; both input topics then agree). */

/** By default records carry the producer's clock as their Kafka timestamp
 *  (what most producers do).  With `on`, h_produce_usage/_account/_event
 *  stamp each record with its event time instead, so the processor's merge
 *  of the two input topics follows event time (scenario tests). */
void h_kafka_event_time_records(h_kafka *k, int on);

/** Produces a UsageEvent (plain Avro) keyed by `account`, with a fresh
 *  event_id "h-<n>".  user_id NULL → null.  ts in ms since the epoch. */
void h_produce_usage(h_kafka *k, const char *topic, int32_t partition, const char *account,
                     const char *event, const char *user_id, int64_t ts, const pql_prop *props,
                     size_t nprops);
/** Produces an AccountUpdate (plain Avro) keyed by `account`. */
void h_produce_account(h_kafka *k, const char *topic, int32_t partition, const char *account,
                       int64_t ts, const pql_prop *traits, size_t ntraits);
/** Produces any event as built by the caller (keyed by ev->account_id). */
void h_produce_event(h_kafka *k, const char *topic, int32_t partition, const pql_event *ev);
/** Produces raw bytes (malformed-message tests).  key NULL → no key. */
void h_produce_raw(h_kafka *k, const char *topic, int32_t partition, const char *key,
                   const void *value, size_t len);
/** Waits (up to 10 s) until everything produced is acknowledged; fails the
 *  test on a delivery error or timeout. */
void h_flush(h_kafka *k);

/** High watermark (next offset to be written) of topic/partition, or -1. */
int64_t h_high_watermark(h_kafka *k, const char *topic, int32_t partition);

/* ---- consuming back ------------------------------------------------------- */

typedef struct h_header {
    char *name;
    char *value; /* NUL-terminated copy; NULL for a null header */
    size_t value_len;
} h_header;

typedef struct h_msg {
    char *key; /* NUL-terminated copy; NULL for no key */
    size_t key_len;
    char *value; /* copy, NUL-terminated for convenience; NULL for null */
    size_t value_len;
    int32_t partition;
    int64_t offset;
    h_header *headers;
    size_t nheaders;
} h_msg;

typedef struct h_msgs {
    h_msg *msgs; /* sorted by (partition, offset) */
    size_t n;
} h_msgs;

/** Reads every partition of `topic` from its low to its high watermark
 *  (as of the call) with assign(), not subscribe().
 *  @returns the messages (free with h_msgs_free), or NULL on timeout/error
 *  after printing why. */
h_msgs *h_consume_all(const char *bootstraps, const char *topic, int timeout_ms);
/** @returns the value of the first header called `name`, or NULL. */
const char *h_msg_header(const h_msg *m, const char *name);
void h_msgs_free(h_msgs *m);

/* ---- the pqlstream process ------------------------------------------------ */

typedef struct h_proc h_proc;

/** Runs `PQL_BINARY run` with the environment of the test minus every
 *  inherited PQLSTREAM_* variable, plus the given NAME, VALUE pairs (NULL
 *  terminated), e.g. ("PQLSTREAM_BROKERS", bootstraps, …, NULL).  stdout and
 *  stderr go to a log file in a fresh temp directory.  Unless the caller
 *  passes PQLSTREAM_HTTP, the HTTP endpoints bind an ephemeral port
 *  (127.0.0.1:0), so concurrent processes never collide on 9464. */
h_proc *h_proc_start(const char *name, ...) __attribute__((sentinel));
/** Same with any arguments: argv (NULL-terminated, argv[0] is ignored: the
 *  binary is PQL_BINARY) and env ("NAME=VALUE" strings, NULL-terminated). */
h_proc *h_proc_start_argv(const char *const *argv, const char *const *env);
pid_t h_proc_pid(const h_proc *p);
const char *h_proc_log_path(const h_proc *p);
/** The whole log so far (caller frees), or NULL. */
char *h_proc_log(const h_proc *p);
/** Prints the last `lines` lines of the log to stderr, with its path. */
void h_proc_dump_log(const h_proc *p, int lines);
/** Sends `sig`. */
void h_proc_kill(h_proc *p, int sig);
/** Waits for the process to end.  @returns its exit code (0..255), 128+signal
 *  when killed by a signal, or -1 on timeout (it keeps running). */
int h_proc_wait(h_proc *p, int timeout_ms);
/** Polls the log (50 ms steps) until it contains `needle`.  @returns 0 or -1
 *  on timeout or when the process ended first. */
int h_proc_wait_log(h_proc *p, const char *needle, int timeout_ms);
/** SIGTERM, wait up to 10 s, then SIGKILL; frees `p` and its temp directory.
 *  @returns the exit status as h_proc_wait (-1 if it had to be SIGKILLed). */
int h_proc_stop(h_proc *p);

/** Asserts `cond`; on failure prints the processor's log tail first. */
#define H_ASSERT_PROC(p, cond, ...)                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            h_proc_dump_log((p), 60);                                                              \
            cr_assert_fail("assertion failed: " #cond " " __VA_ARGS__);                            \
        }                                                                                          \
    } while (0)

/** GET `path` from the process's HTTP endpoints over HTTP/1.0: the address
 *  comes from its log line `msg="http listening" addr=…` (waited for up to
 *  30 s; log.level must be info or debug).  @returns the body (caller frees)
 *  with *status set, or NULL with *status 0 when nothing answered. */
char *h_http_get(h_proc *p, const char *path, int *status);

/* ---- Redis state ---------------------------------------------------------- */

/** Polls Redis until, for every partition p < partitions, the stored next
 *  offset (HGET pql:{<group>:<p>}:meta off:<topic>) is at least expected[p],
 *  or — expected NULL — the partition's high watermark in `k` (queried once,
 *  at the call).  @returns 0, or -1 on timeout after printing the laggards. */
int h_wait_offsets(h_kafka *k, const char *redis_url, const char *group, const char *topic,
                   int partitions, const int64_t *expected, int timeout_ms);
/** Same, but gives up at once (-1) when the process `watch` exits meanwhile,
 *  and returns 0 only once `watch` has also logged msg="running". */
int h_wait_offsets_of(h_proc *watch, h_kafka *k, const char *redis_url, const char *group,
                      const char *topic, int partitions, const int64_t *expected, int timeout_ms);

typedef struct h_lines {
    char **lines;
    size_t n;
} h_lines;

/** Every field of every account key of a partition, SCAN pql:{<group>:<p>}:a:*
 *  then HGETALL, as sorted lines "a:<account>\t<field>\t<value>" (the group is
 *  dropped, so dumps of two groups compare equal; bytes other than printable
 *  ASCII are written as \xNN).  Free with h_lines_free. */
h_lines *h_redis_dump_partition(const char *url, const char *group, int partition);
/** The partition's counter hashes (metrics and stats), SCAN pql:{<group>:<p>}:c:*
 *  then HGETALL, as sorted lines "c:<name>\t<field>\t<value>" like
 *  h_redis_dump_partition.  Leaves out what depends on where batches were
 *  cut rather than on the events: pql:{<group>:<p>}:c:mv (the version bumps
 *  the metrics emitter polls, one per batch that changed a period) and
 *  counters at 0 (a +1 and a -1 in one batch write nothing, in two batches
 *  leave a field at 0; both mean 0). */
h_lines *h_redis_dump_counters(const char *url, const char *group, int partition);
/** HLEN key (e.g. an outbox), 0 when absent. */
long long h_redis_hlen(const char *url, const char *key);
/** @returns 0 when equal, else -1 after printing the first difference. */
int h_lines_compare(const h_lines *a, const h_lines *b);
void h_lines_free(h_lines *l);

/* ---- misc ----------------------------------------------------------------- */

/** Writes `text` to `path` (created or truncated); fails the test on error. */
void h_write_file(const char *path, const char *text);
/** The whole file as a NUL-terminated string (caller frees), or NULL when it
 *  cannot be opened. */
char *h_read_file(const char *path);
/** A fresh temp directory (/tmp/pqlh-XXXXXX), caller frees the string. */
char *h_mkdtemp(void);
/** Removes a directory tree; NULL is fine. */
void h_rmtree(const char *path);
/** Sleeps `ms` milliseconds. */
void h_sleep_ms(int ms);

/** Loads a rule set from YAML text ("t.yaml" in messages); a refusal fails
 *  the test with the loader's errors. */
pql_rules *h_rules(const char *yaml);

#endif
