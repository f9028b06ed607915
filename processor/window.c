/* window.c — per-account rolling aggregates in event-time buckets (see window.h).
 *
 * Representation, chosen so an observation allocates nothing in the common case:
 *   - COUNT, SUM, DAYS_ACTIVE, MAX: a small array of {bucket, value, flags}
 *     sorted by bucket (an event usually lands in the last bucket, so the
 *     search starts there), grown geometrically.  A 30-day window holds about
 *     31 entries; lifetime holds one.
 *   - DISTINCT: an open-addressing table (linear probing, power-of-two size) of
 *     members, each an owned copy of its field "m:<member>" with its last-seen
 *     bucket; plus, in the bucket array, the number of members per last-seen
 *     bucket (not persisted) so the value costs O(buckets), not O(members).
 *   - LAST: (t, v) of the greatest event time; a later arrival wins ties.
 *
 * Persistence: every pair carries a DIRTY flag.  Expiring a pair does not free
 * it at once: it becomes a DELETED tombstone (and DIRTY), invisible to values,
 * until the next flush reports it and frees it.  Setting it again before the
 * flush just clears DELETED, so "set then deleted" is reported as deleted and
 * "deleted then set" as set, without a separate list of deleted names.
 *
 * Reach: at clock C a bucket b is within reach when b > bucket(C) - nbuckets
 * (always, for lifetime).  Values count every pair within reach; only a clock
 * earlier than the account clock could also see buckets after bucket(C).
 *
 * Size: a cache holds hundreds of thousands of accounts of about six windows
 * each, so the structs are narrow: a bucket entry and a member slot keep
 * their two flags in the top bits of their bucket (a bucket index is at most
 * |INT64_MIN| / 60,000 ≈ 2^47, so 62 bits hold any; loaded fields past that
 * are refused), array lengths are 32 bits, and the window keeps its spec's
 * two numbers and the kept value's number, not a pql_window_spec and a
 * pql_value.  16 bytes per bucket entry, 24 per member slot, 104 per window
 * (from 24, 40 and 176). */
#include "window.h"

#include <assert.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum {
    F_DIRTY = 1,   /* changed since the last flush */
    F_DELETED = 2, /* expired; reported and freed at the next flush */
};

/* Bucket indexes a window holds lie strictly between -BUCKET_LIMIT and
 * BUCKET_LIMIT (62-bit fields, see Size above). */
#define BUCKET_LIMIT ((int64_t)1 << 61)

static int bucket_fits(int64_t b)
{
    return b > -BUCKET_LIMIT && b < BUCKET_LIMIT;
}

typedef struct bucket_entry {
    int64_t bucket : 62;
    uint64_t flags : 2;
    double value; /* COUNT/SUM/MAX: the aggregate; DAYS_ACTIVE: 1; DISTINCT: members */
} bucket_entry;

typedef struct bucket_list {
    bucket_entry *v;   /* sorted by bucket, unique */
    uint32_t len, cap; /* at most 2^31 entries (bl_reserve_one) */
} bucket_list;

typedef struct member_slot {
    char *field;       /* owned "m:<member>"; NULL = empty slot */
    int64_t last : 62; /* last-seen bucket */
    uint64_t flags : 2;
    uint32_t hash;
    uint32_t field_len; /* members longer than 4 GB are refused (member_see) */
} member_slot;

static_assert(sizeof(bucket_entry) == 16, "a bucket entry is two words");
static_assert(sizeof(member_slot) == 24, "a member slot is three words");

