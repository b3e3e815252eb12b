/* blkback's compiled ring loop (built by bindings/build_ringloop.py through cffi's API mode).
 *
 * Owns: serving the plainly valid READ/WRITE requests, direct or INDIRECT, of one ring whose
 * every grant ref (indirect pages included) is in the persistent-grant cache: copy each slot
 * and each indirect segment list once (XSA-155), check them, find each
 * ref's mapped page in a hash table the Python SegmentMapper keeps in step with its cache,
 * merge the segments into an iovec, move the data straight between the image and the granted
 * pages, and write the response (the slot zeroed first, XSA-216). Reads of a regular image
 * file are copied from mapped windows of it (struct xt_image, below) where the ring was given
 * one (where xt_probe_reads measured the windows clearly faster: QEMU TCG) and it can; the
 * rest, and every write, go through preadv/pwritev. Stops at the first request that is
 * anything else: another operation, a broken rule, a ref not cached, an I/O that would wait
 * for the disk or failed. That request is left unconsumed for the Python path
 * (xentools/devices/blkback_queue.py), which stays the authority: it judges it, counts its
 * rule, and answers it.
 * xt_pass runs ring.h's consumer loop around xt_serve: reads req_prod once per round (an
 * overflowing producer stops it: the Python BackRing re-checks and fails the ring), serves,
 * publishes the responses (RING_PUSH_RESPONSES_AND_CHECK_NOTIFY, saying whether to notify),
 * and arms req_event before it returns (RING_FINAL_CHECK_FOR_REQUESTS), so one call serves
 * a wake-up's whole work when every request is plainly valid.
 * Must not: describe a blkif struct (every offset comes from xentools.core.blkif's Abi, the
 * one codec, through struct xt_layout), send an event (the caller notifies when told to),
 * map or unmap grants, or block on anything but the image.
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "blkback_ringloop.h"

#define XT_PAGE 4096u
#define XT_HEADER 64u           /* struct sring header before the entries (ring.h) */
#define XT_MAX_SEGS 11u         /* BLKIF_MAX_SEGMENTS_PER_REQUEST */
#define XT_MAX_INDIRECT 4096u   /* BLKIF_MAX_INDIRECT_SEGMENTS */
#define XT_IOV_MAX 1024         /* Linux's UIO_MAXIOV: more segments go to the Python path */
#define XT_SLOT_MAX 128u        /* larger than any blkif entry (112 / 108 bytes) */
#define XT_OP_READ 0u
#define XT_OP_WRITE 1u
#define XT_OP_INDIRECT 6u

/* Open addressing, linear probing, backward-shift deletion; capacity a power of two kept
 * at least twice the entries, so a probe always ends at an empty cell. A cell holds the ref
 * beside its page: a lookup touches one cache line (a 1 MiB request looks up 256 refs, and
 * the copy before it has pushed the table out of the caches). */
struct xt_cell {
    uint32_t ref;
    uintptr_t page; /* 0: empty */
};

struct xt_table {
    uint32_t mask, count;
    struct xt_cell *cells;
};

static uint32_t xt_hash(uint32_t ref) { return ref * 2654435761u; }

struct xt_table *xt_table_new(uint32_t entries)
{
    uint32_t cap = 16;
    while (cap < 2 * entries + 2)
        cap <<= 1;
    struct xt_table *t = calloc(1, sizeof *t);
    if (!t)
        return NULL;
    t->cells = calloc(cap, sizeof *t->cells);
    if (!t->cells) {
        free(t);
        return NULL;
    }
    t->mask = cap - 1;
    return t;
}

void xt_table_free(struct xt_table *t)
{
    if (t) {
        free(t->cells);
        free(t);
    }
}

static uintptr_t xt_table_get(const struct xt_table *t, uint32_t ref)
{
    uint32_t i = xt_hash(ref) & t->mask;
    while (t->cells[i].page) {
        if (t->cells[i].ref == ref)
            return t->cells[i].page;
        i = (i + 1) & t->mask;
    }
    return 0;
}

/* 0 done, -1 full (the caller sized it: never happens while entries <= its size). */
int xt_table_put(struct xt_table *t, uint32_t ref, uintptr_t page)
{
    uint32_t i = xt_hash(ref) & t->mask;
    while (t->cells[i].page) {
        if (t->cells[i].ref == ref) {
            t->cells[i].page = page;
            return 0;
        }
        i = (i + 1) & t->mask;
    }
    if (2 * (t->count + 1) > t->mask + 1)
        return -1;
    t->cells[i].ref = ref;
    t->cells[i].page = page;
    t->count++;
    return 0;
}

void xt_table_del(struct xt_table *t, uint32_t ref)
{
    uint32_t i = xt_hash(ref) & t->mask;
    while (t->cells[i].page && t->cells[i].ref != ref)
        i = (i + 1) & t->mask;
    if (!t->cells[i].page)
        return;
    t->cells[i].page = 0;
    t->count--;
    /* Move back every later entry of the run whose home lies at or before the hole. */
    uint32_t hole = i, j = i;
    for (;;) {
        j = (j + 1) & t->mask;
        if (!t->cells[j].page)
            return;
        uint32_t home = xt_hash(t->cells[j].ref) & t->mask;
        if (((j - home) & t->mask) >= ((j - hole) & t->mask)) {
            t->cells[hole] = t->cells[j];
            t->cells[j].page = 0;
            hole = j;
        }
    }
}

void xt_table_clear(struct xt_table *t)
{
    memset(t->cells, 0, (size_t)(t->mask + 1) * sizeof *t->cells);
    t->count = 0;
}

uint32_t xt_table_count(const struct xt_table *t) { return t->count; }

static uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* Reads from mapped windows of the image.
 *
 * Why: under QEMU's TCG, where this project's nested Xen runs, the kernel's copy from the page
 * cache (copy_to_user: byte string moves on CPUs with ERMS, as `-cpu max` has) ran at 243 MB/s
 * in dom0, an 8-byte string move (rep movsq) from a mapping of the same file at 2302 MB/s
 * (measured 2026-11-27, 128 KiB chunks; 4 KiB: preadv 57 MB/s, the copy 2158 MB/s). On
 * hardware both run at memory speed; the mapping still saves a system call per request.
 *
 * A window is `window` bytes of an image file mapped read-only and shared (the page cache
 * itself, no copy of the image). Every window of the process belongs to one pool (struct
 * xt_pool): at most `budget` windows are mapped at once, whatever the number of images and
 * queues and their sizes, least recently used unmapped first, and the queues of one image
 * share its windows. So blkback's resident memory stays flat in the image's size: the mapped
 * page cache it counts is at most budget * window bytes. A thread pins the windows of a read
 * while it checks and copies (`pins`): a pinned window is never unmapped; one dropped
 * meanwhile (a discard, its image closed, a new configuration) is unmapped by its last user.
 * A window that holds a hole (SEEK_HOLE) is not mapped: reading a hole through a mapping of a
 * tmpfs file would allocate memory for it (preadv reads zeroes without allocating); such
 * windows are remembered for xt_recheck_ticks lookups and read with preadv meanwhile. A
 * discard punches holes: the queue drops the windows it touched (xt_image_forget). If the
 * file shrinks under a mapping, the copy's SIGBUS is caught (sigsetjmp) and the request goes
 * to the Python path, which answers it with the error preadv gives. */

static const uint64_t xt_recheck_ticks = 256; /* lookups a hole, or a window all in memory, is remembered for */

enum {
    XT_POOL_SLOTS = 64,     /* windows and remembered holes of the whole process */
    XT_POOL_HOLES = 16,     /* slots always left for holes: the budget is at most the rest */
    XT_WINDOW_PAGES = 1024, /* the most pages of a window (one mincore vector) */
};

/* A slot is free (!live, !base), a hole (live, !base), a mapped window (live, base), or a
 * window dropped while pinned (!live, base: unmapped when its last pin goes). */
struct xt_window {
    uint64_t dev, ino; /* the file */
    uint64_t index;    /* window number: file offset / window */
    uint8_t *base;     /* NULL: a hole, or free */
    size_t len;
    uint64_t used;     /* pool clock at the last lookup (mapped) or when found holed */
    uint64_t resident_until; /* pool clock before which the whole window was found in memory */
    uint32_t pins;     /* reads copying from it now */
    int live;          /* found by lookups */
};

struct xt_pool {
    pthread_mutex_t lock; /* guards everything below */
    uint64_t window;      /* bytes per window */
    uint32_t budget;      /* windows mapped at once, in the whole process */
    uint32_t mapped;      /* windows mapped now (pinned dropped ones included) */
    uint64_t clock;       /* lookups so far */
    struct xt_window w[XT_POOL_SLOTS];
};

static struct xt_pool xt_pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .window = 2u << 20, .budget = 8};

struct xt_image {
    int fd;
    uint64_t bytes;
    uint64_t dev, ino;
};

static __thread sigjmp_buf *volatile xt_bus_jump; /* set while this thread copies from a window */
static struct sigaction xt_bus_previous;
static pthread_once_t xt_bus_once = PTHREAD_ONCE_INIT;
static int xt_bus_ready;

static void xt_on_bus(int sig, siginfo_t *info, void *context)
{
    sigjmp_buf *jump = xt_bus_jump;
    if (jump) {
        xt_bus_jump = NULL;
        siglongjmp(*jump, 1);
    }
    /* Not a copy of ours: what happened before us happens. */
    if (xt_bus_previous.sa_flags & SA_SIGINFO) {
        xt_bus_previous.sa_sigaction(sig, info, context);
        return;
    }
    if (xt_bus_previous.sa_handler != SIG_DFL && xt_bus_previous.sa_handler != SIG_IGN) {
        xt_bus_previous.sa_handler(sig);
        return;
    }
    sigaction(SIGBUS, &xt_bus_previous, NULL); /* the faulting access runs again, unhandled */
}

static void xt_bus_install(void)
{
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = xt_on_bus;
    action.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK; /* NODEFER: not blocked after the jump */
    sigemptyset(&action.sa_mask);
    xt_bus_ready = sigaction(SIGBUS, &action, &xt_bus_previous) == 0;
}

/* Lock held. Out of lookups; unmapped now unless pinned (then by its last user). */
static void xt_window_drop(struct xt_window *w)
{
    w->live = 0;
    if (w->base && !w->pins) {
        munmap(w->base, w->len);
        w->base = NULL;
        xt_pool.mapped--;
    }
}

static int xt_window_of(const struct xt_window *w, const struct xt_image *img)
{
    return w->live && w->dev == img->dev && w->ino == img->ino;
}

/* Unpin the windows of one read. */
static void xt_window_release(struct xt_window **ws, uint32_t n)
{
    pthread_mutex_lock(&xt_pool.lock);
    for (uint32_t k = 0; k < n; k++)
        if (--ws[k]->pins == 0 && !ws[k]->live)
            xt_window_drop(ws[k]);
    pthread_mutex_unlock(&xt_pool.lock);
}

/* The pool's window size and budget (windows mapped at once in the process): 0, or -1 for
 * nonsense. A change drops every window (pinned ones go when their reads are done). */
int xt_map_configure(uint32_t window_bytes, uint32_t budget)
{
    if (window_bytes < XT_PAGE || window_bytes % XT_PAGE || window_bytes / XT_PAGE > XT_WINDOW_PAGES ||
        budget < 4 || budget > XT_POOL_SLOTS - XT_POOL_HOLES)
        return -1;
    pthread_mutex_lock(&xt_pool.lock);
    if (xt_pool.window != window_bytes || xt_pool.budget != budget) {
        for (uint32_t i = 0; i < XT_POOL_SLOTS; i++)
            xt_window_drop(&xt_pool.w[i]);
        xt_pool.window = window_bytes;
        xt_pool.budget = budget;
    }
    pthread_mutex_unlock(&xt_pool.lock);
    return 0;
}

/* Windows mapped now in the whole process, and the most there may be. */
void xt_map_usage(uint32_t *mapped, uint32_t *budget, uint64_t *window_bytes)
{
    pthread_mutex_lock(&xt_pool.lock);
    *mapped = xt_pool.mapped;
    *budget = xt_pool.budget;
    *window_bytes = xt_pool.window;
    pthread_mutex_unlock(&xt_pool.lock);
}

struct xt_image *xt_image_new(int fd, uint64_t bytes)
{
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
        return NULL; /* a block device: preadv it is */
    pthread_once(&xt_bus_once, xt_bus_install);
    if (!xt_bus_ready)
        return NULL;
    struct xt_image *img = calloc(1, sizeof *img);
    if (!img)
        return NULL;
    img->fd = fd;
    img->bytes = bytes;
    img->dev = (uint64_t)st.st_dev;
    img->ino = (uint64_t)st.st_ino;
    return img;
}

