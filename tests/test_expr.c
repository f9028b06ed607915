/* test_expr.c — the expression language: parsing, precedence, types, null
 * semantics, functions, compile errors and reason templates. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "expr.h"

/* ---- a small world of names ---- */

enum {
    S_CORE_USES,
    S_INVITES,
    S_SEATS,
    S_PLAN,
    S_FEATURE,
    S_A,
    S_B,
    S_MISSING,
    S_FLAG,
    S_ACTIVE_USERS,
    S_COUNT
};

static const struct {
    const char *name;
    pql_vtype type;
} names[S_COUNT] = {
    [S_CORE_USES] = {"core_uses", PQL_V_NUM},
    [S_INVITES] = {"invites", PQL_V_NUM},
    [S_SEATS] = {"account.seats", PQL_V_NUM},
    [S_PLAN] = {"account.plan", PQL_V_STR},
    [S_FEATURE] = {"properties.feature", PQL_V_NULL},
    [S_A] = {"a", PQL_V_NUM},
    [S_B] = {"b", PQL_V_NUM},
    [S_MISSING] = {"missing", PQL_V_NUM},
    [S_FLAG] = {"flag", PQL_V_BOOL},
    [S_ACTIVE_USERS] = {"active_users", PQL_V_NUM},
};

static pql_value values[S_COUNT];

static int resolve(void *opaque, const char *name, size_t len, int *slot, pql_vtype *type,
                   char *hint, size_t hint_size)
{
    (void)opaque;
    for (int i = 0; i < S_COUNT; i++) {
        if (strlen(names[i].name) == len && memcmp(names[i].name, name, len) == 0) {
            *slot = i;
            *type = names[i].type;
            return 0;
        }
    }
    if (len == 8 && memcmp(name, "core_use", 8) == 0)
        snprintf(hint, hint_size, "unknown signal 'core_use' (did you mean 'core_uses'?)");
    else if (len == 6 && memcmp(name, "silent", 6) == 0)
        ; /* no hint: the compiler must say something itself */
    else
        snprintf(hint, hint_size, "unknown signal '%.*s'", (int)len, name);
    return -1;
}

static pql_value lookup(void *ctx, int slot)
{
    (void)ctx;
    return values[slot];
}

static void reset_values(void)
{
    values[S_CORE_USES] = pql_num(7);
    values[S_INVITES] = pql_num(2);
    values[S_SEATS] = pql_num(20);
    values[S_PLAN] = pql_str("pro", 3);
    values[S_FEATURE] = pql_str("projects", 8);
    values[S_A] = pql_num(19);
    values[S_B] = pql_num(20);
    values[S_MISSING] = pql_null();
    values[S_FLAG] = pql_bool(1);
    values[S_ACTIVE_USERS] = pql_num(17);
}

TestSuite(expr, .init = reset_values);
TestSuite(expr_errors, .init = reset_values);
TestSuite(template, .init = reset_values);

/* ---- helpers ---- */

static pql_expr *compile(const char *src)
{
    char err[256] = "";
    size_t off = 999;
    pql_expr *e = pql_expr_compile(src, resolve, NULL, &off, err, sizeof err);
    cr_assert(e != NULL, "compiling `%s` failed at %zu: %s", src, off, err);
    return e;
}

static pql_value eval(const char *src)
{
    pql_expr *e = compile(src);
    pql_value v = pql_expr_eval(e, lookup, NULL);
    cr_assert(v.type != PQL_V_STR, "use eval_str for strings");
    pql_expr_destroy(e);
    return v;
}

static void expect_num(const char *src, double want)
{
    pql_value v = eval(src);
    cr_assert_eq(v.type, PQL_V_NUM, "`%s` gave type %d, not a number", src, v.type);
    cr_assert(fabs(v.u.num - want) < 1e-12, "`%s` = %.17g, want %.17g", src, v.u.num, want);
    cr_assert_eq(v.fmt, PQL_FMT_PLAIN, "`%s` should print plain", src);
}

static void expect_bool(const char *src, int want)
{
    pql_value v = eval(src);
    cr_assert_eq(v.type, PQL_V_BOOL, "`%s` gave type %d, not a boolean", src, v.type);
    cr_assert_eq(v.u.b, want, "`%s` = %d, want %d", src, v.u.b, want);
}

