/* rules.h — the rule set: signals, PQL and expansion rules, lifecycle markers.
 *
 * Pure core.  rules.c reads YAML rule files (libfyaml), validates them whole
 * and compiles every expression (expr.h) with names resolved to slots; a rule
 * set that fails anywhere is refused whole, with every error as
 * "FILE:LINE:COL: error: what — hint".  The compiled set is immutable and
 * shared read-only by the tasks; a reload (SIGHUP) builds a new one.
 *
 * The YAML shape (docs/rules.md has the full language):
 *
 *   version: 7
 *   traits: { seats: number, plan: string, trial: bool }   # what rules read
 *   lifecycle: { signup: signed_up, conversion: subscription_started,
 *                paid: 'account.plan != "free"' }          # optional paid test
 *   signals:
 *     core_uses:   { count: feature_used, where: 'properties.feature == "projects"', window: 7d }
 *     active_days: { days_active: login, window: 7d }
 *     active_users:{ distinct: user_id, of: "*", window: 30d }
 *     api_calls:   { sum: properties.calls, of: api_request, window: 30d }
 *     peak_seats:  { max: properties.seats, of: seat_report, window: 30d }
 *   pql:       [ { name, when, reasons, fit, applies_to, clear, cooldown, held_for } … ]
 *              or scored: { name, model: weighted, points: [{when, points}…],
 *                           tiers: {high, medium, low}, sla: {high: 4h, …} }
 *                         { name, model: logistic, intercept, weights: {EXPR: w…},
 *                           threshold, tiers?, sla? }
 *   expansion: [ same keys … ]
 *
 * A directory loads every *.yaml / *.yml file directly in it (not
 * sub-directories), in name order, as one set: signal and rule names are
 * unique across the files; `lifecycle` may be declared once; the set's
 * version is the files' `version` values joined with "+".
 *
 * Traits (`account.<trait>`) must be declared under `traits:` with their type
 * (number, string, bool) in one of the files: an undeclared trait is an error
 * with a did-you-mean, and the type lets `rules check` refuse
 * `account.plan > 5`.  Declarations from several files merge; a trait
 * declared twice with two types is an error.
 *
 * Slots (how compiled expressions name their inputs; see pql_rules_slot_*):
 * a slot is (kind << 24) | index, kind one of PQL_SLOT_*. */
#ifndef PQL_RULES_H
#define PQL_RULES_H

#include "alert.h"
#include "common.h"
#include "expr.h"
#include "window.h"

enum {
    PQL_SLOT_SIGNAL = 1,  /* index into signals */
    PQL_SLOT_TRAIT = 2,   /* index into the set's trait names (account.<trait>) */
    PQL_SLOT_PROP = 3,    /* index into the set's property names (properties.<key>) */
    PQL_SLOT_FIELD = 4,   /* an event field: PQL_FIELD_* */
    PQL_SLOT_BUILTIN = 5, /* an account fact the engine derives: PQL_BUILTIN_* */
};

/* Built-in names readable in rule expressions. */
enum {
    PQL_BUILTIN_SINCE_SIGNUP = 0, /* since_signup: account clock − signup time (ms), null
                                     before a signup event */
};
enum {
    PQL_FIELD_EVENT = 0,
    PQL_FIELD_USER_ID = 1,
    PQL_FIELD_EVENT_ID = 2,
};
#define PQL_SLOT(kind, index) (((kind) << 24) | (index))
#define PQL_SLOT_KIND(slot)   ((slot) >> 24)
#define PQL_SLOT_INDEX(slot)  ((slot)&0xffffff)

/* Where an observation's value (sum/max/last) or member (distinct) comes from. */
typedef enum pql_source {
    PQL_SRC_NONE = 0, /* count, days_active */
    PQL_SRC_FIELD,    /* user_id, event_id (distinct) */
    PQL_SRC_PROPERTY, /* properties.<key> */
} pql_source;

typedef struct pql_signal {
    char *name; /* as written: "core_uses" */
    char *key;  /* storage key: name + "#" + 8 hex digits of a hash of the
                   definition, so a changed definition starts empty */
    pql_window_spec spec;
    char *event;      /* event name matched, or "*" for any */
    size_t event_len; /* strlen(event), so matching an event compares lengths first */
    int any_event;    /* event is "*" */
    pql_expr *where;  /* NULL: every matching event */
    pql_source source;
    int source_index; /* PQL_FIELD_* or property index */
} pql_signal;

typedef enum pql_model {
    PQL_MODEL_THRESHOLD = 0,
    PQL_MODEL_WEIGHTED,
    PQL_MODEL_LOGISTIC,
} pql_model;

typedef enum pql_applies {
    PQL_APPLIES_FREE = 0, /* not converted and not paid */
    PQL_APPLIES_PAID,
    PQL_APPLIES_ALL,
} pql_applies;

