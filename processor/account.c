/* account.c — an account's state, event application and rule firing.
 * See account.h for the stored field layout and the firing state machine. */
#include "account.h"

#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_TRAITS   1024 /* traits kept per account; more are dropped */
#define REASON_MAX   1024 /* a rendered reason, like a CRM long-text field */
#define NO_TIME      PQL_NO_TIME
#define TRAIT_ABSENT (-1)

/* A trait.  Its key, a NUL, and for a string value the string and a NUL share
 * one allocation (`key`): a trait costs one malloc.  The value is kept
 * unpacked here and handed out as a pql_value by trait_value(). */
typedef struct trait {
    char *key; /* owned; a string value follows the key's NUL */
    union {
        double num;
        int b;
        size_t str_len; /* the string is at key + key_len + 1 */
    } u;
    uint32_t key_len;   /* trait_set drops a longer key (none fits in a message) */
    unsigned char type; /* pql_vtype */
    unsigned char dirty;
} trait;

/* A rule's firing state.  The narrow fields hold flags and a tier
 * (PQL_TIER_*, or -1), so the state packs in 32 bytes. */
typedef struct rule_state {
    int64_t fired_at;   /* event time of the last fire, NO_TIME if never */
    int64_t held_since; /* clock when `when` started holding, NO_TIME if not */
    unsigned seq;       /* how many times it fired: the arming sequence number */
    /* Skipping rules nothing can change (see evaluate): */
    uint32_t eval_gen;         /* a->gen when the rule was last evaluated */
    signed char tier;          /* tier of the last alert (PQL_TIER_*), -1 if none */
    unsigned char fired;       /* 1: FIRED (waiting for clear), 0: ARMED */
    unsigned char dirty;       /* changed since the last flush */
    unsigned char quiet;       /* the last evaluation changed nothing */
    unsigned char clock_bound; /* it waited on the clock (held_for, cooldown) */
} rule_state;

/* What the account keeps of signal i.  The value as rules last read it holds
 * while value_ok and the clock is within `reach`, the clocks with the same
 * first bucket in reach (a value depends on the clock only through it;
 * checking the range costs no division).  Observing into the window or
 * loading it clears value_ok; a flush changes no value at the account clock.
 * Reading a value here touches this array, not the window, which is often
 * cold in memory.  A window value is a number or null (pql_window_value), so
 * the value is a double and a null flag rather than a pql_value. */
typedef struct signal_state {
    pql_window *window; /* created on first use */
    double value;       /* when !value_null */
    struct reach {
        int64_t from, to; /* [from, to): empty when not computable */
    } reach;
    uint32_t changed_gen; /* a->gen when the value last came out different */
    unsigned char value_ok, value_null;
    /* Flushing without touching windows nothing changed: an event was
     * observed into the window since the last flush (pql_account_flush). */
    unsigned char dirty;
} signal_state;

/* A rule's reading of the account as it is now. */
typedef struct verdict {
    int holds;     /* the rule's condition: when / a tier reached / score >= threshold */
    int has_score; /* weighted: points; logistic: probability */
    double score;
    int tier; /* PQL_TIER_*, -1 if none */
} verdict;

#define MAX_REASONS 16

/* A field another module keeps with the account (pql_account_set_memo).
 * The name is inline: looking a memo up, on every event, touches one array. */
#define MEMO_NAME_MAX 16
typedef struct memo {
    char name[MEMO_NAME_MAX];
    char *value;        /* owned, NUL-terminated */
    uint32_t value_len; /* a metrics value or a Redis string (at most 512 MB) */
    unsigned char dirty;
} memo;

static memo *memo_find(const pql_account *a, const char *name);
static void facts_changed(pql_account *a);

/* Wide fields first, narrow last: the struct has no holes, and the id
 * follows its last byte. */
struct pql_account {
    const pql_rules *rules;
    trait *traits;
    char **deleted; /* field names to delete at the next flush (traits, stale fields) */
    size_t ndeleted;
    /* the per-signal and per-rule arrays below share one allocation with the
     * account (see pql_account_new) */
    signal_state *signals; /* per signal */
    rule_state *rstate;    /* per rule */
    /* where each declared trait (the rules' trait slots) sits in `traits`:
     * index + 1, TRAIT_ABSENT, or 0 = not looked up since the array last
     * changed shape (a trait added or deleted) */
    int32_t *tslot;
    memo *memos; /* other modules' fields, "m:<name>" (metrics.c) */
    char *pql_rule;
    size_t id_len;
    int64_t clock;
    int64_t signed_up_at, converted_at, pql_at;
    /* the clock every window was expired at by the last flush (NO_TIME:
     * never).  A window with neither new observations nor a new first bucket
     * in reach has nothing to expire or write (pql_account_flush). */
    int64_t expired_clock;
    int64_t ttl_set_at; /* see pql_account_ttl_set_at */
    /* Generations (see evaluate): gen counts applied events; the others say
     * when the clock, or the traits and lifecycle, last changed. */
    uint32_t gen, clock_gen, facts_gen;
    unsigned batch_mark;          /* see pql_account_mark */
    uint16_t ntraits, traits_cap; /* at most MAX_TRAITS */
    uint16_t nmemos;              /* a few: their names are constants (metrics.c) */
    unsigned char clock_dirty;
    unsigned char lifecycle_dirty;
    unsigned char paid; /* is_paid(), valid while paid_ok (cleared by facts_changed) */
    unsigned char paid_ok;
    unsigned char evaluate_all; /* pql_account_set_rule_skipping(a, 0) */
    char id[];                  /* NUL-terminated; in the account's allocation */
};

/* What expression lookups see while an event is applied. */
typedef struct eval_ctx {
    pql_account *a;
    const pql_event *ev; /* NULL when evaluating rules */
} eval_ctx;

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p) abort(); /* see DESIGN: bounded cache; allocation failure is fatal */
    return p;
}

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size);
    if (!p) abort();
    return p;
}

/* Rounds up to the alignment of everything the account block holds. */
static size_t align8(size_t n)
{
    return (n + 7) & ~(size_t)7;
}

/* The account, its id and its per-signal, per-rule and per-trait arrays in
 * one block: applying an event touches them all, so they share cache lines
 * and pages. */
