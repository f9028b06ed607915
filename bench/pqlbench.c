/* pqlbench.c — the benchmark of docs/performance.md: what pqlstream does on
 * this machine, next to what Kafka and Redis alone can do, in one run.
 *
 * One invocation starts its own mock cluster (in-process) and private
 * redis-server, produces a realistic workload (workload.c), then measures:
 *
 *   A  the raw floor: a plain consumer reading both topics and discarding;
 *   B  the raw Redis ceiling: redis-benchmark -P 64 HINCRBY;
 *   C  pqlstream (the real binary, 1 process): events/s from all partitions
 *      claimed to the last offset written to Redis, Redis round trips and
 *      commands per event, peak RSS, CPU per million events;
 *   D  event→alert latency at a fixed offered load (half of C by default);
 *   E  scaling: 2 and 3 pqlstream processes in one group;
 *   F  Redis write cost as the account count grows (10k, 100k, 1M).
 *
 * Every figure runs --reps times (fresh group, fresh keyspace) and the table
 * shows the median and the range.  --smoke runs tiny sizes and checks that
 * every figure is sane (ctest label `bench`).  Usage: pqlbench --help. */
#include "bench.h"

#include "alert.h"
#include "embedded_kafka.h"
#include "redis_child.h"

#include <errno.h>
#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#define MAX_REPS   5
#define MAX_PROCS  8
#define MAX_SCALES 6
#define TIMEOUT_S  900

/* ---- options ------------------------------------------------------------------ */

typedef struct bench_opts {
    int64_t events;
    int accounts, partitions, days, reps, max_procs;
    double zipf;
    double latency_s, latency_rate; /* 0: half the measured max */
    int probes_per_s, latency_partitions;
    int scales[MAX_SCALES], nscales;
    int64_t scale_events;
    int smoke;
    uint64_t seed;
    const char *pqlstream, *rules, *workdir, *perf;
    const char *pql_args[16];
    int npql_args;
    int skip_core, skip_raw, skip_redis, skip_latency, skip_scaling, skip_accounts;
    int core_only; /* the core figure alone: no broker, no Redis, no pqlstream */
} bench_opts;

static void usage(FILE *out)
{
    fprintf(out,
            "usage: pqlbench [options]   (bench/run builds it and passes --pqlstream, --rules)\n"
            "  --events N          messages pre-produced to the input topics (2000000)\n"
            "  --accounts N        accounts of the main workload (50000)\n"
            "  --partitions N      partitions of every topic (128; the mock keeps 100k msgs or\n"
            "                      5 MB per partition)\n"
            "  --zipf S            activity skew: rank k active ∝ 1/(k+50)^S (1.0)\n"
            "  --days N            event time spans N days (30)\n"
            "  --reps N            runs of each figure, median and range reported (3, max %d)\n"
            "  --procs N           scaling figure up to N pqlstream processes (3)\n"
            "  --latency-seconds S duration of the latency phase (20)\n"
            "  --latency-rate R    offered events/s (default: half the measured max)\n"
            "  --probes R          probe accounts per second crossing a rule (50)\n"
            "  --latency-partitions N  partitions of the live topics (8; see measure_latency)\n"
            "  --scale-accounts L  comma list for the Redis-cost figure (10000,100000,1000000;\n"
            "                      'none' skips it)\n"
            "  --scale-events N    messages of each Redis-cost workload (1000000)\n"
            "  --perf FILE         perf record -g the first 1-process pqlstream run into FILE\n"
            "  --pql-arg ARG       extra argument for every pqlstream run (repeatable)\n"
            "  --phases LIST       which figures besides pqlstream's own (always run), comma\n"
            "                      list of core,raw,redis,latency,scaling,accounts (all)\n"
            "  --seed N            workload seed (1)\n"
            "  --workdir DIR       logs and the Redis data (bench-data)\n"
            "  --pqlstream PATH    the binary (build/pqlstream)\n"
            "  --rules PATH        the rule set (rules)\n"
            "  --core-only         the core figure alone, in this process: no broker, Redis\n"
            "                      or pqlstream (for valgrind --tool=callgrind/cachegrind,\n"
            "                      whose counts repeat where timings do not)\n"
            "  --smoke             tiny sizes, sanity checks, < 1 minute (ctest)\n",
            MAX_REPS);
}

static int parse_scales(bench_opts *o, const char *list)
{
    o->nscales = 0;
    if (!strcmp(list, "none")) return 0;
    char *copy = strdup(list), *save = NULL;
    for (char *t = strtok_r(copy, ",", &save); t && o->nscales < MAX_SCALES;
         t = strtok_r(NULL, ",", &save))
        o->scales[o->nscales++] = atoi(t);
    free(copy);
    for (int i = 0; i < o->nscales; i++)
        if (o->scales[i] <= 0) return -1;
    return 0;
}

static int parse_args(bench_opts *o, int argc, char **argv)
{
    *o = (bench_opts){.events = 2000000,
                      .accounts = 50000,
                      .partitions = 128,
                      .days = 30,
                      .reps = 3,
                      .max_procs = 3,
                      .zipf = 1.0,
                      .latency_s = 20,
                      .probes_per_s = 50,
                      .latency_partitions = 8,
                      .scale_events = 1000000,
                      .seed = 1,
                      .pqlstream = "build/pqlstream",
                      .rules = "rules",
                      .workdir = "bench-data"};
    parse_scales(o, "10000,100000,1000000");
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--smoke")) { /* tiny sizes first; flags given still win */
            o->smoke = 1;
            o->events = 20000;
            o->accounts = 2000;
            o->partitions = 8;
            o->reps = 1;
            o->max_procs = 2;
            o->latency_s = 3;
            o->probes_per_s = 20;
            o->scales[0] = 1000, o->scales[1] = 10000, o->nscales = 2;
            o->scale_events = 10000;
        }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
#define ARG(name) (!strcmp(a, name) && v && ++i)
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            exit(0);
        } else if (!strcmp(a, "--smoke")) {
            o->smoke = 1;
        } else if (!strcmp(a, "--core-only")) {
            o->core_only = 1;
        } else if (!strcmp(a, "--phases") && v) {
            const char *l = argv[++i];
            o->skip_core = !strstr(l, "core");
            o->skip_raw = !strstr(l, "raw");
            o->skip_redis = !strstr(l, "redis");
            o->skip_latency = !strstr(l, "latency");
            o->skip_scaling = !strstr(l, "scaling");
            o->skip_accounts = !strstr(l, "accounts");
        } else if (ARG("--events")) {
            o->events = atoll(v);
        } else if (ARG("--accounts")) {
            o->accounts = atoi(v);
        } else if (ARG("--partitions")) {
            o->partitions = atoi(v);
        } else if (ARG("--zipf")) {
            o->zipf = atof(v);
        } else if (ARG("--days")) {
            o->days = atoi(v);
        } else if (ARG("--reps")) {
            o->reps = atoi(v);
        } else if (ARG("--procs")) {
            o->max_procs = atoi(v);
        } else if (ARG("--latency-seconds")) {
            o->latency_s = atof(v);
        } else if (ARG("--latency-rate")) {
            o->latency_rate = atof(v);
        } else if (ARG("--probes")) {
            o->probes_per_s = atoi(v);
        } else if (ARG("--latency-partitions")) {
            o->latency_partitions = atoi(v);
        } else if (ARG("--scale-accounts")) {
            if (parse_scales(o, v) < 0) {
                fprintf(stderr, "pqlbench: --scale-accounts takes a comma list of positive "
                                "counts, e.g. 10000,100000, or none\n");
                return -1;
            }
        } else if (ARG("--scale-events")) {
            o->scale_events = atoll(v);
        } else if (ARG("--seed")) {
            o->seed = strtoull(v, NULL, 10);
        } else if (!strcmp(a, "--workdir") && v) {
            o->workdir = argv[++i];
        } else if (!strcmp(a, "--pqlstream") && v) {
            o->pqlstream = argv[++i];
        } else if (!strcmp(a, "--rules") && v) {
            o->rules = argv[++i];
        } else if (!strcmp(a, "--perf") && v) {
            o->perf = argv[++i];
        } else if (!strcmp(a, "--pql-arg") && v && o->npql_args < 16) {
            o->pql_args[o->npql_args++] = argv[++i];
        } else {
            fprintf(stderr, "pqlbench: unknown or incomplete option '%s'\n", a);
            usage(stderr);
            return -1;
        }
