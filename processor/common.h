/* common.h — the few types every module shares: error codes and values.
 *
 * Errors are values with a reason (librdkafka style): functions return a
 * pql_err and, where a person will read it, fill a caller-supplied
 * `char *errstr, size_t errstr_size` with what was wrong, where, and what to do. */
#ifndef PQL_COMMON_H
#define PQL_COMMON_H

#include <stddef.h>
#include <stdint.h>

typedef enum pql_err {
    PQL_OK = 0,
    PQL_ERR_NOMEM,    /* out of memory */
    PQL_ERR_ARG,      /* bad argument or configuration */
    PQL_ERR_PARSE,    /* syntax error (rules, expressions, config) */
    PQL_ERR_TYPE,     /* type error in an expression */
    PQL_ERR_DECODE,   /* bytes that are not the expected Avro */
    PQL_ERR_INVALID,  /* decoded, but violates the contract (no account id …) */
    PQL_ERR_LIMIT,    /* over a configured size limit */
    PQL_ERR_SCHEMA,   /* unknown schema id, unresolvable writer schema */
    PQL_ERR_IO,       /* a Redis or Kafka call failed (transient: retry) */
    PQL_ERR_FENCED,   /* our epoch for a partition is stale: another owner took it */
    PQL_ERR_NOTFOUND, /* no such thing */
    PQL_ERR_REWOUND,  /* Redis lost writes it acknowledged (restarted without them): our
                         claim stands, but its state is older than ours */
} pql_err;

/** @returns a static, lowercase, one-word-ish name for `err` ("decode", "fenced"). */
const char *pql_err_str(pql_err err);

/* A dynamically typed value: what Avro property/trait maps carry
 * ([null, boolean, long, double, string]) and what expressions compute.
 * Longs become doubles (exact up to 2^53).  Strings are not owned by the
 * value: they point into the decoder's, the account's or the expression's
 * memory, which outlives the value's use. */
typedef enum pql_vtype {
    PQL_V_NULL = 0,
    PQL_V_BOOL,
    PQL_V_NUM,
    PQL_V_STR,
} pql_vtype;

/* How a number wants to be printed in a reason template (set by the
 * formatting helpers pct(), count(), duration()). */
typedef enum pql_vfmt {
    PQL_FMT_PLAIN = 0,
    PQL_FMT_PERCENT,  /* 0.95 prints as "95%" */
    PQL_FMT_COUNT,    /* 2000 prints as "2,000" (rounded to a whole number) */
    PQL_FMT_DURATION, /* milliseconds: 1209600000 prints as "14 days" */
} pql_vfmt;

typedef struct pql_value {
    pql_vtype type;
    pql_vfmt fmt; /* only for PQL_V_NUM */
    union {
        int b;
        double num;
        struct {
            const char *ptr;
            size_t len;
        } str;
    } u;
} pql_value;

/** The heap a malloc(n) takes (glibc: n and an 8-byte header rounded up to
 *  16, at least 32): how memory estimates (pql_account_memory) count a
 *  block, so that a cache bound in bytes is close to what the heap holds. */
static inline size_t pql_heap_bytes(size_t n)
{
    size_t c = (n + 8 + 15) & ~(size_t)15;
    return c < 32 ? 32 : c;
}

static inline pql_value pql_null(void)
{
    pql_value v = {PQL_V_NULL, PQL_FMT_PLAIN, {0}};
    return v;
}
static inline pql_value pql_num(double d)
{
    pql_value v = {PQL_V_NUM, PQL_FMT_PLAIN, {0}};
    v.u.num = d;
    return v;
}
static inline pql_value pql_bool(int b)
{
    pql_value v = {PQL_V_BOOL, PQL_FMT_PLAIN, {0}};
    v.u.b = b ? 1 : 0;
    return v;
}
static inline pql_value pql_str(const char *p, size_t len)
{
    pql_value v = {PQL_V_STR, PQL_FMT_PLAIN, {0}};
    v.u.str.ptr = p;
    v.u.str.len = len;
    return v;
}

/** Formats a number for people: integers without a decimal point ("19"),
 *  others with up to 2 decimals ("0.83"); by `fmt`, a percent ("95%"), a
 *  count ("2,000") or a duration in ms ("14 days", "1 hour 30 minutes").
 *  @returns the number of characters written (snprintf semantics). */
int pql_format_number(char *buf, size_t size, double d, pql_vfmt fmt);

/** Writes v in decimal ("%lld"'s bytes) and a NUL into buf, which holds at
 *  least PQL_I64_MAX_DIGITS + 1 bytes.  @returns the number of digits (and
 *  sign) written.  For the write path, where snprintf's format parsing cost
 *  more than the number. */
#define PQL_I64_MAX_DIGITS 20
size_t pql_fmt_i64(char *buf, int64_t v);

/** Writes a stored number: an integer below 2^53 as pql_fmt_i64 does ("%.0f"'s
 *  bytes, "-0" included), anything else as "%.17g" (exact round trip).
 *  buf holds at least 32 bytes.  @returns the length written. */
size_t pql_fmt_num(char *buf, double d);

/** Parses a duration "30m", "24h", "7d", "2w", "90s", "500ms" into milliseconds.
 *  @returns 0 on success, -1 if `s` is not a duration. */
int pql_parse_duration(const char *s, size_t len, int64_t *ms_out);

/** Writes a printf-formatted message into a caller's error buffer (the
 *  `char *errstr, size_t errstr_size` convention).  NULL or size 0: nothing. */
void pql_set_err(char *errstr, size_t errstr_size, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/** Edit distance between two strings (bytes), capped at 255. */
int pql_edit_distance(const char *a, size_t alen, const char *b, size_t blen);

/** Wall clock in milliseconds since the epoch. */
int64_t pql_now_ms(void);

#define PQL_MS_MINUTE 60000LL
#define PQL_MS_HOUR   (60LL * PQL_MS_MINUTE)
#define PQL_MS_DAY    (24LL * PQL_MS_HOUR)

/* A growable byte buffer.  Zero-initialise (`pql_buf b = {0};`), append, and
 * pql_buf_free() when done; reset() keeps the memory for reuse. */
typedef struct pql_buf {
    char *data;
    size_t len;
    size_t cap;
} pql_buf;

/** Appends `len` bytes. @returns 0, or -1 when out of memory (buffer unchanged). */
int pql_buf_append(pql_buf *b, const void *p, size_t len);
/** Appends printf-formatted text (no NUL counted in len; data stays NUL-terminated). */
int pql_buf_printf(pql_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static inline void pql_buf_reset(pql_buf *b)
{
    b->len = 0;
}
void pql_buf_free(pql_buf *b);

#endif /* PQL_COMMON_H */
