/* cache.c — open-addressing hash map (linear probing, backward-shift delete)
 * over a doubly linked LRU list.  See cache.h.
 *
 * Laid out for a cache far larger than the CPU's: every look-up of a cold
 * account costs memory round trips, so each is counted.
 *   - A slot holds the hash beside the node pointer: probing past other
 *     accounts compares hashes in the slot array without touching their
 *     nodes.
 *   - A node holds a copy of the id: the match is confirmed without touching
 *     the account.
 *   - Moving a node to the front of the LRU list writes its two neighbours
 *     (two more cold nodes).  A node is moved only when it may have left the
 *     most recent quarter: the list's `moves` counter stamps each move, and a
 *     node is at most (moves - its stamp) places from the front, as only a
 *     later move can put another node before it.  The order is LRU except
 *     within that quarter, which eviction (from the tail, down to a bound far
 *     above a quarter of the entries in normal use) does not reach first. */
#include "cache.h"

#include <stdlib.h>
#include <string.h>

typedef struct node {
    pql_account *a;
    struct node *prev, *next; /* LRU: head = most recent */
    uint64_t hash;
    uint64_t stamp; /* c->moves when it was last put at the front */
    size_t bytes;   /* counted in c->bytes for this account (node_bytes) */
    size_t id_len;
    char id[]; /* a copy of the account's id */
} node;

typedef struct slot {
    uint64_t hash;
    node *n; /* NULL: empty */
} slot;

struct pql_cache {
    slot *slots;
    size_t cap; /* power of two */
    size_t count;
    node *head, *tail;
    uint64_t moves; /* nodes put at the front so far */
    size_t bytes;   /* sum of the nodes' bytes */
};

static uint64_t hash_id(const char *s, size_t len)
{
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < len; i++)
        h = (h ^ (unsigned char)s[i]) * 1099511628211ULL;
    return h ^ (h >> 29);
}

pql_cache *pql_cache_new(void)
{
    pql_cache *c = calloc(1, sizeof(*c));
    if (!c) return NULL;
    c->cap = 64;
    c->slots = calloc(c->cap, sizeof(*c->slots));
    if (!c->slots) {
        free(c);
        return NULL;
    }
    return c;
}

void pql_cache_destroy(pql_cache *c)
{
    if (!c) return;
    node *n = c->head;
    while (n) {
        node *next = n->next;
        pql_account_destroy(n->a);
        free(n);
        n = next;
    }
    free(c->slots);
    free(c);
}

/** @returns the slot holding id, or the empty slot where it would go. */
static size_t find_slot(const pql_cache *c, const char *id, size_t len, uint64_t h)
{
    size_t mask = c->cap - 1;
    for (size_t i = h & mask;; i = (i + 1) & mask) {
        const slot *s = &c->slots[i];
        if (!s->n) return i;
        if (s->hash == h && s->n->id_len == len && memcmp(s->n->id, id, len) == 0) return i;
    }
}

static void lru_unlink(pql_cache *c, node *n)
{
    if (n->prev)
        n->prev->next = n->next;
    else
        c->head = n->next;
    if (n->next)
        n->next->prev = n->prev;
    else
        c->tail = n->prev;
    n->prev = n->next = NULL;
}

static void lru_push_front(pql_cache *c, node *n)
{
    n->next = c->head;
    n->prev = NULL;
    if (c->head) c->head->prev = n;
    c->head = n;
    if (!c->tail) c->tail = n;
    n->stamp = ++c->moves;
}

pql_account *pql_cache_get(pql_cache *c, const char *id, size_t len)
{
    uint64_t h = hash_id(id, len);
    node *n = c->slots[find_slot(c, id, len, h)].n;
    if (!n) return NULL;
    if (c->moves - n->stamp > c->count / 4) { /* may be past the most recent quarter */
        lru_unlink(c, n);
        lru_push_front(c, n);
    }
    return n->a;
}

static void grow(pql_cache *c)
{
    size_t old = c->cap;
    slot *slots = c->slots;
    c->cap *= 2;
    c->slots = calloc(c->cap, sizeof(*c->slots));
    if (!c->slots) abort();
    for (size_t i = 0; i < old; i++) {
        if (!slots[i].n) continue;
        size_t j = slots[i].hash & (c->cap - 1);
        while (c->slots[j].n)
            j = (j + 1) & (c->cap - 1);
        c->slots[j] = slots[i];
    }
    free(slots);
}

/* What an account costs the cache: the account's own estimate, the node
 * and two table slots (the table is 3/8 to 3/4 full). */
static size_t node_bytes(const node *n)
{
    return pql_account_memory(n->a) + pql_heap_bytes(sizeof(*n) + n->id_len) + 2 * sizeof(slot);
}

void pql_cache_put(pql_cache *c, pql_account *a)
{
    size_t len;
    const char *id = pql_account_id(a, &len);
    if ((c->count + 1) * 4 > c->cap * 3) grow(c);
    node *n = calloc(1, sizeof(*n) + len);
    if (!n) abort();
    n->a = a;
    memcpy(n->id, id, len);
    n->id_len = len;
    n->hash = hash_id(id, len);
    c->slots[find_slot(c, n->id, len, n->hash)] = (slot){n->hash, n};
    lru_push_front(c, n);
    c->count++;
    n->bytes = node_bytes(n);
    c->bytes += n->bytes;
}

void pql_cache_measure(pql_cache *c, const pql_account *a)
{
    size_t len;
    const char *id = pql_account_id(a, &len);
    node *n = c->slots[find_slot(c, id, len, hash_id(id, len))].n;
    if (!n || n->a != a) return; /* not cached */
    c->bytes -= n->bytes;
    n->bytes = node_bytes(n);
    c->bytes += n->bytes;
}

size_t pql_cache_bytes(const pql_cache *c)
{
    return c->bytes;
}

size_t pql_cache_count(const pql_cache *c)
{
    return c->count;
}

/* Removes slot i, shifting later members of its probe run back. */
static void remove_slot(pql_cache *c, size_t i)
{
    size_t mask = c->cap - 1, j = i;
    c->slots[i].n = NULL;
    for (;;) {
        j = (j + 1) & mask;
        if (!c->slots[j].n) break;
        size_t home = c->slots[j].hash & mask;
        /* slot j may move to i if its home is not in (i, j] cyclically */
        if ((j > i && (home <= i || home > j)) || (j < i && (home <= i && home > j))) {
            c->slots[i] = c->slots[j];
            c->slots[j].n = NULL;
            i = j;
        }
    }
}

size_t pql_cache_evict(pql_cache *c, size_t max, size_t max_bytes,
                       int (*keep)(void *opaque, const pql_account *a), void *opaque)
{
    size_t evicted = 0;
    node *n = c->tail;
    while (n && (c->count > max || c->bytes > max_bytes)) {
        node *prev = n->prev;
        if (!pql_account_dirty(n->a) && !(keep && keep(opaque, n->a))) {
            remove_slot(c, find_slot(c, n->id, n->id_len, n->hash));
            lru_unlink(c, n);
            pql_account_destroy(n->a);
            c->bytes -= n->bytes;
            free(n);
            c->count--;
            evicted++;
        }
        n = prev;
    }
    return evicted;
}
