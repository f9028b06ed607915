/* harness.c — the end-to-end test harness (see harness.h for the contract).
 *
 * Plain C over the real parts: redis_child.c for the server, hiredis for
 * reading state, embedded_kafka.c for the broker, librdkafka clients for
 * producing and consuming, fork/exec for the processor.  Set-up failures end
 * the Criterion test with the reason; waits poll in 50 ms steps. */
#include "harness.h"

#include <criterion/criterion.h>
#include <hiredis/hiredis.h>
#include <librdkafka/rdkafka.h>

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <netdb.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef PQL_BINARY
#error "PQL_BINARY (path of the pqlstream binary) must be defined"
#endif

#define STEP_MS 50

extern char **environ;

/* ---- misc ----------------------------------------------------------------- */

void h_sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
    }
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void h_write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    if (!f) cr_assert_fail("cannot write %s: %s", path, strerror(errno));
    int bad = fputs(text, f) < 0;
    if (fclose(f) != 0 || bad) cr_assert_fail("cannot write %s: %s", path, strerror(errno));
}

char *h_mkdtemp(void)
{
    char tmpl[] = "/tmp/pqlh-XXXXXX";
    if (!mkdtemp(tmpl)) cr_assert_fail("mkdtemp: %s", strerror(errno));
    return strdup(tmpl);
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    remove(path);
    return 0;
}

void h_rmtree(const char *path)
{
    if (path) nftw(path, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) cr_assert_fail("out of memory");
    return p;
}

static char *xstrndup(const char *s, size_t len)
{
    char *d = xcalloc(1, len + 1);
    if (len) memcpy(d, s, len);
    return d;
}

/* ---- Redis ---------------------------------------------------------------- */

struct h_redis {
    char *dir;
    pql_redis_child *child;
};

static h_redis *redis_start(int appendonly)
{
    h_redis *r = xcalloc(1, sizeof *r);
    char err[256];
    r->dir = h_mkdtemp();
    pql_redis_child_opts o = {.dir = r->dir, .appendonly = appendonly, .binary = NULL};
    r->child = pql_redis_child_start(&o, err, sizeof err);
    if (!r->child) {
        h_rmtree(r->dir);
        cr_assert_fail("cannot start redis-server: %s", err);
    }
    return r;
}

h_redis *h_redis_start(void)
{
    return redis_start(0);
}

h_redis *h_redis_start_aof(void)
{
    return redis_start(1);
}

const char *h_redis_url(const h_redis *r)
{
    return pql_redis_child_url(r->child);
}

pql_redis_child *h_redis_child(h_redis *r)
{
    return r->child;
}

void h_redis_stop(h_redis *r)
{
    if (!r) return;
    pql_redis_child_stop(r->child);
    h_rmtree(r->dir);
    free(r->dir);
    free(r);
}

/* unix:///path (what h_redis_url returns); fails the test when unreachable. */
static redisContext *redis_connect(const char *url)
{
    struct timeval tv = {5, 0};
    if (strncmp(url, "unix://", 7)) cr_assert_fail("harness: not a unix:// Redis URL: %s", url);
    redisContext *c = redisConnectUnixWithTimeout(url + 7, tv);
    if (!c || c->err) {
        char msg[256];
        snprintf(msg, sizeof msg, "%s", c ? c->errstr : "out of memory");
        redisFree(c);
        cr_assert_fail("cannot connect to Redis at %s: %s", url, msg);
    }
    redisSetTimeout(c, tv);
    return c;
}

static redisReply *redis_cmd(redisContext *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    redisReply *r = redisvCommand(c, fmt, ap);
    va_end(ap);
    if (!r) {
        char msg[256];
        snprintf(msg, sizeof msg, "%s", c->errstr);
        redisFree(c);
        cr_assert_fail("Redis command failed: %s", msg);
    }
    return r;
}

char *h_redis_hget(const char *url, const char *key, const char *field)
{
    redisContext *c = redis_connect(url);
    redisReply *r = redis_cmd(c, "HGET %s %s", key, field);
    char *out = r->type == REDIS_REPLY_STRING ? xstrndup(r->str, (size_t)r->len) : NULL;
    freeReplyObject(r);
    redisFree(c);
    return out;
}

void h_redis_flushall(const char *url)
{
    redisContext *c = redis_connect(url);
    freeReplyObject(redis_cmd(c, "FLUSHALL"));
    redisFree(c);
}

