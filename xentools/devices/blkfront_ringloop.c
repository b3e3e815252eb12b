/* blkfront's compiled fill and reap (built with blkback's loop by bindings/build_ringloop.py,
 * cffi API mode, into the same extension module).
 *
 * Owns: writing a batch of READ/WRITE requests, direct or INDIRECT, into ring slots from the
 * prepared grant refs of their lanes (xentools/devices/blkfront_batch.py: fixed runs of
 * persistent-grant pages), copying WRITE data in; and reaping the responses to those
 * requests with every check blkfront_queue.BlkfrontQueue.take_responses makes: rsp_prod read
 * once and rsp_prod - rsp_cons <= size, each response copied once (XSA-155) and read from
 * the copy, id = the id waiting in its shadow slot, operation = the request's (INDIRECT:
 * its inner op, or INDIRECT itself), status OKAY, ERROR or EOPNOTSUPP. A read's data is
 * copied once into the caller's buffer, or left in the lane's pages for the caller. A lane's
 * pages are not zeroed between its requests (why: blkfront_batch.py's docstring). It stops
 * at the first response that is anything else (a broken rule, or a response to a request
 * the Python path made) and leaves it unconsumed:
 * the Python path judges it and fails the device with the rule (Violation), the authority.
 * On the software Xen's direct event channels it also publishes req_prod and notifies
 * (xt_front_push), and waits: reap, arm rsp_event (ring.h's final check), sleep on the
 * doorbell, take and unmask the event, reap again (xt_front_wait), returning to Python with
 * the completions or with what is Python's (a response to judge, an event-channel state, an
 * event with nothing behind it, the timeout). For BatchIO.read_many it also runs the whole
 * loop (xt_front_stream: fill, push, wait, reap, round after round, through those same four).
 * Must not: describe a blkif struct (every offset comes from xentools.core.blkif's Abi
 * through struct xt_flayout), change an event word but through blkback_ringloop.c's
 * transitions (xt_evt_notify, xt_evt_take), or grant anything.
 */

#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "blkback_ringloop.h"
#include "blkfront_ringloop.h"

#define XF_PAGE 4096u
#define XF_HEADER 64u            /* struct sring header before the entries (ring.h) */
#define XF_REQ_PROD 0u           /* offsetof(struct sring, req_prod) */
#define XF_REQ_EVENT 4u          /* offsetof(struct sring, req_event) */
#define XF_RSP_PROD 8u           /* offsetof(struct sring, rsp_prod) */
#define XF_RSP_EVENT 12u         /* offsetof(struct sring, rsp_event) */
#define XF_MAX_SEGS 11u          /* BLKIF_MAX_SEGMENTS_PER_REQUEST */
#define XF_MAX_INDIRECT_PAGES 8u /* BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST */
#define XF_SLOT_MAX 128u         /* larger than any blkif entry (112 / 108 bytes) */
#define XF_OP_READ 0u
#define XF_OP_WRITE 1u
#define XF_OP_INDIRECT 6u

static void xf_put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static void xf_put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void xf_put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

/* Fill n requests at *req_prod_pvt (advanced; not published). Returns how many were
 * written: fewer than n only for a request the caller should not have made (bad lane,
 * length, operation), which is then left for the caller to report. */
