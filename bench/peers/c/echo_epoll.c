/*
 * echo_epoll: the floor. A line echo server in C on one thread and one
 * edge-triggered epoll instance: what this machine can do at all with the
 * benchmark's load model, so every other server can be stated against it.
 *
 *   echo-epoll -host 127.0.0.1 -port 9000      (--host/--port work too)
 *
 * The design is Go's netpoller without the goroutines:
 *
 * - Every accepted socket is registered once, EPOLLIN|EPOLLRDHUP|EPOLLET
 *   (as netpollopen does), and never touched again unless a send is
 *   partial: only then is EPOLLOUT added, and removed once the output is
 *   flushed. Steady-state request/response costs no epoll_ctl at all.
 * - On readiness: recv into the connection's buffer, then one send of every
 *   complete line of the batch; the unterminated tail waits for more input.
 *   Edge triggering means readiness is used up only when the receive queue
 *   is empty: on EAGAIN, or on a short read (recv returned less than it was
 *   offered, so the kernel had no more; a byte that arrives later raises a
 *   new edge). A short read saves the EAGAIN recv per request that
 *   "read until EAGAIN" would cost. When the peer's FIN was reported
 *   (EPOLLRDHUP) we read on to the end of the stream instead.
 * - Lines are limited to MAX_LINE bytes, '\n' included: a full buffer with
 *   no newline in it closes the connection (the other peers do the same).
 * - While output is pending the connection is not read: the client waits
 *   for its echo (backpressure), as a blocking write would make it.
 * - Loops are bounded: at most ACCEPT_BUDGET accepts and READ_BUDGET full
 *   buffers per readiness event. When a budget runs out, EPOLL_CTL_MOD with
 *   the same events re-arms the descriptor, so a flooding client or a
 *   connection storm is served again on the next epoll_wait after the others,
 *   not starved and not spun on.
 * - accept4 failing for lack of descriptors or memory leaves the connection
 *   queued; as Go's net/http does, we pause accepting (10 ms) and retry,
 *   since no new edge would come for a connection already queued.
 * - SIGTERM and SIGINT arrive through a signalfd in the same epoll set: the
 *   server exits with status 0.
 *
 * Accepted sockets get TCP_NODELAY, as Go, uvloop and Trio all set it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_LINE (64 * 1024)   /* the longest line, '\n' included */
#define MAX_EVENTS 256         /* events taken per epoll_wait */
#define ACCEPT_BUDGET 64       /* accepts per listener event */
#define READ_BUDGET 16         /* full buffers read per connection event */
#define ACCEPT_PAUSE_MS 10     /* retry delay after EMFILE and friends */

enum kind { LISTENER, SIGNALS, CONNECTION };

/* What epoll's data pointer points at: the first member of every object. */
struct handle {
    enum kind kind;
    int fd;
};

struct conn {
    struct handle h;
    size_t len;       /* bytes in buf */
    size_t out_off;   /* with out_end: buf[out_off..out_end) still to send */
    size_t out_end;
    bool want_out;    /* registered for EPOLLOUT */
    bool eof;         /* the peer has closed its side: close once flushed */
    char buf[MAX_LINE];
};

static int epfd = -1;

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static int set_events(struct handle *h, int op, uint32_t events)
{
    struct epoll_event ev = {.events = events, .data.ptr = h};
    return epoll_ctl(epfd, op, h->fd, &ev);
}

static uint32_t conn_events(const struct conn *c)
{
    return EPOLLIN | EPOLLRDHUP | EPOLLET | (c->want_out ? EPOLLOUT : 0);
}

static void conn_close(struct conn *c)
{
    close(c->h.fd); /* also removes it from the epoll set: no dup exists */
    free(c);
}

/* Send buf[out_off..out_end); keep the tail after out_end for the next line.
 * Returns false if the connection must be closed. */
static bool flush(struct conn *c)
{
    while (c->out_off < c->out_end) {
        ssize_t n = send(c->h.fd, c->buf + c->out_off, c->out_end - c->out_off, MSG_NOSIGNAL);
        if (n > 0) {
            c->out_off += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
        } else {
            return false; /* EPIPE, ECONNRESET: the peer is gone */
        }
    }
    bool pending = c->out_off < c->out_end;
    if (pending != c->want_out) { /* the only epoll_ctl after accept */
        c->want_out = pending;
        if (set_events(&c->h, EPOLL_CTL_MOD, conn_events(c)) < 0)
            return false;
    }
    if (pending)
        return true;
    c->len -= c->out_end; /* keep the partial line at the front */
    memmove(c->buf, c->buf + c->out_end, c->len);
    c->out_off = c->out_end = 0;
    return true;
}

/* Echo every complete line in buf with one send. */
static bool echo_lines(struct conn *c)
{
    char *last = memrchr(c->buf, '\n', c->len);
    if (last == NULL)
        return c->len < MAX_LINE; /* a full buffer and no newline: too long */
    c->out_off = 0;
    c->out_end = (size_t)(last - c->buf) + 1;
    return flush(c);
}

/* Read what the kernel has (see the top of the file), echo, and say whether
 * the connection stays open. */