struct pql_window {
    /* the spec: agg and lifetime (window_ms == 0) are bytes below */
    int64_t bucket_ms, nbuckets;
    bucket_list buckets;
    /* DISTINCT */
    member_slot *slots;
    uint32_t slot_cap;   /* 0 or a power of two, at most 2^31 */
    uint32_t slot_used;  /* occupied slots, tombstones included */
    size_t member_bytes; /* heap bytes of the field copies (pql_heap_bytes) */
    /* LAST */
    int64_t last_t;
    double last_v;
    /* The last value asked for, valid while memo_ok: a value depends only on
     * the state and the first bucket within reach (memo_first), so rules read
     * an untouched window again for free.  It is a number (memo_num) or null
     * (memo_null).  An observation updates it in place where the update is
     * exact (counts, days, members, max, integer sums: the same number a walk
     * of the buckets gives), else clears it; expiring clears it only when it
     * read buckets that now expire, and a flush, which changes no value,
     * keeps it. */
    int64_t memo_first;
    double memo_num;
    /* The first bucket in reach at the last expire: everything before it is
     * gone or marked, and nothing before it can be added (observations out of
     * reach are refused), so expiring again at a clock with the same first
     * bucket has nothing to do.  INT64_MIN until then and after a load. */
    int64_t expired_first;
    uint8_t agg;      /* pql_agg */
    uint8_t lifetime; /* window_ms == 0 */
    uint8_t dirty;
    uint8_t last_has_t, last_has_v, last_flags;
    uint8_t memo_ok, memo_null;
};

/* ---- spec ---------------------------------------------------------------- */

static void format_duration(char *buf, size_t size, int64_t ms)
{
    static const struct {
        int64_t ms;
        const char *unit;
    } units[] = {{PQL_MS_DAY, "d"}, {PQL_MS_HOUR, "h"}, {PQL_MS_MINUTE, "m"}, {1000, "s"}};
    for (size_t i = 0; i < sizeof units / sizeof units[0]; i++) {
        if (ms % units[i].ms == 0) {
            snprintf(buf, size, "%" PRId64 "%s", ms / units[i].ms, units[i].unit);
            return;
        }
    }
    snprintf(buf, size, "%" PRId64 "ms", ms);
}

int pql_window_spec_init(pql_window_spec *spec, pql_agg agg, int64_t window_ms, char *errstr,
                         size_t errstr_size)
{
    char dur[32];
    memset(spec, 0, sizeof(*spec));
    if ((int)agg < (int)PQL_AGG_COUNT || (int)agg > (int)PQL_AGG_LAST) {
        snprintf(errstr, errstr_size, "unknown aggregate %d", (int)agg);
        return -1;
    }
    if (window_ms < 0) {
        snprintf(errstr, errstr_size, "window must not be negative");
        return -1;
    }
    if (window_ms % PQL_MS_MINUTE != 0) {
        format_duration(dur, sizeof dur, window_ms);
        snprintf(errstr, errstr_size,
                 "window %s is not whole minutes: use a window of at least 1m, in m, h or d", dur);
        return -1;
    }
    spec->agg = agg;
    spec->window_ms = window_ms;
    if (agg == PQL_AGG_DAYS_ACTIVE) {
        spec->bucket_ms = PQL_MS_DAY;
        spec->nbuckets = window_ms / PQL_MS_DAY + (window_ms % PQL_MS_DAY != 0);
    } else if (window_ms == 0) {
        spec->bucket_ms = 0;
        spec->nbuckets = 1;
    } else if (window_ms > 2 * PQL_MS_DAY && window_ms % PQL_MS_DAY == 0) {
        spec->bucket_ms = PQL_MS_DAY;
    } else if (window_ms > PQL_MS_HOUR && window_ms % PQL_MS_HOUR == 0) {
        spec->bucket_ms = PQL_MS_HOUR;
    } else {
        spec->bucket_ms = PQL_MS_MINUTE;
    }
    if (spec->nbuckets == 0 && window_ms != 0) spec->nbuckets = window_ms / spec->bucket_ms;
    return 0;
}

static int64_t bucket_of(int64_t bucket_ms, int64_t ts)
{
    if (bucket_ms == 0) return 0;
    int64_t q = ts / bucket_ms;
    if (ts % bucket_ms != 0 && ts < 0) q--;
    return q;
}

static int64_t first_of(int lifetime, int64_t bucket_ms, int64_t nbuckets, int64_t clock)
{
    if (lifetime) return INT64_MIN;
    return bucket_of(bucket_ms, clock) - nbuckets + 1;
}

