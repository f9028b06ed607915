/* test_decode.c — decode.c: round trips, schema resolution, framing,
 * validation and hostile bytes (run under ASan/UBSan). */
#include "avro_bin.h"
#include "decode.h"

#include <avro.h>
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static char err[512];

/* ---- helpers ------------------------------------------------------------- */

static pql_decoder *decoder(pql_input_kind kind, pql_wire wire, const char *writer)
{
    pql_decoder *d = pql_decoder_new(kind, wire, writer, NULL, err, sizeof err);
    cr_assert(d, "pql_decoder_new: %s", err);
    return d;
}

static pql_event usage_event(const pql_prop *props, size_t nprops)
{
    pql_event ev = {0};
    ev.kind = PQL_INPUT_USAGE;
    ev.event_id = "evt-1";
    ev.event_id_len = 5;
    ev.account_id = "acme";
    ev.account_id_len = 4;
    ev.user_id = "u-7";
    ev.user_id_len = 3;
    ev.event = "feature_used";
    ev.event_len = 12;
    ev.timestamp = 1700000000123;
    ev.props = (pql_prop *)props;
    ev.nprops = nprops;
    return ev;
}

static void encode(const pql_event *ev, pql_buf *b)
{
    cr_assert_eq(pql_event_encode(ev, b, err, sizeof err), PQL_OK, "%s", err);
}

static int str_eq(const char *p, size_t len, const char *want)
{
    return p && len == strlen(want) && memcmp(p, want, len) == 0;
}

static const pql_prop *find_prop(const pql_event *ev, const char *key)
{
    for (size_t i = 0; i < ev->nprops; i++)
        if (str_eq(ev->props[i].key, ev->props[i].key_len, key)) return &ev->props[i];
    return NULL;
}

static void frame(pql_buf *out, uint32_t id, const pql_buf *body)
{
    uint8_t h[5] = {0, (uint8_t)(id >> 24), (uint8_t)(id >> 16), (uint8_t)(id >> 8), (uint8_t)id};
    pql_buf_append(out, h, 5);
    pql_buf_append(out, body->data, body->len);
}

/* Writer schema: ours plus session_id (middle), tags and origin (end). */
static const char *WRITER_EXTRA =
    "{\"type\":\"record\",\"name\":\"UsageEvent\",\"namespace\":\"io.pqlstream\",\"fields\":["
    "{\"name\":\"event_id\",\"type\":\"string\"},"
    "{\"name\":\"session_id\",\"type\":\"string\"},"
    "{\"name\":\"account_id\",\"type\":\"string\"},"
    "{\"name\":\"user_id\",\"type\":[\"null\",\"string\"],\"default\":null},"
    "{\"name\":\"event\",\"type\":\"string\"},"
    "{\"name\":\"timestamp\",\"type\":{\"type\":\"long\",\"logicalType\":\"timestamp-millis\"}},"
    "{\"name\":\"properties\",\"type\":{\"type\":\"map\",\"values\":"
    "[\"null\",\"boolean\",\"long\",\"double\",\"string\"]}},"
    "{\"name\":\"tags\",\"type\":{\"type\":\"array\",\"items\":\"string\"}},"
    "{\"name\":\"origin\",\"type\":{\"type\":\"record\",\"name\":\"Origin\",\"fields\":["
    "{\"name\":\"ip\",\"type\":\"string\"},{\"name\":\"port\",\"type\":\"int\"}]}}]}";

/* Writer schema without user_id (our field with a default). */
static const char *WRITER_NO_USER =
    "{\"type\":\"record\",\"name\":\"UsageEvent\",\"namespace\":\"io.pqlstream\",\"fields\":["
    "{\"name\":\"event_id\",\"type\":\"string\"},"
    "{\"name\":\"account_id\",\"type\":\"string\"},"
    "{\"name\":\"event\",\"type\":\"string\"},"
    "{\"name\":\"timestamp\",\"type\":\"long\"},"
    "{\"name\":\"properties\",\"type\":{\"type\":\"map\",\"values\":"
    "[\"null\",\"boolean\",\"long\",\"double\",\"string\"]}}]}";

/* Writer schema without account_id (no default: refused). */
static const char *WRITER_NO_ACCOUNT =
    "{\"type\":\"record\",\"name\":\"UsageEvent\",\"namespace\":\"io.pqlstream\",\"fields\":["
    "{\"name\":\"event_id\",\"type\":\"string\"},"
    "{\"name\":\"user_id\",\"type\":[\"null\",\"string\"],\"default\":null},"
    "{\"name\":\"event\",\"type\":\"string\"},"
    "{\"name\":\"timestamp\",\"type\":\"long\"},"
    "{\"name\":\"properties\",\"type\":{\"type\":\"map\",\"values\":"
    "[\"null\",\"boolean\",\"long\",\"double\",\"string\"]}}]}";

static void set_str(avro_value_t *rec, const char *field, const char *s)
{
    avro_value_t f;
    cr_assert_eq(avro_value_get_by_name(rec, field, &f, NULL), 0, "%s", field);
    cr_assert_eq(avro_value_set_string(&f, s), 0);
}

static void set_long(avro_value_t *rec, const char *field, int64_t v)
{
    avro_value_t f;
    cr_assert_eq(avro_value_get_by_name(rec, field, &f, NULL), 0, "%s", field);
    cr_assert_eq(avro_value_set_long(&f, v), 0);
}

