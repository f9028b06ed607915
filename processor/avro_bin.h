/* avro_bin.h — Avro binary helpers shared by decode.c and alert.c.
 *
 * Writing: zig-zag varints, strings, doubles and the value union
 * [null, boolean, long, double, string] straight into a pql_buf.
 *
 * Checking: avro-c 1.11.1 must not read untrusted bytes on its own.  Its
 * read_string() writes before its buffer when a message claims a negative
 * length, allocates whatever length a message claims before checking that
 * the bytes exist, and leaks the buffer when the string is truncated.  A
 * pql_avro_check is a writer schema compiled once; pql_avro_check_bytes()
 * walks one message against it without allocating, never past `len`, and
 * enforces the size limits as it reads (a map that claims a million entries
 * is refused at its block count).  Bytes it accepts are exactly one record
 * that avro-c reads without error, in memory bounded by the message size. */
#ifndef PQL_AVRO_BIN_H
#define PQL_AVRO_BIN_H

#include "common.h"

#include <avro.h>

/* Deepest nesting of record fields, map values and array items accepted. */
#define PQL_AVRO_MAX_DEPTH 32

/** Appends the zig-zag varint of `v` (Avro int and long). @returns 0 or -1 (no memory). */
int pql_avro_put_long(pql_buf *b, int64_t v);
/** Appends an Avro string or bytes: length, then the bytes. @returns 0 or -1. */
int pql_avro_put_string(pql_buf *b, const char *s, size_t len);
/** Appends an Avro double (8 bytes, little-endian IEEE 754). @returns 0 or -1. */
int pql_avro_put_double(pql_buf *b, double d);
/** Appends `v` as the union [null, boolean, long, double, string]: a number
 *  that is finite, integral and fits an int64 is written as long, any other
 *  number (fractions, NaN, ±inf) as double.  @returns 0 or -1. */
int pql_avro_put_value(pql_buf *b, const pql_value *v);
/** @returns 1 when `d` is written as an Avro long by pql_avro_put_value(). */
int pql_avro_is_long(double d);

typedef struct pql_avro_check pql_avro_check;

/** Compiles `schema` (not kept: the caller may drop its reference).
 *  @returns the checker (free with pql_avro_check_destroy), or NULL with a
 *  reason in errstr. */
pql_avro_check *pql_avro_check_new(avro_schema_t schema, char *errstr, size_t errstr_size);
void pql_avro_check_destroy(pql_avro_check *c);

/** Checks that buf[0..len) is exactly one value of the compiled schema.
 *  Strings and bytes longer than `max_string` and maps with more than
 *  `max_entries` entries are refused (as are arrays of more than `max_entries`
 *  items that encode in zero bytes: they would cost memory but no input).
 *  @returns PQL_OK; PQL_ERR_DECODE (truncated, corrupt, trailing bytes) or
 *  PQL_ERR_LIMIT, with the byte offset and the field path ("properties.note")
 *  in errstr.  Error texts name the decoder's limits (limits.max_string,
 *  limits.max_properties). */
pql_err pql_avro_check_bytes(const pql_avro_check *c, const void *buf, size_t len,
                             size_t max_string, size_t max_entries, char *errstr,
                             size_t errstr_size);

#endif