int64_t pql_window_bucket(const pql_window_spec *spec, int64_t ts)
{
    return bucket_of(spec->bucket_ms, ts);
}

int64_t pql_window_first(const pql_window_spec *spec, int64_t clock)
{
    return first_of(spec->window_ms == 0, spec->bucket_ms, spec->nbuckets, clock);
}

static int64_t window_bucket(const pql_window *w, int64_t ts)
{
    return bucket_of(w->bucket_ms, ts);
}

static int64_t first_in_reach(const pql_window *w, int64_t clock)
{
    return first_of(w->lifetime, w->bucket_ms, w->nbuckets, clock);
}

/* ---- sorted bucket array ------------------------------------------------- */

/** @returns the index of the first entry whose bucket is >= b. */
static size_t bl_lower_bound(const bucket_list *l, int64_t b)
{
    if (l->len == 0 || l->v[l->len - 1].bucket < b) return l->len;
    size_t lo = 0, hi = l->len - 1u; /* answer in [lo, hi] */
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (l->v[mid].bucket < b)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/** Makes room for one more entry. @returns 0, or -1 when out of memory. */
static int bl_reserve_one(bucket_list *l, uint32_t first_cap)
{
    if (l->len < l->cap) return 0;
    if (l->cap > UINT32_MAX / 2) return -1;
    uint32_t cap = l->cap ? l->cap * 2 : first_cap;
    bucket_entry *v = realloc(l->v, (size_t)cap * sizeof(*v));
    if (!v) return -1;
    l->v = v;
    l->cap = cap;
    return 0;
}

/** @returns the entry for bucket b, inserting a zeroed one (flags 0) at its
 *  place if absent; *created says which.  Room must have been reserved. */
static bucket_entry *bl_get(bucket_list *l, int64_t b, int *created)
{
    size_t i = bl_lower_bound(l, b);
    *created = 0;
    if (i < l->len && l->v[i].bucket == b) return &l->v[i];
    memmove(&l->v[i + 1], &l->v[i], (l->len - i) * sizeof(l->v[0]));
    l->len++;
    l->v[i].bucket = b;
    l->v[i].value = 0;
    l->v[i].flags = 0;
    *created = 1;
    return &l->v[i];
}

static void bl_remove_at(bucket_list *l, size_t i)
{
    memmove(&l->v[i], &l->v[i + 1], (l->len - i - 1) * sizeof(l->v[0]));
    l->len--;
}

/** Drops the entries before index n. */
static void bl_remove_prefix(bucket_list *l, size_t n)
{
    memmove(&l->v[0], &l->v[n], (l->len - n) * sizeof(l->v[0]));
    l->len -= n;
}

static uint32_t bl_first_cap(const pql_window *w)
{
    return w->bucket_ms == 0 ? 1 : 4;
}

/* ---- window -------------------------------------------------------------- */

pql_window *pql_window_new(const pql_window_spec *spec)
{
    pql_window *w = calloc(1, sizeof(*w));
    if (!w) return NULL;
    w->bucket_ms = spec->bucket_ms;
    w->nbuckets = spec->nbuckets;
    w->agg = (uint8_t)spec->agg;
    w->lifetime = spec->window_ms == 0;
    w->expired_first = INT64_MIN;
    return w;
}

void pql_window_destroy(pql_window *w)
{
    if (!w) return;
    for (uint32_t i = 0; i < w->slot_cap; i++)
        free(w->slots[i].field);
    free(w->slots);
    free(w->buckets.v);
    free(w);
}

/* ---- DISTINCT members ---------------------------------------------------- */

static uint32_t hash_bytes(const char *p, size_t len)
{
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)p[i];
        h *= 1099511628211ULL;
    }
    return (uint32_t)(h ^ (h >> 32));
}

/** @returns the slot holding `member`, or the empty slot where it would go. */
static member_slot *slot_find(const pql_window *w, const char *member, size_t len, uint32_t hash)
{
    size_t mask = w->slot_cap - 1;
    for (size_t i = hash & mask;; i = (i + 1) & mask) {
        member_slot *s = &w->slots[i];
        if (!s->field) return s;
        if (s->hash == hash && s->field_len == len + 2 && memcmp(s->field + 2, member, len) == 0)
            return s;
    }
}

