/* test_http.c — the SRE surface: the Prometheus renderer (exact text), the
 * registry's health facts, the HTTP server in-process (status codes,
 * content types, errors, a rule reload racing requests), and the real
 * binary end to end (exact counts in /metrics, promtool, /readyz across a
 * Redis outage, /v1/accounts/{id} against `rules explain --json`). */
#include "harness.h"
#include "http.h"
#include "telemetry.h"

#include <criterion/criterion.h>
#include <jansson.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

/* ---- helpers --------------------------------------------------------------- */

/* One HTTP/1.0 request to "host:port".  @returns the body (caller frees);
 * *status and, when headers is not NULL, the header block (caller frees). */
static char *request(const char *addr, const char *method, const char *path, int *status,
                     char **headers)
{
    char host[64], port[8], err[256];
    cr_assert_eq(
        pql_http_parse_addr(addr, host, sizeof(host), port, sizeof(port), err, sizeof(err)), 0,
        "%s", err);
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res = NULL;
    cr_assert_eq(getaddrinfo(host, port, &hints, &res), 0);
    int fd = socket(res->ai_family, SOCK_STREAM, 0);
    cr_assert(fd >= 0 && connect(fd, res->ai_addr, res->ai_addrlen) == 0, "connect %s", addr);
    freeaddrinfo(res);
    pql_buf req = {0}, resp = {0};
    pql_buf_printf(&req, "%s %s HTTP/1.0\r\nHost: %s\r\nContent-Length: 0\r\n\r\n", method, path,
                   addr);
    cr_assert_eq(write(fd, req.data, req.len), (ssize_t)req.len);
    char chunk[4096];
    ssize_t got;
    while ((got = read(fd, chunk, sizeof(chunk))) > 0)
        pql_buf_append(&resp, chunk, (size_t)got);
    close(fd);
    pql_buf_free(&req);
    cr_assert_not_null(resp.data, "no answer to %s %s", method, path);
    char *end = strstr(resp.data, "\r\n\r\n");
    cr_assert_not_null(end);
    cr_assert_eq(sscanf(resp.data, "HTTP/1.%*c %d", status), 1);
    if (headers) *headers = strndup(resp.data, (size_t)(end - resp.data));
    char *body = strdup(end + 4);
    pql_buf_free(&resp);
    return body;
}

static json_t *parse(const char *text)
{
    json_error_t e;
    json_t *j = json_loads(text, 0, &e);
    cr_assert_not_null(j, "not JSON (%s): %s", e.text, text);
    return j;
}

/* The names of the failing checks of a /readyz body, joined with ','. */
static void failing_of(const char *body, char *out, size_t size)
{
    json_t *j = parse(body);
    size_t i;
    json_t *v;
    out[0] = '\0';
    json_array_foreach(json_object_get(j, "failing"), i, v)
        snprintf(out + strlen(out), size - strlen(out), "%s%s", i ? "," : "", json_string_value(v));
    json_decref(j);
}

static int have_promtool(void)
{
    return system("command -v promtool >/dev/null 2>&1") == 0;
}

/* Runs `promtool check metrics` on text.  @returns its exit code; its
 * complaints are in *out (caller frees). */
