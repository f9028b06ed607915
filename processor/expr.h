/* expr.h — the rule expression language: parse once, evaluate many times.
 *
 * Pure core: no I/O, no Kafka, no Redis.  Used for rule conditions
 * (`core_uses >= 5 and invites >= 1`), `where` filters on events
 * (`properties.feature == "projects"`), weighted points, logistic terms and
 * the `{…}` placeholders of reason templates.
 *
 * Grammar (lowest precedence first):
 *   expr    := or
 *   or      := and ( "or" and )*
 *   and     := not ( "and" not )*
 *   not     := "not" not | cmp
 *   cmp     := add ( ( "==" | "!=" | "<" | "<=" | ">" | ">=" ) add )?
 *   add     := mul ( ( "+" | "-" ) mul )*
 *   mul     := unary ( ( "*" | "/" ) unary )*
 *   unary   := "-" unary | primary
 *   primary := NUMBER | STRING | "true" | "false" | "null"
 *            | NAME "(" [ expr ( "," expr )* ] ")"      -- function call
 *            | NAME                                    -- reference, may contain dots
 *            | "(" expr ")"
 *   NUMBER  := 12 | 0.8 | 1e3        STRING := "…" or '…' with \" \' \\ \n escapes
 *            | 14d | 30m | 24h | 2w | 90s | 500ms   -- a duration, in milliseconds
 *   NAME    := [A-Za-z_][A-Za-z0-9_]* ( "." [A-Za-z_][A-Za-z0-9_]* )*
 *
 * Functions: min(a, b, …), max(a, b, …), abs(x), log1p(x), sigmoid(x), and
 * the formatting helpers pct(x), count(x), duration(x): each returns x
 * unchanged but marked to print, in a reason, as a percentage (0.95 → "95%"),
 * a count with thousands separators (2000 → "2,000") or a duration given in
 * milliseconds (1209600000 → "14 days", 5400000 → "1 hour 30 minutes").
 *
 * Null semantics (DESIGN §3): arithmetic with a null operand is null; division
 * by zero is null; a result that is NaN or ±inf is null; a comparison with a
 * null operand is false (both == and !=); in a boolean position (and/or/not,
 * a condition) null counts as false; min/max skip null arguments (all null →
 * null); log1p of x <= -1 is null.  Evaluation never crashes and never returns
 * NaN.  Strings compare with == / != (bytewise) and < <= > >= (bytewise order);
 * a string compared with a number is false; `+` on strings is a type error
 * when both types are known at compile time, null otherwise.
 *
 * Names are resolved at compile time through a resolver the caller supplies
 * (rules.c knows signals and `account.<trait>`; the event filter context knows
 * `event`, `user_id`, `properties.<key>`), which maps each NAME to an integer
 * slot and a static type.  At evaluation the caller's lookup function returns
 * the slot's current value.  Static types let compile time catch
 * `invites == "x"` (number vs string) — PQL_V_NULL as a static type means
 * "unknown until run time" and is never a type error. */
#ifndef PQL_EXPR_H
#define PQL_EXPR_H

#include "common.h"

typedef struct pql_expr pql_expr;

/* Resolves a NAME.  Returns 0 and sets *slot and *type on success; returns -1
 * when the name is unknown, after writing a one-line reason into `hint`
 * (e.g. "unknown signal 'core_use' (did you mean 'core_uses'?)"). */
typedef int (*pql_expr_resolve_fn)(void *opaque, const char *name, size_t len, int *slot,
                                   pql_vtype *type, char *hint, size_t hint_size);

/* Returns the current value of `slot`. */
typedef pql_value (*pql_expr_lookup_fn)(void *ctx, int slot);

/** Compiles `src` (NUL-terminated).
 *  @returns the expression (free with pql_expr_destroy), or NULL on error with
 *  a message in errstr ("expected ')' but found 'and'") and the 0-based byte
 *  offset into `src` where the problem is in *err_offset (callers turn it into
 *  file:line:col).  Type errors (string compared with a number, unknown
 *  function, wrong argument count) are compile errors too. */
pql_expr *pql_expr_compile(const char *src, pql_expr_resolve_fn resolve, void *opaque,
                           size_t *err_offset, char *errstr, size_t errstr_size);

void pql_expr_destroy(pql_expr *e);

/** Evaluates `e`.  Never fails: see the null semantics above.  A string result
 *  points into `e` (a literal) or into whatever `lookup` returned. */
pql_value pql_expr_eval(const pql_expr *e, pql_expr_lookup_fn lookup, void *ctx);

/** Evaluates `e` in a boolean position: true only for a true bool, or a
 *  non-zero number; null, false, strings and 0 are false. */
int pql_expr_test(const pql_expr *e, pql_expr_lookup_fn lookup, void *ctx);

/** The static type of the expression's result (PQL_V_NULL if unknown). */
pql_vtype pql_expr_type(const pql_expr *e);

/** Explains a condition: calls fn once for each operand of the top-level
 *  `and` chain of `e` (once for `e` itself when it is not an `and`), left to
 *  right, with the operand's byte span [start, end) in the compiled source
 *  and its value.  `a >= 5 and (b or c)` gives "a >= 5" and "b or c". */
void pql_expr_conjuncts(const pql_expr *e, pql_expr_lookup_fn lookup, void *ctx,
                        void (*fn)(void *opaque, size_t start, size_t end, pql_value v),
                        void *opaque);

/** Calls fn(opaque, slot) once for every distinct slot `e` references, in
 *  order of first appearance. */
void pql_expr_foreach_slot(const pql_expr *e, void (*fn)(void *opaque, int slot), void *opaque);

/** Renders a reason template: literal text with `{expr}` placeholders, each
 *  compiled with `resolve` ("{{" and "}}" are literal braces).  Numbers print
 *  with pql_format_number (pct() → "95%"), null as "n/a", booleans as
 *  "yes"/"no".  The result is truncated to `size`-1 bytes on a UTF-8 character
 *  boundary and always NUL-terminated.  See pql_template_*. */
typedef struct pql_template pql_template;

pql_template *pql_template_compile(const char *src, pql_expr_resolve_fn resolve, void *opaque,
                                   size_t *err_offset, char *errstr, size_t errstr_size);
void pql_template_destroy(pql_template *t);
/** @returns the length written (excluding the NUL). */
size_t pql_template_render(const pql_template *t, pql_expr_lookup_fn lookup, void *ctx, char *buf,
                           size_t size);
void pql_template_foreach_slot(const pql_template *t, void (*fn)(void *opaque, int slot),
                               void *opaque);

#endif
