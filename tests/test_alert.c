/* test_alert.c — alert.c: stable ids, Avro round trip, JSON text. */
#include "alert.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static char err[512];

static const char *reasons[] = {"Used the core feature 7 times", "Invited 2 teammates"};
static const char *sig_names[] = {"core_uses", "active_days_7d", "ratio"};
static const double sig_values[] = {7, 3, 0.83};
static const char *trait_keys[] = {"plan", "seats", "mrr", "trial", "owner", "weird", "huge"};

/* A fully set alert. */
static pql_alert full_alert(pql_value *traits)
{
    traits[0] = pql_str("team", 4);
    traits[1] = pql_num(20);
    traits[2] = pql_num(99.5);
    traits[3] = pql_bool(1);
    traits[4] = pql_null();
    traits[5] = pql_num(NAN);
    traits[6] = pql_num(1e20);
    pql_alert a = {0};
    pql_alert_id("acme", 4, "seat_saturation", "3:HIGH", a.alert_id);
    a.account_id = "acme";
    a.account_id_len = 4;
    a.kind = PQL_ALERT_EXPANSION;
    a.rule = "seat_saturation";
    a.ruleset_version = "v7";
    a.model = "weighted";
    a.has_score = 1;
    a.score = 0.91;
    a.tier = "HIGH";
    a.triggered_at = 1700000000000;
    a.emitted_at = 1700000000250;
    a.has_sla_due_at = 1;
    a.sla_due_at = 1700003600000;
    a.reasons = reasons;
    a.nreasons = 2;
    a.signal_names = sig_names;
    a.signal_values = sig_values;
    a.nsignals = 3;
    a.trait_keys = trait_keys;
    a.trait_values = traits;
    a.ntraits = 7;
    a.has_signed_up_at = 1;
    a.signed_up_at = 1690000000000;
    a.has_time_to_pql_ms = 1;
    a.time_to_pql_ms = 10000000000;
    return a;
}

/* A small alert with every optional left out. */
static pql_alert small_alert(void)
{
    pql_alert a = {0};
    strcpy(a.alert_id, "0123456789abcdef0123456789abcdef");
    a.account_id = "acme";
    a.account_id_len = 4;
    a.kind = PQL_ALERT_PQL;
    a.rule = "pql_core";
    a.ruleset_version = "v1";
    a.model = "threshold";
    a.triggered_at = 1700000000000;
    a.emitted_at = 1700000000500;
    return a;
}

static json_t *round_trip(const pql_alert *a)
{
    pql_buf b = {0};
    cr_assert_eq(pql_alert_encode_avro(a, &b, err, sizeof err), PQL_OK, "%s", err);
    json_t *j = pql_alert_avro_to_json(b.data, b.len, err, sizeof err);
    cr_assert(j, "%s", err);
    pql_buf_free(&b);
    return j;
}

static const char *jget_str(json_t *o, const char *k)
{
    json_t *v = json_object_get(o, k);
    cr_assert(json_is_string(v), "%s is not a string", k);
    return json_string_value(v);
}

static json_int_t jget_int(json_t *o, const char *k)
{
    json_t *v = json_object_get(o, k);
    cr_assert(json_is_integer(v), "%s is not an integer", k);
    return json_integer_value(v);
}

static void assert_null(json_t *o, const char *k)
{
    json_t *v = json_object_get(o, k);
    cr_assert(v && json_is_null(v), "%s is not null", k);
}

/* ---- ids -------------------------------------------------------------------- */

Test(alert, id_is_stable_and_documented)
{
    char id[PQL_ALERT_ID_LEN + 1], again[PQL_ALERT_ID_LEN + 1];
    pql_alert_id("acme", 4, "pql_core", "1", id);
    cr_assert_str_eq(id, "461d09792379d9b6b94f4768cbc867bd");
    pql_alert_id("acme-longer", 4, "pql_core", "1", again); /* only 4 bytes of account */
    cr_assert_str_eq(again, id);
    pql_alert_id("", 0, "", "", id);
    cr_assert_str_eq(id, "81d23fd7003c230566b783a775df2ace");
    cr_assert_eq(strlen(id), PQL_ALERT_ID_LEN);
    for (size_t i = 0; i < PQL_ALERT_ID_LEN; i++)
        cr_assert(strchr("0123456789abcdef", id[i]), "%s", id);
}

