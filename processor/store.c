/* store.c — Redis, the only durable state: partition claims, the atomic batch
 * write, account and outbox loads (store.h has the key layout, fencing and the
 * exactly-once argument).
 *
 * The batch script (store.lua, embedded) takes
 *   KEYS: meta, outbox, counter hashes (one per distinct name), account hashes
 *         (one per pql_store_batch_account() call, in call order);
 *   ARGV: epoch seq nc na noff nput ndel | noff x (off:<topic>, offset) |
 *         nput x (id, payload) | ndel x id | per counter hash: n, n x (field,
 *         delta) | per account: ttl_ms nruns, per run r then r x (field, value)
 *         to HSET (r > 0) or -r fields to HDEL (r < 0), keeping call order.
 * It is run with EVALSHA; the SHA comes from SCRIPT LOAD at open and the script
 * is loaded again when a reply says NOSCRIPT (a restarted or flushed server).
 *
 * A claim is MULTI, HINCRBY epoch, HGET seq, HMGET off:<topic>…, EXEC sent as
 * one pipeline: atomic (all keys are the meta hash) and one round trip.
 *
 * Memory.  A batch keeps every byte it will send in one pql_buf and spans
 * (offset, length) into it; at commit the argv arrays are built in arrays the
 * store keeps, so a warmed-up batch and store allocate nothing per field.
 *
 * Errors never contain the password: messages name "host:port" or the socket
 * path, and every message passes through redact() as a second guard. */
#include "store.h"

#include "embedded.h"

#include <hiredis/hiredis.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <sys/un.h>

#define NO_NEXT SIZE_MAX

typedef struct span {
    size_t off, len;
} span;

typedef struct pair {
    span k, v;
} pair;

typedef struct incr_rec {
    span field, delta;
    size_t next; /* next increment of the same counter hash, or NO_NEXT */
} incr_rec;

typedef struct ctr_rec {
    span key, name;
    size_t n, head, tail;
} ctr_rec;

typedef struct acct_rec {
    span key;
    int64_t ttl_ms;
    size_t first, nops;
} acct_rec;

typedef struct op_rec {
    span field, value;
    int del;
} op_rec;

struct pql_store_batch {
    pql_buf bytes;  /* every argument byte */
    pql_buf prefix; /* "pql:{g:p}:" */
    span meta_key, outbox_key;
    int64_t epoch, seq;
    pql_err err; /* sticky: set when building failed (out of memory, bad group) */
    size_t last_ctr;
    struct {
        pair *v;
        size_t n, cap;
    } offs, puts;
    struct {
        span *v;
        size_t n, cap;
    } dels;
    struct {
        ctr_rec *v;
        size_t n, cap;
    } ctrs;
    struct {
        incr_rec *v;
        size_t n, cap;
    } incrs;
    struct {
        acct_rec *v;
        size_t n, cap;
    } accts;
    struct {
        op_rec *v;
        size_t n, cap;
    } ops;
};

struct pql_store {
    redisContext *ctx; /* NULL: connect on the next call */
    int is_unix;
    char *host; /* host name, or the socket path */
    int port;
    char *user, *pass; /* NULL when absent */
    int db;
    int timeout_ms;
    char where[128]; /* "host:port" or the socket path, for messages */
    const char *script;
    size_t script_len;
    char sha[41];
    struct {
        span *v;
        size_t n, cap;
    } args; /* commit argv as spans */
    const char **argv;
    size_t *argvlen;
    size_t argv_cap;
    unsigned char *pending;
    size_t pending_cap;
    pql_buf scratch;
    uint64_t round_trips, commands;
};

static void *vec_grow(void *v, size_t *cap, size_t need, size_t size)
{
    size_t c = *cap ? *cap : 16;
    while (c < need)
        c *= 2;
    void *p = realloc(v, c * size);
    if (p) *cap = c;
    return p;
}

/* Sets `out` to a new last element of vec, or NULL when out of memory. */
#define VEC_PUSH(vec, out)                                                                         \
    do {                                                                                           \
        (out) = NULL;                                                                              \
        if ((vec).n == (vec).cap) {                                                                \
            void *p_ = vec_grow((vec).v, &(vec).cap, (vec).n + 1, sizeof *(vec).v);                \
            if (!p_) break;                                                                        \
            (vec).v = p_;                                                                          \
        }                                                                                          \
        (out) = &(vec).v[(vec).n++];                                                               \
    } while (0)

/* ---- errors and the connection ------------------------------------------ */

static void redact(char *msg, const char *secret)
{
    if (!secret || !*secret) return;
    size_t n = strlen(secret);
    for (char *p = msg; (p = strstr(p, secret)) != NULL; p += n)
        memset(p, '*', n);
}