#undef ARG
    }
    if (o->core_only) o->skip_core = 0; /* whatever --phases said */
    if (o->reps < 1 || o->reps > MAX_REPS || o->max_procs < 1 || o->max_procs > MAX_PROCS ||
        o->events < 1000 || o->accounts < 1 || o->partitions < 1 || o->latency_partitions < 1) {
        fprintf(stderr,
                "pqlbench: --reps 1..%d, --procs 1..%d, --events >= 1000, --accounts, "
                "--partitions and --latency-partitions >= 1\n",
                MAX_REPS, MAX_PROCS);
        return -1;
    }
    return 0;
}

/* ---- figures: samples, median, range ------------------------------------------- */

typedef struct figure {
    double v[MAX_REPS];
    int n;
} figure;

static void fig_add(figure *f, double v)
{
    if (f->n < MAX_REPS) f->v[f->n++] = v;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double fig_median(const figure *f)
{
    if (!f->n) return NAN;
    double s[MAX_REPS];
    memcpy(s, f->v, sizeof(double) * (size_t)f->n);
    qsort(s, (size_t)f->n, sizeof(double), cmp_double);
    return f->n % 2 ? s[f->n / 2] : (s[f->n / 2 - 1] + s[f->n / 2]) / 2;
}

static double fig_min(const figure *f)
{
    double m = INFINITY;
    for (int i = 0; i < f->n; i++)
        m = f->v[i] < m ? f->v[i] : m;
    return m;
}

static double fig_max(const figure *f)
{
    double m = -INFINITY;
    for (int i = 0; i < f->n; i++)
        m = f->v[i] > m ? f->v[i] : m;
    return m;
}

/* Human number: 1.23M, 45.6k, 0.0123. */
static void human(char *out, size_t size, double v)
{
    double a = fabs(v);
    if (isnan(v))
        snprintf(out, size, "-");
    else if (a >= 1e6)
        snprintf(out, size, "%.2fM", v / 1e6);
    else if (a >= 1e4)
        snprintf(out, size, "%.1fk", v / 1e3);
    else if (a >= 100)
        snprintf(out, size, "%.0f", v);
    else if (a >= 1)
        snprintf(out, size, "%.2f", v);
    else
        snprintf(out, size, "%.4f", v);
}

/* One table row: figure, median, range, runs, target / note. */
static void row(const char *name, const figure *f, const char *unit, const char *note)
{
    char med[32], lo[32], hi[32], range[80] = "-";
    human(med, sizeof med, fig_median(f));
    if (f->n > 1) {
        human(lo, sizeof lo, fig_min(f));
        human(hi, sizeof hi, fig_max(f));
        snprintf(range, sizeof range, "%s – %s", lo, hi);
    }
    printf("| %-52s | %10s %-6s | %-19s | %4d | %s |\n", name, med, unit, range, f->n,
           note ? note : "");
}

/* ---- the bench's world ----------------------------------------------------------- */

typedef struct bench {
    bench_opts o;
    pql_embedded_kafka *kafka;
    pql_redis_child *redis;
    const char *bootstraps, *redis_url, *redis_socket;
    bench_redis r;
    rd_kafka_t *meta; /* for watermarks */
    char rules_abs[4096], binary_abs[4096];
    int runs; /* pqlstream runs so far (group names) */
} bench;

/* What one pqlstream measurement gives. */
typedef struct pql_run {
    int64_t events;
    double seconds, events_per_s;
    double rt_per_event, cmds_per_event, client_cmds_per_event, evalsha_per_event;
    double in_bytes_per_event, redis_cpu_us_per_event;
    double cpu_s_per_m, peak_rss, used_mem;
    double faults_per_event; /* minor page faults of pqlstream (fresh memory touched) */
    double cores_pql, cores_redis, cores_bench; /* CPU busy / wall time during the run */
    int64_t stats[BENCH_NSTATS];
    int64_t keys;
    int revocations;
} pql_run;

/* A topic pair with its end offsets. */
typedef struct input {
    const char *usage, *accounts;
    const char *alerts; /* NULL: bench-alerts */
    int64_t *end[2];
    int64_t total;
    bench_produced produced;
} input;

static int create_topics(bench *b, const char *const *topics, int partitions)
{
    for (int i = 0; topics[i]; i++) {
        rd_kafka_resp_err_t e =
            rd_kafka_mock_topic_create(pql_embedded_kafka_mock(b->kafka), topics[i], partitions, 1);
        if (e) {
            fprintf(stderr, "pqlbench: cannot create topic %s: %s\n", topics[i],
                    rd_kafka_err2str(e));
            return -1;
        }
    }
    return 0;
}

/* Produces a workload into `in`'s topics and reads their end offsets. */
static int produce_input(bench *b, bench_workload *w, input *in, int64_t events)
{
    char err[512];
    for (int k = 0; k < 2; k++)
        in->end[k] = calloc((size_t)b->o.partitions, sizeof(int64_t));
    if (bench_workload_produce(w, b->bootstraps, in->usage, in->accounts, events, &in->produced,
                               err, sizeof err) < 0 ||
        bench_watermarks(b->meta, in->usage, b->o.partitions, in->end[0], err, sizeof err) < 0 ||
        bench_watermarks(b->meta, in->accounts, b->o.partitions, in->end[1], err, sizeof err) < 0) {
        fprintf(stderr, "pqlbench: %s\n", err);
        return -1;
    }
    in->total = 0;
    for (int k = 0; k < 2; k++)
        for (int p = 0; p < b->o.partitions; p++)
            in->total += in->end[k][p];
    printf("  produced %lld messages (%lld usage events, %lld account updates, %.0f B/msg avg, "
           "%lld accounts) to %s/%s in %.1f s (%.0fk msgs/s)\n",
           (long long)in->total, (long long)in->produced.usage, (long long)in->produced.updates,
           (double)in->produced.bytes / (double)in->total, (long long)in->produced.accounts,
           in->usage, in->accounts, in->produced.seconds,
           (double)in->total / in->produced.seconds / 1e3);
    fflush(stdout);
    return 0;
}

/* Starts `n` pqlstream processes of `group` on `in`. */
static int start_procs(bench *b, const input *in, const char *group, const char *tag, int n,
                       bench_proc *procs, const char *extra)
{
    char err[512];
    for (int i = 0; i < n; i++) {
        char a[7][4400], log[600];
        const char *argv[32];
        int k = 0;
        snprintf(a[0], sizeof a[0], "--kafka.brokers=%s", b->bootstraps);
        snprintf(a[1], sizeof a[1], "--redis.url=%s", b->redis_url);
        snprintf(a[2], sizeof a[2], "--rules=%s", b->rules_abs);
        snprintf(a[3], sizeof a[3], "--group=%s", group);
        snprintf(a[4], sizeof a[4], "--topics.usage=%s", in->usage);
        snprintf(a[5], sizeof a[5], "--topics.accounts=%s", in->accounts);
        snprintf(a[6], sizeof a[6], "--topics.alerts=%s", in->alerts ? in->alerts : "bench-alerts");
        argv[k++] = b->binary_abs;
        argv[k++] = "run";
        for (int j = 0; j < 7; j++)
            argv[k++] = a[j];
        argv[k++] = "--topics.metrics=bench-metrics";
        argv[k++] = "--topics.dlq=bench-dlq";
        argv[k++] = "--kafka.session.timeout.ms=6000";
        argv[k++] = "--rules.watch=0";
        /* an ephemeral port: several processes per run, and any pqlstream
           already serving the default port on this host */
        argv[k++] = "--http=127.0.0.1:0";
        if (extra) argv[k++] = extra;
        for (int j = 0; j < b->o.npql_args; j++)
            argv[k++] = b->o.pql_args[j];
        argv[k] = NULL;
        snprintf(log, sizeof log, "%s/%s%s-%d.log", b->o.workdir, group, tag, i);
        if (bench_proc_start(&procs[i], (char *const *)argv, log, err, sizeof err) < 0) {
            fprintf(stderr, "pqlbench: cannot start pqlstream: %s\n", err);
            return -1;
        }
        static int printed;
        if (!printed++) {
            printf("  pqlstream command:");
            for (int j = 0; argv[j]; j++)
                printf(" %s", argv[j]);
            printf("\n");
        }
    }
    return 0;
}

static void stop_procs(bench_proc *procs, int n)
{
    for (int i = 0; i < n; i++)
        if (procs[i].pid > 0) bench_proc_stop(&procs[i], 15000);
}

/* Waits until every partition of `pg` is claimed (or done, when `done`).
 * @returns 0, or -1 when a process died or the timeout passed. */
static int wait_progress(bench *b, bench_progress *pg, bench_proc *procs, int n, int done,
                         double timeout_s)
{
    double deadline = bench_mono_s() + timeout_s;
    for (;;) {
        int k = done ? bench_progress_done(&b->r, pg) : bench_progress_claimed(&b->r, pg);
        if (k < 0) {
            fprintf(stderr, "pqlbench: lost the connection to the bench's Redis\n");
            return -1;
        }
        if (k == pg->partitions) return 0;
        for (int i = 0; i < n; i++)
            if (bench_proc_exited(&procs[i])) {
                fprintf(stderr, "pqlbench: pqlstream (%s) exited during the run\n", procs[i].log);
                bench_proc_log_tail(&procs[i], 30);
                return -1;
            }
        if (bench_mono_s() > deadline) {
            fprintf(stderr, "pqlbench: %d of %d partitions %s after %.0f s\n", k, pg->partitions,
                    done ? "done" : "claimed", timeout_s);
            for (int i = 0; i < n; i++)
                bench_proc_log_tail(&procs[i], 15);
            return -1;
        }
        struct timespec ts = {0, done ? 5000000L : 10000000L};
        nanosleep(&ts, NULL);
    }
}

/* Runs `n` pqlstream processes in a fresh group on a fresh keyspace over all
 * of `in` and measures from all partitions claimed to the last offset
 * written.  When `keep` is set the processes are left running (stopped by
 * the caller).  @returns 0 or -1. */
static int measure_pqlstream(bench *b, const input *in, int n, const char *perf, pql_run *out,
                             char *group_out, size_t group_size)
{
    bench_proc procs[MAX_PROCS], perfp = {0};
    char group[64];
    int rc = -1;
    memset(out, 0, sizeof *out);
    snprintf(group, sizeof group, "bench-%d-p%d", ++b->runs, n);
    if (group_out) snprintf(group_out, group_size, "%s", group);
    bench_progress pg = {.partitions = b->o.partitions,
                         .group = group,
                         .topics = {in->usage, in->accounts},
                         .end = {in->end[0], in->end[1]}};
    pg.done = calloc((size_t)pg.partitions, 1);
    if (bench_redis_flush(&b->r) < 0) goto out;
    if (start_procs(b, in, group, "", n, procs, NULL) < 0) goto out;
    if (wait_progress(b, &pg, procs, n, 0, 120) < 0) goto stop;

    bench_redis_info i0, i1;
    double cpu0[MAX_PROCS], flt0[MAX_PROCS], t0 = bench_mono_s(),
                                             bench_cpu0 = bench_proc_cpu(getpid());
    bench_redis_info_read(&b->r, &i0);
    for (int i = 0; i < n; i++) {
        cpu0[i] = bench_proc_cpu(procs[i].pid);
        flt0[i] = bench_proc_minflt(procs[i].pid);
    }
    if (perf) {
        char pid[32], err[256];
        snprintf(pid, sizeof pid, "%d", (int)procs[0].pid);
        const char *argv[] = {"perf", "record", "-g", "-F", "499", "-p", pid, "-o", perf, NULL};
        char log[600];
        snprintf(log, sizeof log, "%s/perf-record.log", b->o.workdir);
        if (bench_proc_start(&perfp, (char *const *)argv, log, err, sizeof err) < 0)
            fprintf(stderr, "pqlbench: perf: %s\n", err);
    }
    if (wait_progress(b, &pg, procs, n, 1, TIMEOUT_S) < 0) goto stop;
    double t1 = bench_mono_s(), bench_cpu1 = bench_proc_cpu(getpid());
    bench_redis_info_read(&b->r, &i1);
    double cpu = 0, flt = 0;
    for (int i = 0; i < n; i++) {
        cpu += bench_proc_cpu(procs[i].pid) - cpu0[i];
        flt += bench_proc_minflt(procs[i].pid) - flt0[i];
        double hwm = (double)bench_proc_hwm(procs[i].pid);
        out->peak_rss = hwm > out->peak_rss ? hwm : out->peak_rss;
        out->revocations += bench_proc_log_count(&procs[i], "msg=\"partitions revoked\"");
    }
    if (perfp.pid > 0) {
        kill(perfp.pid, SIGINT);
        for (int k = 0; k < 500 && !bench_proc_exited(&perfp); k++) {
            struct timespec ts = {0, 20000000L};
            nanosleep(&ts, NULL);
        }
    }
    bench_progress_stats(&b->r, &pg, out->stats);
    double ev = (double)in->total;
    out->events = in->total;
    out->seconds = t1 - t0;
    out->events_per_s = ev / out->seconds;
    out->faults_per_event = flt / ev;
    /* server-side deltas, minus what the bench itself sent in between */
    int64_t own = i1.own_cmds - i0.own_cmds;
    out->cmds_per_event = (double)(i1.commands - i0.commands - own) / ev;
    out->evalsha_per_event = (double)(i1.evalsha - i0.evalsha) / ev;
    out->in_bytes_per_event = (double)(i1.net_in - i0.net_in - (i1.own_in - i0.own_in)) / ev;
    out->redis_cpu_us_per_event = (i1.cpu - i0.cpu) * 1e6 / ev;
    out->cpu_s_per_m = cpu / (ev / 1e6);
    out->cores_pql = cpu / out->seconds;
    out->cores_redis = (i1.cpu - i0.cpu) / out->seconds;
    out->cores_bench = (bench_cpu1 - bench_cpu0) / out->seconds;
    out->used_mem = (double)i1.used_mem;
    if (perf || b->runs == 1) { /* once: which commands make up the server's count */
        printf("  server commands per event, by command (first run):");
        for (int k = 0; k < i1.ncmd; k++) {
            int64_t before = 0;
            for (int m = 0; m < i0.ncmd; m++)
                if (!strcmp(i0.cmd[m].name, i1.cmd[k].name)) before = i0.cmd[m].calls;
            double per = (double)(i1.cmd[k].calls - before) / ev;
            if (per >= 0.0005) printf(" %s %.4f", i1.cmd[k].name, per);
        }
        printf(" (hget/hmget/info: the bench's own polling)\n");
    }
    out->keys = i1.keys;
    rc = 0;
stop:
    stop_procs(procs, n);
    if (rc == 0) {
        int64_t rt = 0, cmds = 0, sum_rt = 0, sum_cmds = 0;
        for (int i = 0; i < n; i++)
            if (bench_proc_redis_totals(&procs[i], &rt, &cmds) == 0) sum_rt += rt, sum_cmds += cmds;
        out->rt_per_event = (double)sum_rt / (double)in->total;
        out->client_cmds_per_event = (double)sum_cmds / (double)in->total;
        if (!sum_rt) {
            fprintf(stderr, "pqlbench: no \"redis client totals\" line in the pqlstream logs\n");
            rc = -1;
        }
    }
out:
    free(pg.done);
    return rc;
}

/* ---- latency ------------------------------------------------------------------------ */

typedef struct latency_ctx {
    const char *bootstraps;
    const char *alerts_topic; /* read from its beginning */
    int32_t partitions;
    int64_t since; /* wall clock: only alerts triggered at or after it */
    atomic_int stop;
    double *samples; /* ms */
    size_t n, cap;
    double *at; /* when each sample's alert was triggered, s after `since` */
    size_t atn, atcap;
    atomic_long probe_alerts;
    pthread_mutex_t lock;
    /* Kafka alone: the live usage topic read by a plain consumer */
    const char *live_topic;
    int32_t live_partitions;
    double *ksamples; /* ms, the live reader's alone */
    size_t kn, kcap;
} latency_ctx;

static void add_sample(double **v, size_t *n, size_t *cap, double x)
{
    if (*n == *cap) {
        *cap = *cap ? *cap * 2 : 4096;
        *v = realloc(*v, *cap * sizeof(double));
        if (!*v) abort();
    }
    (*v)[(*n)++] = x;
}

/* A consumer of partitions 0..n-1 of `topic`, each from start[p] (start
 * NULL: from the beginning), with `fetch_wait_ms` and, unless NULL,
 * `queued_min` (queued.min.messages).  @returns it, or NULL (said why). */
static rd_kafka_t *assigned_consumer(const char *bootstraps, const char *group,
                                     const char *fetch_wait_ms, const char *queued_min,
                                     const char *topic, int32_t n, const int64_t *start)
{
    char err[512];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set(conf, "bootstrap.servers", bootstraps, err, sizeof err);
    rd_kafka_conf_set(conf, "group.id", group, err, sizeof err);
    rd_kafka_conf_set(conf, "enable.auto.commit", "false", err, sizeof err);
    rd_kafka_conf_set(conf, "fetch.wait.max.ms", fetch_wait_ms, err, sizeof err);
    if (queued_min) rd_kafka_conf_set(conf, "queued.min.messages", queued_min, err, sizeof err);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, err, sizeof err);
    if (!rk) {
        fprintf(stderr, "pqlbench: consumer of %s: %s\n", topic, err);
        return NULL;
    }
    rd_kafka_poll_set_consumer(rk);
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(n);
    for (int32_t p = 0; p < n; p++)
        rd_kafka_topic_partition_list_add(l, topic, p)->offset =
            start ? start[p] : RD_KAFKA_OFFSET_BEGINNING;
    rd_kafka_assign(rk, l);
    rd_kafka_topic_partition_list_destroy(l);
    return rk;
}

