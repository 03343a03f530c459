#include "skill_json.h"

#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 64

typedef struct {
  const char *p, *end;
  const char *error;
} parser;

static void skip_ws(parser *ps) {
  while (ps->p < ps->end && (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r')) ps->p++;
}

static json *node(json_type t) {
  json *j = calloc(1, sizeof *j);
  if (j) j->type = t;
  return j;
}

static int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

static size_t put_utf8(char *out, unsigned cp) {
  if (cp < 0x80) { out[0] = (char)cp; return 1; }
  if (cp < 0x800) { out[0] = (char)(0xC0 | (cp >> 6)); out[1] = (char)(0x80 | (cp & 0x3F)); return 2; }
  if (cp < 0x10000) {
    out[0] = (char)(0xE0 | (cp >> 12)); out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[2] = (char)(0x80 | (cp & 0x3F)); return 3;
  }
  out[0] = (char)(0xF0 | (cp >> 18)); out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
  out[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); out[3] = (char)(0x80 | (cp & 0x3F)); return 4;
}

static bool read_hex4(parser *ps, unsigned *cp) {
  if (ps->end - ps->p < 4) return false;
  unsigned v = 0;
  for (int i = 0; i < 4; i++) {
    int h = hexval(ps->p[i]);
    if (h < 0) return false;
    v = v * 16 + (unsigned)h;
  }
  ps->p += 4;
  *cp = v;
  return true;
}

// Reads a string literal (the opening quote is at ps->p).
static char *parse_string(parser *ps) {
  ps->p++;
  // Decoded text is never longer than the literal.
  const char *start = ps->p;
  size_t max = 0;
  while (start + max < ps->end && start[max] != '"') max += start[max] == '\\' ? 2 : 1;
  char *out = malloc(max + 1);
  if (!out) { ps->error = "out of memory"; return NULL; }
  size_t n = 0;
  while (ps->p < ps->end && *ps->p != '"') {
    unsigned char c = (unsigned char)*ps->p++;
    if (c < 0x20) { ps->error = "control character in a string"; free(out); return NULL; }
    if (c != '\\') { out[n++] = (char)c; continue; }
    if (ps->p >= ps->end) break;
    char e = *ps->p++;
    switch (e) {
      case '"': out[n++] = '"'; break;
      case '\\': out[n++] = '\\'; break;
      case '/': out[n++] = '/'; break;
      case 'b': out[n++] = '\b'; break;
      case 'f': out[n++] = '\f'; break;
      case 'n': out[n++] = '\n'; break;
      case 'r': out[n++] = '\r'; break;
      case 't': out[n++] = '\t'; break;
      case 'u': {
        unsigned cp;
        if (!read_hex4(ps, &cp)) { ps->error = "bad \\u escape"; free(out); return NULL; }
        if (cp >= 0xD800 && cp < 0xDC00 && ps->end - ps->p >= 6 && ps->p[0] == '\\' && ps->p[1] == 'u') {
          unsigned lo;
          ps->p += 2;
          if (!read_hex4(ps, &lo) || lo < 0xDC00 || lo > 0xDFFF) { ps->error = "bad surrogate pair"; free(out); return NULL; }
          cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        } else if (cp >= 0xD800 && cp < 0xE000) {
          cp = 0xFFFD;
        }
        // 6 escape bytes (12 for a pair) always cover the UTF-8 bytes.
        n += put_utf8(out + n, cp);
        break;
      }
      default: ps->error = "bad escape"; free(out); return NULL;
    }
  }
  if (ps->p >= ps->end) { ps->error = "unterminated string"; free(out); return NULL; }
  ps->p++;
  out[n] = 0;
  return out;
}

static json *parse_value(parser *ps, int depth);

static json *parse_container(parser *ps, int depth, bool object) {
  json *j = node(object ? JSON_OBJECT : JSON_ARRAY);
  if (!j) { ps->error = "out of memory"; return NULL; }
  ps->p++;
  json **tail = &j->child;
  skip_ws(ps);
  if (ps->p < ps->end && *ps->p == (object ? '}' : ']')) { ps->p++; return j; }
  for (;;) {
    char *key = NULL;
    skip_ws(ps);
    if (object) {
      if (ps->p >= ps->end || *ps->p != '"') { ps->error = "expected a member name"; json_free(j); return NULL; }
      key = parse_string(ps);
      if (!key) { json_free(j); return NULL; }
      skip_ws(ps);
      if (ps->p >= ps->end || *ps->p != ':') { ps->error = "expected ':'"; free(key); json_free(j); return NULL; }
      ps->p++;
    }
    json *v = parse_value(ps, depth + 1);
    if (!v) { free(key); json_free(j); return NULL; }
    v->key = key;
    *tail = v;
    tail = &v->next;
    skip_ws(ps);
    if (ps->p < ps->end && *ps->p == ',') { ps->p++; continue; }
    if (ps->p < ps->end && *ps->p == (object ? '}' : ']')) { ps->p++; return j; }
    ps->error = object ? "expected ',' or '}'" : "expected ',' or ']'";
    json_free(j);
    return NULL;
  }
}

static json *parse_value(parser *ps, int depth) {
  if (depth > MAX_DEPTH) { ps->error = "nested too deeply"; return NULL; }
  skip_ws(ps);
  if (ps->p >= ps->end) { ps->error = "unexpected end"; return NULL; }
  char c = *ps->p;
  if (c == '{' || c == '[') return parse_container(ps, depth, c == '{');
  if (c == '"') {
    char *s = parse_string(ps);
    if (!s) return NULL;
    json *j = node(JSON_STRING);
    if (!j) { free(s); ps->error = "out of memory"; return NULL; }
    j->string = s;
    return j;
  }
  if (ps->end - ps->p >= 4 && memcmp(ps->p, "true", 4) == 0) { ps->p += 4; json *j = node(JSON_BOOL); if (j) j->boolean = true; return j; }
  if (ps->end - ps->p >= 5 && memcmp(ps->p, "false", 5) == 0) { ps->p += 5; return node(JSON_BOOL); }
  if (ps->end - ps->p >= 4 && memcmp(ps->p, "null", 4) == 0) { ps->p += 4; return node(JSON_NULL); }
  if (c == '-' || (c >= '0' && c <= '9')) {
    char buf[64];
    size_t n = 0;
    while (ps->p < ps->end && n < sizeof buf - 1 && strchr("+-0123456789.eE", *ps->p)) buf[n++] = *ps->p++;
    buf[n] = 0;
    char *endp;
    double d = strtod(buf, &endp);
    if (endp == buf) { ps->error = "bad number"; return NULL; }
    json *j = node(JSON_NUMBER);
    if (j) j->number = d;
    return j;
  }
  ps->error = "unexpected character";
  return NULL;
}

json *json_parse(const char *text, size_t len, const char **error) {
  parser ps = {text, text + len, NULL};
  json *j = parse_value(&ps, 0);
  if (j) {
    skip_ws(&ps);
    if (ps.p != ps.end) { json_free(j); j = NULL; ps.error = "trailing characters"; }
  }
  if (!j && error) *error = ps.error ? ps.error : "malformed JSON";
  return j;
}

void json_free(json *j) {
  while (j) {
    json *next = j->next;
    json_free(j->child);
    free(j->string);
    free(j->key);
    free(j);
    j = next;
  }
}

const json *json_get(const json *object, const char *key) {
  if (!object || object->type != JSON_OBJECT) return NULL;
  for (const json *m = object->child; m; m = m->next)
    if (m->key && strcmp(m->key, key) == 0) return m;
  return NULL;
}

const char *json_get_string(const json *object, const char *key) {
  const json *m = json_get(object, key);
  return m && m->type == JSON_STRING ? m->string : NULL;
}

static void out_bytes(json_out *o, const char *s, size_t n) {
  if (o->failed) return;
  if (o->len + n + 1 > o->cap) {
    size_t cap = o->cap ? o->cap : 256;
    while (o->len + n + 1 > cap) cap *= 2;
    char *d = realloc(o->data, cap);
    if (!d) { o->failed = true; return; }
    o->data = d;
    o->cap = cap;
  }
  memcpy(o->data + o->len, s, n);
  o->len += n;
  o->data[o->len] = 0;
}

void json_out_raw(json_out *o, const char *s) { out_bytes(o, s, strlen(s)); }

void json_out_string(json_out *o, const char *s) {
  static const char hex[] = "0123456789abcdef";
  out_bytes(o, "\"", 1);
  for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
    char esc[7];
    switch (*p) {
      case '"': out_bytes(o, "\\\"", 2); break;
      case '\\': out_bytes(o, "\\\\", 2); break;
      case '\n': out_bytes(o, "\\n", 2); break;
      case '\r': out_bytes(o, "\\r", 2); break;
      case '\t': out_bytes(o, "\\t", 2); break;
      default:
        if (*p < 0x20) {
          esc[0] = '\\'; esc[1] = 'u'; esc[2] = '0'; esc[3] = '0';
          esc[4] = hex[*p >> 4]; esc[5] = hex[*p & 15];
          out_bytes(o, esc, 6);
        } else {
          out_bytes(o, (const char *)p, 1);
        }
    }
  }
  out_bytes(o, "\"", 1);
}
