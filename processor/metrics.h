/* metrics.h — metric aggregates (DESIGN §4): what a batch adds to the
 * per-partition counters.  Pure core: periods, the time-to-PQL histogram, an
 * account's contribution to the counters, and the deltas of a batch.
 * metrics_table.h sums the counters into figures; metrics_emit.h and
 * metrics_report.h read them from Redis.
 *
 * Design.
 *
 * 1. Counters are a function of account state.  Every figure of §4 is a sum,
 *    over accounts, of a contribution computed from the account's lifecycle
 *    facts alone: signup time s, first-qualification time q and rule r,
 *    conversion time c (account.h: l:signup, l:pql_at, l:pql_rule,
 *    l:conversion), and its segment values.  When an event changes those
 *    facts, the task adds contribution(after) - contribution(before) to the
 *    batch.  Hence the counters in Redis always equal the sum of the
 *    contributions of the accounts' stored states, whatever the order of
 *    arrival: a late qualification or conversion, or an earlier signup event
 *    arriving late, moves the account's counts to the right cells.  The only
 *    counter that is not state is expansion_alerts: one per alert fired, in the
 *    period of its triggered_at.
 *
 * 2. Exactly once.  The deltas travel in the partition's batch: HINCRBY on
 *    counter hashes pql:{g:p}:c:… written by the same EVALSHA as the account
 *    state and the offsets (store.h), under the same epoch fence and seq.  A
 *    retried batch is recognised by seq and not applied twice; a fenced one
 *    writes nothing; an abandoned batch drops its deltas with the accounts
 *    (they reload from Redis).  Before and after are computed on the same
 *    in-memory account, so the deltas of a batch are exactly the change
 *    between the stored state and the state the batch stores.
 *
 * 3. Contributions, per granularity g (hour, day, week, month; UTC; weeks
 *    start on Monday) and P_g(t) the start of the period holding t.  The base
 *    segments of an account are (all, all), (channel, its channel) and
 *    (plan, its plan); a qualified account also has (rule, r).
 *      s known:   at P(s), base segments: signups += 1; if q known,
 *                 signups_pql += 1, else if c known, signups_np_conv += 1
 *      q known:   at P(q), base + rule segments: pqls_new += 1;
 *                 c unknown: pqls_open += 1;  c >= q: pqls_conv += 1;
 *                 s known and q >= s: one count in time-to-PQL bucket of q - s
 *      c known:   at P(c), base segments (+ rule when q <= c): conv += 1;
 *                 q known and q <= c: conv_pql += 1
 *    Figures (metrics_table.h): pql_rate = signups_pql / signups;
 *    pql_to_paid_rate = pqls_conv / pqls_new; non_pql_to_paid_rate =
 *    signups_np_conv / (signups - signups_pql); non_pql_conversions = conv -
 *    conv_pql; a zero denominator gives null.  pqls_open is the gauge of §4
 *    broken down by qualification period: the period's qualified accounts not
 *    converted yet (summed over periods: all open PQLs).  In the rule segment
 *    the signup figures are absent (0, rates null): an account that never
 *    qualified has no rule.
 *
 * 4. Segment values are frozen per account.  When an account first has a
 *    lifecycle fact, the current values of the channel and plan traits
 *    (metrics.channel_trait / metrics.plan_trait) are kept with it (memo
 *    fields m:channel, m:plan; account.h); a trait missing then is taken the
 *    first time it appears (the account's counts move from "(none)" to it).
 *    So an account stays in its acquisition cohort: plan free → team at
 *    conversion does not move its signup out of plan=free.  Values are
 *    sanitised ('|' and control bytes → '_', at most 64 bytes); missing is
 *    "(none)".  Expansion alerts use the frozen values, or the current traits
 *    of an account that has no lifecycle fact.
 *
 * 5. Histogram (time to PQL, milliseconds): logarithmic buckets with
 *    relative accuracy alpha = 2% (DDSketch's mapping): gamma = (1 + alpha) /
 *    (1 - alpha); a value v >= 1 goes to bucket i = ceil(log_gamma v), which
 *    holds (gamma^(i-1), gamma^i], represented by 2 gamma^i / (gamma + 1):
 *    within alpha of every value in the bucket.  0 has bucket -1
 *    (represented by 0).  Merging is adding counts, so partitions sum.  A
 *    percentile is the nearest-rank one (rank ceil(p n)) of the bucket
 *    counts, reported as its bucket's representative: within 2% of the exact
 *    nearest-rank percentile.  A year fits in ~600 buckets.
 *
 * 6. Redis layout, per partition (hash tag {g:p}):
 *      pql:{g:p}:c:m:<granularity>:<period start ms>   hash, one per period
 *          field "<segment kind>|<segment value>|<counter>", counter one of
 *          signups signups_pql signups_np_conv pqls_new pqls_open pqls_conv
 *          conv conv_pql expansion, or "ttp:<bucket>" (histogram)
 *      pql:{g:p}:c:mv    hash: "<granularity>:<period start ms>" -> a version
 *          bumped by every batch that changes that period (the emitter
 *          re-emits a period when the sum of its versions changed).
 */
#ifndef PQL_METRICS_H
#define PQL_METRICS_H

#include "account.h"
#include "common.h"