/* Kafka's own latency (measure_kafka_alone): a plain consumer of a live
 * usage topic (pqlstream's fetch.wait.max.ms and pre-fetch, the same
 * poll-then-drain reads as its loop) records, for every event produced after
 * the warm-up, its arrival wall clock − its timestamp (stamped when the load
 * generator produced it). */
static void *live_reader(void *opaque)
{
    latency_ctx *c = opaque;
    rd_kafka_t *rk = assigned_consumer(c->bootstraps, "pqlbench-live", "10", "500000",
                                       c->live_topic, c->live_partitions, NULL);
    if (!rk) return NULL;
    rd_kafka_queue_t *q = rd_kafka_queue_get_consumer(rk);
    rd_kafka_message_t *chunk[512];
    while (!atomic_load(&c->stop)) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 100);
        if (!m) continue;
        int64_t now = pql_now_ms();
        chunk[0] = m;
        ssize_t got = 1 + rd_kafka_consume_batch_queue(q, 0, chunk + 1, 511);
        for (ssize_t i = 0; i < got; i++) {
            int64_t ts = chunk[i]->err ? -1 : rd_kafka_message_timestamp(chunk[i], NULL);
            if (ts >= c->since) add_sample(&c->ksamples, &c->kn, &c->kcap, (double)(now - ts));
            rd_kafka_message_destroy(chunk[i]);
        }
    }
    rd_kafka_queue_destroy(q);
    rd_kafka_consumer_close(rk);
    rd_kafka_destroy(rk);
    return NULL;
}

