/* alert.c — the Alert record: its stable id, Avro and JSON encodings, and
 * Avro back to JSON (contract in alert.h).
 *
 * alert_id: 32 lowercase hex characters, h1 then h2, each a 64-bit number
 * printed big-endian (%016x), both hashed over the same byte string
 *     M = le64(len(account)) account  le64(len(rule)) rule
 *         le64(len(episode)) episode
 * (le64: the byte length as 8 bytes, least significant first), so no two
 * different (account, rule, episode) triples share an M:
 *     h1 = FNV-1a 64 over M: offset basis 0xcbf29ce484222325,
 *          prime 0x100000001b3 (the standard FNV-1a 64);
 *     h2 = fmix64(FNV-1a 64 over M with offset basis 0x6c62272e07bb0142),
 *          fmix64 being MurmurHash3's finaliser (x ^= x >> 33;
 *          x *= 0xff51afd7ed558ccd; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53;
 *          x ^= x >> 33).
 * The id must never change for the same inputs: CRM connectors upsert on it.
 *
 * Avro: written by hand in Alert.avsc's field order (enums and union
 * branches by their index in the schema).  Reading back uses avro-c's
 * generic value, after the bounded pre-check of avro_bin.h, so the printer
 * can be fed bytes from a topic.
 *
 * JSON: the same field names and order; enums as their symbols; timestamps
 * as integers (ms); absent optionals as null; numbers of the `account` map
 * as integers when Avro writes them as long.  JSON has no NaN or infinity:
 * such numbers become null.  Reals are printed with 15 significant digits
 * (0.83, not 0.82999999999999996).  Strings that are not valid UTF-8 have
 * each bad byte replaced by U+FFFD. */
#include "alert.h"

#include "avro_bin.h"
/* embedded.h has a slash-star inside its first comment (-Wcomment). */
#include "embedded.h"

#include <avro.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define JSON_FLAGS (JSON_COMPACT | JSON_REAL_PRECISION(15))

static const char *const kind_symbols[] = {"PQL", "EXPANSION"};
static const char *const model_symbols[] = {"threshold", "weighted", "logistic"};
static const char *const tier_symbols[] = {"HIGH", "MEDIUM", "LOW"};

/* ---- alert_id ------------------------------------------------------------ */

#define FNV_PRIME 0x100000001b3ULL

static void fnv_bytes(uint64_t *h, const void *p, size_t n)
{
    const unsigned char *s = p;
    for (size_t i = 0; i < n; i++) {
        *h ^= s[i];
        *h *= FNV_PRIME;
    }
}

static void fnv_field(uint64_t *h, const char *s, size_t n)
{
    unsigned char len[8];
    for (int i = 0; i < 8; i++)
        len[i] = (unsigned char)((uint64_t)n >> (8 * i));
    fnv_bytes(h, len, sizeof len);
    fnv_bytes(h, s, n);
}

static uint64_t fmix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

void pql_alert_id(const char *account_id, size_t account_id_len, const char *rule,
                  const char *episode, char out[PQL_ALERT_ID_LEN + 1])
{
    uint64_t h[2] = {0xcbf29ce484222325ULL, 0x6c62272e07bb0142ULL};
    if (!account_id) account_id_len = 0;
    if (!rule) rule = "";
    if (!episode) episode = "";
    for (int k = 0; k < 2; k++) {
        fnv_field(&h[k], account_id ? account_id : "", account_id_len);
        fnv_field(&h[k], rule, strlen(rule));
        fnv_field(&h[k], episode, strlen(episode));
    }
    h[1] = fmix64(h[1]);
    snprintf(out, PQL_ALERT_ID_LEN + 1, "%016" PRIx64 "%016" PRIx64, h[0], h[1]);
}

/* ---- checking an alert ---------------------------------------------------- */

static int symbol_index(const char *const *symbols, int n, const char *s)
{
    for (int i = 0; s && i < n; i++)
        if (strcmp(symbols[i], s) == 0) return i;
    return -1;
}