Test(alert, ids_are_distinct)
{
    const char *inputs[][3] = {
        {"acme", "pql_core", "1"},
        {"acme", "pql_core", "2"},
        {"acme", "pql_cor", "e1"},
        {"acm", "epql_core", "1"},
        {"acme", "expansion", "1"},
        {"globex", "pql_core", "1"},
        {"acme", "pql_core", "1:HIGH"},
        {"acme", "pql_core", "1:MEDIUM"},
        {"", "", ""},
    };
    size_t n = sizeof inputs / sizeof inputs[0];
    char ids[sizeof inputs / sizeof inputs[0]][PQL_ALERT_ID_LEN + 1];
    for (size_t i = 0; i < n; i++)
        pql_alert_id(inputs[i][0], strlen(inputs[i][0]), inputs[i][1], inputs[i][2], ids[i]);
    for (size_t i = 0; i < n; i++)
        for (size_t j = i + 1; j < n; j++)
            cr_assert_str_neq(ids[i], ids[j], "%zu vs %zu", i, j);
    /* both halves differ for a one-character change */
    cr_assert(strncmp(ids[0], ids[1], 16) != 0 && strcmp(ids[0] + 16, ids[1] + 16) != 0);

    /* 10k episodes of one rule: no collision in either half */
    enum { N = 10000 };
    char(*many)[PQL_ALERT_ID_LEN + 1] = calloc(N, sizeof *many);
    char ep[16];
    for (int i = 0; i < N; i++) {
        snprintf(ep, sizeof ep, "%d", i);
        pql_alert_id("acme", 4, "pql_core", ep, many[i]);
    }
    qsort(many, N, sizeof *many, (int (*)(const void *, const void *))strcmp);
    for (int i = 1; i < N; i++)
        cr_assert(strncmp(many[i - 1], many[i], 16) != 0);
    free(many);
}

/* ---- Avro -------------------------------------------------------------------- */

Test(alert, avro_round_trip_every_field_set)
{
    pql_value traits[7];
    pql_alert a = full_alert(traits);
    json_t *j = round_trip(&a);
    cr_assert_eq(json_object_size(j), 16);
    cr_assert_str_eq(jget_str(j, "alert_id"), a.alert_id);
    cr_assert_str_eq(jget_str(j, "account_id"), "acme");
    cr_assert_str_eq(jget_str(j, "kind"), "EXPANSION");
    cr_assert_str_eq(jget_str(j, "rule"), "seat_saturation");
    cr_assert_str_eq(jget_str(j, "ruleset_version"), "v7");
    cr_assert_str_eq(jget_str(j, "model"), "weighted");
    cr_assert_eq(json_real_value(json_object_get(j, "score")), 0.91);
    cr_assert_str_eq(jget_str(j, "tier"), "HIGH");
    cr_assert_eq(jget_int(j, "triggered_at"), 1700000000000);
    cr_assert_eq(jget_int(j, "emitted_at"), 1700000000250);
    cr_assert_eq(jget_int(j, "sla_due_at"), 1700003600000);
    json_t *r = json_object_get(j, "reasons");
    cr_assert_eq(json_array_size(r), 2);
    cr_assert_str_eq(json_string_value(json_array_get(r, 0)), reasons[0]);
    cr_assert_str_eq(json_string_value(json_array_get(r, 1)), reasons[1]);
    json_t *s = json_object_get(j, "signals");
    cr_assert_eq(json_object_size(s), 3);
    for (int i = 0; i < 3; i++) {
        json_t *v = json_object_get(s, sig_names[i]);
        cr_assert(json_is_real(v), "%s", sig_names[i]);
        cr_assert_eq(json_real_value(v), sig_values[i]);
    }
    json_t *acc = json_object_get(j, "account");
    cr_assert_eq(json_object_size(acc), 7);
    cr_assert_str_eq(jget_str(acc, "plan"), "team");
    cr_assert_eq(jget_int(acc, "seats"), 20); /* integral: written as long */
    cr_assert(json_is_real(json_object_get(acc, "mrr")));
    cr_assert_eq(json_real_value(json_object_get(acc, "mrr")), 99.5);
    cr_assert(json_is_true(json_object_get(acc, "trial")));
    assert_null(acc, "owner");
    assert_null(acc, "weird"); /* NaN: a double in Avro, null in JSON */
    cr_assert(json_is_real(json_object_get(acc, "huge")));
    cr_assert_eq(json_real_value(json_object_get(acc, "huge")), 1e20);
    cr_assert_eq(jget_int(j, "signed_up_at"), 1690000000000);
    cr_assert_eq(jget_int(j, "time_to_pql_ms"), 10000000000);
    json_decref(j);
}