/* The alert consumer: delivered wall clock − triggered_at, per alert. */
static void *alert_reader(void *opaque)
{
    latency_ctx *c = opaque;
    char err[512];
    rd_kafka_t *rk = assigned_consumer(c->bootstraps, "pqlbench-alerts", "5", NULL, c->alerts_topic,
                                       c->partitions, NULL);
    if (!rk) return NULL;
    /* one message at a time: consume_batch_queue would wait for a full batch */
    while (!atomic_load(&c->stop)) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 100);
        int64_t now = pql_now_ms();
        if (m) {
            json_t *j = m->err ? NULL : pql_alert_avro_to_json(m->payload, m->len, err, sizeof err);
            rd_kafka_message_destroy(m);
            if (!j) continue;
            int64_t trig = json_integer_value(json_object_get(j, "triggered_at"));
            const char *acct = json_string_value(json_object_get(j, "account_id"));
            if (trig >= c->since) {
                pthread_mutex_lock(&c->lock);
                add_sample(&c->samples, &c->n, &c->cap, (double)(now - trig));
                add_sample(&c->at, &c->atn, &c->atcap, (double)(trig - c->since) / 1000.0);
                pthread_mutex_unlock(&c->lock);
                if (acct && !strncmp(acct, "probe-", 6)) atomic_fetch_add(&c->probe_alerts, 1);
            }
            json_decref(j);
        }
    }
    rd_kafka_consumer_close(rk);
    rd_kafka_destroy(rk);
    return NULL;
}

/* The p-quantile of n sorted samples (NaN when there are none). */
static double pick(const double *sorted, size_t n, double p)
{
    if (!n) return NAN;
    size_t k = (size_t)ceil(p * (double)n) - 1;
    return sorted[k < n ? k : n - 1];
}

static double percentile(double *s, size_t n, double p)
{
    if (n) qsort(s, n, sizeof(double), cmp_double); /* s may be NULL when n is 0 */
    return pick(s, n, p);
}

/* p50, p99 and max of n samples (sorted in place, once). */
static void summarize(double *s, size_t n, double *p50, double *p99, double *max)
{
    if (n) qsort(s, n, sizeof(double), cmp_double);
    *p50 = pick(s, n, 0.50);
    *p99 = pick(s, n, 0.99);
    *max = pick(s, n, 1.0);
}

#define LAT_WINDOWS 12

typedef struct latency_result {
    double offered, p50, p99, max;
    double kafka_p50, kafka_p99, kafka_max; /* produce → plain consumer, same load */
    double kafka_cpu_bench;
    size_t kafka_samples;
    double win_p99[LAT_WINDOWS]; /* p99 of the alerts triggered in each 5 s */
    int nwin;
    double cpu_pql, cpu_redis, cpu_bench; /* cores busy during the phase */
    size_t samples;
    long probes, probe_alerts;
} latency_result;

/* Offers `rate` events/s of live load to `in` for `seconds` (10 ms bursts at
 * most), 50 probe accounts a second among them (bench_live_step), each
 * event stamped with the wall clock as it is produced.  Counts the probes
 * stamped at or after `since` into *probes.  @returns the events sent, or
 * -1. */
static long offer_load(bench *b, bench_workload *w, rd_kafka_t *rk, const input *in, double rate,
                       double seconds, int64_t since, long *probes)
{
    double t0 = bench_mono_s(), next_probe = t0, tokens = 0, last = t0;
    long sent = 0;
    int next_probe_id = 0;
    for (;;) {
        double now = bench_mono_s();
        if (now - t0 >= seconds) break;
        tokens += (now - last) * rate;
        last = now;
        if (tokens > rate / 100 + 4) tokens = rate / 100 + 4; /* 10 ms bursts at most */
        if (tokens < 1) {
            struct timespec ts = {0, 1000000L};
            nanosleep(&ts, NULL);
            rd_kafka_poll(rk, 0);
            continue;
        }
        int probe = -1;
        if (b->o.probes_per_s > 0 && now >= next_probe) {
            probe = (int)next_probe_id++;
            next_probe += 1.0 / b->o.probes_per_s;
        }
        int64_t stamp = pql_now_ms();
        if (probe >= 0 && stamp >= since) ++*probes; /* measured ones */
        int k = bench_live_step(w, rk, in->usage, in->accounts, stamp, probe);
        if (k < 0) return -1;
        tokens -= k;
        sent += k;
    }
    rd_kafka_flush(rk, 10000);
    return sent;
}

/* Kafka's own latency at the same offered load, nothing else running: the
 * same live load on fresh topics of the same shape, read by a plain consumer
 * (live_reader).  The floor under event→alert, which crosses Kafka twice.
 * (Measured apart, not beside pqlstream: on 2 cores a third consumer moved
 * pqlstream's p99 from ~0.1 s to 0.5 s.)  @returns 0 or -1. */
