/* kvm-cpu: the guest's CPU worker, which counts the work it gets done.
 *
 * Usage: kvm-cpu [-b] [-n WORKERS]
 *
 * One busy worker per online CPU (or WORKERS), each pinned to its CPU, doing fixed units of
 * integer work (UNIT_STEPS steps of a xorshift generator) and counting them. Once a second the
 * reporter prints how many units all workers finished since its last line and over how many
 * milliseconds of the guest's clock, so the rate (units per guest-second) is the CPU time the
 * guest was given: it falls when the host's CPUs are contended, and the guest's clock stops while
 * the VM is paused, so a pause lowers no rate. Console line (one write per line):
 *   KVMOTION CPU units=<units in the interval> ms=<interval, guest ms> total=<units so far> workers=<n>
 * -b: return once the workers run, leaving them and the reporter in the background.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#define UNIT_STEPS 100000u
#define MAX_WORKERS 256
/* Each worker's counter on a cache line of its own: no false sharing between CPUs. */
#define SLOT_WORDS 8

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* One write() per line so lines of concurrent programs never interleave on the console. */
static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
    char line[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof line - 2)
        n = (int)sizeof line - 2;
    line[n++] = '\n';
    ssize_t rc = write(STDOUT_FILENO, line, (size_t)n);
    (void)rc;
}

/* A worker: units of work forever, its count published in its slot. */
static void work(volatile uint64_t *slot, uint64_t seed) {
    uint64_t x = seed | 1;
    for (uint64_t units = 1;; units++) {
        for (unsigned i = 0; i < UNIT_STEPS; i++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        slot[1] = x; /* the result is used: the loop cannot be optimised away */
        slot[0] = units;
    }
}

static uint64_t total_units(volatile uint64_t *slots, int workers) {
    uint64_t sum = 0;
    for (int w = 0; w < workers; w++)
        sum += slots[w * SLOT_WORDS];
    return sum;
}

int main(int argc, char **argv) {
    int background = 0;
    long workers = sysconf(_SC_NPROCESSORS_ONLN);
    char *end;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-b") == 0) {
            background = 1;
        } else if (strcmp(argv[i], "-n") == 0 && i + 1 < argc) {
            workers = strtol(argv[++i], &end, 10);
            if (*end || workers < 1 || workers > MAX_WORKERS) {
                say("KVMOTION FAILED cpu worker count %s is not a number from 1 to %d", argv[i], MAX_WORKERS);
                return 2;
            }
        } else {
            fprintf(stderr, "usage: kvm-cpu [-b] [-n WORKERS]\n");
            return 2;
        }
    }
    if (workers < 1)
        workers = 1;
    if (workers > MAX_WORKERS)
        workers = MAX_WORKERS;
    volatile uint64_t *slots = mmap(NULL, (size_t)workers * SLOT_WORDS * sizeof(uint64_t), PROT_READ | PROT_WRITE,
                                    MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (slots == MAP_FAILED) {
        say("KVMOTION FAILED cpu cannot map the counters: %s", strerror(errno));
        return 1;
    }
    if (background) {
        pid_t pid = fork();
        if (pid < 0) {
            say("KVMOTION FAILED cpu fork: %s", strerror(errno));
            return 1;
        }
        if (pid > 0)
            return 0;
        setsid();
    }
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    for (int w = 0; w < workers; w++) {
        pid_t pid = fork();
        if (pid < 0) {
            say("KVMOTION FAILED cpu fork: %s", strerror(errno));
            return 1;
        }
        if (pid == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL); /* no busy worker outlives its reporter */
            if (getppid() == 1)
                _exit(0);
            if (cpus > 0) {
                cpu_set_t set;
                CPU_ZERO(&set);
                CPU_SET(w % cpus, &set);
                sched_setaffinity(0, sizeof set, &set); /* best effort: unpinned still counts */
            }
            work(slots + w * SLOT_WORDS, now_ns() + (uint64_t)w * 0x9E3779B97F4A7C15ull);
        }
    }
    /* The reporter sleeps between lines: the workers' CPUs serve it at once when it wakes. */
    uint64_t last = now_ns(), last_units = total_units(slots, (int)workers);
    for (;;) {
        struct timespec ts = {1, 0};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
            ;
        uint64_t t = now_ns(), units = total_units(slots, (int)workers);
        say("KVMOTION CPU units=%llu ms=%llu total=%llu workers=%ld", (unsigned long long)(units - last_units),
            (unsigned long long)((t - last) / 1000000ull), (unsigned long long)units, workers);
        last = t;
        last_units = units;
    }
}
