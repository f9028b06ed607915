/* rules.c — loads, validates and compiles rule files (see rules.h).
 *
 * Loading is three passes over the parsed YAML documents of a rule set:
 *   1. declarations: version, lifecycle, traits and every signal's name, so
 *      a rule may read a signal or trait declared in another file of the
 *      same directory;
 *   2. signals: each signal's definition and `where` filter (and
 *      lifecycle.paid);
 *   3. rules: each rule's expressions and reason templates, names resolved
 *      to slots, checked against the compiled signals (held_for vs window).
 * Every problem is reported (not just the first) with FILE:LINE:COL taken from
 * the YAML node, plus the offset inside an expression, and the set is refused
 * whole if there is any. */
#include "rules.h"

#include <dirent.h>
#include <math.h>
#include <libfyaml.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

struct pql_rules {
    atomic_int extra_refs; /* holders besides the first (pql_rules_retain); 0 from calloc */
    char *version;
    char *signup_event;
    char *conversion_event;
    pql_expr *paid;
    pql_signal *signals;
    size_t nsignals;
    pql_rule *rules;
    size_t nrules;
    char **traits; /* the traits expressions read (slot indexes) */
    size_t ntraits;
    char **decl;          /* the declared traits… */
    pql_vtype *decl_type; /* …and their types */
    size_t ndecl;
    char **props;
    size_t nprops;
    int64_t max_window;
};

/* One YAML file being loaded. */
typedef struct rule_file {
    char *name;
    struct fy_document *doc;
    struct fy_node *root;
} rule_file;

/* The loader: the set being built and where its errors go. */
typedef struct loader {
    pql_rules *r;
    pql_buf *errors;
    int nerrors;
    const rule_file *file; /* the file being compiled */
    struct fy_node *node;  /* the scalar holding the expression being compiled */
} loader;

static char *dup_n(const char *s, size_t n)
{
    char *p = malloc(n + 1);
    if (!p) abort(); /* rule loading is start-up/reload time; no partial recovery */
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

static char *dup_s(const char *s)
{
    return dup_n(s, strlen(s));
}

/* ---- positions and errors ---------------------------------------------- */

/* Finds a position for any node: a scalar's token, else its first child's. */
static int node_mark(struct fy_node *n, int *line, int *col)
{
    if (!n) return -1;
    if (fy_node_is_scalar(n)) {
        struct fy_token *t = fy_node_get_scalar_token(n);
        const struct fy_mark *m = t ? fy_token_start_mark(t) : NULL;
        if (!m) return -1;
        *line = m->line + 1;
        *col = m->column + 1;
        return 0;
    }
    void *it = NULL;
    if (fy_node_is_mapping(n)) {
        struct fy_node_pair *p = fy_node_mapping_iterate(n, &it);
        return p ? node_mark(fy_node_pair_key(p), line, col) : -1;
    }
    struct fy_node *c = fy_node_sequence_iterate(n, &it);
    return node_mark(c, line, col);
}

static void __attribute__((format(printf, 4, 5)))
error_at(loader *l, struct fy_node *n, size_t offset, const char *fmt, ...)
{
    int line = 0, col = 0;
    if (node_mark(n, &line, &col) == 0) {
        /* a quoted scalar's token mark is already past its opening quote */
        pql_buf_printf(l->errors, "%s:%d:%d: error: ", l->file->name, line, col + (int)offset);
    } else {
        pql_buf_printf(l->errors, "%s: error: ", l->file->name);
    }
    va_list ap;
    va_start(ap, fmt);
    char msg[1024];
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    pql_buf_printf(l->errors, "%s\n", msg);
    l->nerrors++;
}

/* Appends " (did you mean 'x'?)" when a candidate is close to `name`. */
static void did_you_mean(char *hint, size_t size, const char *name, size_t len,
                         const char *const *cands, size_t ncands, const char *prefix)
{
    const char *best = NULL;
    int bestd = 3;
    for (size_t i = 0; i < ncands; i++) {
        int d = pql_edit_distance(name, len, cands[i], strlen(cands[i]));
        if (d < bestd) bestd = d, best = cands[i];
    }
    if (best) {
        size_t n = strlen(hint);
        snprintf(hint + n, size - n, " (did you mean '%s%s'?)", prefix, best);
    }
}

static const char *scalar(struct fy_node *n)
{
    return n && fy_node_is_scalar(n) ? fy_node_get_scalar0(n) : NULL;
}

/* ---- name tables ------------------------------------------------------- */

static int intern(char ***tab, size_t *n, const char *s, size_t len)
{
    for (size_t i = 0; i < *n; i++)
        if (strlen((*tab)[i]) == len && memcmp((*tab)[i], s, len) == 0) return (int)i;
    char **t = realloc(*tab, (*n + 1) * sizeof(*t));
    if (!t) abort();
    *tab = t;
    t[*n] = dup_n(s, len);
    return (int)(*n)++;
}

static int find_signal(const pql_rules *r, const char *name, size_t len)
{
    for (size_t i = 0; i < r->nsignals; i++)
        if (strlen(r->signals[i].name) == len && memcmp(r->signals[i].name, name, len) == 0)
            return (int)i;
    return -1;
}

/* ---- resolvers --------------------------------------------------------- */

static int is_ident(const char *s, size_t len)
{
    if (!len) return 0;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
                 (i && c >= '0' && c <= '9');
        if (!ok) return 0;
    }
    return 1;
}

/* account.<trait>, shared by every context.  @returns 1 when `name` is a
 * declared trait, -1 (with a hint) when it is an undeclared one, 0 when it is
 * not account.<something>. */
static int resolve_trait(loader *l, const char *name, size_t len, int *slot, pql_vtype *type,
                         char *hint, size_t hint_size)
{
    if (len <= 8 || memcmp(name, "account.", 8) != 0) return 0;
    const char *t = name + 8;
    size_t tlen = len - 8;
    for (size_t i = 0; i < l->r->ndecl; i++) {
        if (strlen(l->r->decl[i]) == tlen && memcmp(l->r->decl[i], t, tlen) == 0) {
            *slot = PQL_SLOT(PQL_SLOT_TRAIT, intern(&l->r->traits, &l->r->ntraits, t, tlen));
            *type = l->r->decl_type[i];
            return 1;
        }
    }
    snprintf(hint, hint_size, "unknown trait 'account.%.*s'", (int)tlen, t);
    did_you_mean(hint, hint_size, t, tlen, (const char *const *)l->r->decl, l->r->ndecl,
                 "account.");
    size_t n = strlen(hint);
    if (!strstr(hint, "did you mean"))
        snprintf(hint + n, hint_size - n,
                 " — declare the traits rules read under 'traits:' (e.g. traits: { %.*s: number "
                 "})",
                 (int)tlen, t);
    return -1;
}

