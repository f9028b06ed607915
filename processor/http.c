/* http.c — /metrics, /healthz, /readyz and /v1/accounts/{id} over
 * libmicrohttpd.  See http.h.
 *
 * One internal polling thread serves every connection, so the request
 * handler runs on one thread only: the Redis connection it opens needs no
 * lock.  We bind the listening socket ourselves (and hand it to MHD) so a
 * bind failure can say exactly what went wrong, and so port 0 works: the
 * bound address comes from getsockname(). */
#include "http.h"

#include "explain.h"
#include "log.h"
#include "store.h"

#include <arpa/inet.h>
#include <errno.h>
#include <jansson.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define ACCOUNT_PREFIX       "/v1/accounts/"
#define MAX_ACCOUNT_ID       256
#define DEFAULT_PARTITIONS   1024
#define PING_EVERY_MS        1000 /* /readyz pings Redis at most this often */
#define MAX_REDIS_TIMEOUT_MS 1000
#define JSON_FLAGS           (JSON_INDENT(2) | JSON_PRESERVE_ORDER)
#define CONTENT_TYPE_JSON    "application/json"
#define CONTENT_TYPE_METRICS "text/plain; version=0.0.4; charset=utf-8"

struct pql_http {
    struct MHD_Daemon *daemon;
    pql_telemetry *tel;
    char addr[80];
    char *redis_url;
    char *group;
    int redis_timeout_ms;
    int32_t max_partitions;
    pql_health_limits limits;
    /* used by the server thread only */
    pql_store *store;
    int64_t pinged_at;
};

int pql_http_parse_addr(const char *addr, char *host, size_t host_size, char *port,
                        size_t port_size, char *errstr, size_t errstr_size)
{
    const char *colon = strrchr(addr, ':');
    if (!colon) {
        pql_set_err(errstr, errstr_size,
                    "http address '%s' has no port: write host:port, e.g. 127.0.0.1:9464, "
                    "[::1]:9464, :9464 (every interface) or off",
                    addr);
        return -1;
    }
    const char *h = addr;
    size_t hlen = (size_t)(colon - addr);
    if (hlen && addr[0] == '[') {
        if (addr[hlen - 1] != ']') {
            pql_set_err(errstr, errstr_size,
                        "http address '%s': an IPv6 host is written [::1]:9464", addr);
            return -1;
        }
        h++;
        hlen -= 2;
    } else if (memchr(addr, ':', hlen)) {
        pql_set_err(errstr, errstr_size,
                    "http address '%s': write an IPv6 host in brackets, e.g. [::1]:9464", addr);
        return -1;
    }
    const char *p = colon + 1;
    char *end;
    long n = strtol(p, &end, 10);
    if (!*p || *end || n < 0 || n > 65535) {
        pql_set_err(errstr, errstr_size,
                    "http address '%s': the port '%s' is not a number from 0 to 65535 (0: any "
                    "free port)",
                    addr, p);
        return -1;
    }
    if (hlen >= host_size || strlen(p) >= port_size) {
        pql_set_err(errstr, errstr_size, "http address '%s' is too long", addr);
        return -1;
    }
    memcpy(host, h, hlen);
    host[hlen] = '\0';
    snprintf(port, port_size, "%ld", n);
    return 0;
}