static void expect_null(const char *src)
{
    pql_value v = eval(src);
    cr_assert_eq(v.type, PQL_V_NULL, "`%s` gave type %d (%g), not null", src, v.type,
                 v.type == PQL_V_NUM ? v.u.num : 0.0);
}

static void expect_str(const char *src, const char *want, size_t want_len)
{
    pql_expr *e = compile(src);
    pql_value v = pql_expr_eval(e, lookup, NULL);
    cr_assert_eq(v.type, PQL_V_STR, "`%s` gave type %d, not a string", src, v.type);
    cr_assert_eq(v.u.str.len, want_len, "`%s` has length %zu", src, v.u.str.len);
    cr_assert(memcmp(v.u.str.ptr, want, want_len) == 0, "`%s` = '%.*s'", src, (int)v.u.str.len,
              v.u.str.ptr);
    pql_expr_destroy(e);
}

static int test(const char *src)
{
    pql_expr *e = compile(src);
    int r = pql_expr_test(e, lookup, NULL);
    pql_expr_destroy(e);
    return r;
}

static void expect_error(const char *src, size_t want_off, const char *want_msg)
{
    char err[256] = "";
    size_t off = 999;
    pql_expr *e = pql_expr_compile(src, resolve, NULL, &off, err, sizeof err);
    cr_assert(e == NULL, "`%s` compiled but should not", src);
    cr_assert_str_eq(err, want_msg, "`%s`: message", src);
    cr_assert_eq(off, want_off, "`%s`: offset %zu, want %zu (%s)", src, off, want_off, err);
}

static void expect_template_error(const char *src, size_t want_off, const char *want_msg)
{
    char err[256] = "";
    size_t off = 999;
    pql_template *t = pql_template_compile(src, resolve, NULL, &off, err, sizeof err);
    cr_assert(t == NULL, "template `%s` compiled but should not", src);
    cr_assert_str_eq(err, want_msg, "template `%s`: message", src);
    cr_assert_eq(off, want_off, "template `%s`: offset %zu, want %zu", src, off, want_off);
}

static pql_template *compile_template(const char *src)
{
    char err[256] = "";
    size_t off = 999;
    pql_template *t = pql_template_compile(src, resolve, NULL, &off, err, sizeof err);
    cr_assert(t != NULL, "template `%s` failed at %zu: %s", src, off, err);
    return t;
}

static void expect_render(const char *src, const char *want)
{
    pql_template *t = compile_template(src);
    char buf[256];
    size_t n = pql_template_render(t, lookup, NULL, buf, sizeof buf);
    cr_assert_str_eq(buf, want, "template `%s`", src);
    cr_assert_eq(n, strlen(want), "template `%s`: length %zu", src, n);
    pql_template_destroy(t);
}

typedef struct slots_seen {
    int v[16];
    int n;
} slots_seen;

static void collect(void *opaque, int slot)
{
    slots_seen *s = opaque;
    cr_assert(s->n < 16);
    s->v[s->n++] = slot;
}

/* ---- precedence and associativity ---- */

Test(expr, arithmetic_precedence)
{
    expect_num("1+2*3", 7);
    expect_num("(1+2)*3", 9);
    expect_num("2*3+4*5", 26);
    expect_num("10-4-3", 3);
    expect_num("10-(4-3)", 9);
    expect_num("8/4/2", 1);
    expect_num("8/(4/2)", 4);
    expect_num("1 + 6 / 3 * 2", 5);
    expect_num("0.8 * 10", 8);
    expect_num("1e3 + .5", 1000.5);
    expect_num("2.5E-1", 0.25);
}

Test(expr, unary_minus)
{
    expect_num("-2*3", -6);
    expect_num("-2 * -3", 6);
    expect_num("- -3", 3);
    expect_num("-(2+3)", -5);
    expect_num("2 - -1", 3);
    expect_num("-core_uses + 10", 3);
    expect_null("-missing");
    expect_num("0 * -1", 0);
    cr_assert(!signbit(eval("0 * -1").u.num), "-0 is normalised to 0");
}

Test(expr, boolean_precedence)
{
    expect_bool("not false and false", 0); /* (not false) and false */
    expect_bool("not (false and false)", 1);
    expect_bool("true or false and false", 1); /* true or (false and false) */
    expect_bool("(true or false) and false", 0);
    expect_bool("not 1 == 2", 1); /* not binds looser than == */
    expect_bool("not not true", 1);
    expect_bool("1 + 2 > 2 and 2 * 2 == 4", 1);
    expect_bool("core_uses >= 5 and invites >= 1", 1);
    expect_bool("core_uses >= 8 or invites >= 3", 0);
    expect_bool("not flag", 0);
}

