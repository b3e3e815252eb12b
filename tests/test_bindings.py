"""Host-side checks of the real-Xen bindings (no Xen needed).

Owns: proof that the committed cffi module matches a regeneration from
bindings/xenlibs.cdef.h, that every declared prototype agrees with Xen's installed headers
(gcc compiles the declarations against <xengnttab.h> and <xenevtchn.h> with -Werror), that
the grant copy struct has the headers' layout, that xentools.platform.xen imports without
opening any library, and that missing libraries or devices give clear PlatformErrors.
"""

from __future__ import annotations

import errno
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from xentools.platform.interface import GrantError, PlatformError
from xentools.platform.xen import GrantCopySegment, XenGrantSharer, XenPlatform
from xentools.platform.xen import platform as xen_platform
from xentools.platform.xen._xenlibs import ffi

REPO = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO / "bindings" / "build_xenlibs.py"


def load_build_script():
    spec = importlib.util.spec_from_file_location("build_xenlibs", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_module_matches_a_regeneration():
    build = load_build_script()
    assert build.TARGET.read_text() == build.generate(), (
        "xentools/platform/xen/_xenlibs.py is stale: run .venv/bin/python bindings/build_xenlibs.py"
    )


def compile_c(tmp_path: Path, source: str) -> Path:
    gcc = shutil.which("gcc")
    assert gcc, "gcc is required (Debian package gcc)"
    src = tmp_path / "probe.c"
    exe = tmp_path / "probe"
    src.write_text(source)
    result = subprocess.run([gcc, "-std=gnu11", "-Wall", "-Werror", "-o", str(exe), str(src)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return exe


def test_declared_prototypes_agree_with_the_headers(tmp_path):
    # Redeclaring a function with an incompatible type is a compile error in C, so this
    # fails as soon as a prototype in xenlibs.cdef.h drifts from Xen's headers.
    cdef = load_build_script().CDEF.read_text()
    cdef = re.sub(r"/\*.*?\*/", "", cdef, flags=re.S)
    prototypes = [s.strip() + ";" for s in cdef.split(";") if "(" in s and "{" not in s and "}" not in s
                  and not s.strip().startswith("#")]
    assert len(prototypes) >= 20
    exe = compile_c(tmp_path, "#include <xengnttab.h>\n#include <xenevtchn.h>\n"
                    + "\n".join(prototypes) + "\nint main(void) { return 0; }\n")
    assert subprocess.run([str(exe)], timeout=10).returncode == 0


def test_grant_copy_segment_layout_matches_the_header(tmp_path):
    fields = ["source", "dest", "len", "flags", "status"]
    probe = "#include <stdio.h>\n#include <stddef.h>\n#include <xengnttab.h>\nint main(void) {\n"
    probe += '  printf("%zu\\n", sizeof(xengnttab_grant_copy_segment_t));\n'
    for f in fields:
        probe += f'  printf("%zu\\n", offsetof(xengnttab_grant_copy_segment_t, {f}));\n'
    probe += '  printf("%d\\n%d\\n%d\\n", GNTCOPY_source_gref, GNTCOPY_dest_gref, GNTST_okay);\n'
    probe += '  printf("%zu\\n", offsetof(xengnttab_grant_copy_segment_t, source.foreign.domid));\n'
    probe += "  return 0;\n}\n"
    exe = compile_c(tmp_path, probe)
    numbers = [int(x) for x in subprocess.run([str(exe)], capture_output=True, text=True,
                                             check=True, timeout=10).stdout.split()]
    ours = [ffi.sizeof("xengnttab_grant_copy_segment_t")]
    ours += [ffi.offsetof("xengnttab_grant_copy_segment_t", f) for f in fields]
    ours += [ffi.integer_const(n) for n in ("GNTCOPY_source_gref", "GNTCOPY_dest_gref", "GNTST_okay")]
    ours += [ffi.offsetof("xengnttab_grant_copy_segment_t", "source", "foreign", "domid")]
    assert ours == numbers


def test_import_opens_no_library():
    code = (
        "import xentools.platform.xen\n"
        "maps = open('/proc/self/maps').read()\n"
        "assert 'libxengnttab' not in maps and 'libxenevtchn' not in maps, 'opened at import'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_missing_library_is_a_platform_error(monkeypatch):
    monkeypatch.setattr(xen_platform, "GNTTAB_SONAME", "libxengnttab-absent.so.1")
    with pytest.raises(PlatformError, match=r"cannot load libxengnttab-absent\.so\.1 \(Debian package libxengnttab1\)"):
        XenGrantSharer()


def test_platform_without_dev_xen(monkeypatch, tmp_path):
    monkeypatch.setattr(xen_platform, "DEV_XEN", tmp_path / "xen")
    with pytest.raises(PlatformError, match="is absent"):
        XenPlatform()


def test_open_without_device_reports_errno():
    assert not Path("/dev/xen/gntalloc").exists(), "host-side test: expects a machine without Xen"
    with pytest.raises(PlatformError) as info:
        XenGrantSharer()
    assert info.value.errno == errno.ENOENT
    assert str(info.value) == ("xengntshr_open (/dev/xen/gntalloc): [Errno 2] No such file or directory; "
                               "/dev/xen/gntalloc is absent: load its driver with `modprobe xen-gntalloc` (as root)")
    assert isinstance(info.value.__cause__, FileNotFoundError)


@pytest.mark.parametrize(
    ("offset", "length"), [(0, 0), (-1, 10), (4000, 97), (0, 4097), (4096, 1)]
)
def test_grant_copy_segment_must_stay_within_one_page(offset, length):
    with pytest.raises(GrantError, match="within one page"):
        GrantCopySegment(0, 8, offset, length)


def test_grant_copy_segment_checks_domid_and_ref():
    assert GrantCopySegment(0, 8, 4000, 96).length == 96
    with pytest.raises(GrantError, match="domid"):
        GrantCopySegment(0x7FF0, 8, 0, 1)
    with pytest.raises(GrantError, match="uint32"):
        GrantCopySegment(1, 2**32, 0, 1)