static int measure_kafka_alone(bench *b, bench_workload *w, double rate, double warmup,
                               latency_result *out)
{
    static const char *const topics[] = {"bench-kafka-usage", "bench-kafka-accounts", NULL};
    const input in = {.usage = topics[0], .accounts = topics[1]};
    char err[512];
    latency_ctx c = {.bootstraps = b->bootstraps,
                     .live_topic = topics[0],
                     .live_partitions = b->o.latency_partitions};
    long probes = 0;
    int rc = -1;
    rd_kafka_t *rk = NULL;
    pthread_t reader;
    if (create_topics(b, topics, b->o.latency_partitions) < 0) return -1;
    if (!(rk = bench_live_producer(b->bootstraps, err, sizeof err))) {
        fprintf(stderr, "pqlbench: latency producer: %s\n", err);
        return -1;
    }
    /* the reader's connections and first (empty) fetches come before the
       load, as pqlstream's did */
    c.since = pql_now_ms() + 1000 + (int64_t)(warmup * 1000);
    if (pthread_create(&reader, NULL, live_reader, &c) != 0) goto out;
    struct timespec settle = {1, 0};
    nanosleep(&settle, NULL);
    double t0 = bench_mono_s(), cpu0 = bench_proc_cpu(getpid());
    long sent = offer_load(b, w, rk, &in, rate, warmup + b->o.latency_s, c.since, &probes);
    double span = bench_mono_s() - t0;
    out->kafka_cpu_bench = (bench_proc_cpu(getpid()) - cpu0) / span;
    struct timespec ts = {0, 200000000L}; /* the last fetches */
    nanosleep(&ts, NULL);
    atomic_store(&c.stop, 1);
    pthread_join(reader, NULL);
    rc = sent < 0 ? -1 : 0;
out:
    rd_kafka_destroy(rk);
    out->kafka_samples = c.kn;
    summarize(c.ksamples, c.kn, &out->kafka_p50, &out->kafka_p99, &out->kafka_max);
    free(c.ksamples);
    return rc;
}

/* Restarts one pqlstream on `group` (warm state in Redis from its run over
 * the main input), offers `rate` events/s of live load with probes for
 * `seconds` and measures every alert's delivery latency; then Kafka's own
 * (measure_kafka_alone).  The live load goes to topics of its own, read
 * from their start: appended to the main input, it made every later run
 * over that input (the scaling figure) fetch and process ~2M events past
 * the end it measures to.  They have --latency-partitions (8) partitions:
 * the 2.0.2 mock finds a fetch's offset by walking the partition's list of
 * produced message sets from the oldest ("FIXME: Maintain an index" in
 * rdkafka_mock.c), on every fetch, empty ones included, and a live producer
 * (linger.ms=5) appends up to 200 sets a second to each partition, so the
 * mock's cost grew with partitions x seconds: on 128 partitions at 10k
 * events/s its thread was saturated and p50 reached 6.6 s.  The alerts, too,
 * go to a topic of their own (bench-live-alerts, as many partitions): the
 * reader's fetches, 200 a second, would otherwise walk the lists the
 * 1-process runs' alerts left on bench-alerts' 128 partitions.
 * @returns 0 or -1. */
static int measure_latency(bench *b, bench_workload *w, const char *group, double rate,
                           latency_result *out)
{
    static const char *const live_topics[] = {"bench-live-usage", "bench-live-accounts",
                                              "bench-live-alerts", NULL};
    const input live = {.usage = live_topics[0],
                        .accounts = live_topics[1],
                        .alerts = live_topics[2]},
                *in = &live;
    char err[512];
    bench_proc proc;
    int rc = -1;
    memset(out, 0, sizeof *out);
    latency_ctx c = {.bootstraps = b->bootstraps,
                     .alerts_topic = live_topics[2],
                     .partitions = b->o.latency_partitions};
    pthread_mutex_init(&c.lock, NULL);
    int64_t *epochs = calloc((size_t)b->o.latency_partitions, sizeof(int64_t));
    bench_progress pg = {.partitions = b->o.latency_partitions,
                         .group = group,
                         .topics = {in->usage, in->accounts},
                         .epoch0 = epochs};
    pthread_t reader;
    int reading = 0;
    rd_kafka_t *rk = NULL;
    /* a warm-up first: the consumer's first fetches after the claim, the
       cold cache; alerts triggered before `since` are not measured */
    double warmup = b->o.latency_s / 4 < 3 ? b->o.latency_s / 4 : 3;
    if (create_topics(b, live_topics, b->o.latency_partitions) < 0) goto out;
    if (bench_progress_epochs(&b->r, &pg, epochs) < 0) {
        fprintf(stderr, "pqlbench: latency: lost the connection to the bench's Redis\n");
        goto out;
    }
    if (start_procs(b, in, group, "-latency", 1, &proc, NULL) < 0) goto out;
    if (wait_progress(b, &pg, &proc, 1, 0, 120) < 0) goto stop;
    if (!(rk = bench_live_producer(b->bootstraps, err, sizeof err))) {
        fprintf(stderr, "pqlbench: latency producer: %s\n", err);
        goto stop;
    }
    c.since = pql_now_ms() + (int64_t)(warmup * 1000);
    if (pthread_create(&reader, NULL, alert_reader, &c) != 0) goto stop;
    reading = 1;
    double t0 = bench_mono_s();
    double cpu_pql0 = bench_proc_cpu(proc.pid), cpu_redis0 = bench_proc_cpu(b->r.pid),
           cpu_bench0 = bench_proc_cpu(getpid());
    long sent = offer_load(b, w, rk, in, rate, warmup + b->o.latency_s, c.since, &out->probes);
    if (sent < 0) goto stop;
    double span = bench_mono_s() - t0;
    out->offered = (double)sent / span;
    /* who was busy: pqlstream, redis-server, and this process (the load
       generator and the in-process mock cluster, which serves every fetch) */
    out->cpu_pql = (bench_proc_cpu(proc.pid) - cpu_pql0) / span;
    out->cpu_redis = (bench_proc_cpu(b->r.pid) - cpu_redis0) / span;
    out->cpu_bench = (bench_proc_cpu(getpid()) - cpu_bench0) / span;
    /* wait for the last probes' alerts (at most 10 s) */
    for (int i = 0; i < 1000 && atomic_load(&c.probe_alerts) < out->probes; i++) {
        struct timespec ts = {0, 10000000L};
        nanosleep(&ts, NULL);
    }
    rc = 0;
stop:
    atomic_store(&c.stop, 1);
    if (reading) pthread_join(reader, NULL);
    if (rk) rd_kafka_destroy(rk);
    stop_procs(&proc, 1);
out:
    out->samples = c.n;
    out->probe_alerts = atomic_load(&c.probe_alerts);
    /* the p99 of each 5 s: a tail that drifts (the mock, a backlog) or sits
       at the start (a cold cache) reads differently from a steady one */
    double *tmp = malloc((c.n ? c.n : 1) * sizeof(double));
    for (int k = 0; tmp && k < LAT_WINDOWS && k * 5.0 < b->o.latency_s; k++) {
        size_t m = 0;
        for (size_t i = 0; i < c.n; i++)
            if (c.at[i] >= k * 5.0 && c.at[i] < (k + 1) * 5.0) tmp[m++] = c.samples[i];
        out->win_p99[out->nwin++] = percentile(tmp, m, 0.99);
    }
    free(tmp);
    free(c.at);
    summarize(c.samples, c.n, &out->p50, &out->p99, &out->max);
    free(c.samples);
    free(epochs);
    pthread_mutex_destroy(&c.lock);
    if (rc == 0) rc = measure_kafka_alone(b, w, rate, warmup, out);
    return rc;
}

/* ---- machine -------------------------------------------------------------------------- */

static void shell_line(const char *cmd, char *out, size_t size)
{
    FILE *f = popen(cmd, "r");
    out[0] = '\0';
    if (!f) return;
    if (!fgets(out, (int)size, f)) out[0] = '\0';
    pclose(f);
    out[strcspn(out, "\n")] = '\0';
}

static void print_machine(bench *b, int argc, char **argv)
{
    char model[256], redis[256], pql[256], git[256], load[128];
    struct utsname u;
    uname(&u);
    shell_line("grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //'", model, sizeof model);
    shell_line("redis-server --version", redis, sizeof redis);
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "'%s' version", b->binary_abs);
    shell_line(cmd, pql, sizeof pql);
    shell_line("git rev-parse --short HEAD 2>/dev/null; git status --porcelain 2>/dev/null | head "
               "-c1 | sed 's/.*/ (with local changes)/'",
               git, sizeof git);
    shell_line("cat /proc/loadavg", load, sizeof load);
    time_t now = time(NULL);
    char date[64];
    strftime(date, sizeof date, "%Y-%m-%d %H:%M UTC", gmtime(&now));
    printf("pqlbench — %s\n", date);
    printf("  machine:  %ld cores, %s, %s %s\n", sysconf(_SC_NPROCESSORS_ONLN), model, u.sysname,
           u.release);
    printf("  versions: %s; librdkafka %s; %s; hiredis %d.%d.%d; jansson %s; commit %s\n", pql,
           rd_kafka_version_str(), redis, HIREDIS_MAJOR, HIREDIS_MINOR, HIREDIS_PATCH,
           JANSSON_VERSION, git);
    printf("  load average at start: %s\n", load);
    printf("  command:  ");
    for (int i = 0; i < argc; i++)
        printf("%s%s", i ? " " : "", argv[i]);
    printf("\n");
    fflush(stdout);
}