Test(alert, avro_round_trip_optionals_null)
{
    pql_alert a = small_alert();
    json_t *j = round_trip(&a);
    cr_assert_eq(json_object_size(j), 16);
    cr_assert_str_eq(jget_str(j, "kind"), "PQL");
    cr_assert_str_eq(jget_str(j, "model"), "threshold");
    assert_null(j, "score");
    assert_null(j, "tier");
    assert_null(j, "sla_due_at");
    assert_null(j, "signed_up_at");
    assert_null(j, "time_to_pql_ms");
    cr_assert_eq(json_array_size(json_object_get(j, "reasons")), 0);
    cr_assert_eq(json_object_size(json_object_get(j, "signals")), 0);
    cr_assert_eq(json_object_size(json_object_get(j, "account")), 0);
    json_decref(j);

    /* score 0 and tier LOW are values, not nulls; logistic model */
    a.has_score = 1;
    a.score = 0;
    a.tier = "LOW";
    a.model = "logistic";
    a.has_time_to_pql_ms = 1;
    a.time_to_pql_ms = 0;
    j = round_trip(&a);
    cr_assert(json_is_real(json_object_get(j, "score")));
    cr_assert_str_eq(jget_str(j, "tier"), "LOW");
    cr_assert_str_eq(jget_str(j, "model"), "logistic");
    cr_assert_eq(jget_int(j, "time_to_pql_ms"), 0);
    json_decref(j);
}

Test(alert, avro_bytes_are_the_schema_order)
{
    pql_alert a = small_alert();
    pql_buf b = {0};
    cr_assert_eq(pql_alert_encode_avro(&a, &b, err, sizeof err), PQL_OK);
    const char want[] = "\x40"
                        "0123456789abcdef0123456789abcdef"
                        "\x08"
                        "acme"
                        "\x00"
                        "\x10pql_core"
                        "\x04v1"
                        "\x00"
                        "\x00\x00"; /* model threshold, score null, tier null */
    cr_assert_eq(memcmp(b.data, want, sizeof want - 1), 0);
    /* then triggered_at, emitted_at, sla null, 3 empty collections, 2 nulls */
    cr_assert_eq(b.len, sizeof want - 1 + 6 + 6 + 1 + 3 + 2);
    pql_buf_free(&b);
}

Test(alert, avro_to_json_refuses_bad_bytes)
{
    pql_alert a = small_alert();
    pql_buf b = {0};
    cr_assert_eq(pql_alert_encode_avro(&a, &b, err, sizeof err), PQL_OK);
    for (size_t n = 0; n < b.len; n++) {
        err[0] = '\0';
        cr_assert_null(pql_alert_avro_to_json(b.data, n, err, sizeof err), "length %zu", n);
        cr_assert(err[0], "length %zu: no reason", n);
    }
    pql_buf_append(&b, "x", 1);
    cr_assert_null(pql_alert_avro_to_json(b.data, b.len, err, sizeof err));
    cr_assert(strstr(err, "trailing"), "%s", err);
    uint64_t x = 88172645463325252ULL;
    unsigned char junk[200];
    for (int i = 0; i < 5000; i++) {
        size_t len = 0;
        for (; len < (size_t)(i % 200); len++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            junk[len] = (unsigned char)x;
        }
        json_t *j = pql_alert_avro_to_json(junk, len, err, sizeof err);
        json_decref(j);
    }
    pql_buf_free(&b);
}