/* Tiers of a scored rule, highest first. */
enum { PQL_TIER_HIGH = 0, PQL_TIER_MEDIUM = 1, PQL_TIER_LOW = 2, PQL_NTIERS = 3 };

typedef struct pql_rule {
    char *name;
    pql_alert_kind kind;
    pql_model model;
    pql_expr *when; /* threshold: the firing condition (NULL for scored models) */
    char *when_src; /* its text, for the default reason */
    /* weighted: score = sum of points[i] over the conditions point_when[i] that hold */
    pql_expr **point_when;
    char **point_src;
    double *points;
    size_t npoints;
    /* logistic: score = sigmoid(intercept + sum of weights[i] * terms[i]); a null term adds 0 */
    double intercept;
    pql_expr **terms;
    char **term_src;
    double *weights;
    size_t nterms;
    double threshold; /* logistic: fires when score >= threshold */
    /* tiers (weighted: required; logistic: optional): the least score of each
       tier, NAN when unused; the response SLA of each tier (0: none) */
    double tier_min[PQL_NTIERS];
    int64_t sla_ms[PQL_NTIERS];
    pql_expr *clear; /* re-arm condition; NULL: `not when` */
    pql_expr *fit;   /* NULL: every account */
    pql_applies applies_to;
    int64_t cooldown_ms; /* 0: none */
    int64_t held_for_ms; /* 0: fires at once */
    pql_template **reasons;
    size_t nreasons;
    int *signals; /* indexes of every signal the rule reads, in order */
    size_t nsignals;
    int reads_clock; /* an expression or reason reads the clock (since_signup) */
    int *traits;     /* indexes of every trait the rule reads */
    size_t ntraits;
} pql_rule;

typedef struct pql_rules pql_rules;

/** Loads and compiles the rule files at `path` (a file or a directory).
 *  @returns the set, or NULL with every error, one per line, appended to
 *  `errors` ("rules/pql.yaml:12:11: error: unknown signal 'core_use' (did you
 *  mean 'core_uses'?)"). */
pql_rules *pql_rules_load(const char *path, pql_buf *errors);

/** Same, from YAML text (tests); `name` stands for the file name in messages. */
pql_rules *pql_rules_load_string(const char *yaml, const char *name, pql_buf *errors);

/** Releases one reference to `r`; the last one frees it.  NULL is fine. */
void pql_rules_destroy(pql_rules *r);
/** Takes one more reference to `r` (a set is immutable, so holders on other
 *  threads may read it while the pipeline swaps in a new one): the holder
 *  releases it with pql_rules_destroy.  Thread-safe.  @returns r. */
pql_rules *pql_rules_retain(pql_rules *r);
/** A fingerprint of the rule files at `path` (names, sizes, modification
 *  times): it changes when a file is edited, added or removed.  0 when the
 *  path does not exist.  Cheap (stat only): the pipeline polls it to reload
 *  rules when they change (rules.watch). */
uint64_t pql_rules_fingerprint(const char *path);

const char *pql_rules_version(const pql_rules *r);
size_t pql_rules_nsignals(const pql_rules *r);
const pql_signal *pql_rules_signal(const pql_rules *r, size_t i);
/** @returns the index of the signal with storage key `key`, or -1. */
int pql_rules_signal_by_key(const pql_rules *r, const char *key, size_t len);
size_t pql_rules_nrules(const pql_rules *r);
const pql_rule *pql_rules_rule(const pql_rules *r, size_t i);
/** @returns the index of the rule named `name`, or -1. */
int pql_rules_rule_by_name(const pql_rules *r, const char *name, size_t len);
size_t pql_rules_ntraits(const pql_rules *r);
const char *pql_rules_trait(const pql_rules *r, size_t i);
/** @returns the index of trait `name` if any expression reads it, or -1. */
int pql_rules_trait_index(const pql_rules *r, const char *name, size_t len);
size_t pql_rules_nprops(const pql_rules *r);
const char *pql_rules_prop(const pql_rules *r, size_t i);
/** "HIGH", "MEDIUM", "LOW" for PQL_TIER_*, NULL for anything else. */
const char *pql_tier_name(int tier);
/** "threshold", "weighted", "logistic": the name a rule file and an alert use. */
const char *pql_model_name(pql_model m);

/** Lifecycle event names (NULL when not declared). */
const char *pql_rules_signup_event(const pql_rules *r);
const char *pql_rules_conversion_event(const pql_rules *r);
/** The `lifecycle.paid` condition on traits, or NULL. */
const pql_expr *pql_rules_paid_expr(const pql_rules *r);
/** Longest finite signal window in ms (0 if only lifetime signals). */
int64_t pql_rules_max_window(const pql_rules *r);

#endif
