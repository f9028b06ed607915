/* metrics.c — periods, the time-to-PQL histogram, contributions and a
 * batch's counter deltas.  The design is the comment at the top of metrics.h.
 *
 * Civil dates.  Periods are computed on days since the epoch with Howard
 * Hinnant's days_from_civil / civil_from_days (proleptic Gregorian, UTC), so
 * no timegm() or TZ is involved and any int64 millisecond time works.
 *
 * Deltas.  A batch's deltas live in an open-addressing table keyed by (hash,
 * field), strings kept in one arena; drain sorts them, so a batch is a
 * deterministic function of the changes and the store groups increments of a
 * counter hash together. */
#include "metrics.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- periods ------------------------------------------------------------- */

static const char *const gran_names[PQL_NGRAN] = {"hour", "day", "week", "month"};
static const char *const seg_names[PQL_NSEG] = {"all", "channel", "plan", "rule"};

const char *pql_granularity_name(pql_granularity g)
{
    return (unsigned)g < PQL_NGRAN ? gran_names[g] : "?";
}

int pql_granularity_parse(const char *name)
{
    for (int g = 0; g < PQL_NGRAN; g++)
        if (name && strcmp(name, gran_names[g]) == 0) return g;
    return -1;
}

const char *pql_segment_name(pql_segment k)
{
    return (unsigned)k < PQL_NSEG ? seg_names[k] : "?";
}

int pql_segment_parse(const char *name)
{
    for (int k = 0; k < PQL_NSEG; k++)
        if (name && strcmp(name, seg_names[k]) == 0) return k;
    return -1;
}

static int64_t floor_div(int64_t a, int64_t b)
{
    int64_t q = a / b;
    return (a % b != 0 && (a < 0) != (b < 0)) ? q - 1 : q;
}

static int64_t days_from_civil(int64_t y, unsigned m, unsigned d)
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    unsigned yoe = (unsigned)(y - era * 400);
    unsigned doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
    unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + (int64_t)doe - 719468;
}

static void civil_from_days(int64_t z, int64_t *y, unsigned *m, unsigned *d)
{
    z += 719468;
    int64_t era = (z >= 0 ? z : z - 146096) / 146097;
    unsigned doe = (unsigned)(z - era * 146097);
    unsigned yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    unsigned doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    unsigned mp = (5 * doy + 2) / 153;
    *d = doy - (153 * mp + 2) / 5 + 1;
    *m = mp < 10 ? mp + 3 : mp - 9;
    *y = (int64_t)yoe + era * 400 + (*m <= 2);
}

int64_t pql_period_start(pql_granularity g, int64_t t)
{
    int64_t day = floor_div(t, PQL_MS_DAY), y;
    unsigned m, d;
    switch (g) {
    case PQL_GRAN_HOUR:
        return floor_div(t, PQL_MS_HOUR) * PQL_MS_HOUR;
    case PQL_GRAN_DAY:
        return day * PQL_MS_DAY;
    case PQL_GRAN_WEEK: /* 1970-01-01 was a Thursday: Monday-based weekday 3 */
        return (day - (day + 3 - floor_div(day + 3, 7) * 7)) * PQL_MS_DAY;
    case PQL_GRAN_MONTH:
        civil_from_days(day, &y, &m, &d);
        return days_from_civil(y, m, 1) * PQL_MS_DAY;
    }
    return t;
}

int64_t pql_period_next(pql_granularity g, int64_t start)
{
    int64_t y;
    unsigned m, d;
    switch (g) {
    case PQL_GRAN_HOUR:
        return start + PQL_MS_HOUR;
    case PQL_GRAN_DAY:
        return start + PQL_MS_DAY;
    case PQL_GRAN_WEEK:
        return start + 7 * PQL_MS_DAY;
    case PQL_GRAN_MONTH:
        civil_from_days(floor_div(start, PQL_MS_DAY), &y, &m, &d);
        return days_from_civil(m == 12 ? y + 1 : y, m == 12 ? 1 : m + 1, 1) * PQL_MS_DAY;
    }
    return start;
}

