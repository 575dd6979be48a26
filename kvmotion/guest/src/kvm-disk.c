/* kvm-disk: the guest's disk writer.
 *
 * Usage: kvm-disk [-b] [DEVICE]      (default /dev/vda)
 *
 * Writes 512-byte records with consecutive sequence numbers, record n at byte
 * OFFSET + n * 512, in batches of 8; after each batch's fsync() returns it prints
 *   KVMOTION DISK ack=<last seq of the batch>
 * so the host knows every record up to that seq is durable. On a write or fsync error it prints
 *   KVMOTION DISK ERROR <error text>
 * and retries the same batch shortly after: no seq is ever skipped. About 20 batches a second.
 *
 * Record layout (little-endian), shared with kvmotion/guest/records.py which verifies disks:
 *   0 magic u32 | 4 run u32 | 8 seq u64 | 16 payload 492 bytes | 508 crc32 u32 of bytes 0..507
 * The payload repeats the 8-byte word (seq * PAYLOAD_MUL) ^ run. `run` is random per start, so
 * records left by an earlier run are not mistaken for this run's.
 * -b: return once the device is open, leaving the writer running in the background.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#define REC_SIZE 512u
#define REC_MAGIC 0x444D564Bu /* "KVMD" */
#define REC_OFFSET (1u << 20)
#define PAYLOAD_OFF 16u
#define CRC_OFF (REC_SIZE - 4u)
#define PAYLOAD_MUL 0x9E3779B97F4A7C15ull
#define BATCH 8u
#define INTERVAL_NS 50000000ll
#define RETRY_NS 200000000ll

static uint32_t crc_table[256];

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

/* The CRC-32 of zlib, Ethernet and gzip. */
static uint32_t crc32(const unsigned char *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    while (n--)
        c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

static void put_le(unsigned char *p, uint64_t v, int bytes) {
    for (int i = 0; i < bytes; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void encode(unsigned char *rec, uint32_t run, uint64_t seq) {
    unsigned char word[8];
    put_le(rec, REC_MAGIC, 4);
    put_le(rec + 4, run, 4);
    put_le(rec + 8, seq, 8);
    put_le(word, (seq * PAYLOAD_MUL) ^ run, 8);
    for (unsigned i = PAYLOAD_OFF; i < CRC_OFF; i++)
        rec[i] = word[(i - PAYLOAD_OFF) % 8];
    put_le(rec + CRC_OFF, crc32(rec, CRC_OFF), 4);
}

static void say(const char *line) {
    ssize_t rc = write(STDOUT_FILENO, line, strlen(line));
    (void)rc;
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000ll + ts.tv_nsec;
}

static void sleep_ns(int64_t ns) {
    struct timespec ts = {(time_t)(ns / 1000000000ll), (long)(ns % 1000000000ll)};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

int main(int argc, char **argv) {
    int background = 0;
    int argi = 1;
    if (argi < argc && strcmp(argv[argi], "-b") == 0) {
        background = 1;
        argi++;
    }
    if (argc - argi > 1) {
        fprintf(stderr, "usage: kvm-disk [-b] [DEVICE]\n");
        return 2;
    }
    const char *device = argi < argc ? argv[argi] : "/dev/vda";
    char line[256];
    int fd = open(device, O_WRONLY | O_CLOEXEC);
    if (fd < 0) {
        snprintf(line, sizeof line, "KVMOTION FAILED disk %s: %s\n", device, strerror(errno));
        say(line);
        return 1;
    }
    uint32_t run;
    if (getrandom(&run, sizeof run, GRND_NONBLOCK) != sizeof run)
        run = (uint32_t)now_ns() ^ (uint32_t)getpid() << 16; /* entropy not ready yet: good enough */
    if (background) {
        pid_t pid = fork();
        if (pid < 0) {
            snprintf(line, sizeof line, "KVMOTION FAILED disk fork: %s\n", strerror(errno));
            say(line);
            return 1;
        }
        if (pid > 0)
            return 0;
        setsid();
    }
    crc_init();
    static unsigned char batch[BATCH * REC_SIZE];
    uint64_t seq = 0;
    int64_t deadline = now_ns();
    for (;;) {
        for (unsigned i = 0; i < BATCH; i++)
            encode(batch + i * REC_SIZE, run, seq + i);
        off_t off = (off_t)REC_OFFSET + (off_t)(seq * REC_SIZE);
        const char *failed = NULL;
        ssize_t n = pwrite(fd, batch, sizeof batch, off);
        if (n != (ssize_t)sizeof batch) {
            if (n >= 0)
                errno = ENOSPC; /* a short write: the device ends here */
            failed = "write";
        } else if (fsync(fd) < 0) {
            failed = "fsync";
        }
        if (failed) {
            snprintf(line, sizeof line, "KVMOTION DISK ERROR %s at seq %llu: %s\n", failed,
                     (unsigned long long)seq, strerror(errno));
            say(line);
            sleep_ns(RETRY_NS);
            deadline = now_ns();
            continue;
        }
        seq += BATCH;
        snprintf(line, sizeof line, "KVMOTION DISK ack=%llu\n", (unsigned long long)(seq - 1));
        say(line);
        deadline += INTERVAL_NS;
        int64_t now = now_ns();
        if (deadline < now - INTERVAL_NS)
            deadline = now; /* after a pause or a slow fsync: keep the pace, do not burst */
        if (deadline > now)
            sleep_ns(deadline - now);
    }
}
