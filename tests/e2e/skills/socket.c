// Hostile: asks for a TCP socket through wasi:sockets (imported beside the skill world).
#include <stdio.h>

#include "socket.h"

void exports_socket_describe(socket_string_t *ret) { socket_string_dup(ret, "Opens a socket."); }

bool exports_socket_invoke(socket_string_t *input, socket_string_t *ret, socket_string_t *err) {
  wasi_sockets_tcp_create_socket_own_tcp_socket_t sock;
  wasi_sockets_tcp_create_socket_error_code_t code;
  if (wasi_sockets_tcp_create_socket_create_tcp_socket(
          WASI_SOCKETS_NETWORK_IP_ADDRESS_FAMILY_IPV4, &sock, &code)) {
    wasi_sockets_tcp_tcp_socket_drop_own(sock);
    socket_string_dup(ret, "got a TCP socket");
    return true;
  }
  char msg[64];
  snprintf(msg, sizeof msg, "no socket: error code %d", code);
  socket_string_dup(err, msg);
  return false;
}
