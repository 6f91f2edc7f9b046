/* bindfloor: the kernel's floor for holding N listeners, the peer of the scale
 * benchmark. Reads "IP PORT" lines from a file, and for each does what portwake's
 * listener::bind and its event loop do for a Stream listener: socket (CLOEXEC),
 * SO_REUSEADDR, bind, listen(somaxconn), epoll_ctl(ADD, EPOLLIN). Then prints
 * "ready N" on stdout and sleeps in epoll_wait until killed.
 *
 *   cc -O2 -o bindfloor bench/bindfloor.c && ./bindfloor addresses.txt
 */
#include <arpa/inet.h>
#include <limits.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: bindfloor ADDRESS-FILE\n");
        return 64;
    }
    FILE *f = fopen(argv[1], "r");
    if (!f) {
        perror(argv[1]);
        return 1;
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) {
        perror("epoll_create1");
        return 1;
    }
    char ip[64];
    unsigned port;
    long n = 0;
    while (fscanf(f, "%63s %u", ip, &port) == 2) {
        struct sockaddr_in sin;
        memset(&sin, 0, sizeof sin);
        sin.sin_family = AF_INET;
        sin.sin_port = htons((unsigned short)port);
        if (inet_pton(AF_INET, ip, &sin.sin_addr) != 1) {
            fprintf(stderr, "bad address %s\n", ip);
            return 1;
        }
        int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        int one = 1;
        if (s < 0 || setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
            bind(s, (struct sockaddr *)&sin, sizeof sin) < 0 || listen(s, INT_MAX) < 0) {
            fprintf(stderr, "%s:%u: ", ip, port);
            perror("socket/bind/listen");
            return 1;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data = {.u64 = (unsigned long)n}};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev) < 0) {
            perror("epoll_ctl");
            return 1;
        }
        n++;
    }
    fclose(f);
    printf("ready %ld\n", n);
    fflush(stdout);
    struct epoll_event ev;
    for (;;) {
        epoll_wait(ep, &ev, 1, -1);
    }
}
