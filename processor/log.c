/* log.c — see log.h. */
#include "log.h"

#include <librdkafka/rdkafka.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static pql_log_level threshold = PQL_LOG_INFO;
static const char *const names[] = {"debug", "info", "warn", "error"};

int pql_log_set_level(const char *name)
{
    for (int i = 0; i < 4; i++)
        if (strcmp(name, names[i]) == 0) {
            threshold = (pql_log_level)i;
            return 0;
        }
    return -1;
}

void pql_log(pql_log_level level, const char *msg, const char *fmt, ...)
{
    if (level < threshold) return;
    struct timespec ts;
    struct tm tm;
    char when[32], line[2048];
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%S", &tm);
    int n = snprintf(line, sizeof(line), "%s.%03ldZ level=%s msg=\"%s\"", when,
                     ts.tv_nsec / 1000000, names[level], msg);
    if (fmt && *fmt && n > 0 && (size_t)n < sizeof(line) - 1) {
        line[n++] = ' ';
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(line + n, sizeof(line) - (size_t)n, fmt, ap);
        va_end(ap);
    }
    fprintf(stderr, "%s\n", line);
}

void pql_log_kafka(const rd_kafka_t *rk, int level, const char *facility, const char *buf)
{
    pql_log_level l = level <= 3   ? PQL_LOG_ERROR
                      : level == 4 ? PQL_LOG_WARN
                      : level <= 6 ? PQL_LOG_INFO
                                   : PQL_LOG_DEBUG;
    if (l < threshold) return;
    char detail[1024];
    size_t n = 0;
    for (const char *c = buf; *c && n < sizeof(detail) - 1; c++) /* keep it one quoted value */
        detail[n++] = *c == '"' ? '\'' : (*c == '\n' || *c == '\r') ? ' ' : *c;
    detail[n] = '\0';
    pql_log(l, "kafka", "facility=%s client=%s detail=\"%s\"", facility,
            rk ? rd_kafka_name(rk) : "-", detail);
}
