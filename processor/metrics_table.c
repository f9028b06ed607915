/* metrics_table.c — counters summed per segment, figures, MetricAggregate
 * encodings (metrics_table.h).  The figures' definitions are in metrics.h (3.)
 * and docs/metrics.md.
 *
 * Avro: written by hand in MetricAggregate.avsc's field order, driven by the
 * `fields` table below (which the JSON encoding shares), so the two
 * encodings cannot disagree on names or order.  Reading back uses avro-c's
 * generic value after the bounded pre-check of avro_bin.h, like alert.c. */
#include "metrics_table.h"

#include "avro_bin.h"
/* embedded.h has a slash-star inside its first comment (-Wcomment). */
#include "embedded.h"

#include <avro.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Counters of a segment, in the order of their names. */
enum {
    C_SIGNUPS,
    C_SIGNUPS_PQL,
    C_SIGNUPS_NP_CONV,
    C_PQLS_NEW,
    C_PQLS_OPEN,
    C_PQLS_CONV,
    C_CONV,
    C_CONV_PQL,
    C_EXPANSION,
    NCOUNTERS
};
static const char *const counter_names[NCOUNTERS] = {
    "signups",   "signups_pql", "signups_np_conv", "pqls_new",  "pqls_open",
    "pqls_conv", "conv",        "conv_pql",        "expansion",
};

typedef struct cell {
    pql_segment kind;
    char *value;
    int64_t c[NCOUNTERS];
    int *bucket; /* histogram, sorted by bucket */
    int64_t *count;
    size_t nb, bcap;
} cell;

struct pql_metric_table {
    pql_granularity g;
    int64_t start;
    cell *cells; /* sorted by (kind, value) */
    size_t n, cap;
};

pql_metric_table *pql_metric_table_new(pql_granularity g, int64_t start)
{
    pql_metric_table *t = calloc(1, sizeof(*t));
    if (!t) return NULL;
    t->g = g;
    t->start = start;
    return t;
}

void pql_metric_table_destroy(pql_metric_table *t)
{
    if (!t) return;
    for (size_t i = 0; i < t->n; i++) {
        free(t->cells[i].value);
        free(t->cells[i].bucket);
        free(t->cells[i].count);
    }
    free(t->cells);
    free(t);
}

pql_granularity pql_metric_table_granularity(const pql_metric_table *t)
{
    return t->g;
}

int64_t pql_metric_table_start(const pql_metric_table *t)
{
    return t->start;
}

static int cell_cmp(pql_segment k, const char *v, size_t vlen, const cell *c)
{
    if (k != c->kind) return k < c->kind ? -1 : 1;
    size_t clen = strlen(c->value);
    int r = memcmp(v, c->value, vlen < clen ? vlen : clen);
    return r ? r : (vlen < clen ? -1 : vlen > clen);
}

