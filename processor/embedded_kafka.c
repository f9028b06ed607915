/* embedded_kafka.c — librdkafka's mock cluster as the embedded default's broker.
 *
 * The mock cluster needs an rd_kafka_t for its book-keeping; we give it a
 * dedicated producer handle that nobody produces with, with a silent log
 * callback (it has no bootstrap servers of its own and would otherwise warn).
 * Topics are created with rd_kafka_mock_topic_create (the Admin API's
 * CreateTopics times out against the mock, FACTS.md).  The brokers listen on
 * random 127.0.0.1 ports chosen at every start. */
#include "embedded_kafka.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct pql_embedded_kafka {
    rd_kafka_t *rk;                /* owner handle the cluster is bound to */
    rd_kafka_mock_cluster_t *mock; /* destroyed before rk */
    char *bootstraps;              /* our copy of the cluster's list */
};

static void quiet_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    (void)rk;
    (void)level;
    (void)fac;
    (void)buf;
}

pql_embedded_kafka *pql_embedded_kafka_start(int nbrokers, const char *const *topics,
                                             int partitions, char *errstr, size_t errstr_size)
{
    pql_embedded_kafka *k = calloc(1, sizeof *k);
    rd_kafka_conf_t *conf = NULL;
    if (!k) {
        snprintf(errstr, errstr_size, "out of memory");
        return NULL;
    }
    if (nbrokers < 1) nbrokers = 1;
    if (partitions < 1) partitions = 1;

    conf = rd_kafka_conf_new();
    rd_kafka_conf_set_log_cb(conf, quiet_log);
    if (rd_kafka_conf_set(conf, "client.id", "pqlstream-embedded", errstr, errstr_size) !=
        RD_KAFKA_CONF_OK)
        goto fail;
    k->rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, errstr_size);
    if (!k->rk) goto fail;
    conf = NULL; /* owned by rk now */

    k->mock = rd_kafka_mock_cluster_new(k->rk, nbrokers);
    if (!k->mock) {
        snprintf(errstr, errstr_size, "cannot start the embedded Kafka (mock cluster)");
        goto fail;
    }
    for (size_t i = 0; topics && topics[i]; i++) {
        rd_kafka_resp_err_t err = rd_kafka_mock_topic_create(k->mock, topics[i], partitions, 1);
        if (err) {
            snprintf(errstr, errstr_size, "embedded Kafka: cannot create topic %s: %s", topics[i],
                     rd_kafka_err2str(err));
            goto fail;
        }
    }
    k->bootstraps = strdup(rd_kafka_mock_cluster_bootstraps(k->mock));
    if (!k->bootstraps) {
        snprintf(errstr, errstr_size, "out of memory");
        goto fail;
    }
    return k;

fail:
    if (conf) rd_kafka_conf_destroy(conf);
    pql_embedded_kafka_stop(k);
    return NULL;
}

const char *pql_embedded_kafka_bootstraps(const pql_embedded_kafka *k)
{
    return k->bootstraps;
}

rd_kafka_mock_cluster_t *pql_embedded_kafka_mock(pql_embedded_kafka *k)
{
    return k->mock;
}

void pql_embedded_kafka_stop(pql_embedded_kafka *k)
{
    if (!k) return;
    if (k->mock) rd_kafka_mock_cluster_destroy(k->mock);
    if (k->rk) rd_kafka_destroy(k->rk);
    free(k->bootstraps);
    free(k);
}
