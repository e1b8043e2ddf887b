/* The least a proxy on CPU 0 can cost in the layout of bench/ws_bench.py and
 * bench/http_bench.py: a single-threaded epoll TCP relay with no parsing at all, busy
 * polling (poll with a zero timeout until WINDOW microseconds have passed with nothing
 * to do, then sleep in epoll_wait). Both benchmarks measure it beside the balancer
 * (``--no-relay`` skips it), so the WebSocket ratio and the HTTP p99 can be read
 * against what the layout itself allows.
 *
 *     cc -O2 -o ws_relay bench/ws_relay.c && ./ws_relay LISTEN_PORT UPSTREAM_PORT WINDOW
 *
 * A benchmark reference, not a proxy: it relays bytes between each accepted connection
 * and a new one to 127.0.0.1:UPSTREAM_PORT, and spins on a send that would block
 * (never the case for 32-byte ping-pong; rare for a 64 KiB answer to wrk, which reads
 * at once, and spinning only delays the relay's own other connections).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_FDS 65536

static int peer[MAX_FDS];

static struct sockaddr_in loopback(int port) {
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return addr;
}

static int watch(int epoll, int fd) {
    struct epoll_event event = {.events = EPOLLIN, .data.fd = fd};
    return epoll_ctl(epoll, EPOLL_CTL_ADD, fd, &event);
}

static void prepare(int fd) {
    int one = 1;
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static void accept_one(int epoll, int listener, int upstream_port) {
    struct sockaddr_in upstream = loopback(upstream_port);
    int client = accept(listener, NULL, NULL);
    if (client < 0)
        return;
    int server = socket(AF_INET, SOCK_STREAM, 0);
    if (server < 0 || client >= MAX_FDS || server >= MAX_FDS ||
        connect(server, (struct sockaddr *)&upstream, sizeof upstream) != 0) {
        close(client);
        if (server >= 0)
            close(server);
        return;
    }
    prepare(client);
    prepare(server);
    peer[client] = server;
    peer[server] = client;
    watch(epoll, client);
    watch(epoll, server);
}

static void relay(int fd) {
    static char buffer[65536];
    ssize_t got = recv(fd, buffer, sizeof buffer, 0);
    if (got < 0 && errno == EAGAIN)
        return;
    if (got <= 0) {
        close(peer[fd]);
        close(fd);
        return;
    }
    for (ssize_t sent = 0; sent < got;) {
        ssize_t n = send(peer[fd], buffer + sent, got - sent, MSG_NOSIGNAL);
        if (n < 0 && errno != EAGAIN)
            return;
        if (n > 0)
            sent += n;
    }
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s LISTEN_PORT UPSTREAM_PORT WINDOW_MICROSECONDS\n", argv[0]);
        return 2;
    }
    int upstream_port = atoi(argv[2]);
    double window = atoi(argv[3]) / 1e6;
    struct sockaddr_in address = loopback(atoi(argv[1]));
    int one = 1, listener = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(listener, (struct sockaddr *)&address, sizeof address) != 0 ||
        listen(listener, 1024) != 0) {
        perror("ws_relay: listen");
        return 1;
    }
    int epoll = epoll_create1(0);
    watch(epoll, listener);
    struct epoll_event events[256];
    double busy_until = 0;
    for (;;) {
        int timeout = now() < busy_until ? 0 : -1;
        int ready = epoll_wait(epoll, events, 256, timeout);
        if (ready > 0 && window > 0)
            busy_until = now() + window;
        for (int i = 0; i < ready; i++) {
            int fd = events[i].data.fd;
            if (fd == listener)
                accept_one(epoll, listener, upstream_port);
            else
                relay(fd);
        }
    }
}