uint32_t xt_front_fill(const struct xt_flayout *L, uint8_t *sring, uint32_t nr_ents, uint32_t *req_prod_pvt,
                       struct xt_shadow *shadow, struct xt_lane *lanes, uint32_t nlanes,
                       const uint32_t *lane_of, const uint64_t *sector, const uint32_t *nbytes, uint8_t **bufs,
                       uint32_t n, uint32_t op, uint64_t seq, double deadline, uint16_t handle, uint32_t unit,
                       int registered)
{
    uint8_t slot[XF_SLOT_MAX];
    uint32_t prod = *req_prod_pvt, done = 0;
    if (L->request_size > XF_SLOT_MAX || L->request_size > L->entry_size || L->segment_size != 8 || !unit ||
        XF_PAGE % unit || (op != XF_OP_READ && op != XF_OP_WRITE))
        return 0;
    for (; done < n; done++) {
        uint32_t size = nbytes[done];
        uint8_t *buf = bufs ? bufs[done] : NULL;
        if (lane_of[done] >= nlanes)
            break;
        if (!bufs && registered && op == XF_OP_READ)
            buf = lanes[lane_of[done]].reg;
        if (lane_of[done] >= nlanes || !size || size % unit || (op == XF_OP_WRITE && !buf))
            break;
        struct xt_lane *lane = &lanes[lane_of[done]];
        uint32_t ndata = (size + XF_PAGE - 1) / XF_PAGE;
        uint32_t pages = ndata > XF_MAX_SEGS ? (ndata * 8 + XF_PAGE - 1) / XF_PAGE : 0; /* indirect */
        if (ndata > lane->pages || pages > lane->ind_pages || pages > XF_MAX_INDIRECT_PAGES || lane->slot >= nr_ents)
            break;
        struct xt_shadow *s = &shadow[lane->slot];
        if (s->lane >= 0)
            break; /* the lane's request is still in flight */
        uint64_t id = (seq + done + 1) * nr_ents + lane->slot;
        uint32_t tail = size - (ndata - 1) * XF_PAGE;
        if (op == XF_OP_WRITE) /* a lane's pages hold nothing the backend has not seen: no zeroing */
            memcpy(lane->data, buf, size);
        memset(slot, 0, L->request_size);
        uint8_t wire;
        if (ndata <= XF_MAX_SEGS) {
            wire = (uint8_t)op;
            slot[L->req_operation] = wire;
            slot[L->req_nr_segments] = (uint8_t)ndata;
            xf_put16(slot + L->req_handle, handle);
            xf_put64(slot + L->req_id, id);
            xf_put64(slot + L->req_sector_number, sector[done]);
            memcpy(slot + L->req_seg, lane->segs, (size_t)ndata * 8);
            slot[L->req_seg + (ndata - 1) * 8 + L->seg_last_sect] = (uint8_t)(tail / unit - 1);
        } else {
            memcpy(lane->ind, lane->segs, (size_t)ndata * 8);
            lane->ind[(ndata - 1) * 8 + L->seg_last_sect] = (uint8_t)(tail / unit - 1);
            wire = XF_OP_INDIRECT;
            slot[L->indirect_operation] = wire;
            slot[L->indirect_indirect_op] = (uint8_t)op;
            xf_put16(slot + L->indirect_nr_segments, (uint16_t)ndata);
            xf_put64(slot + L->indirect_id, id);
            xf_put64(slot + L->indirect_sector_number, sector[done]);
            xf_put16(slot + L->indirect_handle, handle);
            for (uint32_t i = 0; i < pages; i++)
                xf_put32(slot + L->indirect_grefs + 4 * i, lane->ind_grefs[i]);
        }
        memcpy(sring + XF_HEADER + (size_t)(prod & (nr_ents - 1)) * L->entry_size, slot, L->request_size);
        lane->op = op;
        lane->nbytes = size;
        lane->dest = op == XF_OP_READ ? buf : NULL;
        s->id = id;
        s->deadline = deadline;
        s->op = wire;
        s->rsp_op = (uint8_t)op;
        /* Last: a reap on another thread (xt_front_wait) sees the lane whole or not at all. */
        __atomic_store_n(&s->lane, (int32_t)lane_of[done], __ATOMIC_RELEASE);
        prod++;
    }
    __atomic_thread_fence(__ATOMIC_RELEASE); /* slots written before req_prod moves */
    *req_prod_pvt = prod;
    return done;
}

/* Reap up to max plain responses to batch requests from *rsp_cons (advanced). Returns how
 * many: out_lane[i] / out_status[i] say which lane completed and how. *stop: 0 the ring
 * holds no more, 1 the next response is the Python path's to judge, 2 out of room. */
