/* explain.c — one account as the engine sees it (see explain.h).
 *
 * The verdict sentence of a rule follows the engine's own order of checks in
 * account.c (evaluate): fired → waiting for clear; else not applying (paid /
 * free, fit); else condition false; else held_for pending; else cooldown;
 * else it holds and is armed, which after a reload or a state restore means
 * it fires on the account's next event. */
#include "explain.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- the JSON document --------------------------------------------------- */

static json_t *time_or_null(int64_t ms)
{
    return ms == PQL_NO_TIME ? json_null() : json_integer(ms);
}

static json_t *value_json(pql_value v)
{
    switch (v.type) {
    case PQL_V_NUM:
        return json_real(v.u.num);
    case PQL_V_STR:
        return json_stringn(v.u.str.ptr, v.u.str.len);
    case PQL_V_BOOL:
        return json_boolean(v.u.b);
    default:
        return json_null();
    }
}

static const char *applies_name(pql_applies a)
{
    return a == PQL_APPLIES_PAID ? "paid" : a == PQL_APPLIES_ALL ? "all" : "free";
}

/* Formats ms since the epoch as "2026-11-20 10:00 UTC" (seconds when not 0). */
static void fmt_time(char *buf, size_t size, int64_t ms)
{
    time_t t = (time_t)(ms >= 0 ? ms / 1000 : (ms - 999) / 1000);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(buf, size, tm.tm_sec ? "%Y-%m-%d %H:%M:%S UTC" : "%Y-%m-%d %H:%M UTC", &tm);
}

static void fmt_duration(char *buf, size_t size, int64_t ms)
{
    pql_format_number(buf, size, (double)ms, PQL_FMT_DURATION);
}

typedef struct conj_ctx {
    const char *src;
    json_t *list;
    pql_buf failing; /* "a >= 5, b >= 1" */
} conj_ctx;

static void add_conjunct(void *opaque, size_t start, size_t end, pql_value v)
{
    conj_ctx *c = opaque;
    int holds = (v.type == PQL_V_BOOL && v.u.b) || (v.type == PQL_V_NUM && v.u.num != 0);
    json_array_append_new(
        c->list, json_pack("{s:s%,s:b}", "text", c->src + start, end - start, "holds", holds));
    if (!holds)
        pql_buf_printf(&c->failing, "%s%.*s", c->failing.len ? ", " : "", (int)(end - start),
                       c->src + start);
}

static int lowest_tier(const pql_rule *rule)
{
    int lowest = -1;
    for (int t = 0; t < PQL_NTIERS; t++)
        if (!isnan(rule->tier_min[t])) lowest = t;
    return lowest;
}

/* The one sentence a person reads first. */
static void verdict(pql_account *a, const pql_rule *rule, const pql_rule_view *v,
                    const char *failing, pql_buf *out)
{
    char t1[64], t2[64], num[64];
    int64_t clock = pql_account_clock(a);
    if (v->fired) {
        fmt_time(t1, sizeof t1, v->fired_at);
        pql_buf_printf(out, "fired (%u time%s, last for an event at %s); re-arms when %s", v->seq,
                       v->seq == 1 ? "" : "s", t1,
                       rule->clear ? "its clear condition holds" : "its condition stops holding");
        if (v->tier >= 0 && v->fired_tier >= 0 && v->tier < v->fired_tier)
            pql_buf_printf(out, "; the tier rose to %s: fires again on the next event",
                           pql_tier_name(v->tier));
        return;
    }
    if (!v->applies) {
        if (rule->applies_to == PQL_APPLIES_FREE && v->paid)
            pql_buf_printf(out, "does not apply: the account is paid and the rule is for free "
                                "accounts");
        else if (rule->applies_to == PQL_APPLIES_PAID && !v->paid)
            pql_buf_printf(out, "does not apply: the account is not paid (no conversion event, "
                                "and lifecycle.paid does not hold) and the rule is for paid "
                                "accounts");
        else
            pql_buf_printf(out, "does not apply: the account does not fit");
        return;
    }
    if (!v->holds) {
        if (rule->model == PQL_MODEL_THRESHOLD) {
            pql_buf_printf(out, "does not hold: %s", failing && *failing ? failing : "when");
        } else if (rule->model == PQL_MODEL_WEIGHTED) {
            int lt = lowest_tier(rule);
            pql_format_number(num, sizeof num, v->score, PQL_FMT_PLAIN);
            pql_format_number(t1, sizeof t1, lt >= 0 ? rule->tier_min[lt] : 0, PQL_FMT_PLAIN);
            pql_buf_printf(out, "score %s is below the lowest tier (%s at %s)", num,
                           lt >= 0 ? pql_tier_name(lt) : "?", t1);
        } else {
            pql_format_number(num, sizeof num, v->score, PQL_FMT_PERCENT);
            pql_format_number(t1, sizeof t1, rule->threshold, PQL_FMT_PERCENT);
            pql_buf_printf(out, "probability %s is below the threshold %s", num, t1);
        }
        return;
    }
    if (rule->held_for_ms > 0 &&
        (v->held_since == PQL_NO_TIME || clock - v->held_since < rule->held_for_ms)) {
        fmt_duration(t2, sizeof t2, rule->held_for_ms);
        if (v->held_since == PQL_NO_TIME) {
            pql_buf_printf(out,
                           "holds; must hold for %s in event time, counted from the next "
                           "event",
                           t2);
        } else {
            fmt_time(t1, sizeof t1, v->held_since + rule->held_for_ms);
            fmt_duration(num, sizeof num, clock - v->held_since);
            pql_buf_printf(out,
                           "holds for %s so far; must hold for %s: fires on an event at or "
                           "after %s if it still holds",
                           num, t2, t1);
        }
        return;
    }
    if (rule->cooldown_ms > 0 && v->fired_at != PQL_NO_TIME &&
        clock < v->fired_at + rule->cooldown_ms) {
        fmt_time(t1, sizeof t1, v->fired_at + rule->cooldown_ms);
        pql_buf_printf(
            out, "holds, in cooldown: fires on an event at or after %s if it still holds", t1);
        return;
    }
    pql_buf_printf(out, "holds and is armed: fires on the account's next event");
}

