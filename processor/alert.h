/* alert.h — the Alert record (schemas/Alert.avsc) and its encodings.
 *
 * Pure core.  An alert is built by account.c when a rule fires, written to the
 * partition's outbox in Redis (as encoded bytes) and produced onto the alert
 * topic keyed by account_id.  Encodings: Avro binary (default) and JSON
 * (output.format: json, for HTTP-style consumers).
 *
 * alert_id is stable (DESIGN §5): derived from (account_id, rule, episode),
 * where the episode is the rule's arming sequence number for that account
 * (plus the tier for a weighted rule's tier rise), so a re-delivered alert
 * carries the same id and a CRM connector can upsert on it. */
#ifndef PQL_ALERT_H
#define PQL_ALERT_H

#include "common.h"

#include <jansson.h>

typedef enum pql_alert_kind {
    PQL_ALERT_PQL = 0,
    PQL_ALERT_EXPANSION = 1,
} pql_alert_kind;

#define PQL_ALERT_ID_LEN 32 /* hex characters */

typedef struct pql_alert {
    char alert_id[PQL_ALERT_ID_LEN + 1];
    const char *account_id;
    size_t account_id_len;
    pql_alert_kind kind;
    const char *rule;
    const char *ruleset_version;
    const char *model; /* "threshold" | "weighted" | "logistic" */
    int has_score;
    double score;
    const char *tier; /* NULL, "HIGH", "MEDIUM", "LOW" */
    int64_t triggered_at;
    int64_t emitted_at;
    int has_sla_due_at;
    int64_t sla_due_at;
    const char *const *reasons;
    size_t nreasons;
    const char *const *signal_names; /* map<string,double> */
    const double *signal_values;     /* finite (nulls are left out of the map) */
    size_t nsignals;
    const char *const *trait_keys; /* map<string, [null,boolean,long,double,string]> */
    const pql_value *trait_values; /* integral numbers are written as long */
    size_t ntraits;
    int has_signed_up_at;
    int64_t signed_up_at;
    int has_time_to_pql_ms;
    int64_t time_to_pql_ms;
} pql_alert;

/** Writes the stable id of (account, rule, episode) into out (33 bytes):
 *  32 lowercase hex characters of a 128-bit hash (two independent 64-bit
 *  FNV-1a variants over the length-prefixed inputs). */
void pql_alert_id(const char *account_id, size_t account_id_len, const char *rule,
                  const char *episode, char out[PQL_ALERT_ID_LEN + 1]);

/** Appends the Avro binary encoding (schemas/Alert.avsc) of `a` to `out`. */
pql_err pql_alert_encode_avro(const pql_alert *a, pql_buf *out, char *errstr, size_t errstr_size);

/** Appends the JSON encoding of `a` (same field names; nulls as null). */
pql_err pql_alert_encode_json(const pql_alert *a, pql_buf *out, char *errstr, size_t errstr_size);

/** Decodes an Avro-encoded alert into a JSON object (for tests, the console
 *  printer and `rules explain`).  @returns a new reference, or NULL on error. */
json_t *pql_alert_avro_to_json(const void *buf, size_t len, char *errstr, size_t errstr_size);

#endif