Test(alert, bad_alerts_are_refused)
{
    pql_alert a = small_alert();
    pql_buf b = {0};
    a.model = "neural";
    cr_assert_eq(pql_alert_encode_avro(&a, &b, err, sizeof err), PQL_ERR_ARG);
    cr_assert(strstr(err, "neural"), "%s", err);
    a = small_alert();
    a.tier = "PLATINUM";
    cr_assert_eq(pql_alert_encode_json(&a, &b, err, sizeof err), PQL_ERR_ARG);
    cr_assert(strstr(err, "PLATINUM"), "%s", err);
    a = small_alert();
    a.kind = (pql_alert_kind)5;
    cr_assert_eq(pql_alert_encode_avro(&a, &b, err, sizeof err), PQL_ERR_ARG);
    a = small_alert();
    a.nreasons = 1;
    cr_assert_eq(pql_alert_encode_avro(&a, &b, err, sizeof err), PQL_ERR_ARG);
    cr_assert_eq(b.len, 0);
    pql_buf_free(&b);
}

/* ---- JSON --------------------------------------------------------------------- */

Test(alert, json_exact_text)
{
    pql_alert a = small_alert();
    const char *r[] = {"Used core \"export\" 5 times"};
    const char *sn[] = {"core_uses", "ratio"};
    const double sv[] = {5, 0.83};
    const char *tk[] = {"plan", "seats"};
    const pql_value tv[] = {pql_str("free", 4), pql_num(3)};
    a.reasons = r;
    a.nreasons = 1;
    a.signal_names = sn;
    a.signal_values = sv;
    a.nsignals = 2;
    a.trait_keys = tk;
    a.trait_values = tv;
    a.ntraits = 2;
    a.has_score = 1;
    a.score = 0.75;
    a.tier = "MEDIUM";
    pql_buf b = {0};
    cr_assert_eq(pql_alert_encode_json(&a, &b, err, sizeof err), PQL_OK, "%s", err);
    cr_assert_str_eq(b.data, "{\"alert_id\":\"0123456789abcdef0123456789abcdef\","
                             "\"account_id\":\"acme\",\"kind\":\"PQL\",\"rule\":\"pql_core\","
                             "\"ruleset_version\":\"v1\",\"model\":\"threshold\","
                             "\"score\":0.75,\"tier\":\"MEDIUM\","
                             "\"triggered_at\":1700000000000,\"emitted_at\":1700000000500,"
                             "\"sla_due_at\":null,"
                             "\"reasons\":[\"Used core \\\"export\\\" 5 times\"],"
                             "\"signals\":{\"core_uses\":5.0,\"ratio\":0.83},"
                             "\"account\":{\"plan\":\"free\",\"seats\":3},"
                             "\"signed_up_at\":null,\"time_to_pql_ms\":null}");
    cr_assert_eq(b.len, strlen(b.data));

    /* The JSON encoding says what the Avro encoding says. */
    json_t *from_avro = round_trip(&a);
    json_t *from_json = json_loadb(b.data, b.len, 0, NULL);
    cr_assert(json_equal(from_avro, from_json));
    json_decref(from_avro);
    json_decref(from_json);
    pql_buf_free(&b);
}

Test(alert, json_full_alert_matches_avro_and_survives_bad_utf8)
{
    pql_value traits[7];
    pql_alert a = full_alert(traits);
    traits[0] = pql_str("caf\xc3\xa9 \xff", 7); /* valid é, then a stray byte */
    pql_buf b = {0};
    cr_assert_eq(pql_alert_encode_json(&a, &b, err, sizeof err), PQL_OK, "%s", err);
    json_t *from_json = json_loadb(b.data, b.len, 0, NULL);
    cr_assert(from_json, "%s", b.data);
    cr_assert_str_eq(jget_str(json_object_get(from_json, "account"), "plan"),
                     "caf\xc3\xa9 \xef\xbf\xbd");
    json_t *from_avro = round_trip(&a);
    cr_assert(json_equal(from_avro, from_json), "%s", b.data);
    json_decref(from_avro);
    json_decref(from_json);
    pql_buf_free(&b);
}
