/* kvm-mem: the guest's memory writer.
 *
 * Usage: kvm-mem [-b] [-s STRIDE] WSS_BYTES RATE_BYTES_PER_S
 *
 * Rewrites a working set of WSS bytes page by page, cyclically, at RATE bytes of pages per second
 * (0 = as fast as it can). Every page holds its index, the write sequence number that last wrote
 * it and a body derived from both, and a table remembers the sequence each page must hold. Each
 * page is verified just before it is rewritten, so every page is checked once per pass; SIGUSR1
 * verifies every word of them all at once. A page never written must still read as zeroes.
 * Console lines:
 *   KVMOTION MEM seq=<pages written> pass=<full passes> errors=<corrupt pages>   (once a second)
 *   KVMOTION MEM CORRUPT page=<i> expected=<seq> found=<seq read> word=<first bad word>
 *   KVMOTION MEM VERIFIED pages=<n> errors=<total>                         (after SIGUSR1)
 * -b: return once the working set is allocated, leaving the writer running in the background.
 * -s: after a page's first write, rewrite (and check) only every STRIDE-th word of it (a power of
 *     two, default 1 = all): a page dirtied for 1/STRIDE of the CPU, so a guest can dirty memory
 *     faster than a link carries it even under TCG; the untouched words keep incompressible filler.
 * A working set that does not fit in the guest's available memory is refused at start.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define WORDS (PAGE / 8u)
/* Pacing never repays more than this much of a stall (a paused VM must not burst afterwards). */
#define MAX_CATCHUP_NS 100000000ull
#define TICK_NS 2000000ull

/* Memory the kernel, the other programs and the shell need besides the working set. */
#define HEADROOM (24ull << 20)

static volatile sig_atomic_t verify_requested;

/* MemAvailable from /proc/meminfo in bytes, 0 if unknown. */
static unsigned long long mem_available(void) {
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f)
        return 0;
    char line[128];
    unsigned long long kib = 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %llu kB", &kib) == 1)
            break;
    fclose(f);
    return kib << 10;
}

static void on_usr1(int sig) {
    (void)sig;
    verify_requested = 1;
}

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

/* Word k of page `index` written by write number `seq`; seq 0 means never written: all zeroes. */
static inline uint64_t expected_word(uint64_t index, uint64_t seq, unsigned k) {
    if (seq == 0)
        return 0;
    if (k == 0)
        return index;
    if (k == 1)
        return seq;
    return (seq * 0x9E3779B97F4A7C15ull) ^ (index * 0xC2B2AE3D27D4EB4Full) ^ k;
}

/* Words between two rewritten ones: 1 rewrites whole pages; more dirties a page for less CPU. */
static unsigned stride = 1;

/* Word k of page `index` where a write leaves it alone: fixed, but no more compressible than the rest. */
static inline uint64_t filler_word(uint64_t index, unsigned k) {
    return (index * 0xC2B2AE3D27D4EB4Full) ^ ((uint64_t)k * 0x9E3779B97F4A7C15ull) ^ 0xA5A5A5A5A5A5A5A5ull;
}

static inline int rewritten(unsigned k) {
    return k == 1 || (k & (stride - 1)) == 0;
}

/* What word k of a page last written by write `seq` holds: every word is set on the page's first
 * write (or a repair), and later writes rewrite words 0, 1 and every stride-th one. */
static inline uint64_t page_word(uint64_t index, uint64_t seq, unsigned k) {
    return seq == 0 || rewritten(k) ? expected_word(index, seq, k) : filler_word(index, k);
}

/* `whole`: set every word (first write, repair); else only the rewritten ones, the cheap way. */
static void fill_page(uint64_t *page, uint64_t index, uint64_t seq, int whole) {
    if (whole && stride > 1) {
        for (unsigned k = 0; k < WORDS; k++)
            page[k] = page_word(index, seq, k);
        return;
    }
    /* Whole pages at stride 1 take this tight loop: the writer's speed is what the tests measure. */
    unsigned step = whole ? 1 : stride;
    page[1] = seq;
    for (unsigned k = 0; k < WORDS; k += step)
        page[k] = expected_word(index, seq, k);
}

/* Returns 1 if the page is intact, else reports it and returns 0. `step` 1 reads every word;
 * `stride` reads only the rewritten ones, as cheaply as they were written. */
static int check_page(const uint64_t *page, uint64_t index, uint64_t seq, unsigned step) {
    unsigned bad = WORDS;
    if (stride == 1) {
        for (unsigned k = 0; bad == WORDS && k < WORDS; k++)
            if (page[k] != expected_word(index, seq, k))
                bad = k;
    } else {
        if (page[1] != seq)
            bad = 1;
        for (unsigned k = 0; bad == WORDS && k < WORDS; k += step)
            if (page[k] != page_word(index, seq, k))
                bad = k;
    }
    if (bad == WORDS)
        return 1;
    say("KVMOTION MEM CORRUPT page=%llu expected=%llu found=%llu word=%u",
        (unsigned long long)index, (unsigned long long)seq, (unsigned long long)page[1], bad);
    return 0;
}

