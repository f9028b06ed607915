/* common.c — error names, number formatting, durations, clocks. */
#include "common.h"

#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

const char *pql_err_str(pql_err err)
{
    switch (err) {
    case PQL_OK:
        return "ok";
    case PQL_ERR_NOMEM:
        return "out-of-memory";
    case PQL_ERR_ARG:
        return "bad-argument";
    case PQL_ERR_PARSE:
        return "parse";
    case PQL_ERR_TYPE:
        return "type";
    case PQL_ERR_DECODE:
        return "decode";
    case PQL_ERR_INVALID:
        return "invalid";
    case PQL_ERR_LIMIT:
        return "limit";
    case PQL_ERR_SCHEMA:
        return "schema";
    case PQL_ERR_IO:
        return "io";
    case PQL_ERR_FENCED:
        return "fenced";
    case PQL_ERR_NOTFOUND:
        return "not-found";
    case PQL_ERR_REWOUND:
        return "rewound";
    }
    return "unknown";
}

/* 1234567 → "1,234,567" (rounded to a whole number). */
static int format_count(char *buf, size_t size, double d)
{
    char digits[32];
    double r = round(fabs(d));
    if (r >= 1e18) return snprintf(buf, size, "%.0f", round(d));
    int n = snprintf(digits, sizeof digits, "%.0f", r);
    char out[48];
    size_t o = 0;
    if (d < 0 && r > 0) out[o++] = '-';
    for (int i = 0; i < n; i++) {
        if (i > 0 && (n - i) % 3 == 0) out[o++] = ',';
        out[o++] = digits[i];
    }
    out[o] = '\0';
    return snprintf(buf, size, "%s", out);
}

/* Milliseconds as a person says them: the largest unit, and the next one
 * down when it is not zero: "14 days", "1 day 4 hours", "1 hour 30 minutes",
 * "45 seconds", "0 seconds".  Weeks are said in days (a CRM reader counts
 * "14 days", not "2 weeks"). */
static int format_duration(char *buf, size_t size, double d)
{
    static const struct {
        const char *one, *many;
        int64_t ms;
    } units[] = {{"day", "days", PQL_MS_DAY},
                 {"hour", "hours", PQL_MS_HOUR},
                 {"minute", "minutes", PQL_MS_MINUTE},
                 {"second", "seconds", 1000}};
    const char *sign = d < 0 ? "-" : "";
    double a = fabs(d);
    if (a >= 9.2e18) return snprintf(buf, size, "n/a");
    int64_t ms = (int64_t)llround(a);
    for (size_t i = 0; i < 4; i++) {
        if (ms < units[i].ms && i < 3) continue;
        int64_t n = ms / units[i].ms, rest = ms % units[i].ms;
        int k = snprintf(buf, size, "%s%lld %s", sign, (long long)n,
                         n == 1 ? units[i].one : units[i].many);
        if (i < 3 && k > 0 && (size_t)k < size) {
            int64_t m = rest / units[i + 1].ms;
            if (m)
                k += snprintf(buf + k, size - (size_t)k, " %lld %s", (long long)m,
                              m == 1 ? units[i + 1].one : units[i + 1].many);
        }
        return k;
    }
    return snprintf(buf, size, "0 seconds");
}