/* ---- periods (UTC) ------------------------------------------------------ */

typedef enum pql_granularity {
    PQL_GRAN_HOUR = 0,
    PQL_GRAN_DAY,
    PQL_GRAN_WEEK, /* starting Monday 00:00 UTC */
    PQL_GRAN_MONTH,
} pql_granularity;
#define PQL_NGRAN 4

/** "hour" | "day" | "week" | "month". */
const char *pql_granularity_name(pql_granularity g);
/** @returns the granularity named `name`, or -1. */
int pql_granularity_parse(const char *name);
/** Start (ms since the epoch, UTC) of the period of granularity g holding t. */
int64_t pql_period_start(pql_granularity g, int64_t t);
/** Start of the period after the one starting at `start`. */
int64_t pql_period_next(pql_granularity g, int64_t start);
/** Writes "2024-01-01T00:00:00Z" (ISO 8601, UTC) into out. */
void pql_format_utc(int64_t t, char *out, size_t size);
/** Parses "2024-01-01", "2024-01-01T13:05Z" or "2024-01-01T13:05:09Z" (UTC).
 *  @returns 0, or -1 when `s` is not such a date. */
int pql_parse_utc(const char *s, int64_t *ms_out);

/* ---- the time-to-PQL histogram -------------------------------------------- */

#define PQL_HIST_ALPHA 0.02 /* relative accuracy of a reported percentile */

/** The bucket of a value in ms (>= 0): -1 for 0, else ceil(log_gamma v). */
int pql_hist_bucket(int64_t v);
/** The value a bucket reports (within PQL_HIST_ALPHA of its members). */
double pql_hist_value(int bucket);

/* ---- segments ----------------------------------------------------------- */

typedef enum pql_segment {
    PQL_SEG_ALL = 0,
    PQL_SEG_CHANNEL,
    PQL_SEG_PLAN,
    PQL_SEG_RULE,
} pql_segment;
#define PQL_NSEG 4

/** "all" | "channel" | "plan" | "rule". */
const char *pql_segment_name(pql_segment k);
/** @returns the segment kind named `name`, or -1. */
int pql_segment_parse(const char *name);

#define PQL_SEG_NONE      "(none)" /* the value of a missing trait */
#define PQL_SEG_VALUE_MAX 64       /* bytes of a segment value kept */

/* ---- an account's contribution ------------------------------------------- */

/* The facts an account's contribution is a function of (copied: it stays
 * valid while the account changes). */
typedef struct pql_metrics_state {
    int64_t signup, pql_at, conversion; /* PQL_NO_TIME when unknown */
    char rule[128];                     /* first PQL rule ("" if none) */
    char channel[PQL_SEG_VALUE_MAX + 1], plan[PQL_SEG_VALUE_MAX + 1]; /* "" = (none) */
} pql_metrics_state;

/* A batch's counter deltas. */
typedef struct pql_metrics pql_metrics;

/** `channel_trait` and `plan_trait` name the traits of the channel and plan
 *  segments (copied).  @returns NULL when out of memory. */
pql_metrics *pql_metrics_new(const char *channel_trait, const char *plan_trait);
void pql_metrics_destroy(pql_metrics *m);

/** Reads the account's facts (changes nothing). */
void pql_metrics_read(const pql_metrics *m, const pql_account *a, pql_metrics_state *out);
/** Adds contribution(after) - contribution(before). */
void pql_metrics_change(pql_metrics *m, const pql_metrics_state *before,
                        const pql_metrics_state *after);

/* An account's lifecycle times before an event: all that must be kept to
 * compute the event's change, because of two invariants of account.c: the
 * first rule is set together with pql_at (and never changes after), and
 * applying an event never touches memos (only pql_metrics_account_changed()
 * sets them, once).  Taking it copies three numbers: the per-event cost. */
typedef struct pql_metrics_mark {
    int64_t signup, pql_at, conversion;
} pql_metrics_mark;

void pql_metrics_mark_of(const pql_account *a, pql_metrics_mark *out);

/** After an event was applied to `a`: freezes the segment values that can be
 *  frozen now (see 4. above; written with the account's next flush) and, if
 *  the facts differ from `before` (taken just before the event), adds
 *  contribution(after) - contribution(before). */
void pql_metrics_account_changed(pql_metrics *m, pql_account *a, const pql_metrics_mark *before);

/** Counts an expansion alert of `rule` triggered at `at` for account `a`
 *  (after pql_metrics_account_changed() for the event that fired it). */
void pql_metrics_expansion(pql_metrics *m, const pql_account *a, const char *rule, int64_t at);

/** @returns how many counter deltas are pending (some may be zero). */
size_t pql_metrics_pending(const pql_metrics *m);
/** Calls fn for every non-zero delta, sorted by (hash, field), hash being the
 *  counter hash name after "c:" ("m:day:1704067200000"), then a version bump
 *  (+1) in hash "mv" for every period hash changed; then forgets them. */
void pql_metrics_drain(pql_metrics *m,
                       void (*fn)(void *opaque, const char *hash, const char *field, int64_t delta),
                       void *opaque);
/** Forgets the pending deltas (an abandoned batch). */
void pql_metrics_clear(pql_metrics *m);

#endif
