/* Send cost over loopback or a veth pair: plain send() against MSG_ZEROCOPY.
 * Built and run by ci/bench-zerocopy.sh, which documents the output.
 *   zerocopy recv PORT                       -> prints its CPU seconds
 *   zerocopy send ADDR PORT BYTES copy|zerocopy
 *        -> prints: CPU seconds, Gbit/s, completion notifications read,
 *           sends completed, sends the kernel reports it copied anyway */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/errqueue.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#ifndef SO_EE_ORIGIN_ZEROCOPY
#define SO_EE_ORIGIN_ZEROCOPY 5
#endif
#ifndef SO_EE_CODE_ZEROCOPY_COPIED
#define SO_EE_CODE_ZEROCOPY_COPIED 1
#endif
static double cpu(void) {
    struct rusage r; getrusage(RUSAGE_SELF, &r);
    return r.ru_utime.tv_sec + r.ru_stime.tv_sec + (r.ru_utime.tv_usec + r.ru_stime.tv_usec) / 1e6;
}
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
static long done_ids, copied;
/* Drains zerocopy completions; returns the number of notifications read. */
static int drain(int fd) {
    int n = 0;
    for (;;) {
        char ctl[128]; struct msghdr m = {0}; m.msg_control = ctl; m.msg_controllen = sizeof ctl;
        if (recvmsg(fd, &m, MSG_ERRQUEUE | MSG_DONTWAIT) < 0) return n;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
            struct sock_extended_err *e = (void *)CMSG_DATA(c);
            if (e->ee_origin != SO_EE_ORIGIN_ZEROCOPY) continue;
            done_ids += e->ee_data - e->ee_info + 1;
            if (e->ee_code & SO_EE_CODE_ZEROCOPY_COPIED) copied += e->ee_data - e->ee_info + 1;
        }
        n++;
    }
}
int main(int argc, char **argv) {
    if (argc < 3 || (strcmp(argv[1], "recv") && argc < 6)) { fprintf(stderr, "zerocopy recv PORT | zerocopy send ADDR PORT BYTES copy|zerocopy\n"); return 2; }
    if (!strcmp(argv[1], "recv")) {
        int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
        if (bind(l, (void *)&a, sizeof a) || listen(l, 1)) { perror("bind"); return 1; }
        int s = accept(l, 0, 0);
        double c0 = cpu();
        size_t len = 1 << 20; char *buf = malloc(len); long long total = 0; ssize_t n;
        while ((n = read(s, buf, len)) > 0) total += n;
        printf("%.4f\n", cpu() - c0);
        return 0;
    }
    int zc = !strcmp(argv[5], "zerocopy");
    long long bytes = atoll(argv[4]);
    size_t region = 256 << 20, w = 4 << 20;  /* a 256 MiB "guest", 4 MiB writes */
    char *mem = mmap(0, region, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (size_t i = 0; i < region; i += 4096) memset(mem + i, (int)(i >> 12) | 1, 4096);
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
    inet_pton(AF_INET, argv[2], &a.sin_addr);
    for (int i = 0; connect(s, (void *)&a, sizeof a); i++) { if (i > 200) { perror("connect"); return 1; } usleep(20000); }
    if (zc && setsockopt(s, SOL_SOCKET, SO_ZEROCOPY, &one, sizeof one)) { perror("SO_ZEROCOPY"); return 1; }
    double c0 = cpu(), t0 = now(); long long sent = 0, calls = 0, notes = 0;
    while (sent < bytes) {
        size_t off = sent % region, len = w;
        if (len > region - off) len = region - off;
        if ((long long)len > bytes - sent) len = bytes - sent;
        ssize_t n = send(s, mem + off, len, zc ? MSG_ZEROCOPY : 0);
        calls++;
        if (n < 0) {
            if (errno == ENOBUFS || errno == EAGAIN) { struct pollfd p = {s, 0, 0}; poll(&p, 1, 10); notes += drain(s); continue; }
            perror("send"); return 1;
        }
        sent += n;
        if (zc) notes += drain(s);
    }
    shutdown(s, SHUT_WR);
    if (zc) { for (int i = 0; i < 1000 && done_ids < calls; i++) { struct pollfd p = {s, 0, 0}; poll(&p, 1, 10); notes += drain(s); } }
    char b[16]; while (read(s, b, sizeof b) > 0) {}
    double t = now() - t0;
    printf("%.4f %.3f %lld %ld %ld\n", cpu() - c0, bytes * 8 / t / 1e9, notes, done_ids, copied);
    return 0;
}