/* Rule conditions and reasons: signals and traits. */
static int resolve_rule(void *opaque, const char *name, size_t len, int *slot, pql_vtype *type,
                        char *hint, size_t hint_size)
{
    loader *l = opaque;
    int tr = resolve_trait(l, name, len, slot, type, hint, hint_size);
    if (tr) return tr > 0 ? 0 : -1;
    if (len == 12 && memcmp(name, "since_signup", 12) == 0) {
        *slot = PQL_SLOT(PQL_SLOT_BUILTIN, PQL_BUILTIN_SINCE_SIGNUP);
        *type = PQL_V_NUM;
        return 0;
    }
    int i = find_signal(l->r, name, len);
    if (i >= 0) {
        *slot = PQL_SLOT(PQL_SLOT_SIGNAL, i);
        *type = PQL_V_NUM;
        return 0;
    }
    snprintf(hint, hint_size, "unknown signal '%.*s'", (int)len, name);
    const char **cands = malloc((l->r->nsignals + 1) * sizeof(*cands));
    if (!cands) abort();
    for (size_t k = 0; k < l->r->nsignals; k++)
        cands[k] = l->r->signals[k].name;
    did_you_mean(hint, hint_size, name, len, cands, l->r->nsignals, "");
    free(cands);
    if (!strstr(hint, "did you mean")) {
        size_t n = strlen(hint);
        snprintf(hint + n, hint_size - n,
                 " — declare it under 'signals:', or write account.%.*s for a trait", (int)len,
                 name);
    }
    return -1;
}

/* `where` filters: the event's fields, its properties, and traits. */
static int resolve_event(void *opaque, const char *name, size_t len, int *slot, pql_vtype *type,
                         char *hint, size_t hint_size)
{
    loader *l = opaque;
    static const char *const fields[] = {"event", "user_id", "event_id"};
    int tr = resolve_trait(l, name, len, slot, type, hint, hint_size);
    if (tr) return tr > 0 ? 0 : -1;
    for (int f = 0; f < 3; f++) {
        if (strlen(fields[f]) == len && memcmp(fields[f], name, len) == 0) {
            *slot = PQL_SLOT(PQL_SLOT_FIELD, f);
            *type = PQL_V_STR;
            return 0;
        }
    }
    if (len > 11 && memcmp(name, "properties.", 11) == 0) {
        *slot = PQL_SLOT(PQL_SLOT_PROP, intern(&l->r->props, &l->r->nprops, name + 11, len - 11));
        *type = PQL_V_NULL;
        return 0;
    }
    if (find_signal(l->r, name, len) >= 0)
        snprintf(hint, hint_size, "a where filter reads the event, not signals: '%.*s' is a signal",
                 (int)len, name);
    else {
        snprintf(hint, hint_size, "unknown name '%.*s' in a where filter", (int)len, name);
        did_you_mean(hint, hint_size, name, len, fields, 3, "");
        size_t n = strlen(hint);
        if (!strstr(hint, "did you mean"))
            snprintf(hint + n, hint_size - n,
                     " — use event, user_id, event_id, properties.<key> or account.<trait>");
    }
    return -1;
}

/* lifecycle.paid: traits only. */
static int resolve_traits_only(void *opaque, const char *name, size_t len, int *slot,
                               pql_vtype *type, char *hint, size_t hint_size)
{
    loader *l = opaque;
    int tr = resolve_trait(l, name, len, slot, type, hint, hint_size);
    if (tr) return tr > 0 ? 0 : -1;
    snprintf(hint, hint_size, "'%.*s': only account.<trait> can be read here", (int)len, name);
    return -1;
}

static pql_expr *compile_expr(loader *l, struct fy_node *n, pql_expr_resolve_fn fn,
                              const char *what)
{
    const char *src = scalar(n);
    if (!src || !*src) {
        error_at(l, n, 0, "%s must be an expression (a string such as 'invites >= 1')", what);
        return NULL;
    }
    char err[512];
    size_t off = 0;
    pql_expr *e = pql_expr_compile(src, fn, l, &off, err, sizeof(err));
    if (!e) error_at(l, n, off, "in %s: %s", what, err);
    return e;
}

/* ---- signals ----------------------------------------------------------- */

static const struct {
    const char *key;
    pql_agg agg;
} aggs[] = {
    {"count", PQL_AGG_COUNT},       {"sum", PQL_AGG_SUM},
    {"distinct", PQL_AGG_DISTINCT}, {"days_active", PQL_AGG_DAYS_ACTIVE},
    {"max", PQL_AGG_MAX},           {"last", PQL_AGG_LAST},
};
#define NAGGS (sizeof(aggs) / sizeof(aggs[0]))

static uint32_t fnv1a32(const char *s, uint32_t h)
{
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 16777619u;
    return h;
}

static void unknown_key(loader *l, struct fy_node *key, const char *const *known, size_t nknown,
                        const char *where)
{
    char hint[256] = "";
    const char *k = scalar(key);
    did_you_mean(hint, sizeof(hint), k, strlen(k), known, nknown, "");
    error_at(l, key, 0, "unknown key '%s' in %s%s", k, where, hint);
}

