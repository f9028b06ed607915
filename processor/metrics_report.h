/* metrics_report.h — `pqlstream metrics`: the current metric table for a
 * person, read from Redis (metrics_emit.h's readers).  An I/O edge.
 *
 *   pqlstream metrics [--granularity hour|day|week|month] [--segment
 *                     all|channel|plan|rule] [--since DATE|DURATION]
 *                     [--config FILE] [--option=value …]
 *
 * Periods are rows, figures columns; the PQL-to-paid and non-PQL-to-paid
 * rates sit side by side with their ratio (the lift), and a total row sums
 * the periods shown (counts add up over periods, so its rates and
 * percentiles are those of the union).  Configuration is loaded as for `run`
 * (the group names the keys; redis.url, or when it is empty the embedded
 * default's Redis in data_dir: the running one, else one started on its data
 * for the time of the command). */
#ifndef PQL_METRICS_REPORT_H
#define PQL_METRICS_REPORT_H

#include <stdio.h>

/** Runs the command; argv[0] is "metrics".  Writes the table to `out`,
 *  errors (what was wrong, where, what to do) to `err`.  @returns the exit
 *  code: 0, 1 (Redis unreachable, no state for the group) or 2 (usage). */
int pql_metrics_command(int argc, char **argv, char *const *envp, FILE *out, FILE *err);

#endif
