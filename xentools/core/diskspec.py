"""xl's disk specification (xl-disk-configuration(5)), parsed: `format=raw, vdev=xvda,
access=rw, target=/path/disk.img` and its positional and deprecated forms.

Owns: `parse_disk_spec` (a DISKSPEC string -> `DiskSpec`, or DiskSpecError naming the
parameter and what would be accepted) and `looks_like_disk_spec` (does a command-line value
use the spec syntax, or is it a plain path).
Must not: look at the image, at xenstore or at domain names; deciding what a spec means for
a vbd (a backend domain named by `backend=`, a format the backend can serve) is the caller's.

The grammar, as the manpage and xl's own parser (libxlu) define it:
- Parameters are separated by commas; whitespace before a parameter is ignored.
- `key=value` for format, vdev, access, devtype, backend, backendtype, script,
  specification and the COLO keys; flags cdrom, direct-io-safe, discard/no-discard,
  trusted/untrusted, colo/no-colo; `grant_usage=0|1`.
- `target=` swallows the rest of the string, commas and trailing whitespace included, so it
  comes last and is the only way to name a target holding "," or ":".
- Anything else without "=" is positional: target, format, vdev, access, in that order,
  each taking the first one not yet given. An empty value means the default.
- Deprecated (xm/xend): a `raw:`/`qcow:`/`qcow2:`/`vhd:` prefix on the target gives the
  format (the next positional is then the vdev), `iscsi:`/`nbd:`/`enbd:`/`drbd:` give
  script=block-<name>, `tapdisk:`/`tap:`/`tap2:`/`aio:`/`ioemu:`/`file:`/`phy:` are
  dropped; a vdev may carry `:cdrom` or `:disk`.
- A parameter given twice (with two non-empty values) is an error, as in xl.
Where this differs from xl: `access=w!` (xm's "writable, and sharing it is intended") is
accepted and kept as "w!"; xl 4.17 refuses it. A relative target is left relative (the
CLI resolves it against the working directory; libxl prepends /dev for a phy device).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from xentools.core.errors import VbdError, XentoolsError
from xentools.core.vbd import encode_vbd

__all__ = ["ACCESS", "DiskSpec", "DiskSpecError", "FORMATS", "looks_like_disk_spec", "parse_disk_spec"]

FORMATS = ("raw", "qcow", "qcow2", "vhd", "qed", "empty")
# access value -> canonical mode: "r", "w", or "w!" (writable, shared on purpose)
ACCESS = {"r": "r", "ro": "r", "w": "w", "rw": "w", "w!": "w!", "rw!": "w!"}
BACKENDTYPES = ("phy", "tap", "qdisk", "standalone")
SPECIFICATIONS = ("xen", "virtio")
DEVTYPES = ("disk", "cdrom")
_POSITIONAL = ("target", "format", "vdev", "access")
# key=value parameters besides the positional ones (which may also be named)
_VALUED = ("devtype", "backend", "backendtype", "script", "specification", "colo-host",
           "colo-port", "colo-export", "active-disk", "hidden-disk", "grant_usage")
_FLAGS = {
    "cdrom": ("devtype", "cdrom"), "direct-io-safe": ("direct_io_safe", True),
    "discard": ("discard", True), "no-discard": ("discard", False),
    "trusted": ("trusted", True), "untrusted": ("trusted", False),
    "colo": ("colo", True), "no-colo": ("colo", False),
}
_FORMAT_PREFIXES = ("raw", "qcow", "qcow2", "vhd")
_SCRIPT_PREFIXES = ("iscsi", "nbd", "enbd", "drbd")
_DROPPED_PREFIXES = ("tapdisk", "tap", "tap2", "aio", "ioemu", "file", "phy")
_PREFIX = re.compile(r"^([a-z][a-z0-9]*):")
_KEY = re.compile(r"^([a-z][-a-z0-9_]*)=")
_MANPAGE = "see xl-disk-configuration(5)"


class DiskSpecError(XentoolsError, ValueError):
    """A disk specification breaks xl-disk-configuration(5): an unknown parameter or value,
    a parameter given twice, too many positional parameters. `rule` is "diskspec.<what>";
    str() is one line naming the parameter and the accepted values."""


@dataclass(frozen=True)
class DiskSpec:
    """One parsed DISKSPEC. None means "not given" (the default applies)."""

    target: str | None = None
    format: str = "raw"
    vdev: str | None = None
    access: str = "w"  # "r", "w" or "w!"
    devtype: str = "disk"
    backend: str | None = None  # backend domain NAME (xl's backend=)
    backendtype: str | None = None
    script: str | None = None
    specification: str | None = None
    direct_io_safe: bool = False
    discard: bool | None = None
    trusted: bool | None = None
    colo: bool | None = None
    colo_params: dict[str, str] = field(default_factory=dict)
    grant_usage: bool | None = None
    given: frozenset[str] = frozenset()  # the parameters the string named (for conflicts)

    @property
    def readonly(self) -> bool:
        return self.access == "r"

    @property
    def mode(self) -> str:
        """The backend's `mode` key: "r" or "w" (w! is writable too)."""
        return "r" if self.access == "r" else "w"

    @property
    def shared_writable(self) -> bool:
        """access=w!: the user says the image may be writable in two places at once."""
        return self.access == "w!"

    @property
    def devid(self) -> int | None:
        """The `virtual-device` number of `vdev` (a name or a decimal number)."""
        if self.vdev is None:
            return None
        return int(self.vdev) if self.vdev.isdigit() else encode_vbd(self.vdev)


