/* sink.c — see sink.h. */
#include "sink.h"

#include "log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define RETRY_BACKOFF_MS 1000

typedef enum { ITEM_ALERT, ITEM_DLQ, ITEM_METRIC } item_kind;

/* What travels with a produced message as its opaque. */
typedef struct item {
    item_kind kind;
    int32_t partition;
    uint64_t generation;
    char alert_id[PQL_ALERT_ID_LEN + 1];
    char *key, *payload; /* alerts: kept for retries */
    size_t key_len, payload_len;
    int64_t retry_at;
    struct item *next;
} item;

struct pql_sink {
    rd_kafka_t *rk;
    rd_kafka_topic_t *alerts, *dlq, *metrics;
    pql_sink_callbacks cb;
    item *retry; /* failed alerts waiting to be produced again */
    size_t nretry;
};

static void item_free(item *it)
{
    if (!it) return;
    free(it->key);
    free(it->payload);
    free(it);
}

static void on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    (void)rk;
    pql_sink *s = opaque;
    item *it = m->_private;
    if (it->kind == ITEM_METRIC) {
        if (m->err)
            pql_warn("metric aggregate not delivered; it is emitted again next time",
                     "error=\"%s\"", rd_kafka_err2str(m->err));
        if (s->cb.metric_done) s->cb.metric_done(s->cb.opaque, !m->err);
        item_free(it);
        return;
    }
    if (it->kind == ITEM_DLQ) {
        if (m->err)
            pql_error("dead letter not delivered", "partition=%d error=\"%s\"", it->partition,
                      rd_kafka_err2str(m->err));
        if (s->cb.dlq_done) s->cb.dlq_done(s->cb.opaque, it->partition, it->generation, !m->err);
        item_free(it);
        return;
    }
    if (m->err) {
        pql_warn("alert not delivered, will retry", "alert_id=%s partition=%d error=\"%s\"",
                 it->alert_id, it->partition, rd_kafka_err2str(m->err));
        it->retry_at = pql_now_ms() + RETRY_BACKOFF_MS;
        it->next = s->retry;
        s->retry = it;
        s->nretry++;
        return;
    }
    if (s->cb.alert_delivered)
        s->cb.alert_delivered(s->cb.opaque, it->partition, it->generation, it->alert_id,
                              it->payload, it->payload_len);
    item_free(it);
}

pql_sink *pql_sink_new(const pql_config *cfg, const char *brokers, const pql_sink_callbacks *cb,
                       char *errstr, size_t errstr_size)
{
    pql_sink *s = calloc(1, sizeof(*s));
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    if (!s) goto fail;
    s->cb = *cb;
    if (rd_kafka_conf_set(conf, "bootstrap.servers", brokers, errstr, errstr_size) ||
        rd_kafka_conf_set(conf, "enable.idempotence", "true", errstr, errstr_size) ||
        rd_kafka_conf_set(conf, "linger.ms", "5", errstr, errstr_size) ||
        rd_kafka_conf_set(conf, "message.timeout.ms", "30000", errstr, errstr_size))
        goto fail;
    for (size_t i = 0; i < cfg->nkafka; i++) {
        /* consumer-only properties are for the consumer; skip them quietly */
        if (!strncmp(cfg->kafka[i].key, "group.", 6) ||
            !strncmp(cfg->kafka[i].key, "session.", 8) || !strncmp(cfg->kafka[i].key, "auto.", 5) ||
            !strncmp(cfg->kafka[i].key, "fetch.", 6) ||
            !strncmp(cfg->kafka[i].key, "partition.assignment", 20) ||
            !strncmp(cfg->kafka[i].key, "max.poll", 8) ||
            !strncmp(cfg->kafka[i].key, "queued.", 7) ||
            !strncmp(cfg->kafka[i].key, "heartbeat.", 10) ||
            !strncmp(cfg->kafka[i].key, "enable.auto", 11))
            continue;
        char e[256];
        if (rd_kafka_conf_set(conf, cfg->kafka[i].key, cfg->kafka[i].value, e, sizeof(e))) {
            snprintf(errstr, errstr_size, "kafka.%s: %s", cfg->kafka[i].key, e);
            goto fail;
        }
    }
    rd_kafka_conf_set_dr_msg_cb(conf, on_delivery);
    rd_kafka_conf_set_opaque(conf, s);
    rd_kafka_conf_set_log_cb(conf, pql_log_kafka);
    s->rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, errstr_size);
    if (!s->rk) goto fail;
    conf = NULL; /* owned by rk now */
    s->alerts = rd_kafka_topic_new(s->rk, cfg->topic_alerts, NULL);
    s->dlq = rd_kafka_topic_new(s->rk, cfg->topic_dlq, NULL);
    s->metrics = rd_kafka_topic_new(s->rk, cfg->topic_metrics, NULL);
    return s;
fail:
    if (conf) rd_kafka_conf_destroy(conf);
    if (s && s->rk) rd_kafka_destroy(s->rk);
    free(s);
    return NULL;
}

