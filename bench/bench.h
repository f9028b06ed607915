/* bench.h — the pieces of pqlbench, the benchmark of docs/performance.md.
 *
 *   workload.c  generates the realistic workload (Zipf-skewed accounts, 30 days
 *               of event time, the event mix the shipped rules read) and
 *               produces it; also the live, paced load of the latency phase
 *   probe.c     what the bench reads and runs around the processor: /proc
 *               figures, Redis INFO, pqlstream child processes, progress in
 *               Redis (pql:{g:p}:meta), redis-benchmark, the raw consumer
 *   pqlbench.c  the phases, the statistics and the table
 *
 * Everything is single-threaded except where a function says otherwise. */
#ifndef PQL_BENCH_H
#define PQL_BENCH_H

#include "common.h"

#include <hiredis/hiredis.h>
#include <librdkafka/rdkafka.h>
#include <stdint.h>
#include <sys/types.h>

/* ---- workload.c ------------------------------------------------------------- */

typedef struct bench_workload bench_workload;

typedef struct bench_workload_opts {
    int accounts; /* number of accounts */
    double zipf;  /* activity ∝ 1/(rank + ZIPF_Q)^zipf */
    int days;     /* event time spans the `days` days before now */
    uint64_t seed;
} bench_workload_opts;

/** A generator over `opts->accounts` accounts.  @returns NULL when out of memory. */
bench_workload *bench_workload_new(const bench_workload_opts *opts);
void bench_workload_destroy(bench_workload *w);

/* What producing a workload did. */
typedef struct bench_produced {
    int64_t usage, updates; /* messages produced to each topic */
    int64_t bytes;          /* key + value bytes */
    int64_t accounts;       /* distinct accounts that appeared */
    double seconds;         /* wall time of producing and flushing */
} bench_produced;

/** Produces `events` messages (usage events and account updates together) of
 *  history to `usage_topic` / `accounts_topic`, in increasing event time over
 *  the workload's `days` days before now, keyed by account id, with the event
 *  time as the record timestamp.  @returns 0, or -1 with a reason. */
int bench_workload_produce(bench_workload *w, const char *bootstraps, const char *usage_topic,
                           const char *accounts_topic, int64_t events, bench_produced *out,
                           char *errstr, size_t errstr_size);

/* Where bench_workload_generate() hands each encoded message (valid during the call). */
typedef void (*bench_sink_fn)(void *opaque, int kind, const char *key, size_t key_len,
                              const void *value, size_t value_len);

/** The same messages as bench_workload_produce() (same seed, same mix), handed
 *  to `sink` instead of Kafka.  @returns 0, or -1 (encoding failed). */
int bench_workload_generate(bench_workload *w, int64_t events, bench_sink_fn sink, void *opaque);

/** A live producer for the latency phase: events stamped with the wall clock.
 *  @returns NULL with a reason. */
rd_kafka_t *bench_live_producer(const char *bootstraps, char *errstr, size_t errstr_size);

/** Produces one live step at wall clock `now`: an ordinary event of the
 *  workload's mix (already introduced accounts only; new ones are introduced
 *  with their history) — or, when `probe` >= 0, the probe sequence of account
 *  "probe-<probe>": a conversion then three premium-feature attempts, the third
 *  of which crosses rules/expansion.yaml's premium-attempts.
 *  @returns the number of messages produced (>= 1), or -1 on a produce error. */
int bench_live_step(bench_workload *w, rd_kafka_t *rk, const char *usage_topic,
                    const char *accounts_topic, int64_t now, int probe);

/* ---- core.c ------------------------------------------------------------------- */

/* The pure core's cost per event on one thread (thread CPU time, µs). */
typedef struct bench_core_result {
    int64_t events, batches, alerts;
    double decode_us, apply_us, build_us, total_us;
    /* Memory (malloc's count, mallinfo2; see core.c): the heap freed by
     * emptying the caches at the end ÷ the accounts cached, what the caches
     * counted for them (cache.h, the figure cache.max_memory bounds), and
     * what the run left allocated besides the accounts, per task. */
    int64_t accounts_cached;
    double heap_per_account, counted_per_account, heap_per_task;
} bench_core_result;

/** Generates `events` messages of the workload `wo` in memory, spread over
 *  `partitions` tasks, and runs them through decode → apply → (every `batch`
 *  messages) batch build with the rules at `rules_path`, caches trimmed to
 *  `cache_max` accounts in all.  @returns 0, or -1 with a reason. */
int bench_core(const bench_workload_opts *wo, int64_t events, int partitions,
               const char *rules_path, int batch, size_t cache_max, bench_core_result *out,
               char *errstr, size_t errstr_size);

/* ---- probe.c ---------------------------------------------------------------- */

/** CPU seconds (utime + stime) of process `pid` from /proc; -1 when gone. */
double bench_proc_cpu(pid_t pid);
/** Minor page faults of a process so far, or -1. */
double bench_proc_minflt(pid_t pid);
/** Peak resident set (VmHWM) of `pid` in bytes; -1 when gone. */
int64_t bench_proc_hwm(pid_t pid);

