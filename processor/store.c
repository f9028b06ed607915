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
 * It runs with EVALSHA; the SHA comes from SCRIPT LOAD at open, and the script
 * is loaded again when a reply says NOSCRIPT (a restarted or flushed server).
 *
 * A claim is MULTI, HINCRBY epoch, HGET seq, HMGET off:<topic>…, EXEC sent as
 * one pipeline: atomic (one key) and one round trip.
 *
 * Memory.  A batch keeps every byte it will send in one pql_buf plus spans
 * (offset, length) into it; at commit the argv arrays are built in arrays the
 * store keeps, so a warmed-up batch and store allocate nothing per field.  A
 * failed allocation is sticky: the batch reports it at every later call and
 * at commit.
 *
 * Connection.  Opened (with AUTH and SELECT) by pql_store_open() so a bad
 * address or password shows at start; after an I/O error it is dropped and
 * the next call reconnects.  Errors never contain the password: messages name
 * "host:port" or the socket path, and redact() masks it as a second guard. */
#include "store.h"

#include "embedded.h"

#include <ctype.h>
#include <hiredis/hiredis.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <sys/un.h>

#define SEND_CHUNK (64 * 1024) /* commands formatted before they are sent (bytes) */
#define NO_NEXT    SIZE_MAX
#define VEC(T)                                                                                     \
    struct {                                                                                       \
        T *v;                                                                                      \
        size_t n, cap;                                                                             \
    }

typedef struct span {
    size_t off, len;
} span;
typedef struct pair {
    span k, v;
} pair;
typedef struct incr_rec {
    span field, delta;
    size_t next; /* the next increment of the same counter hash, or NO_NEXT */
} incr_rec;
typedef struct ctr_rec {
    span key, name;
    size_t n, head, tail;
} ctr_rec;
typedef struct acct_rec {
    span key;
    int64_t ttl_ms;
    size_t first, nops; /* its ops: ops[first .. first+nops) */
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
    pql_err err;   /* sticky: out of memory, or a group with braces */
    char why[256]; /* why Redis refused it at the last commit, "" if it did not */
    size_t last_ctr;
    VEC(pair) offs, puts;
    VEC(span) dels;
    VEC(ctr_rec) ctrs;
    VEC(incr_rec) incrs;
    VEC(acct_rec) accts;
    VEC(op_rec) ops;
};

struct pql_store {
    redisContext *ctx; /* NULL: connect on the next call */
    int is_unix;
    char *host; /* host name, or the socket path */
    int port, db, timeout_ms;
    char *user, *pass; /* NULL when absent */
    char where[128];   /* "host:port" or "unix:/path", for messages */
    const char *script;
    size_t script_len;
    char sha[41];
    VEC(span) args; /* a commit's argv as spans into the batch's bytes */
    int args_oom;
    pql_buf resp; /* that argv as the RESP command sent (build) */
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

/* Formats the reason into errstr (password masked) and returns err. */
__attribute__((format(printf, 5, 6))) static pql_err
fail(const pql_store *s, char *errstr, size_t size, pql_err err, const char *fmt, ...)
{
    if (!errstr || size == 0) return err;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errstr, size, fmt, ap);
    va_end(ap);
    if (s && s->pass && *s->pass) {
        size_t n = strlen(s->pass);
        for (char *p = errstr; (p = strstr(p, s->pass)) != NULL; p += n)
            memset(p, '*', n);
    }
    return err;
}

static void drop(pql_store *s)
{
    if (s->ctx) redisFree(s->ctx);
    s->ctx = NULL;
}

/* The connection failed: report why and drop it, so the next call reconnects. */
static pql_err io_fail(pql_store *s, char *errstr, size_t size, const char *what)
{
    const char *why = s->ctx && s->ctx->err ? s->ctx->errstr : "connection failed";
    fail(s, errstr, size, PQL_ERR_IO, "redis %s: %s: %s", s->where, what, why);
    drop(s);
    return PQL_ERR_IO;
}

static redisReply *get_reply(pql_store *s)
{
    void *r = NULL;
    return redisGetReply(s->ctx, &r) == REDIS_OK ? r : NULL;
}

static pql_err load_script(pql_store *s, char *errstr, size_t size);

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
    if (s->pass) { /* "AUTH user pass" or "AUTH pass" */
        const char *av[3] = {"AUTH", s->user ? s->user : s->pass, s->pass};
        size_t al[3] = {4, strlen(av[1]), strlen(s->pass)};
        redisAppendCommandArgv(s->ctx, s->user ? 3 : 2, av, al);
        what[n++] = "AUTH";
    }
    if (s->db) {
        redisAppendCommand(s->ctx, "SELECT %d", s->db);
        what[n++] = "SELECT";
    }
    if (n) s->round_trips++;
    s->commands += (uint64_t)n;
    for (int i = 0; i < n; i++) {
        redisReply *r = get_reply(s);
        if (!r) return io_fail(s, errstr, size, what[i]);
        pql_err err = r->type != REDIS_REPLY_ERROR
                          ? PQL_OK
                          : fail(s, errstr, size, PQL_ERR_ARG, "redis %s: %s refused: %s", s->where,
                                 what[i], r->str);
        freeReplyObject(r);
        if (err) {
            drop(s);
            return err;
        }
    }
    /* first connection of a lazily opened store (pql_store_new) */
    return s->sha[0] ? PQL_OK : load_script(s, errstr, size);
}

