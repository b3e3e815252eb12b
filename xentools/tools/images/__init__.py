"""Guest images on a Xen host: a catalog of FreeBSD release images, fetch, inspect, boot test.

Owns: the public facade of the image tools (names re-exported below); the modules behind it
are catalog (catalog.toml, checksum files, image choice), fetch (mirror, resumable download,
digest, xz), diskformat (RAW/MBR/GPT, VHD, qcow2, vmdk), verdict (the pure verdict engine),
boottest (xl.cfg, disk servers, console, the run) and report (JSON, JUnit XML).
Must not: be imported by the core, platform or devices layers (tools sit on top), print, or
touch the network except through fetch's Mirror.
"""

from xentools.tools.images.boottest import (
    BootTest,
    DiskServer,
    GuestConfig,
    HostDisk,
    Runner,
    SubprocessRunner,
    XentoolsDisk,
    preflight,
    render_xl_cfg,
)
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

__all__ = [
    "BootResult", "BootTest", "BootTestError", "Catalog", "CatalogError", "ChecksumError", "Decision",
    "DiskServer", "FetchResult", "GuestConfig", "GuestImageError", "HostDisk", "ImageFormatError", "ImageInfo",
    "Mirror", "MirrorError", "Outcome", "Profile", "Rules", "Runner", "StorageError", "SubprocessRunner",
    "Verdict", "VerdictEngine", "XentoolsDisk", "fetch_image", "inspect_image", "load_catalog",
    "parse_checksum_file", "preflight", "render_xl_cfg", "require_raw",
]
