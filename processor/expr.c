/* expr.c — the rule expression language (see expr.h): a hand-written tokenizer,
 * a recursive-descent parser that resolves names to slots and checks static
 * types at compile time, an evaluator that never fails and never allocates,
 * and reason templates built on top.
 *
 * Choices where expr.h leaves room:
 *  - `not null` is true: null counts as false in a boolean position.
 *  - A number literal that does not fit a double (1e400) is a compile error.
 *  - An operand statically known to be a string or a boolean is a type error
 *    in arithmetic and as a function argument; at run time any non-number
 *    operand gives null (min/max skip it).
 *  - Comparing operands of two different known types is a type error, and so
 *    is ordering booleans (< <= > >=); at run time both are false.
 *  - Comparisons do not chain: `a < b < c` is a compile error.
 *  - min/max return the chosen argument unchanged (a pct() argument keeps its
 *    percent format); every other arithmetic result prints plain.
 *  - A lookup value that is NaN or ±inf counts as null.
 *  - In a template a lone '}' is a compile error (write "}}").
 *  - More than MAX_DEPTH levels of nesting or MAX_NODES nodes is a compile
 *    error, which bounds the recursion of both parser and evaluator. */
#include "expr.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 100
#define MAX_NODES 4096

/* Levels of the binary operators, lowest precedence first. */
enum { LVL_OR, LVL_AND, LVL_CMP, LVL_ADD, LVL_MUL };

/* Token kinds; operator tokens double as the kinds of the nodes they build. */
/* clang-format off */
typedef enum kind {
    K_END, K_NUM, K_STR, K_NAME, K_LPAREN, K_RPAREN, K_COMMA,
    K_ADD, K_SUB, K_MUL, K_DIV, K_EQ, K_NE, K_LT, K_LE, K_GT, K_GE,
    K_AND, K_OR, K_NOT, K_TRUE, K_FALSE, K_NULL,
    K_BOOL, K_REF, K_NEG, K_CALL, /* nodes only */
} kind;
/* clang-format on */

static const struct {
    const char *text;
    kind kind;
} operators[] = {
    /* two-character ones first */
    {"==", K_EQ},    {"!=", K_NE},     {"<=", K_LE},       {">=", K_GE},     {"<", K_LT},
    {">", K_GT},     {"+", K_ADD},     {"-", K_SUB},       {"*", K_MUL},     {"/", K_DIV},
    {"(", K_LPAREN}, {")", K_RPAREN},  {",", K_COMMA},     {"and", K_AND},   {"or", K_OR},
    {"not", K_NOT},  {"true", K_TRUE}, {"false", K_FALSE}, {"null", K_NULL},
};

/* Characters that are not operators but that authors type for one. */
static const char *const misuse[][2] = {
    {"=", "use '==' to compare"},
    {"!", "use 'not' to negate, '!=' to compare"},
    {"&", "use 'and'"},
    {"|", "use 'or'"},
};

typedef enum func_id {
    F_MIN,
    F_MAX,
    F_ABS,
    F_LOG1P,
    F_SIGMOID,
    F_PCT,
    F_COUNT,
    F_DURATION,
    F_NFUNCS
} func_id;

static const struct func_def {
    const char *name;
    int min_args, max_args; /* max_args -1: no limit */
    pql_vfmt fmt;           /* the print format the result gets (formatting helpers) */
} funcs[F_NFUNCS] = {
    [F_MIN] = {"min", 1, -1, PQL_FMT_PLAIN},
    [F_MAX] = {"max", 1, -1, PQL_FMT_PLAIN},
    [F_ABS] = {"abs", 1, 1, PQL_FMT_PLAIN},
    [F_LOG1P] = {"log1p", 1, 1, PQL_FMT_PLAIN},
    [F_SIGMOID] = {"sigmoid", 1, 1, PQL_FMT_PLAIN},
    [F_PCT] = {"pct", 1, 1, PQL_FMT_PERCENT},
    [F_COUNT] = {"count", 1, 1, PQL_FMT_COUNT},
    [F_DURATION] = {"duration", 1, 1, PQL_FMT_DURATION},
};

typedef struct token {
    kind kind;
    size_t start, len; /* byte span in the source */
    double num;        /* K_NUM */
} token;

typedef struct node {
    kind kind;
    pql_vtype type;          /* static type; PQL_V_NULL means unknown */
    size_t start, end;       /* source span, for messages */
    struct node *next_alloc; /* all nodes of an expression, for freeing */
    struct node *next_arg;   /* the next argument of a call */
    union {
        double num;
        int b;
        int slot;
        struct {
            struct node *l, *r; /* r is NULL for K_NEG and K_NOT */
        } bin;
        struct {
            func_id fn;
            struct node *args;
        } call;
        size_t str_len; /* K_STR: the decoded text follows in `text` */
    } u;
    char text[];
} node;

