/* decode.c — Avro input messages to pql_event (contract in decode.h).
 *
 * How one message is read:
 *   1. The framing (plain, Confluent, AUTO) picks a plan: one writer schema
 *      resolved against our reader schema, prepared once per schema.
 *   2. When the writer schema is our reader schema (the common case), the
 *      bytes are read in one pass straight into the pql_event, checked as
 *      they are read (read_direct: strings point into the message, no copy,
 *      no avro-c; the profile showed avro_value_read at a quarter of the
 *      decode).  Bytes it refuses go to step 3 for the error's wording.
 *   3. Otherwise pql_avro_check_bytes() walks the bytes against the writer
 *      schema first: bounds, size limits and trailing bytes, without
 *      allocating (avro_bin.h says why avro-c must never see unchecked
 *      bytes); it names what is wrong, where.  Then avro-c reads them into
 *      the plan's generic value of the reader schema, reused from record to
 *      record, through a resolved writer.  The resolved
 *      writer value is made fresh for every record: avro-c 1.11.1's resolved
 *      map wrapper never clears its cache of children on reset, so a reused
 *      value grows and slows with every record (FACTS.md).
 *   4. The fields are picked out into a pql_event (strings point into the
 *      generic value, properties into the decoder's array, both reused by
 *      the next decode) and validated.  Both readers give the same event
 *      (test_decode compares them on random records), map keys included:
 *      avro-c cuts a key at its first NUL byte, and so does read_direct.
 *
 * A reader field with a default that the writer lacks: avro-c refuses it
 * (contrary to the Avro spec).  For such a writer the plan reads into our
 * reader schema minus those fields, and step 4 fills their defaults, taken
 * from our .avsc.  A writer lacking a field without a default is refused
 * when its schema is given, naming the field.
 *
 * AUTO framing: decode.h reasons that a plain record never starts with byte
 * 0, but a UsageEvent whose event_id is empty does.  So a message starting
 * with 0 whose schema id is not registered is tried as plain Avro before it
 * is reported as an unknown schema id. */
#include "decode.h"

#include "avro_bin.h"
/* embedded.h has a slash-star inside its first comment (-Wcomment). */
#include "embedded.h"

#include <avro.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The fields we read; a kind that lacks one has NULL as its name. */
enum { F_EVENT_ID, F_ACCOUNT_ID, F_USER_ID, F_EVENT, F_TIMESTAMP, F_PROPS, F_COUNT };

static const char *const usage_fields[F_COUNT] = {"event_id", "account_id", "user_id",
                                                  "event",    "timestamp",  "properties"};
static const char *const account_fields[F_COUNT] = {NULL, "account_id", NULL,
                                                    NULL, "timestamp",  "traits"};

/* The default of a reader field the writer lacks. */
typedef struct field_default {
    char *str; /* string default; NULL for null (user_id) */
    size_t len;
    int64_t num; /* timestamp default */
} field_default;

/* One writer schema, ready to read. */
typedef struct plan {
    uint32_t id;               /* Confluent schema id; 0 for plain Avro */
    pql_avro_check *check;     /* the writer schema, for step 2 */
    avro_schema_t dest_schema; /* our reader schema, minus defaulted fields */
    avro_value_iface_t *dest_class;
    avro_value_t dest;            /* generic value, reused */
    avro_value_iface_t *resolver; /* NULL: the writer equals our reader schema */
    int direct;                   /* read_direct() reads it (writer == reader) */
    int index[F_COUNT];           /* field's index in dest_schema; -1: use def */
    field_default def[F_COUNT];
} plan;

struct pql_decoder {
    pql_input_kind kind;
    pql_wire wire;
    pql_limits limits;
    const char *const *fields;
    const char *record; /* "UsageEvent", for messages */
    json_t *reader_doc; /* our .avsc, for the defaults */
    avro_schema_t reader;
    plan *plain; /* plain Avro messages */
    plan **ids;  /* registered Confluent schema ids */
    size_t nids;
    avro_reader_t in;
    pql_prop *props;
    size_t props_cap;
    int generic; /* pql_decoder_set_generic(): always read through avro-c */
};