static bool on_readable(struct conn *c, uint32_t events)
{
    bool hup = events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR);
    for (int full = 0; full < READ_BUDGET; full++) {
        for (;;) {
            size_t room = MAX_LINE - c->len;
            ssize_t n = recv(c->h.fd, c->buf + c->len, room, 0);
            if (n > 0) {
                c->len += (size_t)n;
                if ((size_t)n < room && !hup)
                    return echo_lines(c); /* short read: drained */
                if (c->len == MAX_LINE)
                    break; /* full: echo to make room, then read on */
            } else if (n == 0) {
                c->eof = true;
                return echo_lines(c) && c->want_out; /* close unless still sending */
            } else if (errno == EINTR) {
                continue;
            } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
                return echo_lines(c);
            } else {
                return false; /* ECONNRESET and the like */
            }
        }
        if (!echo_lines(c))
            return false;
        if (c->want_out)
            return true; /* the client is not reading: stop until EPOLLOUT */
    }
    /* Budget spent with input left: re-arm, so epoll reports it again. */
    return set_events(&c->h, EPOLL_CTL_MOD, conn_events(c)) == 0;
}

static void on_conn_event(struct conn *c, uint32_t events)
{
    bool open = true;
    if (c->want_out && (events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
        open = flush(c);
        if (open && !c->want_out) {
            /* Flushed. Input that arrived while we were not reading raised
             * its edge then, so read now or it would never be seen. */
            open = !c->eof && on_readable(c, events | EPOLLIN);
        }
    } else if (!c->want_out && (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) {
        open = on_readable(c, events);
    }
    if (!open)
        conn_close(c);
}

/* Accept up to ACCEPT_BUDGET connections; returns true if accepting must
 * pause because the process or system is out of descriptors or memory. */
static bool on_acceptable(struct handle *listener)
{
    for (int i = 0; i < ACCEPT_BUDGET; i++) {
        int fd = accept4(listener->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            switch (errno) {
            case EAGAIN:
#if EAGAIN != EWOULDBLOCK
            case EWOULDBLOCK:
#endif
                return false;
            case EMFILE:
            case ENFILE:
            case ENOBUFS:
            case ENOMEM:
                return true;
            default:
                continue; /* ECONNABORTED etc.: that connection died queued */
            }
        }
        struct conn *c = malloc(sizeof *c);
        int one = 1;
        if (c == NULL) {
            close(fd);
            return true;
        }
        c->h.kind = CONNECTION;
        c->h.fd = fd;
        c->len = c->out_off = c->out_end = 0;
        c->want_out = c->eof = false;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (set_events(&c->h, EPOLL_CTL_ADD, conn_events(c)) < 0)
            conn_close(c);
    }
    /* Budget spent: re-arm so that the rest of the backlog is reported. */
    set_events(listener, EPOLL_CTL_MOD, EPOLLIN | EPOLLET);
    return false;
}

static int listen_on(const char *host, const char *port)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    struct addrinfo *res;
    int err = getaddrinfo(host, port, &hints, &res);
    if (err != 0) {
        fprintf(stderr, "echo-epoll: %s:%s: %s\n", host, port, gai_strerror(err));
        exit(1);
    }
    int fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    if (fd < 0)
        die("socket");
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0)
        die("setsockopt");
    if (bind(fd, res->ai_addr, res->ai_addrlen) < 0)
        die("bind");
    if (listen(fd, SOMAXCONN) < 0)
        die("listen");
    freeaddrinfo(res);
    return fd;
}

static void usage(void)
{
    fprintf(stderr, "usage: echo-epoll [-host HOST] [-port PORT]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *host = "127.0.0.1", *port = "9000";
    for (int i = 1; i < argc; i++) {
        const char *opt = argv[i];
        if (opt[0] == '-' && opt[1] == '-')
            opt++; /* accept --host as well as Go's -host */
        if (i + 1 < argc && strcmp(opt, "-host") == 0)
            host = argv[++i];
        else if (i + 1 < argc && strcmp(opt, "-port") == 0)
            port = argv[++i];
        else
            usage();
    }

    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGTERM);
    sigaddset(&stop, SIGINT);
    if (sigprocmask(SIG_BLOCK, &stop, NULL) < 0)
        die("sigprocmask");
    struct handle signals = {.kind = SIGNALS, .fd = signalfd(-1, &stop, SFD_CLOEXEC)};
    if (signals.fd < 0)
        die("signalfd");
    struct handle listener = {.kind = LISTENER, .fd = listen_on(host, port)};
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        die("epoll_create1");
    if (set_events(&signals, EPOLL_CTL_ADD, EPOLLIN) < 0 ||
        set_events(&listener, EPOLL_CTL_ADD, EPOLLIN | EPOLLET) < 0)
        die("epoll_ctl");

    struct epoll_event events[MAX_EVENTS];
    bool accept_paused = false;
    for (;;) {
        int n = epoll_wait(epfd, events, MAX_EVENTS, accept_paused ? ACCEPT_PAUSE_MS : -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait");
        }
        if (accept_paused)
            accept_paused = on_acceptable(&listener);
        for (int i = 0; i < n; i++) {
            struct handle *h = events[i].data.ptr;
            switch (h->kind) {
            case SIGNALS:
                return 0; /* SIGTERM or SIGINT: the process exit closes everything */
            case LISTENER:
                if (!accept_paused)
                    accept_paused = on_acceptable(h);
                break;
            case CONNECTION:
                on_conn_event((struct conn *)h, events[i].events);
                break;
            }
        }
    }
}