static size_t block_size(size_t id_len, size_t ns, size_t nr, size_t nt)
{
    return align8(offsetof(pql_account, id) + id_len + 1) + align8(ns * sizeof(signal_state)) +
           align8(nr * sizeof(rule_state)) + align8((nt + 1) * sizeof(int32_t));
}

pql_account *pql_account_new(const pql_rules *r, const char *id, size_t id_len)
{
    size_t ns = pql_rules_nsignals(r), nr = pql_rules_nrules(r), nt = pql_rules_ntraits(r);
    char *p = xcalloc(1, block_size(id_len, ns, nr, nt));
    pql_account *a = (pql_account *)p;
    p += align8(offsetof(pql_account, id) + id_len + 1);
    a->signals = (signal_state *)p;
    p += align8(ns * sizeof(signal_state));
    a->rstate = (rule_state *)p;
    p += align8(nr * sizeof(rule_state));
    a->tslot = (int32_t *)p;
    a->rules = r;
    memcpy(a->id, id, id_len);
    a->id[id_len] = '\0';
    a->id_len = id_len;
    a->clock = NO_TIME;
    a->expired_clock = NO_TIME;
    for (size_t i = 0; i < ns; i++)
        a->signals[i].value_null = 1; /* as a zeroed pql_value: null, not 0 */
    for (size_t i = 0; i < nr; i++) {
        a->rstate[i].fired_at = a->rstate[i].held_since = NO_TIME;
        a->rstate[i].tier = -1; /* no alert yet: 0 would read as PQL_TIER_HIGH */
    }
    a->signed_up_at = a->converted_at = a->pql_at = NO_TIME;
    return a;
}

void pql_account_destroy(pql_account *a)
{
    if (!a) return;
    for (size_t i = 0; i < a->ntraits; i++)
        free(a->traits[i].key);
    free(a->traits);
    for (size_t i = 0; i < a->nmemos; i++)
        free(a->memos[i].value);
    free(a->memos);
    for (size_t i = 0; i < a->ndeleted; i++)
        free(a->deleted[i]);
    free(a->deleted);
    for (size_t i = 0; i < pql_rules_nsignals(a->rules); i++)
        pql_window_destroy(a->signals[i].window);
    free(a->pql_rule);
    free(a);
}

const char *pql_account_id(const pql_account *a, size_t *len)
{
    if (len) *len = a->id_len;
    return a->id;
}

int64_t pql_account_clock(const pql_account *a)
{
    return a->clock;
}

/* ---- traits ------------------------------------------------------------ */

static trait *trait_find(const pql_account *a, const char *key, size_t len)
{
    for (size_t i = 0; i < a->ntraits; i++)
        if (a->traits[i].key_len == len && memcmp(a->traits[i].key, key, len) == 0)
            return &a->traits[i];
    return NULL;
}

/* @returns trait t's value (a string points into t's allocation). */
static pql_value trait_value(const trait *t)
{
    pql_value v = {(pql_vtype)t->type, PQL_FMT_PLAIN, {0}};
    if (t->type == PQL_V_NUM) {
        v.u.num = t->u.num;
    } else if (t->type == PQL_V_BOOL) {
        v.u.b = t->u.b;
    } else if (t->type == PQL_V_STR) {
        v.u.str.ptr = t->key + t->key_len + 1;
        v.u.str.len = t->u.str_len;
    }
    return v;
}

static void schedule_delete(pql_account *a, const char *prefix, const char *name, size_t len)
{
    size_t plen = strlen(prefix);
    char *f = xmalloc(plen + len + 1);
    memcpy(f, prefix, plen);
    memcpy(f + plen, name, len);
    f[plen + len] = '\0';
    a->deleted = realloc(a->deleted, (a->ndeleted + 1) * sizeof(*a->deleted));
    if (!a->deleted) abort();
    a->deleted[a->ndeleted++] = f;
}

/* Makes room for n traits (n <= MAX_TRAITS): the array grows by half, from 4,
 * rather than by one trait per realloc. */
static void traits_reserve(pql_account *a, size_t n)
{
    if (n <= a->traits_cap) return;
    size_t cap = a->traits_cap + a->traits_cap / 2;
    if (cap < 4) cap = 4;
    if (cap < n) cap = n;
    if (cap > MAX_TRAITS) cap = MAX_TRAITS;
    a->traits = realloc(a->traits, cap * sizeof(*a->traits));
    if (!a->traits) abort();
    a->traits_cap = (uint16_t)cap;
}

/* Sets (or, for null, deletes) a trait.  @returns 1 if anything changed. */
static int trait_set(pql_account *a, const char *key, size_t len, pql_value v, int mark_dirty)
{
    trait *t = trait_find(a, key, len);
    if (v.type == PQL_V_NULL) {
        if (!t) return 0;
        if (mark_dirty) schedule_delete(a, "t:", key, len);
        free(t->key);
        *t = a->traits[--a->ntraits];
        memset(a->tslot, 0, pql_rules_ntraits(a->rules) * sizeof(*a->tslot));
        facts_changed(a);
        return 1;
    }
    if (t) {
        pql_value cur = trait_value(t);
        if (cur.type == v.type && ((v.type == PQL_V_NUM && cur.u.num == v.u.num) ||
                                   (v.type == PQL_V_BOOL && cur.u.b == v.u.b) ||
                                   (v.type == PQL_V_STR && cur.u.str.len == v.u.str.len &&
                                    memcmp(cur.u.str.ptr, v.u.str.ptr, v.u.str.len) == 0)))
            return 0;
    } else {
        if (a->ntraits >= MAX_TRAITS || len > UINT32_MAX) return 0;
        traits_reserve(a, a->ntraits + 1u);
        t = &a->traits[a->ntraits++];
        memset(t, 0, sizeof(*t));
        t->key_len = (uint32_t)len;
        memset(a->tslot, 0, pql_rules_ntraits(a->rules) * sizeof(*a->tslot));
    }
    /* the key, its NUL, then a string value and its NUL: realloc keeps the key */
    size_t size = len + 1 + (v.type == PQL_V_STR ? v.u.str.len + 1 : 0);
    char *mem = realloc(t->key, size);
    if (!mem) abort();
    if (!t->key) {
        memcpy(mem, key, len);
        mem[len] = '\0';
    }
    t->key = mem;
    if (v.type == PQL_V_NUM) {
        t->u.num = v.u.num;
    } else if (v.type == PQL_V_BOOL) {
        t->u.b = v.u.b;
    } else {
        memcpy(mem + len + 1, v.u.str.ptr, v.u.str.len);
        mem[len + 1 + v.u.str.len] = '\0';
        t->u.str_len = v.u.str.len;
    }
    t->type = (unsigned char)v.type;
    t->dirty = (unsigned char)mark_dirty;
    facts_changed(a);
    return 1;
}

