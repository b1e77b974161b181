#!/bin/bash
# What a node-to-node round trip costs on one machine over loopback TCP and over a Unix-domain
# socket: a 4 KiB request (a write's copy) and a 64-byte reply between two processes on CPU 0,
# 20,000 round trips, RUNS runs of each, alternating. Needs a C compiler (Debian package gcc).
# The README's "Replicated" section weighs Unix sockets between co-located nodes with it.
#   bash benches/socket_pingpong.sh [RUNS]        # default 3
set -euo pipefail
RUNS=${1:-3}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
command -v cc > /dev/null || { echo "socket_pingpong.sh: needs a C compiler (apt-get install gcc)"; exit 1; }
cat > "$W/pp.c" <<'C'
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum { ROUNDS = 20000, REQUEST = 4096 + 64, REPLY = 64 };

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

static void read_all(int fd, char *b, int n) {
  for (int got = 0; got < n;) {
    int r = read(fd, b + got, n - got);
    if (r <= 0) exit(1);
    got += r;
  }
}

static void tcp_pair(int sv[2]) {
  int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t len = sizeof a;
  if (bind(l, (void *)&a, sizeof a) || listen(l, 1) || getsockname(l, (void *)&a, &len)) exit(1);
  sv[0] = socket(AF_INET, SOCK_STREAM, 0);
  if (connect(sv[0], (void *)&a, sizeof a)) exit(1);
  sv[1] = accept(l, 0, 0);
  setsockopt(sv[0], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  setsockopt(sv[1], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

int main(int argc, char **argv) {
  int unix_socket = argc > 1 && !strcmp(argv[1], "unix"), sv[2];
  if (unix_socket) {
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) exit(1);
  } else {
    tcp_pair(sv);
  }
  char *b = calloc(1, REQUEST);
  if (fork() == 0) {
    for (int i = 0; i < ROUNDS; i++) {
      read_all(sv[1], b, REQUEST);
      if (write(sv[1], b, REPLY) != REPLY) exit(1);
    }
    exit(0);
  }
  double t = now();
  for (int i = 0; i < ROUNDS; i++) {
    if (write(sv[0], b, REQUEST) != REQUEST) exit(1);
    read_all(sv[0], b, REPLY);
  }
  t = now() - t;
  printf("%s: %.1f us per round trip\n", unix_socket ? "unix" : "tcp", t / ROUNDS * 1e6);
  wait(0);
  return 0;
}
C
cc -O2 -o "$W/pp" "$W/pp.c"
for _ in $(seq "$RUNS"); do
  taskset -c 0 "$W/pp" tcp
  taskset -c 0 "$W/pp" unix
done
