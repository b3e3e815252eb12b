/* cffi declarations of the parts of libxengnttab.so.1 (gnttab + gntshr) and
 * libxenevtchn.so.1 that xentools calls. Transcribed from /usr/include/xengnttab.h,
 * /usr/include/xenevtchn.h, <xen/grant_table.h> and <xen/event_channel.h> (Xen 4.17);
 * bindings/build_xenlibs.py turns this into xentools/platform/xen/_xenlibs.py.
 * cffi's cdef dialect: no #include, #define only with literal integers.
 * No libxenctrl: its soname changes with every Xen release. */

typedef uint32_t evtchn_port_t;
typedef uint16_t domid_t;
typedef int xenevtchn_port_or_error_t;

struct xentoollog_logger;

/* ---- libxengnttab: the mapping side (gntdev) ---- */
typedef struct xengntdev_handle xengnttab_handle;

xengnttab_handle *xengnttab_open(struct xentoollog_logger *logger, unsigned open_flags);
int xengnttab_close(xengnttab_handle *xgt);
int xengnttab_fd(xengnttab_handle *xgt);                              /* VERS_1.2 */
void *xengnttab_map_domain_grant_refs(xengnttab_handle *xgt, uint32_t count, uint32_t domid,
                                      uint32_t *refs, int prot);
int xengnttab_unmap(xengnttab_handle *xgt, void *start_address, uint32_t count);
int xengnttab_set_max_grants(xengnttab_handle *xgt, uint32_t nr_grants);

struct xengnttab_grant_copy_segment {
    union xengnttab_copy_ptr {
        void *virt;
        struct {
            uint32_t ref;
            uint16_t offset;
            uint16_t domid;
        } foreign;
    } source, dest;
    uint16_t len;
    uint16_t flags;
    int16_t status;
};
typedef struct xengnttab_grant_copy_segment xengnttab_grant_copy_segment_t;
int xengnttab_grant_copy(xengnttab_handle *xgt, uint32_t count,
                         xengnttab_grant_copy_segment_t *segs);          /* VERS_1.1 */

/* <xen/grant_table.h>: gnttab_copy flags and per-segment status codes. */
#define GNTCOPY_source_gref 1
#define GNTCOPY_dest_gref 2
#define GNTST_okay 0

/* ---- libxengntshr (same library): the granting side (gntalloc) ---- */
typedef struct xengntdev_handle xengntshr_handle;

xengntshr_handle *xengntshr_open(struct xentoollog_logger *logger, unsigned open_flags);
int xengntshr_close(xengntshr_handle *xgs);
int xengntshr_fd(xengntshr_handle *xgs);                              /* VERS_1.2 */
void *xengntshr_share_pages(xengntshr_handle *xgs, uint32_t domid, int count, uint32_t *refs,
                            int writable);
int xengntshr_unshare(xengntshr_handle *xgs, void *start_address, uint32_t count);

/* ---- libxenevtchn ---- */
typedef struct xenevtchn_handle xenevtchn_handle;

xenevtchn_handle *xenevtchn_open(struct xentoollog_logger *logger, unsigned int flags);
int xenevtchn_close(xenevtchn_handle *xce);
int xenevtchn_fd(xenevtchn_handle *xce);
int xenevtchn_notify(xenevtchn_handle *xce, evtchn_port_t port);
xenevtchn_port_or_error_t xenevtchn_bind_unbound_port(xenevtchn_handle *xce, uint32_t domid);
xenevtchn_port_or_error_t xenevtchn_bind_interdomain(xenevtchn_handle *xce, uint32_t domid,
                                                     evtchn_port_t remote_port);
int xenevtchn_unbind(xenevtchn_handle *xce, evtchn_port_t port);
xenevtchn_port_or_error_t xenevtchn_pending(xenevtchn_handle *xce);
int xenevtchn_unmask(xenevtchn_handle *xce, evtchn_port_t port);