/* ---- lookups for expressions ------------------------------------------- */

static pql_window *window_of(pql_account *a, size_t i)
{
    signal_state *sg = &a->signals[i];
    if (!sg->window) {
        sg->window = pql_window_new(&pql_rules_signal(a->rules, i)->spec);
        if (!sg->window) abort();
    }
    return sg->window;
}

/* The clocks whose first bucket in reach is clock's: the whole line for a
 * lifetime window, else clock's bucket; empty where that would overflow. */
static struct reach reach_of(const pql_window_spec *spec, int64_t clock)
{
    struct reach r = {INT64_MIN, INT64_MAX};
    if (spec->window_ms == 0) return r;
    int64_t b = pql_window_bucket(spec, clock);
    if (__builtin_mul_overflow(b, spec->bucket_ms, &r.from) ||
        __builtin_add_overflow(r.from, spec->bucket_ms, &r.to))
        r.from = r.to = clock;
    return r;
}

pql_value pql_account_signal(pql_account *a, size_t i)
{
    signal_state *sg = &a->signals[i];
    if (!sg->value_ok || a->clock < sg->reach.from || a->clock >= sg->reach.to) {
        const pql_window_spec *spec = &pql_rules_signal(a->rules, i)->spec;
        pql_value v;
        if (sg->window)
            v = pql_window_value(sg->window, a->clock);
        else
            v = (spec->agg == PQL_AGG_MAX || spec->agg == PQL_AGG_LAST) ? pql_null() : pql_num(0);
        int is_null = v.type != PQL_V_NUM; /* a window value is a number or null */
        if (is_null != sg->value_null || (!is_null && !(v.u.num == sg->value)))
            sg->changed_gen = a->gen;
        sg->value = is_null ? 0 : v.u.num;
        sg->value_null = (unsigned char)is_null;
        sg->reach = reach_of(spec, a->clock);
        sg->value_ok = 1;
    }
    return sg->value_null ? pql_null() : pql_num(sg->value);
}

static const pql_prop *event_prop(const pql_event *ev, const char *key)
{
    size_t len = strlen(key);
    for (size_t i = 0; i < ev->nprops; i++)
        if (ev->props[i].key_len == len && memcmp(ev->props[i].key, key, len) == 0)
            return &ev->props[i];
    return NULL;
}

static pql_value lookup(void *opaque, int slot)
{
    eval_ctx *c = opaque;
    int idx = PQL_SLOT_INDEX(slot);
    switch (PQL_SLOT_KIND(slot)) {
    case PQL_SLOT_SIGNAL:
        return pql_account_signal(c->a, (size_t)idx);
    case PQL_SLOT_TRAIT: {
        int32_t *ts = &c->a->tslot[idx];
        if (*ts == 0) {
            const char *name = pql_rules_trait(c->a->rules, (size_t)idx);
            trait *t = trait_find(c->a, name, strlen(name));
            *ts = t ? (int32_t)(t - c->a->traits) + 1 : TRAIT_ABSENT;
        }
        return *ts > 0 ? trait_value(&c->a->traits[*ts - 1]) : pql_null();
    }
    case PQL_SLOT_PROP: {
        const pql_prop *p =
            c->ev ? event_prop(c->ev, pql_rules_prop(c->a->rules, (size_t)idx)) : NULL;
        return p ? p->value : pql_null();
    }
    case PQL_SLOT_BUILTIN: /* PQL_BUILTIN_SINCE_SIGNUP */
        if (c->a->signed_up_at == NO_TIME || c->a->clock == NO_TIME) return pql_null();
        return pql_num((double)(c->a->clock - c->a->signed_up_at));
    case PQL_SLOT_FIELD:
        if (!c->ev) return pql_null();
        if (idx == PQL_FIELD_EVENT) return pql_str(c->ev->event, c->ev->event_len);
        if (idx == PQL_FIELD_USER_ID)
            return c->ev->user_id ? pql_str(c->ev->user_id, c->ev->user_id_len) : pql_null();
        if (idx == PQL_FIELD_EVENT_ID) return pql_str(c->ev->event_id, c->ev->event_id_len);
    }
    return pql_null();
}

/* ---- applying events --------------------------------------------------- */

static int streq(const char *a, size_t alen, const char *b)
{
    return b && strlen(b) == alen && memcmp(a, b, alen) == 0;
}

/* Adds the event to every signal it matches.  @returns the apply outcome. */
static pql_apply observe(pql_account *a, const pql_event *ev)
{
    eval_ctx ctx = {a, ev};
    int matched = 0, counted = 0;
    for (size_t i = 0; i < pql_rules_nsignals(a->rules); i++) {
        const pql_signal *s = pql_rules_signal(a->rules, i);
        if (!s->any_event &&
            (s->event_len != ev->event_len || memcmp(s->event, ev->event, ev->event_len) != 0))
            continue;
        if (s->where && !pql_expr_test(s->where, lookup, &ctx)) continue;
        double value = 1;
        const char *member = NULL;
        size_t member_len = 0;
        if (s->source == PQL_SRC_PROPERTY) {
            const pql_prop *p = event_prop(ev, pql_rules_prop(a->rules, (size_t)s->source_index));
            if (!p) continue;
            if (s->spec.agg == PQL_AGG_DISTINCT) {
                if (p->value.type == PQL_V_STR) {
                    member = p->value.u.str.ptr;
                    member_len = p->value.u.str.len;
                } else if (p->value.type == PQL_V_NUM) {
                    static __thread char numbuf[32];
                    member_len = (size_t)snprintf(numbuf, sizeof(numbuf), "%.17g", p->value.u.num);
                    member = numbuf;
                } else {
                    continue;
                }
            } else if (p->value.type == PQL_V_NUM) {
                value = p->value.u.num;
            } else if (p->value.type == PQL_V_BOOL) {
                value = p->value.u.b;
            } else {
                continue;
            }
        } else if (s->source == PQL_SRC_FIELD) {
            if (s->source_index == PQL_FIELD_USER_ID) {
                if (!ev->user_id) continue;
                member = ev->user_id;
                member_len = ev->user_id_len;
            } else {
                member = ev->event_id;
                member_len = ev->event_id_len;
            }
        }
        matched = 1;
        int rc =
            pql_window_add(window_of(a, i), a->clock, ev->timestamp, value, member, member_len);
        if (rc < 0) abort();
        a->signals[i].value_ok = 0;
        a->signals[i].dirty = 1;
        counted |= rc;
    }
    if (!matched) return PQL_APPLY_UNMATCHED;
    return counted ? PQL_APPLIED : PQL_APPLY_LATE;
}