/* Fills a writer record the way an upstream producer would, with avro-c. */
static void write_record(const char *schema_json, pql_buf *out)
{
    avro_schema_t schema;
    avro_value_iface_t *cls;
    avro_value_t rec, f, child, branch;
    size_t size;
    cr_assert_eq(avro_schema_from_json_length(schema_json, strlen(schema_json), &schema), 0, "%s",
                 avro_strerror());
    cls = avro_generic_class_from_schema(schema);
    cr_assert_eq(avro_generic_value_new(cls, &rec), 0);
    set_str(&rec, "event_id", "e-42");
    if (avro_value_get_by_name(&rec, "account_id", &f, NULL) == 0)
        cr_assert_eq(avro_value_set_string(&f, "globex"), 0);
    if (avro_value_get_by_name(&rec, "session_id", &f, NULL) == 0) {
        avro_value_set_string(&f, "sess-9");
        avro_value_get_by_name(&rec, "tags", &f, NULL);
        avro_value_append(&f, &child, NULL);
        avro_value_set_string(&child, "beta");
        avro_value_append(&f, &child, NULL);
        avro_value_set_string(&child, "eu");
        avro_value_get_by_name(&rec, "origin", &f, NULL);
        set_str(&f, "ip", "10.0.0.1");
        avro_value_get_by_name(&f, "port", &child, NULL);
        avro_value_set_int(&child, 443);
    }
    if (avro_value_get_by_name(&rec, "user_id", &f, NULL) == 0) {
        avro_value_set_branch(&f, 1, &branch);
        avro_value_set_string(&branch, "u-1");
    }
    set_str(&rec, "event", "login");
    set_long(&rec, "timestamp", 1700000000000);
    avro_value_get_by_name(&rec, "properties", &f, NULL);
    avro_value_add(&f, "seats", &child, NULL, NULL);
    avro_value_set_branch(&child, 2, &branch);
    avro_value_set_long(&branch, 19);
    avro_value_add(&f, "plan", &child, NULL, NULL);
    avro_value_set_branch(&child, 4, &branch);
    avro_value_set_string(&branch, "team");
    cr_assert_eq(avro_value_sizeof(&rec, &size), 0);
    char *bytes = malloc(size);
    avro_writer_t w = avro_writer_memory(bytes, (int64_t)size);
    cr_assert_eq(avro_value_write(w, &rec), 0, "%s", avro_strerror());
    pql_buf_append(out, bytes, size);
    avro_writer_free(w);
    free(bytes);
    avro_value_decref(&rec);
    avro_value_iface_decref(cls);
    avro_schema_decref(schema);
}

static void assert_writer_record(const pql_event *ev, int has_user)
{
    cr_assert(str_eq(ev->event_id, ev->event_id_len, "e-42"));
    cr_assert(str_eq(ev->account_id, ev->account_id_len, "globex"));
    if (has_user)
        cr_assert(str_eq(ev->user_id, ev->user_id_len, "u-1"));
    else
        cr_assert_null(ev->user_id);
    cr_assert(str_eq(ev->event, ev->event_len, "login"));
    cr_assert_eq(ev->timestamp, 1700000000000);
    cr_assert_eq(ev->nprops, 2);
    const pql_prop *seats = find_prop(ev, "seats"), *plan = find_prop(ev, "plan");
    cr_assert(seats && seats->value.type == PQL_V_NUM && seats->value.u.num == 19);
    cr_assert(plan && plan->value.type == PQL_V_STR);
    cr_assert(str_eq(plan->value.u.str.ptr, plan->value.u.str.len, "team"));
}

/* ---- round trips ------------------------------------------------------- */

Test(decode, usage_round_trip_all_value_types)
{
    const char *uni = "caf\xc3\xa9 \xe2\x9c\x93 \xf0\x9f\x9a\x80";
    pql_prop props[] = {
        {"none", 4, pql_null()},        {"yes", 3, pql_bool(1)},
        {"no", 2, pql_bool(0)},         {"count", 5, pql_num(42)},
        {"neg", 3, pql_num(-7)},        {"big", 3, pql_num(9007199254740992.0)},
        {"ratio", 5, pql_num(0.83)},    {"nan", 3, pql_num(NAN)},
        {"inf", 3, pql_num(-INFINITY)}, {"name", 4, pql_str(uni, strlen(uni))},
        {"empty", 5, pql_str("", 0)},   {"\xc3\xbc", 2, pql_str("x", 1)},
    };
    size_t n = sizeof props / sizeof props[0];
    pql_event ev = usage_event(props, n), got;
    ev.account_id = uni;
    ev.account_id_len = strlen(uni);
    pql_buf b = {0};
    encode(&ev, &b);
    pql_decoder *d = decoder(PQL_INPUT_USAGE, PQL_WIRE_AVRO, NULL);
    cr_assert_eq(pql_decoder_decode(d, b.data, b.len, &got, err, sizeof err), PQL_OK, "%s", err);
    cr_assert_eq(got.kind, PQL_INPUT_USAGE);
    cr_assert(str_eq(got.event_id, got.event_id_len, "evt-1"));
    cr_assert(str_eq(got.account_id, got.account_id_len, uni));
    cr_assert(str_eq(got.user_id, got.user_id_len, "u-3") == 0);
    cr_assert(str_eq(got.user_id, got.user_id_len, "u-7"));
    cr_assert(str_eq(got.event, got.event_len, "feature_used"));
    cr_assert_eq(got.timestamp, 1700000000123);
    cr_assert_eq(got.nprops, n);
    for (size_t i = 0; i < n; i++) {
        const pql_prop *p = find_prop(&got, props[i].key);
        cr_assert(p, "missing %s", props[i].key);
        cr_assert_eq(p->value.type, props[i].value.type, "%s", props[i].key);
        if (props[i].value.type == PQL_V_BOOL) cr_assert_eq(p->value.u.b, props[i].value.u.b);
        if (props[i].value.type == PQL_V_STR)
            cr_assert(str_eq(p->value.u.str.ptr, p->value.u.str.len, props[i].value.u.str.ptr));
        if (props[i].value.type == PQL_V_NUM && !isnan(props[i].value.u.num))
            cr_assert_eq(p->value.u.num, props[i].value.u.num, "%s", props[i].key);
    }
    cr_assert(isnan(find_prop(&got, "nan")->value.u.num));
    cr_assert(isinf(find_prop(&got, "inf")->value.u.num) &&
              find_prop(&got, "inf")->value.u.num < 0);

    /* Re-encoding the decoded event gives the same event back. */
    pql_buf b2 = {0};
    encode(&got, &b2);
    cr_assert_eq(pql_decoder_decode(d, b2.data, b2.len, &got, err, sizeof err), PQL_OK, "%s", err);
    cr_assert_eq(got.nprops, n);
    pql_buf_free(&b);
    pql_buf_free(&b2);
    pql_decoder_destroy(d);
}