static int promtool_check(const char *text, char **out)
{
    char *dir = h_mkdtemp(), in[600], log[600], cmd[1400];
    snprintf(in, sizeof(in), "%s/metrics.txt", dir);
    snprintf(log, sizeof(log), "%s/promtool.log", dir);
    h_write_file(in, text);
    snprintf(cmd, sizeof(cmd), "promtool check metrics < %s > %s 2>&1", in, log);
    int rc = system(cmd);
    *out = h_read_file(log);
    if (!*out) *out = strdup("");
    h_rmtree(dir);
    free(dir);
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

/* ---- the renderer ------------------------------------------------------------ */

Test(prom, family_and_samples_escape_help_and_label_values)
{
    pql_buf b = {0};
    cr_assert_eq(pql_prom_family(&b, "x_total", "counter", "Counts \\ things\nacross lines \"q\""),
                 0);
    const char *labels[] = {"rule", "a\"b\\c\nd", "kind", "PQL"};
    cr_assert_eq(pql_prom_sample(&b, "x_total", labels, 2, 42), 0);
    cr_assert_eq(pql_prom_sample(&b, "x_total", NULL, 0, 0.25), 0);
    cr_assert_str_eq(b.data, "# HELP x_total Counts \\\\ things\\nacross lines \"q\"\n"
                             "# TYPE x_total counter\n"
                             "x_total{rule=\"a\\\"b\\\\c\\nd\",kind=\"PQL\"} 42\n"
                             "x_total 0.25\n");
    pql_buf_free(&b);
}

Test(prom, histogram_buckets_are_cumulative_with_inf_sum_and_count)
{
    pql_buf b = {0};
    const double bounds[] = {0.001, 0.5, 2.5};
    const uint64_t counts[] = {2, 0, 3, 1}; /* 1 above the last bound */
    const char *labels[] = {"operation", "commit"};
    cr_assert_eq(pql_prom_histogram(&b, "r_seconds", labels, 1, bounds, counts, 3, 7.75), 0);
    cr_assert_str_eq(b.data, "r_seconds_bucket{operation=\"commit\",le=\"0.001\"} 2\n"
                             "r_seconds_bucket{operation=\"commit\",le=\"0.5\"} 2\n"
                             "r_seconds_bucket{operation=\"commit\",le=\"2.5\"} 5\n"
                             "r_seconds_bucket{operation=\"commit\",le=\"+Inf\"} 6\n"
                             "r_seconds_sum{operation=\"commit\"} 7.75\n"
                             "r_seconds_count{operation=\"commit\"} 6\n");
    pql_buf_reset(&b);
    cr_assert_eq(pql_prom_histogram(&b, "h", NULL, 0, bounds, counts, 1, 0), 0);
    cr_assert_str_eq(b.data, "h_bucket{le=\"0.001\"} 2\n"
                             "h_bucket{le=\"+Inf\"} 2\n"
                             "h_sum 0\n"
                             "h_count 2\n");
    pql_buf_free(&b);
}

static char *render(pql_telemetry *t, int64_t now)
{
    pql_buf b = {0};
    cr_assert_eq(pql_telemetry_render(t, now, &b), 0);
    return b.data;
}

#define ASSERT_HAS(text, want)                                                                     \
    cr_assert(strstr((text), (want)), "missing:\n%s\nin:\n%s", want, text)

Test(telemetry, registry_renders_exact_counts_by_label)
{
    pql_telemetry *t = pql_telemetry_new();
    pql_telemetry_events(t, "usage", 0, 0, 0);
    pql_telemetry_events(t, "usage", 10, 2, 1);
    pql_telemetry_events(t, "accounts", 3, 0, 0);
    pql_telemetry_alerts(t, "team", "PQL", 2);
    pql_telemetry_alerts(t, "seat \"80\"", "EXPANSION", 1);
    pql_telemetry_rebalance(t, "assign");
    pql_telemetry_rebalance(t, "assign");
    pql_telemetry_rules_reload(t, 0);
    pql_telemetry_fenced(t);

    /* a built batch as the pipeline counts it once written: by topic, alerts by rule and kind */
    pql_task *task = pql_task_new(0, 1);
    task->built_stats.topic_consumed[PQL_TOPIC_USAGE] = 5;
    task->built_stats.topic_dead_lettered[PQL_TOPIC_USAGE] = 1;
    task->built_stats.topic_consumed[PQL_TOPIC_ACCOUNTS] = 4;
    task->built_stats.topic_late[PQL_TOPIC_ACCOUNTS] = 2;
    task->alerts = calloc(2, sizeof(*task->alerts));
    task->alerts_cap = task->nalerts = task->built_alerts = 2;
    task->alerts[0].rule = strdup("team");
    task->alerts[0].kind = PQL_ALERT_PQL;
    task->alerts[1].rule = strdup("seats");
    task->alerts[1].kind = PQL_ALERT_EXPANSION;
    const char *topics[] = {"usage", "accounts"};
    pql_telemetry_batch(t, topics, task);
    pql_task_destroy(task);

    char *text = render(t, pql_now_ms());
    ASSERT_HAS(text, "# HELP pqlstream_events_consumed_total ");
    ASSERT_HAS(text, "# TYPE pqlstream_events_consumed_total counter\n"
                     "pqlstream_events_consumed_total{topic=\"usage\"} 15\n"
                     "pqlstream_events_consumed_total{topic=\"accounts\"} 7\n"
                     "# HELP");
    ASSERT_HAS(text, "# TYPE pqlstream_events_dead_lettered_total counter\n"
                     "pqlstream_events_dead_lettered_total{topic=\"usage\"} 3\n"
                     "pqlstream_events_dead_lettered_total{topic=\"accounts\"} 0\n");
    ASSERT_HAS(text, "# TYPE pqlstream_events_late_total counter\n"
                     "pqlstream_events_late_total{topic=\"usage\"} 1\n"
                     "pqlstream_events_late_total{topic=\"accounts\"} 2\n");
    ASSERT_HAS(text, "# TYPE pqlstream_alerts_total counter\n"
                     "pqlstream_alerts_total{rule=\"team\",kind=\"PQL\"} 3\n"
                     "pqlstream_alerts_total{rule=\"seat \\\"80\\\"\",kind=\"EXPANSION\"} 1\n"
                     "pqlstream_alerts_total{rule=\"seats\",kind=\"EXPANSION\"} 1\n");
    ASSERT_HAS(text, "pqlstream_rebalances_total{kind=\"assign\"} 2\n");
    ASSERT_HAS(text, "pqlstream_rule_reloads_total{result=\"ok\"} 0\n"
                     "pqlstream_rule_reloads_total{result=\"refused\"} 1\n");
    ASSERT_HAS(text, "pqlstream_fenced_batches_total 1\n");
    ASSERT_HAS(text, "pqlstream_build_info{version=\"" PQL_VERSION "\",librdkafka=\"");
    ASSERT_HAS(text, "# TYPE pqlstream_batch_duration_seconds histogram\n"
                     "pqlstream_batch_duration_seconds_bucket{le=\"0.001\"} 0\n");
    ASSERT_HAS(text, "pqlstream_batch_duration_seconds_bucket{le=\"+Inf\"} 0\n"
                     "pqlstream_batch_duration_seconds_sum 0\n"
                     "pqlstream_batch_duration_seconds_count 0\n");
    ASSERT_HAS(text, "pqlstream_ready 0\n");
    free(text);

    /* timed observations land in exactly one bucket each */
    pql_telemetry_batch_done(t, pql_telemetry_ticks());
    pql_telemetry_redis(t, "commit", pql_telemetry_ticks(), 1, NULL);
    pql_telemetry_redis(t, "commit", pql_telemetry_ticks() - 3000000000ull, 0, "timeout");
    text = render(t, pql_now_ms());
    ASSERT_HAS(text, "pqlstream_batch_duration_seconds_bucket{le=\"10\"} 1\n"
                     "pqlstream_batch_duration_seconds_bucket{le=\"+Inf\"} 1\n");
    ASSERT_HAS(text, "pqlstream_batch_duration_seconds_count 1\n");
    ASSERT_HAS(text, "pqlstream_redis_duration_seconds_bucket{operation=\"commit\",le=\"2.5\"} 1\n"
                     "pqlstream_redis_duration_seconds_bucket{operation=\"commit\",le=\"5\"} 2\n"
                     "pqlstream_redis_duration_seconds_bucket{operation=\"commit\",le=\"+Inf\"} "
                     "2\n");
    ASSERT_HAS(text, "pqlstream_redis_duration_seconds_count{operation=\"commit\"} 2\n");
    ASSERT_HAS(text, "pqlstream_redis_up 0\n");
    if (have_promtool()) {
        char *complaints;
        cr_assert_eq(promtool_check(text, &complaints), 0, "promtool:\n%s\non:\n%s", complaints,
                     text);
        free(complaints);
    }
    free(text);
    pql_telemetry_destroy(t);
}

Test(telemetry, consumer_lag_from_librdkafka_statistics)
{
    pql_telemetry *t = pql_telemetry_new();
    const char *stats = "{\"name\":\"c\",\"topics\":{"
                        "\"usage-events\":{\"partitions\":{"
                        "\"1\":{\"consumer_lag\":7},\"0\":{\"consumer_lag\":0},"
                        "\"-1\":{\"consumer_lag\":-1},\"2\":{\"consumer_lag\":-1}}},"
                        "\"account-updates\":{\"partitions\":{\"10\":{\"consumer_lag\":3},"
                        "\"9\":{\"consumer_lag\":12}}}}}";
    cr_assert_eq(pql_telemetry_kafka_stats(t, stats, strlen(stats)), 0);
    char *text = render(t, pql_now_ms());
    ASSERT_HAS(text, "# TYPE pqlstream_consumer_lag gauge\n"
                     "pqlstream_consumer_lag{topic=\"account-updates\",partition=\"9\"} 12\n"
                     "pqlstream_consumer_lag{topic=\"account-updates\",partition=\"10\"} 3\n"
                     "pqlstream_consumer_lag{topic=\"usage-events\",partition=\"0\"} 0\n"
                     "pqlstream_consumer_lag{topic=\"usage-events\",partition=\"1\"} 7\n"
                     "# HELP");
    free(text);
    /* a later report replaces the gauges (a revoked partition disappears) */
    const char *later = "{\"topics\":{\"usage-events\":{\"partitions\":{\"1\":{\"consumer_lag\":"
                        "2}}}}}";
    cr_assert_eq(pql_telemetry_kafka_stats(t, later, strlen(later)), 0);
    cr_assert_eq(pql_telemetry_kafka_stats(t, "not json", 8), -1);
    text = render(t, pql_now_ms());
    ASSERT_HAS(text, "# TYPE pqlstream_consumer_lag gauge\n"
                     "pqlstream_consumer_lag{topic=\"usage-events\",partition=\"1\"} 2\n"
                     "# HELP");
    free(text);
    pql_telemetry_destroy(t);
}

static const pql_health_check *check_of(const pql_health *h, const char *name)
{
    for (size_t i = 0; i < h->nchecks; i++)
        if (!strcmp(h->checks[i].name, name)) return &h->checks[i];
    cr_assert_fail("no check %s", name);
    return NULL;
}

static void failing(const pql_health *h, char *out, size_t size)
{
    out[0] = '\0';
    for (size_t i = 0; i < h->nchecks; i++)
        if (!h->checks[i].ok)
            snprintf(out + strlen(out), size - strlen(out), "%s%s", out[0] ? "," : "",
                     h->checks[i].name);
}

Test(telemetry, health_names_each_failing_condition)
{
    pql_telemetry *t = pql_telemetry_new();
    const int64_t t0 = 1795000000000LL;
    pql_health h;
    char f[256];
    pql_telemetry_health(t, t0, NULL, &h);
    cr_assert(h.live, "live while starting");
    cr_assert_not(h.ready);
    failing(&h, f, sizeof(f));
    cr_assert_str_eq(f, "partitions,redis,run_loop");

    pql_telemetry_loop l = {.assigned = 2, .partitions = 4};
    pql_telemetry_loop_done(t, &l, t0);
    pql_telemetry_redis(t, "ping", pql_telemetry_ticks(), 1, NULL);
    pql_telemetry_health(t, t0 + 1000, NULL, &h);
    cr_assert(h.live && h.ready);
    cr_assert_str_eq(check_of(&h, "partitions")->detail, "2 of 4 input partitions assigned");

    /* Redis fails: named with the operation and the error */
    pql_telemetry_redis(t, "commit", pql_telemetry_ticks(), 0, "Connection refused");
    pql_telemetry_write_retrying(t, 1, t0 + 2000);
    pql_telemetry_health(t, t0 + 5000, NULL, &h);
    failing(&h, f, sizeof(f));
    cr_assert_str_eq(f, "redis,batch_write");
    cr_assert_str_eq(check_of(&h, "redis")->detail,
                     "unreachable: commit failed: Connection refused");
    cr_assert_str_eq(check_of(&h, "batch_write")->detail,
                     "a batch write to Redis has been retrying for 3.0 s");
    cr_assert(h.live, "retrying beats the heart");
    pql_telemetry_redis(t, "commit", pql_telemetry_ticks(), 1, NULL);
    pql_telemetry_write_retrying(t, 0, t0 + 6000);

    /* delivery: alerts retrying, a failed dead letter, an outbox that does not drain */
    l.outbox = 3;
    l.alerts_retrying = 2;
    pql_telemetry_loop_done(t, &l, t0 + 7000);
    pql_telemetry_dlq_outcome(t, 0, t0 + 7000);
    pql_health_limits lim = {.stall_ms = 5000, .outbox_stuck_ms = 10000};
    pql_telemetry_loop_done(t, &l, t0 + 17500); /* same depth: no progress */
    pql_telemetry_health(t, t0 + 18000, &lim, &h);
    failing(&h, f, sizeof(f));
    cr_assert_str_eq(f, "alert_delivery,dlq_delivery,outbox");
    cr_assert_str_eq(check_of(&h, "outbox")->detail,
                     "3 alerts in the outbox, none delivered for 11.0 s (limit 10 s)");
    l.outbox = 2; /* progress */
    l.alerts_retrying = 0;
    pql_telemetry_loop_done(t, &l, t0 + 18000);
    pql_telemetry_dlq_outcome(t, 1, t0 + 18000);
    pql_telemetry_health(t, t0 + 19000, &lim, &h);
    cr_assert(h.ready, "ready again once delivery progresses");

    /* the loop stops iterating: not live, and not ready */
    pql_telemetry_health(t, t0 + 18000 + 5001, &lim, &h);
    cr_assert_not(h.live);
    cr_assert_str_eq(h.live_detail, "stuck: the run loop has not iterated for 5.0 s (limit 5 s)");
    failing(&h, f, sizeof(f));
    cr_assert_str_eq(f, "run_loop");
    pql_telemetry_destroy(t);
}

/* ---- the HTTP server, in-process ------------------------------------------ */

static const char *rules_yaml = "version: 3\n"
                                "traits: { seats: number }\n"
                                "signals:\n"
                                "  logins: { count: login, window: 7d }\n"
                                "pql:\n"
                                "  - name: active\n"
                                "    when: logins >= 3\n";

static pql_rules *load_rules(void)
{
    pql_buf errors = {0};
    pql_rules *r = pql_rules_load_string(rules_yaml, "r.yaml", &errors);
    cr_assert_not_null(r, "%s", errors.data);
    pql_buf_free(&errors);
    return r;
}

Test(http, endpoints_status_codes_and_content_types, .timeout = 60)
{
    h_redis *redis = h_redis_start();
    pql_telemetry *t = pql_telemetry_new();
    pql_rules *r = load_rules();
    pql_telemetry_set_rules(t, r);
    pql_rules_destroy(r);
    char err[512];
    pql_http_opts o = {.addr = "127.0.0.1:0",
                       .telemetry = t,
                       .redis_url = h_redis_url(redis),
                       .group = "g",
                       .max_partitions = 4};
    pql_http *h = pql_http_start(&o, err, sizeof(err));
    cr_assert_not_null(h, "%s", err);
    const char *addr = pql_http_addr(h);
    cr_assert(!strncmp(addr, "127.0.0.1:", 10) && strcmp(addr, "127.0.0.1:0"), "%s", addr);

    int status;
    char *headers, *body = request(addr, "GET", "/metrics", &status, &headers);
    cr_assert_eq(status, 200);
    cr_assert(strstr(headers, "Content-Type: text/plain; version=0.0.4; charset=utf-8"), "%s",
              headers);
    ASSERT_HAS(body, "# TYPE pqlstream_events_consumed_total counter\n");
    free(body);
    free(headers);

    body = request(addr, "GET", "/healthz", &status, &headers);
    cr_assert_eq(status, 200, "%s", body);
    cr_assert(strstr(headers, "Content-Type: application/json"), "%s", headers);
    free(headers);
    free(body);

    /* not ready: nothing assigned, no loop yet; Redis is pinged and fine */
    char f[256];
    body = request(addr, "GET", "/readyz", &status, NULL);
    cr_assert_eq(status, 503, "%s", body);
    failing_of(body, f, sizeof(f));
    cr_assert_str_eq(f, "partitions,run_loop", "%s", body);
    json_t *j = parse(body);
    cr_assert_str_eq(json_string_value(json_object_get(j, "status")), "unready");
    cr_assert(json_is_true(
        json_object_get(json_object_get(json_object_get(j, "checks"), "redis"), "ok")));
    json_decref(j);
    free(body);
    pql_telemetry_loop l = {.assigned = 1, .partitions = 4};
    pql_telemetry_loop_done(t, &l, pql_now_ms());
    body = request(addr, "GET", "/readyz", &status, NULL);
    cr_assert_eq(status, 200, "%s", body);
    j = parse(body);
    cr_assert_str_eq(json_string_value(json_object_get(j, "status")), "ready");
    cr_assert_eq(json_array_size(json_object_get(j, "failing")), 0);
    json_decref(j);
    free(body);

    /* read-only */
    body = request(addr, "POST", "/metrics", &status, &headers);
    cr_assert_eq(status, 405);
    cr_assert(strstr(headers, "Allow: GET, HEAD"), "%s", headers);
    ASSERT_HAS(body, "\"error\": \"method not allowed\"");
    free(headers);
    free(body);
    body = request(addr, "DELETE", "/v1/accounts/acme", &status, NULL);
    cr_assert_eq(status, 405);
    free(body);

    body = request(addr, "GET", "/nope", &status, NULL);
    cr_assert_eq(status, 404);
    ASSERT_HAS(body, "/v1/accounts/{id}");
    free(body);

    /* accounts: unknown (404 JSON), URL-decoded, bad ids (400) */
    body = request(addr, "GET", "/v1/accounts/ac%20me", &status, &headers);
    cr_assert_eq(status, 404, "%s", body);
    cr_assert(strstr(headers, "Content-Type: application/json"), "%s", headers);
    j = parse(body);
    cr_assert_str_eq(json_string_value(json_object_get(j, "error")), "unknown account");
    cr_assert_str_eq(json_string_value(json_object_get(j, "account_id")), "ac me");
    cr_assert_str_eq(json_string_value(json_object_get(j, "detail")),
                     "no state for account 'ac me' in group 'g' (partitions 0-3): it has had no "
                     "event yet, or it belongs to another group");
    json_decref(j);
    free(headers);
    free(body);
    char path[400];
    snprintf(path, sizeof(path), "/v1/accounts/%0257d", 0);
    body = request(addr, "GET", path, &status, NULL);
    cr_assert_eq(status, 400, "%s", body);
    ASSERT_HAS(body, "longer than 256 bytes");
    free(body);
    body = request(addr, "GET", "/v1/accounts/a%01b", &status, NULL);
    cr_assert_eq(status, 400, "%s", body);
    ASSERT_HAS(body, "control character");
    free(body);
    body = request(addr, "GET", "/v1/accounts/%ff%fe", &status, NULL);
    cr_assert_eq(status, 400, "%s", body);
    ASSERT_HAS(body, "not valid UTF-8");
    free(body);
    body = request(addr, "GET", "/v1/accounts/", &status, NULL);
    cr_assert_eq(status, 400, "%s", body);
    free(body);

    /* the same address again: refused, saying what to do */
    pql_http_opts again = o;
    again.addr = addr;
    cr_assert_null(pql_http_start(&again, err, sizeof(err)));
    char want[200];
    snprintf(want, sizeof(want),
             "cannot listen for HTTP on %s: Address already in use — set PQLSTREAM_HTTP to "
             "another address or off",
             addr);
    cr_assert_str_eq(err, want);

    pql_http_stop(h);
    pql_telemetry_destroy(t);
    h_redis_stop(redis);
}

Test(http, addresses_are_parsed_with_clear_errors)
{
    char host[64], port[8], err[256];
    cr_assert_eq(pql_http_parse_addr("[::1]:9464", host, 64, port, 8, err, 256), 0);
    cr_assert_str_eq(host, "::1");
    cr_assert_str_eq(port, "9464");
    cr_assert_eq(pql_http_parse_addr(":0", host, 64, port, 8, err, 256), 0);
    cr_assert_str_eq(host, "");
    cr_assert_str_eq(port, "0");
    cr_assert_eq(pql_http_parse_addr("localhost", host, 64, port, 8, err, 256), -1);
    cr_assert_str_eq(err, "http address 'localhost' has no port: write host:port, e.g. "
                          "127.0.0.1:9464, [::1]:9464, :9464 (every interface) or off");
    cr_assert_eq(pql_http_parse_addr("127.0.0.1:99999", host, 64, port, 8, err, 256), -1);
    cr_assert_str_eq(err, "http address '127.0.0.1:99999': the port '99999' is not a number "
                          "from 0 to 65535 (0: any free port)");
    cr_assert_eq(pql_http_parse_addr("::1:80", host, 64, port, 8, err, 256), -1);
    cr_assert_str_eq(err, "http address '::1:80': write an IPv6 host in brackets, e.g. "
                          "[::1]:9464");
}

typedef struct swapper {
    pql_telemetry *t;
    volatile int stop;
} swapper;

static void *swap_rules(void *arg)
{
    swapper *s = arg;
    while (!s->stop) { /* what reload_rules does, as fast as it can */
        pql_rules *r = load_rules();
        pql_telemetry_set_rules(s->t, r);
        pql_rules_destroy(r);
    }
    return NULL;
}

/* A hot reload on the pipeline thread while the HTTP thread reads the rule
 * set: each request holds its own reference (ASan would see a free). */
Test(http, rule_reload_races_account_queries_safely, .timeout = 60)
{
    h_redis *redis = h_redis_start();
    pql_telemetry *t = pql_telemetry_new();
    pql_rules *r = load_rules();
    pql_telemetry_set_rules(t, r);
    pql_rules_destroy(r);
    char err[512];
    pql_http_opts o = {.addr = "127.0.0.1:0", .telemetry = t, .redis_url = h_redis_url(redis)};
    pql_http *h = pql_http_start(&o, err, sizeof(err));
    cr_assert_not_null(h, "%s", err);
    swapper s = {t, 0};
    pthread_t th;
    pthread_create(&th, NULL, swap_rules, &s);
    for (int i = 0; i < 50; i++) {
        int status;
        char *body = request(pql_http_addr(h), "GET", "/v1/accounts/acme", &status, NULL);
        cr_assert_eq(status, 404, "%s", body);
        free(body);
    }
    s.stop = 1;
    pthread_join(th, NULL);
    pql_http_stop(h);
    pql_telemetry_destroy(t);
    h_redis_stop(redis);
}

/* ---- end to end: the real binary on the mock cluster and a real Redis ---- */

#define PARTS 4
#define USAGE "usage-events"
#define ACCTS "account-updates"

static const char *e2e_rules =
    "version: 9\n"
    "lifecycle: { signup: signed_up, conversion: subscription_started }\n"
    "traits: { seats: number }\n"
    "signals:\n"
    "  logins:  { count: login, window: 7d }\n"
    "  invites: { count: teammate_invited, window: 14d }\n"
    "  users:   { distinct: user_id, of: '*', window: 30d }\n"
    "pql:\n"
    "  - name: team\n"
    "    when: logins >= 3 and invites >= 1\n"
    "expansion:\n"
    "  - name: seats\n"
    "    when: account.seats > 0 and users / account.seats >= 0.8\n";

static h_redis *redis;
static h_kafka *kafka;
static char *dir;
static char rules_path[512];

static void e2e_setup(void)
{
    kafka = h_kafka_start(PARTS, USAGE, ACCTS, "pql-alerts", "pql-dlq", "pql-metrics", NULL);
    dir = h_mkdtemp();
    snprintf(rules_path, sizeof(rules_path), "%s/rules.yaml", dir);
    h_write_file(rules_path, e2e_rules);
}

static void e2e_teardown(void)
{
    h_kafka_stop(kafka);
    h_redis_stop(redis);
    redis = NULL;
    h_rmtree(dir);
    free(dir);
}

static h_proc *start(const char *group)
{
    return h_proc_start(
        "PQLSTREAM_BROKERS", h_kafka_bootstraps(kafka), "PQLSTREAM_REDIS", h_redis_url(redis),
        "PQLSTREAM_RULES", rules_path, "PQLSTREAM_GROUP", group,
        "PQLSTREAM_KAFKA_SESSION_TIMEOUT_MS", "6000", "PQLSTREAM_KAFKA_HEARTBEAT_INTERVAL_MS",
        "500", "PQLSTREAM_KAFKA_STATISTICS_INTERVAL_MS", "500", "PQLSTREAM_RULES_WATCH", "0", NULL);
}

/* The scripted stream: one PQL alert (acme), one expansion alert (hooli),
 * a dead letter and a late event: 11 usage events, 1 account update. */
static void produce_stream(void)
{
    int64_t t = pql_now_ms() - PQL_MS_HOUR;
    h_produce_usage(kafka, USAGE, -1, "acme", "signed_up", "u1", t, H_NO_PROPS);
    h_produce_usage(kafka, USAGE, -1, "acme", "login", "u1", t + 1000, H_NO_PROPS);
    h_produce_usage(kafka, USAGE, -1, "acme", "login", "u2", t + 2000, H_NO_PROPS);
    h_produce_usage(kafka, USAGE, -1, "acme", "login", "u1", t + 3000, H_NO_PROPS);
    h_produce_usage(kafka, USAGE, -1, "acme", "teammate_invited", "u1", t + 4000, H_NO_PROPS);
    h_produce_usage(kafka, USAGE, -1, "acme", "login", "u2", t + 5000, H_NO_PROPS);
    h_produce_usage(kafka, USAGE, -1, "acme", "login", "u2", t - 60 * PQL_MS_DAY, H_NO_PROPS);
    h_produce_account(kafka, ACCTS, -1, "hooli", t, H_PROPS(H_NUM("seats", 2)));
    h_produce_usage(kafka, USAGE, -1, "hooli", "subscription_started", "u1", t, H_NO_PROPS);
    h_produce_usage(kafka, USAGE, -1, "hooli", "login", "u1", t + 10, H_NO_PROPS);
    h_produce_usage(kafka, USAGE, -1, "hooli", "login", "u2", t + 20, H_NO_PROPS);
    h_produce_raw(kafka, USAGE, 0, "acme", "\x02garbage!", 9);
    h_flush(kafka);
}

/* Polls GET path until the body contains every one of `want` (NULL
 * terminated) with status `status`.  @returns the last body (caller frees). */
static char *wait_http(h_proc *p, const char *path, int status, const char *const *want,
                       int timeout_ms)
{
    char *body = NULL;
    int got = 0;
    for (int waited = 0; waited <= timeout_ms; waited += 100) {
        free(body);
        body = h_http_get(p, path, &got);
        int all = body && got == status;
        for (size_t i = 0; all && want && want[i]; i++)
            all = strstr(body, want[i]) != NULL;
        if (all) return body;
        h_sleep_ms(100);
    }
    h_proc_dump_log(p, 40);
    cr_assert_fail("GET %s: wanted %d with every expected line; last answer %d:\n%s", path, status,
                   got, body ? body : "(none)");
    return NULL;
}

TestSuite(e2e, .init = e2e_setup, .fini = e2e_teardown, .timeout = 240);

Test(e2e, metrics_count_the_stream_exactly_and_accounts_match_rules_explain)
{
    redis = h_redis_start();
    produce_stream();
    h_proc *p = start("gh");
    const char *counts[] = {"pqlstream_events_consumed_total{topic=\"usage-events\"} 11\n"
                            "pqlstream_events_consumed_total{topic=\"account-updates\"} 1\n",
                            "pqlstream_events_dead_lettered_total{topic=\"usage-events\"} 1\n"
                            "pqlstream_events_dead_lettered_total{topic=\"account-updates\"} 0\n",
                            "pqlstream_events_late_total{topic=\"usage-events\"} 1\n"
                            "pqlstream_events_late_total{topic=\"account-updates\"} 0\n",
                            "pqlstream_assigned_partitions 4\n",
                            "pqlstream_outbox_alerts 0\n",
                            NULL};
    char *m = wait_http(p, "/metrics", 200, counts, 60000);
    /* alerts by rule and kind: exactly these two series (in the order their
       batches were written) */
    ASSERT_HAS(m, "\npqlstream_alerts_total{rule=\"team\",kind=\"PQL\"} 1\n");
    ASSERT_HAS(m, "\npqlstream_alerts_total{rule=\"seats\",kind=\"EXPANSION\"} 1\n");
    int series = 0;
    for (const char *at = m; (at = strstr(at, "\npqlstream_alerts_total{")); at++)
        series++;
    cr_assert_eq(series, 2, "%s", m);
    ASSERT_HAS(m, "pqlstream_rebalances_total{kind=\"assign\"} 1\n");
    ASSERT_HAS(m, "pqlstream_redis_up 1\n");
    ASSERT_HAS(m, "pqlstream_ruleset_info{version=\"9\"} 1\n");
    ASSERT_HAS(m, "pqlstream_redis_duration_seconds_count{operation=\"claim\"} 4\n");
    cr_assert(strstr(m, "pqlstream_redis_duration_seconds_count{operation=\"commit\"} "), "%s", m);
    cr_assert_not(strstr(m, "pqlstream_batch_duration_seconds_count 0\n"), "%s", m);
    free(m);

    /* consumer lag from librdkafka's statistics: caught up on every partition
       that has messages (an empty one has no known lag: no sample) */
    const char *lag[2 * PARTS + 1];
    char lines[2 * PARTS][96];
    size_t nlag = 0;
    for (int i = 0; i < 2 * PARTS; i++) {
        const char *topic = i < PARTS ? USAGE : ACCTS;
        if (h_high_watermark(kafka, topic, i % PARTS) <= 0) continue;
        snprintf(lines[nlag], sizeof(lines[nlag]),
                 "pqlstream_consumer_lag{topic=\"%s\",partition=\"%d\"} 0\n", topic, i % PARTS);
        lag[nlag] = lines[nlag];
        nlag++;
    }
    cr_assert(nlag >= 2);
    lag[nlag] = NULL;
    free(wait_http(p, "/metrics", 200, lag, 30000));

    const char *ready[] = {"\"status\": \"ready\"", NULL};
    free(wait_http(p, "/readyz", 200, ready, 30000));
    int status;
    char *body = h_http_get(p, "/healthz", &status);
    cr_assert_eq(status, 200, "%s", body);
    free(body);

    /* the account endpoint answers exactly what `rules explain --json` prints */
    body = h_http_get(p, "/v1/accounts/acme", &status);
    cr_assert_eq(status, 200, "%s", body);
    char redis_env[512], rules_env[600];
    snprintf(redis_env, sizeof(redis_env), "PQLSTREAM_REDIS=%s", h_redis_url(redis));
    snprintf(rules_env, sizeof(rules_env), "PQLSTREAM_RULES=%s", rules_path);
    const char *env[] = {redis_env, rules_env, NULL};
    const char *argv[] = {"pqlstream", "rules",  "explain",    "--account",
                          "acme",      "--json", "--group=gh", NULL};
    h_proc *cli = h_proc_start_argv(argv, env);
    cr_assert_eq(h_proc_wait(cli, 60000), 0);
    char *explained = h_proc_log(cli);
    h_proc_stop(cli);
    cr_assert_str_eq(body, explained);
    json_t *j = parse(body);
    cr_assert_str_eq(json_string_value(json_object_get(j, "account_id")), "acme");
    json_t *team = json_array_get(json_object_get(j, "rules"), 0);
    cr_assert_str_eq(json_string_value(json_object_get(team, "name")), "team");
    cr_assert_str_eq(json_string_value(json_object_get(team, "state")), "FIRED");
    json_decref(j);
    free(explained);
    free(body);

    body = h_http_get(p, "/v1/accounts/nobody", &status);
    cr_assert_eq(status, 404, "%s", body);
    ASSERT_HAS(body, "\"error\": \"unknown account\"");
    free(body);
    cr_assert_eq(h_proc_stop(p), 0);
}

Test(e2e, real_metrics_pass_promtool)
{
    if (!have_promtool())
        cr_skip_test("promtool is not installed (apt-get install prometheus; scripts/setup does): "
                     "the exposition format is not checked");
    redis = h_redis_start();
    produce_stream();
    h_proc *p = start("gp");
    const char *want[] = {"pqlstream_events_consumed_total{topic=\"usage-events\"} 11\n",
                          "pqlstream_consumer_lag{", NULL};
    char *m = wait_http(p, "/metrics", 200, want, 60000);
    char *complaints;
    cr_assert_eq(promtool_check(m, &complaints), 0, "promtool check metrics:\n%s\non:\n%s",
                 complaints, m);
    free(complaints);
    free(m);
    cr_assert_eq(h_proc_stop(p), 0);
}

Test(e2e, readyz_names_redis_while_it_is_stopped_or_killed)
{
    redis = h_redis_start_aof(); /* survives the kill below */
    produce_stream();
    h_proc *p = start("gr");
    const char *ready[] = {"\"status\": \"ready\"", NULL};
    const char *redis_down[] = {"\"failing\": [\n    \"redis\"", "unreachable: ping failed", NULL};
    free(wait_http(p, "/readyz", 200, ready, 60000));
    pid_t rpid = pql_redis_child_pid(h_redis_child(redis));

    kill(rpid, SIGSTOP);
    char *body = wait_http(p, "/readyz", 503, redis_down, 30000);
    json_t *j = parse(body);
    cr_assert_str_eq(json_string_value(json_object_get(j, "status")), "unready");
    json_decref(j);
    free(body);
    body = wait_http(p, "/metrics", 200, (const char *[]){"pqlstream_redis_up 0\n", NULL}, 10000);
    free(body);
    kill(rpid, SIGCONT);
    free(wait_http(p, "/readyz", 200, ready, 30000));

    kill(rpid, SIGKILL);
    free(wait_http(p, "/readyz", 503, redis_down, 30000));
    char err[256];
    cr_assert_eq(pql_redis_child_restart(h_redis_child(redis), err, sizeof(err)), 0, "%s", err);
    free(wait_http(p, "/readyz", 200, ready, 30000));
    int status;
    body = h_http_get(p, "/healthz", &status);
    cr_assert_eq(status, 200, "%s", body);
    free(body);
    cr_assert_eq(h_proc_stop(p), 0);
}

Test(e2e, an_address_in_use_refuses_to_start_and_says_what_to_do)
{
    redis = h_redis_start();
    pql_telemetry *t = pql_telemetry_new();
    char err[512];
    pql_http_opts o = {.addr = "127.0.0.1:0", .telemetry = t, .redis_url = h_redis_url(redis)};
    pql_http *taken = pql_http_start(&o, err, sizeof(err));
    cr_assert_not_null(taken, "%s", err);
    h_proc *p = h_proc_start("PQLSTREAM_BROKERS", h_kafka_bootstraps(kafka), "PQLSTREAM_REDIS",
                             h_redis_url(redis), "PQLSTREAM_RULES", rules_path, "PQLSTREAM_HTTP",
                             pql_http_addr(taken), NULL);
    cr_assert_eq(h_proc_wait(p, 30000), 1);
    char *log = h_proc_log(p), want[256];
    snprintf(want, sizeof(want),
             "pqlstream: cannot listen for HTTP on %s: Address already in use — set "
             "PQLSTREAM_HTTP to another address or off\n",
             pql_http_addr(taken));
    cr_assert(strstr(log, want), "missing:\n%s\nin:\n%s", want, log);
    free(log);
    h_proc_stop(p);

    /* off: no server at all */
    p = h_proc_start("PQLSTREAM_BROKERS", h_kafka_bootstraps(kafka), "PQLSTREAM_REDIS",
                     h_redis_url(redis), "PQLSTREAM_RULES", rules_path, "PQLSTREAM_HTTP", "off",
                     "PQLSTREAM_KAFKA_SESSION_TIMEOUT_MS", "6000", NULL);
    H_ASSERT_PROC(p, h_proc_wait_log(p, "partition assigned", 60000) == 0);
    log = h_proc_log(p);
    cr_assert_null(strstr(log, "http listening"), "%s", log);
    free(log);
    cr_assert_eq(h_proc_stop(p), 0);
    pql_http_stop(taken);
    pql_telemetry_destroy(t);
}