Test(expr, names_and_literals)
{
    expect_num("core_uses", 7);
    expect_num("account.seats", 20);
    expect_bool("true", 1);
    expect_bool("false", 0);
    expect_null("null");
    expect_str("account.plan", "pro", 3);
    expect_str("'single'", "single", 6);
    expect_str("\"a\\\"b\"", "a\"b", 3);
    expect_str("'it\\'s'", "it's", 4);
    expect_str("\"x\\\\n\"", "x\\n", 3);
    expect_str("\"a\\nb\"", "a\nb", 3);
    expect_str("\"\"", "", 0);
    expect_str("\"un}i\xc3\xa9\"", "un}i\xc3\xa9", 6);
}

/* ---- comparisons ---- */

Test(expr, number_comparisons)
{
    expect_bool("1 == 1", 1);
    expect_bool("1 == 2", 0);
    expect_bool("1 != 2", 1);
    expect_bool("1 != 1", 0);
    expect_bool("1 < 2", 1);
    expect_bool("2 < 2", 0);
    expect_bool("2 <= 2", 1);
    expect_bool("3 <= 2", 0);
    expect_bool("3 > 2", 1);
    expect_bool("2 > 2", 0);
    expect_bool("2 >= 2", 1);
    expect_bool("1 >= 2", 0);
    expect_bool("active_users / account.seats >= 0.8", 1);
    expect_bool("active_users / account.seats < 0.7", 0);
}

Test(expr, string_comparisons)
{
    expect_bool("account.plan == \"pro\"", 1);
    expect_bool("account.plan != \"pro\"", 0);
    expect_bool("account.plan == 'free'", 0);
    expect_bool("\"abc\" < \"abd\"", 1);
    expect_bool("\"ab\" < \"abc\"", 1);
    expect_bool("\"abc\" < \"ab\"", 0);
    expect_bool("\"b\" > \"abc\"", 1);
    expect_bool("\"a\" <= \"a\"", 1);
    expect_bool("\"a\" >= \"b\"", 0);
    expect_bool("\"\" < \"a\"", 1);
    expect_bool("properties.feature == \"projects\"", 1);
    expect_bool("properties.feature != \"projects\"", 0);
}

Test(expr, boolean_comparisons)
{
    expect_bool("true == true", 1);
    expect_bool("true != false", 1);
    expect_bool("flag == true", 1);
    expect_bool("(core_uses > 1) == flag", 1);
}

Test(expr, unknown_types_compare_at_run_time)
{
    /* properties.feature has no static type: no compile error, false at run time */
    expect_bool("properties.feature == 5", 0);
    expect_bool("properties.feature != 5", 0);
    values[S_FEATURE] = pql_num(5);
    expect_bool("properties.feature == 5", 1);
    expect_bool("properties.feature == \"projects\"", 0);
    expect_bool("properties.feature != \"projects\"", 0);
    values[S_FEATURE] = pql_bool(1);
    expect_bool("properties.feature == true", 1);
    expect_bool("properties.feature >= properties.feature", 0); /* booleans have no order */
    expect_null("properties.feature + 1");                      /* arithmetic on a boolean: null */
    values[S_FEATURE] = pql_str("x", 1);
    expect_null("properties.feature * 2");
    expect_null("-properties.feature");
    expect_null("abs(properties.feature)");
}

/* ---- functions ---- */

Test(expr, min_max)
{
    expect_num("min(3, 1, 2)", 1);
    expect_num("max(3, 1, 2)", 3);
    expect_num("min(5)", 5);
    expect_num("max(-1, -5)", -1);
    expect_num("min(missing, 2)", 2);
    expect_num("max(2, missing, 7, missing)", 7);
    expect_num("min(-1, missing, 4)", -1);
    expect_null("max(missing, missing)");
    expect_null("min(missing)");
    expect_num("min(1/0, 3)", 3);
    expect_num("max(core_uses, invites) * 2", 14);
    values[S_FEATURE] = pql_str("x", 1);
    expect_num("max(properties.feature, 4)", 4); /* a string at run time is skipped */
    pql_value v = eval("min(pct(0.2), 0.5)");
    cr_assert_eq(v.fmt, PQL_FMT_PERCENT, "min/max return the chosen argument as is");
}