/** Grows the table if one more member would load it past 3/4.
 *  @returns 0, or -1 when out of memory (table unchanged). */
static int slots_reserve_one(pql_window *w)
{
    if (((size_t)w->slot_used + 1) * 4 <= (size_t)w->slot_cap * 3) return 0;
    if (w->slot_cap > UINT32_MAX / 2) return -1;
    uint32_t cap = w->slot_cap ? w->slot_cap * 2 : 8;
    member_slot *slots = calloc(cap, sizeof(*slots));
    if (!slots) return -1;
    for (uint32_t i = 0; i < w->slot_cap; i++) {
        member_slot *s = &w->slots[i];
        if (!s->field) continue;
        size_t j = s->hash & (cap - 1);
        while (slots[j].field)
            j = (j + 1) & (cap - 1);
        slots[j] = *s;
    }
    free(w->slots);
    w->slots = slots;
    w->slot_cap = cap;
    return 0;
}

/** Frees the member in slot i and closes the gap (backward-shift deletion), so
 *  another member may now sit at i. */
static void slot_remove_at(pql_window *w, size_t i)
{
    size_t mask = w->slot_cap - 1;
    w->member_bytes -= pql_heap_bytes(w->slots[i].field_len + 1u);
    free(w->slots[i].field);
    w->slot_used--;
    size_t hole = i;
    for (size_t j = (i + 1) & mask; w->slots[j].field; j = (j + 1) & mask) {
        size_t home = w->slots[j].hash & mask;
        /* slot j may move into the hole if its home is not in (hole, j] */
        if (((j - home) & mask) >= ((j - hole) & mask)) {
            w->slots[hole] = w->slots[j];
            hole = j;
        }
    }
    memset(&w->slots[hole], 0, sizeof(w->slots[hole]));
}

/** Moves one member from last-seen bucket `from` (if has_from) to `to` in the
 *  per-bucket member counts.  Room for one entry must have been reserved. */
static void member_count_move(pql_window *w, int has_from, int64_t from, int64_t to)
{
    int created;
    if (has_from) {
        size_t i = bl_lower_bound(&w->buckets, from);
        if (i < w->buckets.len && w->buckets.v[i].bucket == from) {
            if (--w->buckets.v[i].value <= 0) bl_remove_at(&w->buckets, i);
        }
    }
    bl_get(&w->buckets, to, &created)->value++;
}

/** Sets `member`'s last-seen bucket to b (to max(last, b) when keep_max),
 *  or'ing `flags` into its flags when it changes.
 *  @returns 1 if the member changed, 0 if not, -1 when out of memory (state
 *  unchanged). */
static int member_see(pql_window *w, const char *member, size_t len, int64_t b, int keep_max,
                      uint8_t flags)
{
    uint32_t hash = hash_bytes(member, len);
    member_slot *s = w->slot_cap ? slot_find(w, member, len, hash) : NULL;
    if (s && s->field) {
        int live = !(s->flags & F_DELETED);
        if (live && (s->last == b || (keep_max && s->last > b))) return 0;
        if (bl_reserve_one(&w->buckets, bl_first_cap(w)) < 0) return -1;
        member_count_move(w, live, s->last, b);
        if (w->memo_ok) w->memo_num += (b >= w->memo_first) - (live && s->last >= w->memo_first);
        s->last = b;
        s->flags = (s->flags & ~(unsigned)F_DELETED) | flags;
        return 1;
    }
    if (len > UINT32_MAX - 3) return -1; /* see member_slot */
    if (bl_reserve_one(&w->buckets, bl_first_cap(w)) < 0) return -1;
    if (slots_reserve_one(w) < 0) return -1;
    char *field = malloc(len + 3);
    if (!field) return -1;
    field[0] = 'm';
    field[1] = ':';
    if (len) memcpy(field + 2, member, len);
    field[len + 2] = '\0';
    s = slot_find(w, member, len, hash);
    s->field = field;
    s->field_len = (uint32_t)len + 2;
    s->hash = hash;
    s->last = b;
    s->flags = flags;
    w->slot_used++;
    w->member_bytes += pql_heap_bytes(len + 3);
    member_count_move(w, 0, 0, b);
    if (w->memo_ok) w->memo_num += b >= w->memo_first;
    return 1;
}

