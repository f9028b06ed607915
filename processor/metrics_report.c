/* metrics_report.c — the `pqlstream metrics` command (metrics_report.h). */
#include "metrics_report.h"

#include "config.h"
#include "metrics_emit.h"
#include "redis_child.h"
#include "store.h"

#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define MAX_VALUE_WIDTH 24

static void usage(FILE *f)
{
    fprintf(f, "usage: pqlstream metrics [--granularity hour|day|week|month] "
               "[--segment all|channel|plan|rule]\n"
               "                         [--since YYYY-MM-DD|DURATION] [--config FILE] "
               "[--option=value …]\n\n"
               "Prints the metric aggregates stored in Redis: periods as rows, figures as "
               "columns.\n"
               "Defaults: --granularity day, --segment all, --since 30 days back (hour: 2d, "
               "week: 12w, month: 1 year).\n"
               "Redis and the group come from the same configuration as `pqlstream run` "
               "(see pqlstream run --help).\n");
}

/* Display width of UTF-8 text: its code points. */
static int width_of(const char *s)
{
    int w = 0;
    for (; *s; s++)
        w += ((unsigned char)*s & 0xc0) != 0x80;
    return w;
}

/* Prints s padded to `width` columns (right-aligned unless `left`). */
static void cell(FILE *out, const char *s, int width, int left)
{
    int pad = width - width_of(s);
    if (!left)
        for (int i = 0; i < pad; i++)
            fputc(' ', out);
    fputs(s, out);
    if (left)
        for (int i = 0; i < pad; i++)
            fputc(' ', out);
}

static const struct {
    const char *title;
    int width;
} columns[] = {
    {"signups", 8},  {"qualified", 10},    {"pql_rate", 9}, {"new PQLs", 9},   {"open", 6},
    {"ttp p50", 8},  {"ttp p90", 8},       {"conv", 6},     {"PQL conv", 9},   {"non-PQL", 8},
    {"PQL→paid", 9}, {"non-PQL→paid", 13}, {"lift", 7},     {"expansion", 10},
};
#define NCOLUMNS (sizeof(columns) / sizeof(columns[0]))

static void print_row(FILE *out, const char *label, int label_w, const char *seg, int seg_w,
                      const pql_metric_figures *f)
{
    char v[NCOLUMNS][32];
    snprintf(v[0], 32, "%lld", (long long)f->signups);
    snprintf(v[1], 32, "%lld", (long long)f->signups_qualified);
    pql_metric_format_rate(f->pql_rate, v[2], 32);
    snprintf(v[3], 32, "%lld", (long long)f->pqls_new);
    snprintf(v[4], 32, "%lld", (long long)f->pqls_open);
    pql_metric_format_duration(f->time_to_pql_p50_ms, v[5], 32);
    pql_metric_format_duration(f->time_to_pql_p90_ms, v[6], 32);
    snprintf(v[7], 32, "%lld", (long long)f->conversions);
    snprintf(v[8], 32, "%lld", (long long)f->pql_conversions);
    snprintf(v[9], 32, "%lld", (long long)f->non_pql_conversions);
    pql_metric_format_rate(f->pql_to_paid_rate, v[10], 32);
    pql_metric_format_rate(f->non_pql_to_paid_rate, v[11], 32);
    pql_metric_format_lift(f, v[12], 32);
    snprintf(v[13], 32, "%lld", (long long)f->expansion_alerts);
    cell(out, label, label_w, 1);
    if (seg) {
        fputs("  ", out);
        cell(out, seg, seg_w, 1);
    }
    for (size_t i = 0; i < NCOLUMNS; i++) {
        fputc(' ', out);
        cell(out, v[i], columns[i].width, 0);
    }
    fputc('\n', out);
}

static void period_label(pql_granularity g, int64_t start, char *out, size_t size)
{
    char iso[40];
    pql_format_utc(start, iso, sizeof iso);
    if (g == PQL_GRAN_HOUR)
        snprintf(out, size, "%.10s %.5s", iso, iso + 11);
    else if (g == PQL_GRAN_MONTH)
        snprintf(out, size, "%.7s", iso);
    else
        snprintf(out, size, "%.10s", iso);
}

typedef struct opts {
    pql_granularity g;
    int seg;             /* pql_segment */
    const char *since_s; /* as given, or NULL */
    int64_t since;       /* ms */
} opts;

/* Takes our flags out of argv (the rest goes to the configuration).
 * @returns 0, 1 (--help printed) or -1 (usage error printed). */