static json_t *explain_rule(pql_account *a, const pql_rules *r, size_t i)
{
    const pql_rule *rule = pql_rules_rule(r, i);
    pql_rule_view v;
    pql_account_rule_view(a, i, &v);
    json_t *j = json_object();
    json_object_set_new(j, "name", json_string(rule->name));
    json_object_set_new(j, "kind", json_string(rule->kind == PQL_ALERT_PQL ? "PQL" : "EXPANSION"));
    json_object_set_new(j, "model", json_string(pql_model_name(rule->model)));
    json_object_set_new(j, "applies_to", json_string(applies_name(rule->applies_to)));
    json_object_set_new(j, "applies", json_boolean(v.applies));
    json_object_set_new(j, "fit", rule->fit ? json_boolean(v.fit) : json_null());
    json_object_set_new(j, "holds", json_boolean(v.holds));
    json_object_set_new(j, "score", v.has_score ? json_real(v.score) : json_null());
    json_object_set_new(j, "tier", v.tier >= 0 ? json_string(pql_tier_name(v.tier)) : json_null());
    json_object_set_new(j, "state", json_string(v.fired ? "FIRED" : "ARMED"));
    json_object_set_new(j, "fired_count", json_integer(v.seq));
    json_object_set_new(j, "last_fired_at", time_or_null(v.fired_at));
    json_object_set_new(j, "held_since", time_or_null(v.held_since));
    json_object_set_new(j, "cooldown_until",
                        rule->cooldown_ms > 0 && v.fired_at != PQL_NO_TIME
                            ? json_integer(v.fired_at + rule->cooldown_ms)
                            : json_null());

    conj_ctx c = {rule->when_src, NULL, {0}};
    if (rule->model == PQL_MODEL_THRESHOLD) {
        c.list = json_array();
        pql_expr_conjuncts(rule->when, pql_account_lookup, a, add_conjunct, &c);
        json_object_set_new(j, "conditions", c.list);
    } else if (rule->model == PQL_MODEL_WEIGHTED) {
        json_t *pts = json_array();
        for (size_t k = 0; k < rule->npoints; k++)
            json_array_append_new(
                pts,
                json_pack("{s:s,s:f,s:b}", "text", rule->point_src[k], "points", rule->points[k],
                          "holds", pql_expr_test(rule->point_when[k], pql_account_lookup, a)));
        json_object_set_new(j, "points", pts);
    } else {
        json_t *terms = json_array();
        for (size_t k = 0; k < rule->nterms; k++)
            json_array_append_new(
                terms, json_pack("{s:s,s:f,s:o}", "text", rule->term_src[k], "weight",
                                 rule->weights[k], "value",
                                 value_json(pql_expr_eval(rule->terms[k], pql_account_lookup, a))));
        json_object_set_new(j, "terms", terms);
        json_object_set_new(j, "threshold", json_real(rule->threshold));
    }
    pql_buf sentence = {0};
    verdict(a, rule, &v, c.failing.data, &sentence);
    json_object_set_new(j, "verdict", json_string(sentence.data ? sentence.data : ""));
    pql_buf_free(&sentence);
    pql_buf_free(&c.failing);
    return j;
}