void pql_format_utc(int64_t t, char *out, size_t size)
{
    int64_t day = floor_div(t, PQL_MS_DAY), y, ms = t - day * PQL_MS_DAY;
    unsigned m, d;
    civil_from_days(day, &y, &m, &d);
    snprintf(out, size, "%04lld-%02u-%02uT%02d:%02d:%02dZ", (long long)y, m, d,
             (int)(ms / PQL_MS_HOUR), (int)(ms / PQL_MS_MINUTE % 60), (int)(ms / 1000 % 60));
}

int pql_parse_utc(const char *s, int64_t *ms_out)
{
    int y, mo, d, h = 0, mi = 0, sec = 0, n = 0;
    size_t len = strlen(s);
    if (sscanf(s, "%4d-%2d-%2d%n", &y, &mo, &d, &n) != 3 || n != 10) return -1;
    if (len > 10) {
        int m = 0;
        if (sscanf(s + 10, "T%2d:%2d%n", &h, &mi, &m) != 2 || m != 6) return -1;
        n = 16;
        if (s[n] == ':') {
            if (sscanf(s + n, ":%2d%n", &sec, &m) != 1 || m != 3) return -1;
            n += 3;
        }
        if (strcmp(s + n, "Z") != 0) return -1;
    }
    if (mo < 1 || mo > 12 || d < 1 || h > 23 || mi > 59 || sec > 59 || h < 0 || mi < 0 || sec < 0)
        return -1;
    int64_t day = days_from_civil(y, (unsigned)mo, (unsigned)d);
    if (pql_period_start(PQL_GRAN_MONTH, day * PQL_MS_DAY) !=
        days_from_civil(y, (unsigned)mo, 1) * PQL_MS_DAY)
        return -1; /* the 31st of a 30-day month rolled over */
    *ms_out = day * PQL_MS_DAY + h * PQL_MS_HOUR + mi * PQL_MS_MINUTE + sec * 1000LL;
    return 0;
}

/* ---- histogram ------------------------------------------------------------- */

#define GAMMA ((1.0 + PQL_HIST_ALPHA) / (1.0 - PQL_HIST_ALPHA))

int pql_hist_bucket(int64_t v)
{
    if (v <= 0) return -1;
    double x = (double)v;
    int i = (int)ceil(log(x) / log(GAMMA));
    if (i < 0) i = 0;
    /* log() rounding can be off by one at a bucket edge: settle on pow() */
    while (i > 0 && pow(GAMMA, i - 1) >= x)
        i--;
    while (pow(GAMMA, i) < x)
        i++;
    return i;
}

double pql_hist_value(int bucket)
{
    return bucket < 0 ? 0.0 : 2.0 * pow(GAMMA, bucket) / (GAMMA + 1.0);
}

/* ---- segment values --------------------------------------------------------- */

/* Copies s[0..len) into out (size > 1): '|' and control bytes become '_', cut
 * to size-1 bytes at a UTF-8 character boundary.  @returns the length. */
static size_t sanitize(const char *s, size_t len, char *out, size_t size)
{
    if (len > size - 1) {
        len = size - 1;
        while (len > 0 && ((unsigned char)s[len] & 0xc0) == 0x80)
            len--; /* s[len] would continue a character we cut */
    }
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        out[i] = (c == '|' || c < 0x20 || c == 0x7f) ? '_' : (char)c;
    }
    out[len] = '\0';
    return len;
}

/* A trait as a segment value into out; "" when missing or empty. */
static void render_trait(const pql_account *a, const char *name, char *out, size_t size)
{
    pql_value v = pql_null();
    for (size_t i = 0, n = pql_account_ntraits(a); i < n; i++) {
        pql_value tv;
        const char *key = pql_account_trait(a, i, &tv);
        if (key && !strcmp(key, name)) {
            v = tv;
            break;
        }
    }
    char num[64];
    out[0] = '\0';
    switch (v.type) {
    case PQL_V_NULL:
        return;
    case PQL_V_STR:
        sanitize(v.u.str.ptr, v.u.str.len, out, size);
        return;
    case PQL_V_BOOL:
        snprintf(out, size, "%s", v.u.b ? "true" : "false");
        return;
    case PQL_V_NUM:
        if (v.u.num == floor(v.u.num) && fabs(v.u.num) < 1e15)
            snprintf(num, sizeof num, "%.0f", v.u.num);
        else
            snprintf(num, sizeof num, "%.17g", v.u.num);
        sanitize(num, strlen(num), out, size);
        return;
    }
}

/* ---- the accumulator ------------------------------------------------------------ */