static int lifecycle(pql_account *a, const pql_event *ev)
{
    int64_t *slot = NULL;
    if (streq(ev->event, ev->event_len, pql_rules_signup_event(a->rules)))
        slot = &a->signed_up_at;
    else if (streq(ev->event, ev->event_len, pql_rules_conversion_event(a->rules)))
        slot = &a->converted_at;
    if (!slot) return 0;
    if (*slot == NO_TIME || ev->timestamp < *slot) {
        *slot = ev->timestamp;
        a->lifecycle_dirty = 1;
        facts_changed(a);
    }
    return 1;
}

static int is_paid(pql_account *a)
{
    if (a->paid_ok) return a->paid;
    const pql_expr *paid = pql_rules_paid_expr(a->rules);
    eval_ctx ctx = {a, NULL};
    a->paid = a->converted_at != NO_TIME || (paid && pql_expr_test(paid, lookup, &ctx));
    a->paid_ok = 1;
    return a->paid;
}

/* ---- firing ------------------------------------------------------------ */

static int tier_for(const pql_rule *rule, double score)
{
    for (int t = 0; t < PQL_NTIERS; t++)
        if (!isnan(rule->tier_min[t]) && score >= rule->tier_min[t]) return t;
    return -1;
}

static verdict judge(pql_account *a, const pql_rule *rule)
{
    eval_ctx ctx = {a, NULL};
    verdict v = {0, 0, 0, -1};
    if (rule->model == PQL_MODEL_THRESHOLD) {
        v.holds = pql_expr_test(rule->when, lookup, &ctx);
        return v;
    }
    v.has_score = 1;
    if (rule->model == PQL_MODEL_WEIGHTED) {
        for (size_t i = 0; i < rule->npoints; i++)
            if (pql_expr_test(rule->point_when[i], lookup, &ctx)) v.score += rule->points[i];
        v.tier = tier_for(rule, v.score);
        v.holds = v.tier >= 0;
        return v;
    }
    double z = rule->intercept;
    for (size_t i = 0; i < rule->nterms; i++) {
        pql_value x = pql_expr_eval(rule->terms[i], lookup, &ctx);
        if (x.type == PQL_V_NUM) z += rule->weights[i] * x.u.num;
    }
    v.score = z >= 0 ? 1.0 / (1.0 + exp(-z)) : exp(z) / (1.0 + exp(z));
    v.tier = tier_for(rule, v.score);
    v.holds = v.score >= rule->threshold;
    return v;
}

/* Reasons when the rule author wrote none: what held, with its weight. */
static size_t default_reasons(pql_account *a, const pql_rule *rule, const verdict *v,
                              char (*buf)[REASON_MAX], size_t max)
{
    eval_ctx ctx = {a, NULL};
    char num[64], num2[64];
    size_t n = 0;
    if (rule->model == PQL_MODEL_THRESHOLD) {
        snprintf(buf[n++], REASON_MAX, "Condition met: %s", rule->when_src);
        return n;
    }
    pql_format_number(num, sizeof(num), v->score,
                      rule->model == PQL_MODEL_LOGISTIC ? PQL_FMT_PERCENT : PQL_FMT_PLAIN);
    if (rule->model == PQL_MODEL_WEIGHTED) {
        snprintf(buf[n++], REASON_MAX, "Score %s (tier %s)", num, pql_tier_name(v->tier));
        for (size_t i = 0; i < rule->npoints && n < max; i++)
            if (pql_expr_test(rule->point_when[i], lookup, &ctx)) {
                pql_format_number(num2, sizeof(num2), rule->points[i], PQL_FMT_PLAIN);
                snprintf(buf[n++], REASON_MAX, "%s (%s%s points)", rule->point_src[i],
                         rule->points[i] >= 0 ? "+" : "", num2);
            }
        return n;
    }
    pql_format_number(num2, sizeof(num2), rule->threshold, PQL_FMT_PERCENT);
    snprintf(buf[n++], REASON_MAX, "Propensity %s (fires at %s)", num, num2);
    for (size_t i = 0; i < rule->nterms && n < max; i++) {
        pql_value x = pql_expr_eval(rule->terms[i], lookup, &ctx);
        if (x.type != PQL_V_NUM) continue;
        pql_format_number(num, sizeof(num), x.u.num, PQL_FMT_PLAIN);
        pql_format_number(num2, sizeof(num2), rule->weights[i], PQL_FMT_PLAIN);
        snprintf(buf[n++], REASON_MAX, "%s = %s (weight %s)", rule->term_src[i], num, num2);
    }
    return n;
}

/* Emits the alert of rule ri for `episode` (its arming sequence number, plus
 * the tier for a tier rise): the id derives from (account, rule, episode). */
