"""Build the compiled ring loops: xentools/devices/_blkback_ringloop*.so (cffi API mode).

Owns: compiling blkback's ring loop (xentools/devices/blkback_ringloop.c) and blkfront's
fill and reap (blkfront_ringloop.c) into ONE extension module next to them, with the
declarations of blkback_ringloop.h and blkfront_ringloop.h (the lists the C files include
and the Python side calls through, handed to cffi's cdef as they are), and the hash of those
four files in it (`xt_source_hash()`, blkback_ringloop.source_hash: compiled() uses the
pure-Python path, with one line on stderr, when the sources beside the module differ).
Must not: describe a blkif struct: the C code gets every offset at run time from
xentools.core.blkif's Abi (struct xt_layout is filled by blkback_ringloop.layout_of,
struct xt_flayout by blkfront_batch.flayout_of).

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

HEADER = SOURCE.with_suffix(".h")  # the declarations: cdef and the C file share them
FRONT_SOURCE = SOURCE.parent / "blkfront_ringloop.c"
FRONT_HEADER = FRONT_SOURCE.with_suffix(".h")

sys.path.insert(0, str(HERE.parent))  # this tree's package, whatever is installed
from xentools.devices.blkback_ringloop import source_hash  # noqa: E402 - after the path


def build(target_dir: Path) -> Path:
    """Compile the extension and copy it into `target_dir`; returns its path."""
    import cffi

    ffi = cffi.FFI()
    # The sources' hash, kept in the module: compiled() refuses a module built from others.
    ffi.cdef(HEADER.read_text() + FRONT_HEADER.read_text() + "const char *xt_source_hash(void);\n")
    stamp = f'\nconst char *xt_source_hash(void) {{ return "{source_hash(SOURCE.parent)}"; }}\n'
    ffi.set_source(
        MODULE_NAME, SOURCE.read_text() + '\n#include "blkfront_ringloop.h"\n' + stamp,
        sources=[str(FRONT_SOURCE)], include_dirs=[str(SOURCE.parent)],
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
