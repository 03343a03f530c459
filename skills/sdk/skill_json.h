// A small JSON reader and writer for ClawOS skills written in C: parse a document
// into a tree (malloc'd, freed with json_free), look up members, and append escaped
// strings to an output buffer. Enough for tool inputs and API answers; depth and size
// are bounded so hostile input cannot exhaust the stack.
#ifndef CLAWOS_SKILL_JSON_H
#define CLAWOS_SKILL_JSON_H

#include <stdbool.h>
#include <stddef.h>

typedef enum { JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT } json_type;

typedef struct json {
  json_type type;
  bool boolean;
  double number;
  char *string;          // JSON_STRING: the decoded text (NUL-terminated, UTF-8)
  char *key;             // a member's name, when inside an object
  struct json *child;    // first element or member
  struct json *next;     // next sibling
} json;

// Parses `len` bytes; NULL on malformed input (with `error` set when not NULL).
json *json_parse(const char *text, size_t len, const char **error);
void json_free(json *j);
// The member `key` of an object, or NULL.
const json *json_get(const json *object, const char *key);
// The string value of member `key`, or NULL when absent or not a string.
const char *json_get_string(const json *object, const char *key);

// A growable output buffer.
typedef struct {
  char *data;
  size_t len, cap;
  bool failed;  // an allocation failed; the content is incomplete
} json_out;

void json_out_raw(json_out *o, const char *s);
// Appends `s` as a JSON string literal, quotes included.
void json_out_string(json_out *o, const char *s);

#endif
