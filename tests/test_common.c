/* test_common.c — the number writers of the write path produce the very
 * bytes printf does (stored fields are compared and parsed by other
 * processes and by older pqlstream versions). */
#include "common.h"

#include <criterion/criterion.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

static uint64_t rng = 0x9e3779b97f4a7c15ULL;

static uint64_t next(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static void check_i64(int64_t v)
{
    char got[PQL_I64_MAX_DIGITS + 1], want[32];
    size_t n = pql_fmt_i64(got, v);
    snprintf(want, sizeof want, "%" PRId64, v);
    cr_assert_str_eq(got, want);
    cr_assert_eq(n, strlen(want), "%s: length %zu", want, n);
}

Test(common, fmt_i64_writes_what_printf_writes)
{
    int64_t edges[] = {0,
                       1,
                       -1,
                       9,
                       10,
                       -10,
                       99,
                       100,
                       INT64_MAX,
                       INT64_MIN,
                       INT64_MIN + 1,
                       1700000000000LL,
                       -1700000000000LL};
    for (size_t i = 0; i < sizeof edges / sizeof edges[0]; i++)
        check_i64(edges[i]);
    for (int i = 0; i < 100000; i++) {
        uint64_t r = next();
        check_i64((int64_t)(r >> (r % 64))); /* every magnitude, both signs */
    }
}

static void check_num(double d)
{
    char got[32], want[40];
    size_t n = pql_fmt_num(got, d);
    if (d == floor(d) && fabs(d) < 9007199254740992.0)
        snprintf(want, sizeof want, "%.0f", d);
    else
        snprintf(want, sizeof want, "%.17g", d);
    cr_assert_str_eq(got, want, "%.17g", d);
    cr_assert_eq(n, strlen(want));
}

Test(common, fmt_num_writes_integers_like_0f_and_the_rest_like_17g)
{
    double edges[] = {0.0,
                      -0.0,
                      1,
                      -1,
                      0.5,
                      -0.5,
                      1e15,
                      9007199254740991.0,
                      9007199254740992.0,
                      -9007199254740991.0,
                      1e300,
                      1e-300,
                      NAN,
                      INFINITY,
                      -INFINITY,
                      0.1,
                      2.5,
                      123456789.25};
    for (size_t i = 0; i < sizeof edges / sizeof edges[0]; i++)
        check_num(edges[i]);
    for (int i = 0; i < 100000; i++) {
        uint64_t r = next();
        double d;
        memcpy(&d, &r, sizeof d); /* any bit pattern */
        check_num(d);
        check_num((double)(int64_t)(r >> (r % 64)) * ((r & 1) ? 1 : -1));
    }
}