/* The enum indexes of `a`, or PQL_ERR_ARG naming what is wrong. */
static pql_err check_alert(const pql_alert *a, int *model, int *tier, char *errstr, size_t size)
{
    if (a->kind != PQL_ALERT_PQL && a->kind != PQL_ALERT_EXPANSION) {
        pql_set_err(errstr, size, "alert kind %d is not PQL or EXPANSION", (int)a->kind);
        return PQL_ERR_ARG;
    }
    *model = symbol_index(model_symbols, 3, a->model);
    if (*model < 0) {
        pql_set_err(errstr, size, "alert model \"%s\" is not threshold, weighted or logistic",
                    a->model ? a->model : "(null)");
        return PQL_ERR_ARG;
    }
    *tier = a->tier ? symbol_index(tier_symbols, 3, a->tier) : -1;
    if (a->tier && *tier < 0) {
        pql_set_err(errstr, size, "alert tier \"%s\" is not HIGH, MEDIUM or LOW", a->tier);
        return PQL_ERR_ARG;
    }
    int bad = (!a->account_id && a->account_id_len) || !a->rule || !a->ruleset_version ||
              (a->nreasons && !a->reasons) ||
              (a->nsignals && (!a->signal_names || !a->signal_values)) ||
              (a->ntraits && (!a->trait_keys || !a->trait_values));
    for (size_t i = 0; !bad && i < a->nreasons; i++)
        bad = !a->reasons[i];
    for (size_t i = 0; !bad && i < a->nsignals; i++)
        bad = !a->signal_names[i];
    for (size_t i = 0; !bad && i < a->ntraits; i++)
        bad = !a->trait_keys[i] || (a->trait_values[i].type == PQL_V_STR &&
                                    !a->trait_values[i].u.str.ptr && a->trait_values[i].u.str.len);
    if (bad) {
        pql_set_err(errstr, size, "alert %s has a NULL string or array", a->alert_id);
        return PQL_ERR_ARG;
    }
    return PQL_OK;
}

/* ---- Avro ------------------------------------------------------------------ */

static int put_cstr(pql_buf *b, const char *s)
{
    return pql_avro_put_string(b, s, strlen(s));
}

/* A ["null", long] union. */
static int put_opt_long(pql_buf *b, int has, int64_t v)
{
    if (!has) return pql_avro_put_long(b, 0);
    return pql_avro_put_long(b, 1) | pql_avro_put_long(b, v);
}

pql_err pql_alert_encode_avro(const pql_alert *a, pql_buf *out, char *errstr, size_t errstr_size)
{
    int model, tier, rc = 0;
    pql_err err = check_alert(a, &model, &tier, errstr, errstr_size);
    if (err) return err;
    size_t start = out->len;
    rc |= put_cstr(out, a->alert_id);
    rc |= pql_avro_put_string(out, a->account_id ? a->account_id : "", a->account_id_len);
    rc |= pql_avro_put_long(out, a->kind);
    rc |= put_cstr(out, a->rule);
    rc |= put_cstr(out, a->ruleset_version);
    rc |= pql_avro_put_long(out, model);
    if (a->has_score)
        rc |= pql_avro_put_long(out, 1) | pql_avro_put_double(out, a->score);
    else
        rc |= pql_avro_put_long(out, 0);
    rc |= put_opt_long(out, tier >= 0, tier);
    rc |= pql_avro_put_long(out, a->triggered_at);
    rc |= pql_avro_put_long(out, a->emitted_at);
    rc |= put_opt_long(out, a->has_sla_due_at, a->sla_due_at);
    if (a->nreasons) rc |= pql_avro_put_long(out, (int64_t)a->nreasons);
    for (size_t i = 0; i < a->nreasons; i++)
        rc |= put_cstr(out, a->reasons[i]);
    rc |= pql_avro_put_long(out, 0);
    if (a->nsignals) rc |= pql_avro_put_long(out, (int64_t)a->nsignals);
    for (size_t i = 0; i < a->nsignals; i++)
        rc |= put_cstr(out, a->signal_names[i]) | pql_avro_put_double(out, a->signal_values[i]);
    rc |= pql_avro_put_long(out, 0);
    if (a->ntraits) rc |= pql_avro_put_long(out, (int64_t)a->ntraits);
    for (size_t i = 0; i < a->ntraits; i++)
        rc |= put_cstr(out, a->trait_keys[i]) | pql_avro_put_value(out, &a->trait_values[i]);
    rc |= pql_avro_put_long(out, 0);
    rc |= put_opt_long(out, a->has_signed_up_at, a->signed_up_at);
    rc |= put_opt_long(out, a->has_time_to_pql_ms, a->time_to_pql_ms);
    if (rc) {
        out->len = start;
        if (out->data) out->data[start] = '\0';
        pql_set_err(errstr, errstr_size, "out of memory");
        return PQL_ERR_NOMEM;
    }
    return PQL_OK;
}

