/* window.h — per-account rolling aggregates over event time, in buckets.
 *
 * Pure core.  One pql_window holds one signal of one account: e.g.
 * "count of feature_used in the last 7 days" for account acme.
 *
 * Buckets (DESIGN §5): the bucket size follows the window so a 30-day window
 * is 30 fields, not 43,200:
 *   - lifetime (window_ms == 0): one bucket, index 0 (bucket_ms 0, nbuckets 1);
 *   - days_active: always day buckets (UTC days), window rounded up to days;
 *     over a lifetime it keeps every active day (bucket_ms 1d, nbuckets 0 =
 *     unbounded; nothing is ever out of reach);
 *   - otherwise the coarsest of day (window > 2d), hour (window > 1h),
 *     minute that divides the window exactly, falling back to finer sizes
 *     (90m → minutes, 36h → hours).  A window must be whole minutes.
 * bucket(ts) = floor(ts / bucket_ms).  At account clock C (the largest event
 * time seen for the account) the window covers the `nbuckets` buckets
 * (bucket(C) - nbuckets, bucket(C)] — "last 7 days" includes today.
 * An observation whose bucket is at or before bucket(C) - nbuckets is out of
 * reach: it is not counted (pql_window_add returns 0) and the caller counts it
 * as late.  Out-of-order events within reach count in their own bucket.
 * Values read all state not out of reach at the clock they are asked for; a
 * bucket after bucket(C) can exist only if asked at a clock earlier than the
 * account clock (it then counts, as LAST cannot tell it apart).
 *
 * Aggregates:
 *   COUNT        number of observations            (empty → 0)
 *   SUM          sum of values (NaN/inf ignored)   (empty → 0)
 *   DISTINCT     exact number of distinct members seen in the window: each
 *                member keeps its last-seen bucket  (empty → 0)
 *   DAYS_ACTIVE  number of day buckets with ≥ 1 observation (empty → 0)
 *   MAX          largest value in the window        (empty → null)
 *   LAST         value of the observation with the greatest event time within
 *                the window; ties: the later arrival wins (empty → null)
 *
 * Persistence (write-behind, see store.h): a window's state is a set of
 * (field, number) pairs.  Fields are short binary-safe strings unique within
 * the window: a bucket index in decimal ("20412"), "m:<member>" for a distinct
 * member (value = last-seen bucket), "t"/"v" for LAST.  The window tracks which
 * pairs changed or were deleted since the last flush, so the caller writes
 * only net changes.  Loading the flushed pairs into a fresh window yields a
 * window equal to the original. */
#ifndef PQL_WINDOW_H
#define PQL_WINDOW_H

#include "common.h"

typedef enum pql_agg {
    PQL_AGG_COUNT = 0,
    PQL_AGG_SUM,
    PQL_AGG_DISTINCT,
    PQL_AGG_DAYS_ACTIVE,
    PQL_AGG_MAX,
    PQL_AGG_LAST,
} pql_agg;

typedef struct pql_window_spec {
    pql_agg agg;
    int64_t window_ms; /* 0 = lifetime */
    int64_t bucket_ms; /* derived by pql_window_spec_init */
    int64_t nbuckets;  /* derived; 1 for lifetime */
} pql_window_spec;

/** Fills `spec` for an aggregate over `window_ms` (0 = lifetime).
 *  @returns 0, or -1 with a reason in errstr ("window 90s is not whole minutes"). */
int pql_window_spec_init(pql_window_spec *spec, pql_agg agg, int64_t window_ms, char *errstr,
                         size_t errstr_size);

/** Bucket index of event time `ts` under `spec` (floor division, correct for
 *  negative ts; always 0 when bucket_ms is 0, i.e. lifetime except days_active). */
int64_t pql_window_bucket(const pql_window_spec *spec, int64_t ts);

/** The first bucket within reach at account clock `clock` (INT64_MIN for
 *  lifetime): a window's value depends on the clock only through it. */
int64_t pql_window_first(const pql_window_spec *spec, int64_t clock);

typedef struct pql_window pql_window;

/** @returns a new empty window (spec is copied), or NULL when out of memory. */
pql_window *pql_window_new(const pql_window_spec *spec);
void pql_window_destroy(pql_window *w);

/** Records an observation at event time `ts`, `clock` being the account clock
 *  after this event (clock >= ts is not required: a future ts simply lands in a
 *  later bucket).  `value` is the number for SUM/MAX/LAST (ignored for COUNT and
 *  DAYS_ACTIVE); `member` the member for DISTINCT (binary-safe).
 *  @returns 1 if counted, 0 if out of reach (late) or a non-finite value for
 *  SUM/MAX/LAST, -1 when out of memory (state unchanged). */
int pql_window_add(pql_window *w, int64_t clock, int64_t ts, double value, const char *member,
                   size_t member_len);

/** The aggregate at account clock `clock` (see the table above).  The last
 *  value asked for is kept until the state changes, so asking again at a clock
 *  in the same bucket costs nothing (hence the non-const window). */
pql_value pql_window_value(pql_window *w, int64_t clock);

/** Drops state out of reach at `clock`, recording the deletions for the next
 *  flush.  Values are unaffected (they never read out-of-reach state).  The
 *  clocks given to add and expire never go back (the account clock): an
 *  expire at a clock whose first bucket in reach is that of the last expire
 *  returns at once. */
void pql_window_expire(pql_window *w, int64_t clock);

typedef void (*pql_window_set_fn)(void *opaque, const char *field, size_t field_len, double value);
typedef void (*pql_window_del_fn)(void *opaque, const char *field, size_t field_len);

/** Reports every pair set or deleted since the last flush (a pair set then
 *  deleted is reported once, as deleted; deleted then set again, as set), then
 *  marks the window clean. */
void pql_window_flush(pql_window *w, pql_window_set_fn set, pql_window_del_fn del, void *opaque);

/** Restores one flushed pair into a window being loaded (does not mark dirty).
 *  @returns 0, or -1 if `field` is not a field of this aggregate. */
int pql_window_load(pql_window *w, const char *field, size_t field_len, double value);

/** @returns non-zero if the window has unflushed changes. */
int pql_window_dirty(const pql_window *w);

/** @returns an estimate of the heap bytes the window holds (for cache bounds). */
size_t pql_window_memory(const pql_window *w);

#endif