void h_redis_pause_writes(const char *url, int ms)
{
    redisContext *c = redis_connect(url);
    redisReply *r =
        ms > 0 ? redis_cmd(c, "CLIENT PAUSE %d WRITE", ms) : redis_cmd(c, "CLIENT UNPAUSE");
    if (r->type == REDIS_REPLY_ERROR) cr_assert_fail("CLIENT PAUSE/UNPAUSE: %s", r->str);
    freeReplyObject(r);
    redisFree(c);
}

/* ---- Kafka ---------------------------------------------------------------- */

struct h_kafka {
    pql_embedded_kafka *cluster;
    rd_kafka_t *producer;
    int64_t next_id;
    int event_time_records; /* h_kafka_event_time_records */
    int delivery_errors;
    char first_error[256];
};

static void on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    (void)rk;
    h_kafka *k = opaque;
    if (m->err && k->delivery_errors++ == 0)
        snprintf(k->first_error, sizeof k->first_error, "%s [%" PRId32 "]: %s",
                 rd_kafka_topic_name(m->rkt), m->partition, rd_kafka_err2str(m->err));
}

static void quiet_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    (void)rk;
    (void)fac;
    if (level <= 3) fprintf(stderr, "harness: librdkafka: %s\n", buf);
}

static rd_kafka_conf_t *client_conf(const char *bootstraps, const char *const *props)
{
    char err[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set_log_cb(conf, quiet_log);
    if (rd_kafka_conf_set(conf, "bootstrap.servers", bootstraps, err, sizeof err))
        cr_assert_fail("%s", err);
    for (size_t i = 0; props && props[i]; i += 2)
        if (rd_kafka_conf_set(conf, props[i], props[i + 1], err, sizeof err))
            cr_assert_fail("%s", err);
    return conf;
}

static h_kafka *kafka_start(int nbrokers, int partitions, const char *topic, va_list ap)
{
    const char *topics[33];
    size_t n = 0;
    for (const char *t = topic; t && n < 32; t = va_arg(ap, const char *))
        topics[n++] = t;
    topics[n] = NULL;

    h_kafka *k = xcalloc(1, sizeof *k);
    char err[256];
    k->cluster = pql_embedded_kafka_start(nbrokers, topics, partitions, err, sizeof err);
    if (!k->cluster) cr_assert_fail("cannot start the mock cluster: %s", err);
    static const char *const props[] = {"enable.idempotence", "true",    "linger.ms", "1",
                                        "client.id",          "harness", NULL};
    rd_kafka_conf_t *conf = client_conf(pql_embedded_kafka_bootstraps(k->cluster), props);
    rd_kafka_conf_set_opaque(conf, k);
    rd_kafka_conf_set_dr_msg_cb(conf, on_delivery);
    k->producer = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof err);
    if (!k->producer) cr_assert_fail("cannot create the harness producer: %s", err);
    return k;
}

h_kafka *h_kafka_start(int partitions, const char *topic, ...)
{
    va_list ap;
    va_start(ap, topic);
    h_kafka *k = kafka_start(1, partitions, topic, ap);
    va_end(ap);
    return k;
}

h_kafka *h_kafka_start_brokers(int nbrokers, int partitions, const char *topic, ...)
{
    va_list ap;
    va_start(ap, topic);
    h_kafka *k = kafka_start(nbrokers, partitions, topic, ap);
    va_end(ap);
    return k;
}

const char *h_kafka_bootstraps(const h_kafka *k)
{
    return pql_embedded_kafka_bootstraps(k->cluster);
}

rd_kafka_mock_cluster_t *h_kafka_mock(h_kafka *k)
{
    return pql_embedded_kafka_mock(k->cluster);
}

rd_kafka_t *h_kafka_producer(h_kafka *k)
{
    return k->producer;
}

void h_kafka_stop(h_kafka *k)
{
    if (!k) return;
    if (k->producer) {
        rd_kafka_flush(k->producer, 5000);
        rd_kafka_destroy(k->producer);
    }
    pql_embedded_kafka_stop(k->cluster);
    free(k);
}

void h_kafka_event_time_records(h_kafka *k, int on)
{
    k->event_time_records = on;
}