/* ---- observations and values --------------------------------------------- */

/* 2^53: integers up to here add exactly in a double */
#define EXACT_INT 9007199254740992.0

static int exact_int(double d)
{
    return d == floor(d) && fabs(d) < EXACT_INT;
}

/** Updates the kept value for a bucket within its reach that went from `old`
 *  (absent when `created`) to `now`. */
static void memo_bucket_changed(pql_window *w, int created, double old, double now)
{
    double *m = &w->memo_num;
    switch (w->agg) {
    case PQL_AGG_COUNT:
        *m += created ? now : now - old;
        break;
    case PQL_AGG_DAYS_ACTIVE:
        *m += created;
        break;
    case PQL_AGG_MAX:
        if (w->memo_null || now > *m) {
            *m = now;
            w->memo_null = 0;
        }
        break;
    default: /* SUM: in place only while every figure is an exact integer */
        if (!w->memo_null && exact_int(*m) && exact_int(now) && (created || exact_int(old)) &&
            exact_int(*m + (created ? now : now - old)))
            *m += created ? now : now - old;
        else
            w->memo_ok = 0;
        break;
    }
}

static int add_to_bucket(pql_window *w, int64_t b, double value)
{
    if (bl_reserve_one(&w->buckets, bl_first_cap(w)) < 0) return -1;
    int created;
    bucket_entry *e = bl_get(&w->buckets, b, &created);
    if (e->flags & F_DELETED) created = 1;
    double old = created ? NAN : e->value;
    switch (w->agg) {
    case PQL_AGG_COUNT:
        e->value = created ? 1 : e->value + 1;
        break;
    case PQL_AGG_SUM:
        e->value = created ? value : e->value + value;
        break;
    case PQL_AGG_DAYS_ACTIVE:
        e->value = 1;
        break;
    case PQL_AGG_MAX:
        e->value = created || value > e->value ? value : e->value;
        break;
    default:
        break;
    }
    if (created || e->value != old) {
        e->flags = F_DIRTY;
        w->dirty = 1;
        if (w->memo_ok && b >= w->memo_first) memo_bucket_changed(w, created, old, e->value);
    }
    return 1;
}

int pql_window_add(pql_window *w, int64_t clock, int64_t ts, double value, const char *member,
                   size_t member_len)
{
    int64_t b = window_bucket(w, ts);
    if (b < first_in_reach(w, clock)) return 0;
    switch (w->agg) {
    case PQL_AGG_DISTINCT:
        if (!member) member_len = 0;
        switch (member_see(w, member ? member : "", member_len, b, 1, F_DIRTY)) {
        case -1:
            return -1;
        case 1:
            w->dirty = 1;
            break;
        default:
            break;
        }
        return 1;
    case PQL_AGG_LAST:
        if (!isfinite(value)) return 0;
        if (w->last_has_t && w->last_has_v && ts < w->last_t) return 1;
        w->memo_ok = 0;
        w->last_t = ts;
        w->last_v = value;
        w->last_has_t = w->last_has_v = 1;
        w->last_flags = F_DIRTY;
        w->dirty = 1;
        return 1;
    case PQL_AGG_SUM:
    case PQL_AGG_MAX:
        if (!isfinite(value)) return 0;
        return add_to_bucket(w, b, value);
    default:
        return add_to_bucket(w, b, value);
    }
}