size_t pql_fmt_i64(char *buf, int64_t v)
{
    char tmp[PQL_I64_MAX_DIGITS];
    uint64_t u = v < 0 ? 0 - (uint64_t)v : (uint64_t)v;
    size_t n = 0, len = 0;
    do {
        tmp[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0) buf[len++] = '-';
    while (n)
        buf[len++] = tmp[--n];
    buf[len] = '\0';
    return len;
}

size_t pql_fmt_num(char *buf, double d)
{
    if (d == floor(d) && fabs(d) < 9007199254740992.0) {
        if (d == 0 && signbit(d)) {
            memcpy(buf, "-0", 3);
            return 2;
        }
        return pql_fmt_i64(buf, (int64_t)d);
    }
    return (size_t)snprintf(buf, 32, "%.17g", d);
}

int pql_format_number(char *buf, size_t size, double d, pql_vfmt fmt)
{
    if (!isfinite(d)) return snprintf(buf, size, "n/a");
    if (fmt == PQL_FMT_COUNT) return format_count(buf, size, d);
    if (fmt == PQL_FMT_DURATION) return format_duration(buf, size, d);
    if (fmt == PQL_FMT_PERCENT) {
        double p = d * 100.0;
        if (fabs(p - round(p)) < 0.05) return snprintf(buf, size, "%.0f%%", round(p));
        return snprintf(buf, size, "%.1f%%", p);
    }
    if (fabs(d) < 9.007199254740992e15 && d == floor(d)) return snprintf(buf, size, "%.0f", d);
    int n = snprintf(buf, size, "%.2f", d);
    /* trim trailing zeros: 0.50 -> 0.5 */
    if (n > 0 && (size_t)n < size) {
        while (n > 0 && buf[n - 1] == '0')
            buf[--n] = '\0';
        if (n > 0 && buf[n - 1] == '.') buf[--n] = '\0';
    }
    return n;
}

int pql_parse_duration(const char *s, size_t len, int64_t *ms_out)
{
    size_t i = 0;
    int64_t n = 0;
    if (len == 0 || !isdigit((unsigned char)s[0])) return -1;
    while (i < len && isdigit((unsigned char)s[i])) {
        if (n > (INT64_MAX / 10) - 10) return -1;
        n = n * 10 + (s[i++] - '0');
    }
    const char *unit = s + i;
    size_t ulen = len - i;
    int64_t mult;
    if (ulen == 2 && memcmp(unit, "ms", 2) == 0)
        mult = 1;
    else if (ulen == 1 && unit[0] == 's')
        mult = 1000;
    else if (ulen == 1 && unit[0] == 'm')
        mult = PQL_MS_MINUTE;
    else if (ulen == 1 && unit[0] == 'h')
        mult = PQL_MS_HOUR;
    else if (ulen == 1 && unit[0] == 'd')
        mult = PQL_MS_DAY;
    else if (ulen == 1 && unit[0] == 'w')
        mult = 7 * PQL_MS_DAY;
    else
        return -1;
    if (n > INT64_MAX / mult) return -1;
    *ms_out = n * mult;
    return 0;
}

int64_t pql_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

#include <stdarg.h>
#include <stdlib.h>

static int buf_reserve(pql_buf *b, size_t extra)
{
    if (b->len + extra + 1 <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra + 1)
        cap *= 2;
    char *p = realloc(b->data, cap);
    if (!p) return -1;
    b->data = p;
    b->cap = cap;
    return 0;
}

int pql_buf_append(pql_buf *b, const void *p, size_t len)
{
    if (buf_reserve(b, len) < 0) return -1;
    if (len) memcpy(b->data + b->len, p, len);
    b->len += len;
    b->data[b->len] = '\0';
    return 0;
}

int pql_buf_printf(pql_buf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || buf_reserve(b, (size_t)n) < 0) return -1;
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
    return 0;
}

void pql_buf_free(pql_buf *b)
{
    if (!b) return;
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

int pql_edit_distance(const char *a, size_t alen, const char *b, size_t blen)
{
    unsigned char row[256];
    if (alen > 254 || blen > 254) return 255;
    for (size_t j = 0; j <= blen; j++)
        row[j] = (unsigned char)j;
    for (size_t i = 1; i <= alen; i++) {
        unsigned char diag = row[0];
        row[0] = (unsigned char)i;
        for (size_t j = 1; j <= blen; j++) {
            unsigned char up = row[j];
            int best = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < best) best = up + 1;
            if (row[j - 1] + 1 < best) best = row[j - 1] + 1;
            row[j] = (unsigned char)(best > 255 ? 255 : best);
            diag = up;
        }
    }
    return row[blen];
}

void pql_set_err(char *errstr, size_t errstr_size, const char *fmt, ...)
{
    if (!errstr || errstr_size == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errstr, errstr_size, fmt, ap);
    va_end(ap);
}