static void set_err(const pql_store *s, char *errstr, size_t size, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void set_err(const pql_store *s, char *errstr, size_t size, const char *fmt, ...)
{
    if (!errstr || size == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errstr, size, fmt, ap);
    va_end(ap);
    if (s) redact(errstr, s->pass);
}

static void drop(pql_store *s)
{
    if (s->ctx) redisFree(s->ctx);
    s->ctx = NULL;
}

/* The connection failed: report why, drop it so the next call reconnects. */
static pql_err io_fail(pql_store *s, char *errstr, size_t size, const char *what)
{
    const char *why = s->ctx && s->ctx->err ? s->ctx->errstr : "connection failed";
    set_err(s, errstr, size, "redis %s: %s: %s", s->where, what, why);
    drop(s);
    return PQL_ERR_IO;
}

static redisReply *get_reply(pql_store *s)
{
    void *r = NULL;
    if (redisGetReply(s->ctx, &r) != REDIS_OK) return NULL;
    return r;
}

static pql_err store_connect(pql_store *s, char *errstr, size_t size)
{
    if (s->ctx) return PQL_OK;
    struct timeval tv = {s->timeout_ms / 1000, (s->timeout_ms % 1000) * 1000};
    s->ctx = s->is_unix ? redisConnectUnixWithTimeout(s->host, tv)
                        : redisConnectWithTimeout(s->host, s->port, tv);
    if (!s->ctx || s->ctx->err) return io_fail(s, errstr, size, "connect");
    if (redisSetTimeout(s->ctx, tv) != REDIS_OK) return io_fail(s, errstr, size, "set timeout");
    const char *what[2];
    int n = 0;
    if (s->pass) {
        const char *av[3] = {"AUTH", s->user ? s->user : s->pass, s->pass};
        size_t al[3] = {4, strlen(av[1]), strlen(s->pass)};
        redisAppendCommandArgv(s->ctx, s->user ? 3 : 2, av, al);
        what[n++] = "AUTH";
    }
    if (s->db) {
        redisAppendCommand(s->ctx, "SELECT %d", s->db);
        what[n++] = "SELECT";
    }
    if (n == 0) return PQL_OK;
    s->round_trips++;
    s->commands += (uint64_t)n;
    for (int i = 0; i < n; i++) {
        redisReply *r = get_reply(s);
        if (!r) return io_fail(s, errstr, size, what[i]);
        if (r->type == REDIS_REPLY_ERROR) {
            set_err(s, errstr, size, "redis %s: %s refused: %s", s->where, what[i], r->str);
            freeReplyObject(r);
            drop(s);
            return PQL_ERR_IO;
        }
        freeReplyObject(r);
    }
    return PQL_OK;
}

/* One command, one round trip.  @returns the reply (not an error reply) or NULL. */
static redisReply *command(pql_store *s, int argc, const char **argv, const size_t *lens,
                           const char *what, pql_err *err, char *errstr, size_t size)
{
    *err = store_connect(s, errstr, size);
    if (*err) return NULL;
    s->round_trips++;
    s->commands++;
    redisReply *r = redisCommandArgv(s->ctx, argc, argv, lens);
    if (!r) {
        *err = io_fail(s, errstr, size, what);
        return NULL;
    }
    if (r->type == REDIS_REPLY_ERROR) {
        set_err(s, errstr, size, "redis %s: %s: %s", s->where, what, r->str);
        freeReplyObject(r);
        *err = PQL_ERR_IO;
        return NULL;
    }
    return r;
}

static pql_err load_script(pql_store *s, char *errstr, size_t size)
{
    const char *av[3] = {"SCRIPT", "LOAD", s->script};
    size_t al[3] = {6, 4, s->script_len};
    pql_err err;
    redisReply *r = command(s, 3, av, al, "SCRIPT LOAD", &err, errstr, size);
    if (!r) return err;
    if (r->type != REDIS_REPLY_STRING || r->len != 40) {
        set_err(s, errstr, size, "redis %s: SCRIPT LOAD: unexpected reply", s->where);
        freeReplyObject(r);
        return PQL_ERR_IO;
    }
    memcpy(s->sha, r->str, 40);
    s->sha[40] = '\0';
    freeReplyObject(r);
    return PQL_OK;
}

/* ---- URLs ------------------------------------------------------------------ */

static int hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Percent-decodes p[0..len) into a new string; NULL on a bad escape or %00. */
static char *decode_part(const char *p, size_t len)
{
    char *out = malloc(len + 1), *o = out;
    if (!out) return NULL;
    for (size_t i = 0; i < len; i++) {
        if (p[i] != '%') {
            *o++ = p[i];
            continue;
        }
        int hi = i + 2 < len ? hexval(p[i + 1]) : -1, lo = hi >= 0 ? hexval(p[i + 2]) : -1;
        if (lo < 0 || (hi | lo) == 0) {
            free(out);
            return NULL;
        }
        *o++ = (char)(hi * 16 + lo);
        i += 2;
    }
    *o = '\0';
    return out;
}

static int parse_uint(const char *p, size_t len, long max, long *out)
{
    long v = 0;
    if (len == 0 || len > 9) return -1;
    for (size_t i = 0; i < len; i++) {
        if (p[i] < '0' || p[i] > '9') return -1;
        v = v * 10 + (p[i] - '0');
    }
    if (v > max) return -1;
    *out = v;
    return 0;
}

/* Fills s->user/pass from "user:password", ":password" (never echoes them). */
static int parse_userinfo(pql_store *s, const char *p, size_t len, char *errstr, size_t size)
{
    const char *colon = memchr(p, ':', len);
    if (!colon) {
        set_err(NULL, errstr, size,
                "Redis URL: credentials need a password (user:password@ or :password@)");
        return -1;
    }
    size_t ulen = (size_t)(colon - p);
    if (ulen && !(s->user = decode_part(p, ulen))) goto bad;
    if (!(s->pass = decode_part(colon + 1, len - ulen - 1))) goto bad;
    return 0;
bad:
    set_err(NULL, errstr, size, "Redis URL: bad %%-escape in user or password");
    return -1;
}

static int parse_url(pql_store *s, const char *url, char *errstr, size_t size)
{
    long v;
    if (strncmp(url, "rediss://", 9) == 0) {
        set_err(NULL, errstr, size,
                "Redis URL: rediss:// (TLS) is not supported by hiredis 0.14; use a TLS "
                "proxy such as stunnel, or redis:// on a trusted network");
        return -1;
    }
    if (strncmp(url, "unix://", 7) == 0) {
        const char *rest = url + 7, *path = rest;
        s->is_unix = 1;
        if (*rest != '/') {
            const char *at = strchr(rest, '@');
            if (!at || at[1] != '/') {
                set_err(NULL, errstr, size, "Redis URL: unix:// needs an absolute socket path");
                return -1;
            }
            if (parse_userinfo(s, rest, (size_t)(at - rest), errstr, size) < 0) return -1;
            path = at + 1;
        }
        const char *q = strchr(path, '?');
        size_t plen = q ? (size_t)(q - path) : strlen(path);
        if (plen >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
            set_err(NULL, errstr, size, "Redis URL: unix socket path longer than %zu bytes",
                    sizeof(((struct sockaddr_un *)0)->sun_path) - 1);
            return -1;
        }
        if (q) {
            if (strncmp(q, "?db=", 4) != 0 || parse_uint(q + 4, strlen(q + 4), INT_MAX, &v) < 0) {
                set_err(NULL, errstr, size, "Redis URL: unix:// accepts only ?db=N");
                return -1;
            }
            s->db = (int)v;
        }
        if (!(s->host = strndup(path, plen))) goto nomem;
        snprintf(s->where, sizeof s->where, "unix:%s", s->host);
        return 0;
    }
    if (strncmp(url, "redis://", 8) != 0) {
        set_err(NULL, errstr, size, "Redis URL must start with redis:// or unix://");
        return -1;
    }
    const char *rest = url + 8, *at = strrchr(rest, '@');
    if (at) {
        if (parse_userinfo(s, rest, (size_t)(at - rest), errstr, size) < 0) return -1;
        rest = at + 1;
    }
    const char *slash = strchr(rest, '/'), *end = slash ? slash : rest + strlen(rest);
    const char *hend = end, *port = NULL;
    if (*rest == '[') { /* [v6 address] */
        const char *rb = memchr(rest, ']', (size_t)(end - rest));
        if (!rb) goto bad_host;
        hend = rb;
        rest++;
        if (rb + 1 < end) {
            if (rb[1] != ':') goto bad_host;
            port = rb + 2;
        }
    } else {
        const char *colon = memchr(rest, ':', (size_t)(end - rest));
        if (colon) {
            hend = colon;
            port = colon + 1;
        }
    }
    s->port = 6379;
    if (port) {
        if (parse_uint(port, (size_t)(end - port), 65535, &v) < 0 || v == 0) {
            set_err(NULL, errstr, size, "Redis URL: bad port (1-65535)");
            return -1;
        }
        s->port = (int)v;
    }
    if (slash && slash[1]) {
        if (parse_uint(slash + 1, strlen(slash + 1), INT_MAX, &v) < 0) {
            set_err(NULL, errstr, size, "Redis URL: bad database number after '/'");
            return -1;
        }
        s->db = (int)v;
    }
    s->host = hend > rest ? strndup(rest, (size_t)(hend - rest)) : strdup("127.0.0.1");
    if (!s->host) goto nomem;
    snprintf(s->where, sizeof s->where, "%.100s:%d", s->host, s->port);
    return 0;
bad_host:
    set_err(NULL, errstr, size, "Redis URL: bad host (IPv6 as [addr]:port)");
    return -1;
nomem:
    set_err(NULL, errstr, size, "Redis URL: out of memory");
    return -1;
}

/* ---- open, close, simple commands ------------------------------------------ */

pql_store *pql_store_open(const char *url, int timeout_ms, char *errstr, size_t errstr_size)
{
    pql_store *s = calloc(1, sizeof *s);
    if (!s) {
        set_err(NULL, errstr, errstr_size, "redis: out of memory");
        return NULL;
    }
    s->timeout_ms = timeout_ms > 0 ? timeout_ms : 5000;
    s->script = pql_embedded_get("store.lua", &s->script_len);
    if (!s->script) {
        set_err(NULL, errstr, errstr_size, "redis: store.lua is not embedded (build error)");
        goto fail;
    }
    if (!url || parse_url(s, url, errstr, errstr_size) < 0) goto fail;
    if (store_connect(s, errstr, errstr_size) != PQL_OK) goto fail;
    if (load_script(s, errstr, errstr_size) != PQL_OK) goto fail;
    return s;
fail:
    pql_store_close(s);
    return NULL;
}

void pql_store_close(pql_store *s)
{
    if (!s) return;
    drop(s);
    free(s->host);
    free(s->user);
    if (s->pass) memset(s->pass, 0, strlen(s->pass));
    free(s->pass);
    free(s->args.v);
    free(s->argv);
    free(s->argvlen);
    free(s->pending);
    pql_buf_free(&s->scratch);
    free(s);
}

pql_err pql_store_ping(pql_store *s, char *errstr, size_t errstr_size)
{
    const char *av[1] = {"PING"};
    size_t al[1] = {4};
    pql_err err;
    redisReply *r = command(s, 1, av, al, "PING", &err, errstr, errstr_size);
    if (r) freeReplyObject(r);
    return err;
}

void pql_store_stats(const pql_store *s, uint64_t *round_trips, uint64_t *commands)
{
    if (round_trips) *round_trips = s->round_trips;
    if (commands) *commands = s->commands;
}

static int append_prefix(pql_buf *out, const char *group, int32_t partition)
{
    return pql_buf_printf(out, "pql:{%s:%d}:", group, (int)partition);
}

void pql_store_account_key(pql_buf *out, const char *group, int32_t partition, const char *account,
                           size_t account_len)
{
    if (append_prefix(out, group, partition) == 0 && pql_buf_append(out, "a:", 2) == 0)
        pql_buf_append(out, account, account_len);
}

static int bad_group(const char *group)
{
    return !group || strpbrk(group, "{}") != NULL;
}

static int parse_i64(const redisReply *r, int64_t *out)
{
    if (r->type == REDIS_REPLY_INTEGER) {
        *out = r->integer;
        return 0;
    }
    if (r->type != REDIS_REPLY_STRING || r->len == 0 || r->len > 20) return -1;
    char tmp[24], *end;
    memcpy(tmp, r->str, r->len);
    tmp[r->len] = '\0';
    long long v = strtoll(tmp, &end, 10);
    if (*end) return -1;
    *out = v;
    return 0;
}

/* ---- claim ------------------------------------------------------------------- */

pql_err pql_store_claim(pql_store *s, const char *group, int32_t partition,
                        const char *const *topics, size_t ntopics, pql_claim *out, char *errstr,
                        size_t errstr_size)
{
    if (ntopics > 4 || bad_group(group)) {
        set_err(s, errstr, errstr_size, "claim: at most 4 topics; no '{' or '}' in the group");
        return PQL_ERR_ARG;
    }
    pql_err err = store_connect(s, errstr, errstr_size);
    if (err) return err;
    pql_buf *k = &s->scratch; /* key, then "off:<topic>" fields */
    size_t offs[5];
    pql_buf_reset(k);
    if (append_prefix(k, group, partition) < 0 || pql_buf_append(k, "meta", 4) < 0) goto nomem;
    offs[0] = k->len;
    for (size_t i = 0; i < ntopics; i++) {
        if (pql_buf_printf(k, "off:%s", topics[i]) < 0) goto nomem;
        offs[i + 1] = k->len;
    }
    const char *av[6] = {"HINCRBY", k->data, "epoch", "1"};
    size_t al[6] = {7, offs[0], 5, 1};
    redisAppendCommand(s->ctx, "MULTI");
    redisAppendCommandArgv(s->ctx, 4, av, al);
    av[0] = "HGET", al[0] = 4, av[2] = "seq", al[2] = 3;
    redisAppendCommandArgv(s->ctx, 3, av, al);
    av[0] = "HMGET", al[0] = 5;
    for (size_t i = 0; i < ntopics; i++) {
        av[2 + i] = k->data + offs[i];
        al[2 + i] = offs[i + 1] - offs[i];
    }
    int ncmd = ntopics ? 5 : 4;
    if (ntopics) redisAppendCommandArgv(s->ctx, 2 + (int)ntopics, av, al);
    redisAppendCommand(s->ctx, "EXEC");
    s->round_trips++;
    s->commands += (uint64_t)ncmd;
    redisReply *r = NULL;
    for (int i = 0; i < ncmd; i++) {
        if (r) freeReplyObject(r);
        if (!(r = get_reply(s))) return io_fail(s, errstr, errstr_size, "claim");
    }
    err = PQL_ERR_IO;
    if (r->type != REDIS_REPLY_ARRAY || r->elements != (ntopics ? 3u : 2u)) goto bad;
    if (parse_i64(r->element[0], &out->epoch) < 0) goto bad;
    out->seq = 0;
    if (r->element[1]->type != REDIS_REPLY_NIL && parse_i64(r->element[1], &out->seq) < 0) goto bad;
    for (size_t i = 0; i < 4; i++)
        out->offsets[i] = -1;
    for (size_t i = 0; i < ntopics; i++) {
        const redisReply *o =
            r->element[2]->type == REDIS_REPLY_ARRAY && r->element[2]->elements == ntopics
                ? r->element[2]->element[i]
                : NULL;
        if (!o) goto bad;
        if (o->type != REDIS_REPLY_NIL && parse_i64(o, &out->offsets[i]) < 0) goto bad;
    }
    freeReplyObject(r);
    return PQL_OK;
bad:
    set_err(s, errstr, errstr_size, "redis %s: claim of %s:%d: unexpected reply%s%s", s->where,
            group, (int)partition, r->type == REDIS_REPLY_ERROR ? ": " : "",
            r->type == REDIS_REPLY_ERROR ? r->str : "");
    freeReplyObject(r);
    return err;
nomem:
    set_err(s, errstr, errstr_size, "claim: out of memory");
    return PQL_ERR_NOMEM;
}

/* ---- reads ------------------------------------------------------------------- */

pql_err pql_store_outbox_scan(pql_store *s, const char *group, int32_t partition,
                              void (*fn)(void *opaque, const char *id, size_t id_len,
                                         const char *payload, size_t payload_len),
                              void *opaque, char *errstr, size_t errstr_size)
{
    pql_buf *k = &s->scratch;
    char cursor[32] = "0";
    pql_buf_reset(k);
    if (append_prefix(k, group, partition) < 0 || pql_buf_append(k, "outbox", 6) < 0) {
        set_err(s, errstr, errstr_size, "outbox scan: out of memory");
        return PQL_ERR_NOMEM;
    }
    do {
        const char *av[5] = {"HSCAN", k->data, cursor, "COUNT", "1000"};
        size_t al[5] = {5, k->len, strlen(cursor), 5, 4};
        pql_err err;
        redisReply *r = command(s, 5, av, al, "HSCAN outbox", &err, errstr, errstr_size);
        if (!r) return err;
        if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
            r->element[0]->type != REDIS_REPLY_STRING || r->element[0]->len >= sizeof cursor ||
            r->element[1]->type != REDIS_REPLY_ARRAY || r->element[1]->elements % 2) {
            set_err(s, errstr, errstr_size, "redis %s: HSCAN: unexpected reply", s->where);
            freeReplyObject(r);
            return PQL_ERR_IO;
        }
        memcpy(cursor, r->element[0]->str, r->element[0]->len);
        cursor[r->element[0]->len] = '\0';
        const redisReply *kv = r->element[1];
        for (size_t i = 0; i + 1 < kv->elements; i += 2)
            fn(opaque, kv->element[i]->str, kv->element[i]->len, kv->element[i + 1]->str,
               kv->element[i + 1]->len);
        freeReplyObject(r);
    } while (strcmp(cursor, "0") != 0);
    return PQL_OK;
}

