/* test_store.c — store.c and redis_child.c against a real, private redis-server.
 *
 * Every test starts its own server (pql_redis_child, fresh mkdtemp directory)
 * and opens a store on it; `raw()` is a plain hiredis connection to look at
 * what the store wrote. */
#include "redis_child.h"
#include "store.h"

#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <ftw.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define G "grp"

static char dir[64];
static pql_redis_child *redis;
static pql_store *st;
static redisContext *raw_ctx;
static char err[512];

static void start(int appendonly)
{
    signal(SIGPIPE, SIG_IGN);
    strcpy(dir, "/tmp/pql-test-store-XXXXXX");
    cr_assert(mkdtemp(dir), "mkdtemp");
    pql_redis_child_opts o = {.dir = dir, .appendonly = appendonly};
    redis = pql_redis_child_start(&o, err, sizeof err);
    cr_assert(redis, "redis_child_start: %s", err);
    st = pql_store_open(pql_redis_child_url(redis), 2000, err, sizeof err);
    cr_assert(st, "store_open: %s", err);
}

static void setup(void)
{
    start(0);
}

static void setup_aof(void)
{
    start(1);
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}

static void teardown(void)
{
    if (raw_ctx) redisFree(raw_ctx);
    raw_ctx = NULL;
    pql_store_close(st);
    pql_redis_child_stop(redis);
    nftw(dir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
}

/* A command on a plain connection (reconnected when broken); caller frees. */
static redisReply *raw(const char *fmt, ...)
{
    if (raw_ctx && raw_ctx->err) redisFree(raw_ctx), raw_ctx = NULL;
    if (!raw_ctx) {
        char sock[128];
        snprintf(sock, sizeof sock, "%s/redis.sock", dir);
        raw_ctx = redisConnectUnix(sock);
        cr_assert(raw_ctx && !raw_ctx->err, "raw connect");
    }
    va_list ap;
    va_start(ap, fmt);
    redisReply *r = redisvCommand(raw_ctx, fmt, ap);
    va_end(ap);
    cr_assert(r, "raw command failed");
    return r;
}

static long long raw_int(const char *fmt, const char *key)
{
    redisReply *r = raw(fmt, key);
    cr_assert_eq(r->type, REDIS_REPLY_INTEGER, "%s %s: type %d", fmt, key, r->type);
    long long v = r->integer;
    freeReplyObject(r);
    return v;
}

/* HGET as a string ("" for nil) in a static buffer. */
static const char *raw_hget(const char *key, const char *field)
{
    static char out[256];
    redisReply *r = raw("HGET %s %s", key, field);
    snprintf(out, sizeof out, "%s", r->type == REDIS_REPLY_STRING ? r->str : "");
    freeReplyObject(r);
    return out;
}

static pql_claim claim(int32_t p)
{
    const char *topics[2] = {"events", "traits"};
    pql_claim c;
    cr_assert_eq(pql_store_claim(st, G, p, topics, 2, &c, err, sizeof err), PQL_OK, "%s", err);
    return c;
}

static pql_err commit1(pql_store_batch *b)
{
    pql_err res = PQL_ERR_ARG;
    cr_assert_eq(pql_store_commit(st, &b, 1, &res, err, sizeof err), PQL_OK, "%s", err);
    return res;
}

static void hset(pql_store_batch *b, const char *f, const char *v)
{
    cr_assert_eq(pql_store_batch_hset(b, f, strlen(f), v, strlen(v)), PQL_OK);
}

static void counter_cb(void *opaque, const char *field, size_t len, int64_t value)
{
    pql_buf *out = opaque;
    pql_buf_printf(out, "%.*s=%lld;", (int)len, field, (long long)value);
}

static const char *counters(int32_t p, const char *name)
{
    static pql_buf out;
    pql_buf_reset(&out);
    pql_buf_append(&out, "", 0);
    cr_assert_eq(pql_store_counters(st, G, p, name, counter_cb, &out, err, sizeof err), PQL_OK);
    return out.data;
}

TestSuite(store, .init = setup, .fini = teardown);
TestSuite(store_aof, .init = setup_aof, .fini = teardown);

Test(store, claim_bumps_epoch_and_returns_offsets)
{
    for (int64_t e = 1; e <= 3; e++) {
        pql_claim c = claim(0);
        cr_assert_eq(c.epoch, e);
        cr_assert_eq(c.seq, 0);
        for (int i = 0; i < 4; i++)
            cr_assert_eq(c.offsets[i], -1);
    }
    pql_store_batch *b = pql_store_batch_new();
    pql_store_batch_begin(b, G, 0, 3, 0);
    cr_assert(pql_store_batch_empty(b));
    pql_store_batch_offset(b, "traits", 1234567890123LL);
    cr_assert(!pql_store_batch_empty(b));
    cr_assert_eq(commit1(b), PQL_OK);
    pql_claim c = claim(0);
    cr_assert_eq(c.epoch, 4);
    cr_assert_eq(c.seq, 1);
    cr_assert_eq(c.offsets[0], -1);
    cr_assert_eq(c.offsets[1], 1234567890123LL);
    pql_store_batch_destroy(b);
}

Test(store, batch_writes_everything)
{
    redisReply *r = raw("HSET pql:{" G ":1}:a:acc1 old 1 keep 2");
    freeReplyObject(r);
    freeReplyObject(raw("HSET pql:{" G ":1}:outbox gone x"));
    pql_claim c = claim(1);
    pql_store_batch *b = pql_store_batch_new();
    pql_store_batch_begin(b, G, 1, c.epoch, c.seq);
    cr_assert_eq(pql_store_batch_hset(b, "x", 1, "y", 1), PQL_ERR_ARG); /* no account yet */
    cr_assert_eq(pql_store_batch_account(b, "acc1", 4, 60000), PQL_OK);
    hset(b, "f1", "v1");
    hset(b, "f2", "v2");
    pql_store_batch_hdel(b, "old", 3);
    hset(b, "later", "x"); /* set then deleted: gone */
    pql_store_batch_hdel(b, "later", 5);
    pql_store_batch_hdel(b, "back", 4); /* deleted then set: there */
    hset(b, "back", "yes");
    pql_store_batch_account(b, "acc2", 4, 0);
    hset(b, "a", "b");
    pql_store_batch_account(b, "acc3", 4, 5000); /* only deletes: no TTL */
    freeReplyObject(raw("HSET pql:{" G ":1}:a:acc3 d 1 e 2"));
    pql_store_batch_hdel(b, "d", 1);
    pql_store_batch_offset(b, "events", 100);
    pql_store_batch_outbox_put(b, "alert-1", "payload\0x", 9);
    pql_store_batch_outbox_del(b, "gone");
    pql_store_batch_incr(b, "metrics", "signups", 2);
    pql_store_batch_incr(b, "other", "a", 5);
    pql_store_batch_incr(b, "metrics", "pqls", 1);
    pql_store_batch_incr(b, "metrics", "signups", 3);
    pql_store_batch_incr(b, "other", "b", -4);
    cr_assert_eq(commit1(b), PQL_OK);

    const char *k1 = "pql:{" G ":1}:a:acc1";
    cr_assert_str_eq(raw_hget(k1, "f1"), "v1");
    cr_assert_str_eq(raw_hget(k1, "f2"), "v2");
    cr_assert_str_eq(raw_hget(k1, "keep"), "2");
    cr_assert_str_eq(raw_hget(k1, "back"), "yes");
    cr_assert_eq(raw_int("HLEN %s", k1), 4); /* f1 f2 keep back */
    long long ttl = raw_int("PTTL %s", k1);
    cr_assert(ttl > 0 && ttl <= 60000, "PTTL %lld", ttl);
    cr_assert_eq(raw_int("PTTL %s", "pql:{" G ":1}:a:acc2"), -1);
    cr_assert_eq(raw_int("PTTL %s", "pql:{" G ":1}:a:acc3"), -1);
    cr_assert_eq(raw_int("HLEN %s", "pql:{" G ":1}:a:acc3"), 1);
    cr_assert_str_eq(raw_hget("pql:{" G ":1}:meta", "off:events"), "100");
    cr_assert_str_eq(raw_hget("pql:{" G ":1}:meta", "seq"), "1");
    r = raw("HGET pql:{" G ":1}:outbox alert-1");
    cr_assert_eq(r->len, 9);
    cr_assert(memcmp(r->str, "payload\0x", 9) == 0);
    freeReplyObject(r);
    cr_assert_eq(raw_int("HEXISTS %s gone", "pql:{" G ":1}:outbox"), 0);
    const char *m = counters(1, "metrics");
    cr_assert(strstr(m, "signups=5;") && strstr(m, "pqls=1;"), "%s", m);
    m = counters(1, "other");
    cr_assert(strstr(m, "a=5;") && strstr(m, "b=-4;"), "%s", m);
    pql_store_batch_destroy(b);
}

/* Many deltas to one counter hash in one batch add up exactly: 4,500 fields
 * (9,000 deltas, past what one unpack() in the script could take), each
 * twice, some already stored, one brought back to 0, one far past 32 bits. */
Test(store, many_counter_deltas_in_one_hash_add_up_exactly)
{
    enum { N = 4500 };
    freeReplyObject(raw("HSET pql:{" G ":2}:c:wide f7 100 f4499 -3 f10 10"));
    pql_claim c = claim(2);
    pql_store_batch *b = pql_store_batch_new();
    pql_store_batch_begin(b, G, 2, c.epoch, c.seq);
    char f[16];
    for (int round = 0; round < 2; round++)
        for (int i = 0; i < N; i++) {
            snprintf(f, sizeof f, "f%d", i);
            int64_t d = i == 10 ? -5 : i == 11 ? 2000000000000LL : i % 7 - 3;
            cr_assert_eq(pql_store_batch_incr(b, "wide", f, d), PQL_OK);
        }
    cr_assert_eq(commit1(b), PQL_OK);
    pql_store_batch_destroy(b);
    cr_assert_eq(raw_int("HLEN %s", "pql:{" G ":2}:c:wide"), N);
    for (int i = 0; i < N; i++) {
        snprintf(f, sizeof f, "f%d", i);
        long long want = i == 10 ? 0 : i == 11 ? 4000000000000LL : 2 * (i % 7 - 3);
        if (i == 7) want += 100;
        if (i == N - 1) want -= 3;
        redisReply *r = raw("HGET pql:{" G ":2}:c:wide %s", f);
        cr_assert(r->type == REDIS_REPLY_STRING, "%s missing", f);
        cr_assert_eq(atoll(r->str), want, "%s = %s, want %lld", f, r->str, want);
        freeReplyObject(r);
    }
}

static pql_store_batch *sample_batch(int32_t p, int64_t epoch, int64_t seq)
{
    pql_store_batch *b = pql_store_batch_new();
    pql_store_batch_begin(b, G, p, epoch, seq);
    pql_store_batch_account(b, "acc", 3, 0);
    hset(b, "f", "v");
    pql_store_batch_offset(b, "events", 7);
    pql_store_batch_outbox_put(b, "id", "p", 1);
    pql_store_batch_incr(b, "metrics", "n", 7);
    return b;
}

static void assert_untouched(int32_t p)
{
    char key[64];
    snprintf(key, sizeof key, "pql:{" G ":%d}:a:acc", (int)p);
    cr_assert_eq(raw_int("EXISTS %s", key), 0);
    snprintf(key, sizeof key, "pql:{" G ":%d}:outbox", (int)p);
    cr_assert_eq(raw_int("EXISTS %s", key), 0);
    snprintf(key, sizeof key, "pql:{" G ":%d}:c:metrics", (int)p);
    cr_assert_eq(raw_int("EXISTS %s", key), 0);
    snprintf(key, sizeof key, "pql:{" G ":%d}:meta", (int)p);
    cr_assert_str_eq(raw_hget(key, "seq"), "");
    cr_assert_str_eq(raw_hget(key, "off:events"), "");
}

Test(store, stale_epoch_is_fenced)
{
    pql_claim old = claim(2);
    pql_claim now = claim(2);
    cr_assert_eq(now.epoch, old.epoch + 1);
    pql_store_batch *b = sample_batch(2, old.epoch, old.seq);
    cr_assert_eq(commit1(b), PQL_ERR_FENCED);
    cr_assert(strstr(err, "FENCED"), "%s", err);
    assert_untouched(2);
    pql_store_batch_destroy(b);
    b = sample_batch(5, 1, 0); /* no claim in Redis: it lost ours, nobody else holds it */
    cr_assert_eq(commit1(b), PQL_ERR_REWOUND);
    assert_untouched(5);
    pql_store_batch_destroy(b);
}

Test(store, same_batch_twice_applies_once)
{
    pql_claim c = claim(3);
    pql_store_batch *b = sample_batch(3, c.epoch, c.seq);
    cr_assert_eq(commit1(b), PQL_OK);
    cr_assert_eq(commit1(b), PQL_OK); /* a retry after a lost reply */
    cr_assert_str_eq(counters(3, "metrics"), "n=7;");
    cr_assert_str_eq(raw_hget("pql:{" G ":3}:meta", "seq"), "1");
    pql_store_batch_destroy(b);
    b = sample_batch(3, c.epoch, c.seq + 1); /* the next batch does apply */
    cr_assert_eq(commit1(b), PQL_OK);
    cr_assert_str_eq(counters(3, "metrics"), "n=14;");
    pql_store_batch_destroy(b);
}

/* Our epoch, but Redis's seq is behind ours: it lost writes it had
 * acknowledged (restarted without them).  Nothing is written, and the
 * answer says so apart from another member's claim. */
Test(store, a_seq_behind_ours_is_rewound_not_fenced)
{
    pql_claim c = claim(4);
    pql_store_batch *b = sample_batch(4, c.epoch, c.seq + 5);
    cr_assert_eq(commit1(b), PQL_ERR_REWOUND);
    cr_assert(strstr(err, "seq"), "%s", err);
    assert_untouched(4);
    pql_store_batch_destroy(b);
    b = sample_batch(4, c.epoch + 2, c.seq); /* an epoch Redis has not reached: lost too */
    cr_assert_eq(commit1(b), PQL_ERR_REWOUND);
    assert_untouched(4);
    pql_store_batch_destroy(b);
}

Test(store, partitions_commit_in_one_round_trip)
{
    pql_store_batch *b[4];
    pql_err res[4];
    for (int p = 0; p < 3; p++) {
        pql_claim c = claim(p);
        b[p] = sample_batch(p, c.epoch, c.seq);
    }
    b[3] = sample_batch(9, 1, 0); /* no claim in Redis: refused, the others still apply */
    uint64_t rt0, cmd0, rt1, cmd1;
    pql_store_stats(st, &rt0, &cmd0);
    cr_assert_eq(pql_store_commit(st, b, 4, res, err, sizeof err), PQL_OK, "%s", err);
    pql_store_stats(st, &rt1, &cmd1);
    cr_assert_eq(rt1 - rt0, 1);
    cr_assert_eq(cmd1 - cmd0, 4);
    for (int p = 0; p < 3; p++) {
        cr_assert_eq(res[p], PQL_OK);
        cr_assert_str_eq(counters(p, "metrics"), "n=7;");
    }
    cr_assert_eq(res[3], PQL_ERR_REWOUND);
    for (int i = 0; i < 4; i++)
        pql_store_batch_destroy(b[i]);
}

/* One commit, two refusals: each batch keeps its own reason, naming its own
 * partition (the commit's errstr holds only the last one, and a log line
 * "partition=6 ... error=<partition 7's key>" sent an operator astray). */
Test(store, each_refused_batch_says_why_for_its_own_partition)
{
    pql_claim old = claim(6);
    claim(6); /* another member's claim: `old` is fenced */
    pql_claim ok = claim(8);
    pql_store_batch *b[3] = {sample_batch(6, old.epoch, old.seq), sample_batch(7, 1, 0),
                             sample_batch(8, ok.epoch, ok.seq)};
    pql_err res[3];
    cr_assert_eq(pql_store_commit(st, b, 3, res, err, sizeof err), PQL_OK, "%s", err);
    cr_assert_eq(res[0], PQL_ERR_FENCED);
    cr_assert_eq(res[1], PQL_ERR_REWOUND);
    cr_assert_eq(res[2], PQL_OK);
    char want[128];
    snprintf(want, sizeof want, "pql:{" G ":6}:meta: FENCED epoch %lld is not ours (%lld)",
             (long long)old.epoch + 1, (long long)old.epoch);
    cr_assert(strstr(pql_store_batch_refusal(b[0]), want), "%s", pql_store_batch_refusal(b[0]));
    cr_assert(strstr(pql_store_batch_refusal(b[1]), "pql:{" G ":7}:meta: FENCED epoch none"), "%s",
              pql_store_batch_refusal(b[1]));
    cr_assert_str_eq(pql_store_batch_refusal(b[2]), "");
    /* the very same batch, applied at its next commit, no longer carries one */
    pql_claim c7 = claim(7);
    cr_assert_eq(c7.epoch, 1);
    cr_assert_eq(commit1(b[1]), PQL_OK, "%s", err);
    cr_assert_str_eq(pql_store_batch_refusal(b[1]), "");
    for (int i = 0; i < 3; i++)
        pql_store_batch_destroy(b[i]);
}

static void field_cb(void *opaque, size_t i, const char *f, size_t flen, const char *v, size_t vlen)
{
    pql_buf *out = opaque;
    pql_buf_printf(out, "%zu:", i);
    pql_buf_append(out, f, flen);
    pql_buf_append(out, "=", 1);
    pql_buf_append(out, v, vlen);
    pql_buf_append(out, ";", 1);
}

Test(store, load_accounts_of_several_partitions_in_one_round_trip)
{
    pql_claim c = claim(6);
    pql_store_batch *b = pql_store_batch_new();
    pql_store_batch_begin(b, G, 6, c.epoch, c.seq);
    pql_store_batch_account(b, "a1", 2, 0);
    hset(b, "x", "1");
    hset(b, "y", "2");
    pql_store_batch_account(b, "a3", 2, 0);
    hset(b, "z", "3");
    cr_assert_eq(commit1(b), PQL_OK);
    pql_claim c9 = claim(9); /* the same account id in another partition is another account */
    pql_store_batch_begin(b, G, 9, c9.epoch, c9.seq);
    pql_store_batch_account(b, "a1", 2, 0);
    hset(b, "w", "9");
    cr_assert_eq(commit1(b), PQL_OK);
    const char *ids[5] = {"a1", "nobody", "a3", "a1", "a1"};
    size_t lens[5] = {2, 6, 2, 2, 2};
    const int32_t parts[5] = {6, 6, 6, 6, 9};
    pql_buf out = {0};
    uint64_t rt0, rt1;
    pql_store_stats(st, &rt0, NULL);
    cr_assert_eq(
        pql_store_load_accounts(st, G, parts, ids, lens, 5, field_cb, &out, err, sizeof err),
        PQL_OK, "%s", err);
    pql_store_stats(st, &rt1, NULL);
    cr_assert_eq(rt1 - rt0, 1);
    pql_buf_append(&out, "", 0);
    cr_assert(strstr(out.data, "0:x=1;") && strstr(out.data, "0:y=2;"), "%s", out.data);
    cr_assert(strstr(out.data, "2:z=3;") && strstr(out.data, "3:x=1;"), "%s", out.data);
    cr_assert_null(strstr(out.data, "1:"), "%s", out.data);
    cr_assert(strstr(out.data, "4:w=9;"), "%s", out.data);
    cr_assert_eq(out.len, strlen("0:x=1;0:y=2;2:z=3;3:x=1;3:y=2;4:w=9;"));
    pql_buf_free(&out);
    pql_store_batch_destroy(b);
}

static void outbox_cb(void *opaque, const char *id, size_t idlen, const char *p, size_t plen)
{
    int *seen = opaque;
    int n = atoi(id);
    char want[32];
    cr_assert(idlen < 16 && n >= 0 && n < 2500);
    cr_assert_eq(plen, (size_t)snprintf(want, sizeof want, "payload-%d", n));
    cr_assert(memcmp(p, want, plen) == 0);
    seen[n]++;
}

Test(store, outbox_scan_sees_every_entry)
{
    pql_claim c = claim(0);
    pql_store_batch *b = pql_store_batch_new();
    pql_store_batch_begin(b, G, 0, c.epoch, c.seq);
    for (int i = 0; i < 2501; i++) {
        char id[16], payload[32];
        snprintf(id, sizeof id, "%d", i);
        int n = snprintf(payload, sizeof payload, "payload-%d", i);
        pql_store_batch_outbox_put(b, id, payload, (size_t)n);
    }
    pql_store_batch_outbox_del(b, "2500");
    cr_assert_eq(commit1(b), PQL_OK);
    static int seen[2500];
    cr_assert_eq(pql_store_outbox_scan(st, G, 0, outbox_cb, seen, err, sizeof err), PQL_OK);
    for (int i = 0; i < 2500; i++)
        cr_assert_eq(seen[i], 1, "alert %d seen %d times", i, seen[i]);
    int none = 0;
    cr_assert_eq(pql_store_outbox_scan(st, G, 1, outbox_cb, &none, err, sizeof err), PQL_OK);
    pql_store_batch_destroy(b);
}

Test(store, noscript_reloads_the_script)
{
    pql_claim c = claim(0);
    freeReplyObject(raw("SCRIPT FLUSH"));
    pql_store_batch *b = sample_batch(0, c.epoch, c.seq);
    cr_assert_eq(commit1(b), PQL_OK);
    cr_assert_str_eq(counters(0, "metrics"), "n=7;");
    pql_store_batch_destroy(b);
}

Test(store_aof, reconnects_after_restart)
{
    pql_claim c = claim(0);
    pql_store_batch *b = sample_batch(0, c.epoch, c.seq);
    cr_assert_eq(commit1(b), PQL_OK);
    pid_t before = pql_redis_child_pid(redis);
    cr_assert_eq(pql_redis_child_restart(redis, err, sizeof err), 0, "%s", err);
    cr_assert_neq(pql_redis_child_pid(redis), before);
    /* The batch again, as after a lost reply: the old connection is dead, so the
     * first try fails; the retry reconnects, reloads the script, applies nothing. */
    pql_err res = PQL_OK;
    cr_assert_eq(pql_store_commit(st, &b, 1, &res, err, sizeof err), PQL_ERR_IO);
    cr_assert_eq(res, PQL_ERR_IO);
    cr_assert(strstr(err, "unix:"), "%s", err);
    cr_assert_eq(commit1(b), PQL_OK);
    c = claim(0);
    cr_assert_eq(c.epoch, 2);
    cr_assert_eq(c.seq, 1);
    cr_assert_eq(c.offsets[0], 7);
    cr_assert_str_eq(counters(0, "metrics"), "n=7;");
    pql_store_batch_destroy(b);
    b = sample_batch(0, c.epoch, c.seq); /* the script cache is gone: NOSCRIPT path */
    cr_assert_eq(commit1(b), PQL_OK);
    cr_assert_str_eq(counters(0, "metrics"), "n=14;");
    pql_store_batch_destroy(b);
}

Test(store, twenty_thousand_fields_in_one_account)
{
    pql_claim c = claim(0);
    pql_store_batch *b = pql_store_batch_new();
    pql_store_batch_begin(b, G, 0, c.epoch, c.seq);
    pql_store_batch_account(b, "big", 3, 3600000);
    for (int i = 0; i < 20000; i++) {
        char f[16];
        int n = snprintf(f, sizeof f, "f%d", i);
        cr_assert_eq(pql_store_batch_hset(b, f, (size_t)n, f, (size_t)n), PQL_OK);
    }
    cr_assert_eq(commit1(b), PQL_OK, "%s", err);
    cr_assert_eq(raw_int("HLEN %s", "pql:{" G ":0}:a:big"), 20000);
    cr_assert_str_eq(raw_hget("pql:{" G ":0}:a:big", "f19999"), "f19999");
    pql_store_batch_begin(b, G, 0, c.epoch, c.seq + 1);
    pql_store_batch_account(b, "big", 3, 3600000);
    for (int i = 0; i < 20000; i++) {
        char f[16];
        cr_assert_eq(pql_store_batch_hdel(b, f, (size_t)snprintf(f, sizeof f, "f%d", i)), PQL_OK);
    }
    cr_assert_eq(commit1(b), PQL_OK, "%s", err);
    cr_assert_eq(raw_int("EXISTS %s", "pql:{" G ":0}:a:big"), 0);
    pql_store_batch_destroy(b);
}

Test(store, binary_safe_ids_and_fields)
{
    const char id[] = "a\0b{x}c", field[] = "f\0{g}", value[] = "v\0\377w";
    size_t idlen = sizeof id - 1, flen = sizeof field - 1, vlen = sizeof value - 1;
    pql_buf key = {0};
    pql_store_account_key(&key, G, 7, id, idlen);
    const char *prefix = "pql:{" G ":7}:a:";
    cr_assert_eq(key.len, strlen(prefix) + idlen);
    cr_assert(memcmp(key.data, prefix, strlen(prefix)) == 0);
    cr_assert(memcmp(key.data + strlen(prefix), id, idlen) == 0);
    const char *open = memchr(key.data, '{', key.len), *close = memchr(open, '}', key.len);
    cr_assert_eq(close - open + 1, (long)strlen("{" G ":7}")); /* the tag is the partition's */

    pql_claim c = claim(7);
    pql_store_batch *b = pql_store_batch_new();
    pql_store_batch_begin(b, G, 7, c.epoch, c.seq);
    pql_store_batch_account(b, id, idlen, 0);
    pql_store_batch_hset(b, field, flen, value, vlen);
    pql_store_batch_account(b, "a", 1, 0); /* a prefix of the binary id: a different key */
    hset(b, "other", "1");
    cr_assert_eq(commit1(b), PQL_OK);
    redisReply *r = raw("HGET %b %b", key.data, key.len, field, flen);
    cr_assert_eq(r->type, REDIS_REPLY_STRING);
    cr_assert_eq(r->len, vlen);
    cr_assert(memcmp(r->str, value, vlen) == 0);
    freeReplyObject(r);

    const char *ids[2] = {id, "a"};
    size_t lens[2] = {idlen, 1};
    pql_buf out = {0}, want = {0};
    const int32_t parts[2] = {7, 7};
    cr_assert_eq(
        pql_store_load_accounts(st, G, parts, ids, lens, 2, field_cb, &out, err, sizeof err),
        PQL_OK);
    field_cb(&want, 0, field, flen, value, vlen);
    field_cb(&want, 1, "other", 5, "1", 1);
    cr_assert_eq(out.len, want.len);
    cr_assert(memcmp(out.data, want.data, want.len) == 0);
    pql_buf_free(&out);
    pql_buf_free(&want);
    pql_buf_free(&key);
    pql_store_batch_destroy(b);
}

Test(store, braces_in_group_are_refused)
{
    pql_claim c;
    const char *t = "events";
    cr_assert_eq(pql_store_claim(st, "g}x", 0, &t, 1, &c, err, sizeof err), PQL_ERR_ARG);
    pql_store_batch *b = pql_store_batch_new();
    pql_store_batch_begin(b, "{g", 0, 1, 0);
    cr_assert_eq(commit1(b), PQL_ERR_ARG);
    pql_store_batch_destroy(b);
}

static int free_port(void)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    cr_assert(fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof a) == 0);
    cr_assert(getsockname(fd, (struct sockaddr *)&a, &len) == 0);
    close(fd);
    return ntohs(a.sin_port);
}