/* Produces one record; record_ts 0 means the producer's clock. */
static void produce_record(h_kafka *k, const char *topic, int32_t partition, const char *key,
                           const void *value, size_t len, int64_t record_ts)
{
    if (partition < 0) partition = RD_KAFKA_PARTITION_UA;
    for (int tries = 0;; tries++) {
        rd_kafka_resp_err_t err =
            rd_kafka_producev(k->producer, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_PARTITION(partition),
                              RD_KAFKA_V_KEY(key, key ? strlen(key) : 0),
                              RD_KAFKA_V_VALUE((void *)value, len), RD_KAFKA_V_TIMESTAMP(record_ts),
                              RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_END);
        if (!err) break;
        if (err != RD_KAFKA_RESP_ERR__QUEUE_FULL || tries > 200)
            cr_assert_fail("produce to %s failed: %s", topic, rd_kafka_err2str(err));
        rd_kafka_poll(k->producer, STEP_MS);
    }
    rd_kafka_poll(k->producer, 0);
}

void h_produce_raw(h_kafka *k, const char *topic, int32_t partition, const char *key,
                   const void *value, size_t len)
{
    produce_record(k, topic, partition, key, value, len, 0);
}

void h_produce_event(h_kafka *k, const char *topic, int32_t partition, const pql_event *ev)
{
    pql_buf b = {0};
    char err[256];
    if (pql_event_encode(ev, &b, err, sizeof err) != PQL_OK)
        cr_assert_fail("cannot encode the event: %s", err);
    char *key = xstrndup(ev->account_id, ev->account_id_len);
    produce_record(k, topic, partition, key, b.data, b.len,
                   k->event_time_records ? ev->timestamp : 0);
    free(key);
    pql_buf_free(&b);
}

void h_produce_usage(h_kafka *k, const char *topic, int32_t partition, const char *account,
                     const char *event, const char *user_id, int64_t ts, const pql_prop *props,
                     size_t nprops)
{
    char id[32];
    snprintf(id, sizeof id, "h-%" PRId64, ++k->next_id);
    pql_event ev = {.kind = PQL_INPUT_USAGE,
                    .event_id = id,
                    .event_id_len = strlen(id),
                    .account_id = account,
                    .account_id_len = strlen(account),
                    .user_id = user_id,
                    .user_id_len = user_id ? strlen(user_id) : 0,
                    .event = event,
                    .event_len = strlen(event),
                    .timestamp = ts,
                    .props = (pql_prop *)props,
                    .nprops = nprops};
    h_produce_event(k, topic, partition, &ev);
}

void h_produce_account(h_kafka *k, const char *topic, int32_t partition, const char *account,
                       int64_t ts, const pql_prop *traits, size_t ntraits)
{
    pql_event ev = {.kind = PQL_INPUT_ACCOUNT,
                    .account_id = account,
                    .account_id_len = strlen(account),
                    .timestamp = ts,
                    .props = (pql_prop *)traits,
                    .nprops = ntraits};
    h_produce_event(k, topic, partition, &ev);
}

void h_flush(h_kafka *k)
{
    rd_kafka_resp_err_t err = rd_kafka_flush(k->producer, 10000);
    if (err) cr_assert_fail("flush: %s", rd_kafka_err2str(err));
    if (k->delivery_errors)
        cr_assert_fail("%d deliveries failed, first: %s", k->delivery_errors, k->first_error);
}

static int64_t high_watermark(rd_kafka_t *rk, const char *topic, int32_t partition)
{
    int64_t lo = -1, hi = -1;
    int64_t deadline = mono_ms() + 10000;
    for (;;) {
        rd_kafka_resp_err_t err =
            rd_kafka_query_watermark_offsets(rk, topic, partition, &lo, &hi, 2000);
        if (!err) return hi;
        if (mono_ms() > deadline) {
            fprintf(stderr, "harness: watermarks of %s [%" PRId32 "]: %s\n", topic, partition,
                    rd_kafka_err2str(err));
            return -1;
        }
        h_sleep_ms(STEP_MS);
    }
}

int64_t h_high_watermark(h_kafka *k, const char *topic, int32_t partition)
{
    return high_watermark(k->producer, topic, partition);
}

/* ---- consuming back ------------------------------------------------------- */