/* ---- main ------------------------------------------------------------------------------ */

static int setup(bench *b)
{
    char err[512], dir[4200];
    mkdir(b->o.workdir, 0755);
    if (!realpath(b->o.rules, b->rules_abs) || !realpath(b->o.pqlstream, b->binary_abs)) {
        fprintf(stderr, "pqlbench: cannot find %s or %s: %s (run bench/run, which builds them)\n",
                b->o.rules, b->o.pqlstream, strerror(errno));
        return -1;
    }
    snprintf(dir, sizeof dir, "%s/redis", b->o.workdir);
    pql_redis_child_opts ro = {.dir = dir, .appendonly = 0};
    if (!(b->redis = pql_redis_child_start(&ro, err, sizeof err))) {
        fprintf(stderr, "pqlbench: cannot start redis-server: %s\n", err);
        return -1;
    }
    b->redis_url = pql_redis_child_url(b->redis);
    b->redis_socket = b->redis_url + strlen("unix://");
    if (bench_redis_open(&b->r, b->redis_socket, pql_redis_child_pid(b->redis), err, sizeof err) <
        0) {
        fprintf(stderr, "pqlbench: %s\n", err);
        return -1;
    }
    const char *topics[] = {"bench-usage",   "bench-accounts", "bench-alerts",
                            "bench-metrics", "bench-dlq",      NULL};
    if (!(b->kafka = pql_embedded_kafka_start(3, topics, b->o.partitions, err, sizeof err))) {
        fprintf(stderr, "pqlbench: cannot start the mock cluster: %s\n", err);
        return -1;
    }
    b->bootstraps = pql_embedded_kafka_bootstraps(b->kafka);
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set(conf, "bootstrap.servers", b->bootstraps, err, sizeof err);
    if (!(b->meta = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof err))) {
        fprintf(stderr, "pqlbench: %s\n", err);
        return -1;
    }
    printf("  mock cluster at %s (3 brokers, %d partitions per topic); redis-server at %s (no "
           "persistence)\n",
           b->bootstraps, b->o.partitions, b->redis_url);
    return 0;
}

static void teardown(bench *b)
{
    bench_redis_close(&b->r);
    if (b->meta) rd_kafka_destroy(b->meta);
    pql_embedded_kafka_stop(b->kafka);
    pql_redis_child_stop(b->redis);
}

/* Smoke mode: a figure that must be finite and positive. */
/* Built with AddressSanitizer (whose allocator malloc's own count, and so
 * the core's heap figure, does not see)? */
static int under_sanitizer(void)
{
#if defined(__SANITIZE_ADDRESS__)
    return 1;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
    return 1;
#endif
#endif
    return 0;
}

static int check(int *failures, const char *what, double v)
{
    if (!(v > 0) || !isfinite(v)) {
        fprintf(stderr, "pqlbench --smoke: %s is %g, expected a positive figure\n", what, v);
        (*failures)++;
        return 0;
    }
    return 1;
}

