"""Builders shared by the tests of xentools.tools.images: disk images with real partition
tables, a VHD footer, a threaded HTTP server with Range support that can drop a connection,
a release directory with its checksum files, and a fake `xl` for boot tests.

Holds no tests itself; the test_images_* modules import it.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import lzma
import os
import re
import socketserver
import stat
import struct
import sys
import threading
import uuid
import zlib
from pathlib import Path

SECTOR = 512
FREEBSD_BOOT = "83BD6B9D-7F41-11DC-BE0B-001560B84F0F"
FREEBSD_UFS = "516E7CB6-6ECF-11D6-8FF8-00022D09712B"
FREEBSD_SWAP = "516E7CB5-6ECF-11D6-8FF8-00022D09712B"
EFI_SYSTEM = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_FS = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
MARKER = b"xentools test image: known content\n"


def mbr_sector(entries: list[tuple[int, int, int, bool]]) -> bytearray:
    """A sector with an MBR: entries are (type, first LBA, sectors, active)."""
    sector = bytearray(SECTOR)
    for i, (ptype, first, count, active) in enumerate(entries):
        struct.pack_into("<B3sB3sII", sector, 446 + 16 * i, 0x80 if active else 0, b"\xff\xff\xff", ptype,
                         b"\xff\xff\xff", first, count)
    sector[510:512] = b"\x55\xaa"
    return sector


def mbr_image(size: int, entries: list[tuple[int, int, int, bool]]) -> bytearray:
    img = bytearray(size)
    img[:SECTOR] = mbr_sector(entries)
    for _, first, _, _ in entries:
        img[first * SECTOR:first * SECTOR + len(MARKER)] = MARKER
    return img


def gpt_image(size: int, parts: list[tuple[str, int, int, str]], *, corrupt_header_crc: bool = False,
              entries: int = 128) -> bytearray:
    """A disk with a protective MBR and a primary GPT: parts are (type GUID, first, last, label)."""
    sectors = size // SECTOR
    img = bytearray(size)
    img[:SECTOR] = mbr_sector([(0xEE, 1, min(sectors - 1, 0xFFFFFFFF), False)])
    table = bytearray(entries * 128)
    for i, (tguid, first, last, label) in enumerate(parts):
        struct.pack_into("<16s16sQQQ72s", table, i * 128, uuid.UUID(tguid).bytes_le, uuid.uuid4().bytes_le,
                         first, last, 0, label.encode("utf-16-le"))
        if (first + 1) * SECTOR <= size:  # a marker past the end would grow the image to an odd size
            img[first * SECTOR:first * SECTOR + len(MARKER)] = MARKER
    entries_lba = 2
    img[entries_lba * SECTOR:entries_lba * SECTOR + len(table)] = table
    header = bytearray(92)
    struct.pack_into("<8sIIIIQQQQ16sQIII", header, 0, b"EFI PART", 0x00010000, 92, 0, 0, 1, sectors - 1,
                     34, sectors - 34, uuid.uuid4().bytes_le, entries_lba, entries, 128, zlib.crc32(table))
    crc = zlib.crc32(header)
    struct.pack_into("<I", header, 16, crc ^ (1 if corrupt_header_crc else 0))
    img[SECTOR:SECTOR + 92] = header
    return img


def freebsd_like_image(size: int = 4 << 20) -> bytearray:
    """A small disk laid out like a FreeBSD VM image: boot, EFI, swap and UFS partitions."""
    sectors = size // SECTOR
    return gpt_image(size, [
        (FREEBSD_BOOT, 40, 167, "gptboot0"),
        (EFI_SYSTEM, 168, 2215, "efiesp"),
        (FREEBSD_SWAP, 2216, 4263, "swapfs"),
        (FREEBSD_UFS, 4264, sectors - 34, "rootfs"),
    ])


def vhd_footer(current_size: int, disk_type: int = 2) -> bytes:
    """A VHD footer (big-endian) with a correct checksum."""
    footer = bytearray(SECTOR)
    data_offset = 0xFFFFFFFFFFFFFFFF if disk_type == 2 else SECTOR
    struct.pack_into(">8sIIQI4sI4sQQIII16sB", footer, 0, b"conectix", 2, 0x00010000, data_offset, 0, b"xtt ",
                     0x00010000, b"Wi2k", current_size, current_size, 0, disk_type, 0, uuid.uuid4().bytes, 0)
    checksum = (~sum(footer)) & 0xFFFFFFFF
    struct.pack_into(">I", footer, 64, checksum)
    return bytes(footer)


# ------------------------------------------------------------------ release directories

def release_dir(root: Path, release: str, names: dict[str, bytes], arch_dir: str = "amd64",
                sha256: bool = True, sha512: bool = True, bad_digest_for: str | None = None) -> Path:
    """releases/VM-IMAGES/<release>/<arch_dir>/Latest/ with files and their checksum files."""
    latest = root / "releases" / "VM-IMAGES" / release / arch_dir / "Latest"
    latest.mkdir(parents=True, exist_ok=True)
    for name, data in names.items():
        (latest / name).write_bytes(data)
    for alg, wanted in (("SHA512", sha512), ("SHA256", sha256)):
        if not wanted:
            continue
        lines = []
        for name, data in sorted(names.items()):
            digest = hashlib.new(alg.lower(), data).hexdigest()
            if name == bad_digest_for:
                digest = ("0" if digest[0] != "0" else "1") + digest[1:]
            lines.append(f"{alg} ({name}) = {digest}\n")
        (latest / f"CHECKSUM.{alg}").write_text("".join(lines))
    return latest


def xz(data: bytes) -> bytes:
    return lzma.compress(bytes(data), format=lzma.FORMAT_XZ, preset=1)


# --------------------------------------------------------------------------- HTTP server

class MirrorServer:
    """A threaded HTTP server on 127.0.0.1 serving a directory, with Range support.

    `drop_first[name] = n`: the first GET of a path ending in `name` sends full headers and
    only n bytes of the body, then closes the connection. `ignore_range`: answer 200 always.
    `requests` records (path, Range header) of every GET.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.drop_first: dict[str, int] = {}
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []
        self._dropped: set[str] = set()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                path = server.root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start = 0
                m = re.match(r"bytes=(\d+)-$", rng or "")
                if m and not server.ignore_range:
                    start = int(m.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                for name, n in server.drop_first.items():
                    if self.path.endswith(name) and name not in server._dropped:
                        server._dropped.add(name)
                        self.wfile.write(body[:n])
                        self.wfile.flush()
                        self.close_connection = True
                        return
                self.wfile.write(body)

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> MirrorServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


# ----------------------------------------------------------------------------- fake xl

FAKE_XL = r'''
import json, os, re, subprocess, sys, time

state = os.environ["FAKE_XL_STATE"]
behaviour = json.load(open(os.path.join(state, "behaviour.json")))
argv = sys.argv[1:]
with open(os.path.join(state, "calls.log"), "a") as f:
    f.write(json.dumps(argv) + "\n")
domains = os.path.join(state, "domains")
os.makedirs(domains, exist_ok=True)

def dom(name):
    return os.path.join(domains, name)

def play(out, name):
    """Print the transcript; then hold the console until destroyed, or power off."""
    for delay, text in behaviour.get("transcript", []):
        time.sleep(delay)
        out.write(text.encode())
        out.flush()
    with open(os.path.join(state, "played"), "w") as f:
        f.write(repr(time.time()))
    if behaviour.get("hold", True):
        deadline = time.time() + 60
        while os.path.exists(dom(name)) and time.time() < deadline:
            time.sleep(0.02)
    else:
        try:
            os.unlink(dom(name))   # on_poweroff = 'destroy'
        except FileNotFoundError:
            pass

cmd = argv[0] if argv else ""
if cmd == "create":
    cfg = open(argv[-1]).read()
    name = re.search(r"^name = '([^']*)'", cfg, re.M).group(1)
    open(os.path.join(state, "last.cfg"), "w").write(cfg)
    if behaviour.get("create_rc", 0):
        sys.stderr.write("libxl: error: fake create failure\n")
        sys.exit(behaviour["create_rc"])
    open(dom(name), "w").write("7")
elif cmd == "domid":
    if not os.path.exists(dom(argv[1])):
        sys.stderr.write("xl: domain %s does not exist\n" % argv[1])
        sys.exit(1)
    print(open(dom(argv[1])).read())
elif cmd == "unpause":
    name = argv[1]
    if behaviour.get("unpause_rc", 0) or not os.path.exists(dom(name)):
        sys.stderr.write("libxl: error: fake unpause failure\n")
        sys.exit(behaviour.get("unpause_rc", 1) or 1)
    open(os.path.join(state, name + ".unpaused"), "w").close()
    if behaviour.get("log_dir"):
        subprocess.Popen([sys.executable, __file__, "__guest", name], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
elif cmd == "__guest":
    name = argv[1]
    with open(os.path.join(behaviour["log_dir"], "guest-%s.log" % name), "ab") as out:
        play(out, name)
elif cmd == "console":
    name = argv[-1]
    if behaviour.get("console_rc"):
        sys.stderr.write("xenconsole: Could not open /var/lock/xenconsole.7\n")
        sys.exit(behaviour["console_rc"])
    deadline = time.time() + 10
    while not os.path.exists(os.path.join(state, name + ".unpaused")):
        if time.time() > deadline or not os.path.exists(dom(name)):
            sys.exit(1)
        time.sleep(0.01)
    play(sys.stdout.buffer, name)
elif cmd == "destroy":
    name = argv[1]
    if behaviour.get("destroy_rc", 0):
        sys.stderr.write("libxl: error: fake destroy failure\n")
        sys.exit(behaviour["destroy_rc"])
    if not os.path.exists(dom(name)):
        sys.stderr.write("xl: domain %s does not exist\n" % name)
        sys.exit(1)
    os.unlink(dom(name))
elif cmd == "info":
    print("nr_cpus                : %d" % behaviour.get("nr_cpus", 2))
    print("free_memory            : %d" % behaviour.get("free_memory", 4096))
elif cmd == "dmesg":
    # dmesg_after: Xen's lines appear only that many seconds after the console transcript
    # was played (an ordering a loaded machine cannot reverse).
    after = behaviour.get("dmesg_after")
    played = os.path.join(state, "played")
    if after is None or (os.path.exists(played) and time.time() - float(open(played).read()) >= after):
        sys.stdout.write(behaviour.get("dmesg", ""))
else:
    sys.stderr.write("fake xl: unknown command %r\n" % argv)
    sys.exit(2)
'''


class FakeXl:
    """A fake `xl` in `<tmp>/bin`, its state in `<tmp>/xlstate`. `env()` puts it on PATH."""

    def __init__(self, tmp: Path, **behaviour: object) -> None:
        self.bin = tmp / "bin"
        self.state = tmp / "xlstate"
        self.bin.mkdir(exist_ok=True)
        self.state.mkdir(exist_ok=True)
        self.path = self.bin / "xl"
        self.path.write_text(f"#!{sys.executable}\n{FAKE_XL}")
        self.path.chmod(self.path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        self.configure(**behaviour)

    def configure(self, **behaviour: object) -> None:
        (self.state / "behaviour.json").write_text(json.dumps(behaviour))

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["FAKE_XL_STATE"] = str(self.state)
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        return env

    def calls(self) -> list[list[str]]:
        log = self.state / "calls.log"
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    def live_domains(self) -> list[str]:
        d = self.state / "domains"
        return sorted(os.listdir(d)) if d.exists() else []

    def last_cfg(self) -> str:
        return (self.state / "last.cfg").read_text()
