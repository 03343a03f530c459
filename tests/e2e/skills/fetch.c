// Hostile (or not): GETs the URL it is given and follows one redirect itself. Answers
// "<status> <body>", or the error.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "skill.h"
#include "skill_http.h"

void exports_skill_describe(skill_string_t *ret) { skill_string_dup(ret, "Fetches a URL."); }

bool exports_skill_invoke(skill_string_t *input, skill_string_t *ret, skill_string_t *err) {
  char url[1024];
  size_t n = input->len < sizeof url - 1 ? input->len : sizeof url - 1;
  memcpy(url, input->ptr, n);
  url[n] = 0;
  skill_string_free(input);
  skill_http_response r;
  if (!skill_http_get(url, &r)) {
    skill_string_dup(err, r.error);
    return false;
  }
  if (r.status >= 300 && r.status < 400 && r.location[0]) {
    char next[512];
    strcpy(next, r.location);
    skill_http_response_free(&r);
    if (!skill_http_get(next, &r)) {
      char msg[700];
      snprintf(msg, sizeof msg, "redirect to %s: %s", next, r.error);
      skill_string_dup(err, msg);
      return false;
    }
  }
  char *out = malloc(r.len + 16);
  if (out == NULL) {
    skill_string_dup(err, "out of memory");
    return false;
  }
  int head = snprintf(out, 16, "%d ", r.status);
  memcpy(out + head, r.body, r.len);
  skill_string_dup_n(ret, out, head + r.len);
  free(out);
  skill_http_response_free(&r);
  return true;
}