static int is_flat_pairs(const redisReply *r)
{
    if (r->type != REDIS_REPLY_ARRAY || r->elements % 2) return 0;
    for (size_t i = 0; i < r->elements; i++)
        if (r->element[i]->type != REDIS_REPLY_STRING) return 0;
    return 1;
}

pql_err pql_store_load_accounts(pql_store *s, const char *group, int32_t partition,
                                const char *const *ids, const size_t *id_lens, size_t n,
                                void (*fn)(void *opaque, size_t i, const char *field,
                                           size_t field_len, const char *value, size_t value_len),
                                void *opaque, char *errstr, size_t errstr_size)
{
    if (n == 0) return PQL_OK;
    pql_err err = store_connect(s, errstr, errstr_size);
    if (err) return err;
    for (size_t i = 0; i < n; i++) { /* hiredis copies the arguments at append */
        pql_buf_reset(&s->scratch);
        pql_store_account_key(&s->scratch, group, partition, ids[i], id_lens[i]);
        const char *av[2] = {"HGETALL", s->scratch.data};
        size_t al[2] = {7, s->scratch.len};
        if (redisAppendCommandArgv(s->ctx, 2, av, al) != REDIS_OK)
            return io_fail(s, errstr, errstr_size, "HGETALL");
    }
    s->round_trips++;
    s->commands += n;
    for (size_t i = 0; i < n; i++) {
        redisReply *r = get_reply(s);
        if (!r) return io_fail(s, errstr, errstr_size, "HGETALL");
        if (!is_flat_pairs(r)) {
            set_err(s, errstr, errstr_size, "redis %s: HGETALL account %zu: %s", s->where, i,
                    r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
            err = PQL_ERR_IO; /* keep reading: the pipeline stays in step */
        } else if (!err) {
            for (size_t j = 0; j < r->elements; j += 2)
                fn(opaque, i, r->element[j]->str, r->element[j]->len, r->element[j + 1]->str,
                   r->element[j + 1]->len);
        }
        freeReplyObject(r);
    }
    return err;
}

pql_err pql_store_counters(pql_store *s, const char *group, int32_t partition, const char *name,
                           void (*fn)(void *opaque, const char *field, size_t field_len,
                                      int64_t value),
                           void *opaque, char *errstr, size_t errstr_size)
{
    pql_buf *k = &s->scratch;
    pql_buf_reset(k);
    if (append_prefix(k, group, partition) < 0 || pql_buf_printf(k, "c:%s", name) < 0) {
        set_err(s, errstr, errstr_size, "counters: out of memory");
        return PQL_ERR_NOMEM;
    }
    const char *av[2] = {"HGETALL", k->data};
    size_t al[2] = {7, k->len};
    pql_err err;
    redisReply *r = command(s, 2, av, al, "HGETALL counters", &err, errstr, errstr_size);
    if (!r) return err;
    if (!is_flat_pairs(r)) err = PQL_ERR_IO;
    for (size_t j = 0; !err && j < r->elements; j += 2) {
        int64_t v;
        if (parse_i64(r->element[j + 1], &v) < 0)
            err = PQL_ERR_IO;
        else
            fn(opaque, r->element[j]->str, r->element[j]->len, v);
    }
    if (err) set_err(s, errstr, errstr_size, "redis %s: counters %s: bad reply", s->where, name);
    freeReplyObject(r);
    return err;
}

/* ---- batches ----------------------------------------------------------------- */

pql_store_batch *pql_store_batch_new(void)
{
    return calloc(1, sizeof(pql_store_batch));
}

void pql_store_batch_destroy(pql_store_batch *b)
{
    if (!b) return;
    pql_buf_free(&b->bytes);
    pql_buf_free(&b->prefix);
    free(b->offs.v);
    free(b->puts.v);
    free(b->dels.v);
    free(b->ctrs.v);
    free(b->incrs.v);
    free(b->accts.v);
    free(b->ops.v);
    free(b);
}

/* Appends p[0..len) (never memory of b->bytes itself) and sets *out to it. */
static int put(pql_store_batch *b, span *out, const void *p, size_t len)
{
    out->off = b->bytes.len;
    out->len = len;
    if (pql_buf_append(&b->bytes, p, len) == 0) return 0;
    b->err = PQL_ERR_NOMEM;
    return -1;
}

static int put_int(pql_store_batch *b, span *out, long long v)
{
    char tmp[24];
    return put(b, out, tmp, (size_t)snprintf(tmp, sizeof tmp, "%lld", v));
}

/* Appends prefix + tag + name as one span. */
static int put_key(pql_store_batch *b, span *out, const char *tag, const void *name, size_t len)
{
    span a, c;
    if (put(b, out, b->prefix.data, b->prefix.len) || put(b, &a, tag, strlen(tag)) ||
        put(b, &c, name, len))
        return -1;
    out->len = b->bytes.len - out->off;
    return 0;
}

void pql_store_batch_begin(pql_store_batch *b, const char *group, int32_t partition, int64_t epoch,
                           int64_t seq)
{
    pql_buf_reset(&b->bytes);
    pql_buf_reset(&b->prefix);
    b->offs.n = b->puts.n = b->dels.n = b->ctrs.n = b->incrs.n = b->accts.n = b->ops.n = 0;
    b->epoch = epoch;
    b->seq = seq;
    b->last_ctr = 0;
    b->err = PQL_OK;
    if (bad_group(group)) {
        b->err = PQL_ERR_ARG;
        return;
    }
    if (append_prefix(&b->prefix, group, partition) < 0)
        b->err = PQL_ERR_NOMEM;
    else
        put_key(b, &b->meta_key, "meta", "", 0) == 0 && put_key(b, &b->outbox_key, "outbox", "", 0);
}

pql_err pql_store_batch_account(pql_store_batch *b, const char *id, size_t id_len, int64_t ttl_ms)
{
    acct_rec *a;
    VEC_PUSH(b->accts, a);
    if (!a) return b->err = PQL_ERR_NOMEM;
    a->ttl_ms = ttl_ms;
    a->first = b->ops.n;
    a->nops = 0;
    if (put_key(b, &a->key, "a:", id, id_len)) return PQL_ERR_NOMEM;
    return PQL_OK;
}

static pql_err account_op(pql_store_batch *b, const char *field, size_t field_len,
                          const char *value, size_t value_len, int del)
{
    if (b->accts.n == 0) return PQL_ERR_ARG; /* no pql_store_batch_account() yet */
    op_rec *o;
    VEC_PUSH(b->ops, o);
    if (!o) return b->err = PQL_ERR_NOMEM;
    o->del = del;
    o->value.off = o->value.len = 0;
    if (put(b, &o->field, field, field_len) || (!del && put(b, &o->value, value, value_len)))
        return PQL_ERR_NOMEM;
    b->accts.v[b->accts.n - 1].nops++;
    return PQL_OK;
}

pql_err pql_store_batch_hset(pql_store_batch *b, const char *field, size_t field_len,
                             const char *value, size_t value_len)
{
    return account_op(b, field, field_len, value, value_len, 0);
}

pql_err pql_store_batch_hdel(pql_store_batch *b, const char *field, size_t field_len)
{
    return account_op(b, field, field_len, NULL, 0, 1);
}

pql_err pql_store_batch_offset(pql_store_batch *b, const char *topic, int64_t next_offset)
{
    pair *p;
    span t;
    VEC_PUSH(b->offs, p);
    if (!p) return b->err = PQL_ERR_NOMEM;
    if (put(b, &p->k, "off:", 4) || put(b, &t, topic, strlen(topic)) ||
        put_int(b, &p->v, next_offset))
        return PQL_ERR_NOMEM;
    p->k.len += t.len;
    return PQL_OK;
}

pql_err pql_store_batch_outbox_put(pql_store_batch *b, const char *id, const void *payload,
                                   size_t payload_len)
{
    pair *p;
    VEC_PUSH(b->puts, p);
    if (!p) return b->err = PQL_ERR_NOMEM;
    if (put(b, &p->k, id, strlen(id)) || put(b, &p->v, payload, payload_len)) return PQL_ERR_NOMEM;
    return PQL_OK;
}

pql_err pql_store_batch_outbox_del(pql_store_batch *b, const char *id)
{
    span *d;
    VEC_PUSH(b->dels, d);
    if (!d) return b->err = PQL_ERR_NOMEM;
    return put(b, d, id, strlen(id)) ? PQL_ERR_NOMEM : PQL_OK;
}

static ctr_rec *find_counter(pql_store_batch *b, const char *name)
{
    size_t len = strlen(name);
    for (size_t k = 0; k < b->ctrs.n; k++) {
        size_t i = (b->last_ctr + k) % b->ctrs.n; /* the last one used first */
        const ctr_rec *c = &b->ctrs.v[i];
        if (c->name.len == len && memcmp(b->bytes.data + c->name.off, name, len) == 0) {
            b->last_ctr = i;
            return &b->ctrs.v[i];
        }
    }
    ctr_rec *c;
    VEC_PUSH(b->ctrs, c);
    if (!c) return NULL;
    if (put_key(b, &c->key, "c:", name, len)) return NULL;
    c->name.off = c->key.off + c->key.len - len;
    c->name.len = len;
    c->n = 0;
    c->head = c->tail = NO_NEXT;
    b->last_ctr = b->ctrs.n - 1;
    return c;
}

pql_err pql_store_batch_incr(pql_store_batch *b, const char *name, const char *field, int64_t delta)
{
    ctr_rec *c = find_counter(b, name);
    incr_rec *r;
    if (!c) return b->err = PQL_ERR_NOMEM;
    size_t ci = (size_t)(c - b->ctrs.v);
    VEC_PUSH(b->incrs, r);
    if (!r) return b->err = PQL_ERR_NOMEM;
    if (put(b, &r->field, field, strlen(field)) || put_int(b, &r->delta, delta))
        return PQL_ERR_NOMEM;
    r->next = NO_NEXT;
    size_t ri = b->incrs.n - 1;
    c = &b->ctrs.v[ci];
    if (c->n++ == 0)
        c->head = ri;
    else
        b->incrs.v[c->tail].next = ri;
    c->tail = ri;
    return PQL_OK;
}

int pql_store_batch_empty(const pql_store_batch *b)
{
    return b->offs.n == 0 && b->puts.n == 0 && b->dels.n == 0 && b->incrs.n == 0 && b->ops.n == 0;
}

/* ---- commit ------------------------------------------------------------------ */

static int arg(pql_store *s, span sp)
{
    span *a;
    VEC_PUSH(s->args, a);
    if (!a) return -1;
    *a = sp;
    return 0;
}

static int arg_int(pql_store *s, pql_store_batch *b, long long v)
{
    span sp;
    return put_int(b, &sp, v) || arg(s, sp);
}

/* Builds the EVALSHA of `b` in s->argv (numbers are appended to b->bytes; the
 * caller truncates them away after sending).  @returns argc, or -1 (no memory). */
static int build(pql_store *s, pql_store_batch *b)
{
    span sp;
    s->args.n = 0;
    if (put(b, &sp, "EVALSHA", 7) || arg(s, sp) || put(b, &sp, s->sha, 40) || arg(s, sp) ||
        arg_int(s, b, (long long)(2 + b->ctrs.n + b->accts.n)) || arg(s, b->meta_key) ||
        arg(s, b->outbox_key))
        return -1;
    for (size_t i = 0; i < b->ctrs.n; i++)
        if (arg(s, b->ctrs.v[i].key)) return -1;
    for (size_t i = 0; i < b->accts.n; i++)
        if (arg(s, b->accts.v[i].key)) return -1;
    long long head[7] = {b->epoch,
                         b->seq,
                         (long long)b->ctrs.n,
                         (long long)b->accts.n,
                         (long long)b->offs.n,
                         (long long)b->puts.n,
                         (long long)b->dels.n};
    for (size_t i = 0; i < 7; i++)
        if (arg_int(s, b, head[i])) return -1;
    for (size_t i = 0; i < b->offs.n; i++)
        if (arg(s, b->offs.v[i].k) || arg(s, b->offs.v[i].v)) return -1;
    for (size_t i = 0; i < b->puts.n; i++)
        if (arg(s, b->puts.v[i].k) || arg(s, b->puts.v[i].v)) return -1;
    for (size_t i = 0; i < b->dels.n; i++)
        if (arg(s, b->dels.v[i])) return -1;
    for (size_t i = 0; i < b->ctrs.n; i++) {
        if (arg_int(s, b, (long long)b->ctrs.v[i].n)) return -1;
        for (size_t r = b->ctrs.v[i].head; r != NO_NEXT; r = b->incrs.v[r].next)
            if (arg(s, b->incrs.v[r].field) || arg(s, b->incrs.v[r].delta)) return -1;
    }
    for (size_t i = 0; i < b->accts.n; i++) {
        const acct_rec *a = &b->accts.v[i];
        const op_rec *ops = b->ops.v + a->first;
        size_t nruns = 0;
        for (size_t j = 0; j < a->nops; j++)
            nruns += j == 0 || ops[j].del != ops[j - 1].del;
        if (arg_int(s, b, a->ttl_ms) || arg_int(s, b, (long long)nruns)) return -1;
        for (size_t j = 0; j < a->nops;) {
            size_t e = j;
            while (e < a->nops && ops[e].del == ops[j].del)
                e++;
            if (arg_int(s, b, ops[j].del ? -(long long)(e - j) : (long long)(e - j))) return -1;
            for (; j < e; j++)
                if (arg(s, ops[j].field) || (!ops[j].del && arg(s, ops[j].value))) return -1;
        }
    }
    if (s->args.n > (size_t)INT_MAX) return -1;
    if (s->argv_cap < s->args.n) {
        size_t cap = s->argv_cap, cap2 = s->argv_cap;
        const char **av = vec_grow(s->argv, &cap, s->args.n, sizeof *av);
        if (!av) return -1;
        s->argv = av;
        size_t *al = vec_grow(s->argvlen, &cap2, s->args.n, sizeof *al);
        if (!al) return -1;
        s->argvlen = al;
        s->argv_cap = cap;
    }
    for (size_t i = 0; i < s->args.n; i++) {
        s->argv[i] = b->bytes.data + s->args.v[i].off;
        s->argvlen[i] = s->args.v[i].len;
    }
    return (int)s->args.n;
}

static int starts_with(const char *s, const char *prefix)
{
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

pql_err pql_store_commit(pql_store *s, pql_store_batch *const *batches, size_t n, pql_err *results,
                         char *errstr, size_t errstr_size)
{
    if (n == 0) return PQL_OK;
    if (n > s->pending_cap) {
        unsigned char *p = vec_grow(s->pending, &s->pending_cap, n, 1);
        if (!p) {
            for (size_t i = 0; i < n; i++)
                results[i] = PQL_ERR_NOMEM;
            set_err(s, errstr, errstr_size, "commit: out of memory");
            return PQL_ERR_NOMEM;
        }
        s->pending = p;
    }
    for (size_t i = 0; i < n; i++) {
        results[i] = batches[i]->err ? batches[i]->err : PQL_ERR_IO;
        s->pending[i] = batches[i]->err == PQL_OK;
    }
    for (int attempt = 0; attempt < 2; attempt++) {
        pql_err err = store_connect(s, errstr, errstr_size);
        if (err) return err;
        size_t sent = 0, noscript = 0;
        for (size_t i = 0; i < n; i++) {
            if (!s->pending[i]) continue;
            pql_store_batch *b = batches[i];
            size_t mark = b->bytes.len;
            int argc = build(s, b);
            int ok =
                argc < 0 || redisAppendCommandArgv(s->ctx, argc, s->argv, s->argvlen) == REDIS_OK;
            b->bytes.len = mark;
            if (argc < 0) {
                results[i] = PQL_ERR_NOMEM;
                s->pending[i] = 0;
                set_err(s, errstr, errstr_size, "commit: out of memory");
            } else if (!ok) {
                return io_fail(s, errstr, errstr_size, "EVALSHA");
            } else {
                sent++;
            }
        }
        if (sent == 0) return PQL_OK;
        s->round_trips++;
        s->commands += sent;
        for (size_t i = 0; i < n; i++) {
            if (!s->pending[i]) continue;
            redisReply *r = get_reply(s);
            if (!r) return io_fail(s, errstr, errstr_size, "EVALSHA");
            const span *mk = &batches[i]->meta_key;
            const char *key = batches[i]->bytes.data + mk->off;
            if (r->type == REDIS_REPLY_ERROR && starts_with(r->str, "NOSCRIPT")) {
                noscript++;
            } else if (r->type == REDIS_REPLY_ERROR) {
                int fenced = starts_with(r->str, "FENCED") || starts_with(r->str, "ERR FENCED");
                results[i] = fenced ? PQL_ERR_FENCED : PQL_ERR_IO;
                set_err(s, errstr, errstr_size, "redis %s: %.*s: %s", s->where, (int)mk->len, key,
                        r->str);
                s->pending[i] = 0;
            } else {
                results[i] = r->type == REDIS_REPLY_INTEGER ? PQL_OK : PQL_ERR_IO;
                s->pending[i] = 0;
            }
            freeReplyObject(r);
        }
        if (noscript == 0) return PQL_OK;
        if (attempt == 0 && (err = load_script(s, errstr, errstr_size)) != PQL_OK) return err;
    }
    set_err(s, errstr, errstr_size, "redis %s: EVALSHA: NOSCRIPT after SCRIPT LOAD", s->where);
    return PQL_OK;
}