static void compile_signal(loader *l, pql_signal *s, struct fy_node *def)
{
    static const char *const known[] = {"count", "sum",   "distinct", "days_active", "max",
                                        "last",  "where", "window",   "of"};
    struct fy_node *aggval = NULL, *where = NULL, *window = NULL, *of = NULL;
    int nagg = 0;
    pql_agg agg = PQL_AGG_COUNT;
    if (!fy_node_is_mapping(def)) {
        error_at(l, def, 0, "signal '%s' must be a mapping such as { count: login, window: 7d }",
                 s->name);
        return;
    }
    void *it = NULL;
    struct fy_node_pair *p;
    while ((p = fy_node_mapping_iterate(def, &it))) {
        struct fy_node *k = fy_node_pair_key(p), *v = fy_node_pair_value(p);
        const char *ks = scalar(k);
        size_t a;
        for (a = 0; a < NAGGS; a++)
            if (ks && strcmp(ks, aggs[a].key) == 0) break;
        if (a < NAGGS) {
            agg = aggs[a].agg;
            aggval = v;
            nagg++;
        } else if (ks && strcmp(ks, "where") == 0)
            where = v;
        else if (ks && strcmp(ks, "window") == 0)
            window = v;
        else if (ks && strcmp(ks, "of") == 0)
            of = v;
        else
            unknown_key(l, k, known, sizeof(known) / sizeof(*known), "a signal");
    }
    if (nagg != 1) {
        error_at(l, def, 0,
                 "signal '%s' needs exactly one of count, sum, distinct, days_active, max, last",
                 s->name);
        return;
    }
    const char *av = scalar(aggval);
    if (!av || !*av) {
        error_at(l, aggval ? aggval : def, 0, "signal '%s': the aggregate needs a value", s->name);
        return;
    }
    /* count/days_active name the event; the others name a field and take `of`. */
    const char *event = "*";
    if (agg == PQL_AGG_COUNT || agg == PQL_AGG_DAYS_ACTIVE) {
        event = av;
        if (of)
            error_at(l, of, 0, "'of' is for sum, distinct, max and last; count names its event");
    } else {
        if (of) {
            event = scalar(of);
            if (!event || !*event) {
                error_at(l, of, 0, "'of' must be an event name or \"*\"");
                event = "*";
            }
        }
        size_t len = strlen(av);
        if (len > 11 && memcmp(av, "properties.", 11) == 0 && is_ident(av + 11, len - 11)) {
            s->source = PQL_SRC_PROPERTY;
            s->source_index = intern(&l->r->props, &l->r->nprops, av + 11, len - 11);
        } else if (agg == PQL_AGG_DISTINCT && strcmp(av, "user_id") == 0) {
            s->source = PQL_SRC_FIELD;
            s->source_index = PQL_FIELD_USER_ID;
        } else if (agg == PQL_AGG_DISTINCT && strcmp(av, "event_id") == 0) {
            s->source = PQL_SRC_FIELD;
            s->source_index = PQL_FIELD_EVENT_ID;
        } else {
            error_at(l, aggval, 0, "signal '%s': cannot aggregate '%s' — use %s", s->name, av,
                     agg == PQL_AGG_DISTINCT ? "user_id, event_id or properties.<key>"
                                             : "properties.<key>");
        }
    }
    s->event = dup_s(event);
    s->event_len = strlen(event);
    s->any_event = strcmp(event, "*") == 0;
    int64_t window_ms = 0;
    const char *ws = scalar(window);
    if (!window) {
        error_at(l, def, 0, "signal '%s' needs a window: a duration (30m, 24h, 7d) or lifetime",
                 s->name);
    } else if (!ws || (strcmp(ws, "lifetime") != 0 &&
                       pql_parse_duration(ws, strlen(ws), &window_ms) < 0)) {
        error_at(l, window, 0, "window '%s' is not a duration (30m, 24h, 7d) or lifetime",
                 ws ? ws : "");
    } else {
        char err[256];
        if (pql_window_spec_init(&s->spec, agg, window_ms, err, sizeof(err)) < 0)
            error_at(l, window, 0, "signal '%s': %s", s->name, err);
        else if (window_ms > l->r->max_window)
            l->r->max_window = window_ms;
    }
    s->spec.agg = agg;
    if (where) s->where = compile_expr(l, where, resolve_event, "where");
    /* The storage key changes whenever the definition does. */
    char defn[1024];
    snprintf(defn, sizeof(defn), "%d|%s|%s|%s|%lld", (int)agg, av, event,
             where && scalar(where) ? scalar(where) : "", (long long)window_ms);
    char key[300];
    snprintf(key, sizeof(key), "%s#%08x", s->name, fnv1a32(defn, 2166136261u));
    s->key = dup_s(key);
}

/* ---- rules ------------------------------------------------------------- */

static void collect_slot(void *opaque, int slot)
{
    pql_rule *rule = opaque;
    int **arr = NULL;
    size_t *n = NULL;
    if (PQL_SLOT_KIND(slot) == PQL_SLOT_SIGNAL)
        arr = &rule->signals, n = &rule->nsignals;
    else if (PQL_SLOT_KIND(slot) == PQL_SLOT_TRAIT)
        arr = &rule->traits, n = &rule->ntraits;
    else if (PQL_SLOT_KIND(slot) == PQL_SLOT_BUILTIN)
        return (void)(rule->reads_clock = 1);
    else
        return;
    int idx = PQL_SLOT_INDEX(slot);
    for (size_t i = 0; i < *n; i++)
        if ((*arr)[i] == idx) return;
    int *a = realloc(*arr, (*n + 1) * sizeof(int));
    if (!a) abort();
    a[(*n)++] = idx;
    *arr = a;
}

static int64_t duration_of(loader *l, struct fy_node *n, const char *what)
{
    const char *s = scalar(n);
    int64_t ms = 0;
    if (!s || pql_parse_duration(s, strlen(s), &ms) < 0) {
        error_at(l, n, 0, "%s '%s' is not a duration (30m, 24h, 7d, 2w)", what, s ? s : "");
        return 0;
    }
    return ms;
}

static int number_of(loader *l, struct fy_node *n, const char *what, double *out)
{
    const char *s = scalar(n);
    char *end = NULL;
    double d = s ? strtod(s, &end) : 0;
    if (!s || !*s || *end || !isfinite(d)) {
        error_at(l, n, 0, "%s '%s' must be a number", what, s ? s : "");
        return -1;
    }
    *out = d;
    return 0;
}

static char **grow_strs(char **a, size_t n)
{
    a = realloc(a, (n + 1) * sizeof(*a));
    if (!a) abort();
    return a;
}

/* points: [ { when: EXPR, points: N }, … ] */
static void compile_points(loader *l, pql_rule *rule, struct fy_node *list)
{
    if (!fy_node_is_sequence(list)) {
        error_at(l, list, 0, "points must be a list of { when: CONDITION, points: N }");
        return;
    }
    void *it = NULL;
    struct fy_node *item;
    while ((item = fy_node_sequence_iterate(list, &it))) {
        struct fy_node *w =
            fy_node_is_mapping(item) ? fy_node_mapping_lookup_by_string(item, "when", FY_NT) : NULL;
        struct fy_node *pts = fy_node_is_mapping(item)
                                  ? fy_node_mapping_lookup_by_string(item, "points", FY_NT)
                                  : NULL;
        if (!w || !pts || fy_node_mapping_item_count(item) != 2) {
            error_at(l, item, 0, "each entry of points is { when: CONDITION, points: N }");
            continue;
        }
        double v;
        pql_expr *e = compile_expr(l, w, resolve_rule, "points when");
        if (number_of(l, pts, "points", &v) < 0 || !e) {
            pql_expr_destroy(e);
            continue;
        }
        size_t n = rule->npoints;
        rule->point_when = (pql_expr **)grow_strs((char **)rule->point_when, n);
        rule->point_src = grow_strs(rule->point_src, n);
        rule->points = realloc(rule->points, (n + 1) * sizeof(double));
        if (!rule->points) abort();
        rule->point_when[n] = e;
        rule->point_src[n] = dup_s(scalar(w));
        rule->points[n] = v;
        rule->npoints++;
    }
}

