"""`xentools vbd create|destroy`: the toolstack's part of attaching a disk.

Owns: the command line over xentools.devices.toolstack (both xenstore directories of a vbd
written or removed in one transaction, as the kernel drivers need), and what `create` checks
first, each refusal one line naming the fix: the image exists and is RAW (the format
detection of `image inspect`), the frontend domain exists, the vbd is not there already
(unless --force) and is never rewritten while a driver serves it, the image is not writable
in another vbd (unless the disk spec says access=w!).
Must not: serve the disk (that is `xentools blkback serve`), speak blkif, or write anything
before every check passed.

`--image` takes a path or an xl disk spec (xl-disk-configuration(5)): `--image "format=raw,
vdev=xvda, access=rw, target=disk.img"`; the spec's target is what `params` holds.
"""

from __future__ import annotations

import json
import os
import stat

import click

from xentools.core.vbd import encode_vbd
from xentools.devices import toolstack
from xentools.platform.select import open_platform
from xentools.tools.images.diskformat import inspect_image, require_raw
from xentools.tools.images.errors import ImageFormatError
from xentools.tools.options import domid_option, resolve_disk, sim_dir_option, vdev_option


def _common(fn):
    fn = click.option("--json", "as_json", is_flag=True, help="Print the paths as JSON.")(fn)
    fn = click.option("--backend-domid", type=click.IntRange(0, 0x7FEF), default=0,
                      show_default=True)(fn)
    fn = click.option("--userspace-kind", is_flag=True,
                      help=f"Put the backend under backend/{toolstack.USERSPACE_BACKEND_KIND}/ "
                           "where Linux's xen-blkback does not look (for our blkback).")(fn)
    fn = vdev_option(default=None, help="Virtual device: xvdX, hdX, sdX, dNpM or a number "
                     "[default: the disk spec's vdev, else xvda].")(fn)
    fn = domid_option("--frontend-domid", required=True, help="The frontend (guest) domain.")(fn)
    fn = sim_dir_option()(fn)
    return fn


def _devid(vdev: str) -> int:
    return encode_vbd(vdev) if not vdev.isdigit() else int(vdev)


def _paths(frontend_domid: int, devid: int, backend_domid: int, userspace_kind: bool) -> toolstack.VbdPaths:
    kind = toolstack.USERSPACE_BACKEND_KIND if userspace_kind else toolstack.BLKBACK_KIND
    return toolstack.VbdPaths(
        toolstack.backend_path(backend_domid, frontend_domid, devid, kind),
        toolstack.frontend_path(frontend_domid, devid))


def _echo(paths: toolstack.VbdPaths, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"backend": paths.backend, "frontend": paths.frontend}))
    else:
        click.echo(f"backend  {paths.backend}\nfrontend {paths.frontend}")


def _check_image(path: str) -> None:
    """The image exists and is RAW (a block device is taken as RAW, as xl's phy does)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageFormatError("vbd.image_missing", f"{path} does not exist: create it (e.g. "
                               f"`truncate -s 64M {path}`) or name an existing image") from None
    if stat.S_ISBLK(st.st_mode):
        return
    if not stat.S_ISREG(st.st_mode):
        raise ImageFormatError("vbd.image_not_file", f"{path} is not a regular file or a block device")
    require_raw(inspect_image(path))


@click.group()
def vbd() -> None:
    """Create or remove a vbd's xenstore directories (the toolstack's job)."""


@vbd.command("create")
@_common
@click.option("--image", required=True, metavar="PATH|DISKSPEC",
              help="The image (the `params` key), or an xl disk spec such as "
                   "\"format=raw, vdev=xvda, access=rw, target=disk.img\".")
@click.option("--read-only", is_flag=True, help="mode=r instead of w (as access=ro).")
@click.option("--force", is_flag=True,
              help="Replace a vbd that exists already (never one a driver is serving).")
def vbd_create(sim_dir, domid, vdev, userspace_kind, backend_domid, as_json,
               image, read_only, force) -> None:
    """Write both directories of a vbd in one transaction (state Initialising)."""
    disk = resolve_disk(image, vdev=vdev, read_only=read_only)
    devid = _devid(disk.vdev)
    paths = _paths(domid, devid, backend_domid, userspace_kind)
    _check_image(disk.image)
    extra = {}
    if disk.spec is not None and disk.spec.discard is not None:
        extra["discard-enable"] = "1" if disk.spec.discard else "0"  # as libxl writes it
    xs = open_platform(sim_dir, backend_domid).open_xenstore()
    try:
        toolstack.require_domain(xs, domid)
        try:
            made = toolstack.create_vbd(
                xs, backend_domid=backend_domid, frontend_domid=domid, devid=devid,
                params=disk.image, mode=disk.mode, extra_backend=extra,
                backend_kind=toolstack.USERSPACE_BACKEND_KIND if userspace_kind
                else toolstack.BLKBACK_KIND,
                existing="replace" if force else "refuse", shared_ok=disk.access == "w!")
        except toolstack.ToolstackError as err:
            raise toolstack.ToolstackError(err.rule, f"{err.detail}: {_fix(err, domid, disk.vdev)}") from None
    finally:
        xs.close()
    assert made == paths
    _echo(made, as_json)


def _fix(err: toolstack.ToolstackError, domid: int, vdev: str) -> str:
    destroy = f"`xentools vbd destroy --domid {domid} --vdev {vdev}`"
    if err.rule == "vbd.exists":
        return f"remove it with {destroy}, or pass --force to replace it"
    if err.rule == "vbd.in_use":
        return f"stop its backend first (or, if none runs any more, remove the vbd with {destroy})"
    if err.rule == "vbd.image_shared":
        return "give it read-only (--read-only, access=ro), or say access=w! in a disk spec to share it on purpose"
    return "check the domain id"


@vbd.command("destroy")
@_common
def vbd_destroy(sim_dir, domid, vdev, userspace_kind, backend_domid, as_json) -> None:
    """Remove both directories of a vbd in one transaction."""
    paths = _paths(domid, _devid(vdev or "xvda"), backend_domid, userspace_kind)
    xs = open_platform(sim_dir, backend_domid).open_xenstore()
    try:
        if not xs.exists(paths.backend) and not xs.exists(paths.frontend):
            raise toolstack.ToolstackError(
                "vbd.missing", f"domain {domid} has no vbd {vdev or 'xvda'} ({paths.backend} and "
                f"{paths.frontend} do not exist): nothing to remove (check --domid, --vdev, "
                "--backend-domid and --userspace-kind)")
        toolstack.destroy_vbd(xs, paths)
    finally:
        xs.close()
    _echo(paths, as_json)