Test(decode, usage_null_user_id_and_no_props)
{
    pql_event ev = usage_event(NULL, 0), got;
    ev.user_id = NULL;
    ev.user_id_len = 0;
    ev.event_id = "";
    ev.event_id_len = 0;
    pql_buf b = {0};
    encode(&ev, &b);
    pql_decoder *d = decoder(PQL_INPUT_USAGE, PQL_WIRE_AVRO, NULL);
    cr_assert_eq(pql_decoder_decode(d, b.data, b.len, &got, err, sizeof err), PQL_OK, "%s", err);
    cr_assert_null(got.user_id);
    cr_assert_eq(got.user_id_len, 0);
    cr_assert_eq(got.event_id_len, 0);
    cr_assert_eq(got.nprops, 0);
    pql_buf_free(&b);
    pql_decoder_destroy(d);
}

Test(decode, account_round_trip)
{
    pql_prop traits[] = {{"plan", 4, pql_str("enterprise", 10)},
                         {"seats", 5, pql_num(20)},
                         {"mrr", 3, pql_num(1234.5)},
                         {"churned", 7, pql_bool(0)},
                         {"owner", 5, pql_null()}};
    pql_event ev = {0}, got;
    ev.kind = PQL_INPUT_ACCOUNT;
    ev.account_id = "\xe6\x97\xa5\xe6\x9c\xac";
    ev.account_id_len = 6;
    ev.timestamp = 5;
    ev.props = traits;
    ev.nprops = 5;
    pql_buf b = {0};
    encode(&ev, &b);
    pql_decoder *d = decoder(PQL_INPUT_ACCOUNT, PQL_WIRE_AUTO, NULL);
    cr_assert_eq(pql_decoder_decode(d, b.data, b.len, &got, err, sizeof err), PQL_OK, "%s", err);
    cr_assert_eq(got.kind, PQL_INPUT_ACCOUNT);
    cr_assert(str_eq(got.account_id, got.account_id_len, "\xe6\x97\xa5\xe6\x9c\xac"));
    cr_assert_eq(got.timestamp, 5);
    cr_assert_null(got.event);
    cr_assert_null(got.user_id);
    cr_assert_eq(got.nprops, 5);
    cr_assert(str_eq(find_prop(&got, "plan")->value.u.str.ptr,
                     find_prop(&got, "plan")->value.u.str.len, "enterprise"));
    cr_assert_eq(find_prop(&got, "seats")->value.u.num, 20);
    cr_assert_eq(find_prop(&got, "mrr")->value.u.num, 1234.5);
    cr_assert_eq(find_prop(&got, "churned")->value.type, PQL_V_BOOL);
    cr_assert_eq(find_prop(&got, "owner")->value.type, PQL_V_NULL);
    pql_buf_free(&b);
    pql_decoder_destroy(d);
}

/* ---- writer schemas ------------------------------------------------------ */

Test(decode, writer_with_extra_fields_is_read)
{
    pql_buf b = {0};
    pql_event got;
    write_record(WRITER_EXTRA, &b);
    pql_decoder *d = decoder(PQL_INPUT_USAGE, PQL_WIRE_AVRO, WRITER_EXTRA);
    for (int i = 0; i < 3; i++) { /* the plan is reused record after record */
        cr_assert_eq(pql_decoder_decode(d, b.data, b.len, &got, err, sizeof err), PQL_OK, "%s",
                     err);
        assert_writer_record(&got, 1);
    }
    pql_buf_free(&b);
    pql_decoder_destroy(d);
}

Test(decode, writer_missing_defaulted_user_id_reads_null)
{
    pql_buf b = {0};
    pql_event got;
    write_record(WRITER_NO_USER, &b);
    pql_decoder *d = decoder(PQL_INPUT_USAGE, PQL_WIRE_AVRO, WRITER_NO_USER);
    cr_assert_eq(pql_decoder_decode(d, b.data, b.len, &got, err, sizeof err), PQL_OK, "%s", err);
    assert_writer_record(&got, 0);
    pql_buf_free(&b);
    pql_decoder_destroy(d);
}

Test(decode, writer_missing_account_id_is_refused)
{
    err[0] = '\0';
    pql_decoder *d =
        pql_decoder_new(PQL_INPUT_USAGE, PQL_WIRE_AVRO, WRITER_NO_ACCOUNT, NULL, err, sizeof err);
    cr_assert_null(d);
    cr_assert(strstr(err, "account_id"), "%s", err);
    cr_assert(strstr(err, "lacks"), "%s", err);
}

Test(decode, bad_writer_schemas_are_refused)
{
    cr_assert_null(pql_decoder_new(PQL_INPUT_USAGE, PQL_WIRE_AVRO, "{nope", NULL, err, sizeof err));
    cr_assert(strstr(err, "does not parse"), "%s", err);
    cr_assert_null(
        pql_decoder_new(PQL_INPUT_USAGE, PQL_WIRE_AVRO, "\"string\"", NULL, err, sizeof err));
    cr_assert(strstr(err, "not") || strstr(err, "expected"), "%s", err);
    /* account_id as a long cannot be read as our string */
    const char *wrong_type =
        "{\"type\":\"record\",\"name\":\"AccountUpdate\",\"fields\":["
        "{\"name\":\"account_id\",\"type\":\"long\"},{\"name\":\"timestamp\",\"type\":\"long\"},"
        "{\"name\":\"traits\",\"type\":{\"type\":\"map\",\"values\":\"string\"}}]}";
    cr_assert_null(
        pql_decoder_new(PQL_INPUT_ACCOUNT, PQL_WIRE_AVRO, wrong_type, NULL, err, sizeof err));
    cr_assert(strstr(err, "account_id"), "%s", err);
}