json_t *pql_explain_json(pql_account *a, const pql_rules *r)
{
    size_t idlen;
    const char *id = pql_account_id(a, &idlen);
    int64_t signup, conv, pql_at;
    const char *pql_rule;
    pql_account_lifecycle(a, &signup, &conv, &pql_at, &pql_rule);
    json_t *doc = json_object();
    json_object_set_new(doc, "account_id", json_stringn(id, idlen));
    json_object_set_new(doc, "ruleset_version", json_string(pql_rules_version(r)));
    json_object_set_new(doc, "clock", time_or_null(pql_account_clock(a)));
    json_object_set_new(doc, "signed_up_at", time_or_null(signup));
    json_object_set_new(doc, "converted_at", time_or_null(conv));
    json_object_set_new(doc, "qualified_at", time_or_null(pql_at));
    json_object_set_new(doc, "qualified_by", pql_rule ? json_string(pql_rule) : json_null());

    json_t *traits = json_object();
    for (size_t i = 0; i < pql_account_ntraits(a); i++) {
        pql_value v;
        const char *k = pql_account_trait(a, i, &v);
        json_object_set_new(traits, k, value_json(v));
    }
    json_object_set_new(doc, "traits", traits);

    json_t *signals = json_object();
    for (size_t i = 0; i < pql_rules_nsignals(r); i++)
        json_object_set_new(signals, pql_rules_signal(r, i)->name,
                            value_json(pql_account_signal(a, i)));
    json_object_set_new(doc, "signals", signals);

    json_t *rules = json_array();
    for (size_t i = 0; i < pql_rules_nrules(r); i++)
        json_array_append_new(rules, explain_rule(a, r, i));
    json_object_set_new(doc, "paid", json_boolean(pql_account_paid(a)));
    json_object_set_new(doc, "rules", rules);
    return doc;
}

/* ---- text ------------------------------------------------------------------ */

static void put_time(pql_buf *out, const char *label, json_t *t)
{
    char buf[64];
    if (json_is_integer(t))
        fmt_time(buf, sizeof buf, json_integer_value(t));
    else
        snprintf(buf, sizeof buf, "-");
    pql_buf_printf(out, "  %-22s %s", label, buf);
}

static void put_value(pql_buf *out, json_t *v)
{
    char num[64];
    if (json_is_number(v)) {
        pql_format_number(num, sizeof num, json_number_value(v), PQL_FMT_PLAIN);
        pql_buf_printf(out, "%s", num);
    } else if (json_is_string(v)) {
        pql_buf_printf(out, "%s", json_string_value(v));
    } else if (json_is_boolean(v)) {
        pql_buf_printf(out, "%s", json_is_true(v) ? "true" : "false");
    } else {
        pql_buf_printf(out, "n/a");
    }
}

static size_t widest_key(json_t *obj)
{
    size_t w = 0;
    const char *k;
    json_t *v;
    json_object_foreach(obj, k, v)
    {
        if (strlen(k) > w) w = strlen(k);
    }
    return w;
}

