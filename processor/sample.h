/* sample.h — the bundled sample workload of the embedded default.
 *
 * A background thread that plays a small SaaS product's traffic into the
 * usage and account-update topics (Avro, keyed by account_id), in event time
 * = wall clock: accounts sign up (with channel, plan, seats traits), log in,
 * use features, invite teammates, view pricing, call the API; some convert.
 * Within seconds a few accounts cross the thresholds of rules/pql.yaml, so
 * PQL and expansion alerts appear. */
#ifndef PQL_SAMPLE_H
#define PQL_SAMPLE_H

#include <stddef.h>
#include <stdint.h>

typedef struct pql_sample pql_sample;

typedef struct pql_sample_opts {
    const char *bootstraps; /* Kafka bootstrap servers */
    const char *usage_topic;
    const char *accounts_topic;
    int rate;           /* events per second (default 200) */
    int accounts;       /* number of accounts (default 200) */
    uint64_t seed;      /* PRNG seed (0: time-based) */
    int64_t max_events; /* stop after this many (0: run until stopped) */
} pql_sample_opts;

/** Starts the generator thread.  @returns NULL on error with a reason. */
pql_sample *pql_sample_start(const pql_sample_opts *opts, char *errstr, size_t errstr_size);

/** Events produced so far (usage + account updates). */
int64_t pql_sample_produced(const pql_sample *s);

/** Stops the thread, flushes its producer, frees `s`.  NULL is fine. */
void pql_sample_stop(pql_sample *s);

#endif