/* Drop the image's windows over [first, last] (window numbers). */
static void xt_image_drop(const struct xt_image *img, uint64_t first, uint64_t last)
{
    pthread_mutex_lock(&xt_pool.lock);
    for (uint32_t i = 0; i < XT_POOL_SLOTS; i++) {
        struct xt_window *w = &xt_pool.w[i];
        if (xt_window_of(w, img) && w->index >= first && w->index <= last)
            xt_window_drop(w);
    }
    pthread_mutex_unlock(&xt_pool.lock);
}

/* The image's windows go with it (another queue of the same file maps again what it needs). */
void xt_image_free(struct xt_image *img)
{
    if (!img)
        return;
    xt_image_drop(img, 0, UINT64_MAX);
    free(img);
}

void xt_image_forget(struct xt_image *img, uint64_t offset, uint64_t length)
{
    if (!img || !length)
        return;
    uint64_t window = __atomic_load_n(&xt_pool.window, __ATOMIC_RELAXED);
    xt_image_drop(img, offset / window, (offset + length - 1) / window);
}

uint32_t xt_image_mapped(const struct xt_image *img)
{
    uint32_t n = 0;
    pthread_mutex_lock(&xt_pool.lock);
    for (uint32_t i = 0; img && i < XT_POOL_SLOTS; i++)
        n += xt_window_of(&xt_pool.w[i], img) && xt_pool.w[i].base;
    pthread_mutex_unlock(&xt_pool.lock);
    return n;
}

/* A window is mapped for a read only if the read is large or every window of the image fits
 * in the budget at once: small reads scattered over a larger image would map, check and unmap
 * 2 MiB for each 4 KiB (measured: 4 KiB random reads over 256 MiB fell to a third of preadv's
 * rate). Other reads use a window already mapped, or preadv. */
static const uint64_t xt_map_min_bytes = 64 * 1024;

/* Lock held. The window holding file offset `at`, pinned, mapped if it can be and `may_map`;
 * NULL for a hole, a failure, a window not mapped when `may_map` is 0, or a budget all
 * pinned by other reads. */
static struct xt_window *xt_window_get(const struct xt_image *img, uint64_t at, int may_map)
{
    uint64_t index = at / xt_pool.window, now = ++xt_pool.clock;
    struct xt_window *slot = NULL;
    for (uint32_t i = 0; i < XT_POOL_SLOTS; i++) {
        struct xt_window *w = &xt_pool.w[i];
        if (xt_window_of(w, img) && w->index == index) {
            if (w->base) {
                w->pins++;
                w->used = now;
                return w;
            }
            if (now - w->used < xt_recheck_ticks)
                return NULL;
            xt_window_drop(w); /* look again: the hole may have been written since */
            break;
        }
    }
    if (!may_map)
        return NULL;
    /* A slot: a free one, else the least recently used hole or unpinned window. */
    for (uint32_t i = 0; i < XT_POOL_SLOTS; i++) {
        struct xt_window *w = &xt_pool.w[i];
        if (!w->live && !w->base) {
            slot = w;
            break;
        }
        if (w->live && !w->pins && (!slot || w->used < slot->used))
            slot = w;
    }
    if (!slot)
        return NULL;
    xt_window_drop(slot);
    /* The budget: unmap the least recently used unpinned windows until one more fits. */
    while (xt_pool.mapped >= xt_pool.budget) {
        struct xt_window *victim = NULL;
        for (uint32_t i = 0; i < XT_POOL_SLOTS; i++) {
            struct xt_window *w = &xt_pool.w[i];
            if (w->live && w->base && !w->pins && (!victim || w->used < victim->used))
                victim = w;
        }
        if (!victim)
            return NULL; /* every mapped window is being copied from: preadv this time */
        xt_window_drop(victim);
    }
    uint64_t start = index * xt_pool.window, end = start + xt_pool.window;
    if (end > img->bytes)
        end = img->bytes;
    slot->dev = img->dev;
    slot->ino = img->ino;
    slot->index = index;
    slot->used = now;
    slot->resident_until = 0;
    slot->pins = 0;
    slot->live = 1;
    off_t hole = lseek(img->fd, (off_t)start, SEEK_HOLE);
    if (hole < 0 || (uint64_t)hole < end)
        return NULL; /* remembered as a hole */
    size_t len = (size_t)(((end - start) + XT_PAGE - 1) & ~(uint64_t)(XT_PAGE - 1));
    void *base = mmap(NULL, len, PROT_READ, MAP_SHARED, img->fd, (off_t)start);
    if (base == MAP_FAILED)
        return NULL; /* remembered as a hole: tried again later */
    slot->base = base;
    slot->len = len;
    slot->pins = 1;
    xt_pool.mapped++;
    return slot;
}

static void xt_copy(uint8_t *dst, const uint8_t *src, size_t n)
{
#if defined(__x86_64__)
    if (((n | (uintptr_t)dst | (uintptr_t)src) & 7) == 0) {
        size_t words = n / 8;
        __asm__ volatile("rep movsq" : "+D"(dst), "+S"(src), "+c"(words) : : "memory");
        return;
    }
#endif
    memcpy(dst, src, n);
}

/* Copy `total` bytes at `offset` into the iovec from mapped windows: 0 done, 1 not this way
 * (a hole, not mappable, or with `resident` some page not in memory: a read that would wait
 * for the disk is not done on the ring thread), -1 the file shrank under the mapping. */