void pql_limits_default(pql_limits *l)
{
    l->max_message = 1024 * 1024;
    l->max_string = 4096;
    l->max_properties = 256;
}

/* ---- plans ------------------------------------------------------------- */

static void plan_destroy(plan *p)
{
    if (!p) return;
    if (p->dest.self) avro_value_decref(&p->dest);
    if (p->dest_class) avro_value_iface_decref(p->dest_class);
    if (p->resolver) avro_value_iface_decref(p->resolver);
    if (p->dest_schema) avro_schema_decref(p->dest_schema);
    pql_avro_check_destroy(p->check);
    for (int f = 0; f < F_COUNT; f++)
        free(p->def[f].str);
    free(p);
}

static json_t *reader_field(const pql_decoder *d, const char *name)
{
    size_t i;
    json_t *field;
    json_array_foreach(json_object_get(d->reader_doc, "fields"), i, field)
    {
        const char *n = json_string_value(json_object_get(field, "name"));
        if (n && strcmp(n, name) == 0) return field;
    }
    return NULL;
}

/* Our reader schema for `writer`: every field the writer lacks must have a
 * default, and is left out (plan_defaults() fills it). */
static int reader_for_writer(const pql_decoder *d, avro_schema_t writer, avro_schema_t *out,
                             char *errstr, size_t size)
{
    json_t *doc = NULL, *fields;
    char *text = NULL;
    size_t i;
    int dropped = 0, rc = -1;
    json_t *field;
    if (!(doc = json_deep_copy(d->reader_doc))) goto nomem;
    fields = json_object_get(doc, "fields");
    for (i = 0; i < json_array_size(fields);) {
        field = json_array_get(fields, i);
        const char *name = json_string_value(json_object_get(field, "name"));
        if (!name || avro_schema_record_field_get_index(writer, name) >= 0) {
            i++;
            continue;
        }
        if (!json_object_get(field, "default")) {
            pql_set_err(errstr, size,
                        "writer schema lacks field %s, which %s requires (it has no default): "
                        "the writer must send it",
                        name, d->record);
            goto out;
        }
        json_array_remove(fields, i);
        dropped = 1;
    }
    if (!dropped) {
        *out = avro_schema_incref(d->reader);
        rc = 0;
        goto out;
    }
    if (!(text = json_dumps(doc, JSON_COMPACT))) goto nomem;
    if (avro_schema_from_json_length(text, strlen(text), out)) {
        pql_set_err(errstr, size, "cannot build the reader schema for this writer: %s",
                    avro_strerror());
        goto out;
    }
    rc = 0;
    goto out;
nomem:
    pql_set_err(errstr, size, "out of memory");
out:
    free(text);
    json_decref(doc);
    return rc;
}

/* Where each field sits in dest_schema, or its default when it is absent. */
static int plan_fields(const pql_decoder *d, plan *p, char *errstr, size_t size)
{
    for (int f = 0; f < F_COUNT; f++) {
        const char *name = d->fields[f];
        p->index[f] = -1;
        if (!name) continue;
        p->index[f] = avro_schema_record_field_get_index(p->dest_schema, name);
        if (p->index[f] >= 0) continue;
        json_t *field = reader_field(d, name);
        json_t *def = field ? json_object_get(field, "default") : NULL;
        field_default *fd = &p->def[f];
        if (f == F_TIMESTAMP && json_is_integer(def)) {
            fd->num = json_integer_value(def);
        } else if (f == F_PROPS && json_is_object(def) && json_object_size(def) == 0) {
            /* an empty map */
        } else if (f == F_USER_ID && json_is_null(def)) {
            /* null */
        } else if (f != F_TIMESTAMP && f != F_PROPS && json_is_string(def)) {
            fd->len = json_string_length(def);
            if (!(fd->str = malloc(fd->len + 1))) {
                pql_set_err(errstr, size, "out of memory");
                return -1;
            }
            memcpy(fd->str, json_string_value(def), fd->len + 1);
        } else {
            pql_set_err(errstr, size, "the default of %s.%s in our schema is not supported",
                        d->record, name);
            return -1;
        }
    }
    return 0;
}