Test(expr, abs_log1p_sigmoid)
{
    expect_num("abs(-2.5)", 2.5);
    expect_num("abs(3)", 3);
    expect_null("abs(missing)");
    expect_num("log1p(0)", 0);
    expect_num("log1p(1)", log1p(1.0));
    expect_num("log1p(-0.5)", log1p(-0.5));
    expect_null("log1p(-1)");
    expect_null("log1p(-2)");
    expect_null("log1p(missing)");
    expect_num("sigmoid(0)", 0.5);
    expect_num("sigmoid(2)", 1.0 / (1.0 + exp(-2.0)));
    expect_num("sigmoid(-2)", 1.0 - 1.0 / (1.0 + exp(-2.0)));
    expect_num("sigmoid(1000)", 1);
    expect_num("sigmoid(-1000)", 0);
    expect_num("sigmoid(-745.5)", 0);
    expect_null("sigmoid(missing)");
    /* the logistic model: sigmoid(intercept + Σ weight·signal) */
    expect_num("sigmoid(-4.2 + 0.30 * core_uses + 0.80 * invites)", 1.0 / (1.0 + exp(-(-0.5))));
}

Test(expr, duration_literals_are_milliseconds)
{
    expect_num("14d", 14.0 * 86400000);
    expect_num("2w", 14.0 * 86400000);
    expect_num("24h", 86400000);
    expect_num("30m", 1800000);
    expect_num("90s", 90000);
    expect_num("500ms", 500);
    expect_num("1.5d", 1.5 * 86400000);
    expect_num("14d / 1d", 14);
    expect_bool("1d < 25h", 1);
    expect_num("1e3", 1000); /* an exponent is not a unit */
}

Test(template, formatting_helpers)
{
    expect_render("{count(2000)} messages", "2,000 messages");
    expect_render("{count(1234567.4)}", "1,234,567");
    expect_render("{count(-1500)} {count(999)} {count(0)}", "-1,500 999 0");
    expect_render("{count(missing)}", "n/a");
    expect_render("{duration(14d)}", "14 days");
    expect_render("{duration(1d)} {duration(25h)}", "1 day 1 day 1 hour");
    expect_render("{duration(90m)}", "1 hour 30 minutes");
    expect_render("{duration(45s)} {duration(61s)} {duration(0)}",
                  "45 seconds 1 minute 1 second 0 seconds");
    expect_render("{duration(-2h)}", "-2 hours");
    expect_render("{duration(1 / 0)}", "n/a");
}

Test(expr, pct)
{
    pql_value v = eval("pct(a / b)");
    cr_assert_eq(v.type, PQL_V_NUM);
    cr_assert_eq(v.fmt, PQL_FMT_PERCENT);
    cr_assert(fabs(v.u.num - 0.95) < 1e-12);
    expect_num("pct(0.5) + 0", 0.5); /* arithmetic prints plain again */
    expect_num("pct(0.5) * 2", 1);
    expect_num("-pct(0.5)", -0.5);
    expect_num("abs(pct(-0.5))", 0.5);
    expect_null("pct(missing)");
    expect_null("pct(1 / 0)");
}

/* ---- null semantics ---- */

Test(expr, nulls)
{
    expect_null("missing");
    expect_null("missing + 1");
    expect_null("1 - missing");
    expect_null("missing * 0");
    expect_null("null + 1");
    expect_null("core_uses / 0");
    expect_null("0 / 0");
    expect_null("core_uses / (invites - 2)");
    expect_bool("null == null", 0);
    expect_bool("null != 1", 0);
    expect_bool("missing == missing", 0);
    expect_bool("missing != missing", 0);
    expect_bool("missing < 1", 0);
    expect_bool("missing >= 1", 0);
    expect_bool("1 > missing", 0);
    expect_bool("account.seats / 0 > 0", 0);
    expect_bool("not null", 1); /* null counts as false in a boolean position */
    expect_bool("not missing", 1);
    expect_bool("missing and true", 0);
    expect_bool("missing or true", 1);
    expect_bool("missing or missing", 0);
    values[S_SEATS] = pql_null(); /* a missing trait */
    expect_bool("account.seats > 0 and active_users / account.seats >= 0.8", 0);
    expect_bool("active_users / account.seats < 0.7", 0);
}

