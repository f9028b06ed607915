/* store.h — Redis, the only durable state (DESIGN §5).  An I/O edge.
 *
 * Key layout.  Every key of partition p of consumer group g carries the hash
 * tag {g:p}, so a partition's keys live in one Redis Cluster slot and one Lua
 * script can update them atomically:
 *   pql:{g:p}:meta         hash: epoch, seq, off:<topic> (next offset to read)
 *   pql:{g:p}:outbox       hash: alert_id -> encoded alert (not yet delivered)
 *   pql:{g:p}:a:<account>  hash: the account's state (fields owned by account.c)
 *   pql:{g:p}:c:<name>     hash: per-partition counters (metrics, issue 4)
 *
 * Fencing.  Claiming a partition (on assignment) increments its epoch and
 * returns it; every batch write carries the writer's epoch and the Lua script
 * refuses it (PQL_ERR_FENCED) when the stored epoch differs.  A zombie that
 * lost its partition can therefore never write state for it again.
 *
 * Exactly-once writes.  A batch also carries the partition's write sequence
 * number as the writer last saw it (`seq`, returned by the claim).  The script
 * applies the batch only when the stored seq equals it, then stores seq+1; when
 * the stored seq already equals seq+1 the batch was applied before (the reply
 * was lost with a connection) and the script returns success without applying
 * it again.  So a batch can be retried after any I/O error, and counters
 * (HINCRBY) are never counted twice.
 *
 * One round trip per flush: pql_store_commit() pipelines one EVALSHA per
 * partition batch (loading the script with SCRIPT LOAD on NOSCRIPT).  Account
 * loads are one pipelined HGETALL round trip for all accounts missing from a
 * batch's cache.
 *
 * Connection.  hiredis synchronous context with connect/command timeouts.
 * After an I/O error the context is dropped and the next call reconnects; the
 * caller decides on back-off (a call does not retry by itself, so the first
 * call after a server restart usually fails with PQL_ERR_IO).  hiredis writes
 * with write(2): the program must ignore SIGPIPE.  Credentials are never
 * logged or put in error messages.  pql_store_open() connects (AUTH, SELECT,
 * SCRIPT LOAD) so a wrong address or password shows at start.
 *
 * Group names must not contain '{' or '}' (they would move the hash tag):
 * claim returns PQL_ERR_ARG and a batch aimed at such a group commits as
 * PQL_ERR_ARG.  A batch whose building ran out of memory commits as
 * PQL_ERR_NOMEM (its calls returned it already). */
#ifndef PQL_STORE_H
#define PQL_STORE_H

#include "common.h"

typedef struct pql_store pql_store;

/** Connects to `url`: redis://[user:password@]host[:port][/db] or
 *  unix:///path/to/socket[?db=N] (user/password as in redis:// are also
 *  accepted as unix://user:password@/path).  A password alone is `:password@`.
 *  @returns NULL on error with a reason (never containing the password). */
pql_store *pql_store_open(const char *url, int timeout_ms, char *errstr, size_t errstr_size);

/** Same, without connecting: the first call connects (a server that is down
 *  or restarting at start-up is then a PQL_ERR_IO like any later outage; a
 *  refused AUTH or SELECT is PQL_ERR_ARG).  @returns NULL only for a URL
 *  that cannot be parsed, with a reason. */
pql_store *pql_store_new(const char *url, int timeout_ms, char *errstr, size_t errstr_size);
void pql_store_close(pql_store *s);

/** PING.  @returns PQL_OK, PQL_ERR_IO, or PQL_ERR_ARG (AUTH/SELECT refused). */
pql_err pql_store_ping(pql_store *s, char *errstr, size_t errstr_size);

/** The key of an account's state hash (for tests and tools). Appends to out. */
void pql_store_account_key(pql_buf *out, const char *group, int32_t partition, const char *account,
                           size_t account_len);

/* What a claim returns. */
typedef struct pql_claim {
    int64_t epoch;      /* our epoch for the partition, >= 1 */
    int64_t seq;        /* write sequence number to pass to the next batch */
    int64_t offsets[4]; /* next offset of topics[i], or -1 when none stored */
} pql_claim;

/** Claims partition `partition`: atomically increments its epoch and reads
 *  seq and the stored next offsets of `topics` (at most 4).
 *  @returns PQL_OK or PQL_ERR_IO. */
pql_err pql_store_claim(pql_store *s, const char *group, int32_t partition,
                        const char *const *topics, size_t ntopics, pql_claim *out, char *errstr,
                        size_t errstr_size);

/** Calls fn for every entry of the partition's outbox (undelivered alerts). */
pql_err pql_store_outbox_scan(pql_store *s, const char *group, int32_t partition,
                              void (*fn)(void *opaque, const char *id, size_t id_len,
                                         const char *payload, size_t payload_len),
                              void *opaque, char *errstr, size_t errstr_size);

/** Loads the state hashes of `n` accounts in one pipelined round trip,
 *  account i of partition partitions[i] (so one call serves every task of a
 *  pass).  fn is called for every field of account i (an account with no key
 *  gets no call).  @returns PQL_OK or PQL_ERR_IO. */