def looks_like_disk_spec(value: str) -> bool:
    """True if `value` uses the DISKSPEC syntax (a `key=` parameter, a flag, or a comma),
    False for a plain path (which is also a valid spec: its target alone)."""
    if "," in value:
        return True
    return bool(_KEY.match(value.lstrip())) or value.strip() in _FLAGS


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.values: dict[str, object] = {}
        self.colo: dict[str, str] = {}
        self.deprecated_prefix = False

    def fail(self, rule: str, detail: str) -> DiskSpecError:
        return DiskSpecError(f"diskspec.{rule}", f"{detail} in disk spec {self.text!r} ({_MANPAGE})")

    def set(self, name: str, value: object) -> None:
        old = self.values.get(name)
        if old not in (None, "") and value not in (None, "") and old != value:
            raise self.fail("respecified", f"{name} given twice ({old!r} and {value!r})")
        if value not in (None, "") or name not in self.values:
            self.values[name] = value

    def choice(self, name: str, value: str, allowed) -> str:  # type: ignore[no-untyped-def]
        if value not in allowed:
            raise self.fail(f"bad_{name.replace('-', '_')}",
                            f"{name}={value!r} is not one of {', '.join(allowed)}")
        return value

    def named(self, key: str, value: str) -> None:
        if key == "format":
            self.set("format", self.choice("format", value, FORMATS) if value else "")
        elif key == "access":
            self.set("access", ACCESS[self.choice("access", value, tuple(ACCESS))] if value else "")
        elif key == "vdev":
            self.vdev(value)
        elif key == "devtype":
            self.set("devtype", self.choice("devtype", value, DEVTYPES))
        elif key == "backendtype":
            self.set("backendtype", self.choice("backendtype", value, BACKENDTYPES))
        elif key == "specification":
            self.set("specification", self.choice("specification", value, SPECIFICATIONS))
        elif key == "grant_usage":
            self.set("grant_usage", self.choice("grant_usage", value, ("0", "1")) == "1")
        elif key == "colo-port":
            if not value.isdigit() or int(value) == 0:
                raise self.fail("bad_colo_port", f"colo-port={value!r} is not a port number")
            self.colo[key] = value
        elif key.startswith(("colo-", "active-", "hidden-")):
            self.colo[key] = value
        else:  # backend, script: free strings
            self.set(key, value)

    def vdev(self, value: str, *, with_devtype: bool = False) -> None:
        if with_devtype and ":" in value:
            value, devtype = value.rsplit(":", 1)
            self.set("devtype", self.choice("devtype", devtype, DEVTYPES))
        if value:
            try:
                int(value) if value.isdigit() else encode_vbd(value)
            except VbdError as err:
                raise self.fail("bad_vdev", f"vdev={value!r}: {err.detail}") from None
        self.set("vdev", value)

    def prefixes(self, param: str) -> str:
        """Strip the deprecated `word:` prefixes of a first positional parameter."""
        while True:
            match = _PREFIX.match(param)
            if match is None:
                return param
            word = match.group(1)
            if word in _FORMAT_PREFIXES:
                self.set("format", word)
            elif word in _SCRIPT_PREFIXES:
                self.set("script", f"block-{word}")
            elif word not in _DROPPED_PREFIXES:
                after = param[match.end():match.end() + 1]
                if after.isalnum() and after.isascii():
                    return param  # "host:1234": part of the target, not a prefix
                raise self.fail("bad_prefix", f"unknown deprecated prefix {word + ':'!r}")
            self.deprecated_prefix = True
            param = param[match.end():]

    def positional(self, param: str) -> None:
        if "target" not in self.values:
            self.set("target", self.prefixes(param))
        elif not self.deprecated_prefix and "format" not in self.values:
            if self.values["target"] == "" and ":" in param:
                self.vdev(param, with_devtype=True)  # ",hdc:cdrom,r": an empty cdrom drive
                self.set("format", "empty")
            else:
                self.named("format", param)
        elif "vdev" not in self.values:
            self.vdev(param, with_devtype=True)
        elif "access" not in self.values:
            self.named("access", param)
        else:
            raise self.fail("too_many_positional", f"{param!r} is a fifth positional parameter "
                            "(target, format, vdev, access); name it as key=value")

    def parse(self) -> DiskSpec:
        rest = self.text
        while rest:
            rest = rest.lstrip(" \t\n")
            if rest.startswith("target="):
                target = rest[len("target="):]
                self.set("target", target[:-1] if target.endswith(",") else target)
                break
            param, comma, rest = rest.partition(",")
            if not param and not comma:
                break
            key = _KEY.match(param)
            if key is not None:
                name = key.group(1)
                if name not in _POSITIONAL and name not in _VALUED:
                    raise self.fail("unknown_key", f"unknown parameter {name!r} (known: "
                                    f"{', '.join(_POSITIONAL + _VALUED)}, and the flags "
                                    f"{', '.join(_FLAGS)})")
                self.named(name, param[key.end():])
            elif param in _FLAGS:
                name, value = _FLAGS[param]
                self.set(name, value)
            elif "=" in param:
                raise self.fail("bad_syntax", f"{param!r} is not key=value with a known key (a "
                                "target holding '=' or ',' goes last, as target=...)")
            else:
                self.positional(param)
        return self.result()

    def result(self) -> DiskSpec:
        v = {k: x for k, x in self.values.items() if x != ""}
        devtype = v.get("devtype", "disk")
        access = v.get("access", "r" if devtype == "cdrom" else "w")
        if self.colo and not v.get("colo"):
            raise self.fail("colo_off", f"{', '.join(sorted(self.colo))} given without the colo flag")
        return DiskSpec(
            target=v.get("target"), format=v.get("format", "raw"), vdev=v.get("vdev"),
            access=access, devtype=devtype, backend=v.get("backend"),
            backendtype=v.get("backendtype"), script=v.get("script"),
            specification=v.get("specification"), direct_io_safe=bool(v.get("direct_io_safe")),
            discard=v.get("discard"), trusted=v.get("trusted"), colo=v.get("colo"),
            colo_params=dict(self.colo), grant_usage=v.get("grant_usage"),
            given=frozenset(v),
        )


def parse_disk_spec(text: str) -> DiskSpec:
    """Parse one DISKSPEC of xl-disk-configuration(5). Raises DiskSpecError (one line naming
    the parameter and the accepted values) on anything xl would refuse."""
    if not isinstance(text, str):
        raise DiskSpecError("diskspec.type", f"a disk spec is a string, not {type(text).__name__}")
    if not text.strip():
        raise DiskSpecError("diskspec.empty", f"the disk spec is empty ({_MANPAGE})")
    return _Parser(text).parse()
