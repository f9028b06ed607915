/* http.h — the SRE surface over HTTP (DESIGN §6, docs/operations.md), served
 * by libmicrohttpd on one internal thread:
 *
 *   GET /metrics            Prometheus text format 0.0.4 (telemetry.h)
 *   GET /healthz            200 while the run loop iterates, 503 when stuck
 *   GET /readyz             200 when partitions are assigned, Redis answers and
 *                           nothing is stuck; else 503 naming each failing check
 *   GET /v1/accounts/{id}   the account as the rules see it (explain.h), read
 *                           from Redis: any member answers for any account
 *
 * Every answer but /metrics is JSON.  Other methods get 405, unknown paths
 * 404.  The server thread reads the telemetry registry (the pipeline writes
 * it) and has its own Redis connection, opened on first use: the pipeline's
 * is never touched from here.  Rule sets are borrowed per request through
 * pql_telemetry_rules(), so a hot reload is safe. */
#ifndef PQL_HTTP_H
#define PQL_HTTP_H

#include "telemetry.h"

typedef struct pql_http pql_http;

typedef struct pql_http_opts {
    const char *addr;         /* "host:port", "[v6]:port", ":port" (all interfaces);
                                 port 0 binds an ephemeral port */
    pql_telemetry *telemetry; /* read by the server thread; must outlive the server */
    const char *redis_url;    /* for the server's own connection (copied) */
    int redis_timeout_ms;     /* capped at 1000: a probe must answer within a second */
    const char *group;        /* consumer group: the Redis key namespace (copied) */
    int32_t max_partitions;   /* where accounts are looked for when the pipeline has
                                 not reported its partition count yet; 0: 1024 */
    pql_health_limits limits; /* liveness and outbox limits; zeros: defaults */
} pql_http_opts;

/** Binds `o->addr` and starts serving.  @returns the server, or NULL with
 *  what failed, where and what to do in errstr (e.g. the address is in use:
 *  "set PQLSTREAM_HTTP to another address or off"). */
pql_http *pql_http_start(const pql_http_opts *o, char *errstr, size_t errstr_size);

/** @returns the bound address, "127.0.0.1:40123" or "[::1]:40123". */
const char *pql_http_addr(const pql_http *h);

/** Stops serving (waits for the request in progress) and frees.  NULL is fine. */
void pql_http_stop(pql_http *h);

/** Splits "host:port" ("[v6]:port", ":port") into host (empty: any) and
 *  port.  @returns 0, or -1 with a reason. */
int pql_http_parse_addr(const char *addr, char *host, size_t host_size, char *port,
                        size_t port_size, char *errstr, size_t errstr_size);

#endif