/* Binds and listens on addr.  @returns the socket, or -1 with errstr. */
static int listen_on(const char *addr, int *family, char *bound, size_t bound_size, char *errstr,
                     size_t errstr_size)
{
    char host[64], port[8];
    if (pql_http_parse_addr(addr, host, sizeof(host), port, sizeof(port), errstr, errstr_size))
        return -1;
    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV},
                    *res = NULL;
    int rc = getaddrinfo(host[0] ? host : NULL, port, &hints, &res);
    if (rc) {
        pql_set_err(errstr, errstr_size,
                    "cannot listen for HTTP on %s: host '%s': %s — set PQLSTREAM_HTTP to another "
                    "address or off",
                    addr, host, gai_strerror(rc));
        return -1;
    }
    int fd = -1, err = 0;
    for (struct addrinfo *ai = res; ai && fd < 0; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) {
            err = errno;
            continue;
        }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 || listen(fd, 64) < 0) {
            err = errno;
            close(fd);
            fd = -1;
            continue;
        }
        *family = ai->ai_family;
    }
    freeaddrinfo(res);
    if (fd < 0) {
        pql_set_err(errstr, errstr_size,
                    "cannot listen for HTTP on %s: %s — set PQLSTREAM_HTTP to another address or "
                    "off",
                    addr, strerror(err));
        return -1;
    }
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    char ip[INET6_ADDRSTRLEN] = "?";
    int bound_port = 0;
    if (getsockname(fd, (struct sockaddr *)&ss, &len) == 0) {
        if (ss.ss_family == AF_INET6) {
            struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
            inet_ntop(AF_INET6, &s6->sin6_addr, ip, sizeof(ip));
            bound_port = ntohs(s6->sin6_port);
        } else {
            struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
            inet_ntop(AF_INET, &s4->sin_addr, ip, sizeof(ip));
            bound_port = ntohs(s4->sin_port);
        }
    }
    snprintf(bound, bound_size, ss.ss_family == AF_INET6 ? "[%s]:%d" : "%s:%d", ip, bound_port);
    return fd;
}

/* ---- responses ----------------------------------------------------------- */

/* Queues `body` (malloc'd, taken) with `status` and `content_type`. */
static enum MHD_Result respond(struct MHD_Connection *c, unsigned status, char *body, size_t len,
                               const char *content_type)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, content_type);
    MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
    if (status == MHD_HTTP_METHOD_NOT_ALLOWED)
        MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, "GET, HEAD");
    enum MHD_Result ok = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return ok;
}

/* Queues a JSON document (reference taken) followed by a newline. */
static enum MHD_Result respond_json(struct MHD_Connection *c, unsigned status, json_t *doc)
{
    char *text = doc ? json_dumps(doc, JSON_FLAGS) : NULL;
    json_decref(doc);
    if (!text) return MHD_NO;
    size_t len = strlen(text);
    char *body = realloc(text, len + 2);
    if (!body) {
        free(text);
        return MHD_NO;
    }
    body[len] = '\n';
    body[len + 1] = '\0';
    return respond(c, status, body, len + 1, CONTENT_TYPE_JSON);
}

/* {"error": error, "detail": detail} */
static enum MHD_Result respond_error(struct MHD_Connection *c, unsigned status, const char *error,
                                     const char *detail)
{
    return respond_json(c, status, json_pack("{s:s, s:s}", "error", error, "detail", detail));
}

/* ---- Redis (the server thread's own connection) ------------------------- */

/* @returns the connection, opening it on first use; NULL with errstr. */
static pql_store *store_of(pql_http *h, char *errstr, size_t errstr_size)
{
    if (!h->store) {
        uint64_t start = pql_telemetry_ticks();
        h->store = pql_store_open(h->redis_url, h->redis_timeout_ms, errstr, errstr_size);
        if (!h->store) pql_telemetry_redis(h->tel, "ping", start, 0, errstr);
    }
    return h->store;
}

/* Pings Redis (at most every PING_EVERY_MS) so readiness notices a Redis
 * that went away while the pipeline had nothing to write. */
static void probe_redis(pql_http *h)
{
    int64_t now = pql_now_ms();
    if (h->pinged_at && now - h->pinged_at < PING_EVERY_MS) return;
    h->pinged_at = now;
    char err[256];
    pql_store *s = store_of(h, err, sizeof(err));
    if (!s) return;
    uint64_t start = pql_telemetry_ticks();
    int ok = pql_store_ping(s, err, sizeof(err)) == PQL_OK;
    pql_telemetry_redis(h->tel, "ping", start, ok, ok ? NULL : err);
}

/* ---- endpoints ----------------------------------------------------------- */

static enum MHD_Result get_metrics(pql_http *h, struct MHD_Connection *c)
{
    pql_buf out = {0};
    if (pql_telemetry_render(h->tel, pql_now_ms(), &out) < 0) {
        pql_buf_free(&out);
        return MHD_NO;
    }
    if (!out.data) return respond(c, MHD_HTTP_OK, strdup(""), 0, CONTENT_TYPE_METRICS);
    return respond(c, MHD_HTTP_OK, out.data, out.len, CONTENT_TYPE_METRICS);
}