static void emit(pql_account *a, size_t ri, const verdict *v, const char *episode,
                 const pql_event *ev, int64_t now_ms, pql_alert_fn fn, void *opaque)
{
    const pql_rule *rule = pql_rules_rule(a->rules, ri);
    eval_ctx ctx = {a, NULL};

    pql_alert al;
    memset(&al, 0, sizeof(al));
    pql_alert_id(a->id, a->id_len, rule->name, episode, al.alert_id);
    al.account_id = a->id;
    al.account_id_len = a->id_len;
    al.kind = rule->kind;
    al.rule = rule->name;
    al.ruleset_version = pql_rules_version(a->rules);
    al.model = pql_model_name(rule->model);
    al.has_score = v->has_score;
    al.score = v->score;
    al.tier = pql_tier_name(v->tier);
    if (v->tier >= 0 && rule->sla_ms[v->tier] > 0) {
        al.has_sla_due_at = 1;
        al.sla_due_at = now_ms + rule->sla_ms[v->tier];
    }
    al.triggered_at = ev->timestamp;
    al.emitted_at = now_ms;

    char(*reasons_buf)[REASON_MAX] = xmalloc(MAX_REASONS * sizeof(*reasons_buf));
    const char *reasons[MAX_REASONS];
    size_t nr = rule->nreasons < MAX_REASONS ? rule->nreasons : MAX_REASONS;
    for (size_t i = 0; i < nr; i++)
        pql_template_render(rule->reasons[i], lookup, &ctx, reasons_buf[i], REASON_MAX);
    if (!nr) nr = default_reasons(a, rule, v, reasons_buf, MAX_REASONS);
    for (size_t i = 0; i < nr; i++)
        reasons[i] = reasons_buf[i];
    al.reasons = reasons;
    al.nreasons = nr;

    const char **names = xmalloc((rule->nsignals + 1) * sizeof(*names));
    double *values = xmalloc((rule->nsignals + 1) * sizeof(*values));
    size_t ns = 0;
    for (size_t i = 0; i < rule->nsignals; i++) {
        pql_value v = pql_account_signal(a, (size_t)rule->signals[i]);
        if (v.type != PQL_V_NUM) continue;
        names[ns] = pql_rules_signal(a->rules, (size_t)rule->signals[i])->name;
        values[ns++] = v.u.num;
    }
    al.signal_names = names;
    al.signal_values = values;
    al.nsignals = ns;

    const char **keys = xmalloc((a->ntraits + 1) * sizeof(*keys));
    pql_value *vals = xmalloc((a->ntraits + 1) * sizeof(*vals));
    for (size_t i = 0; i < a->ntraits; i++) {
        keys[i] = a->traits[i].key;
        vals[i] = trait_value(&a->traits[i]);
    }
    al.trait_keys = keys;
    al.trait_values = vals;
    al.ntraits = a->ntraits;

    if (a->signed_up_at != NO_TIME) {
        al.has_signed_up_at = 1;
        al.signed_up_at = a->signed_up_at;
    }
    if (rule->kind == PQL_ALERT_PQL && a->pql_at != NO_TIME && a->signed_up_at != NO_TIME) {
        al.has_time_to_pql_ms = 1;
        al.time_to_pql_ms = a->pql_at - a->signed_up_at;
    }
    fn(opaque, &al);
    free(reasons_buf);
    free(names);
    free(values);
    free(keys);
    free(vals);
}

static int applies(pql_account *a, const pql_rule *rule, int paid)
{
    if (rule->applies_to == PQL_APPLIES_FREE && paid) return 0;
    if (rule->applies_to == PQL_APPLIES_PAID && !paid) return 0;
    eval_ctx ctx = {a, NULL};
    return !rule->fit || pql_expr_test(rule->fit, lookup, &ctx);
}

/* Skipping rules nothing can change.  A rule's evaluation is a function of
 * the signals it reads, the traits and lifecycle (its fit, paid), its own
 * state and, through held_for, cooldown and since_signup, the clock.  When
 * its last evaluation changed nothing (quiet) and none of these changed
 * since, evaluating it again changes nothing either: no state, no alert.
 * Generations tell what changed since: each signal's value, compared as it
 * is read again (pql_account_signal), the traits and lifecycle (facts_gen),
 * the clock (clock_gen, for a rule that waited on it or reads since_signup).
 * Reading the rule's signals to find out costs an array look-up each; the
 * evaluation walks every expression.  A signal short-circuited away when the
 * rule last ran did not matter then; if it matters now, another input
 * changed. */
static int unchanged_since(pql_account *a, const pql_rule *rule, const rule_state *st)
{
    if (!st->quiet || a->facts_gen > st->eval_gen) return 0;
    if ((st->clock_bound || rule->reads_clock) && a->clock_gen > st->eval_gen) return 0;
    for (size_t k = 0; k < rule->nsignals; k++) {
        size_t s = (size_t)rule->signals[k];
        pql_account_signal(a, s);
        if (a->signals[s].changed_gen > st->eval_gen) return 0;
    }
    return 1;
}

/* Next generation; on wrap-around every rule is evaluated once again. */
static void next_gen(pql_account *a)
{
    if (++a->gen != 0) return;
    size_t ns = pql_rules_nsignals(a->rules), nr = pql_rules_nrules(a->rules);
    a->gen = 1;
    a->clock_gen = a->facts_gen = 0;
    for (size_t i = 0; i < ns; i++)
        a->signals[i].changed_gen = 0;
    for (size_t i = 0; i < nr; i++) {
        a->rstate[i].quiet = 0;
        a->rstate[i].eval_gen = 0;
    }
}

void pql_account_set_rule_skipping(pql_account *a, int on)
{
    a->evaluate_all = !on;
}

/* The traits or the lifecycle changed: rules read them, paid derives from them. */
static void facts_changed(pql_account *a)
{
    a->facts_gen = a->gen;
    a->paid_ok = 0;
}

static int state_eq(const rule_state *x, const rule_state *y)
{
    return x->seq == y->seq && x->fired == y->fired && x->fired_at == y->fired_at &&
           x->held_since == y->held_since && x->tier == y->tier;
}