typedef struct slot_list {
    int *v;
    size_t n, cap;
} slot_list;

struct pql_expr {
    node *root;
    node *nodes;
    slot_list slots;
};

typedef struct parser {
    const char *src;
    size_t pos, end;      /* lexing position and end of this expression */
    const char *end_desc; /* what the end is called: "end of input" or "'}'" */
    token tok, prev;
    int depth, nnodes, failed;
    pql_expr_resolve_fn resolve;
    void *opaque;
    pql_expr *e;
    size_t *err_offset;
    char *errstr;
    size_t errstr_size;
} parser;

/* ---- helpers ---- */

static int slot_list_add(slot_list *l, int slot)
{
    for (size_t i = 0; i < l->n; i++)
        if (l->v[i] == slot) return 0;
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 8;
        int *v = realloc(l->v, cap * sizeof *v);
        if (!v) return -1;
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = slot;
    return 0;
}

/* Length of the longest prefix of s[0..n) of at most max bytes that does not
 * split a UTF-8 sequence. */
static size_t utf8_prefix(const char *s, size_t n, size_t max)
{
    if (n <= max) return n;
    while (max > 0 && ((unsigned char)s[max] & 0xC0) == 0x80)
        max--;
    return max;
}

static int is_digit(char c)
{
    return c >= '0' && c <= '9';
}

static int is_name_start(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}

static int is_name_char(char c)
{
    return is_name_start(c) || is_digit(c);
}

static const char *type_name(pql_vtype t)
{
    static const char *const names[] = {"null", "a boolean", "a number", "a string"};
    return t >= PQL_V_NULL && t <= PQL_V_STR ? names[t] : "null";
}

/* Records the first error; returns -1 so callers can `return fail(…)`. */
__attribute__((format(printf, 3, 4))) static int fail(parser *p, size_t off, const char *fmt, ...)
{
    if (p->failed) return -1;
    p->failed = 1;
    if (p->err_offset) *p->err_offset = off;
    if (p->errstr && p->errstr_size) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(p->errstr, p->errstr_size, fmt, ap);
        va_end(ap);
    }
    return -1;
}

/* Source text src[start..end) for a message, shortened with "..." if long. */
static const char *snippet(const parser *p, size_t start, size_t end, char *buf, size_t size)
{
    size_t n = utf8_prefix(p->src + start, end - start, 32);
    snprintf(buf, size, "%.*s%s", (int)n, p->src + start, n < end - start ? "..." : "");
    return buf;
}

/* How a token reads in "but found X": 'and', "x", end of input. */
static const char *describe(const parser *p, const token *t, char *buf, size_t size)
{
    char text[48];
    if (t->kind == K_END) return p->end_desc;
    snippet(p, t->start, t->start + t->len, text, sizeof text);
    snprintf(buf, size, t->kind == K_STR ? "%s" : "'%s'", text);
    return buf;
}

/* ---- tokenizer ---- */

static int lex_number(parser *p, token *t)
{
    const char *s = p->src;
    size_t j = t->start;
    int ok = 1;
    while (j < p->end && is_digit(s[j]))
        j++;
    if (j < p->end && s[j] == '.') {
        ok = ++j < p->end && is_digit(s[j]);
        while (j < p->end && is_digit(s[j]))
            j++;
    }
    if (ok && j < p->end && (s[j] == 'e' || s[j] == 'E')) {
        if (++j < p->end && (s[j] == '+' || s[j] == '-')) j++;
        ok = j < p->end && is_digit(s[j]);
        while (j < p->end && is_digit(s[j]))
            j++;
    }
    int64_t unit = 0; /* a duration literal: 14d, 30m, 24h, 2w, 90s, 500ms */
    if (ok && j < p->end) {
        size_t u = j;
        while (u < p->end && is_name_char(s[u]))
            u++;
        int64_t ms;
        char unit_text[4] = "1";
        if (u > j && u - j <= 2 && (u >= p->end || s[u] != '.')) {
            memcpy(unit_text + 1, s + j, u - j);
            if (pql_parse_duration(unit_text, u - j + 1, &ms) == 0) unit = ms, j = u;
        }
    }
    if (!ok || (j < p->end && (is_name_char(s[j]) || s[j] == '.'))) {
        while (j < p->end && (is_name_char(s[j]) || s[j] == '.'))
            j++;
        return fail(p, t->start, "invalid number '%.*s'", (int)(j - t->start), s + t->start);
    }
    char tmp[64];
    if (j - t->start >= sizeof tmp)
        return fail(p, t->start, "number '%.20s...' is too long", s + t->start);
    memcpy(tmp, s + t->start, j - t->start);
    tmp[j - t->start] = '\0';
    t->num = strtod(tmp, NULL) * (unit ? (double)unit : 1.0);
    if (!isfinite(t->num)) return fail(p, t->start, "number '%s' is too large", tmp);
    t->kind = K_NUM;
    t->len = j - t->start;
    return 0;
}