uint32_t xt_front_reap(const struct xt_flayout *L, const uint8_t *sring, uint32_t nr_ents, uint32_t *rsp_cons,
                       struct xt_shadow *shadow, struct xt_lane *lanes, uint32_t nlanes,
                       uint32_t *out_lane, int16_t *out_status, uint32_t max, int *stop)
{
    uint8_t rsp[XF_SLOT_MAX];
    uint32_t cons = *rsp_cons, got = 0;
    uint32_t prod = __atomic_load_n((const uint32_t *)(sring + XF_RSP_PROD), __ATOMIC_ACQUIRE); /* once */
    *stop = 0;
    if (L->response_size > XF_SLOT_MAX || L->response_size > L->entry_size || prod - cons > nr_ents) {
        *stop = 1; /* ring.rsp_overflow: FrontRing says it */
        return 0;
    }
    while (cons != prod) {
        if (got == max) {
            *stop = 2;
            break;
        }
        memcpy(rsp, sring + XF_HEADER + (size_t)(cons & (nr_ents - 1)) * L->entry_size, L->response_size);
        __atomic_signal_fence(__ATOMIC_SEQ_CST); /* the copy only, never the ring again (XSA-155) */
        uint64_t id;
        int16_t status;
        memcpy(&id, rsp + L->rsp_id, 8);
        memcpy(&status, rsp + L->rsp_status, 2);
        uint8_t op = rsp[L->rsp_operation];
        struct xt_shadow *s = &shadow[id & (nr_ents - 1)];
        if (__atomic_load_n(&s->lane, __ATOMIC_ACQUIRE) < 0 || (uint32_t)s->lane >= nlanes || s->id != id ||
            (op != s->rsp_op && !(s->op == XF_OP_INDIRECT && op == XF_OP_INDIRECT)) ||
            (status != 0 && status != -1 && status != -2)) {
            *stop = 1;
            break;
        }
        struct xt_lane *lane = &lanes[s->lane];
        if (lane->op == XF_OP_READ && status == 0 && lane->dest)
            memcpy(lane->dest, lane->data, lane->nbytes); /* the one copy */
        lane->dest = NULL;
        out_lane[got] = (uint32_t)s->lane;
        out_status[got] = status;
        s->lane = -1;
        got++;
        cons++;
    }
    *rsp_cons = cons;
    return got;
}

/* ---- the frontend's side of the direct event channels (software Xen) ----
 *
 * xt_front_push publishes the requests filled so far and notifies the backend if it asked
 * (RING_PUSH_REQUESTS_AND_CHECK_NOTIFY, then xt_evt_notify); xt_front_wait reaps, and while
 * fewer than `want` responses came, arms rsp_event and sleeps on the event channel
 * (RING_FINAL_CHECK_FOR_RESPONSES, then poll(2) on the doorbell, xt_evt_take: the event
 * taken and unmasked), so that a round of the batch API costs one call. The transitions on
 * the event words are blkback_ringloop.c's (xt_evt_notify, xt_evt_take), written once. */

/* What ended an xt_front_wait (*flags; the values of blkback_ringloop.py's WAIT_*, which
 * xt_evt_take sets too: WAIT_EVTCHN 8, WAIT_UNMASK 32). */
enum { XF_W_STOP = 1, XF_W_WAKE = 2, XF_W_TIMEOUT = 4, XF_W_SPURIOUS = 64 };

static uint32_t *xf_index(uint8_t *sring, uint32_t at) { return (uint32_t *)(void *)(sring + at); }

/* Publish req_prod_pvt; 0 no notify owed, 1 notified through E, -1 owed and E (NULL, or
 * its channel Python's) cannot send it. */
int xt_front_push(uint8_t *sring, uint32_t req_prod_pvt, struct xt_evt *E)
{
    uint32_t old = __atomic_load_n(xf_index(sring, XF_REQ_PROD), __ATOMIC_RELAXED);
    if (old == req_prod_pvt)
        return 0;
    __atomic_store_n(xf_index(sring, XF_REQ_PROD), req_prod_pvt, __ATOMIC_RELEASE); /* slots first */
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* the backend sees them before we read req_event */
    uint32_t event = __atomic_load_n(xf_index(sring, XF_REQ_EVENT), __ATOMIC_RELAXED);
    if ((uint32_t)(req_prod_pvt - event) >= (uint32_t)(req_prod_pvt - old))
        return 0;
    return E && xt_evt_notify(E) == 0 ? 1 : -1;
}