/* Redis server counters (INFO), the client that reads them counting its own
 * commands so they can be subtracted. */
typedef struct bench_redis_info {
    int64_t commands; /* total_commands_processed */
    int64_t evalsha;  /* cmdstat_evalsha calls */
    int64_t hgetall;  /* cmdstat_hgetall calls */
    int64_t net_in;   /* total_net_input_bytes */
    int64_t net_out;  /* total_net_output_bytes */
    int64_t used_mem; /* used_memory */
    int64_t keys;     /* keys of db0 */
    double cpu;       /* redis-server process CPU seconds */
    int64_t own_cmds; /* commands the bench sent so far (subtract) */
    int64_t own_in;   /* bytes the bench sent so far, approximately */
    struct {
        char name[32];
        int64_t calls;
    } cmd[48]; /* INFO commandstats per command, those run inside Lua included */
    int ncmd;
} bench_redis_info;

typedef struct bench_redis {
    redisContext *c;
    pid_t pid; /* redis-server, for its CPU */
    int64_t own_cmds;
    int64_t own_in;
} bench_redis;

/** Connects to the unix socket `path`.  @returns 0 or -1 with a reason. */
int bench_redis_open(bench_redis *r, const char *path, pid_t pid, char *errstr, size_t errstr_size);
void bench_redis_close(bench_redis *r);
/** Snapshot of the counters.  @returns 0 or -1. */
int bench_redis_info_read(bench_redis *r, bench_redis_info *out);
/** FLUSHALL and CONFIG RESETSTAT-free reset of the keyspace.  @returns 0 or -1. */
int bench_redis_flush(bench_redis *r);

/* Progress of one consumer group in Redis: which partitions are claimed and
 * how far each has written. */
typedef struct bench_progress {
    int32_t partitions;
    const char *group, *topics[2];
    int64_t *end[2]; /* high watermark of each partition of each topic */
    unsigned char *done;
    int64_t *epoch0; /* epochs before the run (NULL: all 0); claimed = above it */
} bench_progress;

/** Reads every partition's epoch into epochs[].  @returns 0 or -1. */
int bench_progress_epochs(bench_redis *r, bench_progress *pg, int64_t *epochs);

/* The group's counters pql:{g:p}:c:stats summed over partitions. */
enum { BENCH_CONSUMED, BENCH_DEAD, BENCH_LATE, BENCH_ALERTS_PQL, BENCH_ALERTS_EXP, BENCH_NSTATS };
/** @returns 0 or -1. */
int bench_progress_stats(bench_redis *r, bench_progress *pg, int64_t stats[BENCH_NSTATS]);

/** @returns how many partitions are claimed (epoch above epoch0), or -1. */
int bench_progress_claimed(bench_redis *r, bench_progress *pg);
/** @returns how many partitions have written offsets at their end, or -1. */
int bench_progress_done(bench_redis *r, bench_progress *pg);

/* A pqlstream child process. */
typedef struct bench_proc {
    pid_t pid;
    char log[512]; /* its stdout + stderr */
} bench_proc;

/** Starts `binary` with argv (NULL-terminated, argv[0] included), output to
 *  `log`.  @returns 0 or -1 with a reason. */
int bench_proc_start(bench_proc *p, char *const *argv, const char *log, char *errstr,
                     size_t errstr_size);
/** @returns 1 when the process has exited (reaped), else 0. */
int bench_proc_exited(bench_proc *p);
/** SIGTERM, wait up to timeout_ms, then SIGKILL.  @returns its exit status or -1. */
int bench_proc_stop(bench_proc *p, int timeout_ms);
/** Reads round_trips/commands from the "redis client totals" log line.
 *  @returns 0 or -1 when the line is missing. */
int bench_proc_redis_totals(const bench_proc *p, int64_t *round_trips, int64_t *commands);
/** Counts lines of the log containing `needle`. */
int bench_proc_log_count(const bench_proc *p, const char *needle);
/** Prints the last `lines` lines of the log to stderr. */
void bench_proc_log_tail(const bench_proc *p, int lines);

/** High watermarks of every partition of `topic` into end[0..partitions).
 *  @returns 0 or -1 with a reason; also -1 when a partition's low watermark
 *  is above 0 (the mock's retention dropped messages). */
int bench_watermarks(rd_kafka_t *rk, const char *topic, int32_t partitions, int64_t *end,
                     char *errstr, size_t errstr_size);

/** The raw floor: a plain consumer that reads every message of `topics`
 *  (partitions each) from the beginning and discards it.  `expect` messages in
 *  all.  @returns events/s, or -1 with a reason. */
double bench_raw_consume(const char *bootstraps, const char *const *topics, int ntopics,
                         int32_t partitions, int64_t expect, char *errstr, size_t errstr_size);

/** redis-benchmark -P 64 HINCRBY over `keyspace` keys against the unix socket.
 *  @returns requests/s, or -1 with a reason. */
double bench_redis_benchmark(const char *socket, int64_t requests, int keyspace, char *errstr,
                             size_t errstr_size);

/** Wall clock in ms / monotonic seconds. */
double bench_mono_s(void);

#endif