static int cmp_msg(const void *a, const void *b)
{
    const h_msg *x = a, *y = b;
    if (x->partition != y->partition) return x->partition < y->partition ? -1 : 1;
    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

static void copy_msg(h_msg *d, const rd_kafka_message_t *m)
{
    d->partition = m->partition;
    d->offset = m->offset;
    if (m->key) d->key = xstrndup(m->key, m->key_len), d->key_len = m->key_len;
    if (m->payload) d->value = xstrndup(m->payload, m->len), d->value_len = m->len;
    rd_kafka_headers_t *hdrs = NULL;
    if (rd_kafka_message_headers(m, &hdrs) || !hdrs) return;
    d->nheaders = rd_kafka_header_cnt(hdrs);
    d->headers = xcalloc(d->nheaders, sizeof *d->headers);
    for (size_t i = 0; i < d->nheaders; i++) {
        const char *name;
        const void *val;
        size_t len;
        rd_kafka_header_get_all(hdrs, i, &name, &val, &len);
        d->headers[i].name = strdup(name);
        d->headers[i].value = val ? xstrndup(val, len) : NULL;
        d->headers[i].value_len = len;
    }
}

/* Partition count of `topic` via metadata, or -1. */
static int partition_count(rd_kafka_t *rk, const char *topic)
{
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, topic, NULL);
    const struct rd_kafka_metadata *md = NULL;
    int n = -1;
    if (rd_kafka_metadata(rk, 0, rkt, &md, 5000) == RD_KAFKA_RESP_ERR_NO_ERROR) {
        if (md->topic_cnt == 1 && !md->topics[0].err) n = md->topics[0].partition_cnt;
        rd_kafka_metadata_destroy(md);
    }
    rd_kafka_topic_destroy(rkt);
    return n;
}

h_msgs *h_consume_all(const char *bootstraps, const char *topic, int timeout_ms)
{
    char err[256], group[64];
    snprintf(group, sizeof group, "harness-%d-%" PRId64, (int)getpid(), mono_ms());
    const char *const props[] = {"group.id",
                                 group,
                                 "enable.auto.commit",
                                 "false",
                                 "enable.partition.eof",
                                 "false",
                                 "client.id",
                                 "harness",
                                 NULL};
    rd_kafka_conf_t *conf = client_conf(bootstraps, props);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, err, sizeof err);
    if (!rk) cr_assert_fail("cannot create a consumer: %s", err);

    h_msgs *out = xcalloc(1, sizeof *out);
    size_t cap = 0;
    int ok = 0, np = partition_count(rk, topic);
    int64_t *high = NULL, *next = NULL;
    rd_kafka_topic_partition_list_t *tp = NULL;
    if (np <= 0) {
        fprintf(stderr, "harness: no metadata for topic %s\n", topic);
        goto done;
    }
    high = xcalloc((size_t)np, sizeof *high);
    next = xcalloc((size_t)np, sizeof *next);
    tp = rd_kafka_topic_partition_list_new(np);
    int pending = 0;
    for (int p = 0; p < np; p++) {
        int64_t lo;
        if (rd_kafka_query_watermark_offsets(rk, topic, p, &lo, &high[p], 5000)) {
            fprintf(stderr, "harness: watermarks of %s [%d] unavailable\n", topic, p);
            goto done;
        }
        next[p] = lo;
        if (lo < high[p]) {
            rd_kafka_topic_partition_list_add(tp, topic, p)->offset = lo;
            pending++;
        }
    }
    if (rd_kafka_assign(rk, tp)) {
        fprintf(stderr, "harness: assign failed\n");
        goto done;
    }
    int64_t deadline = mono_ms() + timeout_ms;
    while (pending > 0 && mono_ms() < deadline) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, STEP_MS);
        if (!m) continue;
        if (m->err) {
            if (m->err != RD_KAFKA_RESP_ERR__PARTITION_EOF)
                fprintf(stderr, "harness: consume %s: %s\n", topic, rd_kafka_message_errstr(m));
            rd_kafka_message_destroy(m);
            continue;
        }
        int32_t p = m->partition;
        if (p >= 0 && p < np && m->offset < high[p]) {
            if (out->n == cap) {
                cap = cap ? cap * 2 : 256;
                h_msg *grown = realloc(out->msgs, cap * sizeof *grown);
                if (!grown) cr_assert_fail("out of memory");
                out->msgs = grown;
            }
            memset(&out->msgs[out->n], 0, sizeof out->msgs[0]);
            copy_msg(&out->msgs[out->n++], m);
            next[p] = m->offset + 1;
            if (next[p] >= high[p]) pending--;
        }
        rd_kafka_message_destroy(m);
    }
    ok = pending == 0;
    if (!ok)
        for (int p = 0; p < np; p++)
            if (next[p] < high[p])
                fprintf(stderr, "harness: %s [%d]: read up to %" PRId64 " of %" PRId64 "\n", topic,
                        p, next[p], high[p]);
done:
    if (tp) rd_kafka_topic_partition_list_destroy(tp);
    free(high);
    free(next);
    rd_kafka_consumer_close(rk);
    rd_kafka_destroy(rk);
    if (!ok) {
        h_msgs_free(out);
        return NULL;
    }
    if (out->n) qsort(out->msgs, out->n, sizeof out->msgs[0], cmp_msg);
    return out;
}