/* weights: { EXPR: W, … } — each key is an expression over signals and traits */
static void compile_weights(loader *l, pql_rule *rule, struct fy_node *map)
{
    if (!fy_node_is_mapping(map)) {
        error_at(l, map, 0, "weights must be a mapping of signal (or expression): weight");
        return;
    }
    void *it = NULL;
    struct fy_node_pair *p;
    while ((p = fy_node_mapping_iterate(map, &it))) {
        struct fy_node *k = fy_node_pair_key(p);
        double w;
        pql_expr *e = compile_expr(l, k, resolve_rule, "weights");
        if (number_of(l, fy_node_pair_value(p), "weight", &w) < 0 || !e) {
            pql_expr_destroy(e);
            continue;
        }
        size_t n = rule->nterms;
        rule->terms = (pql_expr **)grow_strs((char **)rule->terms, n);
        rule->term_src = grow_strs(rule->term_src, n);
        rule->weights = realloc(rule->weights, (n + 1) * sizeof(double));
        if (!rule->weights) abort();
        rule->terms[n] = e;
        rule->term_src[n] = dup_s(scalar(k));
        rule->weights[n] = w;
        rule->nterms++;
    }
}

static const char *const tier_keys[PQL_NTIERS] = {"high", "medium", "low"};

static int tier_of(const char *key)
{
    for (int t = 0; t < PQL_NTIERS; t++)
        if (key && !strcmp(key, tier_keys[t])) return t;
    return -1;
}

/* tiers: { high: N, medium: N, low: N } — at least one, strictly decreasing */
static void compile_tiers(loader *l, pql_rule *rule, struct fy_node *map)
{
    if (!fy_node_is_mapping(map)) {
        error_at(l, map, 0, "tiers must be a mapping such as { high: 90, medium: 70 }");
        return;
    }
    void *it = NULL;
    struct fy_node_pair *p;
    while ((p = fy_node_mapping_iterate(map, &it))) {
        int t = tier_of(scalar(fy_node_pair_key(p)));
        if (t < 0) {
            unknown_key(l, fy_node_pair_key(p), tier_keys, PQL_NTIERS, "tiers");
            continue;
        }
        number_of(l, fy_node_pair_value(p), "tier", &rule->tier_min[t]);
    }
    double above = INFINITY;
    for (int t = 0; t < PQL_NTIERS; t++) {
        if (isnan(rule->tier_min[t])) continue;
        if (rule->tier_min[t] >= above)
            error_at(l, map, 0,
                     "tiers must decrease from high to low: %s (%g) is not below the "
                     "tier above it (%g)",
                     tier_keys[t], rule->tier_min[t], above);
        above = rule->tier_min[t];
    }
}

/* sla: { high: 4h, medium: 24h } — only for tiers the rule has */
static void compile_sla(loader *l, pql_rule *rule, struct fy_node *map)
{
    if (!fy_node_is_mapping(map)) {
        error_at(l, map, 0, "sla must be a mapping such as { high: 4h, medium: 24h }");
        return;
    }
    void *it = NULL;
    struct fy_node_pair *p;
    while ((p = fy_node_mapping_iterate(map, &it))) {
        struct fy_node *k = fy_node_pair_key(p);
        int t = tier_of(scalar(k));
        if (t < 0)
            unknown_key(l, k, tier_keys, PQL_NTIERS, "sla");
        else if (isnan(rule->tier_min[t]))
            error_at(l, k, 0, "sla for tier '%s', which the rule's tiers do not define",
                     tier_keys[t]);
        else
            rule->sla_ms[t] = duration_of(l, fy_node_pair_value(p), "sla");
    }
}

static int has_tiers(const pql_rule *rule)
{
    for (int t = 0; t < PQL_NTIERS; t++)
        if (!isnan(rule->tier_min[t])) return 1;
    return 0;
}

/* What each model requires and refuses, checked once every key is read. */
static void check_model(loader *l, pql_rule *rule, struct fy_node *def, struct fy_node *const *keys)
{
    enum { K_WHEN, K_POINTS, K_WEIGHTS, K_INTERCEPT, K_THRESHOLD, K_TIERS };
    static const char *const names[] = {"when",      "points",    "weights",
                                        "intercept", "threshold", "tiers"};
    static const char allowed[3][6] = {
        /* threshold */ {1, 0, 0, 0, 0, 0},
        /* weighted  */ {0, 1, 0, 0, 0, 1},
        /* logistic  */ {0, 0, 1, 1, 1, 1},
    };
    for (int k = 0; k <= K_TIERS; k++)
        if (keys[k] && !allowed[rule->model][k])
            error_at(l, keys[k], 0, "'%s' is not part of a %s rule", names[k],
                     pql_model_name(rule->model));
    if (rule->model == PQL_MODEL_THRESHOLD && !keys[K_WHEN])
        error_at(l, def, 0, "rule '%s' needs a 'when' condition", rule->name);
    if (rule->model == PQL_MODEL_WEIGHTED) {
        if (!keys[K_POINTS]) error_at(l, def, 0, "weighted rule '%s' needs points", rule->name);
        if (!has_tiers(rule))
            error_at(l, def, 0,
                     "weighted rule '%s' needs tiers (e.g. { high: 90, medium: 70 }): "
                     "below the lowest tier it does not fire",
                     rule->name);
        double most = 0;
        for (size_t i = 0; i < rule->npoints; i++)
            if (rule->points[i] > 0) most += rule->points[i];
        for (int t = 0; t < PQL_NTIERS && keys[K_TIERS]; t++)
            if (!isnan(rule->tier_min[t]) && rule->tier_min[t] > most)
                error_at(l, keys[K_TIERS], 0,
                         "tier %s (%g) is unreachable: the points add up to "
                         "at most %g",
                         tier_keys[t], rule->tier_min[t], most);
    }
    if (rule->model == PQL_MODEL_LOGISTIC) {
        if (!keys[K_WEIGHTS]) error_at(l, def, 0, "logistic rule '%s' needs weights", rule->name);
        if (!keys[K_THRESHOLD])
            error_at(l, def, 0, "logistic rule '%s' needs a threshold (a probability, e.g. 0.6)",
                     rule->name);
        else if (!(rule->threshold > 0 && rule->threshold < 1))
            error_at(l, keys[K_THRESHOLD], 0, "threshold %g must be a probability between 0 and 1",
                     rule->threshold);
        for (int t = 0; t < PQL_NTIERS; t++)
            if (!isnan(rule->tier_min[t]) && !(rule->tier_min[t] > 0 && rule->tier_min[t] < 1))
                error_at(l, keys[K_TIERS], 0,
                         "tier %s (%g) of a logistic rule must be a "
                         "probability between 0 and 1",
                         tier_keys[t], rule->tier_min[t]);
    }
}