Test(decode, writer_with_other_union_order_is_resolved)
{
    const char *w =
        "{\"type\":\"record\",\"name\":\"AccountUpdate\",\"fields\":["
        "{\"name\":\"account_id\",\"type\":\"string\"},{\"name\":\"timestamp\",\"type\":\"int\"},"
        "{\"name\":\"traits\",\"type\":{\"type\":\"map\",\"values\":[\"string\",\"int\"]}}]}";
    pql_buf b = {0};
    pql_event got;
    pql_avro_put_string(&b, "acme", 4);
    pql_avro_put_long(&b, 99);
    pql_avro_put_long(&b, 2);
    pql_avro_put_string(&b, "plan", 4);
    pql_avro_put_long(&b, 0);
    pql_avro_put_string(&b, "pro", 3);
    pql_avro_put_string(&b, "seats", 5);
    pql_avro_put_long(&b, 1);
    pql_avro_put_long(&b, 12);
    pql_avro_put_long(&b, 0);
    pql_decoder *d = decoder(PQL_INPUT_ACCOUNT, PQL_WIRE_AVRO, w);
    cr_assert_eq(pql_decoder_decode(d, b.data, b.len, &got, err, sizeof err), PQL_OK, "%s", err);
    cr_assert_eq(got.timestamp, 99);
    cr_assert_eq(find_prop(&got, "seats")->value.u.num, 12);
    cr_assert_eq(find_prop(&got, "plan")->value.type, PQL_V_STR);
    pql_buf_free(&b);
    pql_decoder_destroy(d);
}

Test(decode, writer_null_where_we_need_a_string_is_a_decode_error)
{
    const char *w = "{\"type\":\"record\",\"name\":\"AccountUpdate\",\"fields\":["
                    "{\"name\":\"account_id\",\"type\":[\"null\",\"string\"]},"
                    "{\"name\":\"timestamp\",\"type\":\"long\"},"
                    "{\"name\":\"traits\",\"type\":{\"type\":\"map\",\"values\":\"string\"}}]}";
    pql_buf b = {0};
    pql_event got;
    pql_decoder *d = decoder(PQL_INPUT_ACCOUNT, PQL_WIRE_AVRO, w);
    pql_avro_put_long(&b, 0); /* account_id: null */
    pql_avro_put_long(&b, 5);
    pql_avro_put_long(&b, 0);
    cr_assert_eq(pql_decoder_decode(d, b.data, b.len, &got, err, sizeof err), PQL_ERR_DECODE);
    cr_assert(strstr(err, "incompatible"), "%s", err);
    pql_buf_reset(&b);
    pql_avro_put_long(&b, 1);
    pql_avro_put_string(&b, "acme", 4);
    pql_avro_put_long(&b, 5);
    pql_avro_put_long(&b, 1);
    pql_avro_put_string(&b, "plan", 4);
    pql_avro_put_string(&b, "pro", 3);
    pql_avro_put_long(&b, 0);
    cr_assert_eq(pql_decoder_decode(d, b.data, b.len, &got, err, sizeof err), PQL_OK, "%s", err);
    cr_assert(str_eq(got.account_id, got.account_id_len, "acme"));
    cr_assert_eq(find_prop(&got, "plan")->value.type, PQL_V_STR);
    pql_buf_free(&b);
    pql_decoder_destroy(d);
}

/* ---- framing ------------------------------------------------------------- */

Test(decode, confluent_registered_ids)
{
    pql_buf body7 = {0}, body8 = {0}, msg = {0};
    pql_event got;
    pql_event ev = usage_event(NULL, 0);
    write_record(WRITER_EXTRA, &body7);
    encode(&ev, &body8);
    pql_decoder *d = decoder(PQL_INPUT_USAGE, PQL_WIRE_CONFLUENT, NULL);
    cr_assert_eq(pql_decoder_register_schema(d, 7, WRITER_EXTRA, err, sizeof err), PQL_OK, "%s",
                 err);
    cr_assert_eq(pql_decoder_register_schema(d, 8, NULL, err, sizeof err), PQL_ERR_SCHEMA);
    cr_assert_eq(pql_decoder_register_schema(d, 9, WRITER_NO_ACCOUNT, err, sizeof err),
                 PQL_ERR_SCHEMA);
    cr_assert(strstr(err, "schema id 9") && strstr(err, "account_id"), "%s", err);
    const char *ours = "{\"type\":\"record\",\"name\":\"UsageEvent\",\"namespace\":"
                       "\"io.pqlstream\",\"fields\":["
                       "{\"name\":\"event_id\",\"type\":\"string\"},"
                       "{\"name\":\"account_id\",\"type\":\"string\"},"
                       "{\"name\":\"user_id\",\"type\":[\"null\",\"string\"]},"
                       "{\"name\":\"event\",\"type\":\"string\"},"
                       "{\"name\":\"timestamp\",\"type\":\"long\"},"
                       "{\"name\":\"properties\",\"type\":{\"type\":\"map\",\"values\":"
                       "[\"null\",\"boolean\",\"long\",\"double\",\"string\"]}}]}";
    cr_assert_eq(pql_decoder_register_schema(d, 70000, ours, err, sizeof err), PQL_OK, "%s", err);

    frame(&msg, 7, &body7);
    cr_assert_eq(pql_decoder_decode(d, msg.data, msg.len, &got, err, sizeof err), PQL_OK, "%s",
                 err);
    assert_writer_record(&got, 1);
    pql_buf_reset(&msg);
    frame(&msg, 70000, &body8);
    cr_assert_eq(pql_decoder_decode(d, msg.data, msg.len, &got, err, sizeof err), PQL_OK, "%s",
                 err);
    cr_assert(str_eq(got.event, got.event_len, "feature_used"));

    /* unknown id */
    pql_buf_reset(&msg);
    frame(&msg, 42, &body8);
    cr_assert_eq(pql_decoder_decode(d, msg.data, msg.len, &got, err, sizeof err), PQL_ERR_SCHEMA);
    cr_assert_str_eq(err, "unknown schema id 42: register it in input.schemas (or the writer's "
                          "registry)");
    /* not framed */
    cr_assert_eq(pql_decoder_decode(d, body8.data, body8.len, &got, err, sizeof err),
                 PQL_ERR_DECODE);
    cr_assert(strstr(err, "magic byte"), "%s", err);
    cr_assert_eq(pql_decoder_decode(d, "\0\0\0", 3, &got, err, sizeof err), PQL_ERR_DECODE);
    cr_assert(strstr(err, "too short"), "%s", err);
    pql_buf_free(&body7);
    pql_buf_free(&body8);
    pql_buf_free(&msg);
    pql_decoder_destroy(d);
}