Test(expr, never_nan_or_inf)
{
    expect_null("1e308 * 10");
    expect_null("-1e308 * 10");
    expect_null("1e308 + 1e308");
    expect_null("-1e308 - 1e308");
    expect_null("1e-308 / 1e-308 / 0");
    expect_null("1 / 1e-320 * 1e300");
    values[S_A] = pql_num(NAN);
    values[S_B] = pql_num(INFINITY);
    expect_null("a");
    expect_null("b");
    expect_null("a + 1");
    expect_bool("a == a", 0);
    expect_bool("b > 0", 0);
    expect_num("max(a, b, 1)", 1);
}

Test(expr, test_in_boolean_position)
{
    cr_assert_eq(test("core_uses >= 5"), 1);
    cr_assert_eq(test("core_uses >= 50"), 0);
    cr_assert_eq(test("missing"), 0);
    cr_assert_eq(test("null"), 0);
    cr_assert_eq(test("0"), 0);
    cr_assert_eq(test("2"), 1);
    cr_assert_eq(test("-0.5"), 1);
    cr_assert_eq(test("core_uses - 7"), 0);
    cr_assert_eq(test("account.plan"), 0);
    cr_assert_eq(test("flag"), 1);
    cr_assert_eq(test("1 / 0"), 0);
    cr_assert_eq(pql_expr_test(NULL, lookup, NULL), 0);
}

Test(expr, static_types)
{
    struct {
        const char *src;
        pql_vtype type;
    } cases[] = {
        {"1 + 2", PQL_V_NUM},        {"a > 1", PQL_V_BOOL},
        {"account.plan", PQL_V_STR}, {"properties.feature", PQL_V_NULL},
        {"min(1, 2)", PQL_V_NUM},    {"null", PQL_V_NULL},
        {"not 1", PQL_V_BOOL},       {"flag", PQL_V_BOOL},
        {"-core_uses", PQL_V_NUM},   {"(\"x\")", PQL_V_STR},
        {"a or b", PQL_V_BOOL},      {"pct(a)", PQL_V_NUM},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        pql_expr *e = compile(cases[i].src);
        cr_assert_eq(pql_expr_type(e), cases[i].type, "type of `%s`", cases[i].src);
        pql_expr_destroy(e);
    }
    cr_assert_eq(pql_expr_type(NULL), PQL_V_NULL);
}

Test(expr, foreach_slot_distinct_in_order)
{
    pql_expr *e = compile("invites + core_uses * invites + account.seats - core_uses");
    slots_seen s = {.n = 0};
    pql_expr_foreach_slot(e, collect, &s);
    cr_assert_eq(s.n, 3);
    cr_assert_eq(s.v[0], S_INVITES);
    cr_assert_eq(s.v[1], S_CORE_USES);
    cr_assert_eq(s.v[2], S_SEATS);
    pql_expr_destroy(e);

    e = compile("1 + 2");
    s.n = 0;
    pql_expr_foreach_slot(e, collect, &s);
    cr_assert_eq(s.n, 0);
    pql_expr_destroy(e);
}

Test(expr, destroy_null_and_whitespace)
{
    pql_expr_destroy(NULL);
    pql_template_destroy(NULL);
    expect_num(" \t\n 1 +\r\n 2 ", 3);
    expect_bool("core_uses>=5 and(invites>=1)", 1);
    expect_error("core_uses>=5and invites>=1", 11, "invalid number '5and'");
}

Test(expr, eval_is_repeatable)
{
    pql_expr *e = compile("core_uses * 2 >= invites + 10");
    cr_assert_eq(pql_expr_test(e, lookup, NULL), 1);
    values[S_CORE_USES] = pql_num(5);
    cr_assert_eq(pql_expr_test(e, lookup, NULL), 0);
    values[S_CORE_USES] = pql_null();
    cr_assert_eq(pql_expr_test(e, lookup, NULL), 0);
    pql_expr_destroy(e);
}

/* ---- compile errors ---- */

Test(expr_errors, unknown_names)
{
    expect_error("core_use >= 5", 0, "unknown signal 'core_use' (did you mean 'core_uses'?)");
    expect_error("invites >= 1 and nope", 17, "unknown signal 'nope'");
    expect_error("1 + silent", 4, "unknown name 'silent'");
    expect_error("account.", 8, "expected a name after 'account.' but found end of input");
    expect_error("account.7", 8, "expected a name after 'account.' but found '7'");
}