int main(int argc, char **argv)
{
    bench b;
    memset(&b, 0, sizeof b);
    if (parse_args(&b.o, argc, argv) < 0) return 2;
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGPIPE, SIG_IGN);
    const bench_opts *o = &b.o;
    int failures = 0, rc = 1;
    bench_workload *w = NULL;
    input main_in = {.usage = "bench-usage", .accounts = "bench-accounts"};
    input scale_in[MAX_SCALES];
    memset(scale_in, 0, sizeof scale_in);

    if (!realpath(o->pqlstream, b.binary_abs))
        snprintf(b.binary_abs, sizeof b.binary_abs, "%s", o->pqlstream);
    print_machine(&b, argc, argv);
    if (!o->core_only && setup(&b) < 0) goto out;

    /* -- the workload -- */
    printf("\n[1/8] workload: %lld messages, %d accounts (Zipf s=%.2f), %d days, seed %llu\n",
           (long long)o->events, o->accounts, o->zipf, o->days, (unsigned long long)o->seed);
    bench_workload_opts wo = {o->accounts, o->zipf, o->days, o->seed};
    if (!(w = bench_workload_new(&wo))) goto out;
    if (!o->core_only && produce_input(&b, w, &main_in, o->events) < 0) goto out;

    /* -- the pure core on one thread -- */
    figure core_total, core_decode, core_apply, core_build, core_eps, core_heap, core_counted;
    memset(&core_total, 0, sizeof core_total);
    core_decode = core_apply = core_build = core_eps = core_heap = core_counted = core_total;
    if (!o->skip_core) {
        printf("[2/8] core: the main thread's work per event on one thread, no Kafka, no Redis "
               "(decode, apply the rules, build the batch writes every 50000 messages)\n");
        for (int i = 0; i < o->reps; i++) {
            bench_core_result cr;
            char cerr[512];
            if (bench_core(&wo, o->events, o->partitions, o->rules, 50000, 200000, &cr, cerr,
                           sizeof cerr) < 0) {
                fprintf(stderr, "pqlbench: core: %s\n", cerr);
                goto out;
            }
            printf("  run %d: decode %.3f µs + apply %.3f µs + build %.3f µs = %.3f µs per event "
                   "(%.0f events/s per core); %lld batches, %lld alerts; %lld accounts cached, "
                   "%.0f heap bytes each (the caches count %.0f), %.0f KB per task besides\n",
                   i + 1, cr.decode_us, cr.apply_us, cr.build_us, cr.total_us, 1e6 / cr.total_us,
                   (long long)cr.batches, (long long)cr.alerts, (long long)cr.accounts_cached,
                   cr.heap_per_account, cr.counted_per_account, cr.heap_per_task / 1024);
            fig_add(&core_decode, cr.decode_us);
            fig_add(&core_apply, cr.apply_us);
            fig_add(&core_build, cr.build_us);
            fig_add(&core_total, cr.total_us);
            fig_add(&core_eps, 1e6 / cr.total_us);
            if (isfinite(cr.heap_per_account))
                fig_add(&core_heap, cr.heap_per_account);
            else
                printf("  (heap not measured: malloc's count saw no allocation, as under a "
                       "sanitizer)\n");
            fig_add(&core_counted, cr.counted_per_account);
            if (o->smoke) {
                check(&failures, "core alerts", (double)cr.alerts);
                check(&failures, "core bytes per account as the caches count them",
                      cr.counted_per_account);
                if (isfinite(cr.heap_per_account) || !under_sanitizer())
                    check(&failures, "core heap bytes per account", cr.heap_per_account);
            }
        }
    }

    if (o->core_only) {
        if (core_total.n)
            printf("\ncore: decode %.3f + apply %.3f + build %.3f = %.3f µs per event (median of "
                   "%d); %.0f heap bytes per cached account, the caches count %.0f\n",
                   fig_median(&core_decode), fig_median(&core_apply), fig_median(&core_build),
                   fig_median(&core_total), o->reps, fig_median(&core_heap),
                   fig_median(&core_counted));
        rc = failures ? 1 : 0;
        goto out;
    }

    /* -- A: raw floor -- */
    figure raw, redis_ceiling;
    memset(&raw, 0, sizeof raw);
    memset(&redis_ceiling, 0, sizeof redis_ceiling);
    char err[512];
    if (!o->skip_raw) {
        printf("[3/8] raw floor: plain consumer, both topics, consume_batch_queue, "
               "queued.min.messages=1000000\n");
        const char *topics[] = {main_in.usage, main_in.accounts};
        for (int i = 0; i < o->reps; i++) {
            double v = bench_raw_consume(b.bootstraps, topics, 2, o->partitions, main_in.total, err,
                                         sizeof err);
            if (v < 0) {
                fprintf(stderr, "pqlbench: raw floor: %s\n", err);
                goto out;
            }
            printf("  run %d: %.0f msgs/s\n", i + 1, v);
            fig_add(&raw, v);
        }
    }

    /* -- B: raw Redis ceiling -- */
    if (!o->skip_redis) {
        int64_t n = o->smoke ? 200000 : 2000000;
        printf("[4/8] raw Redis ceiling: redis-benchmark -P 64 -n %lld -r 100000 HINCRBY\n",
               (long long)n);
        for (int i = 0; i < o->reps; i++) {
            double v = bench_redis_benchmark(b.redis_socket, n, 100000, err, sizeof err);
            if (v < 0) {
                fprintf(stderr, "pqlbench: %s\n", err);
                goto out;
            }
            printf("  run %d: %.0f HINCRBY/s\n", i + 1, v);
            fig_add(&redis_ceiling, v);
        }
        bench_redis_flush(&b.r);
    }

    /* -- C: pqlstream, one process -- */
    printf("[5/8] pqlstream, 1 process, from all partitions claimed to the last offset in "
           "Redis\n");
    static figure eps[MAX_PROCS + 1], ratio, rt, cmds, evalsha, client_cmds, rss, cpu, inb, rcpu,
        faults;
    pql_run last;
    char last_group[64] = "";
    for (int i = 0; i < o->reps; i++) {
        if (measure_pqlstream(&b, &main_in, 1, i == 0 ? o->perf : NULL, &last, last_group,
                              sizeof last_group) < 0)
            goto out;
        printf("  run %d: %.0f events/s in %.1f s; %.4f round trips, %.4f commands, %.4f "
               "EVALSHA per event; peak RSS %.0f MB; %.2f CPU s per M events; %.3f page faults "
               "per event; alerts %lld PQL + "
               "%lld expansion; late %lld; dead letters %lld; revocations %d; cores busy: "
               "pqlstream %.2f, redis-server %.2f, "
               "pqlbench (mock cluster) %.2f\n",
               i + 1, last.events_per_s, last.seconds, last.rt_per_event, last.cmds_per_event,
               last.evalsha_per_event, last.peak_rss / 1048576, last.cpu_s_per_m,
               last.faults_per_event, (long long)last.stats[BENCH_ALERTS_PQL],
               (long long)last.stats[BENCH_ALERTS_EXP], (long long)last.stats[BENCH_LATE],
               (long long)last.stats[BENCH_DEAD], last.revocations, last.cores_pql,
               last.cores_redis, last.cores_bench);
        fig_add(&eps[1], last.events_per_s);
        if (raw.n) fig_add(&ratio, last.events_per_s / raw.v[i < raw.n ? i : raw.n - 1]);
        fig_add(&rt, last.rt_per_event);
        fig_add(&cmds, last.cmds_per_event);
        fig_add(&client_cmds, last.client_cmds_per_event);
        fig_add(&evalsha, last.evalsha_per_event);
        fig_add(&rss, last.peak_rss / 1048576);
        fig_add(&cpu, last.cpu_s_per_m);
        fig_add(&faults, last.faults_per_event);
        fig_add(&inb, last.in_bytes_per_event);
        fig_add(&rcpu, last.redis_cpu_us_per_event);
        if (o->smoke) {
            check(&failures, "pqlstream events/s", last.events_per_s);
            check(&failures, "round trips per event", last.rt_per_event);
            check(&failures, "Redis commands per event", last.cmds_per_event);
            check(&failures, "peak RSS", last.peak_rss);
            check(&failures, "alerts fired",
                  (double)(last.stats[BENCH_ALERTS_PQL] + last.stats[BENCH_ALERTS_EXP]));
            if (last.stats[BENCH_CONSUMED] != last.events) {
                fprintf(stderr,
                        "pqlbench --smoke: pqlstream counted %lld consumed, %lld were "
                        "produced\n",
                        (long long)last.stats[BENCH_CONSUMED], (long long)last.events);
                failures++;
            }
        }
    }

    /* -- D: latency -- */
    latency_result lat = {0};
    double rate = o->latency_rate > 0 ? o->latency_rate : fig_median(&eps[1]) / 2;
    printf("[6/8] event→alert latency: %.0f events/s offered for %.0f s, %d probe accounts/s "
           "crossing premium-attempts\n",
           rate, o->latency_s, o->probes_per_s);
    if (o->skip_latency)
        printf("  skipped (--phases)\n");
    else if (measure_latency(&b, w, last_group, rate, &lat) < 0)
        goto out;
    printf("  offered %.0f events/s; %zu alerts measured (%ld of %ld probes); p50 %.1f ms, p99 "
           "%.1f ms, max %.1f ms; cores busy: pqlstream %.2f, redis-server %.2f, pqlbench (load "
           "generator + mock cluster) %.2f\n",
           lat.offered, lat.samples, lat.probe_alerts, lat.probes, lat.p50, lat.p99, lat.max,
           lat.cpu_pql, lat.cpu_redis, lat.cpu_bench);
    printf("  p99 of each 5 s after the warm-up:");
    for (int k = 0; k < lat.nwin; k++)
        printf(" %.0f", lat.win_p99[k]);
    printf(" ms\n");
    printf("  Kafka alone, the same load just after (produce -> a plain consumer, no pqlstream): "
           "%zu events, p50 %.1f ms, p99 %.1f ms, max %.1f ms; pqlbench %.2f cores busy\n",
           lat.kafka_samples, lat.kafka_p50, lat.kafka_p99, lat.kafka_max, lat.kafka_cpu_bench);
    if (o->smoke) {
        check(&failures, "latency samples", (double)lat.samples);
        check(&failures, "latency p50", lat.p50 + 0.5);
        check(&failures, "Kafka-alone latency samples", (double)lat.kafka_samples);
    }

    /* -- E: scaling -- */
    printf("[7/8] scaling: 2..%d pqlstream processes in one group\n", o->max_procs);
    /* A run during which a rebalance moved partitions does not measure n
       processes sharing the work (a member's session timed out on the busy
       host, say; seen at 474k and 740k events/s "for" 2 and 3 processes): it
       is discarded and run again, up to --reps more times. */
    int discarded[MAX_PROCS + 1] = {0};
    for (int n = 2; n <= (o->skip_scaling ? 1 : o->max_procs); n++)
        for (int i = 0; eps[n].n < o->reps && i < 2 * o->reps; i++) {
            pql_run r;
            if (measure_pqlstream(&b, &main_in, n, NULL, &r, NULL, 0) < 0) goto out;
            printf("  %d processes, run %d: %.0f events/s in %.1f s (revocations during the run: "
                   "%d%s); cores busy: pqlstream %.2f, redis-server %.2f, pqlbench %.2f\n",
                   n, i + 1, r.events_per_s, r.seconds, r.revocations,
                   r.revocations ? ", discarded: a rebalance during the span" : "", r.cores_pql,
                   r.cores_redis, r.cores_bench);
            if (r.revocations) {
                discarded[n]++;
                continue;
            }
            fig_add(&eps[n], r.events_per_s);
            if (o->smoke) check(&failures, "scaling events/s", r.events_per_s);
        }

    /* -- F: Redis cost by account count -- */
    printf("[8/8] Redis write cost by account count: %d sizes, %lld messages each\n", o->nscales,
           (long long)o->scale_events);
    static figure s_eps[MAX_SCALES], s_rt[MAX_SCALES], s_cmds[MAX_SCALES], s_in[MAX_SCALES],
        s_rcpu[MAX_SCALES], s_rss[MAX_SCALES], s_mem[MAX_SCALES];
    for (int s = 0; s < (o->skip_accounts ? 0 : o->nscales); s++) {
        char *u = NULL, *a = NULL;
        if (asprintf(&u, "bench-usage-a%d", o->scales[s]) < 0 ||
            asprintf(&a, "bench-accounts-a%d", o->scales[s]) < 0)
            goto out;
        scale_in[s].usage = u;
        scale_in[s].accounts = a;
        const char *topics[] = {u, a, NULL};
        bench_workload_opts so = {o->scales[s], o->zipf, o->days, o->seed + 1 + (uint64_t)s};
        bench_workload *sw = bench_workload_new(&so);
        int bad = !sw || create_topics(&b, topics, o->partitions) < 0 ||
                  produce_input(&b, sw, &scale_in[s], o->scale_events) < 0;
        bench_workload_destroy(sw);
        if (bad) goto out;
        for (int i = 0; i < o->reps; i++) {
            pql_run r;
            if (measure_pqlstream(&b, &scale_in[s], 1, NULL, &r, NULL, 0) < 0) goto out;
            printf("  %d accounts, run %d: %.0f events/s; per event %.4f round trips, %.3f "
                   "commands, %.0f bytes in, %.2f µs redis CPU; peak RSS %.0f MB; redis used "
                   "%.0f MB for %lld keys\n",
                   o->scales[s], i + 1, r.events_per_s, r.rt_per_event, r.cmds_per_event,
                   r.in_bytes_per_event, r.redis_cpu_us_per_event, r.peak_rss / 1048576,
                   r.used_mem / 1048576, (long long)r.keys);
            fig_add(&s_eps[s], r.events_per_s);
            fig_add(&s_rt[s], r.rt_per_event);
            fig_add(&s_cmds[s], r.cmds_per_event);
            fig_add(&s_in[s], r.in_bytes_per_event);
            fig_add(&s_rcpu[s], r.redis_cpu_us_per_event);
            fig_add(&s_rss[s], r.peak_rss / 1048576);
            fig_add(&s_mem[s], r.used_mem / (double)(scale_in[s].produced.accounts
                                                         ? scale_in[s].produced.accounts
                                                         : 1));
            if (o->smoke) check(&failures, "account-scaling round trips", r.rt_per_event);
        }
    }

    /* -- the table -- */
    char load[128], note[256];
    shell_line("cat /proc/loadavg", load, sizeof load);
    printf("\n## Results (%lld messages, %d accounts, %d partitions; median of %d runs)\n\n",
           (long long)main_in.total, o->accounts, o->partitions, o->reps);
    printf("| %-52s | %17s | %-19s | %4s | %s |\n", "figure", "median", "range", "runs",
           "target / note");
    printf("|%.54s|%.19s|%.21s|%.6s|%.20s|\n",
           "------------------------------------------------------", "-------------------",
           "---------------------", "------", "--------------------");
    if (raw.n) row("raw floor: plain consumer, msgs/s", &raw, "/s", "the ceiling for us");
    if (redis_ceiling.n)
        row("raw Redis: redis-benchmark -P 64 HINCRBY, 100k keys", &redis_ceiling, "/s", NULL);
    if (core_total.n) {
        row("core, one thread, no I/O: events/s per core", &core_eps, "/s",
            "decode + apply + build");
        row("  decode per event", &core_decode, "µs", NULL);
        row("  apply (rules, windows, alerts) per event", &core_apply, "µs", NULL);
        row("  batch build per event", &core_build, "µs", NULL);
        row("  heap per cached account (malloc's count)", &core_heap, "B",
            "freed by emptying the caches, ÷ accounts");
        row("  the same as the caches count it", &core_counted, "B",
            "what cache.max_memory bounds");
    }
    row("pqlstream, 1 process: events/s", &eps[1], "/s", NULL);
    if (ratio.n) {
        snprintf(note, sizeof note, "target ≥ 0.60: %s",
                 fig_median(&ratio) >= 0.6 ? "met" : "NOT met");
        row("  ratio to the raw floor", &ratio, "", note);
    }
    snprintf(note, sizeof note, "target ≤ 0.01: %s", fig_median(&rt) <= 0.01 ? "met" : "NOT met");
    row("  Redis round trips per event (client count)", &rt, "", note);
    row("  Redis commands per event (client count)", &client_cmds, "", NULL);
    row("  Redis commands run per event (server, incl. in Lua)", &cmds, "", NULL);
    row("  EVALSHA per event (server)", &evalsha, "", NULL);
    row("  Redis bytes in per event (server)", &inb, "B", NULL);
    row("  redis-server CPU per event", &rcpu, "µs", NULL);
    row("  pqlstream peak RSS (VmHWM)", &rss, "MB", NULL);
    row("  pqlstream CPU per million events", &cpu, "s", NULL);
    row("  pqlstream minor page faults per event", &faults, "", "fresh memory touched");
    figure f50 = {.v = {lat.p50}, .n = !o->skip_latency},
           f99 = {.v = {lat.p99}, .n = !o->skip_latency},
           fmax = {.v = {lat.max}, .n = !o->skip_latency};
    snprintf(note, sizeof note, "at %.0f events/s offered; %zu alerts", lat.offered, lat.samples);
    row("event→alert latency p50", &f50, "ms", note);
    snprintf(note, sizeof note, "target < 50 ms: %s",
             !lat.samples   ? "not measured"
             : lat.p99 < 50 ? "met"
                            : "NOT met");
    row("event→alert latency p99", &f99, "ms", note);
    row("event→alert latency max", &fmax, "ms", NULL);
    figure k50 = {.v = {lat.kafka_p50}, .n = !o->skip_latency},
           k99 = {.v = {lat.kafka_p99}, .n = !o->skip_latency};
    row("  Kafka alone, produce→consume p50 (same load)", &k50, "ms", NULL);
    row("  Kafka alone, produce→consume p99 (same load)", &k99, "ms",
        "the floor under event→alert");
    for (int n = 2; n <= (o->skip_scaling ? 1 : o->max_procs); n++) {
        char name[96];
        snprintf(name, sizeof name, "pqlstream, %d processes: events/s", n);
        char why[96] = "";
        if (discarded[n])
            snprintf(why, sizeof why, "; %d run%s discarded (a rebalance during the span)",
                     discarded[n], discarded[n] > 1 ? "s" : "");
        if (eps[n].n)
            snprintf(note, sizeof note, "×%.2f of 1 process%s",
                     fig_median(&eps[n]) / fig_median(&eps[1]), why);
        else
            snprintf(note, sizeof note, "no run without a rebalance during the span%s", why);
        row(name, &eps[n], "/s", note);
    }
    for (int s = 0; s < (o->skip_accounts ? 0 : o->nscales); s++) {
        char name[96];
        snprintf(note, sizeof note, "%lld accounts appeared",
                 (long long)scale_in[s].produced.accounts);
        snprintf(name, sizeof name, "%d accounts: events/s", o->scales[s]);
        row(name, &s_eps[s], "/s", note);
        snprintf(name, sizeof name, "%d accounts: round trips per event", o->scales[s]);
        row(name, &s_rt[s], "", NULL);
        snprintf(name, sizeof name, "%d accounts: commands per event", o->scales[s]);
        row(name, &s_cmds[s], "", NULL);
        snprintf(name, sizeof name, "%d accounts: Redis bytes in per event", o->scales[s]);
        row(name, &s_in[s], "B", NULL);
        snprintf(name, sizeof name, "%d accounts: redis-server CPU per event", o->scales[s]);
        row(name, &s_rcpu[s], "µs", NULL);
        snprintf(name, sizeof name, "%d accounts: Redis memory per account", o->scales[s]);
        row(name, &s_mem[s], "B", NULL);
        snprintf(name, sizeof name, "%d accounts: pqlstream peak RSS", o->scales[s]);
        row(name, &s_rss[s], "MB", NULL);
    }
    if (!o->skip_accounts && o->nscales >= 2 && s_rss[0].n && s_rss[1].n) {
        /* the same number of messages, so Kafka's buffers cancel out: the RSS
           difference is the cache of the extra accounts (all cached while
           below cache.max_accounts) */
        double extra = (double)(scale_in[1].produced.accounts - scale_in[0].produced.accounts);
        figure per = {.v = {(fig_median(&s_rss[1]) - fig_median(&s_rss[0])) * 1048576 / extra},
                      .n = 1};
        snprintf(note, sizeof note, "RSS difference / accounts difference, %d vs %d accounts",
                 o->scales[1], o->scales[0]);
        row("pqlstream memory per cached account", &per, "B", note);
    }
    printf("\n  load average at end: %s\n  logs: %s/\n", load, o->workdir);
    if (o->smoke) {
        if (raw.n) check(&failures, "raw floor", fig_median(&raw));
        if (redis_ceiling.n) check(&failures, "raw Redis", fig_median(&redis_ceiling));
        printf("\nsmoke: %s\n", failures ? "FAILED" : "ok: every figure is sane and non-zero");
        rc = failures ? 1 : 0;
    } else {
        rc = 0;
    }
out:
    bench_workload_destroy(w);
    for (int k = 0; k < 2; k++)
        free(main_in.end[k]);
    for (int s = 0; s < MAX_SCALES; s++) {
        free((char *)scale_in[s].usage);
        free((char *)scale_in[s].accounts);
        for (int k = 0; k < 2; k++)
            free(scale_in[s].end[k]);
    }
    teardown(&b);
    return rc;
}
