/* account.h — one account's in-memory state and what an event does to it.
 *
 * Pure core: no Kafka, no Redis.  An account holds its clock (the largest
 * event time seen), its traits, one window per signal, each rule's firing
 * state and its lifecycle facts (signed up, converted, first qualified).
 * Applying an event updates all of these and evaluates every rule; a rule
 * that fires produces a pql_alert through a callback.  task.c owns accounts
 * (cache, LRU) and persists them through pql_account_flush(): only the fields
 * that changed since the last flush, as Redis hash fields:
 *
 *   c                      clock (ms)
 *   t:<trait>              trait value: "n<number>" | "s<string>" | "b0" | "b1"
 *   s:<signal key>|<field> a window pair (window.h), as a number
 *   r:<rule>               "<seq> <state> <fired_at> <held_since> <tier>"
 *   l:signup l:conversion l:pql_at   lifecycle times (ms);  l:pql_rule  rule name
 *   m:<name>               a field another module keeps with the account
 *                          (pql_account_set_memo; metrics.c's segment values)
 *
 * Firing (DESIGN §3), per (account, rule), edge-triggered:
 *   ARMED --when true (held for held_for, past cooldown since the last fire)--> FIRED
 *          emits an alert with episode = ++seq (so alert_id is stable)
 *   FIRED --clear true (default: when false)--> ARMED
 *   FIRED --tier rises (MEDIUM → HIGH)--> FIRED, emits an alert with episode
 *          "<seq>:<TIER>"
 * A rule's condition is `when` (threshold), a tier reached (weighted: points
 * summed over the conditions that hold), or probability >= threshold
 * (logistic: sigmoid(intercept + Σ weight × term)).
 * A rule only fires for accounts it applies to (applies_to free/paid/all; paid
 * = converted, or lifecycle.paid holds) and that pass its fit condition.
 * Times in the firing logic are event times: held_for and cooldown are
 * measured on the account clock. */
#ifndef PQL_ACCOUNT_H
#define PQL_ACCOUNT_H

#include "alert.h"
#include "common.h"
#include "decode.h"
#include "rules.h"

typedef struct pql_account pql_account;

/** @returns a new, empty account for rule set `r` (which must outlive it), or NULL. */
pql_account *pql_account_new(const pql_rules *r, const char *id, size_t id_len);
void pql_account_destroy(pql_account *a);

const char *pql_account_id(const pql_account *a, size_t *len);
int64_t pql_account_clock(const pql_account *a);

/** Restores one stored field (see the layout above).  Fields of signals or
 *  rules the rule set no longer has are scheduled for deletion at the next
 *  flush.  @returns 0, or -1 for a field that cannot be parsed (ignored). */
int pql_account_load_field(pql_account *a, const char *field, size_t field_len, const char *value,
                           size_t value_len);

typedef void (*pql_alert_fn)(void *opaque, const pql_alert *alert);

typedef enum pql_apply {
    PQL_APPLIED = 0,     /* counted */
    PQL_APPLY_LATE,      /* matched signals but was out of every one's reach */
    PQL_APPLY_UNMATCHED, /* no signal, marker or trait concerned */
} pql_apply;

/** Applies a usage event or an account update (`ev->kind`), then evaluates
 *  the rules; each alert fired is passed to fn (valid only during the call).
 *  `now_ms` is the wall clock stamped as emitted_at. */
pql_apply pql_account_apply(pql_account *a, const pql_event *ev, int64_t now_ms, pql_alert_fn fn,
                            void *opaque);

/** Whether apply skips rules nothing can have changed since they last ran
 *  (on by default; see evaluate in account.c).  Off evaluates every rule on
 *  every event: tests compare the two. */
void pql_account_set_rule_skipping(pql_account *a, int on);

typedef void (*pql_field_set_fn)(void *opaque, const char *field, size_t field_len,
                                 const char *value, size_t value_len);
typedef void (*pql_field_del_fn)(void *opaque, const char *field, size_t field_len);

/** Expires window state out of reach, then reports every field changed or
 *  deleted since the last flush and marks the account clean. */
void pql_account_flush(pql_account *a, pql_field_set_fn set, pql_field_del_fn del, void *opaque);

/** Sets the account's batch mark to `mark` and returns the previous one: how
 *  a task lists each account it touched in a batch once (marks start at 0). */
unsigned pql_account_mark(pql_account *a, unsigned mark);
unsigned pql_account_batch_mark(const pql_account *a);

/** When (wall clock, ms) this process last set the expiry of the account's
 *  Redis hash; 0 if it never did (a new or a loaded account).  Not stored:
 *  the task refreshes the expiry once per state.ttl/64 (task.c), not at
 *  every write. */
int64_t pql_account_ttl_set_at(const pql_account *a);
void pql_account_set_ttl_set_at(pql_account *a, int64_t at);

/** @returns non-zero if the account has unflushed changes. */
int pql_account_dirty(const pql_account *a);

/** @returns an estimate of the heap bytes the account holds. */
size_t pql_account_memory(const pql_account *a);

/** The current value of signal i at the account clock (for tools and tests). */
pql_value pql_account_signal(pql_account *a, size_t i);

/** Rule i's firing state (for tools and tests). */
void pql_account_rule_state(const pql_account *a, size_t i, unsigned *seq, int *fired);

/* ---- reading an account (rules explain, /v1/accounts) -------------------- */

#define PQL_NO_TIME INT64_MIN

/** Everything the engine knows of rule i for this account, as of now. */
typedef struct pql_rule_view {
    int paid;      /* the account counts as paid (converted or lifecycle.paid) */
    int fit;       /* the fit condition holds (1 when the rule has none) */
    int applies;   /* applies_to matches and fit holds */
    int holds;     /* the rule's condition holds now */
    int has_score; /* weighted: points; logistic: probability */
    double score;
    int tier;                     /* PQL_TIER_* reached now, -1 if none */
    int clear;                    /* the clear condition holds now (re-arms a fired rule) */
    unsigned seq;                 /* arming sequence number: how many times it fired */
    int fired;                    /* FIRED (1) or ARMED (0) */
    int64_t fired_at, held_since; /* event times, PQL_NO_TIME when none */
    int fired_tier;               /* tier of the last alert, -1 if none */
} pql_rule_view;

void pql_account_rule_view(pql_account *a, size_t i, pql_rule_view *out);

/** @returns non-zero when the account counts as paid: it converted, or the
 *  set's lifecycle.paid holds on its traits. */
int pql_account_paid(pql_account *a);

/** A pql_expr_lookup_fn over the account (ctx is the pql_account *): reads
 *  signals, traits and builtins as the rules see them; event fields are null. */
pql_value pql_account_lookup(void *account, int slot);

/** Lifecycle facts (PQL_NO_TIME when not seen); *pql_rule NULL if none. */
void pql_account_lifecycle(const pql_account *a, int64_t *signed_up_at, int64_t *converted_at,
                           int64_t *pql_at, const char **pql_rule);

size_t pql_account_ntraits(const pql_account *a);
/** Trait i: its name, value in *v (valid until the account changes). */
const char *pql_account_trait(const pql_account *a, size_t i, pql_value *v);

/** A field another module keeps with the account, persisted as "m:<name>"
 *  (`name`: at most 15 bytes).  @returns its value (owned by the account,
 *  NUL-terminated) or NULL when unset. */
const char *pql_account_memo(const pql_account *a, const char *name, size_t *len);
/** Sets it (copied); written with the account's next flush.  metrics.c sets
 *  each of its memos once (absent → present) and relies on that. */
void pql_account_set_memo(pql_account *a, const char *name, const char *value, size_t len);

#endif