static int parse_opts(int *argc, char **argv, opts *o, FILE *out, FILE *err)
{
    const char *gran = "day", *seg = "all";
    o->since_s = NULL;
    int k = 1;
    for (int i = 1; i < *argc; i++) {
        const char *a = argv[i], *val = NULL;
        const char **slot = NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(out);
            return 1;
        }
        static const char *const names[] = {"--granularity", "--segment", "--since"};
        const char **slots[] = {&gran, &seg, &o->since_s};
        for (int n = 0; n < 3 && !slot; n++) {
            size_t len = strlen(names[n]);
            if (strncmp(a, names[n], len) != 0) continue;
            if (a[len] == '=')
                val = a + len + 1;
            else if (a[len] == '\0' && i + 1 < *argc)
                val = argv[++i];
            else if (a[len] == '\0') {
                fprintf(err, "pqlstream metrics: %s needs a value\n", names[n]);
                return -1;
            } else
                continue;
            slot = slots[n];
        }
        if (slot)
            *slot = val;
        else
            argv[k++] = argv[i];
    }
    *argc = k;
    argv[k] = NULL;
    int g = pql_granularity_parse(gran);
    o->seg = pql_segment_parse(seg);
    if (g < 0) {
        fprintf(err, "pqlstream metrics: --granularity '%s' must be hour, day, week or month\n",
                gran);
        return -1;
    }
    if (o->seg < 0) {
        fprintf(err, "pqlstream metrics: --segment '%s' must be all, channel, plan or rule\n", seg);
        return -1;
    }
    o->g = (pql_granularity)g;
    static const int64_t back[PQL_NGRAN] = {2 * PQL_MS_DAY, 30 * PQL_MS_DAY, 84 * PQL_MS_DAY,
                                            366 * PQL_MS_DAY};
    int64_t ago;
    if (!o->since_s)
        o->since = pql_now_ms() - back[o->g];
    else if (pql_parse_duration(o->since_s, strlen(o->since_s), &ago) == 0)
        o->since = pql_now_ms() - ago;
    else if (pql_parse_utc(o->since_s, &o->since) != 0) {
        fprintf(err,
                "pqlstream metrics: --since '%s' is neither a date (2024-01-01, "
                "2024-01-01T13:00Z) nor a duration back from now (30d, 12w, 48h)\n",
                o->since_s);
        return -1;
    }
    o->since = pql_period_start(o->g, o->since);
    return 0;
}