/* A NAME, possibly dotted, or a keyword. */
static int lex_name(parser *p, token *t)
{
    const char *s = p->src;
    size_t j = t->start;
    int dotted = 0;
    while (j < p->end && is_name_char(s[j]))
        j++;
    while (j < p->end && s[j] == '.') {
        int len = (int)(j + 1 - t->start);
        if (j + 1 >= p->end)
            return fail(p, j + 1, "expected a name after '%.*s' but found %s", len, s + t->start,
                        p->end_desc);
        if (!is_name_start(s[j + 1]))
            return fail(p, j + 1, "expected a name after '%.*s' but found '%c'", len, s + t->start,
                        s[j + 1]);
        dotted = 1;
        for (j++; j < p->end && is_name_char(s[j]);)
            j++;
    }
    t->kind = K_NAME;
    t->len = j - t->start;
    for (size_t k = 0; !dotted && k < sizeof operators / sizeof operators[0]; k++)
        if (strlen(operators[k].text) == t->len && !memcmp(operators[k].text, s + t->start, t->len))
            t->kind = operators[k].kind;
    return 0;
}

static int lex_string(parser *p, token *t)
{
    const char *s = p->src;
    char q = s[t->start];
    size_t j = t->start + 1;
    for (; j < p->end && s[j] != q; j++) {
        if (s[j] != '\\' || j + 1 >= p->end) continue;
        char c = s[++j];
        if (c != '"' && c != '\'' && c != '\\' && c != 'n')
            return fail(p, j - 1, "unknown escape '\\%c' in a string (use \\\" \\' \\\\ or \\n)",
                        c);
    }
    if (j >= p->end) return fail(p, t->start, "unterminated string: missing closing %c", q);
    t->kind = K_STR;
    t->len = j + 1 - t->start;
    return 0;
}