typedef struct delta {
    size_t hash_off, field_off; /* NUL-terminated strings in the arena */
    uint64_t h;
    int64_t v;
} delta;

struct pql_metrics {
    char *trait[2]; /* channel, plan */
    pql_buf arena;
    delta *d;
    size_t n, cap;
    size_t *slots; /* index + 1 into d, 0 = empty; a power of two */
    size_t nslots;
};

static const char *const memo_names[2] = {"channel", "plan"};

pql_metrics *pql_metrics_new(const char *channel_trait, const char *plan_trait)
{
    pql_metrics *m = calloc(1, sizeof(*m));
    if (!m) return NULL;
    m->trait[0] = strdup(channel_trait);
    m->trait[1] = strdup(plan_trait);
    if (!m->trait[0] || !m->trait[1]) {
        pql_metrics_destroy(m);
        return NULL;
    }
    return m;
}

void pql_metrics_destroy(pql_metrics *m)
{
    if (!m) return;
    free(m->trait[0]);
    free(m->trait[1]);
    pql_buf_free(&m->arena);
    free(m->d);
    free(m->slots);
    free(m);
}

static uint64_t fnv(uint64_t h, const char *s)
{
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 0x100000001b3ULL;
    }
    return h;
}

static const char *str_at(const pql_metrics *m, size_t off)
{
    return m->arena.data + off;
}

static size_t arena_put(pql_metrics *m, const char *s)
{
    size_t off = m->arena.len;
    if (pql_buf_append(&m->arena, s, strlen(s) + 1)) abort();
    return off;
}

static void rehash(pql_metrics *m, size_t nslots)
{
    free(m->slots);
    m->slots = calloc(nslots, sizeof(*m->slots));
    if (!m->slots) abort();
    m->nslots = nslots;
    for (size_t i = 0; i < m->n; i++) {
        size_t s = m->d[i].h & (nslots - 1);
        while (m->slots[s])
            s = (s + 1) & (nslots - 1);
        m->slots[s] = i + 1;
    }
}

#define FNV_BASIS 0xcbf29ce484222325ULL

/* The table's hash of (hash, field) from fnv(hash) and fnv(field): callers
 * that add many fields hash each period and each field prefix once. */
static uint64_t combine(uint64_t hash_h, uint64_t field_h)
{
    uint64_t x = hash_h ^ (field_h * 0x9e3779b97f4a7c15ULL);
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    return x ^ (x >> 33);
}

/* Adds v to (hash, field), whose hash is h. */
static void add_hashed(pql_metrics *m, const char *hash, const char *field, uint64_t h, int64_t v)
{
    if (2 * (m->n + 1) > m->nslots) rehash(m, m->nslots ? m->nslots * 2 : 256);
    size_t s = h & (m->nslots - 1);
    for (; m->slots[s]; s = (s + 1) & (m->nslots - 1)) {
        delta *e = &m->d[m->slots[s] - 1];
        if (e->h == h && !strcmp(str_at(m, e->hash_off), hash) &&
            !strcmp(str_at(m, e->field_off), field)) {
            e->v += v;
            return;
        }
    }
    if (m->n == m->cap) {
        m->cap = m->cap ? m->cap * 2 : 256;
        m->d = realloc(m->d, m->cap * sizeof(*m->d));
        if (!m->d) abort();
    }
    delta *e = &m->d[m->n++];
    e->hash_off = arena_put(m, hash);
    e->field_off = arena_put(m, field);
    e->h = h;
    e->v = v;
    m->slots[s] = m->n;
}

/* ---- contributions ----------------------------------------------------------- */

#define FIELD_MAX (PQL_SEG_VALUE_MAX + 160) /* "rule|<127 bytes>|" + a counter */

/* Appends s to out at *n (the caller sized out). */
static void put_str(char *out, size_t *n, const char *s)
{
    size_t len = strlen(s);
    memcpy(out + *n, s, len);
    *n += len;
}

/* The counter hash of the period of granularity g holding t:
 * "m:day:1704067200000" (formatted by hand: this runs ~100 times a change). */
