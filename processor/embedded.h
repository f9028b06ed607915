/* embedded.h — files compiled into the binary (schemas/NAME.avsc, processor/NAME.lua).
 *
 * The build turns each file into a NUL-terminated string (cmake/embed.cmake),
 * so `pqlstream` needs nothing beside it at run time. */
#ifndef PQL_EMBEDDED_H
#define PQL_EMBEDDED_H
#include <stddef.h>

/** @returns the contents of the embedded file with base name `name`
 *  ("UsageEvent.avsc", "store.lua"), NUL-terminated and static, or NULL.
 *  *len (if not NULL) receives the length without the NUL. */
const char *pql_embedded_get(const char *name, size_t *len);

#endif