int main(int argc, char **argv) {
    int background = 0;
    int argi = 1;
    char *end;
    for (; argi < argc && argv[argi][0] == '-'; argi++) {
        if (strcmp(argv[argi], "-b") == 0) {
            background = 1;
        } else if (strcmp(argv[argi], "-s") == 0 && argi + 1 < argc) {
            unsigned long s = strtoul(argv[++argi], &end, 10);
            if (*end || s == 0 || s > WORDS || (s & (s - 1))) {
                say("KVMOTION FAILED mem stride %s is not a power of two from 1 to %u", argv[argi], WORDS);
                return 2;
            }
            stride = (unsigned)s;
        } else {
            break;
        }
    }
    if (argc - argi != 2) {
        fprintf(stderr, "usage: kvm-mem [-b] [-s STRIDE] WSS_BYTES RATE_BYTES_PER_S\n");
        return 2;
    }
    unsigned long long wss = strtoull(argv[argi], &end, 10);
    if (*end || wss < PAGE) {
        say("KVMOTION FAILED mem working set %s is not a byte count >= %u", argv[argi], PAGE);
        return 2;
    }
    unsigned long long rate = strtoull(argv[argi + 1], &end, 10);
    if (*end) {
        say("KVMOTION FAILED mem rate %s is not a byte count per second", argv[argi + 1]);
        return 2;
    }
    unsigned long long avail = mem_available();
    if (avail && wss + HEADROOM > avail) {
        /* Better a clear failure now than the OOM killer ending the writer silently later. */
        say("KVMOTION FAILED mem working set of %llu MiB does not fit: the guest has %llu MiB "
            "available and keeps %llu MiB for itself",
            wss >> 20, avail >> 20, (unsigned long long)HEADROOM >> 20);
        return 1;
    }
    uint64_t npages = wss / PAGE;
    uint64_t *mem = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    uint64_t *expected = calloc(npages, sizeof *expected);
    if (mem == MAP_FAILED || expected == NULL) {
        say("KVMOTION FAILED mem cannot allocate %llu bytes: %s", wss, strerror(errno));
        return 1;
    }
    if (background) {
        pid_t pid = fork();
        if (pid < 0) {
            say("KVMOTION FAILED mem fork: %s", strerror(errno));
            return 1;
        }
        if (pid > 0)
            return 0;
        setsid();
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);

    uint64_t seq = 0, pass = 0, errors = 0, cursor = 0;
    uint64_t last = now_ns();
    uint64_t next_report = last + 1000000000ull;
    /* Token bucket in bytes; capped so a long pause earns at most MAX_CATCHUP_NS of writing. */
    double budget = 0;
    double budget_cap = rate ? (double)rate * MAX_CATCHUP_NS / 1e9 : 0;
    if (budget_cap < PAGE)
        budget_cap = PAGE;

    for (;;) {
        uint64_t t = now_ns();
        if (rate) {
            budget += (double)rate * (double)(t - last) / 1e9;
            if (budget > budget_cap)
                budget = budget_cap;
        }
        last = t;
        if (t >= next_report) {
            say("KVMOTION MEM seq=%llu pass=%llu errors=%llu", (unsigned long long)seq,
                (unsigned long long)pass, (unsigned long long)errors);
            next_report += 1000000000ull;
            if (next_report <= t) /* after a pause: report once, not once per missed second */
                next_report = t + 1000000000ull;
        }
        if (verify_requested) {
            verify_requested = 0;
            uint64_t bad = 0;
            for (uint64_t i = 0; i < npages; i++) {
                uint64_t *page = mem + i * WORDS;
                if (!check_page(page, i, expected[i], 1)) {
                    bad++;
                    /* Repair it so one corruption is counted once. */
                    expected[i] = ++seq;
                    fill_page(page, i, seq, 1);
                }
            }
            errors += bad;
            say("KVMOTION MEM VERIFIED pages=%llu errors=%llu", (unsigned long long)npages,
                (unsigned long long)errors);
        }
        /* Write a slice, then look at the clock again (at most 256 pages when unpaced). */
        unsigned burst = 256;
        if (rate) {
            double n = budget / PAGE;
            burst = n > 256 ? 256 : (unsigned)n;
            budget -= (double)burst * PAGE;
        }
        for (unsigned b = 0; b < burst; b++) {
            uint64_t *page = mem + cursor * WORDS;
            int ok = check_page(page, cursor, expected[cursor], stride);
            errors += !ok;
            /* A first write sets the whole page, and so does a repair (so it is counted once). */
            int whole = stride == 1 || expected[cursor] == 0 || !ok;
            expected[cursor] = ++seq;
            fill_page(page, cursor, seq, whole);
            if (++cursor == npages) {
                cursor = 0;
                pass++;
            }
        }
        if (rate && burst == 0) {
            struct timespec ts = {0, (long)TICK_NS};
            nanosleep(&ts, NULL);
        }
    }
}
