/* probe.c — what pqlbench reads and runs around the processor (bench.h):
 * /proc figures of a process, Redis INFO counters, pqlstream child
 * processes and their logs, a consumer group's progress as stored in Redis,
 * partition watermarks, the raw-consume floor and redis-benchmark. */
#include "bench.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

double bench_mono_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

/* ---- /proc ------------------------------------------------------------------ */

/* utime + stime (s) and minor page faults of a process, from /proc/<pid>/stat. */
static int proc_stat(pid_t pid, double *cpu_s, double *minflt)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    /* fields after the command name "(…)": state is field 3, minflt 10,
       utime 14, stime 15 */
    char *p = strrchr(buf, ')');
    if (!p) return -1;
    unsigned long long flt = 0, utime = 0, stime = 0;
    if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %llu %*u %*u %*u %llu %llu", &flt, &utime,
               &stime) != 3)
        return -1;
    *cpu_s = (double)(utime + stime) / (double)sysconf(_SC_CLK_TCK);
    *minflt = (double)flt;
    return 0;
}

double bench_proc_minflt(pid_t pid)
{
    double cpu, flt;
    return proc_stat(pid, &cpu, &flt) < 0 ? -1 : flt;
}

double bench_proc_cpu(pid_t pid)
{
    double cpu, flt;
    return proc_stat(pid, &cpu, &flt) < 0 ? -1 : cpu;
}

int64_t bench_proc_hwm(pid_t pid)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    long long kb = -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmHWM: %lld kB", &kb) == 1) break;
    fclose(f);
    return kb < 0 ? -1 : kb * 1024;
}

/* ---- Redis ------------------------------------------------------------------ */

int bench_redis_open(bench_redis *r, const char *path, pid_t pid, char *errstr, size_t errstr_size)
{
    memset(r, 0, sizeof *r);
    struct timeval tv = {10, 0};
    r->c = redisConnectUnixWithTimeout(path, tv);
    if (!r->c || r->c->err) {
        snprintf(errstr, errstr_size, "cannot connect to the bench's redis-server at %s: %s", path,
                 r->c ? r->c->errstr : "out of memory");
        bench_redis_close(r);
        return -1;
    }
    redisSetTimeout(r->c, tv);
    r->pid = pid;
    return 0;
}

void bench_redis_close(bench_redis *r)
{
    if (r->c) redisFree(r->c);
    r->c = NULL;
}

/* Queues one command, counting it (and its bytes) as the bench's own. */
static int append(bench_redis *r, const char *fmt, ...)
{
    char *cmd = NULL;
    va_list ap;
    va_start(ap, fmt);
    int len = redisvFormatCommand(&cmd, fmt, ap);
    va_end(ap);
    if (len < 0) return -1;
    int rc = redisAppendFormattedCommand(r->c, cmd, (size_t)len);
    redisFreeCommand(cmd);
    r->own_cmds++;
    r->own_in += len;
    return rc == REDIS_OK ? 0 : -1;
}

static redisReply *reply(bench_redis *r)
{
    void *rep = NULL;
    if (redisGetReply(r->c, &rep) != REDIS_OK) return NULL;
    return rep;
}

static int64_t info_field(const char *info, const char *key)
{
    const char *p = strstr(info, key);
    return p ? strtoll(p + strlen(key), NULL, 10) : 0;
}

int bench_redis_info_read(bench_redis *r, bench_redis_info *out)
{
    memset(out, 0, sizeof *out);
    if (append(r, "INFO all") < 0) return -1;
    redisReply *rep = reply(r);
    if (!rep || rep->type != REDIS_REPLY_STRING) {
        if (rep) freeReplyObject(rep);
        return -1;
    }
    const char *s = rep->str;
    out->commands = info_field(s, "\ntotal_commands_processed:");
    out->evalsha = info_field(s, "\ncmdstat_evalsha:calls=");
    out->hgetall = info_field(s, "\ncmdstat_hgetall:calls=");
    out->net_in = info_field(s, "\ntotal_net_input_bytes:");
    out->net_out = info_field(s, "\ntotal_net_output_bytes:");
    out->used_mem = info_field(s, "\nused_memory:");
    out->keys = info_field(s, "\ndb0:keys=");
    for (const char *c = strstr(s, "\ncmdstat_"); c && out->ncmd < 48;
         c = strstr(c + 1, "\ncmdstat_")) {
        const char *colon = strchr(c, ':'), *calls = strstr(c, ":calls=");
        if (!colon || calls != colon || colon - c - 9 >= 32) continue;
        snprintf(out->cmd[out->ncmd].name, sizeof out->cmd[0].name, "%.*s", (int)(colon - c - 9),
                 c + 9);
        out->cmd[out->ncmd++].calls = strtoll(calls + 7, NULL, 10);
    }
    freeReplyObject(rep);
    out->cpu = bench_proc_cpu(r->pid);
    out->own_cmds = r->own_cmds;
    out->own_in = r->own_in;
    return 0;
}