/* Evaluates rule i: fires, clears, re-arms or waits (see account.h). */
static void judge_rule(pql_account *a, size_t i, int paid, const pql_event *ev, int64_t now_ms,
                       pql_alert_fn fn, void *opaque)
{
    const pql_rule *rule = pql_rules_rule(a->rules, i);
    rule_state *st = &a->rstate[i];
    eval_ctx ctx = {a, NULL};
    char episode[32];
    verdict v = judge(a, rule);
    st->clock_bound = 0;
    if (st->fired) {
        int clear = rule->clear ? pql_expr_test(rule->clear, lookup, &ctx) : !v.holds;
        if (clear) {
            st->fired = 0;
            st->held_since = NO_TIME;
            st->tier = -1;
            st->dirty = 1;
        } else if (v.tier >= 0 && (st->tier < 0 || v.tier < st->tier) && applies(a, rule, paid)) {
            /* the tier rose (MEDIUM → HIGH): a new alert of the same arming */
            st->tier = v.tier;
            st->dirty = 1;
            snprintf(episode, sizeof(episode), "%u:%s", st->seq, pql_tier_name(v.tier));
            emit(a, i, &v, episode, ev, now_ms, fn, opaque);
        }
        return;
    }
    if (!v.holds || !applies(a, rule, paid)) {
        if (st->held_since != NO_TIME) {
            st->held_since = NO_TIME;
            st->dirty = 1;
        }
        return;
    }
    if (rule->held_for_ms > 0) {
        if (st->held_since == NO_TIME) {
            st->held_since = a->clock;
            st->dirty = 1;
        }
        if (a->clock - st->held_since < rule->held_for_ms) {
            st->clock_bound = 1;
            return;
        }
    }
    if (rule->cooldown_ms > 0 && st->fired_at != NO_TIME &&
        a->clock < st->fired_at + rule->cooldown_ms) {
        st->clock_bound = 1;
        return;
    }
    st->seq++;
    st->fired = 1;
    st->fired_at = ev->timestamp;
    st->held_since = NO_TIME;
    st->tier = v.tier;
    st->dirty = 1;
    if (rule->kind == PQL_ALERT_PQL && a->pql_at == NO_TIME) {
        a->pql_at = ev->timestamp;
        free(a->pql_rule);
        a->pql_rule = strdup(rule->name);
        if (!a->pql_rule) abort();
        a->lifecycle_dirty = 1;
    }
    snprintf(episode, sizeof(episode), "%u", st->seq);
    emit(a, i, &v, episode, ev, now_ms, fn, opaque);
}

static void evaluate(pql_account *a, const pql_event *ev, int64_t now_ms, pql_alert_fn fn,
                     void *opaque)
{
    int paid = is_paid(a);
    for (size_t i = 0; i < pql_rules_nrules(a->rules); i++) {
        const pql_rule *rule = pql_rules_rule(a->rules, i);
        rule_state *st = &a->rstate[i];
        if (!a->evaluate_all && unchanged_since(a, rule, st)) continue;
        rule_state before = *st;
        judge_rule(a, i, paid, ev, now_ms, fn, opaque);
        st->eval_gen = a->gen;
        st->quiet = state_eq(&before, st);
    }
}

pql_apply pql_account_apply(pql_account *a, const pql_event *ev, int64_t now_ms, pql_alert_fn fn,
                            void *opaque)
{
    pql_apply res = PQL_APPLY_UNMATCHED;
    next_gen(a);
    if (ev->timestamp > a->clock || a->clock == NO_TIME) {
        a->clock = ev->timestamp;
        a->clock_dirty = 1;
        a->clock_gen = a->gen;
    }
    if (ev->kind == PQL_INPUT_ACCOUNT) {
        for (size_t i = 0; i < ev->nprops; i++)
            if (trait_set(a, ev->props[i].key, ev->props[i].key_len, ev->props[i].value, 1))
                res = PQL_APPLIED;
    } else {
        int marker = lifecycle(a, ev);
        res = observe(a, ev);
        if (marker && res == PQL_APPLY_UNMATCHED) res = PQL_APPLIED;
    }
    evaluate(a, ev, now_ms, fn, opaque);
    return res;
}

/* ---- persistence ------------------------------------------------------- */

typedef struct flush_ctx {
    pql_account *a;
    pql_buf field;
    size_t prefix_len;
    pql_field_set_fn set;
    pql_field_del_fn del;
    void *opaque;
} flush_ctx;

static void window_set(void *opaque, const char *f, size_t flen, double v)
{
    flush_ctx *c = opaque;
    char num[40];
    c->field.len = c->prefix_len;
    pql_buf_append(&c->field, f, flen);
    size_t n = pql_fmt_num(num, v);
    c->set(c->opaque, c->field.data, c->field.len, num, n);
}

static void window_del(void *opaque, const char *f, size_t flen)
{
    flush_ctx *c = opaque;
    c->field.len = c->prefix_len;
    pql_buf_append(&c->field, f, flen);
    c->del(c->opaque, c->field.data, c->field.len);
}

static void set_time(flush_ctx *c, const char *field, int64_t t)
{
    char num[PQL_I64_MAX_DIGITS + 1];
    if (t == NO_TIME) return;
    size_t n = pql_fmt_i64(num, t);
    c->set(c->opaque, field, strlen(field), num, n);
}

