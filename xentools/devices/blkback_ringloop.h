/* blkback's compiled ring loop: its declarations, the one list both sides use.
 * xentools/devices/blkback_ringloop.c includes it; bindings/build_ringloop.py hands it to
 * cffi's cdef as it is (so: declarations only, no preprocessor lines).
 * Every offset in struct xt_layout is filled from xentools.core.blkif's Abi (the one codec),
 * never written here. */

struct xt_layout {
    uint32_t entry_size, request_size, response_size;
    uint32_t req_operation, req_nr_segments, req_id, req_sector_number, req_seg;
    uint32_t segment_size, seg_gref, seg_first_sect, seg_last_sect;
    uint32_t rsp_id, rsp_operation, rsp_status;
    uint32_t indirect_indirect_op, indirect_nr_segments, indirect_id, indirect_sector_number, indirect_grefs;
};

struct xt_policy {
    uint64_t disk_bytes;
    uint32_t unit;            /* bytes per wire sector: 512 .. 4096 */
    uint32_t units_per_page;  /* 4096 / unit */
    int readonly;
    uint32_t max_indirect_segments; /* 0: INDIRECT not advertised */
};

struct xt_stats {
    uint64_t reads, read_segments, read_bytes;
    uint64_t writes, write_segments, write_bytes;
    uint64_t indirect_reads, indirect_read_segments, indirect_read_bytes;
    uint64_t indirect_writes, indirect_write_segments, indirect_write_bytes;
    uint64_t mapped_reads;    /* reads copied from the image's mapped windows (struct xt_image) */
    uint64_t serve_ns, io_ns; /* time in xt_serve; moving the data of requests > inline_bytes */
};

struct xt_table;
struct xt_table *xt_table_new(uint32_t entries);
void xt_table_free(struct xt_table *t);
int xt_table_put(struct xt_table *t, uint32_t ref, uintptr_t page);
void xt_table_del(struct xt_table *t, uint32_t ref);
void xt_table_clear(struct xt_table *t);
uint32_t xt_table_count(const struct xt_table *t);
struct xt_image;
int xt_map_configure(uint32_t window_bytes, uint32_t budget);
void xt_map_usage(uint32_t *mapped, uint32_t *budget, uint64_t *window_bytes);
struct xt_image *xt_image_new(int fd, uint64_t bytes);
void xt_image_free(struct xt_image *img);
void xt_image_forget(struct xt_image *img, uint64_t offset, uint64_t length);
uint32_t xt_image_mapped(const struct xt_image *img);
int xt_probe_reads(int fd, uint64_t bytes, uint32_t len, uint64_t *preadv_ns, uint64_t *copy_ns);
uint32_t xt_serve(const struct xt_layout *L, const struct xt_policy *P, const struct xt_table *T,
                  uint8_t *sring, uint32_t nr_ents, uint32_t *req_cons, uint32_t *rsp_prod_pvt,
                  uint32_t available, int fd, struct xt_image *img, uint64_t inline_bytes,
                  struct xt_stats *stats, int *stop);
/* A direct event channel (EventChannels.direct_link; built by blkback_ringloop.evt_of only),
 * of one of two kinds:
 * XT_EVT_WORDS, the software Xen's (xentools/platform/sim/evtchn.py): this handle's doorbell,
 * its state word and the peer's, the bits of those words (filled from evtchn_channel's
 * constants, never written here);
 * XT_EVT_XENEVTCHN, real Xen's: a libxenevtchn handle with exactly one port bound, its fd (in
 * `doorbell`), and the library's own xenevtchn_pending / _unmask / _notify (function pointers
 * handed from Python: the extension does not link libxenevtchn). own_word and peer_word
 * then point to `zero` (always 0), the ring fds are -1.
 * xt_wait uses it; NULL-free. */
enum { XT_EVT_WORDS = 0, XT_EVT_XENEVTCHN = 1 };
struct xt_evt {
    int doorbell;              /* the handle's doorbell, read end (one byte per delivery) */
    int own_ring;              /* its write end (an unmask that delivers rings it) */
    int peer_ring;             /* the peer handle's doorbell, write end */
    uint32_t *own_word;        /* this port's state word */
    uint32_t *peer_word;       /* the peer port's state word */
    uint32_t pending, masked, ready, bound, closed;
    int tries;                 /* compare-and-swap attempts, then Python says "contended" */
    int wake_fds[2];           /* readable: back to Python (-1: unused) */
    uint64_t spin_max_ns;      /* the longest watch of own_word before a sleep (0: none) */
    uint64_t spin_ns;          /* the watch now (xt_wait adapts it) */
    uint64_t sleeps, events, notifies, rounds, spins;  /* counters for the profile */
    uint32_t watch_bytes;      /* no watch after requests that averaged more bytes (0: always) */
    int large;                 /* the last requests served averaged more than watch_bytes */
    uint64_t unwatched;        /* sleeps without a watch because of that (profile) */
    /* Added at the end (blkfront_ringloop.c uses the fields above). */
    int kind;                  /* XT_EVT_WORDS (0) or XT_EVT_XENEVTCHN */
    void *xce;                 /* XT_EVT_XENEVTCHN: the xenevtchn_handle */
    int (*xce_pending)(void *xce);               /* a port, or -1 (errno) */
    int (*xce_unmask)(void *xce, uint32_t port); /* 0, or -1 */
    int (*xce_notify)(void *xce, uint32_t port); /* 0, or -1 */
    uint32_t port;             /* the local port, the handle's only one */
    uint32_t zero;             /* always 0: own_word and peer_word point here */
    int foreign;               /* a pending port not ours that xt_evt_take took (masked), or -1 */
};
/* The direct event channel's transitions (blkback_ringloop.c; blkfront_ringloop.c's wait uses
 * them too): ring a doorbell; a compare-and-swap on a state word; notify the peer (0 done,
 * -1 Python's); take a delivered event and unmask it (1 taken, 0 none, -1 Python's: *flags
 * gets WAIT_EVTCHN, and WAIT_UNMASK when the unmask is owed). Both kinds. */
void xt_ring_bell(int fd);
int xt_cas(uint32_t *word, uint32_t *old, uint32_t new);
int xt_evt_notify(struct xt_evt *E);
int xt_evt_take(struct xt_evt *E, uint32_t *flags);
uint32_t xt_pass(const struct xt_layout *L, const struct xt_policy *P, const struct xt_table *T,
                 uint8_t *sring, uint32_t nr_ents, uint32_t *req_cons, uint32_t *rsp_prod_pvt,
                 int fd, struct xt_image *img, uint64_t inline_bytes, struct xt_stats *stats, int *stop,
                 int *notify);
uint32_t xt_wait(const struct xt_layout *L, const struct xt_policy *P, const struct xt_table *T,
                 uint8_t *sring, uint32_t nr_ents, uint32_t *req_cons, uint32_t *rsp_prod_pvt,
                 int fd, struct xt_image *img, uint64_t inline_bytes, struct xt_stats *stats, int *stop,
                 struct xt_evt *E, int timeout_ms, uint32_t publish_every, uint64_t publish_bytes,
                 uint32_t *flags);
