/* redis_child.c — a private redis-server child on a unix socket (redis_child.h).
 *
 * The server gets everything on its command line (no config file): no TCP
 * port, a 0700 socket in `dir`, no RDB snapshots, AOF with fsync every second
 * when asked (an AOF write reaches the kernel before the client sees the
 * reply, so data survives a SIGKILL of the server), and its log in
 * `dir`/redis.log.  The child asks the kernel to SIGKILL it when the thread
 * that forked it dies (PR_SET_PDEATHSIG), so start it from a thread that lives
 * as long as the server should. */
#include "redis_child.h"

#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define START_TIMEOUT_MS 5000
#define STOP_TIMEOUT_MS  5000

struct pql_redis_child {
    char *dir;  /* absolute */
    char *sock; /* dir/redis.sock */
    char *log;  /* dir/redis.log */
    char *url;  /* unix://dir/redis.sock */
    char *binary;
    int appendonly;
    pid_t pid; /* 0: not running */
};

static char *join(const char *a, const char *b)
{
    char *s = NULL;
    return asprintf(&s, "%s%s", a, b) < 0 ? NULL : s;
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Copies the last non-empty line of the server log into buf (for errors). */
static void last_log_line(const pql_redis_child *c, char *buf, size_t size)
{
    char line[512];
    FILE *f = fopen(c->log, "r");
    buf[0] = '\0';
    if (!f) return;
    while (fgets(line, sizeof line, f))
        if (line[0] != '\n') {
            size_t n = strnlen(line, size - 1);
            memcpy(buf, line, n);
            buf[n] = '\0';
        }
    fclose(f);
    buf[strcspn(buf, "\n")] = '\0';
}

/* Waits for the child to exit for up to timeout_ms.  @returns 1 if it did. */
static int reap(pql_redis_child *c, int timeout_ms, int *status)
{
    int64_t deadline = mono_ms() + timeout_ms;
    for (;;) {
        pid_t r = waitpid(c->pid, status, WNOHANG);
        if (r == c->pid || (r < 0 && errno == ECHILD)) {
            c->pid = 0;
            return 1;
        }
        if (mono_ms() >= deadline) return 0;
        sleep_ms(10);
    }
}

static void kill_hard(pql_redis_child *c)
{
    int status;
    if (c->pid <= 0) return;
    kill(c->pid, SIGKILL);
    reap(c, INT_MAX, &status);
}

/* @returns 1 when the server answers PING with PONG, 0 if not yet (loading,
 * socket not there yet). */
static int answers_ping(const pql_redis_child *c)
{
    struct timeval tv = {0, 200000};
    redisContext *ctx = redisConnectUnixWithTimeout(c->sock, tv);
    int ok = 0;
    if (ctx && !ctx->err) {
        redisSetTimeout(ctx, tv);
        redisReply *r = redisCommand(ctx, "PING");
        ok = r && r->type == REDIS_REPLY_STATUS && strcmp(r->str, "PONG") == 0;
        freeReplyObject(r);
    }
    if (ctx) redisFree(ctx);
    return ok;
}

static int spawn(pql_redis_child *c, char *errstr, size_t size)
{
    char *argv[] = {c->binary,
                    "--port",
                    "0",
                    "--unixsocket",
                    c->sock,
                    "--unixsocketperm",
                    "700",
                    "--dir",
                    c->dir,
                    "--save",
                    "",
                    "--appendonly",
                    c->appendonly ? "yes" : "no",
                    "--appendfsync",
                    "everysec",
                    "--daemonize",
                    "no",
                    "--logfile",
                    c->log,
                    NULL};
    int pfd[2], child_errno = 0, status;
    if (pipe2(pfd, O_CLOEXEC) < 0) {
        pql_set_err(errstr, size, "redis-server: pipe: %s", strerror(errno));
        return -1;
    }
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        pql_set_err(errstr, size, "redis-server: fork: %s", strerror(errno));
        close(pfd[0]);
        close(pfd[1]);
        return -1;
    }
    if (pid == 0) { /* child: async-signal-safe calls only until exec */
        close(pfd[0]);
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent) _exit(127); /* the parent died before prctl */
        /* Its own process group: a Ctrl-C on the terminal reaches us, not the
           server, so we can still write our last batch while stopping. */
        setpgid(0, 0);
        int null = open("/dev/null", O_RDWR);
        if (null >= 0) dup2(null, 0), dup2(null, 1);
        close_range(3, ~0U, CLOSE_RANGE_CLOEXEC); /* keep our sockets out of the server */
        execvp(c->binary, argv);
        child_errno = errno;
        if (write(pfd[1], &child_errno, sizeof child_errno) < 0) _exit(126);
        _exit(127);
    }
    close(pfd[1]);
    ssize_t n;
    while ((n = read(pfd[0], &child_errno, sizeof child_errno)) < 0 && errno == EINTR)
        ;
    close(pfd[0]);
    c->pid = pid;
    if (n == (ssize_t)sizeof child_errno) { /* exec failed */
        reap(c, INT_MAX, &status);
        if (child_errno == ENOENT)
            pql_set_err(errstr, size,
                        "%s not found: apt-get install redis-server (or set the "
                        "Redis URL to an existing server)",
                        c->binary);
        else
            pql_set_err(errstr, size, "cannot run %s: %s", c->binary, strerror(child_errno));
        return -1;
    }
    int64_t deadline = mono_ms() + START_TIMEOUT_MS;
    while (!answers_ping(c)) {
        char last[256];
        if (waitpid(pid, &status, WNOHANG) == pid) {
            c->pid = 0;
            last_log_line(c, last, sizeof last);
            pql_set_err(errstr, size, "redis-server exited during start-up (%s %d): %s (see %s)",
                        WIFEXITED(status) ? "status" : "signal",
                        WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status), last, c->log);
            return -1;
        }
        if (mono_ms() >= deadline) {
            kill_hard(c);
            last_log_line(c, last, sizeof last);
            pql_set_err(errstr, size, "redis-server did not answer PING within %d s: %s (see %s)",
                        START_TIMEOUT_MS / 1000, last, c->log);
            return -1;
        }
        sleep_ms(20);
    }
    return 0;
}