static void period_hash(pql_granularity g, int64_t t, char out[64])
{
    char digits[24];
    int64_t v = pql_period_start(g, t);
    uint64_t u = v < 0 ? -(uint64_t)v : (uint64_t)v;
    size_t n = 0, d = 0;
    do
        digits[d++] = (char)('0' + u % 10);
    while ((u /= 10) != 0);
    put_str(out, &n, "m:");
    put_str(out, &n, gran_names[g]);
    out[n++] = ':';
    if (v < 0) out[n++] = '-';
    while (d)
        out[n++] = digits[--d];
    out[n] = '\0';
}

/* "<kind>|<value>|" into out (FIELD_MAX bytes).  @returns its length. */
static size_t field_prefix(pql_segment k, const char *value, char *out)
{
    size_t n = 0;
    put_str(out, &n, seg_names[k]);
    out[n++] = '|';
    put_str(out, &n, value); /* at most 127 bytes: rule names are cut to 127 */
    out[n++] = '|';
    out[n] = '\0';
    return n;
}

/* A segment of a period hash: the hash, its field prefix "<kind>|<value>|"
 * and their FNV hashes, so adding a counter formats nothing and hashes only
 * the counter's name. */
typedef struct cellref {
    const char *hash, *prefix;
    size_t prefix_len;
    uint64_t hash_h, prefix_h;
} cellref;

static void add_counter(pql_metrics *m, const cellref *c, const char *counter, int64_t v)
{
    char field[FIELD_MAX];
    size_t n = strlen(counter);
    if (c->prefix_len + n >= sizeof field) return; /* cannot happen: values are bounded */
    memcpy(field, c->prefix, c->prefix_len);
    memcpy(field + c->prefix_len, counter, n + 1);
    add_hashed(m, c->hash, field, combine(c->hash_h, fnv(c->prefix_h, counter)), v);
}

static void add_cell(pql_metrics *m, pql_granularity g, int64_t t, pql_segment k, const char *value,
                     const char *counter, int64_t v)
{
    char hash[64], prefix[FIELD_MAX];
    period_hash(g, t, hash);
    cellref c = {hash, prefix, field_prefix(k, value, prefix), fnv(FNV_BASIS, hash), 0};
    c.prefix_h = fnv(FNV_BASIS, prefix);
    add_counter(m, &c, counter, v);
}

/* The segments an account counts in: the base three, then its rule. */
static int segments(const pql_metrics_state *s, const char *values[PQL_NSEG])
{
    values[PQL_SEG_ALL] = "all";
    values[PQL_SEG_CHANNEL] = s->channel[0] ? s->channel : PQL_SEG_NONE;
    values[PQL_SEG_PLAN] = s->plan[0] ? s->plan : PQL_SEG_NONE;
    values[PQL_SEG_RULE] = s->rule;
    return s->rule[0] && s->pql_at != PQL_NO_TIME ? PQL_NSEG : PQL_SEG_RULE;
}

/* The parts of a contribution, each a function of some facts only. */
enum {
    PART_SIGNUP = 1, /* of s, whether q and c are known, the segments */
    PART_QUAL = 2,   /* of q, the rule, s, c, the segments */
    PART_CONV = 4,   /* of c, q, the rule, the segments */
};