/* ---- JSON values ------------------------------------------------------------ */

/* Length of the valid UTF-8 sequence at s[i], or 0. */
static size_t utf8_seq(const unsigned char *s, size_t len, size_t i)
{
    unsigned char c = s[i];
    size_t n;
    unsigned char lo = 0x80, hi = 0xbf;
    if (c < 0x80) return 1;
    if (c >= 0xc2 && c <= 0xdf)
        n = 2;
    else if (c >= 0xe0 && c <= 0xef)
        n = 3;
    else if (c >= 0xf0 && c <= 0xf4)
        n = 4;
    else
        return 0;
    if (c == 0xe0) lo = 0xa0;
    if (c == 0xed) hi = 0x9f;
    if (c == 0xf0) lo = 0x90;
    if (c == 0xf4) hi = 0x8f;
    if (i + n > len || s[i + 1] < lo || s[i + 1] > hi) return 0;
    for (size_t k = 2; k < n; k++)
        if (s[i + k] < 0x80 || s[i + k] > 0xbf) return 0;
    return n;
}

/* `s` itself when valid UTF-8, else a malloc'ed copy with U+FFFD for each bad byte. */
static const char *utf8_fix(const char *s, size_t len, size_t *out_len, char **owned)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0, n;
    *owned = NULL;
    *out_len = len;
    while (i < len && (n = utf8_seq(u, len, i)) > 0)
        i += n;
    if (i == len) return s;
    char *fixed = malloc(len * 3 + 1);
    if (!fixed) return NULL;
    size_t o = 0;
    for (i = 0; i < len;) {
        n = utf8_seq(u, len, i);
        if (n) {
            memcpy(fixed + o, s + i, n);
            o += n;
            i += n;
        } else {
            memcpy(fixed + o, "\xef\xbf\xbd", 3);
            o += 3;
            i++;
        }
    }
    *out_len = o;
    *owned = fixed;
    return fixed;
}

static json_t *jstr(const char *s, size_t len)
{
    char *owned;
    size_t n;
    const char *ok = utf8_fix(s ? s : "", s ? len : 0, &n, &owned);
    json_t *j = ok ? json_stringn(ok, n) : NULL;
    free(owned);
    return j;
}

static json_t *jreal(double d)
{
    return isfinite(d) ? json_real(d) : json_null();
}

/* Sets obj[key] = v (consumed); *bad on any failure. */
static void jset(json_t *obj, const char *key, size_t key_len, json_t *v, int *bad)
{
    char *owned;
    size_t n;
    const char *ok = utf8_fix(key, key_len, &n, &owned);
    if (!ok || !v) {
        json_decref(v);
        *bad = 1;
    } else if (json_object_setn_new(obj, ok, n, v)) { /* consumes v */
        *bad = 1;
    }
    free(owned);
}

static json_t *jvalue(const pql_value *v)
{
    switch (v->type) {
    case PQL_V_NULL:
        return json_null();
    case PQL_V_BOOL:
        return json_boolean(v->u.b);
    case PQL_V_NUM:
        if (pql_avro_is_long(v->u.num)) return json_integer((json_int_t)v->u.num);
        return jreal(v->u.num);
    case PQL_V_STR:
        return jstr(v->u.str.ptr, v->u.str.len);
    }
    return json_null();
}

