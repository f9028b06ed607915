/* decode.h — input messages (Avro bytes) to plain event structs.
 *
 * Pure core: bytes in, a pql_event out; no Kafka handle.  One decoder per
 * input kind (usage events, account updates), owned by one thread.
 *
 * Wire formats (config `input.format`):
 *   - PQL_WIRE_AVRO:      plain Avro binary written with the configured writer
 *                         schema (default: our reader schema);
 *   - PQL_WIRE_CONFLUENT: magic byte 0, 4-byte big-endian schema id, Avro
 *                         binary; the id must have been registered with
 *                         pql_decoder_register_schema();
 *   - PQL_WIRE_AUTO:      Confluent framing when the first byte is 0 and the
 *                         message is at least 5 bytes long, else plain Avro.
 *                         (A plain UsageEvent/AccountUpdate never starts with
 *                         0: that would be an empty first string, rejected.)
 * Writer schemas are resolved against our reader schemas
 * (schemas/UsageEvent.avsc, schemas/AccountUpdate.avsc, compiled in) by Avro
 * schema resolution, so a writer with extra fields is read.  When the writer
 * schema equals the reader schema, records are read without resolution.
 *
 * Validation (DESIGN §7) happens here too, so every bad input has one place
 * and one reason: empty account_id, empty event name, negative timestamp,
 * strings over limits.max_string, maps over limits.max_properties, messages
 * over limits.max_message.  (Future-skew needs the wall clock: task.c checks.) */
#ifndef PQL_DECODE_H
#define PQL_DECODE_H

#include "common.h"

typedef enum pql_input_kind {
    PQL_INPUT_USAGE = 0,   /* UsageEvent */
    PQL_INPUT_ACCOUNT = 1, /* AccountUpdate */
} pql_input_kind;

typedef enum pql_wire {
    PQL_WIRE_AUTO = 0,
    PQL_WIRE_AVRO,
    PQL_WIRE_CONFLUENT,
} pql_wire;

typedef struct pql_limits {
    size_t max_message;    /* bytes of one Kafka message value (default 1 MiB) */
    size_t max_string;     /* bytes of any one string (default 4096) */
    size_t max_properties; /* entries of properties / traits (default 256) */
} pql_limits;

/** Fills the defaults listed above. */
void pql_limits_default(pql_limits *l);

/* One map entry of `properties` (usage) or `traits` (account update). */
typedef struct pql_prop {
    const char *key;
    size_t key_len;
    pql_value value; /* long → PQL_V_NUM; strings point into the decoder */
} pql_prop;

/* A decoded message.  Every pointer points into the decoder or into the
 * message bytes given to pql_decoder_decode(), and stays valid until the next
 * pql_decoder_decode() call, pql_decoder_destroy() or the release of those
 * bytes, whichever comes first.  Strings are (pointer, length), not
 * NUL-terminated. */
typedef struct pql_event {
    pql_input_kind kind;
    const char *event_id; /* usage only; may be empty */
    size_t event_id_len;
    const char *account_id; /* never empty */
    size_t account_id_len;
    const char *user_id; /* usage only; NULL when null */
    size_t user_id_len;
    const char *event; /* usage only; never empty */
    size_t event_len;
    int64_t timestamp; /* event time, ms since epoch, >= 0 */
    pql_prop *props;   /* properties (usage) or traits (account) */
    size_t nprops;
} pql_event;

typedef struct pql_decoder pql_decoder;

/** Creates a decoder for `kind`.  `writer_schema_json` is the schema plain Avro
 *  messages were written with (NULL: our reader schema).
 *  @returns NULL on error with a reason in errstr (schema does not parse, or
 *  cannot be resolved against ours: names the field). */
pql_decoder *pql_decoder_new(pql_input_kind kind, pql_wire wire, const char *writer_schema_json,
                             const pql_limits *limits, char *errstr, size_t errstr_size);
void pql_decoder_destroy(pql_decoder *d);

/** Registers the writer schema of Confluent schema id `id`.
 *  @returns PQL_OK or PQL_ERR_SCHEMA with a reason. */
pql_err pql_decoder_register_schema(pql_decoder *d, uint32_t id, const char *schema_json,
                                    char *errstr, size_t errstr_size);

/** 1: read every record through avro-c's generic value, even when the writer
 *  schema is ours (which is otherwise read in one pass, without avro-c).
 *  Both give the same event; tests compare them. */
void pql_decoder_set_generic(pql_decoder *d, int on);

/** Decodes and validates one message value.
 *  @returns PQL_OK and fills *out; or PQL_ERR_DECODE (not our Avro, truncated),
 *  PQL_ERR_SCHEMA (unknown schema id), PQL_ERR_INVALID (contract violated),
 *  PQL_ERR_LIMIT (over a limit), each with a one-line reason in errstr that a
 *  person can act on ("account_id is empty", "string of 70000 bytes in
 *  properties.note exceeds limits.max_string=4096"). */
pql_err pql_decoder_decode(pql_decoder *d, const void *buf, size_t len, pql_event *out,
                           char *errstr, size_t errstr_size);

/** Encodes `ev` as plain Avro with our reader schema (used by the sample
 *  workload, tests and the benchmark).  Appends to `out`. @returns PQL_OK. */
pql_err pql_event_encode(const pql_event *ev, pql_buf *out, char *errstr, size_t errstr_size);

#endif