/* held_for longer than the window of a signal the condition reads cannot be
 * what the author means: the condition would have to hold for longer than
 * the signal remembers. */
typedef struct held_check {
    loader *l;
    const pql_rule *rule;
    struct fy_node *node;
} held_check;

static void check_held_for(void *opaque, int slot)
{
    held_check *hc = opaque;
    if (PQL_SLOT_KIND(slot) != PQL_SLOT_SIGNAL) return;
    const pql_signal *s = &hc->l->r->signals[PQL_SLOT_INDEX(slot)];
    if (!s->key || s->spec.window_ms == 0 || s->spec.window_ms >= hc->rule->held_for_ms) return;
    char window[64];
    pql_format_number(window, sizeof window, (double)s->spec.window_ms, PQL_FMT_DURATION);
    error_at(hc->l, hc->node, 0,
             "held_for %s is longer than the window (%s) of signal '%s' that the rule reads: "
             "lengthen the window or shorten held_for",
             scalar(hc->node), window, s->name);
}

static void compile_rule(loader *l, pql_rule *rule, struct fy_node *def, pql_alert_kind kind)
{
    static const char *const known[] = {"name",      "model",       "when",     "clear",
                                        "fit",       "applies_to",  "cooldown", "held_for",
                                        "reasons",   "description", "points",   "weights",
                                        "intercept", "threshold",   "tiers",    "sla"};
    rule->kind = kind;
    rule->applies_to = kind == PQL_ALERT_PQL ? PQL_APPLIES_FREE : PQL_APPLIES_PAID;
    for (int t = 0; t < PQL_NTIERS; t++)
        rule->tier_min[t] = NAN;
    /* when, points, weights, intercept, threshold, tiers (see check_model) */
    struct fy_node *keys[6] = {0}, *reasons = NULL, *sla = NULL, *held_for = NULL;
    void *it = NULL;
    struct fy_node_pair *p;
    while ((p = fy_node_mapping_iterate(def, &it))) {
        struct fy_node *k = fy_node_pair_key(p), *v = fy_node_pair_value(p);
        const char *ks = scalar(k);
        if (!ks) continue;
        if (!strcmp(ks, "name") || !strcmp(ks, "description")) {
            continue; /* name read by the caller */
        } else if (!strcmp(ks, "model")) {
            const char *m = scalar(v);
            if (m && !strcmp(m, "threshold"))
                rule->model = PQL_MODEL_THRESHOLD;
            else if (m && !strcmp(m, "weighted"))
                rule->model = PQL_MODEL_WEIGHTED;
            else if (m && !strcmp(m, "logistic"))
                rule->model = PQL_MODEL_LOGISTIC;
            else
                error_at(l, v, 0, "unknown model '%s': use threshold, weighted or logistic",
                         m ? m : "");
        } else if (!strcmp(ks, "when")) {
            keys[0] = k;
            rule->when = compile_expr(l, v, resolve_rule, "when");
            if (scalar(v)) rule->when_src = dup_s(scalar(v));
        } else if (!strcmp(ks, "points")) {
            keys[1] = k;
            compile_points(l, rule, v);
        } else if (!strcmp(ks, "weights")) {
            keys[2] = k;
            compile_weights(l, rule, v);
        } else if (!strcmp(ks, "intercept")) {
            keys[3] = k;
            number_of(l, v, "intercept", &rule->intercept);
        } else if (!strcmp(ks, "threshold")) {
            keys[4] = k;
            number_of(l, v, "threshold", &rule->threshold);
        } else if (!strcmp(ks, "tiers")) {
            keys[5] = k;
            compile_tiers(l, rule, v);
        } else if (!strcmp(ks, "sla")) {
            sla = v;
        } else if (!strcmp(ks, "clear")) {
            rule->clear = compile_expr(l, v, resolve_rule, "clear");
        } else if (!strcmp(ks, "fit")) {
            rule->fit = compile_expr(l, v, resolve_traits_only, "fit");
        } else if (!strcmp(ks, "applies_to")) {
            const char *a = scalar(v);
            if (a && !strcmp(a, "free"))
                rule->applies_to = PQL_APPLIES_FREE;
            else if (a && !strcmp(a, "paid"))
                rule->applies_to = PQL_APPLIES_PAID;
            else if (a && !strcmp(a, "all"))
                rule->applies_to = PQL_APPLIES_ALL;
            else
                error_at(l, v, 0, "applies_to '%s' must be free, paid or all", a ? a : "");
        } else if (!strcmp(ks, "cooldown")) {
            rule->cooldown_ms = duration_of(l, v, "cooldown");
        } else if (!strcmp(ks, "held_for")) {
            rule->held_for_ms = duration_of(l, v, "held_for");
            held_for = v;
        } else if (!strcmp(ks, "reasons")) {
            reasons = v;
        } else {
            unknown_key(l, k, known, sizeof(known) / sizeof(*known), "a rule");
        }
    }
    if (sla) compile_sla(l, rule, sla); /* after tiers, whatever the key order */
    check_model(l, rule, def, keys);
    if (held_for && rule->held_for_ms > 0) {
        held_check hc = {l, rule, held_for};
        if (rule->when) pql_expr_foreach_slot(rule->when, check_held_for, &hc);
        for (size_t i = 0; i < rule->npoints; i++)
            pql_expr_foreach_slot(rule->point_when[i], check_held_for, &hc);
        for (size_t i = 0; i < rule->nterms; i++)
            pql_expr_foreach_slot(rule->terms[i], check_held_for, &hc);
    }
    if (reasons && !fy_node_is_sequence(reasons)) {
        error_at(l, reasons, 0, "reasons must be a list of strings");
    } else if (reasons) {
        int n = fy_node_sequence_item_count(reasons);
        rule->reasons = calloc((size_t)n + 1, sizeof(*rule->reasons));
        if (!rule->reasons) abort();
        it = NULL;
        struct fy_node *item;
        while ((item = fy_node_sequence_iterate(reasons, &it))) {
            const char *src = scalar(item);
            char err[512];
            size_t off = 0;
            pql_template *t =
                src ? pql_template_compile(src, resolve_rule, l, &off, err, sizeof(err)) : NULL;
            if (!src)
                error_at(l, item, 0, "a reason must be a string");
            else if (!t)
                error_at(l, item, off, "in reason: %s", err);
            else
                rule->reasons[rule->nreasons++] = t;
        }
    }
    /* Every signal and trait the rule reads: the alert's signals map. */
    if (rule->when) pql_expr_foreach_slot(rule->when, collect_slot, rule);
    for (size_t i = 0; i < rule->npoints; i++)
        pql_expr_foreach_slot(rule->point_when[i], collect_slot, rule);
    for (size_t i = 0; i < rule->nterms; i++)
        pql_expr_foreach_slot(rule->terms[i], collect_slot, rule);
    if (rule->clear) pql_expr_foreach_slot(rule->clear, collect_slot, rule);
    for (size_t i = 0; i < rule->nreasons; i++)
        pql_template_foreach_slot(rule->reasons[i], collect_slot, rule);
}

