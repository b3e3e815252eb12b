"""xentools.core.diskspec: xl-disk-configuration(5), the manpage's own examples and its errors."""

from __future__ import annotations

import dataclasses

import pytest

from xentools.core.diskspec import DiskSpecError, looks_like_disk_spec, parse_disk_spec


def _meaning(spec):
    """What a spec says, without the record of how it was said."""
    return dataclasses.replace(spec, given=frozenset())


# The manpage: "For example, these strings are equivalent" (and "As are these").
EQUIVALENT = [
    ["/dev/vg/guest-volume,,hda", "/dev/vg/guest-volume,raw,hda,rw",
     "format=raw, vdev=hda, access=rw, target=/dev/vg/guest-volume", "raw:/dev/vg/guest-volume,hda,w"],
    ["/root/image.iso,,hdc,cdrom", "/root/image.iso,,hdc,,cdrom", "/root/image.iso,raw,hdc,devtype=cdrom",
     "format=raw, vdev=hdc, access=ro, devtype=cdrom, target=/root/image.iso",
     "raw:/root/image.iso,hdc:cdrom,ro"],
]


@pytest.mark.parametrize("group", EQUIVALENT, ids=["disk", "cdrom"])
def test_manpage_equivalences(group):
    parsed = [_meaning(parse_disk_spec(text)) for text in group]
    assert all(p == parsed[0] for p in parsed), parsed


def test_manpage_values():
    disk = parse_disk_spec("format=raw, vdev=xvda, access=rw, target=/path/disk.img")
    assert (disk.target, disk.format, disk.vdev, disk.access, disk.devid) == ("/path/disk.img", "raw", "xvda", "w", 51712)
    cdrom = parse_disk_spec("/root/image.iso,,hdc,cdrom")
    assert (cdrom.devtype, cdrom.access, cdrom.readonly) == ("cdrom", "r", True)  # cdrom: r by default
    empty = parse_disk_spec(",hdc:cdrom,r")  # xend's empty cdrom drive
    assert (empty.target, empty.format, empty.vdev, empty.devtype) == (None, "empty", "hdc", "cdrom")


def test_target_swallows_the_rest():
    spec = parse_disk_spec("vdev=xvdb, access=ro, target=/images/a,b:c=d.img ")
    assert spec.target == "/images/a,b:c=d.img " and spec.vdev == "xvdb" and spec.readonly
    # "permissible even if an empty value for the target was already given positionally"
    assert parse_disk_spec(",raw,xvda,target=/x,y").target == "/x,y"


def test_positional_fill_the_first_unspecified():
    spec = parse_disk_spec("format=vhd, /img.vhd, xvdc, r")
    assert (spec.target, spec.format, spec.vdev, spec.access) == ("/img.vhd", "vhd", "xvdc", "r")
    assert parse_disk_spec("  /a.img ,  , xvda").target == "/a.img "  # whitespace before only


@pytest.mark.parametrize("access,mode,shared", [("r", "r", False), ("ro", "r", False), ("w", "w", False),
                                                ("rw", "w", False), ("w!", "w", True)])
def test_access_values(access, mode, shared):
    spec = parse_disk_spec(f"/d.img,raw,xvda,{access}")
    assert (spec.mode, spec.shared_writable) == (mode, shared)


def test_flags_and_other_keys():
    spec = parse_disk_spec("backendtype=qdisk, script=block-nbd, specification=xen, direct-io-safe, "
                           "no-discard, untrusted, backend=driverdom, grant_usage=1, target=/d")
    assert (spec.backendtype, spec.script, spec.specification, spec.direct_io_safe, spec.discard,
            spec.trusted, spec.backend, spec.grant_usage) == ("qdisk", "block-nbd", "xen", True, False, False,
                                                              "driverdom", True)
    assert parse_disk_spec("nbd:host:1234,xvda,w").script == "block-nbd"  # deprecated script prefix
    assert parse_disk_spec("tap:aio:/d.img,xvda,w").target == "/d.img"  # dropped prefixes


@pytest.mark.parametrize("text,rule,words", [
    ("colour=blue, target=/d", "diskspec.unknown_key", "'colour'"),
    ("/d,raw,xvda,rwx", "diskspec.bad_access", "access='rwx'"),
    ("format=vdi, target=/d", "diskspec.bad_format", "raw, qcow, qcow2, vhd, qed"),
    ("/d,raw,xvda,rw,extra", "diskspec.too_many_positional", "fifth"),
    ("vdev=xvda, /d, raw, vdev=xvdb", "diskspec.respecified", "vdev given twice"),
    ("/d,raw,floppy", "diskspec.bad_vdev", "floppy"),
    ("devtype=tape, target=/d", "diskspec.bad_devtype", "disk, cdrom"),
    ("backendtype=nbd, target=/d", "diskspec.bad_backendtype", "phy, tap, qdisk, standalone"),
    ("foo:/d,xvda,w", "diskspec.bad_prefix", "'foo:'"),
    ("/a=b.img,raw,xvda", "diskspec.bad_syntax", "target="),
    ("colo-host=h, target=/d", "diskspec.colo_off", "colo"),
    ("   ", "diskspec.empty", "empty"),
])
def test_errors_name_the_parameter(text, rule, words):
    with pytest.raises(DiskSpecError) as info:
        parse_disk_spec(text)
    message = str(info.value)
    assert info.value.rule == rule and message.startswith(rule + ": ")
    assert words in message and "\n" not in message and "xl-disk-configuration(5)" in message


def test_looks_like_disk_spec():
    assert looks_like_disk_spec("format=raw, target=/d")
    assert looks_like_disk_spec("/d.img,,xvda")
    assert looks_like_disk_spec("target=/d")
    assert not looks_like_disk_spec("/images/disk.img")
    assert not looks_like_disk_spec("disk.img")
