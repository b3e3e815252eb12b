/* blkback's compiled ring loop (built by bindings/build_ringloop.py through cffi's API mode).
 *
 * Owns: serving the plainly valid READ/WRITE requests, direct or INDIRECT, of one ring whose
 * every grant ref (indirect pages included) is in the persistent-grant cache: copy each slot
 * and each indirect segment list once (XSA-155), check them, find each
 * ref's mapped page in a hash table the Python SegmentMapper keeps in step with its cache,
 * merge the segments into an iovec, preadv/pwritev straight into the granted pages, and
 * write the response (the slot zeroed first, XSA-216). Stops at the first request that is
 * anything else: another operation, a broken rule, a ref not cached, an I/O that would wait
 * for the disk or failed. That request is left unconsumed for the Python path
 * (xentools/devices/blkback_queue.py), which stays the authority: it judges it, counts its
 * rule, and answers it.
 * Must not: describe a blkif struct (every offset comes from xentools.core.blkif's Abi, the
 * one codec, through struct xt_layout), read req_prod or publish rsp_prod (the Python
 * BackRing does, with its overflow check and barriers), map or unmap grants, or block on
 * anything but the image.
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>

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
 * at least twice the entries, so a probe always ends at an empty cell. */
struct xt_table {
    uint32_t mask, count;
    uint32_t *refs;
    uintptr_t *pages; /* 0: empty */
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
    t->refs = calloc(cap, sizeof *t->refs);
    t->pages = calloc(cap, sizeof *t->pages);
    if (!t->refs || !t->pages) {
        free(t->refs);
        free(t->pages);
        free(t);
        return NULL;
    }
    t->mask = cap - 1;
    return t;
}

void xt_table_free(struct xt_table *t)
{
    if (t) {
        free(t->refs);
        free(t->pages);
        free(t);
    }
}

static uintptr_t xt_table_get(const struct xt_table *t, uint32_t ref)
{
    uint32_t i = xt_hash(ref) & t->mask;
    while (t->pages[i]) {
        if (t->refs[i] == ref)
            return t->pages[i];
        i = (i + 1) & t->mask;
    }
    return 0;
}

/* 0 done, -1 full (the caller sized it: never happens while entries <= its size). */
int xt_table_put(struct xt_table *t, uint32_t ref, uintptr_t page)
{
    uint32_t i = xt_hash(ref) & t->mask;
    while (t->pages[i]) {
        if (t->refs[i] == ref) {
            t->pages[i] = page;
            return 0;
        }
        i = (i + 1) & t->mask;
    }
    if (2 * (t->count + 1) > t->mask + 1)
        return -1;
    t->refs[i] = ref;
    t->pages[i] = page;
    t->count++;
    return 0;
}

void xt_table_del(struct xt_table *t, uint32_t ref)
{
    uint32_t i = xt_hash(ref) & t->mask;
    while (t->pages[i] && t->refs[i] != ref)
        i = (i + 1) & t->mask;
    if (!t->pages[i])
        return;
    t->pages[i] = 0;
    t->count--;
    /* Move back every later entry of the run whose home lies at or before the hole. */
    uint32_t hole = i, j = i;
    for (;;) {
        j = (j + 1) & t->mask;
        if (!t->pages[j])
            return;
        uint32_t home = xt_hash(t->refs[j]) & t->mask;
        if (((j - home) & t->mask) >= ((j - hole) & t->mask)) {
            t->refs[hole] = t->refs[j];
            t->pages[hole] = t->pages[j];
            t->pages[j] = 0;
            hole = j;
        }
    }
}

void xt_table_clear(struct xt_table *t)
{
    memset(t->pages, 0, (size_t)(t->mask + 1) * sizeof *t->pages);
    t->count = 0;
}

uint32_t xt_table_count(const struct xt_table *t) { return t->count; }

static uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* Every byte of the transfer, or -1 (errno set; EIO for end of file). With nowait, -2 when
 * the kernel says the data is not at hand (EAGAIN or a short first transfer). */
static int xt_move(int fd, int write, struct iovec *iov, int n, uint64_t offset, uint64_t total, int nowait)
{
    uint64_t done = 0;
    while (done < total) {
        ssize_t got;
        if (nowait)
            got = write ? pwritev2(fd, iov, n, (off_t)offset, RWF_NOWAIT)
                        : preadv2(fd, iov, n, (off_t)offset, RWF_NOWAIT);
        else
            got = write ? pwritev(fd, iov, n, (off_t)offset) : preadv(fd, iov, n, (off_t)offset);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            if (nowait && errno == EAGAIN)
                return -2;
            if (nowait && (errno == EOPNOTSUPP || errno == EINVAL || errno == ENOSYS)) {
                nowait = 0; /* this kernel or file system cannot say: just wait */
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
uint32_t xt_serve(const struct xt_layout *L, const struct xt_policy *P, const struct xt_table *T,
                  uint8_t *sring, uint32_t nr_ents, uint32_t *req_cons, uint32_t *rsp_prod_pvt,
                  uint32_t available, int fd, uint64_t inline_bytes, struct xt_stats *stats, int *stop)
{
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
        int moved = xt_move(fd, op == XT_OP_WRITE, iov, n, offset, nbytes, nbytes > inline_bytes);
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
    }
    __atomic_thread_fence(__ATOMIC_RELEASE); /* responses written before rsp_prod moves */
    *req_cons = cons;
    *rsp_prod_pvt = prod;
    return served;
}