Test(decode, auto_detects_plain_and_confluent)
{
    pql_buf plain = {0}, body = {0}, msg = {0};
    pql_event got;
    pql_event ev = usage_event(NULL, 0);
    encode(&ev, &plain);
    write_record(WRITER_EXTRA, &body);
    frame(&msg, 3, &body);
    pql_decoder *d = decoder(PQL_INPUT_USAGE, PQL_WIRE_AUTO, NULL);
    cr_assert_eq(pql_decoder_register_schema(d, 3, WRITER_EXTRA, err, sizeof err), PQL_OK);
    cr_assert_eq(pql_decoder_decode(d, plain.data, plain.len, &got, err, sizeof err), PQL_OK, "%s",
                 err);
    cr_assert(str_eq(got.event_id, got.event_id_len, "evt-1"));
    cr_assert_eq(pql_decoder_decode(d, msg.data, msg.len, &got, err, sizeof err), PQL_OK, "%s",
                 err);
    assert_writer_record(&got, 1);

    /* A plain event with an empty event_id starts with byte 0: still read. */
    ev.event_id = "";
    ev.event_id_len = 0;
    pql_buf_reset(&plain);
    encode(&ev, &plain);
    cr_assert_eq((unsigned char)plain.data[0], 0);
    cr_assert_eq(pql_decoder_decode(d, plain.data, plain.len, &got, err, sizeof err), PQL_OK, "%s",
                 err);
    cr_assert(str_eq(got.account_id, got.account_id_len, "acme"));

    /* Framed with an unknown id: reported as such. */
    pql_buf_reset(&msg);
    frame(&msg, 42, &body);
    cr_assert_eq(pql_decoder_decode(d, msg.data, msg.len, &got, err, sizeof err), PQL_ERR_SCHEMA);
    cr_assert(strstr(err, "unknown schema id 42"), "%s", err);
    pql_buf_free(&plain);
    pql_buf_free(&body);
    pql_buf_free(&msg);
    pql_decoder_destroy(d);
}

/* ---- validation and limits ------------------------------------------------ */

static pql_err decode_event(pql_decoder *d, const pql_event *ev)
{
    pql_buf b = {0};
    pql_event got;
    encode(ev, &b);
    err[0] = '\0';
    pql_err rc = pql_decoder_decode(d, b.data, b.len, &got, err, sizeof err);
    pql_buf_free(&b);
    return rc;
}

Test(decode, validation_errors)
{
    pql_decoder *d = decoder(PQL_INPUT_USAGE, PQL_WIRE_AVRO, NULL);
    pql_event ev = usage_event(NULL, 0);
    ev.account_id_len = 0;
    cr_assert_eq(decode_event(d, &ev), PQL_ERR_INVALID);
    cr_assert_str_eq(err, "account_id is empty");

    ev = usage_event(NULL, 0);
    ev.event_len = 0;
    cr_assert_eq(decode_event(d, &ev), PQL_ERR_INVALID);
    cr_assert(strncmp(err, "event is empty", 14) == 0, "%s", err);

    ev = usage_event(NULL, 0);
    ev.timestamp = -5;
    cr_assert_eq(decode_event(d, &ev), PQL_ERR_INVALID);
    cr_assert(strstr(err, "timestamp -5 is negative"), "%s", err);

    ev = usage_event(NULL, 0);
    ev.timestamp = 0;
    cr_assert_eq(decode_event(d, &ev), PQL_OK, "%s", err);
    pql_decoder_destroy(d);

    pql_decoder *a = decoder(PQL_INPUT_ACCOUNT, PQL_WIRE_AVRO, NULL);
    pql_event acc = {0};
    acc.kind = PQL_INPUT_ACCOUNT;
    acc.account_id = "";
    cr_assert_eq(decode_event(a, &acc), PQL_ERR_INVALID);
    cr_assert_str_eq(err, "account_id is empty");
    pql_decoder_destroy(a);
}