Test(expr_errors, type_errors)
{
    expect_error("core_uses == \"x\"", 0,
                 "cannot compare a number (core_uses) with a string (\"x\")");
    expect_error("invites >= 1 and account.plan > 3", 17,
                 "cannot compare a string (account.plan) with a number (3)");
    expect_error("flag == 1", 0, "cannot compare a boolean (flag) with a number (1)");
    expect_error("(a + b) != 'x'", 0, "cannot compare a number ((a + b)) with a string ('x')");
    expect_error("account.plan + 1", 0, "'+' expects a number but found a string (account.plan)");
    expect_error("1 + account.plan", 4, "'+' expects a number but found a string (account.plan)");
    expect_error("2 * 'x'", 4, "'*' expects a number but found a string ('x')");
    expect_error("-account.plan", 1, "'-' expects a number but found a string (account.plan)");
    expect_error("(a > 1) / 2", 0, "'/' expects a number but found a boolean ((a > 1))");
    expect_error("abs(\"x\")", 4, "abs() expects a number but found a string (\"x\")");
    expect_error("min(1, true)", 7, "min() expects a number but found a boolean (true)");
    expect_error("true < false", 5, "cannot order booleans with '<' (only == and != apply)");
    expect_error("properties.feature >= flag", 19,
                 "cannot order booleans with '>=' (only == and != apply)");
    expect_error("core_uses == \"a very long string literal that goes on\"", 0,
                 "cannot compare a number (core_uses) with a string (\"a very long string "
                 "literal that...)");
}

Test(expr_errors, unknown_types_and_not_are_never_type_errors)
{
    expect_bool("properties.feature == 1 or properties.feature == 'x'", 0);
    expect_bool("not account.plan", 1); /* a string is false in a boolean position */
    expect_bool("account.plan or flag", 1);
    expect_bool("account.plan and flag", 0);
    expect_null("null * 3");
    expect_bool("null == 'x'", 0);
}

Test(expr_errors, syntax)
{
    expect_error("", 0, "expected an expression but found end of input");
    expect_error("   ", 3, "expected an expression but found end of input");
    expect_error("core_uses >=", 12, "expected an expression after '>=' but found end of input");
    expect_error("core_uses >= and", 13, "expected an expression after '>=' but found 'and'");
    expect_error("not", 3, "expected an expression after 'not' but found end of input");
    expect_error("1 + * 2", 4, "expected an expression after '+' but found '*'");
    expect_error("(1 + 2", 0, "'(' is never closed: expected ')' but found end of input");
    expect_error("(1 + 2 3)", 7, "expected ')' but found '3'");
    expect_error("1 + 2)", 5, "unmatched ')'");
    expect_error("()", 1, "expected an expression after '(' but found ')'");
    expect_error("core_uses >= 5 invites", 15,
                 "expected an operator or end of input but found 'invites'");
    expect_error("a b", 2, "expected an operator or end of input but found 'b'");
    expect_error("1 'x'", 2, "expected an operator or end of input but found 'x'");
    expect_error("a < b < 3", 6, "comparisons cannot be chained: write 'a < b and b < c'");
    expect_error("a = 1", 2, "unexpected '=' (use '==' to compare)");
    expect_error("!flag", 0, "unexpected '!' (use 'not' to negate, '!=' to compare)");
    expect_error("a && b", 2, "unexpected '&' (use 'and')");
    expect_error("a || b", 2, "unexpected '|' (use 'or')");
    expect_error("a # b", 2, "unexpected character '#'");
    expect_error("a \xc3\xa9 b", 2, "unexpected character '\xc3\xa9'");
    expect_error("5x", 0, "invalid number '5x'");
    expect_error("5days", 0, "invalid number '5days'");
    expect_error("5d.x", 0, "invalid number '5d.x'");
    expect_error("1.", 0, "invalid number '1.'");
    expect_error("1e", 0, "invalid number '1e'");
    expect_error("1.2.3", 0, "invalid number '1.2.3'");
    expect_error("1e400", 0, "number '1e400' is too large");
}

Test(expr_errors, bad_output_of_template_literal_quote)
{
    /* a string literal in "found" keeps its own quotes */
    expect_error("1 \"x\"", 2, "expected an operator or end of input but found \"x\"");
}