static int xt_image_read(struct xt_image *img, const struct iovec *iov, int n, uint64_t offset, uint64_t total,
                         int resident)
{
    struct xt_window *ws[4];
    uint32_t nw = 0;
    pthread_mutex_lock(&xt_pool.lock);
    uint64_t window = xt_pool.window;
    if (offset + total > img->bytes || total > 2 * window) {
        pthread_mutex_unlock(&xt_pool.lock);
        return 1;
    }
    int may_map = total >= xt_map_min_bytes || img->bytes <= window * xt_pool.budget;
    for (uint64_t at = offset; at < offset + total; at = (at / window + 1) * window) {
        struct xt_window *w = xt_window_get(img, at, may_map);
        if (!w)
            break;
        ws[nw++] = w;
    }
    uint64_t clock = xt_pool.clock;
    pthread_mutex_unlock(&xt_pool.lock);
    int usable = nw == (offset + total - 1) / window - offset / window + 1;
    for (uint32_t k = 0; usable && k < nw; k++) {
        struct xt_window *w = ws[k];
        uint64_t wstart = w->index * window, from = k ? wstart : offset;
        uint64_t stop = offset + total < wstart + window ? offset + total - wstart : window;
        if (stop > w->len) {
            usable = 0; /* mapped for a shorter image of the same file */
            break;
        }
        if (!resident || clock < __atomic_load_n(&w->resident_until, __ATOMIC_RELAXED))
            continue;
        /* One mincore for the whole window; all in memory is remembered for a while (a
         * system call costs about as much as a 4 KiB copy in a nested PV dom0). */
        static __thread unsigned char vec[XT_WINDOW_PAGES];
        size_t whole = w->len / XT_PAGE, p = 0;
        if (mincore(w->base, w->len, vec) != 0) {
            usable = 0;
            break;
        }
        while (p < whole && (vec[p] & 1))
            p++;
        if (p == whole) {
            __atomic_store_n(&w->resident_until, clock + xt_recheck_ticks, __ATOMIC_RELAXED);
            continue;
        }
        for (p = (size_t)((from - wstart) / XT_PAGE); p < (stop + XT_PAGE - 1) / XT_PAGE; p++)
            if (!(vec[p] & 1))
                usable = 0; /* then this request's pages must be */
    }
    if (!usable) {
        xt_window_release(ws, nw);
        return 1;
    }
    sigjmp_buf jump;
    if (sigsetjmp(jump, 0)) {
        xt_bus_jump = NULL;
        xt_window_release(ws, nw);
        return -1;
    }
    xt_bus_jump = &jump;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    uint64_t at = offset;
    uint32_t k = 0;
    for (int i = 0; i < n; i++) {
        uint8_t *dst = iov[i].iov_base;
        size_t left = iov[i].iov_len;
        while (left) {
            struct xt_window *w = ws[k];
            uint64_t rel = at - w->index * window;
            size_t take = left;
            if (rel + take > window)
                take = (size_t)(window - rel);
            xt_copy(dst, w->base + rel, take);
            dst += take;
            left -= take;
            at += take;
            if (rel + take == window)
                k++;
        }
    }
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    xt_bus_jump = NULL;
    xt_window_release(ws, nw);
    return 0;
}

static uint64_t xt_now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* Which way reads serve best here: the windows above, or preadv straight into the granted
 * pages (one kernel copy, no mapped page cache counted in blkback's RSS). Both move bytes
 * from the page cache; what differs is who copies. Measured (2026-11-27/28, 256 KiB from the
 * page cache, best of five): on this project's 2-core hardware host, preadv 10.1 us against a
 * copy from a mapping 6.7 us on ext4 (1.5x), 17.8 against 7.5 us on tmpfs (2.4x), while a
 * window that is not reused (map, fault, copy, unmap) cost 24-33 us; under QEMU TCG (nested
 * dom0) the kernel's copy ran ~10x slower than the copy from a mapping (the numbers above).
 * xt_probe_reads times both over `len` bytes of the image's first run of data (never a hole:
 * read through a mapping, a tmpfs hole would get memory), after one warming round, and
 * unmaps and frees all it used: 0 with the best times, -1 where it cannot (not a regular
 * file, no run of data that long, a failed call). Python decides (blkback_ringloop.py). */
int xt_probe_reads(int fd, uint64_t bytes, uint32_t len, uint64_t *preadv_ns, uint64_t *copy_ns)
{
    struct stat st;
    len &= ~(XT_PAGE - 1);
    if (!len || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || bytes < len || (uint64_t)st.st_size < len)
        return -1;
    off_t at = lseek(fd, 0, SEEK_DATA);
    if (at < 0)
        return -1;
    at &= ~(off_t)(XT_PAGE - 1);
    off_t hole = lseek(fd, at, SEEK_HOLE);
    if (hole < 0 || (uint64_t)hole < (uint64_t)at + len || (uint64_t)at + len > bytes)
        return -1;
    pthread_once(&xt_bus_once, xt_bus_install);
    if (!xt_bus_ready)
        return -1;
    uint8_t *buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED)
        return -1;
    uint8_t *map = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, at);
    if (map == MAP_FAILED) {
        munmap(buf, len);
        return -1;
    }
    uint64_t best_read = UINT64_MAX, best_copy = UINT64_MAX;
    int ok = 1;
    sigjmp_buf jump;
    if (sigsetjmp(jump, 0)) { /* the file shrank under the mapping */
        xt_bus_jump = NULL;
        ok = 0;
    } else {
        for (int round = 0; round < 6 && ok; round++) {
            struct iovec iov = {.iov_base = buf, .iov_len = len};
            uint64_t t0 = xt_now_ns();
            ok = preadv(fd, &iov, 1, at) == (ssize_t)len;
            uint64_t t1 = xt_now_ns();
            xt_bus_jump = &jump;
            __atomic_signal_fence(__ATOMIC_SEQ_CST);
            xt_copy(buf, map, len);
            __atomic_signal_fence(__ATOMIC_SEQ_CST);
            xt_bus_jump = NULL;
            uint64_t t2 = xt_now_ns();
            if (round) { /* the first round fills the page cache and faults the mapping in */
                best_read = t1 - t0 < best_read ? t1 - t0 : best_read;
                best_copy = t2 - t1 < best_copy ? t2 - t1 : best_copy;
            }
        }
    }
    munmap(map, len);
    munmap(buf, len);
    if (!ok)
        return -1;
    *preadv_ns = best_read;
    *copy_ns = best_copy;
    return 0;
}

/* Set once preadv2/pwritev2 said RWF_NOWAIT is not supported (overlayfs, tmpfs on Linux 6.1):
 * this thread's image then never gets the flag again (one system call per request, not two). */
static __thread int xt_nowait_unsupported;

/* Every byte of the transfer, or -1 (errno set; EIO for end of file). With nowait, -2 when
 * the kernel says the data is not at hand (EAGAIN or a short first transfer). */