/* A plan for `writer_json` (NULL: our reader schema). */
static plan *plan_new(const pql_decoder *d, const char *writer_json, char *errstr, size_t size)
{
    avro_schema_t writer = NULL;
    plan *p = calloc(1, sizeof *p);
    if (!p) {
        pql_set_err(errstr, size, "out of memory");
        return NULL;
    }
    if (!writer_json) {
        writer = avro_schema_incref(d->reader);
    } else if (avro_schema_from_json_length(writer_json, strlen(writer_json), &writer)) {
        writer = NULL;
        pql_set_err(errstr, size, "writer schema does not parse: %s", avro_strerror());
        goto fail;
    }
    if (!is_avro_record(writer)) {
        pql_set_err(errstr, size, "writer schema is a %s, expected the record %s",
                    avro_schema_type_name(writer), d->record);
        goto fail;
    }
    if (!(p->check = pql_avro_check_new(writer, errstr, size))) goto fail;
    if (avro_schema_equal(writer, d->reader)) {
        p->dest_schema = avro_schema_incref(d->reader);
        p->direct = 1;
    } else {
        if (strcmp(avro_schema_name(writer), d->record) != 0) {
            pql_set_err(errstr, size, "writer schema is the record %s, expected %s",
                        avro_schema_name(writer), d->record);
            goto fail;
        }
        if (reader_for_writer(d, writer, &p->dest_schema, errstr, size)) goto fail;
        p->resolver = avro_resolved_writer_new(writer, p->dest_schema);
        if (!p->resolver) {
            pql_set_err(errstr, size, "writer schema cannot be resolved against %s: %s", d->record,
                        avro_strerror());
            goto fail;
        }
    }
    p->dest_class = avro_generic_class_from_schema(p->dest_schema);
    if (!p->dest_class || avro_generic_value_new(p->dest_class, &p->dest)) {
        p->dest.self = NULL;
        pql_set_err(errstr, size, "cannot create a value of %s: %s", d->record, avro_strerror());
        goto fail;
    }
    if (plan_fields(d, p, errstr, size)) goto fail;
    avro_schema_decref(writer);
    return p;
fail:
    if (writer) avro_schema_decref(writer);
    plan_destroy(p);
    return NULL;
}

/* ---- decoder ------------------------------------------------------------ */

pql_decoder *pql_decoder_new(pql_input_kind kind, pql_wire wire, const char *writer_schema_json,
                             const pql_limits *limits, char *errstr, size_t errstr_size)
{
    const char *file = kind == PQL_INPUT_USAGE ? "UsageEvent.avsc" : "AccountUpdate.avsc";
    size_t len = 0;
    const char *text = pql_embedded_get(file, &len);
    json_error_t jerr;
    if (kind != PQL_INPUT_USAGE && kind != PQL_INPUT_ACCOUNT) {
        pql_set_err(errstr, errstr_size, "unknown input kind %d", (int)kind);
        return NULL;
    }
    pql_decoder *d = calloc(1, sizeof *d);
    if (!d) {
        pql_set_err(errstr, errstr_size, "out of memory");
        return NULL;
    }
    d->kind = kind;
    d->wire = wire;
    if (limits)
        d->limits = *limits;
    else
        pql_limits_default(&d->limits);
    d->fields = kind == PQL_INPUT_USAGE ? usage_fields : account_fields;
    d->record = kind == PQL_INPUT_USAGE ? "UsageEvent" : "AccountUpdate";
    if (!text) {
        pql_set_err(errstr, errstr_size, "schema %s is not compiled in", file);
        goto fail;
    }
    if (!(d->reader_doc = json_loadb(text, len, 0, &jerr))) {
        pql_set_err(errstr, errstr_size, "schemas/%s: %s", file, jerr.text);
        goto fail;
    }
    if (avro_schema_from_json_length(text, len, &d->reader)) {
        d->reader = NULL;
        pql_set_err(errstr, errstr_size, "schemas/%s: %s", file, avro_strerror());
        goto fail;
    }
    if (!(d->in = avro_reader_memory("", 0))) {
        pql_set_err(errstr, errstr_size, "out of memory");
        goto fail;
    }
    if (!(d->plain = plan_new(d, writer_schema_json, errstr, errstr_size))) goto fail;
    return d;
fail:
    pql_decoder_destroy(d);
    return NULL;
}

