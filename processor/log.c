/* log.c — see log.h. */
#include "log.h"

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
