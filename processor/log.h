/* log.h — structured logs: one line per event of note, key=value, to stderr.
 *
 *   2026-11-23T17:20:01.123Z level=info msg="partition assigned" partition=3 epoch=7
 *
 * Callers format the key=value tail themselves; values that may contain
 * spaces are quoted by the caller.  Secrets are never passed here. */
#ifndef PQL_LOG_H
#define PQL_LOG_H

typedef enum pql_log_level {
    PQL_LOG_DEBUG = 0,
    PQL_LOG_INFO,
    PQL_LOG_WARN,
    PQL_LOG_ERROR,
} pql_log_level;

/** Sets the threshold from "debug" | "info" | "warn" | "error". @returns 0 or -1. */
int pql_log_set_level(const char *name);

void pql_log(pql_log_level level, const char *msg, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/** librdkafka's log callback (rd_kafka_conf_set_log_cb): its lines become
 *  ours, `msg="kafka" facility=… client=… detail="…"`, at the level mapped
 *  from syslog's (0–3 error, 4 warn, 5–6 info, 7 debug).  Thread-safe. */
struct rd_kafka_s;
void pql_log_kafka(const struct rd_kafka_s *rk, int level, const char *facility, const char *buf);

#define pql_debug(msg, ...) pql_log(PQL_LOG_DEBUG, msg, __VA_ARGS__)
#define pql_info(msg, ...)  pql_log(PQL_LOG_INFO, msg, __VA_ARGS__)
#define pql_warn(msg, ...)  pql_log(PQL_LOG_WARN, msg, __VA_ARGS__)
#define pql_error(msg, ...) pql_log(PQL_LOG_ERROR, msg, __VA_ARGS__)

#endif
