#include "skill_http.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "skill.h"

static const char *const ERROR_NAMES[] = {
    "dns-timeout", "dns-error", "destination-not-found", "destination-unavailable",
    "destination-ip-prohibited", "destination-ip-unroutable", "connection-refused",
    "connection-terminated", "connection-timeout", "connection-read-timeout",
    "connection-write-timeout", "connection-limit-reached", "tls-protocol-error",
    "tls-certificate-error", "tls-alert-received", "http-request-denied",
    "http-request-length-required", "http-request-body-size", "http-request-method-invalid",
    "http-request-uri-invalid", "http-request-uri-too-long",
    "http-request-header-section-size", "http-request-header-size",
    "http-request-trailer-section-size", "http-request-trailer-size",
    "http-response-incomplete", "http-response-header-section-size",
    "http-response-header-size", "http-response-body-size",
    "http-response-trailer-section-size", "http-response-trailer-size",
    "http-response-transfer-coding", "http-response-content-coding",
    "http-response-timeout", "http-upgrade-failed", "http-protocol-error", "loop-detected",
    "configuration-error", "internal-error",
};

const char *skill_http_error_name(unsigned tag) {
  return tag < sizeof ERROR_NAMES / sizeof ERROR_NAMES[0] ? ERROR_NAMES[tag] : "unknown-error";
}

void skill_http_response_free(skill_http_response *r) {
  free(r->body);
  r->body = NULL;
  r->len = 0;
}

bool skill_http_get(const char *url, skill_http_response *out) {
  memset(out, 0, sizeof *out);
  wasi_http_types_scheme_t scheme;
  const char *rest;
  if (strncmp(url, "http://", 7) == 0) {
    scheme.tag = WASI_HTTP_TYPES_SCHEME_HTTP;
    rest = url + 7;
  } else if (strncmp(url, "https://", 8) == 0) {
    scheme.tag = WASI_HTTP_TYPES_SCHEME_HTTPS;
    rest = url + 8;
  } else {
    snprintf(out->error, sizeof out->error, "not an http(s) URL");
    return false;
  }
  const char *slash = strchr(rest, '/');
  size_t authority_len = slash ? (size_t)(slash - rest) : strlen(rest);

  wasi_http_types_own_outgoing_request_t req =
      wasi_http_types_constructor_outgoing_request(wasi_http_types_constructor_fields());
  wasi_http_types_borrow_outgoing_request_t b = wasi_http_types_borrow_outgoing_request(req);
  wasi_http_types_method_t get = {.tag = WASI_HTTP_TYPES_METHOD_GET};
  skill_string_t authority, path;
  skill_string_dup_n(&authority, rest, authority_len);
  skill_string_dup(&path, slash ? slash : "/");
  bool ok = wasi_http_types_method_outgoing_request_set_method(b, &get) &&
            wasi_http_types_method_outgoing_request_set_scheme(b, &scheme) &&
            wasi_http_types_method_outgoing_request_set_authority(b, &authority) &&
            wasi_http_types_method_outgoing_request_set_path_with_query(b, &path);
  skill_string_free(&authority);
  skill_string_free(&path);
  if (!ok) {
    wasi_http_types_outgoing_request_drop_own(req);
    snprintf(out->error, sizeof out->error, "the URL was not accepted");
    return false;
  }

  wasi_http_outgoing_handler_own_future_incoming_response_t future;
  wasi_http_outgoing_handler_error_code_t code;
  if (!wasi_http_outgoing_handler_handle(req, NULL, &future, &code)) {
    snprintf(out->error, sizeof out->error, "%s", skill_http_error_name(code.tag));
    return false;
  }
  wasi_http_types_borrow_future_incoming_response_t fb =
      wasi_http_types_borrow_future_incoming_response(future);
  wasi_http_types_result_result_own_incoming_response_error_code_void_t res;
  while (!wasi_http_types_method_future_incoming_response_get(fb, &res)) {
    wasi_http_types_own_pollable_t p = wasi_http_types_method_future_incoming_response_subscribe(fb);
    wasi_io_poll_method_pollable_block(wasi_io_poll_borrow_pollable(p));
    wasi_io_poll_pollable_drop_own(p);
  }
  wasi_http_types_future_incoming_response_drop_own(future);
  if (res.is_err) {
    snprintf(out->error, sizeof out->error, "response already taken");
    return false;
  }
  if (res.val.ok.is_err) {
    snprintf(out->error, sizeof out->error, "%s", skill_http_error_name(res.val.ok.val.err.tag));
    return false;
  }
  wasi_http_types_own_incoming_response_t resp = res.val.ok.val.ok;
  wasi_http_types_borrow_incoming_response_t rb = wasi_http_types_borrow_incoming_response(resp);
  out->status = wasi_http_types_method_incoming_response_status(rb);
  wasi_http_types_own_headers_t headers = wasi_http_types_method_incoming_response_headers(rb);
  wasi_http_types_field_name_t location_name;
  skill_string_dup(&location_name, "location");
  wasi_http_types_list_field_value_t values;
  wasi_http_types_method_fields_get(wasi_http_types_borrow_fields(headers), &location_name, &values);
  if (values.len > 0 && values.ptr[0].len < sizeof out->location) {
    memcpy(out->location, values.ptr[0].ptr, values.ptr[0].len);
    out->location[values.ptr[0].len] = 0;
  }
  wasi_http_types_list_field_value_free(&values);
  skill_string_free(&location_name);
  wasi_http_types_fields_drop_own(headers);

  wasi_http_types_own_incoming_body_t body;
  if (!wasi_http_types_method_incoming_response_consume(rb, &body)) {
    wasi_http_types_incoming_response_drop_own(resp);
    snprintf(out->error, sizeof out->error, "no response body");
    return false;
  }
  wasi_http_types_own_input_stream_t stream;
  if (!wasi_http_types_method_incoming_body_stream(wasi_http_types_borrow_incoming_body(body), &stream)) {
    wasi_http_types_incoming_body_drop_own(body);
    wasi_http_types_incoming_response_drop_own(resp);
    snprintf(out->error, sizeof out->error, "no response body stream");
    return false;
  }
  size_t cap = 4096;
  out->body = malloc(cap);
  bool failed = out->body == NULL;
  while (!failed) {
    skill_list_u8_t chunk;
    wasi_io_streams_stream_error_t serr;
    if (!wasi_io_streams_method_input_stream_blocking_read(
            wasi_io_streams_borrow_input_stream(stream), 65536, &chunk, &serr)) {
      if (serr.tag != WASI_IO_STREAMS_STREAM_ERROR_CLOSED) {
        wasi_io_error_error_drop_own(serr.val.last_operation_failed);
        snprintf(out->error, sizeof out->error, "reading the response body failed");
        failed = true;
      }
      break;
    }
    if (out->len + chunk.len + 1 > cap) {
      while (out->len + chunk.len + 1 > cap) cap *= 2;
      char *grown = realloc(out->body, cap);
      if (grown == NULL) {
        failed = true;
        snprintf(out->error, sizeof out->error, "out of memory");
      } else {
        out->body = grown;
      }
    }
    if (!failed) {
      memcpy(out->body + out->len, chunk.ptr, chunk.len);
      out->len += chunk.len;
    }
    skill_list_u8_free(&chunk);
  }
  wasi_io_streams_input_stream_drop_own(stream);
  wasi_http_types_incoming_body_drop_own(body);
  wasi_http_types_incoming_response_drop_own(resp);
  if (failed) {
    skill_http_response_free(out);
    return false;
  }
  out->body[out->len] = 0;
  return true;
}