static int xt_move(int fd, int write, struct iovec *iov, int n, uint64_t offset, uint64_t total, int nowait)
{
    uint64_t done = 0;
    if (xt_nowait_unsupported)
        nowait = 0;
    while (done < total) {
        ssize_t got;
        if (nowait)
            got = write ? pwritev2(fd, iov, n, (off_t)offset, RWF_NOWAIT)
                        : preadv2(fd, iov, n, (off_t)offset, RWF_NOWAIT);
        else if (n == 1) /* one run of pages (a 4 KiB request): no iovec for the kernel to import */
            got = write ? pwrite(fd, iov->iov_base, iov->iov_len, (off_t)offset)
                        : pread(fd, iov->iov_base, iov->iov_len, (off_t)offset);
        else
            got = write ? pwritev(fd, iov, n, (off_t)offset) : preadv(fd, iov, n, (off_t)offset);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            if (nowait && errno == EAGAIN)
                return -2;
            if (nowait && (errno == EOPNOTSUPP || errno == EINVAL || errno == ENOSYS)) {
                nowait = 0; /* this kernel or file system cannot say: just wait, from now on */
                xt_nowait_unsupported = 1;
                continue;
            }
            return -1;
        }
        if (got == 0) {
            errno = EIO;
            return -1;
        }
        done += (uint64_t)got;
        offset += (uint64_t)got;
        if (done < total) {
            if (nowait)
                return -2; /* partly at hand: the Python path hands it to an I/O thread */
            while (n && (uint64_t)got >= iov->iov_len) {
                got -= (ssize_t)iov->iov_len;
                iov++;
                n--;
            }
            iov->iov_base = (uint8_t *)iov->iov_base + got;
            iov->iov_len -= (size_t)got;
        }
    }
    return 0;
}

/* Serve up to `available` requests from *req_cons. Returns how many were served (consumed
 * and answered at *rsp_prod_pvt, both advanced); *stop says why it stopped early:
 * 0 none, 1 the request is for the Python path (operation, rule, ref not cached),
 * 2 its data is not at hand (an I/O thread's job), 3 the image failed (the Python path
 * redoes it and answers the error). */
static uint32_t xt_serve_some(const struct xt_layout *L, const struct xt_policy *P, const struct xt_table *T,
                              uint8_t *sring, uint32_t nr_ents, uint32_t *req_cons, uint32_t *rsp_prod_pvt,
                              uint32_t available, int fd, struct xt_image *img, uint64_t inline_bytes,
                              struct xt_stats *stats, int *stop, uint64_t byte_budget);

uint32_t xt_serve(const struct xt_layout *L, const struct xt_policy *P, const struct xt_table *T,
                  uint8_t *sring, uint32_t nr_ents, uint32_t *req_cons, uint32_t *rsp_prod_pvt,
                  uint32_t available, int fd, struct xt_image *img, uint64_t inline_bytes,
                  struct xt_stats *stats, int *stop)
{
    return xt_serve_some(L, P, T, sring, nr_ents, req_cons, rsp_prod_pvt, available, fd, img, inline_bytes, stats,
                         stop, UINT64_MAX);
}

/* xt_serve, returning early (no *stop) once the requests served moved `byte_budget` bytes. */
static uint32_t xt_serve_some(const struct xt_layout *L, const struct xt_policy *P, const struct xt_table *T,
                              uint8_t *sring, uint32_t nr_ents, uint32_t *req_cons, uint32_t *rsp_prod_pvt,
                              uint32_t available, int fd, struct xt_image *img, uint64_t inline_bytes,
                              struct xt_stats *stats, int *stop, uint64_t byte_budget)
{
    uint64_t moved_bytes = 0;
    uint64_t started = xt_now_ns();
    uint8_t slot[XT_SLOT_MAX];
    static __thread uint8_t indirect[XT_MAX_INDIRECT * 8]; /* one ring thread per queue */
    static __thread struct iovec iov[XT_IOV_MAX];
    uint32_t served = 0;
    uint32_t cons = *req_cons, prod = *rsp_prod_pvt;
    *stop = 0;
    if (L->request_size > XT_SLOT_MAX || L->response_size > L->entry_size || L->segment_size != 8) {
        *stop = 1;
        return 0;
    }
    while (served < available) {
        uint8_t *entry = sring + XT_HEADER + (size_t)(cons & (nr_ents - 1)) * L->entry_size;
        memcpy(slot, entry, L->request_size); /* the one private copy (XSA-155) */
        __atomic_signal_fence(__ATOMIC_SEQ_CST); /* read the copy only, never the ring again */
        uint32_t wire = slot[L->req_operation], op, nseg;
        const uint8_t *segs;
        uint64_t sector, id;
        if (wire == XT_OP_READ || wire == XT_OP_WRITE) {
            op = wire;
            nseg = slot[L->req_nr_segments];
            if (nseg < 1 || nseg > XT_MAX_SEGS) {
                *stop = 1;
                break;
            }
            segs = slot + L->req_seg;
            sector = rd64(slot + L->req_sector_number);
            id = rd64(slot + L->req_id);
        } else if (wire == XT_OP_INDIRECT) {
            op = slot[L->indirect_indirect_op];
            nseg = rd16(slot + L->indirect_nr_segments);
            if ((op != XT_OP_READ && op != XT_OP_WRITE) || nseg < 1 || nseg > P->max_indirect_segments ||
                nseg > XT_MAX_INDIRECT || nseg > XT_IOV_MAX) {
                *stop = 1;
                break;
            }
            /* Copy the segment lists out of the indirect pages once (XSA-155). */
            uint32_t per_page = XT_PAGE / L->segment_size, left = nseg, page_no = 0;
            int missing = 0;
            while (left) {
                uint32_t take = left < per_page ? left : per_page;
                uintptr_t page = xt_table_get(T, rd32(slot + L->indirect_grefs + 4 * page_no));
                if (!page) {
                    missing = 1;
                    break;
                }
                memcpy(indirect + (size_t)(nseg - left) * L->segment_size, (const void *)page,
                       (size_t)take * L->segment_size);
                left -= take;
                page_no++;
            }
            if (missing) {
                *stop = 1;
                break;
            }
            __atomic_signal_fence(__ATOMIC_SEQ_CST);
            segs = indirect;
            sector = rd64(slot + L->indirect_sector_number);
            id = rd64(slot + L->indirect_id);
        } else {
            *stop = 1;
            break;
        }
        if (op == XT_OP_WRITE && P->readonly) {
            *stop = 1;
            break;
        }
        uint64_t units = 0;
        int n = 0, bad = 0;
        uint8_t *end = NULL;
        for (uint32_t s = 0; s < nseg; s++) {
            const uint8_t *seg = segs + (size_t)s * L->segment_size;
            uint32_t first = seg[L->seg_first_sect], last = seg[L->seg_last_sect];
            if (last >= P->units_per_page || first > last) {
                bad = 1;
                break;
            }
            uintptr_t page = xt_table_get(T, rd32(seg + L->seg_gref));
            if (!page) {
                bad = 1;
                break;
            }
            uint8_t *start = (uint8_t *)page + (size_t)first * P->unit;
            size_t len = (size_t)(last - first + 1) * P->unit;
            if (n && start == end) {
                iov[n - 1].iov_len += len;
            } else {
                iov[n].iov_base = start;
                iov[n].iov_len = len;
                n++;
            }
            end = start + len;
            units += last - first + 1;
        }
        if (bad || sector > P->disk_bytes / P->unit) {
            *stop = 1;
            break;
        }
        uint64_t offset = sector * P->unit, nbytes = units * P->unit;
        if (offset + nbytes > P->disk_bytes) {
            *stop = 1;
            break;
        }
        /* Timed only for large requests: a clock read may be a system call (a Xen PV guest
         * without a stable TSC has no vDSO clock), dear beside a 4 KiB copy. */
        uint64_t io_started = nbytes > inline_bytes ? xt_now_ns() : 0;
        int moved = 1;
        if (op == XT_OP_READ && img) {
            moved = xt_image_read(img, iov, n, offset, nbytes, nbytes > inline_bytes);
            if (moved == 0)
                stats->mapped_reads++;
            else if (moved < 0)
                moved = -1; /* the image shrank: the Python path redoes it and answers the error */
        }
        if (moved > 0)
            moved = xt_move(fd, op == XT_OP_WRITE, iov, n, offset, nbytes, nbytes > inline_bytes);
        if (io_started)
            stats->io_ns += xt_now_ns() - io_started;
        if (moved == -2) {
            *stop = 2;
            break;
        }
        if (moved < 0) {
            *stop = 3;
            break;
        }
        uint8_t *rsp = sring + XT_HEADER + (size_t)(prod & (nr_ents - 1)) * L->entry_size;
        uint8_t out[XT_SLOT_MAX];
        int16_t status = 0; /* BLKIF_RSP_OKAY */
        memset(out, 0, L->response_size); /* nothing of ours leaks through padding (XSA-216) */
        memcpy(out + L->rsp_id, &id, 8);
        out[L->rsp_operation] = (uint8_t)op;
        memcpy(out + L->rsp_status, &status, 2);
        memcpy(rsp, out, L->response_size);
        prod++;
        cons++;
        served++;
        uint64_t *count = wire == XT_OP_INDIRECT ? (op == XT_OP_READ ? &stats->indirect_reads : &stats->indirect_writes)
                                                 : (op == XT_OP_READ ? &stats->reads : &stats->writes);
        count[0]++;
        count[1] += nseg;
        count[2] += nbytes;
        moved_bytes += nbytes;
        if (moved_bytes >= byte_budget)
            break;
    }
    __atomic_thread_fence(__ATOMIC_RELEASE); /* responses written before rsp_prod moves */
    *req_cons = cons;
    *rsp_prod_pvt = prod;
    stats->serve_ns += xt_now_ns() - started;
    return served;
}