pql_err pql_store_load_accounts(pql_store *s, const char *group, const int32_t *partitions,
                                const char *const *ids, const size_t *id_lens, size_t n,
                                void (*fn)(void *opaque, size_t i, const char *field,
                                           size_t field_len, const char *value, size_t value_len),
                                void *opaque, char *errstr, size_t errstr_size);

/* A partition's atomic write: everything a batch changed. */
typedef struct pql_store_batch pql_store_batch;

/** @returns a new empty batch, or NULL when out of memory. */
pql_store_batch *pql_store_batch_new(void);
void pql_store_batch_destroy(pql_store_batch *b);

/** Empties `b` and aims it at (group, partition) with the writer's epoch and seq. */
void pql_store_batch_begin(pql_store_batch *b, const char *group, int32_t partition, int64_t epoch,
                           int64_t seq);

/** Starts the changes of one account; following hset/hdel apply to it.  The
 *  account key's TTL is (re)set to ttl_ms when anything is set (0: the
 *  expiry is left as it is). */
pql_err pql_store_batch_account(pql_store_batch *b, const char *id, size_t id_len, int64_t ttl_ms);
pql_err pql_store_batch_hset(pql_store_batch *b, const char *field, size_t field_len,
                             const char *value, size_t value_len);
pql_err pql_store_batch_hdel(pql_store_batch *b, const char *field, size_t field_len);

/** Sets the partition's stored next offset of `topic`. */
pql_err pql_store_batch_offset(pql_store_batch *b, const char *topic, int64_t next_offset);

/** Adds an alert to the outbox / removes a delivered one. */
pql_err pql_store_batch_outbox_put(pql_store_batch *b, const char *id, const void *payload,
                                   size_t payload_len);
pql_err pql_store_batch_outbox_del(pql_store_batch *b, const char *id);

/** HINCRBY on the partition counter hash pql:{g:p}:c:<name>. */
pql_err pql_store_batch_incr(pql_store_batch *b, const char *name, const char *field,
                             int64_t delta);

/** @returns non-zero when the batch would change nothing but seq. */
int pql_store_batch_empty(const pql_store_batch *b);

/** Why Redis refused `b` at its last commit (its own partition's key and the
 *  script's answer, e.g. "FENCED epoch 3 is not ours (2)"), or "" when it
 *  did not.  A commit's errstr holds one refusal only, whichever came last. */
const char *pql_store_batch_refusal(const pql_store_batch *b);

/** Runs `n` batches in one pipelined round trip, each atomically.
 *  results[i] is PQL_OK (applied now or before), PQL_ERR_FENCED (another
 *  member claimed the partition since: nothing written), PQL_ERR_REWOUND
 *  (Redis lost writes it had acknowledged — its epoch or seq is behind ours:
 *  nothing written; claim the partition again) or PQL_ERR_IO.  @returns PQL_OK if every reply was
 *  read, PQL_ERR_IO if the connection failed (then results are PQL_ERR_IO
 *  where unknown; retrying the same batches is safe). */
pql_err pql_store_commit(pql_store *s, pql_store_batch *const *batches, size_t n, pql_err *results,
                         char *errstr, size_t errstr_size);

/** Finds the partition whose state holds `account`: EXISTS on its key in
 *  partitions 0 … max_partitions-1, pipelined in one round trip (tools).
 *  @returns PQL_OK with *partition set (-1 when no partition has it), or
 *  PQL_ERR_IO. */
pql_err pql_store_find_account(pql_store *s, const char *group, const char *account,
                               int32_t max_partitions, int32_t *partition, char *errstr,
                               size_t errstr_size);

/** Reads partition counters hash pql:{g:p}:c:<name> (tests, metrics). */
pql_err pql_store_counters(pql_store *s, const char *group, int32_t partition, const char *name,
                           void (*fn)(void *opaque, const char *field, size_t field_len,
                                      int64_t value),
                           void *opaque, char *errstr, size_t errstr_size);

/** Reads n counter hashes pql:{g:partitions[i]}:c:<names[i]> in one
 *  pipelined round trip; fn is called for every field of hash i.  A field
 *  whose value is not an integer is skipped.  @returns PQL_OK or PQL_ERR_IO. */
pql_err pql_store_read_counters(pql_store *s, const char *group, size_t n,
                                const int32_t *partitions, const char *const *names,
                                void (*fn)(void *opaque, size_t i, const char *field,
                                           size_t field_len, int64_t value),
                                void *opaque, char *errstr, size_t errstr_size);

/** The partition's current epoch (0 when never claimed).  @returns PQL_OK or
 *  PQL_ERR_IO. */
pql_err pql_store_epoch(pql_store *s, const char *group, int32_t partition, int64_t *epoch,
                        char *errstr, size_t errstr_size);

/** How many partitions the group has state for: 1 + the highest partition
 *  number with a meta hash (SCAN; for tools), 0 when none.  @returns PQL_OK
 *  or PQL_ERR_IO. */
pql_err pql_store_partitions(pql_store *s, const char *group, int32_t *count, char *errstr,
                             size_t errstr_size);

/** Round trips and commands sent since open (for benchmarks and /metrics). */
void pql_store_stats(const pql_store *s, uint64_t *round_trips, uint64_t *commands);

#endif