/* Adds `sign` times the parts `parts` of the account's contribution (metrics.h, 3.). */
static void contribute(pql_metrics *m, const pql_metrics_state *s, int64_t sign, unsigned parts)
{
    const char *seg[PQL_NSEG];
    int nseg = segments(s, seg);
    int64_t su = s->signup, q = s->pql_at, c = s->conversion;
    int has_s = su != PQL_NO_TIME && (parts & PART_SIGNUP);
    int has_q = q != PQL_NO_TIME, has_c = c != PQL_NO_TIME;
    int pql_conv = has_q && has_c && q <= c;
    int q_part = has_q && (parts & PART_QUAL), c_part = has_c && (parts & PART_CONV);
    char ttp[32] = "", prefix[PQL_NSEG][FIELD_MAX], hs[64], hq[64], hc[64];
    size_t plen[PQL_NSEG];
    uint64_t ph[PQL_NSEG];
    if (has_q && su != PQL_NO_TIME && q >= su)
        snprintf(ttp, sizeof ttp, "ttp:%d", pql_hist_bucket(q - su));
    for (int k = 0; k < nseg; k++) {
        plen[k] = field_prefix(k, seg[k], prefix[k]);
        ph[k] = fnv(FNV_BASIS, prefix[k]);
    }
    for (int g = 0; g < PQL_NGRAN; g++) {
        uint64_t ss = 0, sq = 0, sc = 0;
        if (has_s) period_hash(g, su, hs), ss = fnv(FNV_BASIS, hs);
        if (q_part) period_hash(g, q, hq), sq = fnv(FNV_BASIS, hq);
        if (c_part) period_hash(g, c, hc), sc = fnv(FNV_BASIS, hc);
        for (int k = 0; has_s && k < PQL_SEG_RULE; k++) {
            cellref r = {hs, prefix[k], plen[k], ss, ph[k]};
            add_counter(m, &r, "signups", sign);
            if (has_q)
                add_counter(m, &r, "signups_pql", sign);
            else if (has_c)
                add_counter(m, &r, "signups_np_conv", sign);
        }
        for (int k = 0; q_part && k < nseg; k++) {
            cellref r = {hq, prefix[k], plen[k], sq, ph[k]};
            add_counter(m, &r, "pqls_new", sign);
            if (!has_c)
                add_counter(m, &r, "pqls_open", sign);
            else if (c >= q)
                add_counter(m, &r, "pqls_conv", sign);
            if (ttp[0]) add_counter(m, &r, ttp, sign);
        }
        for (int k = 0; c_part && k < (pql_conv ? nseg : PQL_SEG_RULE); k++) {
            cellref r = {hc, prefix[k], plen[k], sc, ph[k]};
            add_counter(m, &r, "conv", sign);
            if (pql_conv) add_counter(m, &r, "conv_pql", sign);
        }
    }
}

/* The parts whose facts differ between a and b (recomputing a part whose
 * facts are equal is only wasted work: its two contributions cancel). */
static unsigned parts_changed(const pql_metrics_state *a, const pql_metrics_state *b)
{
    if (strcmp(a->channel, b->channel) || strcmp(a->plan, b->plan)) return 7;
    int rule = strcmp(a->rule, b->rule) != 0;
    int s = a->signup != b->signup, q = a->pql_at != b->pql_at, c = a->conversion != b->conversion;
    unsigned parts = 0;
    if (s || (a->pql_at == PQL_NO_TIME) != (b->pql_at == PQL_NO_TIME) ||
        (a->conversion == PQL_NO_TIME) != (b->conversion == PQL_NO_TIME))
        parts |= PART_SIGNUP;
    if (s || q || c || rule) parts |= PART_QUAL;
    if (q || c || rule) parts |= PART_CONV;
    return parts;
}

static int same_state(const pql_metrics_state *a, const pql_metrics_state *b)
{
    return a->signup == b->signup && a->pql_at == b->pql_at && a->conversion == b->conversion &&
           !strcmp(a->rule, b->rule) && !strcmp(a->channel, b->channel) &&
           !strcmp(a->plan, b->plan);
}

void pql_metrics_read(const pql_metrics *m, const pql_account *a, pql_metrics_state *out)
{
    (void)m;
    const char *rule;
    memset(out, 0, sizeof(*out)); /* comparable with memcmp */
    pql_account_lifecycle(a, &out->signup, &out->conversion, &out->pql_at, &rule);
    if (rule) sanitize(rule, strlen(rule), out->rule, sizeof out->rule);
    char *dst[2] = {out->channel, out->plan};
    for (int k = 0; k < 2; k++) {
        size_t len;
        const char *v = pql_account_memo(a, memo_names[k], &len);
        dst[k][0] = '\0';
        if (v) sanitize(v, len, dst[k], PQL_SEG_VALUE_MAX + 1);
    }
}

void pql_metrics_mark_of(const pql_account *a, pql_metrics_mark *out)
{
    pql_account_lifecycle(a, &out->signup, &out->conversion, &out->pql_at, NULL);
}