/* ---- files ------------------------------------------------------------- */

/* traits: { seats: number, plan: string, trial: bool } */
static void declare_traits(loader *l, struct fy_node *map)
{
    static const char *const types[] = {"number", "string", "bool"};
    static const pql_vtype vtypes[] = {PQL_V_NUM, PQL_V_STR, PQL_V_BOOL};
    if (!fy_node_is_mapping(map)) {
        error_at(l, map, 0,
                 "traits must be a mapping of trait: type, e.g. { seats: number, plan: string }");
        return;
    }
    void *it = NULL;
    struct fy_node_pair *q;
    while ((q = fy_node_mapping_iterate(map, &it))) {
        struct fy_node *k = fy_node_pair_key(q), *v = fy_node_pair_value(q);
        const char *name = scalar(k), *ts = scalar(v);
        if (!name || !*name) {
            error_at(l, k, 0, "a trait name must be a string");
            continue;
        }
        int t = -1;
        for (int i = 0; ts && i < 3; i++)
            if (!strcmp(ts, types[i])) t = i;
        if (ts && !strcmp(ts, "boolean")) t = 2;
        if (t < 0) {
            char hint[128] = "";
            if (ts) did_you_mean(hint, sizeof hint, ts, strlen(ts), types, 3, "");
            error_at(l, v, 0, "trait '%s' has type '%s': use number, string or bool%s", name,
                     ts ? ts : "", hint);
            continue;
        }
        size_t i;
        for (i = 0; i < l->r->ndecl && strcmp(l->r->decl[i], name); i++)
            ;
        if (i < l->r->ndecl) {
            if (l->r->decl_type[i] != vtypes[t])
                error_at(l, k, 0, "trait '%s' is declared twice with different types", name);
            continue;
        }
        l->r->decl = grow_strs(l->r->decl, l->r->ndecl);
        pql_vtype *nt = realloc(l->r->decl_type, (l->r->ndecl + 1) * sizeof(*nt));
        if (!nt) abort();
        l->r->decl_type = nt;
        l->r->decl[l->r->ndecl] = dup_s(name);
        l->r->decl_type[l->r->ndecl++] = vtypes[t];
    }
}

static void declare(loader *l, const rule_file *f, int *have_lifecycle)
{
    static const char *const known[] = {"version", "lifecycle", "traits",     "signals",
                                        "pql",     "expansion", "description"};
    l->file = f;
    if (!f->root || !fy_node_is_mapping(f->root)) {
        error_at(l, f->root, 0, "a rule file is a mapping with version, signals, pql, expansion");
        return;
    }
    void *it = NULL;
    struct fy_node_pair *p;
    while ((p = fy_node_mapping_iterate(f->root, &it))) {
        struct fy_node *k = fy_node_pair_key(p), *v = fy_node_pair_value(p);
        const char *ks = scalar(k);
        if (!ks) continue;
        if (!strcmp(ks, "version")) {
            const char *vs = scalar(v);
            if (!vs || !*vs) {
                error_at(l, v, 0, "version must be a number or a string");
                continue;
            }
            if (!l->r->version)
                l->r->version = dup_s(vs);
            else {
                char *nv = malloc(strlen(l->r->version) + strlen(vs) + 2);
                if (!nv) abort();
                sprintf(nv, "%s+%s", l->r->version, vs);
                free(l->r->version);
                l->r->version = nv;
            }
        } else if (!strcmp(ks, "lifecycle")) {
            if ((*have_lifecycle)++) {
                error_at(l, k, 0, "lifecycle is declared in more than one file of the rule set");
                continue;
            }
            if (!fy_node_is_mapping(v)) {
                error_at(l, v, 0,
                         "lifecycle must be a mapping { signup: EVENT, conversion: EVENT }");
                continue;
            }
            void *it2 = NULL;
            struct fy_node_pair *q;
            while ((q = fy_node_mapping_iterate(v, &it2))) {
                const char *lk = scalar(fy_node_pair_key(q));
                struct fy_node *lv = fy_node_pair_value(q);
                if (lk && !strcmp(lk, "signup") && scalar(lv))
                    l->r->signup_event = dup_s(scalar(lv));
                else if (lk && !strcmp(lk, "conversion") && scalar(lv))
                    l->r->conversion_event = dup_s(scalar(lv));
                else if (lk && !strcmp(lk, "paid"))
                    ; /* compiled in pass 2: it reads traits */
                else {
                    static const char *const lkn[] = {"signup", "conversion", "paid"};
                    unknown_key(l, fy_node_pair_key(q), lkn, 3, "lifecycle");
                }
            }
        } else if (!strcmp(ks, "traits")) {
            declare_traits(l, v);
        } else if (!strcmp(ks, "signals")) {
            if (!fy_node_is_mapping(v)) {
                error_at(l, v, 0, "signals must be a mapping of name: definition");
                continue;
            }
            void *it2 = NULL;
            struct fy_node_pair *q;
            while ((q = fy_node_mapping_iterate(v, &it2))) {
                struct fy_node *nk = fy_node_pair_key(q);
                const char *name = scalar(nk);
                if (!name || !is_ident(name, strlen(name))) {
                    error_at(l, nk, 0,
                             "signal name '%s' must be letters, digits and _ (not starting with a "
                             "digit)",
                             name ? name : "");
                    continue;
                }
                if (find_signal(l->r, name, strlen(name)) >= 0) {
                    error_at(l, nk, 0, "signal '%s' is declared twice", name);
                    continue;
                }
                pql_signal *s = realloc(l->r->signals, (l->r->nsignals + 1) * sizeof(*s));
                if (!s) abort();
                l->r->signals = s;
                memset(&s[l->r->nsignals], 0, sizeof(*s));
                s[l->r->nsignals++].name = dup_s(name);
            }
        } else if (!strcmp(ks, "pql") || !strcmp(ks, "expansion")) {
            if (!fy_node_is_sequence(v)) error_at(l, v, 0, "%s must be a list of rules", ks);
        } else {
            unknown_key(l, k, known, sizeof(known) / sizeof(*known), "a rule file");
        }
    }
}

