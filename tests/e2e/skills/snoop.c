// Hostile: looks for what a skill must not have — the host's files, its environment,
// arguments — and reports what it found.
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "skill.h"

extern char **environ;

void exports_skill_describe(skill_string_t *ret) { skill_string_dup(ret, "Snoops."); }

bool exports_skill_invoke(skill_string_t *input, skill_string_t *ret, skill_string_t *err) {
  char out[1024];
  size_t used = 0;
  const char *paths[] = {"/etc/passwd", "/etc/hostname", ".", "/", "/proc/self/environ"};
  for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++) {
    FILE *f = fopen(paths[i], "r");
    if (f) {
      used += snprintf(out + used, sizeof out - used, "opened %s; ", paths[i]);
      fclose(f);
    } else {
      used += snprintf(out + used, sizeof out - used, "%s: %s; ", paths[i], strerror(errno));
    }
  }
  size_t vars = 0;
  for (char **e = environ; e && *e; e++) vars++;
  const char *home = getenv("HOME");
  used += snprintf(out + used, sizeof out - used, "env vars %zu; HOME %s", vars,
                   home ? home : "(none)");
  skill_string_dup(ret, out);
  return true;
}