Test(decode, limits)
{
    pql_decoder *d = decoder(PQL_INPUT_USAGE, PQL_WIRE_AVRO, NULL);
    char *big = malloc(70000);
    memset(big, 'x', 70000);
    pql_prop note = {"note", 4, pql_str(big, 70000)};
    pql_event ev = usage_event(&note, 1);
    cr_assert_eq(decode_event(d, &ev), PQL_ERR_LIMIT);
    cr_assert_str_eq(err, "string of 70000 bytes in properties.note exceeds "
                          "limits.max_string=4096");

    note.value = pql_str(big, 4096); /* exactly at the limit: fine */
    cr_assert_eq(decode_event(d, &ev), PQL_OK, "%s", err);

    ev = usage_event(NULL, 0);
    ev.account_id = big;
    ev.account_id_len = 5000;
    cr_assert_eq(decode_event(d, &ev), PQL_ERR_LIMIT);
    cr_assert_str_eq(err, "string of 5000 bytes in account_id exceeds limits.max_string=4096");

    pql_prop *many = calloc(300, sizeof *many);
    char(*keys)[8] = calloc(300, 8);
    for (int i = 0; i < 300; i++) {
        many[i].key_len = (size_t)snprintf(keys[i], 8, "k%d", i);
        many[i].key = keys[i];
        many[i].value = pql_num(i);
    }
    ev = usage_event(many, 300);
    cr_assert_eq(decode_event(d, &ev), PQL_ERR_LIMIT);
    cr_assert_str_eq(err, "map of 300 entries in properties exceeds limits.max_properties=256");
    ev.nprops = 256;
    cr_assert_eq(decode_event(d, &ev), PQL_OK, "%s", err);
    pql_decoder_destroy(d);

    pql_limits lim;
    pql_limits_default(&lim);
    cr_assert_eq(lim.max_message, 1024 * 1024);
    lim.max_message = 100;
    d = pql_decoder_new(PQL_INPUT_USAGE, PQL_WIRE_AUTO, NULL, &lim, err, sizeof err);
    note.value = pql_str(big, 200);
    ev = usage_event(&note, 1);
    cr_assert_eq(decode_event(d, &ev), PQL_ERR_LIMIT);
    cr_assert(strstr(err, "exceeds limits.max_message=100"), "%s", err);
    pql_decoder_destroy(d);

    pql_decoder *a = decoder(PQL_INPUT_ACCOUNT, PQL_WIRE_AVRO, NULL);
    pql_event acc = {0};
    acc.kind = PQL_INPUT_ACCOUNT;
    acc.account_id = "acme";
    acc.account_id_len = 4;
    acc.props = many;
    acc.nprops = 300;
    cr_assert_eq(decode_event(a, &acc), PQL_ERR_LIMIT);
    cr_assert(strstr(err, "in traits"), "%s", err);
    pql_decoder_destroy(a);
    free(many);
    free(keys);
    free(big);
}

/* ---- hostile bytes ------------------------------------------------------- */

Test(decode, truncated_records_are_decode_errors)
{
    pql_prop props[] = {{"a", 1, pql_str("hello", 5)},
                        {"b", 1, pql_num(1.5)},
                        {"c", 1, pql_bool(1)},
                        {"d", 1, pql_null()},
                        {"e", 1, pql_num(300)}};
    pql_event ev = usage_event(props, 5), got;
    pql_buf b = {0}, w = {0};
    encode(&ev, &b);
    write_record(WRITER_EXTRA, &w);
    pql_decoder *plain = decoder(PQL_INPUT_USAGE, PQL_WIRE_AVRO, NULL);
    pql_decoder *autod = decoder(PQL_INPUT_USAGE, PQL_WIRE_AUTO, NULL);
    pql_decoder *resolved = decoder(PQL_INPUT_USAGE, PQL_WIRE_AVRO, WRITER_EXTRA);
    for (size_t n = 0; n < b.len; n++) {
        cr_assert_eq(pql_decoder_decode(plain, b.data, n, &got, err, sizeof err), PQL_ERR_DECODE,
                     "length %zu: %s", n, err);
        cr_assert_eq(pql_decoder_decode(autod, b.data, n, &got, err, sizeof err), PQL_ERR_DECODE,
                     "length %zu: %s", n, err);
    }
    for (size_t n = 0; n < w.len; n++)
        cr_assert_eq(pql_decoder_decode(resolved, w.data, n, &got, err, sizeof err), PQL_ERR_DECODE,
                     "length %zu: %s", n, err);
    cr_assert_eq(pql_decoder_decode(plain, b.data, b.len, &got, err, sizeof err), PQL_OK);
    cr_assert_eq(pql_decoder_decode(resolved, w.data, w.len, &got, err, sizeof err), PQL_OK);

    /* trailing bytes after a complete record */
    pql_buf_append(&b, "zz", 2);
    cr_assert_eq(pql_decoder_decode(plain, b.data, b.len, &got, err, sizeof err), PQL_ERR_DECODE);
    cr_assert(strstr(err, "2 trailing bytes"), "%s", err);
    pql_buf_free(&b);
    pql_buf_free(&w);
    pql_decoder_destroy(plain);
    pql_decoder_destroy(autod);
    pql_decoder_destroy(resolved);
}