/* struct sring's header (ring.h): four 32-bit indexes, then padding up to XT_HEADER. */
static uint32_t *xt_index(uint8_t *sring, int which) { return (uint32_t *)(void *)(sring + 4 * which); }
enum { XT_REQ_PROD, XT_REQ_EVENT, XT_RSP_PROD, XT_RSP_EVENT };

/* RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: publish rsp_prod_pvt; *notify set when rsp_event lies
 * in (old, new]. */
static void xt_push(uint8_t *sring, uint32_t new_prod, int *notify)
{
    uint32_t old = __atomic_load_n(xt_index(sring, XT_RSP_PROD), __ATOMIC_RELAXED);
    if (old == new_prod)
        return;
    __atomic_store_n(xt_index(sring, XT_RSP_PROD), new_prod, __ATOMIC_RELEASE); /* slots first */
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* the frontend sees them before we read rsp_event */
    uint32_t event = __atomic_load_n(xt_index(sring, XT_RSP_EVENT), __ATOMIC_RELAXED);
    if ((uint32_t)(new_prod - event) < (uint32_t)(new_prod - old))
        *notify = 1;
}

int xt_evt_notify(struct xt_evt *E);

/* ring.h's consumer loop: serve until the ring is empty after arming req_event
 * (RING_FINAL_CHECK_FOR_REQUESTS) or a request is not the loop's (*stop as xt_serve, or 4:
 * req_prod overflows the ring; nothing consumed then), publishing the responses after each
 * round of at most `publish_every` requests (0: all waiting) or `publish_bytes` moved. A
 * notify owed is sent through `E` (xt_wait), or with E NULL only recorded in *owed; a notify
 * E cannot send (the channel is Python's) sets *owed and ends the loop. */