/* Opens url, claims partition 0 and checks the claim landed in database db. */
static void open_and_check_db(const char *url, int db, int64_t epoch)
{
    const char *t = "events";
    pql_claim c;
    pql_store *s = pql_store_open(url, 2000, err, sizeof err);
    cr_assert(s, "%s: %s", url, err);
    cr_assert_eq(pql_store_claim(s, G, 0, &t, 1, &c, err, sizeof err), PQL_OK, "%s", err);
    cr_assert_eq(c.epoch, epoch);
    pql_store_close(s);
    freeReplyObject(raw("SELECT %d", db));
    char want[24];
    snprintf(want, sizeof want, "%lld", (long long)epoch);
    cr_assert_str_eq(raw_hget("pql:{" G ":0}:meta", "epoch"), want, "db %d", db);
    freeReplyObject(raw("SELECT 0"));
}

static void assert_refused(const char *url, const char *secret)
{
    err[0] = '\0';
    pql_store *s = pql_store_open(url, 2000, err, sizeof err);
    cr_assert_null(s, "%s opened", url);
    cr_assert(err[0], "%s: no reason", url);
    cr_assert_null(strstr(err, secret), "%s: reason shows the password: %s", url, err);
}

Test(store, urls_and_credentials)
{
    char url[256];
    const char *sock = pql_redis_child_url(redis) + strlen("unix://");
    snprintf(url, sizeof url, "unix://%s?db=3", sock);
    open_and_check_db(url, 3, 1);

    int port = free_port();
    redisReply *r = raw("CONFIG SET port %d", port);
    cr_assert_eq(r->type, REDIS_REPLY_STATUS, "%s", r->str);
    freeReplyObject(r);
    freeReplyObject(raw("ACL SETUSER alice on >s3cr3t-pw ~* &* +@all"));
    snprintf(url, sizeof url, "redis://alice:s3cr3t-pw@127.0.0.1:%d/2", port);
    open_and_check_db(url, 2, 1);
    snprintf(url, sizeof url, "unix://alice:s3cr3t-pw@%s?db=2", sock);
    open_and_check_db(url, 2, 2);
    snprintf(url, sizeof url, "redis://alice:Wr0ng-pw@localhost:%d/2", port);
    assert_refused(url, "Wr0ng-pw");
    cr_assert(strstr(err, "AUTH"), "%s", err);

    freeReplyObject(raw("CONFIG SET requirepass %s", "p@ss:w/rd")); /* password only */
    snprintf(url, sizeof url, "redis://:p%%40ss%%3Aw%%2Frd@127.0.0.1:%d", port);
    open_and_check_db(url, 0, 1);
    snprintf(url, sizeof url, "unix://:p%%40ss%%3Aw%%2Frd@%s", sock);
    open_and_check_db(url, 0, 2);
    assert_refused("redis://:p%40ss%3Aw%2Frd@[::1]:1/", "p@ss"); /* parsed, nobody there */
    cr_assert(strstr(err, "::1:1: connect"), "%s", err);

    const char *bad[] = {
        "http://u:s3cr3t-pw@host",      "s3cr3t-pw@host:1",
        "redis://u:s3cr3t-pw@host:0",   "redis://u:s3cr3t-pw@host:99999",
        "redis://u:s3cr3t-pw@host:x/1", "redis://u:s3cr3t-pw@host/db",
        "redis://s3cr3t-pw@host",       "redis://u:s3cr3t-pw%zz@host",
        "redis://u:s3cr3t-pw@[::1",     "rediss://u:s3cr3t-pw@host",
        "unix://u:s3cr3t-pw@relative",  "unix:///tmp/x.sock?db=s3cr3t-pw",
        "unix:///nonexistent/s.sock",   "redis://u:s3cr3t-pw@127.0.0.1:1/0",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_refused(bad[i], "s3cr3t-pw");
}

Test(redis_child, missing_binary_says_what_to_install)
{
    char d[] = "/tmp/pql-test-store-XXXXXX";
    cr_assert(mkdtemp(d));
    pql_redis_child_opts o = {.dir = d, .binary = "/nonexistent/redis-server"};
    pql_redis_child *c = pql_redis_child_start(&o, err, sizeof err);
    cr_assert_null(c);
    cr_assert(strstr(err, "not found") && strstr(err, "apt-get install redis-server"), "%s", err);
    nftw(d, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
}