/* The cell (kind, value), inserted in order if new; NULL when out of memory. */
static cell *cell_get(pql_metric_table *t, pql_segment k, const char *v, size_t vlen)
{
    size_t lo = 0, hi = t->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        int r = cell_cmp(k, v, vlen, &t->cells[mid]);
        if (r == 0) return &t->cells[mid];
        if (r < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    if (t->n == t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 16;
        cell *c = realloc(t->cells, cap * sizeof(*c));
        if (!c) return NULL;
        t->cells = c;
        t->cap = cap;
    }
    char *value = strndup(v, vlen);
    if (!value) return NULL;
    memmove(&t->cells[lo + 1], &t->cells[lo], (t->n - lo) * sizeof(cell));
    t->n++;
    cell *c = &t->cells[lo];
    memset(c, 0, sizeof(*c));
    c->kind = k;
    c->value = value;
    return c;
}

static int hist_add(cell *c, int bucket, int64_t n)
{
    size_t i = 0;
    while (i < c->nb && c->bucket[i] < bucket)
        i++;
    if (i < c->nb && c->bucket[i] == bucket) {
        c->count[i] += n;
        return 0;
    }
    if (c->nb == c->bcap) {
        size_t cap = c->bcap ? c->bcap * 2 : 16;
        int *b = realloc(c->bucket, cap * sizeof(*b));
        if (!b) return -1;
        c->bucket = b;
        int64_t *k = realloc(c->count, cap * sizeof(*k));
        if (!k) return -1;
        c->count = k;
        c->bcap = cap;
    }
    memmove(&c->bucket[i + 1], &c->bucket[i], (c->nb - i) * sizeof(*c->bucket));
    memmove(&c->count[i + 1], &c->count[i], (c->nb - i) * sizeof(*c->count));
    c->bucket[i] = bucket;
    c->count[i] = n;
    c->nb++;
    return 0;
}

int pql_metric_table_add(pql_metric_table *t, const char *field, size_t len, int64_t value)
{
    const char *bar1 = memchr(field, '|', len), *bar2 = NULL;
    for (const char *p = field + len; p > field; p--)
        if (p[-1] == '|') {
            bar2 = p - 1;
            break;
        }
    if (!bar1 || bar2 == bar1) return -1;
    char kind[16], counter[32];
    size_t klen = (size_t)(bar1 - field), clen = len - (size_t)(bar2 + 1 - field);
    if (klen >= sizeof kind || clen >= sizeof counter) return -1;
    memcpy(kind, field, klen);
    kind[klen] = '\0';
    memcpy(counter, bar2 + 1, clen);
    counter[clen] = '\0';
    int k = pql_segment_parse(kind), ci = -1;
    for (int i = 0; i < NCOUNTERS; i++)
        if (!strcmp(counter, counter_names[i])) ci = i;
    char *end = NULL;
    long bucket = 0;
    if (ci < 0 && !strncmp(counter, "ttp:", 4)) bucket = strtol(counter + 4, &end, 10);
    int is_hist = end && end != counter + 4 && !*end && bucket >= -1 && bucket < 100000;
    if (k < 0 || (ci < 0 && !is_hist)) return -1;
    cell *c = cell_get(t, (pql_segment)k, bar1 + 1, (size_t)(bar2 - bar1 - 1));
    if (!c) abort(); /* out of memory */
    if (ci >= 0)
        c->c[ci] += value;
    else if (hist_add(c, (int)bucket, value))
        abort();
    return 0;
}

int pql_metric_table_merge(pql_metric_table *dst, const pql_metric_table *src)
{
    for (size_t i = 0; i < src->n; i++) {
        const cell *s = &src->cells[i];
        cell *d = cell_get(dst, s->kind, s->value, strlen(s->value));
        if (!d) return -1;
        for (int k = 0; k < NCOUNTERS; k++)
            d->c[k] += s->c[k];
        for (size_t b = 0; b < s->nb; b++)
            if (hist_add(d, s->bucket[b], s->count[b])) return -1;
    }
    return 0;
}

size_t pql_metric_table_size(const pql_metric_table *t)
{
    return t->n;
}

int pql_metric_table_find(const pql_metric_table *t, pql_segment kind, const char *value)
{
    for (size_t i = 0; i < t->n; i++)
        if (t->cells[i].kind == kind && !strcmp(t->cells[i].value, value)) return (int)i;
    return -1;
}

pql_opt pql_hist_percentile(const int *buckets, const int64_t *counts, size_t n, int pct)
{
    pql_opt r = {0, 0};
    int64_t total = 0, seen = 0;
    for (size_t i = 0; i < n; i++)
        total += counts[i] > 0 ? counts[i] : 0;
    if (total <= 0) return r;
    int64_t rank = (pct * total + 99) / 100; /* ceil(pct/100 * total), >= 1 */
    if (rank < 1) rank = 1;
    for (size_t i = 0; i < n; i++) {
        seen += counts[i] > 0 ? counts[i] : 0;
        if (seen >= rank) {
            r.has = 1;
            r.v = pql_hist_value(buckets[i]);
            break;
        }
    }
    return r;
}

static pql_opt ratio(int64_t num, int64_t den)
{
    pql_opt r = {den > 0, den > 0 ? (double)num / (double)den : 0};
    return r;
}

void pql_metric_table_get(const pql_metric_table *t, size_t i, pql_segment *kind,
                          const char **value, pql_metric_figures *f)
{
    const cell *c = &t->cells[i];
    if (kind) *kind = c->kind;
    if (value) *value = c->value;
    if (!f) return;
    memset(f, 0, sizeof(*f));
    f->signups = c->c[C_SIGNUPS];
    f->signups_qualified = c->c[C_SIGNUPS_PQL];
    f->pqls_new = c->c[C_PQLS_NEW];
    f->pqls_open = c->c[C_PQLS_OPEN];
    f->pql_rate = ratio(f->signups_qualified, f->signups);
    for (size_t b = 0; b < c->nb; b++)
        f->time_to_pql_count += c->count[b];
    f->time_to_pql_p50_ms = pql_hist_percentile(c->bucket, c->count, c->nb, 50);
    f->time_to_pql_p90_ms = pql_hist_percentile(c->bucket, c->count, c->nb, 90);
    f->conversions = c->c[C_CONV];
    f->pql_conversions = c->c[C_CONV_PQL];
    f->non_pql_conversions = f->conversions - f->pql_conversions;
    f->pqls_converted = c->c[C_PQLS_CONV];
    f->pql_to_paid_rate = ratio(f->pqls_converted, f->pqls_new);
    f->signups_not_qualified = f->signups - f->signups_qualified;
    f->signups_not_qualified_converted = c->c[C_SIGNUPS_NP_CONV];
    f->non_pql_to_paid_rate = ratio(f->signups_not_qualified_converted, f->signups_not_qualified);
    f->expansion_alerts = c->c[C_EXPANSION];
}

/* ---- the record ------------------------------------------------------------- */

int pql_metric_key(const pql_metric_record *r, pql_buf *out)
{
    char when[40];
    pql_format_utc(r->period_start, when, sizeof when);
    return pql_buf_printf(out, "%s|%s|%s|%s", pql_granularity_name(r->granularity), when,
                          pql_segment_name(r->kind), r->value);
}

/* The figure fields in MetricAggregate.avsc order: long, or ["null", double]. */
#define FIG(name, opt)                                                                             \
    {                                                                                              \
#name, opt, offsetof(pql_metric_figures, name)                                             \
    }
static const struct {
    const char *name;
    int opt;
    size_t off;
} fields[] = {
    FIG(signups, 0),
    FIG(signups_qualified, 0),
    FIG(pqls_new, 0),
    FIG(pqls_open, 0),
    FIG(pql_rate, 1),
    FIG(time_to_pql_count, 0),
    FIG(time_to_pql_p50_ms, 1),
    FIG(time_to_pql_p90_ms, 1),
    FIG(conversions, 0),
    FIG(pql_conversions, 0),
    FIG(non_pql_conversions, 0),
    FIG(pqls_converted, 0),
    FIG(pql_to_paid_rate, 1),
    FIG(signups_not_qualified, 0),
    FIG(signups_not_qualified_converted, 0),
    FIG(non_pql_to_paid_rate, 1),
    FIG(expansion_alerts, 0),
};
#undef FIG
#define NFIELDS (sizeof(fields) / sizeof(fields[0]))

static int put_cstr(pql_buf *b, const char *s)
{
    return pql_avro_put_string(b, s, strlen(s));
}

static pql_err encode_avro(const pql_metric_record *r, pql_buf *out)
{
    int rc = put_cstr(out, pql_granularity_name(r->granularity));
    rc |= pql_avro_put_long(out, r->period_start) | pql_avro_put_long(out, r->period_end);
    rc |= put_cstr(out, pql_segment_name(r->kind)) | put_cstr(out, r->value);
    for (size_t i = 0; i < NFIELDS; i++) {
        const char *p = (const char *)&r->f + fields[i].off;
        if (!fields[i].opt) {
            rc |= pql_avro_put_long(out, *(const int64_t *)(const void *)p);
            continue;
        }
        const pql_opt *o = (const pql_opt *)(const void *)p;
        rc |= pql_avro_put_long(out, o->has);
        if (o->has) rc |= pql_avro_put_double(out, o->v);
    }
    rc |= pql_avro_put_long(out, r->emitted_at);
    return rc ? PQL_ERR_NOMEM : PQL_OK;
}

static pql_err encode_json(const pql_metric_record *r, pql_buf *out)
{
    json_t *o = json_object();
    int bad = !o;
    bad |= json_object_set_new(o, "granularity", json_string(pql_granularity_name(r->granularity)));
    bad |= json_object_set_new(o, "period_start", json_integer(r->period_start));
    bad |= json_object_set_new(o, "period_end", json_integer(r->period_end));
    bad |= json_object_set_new(o, "segment_kind", json_string(pql_segment_name(r->kind)));
    bad |= json_object_set_new(o, "segment_value", json_string(r->value));
    for (size_t i = 0; !bad && i < NFIELDS; i++) {
        const char *p = (const char *)&r->f + fields[i].off;
        const pql_opt *opt = (const pql_opt *)(const void *)p;
        json_t *v = !fields[i].opt ? json_integer(*(const int64_t *)(const void *)p)
                    : opt->has     ? json_real(opt->v)
                                   : json_null();
        bad |= json_object_set_new(o, fields[i].name, v);
    }
    bad |= json_object_set_new(o, "emitted_at", json_integer(r->emitted_at));
    char *text = bad ? NULL : json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(o);
    int rc = !text || pql_buf_append(out, text, strlen(text));
    free(text);
    return rc ? PQL_ERR_NOMEM : PQL_OK;
}

pql_err pql_metric_encode(const pql_metric_record *r, int json, pql_buf *out, char *errstr,
                          size_t errstr_size)
{
    size_t start = out->len;
    if ((unsigned)r->granularity >= PQL_NGRAN || (unsigned)r->kind >= PQL_NSEG || !r->value) {
        pql_set_err(errstr, errstr_size, "metric record: bad granularity, segment or value");
        return PQL_ERR_ARG;
    }
    pql_err err = json ? encode_json(r, out) : encode_avro(r, out);
    if (err) {
        out->len = start;
        pql_set_err(errstr, errstr_size, "out of memory");
    }
    return err;
}

/* ---- for people ----------------------------------------------------------------- */

void pql_metric_format_duration(pql_opt ms, char *out, size_t size)
{
    double v = ms.v;
    if (!ms.has)
        snprintf(out, size, "—");
    else if (v < 1000)
        snprintf(out, size, "%.0fms", v);
    else if (v < PQL_MS_MINUTE)
        snprintf(out, size, "%.0fs", v / 1000);
    else if (v < PQL_MS_HOUR)
        snprintf(out, size, "%.0fm", v / PQL_MS_MINUTE);
    else if (v < PQL_MS_DAY)
        snprintf(out, size, "%.1fh", v / PQL_MS_HOUR);
    else
        snprintf(out, size, "%.1fd", v / PQL_MS_DAY);
}

void pql_metric_format_rate(pql_opt rate, char *out, size_t size)
{
    if (rate.has)
        snprintf(out, size, "%.1f%%", rate.v * 100);
    else
        snprintf(out, size, "—");
}

void pql_metric_format_lift(const pql_metric_figures *f, char *out, size_t size)
{
    const pql_opt *a = &f->pql_to_paid_rate, *b = &f->non_pql_to_paid_rate;
    if (!a->has || !b->has)
        snprintf(out, size, "—");
    else if (b->v == 0)
        snprintf(out, size, a->v > 0 ? "∞" : "—");
    else
        snprintf(out, size, "%.1f×", a->v / b->v);
}

/* ---- Avro back to JSON ----------------------------------------------------- */

static pthread_once_t once = PTHREAD_ONCE_INIT;
static avro_value_iface_t *record_class; /* process lifetime */
static pql_avro_check *record_check;
static char init_err[256];

static void init(void)
{
    size_t len = 0;
    avro_schema_t schema;
    const char *text = pql_embedded_get("MetricAggregate.avsc", &len);
    if (!text) {
        snprintf(init_err, sizeof init_err, "MetricAggregate.avsc is not compiled in");
        return;
    }
    if (avro_schema_from_json_length(text, len, &schema)) {
        snprintf(init_err, sizeof init_err, "schemas/MetricAggregate.avsc: %s", avro_strerror());
        return;
    }
    record_check = pql_avro_check_new(schema, init_err, sizeof init_err);
    record_class = avro_generic_class_from_schema(schema);
    avro_schema_decref(schema);
    if (!record_class) {
        pql_avro_check_destroy(record_check);
        record_check = NULL;
        snprintf(init_err, sizeof init_err, "MetricAggregate class: %s", avro_strerror());
    }
}

/* A field of the flat record: string, long, or a [null, double] union. */
static json_t *field_json(avro_value_t *v)
{
    const char *s;
    size_t size;
    int64_t l;
    double d;
    avro_value_t branch;
    switch (avro_value_get_type(v)) {
    case AVRO_STRING:
        return avro_value_get_string(v, &s, &size) ? NULL : json_stringn(s, size ? size - 1 : 0);
    case AVRO_INT64:
        return avro_value_get_long(v, &l) ? NULL : json_integer(l);
    case AVRO_DOUBLE:
        return avro_value_get_double(v, &d) ? NULL : json_real(d);
    case AVRO_NULL:
        return json_null();
    case AVRO_UNION:
        return avro_value_get_current_branch(v, &branch) ? NULL : field_json(&branch);
    default:
        return NULL;
    }
}

json_t *pql_metric_avro_to_json(const void *buf, size_t len, char *errstr, size_t errstr_size)
{
    pthread_once(&once, init);
    if (!record_check) {
        pql_set_err(errstr, errstr_size, "%s", init_err);
        return NULL;
    }
    if (pql_avro_check_bytes(record_check, buf, len, SIZE_MAX, SIZE_MAX, errstr, errstr_size))
        return NULL;
    avro_value_t value;
    avro_reader_t in = avro_reader_memory(len ? buf : "", (int64_t)len);
    if (!in || avro_generic_value_new(record_class, &value)) {
        if (in) avro_reader_free(in);
        pql_set_err(errstr, errstr_size, "out of memory");
        return NULL;
    }
    json_t *j = NULL;
    size_t n = 0;
    if (avro_value_read(in, &value) || avro_value_get_size(&value, &n)) {
        pql_set_err(errstr, errstr_size, "%s", avro_strerror());
    } else if ((j = json_object()) != NULL) {
        for (size_t i = 0; i < n; i++) {
            avro_value_t child;
            const char *name = NULL;
            json_t *v = NULL;
            if (avro_value_get_by_index(&value, i, &child, &name) || !name ||
                !(v = field_json(&child)) || json_object_set_new(j, name, v)) {
                json_decref(j);
                j = NULL;
                pql_set_err(errstr, errstr_size, "field %zu does not convert", i);
                break;
            }
        }
    }
    avro_value_decref(&value);
    avro_reader_free(in);
    return j;
}
