"""The options every `xentools` command spells the same way: `--sim-dir`, `--domid`, `--vdev`,
and the `--image` that takes a path or an xl disk spec.

Owns: one definition of each shared option (name, type, help), the hidden old spellings each
still accepts (`--vbd`, `--frontend-domid`, `--dir`, `--domain`), and `resolve_disk` (the image option and
`--vdev`/`--read-only` merged with a disk spec, through xentools.core.diskspec).
Must not: open a platform or implement a command.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import click

from xentools.core.diskspec import DiskSpec, DiskSpecError, looks_like_disk_spec, parse_disk_spec

__all__ = ["AliasOption", "ResolvedDisk", "domid_option", "resolve_disk",
           "sim_dir_option", "vdev_option"]

SIM_DIR_HELP = "Software Xen directory (default: $XENTOOLS_SIM_DIR, else real Xen)."


class AliasOption(click.Option):
    """An option whose first name is the one spelling shown in --help; its other names are
    old spellings, still accepted, not advertised."""

    def get_help_record(self, ctx: click.Context):  # type: ignore[no-untyped-def]
        shown, self.opts = self.opts, self.opts[:1]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = shown


def sim_dir_option(*old: str, **kwargs):  # type: ignore[no-untyped-def]
    kwargs.setdefault("help", SIM_DIR_HELP)
    kwargs.setdefault("default", None)
    return click.option("--sim-dir", *old, "sim_dir", cls=AliasOption,
                        type=click.Path(file_okay=False), **kwargs)


def domid_option(*old: str, **kwargs):  # type: ignore[no-untyped-def]
    kwargs.setdefault("type", click.IntRange(0, 0x7FEF))
    return click.option("--domid", *old, "domid", cls=AliasOption, **kwargs)


def vdev_option(*old: str, **kwargs):  # type: ignore[no-untyped-def]
    kwargs.setdefault("help", "Virtual device: xvdX, hdX, sdX, dNpM or its number (xen-vbd-interface(7)).")
    return click.option("--vdev", *old, "vdev", cls=AliasOption, **kwargs)


@dataclass(frozen=True)
class ResolvedDisk:
    """A disk as the command line named it: the image path (absolute), the vdev, the mode."""

    image: str
    vdev: str
    access: str  # "r", "w" or "w!"
    spec: DiskSpec | None  # the parsed spec, when one was given

    @property
    def mode(self) -> str:
        return "r" if self.access == "r" else "w"


def resolve_disk(image: str, *, vdev: str | None, read_only: bool, default_vdev: str = "xvda") -> ResolvedDisk:
    """Merge `--image` (a path, or an xl disk spec) with `--vdev` and `--read-only`.

    A value holding a comma or a `key=` is a disk spec; a plain path is the target alone.
    What the spec and the options both say must agree (DiskSpecError otherwise); a spec
    names a format other than raw, a cdrom or a backend the CLI cannot honour: refused
    with the option to use instead."""
    spec = parse_disk_spec(image) if looks_like_disk_spec(image) else None
    if spec is None:
        return ResolvedDisk(os.path.abspath(image), vdev or default_vdev, "r" if read_only else "w", None)
    if not spec.target:
        raise DiskSpecError("diskspec.no_target", f"the disk spec {image!r} names no target: add target=/path/disk.img")
    if spec.format != "raw":
        raise DiskSpecError("diskspec.format", f"format={spec.format}: xentools serves RAW images only; convert "
                            f"with `qemu-img convert -O raw {spec.target} disk.raw` and name that")
    if spec.devtype != "disk":
        raise DiskSpecError("diskspec.devtype", f"devtype={spec.devtype}: xentools attaches disks only; drop it")
    unsupported = [name for name in ("backend", "backendtype", "script", "specification") if name in spec.given]
    if spec.colo:
        unsupported.append("colo")
    if unsupported:
        raise DiskSpecError("diskspec.unsupported", f"{', '.join(unsupported)} in {image!r}: xentools has one "
                            "backend and runs no hotplug script; drop them (the backend domain is --backend-domid)")
    if vdev is not None and spec.vdev and spec.devid != DiskSpec(vdev=vdev).devid:
        raise DiskSpecError("diskspec.conflict", f"--vdev {vdev} and vdev={spec.vdev} in the disk spec differ: give one")
    if read_only and "access" in spec.given and not spec.readonly:
        raise DiskSpecError("diskspec.conflict", f"--read-only and access={spec.access} in the disk spec differ: give one")
    access = "r" if read_only else spec.access
    return ResolvedDisk(os.path.abspath(spec.target), spec.vdev or vdev or default_vdev, access, spec)
