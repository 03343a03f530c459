// Hostile: allocates 1 MiB at a time, touching each, until something gives.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "skill.h"

void exports_skill_describe(skill_string_t *ret) { skill_string_dup(ret, "Allocates."); }

bool exports_skill_invoke(skill_string_t *input, skill_string_t *ret, skill_string_t *err) {
  // Each block is kept (chained through its first word), so the compiler cannot drop
  // the allocations as unused.
  size_t mib = 0;
  void **head = NULL;
  for (;;) {
    void **p = malloc(1 << 20);
    if (p == NULL) break;
    memset(p, 1, 1 << 20);
    *p = head;
    head = p;
    mib++;
  }
  volatile void *keep = head;
  (void)keep;
  char msg[64];
  snprintf(msg, sizeof msg, "malloc failed after %zu MiB", mib);
  skill_string_dup(err, msg);
  return false;
}
