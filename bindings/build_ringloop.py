"""Build blkback's compiled ring loop: xentools/devices/_blkback_ringloop*.so (cffi API mode).

Owns: the C declarations of xentools/devices/blkback_ringloop.c (CDEF, the one list the
Python side calls through) and compiling that file into an extension module next to it.
Must not: describe a blkif struct: the C code gets every offset at run time from
xentools.core.blkif's Abi (struct xt_layout is filled by blkback_ringloop.layout_of).

Run by `make` (venv, test-host, test-xen, bench) after gcc is installed:
    .venv/bin/python bindings/build_ringloop.py
Without a compiler it prints one line and exits 1; the package then serves rings with its
pure-Python path (same answers, slower).
"""

from __future__ import annotations

import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent / "xentools" / "devices" / "blkback_ringloop.c"
MODULE_NAME = "xentools.devices._blkback_ringloop"

CDEF = """
struct xt_layout {
    uint32_t entry_size, request_size, response_size;
    uint32_t req_operation, req_nr_segments, req_id, req_sector_number, req_seg;
    uint32_t segment_size, seg_gref, seg_first_sect, seg_last_sect;
    uint32_t rsp_id, rsp_operation, rsp_status;
    uint32_t indirect_indirect_op, indirect_nr_segments, indirect_id, indirect_sector_number, indirect_grefs;
};
struct xt_policy {
    uint64_t disk_bytes;
    uint32_t unit;
    uint32_t units_per_page;
    int readonly;
    uint32_t max_indirect_segments;
};
struct xt_stats {
    uint64_t reads, read_segments, read_bytes;
    uint64_t writes, write_segments, write_bytes;
    uint64_t indirect_reads, indirect_read_segments, indirect_read_bytes;
    uint64_t indirect_writes, indirect_write_segments, indirect_write_bytes;
};
struct xt_table;
struct xt_table *xt_table_new(uint32_t entries);
void xt_table_free(struct xt_table *t);
int xt_table_put(struct xt_table *t, uint32_t ref, uintptr_t page);
void xt_table_del(struct xt_table *t, uint32_t ref);
void xt_table_clear(struct xt_table *t);
uint32_t xt_table_count(const struct xt_table *t);
uint32_t xt_serve(const struct xt_layout *L, const struct xt_policy *P, const struct xt_table *T,
                  uint8_t *sring, uint32_t nr_ents, uint32_t *req_cons, uint32_t *rsp_prod_pvt,
                  uint32_t available, int fd, uint64_t inline_bytes, struct xt_stats *stats, int *stop);
"""


def build(target_dir: Path) -> Path:
    """Compile the extension and copy it into `target_dir`; returns its path."""
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source(
        MODULE_NAME, SOURCE.read_text(),
        extra_compile_args=["-O2", "-Wall", "-Werror", "-std=gnu11"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        saved, sys.stdout = sys.stdout, open("/dev/null", "w")  # distutils chatter
        try:
            built = Path(ffi.compile(tmpdir=tmp, verbose=False))
        finally:
            sys.stdout.close()
            sys.stdout = saved
        target = target_dir / built.name
        shutil.copyfile(built, target.with_suffix(".tmp"))
        target.with_suffix(".tmp").replace(target)
        return target


def main() -> int:
    if shutil.which(sysconfig.get_config_var("CC").split()[0] if sysconfig.get_config_var("CC") else "cc") is None:
        print("build_ringloop: no C compiler (apt-get install gcc, or run make as root):"
              " blkback serves rings with its pure-Python path", file=sys.stderr)
        return 1
    try:
        target = build(SOURCE.parent)
    except Exception as err:  # a compiler error, missing Python headers: say it in one line
        message = " ".join(str(err).split())[:400]
        print(f"build_ringloop: compiling {SOURCE.name} failed: {message}", file=sys.stderr)
        return 1
    print(f"build_ringloop: built {target.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