/* One command, one round trip.  @returns the reply (never an error reply) or NULL. */
static redisReply *command(pql_store *s, int argc, const char **argv, const size_t *lens,
                           const char *what, pql_err *err, char *errstr, size_t size)
{
    if ((*err = store_connect(s, errstr, size)) != PQL_OK) return NULL;
    s->round_trips++;
    s->commands++;
    redisReply *r = redisCommandArgv(s->ctx, argc, argv, lens);
    if (!r) {
        *err = io_fail(s, errstr, size, what);
    } else if (r->type == REDIS_REPLY_ERROR) {
        *err = fail(s, errstr, size, PQL_ERR_IO, "redis %s: %s: %s", s->where, what, r->str);
        freeReplyObject(r);
        r = NULL;
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
    if (r->type == REDIS_REPLY_STRING && r->len == 40)
        memcpy(s->sha, r->str, 41);
    else
        err = fail(s, errstr, size, PQL_ERR_IO, "redis %s: SCRIPT LOAD: bad reply", s->where);
    freeReplyObject(r);
    return err;
}

/* ---- URLs (error messages never echo the URL: it may hold a password) ------ */

/* Percent-decodes p[0..len) into a new string; NULL on a bad escape or %00. */
static char *decode_part(const char *p, size_t len)
{
    char *out = malloc(len + 1), *o = out;
    for (size_t i = 0; out && i < len; i++) {
        unsigned v;
        if (p[i] != '%')
            *o++ = p[i];
        else if (i + 2 < len && isxdigit((unsigned char)p[i + 1]) &&
                 isxdigit((unsigned char)p[i + 2]) && sscanf(p + i + 1, "%2x", &v) == 1 && v)
            *o++ = (char)v, i += 2;
        else
            free(out), out = NULL;
    }
    if (out) *o = '\0';
    return out;
}

/* Parses len > 0 decimal digits, at most `max`. */
static int parse_uint(const char *p, size_t len, long max, int *out)
{
    long v = 0;
    if (len == 0 || len > 9) return -1;
    for (size_t i = 0; i < len; i++) {
        if (p[i] < '0' || p[i] > '9') return -1;
        v = v * 10 + (p[i] - '0');
    }
    if (v > max) return -1;
    *out = (int)v;
    return 0;
}

/* Fills s->user/pass from "user:password" or ":password". */
static pql_err parse_userinfo(pql_store *s, const char *p, size_t len, char *errstr, size_t size)
{
    const char *colon = memchr(p, ':', len);
    if (!colon)
        return fail(NULL, errstr, size, PQL_ERR_ARG,
                    "Redis URL: credentials need a password (user:password@ or :password@)");
    size_t ulen = (size_t)(colon - p);
    if ((ulen && !(s->user = decode_part(p, ulen))) ||
        !(s->pass = decode_part(colon + 1, len - ulen - 1)))
        return fail(NULL, errstr, size, PQL_ERR_ARG, "Redis URL: bad %%-escape in credentials");
    return PQL_OK;
}

static pql_err parse_unix(pql_store *s, const char *rest, char *errstr, size_t size)
{
    const char *path = rest, *at = strchr(rest, '@');
    s->is_unix = 1;
    if (*rest != '/') {
        if (!at || at[1] != '/')
            return fail(NULL, errstr, size, PQL_ERR_ARG, "Redis URL: unix:// needs a full path");
        if (parse_userinfo(s, rest, (size_t)(at - rest), errstr, size)) return PQL_ERR_ARG;
        path = at + 1;
    }
    const char *q = strchr(path, '?');
    size_t plen = q ? (size_t)(q - path) : strlen(path);
    if (plen >= sizeof(((struct sockaddr_un *)0)->sun_path))
        return fail(NULL, errstr, size, PQL_ERR_ARG, "Redis URL: socket path over 107 bytes");
    if (q && (strncmp(q, "?db=", 4) != 0 || parse_uint(q + 4, strlen(q + 4), INT_MAX, &s->db)))
        return fail(NULL, errstr, size, PQL_ERR_ARG, "Redis URL: unix:// takes only ?db=N");
    if (!(s->host = strndup(path, plen))) return PQL_ERR_NOMEM;
    snprintf(s->where, sizeof s->where, "unix:%.100s", s->host);
    return PQL_OK;
}

static pql_err parse_url(pql_store *s, const char *url, char *errstr, size_t size)
{
    if (strncmp(url, "rediss://", 9) == 0)
        return fail(NULL, errstr, size, PQL_ERR_ARG,
                    "Redis URL: rediss:// (TLS) needs hiredis >= 1.0; this build has 0.14. "
                    "Use a TLS proxy (stunnel) or redis:// on a trusted network");
    if (strncmp(url, "unix://", 7) == 0) return parse_unix(s, url + 7, errstr, size);
    if (strncmp(url, "redis://", 8) != 0)
        return fail(NULL, errstr, size, PQL_ERR_ARG,
                    "Redis URL must start with redis:// or unix://");
    const char *rest = url + 8, *at = strrchr(rest, '@');
    if (at) {
        if (parse_userinfo(s, rest, (size_t)(at - rest), errstr, size)) return PQL_ERR_ARG;
        rest = at + 1;
    }
    const char *slash = strchr(rest, '/'), *end = slash ? slash : rest + strlen(rest);
    const char *hend = end, *port = NULL;
    if (*rest == '[') { /* [IPv6]:port */
        if (!(hend = memchr(rest, ']', (size_t)(end - rest))) || (hend + 1 < end && hend[1] != ':'))
            return fail(NULL, errstr, size, PQL_ERR_ARG, "Redis URL: bad [IPv6] host");
        port = hend + 1 < end ? hend + 2 : NULL;
        rest++;
    } else if ((port = memchr(rest, ':', (size_t)(end - rest))) != NULL) {
        hend = port++;
    }
    s->port = 6379;
    if (port && (parse_uint(port, (size_t)(end - port), 65535, &s->port) || s->port == 0))
        return fail(NULL, errstr, size, PQL_ERR_ARG, "Redis URL: bad port (1-65535)");
    if (slash && slash[1] && parse_uint(slash + 1, strlen(slash + 1), INT_MAX, &s->db))
        return fail(NULL, errstr, size, PQL_ERR_ARG, "Redis URL: bad database number after /");
    s->host = hend > rest ? strndup(rest, (size_t)(hend - rest)) : strdup("127.0.0.1");
    if (!s->host) return PQL_ERR_NOMEM;
    snprintf(s->where, sizeof s->where, "%.100s:%d", s->host, s->port);
    return PQL_OK;
}

/* ---- open, close, simple commands ------------------------------------------ */

pql_store *pql_store_new(const char *url, int timeout_ms, char *errstr, size_t errstr_size)
{
    pql_store *s = calloc(1, sizeof *s);
    pql_err err = PQL_ERR_NOMEM;
    if (!s) goto fail;
    s->timeout_ms = timeout_ms > 0 ? timeout_ms : 5000;
    s->script = pql_embedded_get("store.lua", &s->script_len);
    if (!s->script) {
        fail(NULL, errstr, errstr_size, PQL_ERR_ARG, "store.lua is not embedded (build error)");
        goto fail;
    }
    if (!url)
        err = fail(NULL, errstr, errstr_size, PQL_ERR_ARG, "Redis URL missing");
    else
        err = parse_url(s, url, errstr, errstr_size);
    if (err) goto fail;
    return s;
fail:
    if (err == PQL_ERR_NOMEM) fail(NULL, errstr, errstr_size, err, "redis: out of memory");
    pql_store_close(s);
    return NULL;
}

pql_store *pql_store_open(const char *url, int timeout_ms, char *errstr, size_t errstr_size)
{
    pql_store *s = pql_store_new(url, timeout_ms, errstr, errstr_size);
    if (s && store_connect(s, errstr, errstr_size) != PQL_OK) {
        pql_store_close(s);
        return NULL;
    }
    return s;
}

void pql_store_close(pql_store *s)
{
    if (!s) return;
    drop(s);
    if (s->pass) memset(s->pass, 0, strlen(s->pass));
    free(s->pass);
    free(s->user);
    free(s->host);
    free(s->args.v);
    pql_buf_free(&s->resp);
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
    freeReplyObject(r);
    return err;
}

void pql_store_stats(const pql_store *s, uint64_t *round_trips, uint64_t *commands)
{
    if (round_trips) *round_trips = s->round_trips;
    if (commands) *commands = s->commands;
}

/* Appends "pql:{group:partition}:" + tag + name[0..len) to out. */
static int append_key(pql_buf *out, const char *group, int32_t partition, const char *tag,
                      const char *name, size_t len)
{
    if (pql_buf_printf(out, "pql:{%s:%d}:%s", group, (int)partition, tag) < 0) return -1;
    return pql_buf_append(out, name, len);
}

void pql_store_account_key(pql_buf *out, const char *group, int32_t partition, const char *account,
                           size_t account_len)
{
    append_key(out, group, partition, "a:", account, account_len);
}

/* Braces in the group would move the hash tag. */
static int bad_group(const char *group)
{
    return !group || strpbrk(group, "{}") != NULL;
}

static int parse_i64(const redisReply *r, int64_t *out)
{
    char tmp[24], *end;
    if (r->type == REDIS_REPLY_INTEGER) return *out = r->integer, 0;
    if (r->type != REDIS_REPLY_STRING || r->len == 0 || r->len > 20) return -1;
    memcpy(tmp, r->str, r->len);
    tmp[r->len] = '\0';
    *out = strtoll(tmp, &end, 10);
    return *end ? -1 : 0;
}

/* ---- claim ------------------------------------------------------------------- */

/* Checks the EXEC reply [epoch, seq|nil, [off|nil …]] and fills out. */
static int parse_claim(const redisReply *r, size_t ntopics, pql_claim *out)
{
    if (r->type != REDIS_REPLY_ARRAY || r->elements != (ntopics ? 3u : 2u)) return -1;
    const redisReply *seq = r->element[1], *offs = ntopics ? r->element[2] : NULL;
    out->seq = 0;
    if (parse_i64(r->element[0], &out->epoch) ||
        (seq->type != REDIS_REPLY_NIL && parse_i64(seq, &out->seq)))
        return -1;
    if (offs && (offs->type != REDIS_REPLY_ARRAY || offs->elements != ntopics)) return -1;
    for (size_t i = 0; i < 4; i++) {
        out->offsets[i] = -1;
        const redisReply *o = i < ntopics ? offs->element[i] : NULL;
        if (o && o->type != REDIS_REPLY_NIL && parse_i64(o, &out->offsets[i])) return -1;
    }
    return 0;
}

pql_err pql_store_claim(pql_store *s, const char *group, int32_t partition,
                        const char *const *topics, size_t ntopics, pql_claim *out, char *errstr,
                        size_t errstr_size)
{
    if (ntopics > 4 || bad_group(group))
        return fail(s, errstr, errstr_size, PQL_ERR_ARG,
                    "claim: at most 4 topics, and no '{' or '}' in the group name");
    pql_buf *k = &s->scratch; /* the meta key, then the "off:<topic>" fields */
    size_t offs[5];
    pql_buf_reset(k);
    int oom = append_key(k, group, partition, "meta", "", 0);
    offs[0] = k->len;
    for (size_t i = 0; i < ntopics; i++) {
        oom |= pql_buf_printf(k, "off:%s", topics[i]);
        offs[i + 1] = k->len;
    }
    if (oom) return fail(s, errstr, errstr_size, PQL_ERR_NOMEM, "claim: out of memory");
    pql_err err = store_connect(s, errstr, errstr_size);
    if (err) return err;
    const char *av[6] = {"HINCRBY", k->data, "epoch", "1"};
    size_t al[6] = {7, offs[0], 5, 1};
    redisAppendCommand(s->ctx, "MULTI");
    redisAppendCommandArgv(s->ctx, 4, av, al);
    av[0] = "HGET", al[0] = 4, av[2] = "seq", al[2] = 3;
    redisAppendCommandArgv(s->ctx, 3, av, al);
    av[0] = "HMGET", al[0] = 5;
    for (size_t i = 0; i < ntopics; i++)
        av[2 + i] = k->data + offs[i], al[2 + i] = offs[i + 1] - offs[i];
    if (ntopics) redisAppendCommandArgv(s->ctx, 2 + (int)ntopics, av, al);
    redisAppendCommand(s->ctx, "EXEC");
    int ncmd = ntopics ? 5 : 4;
    s->round_trips++;
    s->commands += (uint64_t)ncmd;
    redisReply *r = NULL;
    for (int i = 0; i < ncmd; i++) {
        freeReplyObject(r);
        if (!(r = get_reply(s))) return io_fail(s, errstr, errstr_size, "claim");
    }
    if (parse_claim(r, ntopics, out))
        err = fail(s, errstr, errstr_size, PQL_ERR_IO, "redis %s: claim %s:%d: bad reply %s",
                   s->where, group, (int)partition, r->type == REDIS_REPLY_ERROR ? r->str : "");
    freeReplyObject(r);
    return err;
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
    if (append_key(k, group, partition, "outbox", "", 0))
        return fail(s, errstr, errstr_size, PQL_ERR_NOMEM, "outbox scan: out of memory");
    do { /* HSCAN, not HGETALL: a large outbox must not block the server */
        const char *av[5] = {"HSCAN", k->data, cursor, "COUNT", "1000"};
        size_t al[5] = {5, k->len, strlen(cursor), 5, 4};
        pql_err err;
        redisReply *r = command(s, 5, av, al, "HSCAN outbox", &err, errstr, errstr_size);
        if (!r) return err;
        const redisReply *c = r->elements == 2 ? r->element[0] : NULL;
        const redisReply *kv = c ? r->element[1] : NULL;
        if (r->type != REDIS_REPLY_ARRAY || !c || c->type != REDIS_REPLY_STRING ||
            c->len >= sizeof cursor || kv->type != REDIS_REPLY_ARRAY || kv->elements % 2) {
            freeReplyObject(r);
            return fail(s, errstr, errstr_size, PQL_ERR_IO, "redis %s: HSCAN: bad reply", s->where);
        }
        memcpy(cursor, c->str, c->len + 1);
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

/* Appends `cmd` pql:{<group>:<partition>}:<kind><name> to the pipeline (no
 * reply read): the one-key reads that tools and the prefetch pipeline. */
static pql_err append_key_command(pql_store *s, const char *cmd, const char *group,
                                  int32_t partition, const char *kind, const char *name, size_t len,
                                  char *errstr, size_t errstr_size)
{
    pql_buf_reset(&s->scratch); /* hiredis copies the arguments at append */
    if (append_key(&s->scratch, group, partition, kind, name, len))
        return io_fail(s, errstr, errstr_size, "out of memory");
    const char *av[2] = {cmd, s->scratch.data};
    size_t al[2] = {strlen(cmd), s->scratch.len};
    if (redisAppendCommandArgv(s->ctx, 2, av, al) != REDIS_OK)
        return io_fail(s, errstr, errstr_size, cmd);
    return PQL_OK;
}

pql_err pql_store_load_accounts(pql_store *s, const char *group, const int32_t *partitions,
                                const char *const *ids, const size_t *id_lens, size_t n,
                                void (*fn)(void *opaque, size_t i, const char *field,
                                           size_t field_len, const char *value, size_t value_len),
                                void *opaque, char *errstr, size_t errstr_size)
{
    pql_err err = n ? store_connect(s, errstr, errstr_size) : PQL_OK;
    if (n == 0 || err) return err;
    for (size_t i = 0; i < n; i++)
        if ((err = append_key_command(s, "HGETALL", group, partitions[i], "a:", ids[i], id_lens[i],
                                      errstr, errstr_size)))
            return err;
    s->round_trips++;
    s->commands += n;
    for (size_t i = 0; i < n; i++) {
        redisReply *r = get_reply(s);
        if (!r) return io_fail(s, errstr, errstr_size, "HGETALL");
        if (!is_flat_pairs(r)) /* keep reading: the pipeline stays in step */
            err = fail(s, errstr, errstr_size, PQL_ERR_IO, "redis %s: HGETALL account %zu: %s",
                       s->where, i, r->type == REDIS_REPLY_ERROR ? r->str : "bad reply");
        for (size_t j = 0; !err && j < r->elements; j += 2)
            fn(opaque, i, r->element[j]->str, r->element[j]->len, r->element[j + 1]->str,
               r->element[j + 1]->len);
        freeReplyObject(r);
    }
    return err;
}

pql_err pql_store_find_account(pql_store *s, const char *group, const char *account,
                               int32_t max_partitions, int32_t *partition, char *errstr,
                               size_t errstr_size)
{
    pql_err err = store_connect(s, errstr, errstr_size);
    *partition = -1;
    if (err) return err;
    for (int32_t p = 0; p < max_partitions; p++)
        if ((err = append_key_command(s, "EXISTS", group, p, "a:", account, strlen(account), errstr,
                                      errstr_size)))
            return err;
    s->round_trips++;
    s->commands += (uint64_t)max_partitions;
    for (int32_t p = 0; p < max_partitions; p++) {
        redisReply *r = get_reply(s);
        if (!r) return io_fail(s, errstr, errstr_size, "EXISTS");
        if (r->type == REDIS_REPLY_ERROR && !err)
            err =
                fail(s, errstr, errstr_size, PQL_ERR_IO, "redis %s: EXISTS: %s", s->where, r->str);
        else if (r->type == REDIS_REPLY_INTEGER && r->integer > 0 && *partition < 0)
            *partition = p;
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
    if (append_key(k, group, partition, "c:", name, strlen(name)))
        return fail(s, errstr, errstr_size, PQL_ERR_NOMEM, "counters: out of memory");
    const char *av[2] = {"HGETALL", k->data};
    size_t al[2] = {7, k->len};
    pql_err err;
    redisReply *r = command(s, 2, av, al, "HGETALL counters", &err, errstr, errstr_size);
    if (!r) return err;
    int bad = !is_flat_pairs(r);
    for (size_t j = 0; !bad && j < r->elements; j += 2) {
        int64_t v;
        if (!(bad = parse_i64(r->element[j + 1], &v)))
            fn(opaque, r->element[j]->str, r->element[j]->len, v);
    }
    freeReplyObject(r);
    if (bad)
        return fail(s, errstr, errstr_size, PQL_ERR_IO, "redis %s: counters %s: bad reply",
                    s->where, name);
    return PQL_OK;
}

pql_err pql_store_read_counters(pql_store *s, const char *group, size_t n,
                                const int32_t *partitions, const char *const *names,
                                void (*fn)(void *opaque, size_t i, const char *field,
                                           size_t field_len, int64_t value),
                                void *opaque, char *errstr, size_t errstr_size)
{
    pql_err err = n ? store_connect(s, errstr, errstr_size) : PQL_OK;
    if (n == 0 || err) return err;
    for (size_t i = 0; i < n; i++)
        if ((err = append_key_command(s, "HGETALL", group, partitions[i], "c:", names[i],
                                      strlen(names[i]), errstr, errstr_size)))
            return err;
    s->round_trips++;
    s->commands += n;
    for (size_t i = 0; i < n; i++) {
        redisReply *r = get_reply(s);
        if (!r) return io_fail(s, errstr, errstr_size, "HGETALL counters");
        if (!is_flat_pairs(r)) /* keep reading: the pipeline stays in step */
            err = fail(s, errstr, errstr_size, PQL_ERR_IO, "redis %s: HGETALL counters %s: %s",
                       s->where, names[i], r->type == REDIS_REPLY_ERROR ? r->str : "bad reply");
        for (size_t j = 0; !err && j < r->elements; j += 2) {
            int64_t v;
            if (!parse_i64(r->element[j + 1], &v))
                fn(opaque, i, r->element[j]->str, r->element[j]->len, v);
        }
        freeReplyObject(r);
    }
    return err;
}

pql_err pql_store_epoch(pql_store *s, const char *group, int32_t partition, int64_t *epoch,
                        char *errstr, size_t errstr_size)
{
    pql_buf *k = &s->scratch;
    pql_buf_reset(k);
    if (append_key(k, group, partition, "meta", "", 0))
        return fail(s, errstr, errstr_size, PQL_ERR_NOMEM, "epoch: out of memory");
    const char *av[3] = {"HGET", k->data, "epoch"};
    size_t al[3] = {4, k->len, 5};
    pql_err err;
    redisReply *r = command(s, 3, av, al, "HGET epoch", &err, errstr, errstr_size);
    if (!r) return err;
    *epoch = 0;
    if (r->type != REDIS_REPLY_NIL && parse_i64(r, epoch))
        err = fail(s, errstr, errstr_size, PQL_ERR_IO, "redis %s: epoch: bad reply", s->where);
    freeReplyObject(r);
    return err;
}

pql_err pql_store_partitions(pql_store *s, const char *group, int32_t *count, char *errstr,
                             size_t errstr_size)
{
    pql_buf pattern = {0}, prefix = {0};
    char cursor[32] = "0";
    pql_err err = PQL_OK;
    *count = 0;
    /* pql:{<group>:*}:meta, the group's glob characters escaped */
    int oom = pql_buf_append(&pattern, "pql:{", 5) | pql_buf_printf(&prefix, "pql:{%s:", group);
    for (const char *g = group; *g; g++) {
        if (strchr("*?[]\\", *g)) oom |= pql_buf_append(&pattern, "\\", 1);
        oom |= pql_buf_append(&pattern, g, 1);
    }
    oom |= pql_buf_append(&pattern, ":*}:meta", 8);
    if (oom) err = fail(s, errstr, errstr_size, PQL_ERR_NOMEM, "partitions: out of memory");
    while (!err) {
        const char *av[6] = {"SCAN", cursor, "MATCH", pattern.data, "COUNT", "1000"};
        size_t al[6] = {4, strlen(cursor), 5, pattern.len, 5, 4};
        redisReply *r = command(s, 6, av, al, "SCAN", &err, errstr, errstr_size);
        if (!r) break;
        const redisReply *c = r->elements == 2 ? r->element[0] : NULL;
        const redisReply *keys = c ? r->element[1] : NULL;
        if (r->type != REDIS_REPLY_ARRAY || !c || c->type != REDIS_REPLY_STRING ||
            c->len >= sizeof cursor || keys->type != REDIS_REPLY_ARRAY) {
            freeReplyObject(r);
            err = fail(s, errstr, errstr_size, PQL_ERR_IO, "redis %s: SCAN: bad reply", s->where);
            break;
        }
        memcpy(cursor, c->str, c->len + 1);
        for (size_t i = 0; i < keys->elements; i++) {
            const redisReply *k = keys->element[i];
            char *end;
            if (k->type != REDIS_REPLY_STRING || k->len <= prefix.len ||
                memcmp(k->str, prefix.data, prefix.len))
                continue;
            long p = strtol(k->str + prefix.len, &end, 10);
            if (!strcmp(end, "}:meta") && p >= 0 && p < INT32_MAX && p + 1 > *count)
                *count = (int32_t)p + 1;
        }
        freeReplyObject(r);
        if (!strcmp(cursor, "0")) break;
    }
    pql_buf_free(&pattern);
    pql_buf_free(&prefix);
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
static void put(pql_store_batch *b, span *out, const void *p, size_t len)
{
    out->off = b->bytes.len;
    out->len = len;
    if (pql_buf_append(&b->bytes, p, len)) b->err = PQL_ERR_NOMEM;
}

static void put_int(pql_store_batch *b, span *out, long long v)
{
    char tmp[PQL_I64_MAX_DIGITS + 1];
    put(b, out, tmp, pql_fmt_i64(tmp, (int64_t)v));
}

/* Appends prefix + tag + name as one span. */
static void put_key(pql_store_batch *b, span *out, const char *tag, const void *name, size_t len)
{
    span unused;
    put(b, out, b->prefix.data, b->prefix.len);
    put(b, &unused, tag, strlen(tag));
    put(b, &unused, name, len);
    out->len = b->bytes.len - out->off;
}

#define PUSH_OR_FAIL(vec, out)                                                                     \
    do {                                                                                           \
        VEC_PUSH(vec, out);                                                                        \
        if (!(out)) return b->err = PQL_ERR_NOMEM;                                                 \
    } while (0)

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
    b->why[0] = '\0';
    if (bad_group(group))
        b->err = PQL_ERR_ARG;
    else if (append_key(&b->prefix, group, partition, "", "", 0))
        b->err = PQL_ERR_NOMEM;
    put_key(b, &b->meta_key, "meta", "", 0);
    put_key(b, &b->outbox_key, "outbox", "", 0);
}

pql_err pql_store_batch_account(pql_store_batch *b, const char *id, size_t id_len, int64_t ttl_ms)
{
    acct_rec *a;
    PUSH_OR_FAIL(b->accts, a);
    a->ttl_ms = ttl_ms;
    a->first = b->ops.n;
    a->nops = 0;
    put_key(b, &a->key, "a:", id, id_len);
    return b->err;
}

static pql_err account_op(pql_store_batch *b, const char *field, size_t field_len,
                          const char *value, size_t value_len, int del)
{
    op_rec *o;
    if (b->accts.n == 0) return PQL_ERR_ARG; /* no pql_store_batch_account() yet */
    PUSH_OR_FAIL(b->ops, o);
    o->del = del;
    put(b, &o->field, field, field_len);
    put(b, &o->value, value, del ? 0 : value_len);
    b->accts.v[b->accts.n - 1].nops++;
    return b->err;
}

pql_err pql_store_batch_hset(pql_store_batch *b, const char *field, size_t field_len,
                             const char *value, size_t value_len)
{
    return account_op(b, field, field_len, value, value_len, 0);
}

pql_err pql_store_batch_hdel(pql_store_batch *b, const char *field, size_t field_len)
{
    return account_op(b, field, field_len, "", 0, 1);
}

pql_err pql_store_batch_offset(pql_store_batch *b, const char *topic, int64_t next_offset)
{
    pair *p;
    span t;
    PUSH_OR_FAIL(b->offs, p);
    put(b, &p->k, "off:", 4);
    put(b, &t, topic, strlen(topic));
    p->k.len += t.len;
    put_int(b, &p->v, next_offset);
    return b->err;
}

pql_err pql_store_batch_outbox_put(pql_store_batch *b, const char *id, const void *payload,
                                   size_t payload_len)
{
    pair *p;
    PUSH_OR_FAIL(b->puts, p);
    put(b, &p->k, id, strlen(id));
    put(b, &p->v, payload, payload_len);
    return b->err;
}

pql_err pql_store_batch_outbox_del(pql_store_batch *b, const char *id)
{
    span *d;
    PUSH_OR_FAIL(b->dels, d);
    put(b, d, id, strlen(id));
    return b->err;
}

/* @returns the index of counter hash `name`, added if new; SIZE_MAX when out of memory. */
static size_t find_counter(pql_store_batch *b, const char *name)
{
    size_t len = strlen(name);
    for (size_t k = 0; k < b->ctrs.n; k++) {
        size_t i = (b->last_ctr + k) % b->ctrs.n; /* the last one used first */
        const ctr_rec *c = &b->ctrs.v[i];
        if (c->name.len == len && memcmp(b->bytes.data + c->name.off, name, len) == 0)
            return b->last_ctr = i;
    }
    ctr_rec *c;
    VEC_PUSH(b->ctrs, c);
    if (!c) return SIZE_MAX;
    put_key(b, &c->key, "c:", name, len);
    c->name.off = c->key.off + c->key.len - len;
    c->name.len = len;
    c->n = 0;
    c->head = c->tail = NO_NEXT;
    return b->last_ctr = b->ctrs.n - 1;
}

pql_err pql_store_batch_incr(pql_store_batch *b, const char *name, const char *field, int64_t delta)
{
    incr_rec *r;
    size_t ci = find_counter(b, name);
    if (ci == SIZE_MAX) return b->err = PQL_ERR_NOMEM;
    PUSH_OR_FAIL(b->incrs, r);
    put(b, &r->field, field, strlen(field));
    put_int(b, &r->delta, delta);
    r->next = NO_NEXT;
    ctr_rec *c = &b->ctrs.v[ci];
    size_t ri = b->incrs.n - 1;
    if (c->n++ == 0)
        c->head = ri;
    else
        b->incrs.v[c->tail].next = ri;
    c->tail = ri;
    return b->err;
}

const char *pql_store_batch_refusal(const pql_store_batch *b)
{
    return b->why;
}

int pql_store_batch_empty(const pql_store_batch *b)
{
    return b->offs.n == 0 && b->puts.n == 0 && b->dels.n == 0 && b->incrs.n == 0 && b->ops.n == 0;
}

/* ---- commit ------------------------------------------------------------------ */

static void arg(pql_store *s, span sp)
{
    span *a;
    VEC_PUSH(s->args, a);
    if (a)
        *a = sp;
    else
        s->args_oom = 1;
}

static void arg_int(pql_store *s, pql_store_batch *b, long long v)
{
    span sp;
    put_int(b, &sp, v);
    arg(s, sp);
}

/* Appends "<type><n>\r\n" to o, after emptying it when `first`.
 * @returns 0, or -1 when out of memory. */
static int resp_head(pql_buf *o, char type, size_t n, int first)
{
    char head[PQL_I64_MAX_DIGITS + 4];
    head[0] = type;
    size_t len = 1 + pql_fmt_i64(head + 1, (int64_t)n);
    head[len++] = '\r';
    head[len++] = '\n';
    if (first) o->len = 0;
    return pql_buf_append(o, head, len);
}

/* Builds the EVALSHA of `b` in s->resp (numbers are appended to b->bytes; the
 * caller truncates them away after sending).  @returns argc, or -1 (no memory). */
static int build(pql_store *s, pql_store_batch *b)
{
    span sp;
    s->args.n = 0;
    s->args_oom = 0;
    put(b, &sp, "EVALSHA", 7);
    arg(s, sp);
    put(b, &sp, s->sha, 40);
    arg(s, sp);
    arg_int(s, b, (long long)(2 + b->ctrs.n + b->accts.n));
    arg(s, b->meta_key);
    arg(s, b->outbox_key);
    for (size_t i = 0; i < b->ctrs.n; i++)
        arg(s, b->ctrs.v[i].key);
    for (size_t i = 0; i < b->accts.n; i++)
        arg(s, b->accts.v[i].key);
    long long head[7] = {b->epoch,
                         b->seq,
                         (long long)b->ctrs.n,
                         (long long)b->accts.n,
                         (long long)b->offs.n,
                         (long long)b->puts.n,
                         (long long)b->dels.n};
    for (size_t i = 0; i < 7; i++)
        arg_int(s, b, head[i]);
    for (size_t i = 0; i < b->offs.n; i++)
        arg(s, b->offs.v[i].k), arg(s, b->offs.v[i].v);
    for (size_t i = 0; i < b->puts.n; i++)
        arg(s, b->puts.v[i].k), arg(s, b->puts.v[i].v);
    for (size_t i = 0; i < b->dels.n; i++)
        arg(s, b->dels.v[i]);
    for (size_t i = 0; i < b->ctrs.n; i++) {
        arg_int(s, b, (long long)b->ctrs.v[i].n);
        for (size_t r = b->ctrs.v[i].head; r != NO_NEXT; r = b->incrs.v[r].next)
            arg(s, b->incrs.v[r].field), arg(s, b->incrs.v[r].delta);
    }
    for (size_t i = 0; i < b->accts.n; i++) {
        const acct_rec *a = &b->accts.v[i];
        const op_rec *ops = b->ops.v + a->first;
        size_t nruns = 0;
        for (size_t j = 0; j < a->nops; j++)
            nruns += j == 0 || ops[j].del != ops[j - 1].del;
        arg_int(s, b, a->ttl_ms);
        arg_int(s, b, (long long)nruns);
        for (size_t j = 0, e; j < a->nops; j = e) { /* a run: ops of one kind */
            for (e = j; e < a->nops && ops[e].del == ops[j].del; e++)
                ;
            arg_int(s, b, ops[j].del ? -(long long)(e - j) : (long long)(e - j));
            for (size_t o = j; o < e; o++) {
                arg(s, ops[o].field);
                if (!ops[o].del) arg(s, ops[o].value);
            }
        }
    }
    if (s->args_oom || b->err || s->args.n > INT_MAX) return -1;
    /* RESP, as redisAppendCommandArgv would write it, without its
       printf-style formatting of every length (a tenth of a profile) */
    int rc = resp_head(&s->resp, '*', s->args.n, 1);
    for (size_t i = 0; i < s->args.n; i++) {
        rc |= resp_head(&s->resp, '$', s->args.v[i].len, 0);
        rc |= pql_buf_append(&s->resp, b->bytes.data + s->args.v[i].off, s->args.v[i].len);
        rc |= pql_buf_append(&s->resp, "\r\n", 2);
    }
    return rc < 0 ? -1 : (int)s->args.n;
}

/* What a refusal by the script means (store.lua), from the text after
 * "FENCED ": "epoch <stored> is not ours (<ours>)" with a stored epoch above
 * ours is another member's claim (PQL_ERR_FENCED).  A stored epoch that is
 * missing or below ours, or "seq <stored> expected <ours>" (the epoch is
 * ours, so nobody claimed since), means Redis went back in time: restarted
 * without writes it had acknowledged (AOF everysec, a failover to a lagging
 * replica).  Our claim stands; the partition must be claimed again and read
 * from the offsets Redis now holds (PQL_ERR_REWOUND). */
static pql_err fence_kind(const char *why, int64_t our_epoch)
{
    if (strncmp(why, "seq ", 4) == 0) return PQL_ERR_REWOUND;
    if (strncmp(why, "epoch ", 6) != 0) return PQL_ERR_FENCED;
    why += 6;
    if (strncmp(why, "none ", 5) == 0) return PQL_ERR_REWOUND;
    char *end;
    long long stored = strtoll(why, &end, 10);
    if (end == why) return PQL_ERR_FENCED;
    return stored < our_epoch ? PQL_ERR_REWOUND : PQL_ERR_FENCED;
}

/* Maps one EVALSHA reply; @returns 1 on NOSCRIPT (run it again), else 0. */
static int map_reply(pql_store *s, pql_store_batch *b, const redisReply *r, pql_err *result,
                     char *errstr, size_t size)
{
    b->why[0] = '\0';
    if (r->type != REDIS_REPLY_ERROR) {
        *result = r->type == REDIS_REPLY_INTEGER ? PQL_OK : PQL_ERR_IO;
        return 0;
    }
    if (strncmp(r->str, "NOSCRIPT", 8) == 0) return 1;
    const char *f = strstr(r->str, "FENCED ");
    pql_err code = f && (f == r->str || f == r->str + 4) ? fence_kind(f + 7, b->epoch) : PQL_ERR_IO;
    snprintf(b->why, sizeof b->why, "redis %s: %.*s: %s", s->where, (int)b->meta_key.len,
             b->bytes.data + b->meta_key.off, r->str);
    *result = fail(s, errstr, size, code, "%s", b->why);
    return 0;
}

pql_err pql_store_commit(pql_store *s, pql_store_batch *const *batches, size_t n, pql_err *results,
                         char *errstr, size_t errstr_size)
{
    if (n > s->pending_cap) {
        unsigned char *p = vec_grow(s->pending, &s->pending_cap, n, 1);
        if (!p) {
            for (size_t i = 0; i < n; i++)
                results[i] = PQL_ERR_NOMEM;
            return fail(s, errstr, errstr_size, PQL_ERR_NOMEM, "commit: out of memory");
        }
        s->pending = p;
    }
    for (size_t i = 0; i < n; i++) {
        results[i] = batches[i]->err ? batches[i]->err : PQL_ERR_IO;
        s->pending[i] = batches[i]->err == PQL_OK;
    }
    for (int attempt = 0; attempt < 2; attempt++) {
        size_t sent = 0, noscript = 0, unsent = 0;
        for (size_t i = 0; i < n; i++) {
            if (!s->pending[i]) continue;
            pql_err err = store_connect(s, errstr, errstr_size);
            if (err) return err;
            pql_store_batch *b = batches[i];
            size_t mark = b->bytes.len;
            int argc = build(s, b);
            int ok = argc >= 0 &&
                     redisAppendFormattedCommand(s->ctx, s->resp.data, s->resp.len) == REDIS_OK;
            /* Send as we go: Redis runs the first scripts while the next
               are built, instead of idling until the whole pipeline is
               formatted.  (Blocking: at worst this waits for Redis to read,
               which it does while running what it has.) */
            unsent += ok ? s->resp.len : 0;
            if (ok && unsent >= SEND_CHUNK) {
                int done;
                if (redisBufferWrite(s->ctx, &done) != REDIS_OK)
                    return io_fail(s, errstr, errstr_size, "EVALSHA");
                unsent = 0;
            }
            b->bytes.len = mark;
            b->err = PQL_OK; /* only the numbers appended by build() can have failed */
            if (argc < 0) {
                results[i] = fail(s, errstr, errstr_size, PQL_ERR_NOMEM, "commit: out of memory");
                s->pending[i] = 0;
            } else if (!ok) {
                return io_fail(s, errstr, errstr_size, "EVALSHA");
            }
            sent += ok;
        }
        if (sent == 0) return PQL_OK;
        s->round_trips++;
        s->commands += sent;
        for (size_t i = 0; i < n; i++) {
            if (!s->pending[i]) continue;
            redisReply *r = get_reply(s);
            if (!r) return io_fail(s, errstr, errstr_size, "EVALSHA");
            int again = map_reply(s, batches[i], r, &results[i], errstr, errstr_size);
            freeReplyObject(r);
            noscript += again;
            s->pending[i] = (unsigned char)again;
        }
        if (noscript == 0) return PQL_OK;
        pql_err err = attempt == 0 ? load_script(s, errstr, errstr_size) : PQL_OK;
        if (err) return err;
    }
    return fail(s, errstr, errstr_size, PQL_OK, "redis %s: NOSCRIPT after SCRIPT LOAD", s->where);
}
