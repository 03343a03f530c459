// Outgoing HTTP for ClawOS skills written in C: one GET through the skill's
// wasi:http/outgoing-handler import. The host checks the destination against the
// skill's http.allow and adds the skill's secrets; a refusal comes back as an error
// here ("http-request-denied").
#ifndef CLAWOS_SKILL_HTTP_H
#define CLAWOS_SKILL_HTTP_H

#include <stdbool.h>
#include <stddef.h>

typedef struct {
  int status;        // HTTP status, when a response came
  char *body;        // malloc'd, NUL-terminated; free with skill_http_response_free
  size_t len;
  char location[512]; // the Location header of a redirect, "" when none (or too long)
  char error[160];   // why there is no response
} skill_http_response;

// GET `url` (http:// or https://). True when a response came, whatever its status.
bool skill_http_get(const char *url, skill_http_response *out);
void skill_http_response_free(skill_http_response *r);

// The name of a wasi:http error-code case.
const char *skill_http_error_name(unsigned tag);

#endif