void pql_decoder_destroy(pql_decoder *d)
{
    if (!d) return;
    plan_destroy(d->plain);
    for (size_t i = 0; i < d->nids; i++)
        plan_destroy(d->ids[i]);
    free(d->ids);
    if (d->in) avro_reader_free(d->in);
    if (d->reader) avro_schema_decref(d->reader);
    json_decref(d->reader_doc);
    free(d->props);
    free(d);
}

void pql_decoder_set_generic(pql_decoder *d, int on)
{
    d->generic = on;
}

pql_err pql_decoder_register_schema(pql_decoder *d, uint32_t id, const char *schema_json,
                                    char *errstr, size_t errstr_size)
{
    char why[512] = "";
    if (!schema_json) {
        pql_set_err(errstr, errstr_size, "schema id %u: no schema text", id);
        return PQL_ERR_SCHEMA;
    }
    plan *p = plan_new(d, schema_json, why, sizeof why);
    if (!p) {
        pql_set_err(errstr, errstr_size, "schema id %u: %s", id, why);
        return PQL_ERR_SCHEMA;
    }
    p->id = id;
    for (size_t i = 0; i < d->nids; i++) {
        if (d->ids[i]->id == id) {
            plan_destroy(d->ids[i]);
            d->ids[i] = p;
            return PQL_OK;
        }
    }
    plan **ids = realloc(d->ids, (d->nids + 1) * sizeof *ids);
    if (!ids) {
        plan_destroy(p);
        pql_set_err(errstr, errstr_size, "out of memory");
        return PQL_ERR_NOMEM;
    }
    d->ids = ids;
    d->ids[d->nids++] = p;
    return PQL_OK;
}

/* ---- reading ------------------------------------------------------------ */

/* A string, or a [null, string] union: NULL for null. */
static void text_of(avro_value_t *v, const char **s, size_t *len)
{
    avro_value_t branch;
    if (avro_value_get_type(v) == AVRO_UNION) {
        if (avro_value_get_current_branch(v, &branch)) goto null;
        v = &branch;
    }
    size_t size = 0;
    if (avro_value_get_type(v) != AVRO_STRING || avro_value_get_string(v, s, &size)) goto null;
    if (size == 0 || !*s) *s = "";
    *len = size ? size - 1 : 0; /* avro-c counts the NUL */
    return;
null:
    *s = NULL;
    *len = 0;
}

static pql_value value_of(avro_value_t *v)
{
    avro_value_t branch;
    int b;
    int32_t i;
    int64_t l;
    float f;
    double dbl;
    const char *s;
    size_t size;
    if (avro_value_get_type(v) == AVRO_UNION) {
        if (avro_value_get_current_branch(v, &branch)) return pql_null();
        v = &branch;
    }
    switch (avro_value_get_type(v)) {
    case AVRO_BOOLEAN:
        return avro_value_get_boolean(v, &b) ? pql_null() : pql_bool(b);
    case AVRO_INT32:
        return avro_value_get_int(v, &i) ? pql_null() : pql_num(i);
    case AVRO_INT64:
        return avro_value_get_long(v, &l) ? pql_null() : pql_num((double)l);
    case AVRO_FLOAT:
        return avro_value_get_float(v, &f) ? pql_null() : pql_num(f);
    case AVRO_DOUBLE:
        return avro_value_get_double(v, &dbl) ? pql_null() : pql_num(dbl);
    case AVRO_STRING:
        if (avro_value_get_string(v, &s, &size) || size == 0) return pql_str("", 0);
        return pql_str(s, size - 1);
    default:
        return pql_null();
    }
}

