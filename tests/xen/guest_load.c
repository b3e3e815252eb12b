/* GUEST SIDE load generator of tests/xen/bench_guest.py, run by the guest's bench task
 * (tests/xen/domu_guest.py task_bench) on the guest's own xen-blkfront disks.
 *
 * Owns: the two reads the real-Xen benches measure, as fio does them in dom0 (bench_blk.py),
 * without fio's 64 shared libraries in a guest initramfs: built static by the bench's make
 * target (gcc -static), no library beyond libc, Linux AIO through its system calls.
 *   guest-load seq DEV SECONDS         1 MiB O_DIRECT reads at depth 1, one after the other
 *                                      from offset 0, wrapping at the end of DEV
 *   guest-load rand DEV SECONDS DEPTH  4 KiB O_DIRECT reads at random 4 KiB-aligned offsets
 *                                      (a fixed seed), DEPTH of them in flight (io_submit)
 *   guest-load sum DEV                 FNV-1a 64 of DEV's first MiB (O_DIRECT)
 * Prints one line: "seq MBPS", "rand IOPS" or "sum HEX"; exit 1 with one line on stderr when
 * a read fails or comes back short.
 * Must not: judge the figures or the data (dom0 compares the sum with the image's).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MIB (1u << 20)
#define PAGE 4096u
#define MAX_DEPTH 256

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void die(const char *what, const char *dev)
{
    fprintf(stderr, "guest-load: %s on %s: %s\n", what, dev, errno ? strerror(errno) : "short read");
    exit(1);
}

static void *aligned(size_t bytes, const char *dev)
{
    void *p = NULL;
    if (posix_memalign(&p, PAGE, bytes) != 0)
        die("no memory for the buffers", dev);
    memset(p, 0, bytes);
    return p;
}

static uint64_t disk_bytes(int fd, const char *dev)
{
    uint64_t bytes = 0;
    if (ioctl(fd, BLKGETSIZE64, &bytes) != 0 || bytes < MIB)
        die("the disk's size (BLKGETSIZE64, at least 1 MiB)", dev);
    return bytes;
}

static int seq(int fd, const char *dev, double seconds)
{
    uint64_t end = disk_bytes(fd, dev) / MIB * MIB, offset = 0, done = 0;
    uint8_t *buf = aligned(MIB, dev);
    double started = now(), t;
    do {
        errno = 0;
        if (pread(fd, buf, MIB, (off_t)offset) != (ssize_t)MIB)
            die("a 1 MiB read", dev);
        done += MIB;
        offset = (offset + MIB) % end;
        t = now();
    } while (t - started < seconds);
    printf("seq %.1f\n", (double)done / (t - started) / 1e6);
    return 0;
}

static uint64_t next_random(uint64_t *state)
{
    uint64_t x = *state; /* xorshift64 */
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *state = x;
}

static int rand_reads(int fd, const char *dev, double seconds, unsigned depth)
{
    uint64_t pages = disk_bytes(fd, dev) / PAGE, state = 0x9e3779b97f4a7c15ull, done = 0;
    uint8_t *bufs = aligned((size_t)depth * PAGE, dev);
    struct iocb cbs[MAX_DEPTH], *list[MAX_DEPTH];
    struct io_event events[MAX_DEPTH];
    aio_context_t ctx = 0;
    if (syscall(SYS_io_setup, depth, &ctx) != 0)
        die("io_setup", dev);
    for (unsigned i = 0; i < depth; i++) {
        memset(&cbs[i], 0, sizeof cbs[i]);
        cbs[i].aio_fildes = (uint32_t)fd;
        cbs[i].aio_lio_opcode = IOCB_CMD_PREAD;
        cbs[i].aio_buf = (uint64_t)(uintptr_t)(bufs + (size_t)i * PAGE);
        cbs[i].aio_nbytes = PAGE;
        cbs[i].aio_offset = (int64_t)(next_random(&state) % pages * PAGE);
        cbs[i].aio_data = i;
        list[i] = &cbs[i];
    }
    if (syscall(SYS_io_submit, ctx, (long)depth, list) != (long)depth)
        die("io_submit", dev);
    unsigned in_flight = depth;
    double started = now(), t = started, stop = started + seconds;
    while (in_flight) {
        long n = syscall(SYS_io_getevents, ctx, 1L, (long)depth, events, NULL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            die("io_getevents", dev);
        t = now();
        unsigned again = 0;
        for (long k = 0; k < n; k++) {
            errno = 0;
            if (events[k].res != (int64_t)PAGE) {
                if (events[k].res < 0)
                    errno = (int)-events[k].res;
                die("a 4 KiB read", dev);
            }
            in_flight--;
            if (t < stop) {
                done++;
                struct iocb *cb = &cbs[events[k].data];
                cb->aio_offset = (int64_t)(next_random(&state) % pages * PAGE);
                list[again++] = cb;
            }
        }
        if (again) {
            if (syscall(SYS_io_submit, ctx, (long)again, list) != (long)again)
                die("io_submit", dev);
            in_flight += again;
        }
    }
    syscall(SYS_io_destroy, ctx);
    printf("rand %.0f\n", (double)done / (t - started));
    return 0;
}

static int sum(int fd, const char *dev)
{
    uint8_t *buf = aligned(MIB, dev);
    errno = 0;
    if (pread(fd, buf, MIB, 0) != (ssize_t)MIB)
        die("the first MiB", dev);
    uint64_t h = 0xcbf29ce484222325ull;
    for (uint32_t i = 0; i < MIB; i++)
        h = (h ^ buf[i]) * 0x100000001b3ull;
    printf("sum %016llx\n", (unsigned long long)h);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: guest-load seq DEV SECONDS | rand DEV SECONDS DEPTH | sum DEV\n");
        return 2;
    }
    const char *kind = argv[1], *dev = argv[2];
    int fd = open(dev, O_RDONLY | O_DIRECT);
    if (fd < 0)
        die("open", dev);
    if (strcmp(kind, "sum") == 0)
        return sum(fd, dev);
    double seconds = argc > 3 ? atof(argv[3]) : 0;
    if (seconds <= 0) {
        fprintf(stderr, "guest-load: SECONDS must be a positive number\n");
        return 2;
    }
    if (strcmp(kind, "seq") == 0)
        return seq(fd, dev, seconds);
    int depth = argc > 4 ? atoi(argv[4]) : 0;
    if (strcmp(kind, "rand") == 0 && depth >= 1 && depth <= MAX_DEPTH)
        return rand_reads(fd, dev, seconds, (unsigned)depth);
    fprintf(stderr, "guest-load: unknown kind %s or DEPTH not in 1..%d\n", kind, MAX_DEPTH);
    return 2;
}