void pql_metrics_account_changed(pql_metrics *m, pql_account *a, const pql_metrics_mark *before)
{
    pql_metrics_mark now;
    pql_metrics_mark_of(a, &now);
    int known =
        now.signup != PQL_NO_TIME || now.pql_at != PQL_NO_TIME || now.conversion != PQL_NO_TIME;
    if (!known) return; /* no lifecycle fact, before or after: no contribution */
    /* the memos as before the event (applying it does not touch them) */
    const char *had[2] = {pql_account_memo(a, memo_names[0], NULL),
                          pql_account_memo(a, memo_names[1], NULL)};
    int froze = 0;
    for (int k = 0; k < 2; k++) { /* freeze what can be: metrics.h, 4. */
        if (had[k]) continue;
        char v[PQL_SEG_VALUE_MAX + 1];
        render_trait(a, m->trait[k], v, sizeof v);
        if (v[0]) pql_account_set_memo(a, memo_names[k], v, strlen(v));
        froze |= v[0] != '\0';
    }
    if (!froze && now.signup == before->signup && now.pql_at == before->pql_at &&
        now.conversion == before->conversion)
        return; /* the usual event */
    pql_metrics_state after, was;
    pql_metrics_read(m, a, &after);
    was = after; /* the state before, from the account now (see pql_metrics_mark) */
    was.signup = before->signup;
    was.pql_at = before->pql_at;
    was.conversion = before->conversion;
    if (before->pql_at == PQL_NO_TIME) was.rule[0] = '\0';
    if (!had[0]) was.channel[0] = '\0';
    if (!had[1]) was.plan[0] = '\0';
    pql_metrics_change(m, &was, &after);
}

void pql_metrics_change(pql_metrics *m, const pql_metrics_state *before,
                        const pql_metrics_state *after)
{
    if (same_state(before, after)) return;
    unsigned parts = parts_changed(before, after);
    contribute(m, before, -1, parts);
    contribute(m, after, +1, parts);
}

void pql_metrics_expansion(pql_metrics *m, const pql_account *a, const char *rule, int64_t at)
{
    pql_metrics_state s;
    pql_metrics_read(m, a, &s);
    char cur[2][PQL_SEG_VALUE_MAX + 1], name[128];
    const char *seg[PQL_NSEG];
    const char *frozen[2] = {s.channel, s.plan};
    seg[PQL_SEG_ALL] = "all";
    for (int k = 0; k < 2; k++) {
        if (frozen[k][0])
            snprintf(cur[k], sizeof cur[k], "%s", frozen[k]);
        else if (s.signup == PQL_NO_TIME && s.pql_at == PQL_NO_TIME && s.conversion == PQL_NO_TIME)
            render_trait(a, m->trait[k], cur[k], sizeof cur[k]);
        else
            cur[k][0] = '\0'; /* frozen as missing: counts stay with "(none)" */
        seg[PQL_SEG_CHANNEL + k] = cur[k][0] ? cur[k] : PQL_SEG_NONE;
    }
    sanitize(rule, strlen(rule), name, sizeof name);
    seg[PQL_SEG_RULE] = name;
    for (int g = 0; g < PQL_NGRAN; g++)
        for (int k = 0; k < PQL_NSEG; k++)
            add_cell(m, g, at, k, seg[k], "expansion", 1);
}

size_t pql_metrics_pending(const pql_metrics *m)
{
    return m->n;
}

typedef struct sorted {
    const char *hash, *field;
    int64_t v;
} sorted;

static int cmp_sorted(const void *a, const void *b)
{
    const sorted *x = a, *y = b;
    int c = strcmp(x->hash, y->hash);
    return c ? c : strcmp(x->field, y->field);
}

void pql_metrics_drain(pql_metrics *m,
                       void (*fn)(void *opaque, const char *hash, const char *field, int64_t delta),
                       void *opaque)
{
    sorted *order = malloc((m->n + 1) * sizeof(*order));
    size_t k = 0;
    if (!order) abort();
    for (size_t i = 0; i < m->n; i++)
        if (m->d[i].v)
            order[k++] =
                (sorted){str_at(m, m->d[i].hash_off), str_at(m, m->d[i].field_off), m->d[i].v};
    qsort(order, k, sizeof(*order), cmp_sorted);
    for (size_t i = 0; i < k; i++)
        fn(opaque, order[i].hash, order[i].field, order[i].v);
    for (size_t i = 0; i < k; i++) { /* one version bump per period changed */
        if (i > 0 && !strcmp(order[i].hash, order[i - 1].hash)) continue;
        fn(opaque, "mv", order[i].hash + 2, 1); /* "m:day:…" → "day:…" */
    }
    free(order);
    pql_metrics_clear(m);
}

void pql_metrics_clear(pql_metrics *m)
{
    m->n = 0;
    pql_buf_reset(&m->arena);
    if (m->slots) memset(m->slots, 0, m->nslots * sizeof(*m->slots));
}