static pql_err produce_alert(pql_sink *s, item *it)
{
    if (rd_kafka_produce(s->alerts, RD_KAFKA_PARTITION_UA, 0, it->payload, it->payload_len, it->key,
                         it->key_len, it) == -1) {
        /* local queue full or similar: retry soon */
        it->retry_at = pql_now_ms() + 100;
        it->next = s->retry;
        s->retry = it;
        s->nretry++;
        rd_kafka_poll(s->rk, 0);
    }
    return PQL_OK;
}

pql_err pql_sink_alert(pql_sink *s, int32_t partition, uint64_t generation, const char *alert_id,
                       const char *key, size_t key_len, const char *payload, size_t payload_len)
{
    item *it = calloc(1, sizeof(*it));
    if (!it) return PQL_ERR_NOMEM;
    it->kind = ITEM_ALERT;
    it->partition = partition;
    it->generation = generation;
    snprintf(it->alert_id, sizeof(it->alert_id), "%s", alert_id);
    it->key = malloc(key_len + 1);
    it->payload = malloc(payload_len + 1);
    if (!it->key || !it->payload) {
        item_free(it);
        return PQL_ERR_NOMEM;
    }
    memcpy(it->key, key, key_len);
    memcpy(it->payload, payload, payload_len);
    it->key_len = key_len;
    it->payload_len = payload_len;
    return produce_alert(s, it);
}

pql_err pql_sink_dlq(pql_sink *s, uint64_t generation, const rd_kafka_message_t *msg, pql_err code,
                     const char *reason)
{
    item *it = calloc(1, sizeof(*it));
    if (!it) return PQL_ERR_NOMEM;
    it->kind = ITEM_DLQ;
    it->partition = msg->partition;
    it->generation = generation;
    rd_kafka_headers_t *orig = NULL, *hdrs;
    if (rd_kafka_message_headers(msg, &orig) == RD_KAFKA_RESP_ERR_NO_ERROR && orig)
        hdrs = rd_kafka_headers_copy(orig);
    else
        hdrs = rd_kafka_headers_new(6);
    char part[16], off[24];
    snprintf(part, sizeof(part), "%d", (int)msg->partition);
    snprintf(off, sizeof(off), "%lld", (long long)msg->offset);
    rd_kafka_header_add(hdrs, "pql.error", -1, reason, -1);
    rd_kafka_header_add(hdrs, "pql.error.code", -1, pql_err_str(code), -1);
    rd_kafka_header_add(hdrs, "pql.source.topic", -1, rd_kafka_topic_name(msg->rkt), -1);
    rd_kafka_header_add(hdrs, "pql.source.partition", -1, part, -1);
    rd_kafka_header_add(hdrs, "pql.source.offset", -1, off, -1);
    rd_kafka_resp_err_t err = rd_kafka_producev(
        s->rk, RD_KAFKA_V_RKT(s->dlq), RD_KAFKA_V_VALUE(msg->payload, msg->len),
        RD_KAFKA_V_KEY(msg->key, msg->key_len), RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
        RD_KAFKA_V_HEADERS(hdrs), RD_KAFKA_V_OPAQUE(it), RD_KAFKA_V_END);
    if (err) {
        rd_kafka_headers_destroy(hdrs);
        item_free(it);
        return PQL_ERR_IO;
    }
    return PQL_OK;
}

pql_err pql_sink_metric(pql_sink *s, const char *key, size_t key_len, const void *payload,
                        size_t payload_len)
{
    item *it = calloc(1, sizeof(*it));
    if (!it) return PQL_ERR_NOMEM;
    it->kind = ITEM_METRIC;
    if (rd_kafka_produce(s->metrics, RD_KAFKA_PARTITION_UA, RD_KAFKA_MSG_F_COPY, (void *)payload,
                         payload_len, key, key_len, it) == -1) {
        item_free(it);
        return PQL_ERR_IO;
    }
    return PQL_OK;
}

void pql_sink_poll(pql_sink *s, int timeout_ms)
{
    rd_kafka_poll(s->rk, timeout_ms);
    if (!s->retry) return;
    int64_t now = pql_now_ms();
    item *due = NULL, **pp = &s->retry;
    while (*pp) {
        item *it = *pp;
        if (it->retry_at <= now) {
            *pp = it->next;
            it->next = due;
            due = it;
            s->nretry--;
        } else {
            pp = &it->next;
        }
    }
    while (due) {
        item *it = due;
        due = it->next;
        it->next = NULL;
        produce_alert(s, it);
    }
}

int pql_sink_flush(pql_sink *s, int timeout_ms)
{
    rd_kafka_flush(s->rk, timeout_ms);
    return rd_kafka_outq_len(s->rk);
}

size_t pql_sink_retrying(const pql_sink *s)
{
    return s->nretry;
}

void pql_sink_destroy(pql_sink *s, int timeout_ms)
{
    if (!s) return;
    rd_kafka_flush(s->rk, timeout_ms);
    while (s->retry) {
        item *it = s->retry;
        s->retry = it->next;
        item_free(it);
    }
    rd_kafka_topic_destroy(s->alerts);
    rd_kafka_topic_destroy(s->dlq);
    rd_kafka_topic_destroy(s->metrics);
    rd_kafka_destroy(s->rk);
    free(s);
}