/* Room for n properties in the decoder's array. */
static pql_err props_reserve(pql_decoder *d, size_t n, char *errstr, size_t size)
{
    if (n <= d->props_cap) return PQL_OK;
    size_t cap = d->props_cap ? d->props_cap * 2 : 16;
    while (cap < n)
        cap *= 2;
    pql_prop *props = realloc(d->props, cap * sizeof *props);
    if (!props) {
        pql_set_err(errstr, size, "out of memory");
        return PQL_ERR_NOMEM;
    }
    d->props = props;
    d->props_cap = cap;
    return PQL_OK;
}

static pql_err read_props(pql_decoder *d, avro_value_t *map, pql_event *out, char *errstr,
                          size_t size)
{
    size_t n = 0;
    avro_value_get_size(map, &n);
    pql_err err = props_reserve(d, n, errstr, size);
    if (err) return err;
    for (size_t i = 0; i < n; i++) {
        avro_value_t child;
        const char *key = "";
        if (avro_value_get_by_index(map, i, &child, &key)) {
            pql_set_err(errstr, size, "cannot read %s entry %zu: %s", d->fields[F_PROPS], i,
                        avro_strerror());
            return PQL_ERR_DECODE;
        }
        d->props[i].key = key ? key : "";
        d->props[i].key_len = strlen(d->props[i].key);
        d->props[i].value = value_of(&child);
    }
    out->props = n ? d->props : NULL;
    out->nprops = n;
    return PQL_OK;
}

static void field_text(plan *p, int f, const char **s, size_t *len)
{
    avro_value_t v;
    if (p->index[f] < 0 || avro_value_get_by_index(&p->dest, (size_t)p->index[f], &v, NULL)) {
        *s = p->def[f].str;
        *len = p->def[f].len;
        if (!*s && f != F_USER_ID) *s = "";
        return;
    }
    text_of(&v, s, len);
    if (!*s && f != F_USER_ID) *s = "";
}

/* The checks every decoded event passes (DESIGN §7). */
static pql_err validate(const pql_decoder *d, const pql_event *out, char *errstr, size_t size)
{
    if (out->account_id_len == 0) {
        pql_set_err(errstr, size, "account_id is empty");
        return PQL_ERR_INVALID;
    }
    if (d->kind == PQL_INPUT_USAGE && out->event_len == 0) {
        pql_set_err(errstr, size, "event is empty (usage event of account %.*s)",
                    (int)(out->account_id_len > 64 ? 64 : out->account_id_len), out->account_id);
        return PQL_ERR_INVALID;
    }
    if (out->timestamp < 0) {
        pql_set_err(errstr, size, "timestamp %lld is negative (expected ms since the epoch)",
                    (long long)out->timestamp);
        return PQL_ERR_INVALID;
    }
    return PQL_OK;
}

/* Step 4: the event out of the plan's value, validated. */
static pql_err extract(pql_decoder *d, plan *p, pql_event *out, char *errstr, size_t size)
{
    avro_value_t v;
    memset(out, 0, sizeof *out);
    out->kind = d->kind;
    field_text(p, F_ACCOUNT_ID, &out->account_id, &out->account_id_len);
    if (d->kind == PQL_INPUT_USAGE) {
        field_text(p, F_EVENT_ID, &out->event_id, &out->event_id_len);
        field_text(p, F_USER_ID, &out->user_id, &out->user_id_len);
        field_text(p, F_EVENT, &out->event, &out->event_len);
    }
    out->timestamp = p->def[F_TIMESTAMP].num;
    if (p->index[F_TIMESTAMP] >= 0 &&
        !avro_value_get_by_index(&p->dest, (size_t)p->index[F_TIMESTAMP], &v, NULL)) {
        if (avro_value_get_long(&v, &out->timestamp)) out->timestamp = -1;
    }
    if (p->index[F_PROPS] >= 0 &&
        !avro_value_get_by_index(&p->dest, (size_t)p->index[F_PROPS], &v, NULL)) {
        pql_err err = read_props(d, &v, out, errstr, size);
        if (err) return err;
    }
    return validate(d, out, errstr, size);
}