const char *h_msg_header(const h_msg *m, const char *name)
{
    for (size_t i = 0; i < m->nheaders; i++)
        if (!strcmp(m->headers[i].name, name)) return m->headers[i].value;
    return NULL;
}

void h_msgs_free(h_msgs *ms)
{
    if (!ms) return;
    for (size_t i = 0; i < ms->n; i++) {
        h_msg *m = &ms->msgs[i];
        for (size_t j = 0; j < m->nheaders; j++) {
            free(m->headers[j].name);
            free(m->headers[j].value);
        }
        free(m->headers);
        free(m->key);
        free(m->value);
    }
    free(ms->msgs);
    free(ms);
}

/* ---- the pqlstream process ------------------------------------------------ */

struct h_proc {
    pid_t pid;
    int exited, status; /* status as h_proc_wait returns it */
    char *dir, *log;
};

h_proc *h_proc_start_argv(const char *const *argv, const char *const *env)
{
    h_proc *p = xcalloc(1, sizeof *p);
    p->dir = h_mkdtemp();
    p->log = xcalloc(1, strlen(p->dir) + 16);
    sprintf(p->log, "%s/pqlstream.log", p->dir);

    /* Everything the child needs is built before fork (async-signal safety). */
    size_t nenv = 0, nargs = 0, nextra = 0;
    while (environ[nenv])
        nenv++;
    while (env && env[nextra])
        nextra++;
    while (argv && argv[nargs])
        nargs++;
    char **envp = xcalloc(nenv + nextra + 2, sizeof *envp);
    char **args = xcalloc(nargs + 2, sizeof *args);
    size_t n = 0;
    for (size_t i = 0; i < nenv; i++)
        if (strncmp(environ[i], "PQLSTREAM_", 10)) envp[n++] = environ[i];
    int http_set = 0;
    for (size_t i = 0; i < nextra; i++) {
        envp[n++] = (char *)env[i];
        http_set |= !strncmp(env[i], "PQLSTREAM_HTTP=", 15);
    }
    /* processes of concurrent tests must not collide on the default port */
    if (!http_set) envp[n++] = (char *)"PQLSTREAM_HTTP=127.0.0.1:0";
    args[0] = (char *)"pqlstream";
    for (size_t i = 1; i < nargs; i++)
        args[i] = (char *)argv[i];

    int fd = open(p->log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    int devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (fd < 0 || devnull < 0) cr_assert_fail("cannot open %s: %s", p->log, strerror(errno));
    pid_t parent = getpid();
    fflush(NULL);
    p->pid = fork();
    if (p->pid < 0) cr_assert_fail("fork: %s", strerror(errno));
    if (p->pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent) _exit(127);
        dup2(devnull, 0);
        dup2(fd, 1);
        dup2(fd, 2);
        execve(PQL_BINARY, args, envp);
        static const char msg[] = "harness: execve " PQL_BINARY " failed\n";
        if (write(2, msg, sizeof msg - 1) < 0) _exit(126);
        _exit(127);
    }
    close(fd);
    close(devnull);
    free(envp);
    free(args);
    return p;
}

h_proc *h_proc_start(const char *name, ...)
{
    char *env[65];
    size_t n = 0;
    va_list ap;
    va_start(ap, name);
    for (const char *k = name; k && n < 64; k = va_arg(ap, const char *)) {
        const char *v = va_arg(ap, const char *);
        if (!v) cr_assert_fail("h_proc_start: %s has no value", k);
        env[n] = xcalloc(1, strlen(k) + strlen(v) + 2);
        sprintf(env[n++], "%s=%s", k, v);
    }
    va_end(ap);
    env[n] = NULL;
    static const char *const argv[] = {"pqlstream", "run", NULL};
    h_proc *p = h_proc_start_argv(argv, (const char *const *)env);
    for (size_t i = 0; i < n; i++)
        free(env[i]);
    return p;
}

pid_t h_proc_pid(const h_proc *p)
{
    return p->pid;
}

const char *h_proc_log_path(const h_proc *p)
{
    return p->log;
}

char *h_read_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    pql_buf b = {0};
    char chunk[4096];
    size_t got;
    while ((got = fread(chunk, 1, sizeof chunk, f)) > 0)
        pql_buf_append(&b, chunk, got);
    fclose(f);
    return b.data ? b.data : xcalloc(1, 1);
}

char *h_proc_log(const h_proc *p)
{
    return h_read_file(p->log);
}

