/* kvm-fio: a disk's throughput as the guest sees it, past the guest's own page cache.
 *
 * Usage: kvm-fio MODE DEVICE BS SECONDS [SPAN]
 *   MODE     seqread | seqwrite | randread | randwrite
 *   BS       bytes per request, a multiple of 512
 *   SECONDS  how long to run
 *   SPAN     bytes of the device used, from offset 0 (default: all of it)
 *
 * One request at a time (queue depth 1) with O_DIRECT and an aligned buffer, like fio's psync
 * engine with direct=1. Sequential modes walk the span and wrap around; random modes pick
 * BS-aligned offsets uniformly in it (xorshift64*). Writes carry a non-zero pattern. No fsync:
 * this measures the path a request takes (guest driver, QEMU, its block backend), not the host's
 * disk. At the end it prints one line:
 *   KVMOTION FIO <mode> bs=<BS> MB/s=<x> iops=<y> ops=<n> seconds=<s>
 * (MB = 10^6 bytes), or on a failure
 *   KVMOTION FIO ERROR <mode> <what>: <error text>
 * and exits 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define ALIGN 4096u

enum mode { SEQREAD, SEQWRITE, RANDREAD, RANDWRITE };
static const char *const MODE_NAMES[] = {"seqread", "seqwrite", "randread", "randwrite"};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int fail(const char *mode, const char *what) {
    printf("KVMOTION FIO ERROR %s %s: %s\n", mode, what, strerror(errno));
    return 1;
}

static int parse_u64(const char *text, uint64_t *out) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 10);
    if (errno || end == text || *end || text[0] == '-')
        return -1;
    *out = (uint64_t)v;
    return 0;
}

static uint64_t rng_state;

static uint64_t rng_next(void) { /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1Dull;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc != 5 && argc != 6) {
        fprintf(stderr, "usage: kvm-fio seqread|seqwrite|randread|randwrite DEVICE BS SECONDS [SPAN]\n");
        return 2;
    }
    int mode = -1;
    for (int i = 0; i < 4; i++)
        if (strcmp(argv[1], MODE_NAMES[i]) == 0)
            mode = i;
    uint64_t bs, seconds, span = 0;
    if (mode < 0 || parse_u64(argv[3], &bs) || parse_u64(argv[4], &seconds) ||
        (argc == 6 && parse_u64(argv[5], &span)) || bs == 0 || bs % 512 || seconds == 0) {
        fprintf(stderr, "kvm-fio: bad arguments (BS: a multiple of 512; SECONDS: at least 1)\n");
        return 2;
    }
    const char *name = MODE_NAMES[mode];
    int writing = mode == SEQWRITE || mode == RANDWRITE;
    int fd = open(argv[2], (writing ? O_RDWR : O_RDONLY) | O_DIRECT | O_CLOEXEC);
    if (fd < 0)
        return fail(name, argv[2]);
    struct stat st;
    if (fstat(fd, &st) < 0)
        return fail(name, "fstat");
    uint64_t size = (uint64_t)st.st_size;
    if (S_ISBLK(st.st_mode) && ioctl(fd, BLKGETSIZE64, &size) < 0)
        return fail(name, "BLKGETSIZE64");
    if (span == 0 || span > size)
        span = size;
    uint64_t slots = span / bs;
    if (slots == 0) {
        errno = EINVAL;
        return fail(name, "span smaller than one request");
    }
    void *buf;
    if (posix_memalign(&buf, ALIGN, bs)) {
        errno = ENOMEM;
        return fail(name, "buffer");
    }
    memset(buf, 0x5A, bs);
    rng_state = (uint64_t)(now_s() * 1e9) | 1;

    uint64_t ops = 0, slot = 0;
    double start = now_s(), end = start + (double)seconds, t = start;
    while (t < end) {
        if (mode == RANDREAD || mode == RANDWRITE)
            slot = rng_next() % slots;
        off_t off = (off_t)(slot * bs);
        ssize_t n = writing ? pwrite(fd, buf, bs, off) : pread(fd, buf, bs, off);
        if (n != (ssize_t)bs) {
            if (n >= 0)
                errno = EIO; /* a short transfer inside the span */
            return fail(name, writing ? "pwrite" : "pread");
        }
        ops++;
        if (++slot == slots)
            slot = 0;
        t = now_s();
    }
    double elapsed = t - start;
    printf("KVMOTION FIO %s bs=%llu MB/s=%.2f iops=%.0f ops=%llu seconds=%.3f\n", name, (unsigned long long)bs,
           (double)(ops * bs) / elapsed / 1e6, (double)ops / elapsed, (unsigned long long)ops, elapsed);
    return 0;
}