/* ---- the direct reader (writer schema == our reader schema) --------------
 *
 * One pass over the bytes, checking as it reads: it accepts exactly what
 * pql_avro_check_bytes() accepts for our schema (every varint at most 10
 * bytes, every length and block count in bounds and within limits.max_string
 * and limits.max_properties, every union index valid, no trailing byte) and
 * never reads past `end`.  It does not say what was wrong: on the first
 * problem it stops (c->bad) and decode_with() runs the checker over the same
 * bytes for the error a user reads, with its byte offset and field path.
 * So a valid message is walked once instead of twice (the check was 64% of
 * a decode's instructions), and a bad one gets the same error as before.
 * test_decode holds the two to the same verdict on mutated messages. */

typedef struct cursor {
    const uint8_t *p, *end;
    int bad;
    size_t max_string, max_entries; /* the decoder's limits */
} cursor;

static int64_t cur_long_slow(cursor *c)
{
    uint64_t v = 0;
    for (int shift = 0; shift < 70 && c->p < c->end; shift += 7) {
        uint8_t b = *c->p++;
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) return (int64_t)((v >> 1) ^ (~(v & 1) + 1));
    }
    c->bad = 1;
    return 0;
}

/* Most varints here are one byte (lengths, union indexes, counts). */
static inline int64_t cur_long(cursor *c)
{
    if (c->p < c->end && !(*c->p & 0x80)) {
        uint8_t b = *c->p++;
        return (int64_t)(b >> 1) ^ -(int64_t)(b & 1);
    }
    return cur_long_slow(c);
}

static const char *cur_string(cursor *c, size_t *len)
{
    int64_t n = cur_long(c);
    if (n < 0 || (uint64_t)n > (uint64_t)(c->end - c->p) || (uint64_t)n > c->max_string) {
        c->bad = 1;
        *len = 0;
        return "";
    }
    const char *s = (const char *)c->p;
    c->p += n;
    *len = (size_t)n;
    return s;
}

/* The property union [null, boolean, long, double, string]. */
static pql_value cur_value(cursor *c)
{
    size_t len;
    switch (cur_long(c)) {
    case 0:
        return pql_null();
    case 1:
        if (c->p >= c->end) break;
        return pql_bool(*c->p++ != 0);
    case 2:
        return pql_num((double)cur_long(c));
    case 3: {
        if (c->end - c->p < 8) break;
        uint64_t bits = 0;
        for (int i = 7; i >= 0; i--)
            bits = bits << 8 | c->p[i];
        c->p += 8;
        double dbl;
        memcpy(&dbl, &bits, sizeof dbl);
        return pql_num(dbl);
    }
    case 4: {
        const char *s = cur_string(c, &len);
        return pql_str(s, len);
    }
    }
    c->bad = 1;
    return pql_null();
}

