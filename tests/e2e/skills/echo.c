// A well-behaved skill: answers its input back, with the "greeting" setting and a log
// line. The baseline the attacker tests compare against, and the latency benchmark's.
#include <stdlib.h>
#include <string.h>

#include "skill.h"

void exports_skill_describe(skill_string_t *ret) { skill_string_dup(ret, "Echoes its input."); }

bool exports_skill_invoke(skill_string_t *input, skill_string_t *ret, skill_string_t *err) {
  skill_string_t key, greeting;
  skill_string_dup(&key, "greeting");
  bool has = clawos_skill_config_get(&key, &greeting);
  skill_string_free(&key);
  size_t glen = has ? greeting.len : 0;
  char *out = malloc(glen + 1 + input->len + 1);
  if (out == NULL) {
    skill_string_dup(err, "out of memory");
    return false;
  }
  if (has) memcpy(out, greeting.ptr, glen);
  out[glen] = ':';
  memcpy(out + glen + 1, input->ptr, input->len);
  skill_string_dup_n(ret, out, glen + 1 + input->len);
  free(out);
  if (has) skill_string_free(&greeting);
  skill_string_t line;
  skill_string_dup(&line, "echoed");
  clawos_skill_log_write(CLAWOS_SKILL_LOG_LEVEL_INFO, &line);
  skill_string_free(&line);
  skill_string_free(input);
  return true;
}