/* Pass 2: lifecycle.paid and every signal of a file. */
static void compile_signals_of(loader *l, const rule_file *f)
{
    l->file = f;
    if (!f->root || !fy_node_is_mapping(f->root)) return;
    struct fy_node *lc = fy_node_mapping_lookup_by_string(f->root, "lifecycle", FY_NT);
    struct fy_node *paid =
        lc && fy_node_is_mapping(lc) ? fy_node_mapping_lookup_by_string(lc, "paid", FY_NT) : NULL;
    if (paid) l->r->paid = compile_expr(l, paid, resolve_traits_only, "lifecycle.paid");

    struct fy_node *sigs = fy_node_mapping_lookup_by_string(f->root, "signals", FY_NT);
    if (sigs && fy_node_is_mapping(sigs)) {
        void *it = NULL;
        struct fy_node_pair *q;
        while ((q = fy_node_mapping_iterate(sigs, &it))) {
            const char *name = scalar(fy_node_pair_key(q));
            int i = name ? find_signal(l->r, name, strlen(name)) : -1;
            if (i >= 0 && !l->r->signals[i].key)
                compile_signal(l, &l->r->signals[i], fy_node_pair_value(q));
        }
    }
}

/* Pass 3 (after every file's signals): the rules. */
static void compile_rules_of(loader *l, const rule_file *f)
{
    l->file = f;
    if (!f->root || !fy_node_is_mapping(f->root)) return;
    static const char *const sections[] = {"pql", "expansion"};
    for (int sec = 0; sec < 2; sec++) {
        struct fy_node *list = fy_node_mapping_lookup_by_string(f->root, sections[sec], FY_NT);
        if (!list || !fy_node_is_sequence(list)) continue;
        void *it = NULL;
        struct fy_node *def;
        while ((def = fy_node_sequence_iterate(list, &it))) {
            if (!fy_node_is_mapping(def)) {
                error_at(l, def, 0, "a rule must be a mapping with name and when");
                continue;
            }
            struct fy_node *nn = fy_node_mapping_lookup_by_string(def, "name", FY_NT);
            const char *name = scalar(nn);
            if (!name || !*name) {
                error_at(l, def, 0, "every rule needs a name");
                continue;
            }
            if (pql_rules_rule_by_name(l->r, name, strlen(name)) >= 0) {
                error_at(l, nn, 0, "rule '%s' is declared twice", name);
                continue;
            }
            pql_rule *r = realloc(l->r->rules, (l->r->nrules + 1) * sizeof(*r));
            if (!r) abort();
            l->r->rules = r;
            memset(&r[l->r->nrules], 0, sizeof(*r));
            r[l->r->nrules].name = dup_s(name);
            compile_rule(l, &r[l->r->nrules++], def, sec ? PQL_ALERT_EXPANSION : PQL_ALERT_PQL);
        }
    }
}

static int parse_file(rule_file *f, const char *name, const char *text, pql_buf *errors)
{
    struct fy_diag_cfg dcfg;
    fy_diag_cfg_default(&dcfg);
    dcfg.fp = NULL;
    dcfg.colorize = false;
    struct fy_diag *diag = fy_diag_create(&dcfg);
    if (diag) fy_diag_set_collect_errors(diag, true);
    struct fy_parse_cfg cfg = {.flags = FYPCF_QUIET, .diag = diag};
    f->name = dup_s(name);
    f->doc = text ? fy_document_build_from_string(&cfg, text, FY_NT)
                  : fy_document_build_from_file(&cfg, name);
    int rc = 0;
    if (!f->doc) {
        void *it = NULL;
        struct fy_diag_error *e;
        int n = 0;
        while (diag && (e = fy_diag_errors_iterate(diag, &it))) {
            pql_buf_printf(errors, "%s:%d:%d: error: %s\n", name, e->line + 1, e->column + 1,
                           e->msg);
            n++;
        }
        if (!n) pql_buf_printf(errors, "%s: error: cannot read or parse this YAML file\n", name);
        rc = -1;
    } else {
        f->root = fy_document_root(f->doc);
    }
    fy_diag_destroy(diag);
    return rc;
}

static pql_rules *load_files(rule_file *files, size_t nfiles, pql_buf *errors)
{
    pql_rules *r = calloc(1, sizeof(*r));
    if (!r) abort();
    loader l = {.r = r, .errors = errors};
    int have_lifecycle = 0;
    for (size_t i = 0; i < nfiles; i++)
        declare(&l, &files[i], &have_lifecycle);
    for (size_t i = 0; i < nfiles; i++)
        compile_signals_of(&l, &files[i]);
    for (size_t i = 0; i < nfiles; i++)
        compile_rules_of(&l, &files[i]);
    if (!r->version) r->version = dup_s("0");
    if (l.nerrors) {
        pql_rules_destroy(r);
        return NULL;
    }
    return r;
}

static void free_files(rule_file *files, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(files[i].name);
        fy_document_destroy(files[i].doc);
    }
    free(files);
}