static pql_err cur_props(pql_decoder *d, cursor *c, pql_event *out, char *errstr, size_t size)
{
    size_t n = 0;
    uint64_t total = 0; /* entries in every block, repeated keys included */
    for (;;) {
        int64_t count = cur_long(c);
        if (c->bad || count == 0) break;
        if (count < 0) {
            if (count == INT64_MIN || cur_long(c) < 0) { /* the block's byte size */
                c->bad = 1;
                break;
            }
            count = -count;
        }
        /* an entry takes a byte or more; the limit counts every block's */
        total += (uint64_t)count;
        if ((uint64_t)count > (uint64_t)(c->end - c->p) || total > c->max_entries) {
            c->bad = 1;
            break;
        }
        pql_err err = props_reserve(d, n + (size_t)count, errstr, size);
        if (err) return err;
        for (int64_t i = 0; i < count && !c->bad; i++) {
            pql_prop *pr = &d->props[n];
            pr->key = cur_string(c, &pr->key_len);
            const char *nul = memchr(pr->key, '\0', pr->key_len);
            if (nul) pr->key_len = (size_t)(nul - pr->key);
            pr->value = cur_value(c);
            /* As avro-c's map: a repeated key keeps its first place and
             * takes the last value. */
            size_t j = 0;
            while (j < n && !(d->props[j].key_len == pr->key_len &&
                              memcmp(d->props[j].key, pr->key, pr->key_len) == 0))
                j++;
            if (j < n)
                d->props[j].value = pr->value;
            else
                n++;
        }
    }
    out->props = n ? d->props : NULL;
    out->nprops = n;
    return PQL_OK;
}

static pql_err read_direct(pql_decoder *d, const uint8_t *buf, size_t len, pql_event *out,
                           char *errstr, size_t size)
{
    cursor c = {buf, buf + len, 0, d->limits.max_string, d->limits.max_properties};
    memset(out, 0, sizeof *out);
    out->kind = d->kind;
    if (d->kind == PQL_INPUT_USAGE) {
        out->event_id = cur_string(&c, &out->event_id_len);
        out->account_id = cur_string(&c, &out->account_id_len);
        switch (cur_long(&c)) { /* user_id: [null, string] */
        case 0:
            break;
        case 1:
            out->user_id = cur_string(&c, &out->user_id_len);
            break;
        default:
            c.bad = 1;
        }
        out->event = cur_string(&c, &out->event_len);
    } else {
        out->account_id = cur_string(&c, &out->account_id_len);
    }
    out->timestamp = cur_long(&c);
    pql_err err = cur_props(d, &c, out, errstr, size);
    if (err) return err;
    if (c.bad || c.p != c.end) return PQL_ERR_DECODE; /* decode_with() says why */
    return validate(d, out, errstr, size);
}

static pql_err decode_with(pql_decoder *d, plan *p, const uint8_t *buf, size_t len, pql_event *out,
                           char *errstr, size_t size)
{
    int direct = p->direct && !d->generic;
    pql_err err;
    /* The direct reader checks as it reads.  Bytes it refuses (not a valid
       record, or over the limits), and every other plan's, go to the
       checker, which says what is wrong and where. */
    if (direct && (err = read_direct(d, buf, len, out, errstr, size)) != PQL_ERR_DECODE) return err;
    if ((err = pql_avro_check_bytes(p->check, buf, len, d->limits.max_string,
                                    d->limits.max_properties, errstr, size)))
        return err;
    if (direct) { /* the checker passed what the reader refused: ours */
        pql_set_err(errstr, size,
                    "record could not be read although it checks as valid Avro (%zu bytes): "
                    "please report it with the message",
                    len);
        return PQL_ERR_DECODE;
    }
    avro_reader_memory_set_source(d->in, (const char *)buf, (int64_t)len);
    int rc;
    if (p->resolver) {
        avro_value_t rv;
        if (avro_resolved_writer_new_value(p->resolver, &rv)) {
            pql_set_err(errstr, size, "out of memory");
            return PQL_ERR_NOMEM;
        }
        avro_resolved_writer_set_dest(&rv, &p->dest);
        rc = avro_value_read(d->in, &rv);
        avro_value_decref(&rv);
    } else {
        rc = avro_value_read(d->in, &p->dest);
    }
    if (rc) {
        pql_set_err(errstr, size, "avro-c could not read the record: %s", avro_strerror());
        return PQL_ERR_DECODE;
    }
    return extract(d, p, out, errstr, size);
}

