/* cache.c — open-addressing hash map (linear probing, backward-shift delete)
 * over a doubly linked LRU list.  See cache.h. */
#include "cache.h"

#include <stdlib.h>
#include <string.h>

typedef struct node {
    pql_account *a;
    const char *id;
    size_t id_len;
    uint64_t hash;
    struct node *prev, *next; /* LRU: head = most recent */
} node;

struct pql_cache {
    node **slots;
    size_t cap; /* power of two */
    size_t count;
    node *head, *tail;
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

static size_t find_slot(const pql_cache *c, const char *id, size_t len, uint64_t h)
{
    size_t i = h & (c->cap - 1);
    while (c->slots[i]) {
        node *n = c->slots[i];
        if (n->hash == h && n->id_len == len && memcmp(n->id, id, len) == 0) return i;
        i = (i + 1) & (c->cap - 1);
    }
    return i;
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
}

pql_account *pql_cache_get(pql_cache *c, const char *id, size_t len)
{
    uint64_t h = hash_id(id, len);
    node *n = c->slots[find_slot(c, id, len, h)];
    if (!n) return NULL;
    if (c->head != n) {
        lru_unlink(c, n);
        lru_push_front(c, n);
    }
    return n->a;
}

static void grow(pql_cache *c)
{
    size_t old = c->cap;
    node **slots = c->slots;
    c->cap *= 2;
    c->slots = calloc(c->cap, sizeof(*c->slots));
    if (!c->slots) abort();
    for (size_t i = 0; i < old; i++)
        if (slots[i])
            c->slots[find_slot(c, slots[i]->id, slots[i]->id_len, slots[i]->hash)] = slots[i];
    free(slots);
}

void pql_cache_put(pql_cache *c, pql_account *a)
{
    if ((c->count + 1) * 4 > c->cap * 3) grow(c);
    node *n = calloc(1, sizeof(*n));
    if (!n) abort();
    n->a = a;
    n->id = pql_account_id(a, &n->id_len);
    n->hash = hash_id(n->id, n->id_len);
    c->slots[find_slot(c, n->id, n->id_len, n->hash)] = n;
    lru_push_front(c, n);
    c->count++;
}

size_t pql_cache_count(const pql_cache *c)
{
    return c->count;
}

/* Removes slot i, shifting later members of its probe run back. */
static void remove_slot(pql_cache *c, size_t i)
{
    size_t mask = c->cap - 1, j = i;
    c->slots[i] = NULL;
    for (;;) {
        j = (j + 1) & mask;
        node *n = c->slots[j];
        if (!n) break;
        size_t home = n->hash & mask;
        /* n may move to i if its home is not in (i, j] cyclically */
        if ((j > i && (home <= i || home > j)) || (j < i && (home <= i && home > j))) {
            c->slots[i] = n;
            c->slots[j] = NULL;
            i = j;
        }
    }
}

size_t pql_cache_evict(pql_cache *c, size_t max, int (*keep)(void *opaque, const pql_account *a),
                       void *opaque)
{
    size_t evicted = 0;
    node *n = c->tail;
    while (n && c->count > max) {
        node *prev = n->prev;
        if (!pql_account_dirty(n->a) && !(keep && keep(opaque, n->a))) {
            remove_slot(c, find_slot(c, n->id, n->id_len, n->hash));
            lru_unlink(c, n);
            pql_account_destroy(n->a);
            free(n);
            c->count--;
            evicted++;
        }
        n = prev;
    }
    return evicted;
}
