/*
 * The floor under any fan-out on this machine: the sender's CPU per write() of a small
 * WebSocket frame to one of many loopback TCP connections, while a child process drains them
 * all with epoll. A gateway cannot deliver a frame for less than one such write (unless it
 * puts several frames in one), so its CPU per delivery is read against this figure measured
 * in the same sitting.
 *
 *   cc -O2 -o write_floor tests/bench/write_floor.c
 *   ./write_floor CONNECTIONS FRAMES [FRAMES_PER_WRITE]
 *
 * Frames are 110 bytes (a 100-byte payload behind a 10-byte unmasked server header). Output:
 * one line with the sender's CPU seconds, µs per write() and µs per frame.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#define FRAME 110

static double cpu_seconds(void) {
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    return (double)usage.ru_utime.tv_sec + usage.ru_utime.tv_usec / 1e6 +
           (double)usage.ru_stime.tv_sec + usage.ru_stime.tv_usec / 1e6;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

/* Read everything from every accepted socket until all are closed. */
static void drain(int listener, int connections) {
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    for (int i = 0; i < connections; i++) {
        int fd = accept(listener, NULL, NULL);
        if (fd < 0) die("accept");
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
    }
    close(listener);
    char buf[65536];
    struct epoll_event events[256];
    int open = connections;
    while (open > 0) {
        int n = epoll_wait(ep, events, 256, -1);
        for (int i = 0; i < n; i++) {
            ssize_t got = read(events[i].data.fd, buf, sizeof buf);
            if (got <= 0) {
                close(events[i].data.fd);
                open--;
            }
        }
    }
    exit(0);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s CONNECTIONS FRAMES [FRAMES_PER_WRITE]\n", argv[0]);
        return 2;
    }
    int connections = atoi(argv[1]);
    long frames = atol(argv[2]);
    int per_write = argc > 3 ? atoi(argv[3]) : 1;
    if (connections < 1 || frames < 1 || per_write < 1 || per_write > 64) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }

    int listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof addr;
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
    if (listen(listener, 4096) < 0) die("listen");
    if (getsockname(listener, (struct sockaddr *)&addr, &len) < 0) die("getsockname");

    pid_t reader = fork();
    if (reader < 0) die("fork");
    if (reader == 0) drain(listener, connections);
    close(listener);

    int *fds = calloc((size_t)connections, sizeof *fds);
    int one = 1;
    for (int i = 0; i < connections; i++) {
        fds[i] = socket(AF_INET, SOCK_STREAM, 0);
        if (fds[i] < 0) die("socket");
        if (connect(fds[i], (struct sockaddr *)&addr, sizeof addr) < 0) die("connect");
        setsockopt(fds[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }

    unsigned char frame[FRAME];
    memset(frame, 'x', sizeof frame);
    frame[0] = 0x81;   /* FIN + text */
    frame[1] = FRAME - 2; /* a 108-byte payload needs no extended length */
    struct iovec iov[64];
    for (int i = 0; i < per_write; i++) {
        iov[i].iov_base = frame;
        iov[i].iov_len = sizeof frame;
    }

    long writes = frames / per_write;
    double start = cpu_seconds();
    for (long w = 0; w < writes; w++) {
        int fd = fds[w % connections];
        ssize_t want = (ssize_t)per_write * FRAME;
        ssize_t put = writev(fd, iov, per_write);
        if (put != want) die("writev");
    }
    double spent = cpu_seconds() - start;

    for (int i = 0; i < connections; i++) close(fds[i]);
    waitpid(reader, NULL, 0);
    printf("connections=%d frames=%ld frames_per_write=%d: sender CPU %.3f s, %.2f us per write, "
           "%.2f us per frame\n",
           connections, writes * per_write, per_write, spent, spent * 1e6 / (double)writes,
           spent * 1e6 / (double)(writes * per_write));
    return 0;
}