static pql_value compute_value(const pql_window *w, int64_t first)
{
    const bucket_list *l = &w->buckets;
    double acc = 0;
    int any = 0;
    if (w->agg == PQL_AGG_LAST) {
        if (!w->last_has_t || !w->last_has_v) return pql_null();
        if (window_bucket(w, w->last_t) < first) return pql_null();
        return pql_num(w->last_v);
    }
    for (size_t i = bl_lower_bound(l, first); i < l->len; i++) {
        const bucket_entry *e = &l->v[i];
        if (e->flags & F_DELETED) continue;
        switch (w->agg) {
        case PQL_AGG_DAYS_ACTIVE:
            acc += e->value > 0;
            break;
        case PQL_AGG_MAX:
            acc = any && acc > e->value ? acc : e->value;
            break;
        default:
            acc += e->value;
            break; /* COUNT, SUM, DISTINCT member counts */
        }
        any = 1;
    }
    if (w->agg == PQL_AGG_MAX && !any) return pql_null();
    return pql_num(acc);
}

pql_value pql_window_value(pql_window *w, int64_t clock)
{
    int64_t first = first_in_reach(w, clock);
    if (!w->memo_ok || w->memo_first != first) {
        pql_value v = compute_value(w, first);
        w->memo_null = v.type == PQL_V_NULL;
        w->memo_num = w->memo_null ? 0 : v.u.num;
        w->memo_first = first;
        w->memo_ok = 1;
    }
    return w->memo_null ? pql_null() : pql_num(w->memo_num);
}

void pql_window_expire(pql_window *w, int64_t clock)
{
    int64_t first = first_in_reach(w, clock);
    bucket_list *l = &w->buckets;
    if (w->lifetime || first <= w->expired_first) return;
    w->expired_first = first;
    if (first > w->memo_first) w->memo_ok = 0; /* it read buckets that expire now */
    if (w->agg == PQL_AGG_LAST) {
        if (w->last_has_t && window_bucket(w, w->last_t) < first) {
            w->last_has_t = w->last_has_v = 0;
            w->last_flags = F_DIRTY | F_DELETED;
            w->dirty = 1;
        }
        return;
    }
    if (w->agg == PQL_AGG_DISTINCT) {
        size_t n = bl_lower_bound(l, first);
        if (n == 0) return; /* no member's last-seen bucket is out of reach */
        for (uint32_t i = 0; i < w->slot_cap; i++) {
            member_slot *s = &w->slots[i];
            if (s->field && !(s->flags & F_DELETED) && s->last < first) {
                s->flags = F_DIRTY | F_DELETED;
                w->dirty = 1;
            }
        }
        bl_remove_prefix(l, n);
        return;
    }
    for (size_t i = 0; i < l->len && l->v[i].bucket < first; i++) {
        if (l->v[i].flags & F_DELETED) continue;
        l->v[i].flags = F_DIRTY | F_DELETED;
        w->dirty = 1;
    }
}

/* ---- persistence --------------------------------------------------------- */

static void flush_members(pql_window *w, pql_window_set_fn set, pql_window_del_fn del, void *opaque)
{
    for (uint32_t i = 0; i < w->slot_cap; i++) {
        /* removing slot i may shift a not-yet-visited member into it */
        while (w->slots[i].field && (w->slots[i].flags & F_DELETED)) {
            del(opaque, w->slots[i].field, w->slots[i].field_len);
            slot_remove_at(w, i);
        }
        member_slot *s = &w->slots[i];
        if (s->field && (s->flags & F_DIRTY)) {
            set(opaque, s->field, s->field_len, (double)s->last);
            s->flags = 0;
        }
    }
}

static void flush_buckets(pql_window *w, pql_window_set_fn set, pql_window_del_fn del, void *opaque)
{
    bucket_list *l = &w->buckets;
    uint32_t kept = 0;
    char field[PQL_I64_MAX_DIGITS + 1];
    for (uint32_t i = 0; i < l->len; i++) {
        bucket_entry *e = &l->v[i];
        if (e->flags & F_DIRTY) {
            size_t n = pql_fmt_i64(field, e->bucket);
            if (e->flags & F_DELETED)
                del(opaque, field, n);
            else
                set(opaque, field, n, e->value);
        }
        if (e->flags & F_DELETED) continue;
        e->flags = 0;
        l->v[kept++] = *e;
    }
    l->len = kept;
}