Test(decode, lengths_that_lie_are_decode_errors)
{
    pql_decoder *d = decoder(PQL_INPUT_USAGE, PQL_WIRE_AVRO, NULL);
    pql_event got;
    pql_buf b = {0};
    /* event_id of -3 bytes: avro-c alone would write before its buffer */
    pql_avro_put_long(&b, -3);
    pql_buf_append(&b, "abcdefgh", 8);
    cr_assert_eq(pql_decoder_decode(d, b.data, b.len, &got, err, sizeof err), PQL_ERR_DECODE);
    cr_assert(strstr(err, "negative string length"), "%s", err);
    /* a string claiming 2^40 bytes */
    pql_buf_reset(&b);
    pql_avro_put_long(&b, (int64_t)1 << 40);
    pql_buf_append(&b, "abcdefgh", 8);
    cr_assert_eq(pql_decoder_decode(d, b.data, b.len, &got, err, sizeof err), PQL_ERR_DECODE);
    cr_assert(strstr(err, "runs past the end"), "%s", err);
    /* a map claiming a million entries in a few bytes */
    pql_buf_reset(&b);
    pql_avro_put_string(&b, "e", 1);
    pql_avro_put_string(&b, "a", 1);
    pql_avro_put_long(&b, 0);
    pql_avro_put_string(&b, "x", 1);
    pql_avro_put_long(&b, 1);
    pql_avro_put_long(&b, 1000000);
    pql_buf_append(&b, "\x02k\x00", 3);
    cr_assert_eq(pql_decoder_decode(d, b.data, b.len, &got, err, sizeof err), PQL_ERR_DECODE);
    cr_assert(strstr(err, "in properties"), "%s", err);
    /* a union branch out of range; an 11-byte varint */
    pql_buf_reset(&b);
    pql_avro_put_string(&b, "e", 1);
    pql_avro_put_string(&b, "a", 1);
    pql_avro_put_long(&b, 7);
    cr_assert_eq(pql_decoder_decode(d, b.data, b.len, &got, err, sizeof err), PQL_ERR_DECODE);
    cr_assert(strstr(err, "union index 7"), "%s", err);
    cr_assert_eq(pql_decoder_decode(d, "\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", 11, &got,
                                    err, sizeof err),
                 PQL_ERR_DECODE);
    cr_assert(strstr(err, "varint"), "%s", err);
    pql_buf_free(&b);
    pql_decoder_destroy(d);
}

static uint64_t rng = 0x9e3779b97f4a7c15ULL;
static uint64_t next_rand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

Test(decode, random_and_mutated_bytes_never_crash)
{
    pql_decoder *dec[4] = {decoder(PQL_INPUT_USAGE, PQL_WIRE_AUTO, NULL),
                           decoder(PQL_INPUT_USAGE, PQL_WIRE_AVRO, WRITER_EXTRA),
                           decoder(PQL_INPUT_ACCOUNT, PQL_WIRE_AUTO, NULL),
                           decoder(PQL_INPUT_USAGE, PQL_WIRE_CONFLUENT, NULL)};
    cr_assert_eq(pql_decoder_register_schema(dec[0], 1, WRITER_EXTRA, err, sizeof err), PQL_OK);
    cr_assert_eq(pql_decoder_register_schema(dec[3], 1, WRITER_EXTRA, err, sizeof err), PQL_OK);
    uint8_t buf[300];
    pql_event got;
    int ok = 0;
    for (int i = 0; i < 10000; i++) {
        size_t len = next_rand() % sizeof buf;
        for (size_t j = 0; j < len; j++)
            buf[j] = (uint8_t)next_rand();
        if (i % 4 == 3 && len >= 5) buf[0] = 0, buf[1] = buf[2] = buf[3] = 0, buf[4] = 1;
        for (int k = 0; k < 4; k++)
            ok += pql_decoder_decode(dec[k], buf, len, &got, err, sizeof err) == PQL_OK;
    }
    /* Valid records with a few bytes changed reach deeper. */
    pql_prop props[] = {{"plan", 4, pql_str("team", 4)},
                        {"n", 1, pql_num(3)},
                        {"r", 1, pql_num(0.5)},
                        {"b", 1, pql_bool(1)}};
    pql_event ev = usage_event(props, 4);
    pql_buf good = {0}, extra = {0};
    encode(&ev, &good);
    write_record(WRITER_EXTRA, &extra);
    for (int i = 0; i < 10000; i++) {
        const pql_buf *src = i % 2 ? &extra : &good;
        pql_decoder *d = i % 2 ? dec[1] : dec[0];
        memcpy(buf, src->data, src->len);
        for (int m = 0, nm = 1 + (int)(next_rand() % 4); m < nm; m++)
            buf[next_rand() % src->len] = (uint8_t)next_rand();
        size_t len = src->len - (next_rand() % 3 == 0 ? next_rand() % 4 : 0);
        ok += pql_decoder_decode(d, buf, len, &got, err, sizeof err) == PQL_OK;
    }
    cr_assert_eq(pql_decoder_decode(dec[0], good.data, good.len, &got, err, sizeof err), PQL_OK);
    cr_assert(ok > 0); /* some mutations keep a valid record */
    pql_buf_free(&good);
    pql_buf_free(&extra);
    for (int k = 0; k < 4; k++)
        pql_decoder_destroy(dec[k]);
}

/* ---- the direct reader equals avro-c --------------------------------------
 * A writer schema equal to ours is read in one pass without avro-c
 * (decode.c: read_direct); pql_decoder_set_generic() forces avro-c.  Both
 * must give the same outcome and the same event, byte for byte. */

static int same_value(pql_value a, pql_value b)
{
    if (a.type != b.type) return 0;
    switch (a.type) {
    case PQL_V_NUM:
        return memcmp(&a.u.num, &b.u.num, sizeof a.u.num) == 0;
    case PQL_V_BOOL:
        return a.u.b == b.u.b;
    case PQL_V_STR:
        return a.u.str.len == b.u.str.len && memcmp(a.u.str.ptr, b.u.str.ptr, a.u.str.len) == 0;
    default:
        return 1;
    }
}

static int same_text(const char *a, size_t alen, const char *b, size_t blen)
{
    if (!a || !b) return a == b;
    return alen == blen && memcmp(a, b, alen) == 0;
}

static void assert_same_event(const pql_event *a, const pql_event *b, int i)
{
    cr_assert_eq(a->kind, b->kind, "record %d", i);
    cr_assert(same_text(a->event_id, a->event_id_len, b->event_id, b->event_id_len), "record %d",
              i);
    cr_assert(same_text(a->account_id, a->account_id_len, b->account_id, b->account_id_len),
              "record %d", i);
    cr_assert(same_text(a->user_id, a->user_id_len, b->user_id, b->user_id_len), "record %d", i);
    cr_assert(same_text(a->event, a->event_len, b->event, b->event_len), "record %d", i);
    cr_assert_eq(a->timestamp, b->timestamp, "record %d", i);
    cr_assert_eq(a->nprops, b->nprops, "record %d", i);
    for (size_t k = 0; k < a->nprops; k++) {
        cr_assert(
            same_text(a->props[k].key, a->props[k].key_len, b->props[k].key, b->props[k].key_len),
            "record %d prop %zu", i, k);
        cr_assert(same_value(a->props[k].value, b->props[k].value), "record %d prop %zu", i, k);
    }
}