Test(expr_errors, strings)
{
    expect_error("account.plan == \"pro", 16, "unterminated string: missing closing \"");
    expect_error("'abc", 0, "unterminated string: missing closing '");
    expect_error("\"a\\\"", 0, "unterminated string: missing closing \"");
    expect_error("\"a\\tb\"", 2, "unknown escape '\\t' in a string (use \\\" \\' \\\\ or \\n)");
}

Test(expr_errors, functions)
{
    expect_error("sigmod(1)", 0, "unknown function 'sigmod' (did you mean 'sigmoid'?)");
    expect_error("1 + mn(2, 3)", 4, "unknown function 'mn' (did you mean 'min'?)");
    expect_error("log(2)", 0, "unknown function 'log' (did you mean 'log1p'?)");
    expect_error("foo(1)", 0,
                 "unknown function 'foo' (functions: min, max, abs, log1p, sigmoid, pct, "
                 "count, duration)");
    expect_error("core_uses(1)", 0,
                 "unknown function 'core_uses' (functions: min, max, abs, log1p, sigmoid, pct, "
                 "count, duration)");
    expect_error("abs(1, 2)", 0, "abs() takes exactly 1 argument but was given 2");
    expect_error("1 + pct()", 4, "pct() takes exactly 1 argument but was given 0");
    expect_error("min()", 0, "min() takes at least 1 argument but was given 0");
    expect_error("max(1,)", 6, "expected an expression after ',' but found ')'");
    expect_error("max(1 2)", 6, "expected ',' or ')' in the call to max() but found '2'");
    expect_error("max(1, 2", 8, "expected ',' or ')' in the call to max() but found end of input");
    expect_error("min", 0, "unknown signal 'min'");
}

Test(expr_errors, limits)
{
    char deep[512];
    memset(deep, '(', 300);
    strcpy(deep + 300, "1");
    expect_error(deep, 100, "expression is nested too deeply (more than 100 levels)");
    memset(deep, '-', 300);
    expect_error(deep, 100, "expression is nested too deeply (more than 100 levels)");

    /* 90 levels of parentheses are fine */
    char ok[256];
    memset(ok, '(', 90);
    strcpy(ok + 90, "1");
    memset(ok + 91, ')', 90);
    ok[181] = '\0';
    expect_num(ok, 1);

    static char big[10001];
    for (int i = 0; i < 10000; i += 2)
        memcpy(big + i, "1+", 2);
    big[9999] = '\0'; /* 5000 ones and 4999 pluses */
    char err[128];
    size_t off = 0;
    cr_assert_null(pql_expr_compile(big, resolve, NULL, &off, err, sizeof err));
    cr_assert_str_eq(err, "expression is too long (more than 4096 parts)");
}

Test(expr_errors, null_and_small_error_buffers)
{
    cr_assert_null(pql_expr_compile("1 +", resolve, NULL, NULL, NULL, 0));
    char err[8];
    size_t off = 0;
    cr_assert_null(pql_expr_compile("1 +", resolve, NULL, &off, err, sizeof err));
    cr_assert_str_eq(err, "expecte");
    cr_assert_eq(off, 3);
}

/* ---- templates ---- */

Test(template, seat_usage)
{
    expect_render("Seat usage at {pct(a / b)} ({a} of {b} seats)",
                  "Seat usage at 95% (19 of 20 seats)");
    expect_render("Seat usage at {pct(active_users / account.seats)} ({active_users} of "
                  "{account.seats} seats)",
                  "Seat usage at 85% (17 of 20 seats)");
    expect_render("Used projects {core_uses} times in 7 days", "Used projects 7 times in 7 days");
}

Test(template, value_kinds)
{
    expect_render("{missing}", "n/a");
    expect_render("{1 / 0}", "n/a");
    expect_render("{flag}", "yes");
    expect_render("{not flag}", "no");
    expect_render("plan={account.plan}!", "plan=pro!");
    expect_render("{5 / 6}", "0.83");
    expect_render("{0.5}", "0.5");
    expect_render("{-3}", "-3");
    expect_render("{0 * -1}", "0");
    expect_render("{pct(1 / 3)}", "33.3%");
    expect_render("{pct(missing)}", "n/a");
    expect_render("{min(pct(0.25), 1)}", "25%");
    expect_render("{account.plan == \"}\"}", "no");
    expect_render("{ core_uses + invites }", "9");
    expect_render("", "");
    expect_render("no placeholders", "no placeholders");
}

