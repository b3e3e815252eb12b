/* blkfront's compiled fill and reap: its declarations (built into the same extension as
 * blkback's loop by bindings/build_ringloop.py, which hands this file to cffi's cdef as it
 * is: declarations only, no preprocessor lines; uint*_t come from blkback_ringloop.h's
 * includes). Every offset in struct xt_flayout is filled from xentools.core.blkif's Abi by
 * field name (blkfront_batch.flayout_of), never written here. */

struct xt_flayout {
    uint32_t entry_size, request_size, response_size;
    uint32_t req_operation, req_nr_segments, req_handle, req_id, req_sector_number, req_seg;
    uint32_t segment_size, seg_gref, seg_first_sect, seg_last_sect;
    uint32_t indirect_operation, indirect_indirect_op, indirect_nr_segments, indirect_id,
             indirect_sector_number, indirect_handle, indirect_grefs;
    uint32_t rsp_id, rsp_operation, rsp_status;
};

/* One lane: a fixed run of persistent-grant pages and a fixed shadow slot, carrying one
 * request at a time. */
struct xt_lane {
    uint32_t slot;           /* its shadow slot: request ids are sequence * size + slot */
    uint8_t *data;           /* its data pages, contiguous */
    const uint8_t *segs;     /* the packed segments of those pages as whole pages */
    uint8_t *ind;            /* its indirect pages, contiguous (NULL: direct requests only) */
    uint32_t ind_grefs[8];
    uint32_t pages;          /* data pages */
    uint32_t ind_pages;      /* indirect pages */
    uint32_t op;             /* READ or WRITE of the request it carries */
    uint32_t nbytes;
    uint8_t *dest;           /* where a read's data goes (NULL: it stays in the lane's pages) */
    uint8_t *reg;            /* the caller's registered buffer for reads (registered fills) */
};

/* The frontend's view of one ring slot of the shadow (index: request id & (size - 1)). */
struct xt_shadow {
    uint64_t id;
    double deadline;         /* time.monotonic() by which the response must come */
    int32_t lane;            /* -1: no batch request waits here (the Python path judges) */
    uint8_t op, rsp_op;      /* operation on the ring, operation the response must carry */
};

/* Fill n requests of operation op on lanes[lane_of[k]]: sector[k], nbytes[k], buffer
 * bufs[k] (WRITE: the data; READ: destination or NULL; bufs NULL: all NULL, or with
 * `registered` each READ into its lane's registered buffer). The caller checked them
 * (range, length, lanes free). Ids are (seq + k + 1) * nr_ents + slot. */
uint32_t xt_front_fill(const struct xt_flayout *L, uint8_t *sring, uint32_t nr_ents, uint32_t *req_prod_pvt,
                       struct xt_shadow *shadow, struct xt_lane *lanes, uint32_t nlanes,
                       const uint32_t *lane_of, const uint64_t *sector, const uint32_t *nbytes, uint8_t **bufs,
                       uint32_t n, uint32_t op, uint64_t seq, double deadline, uint16_t handle, uint32_t unit,
                       int registered);
uint32_t xt_front_reap(const struct xt_flayout *L, const uint8_t *sring, uint32_t nr_ents, uint32_t *rsp_cons,
                       struct xt_shadow *shadow, struct xt_lane *lanes, uint32_t nlanes,
                       uint32_t *out_lane, int16_t *out_status, uint32_t max, int *stop);
/* The direct event channels of the software Xen (struct xt_evt, blkback_ringloop.h): publish
 * and notify; reap and sleep until `want` responses came (blkfront_ringloop.c says how). */
int xt_front_push(uint8_t *sring, uint32_t req_prod_pvt, struct xt_evt *E);
uint32_t xt_front_wait(const struct xt_flayout *L, uint8_t *sring, uint32_t nr_ents, uint32_t *rsp_cons,
                       struct xt_shadow *shadow, struct xt_lane *lanes, uint32_t nlanes,
                       uint32_t *out_lane, int16_t *out_status, uint32_t max, uint32_t want, int *stop,
                       struct xt_evt *E, int timeout_ms, uint32_t *flags);
/* One read_many (blkfront_batch.BatchIO.read_many) in flight: `count` READs of `nbytes` at
 * sector[0..count), the k-th into into + k * nbytes, carried by every lane of the batch
 * (free: the stack of lanes without a request; the others carry request index_of[lane]).
 * The fill's and reap's argument arrays (nlanes each) are the lanes' own. Python sets up
 * and reads back the rest between calls (req_prod_pvt, rsp_cons, seq, deadline). */
struct xt_stream {
    uint64_t next;            /* the next request to fill */
    uint64_t count;           /* requests in all */
    uint64_t done;            /* requests completed with OKAY */
    const uint64_t *sector;   /* count sectors */
    uint8_t *into;            /* the destination of request 0 */
    uint32_t nbytes;          /* bytes per request */
    uint32_t refill;          /* fill once this many lanes are free (or the rest fits) */
    uint64_t *index_of;       /* per lane: the request it carries */
    uint32_t *free;           /* the free lanes, a stack */
    uint32_t nfree;
    uint16_t handle;
    uint32_t unit;
    uint64_t seq;             /* the id sequence: a fill of n takes the n after it */
    double deadline;          /* of the requests filled in a call */
    uint32_t req_prod_pvt, rsp_cons;
    uint32_t *lane_of;        /* the fill's arguments */
    uint64_t *sectors;
    uint32_t *sizes;
    uint8_t **bufs;
    uint32_t *out_lane;       /* the reap's results */
    int16_t *out_status;
    int32_t give_way;         /* set by another thread: return at the next round */
    int32_t failed_lane;      /* -1, or the lane of the first read that failed */
    int16_t failed_status;
    uint64_t failed_index;
    uint32_t filled, reaped;  /* in the last call */
    uint64_t quiet;           /* events taken quietly: they came after their responses were reaped */
    int32_t reaped_since_quiet;
};
/* Fill -> push -> wait -> reap until every request is done or something is Python's
 * (blkfront_ringloop.c says what); timeout_ms 0: exactly one round, without a wait. */
uint32_t xt_front_stream(const struct xt_flayout *L, uint8_t *sring, uint32_t nr_ents,
                         struct xt_shadow *shadow, struct xt_lane *lanes, uint32_t nlanes,
                         struct xt_stream *S, struct xt_evt *E, int timeout_ms);