static uint32_t xt_rounds(const struct xt_layout *L, const struct xt_policy *P, const struct xt_table *T,
                          uint8_t *sring, uint32_t nr_ents, uint32_t *req_cons, uint32_t *rsp_prod_pvt,
                          int fd, struct xt_image *img, uint64_t inline_bytes, struct xt_stats *stats, int *stop,
                          uint32_t publish_every, uint64_t publish_bytes, struct xt_evt *E, int *owed)
{
    uint32_t total = 0;
    int armed = 0;
    for (;;) {
        uint32_t req_prod = __atomic_load_n(xt_index(sring, XT_REQ_PROD), __ATOMIC_ACQUIRE);
        uint32_t cons = *req_cons, prod = *rsp_prod_pvt;
        if ((uint32_t)(req_prod - prod) > nr_ents) {
            *stop = 4; /* RING_REQUEST_PROD_OVERFLOW: the Python BackRing says it */
            return total;
        }
        uint32_t waiting = req_prod - cons, room = nr_ents - (cons - prod);
        uint32_t available = waiting < room ? waiting : room;
        if (available) {
            armed = 0;
            if (publish_every && available > publish_every)
                available = publish_every;
            total += xt_serve_some(L, P, T, sring, nr_ents, req_cons, rsp_prod_pvt, available, fd, img,
                                   inline_bytes, stats, stop, publish_bytes);
            int notify = 0;
            xt_push(sring, *rsp_prod_pvt, &notify);
            if (E)
                E->rounds++;
            if (notify && (!E || xt_evt_notify(E) < 0)) {
                *owed = 1;
                if (E)
                    return total;
            }
            if (*stop)
                return total;
            continue;
        }
        if (armed)
            return total; /* checked again after arming: nothing came */
        /* RING_FINAL_CHECK_FOR_REQUESTS: ask for an event at the next request, then look again. */
        __atomic_store_n(xt_index(sring, XT_REQ_EVENT), cons + 1, __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        armed = 1;
    }
}

/* Serve until the ring is empty or a request is not the loop's (xt_rounds, one round for all
 * that waits). Responses the caller wrote before (at *rsp_prod_pvt) are published with the
 * loop's. Returns the requests served. */
uint32_t xt_pass(const struct xt_layout *L, const struct xt_policy *P, const struct xt_table *T,
                 uint8_t *sring, uint32_t nr_ents, uint32_t *req_cons, uint32_t *rsp_prod_pvt,
                 int fd, struct xt_image *img, uint64_t inline_bytes, struct xt_stats *stats, int *stop,
                 int *notify)
{
    *stop = 0;
    *notify = 0;
    uint32_t total = xt_rounds(L, P, T, sring, nr_ents, req_cons, rsp_prod_pvt, fd, img, inline_bytes, stats, stop,
                               0, UINT64_MAX, NULL, notify);
    xt_push(sring, *rsp_prod_pvt, notify);
    return total;
}

/* ---- xt_wait: the ring thread's wait loop, without Python between wake-ups ----
 *
 * The software Xen's event channels are direct (xentools/platform/sim/evtchn.py and
 * evtchn_channel.py): a notify is a compare-and-swap on the peer's state word and, when it
 * delivers, one byte written to the peer handle's doorbell pipe; taking an event reads one
 * byte of the own doorbell and clears READY; an unmask clears MASKED or, with an event
 * pending, delivers it again. These are the same transitions, on the same words, with the
 * same bits (struct xt_evt carries them from evtchn_channel), done here so that a wake-up
 * costs the ring thread no Python: sleep in poll(2), take the event, unmask, serve, publish
 * and notify, and again. Anything else goes back to Python, which handles it as before: a
 * word that says CLOSED or not BOUND (the Python handle relinks), a request the serving loop
 * leaves (*stop), a readable wake fd (an I/O completion, a stop, a barrier elsewhere), the
 * timeout. Responses are published every `publish_every` requests (0: once per round) or
 * once the requests served moved `publish_bytes`, and the frontend notified then if it
 * asked, so it can reap and refill while this thread serves the rest.
 * On real Xen (struct xt_evt of kind XT_EVT_XENEVTCHN) the same loop sleeps in poll(2) on the
 * libxenevtchn handle's fd and takes, unmasks and notifies through the library's own
 * functions (xt_xce_take, xt_evt_notify); what fails goes back to Python as above. */

enum { XT_W_STOP = 1, XT_W_WAKE = 2, XT_W_TIMEOUT = 4, XT_W_EVTCHN = 8, XT_W_NOTIFY = 16, XT_W_UNMASK = 32 };

void xt_ring_bell(int fd)
{
    ssize_t r;
    do
        r = write(fd, "\1", 1);
    while (r < 0 && errno == EINTR); /* EAGAIN: the reader is awake anyway; EPIPE: nobody to wake */
}

int xt_cas(uint32_t *word, uint32_t *old, uint32_t new)
{
    return __atomic_compare_exchange_n(word, old, new, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

/* A notify to the peer: 0 done (delivered, or nothing to do), -1 Python's (relink, or the
 * word fought over; real Xen: xenevtchn_notify failed, the Python handle redoes it and says
 * why). */
int xt_evt_notify(struct xt_evt *E)
{
    if (E->kind == XT_EVT_XENEVTCHN) {
        if (E->xce_notify(E->xce, E->port) != 0)
            return -1;
        E->notifies++;
        return 0;
    }
    uint32_t own = __atomic_load_n(E->own_word, __ATOMIC_SEQ_CST);
    if ((own & E->closed) || !(own & E->bound))
        return -1;
    uint32_t old = __atomic_load_n(E->peer_word, __ATOMIC_SEQ_CST);
    for (int i = 0; i < E->tries; i++) {
        if (old & E->closed)
            return -1;
        if (old & E->pending)
            return 0; /* a pending bit, not a counter */
        uint32_t new = (old & E->masked) ? (old | E->pending) : (old | E->masked | E->ready);
        if (xt_cas(E->peer_word, &old, new)) {
            if (!(old & E->masked))
                xt_ring_bell(E->peer_ring);
            E->notifies++;
            return 0;
        }
    }
    return -1;
}

/* Real Xen's take: xenevtchn_pending (the fd is non-blocking: EAGAIN is "none"), which must
 * be our port, then xenevtchn_unmask. A failure of either, or another port (bound on the
 * handle since the link was taken: left masked in E->foreign), is Python's: its handle
 * redoes the call and says what went wrong. */
static int xt_xce_take(struct xt_evt *E, uint32_t *flags)
{
    int port = E->xce_pending(E->xce);
    if (port < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            return 0;
        *flags |= XT_W_EVTCHN;
        return -1;
    }
    if ((uint32_t)port != E->port) {
        E->foreign = port;
        *flags |= XT_W_EVTCHN;
        return -1;
    }
    E->events++;
    if (E->xce_unmask(E->xce, E->port) != 0) {
        *flags |= XT_W_EVTCHN | XT_W_UNMASK;
        return -1;
    }
    return 1;
}

/* Take a delivered event and unmask it: 1 taken (and unmasked), 0 none (a stray byte),
 * -1 Python's (*flags says what it owes). */
int xt_evt_take(struct xt_evt *E, uint32_t *flags)
{
    if (E->kind == XT_EVT_XENEVTCHN)
        return xt_xce_take(E, flags);
    char byte[256];
    ssize_t r = read(E->doorbell, byte, 1);
    if (r <= 0)
        return 0; /* EAGAIN: taken already (or EINTR: looked at again after the next poll) */
    uint32_t old = __atomic_load_n(E->own_word, __ATOMIC_SEQ_CST);
    int i;
    for (i = 0; i < E->tries; i++) {
        if (old & E->closed) {
            xt_ring_bell(E->own_ring); /* the byte back: Python's pending() finds the port */
            *flags |= XT_W_EVTCHN;
            return -1;
        }
        if (!(old & E->ready)) {
            /* A byte with nothing ready: drain them all, ring again if the port became ready
             * meanwhile (as SoftwareEventChannels.pending does). */
            while (read(E->doorbell, byte, sizeof byte) > 0)
                ;
            if (__atomic_load_n(E->own_word, __ATOMIC_SEQ_CST) & E->ready)
                xt_ring_bell(E->own_ring);
            return 0;
        }
        if (xt_cas(E->own_word, &old, old & ~E->ready))
            break;
    }
    if (i == E->tries) {
        xt_ring_bell(E->own_ring);
        *flags |= XT_W_EVTCHN;
        return -1;
    }
    E->events++;
    old = __atomic_load_n(E->own_word, __ATOMIC_SEQ_CST);
    for (i = 0; i < E->tries; i++) {
        if (old & E->closed)
            break;
        if (!(old & E->masked))
            return 1;
        uint32_t new = (old & E->pending) ? ((old & ~E->pending) | E->ready) : (old & ~E->masked);
        if (xt_cas(E->own_word, &old, new)) {
            if (old & E->pending)
                xt_ring_bell(E->own_ring); /* delivered again, as Xen's evtchn_unmask() does */
            return 1;
        }
    }
    *flags |= XT_W_EVTCHN | XT_W_UNMASK;
    return -1;
}

/* Bytes the requests counted in `stats` moved (read and written, direct and indirect). */
static uint64_t xt_moved(const struct xt_stats *stats)
{
    return stats->read_bytes + stats->write_bytes + stats->indirect_read_bytes + stats->indirect_write_bytes;
}

uint32_t xt_wait(const struct xt_layout *L, const struct xt_policy *P, const struct xt_table *T,
                 uint8_t *sring, uint32_t nr_ents, uint32_t *req_cons, uint32_t *rsp_prod_pvt,
                 int fd, struct xt_image *img, uint64_t inline_bytes, struct xt_stats *stats, int *stop,
                 struct xt_evt *E, int timeout_ms, uint32_t publish_every, uint64_t publish_bytes,
                 uint32_t *flags)
{
    uint32_t total = 0;
    struct pollfd fds[3];
    nfds_t nfds = 1;
    *stop = 0;
    *flags = 0;
    fds[0].fd = E->doorbell;
    fds[0].events = POLLIN;
    for (int i = 0; i < 2; i++)
        if (E->wake_fds[i] >= 0) {
            fds[nfds].fd = E->wake_fds[i];
            fds[nfds].events = POLLIN;
            nfds++;
        }
    for (;;) {
        int owed = 0;
        uint64_t bytes = xt_moved(stats);
        uint32_t served = xt_rounds(L, P, T, sring, nr_ents, req_cons, rsp_prod_pvt, fd, img, inline_bytes, stats,
                                    stop, publish_every, publish_bytes, E, &owed);
        total += served;
        if (served && E->watch_bytes) /* what the frontend does next: see the watch below */
            E->large = xt_moved(stats) - bytes > (uint64_t)E->watch_bytes * served;
        if (*stop)
            *flags |= XT_W_STOP;
        if (owed)
            *flags |= XT_W_NOTIFY;
        if (*flags)
            return total;
        /* Watch the event word for up to spin_ns before sleeping: a frontend that answers
         * meanwhile rings a doorbell nobody sleeps on, which costs it a write, where waking a
         * sleeping thread on an idle CPU costs both sides far more (measured on a 2-vCPU VM:
         * 4 KiB QD32 went from 0.19-0.24 to 0.26-0.65 of the pread loop, with less CPU per
         * request). spin_ns adapts as a halt-polling window does: it grows (to spin_max_ns)
         * after a sleep short enough that a longer watch would have caught the event, and
         * halves after a long one, so an idle or slow frontend costs no spinning.
         * Not after requests that averaged more than watch_bytes: the frontend's next
         * request comes after it has handled their data (1 MiB: a copy of ~70 us or more),
         * and a thread watching meanwhile only takes CPU from it and from the I/O (measured
         * on a 2-vCPU VM: 1 MiB sequential at 0.53-0.57 of raw pread with the watch, 0.84
         * without it, and 40% more CPU per MiB). Such a sleep leaves spin_ns as it is: its
         * length says nothing about the small requests' pace. */
        if (E->large) {
            E->unwatched++;
        } else if (E->spin_ns) {
            uint64_t until = xt_now_ns() + E->spin_ns;
            int taken = 0;
            /* Real Xen's pending state is in the hypervisor (a system call to look): watch
             * req_prod instead, and serve what comes; its event, if the frontend sent one,
             * is taken after that (the fd stays readable). */
            uint32_t seen = __atomic_load_n(xt_index(sring, XT_REQ_PROD), __ATOMIC_ACQUIRE);
            do {
                if (E->kind == XT_EVT_XENEVTCHN) {
                    if (__atomic_load_n(xt_index(sring, XT_REQ_PROD), __ATOMIC_ACQUIRE) != seen) {
                        taken = 1;
                        break;
                    }
                /* READY comes just before its doorbell byte: read until the byte is there. */
                } else if ((__atomic_load_n(E->own_word, __ATOMIC_ACQUIRE) & E->ready) &&
                           (taken = xt_evt_take(E, flags)) != 0)
                    break;
#if defined(__x86_64__) || defined(__i386__)
                __builtin_ia32_pause();
#endif
            } while (xt_now_ns() < until);
            if (taken < 0)
                return total;
            if (taken > 0) {
                E->spins++;
                continue;
            }
        }
        /* Sleep until an event or a wake fd. */
        for (nfds_t i = 0; i < nfds; i++)
            fds[i].revents = 0;
        E->sleeps++;
        int adapt = E->spin_max_ns && !E->large;
        uint64_t slept = adapt ? xt_now_ns() : 0;
        int n = poll(fds, nfds, timeout_ms);
        if (adapt) {
            slept = xt_now_ns() - slept;
            if (slept <= E->spin_max_ns)
                E->spin_ns = E->spin_ns ? (E->spin_ns * 2 < E->spin_max_ns ? E->spin_ns * 2 : E->spin_max_ns)
                                        : (E->spin_max_ns < 10000 ? E->spin_max_ns : 10000);
            else
                E->spin_ns = E->spin_ns / 2 < 10000 ? 0 : E->spin_ns / 2;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            *flags |= XT_W_TIMEOUT;
            return total;
        }
        for (nfds_t i = 1; i < nfds; i++)
            if (fds[i].revents)
                *flags |= XT_W_WAKE;
        if (fds[0].revents && xt_evt_take(E, flags) < 0)
            return total;
        if (*flags & XT_W_WAKE)
            return total;
    }
}
