/* avro_bin.c — Avro binary writing, and the bounded pre-check that keeps
 * untrusted bytes away from avro-c's unsafe paths (see avro_bin.h).
 *
 * The checker compiles a schema into a small tree of nodes (named types are
 * shared, so recursive schemas compile to a cycle) and walks a message with
 * a cursor that never passes the end.  Varints follow avro-c's reader
 * exactly (at most 10 bytes), so the bytes accepted here are the bytes
 * avro-c then consumes.  The field path is kept as a stack of name slices
 * and only formatted when something fails. */
#include "avro_bin.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- writing --------------------------------------------------------- */

int pql_avro_put_long(pql_buf *b, int64_t v)
{
    uint8_t tmp[10];
    size_t n = 0;
    uint64_t z = v < 0 ? ~((uint64_t)v << 1) : (uint64_t)v << 1;
    while (z & ~(uint64_t)0x7f) {
        tmp[n++] = (uint8_t)((z & 0x7f) | 0x80);
        z >>= 7;
    }
    tmp[n++] = (uint8_t)z;
    return pql_buf_append(b, tmp, n);
}

int pql_avro_put_string(pql_buf *b, const char *s, size_t len)
{
    if (pql_avro_put_long(b, (int64_t)len) < 0) return -1;
    return pql_buf_append(b, s, len);
}

int pql_avro_put_double(pql_buf *b, double d)
{
    uint64_t bits;
    uint8_t tmp[8];
    memcpy(&bits, &d, sizeof bits);
    for (int i = 0; i < 8; i++)
        tmp[i] = (uint8_t)(bits >> (8 * i));
    return pql_buf_append(b, tmp, sizeof tmp);
}

int pql_avro_is_long(double d)
{
    return isfinite(d) && d == trunc(d) && d >= -9223372036854775808.0 && d < 9223372036854775808.0;
}

int pql_avro_put_value(pql_buf *b, const pql_value *v)
{
    switch (v->type) {
    case PQL_V_NULL:
        return pql_avro_put_long(b, 0);
    case PQL_V_BOOL: {
        uint8_t byte = v->u.b ? 1 : 0;
        if (pql_avro_put_long(b, 1) < 0) return -1;
        return pql_buf_append(b, &byte, 1);
    }
    case PQL_V_NUM:
        if (pql_avro_is_long(v->u.num)) {
            if (pql_avro_put_long(b, 2) < 0) return -1;
            return pql_avro_put_long(b, (int64_t)v->u.num);
        }
        if (pql_avro_put_long(b, 3) < 0) return -1;
        return pql_avro_put_double(b, v->u.num);
    case PQL_V_STR:
        if (pql_avro_put_long(b, 4) < 0) return -1;
        return pql_avro_put_string(b, v->u.str.ptr, v->u.str.len);
    }
    return -1;
}

/* ---- compiling a schema ------------------------------------------------ */

typedef enum node_kind {
    K_NULL,
    K_BOOL,
    K_INT,
    K_LONG,
    K_FLOAT,
    K_DOUBLE,
    K_BYTES,
    K_STRING,
    K_FIXED,
    K_ENUM,
    K_RECORD,
    K_MAP,
    K_ARRAY,
    K_UNION,
} node_kind;

typedef struct node {
    node_kind kind;
    int may_be_empty;     /* can encode in zero bytes */
    size_t n;             /* record fields, union branches, enum symbols, fixed size */
    struct node **kids;   /* fields / branches; [0] holds map values, array items */
    char **names;         /* record field names */
    avro_schema_t schema; /* identity of a named type, for sharing (not a reference) */
} node;

struct pql_avro_check {
    node **all; /* every node, for destroy */
    size_t nall, capall;
    node *root;
};