void h_proc_dump_log(const h_proc *p, int lines)
{
    if (!p) return;
    char *log = h_proc_log(p);
    const char *start = log ? log + strlen(log) : NULL;
    for (int n = 0; start && start > log;) {
        if (start[-1] == '\n' && ++n > lines) break;
        start--;
    }
    fprintf(stderr, "---- pqlstream pid %d log %s (last %d lines) ----\n%s\n---- end ----\n",
            (int)p->pid, p->log, lines, start ? start : "(unreadable)");
    free(log);
}

void h_proc_kill(h_proc *p, int sig)
{
    if (p && !p->exited) kill(p->pid, sig);
}

static int reap(h_proc *p, int options)
{
    if (p->exited) return 1;
    int st;
    pid_t r = waitpid(p->pid, &st, options);
    if (r != p->pid) return 0;
    p->exited = 1;
    p->status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    return 1;
}

int h_proc_wait(h_proc *p, int timeout_ms)
{
    int64_t deadline = mono_ms() + timeout_ms;
    for (;;) {
        if (reap(p, WNOHANG)) return p->status;
        if (mono_ms() >= deadline) return -1;
        h_sleep_ms(STEP_MS);
    }
}

int h_proc_wait_log(h_proc *p, const char *needle, int timeout_ms)
{
    int64_t deadline = mono_ms() + timeout_ms;
    for (;;) {
        char *log = h_proc_log(p);
        int found = log && strstr(log, needle);
        free(log);
        if (found) return 0;
        if (reap(p, WNOHANG)) {
            fprintf(stderr, "harness: pqlstream exited (%d) before logging \"%s\"\n", p->status,
                    needle);
            return -1;
        }
        if (mono_ms() >= deadline) {
            fprintf(stderr, "harness: timed out waiting for \"%s\" in %s\n", needle, p->log);
            return -1;
        }
        h_sleep_ms(STEP_MS);
    }
}

int h_proc_stop(h_proc *p)
{
    if (!p) return 0;
    int status = p->exited ? p->status : -1;
    if (!p->exited) {
        kill(p->pid, SIGTERM);
        status = h_proc_wait(p, 10000);
        if (status < 0) {
            fprintf(stderr, "harness: pqlstream pid %d ignored SIGTERM for 10 s: SIGKILL\n",
                    (int)p->pid);
            h_proc_dump_log(p, 40);
            kill(p->pid, SIGKILL);
            reap(p, 0);
        } else if (status != 0) {
            fprintf(stderr, "harness: pqlstream pid %d exited %d on SIGTERM\n", (int)p->pid,
                    status);
            h_proc_dump_log(p, 40);
        }
    }
    /* A sanitizer report in the processor is a failure of the test. */
    char *log = h_proc_log(p);
    int bad = log && (strstr(log, "runtime error:") || strstr(log, "ERROR: AddressSanitizer") ||
                      strstr(log, "ERROR: LeakSanitizer"));
    free(log);
    if (bad) {
        h_proc_dump_log(p, 80);
        cr_assert_fail("pqlstream reported a sanitizer error (log above)");
    }
    h_rmtree(p->dir);
    free(p->dir);
    free(p->log);
    free(p);
    return status;
}

/* ---- Redis state ---------------------------------------------------------- */

static int64_t stored_offset(redisContext *c, const char *group, int p, const char *topic)
{
    redisReply *r = redis_cmd(c, "HGET pql:{%s:%d}:meta off:%s", group, p, topic);
    int64_t off = r->type == REDIS_REPLY_STRING ? strtoll(r->str, NULL, 10) : -1;
    freeReplyObject(r);
    return off;
}

int h_wait_offsets(h_kafka *k, const char *redis_url, const char *group, const char *topic,
                   int partitions, const int64_t *expected, int timeout_ms)
{
    return h_wait_offsets_of(NULL, k, redis_url, group, topic, partitions, expected, timeout_ms);
}