/* Reads the next token into p->tok; the current one becomes p->prev. */
static int lex(parser *p)
{
    const char *s = p->src;
    size_t i = p->pos;
    while (i < p->end && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r'))
        i++;
    if (p->tok.len > 0) p->prev = p->tok; /* prev.len 0: no token yet */
    token t = {K_END, i, 0, 0};
    char c = i < p->end ? s[i] : '\0', next = i + 1 < p->end ? s[i + 1] : '\0';
    if (i >= p->end) {
        /* end of input */
    } else if (c == '"' || c == '\'') {
        if (lex_string(p, &t) < 0) return -1;
    } else if (is_digit(c) || (c == '.' && is_digit(next))) {
        if (lex_number(p, &t) < 0) return -1;
    } else if (is_name_start(c)) {
        if (lex_name(p, &t) < 0) return -1;
    } else {
        for (size_t k = 0; t.kind == K_END && k < sizeof operators / sizeof operators[0]; k++) {
            const char *op = operators[k].text;
            if (!is_name_start(op[0]) && op[0] == c && (op[1] == '\0' || op[1] == next)) {
                t.kind = operators[k].kind;
                t.len = strlen(op);
            }
        }
        for (size_t k = 0; t.kind == K_END && k < sizeof misuse / sizeof misuse[0]; k++)
            if (misuse[k][0][0] == c) return fail(p, i, "unexpected '%c' (%s)", c, misuse[k][1]);
        if (t.kind == K_END) {
            size_t n = 1;
            while ((unsigned char)c >= 0x80 && i + n < p->end &&
                   ((unsigned char)s[i + n] & 0xC0) == 0x80)
                n++;
            if ((unsigned char)c < 0x20 || c == 0x7f)
                return fail(p, i, "unexpected control character 0x%02x", (unsigned char)c);
            return fail(p, i, "unexpected character '%.*s'", (int)n, s + i);
        }
    }
    p->tok = t;
    p->pos = t.start + t.len;
    return 0;
}

/* ---- parser ---- */

static node *new_node(parser *p, kind k, pql_vtype type, size_t start, size_t end, size_t text_size)
{
    node *n = NULL;
    if (++p->nnodes > MAX_NODES)
        fail(p, start, "expression is too long (more than %d parts)", MAX_NODES);
    else if (!(n = calloc(1, sizeof *n + text_size)))
        fail(p, start, "out of memory");
    if (!n) return NULL;
    n->kind = k;
    n->type = type;
    n->start = start;
    n->end = end;
    n->next_alloc = p->e->nodes;
    p->e->nodes = n;
    return n;
}

static node *binary(parser *p, kind k, pql_vtype type, node *l, node *r)
{
    node *n = new_node(p, k, type, l->start, r ? r->end : l->end, 0);
    if (n) {
        n->u.bin.l = l;
        n->u.bin.r = r;
    }
    return n;
}

static int enter(parser *p)
{
    if (++p->depth <= MAX_DEPTH) return 0;
    return fail(p, p->tok.start, "expression is nested too deeply (more than %d levels)",
                MAX_DEPTH);
}

/* A number operand is needed: a known string or boolean is a type error. */
static int check_number(parser *p, const node *n, const char *what)
{
    char text[48];
    if (n->type != PQL_V_STR && n->type != PQL_V_BOOL) return 0;
    return fail(p, n->start, "%s expects a number but found %s (%s)", what, type_name(n->type),
                snippet(p, n->start, n->end, text, sizeof text));
}

static int find_function(parser *p, token name)
{
    const char *s = p->src + name.start, *guess = NULL;
    size_t best = name.len <= 2 ? 1 : 2;
    for (int i = 0; i < F_NFUNCS; i++)
        if (strlen(funcs[i].name) == name.len && !memcmp(funcs[i].name, s, name.len)) return i;
    for (int i = 0; i < F_NFUNCS; i++) {
        size_t d = (size_t)pql_edit_distance(s, name.len, funcs[i].name, strlen(funcs[i].name));
        if (d <= best) best = d, guess = funcs[i].name;
    }
    if (guess)
        return fail(p, name.start, "unknown function '%.*s' (did you mean '%s'?)", (int)name.len, s,
                    guess);
    return fail(p, name.start,
                "unknown function '%.*s' (functions: min, max, abs, log1p, sigmoid, pct, "
                "count, duration)",
                (int)name.len, s);
}

static node *parse_or(parser *p);

/* NAME "(" [ expr ( "," expr )* ] ")" with the current token at "(". */
static node *parse_call(parser *p, token name)
{
    int fn = find_function(p, name), nargs = 0;
    if (fn < 0 || enter(p) < 0 || lex(p) < 0) return NULL;
    const struct func_def *def = &funcs[fn];
    node *n = new_node(p, K_CALL, PQL_V_NUM, name.start, name.start, 0), **tail;
    if (!n) return NULL;
    n->u.call.fn = (func_id)fn;
    for (tail = &n->u.call.args; p->tok.kind != K_RPAREN || nargs > 0; tail = &(*tail)->next_arg) {
        char found[64];
        if (!(*tail = parse_or(p))) return NULL;
        nargs++;
        if (p->tok.kind == K_RPAREN) break;
        if (p->tok.kind != K_COMMA) {
            fail(p, p->tok.start, "expected ',' or ')' in the call to %s() but found %s", def->name,
                 describe(p, &p->tok, found, sizeof found));
            return NULL;
        }
        if (lex(p) < 0) return NULL;
    }
    p->depth--;
    n->end = p->tok.start + 1;
    if (nargs < def->min_args || (def->max_args >= 0 && nargs > def->max_args)) {
        fail(p, name.start, "%s() takes %s %d argument%s but was given %d", def->name,
             def->max_args < 0 ? "at least" : "exactly", def->min_args,
             def->min_args == 1 ? "" : "s", nargs);
        return NULL;
    }
    char what[16];
    snprintf(what, sizeof what, "%s()", def->name);
    for (node *a = n->u.call.args; a; a = a->next_arg)
        if (check_number(p, a, what) < 0) return NULL;
    return lex(p) < 0 ? NULL : n; /* past ')' */
}

static node *parse_ref(parser *p, token name)
{
    char hint[256] = "";
    int slot = 0;
    pql_vtype type = PQL_V_NULL;
    const char *s = p->src + name.start;
    if (p->resolve(p->opaque, s, name.len, &slot, &type, hint, sizeof hint) < 0) {
        if (hint[0])
            fail(p, name.start, "%s", hint);
        else
            fail(p, name.start, "unknown name '%.*s'", (int)name.len, s);
        return NULL;
    }
    if (slot_list_add(&p->e->slots, slot) < 0) {
        fail(p, name.start, "out of memory");
        return NULL;
    }
    node *n = new_node(p, K_REF, type, name.start, name.start + name.len, 0);
    if (n) n->u.slot = slot;
    return n;
}

static node *parse_string(parser *p, token t)
{
    /* the decoded text is shorter than the quoted one */
    node *n = new_node(p, K_STR, PQL_V_STR, t.start, t.start + t.len, t.len);
    if (!n) return NULL;
    const char *s = p->src + t.start + 1, *end = p->src + t.start + t.len - 1;
    size_t len = 0;
    for (; s < end; s++) {
        char c = *s;
        if (c == '\\') c = *++s == 'n' ? '\n' : *s; /* lex_string checked the escapes */
        n->text[len++] = c;
    }
    n->u.str_len = len;
    return n;
}

static node *parse_primary(parser *p)
{
    token t = p->tok;
    node *n = NULL;
    char found[64];
    const char *f;
    switch (t.kind) {
    case K_NUM:
        if ((n = new_node(p, K_NUM, PQL_V_NUM, t.start, t.start + t.len, 0))) n->u.num = t.num;
        break;
    case K_STR:
        n = parse_string(p, t);
        break;
    case K_TRUE:
    case K_FALSE:
        if ((n = new_node(p, K_BOOL, PQL_V_BOOL, t.start, t.start + t.len, 0)))
            n->u.b = t.kind == K_TRUE;
        break;
    case K_NULL:
        n = new_node(p, K_NULL, PQL_V_NULL, t.start, t.start + t.len, 0);
        break;
    case K_NAME:
        if (lex(p) < 0) return NULL;
        return p->tok.kind == K_LPAREN ? parse_call(p, t) : parse_ref(p, t);
    case K_LPAREN:
        if (enter(p) < 0 || lex(p) < 0 || !(n = parse_or(p))) return NULL;
        f = describe(p, &p->tok, found, sizeof found);
        if (p->tok.kind == K_END)
            fail(p, t.start, "'(' is never closed: expected ')' but found %s", f);
        else if (p->tok.kind != K_RPAREN)
            fail(p, p->tok.start, "expected ')' but found %s", f);
        if (p->tok.kind != K_RPAREN) return NULL;
        p->depth--;
        n->start = t.start; /* messages quote the parenthesised text */
        n->end = p->tok.start + 1;
        break;
    default:
        f = describe(p, &p->tok, found, sizeof found);
        if (p->prev.len > 0)
            fail(p, t.start, "expected an expression after '%.*s' but found %s", (int)p->prev.len,
                 p->src + p->prev.start, f);
        else
            fail(p, t.start, "expected an expression but found %s", f);
        return NULL;
    }
    return !n || lex(p) < 0 ? NULL : n;
}

static node *parse_unary(parser *p)
{
    if (p->tok.kind != K_SUB) return parse_primary(p);
    size_t start = p->tok.start;
    if (enter(p) < 0 || lex(p) < 0) return NULL;
    node *operand = parse_unary(p), *n;
    if (!operand || check_number(p, operand, "'-'") < 0) return NULL;
    p->depth--;
    if ((n = binary(p, K_NEG, PQL_V_NUM, operand, NULL))) n->start = start;
    return n;
}

/* Binary operators by level, lowest first; -1 for anything else. */
static int level_of(kind k)
{
    if (k == K_OR) return LVL_OR;
    if (k == K_AND) return LVL_AND;
    if (k >= K_EQ && k <= K_GE) return LVL_CMP;
    if (k == K_ADD || k == K_SUB) return LVL_ADD;
    if (k == K_MUL || k == K_DIV) return LVL_MUL;
    return -1;
}

/* Static checks of `l op r`: arithmetic wants numbers, comparisons like types. */
static int check_operands(parser *p, token op, const node *l, const node *r)
{
    char what[8], lt[48], rt[48];
    if (level_of(op.kind) >= LVL_ADD) {
        snprintf(what, sizeof what, "'%c'", p->src[op.start]);
        return check_number(p, l, what) < 0 ? -1 : check_number(p, r, what);
    }
    if (level_of(op.kind) != LVL_CMP) return 0;
    if (l->type != PQL_V_NULL && r->type != PQL_V_NULL && l->type != r->type)
        return fail(p, l->start, "cannot compare %s (%s) with %s (%s)", type_name(l->type),
                    snippet(p, l->start, l->end, lt, sizeof lt), type_name(r->type),
                    snippet(p, r->start, r->end, rt, sizeof rt));
    if ((l->type == PQL_V_BOOL || r->type == PQL_V_BOOL) && op.kind != K_EQ && op.kind != K_NE)
        return fail(p, op.start, "cannot order booleans with '%.*s' (only == and != apply)",
                    (int)op.len, p->src + op.start);
    if (level_of(p->tok.kind) == LVL_CMP)
        return fail(p, p->tok.start, "comparisons cannot be chained: write 'a < b and b < c'");
    return 0;
}

static node *parse_not(parser *p);
static node *parse_binary(parser *p, int level);

/* An operand of the operators of `level`: the next level up. */
static node *parse_operand(parser *p, int level)
{
    if (level == LVL_AND) return parse_not(p); /* `not` sits between and and comparisons */
    return level == LVL_MUL ? parse_unary(p) : parse_binary(p, level + 1);
}

/* A left-associative chain of the operators of `level`. */
static node *parse_binary(parser *p, int level)
{
    node *l = parse_operand(p, level), *r;
    while (l && level_of(p->tok.kind) == level) {
        token op = p->tok;
        if (lex(p) < 0 || !(r = parse_operand(p, level)) || check_operands(p, op, l, r) < 0)
            return NULL;
        l = binary(p, op.kind, level >= LVL_ADD ? PQL_V_NUM : PQL_V_BOOL, l, r);
    }
    return l;
}

static node *parse_not(parser *p)
{
    if (p->tok.kind != K_NOT) return parse_binary(p, LVL_CMP);
    size_t start = p->tok.start;
    if (enter(p) < 0 || lex(p) < 0) return NULL;
    node *operand = parse_not(p), *n;
    if (!operand) return NULL;
    p->depth--;
    if ((n = binary(p, K_NOT, PQL_V_BOOL, operand, NULL))) n->start = start;
    return n;
}

static node *parse_or(parser *p)
{
    return parse_binary(p, LVL_OR);
}

/* Compiles src[start..end); offsets in messages are relative to src. */
static pql_expr *compile_range(const char *src, size_t start, size_t end, const char *end_desc,
                               pql_expr_resolve_fn resolve, void *opaque, size_t *err_offset,
                               char *errstr, size_t errstr_size)
{
    parser p = {.src = src,
                .pos = start,
                .end = end,
                .end_desc = end_desc,
                .resolve = resolve,
                .opaque = opaque,
                .err_offset = err_offset,
                .errstr = errstr,
                .errstr_size = errstr_size};
    char found[64];
    if (!(p.e = calloc(1, sizeof *p.e))) {
        fail(&p, start, "out of memory");
        return NULL;
    }
    if (lex(&p) < 0 || !(p.e->root = parse_or(&p))) goto fail;
    if (p.tok.kind == K_RPAREN) {
        fail(&p, p.tok.start, "unmatched ')'");
        goto fail;
    }
    if (p.tok.kind != K_END) {
        fail(&p, p.tok.start, "expected an operator or %s but found %s", end_desc,
             describe(&p, &p.tok, found, sizeof found));
        goto fail;
    }
    return p.e;
fail:
    pql_expr_destroy(p.e);
    return NULL;
}

pql_expr *pql_expr_compile(const char *src, pql_expr_resolve_fn resolve, void *opaque,
                           size_t *err_offset, char *errstr, size_t errstr_size)
{
    return compile_range(src, 0, strlen(src), "end of input", resolve, opaque, err_offset, errstr,
                         errstr_size);
}

void pql_expr_destroy(pql_expr *e)
{
    if (!e) return;
    for (node *n = e->nodes, *next; n; n = next) {
        next = n->next_alloc;
        free(n);
    }
    free(e->slots.v);
    free(e);
}

/* ---- evaluation ---- */

static int truthy(pql_value v)
{
    if (v.type == PQL_V_BOOL) return v.u.b;
    return v.type == PQL_V_NUM && v.u.num != 0;
}

/* A plain number, or null when not finite; -0 becomes 0. */
static pql_value number(double d)
{
    if (!isfinite(d)) return pql_null();
    return pql_num(d == 0 ? 0.0 : d);
}

static int compare(kind op, pql_value a, pql_value b)
{
    int c;
    if (a.type == PQL_V_NULL || a.type != b.type) return 0;
    if (a.type == PQL_V_NUM) {
        c = (a.u.num > b.u.num) - (a.u.num < b.u.num);
    } else if (a.type == PQL_V_STR) {
        size_t n = a.u.str.len < b.u.str.len ? a.u.str.len : b.u.str.len;
        c = n ? memcmp(a.u.str.ptr, b.u.str.ptr, n) : 0;
        if (c == 0) c = (a.u.str.len > b.u.str.len) - (a.u.str.len < b.u.str.len);
    } else {
        if (op != K_EQ && op != K_NE) return 0; /* booleans have no order */
        c = a.u.b != b.u.b;
    }
    switch (op) {
    case K_EQ:
        return c == 0;
    case K_NE:
        return c != 0;
    case K_LT:
        return c < 0;
    case K_LE:
        return c <= 0;
    case K_GT:
        return c > 0;
    default:
        return c >= 0;
    }
}

static pql_value eval(const node *n, pql_expr_lookup_fn lookup, void *ctx);

static pql_value call(const node *n, pql_expr_lookup_fn lookup, void *ctx)
{
    func_id fn = n->u.call.fn;
    if (fn == F_MIN || fn == F_MAX) {
        pql_value best = pql_null();
        for (const node *a = n->u.call.args; a; a = a->next_arg) {
            pql_value v = eval(a, lookup, ctx);
            if (v.type == PQL_V_NUM &&
                (best.type == PQL_V_NULL ||
                 (fn == F_MIN ? v.u.num < best.u.num : v.u.num > best.u.num)))
                best = v;
        }
        return best;
    }
    pql_value x = eval(n->u.call.args, lookup, ctx);
    if (x.type != PQL_V_NUM) return pql_null();
    double d = x.u.num;
    switch (fn) {
    case F_ABS:
        return number(fabs(d));
    case F_LOG1P:
        return d <= -1 ? pql_null() : number(log1p(d));
    case F_SIGMOID:
        return number(d >= 0 ? 1.0 / (1.0 + exp(-d)) : exp(d) / (1.0 + exp(d)));
    default:
        x.fmt = funcs[fn].fmt;
        return x; /* the formatting helpers: pct, count, duration */
    }
}

static pql_value eval(const node *n, pql_expr_lookup_fn lookup, void *ctx)
{
    pql_value a, b;
    switch (n->kind) {
    case K_NUM:
        return pql_num(n->u.num);
    case K_STR:
        return pql_str(n->text, n->u.str_len);
    case K_BOOL:
        return pql_bool(n->u.b);
    case K_REF:
        a = lookup(ctx, n->u.slot);
        return a.type == PQL_V_NUM && !isfinite(a.u.num) ? pql_null() : a;
    case K_NEG:
        a = eval(n->u.bin.l, lookup, ctx);
        return a.type == PQL_V_NUM ? number(-a.u.num) : pql_null();
    case K_NOT:
        return pql_bool(!truthy(eval(n->u.bin.l, lookup, ctx)));
    case K_AND:
        return pql_bool(truthy(eval(n->u.bin.l, lookup, ctx)) &&
                        truthy(eval(n->u.bin.r, lookup, ctx)));
    case K_OR:
        return pql_bool(truthy(eval(n->u.bin.l, lookup, ctx)) ||
                        truthy(eval(n->u.bin.r, lookup, ctx)));
    case K_ADD:
    case K_SUB:
    case K_MUL:
    case K_DIV:
        a = eval(n->u.bin.l, lookup, ctx);
        b = eval(n->u.bin.r, lookup, ctx);
        if (a.type != PQL_V_NUM || b.type != PQL_V_NUM) return pql_null();
        if (n->kind == K_ADD) return number(a.u.num + b.u.num);
        if (n->kind == K_SUB) return number(a.u.num - b.u.num);
        if (n->kind == K_MUL) return number(a.u.num * b.u.num);
        return b.u.num == 0 ? pql_null() : number(a.u.num / b.u.num);
    case K_CALL:
        return call(n, lookup, ctx);
    default:
        if (level_of(n->kind) != LVL_CMP) return pql_null(); /* K_NULL */
        a = eval(n->u.bin.l, lookup, ctx);
        b = eval(n->u.bin.r, lookup, ctx);
        return pql_bool(compare(n->kind, a, b));
    }
}

pql_value pql_expr_eval(const pql_expr *e, pql_expr_lookup_fn lookup, void *ctx)
{
    return e ? eval(e->root, lookup, ctx) : pql_null();
}

int pql_expr_test(const pql_expr *e, pql_expr_lookup_fn lookup, void *ctx)
{
    return truthy(pql_expr_eval(e, lookup, ctx));
}

pql_vtype pql_expr_type(const pql_expr *e)
{
    return e ? e->root->type : PQL_V_NULL;
}

static void conjuncts(const node *n, pql_expr_lookup_fn lookup, void *ctx,
                      void (*fn)(void *opaque, size_t start, size_t end, pql_value v), void *opaque)
{
    if (n->kind == K_AND) {
        conjuncts(n->u.bin.l, lookup, ctx, fn, opaque);
        conjuncts(n->u.bin.r, lookup, ctx, fn, opaque);
        return;
    }
    fn(opaque, n->start, n->end, eval(n, lookup, ctx));
}

void pql_expr_conjuncts(const pql_expr *e, pql_expr_lookup_fn lookup, void *ctx,
                        void (*fn)(void *opaque, size_t start, size_t end, pql_value v),
                        void *opaque)
{
    if (e) conjuncts(e->root, lookup, ctx, fn, opaque);
}

void pql_expr_foreach_slot(const pql_expr *e, void (*fn)(void *opaque, int slot), void *opaque)
{
    for (size_t i = 0; e && i < e->slots.n; i++)
        fn(opaque, e->slots.v[i]);
}

/* ---- templates ---- */

typedef struct part {
    char *text; /* literal text with braces unescaped; NULL for a placeholder */
    size_t len;
    pql_expr *e;
} part;

struct pql_template {
    part *parts;
    size_t nparts;
    slot_list slots;
};

/* Appends a placeholder `e`, or else the literal in `lit` (whose memory it takes). */
static int add_part(pql_template *t, pql_buf *lit, pql_expr *e)
{
    for (size_t k = 0; e && k < e->slots.n; k++)
        if (slot_list_add(&t->slots, e->slots.v[k]) < 0) return -1;
    part *parts = realloc(t->parts, (t->nparts + 1) * sizeof *parts);
    if (!parts) return -1;
    t->parts = parts;
    parts[t->nparts++] = e ? (part){NULL, 0, e} : (part){lit->data, lit->len, NULL};
    if (!e) *lit = (pql_buf){0};
    return 0;
}

/* Offset of the '}' closing the placeholder whose '{' is at `open`; a '}'
 * inside a quoted string does not count.  -1 with an error if there is none. */
static long placeholder_end(parser *p, size_t open, size_t n)
{
    const char *s = p->src;
    for (size_t j = open + 1; j < n; j++) {
        if (s[j] == '}') return (long)j;
        if (s[j] != '"' && s[j] != '\'') continue;
        size_t k = j + 1;
        while (k < n && s[k] != s[j])
            k += s[k] == '\\' && k + 1 < n ? 2 : 1;
        if (k >= n) return fail(p, j, "unterminated string: missing closing %c", s[j]);
        j = k;
    }
    return fail(p, open, "unterminated placeholder: '{' has no closing '}'");
}

pql_template *pql_template_compile(const char *src, pql_expr_resolve_fn resolve, void *opaque,
                                   size_t *err_offset, char *errstr, size_t errstr_size)
{
    parser p = {.src = src, .err_offset = err_offset, .errstr = errstr, .errstr_size = errstr_size};
    pql_template *t = calloc(1, sizeof *t);
    pql_buf lit = {0};
    size_t n = strlen(src), i = 0;
    if (!t) goto nomem;
    while (i < n) {
        char c = src[i];
        if (c == '}' && src[i + 1] != '}') {
            fail(&p, i, "unmatched '}' in a template (write '}}' for a literal brace)");
            goto fail;
        }
        if (c != '{' || src[i + 1] == '{') { /* literal text, "{{" or "}}" */
            if (pql_buf_append(&lit, &c, 1) < 0) goto nomem;
            i += c == '{' || c == '}' ? 2 : 1;
            continue;
        }
        long close = placeholder_end(&p, i, n);
        if (close < 0) goto fail;
        if (lit.len && add_part(t, &lit, NULL) < 0) goto nomem;
        pql_expr *e = compile_range(src, i + 1, (size_t)close, "'}'", resolve, opaque, err_offset,
                                    errstr, errstr_size);
        if (!e) goto fail;
        if (add_part(t, NULL, e) < 0) {
            pql_expr_destroy(e);
            goto nomem;
        }
        i = (size_t)close + 1;
    }
    if (lit.len && add_part(t, &lit, NULL) < 0) goto nomem;
    return t;
nomem:
    fail(&p, i, "out of memory");
fail:
    pql_buf_free(&lit);
    pql_template_destroy(t);
    return NULL;
}

void pql_template_destroy(pql_template *t)
{
    if (!t) return;
    for (size_t i = 0; i < t->nparts; i++) {
        free(t->parts[i].text);
        pql_expr_destroy(t->parts[i].e);
    }
    free(t->parts);
    free(t->slots.v);
    free(t);
}

typedef struct out {
    char *buf;
    size_t cap, len; /* cap excludes the NUL */
    int full;
} out;

static void out_put(out *o, const char *s, size_t n)
{
    if (o->full) return;
    if (n > o->cap - o->len) {
        n = utf8_prefix(s, n, o->cap - o->len);
        o->full = 1;
    }
    memcpy(o->buf + o->len, s, n);
    o->len += n;
}

size_t pql_template_render(const pql_template *t, pql_expr_lookup_fn lookup, void *ctx, char *buf,
                           size_t size)
{
    if (!buf || size == 0) return 0;
    out o = {buf, size - 1, 0, 0};
    for (size_t i = 0; t && i < t->nparts && !o.full; i++) {
        const part *pt = &t->parts[i];
        pql_value v = pt->e ? pql_expr_eval(pt->e, lookup, ctx) : pql_str(pt->text, pt->len);
        char num[64];
        int k;
        switch (v.type) {
        case PQL_V_NUM:
            k = pql_format_number(num, sizeof num, v.u.num, v.fmt);
            out_put(&o, num, k < 0 ? 0 : (size_t)k < sizeof num ? (size_t)k : sizeof num - 1);
            break;
        case PQL_V_STR:
            out_put(&o, v.u.str.ptr, v.u.str.len);
            break;
        case PQL_V_BOOL:
            out_put(&o, v.u.b ? "yes" : "no", v.u.b ? 3 : 2);
            break;
        case PQL_V_NULL:
            out_put(&o, "n/a", 3);
            break;
        }
    }
    buf[o.len] = '\0';
    return o.len;
}

void pql_template_foreach_slot(const pql_template *t, void (*fn)(void *opaque, int slot),
                               void *opaque)
{
    for (size_t i = 0; t && i < t->slots.n; i++)
        fn(opaque, t->slots.v[i]);
}
