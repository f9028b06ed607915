/* embedded_kafka.h — the embedded default's Kafka: librdkafka's mock cluster,
 * in-process, speaking the real protocol on 127.0.0.1 (kcat can use it).
 *
 * Used only when no brokers are configured (and by tests).  The mock cluster
 * keeps at most ~100k messages or 5 MB per partition (FACTS.md); it is a
 * demo and test broker, never a production one. */
#ifndef PQL_EMBEDDED_KAFKA_H
#define PQL_EMBEDDED_KAFKA_H

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

typedef struct pql_embedded_kafka pql_embedded_kafka;

/** Starts a mock cluster of `nbrokers` brokers and creates each topic of the
 *  NULL-terminated `topics` with `partitions` partitions (replication 1).
 *  @returns NULL on error with a reason. */
pql_embedded_kafka *pql_embedded_kafka_start(int nbrokers, const char *const *topics,
                                             int partitions, char *errstr, size_t errstr_size);

/** The bootstrap list ("127.0.0.1:PORT,…") clients and kcat connect to. */
const char *pql_embedded_kafka_bootstraps(const pql_embedded_kafka *k);

/** The mock cluster, for fault injection in tests. */
rd_kafka_mock_cluster_t *pql_embedded_kafka_mock(pql_embedded_kafka *k);

/** Stops the cluster and frees `k`.  NULL is fine. */
void pql_embedded_kafka_stop(pql_embedded_kafka *k);

#endif