static int64_t xf_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Reap (xt_front_reap, into out_lane / out_status from 0, at most max) until `want` came;
 * meanwhile arm rsp_event at the response that makes `want` (never beyond it: the caller
 * passes at most the requests in flight, each of which gets a response) and sleep on E's
 * doorbell, taking and unmasking each event. Returns the responses reaped, and in *flags
 * what ended it early: XF_W_STOP (*stop 1: the next response is the Python path's), an
 * event the Python handle must handle (WAIT_EVTCHN, WAIT_UNMASK), XF_W_SPURIOUS (an event
 * with nothing behind it: the caller throttles, XSA-391), XF_W_TIMEOUT (timeout_ms passed),
 * XF_W_WAKE (a signal: Python runs its handlers). */
uint32_t xt_front_wait(const struct xt_flayout *L, uint8_t *sring, uint32_t nr_ents, uint32_t *rsp_cons,
                       struct xt_shadow *shadow, struct xt_lane *lanes, uint32_t nlanes,
                       uint32_t *out_lane, int16_t *out_status, uint32_t max, uint32_t want, int *stop,
                       struct xt_evt *E, int timeout_ms, uint32_t *flags)
{
    uint32_t got = 0, mark = 0;
    int woken = 0;
    int64_t until = xf_now_ms() + (timeout_ms > 0 ? timeout_ms : 0);
    struct pollfd fd = {.fd = E->doorbell, .events = POLLIN};
    *flags = 0;
    if (want > max)
        want = max;
    for (;;) {
        got += xt_front_reap(L, sring, nr_ents, rsp_cons, shadow, lanes, nlanes, out_lane + got, out_status + got,
                             max - got, stop);
        if (*stop == 1) {
            *flags |= XF_W_STOP;
            return got;
        }
        if (got >= want || *stop == 2)
            return got;
        /* RING_FINAL_CHECK_FOR_RESPONSES, the event asked for at the response that makes want. */
        __atomic_store_n(xf_index(sring, XF_RSP_EVENT), *rsp_cons + (want - got), __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (__atomic_load_n(xf_index(sring, XF_RSP_PROD), __ATOMIC_ACQUIRE) != *rsp_cons)
            continue; /* they came meanwhile */
        if (woken && got == mark) {
            *flags |= XF_W_SPURIOUS;
            return got;
        }
        woken = 0;
        /* An event delivered while we reaped is taken without a sleep. */
        if (!(__atomic_load_n(E->own_word, __ATOMIC_ACQUIRE) & E->ready)) {
            int64_t left = until - xf_now_ms();
            if (left <= 0) {
                *flags |= XF_W_TIMEOUT;
                return got;
            }
            E->sleeps++;
            fd.revents = 0;
            int n = poll(&fd, 1, (int)left);
            if (n < 0 && errno == EINTR) {
                *flags |= XF_W_WAKE;
                return got;
            }
            if (n <= 0) {
                *flags |= XF_W_TIMEOUT;
                return got;
            }
        }
        int taken = xt_evt_take(E, flags);
        if (taken < 0)
            return got;
        if (taken > 0) {
            woken = 1;
            mark = got;
        }
    }
}

/* ---- streaming reads (BatchIO.read_many) ----
 *
 * xt_front_stream keeps the lanes busy on its own: a round fills the free lanes with the next
 * requests once half the lanes (S->refill) are free or the rest fits (xt_front_fill, into
 * their places in S->into), publishes and notifies (xt_front_push), sleeps until enough
 * lanes are free again (xt_front_wait; without a channel or with timeout_ms 0, a plain
 * xt_front_reap) and takes the completions. It returns to Python (flags, blkback_ringloop.py's
 * WAIT_* and these) on anything that is Python's: a response the reap leaves (XF_W_STOP), an
 * event-channel state (WAIT_EVTCHN, WAIT_UNMASK), an event with nothing behind it that did
 * not follow responses already reaped (XF_W_SPURIOUS; one that did is taken quietly and
 * counted in S->quiet), a signal (XF_W_WAKE), the time limit (XF_W_TIMEOUT: timeout_ms, at
 * most XS_LIMIT_MS), a read that failed (XS_FAILED: no more fills, Python drains), a notify
 * it could not send (XS_NOTIFY), another thread's request (XS_GIVE_WAY), a fill the C fill
 * refused (XS_REFUSED: the caller's bug), and when every request is done (XS_DONE). */
enum { XS_FAILED = 128, XS_NOTIFY = 256, XS_GIVE_WAY = 512, XS_REFUSED = 1024, XS_DONE = 2048, XS_LIMIT_MS = 50 };

uint32_t xt_front_stream(const struct xt_flayout *L, uint8_t *sring, uint32_t nr_ents,
                         struct xt_shadow *shadow, struct xt_lane *lanes, uint32_t nlanes,
                         struct xt_stream *S, struct xt_evt *E, int timeout_ms)
{
    uint32_t flags = 0;
    if (timeout_ms > XS_LIMIT_MS || timeout_ms < 0)
        timeout_ms = XS_LIMIT_MS;
    int64_t until = xf_now_ms() + timeout_ms;
    S->filled = S->reaped = 0;
    for (;;) {
        if (__atomic_load_n(&S->give_way, __ATOMIC_ACQUIRE)) {
            flags |= XS_GIVE_WAY;
            break;
        }
        uint64_t left = S->count - S->next;
        if (S->failed_lane < 0 && left && S->nfree && (S->nfree >= S->refill || S->nfree >= left)) {
            uint32_t n = left < S->nfree ? (uint32_t)left : S->nfree;
            for (uint32_t k = 0; k < n; k++) { /* from the top of the stack, as BatchLanes._claim */
                S->lane_of[k] = S->free[S->nfree - 1 - k];
                S->sectors[k] = S->sector[S->next + k];
                S->sizes[k] = S->nbytes;
                S->bufs[k] = S->into + (size_t)(S->next + k) * S->nbytes;
            }
            uint32_t written = xt_front_fill(L, sring, nr_ents, &S->req_prod_pvt, shadow, lanes, nlanes, S->lane_of,
                                             S->sectors, S->sizes, S->bufs, n, XF_OP_READ, S->seq, S->deadline,
                                             S->handle, S->unit, 0);
            for (uint32_t k = 0; k < written; k++)
                S->index_of[S->lane_of[k]] = S->next + k;
            S->nfree -= written;
            S->next += written;
            S->seq += written;
            S->filled += written;
            if (written != n)
                flags |= XS_REFUSED;
        }
        if (xt_front_push(sring, S->req_prod_pvt, E) < 0)
            flags |= XS_NOTIFY;
        uint32_t in_flight = nlanes - S->nfree;
        if (!in_flight) {
            if (S->next == S->count)
                flags |= XS_DONE;
            break;
        }
        uint32_t got, wflags = 0;
        int stop = 0;
        if (timeout_ms == 0 || !E || flags) {
            got = xt_front_reap(L, sring, nr_ents, &S->rsp_cons, shadow, lanes, nlanes, S->out_lane, S->out_status,
                                nlanes, &stop);
            if (stop == 1)
                wflags = XF_W_STOP;
        } else {
            /* Until refill lanes are free; every one in flight once no more will be filled. */
            uint32_t want = S->failed_lane >= 0 || S->next == S->count ? in_flight
                          : S->refill > S->nfree ? S->refill - S->nfree : 1;
            int64_t ms = until - xf_now_ms();
            got = xt_front_wait(L, sring, nr_ents, &S->rsp_cons, shadow, lanes, nlanes, S->out_lane, S->out_status,
                                nlanes, want > in_flight ? in_flight : want, &stop, E, ms > 0 ? (int)ms : 0, &wflags);
        }
        for (uint32_t i = 0; i < got; i++) {
            uint32_t lane = S->out_lane[i];
            S->free[S->nfree++] = lane;
            if (S->out_status[i] == 0) {
                S->done++;
            } else if (S->failed_lane < 0) {
                S->failed_lane = (int32_t)lane;
                S->failed_index = S->index_of[lane];
                S->failed_status = S->out_status[i];
                flags |= XS_FAILED;
            }
        }
        S->reaped += got;
        if (got)
            S->reaped_since_quiet = 1;
        if (wflags == XF_W_SPURIOUS && S->reaped_since_quiet) {
            /* The event of responses taken before it came (reaped while the backend sent it). */
            S->quiet++;
            S->reaped_since_quiet = 0;
            wflags = 0;
        }
        flags |= wflags;
        if (flags || timeout_ms == 0)
            break;
        if (xf_now_ms() >= until) {
            flags |= XF_W_TIMEOUT;
            break;
        }
    }
    return flags;
}