int bench_redis_flush(bench_redis *r)
{
    if (append(r, "FLUSHALL") < 0) return -1;
    redisReply *rep = reply(r);
    int ok = rep && rep->type == REDIS_REPLY_STATUS;
    if (rep) freeReplyObject(rep);
    return ok ? 0 : -1;
}

int bench_progress_claimed(bench_redis *r, bench_progress *pg)
{
    for (int32_t p = 0; p < pg->partitions; p++)
        if (append(r, "HGET pql:{%s:%d}:meta epoch", pg->group, (int)p) < 0) return -1;
    int claimed = 0;
    for (int32_t p = 0; p < pg->partitions; p++) {
        redisReply *rep = reply(r);
        if (!rep) return -1;
        int64_t epoch = rep->type == REDIS_REPLY_STRING ? strtoll(rep->str, NULL, 10) : 0;
        claimed += epoch > (pg->epoch0 ? pg->epoch0[p] : 0);
        freeReplyObject(rep);
    }
    return claimed;
}

int bench_progress_done(bench_redis *r, bench_progress *pg)
{
    int asked = 0, done = 0;
    for (int32_t p = 0; p < pg->partitions; p++) {
        if (pg->done[p]) continue;
        if (pg->end[0][p] == 0 && pg->end[1][p] == 0) {
            pg->done[p] = 1;
            continue;
        }
        if (append(r, "HMGET pql:{%s:%d}:meta off:%s off:%s", pg->group, (int)p, pg->topics[0],
                   pg->topics[1]) < 0)
            return -1;
        asked++;
    }
    for (int32_t p = 0; p < pg->partitions && asked; p++) {
        if (pg->done[p]) continue;
        if (pg->end[0][p] == 0 && pg->end[1][p] == 0) continue;
        redisReply *rep = reply(r);
        if (!rep) return -1;
        asked--;
        int ok = rep->type == REDIS_REPLY_ARRAY && rep->elements == 2;
        for (int k = 0; ok && k < 2; k++) {
            redisReply *e = rep->element[k];
            int64_t off = e->type == REDIS_REPLY_STRING ? strtoll(e->str, NULL, 10) : 0;
            ok = off >= pg->end[k][p];
        }
        freeReplyObject(rep);
        if (ok) pg->done[p] = 1;
    }
    for (int32_t p = 0; p < pg->partitions; p++)
        done += pg->done[p];
    return done;
}

int bench_progress_epochs(bench_redis *r, bench_progress *pg, int64_t *epochs)
{
    for (int32_t p = 0; p < pg->partitions; p++)
        if (append(r, "HGET pql:{%s:%d}:meta epoch", pg->group, (int)p) < 0) return -1;
    for (int32_t p = 0; p < pg->partitions; p++) {
        redisReply *rep = reply(r);
        if (!rep) return -1;
        epochs[p] = rep->type == REDIS_REPLY_STRING ? strtoll(rep->str, NULL, 10) : 0;
        freeReplyObject(rep);
    }
    return 0;
}

int bench_progress_stats(bench_redis *r, bench_progress *pg, int64_t stats[BENCH_NSTATS])
{
    memset(stats, 0, sizeof(int64_t) * BENCH_NSTATS);
    for (int32_t p = 0; p < pg->partitions; p++)
        if (append(r,
                   "HMGET pql:{%s:%d}:c:stats consumed dead_lettered late alerts_pql "
                   "alerts_expansion",
                   pg->group, (int)p) < 0)
            return -1;
    for (int32_t p = 0; p < pg->partitions; p++) {
        redisReply *rep = reply(r);
        if (!rep) return -1;
        for (size_t k = 0; rep->type == REDIS_REPLY_ARRAY && k < rep->elements && k < BENCH_NSTATS;
             k++)
            if (rep->element[k]->type == REDIS_REPLY_STRING)
                stats[k] += strtoll(rep->element[k]->str, NULL, 10);
        freeReplyObject(rep);
    }
    return 0;
}