Test(template, brace_escapes)
{
    expect_render("{{literal}}", "{literal}");
    expect_render("{{{core_uses}}}", "{7}");
    expect_render("a }} b {{ c", "a } b { c");
    expect_render("{core_uses}{invites}", "72");
}

Test(template, truncation_on_utf8_boundary)
{
    pql_template *t = compile_template("h\xc3\xa9llo {core_uses}");
    char buf[16];
    memset(buf, 'X', sizeof buf);
    cr_assert_eq(pql_template_render(t, lookup, NULL, buf, 3), 1); /* no half 'é' */
    cr_assert_str_eq(buf, "h");
    cr_assert_eq(pql_template_render(t, lookup, NULL, buf, 4), 3);
    cr_assert_str_eq(buf, "h\xc3\xa9");
    cr_assert_eq(pql_template_render(t, lookup, NULL, buf, 1), 0);
    cr_assert_str_eq(buf, "");
    memset(buf, 'X', sizeof buf);
    cr_assert_eq(pql_template_render(t, lookup, NULL, buf, 0), 0);
    cr_assert_eq(buf[0], 'X', "size 0 writes nothing");
    cr_assert_eq(pql_template_render(t, lookup, NULL, buf, 8), 7);
    cr_assert_str_eq(buf, "h\xc3\xa9llo ");
    cr_assert_eq(pql_template_render(t, lookup, NULL, buf, 9), 8);
    cr_assert_str_eq(buf, "h\xc3\xa9llo 7");
    pql_template_destroy(t);

    values[S_PLAN] = pql_str("\xe6\x97\xa5\xe6\x9c\xac", 6); /* 日本 */
    t = compile_template("plan: {account.plan}; end");
    cr_assert_eq(pql_template_render(t, lookup, NULL, buf, 10), 9);
    cr_assert_str_eq(buf, "plan: \xe6\x97\xa5");
    cr_assert_eq(pql_template_render(t, lookup, NULL, buf, 11), 9);
    cr_assert_str_eq(buf, "plan: \xe6\x97\xa5");
    cr_assert_eq(pql_template_render(t, lookup, NULL, buf, 13), 12);
    cr_assert_str_eq(buf, "plan: \xe6\x97\xa5\xe6\x9c\xac");
    /* once a part is cut, later parts are not appended even where they would fit */
    cr_assert_eq(pql_template_render(t, lookup, NULL, buf, 12), 9);
    cr_assert_str_eq(buf, "plan: \xe6\x97\xa5");
    cr_assert_eq(pql_template_render(t, lookup, NULL, buf, 14), 13);
    cr_assert_str_eq(buf, "plan: \xe6\x97\xa5\xe6\x9c\xac;");
    cr_assert_eq(pql_template_render(t, lookup, NULL, buf, 16), 15);
    cr_assert_str_eq(buf, "plan: \xe6\x97\xa5\xe6\x9c\xac; e");
    pql_template_destroy(t);
}

Test(template, errors)
{
    expect_template_error("Used {core_uses times", 5,
                          "unterminated placeholder: '{' has no closing '}'");
    expect_template_error("a {b} {", 6, "unterminated placeholder: '{' has no closing '}'");
    expect_template_error("a } b", 2,
                          "unmatched '}' in a template (write '}}' for a literal brace)");
    expect_template_error("Hi {core_uses >=}", 16,
                          "expected an expression after '>=' but found '}'");
    expect_template_error("{}", 1, "expected an expression but found '}'");
    expect_template_error("x {core_use}", 3,
                          "unknown signal 'core_use' (did you mean 'core_uses'?)");
    expect_template_error("x {a b}", 5, "expected an operator or '}' but found 'b'");
    expect_template_error("{account.plan == \"}}", 17, "unterminated string: missing closing \"");
    expect_template_error("{1} {(2}", 5, "'(' is never closed: expected ')' but found '}'");
    expect_template_error("{invites == 'x'}", 1,
                          "cannot compare a number (invites) with a string ('x')");
}

Test(template, foreach_slot_distinct_in_order)
{
    pql_template *t = compile_template("{invites} {core_uses} {invites + account.seats} {{a}}");
    slots_seen s = {.n = 0};
    pql_template_foreach_slot(t, collect, &s);
    cr_assert_eq(s.n, 3);
    cr_assert_eq(s.v[0], S_INVITES);
    cr_assert_eq(s.v[1], S_CORE_USES);
    cr_assert_eq(s.v[2], S_SEATS);
    pql_template_destroy(t);
}