void pql_window_flush(pql_window *w, pql_window_set_fn set, pql_window_del_fn del, void *opaque)
{
    if (!w->dirty) return;
    switch (w->agg) {
    case PQL_AGG_DISTINCT:
        flush_members(w, set, del, opaque);
        break;
    case PQL_AGG_LAST:
        if (w->last_flags & F_DELETED) {
            del(opaque, "t", 1);
            del(opaque, "v", 1);
        } else if (w->last_flags & F_DIRTY) {
            set(opaque, "t", 1, (double)w->last_t);
            set(opaque, "v", 1, w->last_v);
        }
        w->last_flags = 0;
        break;
    default:
        flush_buckets(w, set, del, opaque);
        break;
    }
    w->dirty = 0;
}

/** Parses a canonical decimal bucket index ("0", "-12", "20412"). */
static int parse_bucket(const char *s, size_t len, int64_t *out)
{
    size_t i = 0;
    int neg = 0;
    uint64_t n = 0;
    if (len > 0 && s[0] == '-') neg = 1, i = 1;
    if (i == len || len - i > 19) return -1;
    if (s[i] == '0' && (len - i > 1 || neg)) return -1; /* "01", "-0" */
    for (; i < len; i++) {
        if (s[i] < '0' || s[i] > '9') return -1;
        n = n * 10 + (uint64_t)(s[i] - '0');
    }
    if (n > (uint64_t)INT64_MAX) return -1;
    *out = neg ? -(int64_t)n : (int64_t)n;
    return 0;
}

/** @returns 0 if d is an integer that fits an int64, stored in *out. */
static int double_to_int64(double d, int64_t *out)
{
    if (!isfinite(d) || d != floor(d) || d < -9.2e18 || d > 9.2e18) return -1;
    *out = (int64_t)d;
    return 0;
}

static int load_bucket(pql_window *w, const char *field, size_t field_len, double value)
{
    int64_t b;
    int created;
    if (parse_bucket(field, field_len, &b) < 0 || !bucket_fits(b)) return -1;
    if (w->bucket_ms == 0 && b != 0) return -1;
    if (!isfinite(value)) return -1;
    if ((w->agg == PQL_AGG_COUNT || w->agg == PQL_AGG_DAYS_ACTIVE) && value < 0) return -1;
    if (bl_reserve_one(&w->buckets, bl_first_cap(w)) < 0) return -1;
    bucket_entry *e = bl_get(&w->buckets, b, &created);
    e->value = value;
    e->flags = 0;
    return 0;
}

int pql_window_load(pql_window *w, const char *field, size_t field_len, double value)
{
    int64_t n;
    w->memo_ok = 0;
    w->expired_first = INT64_MIN;
    switch (w->agg) {
    case PQL_AGG_DISTINCT:
        if (field_len < 2 || field[0] != 'm' || field[1] != ':') return -1;
        if (double_to_int64(value, &n) < 0 || !bucket_fits(n)) return -1;
        if (w->bucket_ms == 0 && n != 0) return -1;
        return member_see(w, field + 2, field_len - 2, n, 0, 0) < 0 ? -1 : 0;
    case PQL_AGG_LAST:
        if (field_len != 1) return -1;
        if (field[0] == 't') {
            if (double_to_int64(value, &w->last_t) < 0) return -1;
            w->last_has_t = 1;
            return 0;
        }
        if (field[0] == 'v' && isfinite(value)) {
            w->last_v = value;
            w->last_has_v = 1;
            return 0;
        }
        return -1;
    default:
        return load_bucket(w, field, field_len, value);
    }
}

int pql_window_dirty(const pql_window *w)
{
    return w->dirty;
}

size_t pql_window_memory(const pql_window *w)
{
    size_t n = pql_heap_bytes(sizeof(*w)) + w->member_bytes;
    if (w->buckets.cap) n += pql_heap_bytes(w->buckets.cap * sizeof(bucket_entry));
    if (w->slot_cap) n += pql_heap_bytes(w->slot_cap * sizeof(member_slot));
    return n;
}