void pql_account_flush(pql_account *a, pql_field_set_fn set, pql_field_del_fn del, void *opaque)
{
    flush_ctx c = {.a = a, .set = set, .del = del, .opaque = opaque};
    char num[64];
    if (a->clock_dirty) {
        set_time(&c, "c", a->clock);
        a->clock_dirty = 0;
    }
    for (size_t i = 0; i < a->ndeleted; i++) {
        del(opaque, a->deleted[i], strlen(a->deleted[i]));
        free(a->deleted[i]);
    }
    free(a->deleted); /* most flushes delete nothing: keep no array */
    a->deleted = NULL;
    a->ndeleted = 0;
    for (size_t i = 0; i < a->ntraits; i++) {
        trait *t = &a->traits[i];
        if (!t->dirty) continue;
        pql_value tv = trait_value(t);
        pql_buf_reset(&c.field);
        pql_buf_append(&c.field, "t:", 2);
        pql_buf_append(&c.field, t->key, t->key_len);
        pql_buf v = {0};
        if (tv.type == PQL_V_NUM) {
            num[0] = 'n';
            size_t n = pql_fmt_num(num + 1, tv.u.num);
            pql_buf_append(&v, num, n + 1);
        } else if (tv.type == PQL_V_BOOL) {
            pql_buf_append(&v, tv.u.b ? "b1" : "b0", 2);
        } else {
            pql_buf_append(&v, "s", 1);
            pql_buf_append(&v, tv.u.str.ptr, tv.u.str.len);
        }
        set(opaque, c.field.data, c.field.len, v.data, v.len);
        pql_buf_free(&v);
        t->dirty = 0;
    }
    for (size_t i = 0; i < pql_rules_nsignals(a->rules); i++) {
        signal_state *sg = &a->signals[i];
        pql_window *w = sg->window;
        if (!w) continue;
        const pql_window_spec *spec = &pql_rules_signal(a->rules, i)->spec;
        int moved = a->clock != NO_TIME &&
                    (a->expired_clock == NO_TIME ||
                     pql_window_first(spec, a->clock) != pql_window_first(spec, a->expired_clock));
        if (!sg->dirty && !moved) continue;
        sg->dirty = 0;
        if (a->clock != NO_TIME) pql_window_expire(w, a->clock);
        if (!pql_window_dirty(w)) continue;
        const char *key = pql_rules_signal(a->rules, i)->key;
        pql_buf_reset(&c.field);
        pql_buf_append(&c.field, "s:", 2);
        pql_buf_append(&c.field, key, strlen(key));
        pql_buf_append(&c.field, "|", 1);
        c.prefix_len = c.field.len;
        pql_window_flush(w, window_set, window_del, &c);
    }
    a->expired_clock = a->clock;
    for (size_t i = 0; i < pql_rules_nrules(a->rules); i++) {
        rule_state *st = &a->rstate[i];
        if (!st->dirty) continue;
        pql_buf_reset(&c.field);
        pql_buf_printf(&c.field, "r:%s", pql_rules_rule(a->rules, i)->name);
        int n = snprintf(num, sizeof(num), "%u %d %lld %lld %d", st->seq, st->fired,
                         (long long)st->fired_at, (long long)st->held_since, st->tier);
        set(opaque, c.field.data, c.field.len, num, (size_t)n);
        st->dirty = 0;
    }
    if (a->lifecycle_dirty) {
        set_time(&c, "l:signup", a->signed_up_at);
        set_time(&c, "l:conversion", a->converted_at);
        set_time(&c, "l:pql_at", a->pql_at);
        if (a->pql_rule) set(opaque, "l:pql_rule", 10, a->pql_rule, strlen(a->pql_rule));
        a->lifecycle_dirty = 0;
    }
    for (size_t i = 0; i < a->nmemos; i++) {
        memo *m = &a->memos[i];
        if (!m->dirty) continue;
        pql_buf_reset(&c.field);
        pql_buf_printf(&c.field, "m:%s", m->name);
        set(opaque, c.field.data, c.field.len, m->value, m->value_len);
        m->dirty = 0;
    }
    pql_buf_free(&c.field);
}

unsigned pql_account_mark(pql_account *a, unsigned mark)
{
    unsigned old = a->batch_mark;
    a->batch_mark = mark;
    return old;
}

unsigned pql_account_batch_mark(const pql_account *a)
{
    return a->batch_mark;
}

int64_t pql_account_ttl_set_at(const pql_account *a)
{
    return a->ttl_set_at;
}

void pql_account_set_ttl_set_at(pql_account *a, int64_t at)
{
    a->ttl_set_at = at;
}

int pql_account_dirty(const pql_account *a)
{
    if (a->clock_dirty || a->lifecycle_dirty || a->ndeleted) return 1;
    for (size_t i = 0; i < a->ntraits; i++)
        if (a->traits[i].dirty) return 1;
    for (size_t i = 0; i < pql_rules_nsignals(a->rules); i++)
        if (a->signals[i].dirty && a->signals[i].window && pql_window_dirty(a->signals[i].window))
            return 1;
    for (size_t i = 0; i < pql_rules_nrules(a->rules); i++)
        if (a->rstate[i].dirty) return 1;
    for (size_t i = 0; i < a->nmemos; i++)
        if (a->memos[i].dirty) return 1;
    return 0;
}

static int parse_i64(const char *s, size_t len, int64_t *out)
{
    char buf[32];
    char *end;
    if (len == 0 || len >= sizeof(buf)) return -1;
    memcpy(buf, s, len);
    buf[len] = '\0';
    long long v = strtoll(buf, &end, 10);
    if (*end) return -1;
    *out = v;
    return 0;
}

static int parse_double(const char *s, size_t len, double *out)
{
    char buf[64];
    char *end;
    if (len == 0 || len >= sizeof(buf)) return -1;
    memcpy(buf, s, len);
    buf[len] = '\0';
    *out = strtod(buf, &end);
    return *end ? -1 : 0;
}

int pql_account_load_field(pql_account *a, const char *f, size_t flen, const char *v, size_t vlen)
{
    if (flen == 1 && f[0] == 'c') {
        a->clock_gen = a->gen;
        return parse_i64(v, vlen, &a->clock);
    }
    if (flen > 2 && f[1] == ':' && f[0] == 't') {
        pql_value val;
        double d;
        if (vlen >= 1 && v[0] == 'n' && parse_double(v + 1, vlen - 1, &d) == 0)
            val = pql_num(d);
        else if (vlen == 2 && v[0] == 'b')
            val = pql_bool(v[1] == '1');
        else if (vlen >= 1 && v[0] == 's')
            val = pql_str(v + 1, vlen - 1);
        else
            return -1;
        trait_set(a, f + 2, flen - 2, val, 0);
        return 0;
    }
    if (flen > 2 && f[1] == ':' && f[0] == 's') {
        const char *bar = memchr(f + 2, '|', flen - 2);
        if (!bar) return -1;
        int i = pql_rules_signal_by_key(a->rules, f + 2, (size_t)(bar - f - 2));
        double d;
        if (i < 0) { /* a signal whose definition changed or was removed */
            schedule_delete(a, "", f, flen);
            return 0;
        }
        if (parse_double(v, vlen, &d) < 0) return -1;
        a->signals[i].value_ok = 0;
        a->expired_clock = NO_TIME; /* what is loaded may be out of reach */
        return pql_window_load(window_of(a, (size_t)i), bar + 1, flen - (size_t)(bar + 1 - f), d);
    }
    if (flen > 2 && f[1] == ':' && f[0] == 'r') {
        int i = pql_rules_rule_by_name(a->rules, f + 2, flen - 2);
        if (i < 0) return 0; /* a rule no longer in the set: kept, it may come back */
        char buf[96];
        if (vlen >= sizeof(buf)) return -1;
        memcpy(buf, v, vlen);
        buf[vlen] = '\0';
        unsigned seq;
        int fired;
        long long fa, hs;
        int tier = -1; /* absent in states written before scored models */
        if (sscanf(buf, "%u %d %lld %lld %d", &seq, &fired, &fa, &hs, &tier) < 4) return -1;
        if (tier < -1 || tier >= PQL_NTIERS) return -1; /* no tier ever written */
        a->rstate[i] = (rule_state){.seq = seq,
                                    .fired = fired != 0,
                                    .fired_at = fa,
                                    .held_since = hs,
                                    .tier = (signed char)tier}; /* clean, not quiet */
        return 0;
    }
    if (flen > 2 && f[0] == 'l' && f[1] == ':') {
        facts_changed(a);
        if (flen == 8 && memcmp(f, "l:signup", 8) == 0) return parse_i64(v, vlen, &a->signed_up_at);
        if (flen == 12 && memcmp(f, "l:conversion", 12) == 0)
            return parse_i64(v, vlen, &a->converted_at);
        if (flen == 8 && memcmp(f, "l:pql_at", 8) == 0) return parse_i64(v, vlen, &a->pql_at);
        if (flen == 10 && memcmp(f, "l:pql_rule", 10) == 0) {
            free(a->pql_rule);
            a->pql_rule = xmalloc(vlen + 1);
            memcpy(a->pql_rule, v, vlen);
            a->pql_rule[vlen] = '\0';
            return 0;
        }
    }
    if (flen > 2 && f[0] == 'm' && f[1] == ':') {
        char name[MEMO_NAME_MAX];
        if (flen - 2 >= sizeof name || memchr(f + 2, '\0', flen - 2)) return -1;
        memcpy(name, f + 2, flen - 2);
        name[flen - 2] = '\0';
        pql_account_set_memo(a, name, v, vlen);
        memo_find(a, name)->dirty = 0; /* loaded, not changed */
        return 0;
    }
    return -1;
}

