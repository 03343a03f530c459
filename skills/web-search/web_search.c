// web-search: a ClawOS skill that asks a search backend with a JSON API and answers
// the top results as {"results":[{"title","url","snippet"}], "backend": ...}.
//
// Settings (skill.toml [config], the operator may override them at install):
//   backend = "searxng" (GET <url>/search?q=...&format=json, answer .results[]:
//             title, url, content) or "brave" (GET <url>/res/v1/web/search?q=...&count=N,
//             answer .web.results[]: title, url, description; the API key is the
//             BRAVE_API_KEY secret, which the host adds as X-Subscription-Token);
//   url     = the backend's base URL (it must be in the manifest's http.allow).
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "skill.h"
#include "skill_http.h"
#include "skill_json.h"

#define MAX_QUERY 400
#define DEFAULT_COUNT 5
#define MAX_COUNT 10

void exports_skill_describe(skill_string_t *ret) {
  skill_string_dup(ret, "Searches the web; answers the top results with title, url and snippet.");
}

static char *setting(const char *key, const char *fallback) {
  skill_string_t k, v;
  skill_string_dup(&k, key);
  bool has = clawos_skill_config_get(&k, &v);
  skill_string_free(&k);
  if (!has) return strdup(fallback);
  char *s = malloc(v.len + 1);
  if (s) {
    memcpy(s, v.ptr, v.len);
    s[v.len] = 0;
  }
  skill_string_free(&v);
  return s;
}

static void log_line(clawos_skill_log_level_t level, const char *msg) {
  skill_string_t m;
  skill_string_dup(&m, msg);
  clawos_skill_log_write(level, &m);
  skill_string_free(&m);
}

// Percent-encodes `s` for a query parameter.
static void url_encode(json_out *o, const char *s) {
  static const char hex[] = "0123456789ABCDEF";
  for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
    if ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
        *p == '-' || *p == '_' || *p == '.' || *p == '~') {
      char c[2] = {(char)*p, 0};
      json_out_raw(o, c);
    } else {
      char e[4] = {'%', hex[*p >> 4], hex[*p & 15], 0};
      json_out_raw(o, e);
    }
  }
}

static bool fail(skill_string_t *err, const char *msg) {
  skill_string_dup(err, msg);
  return false;
}

bool exports_skill_invoke(skill_string_t *input, skill_string_t *ret, skill_string_t *err) {
  const char *perr = NULL;
  json *in = json_parse((const char *)input->ptr, input->len, &perr);
  skill_string_free(input);
  if (!in || in->type != JSON_OBJECT) {
    json_free(in);
    return fail(err, "input must be a JSON object like {\"query\": \"...\"}");
  }
  const char *query = json_get_string(in, "query");
  if (!query || !*query || strlen(query) > MAX_QUERY) {
    json_free(in);
    return fail(err, "\"query\" must be a non-empty string of at most 400 bytes");
  }
  int count = DEFAULT_COUNT;
  const json *c = json_get(in, "count");
  if (c) {
    if (c->type != JSON_NUMBER || c->number < 1 || c->number > MAX_COUNT) {
      json_free(in);
      return fail(err, "\"count\" must be a number from 1 to 10");
    }
    count = (int)c->number;
  }

  char *backend = setting("backend", "searxng");
  char *base = setting("url", "http://search.local:8888");
  bool brave = backend && strcmp(backend, "brave") == 0;
  if (!backend || !base || (!brave && strcmp(backend, "searxng") != 0)) {
    free(backend);
    free(base);
    json_free(in);
    return fail(err, "the skill's backend setting must be \"searxng\" or \"brave\"");
  }
  json_out url = {0};
  json_out_raw(&url, base);
  json_out_raw(&url, brave ? "/res/v1/web/search?q=" : "/search?q=");
  url_encode(&url, query);
  if (brave) {
    char n[32];
    snprintf(n, sizeof n, "&count=%d", count);
    json_out_raw(&url, n);
  } else {
    json_out_raw(&url, "&format=json");
  }
  json_free(in);
  if (url.failed) {
    free(backend);
    free(base);
    return fail(err, "out of memory");
  }

  skill_http_response r;
  bool got = skill_http_get(url.data, &r);
  free(url.data);
  if (!got) {
    char msg[256];
    snprintf(msg, sizeof msg, "the search backend could not be reached: %s", r.error);
    free(backend);
    free(base);
    return fail(err, msg);
  }
  if (r.status != 200) {
    char msg[128];
    snprintf(msg, sizeof msg, "the search backend answered HTTP %d", r.status);
    skill_http_response_free(&r);
    free(backend);
    free(base);
    return fail(err, msg);
  }
  json *doc = json_parse(r.body, r.len, &perr);
  skill_http_response_free(&r);
  const json *results = NULL;
  if (doc) results = brave ? json_get(json_get(doc, "web"), "results") : json_get(doc, "results");
  if (!results || results->type != JSON_ARRAY) {
    json_free(doc);
    free(backend);
    free(base);
    return fail(err, "the search backend's answer has no results list");
  }

  json_out out = {0};
  json_out_raw(&out, "{\"results\":[");
  int n = 0;
  for (const json *item = results->child; item && n < count; item = item->next) {
    const char *title = json_get_string(item, "title");
    const char *link = json_get_string(item, "url");
    const char *snippet = json_get_string(item, brave ? "description" : "content");
    if (!title || !link) continue;
    if (n++) json_out_raw(&out, ",");
    json_out_raw(&out, "{\"title\":");
    json_out_string(&out, title);
    json_out_raw(&out, ",\"url\":");
    json_out_string(&out, link);
    json_out_raw(&out, ",\"snippet\":");
    json_out_string(&out, snippet ? snippet : "");
    json_out_raw(&out, "}");
  }
  json_out_raw(&out, "],\"backend\":");
  json_out_string(&out, backend);
  json_out_raw(&out, "}");
  json_free(doc);
  char msg[96];
  snprintf(msg, sizeof msg, "%d results from %s", n, backend);
  log_line(CLAWOS_SKILL_LOG_LEVEL_INFO, msg);
  free(backend);
  free(base);
  if (out.failed) {
    free(out.data);
    return fail(err, "out of memory");
  }
  skill_string_dup_n(ret, out.data, out.len);
  free(out.data);
  return true;
}