/* ---- pqlstream processes ------------------------------------------------------- */

int bench_proc_start(bench_proc *p, char *const *argv, const char *log, char *errstr,
                     size_t errstr_size)
{
    memset(p, 0, sizeof *p);
    snprintf(p->log, sizeof p->log, "%s", log);
    int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        snprintf(errstr, errstr_size, "cannot create %s: %s", log, strerror(errno));
        return -1;
    }
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        snprintf(errstr, errstr_size, "fork: %s", strerror(errno));
        close(fd);
        return -1;
    }
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent) _exit(127);
        dup2(fd, 1);
        dup2(fd, 2);
        execvp(argv[0], argv);
        dprintf(2, "pqlbench: cannot run %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    close(fd);
    p->pid = pid;
    return 0;
}

int bench_proc_exited(bench_proc *p)
{
    if (p->pid <= 0) return 1;
    int status;
    if (waitpid(p->pid, &status, WNOHANG) == p->pid) {
        p->pid = 0;
        return 1;
    }
    return 0;
}

int bench_proc_stop(bench_proc *p, int timeout_ms)
{
    if (p->pid <= 0) return -1;
    int status = -1;
    kill(p->pid, SIGTERM);
    double deadline = bench_mono_s() + timeout_ms / 1000.0;
    while (waitpid(p->pid, &status, WNOHANG) == 0) {
        if (bench_mono_s() > deadline) {
            fprintf(stderr, "pqlbench: pqlstream pid %d ignored SIGTERM for %d ms: killing it\n",
                    (int)p->pid, timeout_ms);
            kill(p->pid, SIGKILL);
            waitpid(p->pid, &status, 0);
            break;
        }
        sleep_ms(20);
    }
    p->pid = 0;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

int bench_proc_redis_totals(const bench_proc *p, int64_t *round_trips, int64_t *commands)
{
    char line[2048];
    FILE *f = fopen(p->log, "r");
    int found = -1;
    if (!f) return -1;
    while (fgets(line, sizeof line, f)) {
        const char *rt = strstr(line, "msg=\"redis client totals\"");
        if (!rt) continue;
        const char *a = strstr(line, "round_trips="), *b = strstr(line, " commands=");
        if (!a || !b) continue;
        *round_trips = strtoll(a + 12, NULL, 10);
        *commands = strtoll(b + 10, NULL, 10);
        found = 0;
    }
    fclose(f);
    return found;
}

int bench_proc_log_count(const bench_proc *p, const char *needle)
{
    char line[4096];
    int n = 0;
    FILE *f = fopen(p->log, "r");
    if (!f) return 0;
    while (fgets(line, sizeof line, f))
        n += strstr(line, needle) != NULL;
    fclose(f);
    return n;
}

void bench_proc_log_tail(const bench_proc *p, int lines)
{
    char cmd[700];
    snprintf(cmd, sizeof cmd, "tail -n %d '%s' >&2", lines, p->log);
    fprintf(stderr, "--- last lines of %s ---\n", p->log);
    if (system(cmd) != 0) fprintf(stderr, "(cannot read it)\n");
}

/* ---- Kafka ----------------------------------------------------------------------- */

int bench_watermarks(rd_kafka_t *rk, const char *topic, int32_t partitions, int64_t *end,
                     char *errstr, size_t errstr_size)
{
    for (int32_t p = 0; p < partitions; p++) {
        int64_t lo = 0, hi = 0;
        rd_kafka_resp_err_t e = rd_kafka_query_watermark_offsets(rk, topic, p, &lo, &hi, 10000);
        if (e) {
            snprintf(errstr, errstr_size, "watermarks of %s [%d]: %s", topic, (int)p,
                     rd_kafka_err2str(e));
            return -1;
        }
        if (lo > 0) {
            snprintf(errstr, errstr_size,
                     "%s [%d] lost its first %lld messages to the mock cluster's retention "
                     "(100k messages / 5 MB per partition): use more --partitions or fewer "
                     "--events",
                     topic, (int)p, (long long)lo);
            return -1;
        }
        end[p] = hi;
    }
    return 0;
}

double bench_raw_consume(const char *bootstraps, const char *const *topics, int ntopics,
                         int32_t partitions, int64_t expect, char *errstr, size_t errstr_size)
{
    static int run;
    char group[64];
    snprintf(group, sizeof group, "pqlbench-raw-%d-%d", (int)getpid(), ++run);
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    /* Tuned as FACTS.md measured best: a deep pre-fetch queue, batch reads
       from the consumer queue, the same fetch.wait.max.ms as pqlstream. */
    const char *props[][2] = {{"bootstrap.servers", bootstraps},  {"group.id", group},
                              {"enable.auto.commit", "false"},    {"enable.partition.eof", "false"},
                              {"queued.min.messages", "1000000"}, {"fetch.wait.max.ms", "10"}};
    for (size_t i = 0; i < sizeof props / sizeof props[0]; i++)
        if (rd_kafka_conf_set(conf, props[i][0], props[i][1], errstr, errstr_size) !=
            RD_KAFKA_CONF_OK) {
            rd_kafka_conf_destroy(conf);
            return -1;
        }
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, errstr, errstr_size);
    if (!rk) {
        rd_kafka_conf_destroy(conf);
        return -1;
    }
    rd_kafka_poll_set_consumer(rk);
    rd_kafka_queue_t *q = rd_kafka_queue_get_consumer(rk);
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(partitions * ntopics);
    for (int t = 0; t < ntopics; t++)
        for (int32_t p = 0; p < partitions; p++)
            rd_kafka_topic_partition_list_add(l, topics[t], p)->offset = RD_KAFKA_OFFSET_BEGINNING;
    double t0 = bench_mono_s(), last = t0, progress_at = t0;
    rd_kafka_assign(rk, l);
    rd_kafka_topic_partition_list_destroy(l);
    int64_t got = 0;
    rd_kafka_message_t *msgs[1000];
    while (got < expect) {
        ssize_t n = rd_kafka_consume_batch_queue(q, 1000, msgs, 1000);
        for (ssize_t i = 0; i < n; i++) {
            got += !msgs[i]->err;
            rd_kafka_message_destroy(msgs[i]);
        }
        double now = bench_mono_s();
        if (n > 0) last = progress_at = now;
        if (now - progress_at > 60) {
            snprintf(errstr, errstr_size, "raw consumer: stuck at %lld of %lld messages for 60 s",
                     (long long)got, (long long)expect);
            break;
        }
    }
    rd_kafka_queue_destroy(q);
    rd_kafka_consumer_close(rk);
    rd_kafka_destroy(rk);
    return got < expect ? -1 : (double)got / (last - t0);
}