static json_t *jopt_long(int has, int64_t v)
{
    return has ? json_integer(v) : json_null();
}

/* The JSON object of a checked alert, or NULL when out of memory. */
static json_t *alert_to_json(const pql_alert *a, int model, int tier)
{
    int bad = 0;
    json_t *o = json_object(), *reasons = json_array(), *signals = json_object(),
           *account = json_object();
    if (!o || !reasons || !signals || !account) bad = 1;
    for (size_t i = 0; !bad && i < a->nreasons; i++)
        bad = json_array_append_new(reasons, jstr(a->reasons[i], strlen(a->reasons[i])));
    for (size_t i = 0; !bad && i < a->nsignals; i++)
        jset(signals, a->signal_names[i], strlen(a->signal_names[i]), jreal(a->signal_values[i]),
             &bad);
    for (size_t i = 0; !bad && i < a->ntraits; i++)
        jset(account, a->trait_keys[i], strlen(a->trait_keys[i]), jvalue(&a->trait_values[i]),
             &bad);
    if (bad) {
        json_decref(reasons);
        json_decref(signals);
        json_decref(account);
        json_decref(o);
        return NULL;
    }
#define SET(k, v) jset(o, k, strlen(k), v, &bad)
    SET("alert_id", jstr(a->alert_id, strlen(a->alert_id)));
    SET("account_id", jstr(a->account_id, a->account_id_len));
    SET("kind", json_string(kind_symbols[a->kind]));
    SET("rule", jstr(a->rule, strlen(a->rule)));
    SET("ruleset_version", jstr(a->ruleset_version, strlen(a->ruleset_version)));
    SET("model", json_string(model_symbols[model]));
    SET("score", a->has_score ? jreal(a->score) : json_null());
    SET("tier", tier >= 0 ? json_string(tier_symbols[tier]) : json_null());
    SET("triggered_at", json_integer(a->triggered_at));
    SET("emitted_at", json_integer(a->emitted_at));
    SET("sla_due_at", jopt_long(a->has_sla_due_at, a->sla_due_at));
    SET("reasons", reasons);
    SET("signals", signals);
    SET("account", account);
    SET("signed_up_at", jopt_long(a->has_signed_up_at, a->signed_up_at));
    SET("time_to_pql_ms", jopt_long(a->has_time_to_pql_ms, a->time_to_pql_ms));
#undef SET
    if (bad) {
        json_decref(o);
        return NULL;
    }
    return o;
}

pql_err pql_alert_encode_json(const pql_alert *a, pql_buf *out, char *errstr, size_t errstr_size)
{
    int model, tier;
    pql_err err = check_alert(a, &model, &tier, errstr, errstr_size);
    if (err) return err;
    json_t *o = alert_to_json(a, model, tier);
    char *text = o ? json_dumps(o, JSON_FLAGS) : NULL;
    json_decref(o);
    if (!text || pql_buf_append(out, text, strlen(text)) < 0) {
        free(text);
        pql_set_err(errstr, errstr_size, "out of memory");
        return PQL_ERR_NOMEM;
    }
    free(text);
    return PQL_OK;
}

/* ---- Avro back to JSON --------------------------------------------------------- */

static pthread_once_t alert_once = PTHREAD_ONCE_INIT;
static avro_value_iface_t *alert_class; /* process lifetime */
static pql_avro_check *alert_check;
static char alert_init_err[256];

static void alert_init(void)
{
    size_t len = 0;
    avro_schema_t schema;
    const char *text = pql_embedded_get("Alert.avsc", &len);
    if (!text) {
        snprintf(alert_init_err, sizeof alert_init_err, "Alert.avsc is not compiled in");
        return;
    }
    if (avro_schema_from_json_length(text, len, &schema)) {
        snprintf(alert_init_err, sizeof alert_init_err, "schemas/Alert.avsc: %s", avro_strerror());
        return;
    }
    alert_check = pql_avro_check_new(schema, alert_init_err, sizeof alert_init_err);
    alert_class = avro_generic_class_from_schema(schema);
    avro_schema_decref(schema); /* the class keeps its own reference */
    if (!alert_class) {
        pql_avro_check_destroy(alert_check);
        alert_check = NULL;
        snprintf(alert_init_err, sizeof alert_init_err, "Alert class: %s", avro_strerror());
    }
}