static int yaml_name(const char *n)
{
    size_t len = strlen(n);
    return n[0] != '.' && ((len > 5 && !strcmp(n + len - 5, ".yaml")) ||
                           (len > 4 && !strcmp(n + len - 4, ".yml")));
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

pql_rules *pql_rules_load(const char *path, pql_buf *errors)
{
    struct stat st;
    char **names = NULL;
    size_t n = 0;
    if (stat(path, &st) < 0) {
        pql_buf_printf(
            errors, "%s: error: no such rule file or directory (set PQLSTREAM_RULES or --rules)\n",
            path);
        return NULL;
    }
    if (S_ISDIR(st.st_mode)) {
        DIR *d = opendir(path);
        struct dirent *de;
        while (d && (de = readdir(d))) {
            if (!yaml_name(de->d_name)) continue;
            char **nn = realloc(names, (n + 1) * sizeof(*nn));
            if (!nn) abort();
            names = nn;
            names[n] = malloc(strlen(path) + strlen(de->d_name) + 2);
            if (!names[n]) abort();
            sprintf(names[n++], "%s/%s", path, de->d_name);
        }
        if (d) closedir(d);
        if (!n) {
            pql_buf_printf(errors, "%s: error: no .yaml rule files in this directory\n", path);
            return NULL;
        }
        qsort(names, n, sizeof(*names), cmp_str);
    } else {
        names = malloc(sizeof(*names));
        if (!names) abort();
        names[n++] = dup_s(path);
    }
    rule_file *files = calloc(n, sizeof(*files));
    if (!files) abort();
    int bad = 0;
    for (size_t i = 0; i < n; i++)
        bad |= parse_file(&files[i], names[i], NULL, errors) < 0;
    pql_rules *r = bad ? NULL : load_files(files, n, errors);
    free_files(files, n);
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
    return r;
}

static uint64_t fingerprint_add(uint64_t h, const char *name, const struct stat *st)
{
    uint64_t parts[3] = {(uint64_t)st->st_mtim.tv_sec, (uint64_t)st->st_mtim.tv_nsec,
                         (uint64_t)st->st_size};
    for (const char *c = name; *c; c++)
        h = (h ^ (unsigned char)*c) * 1099511628211ull;
    for (int i = 0; i < 3; i++)
        h = (h ^ parts[i]) * 1099511628211ull;
    return h;
}

uint64_t pql_rules_fingerprint(const char *path)
{
    struct stat st;
    uint64_t h = 14695981039346656037ull;
    if (stat(path, &st) < 0) return 0;
    if (!S_ISDIR(st.st_mode)) return fingerprint_add(h, path, &st);
    DIR *d = opendir(path);
    struct dirent *de;
    uint64_t sum = 0; /* order-independent: readdir order is arbitrary */
    char full[4096];
    while (d && (de = readdir(d))) {
        if (!yaml_name(de->d_name)) continue;
        snprintf(full, sizeof(full), "%s/%s", path, de->d_name);
        if (stat(full, &st) == 0) sum += fingerprint_add(h, de->d_name, &st);
    }
    if (d) closedir(d);
    return sum ? sum : 1;
}

pql_rules *pql_rules_load_string(const char *yaml, const char *name, pql_buf *errors)
{
    rule_file *f = calloc(1, sizeof(*f));
    if (!f) abort();
    pql_rules *r = parse_file(f, name, yaml, errors) < 0 ? NULL : load_files(f, 1, errors);
    free_files(f, 1);
    return r;
}

pql_rules *pql_rules_retain(pql_rules *r)
{
    if (r) atomic_fetch_add(&r->extra_refs, 1);
    return r;
}

void pql_rules_destroy(pql_rules *r)
{
    if (!r) return;
    if (atomic_fetch_sub(&r->extra_refs, 1) > 0) return; /* another holder remains */
    for (size_t i = 0; i < r->nsignals; i++) {
        free(r->signals[i].name);
        free(r->signals[i].key);
        free(r->signals[i].event);
        pql_expr_destroy(r->signals[i].where);
    }
    for (size_t i = 0; i < r->nrules; i++) {
        pql_rule *u = &r->rules[i];
        free(u->name);
        pql_expr_destroy(u->when);
        free(u->when_src);
        for (size_t k = 0; k < u->npoints; k++) {
            pql_expr_destroy(u->point_when[k]);
            free(u->point_src[k]);
        }
        free(u->point_when);
        free(u->point_src);
        free(u->points);
        for (size_t k = 0; k < u->nterms; k++) {
            pql_expr_destroy(u->terms[k]);
            free(u->term_src[k]);
        }
        free(u->terms);
        free(u->term_src);
        free(u->weights);
        pql_expr_destroy(u->clear);
        pql_expr_destroy(u->fit);
        for (size_t k = 0; k < u->nreasons; k++)
            pql_template_destroy(u->reasons[k]);
        free(u->reasons);
        free(u->signals);
        free(u->traits);
    }
    for (size_t i = 0; i < r->ntraits; i++)
        free(r->traits[i]);
    for (size_t i = 0; i < r->ndecl; i++)
        free(r->decl[i]);
    free(r->decl);
    free(r->decl_type);
    for (size_t i = 0; i < r->nprops; i++)
        free(r->props[i]);
    free(r->traits);
    free(r->props);
    free(r->signals);
    free(r->rules);
    free(r->version);
    free(r->signup_event);
    free(r->conversion_event);
    pql_expr_destroy(r->paid);
    free(r);
}

/* ---- accessors --------------------------------------------------------- */

const char *pql_rules_version(const pql_rules *r)
{
    return r->version;
}
size_t pql_rules_nsignals(const pql_rules *r)
{
    return r->nsignals;
}
const pql_signal *pql_rules_signal(const pql_rules *r, size_t i)
{
    return &r->signals[i];
}
size_t pql_rules_nrules(const pql_rules *r)
{
    return r->nrules;
}
const pql_rule *pql_rules_rule(const pql_rules *r, size_t i)
{
    return &r->rules[i];
}
size_t pql_rules_ntraits(const pql_rules *r)
{
    return r->ntraits;
}
const char *pql_rules_trait(const pql_rules *r, size_t i)
{
    return r->traits[i];
}
size_t pql_rules_nprops(const pql_rules *r)
{
    return r->nprops;
}
const char *pql_rules_prop(const pql_rules *r, size_t i)
{
    return r->props[i];
}
const char *pql_rules_signup_event(const pql_rules *r)
{
    return r->signup_event;
}
const char *pql_rules_conversion_event(const pql_rules *r)
{
    return r->conversion_event;
}
const pql_expr *pql_rules_paid_expr(const pql_rules *r)
{
    return r->paid;
}
int64_t pql_rules_max_window(const pql_rules *r)
{
    return r->max_window;
}

const char *pql_model_name(pql_model m)
{
    return m == PQL_MODEL_WEIGHTED   ? "weighted"
           : m == PQL_MODEL_LOGISTIC ? "logistic"
                                     : "threshold";
}

const char *pql_tier_name(int tier)
{
    static const char *const names[PQL_NTIERS] = {"HIGH", "MEDIUM", "LOW"};
    return tier >= 0 && tier < PQL_NTIERS ? names[tier] : NULL;
}

int pql_rules_signal_by_key(const pql_rules *r, const char *key, size_t len)
{
    for (size_t i = 0; i < r->nsignals; i++)
        if (strlen(r->signals[i].key) == len && memcmp(r->signals[i].key, key, len) == 0)
            return (int)i;
    return -1;
}

int pql_rules_rule_by_name(const pql_rules *r, const char *name, size_t len)
{
    for (size_t i = 0; i < r->nrules; i++)
        if (strlen(r->rules[i].name) == len && memcmp(r->rules[i].name, name, len) == 0)
            return (int)i;
    return -1;
}

int pql_rules_trait_index(const pql_rules *r, const char *name, size_t len)
{
    for (size_t i = 0; i < r->ntraits; i++)
        if (strlen(r->traits[i]) == len && memcmp(r->traits[i], name, len) == 0) return (int)i;
    return -1;
}