size_t pql_account_memory(const pql_account *a)
{
    size_t ns = pql_rules_nsignals(a->rules), nr = pql_rules_nrules(a->rules);
    size_t n = pql_heap_bytes(block_size(a->id_len, ns, nr, pql_rules_ntraits(a->rules)));
    if (a->traits_cap) n += pql_heap_bytes(a->traits_cap * sizeof(trait));
    for (size_t i = 0; i < a->ntraits; i++)
        n += pql_heap_bytes(a->traits[i].key_len + 1u +
                            (a->traits[i].type == PQL_V_STR ? a->traits[i].u.str_len + 1 : 0));
    for (size_t i = 0; i < ns; i++)
        if (a->signals[i].window) n += pql_window_memory(a->signals[i].window);
    if (a->nmemos) n += pql_heap_bytes(a->nmemos * sizeof(memo));
    for (size_t i = 0; i < a->nmemos; i++)
        n += pql_heap_bytes(a->memos[i].value_len + 1u);
    if (a->pql_rule) n += pql_heap_bytes(strlen(a->pql_rule) + 1);
    if (a->ndeleted) n += pql_heap_bytes(a->ndeleted * sizeof(*a->deleted));
    for (size_t i = 0; i < a->ndeleted; i++)
        n += pql_heap_bytes(strlen(a->deleted[i]) + 1);
    return n;
}

void pql_account_rule_state(const pql_account *a, size_t i, unsigned *seq, int *fired)
{
    if (seq) *seq = a->rstate[i].seq;
    if (fired) *fired = a->rstate[i].fired;
}

/* ---- reading an account ------------------------------------------------ */

pql_value pql_account_lookup(void *account, int slot)
{
    eval_ctx ctx = {account, NULL};
    return lookup(&ctx, slot);
}

void pql_account_rule_view(pql_account *a, size_t i, pql_rule_view *out)
{
    const pql_rule *rule = pql_rules_rule(a->rules, i);
    const rule_state *st = &a->rstate[i];
    eval_ctx ctx = {a, NULL};
    verdict v = judge(a, rule);
    memset(out, 0, sizeof(*out));
    out->paid = is_paid(a);
    out->fit = !rule->fit || pql_expr_test(rule->fit, lookup, &ctx);
    out->applies = applies(a, rule, out->paid);
    out->holds = v.holds;
    out->has_score = v.has_score;
    out->score = v.score;
    out->tier = v.tier;
    out->clear = rule->clear ? pql_expr_test(rule->clear, lookup, &ctx) : !v.holds;
    out->seq = st->seq;
    out->fired = st->fired;
    out->fired_at = st->fired_at;
    out->held_since = st->held_since;
    out->fired_tier = st->tier;
}

int pql_account_paid(pql_account *a)
{
    return is_paid(a);
}

void pql_account_lifecycle(const pql_account *a, int64_t *signed_up_at, int64_t *converted_at,
                           int64_t *pql_at, const char **pql_rule)
{
    if (signed_up_at) *signed_up_at = a->signed_up_at;
    if (converted_at) *converted_at = a->converted_at;
    if (pql_at) *pql_at = a->pql_at;
    if (pql_rule) *pql_rule = a->pql_rule;
}

size_t pql_account_ntraits(const pql_account *a)
{
    return a->ntraits;
}

const char *pql_account_trait(const pql_account *a, size_t i, pql_value *v)
{
    if (i >= a->ntraits) return NULL;
    if (v) *v = trait_value(&a->traits[i]);
    return a->traits[i].key;
}

/* ---- what other modules keep with the account (metrics.c) -------------- */

static memo *memo_find(const pql_account *a, const char *name)
{
    for (size_t i = 0; i < a->nmemos; i++)
        if (strcmp(a->memos[i].name, name) == 0) return &a->memos[i];
    return NULL;
}

const char *pql_account_memo(const pql_account *a, const char *name, size_t *len)
{
    const memo *m = memo_find(a, name);
    if (m && len) *len = m->value_len;
    return m ? m->value : NULL;
}

void pql_account_set_memo(pql_account *a, const char *name, const char *value, size_t len)
{
    memo *m = memo_find(a, name);
    if (!m) {
        if (strlen(name) >= MEMO_NAME_MAX) abort(); /* a caller's bug: names are constants */
        a->memos = realloc(a->memos, (a->nmemos + 1) * sizeof(*a->memos));
        if (!a->memos) abort();
        m = &a->memos[a->nmemos++];
        snprintf(m->name, sizeof m->name, "%s", name);
    } else {
        free(m->value);
    }
    m->value = xmalloc(len + 1);
    memcpy(m->value, value, len);
    m->value[len] = '\0';
    m->value_len = (uint32_t)len;
    m->dirty = 1;
}