int h_wait_offsets_of(h_proc *watch, h_kafka *k, const char *redis_url, const char *group,
                      const char *topic, int partitions, const int64_t *expected, int timeout_ms)
{
    int64_t *want = xcalloc((size_t)partitions, sizeof *want);
    for (int p = 0; p < partitions; p++) {
        want[p] = expected ? expected[p] : h_high_watermark(k, topic, p);
        if (want[p] < 0) cr_assert_fail("no high watermark for %s [%d]", topic, p);
    }
    redisContext *c = redis_connect(redis_url);
    int64_t deadline = mono_ms() + timeout_ms;
    int rc = -1;
    for (;;) {
        int behind = 0;
        for (int p = 0; p < partitions && !behind; p++) {
            /* Partitions with nothing to read may never store an offset. */
            if (want[p] == 0) continue;
            behind = stored_offset(c, group, p, topic) < want[p];
        }
        if (!behind) {
            rc = 0;
            break;
        }
        if (watch && reap(watch, WNOHANG)) {
            fprintf(stderr, "harness: pqlstream exited (%d) while waiting for offsets\n",
                    watch->status);
            break;
        }
        if (mono_ms() >= deadline) break;
        h_sleep_ms(STEP_MS);
    }
    if (rc)
        for (int p = 0; p < partitions; p++) {
            int64_t got = stored_offset(c, group, p, topic);
            if (want[p] > 0 && got < want[p])
                fprintf(stderr,
                        "harness: group %s %s [%d]: stored next offset %" PRId64 ", want %" PRId64
                        "\n",
                        group, topic, p, got, want[p]);
        }
    redisFree(c);
    free(want);
    /* "Caught up" means a running process has it all: offsets written by an
       earlier incarnation are complete at once, and a test that then stops
       `watch` must not catch it in its first milliseconds. */
    if (rc == 0 && watch) {
        int64_t left = deadline - mono_ms();
        rc = h_proc_wait_log(watch, "msg=\"running\"", left > 1000 ? (int)left : 1000);
    }
    return rc;
}

static void append_escaped(pql_buf *b, const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch >= 0x20 && ch < 0x7f && ch != '\\')
            pql_buf_append(b, &s[i], 1);
        else
            pql_buf_printf(b, "\\x%02x", ch);
    }
}