/* ---- redis-benchmark ------------------------------------------------------------- */

double bench_redis_benchmark(const char *socket, int64_t requests, int keyspace, char *errstr,
                             size_t errstr_size)
{
    char cmd[1024], line[1024];
    snprintf(cmd, sizeof cmd,
             "redis-benchmark -s '%s' -P 64 -n %lld -r %d --csv HINCRBY "
             "pqlbench:__rand_int__ f 1 2>&1",
             socket, (long long)requests, keyspace);
    FILE *f = popen(cmd, "r");
    if (!f) {
        snprintf(errstr, errstr_size, "cannot run redis-benchmark: %s", strerror(errno));
        return -1;
    }
    double rps = -1;
    line[0] = '\0';
    char last[1024] = "";
    while (fgets(line, sizeof line, f)) {
        snprintf(last, sizeof last, "%s", line);
        if (strncmp(line, "\"HINCRBY", 8) != 0) continue;
        const char *p = strstr(line, "\",\"");
        if (p) rps = strtod(p + 3, NULL);
    }
    int st = pclose(f);
    if (rps <= 0) {
        last[strcspn(last, "\n")] = '\0';
        snprintf(errstr, errstr_size,
                 "redis-benchmark gave no figure (exit %d; last line: %s): is it installed "
                 "(apt-get install redis-tools)?",
                 st, last);
        return -1;
    }
    return rps;
}