void pql_explain_text(const json_t *doc_c, const char *where, pql_buf *out)
{
    json_t *doc = (json_t *)doc_c; /* jansson's getters are not const-correct */
    const char *k;
    json_t *v;
    char num[64];
    pql_buf_printf(out, "Account %s (%s, rule set version %s)\n",
                   json_string_value(json_object_get(doc, "account_id")), where,
                   json_string_value(json_object_get(doc, "ruleset_version")));
    put_time(out, "latest event", json_object_get(doc, "clock"));
    pql_buf_printf(out, "   (rules are evaluated at this event time)\n");
    put_time(out, "signed up", json_object_get(doc, "signed_up_at"));
    pql_buf_printf(out, "\n");
    put_time(out, "converted", json_object_get(doc, "converted_at"));
    pql_buf_printf(out, "\n");
    put_time(out, "qualified (first PQL)", json_object_get(doc, "qualified_at"));
    if (json_is_string(json_object_get(doc, "qualified_by")))
        pql_buf_printf(out, " by %s", json_string_value(json_object_get(doc, "qualified_by")));
    pql_buf_printf(out, "\n  %-22s %s\n", "counts as",
                   json_is_true(json_object_get(doc, "paid")) ? "paid" : "free");

    json_t *traits = json_object_get(doc, "traits");
    pql_buf_printf(out, "\nTraits\n");
    if (!json_object_size(traits)) pql_buf_printf(out, "  (none)\n");
    size_t w = widest_key(traits);
    json_object_foreach(traits, k, v)
    {
        pql_buf_printf(out, "  %-*s  ", (int)w, k);
        put_value(out, v);
        pql_buf_printf(out, "\n");
    }
    json_t *signals = json_object_get(doc, "signals");
    pql_buf_printf(out, "\nSignals\n");
    w = widest_key(signals);
    json_object_foreach(signals, k, v)
    {
        pql_buf_printf(out, "  %-*s  ", (int)w, k);
        put_value(out, v);
        pql_buf_printf(out, "\n");
    }

    pql_buf_printf(out, "\nRules\n");
    size_t i;
    json_t *rule;
    json_array_foreach(json_object_get(doc, "rules"), i, rule)
    {
        const char *model = json_string_value(json_object_get(rule, "model"));
        pql_buf_printf(out, "  %s (%s, %s, for %s accounts)",
                       json_string_value(json_object_get(rule, "name")),
                       json_string_value(json_object_get(rule, "kind")), model,
                       json_string_value(json_object_get(rule, "applies_to")));
        json_t *score = json_object_get(rule, "score");
        if (json_is_number(score)) {
            pql_format_number(num, sizeof num, json_number_value(score),
                              !strcmp(model, "logistic") ? PQL_FMT_PERCENT : PQL_FMT_PLAIN);
            pql_buf_printf(out, ": %s %s", !strcmp(model, "logistic") ? "probability" : "score",
                           num);
            if (json_is_string(json_object_get(rule, "tier")))
                pql_buf_printf(out, ", tier %s", json_string_value(json_object_get(rule, "tier")));
        }
        pql_buf_printf(out, "\n    → %s\n", json_string_value(json_object_get(rule, "verdict")));
        json_t *fit = json_object_get(rule, "fit");
        if (json_is_boolean(fit))
            pql_buf_printf(out, "      %s fit\n", json_is_true(fit) ? "✓" : "✗");
        size_t n;
        json_t *c;
        json_array_foreach(json_object_get(rule, "conditions"), n, c)
        {
            pql_buf_printf(out, "      %s %s\n",
                           json_is_true(json_object_get(c, "holds")) ? "✓" : "✗",
                           json_string_value(json_object_get(c, "text")));
        }
        json_array_foreach(json_object_get(rule, "points"), n, c)
        {
            double pts = json_number_value(json_object_get(c, "points"));
            pql_format_number(num, sizeof num, pts, PQL_FMT_PLAIN);
            pql_buf_printf(out, "      %s %s%s points  %s\n",
                           json_is_true(json_object_get(c, "holds")) ? "✓" : "✗",
                           pts >= 0 ? "+" : "", num, json_string_value(json_object_get(c, "text")));
        }
        json_array_foreach(json_object_get(rule, "terms"), n, c)
        {
            pql_format_number(num, sizeof num, json_number_value(json_object_get(c, "weight")),
                              PQL_FMT_PLAIN);
            pql_buf_printf(out, "      %s = ", json_string_value(json_object_get(c, "text")));
            put_value(out, json_object_get(c, "value"));
            pql_buf_printf(out, "  (weight %s)\n", num);
        }
    }
}

/* ---- fetching ------------------------------------------------------------ */

typedef struct load_ctx {
    pql_account *a;
} load_ctx;

static void load_field(void *opaque, size_t i, const char *field, size_t field_len,
                       const char *value, size_t value_len)
{
    (void)i;
    load_ctx *c = opaque;
    pql_account_load_field(c->a, field, field_len, value, value_len);
}

pql_account *pql_explain_fetch(pql_store *s, const pql_rules *r, const char *group, const char *id,
                               int32_t max_partitions, int32_t *partition, char *errstr,
                               size_t errstr_size)
{
    *partition = -1;
    if (pql_store_find_account(s, group, id, max_partitions, partition, errstr, errstr_size))
        return NULL;
    if (*partition < 0) return NULL;
    size_t len = strlen(id);
    pql_account *a = pql_account_new(r, id, len);
    if (!a) {
        pql_set_err(errstr, errstr_size, "out of memory");
        return NULL;
    }
    load_ctx c = {a};
    const char *ids[1] = {id};
    if (pql_store_load_accounts(s, group, partition, ids, &len, 1, load_field, &c, errstr,
                                errstr_size)) {
        pql_account_destroy(a);
        return NULL;
    }
    return a;
}