static enum MHD_Result get_healthz(pql_http *h, struct MHD_Connection *c)
{
    pql_health hl;
    pql_telemetry_health(h->tel, pql_now_ms(), &h->limits, &hl);
    return respond_json(
        c, hl.live ? MHD_HTTP_OK : MHD_HTTP_SERVICE_UNAVAILABLE,
        json_pack("{s:s, s:s}", "status", hl.live ? "ok" : "stuck", "detail", hl.live_detail));
}

static enum MHD_Result get_readyz(pql_http *h, struct MHD_Connection *c)
{
    probe_redis(h);
    pql_health hl;
    pql_telemetry_health(h->tel, pql_now_ms(), &h->limits, &hl);
    json_t *failing = json_array(), *checks = json_object();
    for (size_t i = 0; i < hl.nchecks; i++) {
        const pql_health_check *k = &hl.checks[i];
        json_object_set_new(checks, k->name,
                            json_pack("{s:b, s:s}", "ok", k->ok, "detail", k->detail));
        if (!k->ok) json_array_append_new(failing, json_string(k->name));
    }
    return respond_json(c, hl.ready ? MHD_HTTP_OK : MHD_HTTP_SERVICE_UNAVAILABLE,
                        json_pack("{s:s, s:o, s:o}", "status", hl.ready ? "ready" : "unready",
                                  "failing", failing, "checks", checks));
}

/* @returns NULL when `id` is a usable account id, else why not. */
static const char *bad_account_id(const char *id)
{
    size_t len = strlen(id);
    if (!len) return "the account id is empty: GET /v1/accounts/{id}";
    if (len > MAX_ACCOUNT_ID) return "the account id is longer than 256 bytes";
    for (const unsigned char *p = (const unsigned char *)id; *p; p++)
        if (*p < 0x20 || *p == 0x7f) return "the account id contains a control character";
    json_t *probe = json_string(id); /* jansson validates UTF-8 */
    if (!probe) return "the account id is not valid UTF-8";
    json_decref(probe);
    return NULL;
}

static enum MHD_Result get_account(pql_http *h, struct MHD_Connection *c, const char *id)
{
    const char *bad = bad_account_id(id);
    if (bad) return respond_error(c, MHD_HTTP_BAD_REQUEST, "bad account id", bad);
    pql_rules *rules = pql_telemetry_rules(h->tel);
    if (!rules)
        return respond_error(c, MHD_HTTP_SERVICE_UNAVAILABLE, "not ready",
                             "no rule set loaded yet; retry in a moment");
    char err[512] = "";
    enum MHD_Result res;
    pql_account *a = NULL;
    pql_store *s = store_of(h, err, sizeof(err));
    int32_t parts = pql_telemetry_partitions(h->tel);
    if (parts <= 0) parts = h->max_partitions;
    int32_t partition = -1;
    if (s) {
        uint64_t start = pql_telemetry_ticks();
        a = pql_explain_fetch(s, rules, h->group, id, parts, &partition, err, sizeof(err));
        pql_telemetry_redis(h->tel, "account", start, a || !err[0], err);
    }
    if (a) {
        res = respond_json(c, MHD_HTTP_OK, pql_explain_json(a, rules));
    } else if (s && !err[0]) {
        char detail[512];
        snprintf(detail, sizeof(detail),
                 "no state for account '%s' in group '%s' (partitions 0-%d): it has had no "
                 "event yet, or it belongs to another group",
                 id, h->group, (int)parts - 1);
        res = respond_json(c, MHD_HTTP_NOT_FOUND,
                           json_pack("{s:s, s:s, s:s}", "error", "unknown account", "account_id",
                                     id, "detail", detail));
    } else {
        char detail[700];
        snprintf(detail, sizeof(detail), "redis: %s; retry later", err);
        res = respond_error(c, MHD_HTTP_SERVICE_UNAVAILABLE, "redis unavailable", detail);
    }
    pql_account_destroy(a);
    pql_rules_destroy(rules);
    return res;
}