pql_redis_child *pql_redis_child_start(const pql_redis_child_opts *opts, char *errstr,
                                       size_t errstr_size)
{
    char abs[PATH_MAX];
    if (!opts || !opts->dir || !*opts->dir) {
        pql_set_err(errstr, errstr_size, "redis-server: a data directory is required");
        return NULL;
    }
    if (mkdir(opts->dir, 0700) < 0 && errno != EEXIST) {
        pql_set_err(errstr, errstr_size, "redis-server: cannot create %s: %s", opts->dir,
                    strerror(errno));
        return NULL;
    }
    if (!realpath(opts->dir, abs)) {
        pql_set_err(errstr, errstr_size, "redis-server: %s: %s", opts->dir, strerror(errno));
        return NULL;
    }
    pql_redis_child *c = calloc(1, sizeof *c);
    if (!c || !(c->dir = strdup(abs)) || !(c->sock = join(abs, "/redis.sock")) ||
        !(c->log = join(abs, "/redis.log")) || !(c->url = join("unix://", c->sock)) ||
        !(c->binary = strdup(opts->binary ? opts->binary : "redis-server"))) {
        pql_set_err(errstr, errstr_size, "redis-server: out of memory");
        goto fail;
    }
    c->appendonly = opts->appendonly;
    if (strlen(c->sock) >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
        pql_set_err(errstr, errstr_size, "redis-server: socket path %s is too long (max %zu bytes)",
                    c->sock, sizeof(((struct sockaddr_un *)0)->sun_path) - 1);
        goto fail;
    }
    if (spawn(c, errstr, errstr_size) < 0) goto fail;
    return c;
fail:
    pql_redis_child_stop(c);
    return NULL;
}

const char *pql_redis_child_url(const pql_redis_child *c)
{
    return c->url;
}

pid_t pql_redis_child_pid(const pql_redis_child *c)
{
    return c->pid;
}

void pql_redis_child_stop(pql_redis_child *c)
{
    int status;
    if (!c) return;
    if (c->pid > 0) {
        kill(c->pid, SIGTERM);
        if (!reap(c, STOP_TIMEOUT_MS, &status)) kill_hard(c);
    }
    free(c->dir);
    free(c->sock);
    free(c->log);
    free(c->url);
    free(c->binary);
    free(c);
}

int pql_redis_child_restart(pql_redis_child *c, char *errstr, size_t errstr_size)
{
    kill_hard(c);
    return spawn(c, errstr, errstr_size);
}

int pql_redis_for_tool(const char *redis_url, const char *data_dir, char *url, size_t url_size,
                       pql_redis_child **child, char *errstr, size_t errstr_size)
{
    char dir[PATH_MAX], abs[PATH_MAX];
    struct stat st;
    *child = NULL;
    if (redis_url && redis_url[0]) {
        snprintf(url, url_size, "%s", redis_url);
        return 0;
    }
    snprintf(dir, sizeof dir, "%s/redis", data_dir);
    if (stat(dir, &st) != 0 || !realpath(dir, abs)) {
        pql_set_err(errstr, errstr_size,
                    "no Redis is configured (redis.url, PQLSTREAM_REDIS) and the embedded default "
                    "has no data in %s: run `pqlstream run` in this directory first, or set "
                    "PQLSTREAM_REDIS to the Redis the processors use",
                    dir);
        return -1;
    }
    char sock[PATH_MAX + 16];
    snprintf(sock, sizeof sock, "%s/redis.sock", abs);
    pql_redis_child probe = {.sock = sock};
    if (answers_ping(&probe)) { /* `run` is up: read its server */
        snprintf(url, url_size, "unix://%s/redis.sock", abs);
        return 0;
    }
    pql_redis_child_opts ro = {.dir = abs, .appendonly = 1};
    char e[512];
    if (!(*child = pql_redis_child_start(&ro, e, sizeof e))) {
        pql_set_err(errstr, errstr_size, "cannot start a redis-server on %s: %s", abs, e);
        return -1;
    }
    snprintf(url, url_size, "%s", pql_redis_child_url(*child));
    return 0;
}
