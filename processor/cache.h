/* cache.h — a task's in-memory accounts: hash map by account id + LRU order.
 *
 * Pure core.  The cache owns its accounts.  Eviction only ever drops clean
 * accounts (everything flushed to Redis), least recently used first (but
 * for the order within the most recent quarter), so write-behind never loses
 * a change.
 *
 * Bytes: the cache counts what its accounts hold on the heap — each one's
 * pql_account_memory() as last measured, plus the cache's own node and
 * table slots for it — so eviction can keep a byte budget as well as a
 * count.  An account is measured when it is put and again on
 * pql_cache_measure (task.c: every account a batch touched, at its build),
 * so the count trails what applying does until the next build. */
#ifndef PQL_CACHE_H
#define PQL_CACHE_H

#include "account.h"

typedef struct pql_cache pql_cache;

pql_cache *pql_cache_new(void);
/** Destroys the cache and every account in it.  NULL is fine. */
void pql_cache_destroy(pql_cache *c);

/** @returns the account and marks it most recently used, or NULL.  (An
 *  account already among the most recent quarter keeps its place: see
 *  cache.c.) */
pql_account *pql_cache_get(pql_cache *c, const char *id, size_t len);

/** Adds `a` (not present yet); the cache takes ownership. */
void pql_cache_put(pql_cache *c, pql_account *a);

size_t pql_cache_count(const pql_cache *c);

/** Measures a cached account again, after it changed. */
void pql_cache_measure(pql_cache *c, const pql_account *a);

/** @returns the heap bytes counted for the cached accounts (see above). */
size_t pql_cache_bytes(const pql_cache *c);

/** Evicts clean least-recently-used accounts until at most `max` remain and
 *  at most `max_bytes` are counted (or only dirty ones and those `keep` says
 *  to keep are left; `keep` may be NULL).  @returns how many were evicted. */
size_t pql_cache_evict(pql_cache *c, size_t max, size_t max_bytes,
                       int (*keep)(void *opaque, const pql_account *a), void *opaque);

#endif
