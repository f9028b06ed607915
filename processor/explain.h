/* explain.h — what the engine thinks of one account, for a person.
 *
 * `pqlstream rules explain --account ID` answers what a rep or RevOps person
 * asks when an alert did or did not fire: for every rule, does it apply to
 * this account (applies_to, fit), does its condition hold and which parts of
 * it do, its score and tier, its firing state (fired how often, held since,
 * in cooldown until) and, in one sentence, why it will or will not fire.
 *
 * Two layers, so the HTTP account endpoint can share the first:
 *   - pql_explain_json()  the pure core: an account (restored from Redis or
 *     built in a test) and its rule set → a JSON document (jansson);
 *   - pql_explain_text()  that document rendered for a terminal.
 * pql_explain_fetch() is the I/O edge: finds the account's partition in
 * Redis and restores its state.
 *
 * Everything is evaluated at the account's clock (its latest event time),
 * exactly as the engine evaluated it after that event: signals do not decay
 * in wall-clock time between events (DESIGN §5, event time). */
#ifndef PQL_EXPLAIN_H
#define PQL_EXPLAIN_H

#include "account.h"
#include "rules.h"
#include "store.h"

#include <jansson.h>

/** The account's explanation (new reference).  Times are ms since the epoch
 *  (null when unknown).  Shape:
 *    { account_id, ruleset_version, clock, signed_up_at, converted_at,
 *      qualified_at, qualified_by, paid, traits{}, signals{},
 *      rules: [ { name, kind, model, applies_to, applies, fit, holds, score,
 *                 tier, state ("FIRED" | "ARMED"), fired_count, last_fired_at,
 *                 held_since, cooldown_until, verdict,
 *                 conditions: [ {text, holds} ]            threshold
 *                 points:     [ {text, points, holds} ]    weighted
 *                 terms:      [ {text, weight, value} ]    logistic
 *               } ] } */
json_t *pql_explain_json(pql_account *a, const pql_rules *r);

/** Renders pql_explain_json's document for a person; appends to `out`.
 *  `where` (e.g. "group pqlstream, partition 3") goes in the heading. */
void pql_explain_text(const json_t *doc, const char *where, pql_buf *out);

/** Restores account `id` of `group` from Redis, looking in partitions
 *  0 … max_partitions-1.  @returns the account (destroy with
 *  pql_account_destroy) with *partition set, or NULL: with *partition -1 when
 *  no partition holds it, else an I/O error in errstr. */
pql_account *pql_explain_fetch(pql_store *s, const pql_rules *r, const char *group, const char *id,
                               int32_t max_partitions, int32_t *partition, char *errstr,
                               size_t errstr_size);

#endif
