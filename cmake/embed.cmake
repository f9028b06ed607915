# Turns each file in FILES into a C string in OUT, looked up by base name
# through pql_embedded_get() (see processor/embedded.h).  FILES is a
# "|"-separated list (a ";" list would be split by add_custom_command).
string(REPLACE "|" ";" FILES "${FILES}")
set(body "#include <stddef.h>\n#include <string.h>\n")
set(table "")
set(i 0)
foreach(f ${FILES})
  get_filename_component(name ${f} NAME)
  file(READ ${f} hex HEX)
  string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," hex "${hex}")
  string(APPEND body "static const char f${i}[] = {${hex}0x00};\n")
  string(APPEND table "  {\"${name}\", f${i}, sizeof(f${i}) - 1},\n")
  math(EXPR i "${i} + 1")
endforeach()
string(APPEND body "static const struct { const char *name; const char *data; size_t len; } files[] = {\n${table}  {NULL, NULL, 0}\n};\n")
string(APPEND body "const char *pql_embedded_get(const char *name, size_t *len) {\n  for (size_t i = 0; files[i].name; i++)\n    if (strcmp(files[i].name, name) == 0) { if (len) *len = files[i].len; return files[i].data; }\n  return NULL;\n}\n")
file(WRITE ${OUT}.tmp "${body}")
file(COPY_FILE ${OUT}.tmp ${OUT} ONLY_IF_DIFFERENT)
