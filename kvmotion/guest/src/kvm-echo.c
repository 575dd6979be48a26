/* kvm-echo: the guest's echo service, TCP and UDP on one port.
 *
 * Usage: kvm-echo [-b] [PORT]      (default port 7000)
 *
 * TCP: every byte a client sends comes straight back (TCP_NODELAY, many clients, one poll() loop).
 * A client that does not read its echoes is not read from until they drain, so it cannot stall
 * the others. UDP: each datagram goes back to its sender at once.
 * -b: return once both sockets listen, leaving the service running in the background.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_CLIENTS 1024
#define BUF_SIZE 65536

struct client {
    int fd;
    size_t pending_off, pending_len; /* echo bytes not yet accepted by the socket */
    char *buf;
};

static struct pollfd pfds[2 + MAX_CLIENTS];
static struct client clients[MAX_CLIENTS];
static int nclients;

static void fail(const char *what) {
    char line[160];
    int n = snprintf(line, sizeof line, "KVMOTION FAILED echo %s: %s\n", what, strerror(errno));
    ssize_t rc = write(STDOUT_FILENO, line, (size_t)n);
    (void)rc;
    exit(1);
}

static int open_socket(int type, int port) {
    int fd = socket(AF_INET, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        fail("socket");
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port),
                               .sin_addr.s_addr = htonl(INADDR_ANY)};
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0)
        fail("bind");
    if (type == SOCK_STREAM && listen(fd, 128) < 0)
        fail("listen");
    return fd;
}

static void drop_client(int i) {
    close(clients[i].fd);
    free(clients[i].buf);
    clients[i] = clients[--nclients];
}

static void accept_clients(int lfd) {
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            return; /* EAGAIN, or a transient error: poll() will tell us again */
        char *buf = malloc(BUF_SIZE);
        if (nclients == MAX_CLIENTS || buf == NULL) {
            free(buf);
            close(fd);
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        clients[nclients++] = (struct client){.fd = fd, .buf = buf};
    }
}

/* Sends what is pending; returns -1 if the client is gone. */
static int flush_client(struct client *c) {
    while (c->pending_len) {
        ssize_t n = send(c->fd, c->buf + c->pending_off, c->pending_len, MSG_NOSIGNAL);
        if (n < 0)
            return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
        c->pending_off += (size_t)n;
        c->pending_len -= (size_t)n;
    }
    c->pending_off = 0;
    return 0;
}

/* Reads what the client sent and echoes it; returns -1 if the client is gone. */
static int serve_client(struct client *c) {
    ssize_t n = recv(c->fd, c->buf, BUF_SIZE, 0);
    if (n == 0)
        return -1;
    if (n < 0)
        return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
    c->pending_off = 0;
    c->pending_len = (size_t)n;
    return flush_client(c);
}

static void echo_datagrams(int ufd) {
    static char buf[BUF_SIZE];
    for (;;) {
        struct sockaddr_storage from;
        socklen_t fromlen = sizeof from;
        ssize_t n = recvfrom(ufd, buf, sizeof buf, 0, (struct sockaddr *)&from, &fromlen);
        if (n < 0)
            return;
        sendto(ufd, buf, (size_t)n, 0, (struct sockaddr *)&from, fromlen);
    }
}

int main(int argc, char **argv) {
    int background = 0;
    int argi = 1;
    if (argi < argc && strcmp(argv[argi], "-b") == 0) {
        background = 1;
        argi++;
    }
    int port = 7000;
    if (argi < argc) {
        char *end;
        long p = strtol(argv[argi], &end, 10);
        if (*end || p < 1 || p > 65535 || argc - argi != 1) {
            fprintf(stderr, "usage: kvm-echo [-b] [PORT]\n");
            return 2;
        }
        port = (int)p;
    }
    int tfd = open_socket(SOCK_STREAM, port);
    int ufd = open_socket(SOCK_DGRAM, port);
    if (background) {
        pid_t pid = fork();
        if (pid < 0)
            fail("fork");
        if (pid > 0)
            return 0;
        setsid();
    }
    signal(SIGPIPE, SIG_IGN);
    for (;;) {
        pfds[0] = (struct pollfd){.fd = tfd, .events = POLLIN};
        pfds[1] = (struct pollfd){.fd = ufd, .events = POLLIN};
        for (int i = 0; i < nclients; i++)
            pfds[2 + i] = (struct pollfd){
                .fd = clients[i].fd, .events = clients[i].pending_len ? POLLOUT : POLLIN};
        int watched = nclients;
        if (poll(pfds, (nfds_t)(2 + watched), -1) < 0) {
            if (errno == EINTR)
                continue;
            fail("poll");
        }
        if (pfds[1].revents)
            echo_datagrams(ufd);
        /* Backwards, because dropping a client moves the last one into its slot. */
        for (int i = watched - 1; i >= 0; i--) {
            short ev = pfds[2 + i].revents;
            if (!ev)
                continue;
            struct client *c = &clients[i];
            int rc = c->pending_len ? flush_client(c) : serve_client(c);
            if (rc < 0 || (ev & (POLLERR | POLLNVAL)) || ((ev & POLLHUP) && !(ev & POLLIN)))
                drop_client(i);
        }
        if (pfds[0].revents)
            accept_clients(tfd);
    }
}