/* A random valid record of `kind`; its map sometimes in two blocks, one
 * with a negative count and a byte size, keys sometimes holding a NUL. */
static void random_record(pql_input_kind kind, pql_buf *b)
{
    static const char *names[] = {"plan", "seats", "x", "", "feature", "note"};
    char text[40];
    size_t tlen;
#define RAND_TEXT()                                                                                \
    do {                                                                                           \
        tlen = next_rand() % sizeof text;                                                          \
        for (size_t j = 0; j < tlen; j++)                                                          \
            text[j] = (char)(next_rand() % 4 == 0 ? next_rand() % 256 : 'a' + next_rand() % 26);   \
    } while (0)
    if (kind == PQL_INPUT_USAGE) {
        RAND_TEXT();
        pql_avro_put_string(b, text, tlen); /* event_id */
    }
    RAND_TEXT();
    pql_avro_put_string(b, text, tlen); /* account_id (may be empty: invalid) */
    if (kind == PQL_INPUT_USAGE) {
        if (next_rand() % 3 == 0) {
            pql_avro_put_long(b, 0);
        } else {
            pql_avro_put_long(b, 1);
            RAND_TEXT();
            pql_avro_put_string(b, text, tlen);
        }
        RAND_TEXT();
        pql_avro_put_string(b, text, tlen); /* event */
    }
    pql_avro_put_long(b, (int64_t)(next_rand() % 4000000000000ULL) - 1000); /* may be < 0 */
    size_t blocks = next_rand() % 3;
    for (size_t blk = 0; blk < blocks; blk++) {
        size_t n = 1 + next_rand() % 5;
        pql_buf entries = {0};
        for (size_t e = 0; e < n; e++) {
            const char *k = names[next_rand() % 6];
            if (next_rand() % 8 == 0) {
                char withnul[8] = {'k', '\0', 'z'};
                pql_avro_put_string(&entries, withnul, 3);
            } else {
                pql_avro_put_string(&entries, k, strlen(k));
            }
            pql_value v;
            switch (next_rand() % 6) {
            case 0:
                v = pql_null();
                break;
            case 1:
                v = pql_bool((int)(next_rand() % 2));
                break;
            case 2:
                v = pql_num((double)((int64_t)next_rand() >> (next_rand() % 64)));
                break;
            case 3:
                v = pql_num((double)next_rand() / 7.0);
                break;
            case 4:
                v = pql_num(-0.0);
                break;
            default:
                RAND_TEXT();
                v = pql_str(text, tlen);
            }
            pql_avro_put_value(&entries, &v);
        }
        if (next_rand() % 2) {
            pql_avro_put_long(b, -(int64_t)n);
            pql_avro_put_long(b, (int64_t)entries.len);
        } else {
            pql_avro_put_long(b, (int64_t)n);
        }
        pql_buf_append(b, entries.data, entries.len);
        pql_buf_free(&entries);
    }
    pql_avro_put_long(b, 0);
#undef RAND_TEXT
}

/* The direct reader checks as it reads and leaves the error's wording to the
 * checker (decode.c): with limits the random records cross (strings of up to
 * 39 bytes, up to 10 properties), its limit checks are held to the same
 * verdict and message as well. */
Test(decode, direct_reader_equals_avro_c)
{
    pql_limits tight = {.max_message = 1 << 20, .max_string = 20, .max_properties = 6};
    for (int run = 0; run < 4; run++) {
        int kind = run % 2 ? PQL_INPUT_ACCOUNT : PQL_INPUT_USAGE;
        const pql_limits *lim = run < 2 ? NULL : &tight;
        pql_decoder *direct =
            pql_decoder_new((pql_input_kind)kind, PQL_WIRE_AVRO, NULL, lim, err, sizeof err);
        pql_decoder *generic =
            pql_decoder_new((pql_input_kind)kind, PQL_WIRE_AVRO, NULL, lim, err, sizeof err);
        cr_assert(direct && generic, "%s", err);
        pql_decoder_set_generic(generic, 1);
        int limited = 0;
        int ok = 0, refused = 0;
        for (int i = 0; i < 20000; i++) {
            pql_buf b = {0};
            random_record((pql_input_kind)kind, &b);
            if (i % 3 == 0) /* and some damaged ones */
                for (int m = 0, nm = 1 + (int)(next_rand() % 3); m < nm; m++)
                    b.data[next_rand() % b.len] = (char)next_rand();
            pql_event e1, e2;
            char err2[512];
            pql_err r1 = pql_decoder_decode(direct, b.data, b.len, &e1, err, sizeof err);
            pql_err r2 = pql_decoder_decode(generic, b.data, b.len, &e2, err2, sizeof err2);
            cr_assert_eq(r1, r2, "record %d: direct %s (%s), avro-c %s (%s)", i, pql_err_str(r1),
                         err, pql_err_str(r2), err2);
            if (r1 == PQL_OK) {
                assert_same_event(&e1, &e2, i);
                ok++;
            } else {
                cr_assert_str_eq(err, err2, "record %d", i);
                refused++;
                limited += r1 == PQL_ERR_LIMIT;
            }
            pql_buf_free(&b);
        }
        cr_assert(ok > (lim ? 1000 : 5000) && refused > 1000, "run %d: %d read, %d refused", run,
                  ok, refused);
        cr_assert(!lim || limited > 1000, "run %d: only %d refused by a limit", run, limited);
        pql_decoder_destroy(direct);
        pql_decoder_destroy(generic);
    }
}
