"""Guest images on a Xen host: a catalog of FreeBSD release images, fetch, inspect, boot test.

Owns: the public facade of the image tools (names re-exported below); the modules behind it
are catalog (catalog.toml, checksum files, image choice), fetch (mirror, resumable download,
digest, xz), diskformat (RAW/MBR/GPT, VHD, qcow2, vmdk), verdict (the pure verdict engine),
xl (a guest's xl.cfg and its life under xl, consoles), boottest (disk servers, the run),
matrix (fault and configuration rows), initramfs (a Linux guest's kernel and cpio archive)
and report (JSON, JUnit XML).
Must not: be imported by the core, platform or devices layers (tools sit on top), print, or
touch the network except through fetch's Mirror.
"""

from xentools.tools.images.boottest import BootTest, DiskServer, HostDisk, XentoolsDisk, preflight
from xentools.tools.images.catalog import Catalog, Profile, load_catalog, parse_checksum_file
from xentools.tools.images.diskformat import ImageInfo, inspect_image, require_raw
from xentools.tools.images.errors import (
    BootTestError,
    CatalogError,
    ChecksumError,
    GuestImageError,
    ImageFormatError,
    MirrorError,
    StorageError,
)
from xentools.tools.images.fetch import FetchResult, Mirror, fetch_image
from xentools.tools.images.report import BootResult
from xentools.tools.images.verdict import Decision, Outcome, Rules, Verdict, VerdictEngine
from xentools.tools.images.xl import GuestConfig, Runner, SubprocessRunner, XlDomain, render_xl_cfg

__all__ = [
    "BootResult", "BootTest", "BootTestError", "Catalog", "CatalogError", "ChecksumError", "Decision",
    "DiskServer", "FetchResult", "GuestConfig", "GuestImageError", "HostDisk", "ImageFormatError", "ImageInfo",
    "Mirror", "MirrorError", "Outcome", "Profile", "Rules", "Runner", "StorageError", "SubprocessRunner",
    "Verdict", "VerdictEngine", "XentoolsDisk", "XlDomain", "fetch_image", "inspect_image", "load_catalog",
    "parse_checksum_file", "preflight", "render_xl_cfg", "require_raw",
]