pql_err pql_decoder_decode(pql_decoder *d, const void *buf, size_t len, pql_event *out,
                           char *errstr, size_t errstr_size)
{
    const uint8_t *b = buf ? buf : (const uint8_t *)"";
    if (!buf) len = 0;
    if (len > d->limits.max_message) {
        pql_set_err(errstr, errstr_size, "message of %zu bytes exceeds limits.max_message=%zu", len,
                    d->limits.max_message);
        return PQL_ERR_LIMIT;
    }
    int framed =
        d->wire == PQL_WIRE_CONFLUENT || (d->wire == PQL_WIRE_AUTO && len >= 5 && b[0] == 0);
    if (!framed) return decode_with(d, d->plain, b, len, out, errstr, errstr_size);
    if (len < 5) {
        pql_set_err(errstr, errstr_size,
                    "message of %zu bytes is too short for the Confluent framing "
                    "(magic byte 0, 4-byte schema id)",
                    len);
        return PQL_ERR_DECODE;
    }
    if (b[0] != 0) {
        pql_set_err(errstr, errstr_size,
                    "magic byte 0x%02x is not the Confluent framing (0x00): check input.format",
                    b[0]);
        return PQL_ERR_DECODE;
    }
    uint32_t id = (uint32_t)b[1] << 24 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 8 | b[4];
    for (size_t i = 0; i < d->nids; i++)
        if (d->ids[i]->id == id)
            return decode_with(d, d->ids[i], b + 5, len - 5, out, errstr, errstr_size);
    if (d->wire == PQL_WIRE_AUTO && decode_with(d, d->plain, b, len, out, NULL, 0) == PQL_OK)
        return PQL_OK;
    pql_set_err(errstr, errstr_size,
                "unknown schema id %u: register it in input.schemas (or the writer's registry)",
                id);
    return PQL_ERR_SCHEMA;
}

/* ---- encoding ------------------------------------------------------------ */

static int put_text(pql_buf *b, const char *s, size_t len, int *bad)
{
    if (!s && len) *bad = 1;
    return pql_avro_put_string(b, s ? s : "", s ? len : 0);
}

pql_err pql_event_encode(const pql_event *ev, pql_buf *out, char *errstr, size_t errstr_size)
{
    size_t start = out->len;
    int rc = 0, bad = 0;
    if (ev->kind == PQL_INPUT_USAGE) {
        rc |= put_text(out, ev->event_id, ev->event_id_len, &bad);
        rc |= put_text(out, ev->account_id, ev->account_id_len, &bad);
        if (ev->user_id) {
            rc |= pql_avro_put_long(out, 1);
            rc |= put_text(out, ev->user_id, ev->user_id_len, &bad);
        } else {
            rc |= pql_avro_put_long(out, 0);
        }
        rc |= put_text(out, ev->event, ev->event_len, &bad);
    } else {
        rc |= put_text(out, ev->account_id, ev->account_id_len, &bad);
    }
    rc |= pql_avro_put_long(out, ev->timestamp);
    if (ev->nprops) {
        if (!ev->props) bad = 1;
        rc |= pql_avro_put_long(out, (int64_t)ev->nprops);
        for (size_t i = 0; !bad && i < ev->nprops; i++) {
            const pql_prop *pr = &ev->props[i];
            if (pr->value.type == PQL_V_STR && !pr->value.u.str.ptr && pr->value.u.str.len) {
                bad = 1;
                break;
            }
            rc |= put_text(out, pr->key, pr->key_len, &bad);
            rc |= pql_avro_put_value(out, &pr->value);
        }
    }
    rc |= pql_avro_put_long(out, 0);
    if (rc || bad) {
        out->len = start;
        if (out->data) out->data[start] = '\0';
        pql_set_err(errstr, errstr_size,
                    bad ? "event has a NULL string with a length" : "out of memory");
        return bad ? PQL_ERR_ARG : PQL_ERR_NOMEM;
    }
    return PQL_OK;
}