static json_t *value_to_json(avro_value_t *v, int depth)
{
    const char *s, *name;
    const void *p;
    size_t size, n = 0;
    int32_t i32;
    int64_t i64;
    float f;
    double d;
    int b;
    avro_value_t child;
    json_t *j;
    if (depth > PQL_AVRO_MAX_DEPTH) return NULL;
    switch (avro_value_get_type(v)) {
    case AVRO_STRING:
        if (avro_value_get_string(v, &s, &size)) return NULL;
        return jstr(s, size ? size - 1 : 0);
    case AVRO_BYTES:
        if (avro_value_get_bytes(v, &p, &size)) return NULL;
        return jstr(p, size);
    case AVRO_FIXED:
        if (avro_value_get_fixed(v, &p, &size)) return NULL;
        return jstr(p, size);
    case AVRO_INT32:
        return avro_value_get_int(v, &i32) ? NULL : json_integer(i32);
    case AVRO_INT64:
        return avro_value_get_long(v, &i64) ? NULL : json_integer(i64);
    case AVRO_FLOAT:
        return avro_value_get_float(v, &f) ? NULL : jreal(f);
    case AVRO_DOUBLE:
        return avro_value_get_double(v, &d) ? NULL : jreal(d);
    case AVRO_BOOLEAN:
        return avro_value_get_boolean(v, &b) ? NULL : json_boolean(b);
    case AVRO_NULL:
        return json_null();
    case AVRO_ENUM:
        if (avro_value_get_enum(v, &b)) return NULL;
        s = avro_schema_enum_get(avro_value_get_schema(v), b);
        return s ? json_string(s) : NULL;
    case AVRO_UNION:
        if (avro_value_get_current_branch(v, &child)) return NULL;
        return value_to_json(&child, depth + 1);
    case AVRO_ARRAY:
        if (!(j = json_array()) || avro_value_get_size(v, &n)) break;
        for (size_t i = 0; i < n; i++)
            if (avro_value_get_by_index(v, i, &child, NULL) ||
                json_array_append_new(j, value_to_json(&child, depth + 1)))
                goto fail;
        return j;
    case AVRO_RECORD:
    case AVRO_MAP:
        if (!(j = json_object()) || avro_value_get_size(v, &n)) break;
        for (size_t i = 0; i < n; i++) {
            int bad = 0;
            name = NULL;
            if (avro_value_get_by_index(v, i, &child, &name) || !name) goto fail;
            jset(j, name, strlen(name), value_to_json(&child, depth + 1), &bad);
            if (bad) goto fail;
        }
        return j;
    default:
        return NULL;
    }
    json_decref(j);
    return NULL;
fail:
    json_decref(j);
    return NULL;
}

json_t *pql_alert_avro_to_json(const void *buf, size_t len, char *errstr, size_t errstr_size)
{
    pthread_once(&alert_once, alert_init);
    if (!alert_check) {
        pql_set_err(errstr, errstr_size, "%s", alert_init_err);
        return NULL;
    }
    if (pql_avro_check_bytes(alert_check, buf, len, SIZE_MAX, SIZE_MAX, errstr, errstr_size))
        return NULL;
    avro_value_t value;
    json_t *j = NULL;
    avro_reader_t in = avro_reader_memory(len ? buf : "", (int64_t)len);
    if (!in || avro_generic_value_new(alert_class, &value)) {
        if (in) avro_reader_free(in);
        pql_set_err(errstr, errstr_size, "out of memory");
        return NULL;
    }
    if (avro_value_read(in, &value))
        pql_set_err(errstr, errstr_size, "%s", avro_strerror());
    else if (!(j = value_to_json(&value, 0)))
        pql_set_err(errstr, errstr_size, "out of memory");
    avro_value_decref(&value);
    avro_reader_free(in);
    return j;
}