/* Prints the table of the periods of `g` since o->since.  @returns 0 or 1. */
static int report(pql_store *st, const pql_config *cfg, int32_t nparts, const opts *o, FILE *out,
                  FILE *err)
{
    char e[512], since[40];
    pql_metric_period *all = NULL, *mine;
    size_t nall = 0, n = 0;
    if (pql_metrics_read_periods(st, cfg->group, nparts, &all, &nall, e, sizeof e)) {
        fprintf(err, "pqlstream metrics: %s\n", e);
        return 1;
    }
    mine = all;
    for (size_t i = 0; i < nall; i++)
        if (all[i].granularity == o->g && all[i].start >= o->since) mine[n++] = all[i];
    pql_metric_table **tables = calloc(n + 1, sizeof(*tables));
    if (!tables) abort();
    if (pql_metrics_read_tables(st, cfg->group, nparts, mine, n, tables, e, sizeof e)) {
        fprintf(err, "pqlstream metrics: %s\n", e);
        free(tables);
        free(all);
        return 1;
    }
    pql_format_utc(o->since, since, sizeof since);
    fprintf(out,
            "pqlstream metrics — group %s (%d partitions), %s periods since %s, segment %s\n\n",
            cfg->group, (int)nparts, pql_granularity_name(o->g), since,
            pql_segment_name((pql_segment)o->seg));
    /* the segment values shown, and the total over the periods */
    pql_metric_table *total = pql_metric_table_new(o->g, o->since);
    if (!total) abort();
    int seg_w = (int)strlen(pql_segment_name((pql_segment)o->seg));
    for (size_t i = 0; i < n; i++) {
        if (pql_metric_table_merge(total, tables[i])) abort();
        for (size_t c = 0; c < pql_metric_table_size(tables[i]); c++) {
            pql_segment k;
            const char *v;
            pql_metric_table_get(tables[i], c, &k, &v, NULL);
            int w = width_of(v);
            if ((int)k == o->seg && w > seg_w) seg_w = w < MAX_VALUE_WIDTH ? w : MAX_VALUE_WIDTH;
        }
    }
    int label_w = o->g == PQL_GRAN_HOUR ? 16 : 10;
    const char *seg_title = o->seg == PQL_SEG_ALL ? NULL : pql_segment_name((pql_segment)o->seg);
    cell(out, "period", label_w, 1);
    if (seg_title) {
        fputs("  ", out);
        cell(out, seg_title, seg_w, 1);
    }
    for (size_t i = 0; i < NCOLUMNS; i++) {
        fputc(' ', out);
        cell(out, columns[i].title, columns[i].width, 0);
    }
    fputc('\n', out);
    size_t rows = 0;
    for (size_t i = 0; i <= n; i++) { /* the periods, then the total */
        pql_metric_table *t = i < n ? tables[i] : total;
        char label[40];
        if (i < n)
            period_label(o->g, mine[i].start, label, sizeof label);
        else
            snprintf(label, sizeof label, "total");
        if (i == n && rows == 0) break;
        if (i == n) fputc('\n', out);
        for (size_t c = 0; c < pql_metric_table_size(t); c++) {
            pql_segment k;
            const char *v;
            pql_metric_figures f;
            pql_metric_table_get(t, c, &k, &v, &f);
            if ((int)k != o->seg) continue;
            print_row(out, label, label_w, seg_title ? v : NULL, seg_w, &f);
            rows += i < n;
        }
    }
    if (rows == 0) {
        fprintf(out, "(no %s periods with figures since %s)\n", pql_granularity_name(o->g), since);
    } else {
        int ti = pql_metric_table_find(total, PQL_SEG_ALL, "all");
        pql_metric_figures f;
        char lift[16], a[16], b[16];
        if (ti >= 0) {
            pql_metric_table_get(total, (size_t)ti, NULL, NULL, &f);
            pql_metric_format_lift(&f, lift, sizeof lift);
            pql_metric_format_rate(f.pql_to_paid_rate, a, sizeof a);
            pql_metric_format_rate(f.non_pql_to_paid_rate, b, sizeof b);
            fprintf(out,
                    "\nPQL vs non-PQL: %s of the PQLs converted, %s of the signups that never "
                    "qualified did: lift %s.\n",
                    a, b, lift);
        }
        fprintf(out, "pql_rate: share of the period's signups qualified so far.  PQL→paid: of the "
                     "period's new PQLs, the share\nconverted since.  non-PQL→paid: of the "
                     "period's signups that never qualified, the share converted.\n"
                     "lift = PQL→paid ÷ non-PQL→paid.  ttp: time to PQL (±2%%).  — : zero "
                     "denominator.  Times are UTC.\n");
    }
    for (size_t i = 0; i < n; i++)
        pql_metric_table_destroy(tables[i]);
    pql_metric_table_destroy(total);
    free(tables);
    free(all);
    return 0;
}

int pql_metrics_command(int argc, char **argv, char *const *envp, FILE *out, FILE *err)
{
    opts o;
    int rc = parse_opts(&argc, argv, &o, out, err);
    if (rc) return rc > 0 ? 0 : 2;
    pql_config cfg;
    char e[1024], url[1200];
    int argi = 0;
    if (pql_config_load_all(&cfg, argc, argv, envp, &argi, e, sizeof e) < 0) {
        fprintf(err, "pqlstream metrics: %s\n", e);
        pql_config_term(&cfg);
        return 2;
    }
    if (argi < argc) {
        fprintf(err, "pqlstream metrics: unexpected argument '%s' (see pqlstream metrics --help)\n",
                argv[argi]);
        pql_config_term(&cfg);
        return 2;
    }
    rc = 1;
    pql_store *st = NULL;
    pql_redis_child *child = NULL;
    int32_t nparts = 0;
    if (pql_redis_for_tool(cfg.redis_url, cfg.data_dir, url, sizeof url, &child, e, sizeof e) < 0) {
        fprintf(err, "pqlstream metrics: %s\n", e);
        goto out;
    }
    if (!(st = pql_store_open(url, cfg.redis_timeout_ms, e, sizeof e))) {
        fprintf(err, "pqlstream metrics: cannot read Redis: %s (check PQLSTREAM_REDIS)\n", e);
        goto out;
    }
    if (pql_store_partitions(st, cfg.group, &nparts, e, sizeof e)) {
        fprintf(err, "pqlstream metrics: %s\n", e);
        goto out;
    }
    if (nparts == 0) {
        fprintf(err,
                "pqlstream metrics: Redis has no state for group '%s': no processor of that "
                "group has run against it yet, or the group is another (set --group or "
                "PQLSTREAM_GROUP)\n",
                cfg.group);
        goto out;
    }
    rc = report(st, &cfg, nparts, &o, out, err);
out:
    pql_store_close(st);
    pql_redis_child_stop(child);
    pql_config_term(&cfg);
    return rc;
}
