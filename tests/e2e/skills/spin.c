// Hostile: never returns. The epoch deadline must stop it.
#include "skill.h"

void exports_skill_describe(skill_string_t *ret) { skill_string_dup(ret, "Spins."); }

bool exports_skill_invoke(skill_string_t *input, skill_string_t *ret, skill_string_t *err) {
  volatile unsigned long n = 0;
  for (;;) n++;
  return false;
}