static void lines_push(h_lines *l, size_t *cap, char *line)
{
    if (l->n == *cap) {
        *cap = *cap ? *cap * 2 : 256;
        char **grown = realloc(l->lines, *cap * sizeof *grown);
        if (!grown) cr_assert_fail("out of memory");
        l->lines = grown;
    }
    l->lines[l->n++] = line;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Every field of every hash pql:{<group>:<p>}:<tail>* except the key
 * pql:{<group>:<p>}:<skip> (skip NULL: none) and, with skip_zero, fields
 * whose value is "0", as sorted lines "<key without its prefix>\t<field>\t<value>". */
static h_lines *dump_hashes(const char *url, const char *group, int partition, const char *tail,
                            const char *skip, int skip_zero)
{
    /* SCAN MATCH is a glob: escape the group's special characters. */
    pql_buf prefix = {0}, pattern = {0};
    pql_buf_printf(&prefix, "pql:{%s:%d}:", group, partition);
    for (size_t i = 0; i < prefix.len; i++) {
        if (strchr("*?[]\\", prefix.data[i])) pql_buf_append(&pattern, "\\", 1);
        pql_buf_append(&pattern, &prefix.data[i], 1);
    }
    pql_buf_printf(&pattern, "%s*", tail);

    redisContext *c = redis_connect(url);
    h_lines *out = xcalloc(1, sizeof *out);
    size_t cap = 0;
    char cursor[32] = "0";
    do {
        redisReply *r = redis_cmd(c, "SCAN %s MATCH %s COUNT 1000", cursor, pattern.data);
        if (r->type != REDIS_REPLY_ARRAY || r->elements != 2)
            cr_assert_fail("unexpected SCAN reply");
        snprintf(cursor, sizeof cursor, "%s", r->element[0]->str);
        redisReply *keys = r->element[1];
        for (size_t i = 0; i < keys->elements; i++) {
            const char *key = keys->element[i]->str;
            size_t klen = (size_t)keys->element[i]->len;
            if (skip && klen == prefix.len + strlen(skip) && !strcmp(key + prefix.len, skip))
                continue;
            redisReply *h = redis_cmd(c, "HGETALL %b", key, klen);
            for (size_t j = 0; h->type == REDIS_REPLY_ARRAY && j + 1 < h->elements; j += 2) {
                if (skip_zero && !strcmp(h->element[j + 1]->str, "0")) continue;
                pql_buf line = {0};
                append_escaped(&line, key + prefix.len, klen - prefix.len);
                pql_buf_append(&line, "\t", 1);
                append_escaped(&line, h->element[j]->str, (size_t)h->element[j]->len);
                pql_buf_append(&line, "\t", 1);
                append_escaped(&line, h->element[j + 1]->str, (size_t)h->element[j + 1]->len);
                if (!line.data) cr_assert_fail("out of memory");
                lines_push(out, &cap, line.data);
            }
            freeReplyObject(h);
        }
        freeReplyObject(r);
    } while (strcmp(cursor, "0"));
    redisFree(c);
    pql_buf_free(&prefix);
    pql_buf_free(&pattern);
    if (out->n) qsort(out->lines, out->n, sizeof *out->lines, cmp_str);
    return out;
}

h_lines *h_redis_dump_partition(const char *url, const char *group, int partition)
{
    return dump_hashes(url, group, partition, "a:", NULL, 0);
}

h_lines *h_redis_dump_counters(const char *url, const char *group, int partition)
{
    return dump_hashes(url, group, partition, "c:", "c:mv", 1);
}

long long h_redis_hlen(const char *url, const char *key)
{
    redisContext *c = redis_connect(url);
    redisReply *r = redis_cmd(c, "HLEN %s", key);
    long long n = r->type == REDIS_REPLY_INTEGER ? r->integer : -1;
    freeReplyObject(r);
    redisFree(c);
    return n;
}

int h_lines_compare(const h_lines *a, const h_lines *b)
{
    size_t i = 0;
    while (i < a->n && i < b->n && !strcmp(a->lines[i], b->lines[i]))
        i++;
    if (i == a->n && i == b->n) return 0;
    fprintf(stderr, "harness: dumps differ at line %zu (of %zu and %zu):\n  < %s\n  > %s\n", i,
            a->n, b->n, i < a->n ? a->lines[i] : "(end)", i < b->n ? b->lines[i] : "(end)");
    return -1;
}

void h_lines_free(h_lines *l)
{
    if (!l) return;
    for (size_t i = 0; i < l->n; i++)
        free(l->lines[i]);
    free(l->lines);
    free(l);
}

/* ---- HTTP ------------------------------------------------------------------- */

char *h_http_get(h_proc *p, const char *path, int *status)
{
    static const char needle[] = "msg=\"http listening\" addr=";
    *status = 0;
    if (h_proc_wait_log(p, needle, 30000) < 0) {
        h_proc_dump_log(p, 40);
        cr_assert_fail("h_http_get: pqlstream did not log its HTTP address");
    }
    char *log = h_proc_log(p), host[128] = "", port[16] = "";
    const char *a = strstr(log, needle) + strlen(needle);
    size_t alen = strcspn(a, " \n");
    const char *colon = a + alen;
    while (colon > a && *colon != ':')
        colon--;
    int hl = (int)(colon - a), bracket = hl > 1 && a[0] == '[';
    snprintf(host, sizeof host, "%.*s", hl - 2 * bracket, a + bracket);
    snprintf(port, sizeof port, "%.*s", (int)(a + alen - colon - 1), colon + 1);
    free(log);

    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res = NULL;
    if (getaddrinfo(host, port, &hints, &res)) cr_assert_fail("h_http_get: bad address %s", host);
    int fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct timeval tv = {10, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    int connected = fd >= 0 && connect(fd, res->ai_addr, res->ai_addrlen) == 0;
    freeaddrinfo(res);
    if (!connected) {
        fprintf(stderr, "h_http_get: cannot connect to %s:%s: %s\n", host, port, strerror(errno));
        if (fd >= 0) close(fd);
        return NULL;
    }
    pql_buf req = {0}, resp = {0};
    pql_buf_printf(&req, "GET %s HTTP/1.0\r\nHost: %s:%s\r\n\r\n", path, host, port);
    ssize_t got = write(fd, req.data, req.len);
    char chunk[4096];
    while (got >= 0 && (got = read(fd, chunk, sizeof chunk)) > 0)
        pql_buf_append(&resp, chunk, (size_t)got);
    close(fd);
    pql_buf_free(&req);
    const char *body = resp.data ? strstr(resp.data, "\r\n\r\n") : NULL;
    if (got < 0 || !body || sscanf(resp.data, "HTTP/1.%*c %d", status) != 1) {
        fprintf(stderr, "h_http_get: GET %s: no complete answer from %s:%s (%s)\n", path, host,
                port, got < 0 ? strerror(errno) : "malformed");
        *status = 0;
        pql_buf_free(&resp);
        return NULL;
    }
    char *out = strdup(body + 4);
    pql_buf_free(&resp);
    return out;
}

pql_rules *h_rules(const char *yaml)
{
    pql_buf e = {0};
    pql_rules *r = pql_rules_load_string(yaml, "t.yaml", &e);
    cr_assert_not_null(r, "%s", e.data ? e.data : "");
    pql_buf_free(&e);
    return r;
}
