/* redis_child.h — a private redis-server child process on a unix socket.
 *
 * Used by the embedded default of `pqlstream run` (no PQLSTREAM_REDIS
 * configured) and by the tests.  The child listens on no TCP port (port 0),
 * on `<dir>/redis.sock`, keeps its RDB/AOF files in `dir`, and dies with us
 * (PR_SET_PDEATHSIG) so an aborted test leaves no server behind. */
#ifndef PQL_REDIS_CHILD_H
#define PQL_REDIS_CHILD_H

#include <sys/types.h>

typedef struct pql_redis_child pql_redis_child;

typedef struct pql_redis_child_opts {
    const char *dir;    /* data directory, created if missing (required) */
    int appendonly;     /* 1: appendonly yes, appendfsync everysec */
    const char *binary; /* default "redis-server" from PATH */
} pql_redis_child_opts;

/** Starts redis-server and waits (up to 5 s) until it answers PING.
 *  @returns NULL on error with a reason ("redis-server not found: apt-get install redis-server").
 */
pql_redis_child *pql_redis_child_start(const pql_redis_child_opts *opts, char *errstr,
                                       size_t errstr_size);

/** @returns "unix:///…/redis.sock", the URL to give pql_store_open(). */
const char *pql_redis_child_url(const pql_redis_child *c);
pid_t pql_redis_child_pid(const pql_redis_child *c);

/** Stops the server (SIGTERM, wait, SIGKILL after 5 s) and frees `c`.  NULL is fine. */
void pql_redis_child_stop(pql_redis_child *c);

/** Kills it hard (SIGKILL) and restarts it on the same dir and socket (fault tests).
 *  @returns 0 or -1 with errstr. */
int pql_redis_child_restart(pql_redis_child *c, char *errstr, size_t errstr_size);

/** The Redis a command-line tool reads (rules explain, metrics): `redis_url`
 *  when set; else the embedded default's private server under
 *  `<data_dir>/redis` — the one `pqlstream run` has up, or, when run is down,
 *  one started on its data for the caller (*child: stop it when done).
 *  @returns 0 with the URL in `url`, or -1 with what to do in errstr. */
int pql_redis_for_tool(const char *redis_url, const char *data_dir, char *url, size_t url_size,
                       pql_redis_child **child, char *errstr, size_t errstr_size);

#endif