static enum MHD_Result handle(void *cls, struct MHD_Connection *c, const char *url,
                              const char *method, const char *version, const char *upload_data,
                              size_t *upload_data_size, void **con_cls)
{
    (void)version;
    (void)upload_data;
    (void)con_cls;
    pql_http *h = cls;
    if (strcmp(method, MHD_HTTP_METHOD_GET) && strcmp(method, MHD_HTTP_METHOD_HEAD)) {
        *upload_data_size = 0; /* a body is not read: the answer does not depend on it */
        char detail[128];
        snprintf(detail, sizeof(detail), "%.32s is not allowed: every endpoint is read-only (GET)",
                 method);
        return respond_error(c, MHD_HTTP_METHOD_NOT_ALLOWED, "method not allowed", detail);
    }
    if (!strcmp(url, "/metrics")) return get_metrics(h, c);
    if (!strcmp(url, "/healthz")) return get_healthz(h, c);
    if (!strcmp(url, "/readyz")) return get_readyz(h, c);
    if (!strncmp(url, ACCOUNT_PREFIX, strlen(ACCOUNT_PREFIX)))
        return get_account(h, c, url + strlen(ACCOUNT_PREFIX));
    return respond_error(c, MHD_HTTP_NOT_FOUND, "not found",
                         "endpoints: /metrics, /healthz, /readyz, /v1/accounts/{id}");
}

static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    char msg[256];
    vsnprintf(msg, sizeof(msg), fmt, ap);
    msg[strcspn(msg, "\n")] = '\0';
    pql_debug("http server", "detail=\"%s\"", msg);
}

pql_http *pql_http_start(const pql_http_opts *o, char *errstr, size_t errstr_size)
{
    pql_http *h = calloc(1, sizeof(*h));
    int fd = -1, family = AF_INET;
    if (!h) goto nomem;
    h->tel = o->telemetry;
    h->redis_url = strdup(o->redis_url ? o->redis_url : "");
    h->group = strdup(o->group ? o->group : "pqlstream");
    if (!h->redis_url || !h->group) goto nomem;
    h->redis_timeout_ms = o->redis_timeout_ms > 0 && o->redis_timeout_ms < MAX_REDIS_TIMEOUT_MS
                              ? o->redis_timeout_ms
                              : MAX_REDIS_TIMEOUT_MS;
    h->max_partitions = o->max_partitions > 0 ? o->max_partitions : DEFAULT_PARTITIONS;
    h->limits = o->limits;
    fd = listen_on(o->addr, &family, h->addr, sizeof(h->addr), errstr, errstr_size);
    if (fd < 0) goto fail;
    unsigned flags =
        MHD_USE_AUTO_INTERNAL_THREAD | MHD_USE_ERROR_LOG | (family == AF_INET6 ? MHD_USE_IPv6 : 0);
    h->daemon =
        MHD_start_daemon(flags, 0, NULL, NULL, handle, h, MHD_OPTION_EXTERNAL_LOGGER, mhd_log, NULL,
                         MHD_OPTION_LISTEN_SOCKET, fd, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)10,
                         MHD_OPTION_CONNECTION_LIMIT, (unsigned)64, MHD_OPTION_END);
    if (!h->daemon) {
        pql_set_err(errstr, errstr_size,
                    "cannot start the HTTP server on %s (libmicrohttpd refused it) — set "
                    "PQLSTREAM_HTTP to another address or off",
                    h->addr);
        goto fail;
    }
    pql_info("http listening", "addr=%s", h->addr);
    return h;
nomem:
    pql_set_err(errstr, errstr_size, "out of memory starting the HTTP server");
fail:
    if (fd >= 0) close(fd);
    if (h) h->daemon = NULL;
    pql_http_stop(h);
    return NULL;
}

const char *pql_http_addr(const pql_http *h)
{
    return h->addr;
}

void pql_http_stop(pql_http *h)
{
    if (!h) return;
    if (h->daemon) MHD_stop_daemon(h->daemon); /* also closes the listening socket */
    pql_store_close(h->store);
    free(h->redis_url);
    free(h->group);
    free(h);
}