static int fmt_err(char *errstr, size_t size, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int fmt_err(char *errstr, size_t size, const char *fmt, ...)
{
    va_list ap;
    if (!errstr || size == 0) return -1;
    va_start(ap, fmt);
    vsnprintf(errstr, size, fmt, ap);
    va_end(ap);
    return -1;
}

static node *node_add(pql_avro_check *c, node_kind kind, avro_schema_t schema)
{
    if (c->nall == c->capall) {
        size_t cap = c->capall ? c->capall * 2 : 16;
        node **all = realloc(c->all, cap * sizeof *all);
        if (!all) return NULL;
        c->all = all;
        c->capall = cap;
    }
    node *nd = calloc(1, sizeof *nd);
    if (!nd) return NULL;
    nd->kind = kind;
    nd->schema = schema;
    c->all[c->nall++] = nd;
    return nd;
}

static node *compile(pql_avro_check *c, avro_schema_t s, int depth, char *errstr, size_t size)
{
    for (int hops = 0; is_avro_link(s) && hops < 64; hops++)
        s = avro_schema_link_target(s);
    if (!s || is_avro_link(s) || depth > 4 * PQL_AVRO_MAX_DEPTH) {
        fmt_err(errstr, size, "schema is nested too deeply");
        return NULL;
    }
    if (is_avro_record(s) || is_avro_enum(s) || is_avro_fixed(s)) {
        for (size_t i = 0; i < c->nall; i++)
            if (c->all[i]->schema == s) return c->all[i];
    }
    static const struct {
        avro_type_t type;
        node_kind kind;
    } simple[] = {{AVRO_NULL, K_NULL},   {AVRO_BOOLEAN, K_BOOL},  {AVRO_INT32, K_INT},
                  {AVRO_INT64, K_LONG},  {AVRO_FLOAT, K_FLOAT},   {AVRO_DOUBLE, K_DOUBLE},
                  {AVRO_BYTES, K_BYTES}, {AVRO_STRING, K_STRING}, {AVRO_FIXED, K_FIXED},
                  {AVRO_ENUM, K_ENUM},   {AVRO_RECORD, K_RECORD}, {AVRO_MAP, K_MAP},
                  {AVRO_ARRAY, K_ARRAY}, {AVRO_UNION, K_UNION}};
    size_t k = 0;
    while (k < sizeof simple / sizeof simple[0] && simple[k].type != avro_typeof(s))
        k++;
    if (k == sizeof simple / sizeof simple[0]) {
        fmt_err(errstr, size, "unsupported schema type %s", avro_schema_type_name(s));
        return NULL;
    }
    node *nd = node_add(c, simple[k].kind, s);
    if (!nd) goto nomem;
    size_t nkids = 0;
    switch (nd->kind) {
    case K_FIXED:
        nd->n = (size_t)avro_schema_fixed_size(s);
        break;
    case K_ENUM:
        nd->n = (size_t)avro_schema_enum_number_of_symbols(s);
        break;
    case K_RECORD:
        nd->n = nkids = avro_schema_record_size(s);
        break;
    case K_UNION:
        nd->n = nkids = avro_schema_union_size(s);
        break;
    case K_MAP:
    case K_ARRAY:
        nkids = 1;
        break;
    default:
        break;
    }
    if (nkids == 0) return nd;
    nd->kids = calloc(nkids, sizeof *nd->kids);
    if (!nd->kids) goto nomem;
    if (nd->kind == K_RECORD) {
        nd->names = calloc(nkids, sizeof *nd->names);
        if (!nd->names) goto nomem;
    }
    for (size_t i = 0; i < nkids; i++) {
        avro_schema_t kid;
        if (nd->kind == K_RECORD) {
            nd->names[i] = strdup(avro_schema_record_field_name(s, (int)i));
            if (!nd->names[i]) goto nomem;
            kid = avro_schema_record_field_get_by_index(s, (int)i);
        } else if (nd->kind == K_UNION) {
            kid = avro_schema_union_branch(s, (int)i);
        } else {
            kid = nd->kind == K_MAP ? avro_schema_map_values(s) : avro_schema_array_items(s);
        }
        nd->kids[i] = compile(c, kid, depth + 1, errstr, size);
        if (!nd->kids[i]) return NULL;
    }
    return nd;
nomem:
    fmt_err(errstr, size, "out of memory compiling a schema");
    return NULL;
}

/* Which nodes can encode in zero bytes: null, fixed(0), and records whose
 * fields all can (greatest fixpoint, so recursion resolves). */
static void mark_empty(pql_avro_check *c)
{
    for (size_t i = 0; i < c->nall; i++) {
        node *nd = c->all[i];
        nd->may_be_empty =
            nd->kind == K_NULL || nd->kind == K_RECORD || (nd->kind == K_FIXED && nd->n == 0);
    }
    for (int changed = 1; changed;) {
        changed = 0;
        for (size_t i = 0; i < c->nall; i++) {
            node *nd = c->all[i];
            if (nd->kind != K_RECORD || !nd->may_be_empty) continue;
            for (size_t f = 0; f < nd->n; f++) {
                if (!nd->kids[f]->may_be_empty) {
                    nd->may_be_empty = 0;
                    changed = 1;
                    break;
                }
            }
        }
    }
}

pql_avro_check *pql_avro_check_new(avro_schema_t schema, char *errstr, size_t errstr_size)
{
    pql_avro_check *c = calloc(1, sizeof *c);
    if (!c) {
        fmt_err(errstr, errstr_size, "out of memory");
        return NULL;
    }
    c->root = compile(c, schema, 0, errstr, errstr_size);
    if (!c->root) {
        pql_avro_check_destroy(c);
        return NULL;
    }
    mark_empty(c);
    return c;
}

void pql_avro_check_destroy(pql_avro_check *c)
{
    if (!c) return;
    for (size_t i = 0; i < c->nall; i++) {
        node *nd = c->all[i];
        if (nd->names)
            for (size_t f = 0; f < nd->n; f++)
                free(nd->names[f]);
        free(nd->names);
        free(nd->kids);
        free(nd);
    }
    free(c->all);
    free(c);
}

/* ---- checking a message ------------------------------------------------ */

typedef struct frame {
    const char *name; /* field name or map key (not NUL-terminated) */
    size_t len;
    int is_item; /* array item: printed as [] */
} frame;

typedef struct scan {
    const uint8_t *start, *p, *end;
    size_t max_string, max_entries;
    frame stack[PQL_AVRO_MAX_DEPTH];
    int depth;
    char *errstr;
    size_t errstr_size;
} scan;

/* Formats the field path of the current position ("properties.note"). */
static void format_path(const scan *s, char *out, size_t size)
{
    size_t o = 0;
    out[0] = '\0';
    for (int i = 0; i < s->depth && o + 8 < size; i++) {
        const frame *f = &s->stack[i];
        if (f->is_item) {
            o += (size_t)snprintf(out + o, size - o, "[]");
            continue;
        }
        if (i > 0) out[o++] = '.';
        size_t n = f->len > 40 ? 40 : f->len;
        for (size_t j = 0; j < n && o + 4 < size; j++) {
            unsigned char ch = (unsigned char)f->name[j];
            out[o++] = (ch < 0x20 || ch == 0x7f) ? '?' : (char)ch;
        }
        if (n < f->len && o + 4 < size) o += (size_t)snprintf(out + o, size - o, "...");
        out[o] = '\0';
    }
    if (o == 0) snprintf(out, size, "the record");
}

static pql_err scan_fail(scan *s, pql_err err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static pql_err scan_fail(scan *s, pql_err err, const char *fmt, ...)
{
    char what[160], path[200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    format_path(s, path, sizeof path);
    fmt_err(s->errstr, s->errstr_size,
            "not valid Avro for the writer schema: %s at byte %zu of %zu (in %s)", what,
            (size_t)(s->p - s->start), (size_t)(s->end - s->start), path);
    return err;
}

/* "string of 70000 bytes in properties.note exceeds limits.max_string=4096" */
static pql_err limit_fail(scan *s, const char *what, uint64_t n, const char *unit,
                          const char *limit, size_t max)
{
    char path[200];
    format_path(s, path, sizeof path);
    fmt_err(s->errstr, s->errstr_size, "%s of %llu %s in %s exceeds limits.%s=%zu", what,
            (unsigned long long)n, unit, path, limit, max);
    return PQL_ERR_LIMIT;
}

static size_t remaining(const scan *s)
{
    return (size_t)(s->end - s->p);
}

static pql_err read_long(scan *s, int64_t *out)
{
    uint64_t v = 0;
    for (int i = 0; i < 10; i++) {
        if (s->p >= s->end) return scan_fail(s, PQL_ERR_DECODE, "truncated number");
        uint8_t b = *s->p++;
        v |= (uint64_t)(b & 0x7f) << (7 * i);
        if (!(b & 0x80)) {
            *out = (int64_t)((v >> 1) ^ (~(v & 1) + 1));
            return PQL_OK;
        }
    }
    return scan_fail(s, PQL_ERR_DECODE, "varint longer than 10 bytes");
}

static pql_err skip(scan *s, size_t n, const char *what)
{
    if (n > remaining(s))
        return scan_fail(s, PQL_ERR_DECODE, "%s of %zu bytes runs past the end", what, n);
    s->p += n;
    return PQL_OK;
}

/* Reads a string/bytes length and skips the bytes; *at gets their start. */
static pql_err skip_string(scan *s, const char *what, const uint8_t **at, size_t *len)
{
    int64_t n = 0;
    pql_err err = read_long(s, &n);
    if (err) return err;
    if (n < 0) return scan_fail(s, PQL_ERR_DECODE, "negative %s length %lld", what, (long long)n);
    if ((uint64_t)n > remaining(s))
        return scan_fail(s, PQL_ERR_DECODE, "%s of %lld bytes runs past the end", what,
                         (long long)n);
    if ((uint64_t)n > s->max_string)
        return limit_fail(s, what, (uint64_t)n, "bytes", "max_string", s->max_string);
    *at = s->p;
    *len = (size_t)n;
    s->p += n;
    return PQL_OK;
}

static pql_err push(scan *s, const char *name, size_t len, int is_item)
{
    if (s->depth == PQL_AVRO_MAX_DEPTH)
        return scan_fail(s, PQL_ERR_DECODE, "nesting deeper than %d", PQL_AVRO_MAX_DEPTH);
    s->stack[s->depth++] = (frame){name, len, is_item};
    return PQL_OK;
}

static pql_err check_value(scan *s, const node *nd);

/* Maps and arrays: blocks of (count[, byte size], items) ending with count 0. */
static pql_err check_blocks(scan *s, const node *nd)
{
    const node *item = nd->kids[0];
    int is_map = nd->kind == K_MAP;
    uint64_t total = 0;
    for (;;) {
        int64_t count = 0, bytes = 0;
        pql_err err = read_long(s, &count);
        if (err) return err;
        if (count == 0) return PQL_OK;
        if (count < 0) {
            if (count == INT64_MIN) return scan_fail(s, PQL_ERR_DECODE, "bad block count");
            count = -count;
            if ((err = read_long(s, &bytes))) return err;
            if (bytes < 0) return scan_fail(s, PQL_ERR_DECODE, "negative block size");
        }
        /* Every map entry and every non-empty item takes at least a byte. */
        if ((is_map || !item->may_be_empty) && (uint64_t)count > remaining(s))
            return scan_fail(s, PQL_ERR_DECODE, "block of %lld entries runs past the end",
                             (long long)count);
        total += (uint64_t)count;
        if ((is_map || item->may_be_empty) && total > s->max_entries)
            return limit_fail(s, is_map ? "map" : "array", total, "entries", "max_properties",
                              s->max_entries);
        for (int64_t i = 0; i < count; i++) {
            const uint8_t *key = NULL;
            size_t key_len = 0;
            if (is_map && (err = skip_string(s, "map key", &key, &key_len))) return err;
            if ((err = push(s, (const char *)key, key_len, !is_map))) return err;
            err = check_value(s, item);
            s->depth--;
            if (err) return err;
        }
    }
}

static pql_err check_value(scan *s, const node *nd)
{
    int64_t v = 0;
    pql_err err;
    const uint8_t *at;
    size_t len;
    switch (nd->kind) {
    case K_NULL:
        return PQL_OK;
    case K_BOOL:
        return skip(s, 1, "boolean");
    case K_FLOAT:
        return skip(s, 4, "float");
    case K_DOUBLE:
        return skip(s, 8, "double");
    case K_FIXED:
        return skip(s, nd->n, "fixed");
    case K_LONG:
        return read_long(s, &v);
    case K_INT:
        if ((err = read_long(s, &v))) return err;
        if (v < INT32_MIN || v > INT32_MAX)
            return scan_fail(s, PQL_ERR_DECODE, "int %lld out of range", (long long)v);
        return PQL_OK;
    case K_STRING:
        return skip_string(s, "string", &at, &len);
    case K_BYTES:
        return skip_string(s, "bytes", &at, &len);
    case K_ENUM:
    case K_UNION:
        if ((err = read_long(s, &v))) return err;
        if (v < 0 || (uint64_t)v >= nd->n)
            return scan_fail(s, PQL_ERR_DECODE, "%s index %lld out of range (0..%zu)",
                             nd->kind == K_ENUM ? "enum" : "union", (long long)v,
                             nd->n ? nd->n - 1 : 0);
        return nd->kind == K_ENUM ? PQL_OK : check_value(s, nd->kids[v]);
    case K_RECORD:
        for (size_t i = 0; i < nd->n; i++) {
            if ((err = push(s, nd->names[i], strlen(nd->names[i]), 0))) return err;
            err = check_value(s, nd->kids[i]);
            s->depth--;
            if (err) return err;
        }
        return PQL_OK;
    case K_MAP:
    case K_ARRAY:
        return check_blocks(s, nd);
    }
    return scan_fail(s, PQL_ERR_DECODE, "unknown node");
}

pql_err pql_avro_check_bytes(const pql_avro_check *c, const void *buf, size_t len,
                             size_t max_string, size_t max_entries, char *errstr,
                             size_t errstr_size)
{
    scan s;
    if (!buf) len = 0;
    s.start = s.p = buf ? (const uint8_t *)buf : (const uint8_t *)"";
    s.end = s.start + len;
    s.max_string = max_string;
    s.max_entries = max_entries;
    s.depth = 0;
    s.errstr = errstr;
    s.errstr_size = errstr_size;
    pql_err err = check_value(&s, c->root);
    if (err) return err;
    if (s.p != s.end)
        return scan_fail(&s, PQL_ERR_DECODE, "%zu trailing bytes after the record", remaining(&s));
    return PQL_OK;
}
