"""The guest image catalog: families of release images and boot-test profiles.

Owns: loading and validating `vm-images/catalog.toml`, normalising a release name, parsing a
release directory's checksum file (BSD format "SHA512 (name) = hex", GNU format accepted),
picking the image of an architecture and file system from it by pattern, and choosing the
boot profile (guest kind, timeouts, verdict patterns) of an image.
Must not: open a network connection or write a file; file names of images are never written
here, they come from the checksum file.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import MappingProxyType

from xentools.tools.images.errors import CatalogError, ChecksumError

__all__ = [
    "ArchSpec", "Catalog", "ChecksumEntry", "Family", "ImageRef", "Profile", "VERDICT_KEYS",
    "default_catalog_path", "load_catalog", "parse_checksum_file",
]

ENV_CATALOG = "XENTOOLS_IMAGE_CATALOG"
SCHEMA = 1
# The verdicts a profile may give patterns for, in the order a line is tested: a line that
# shows a panic and a login prompt at once is a panic.
VERDICT_KEYS = ("panic", "mountroot", "pass")
GUEST_TYPES = ("hvm", "pv", "pvh")
# Digest lengths in hex characters, by algorithm name as hashlib spells it.
DIGEST_HEX = {"sha512": 128, "sha256": 64, "sha384": 96, "sha1": 40, "md5": 32}

_BSD_LINE = re.compile(r"^(?P<alg>[A-Za-z0-9-]+) \((?P<name>.+)\) = (?P<hex>[0-9A-Fa-f]+)$")
_GNU_LINE = re.compile(r"^(?P<hex>[0-9A-Fa-f]+) [ *](?P<name>.+)$")


def default_catalog_path() -> Path:
    """$XENTOOLS_IMAGE_CATALOG, else vm-images/catalog.toml of this source tree."""
    env = os.environ.get(ENV_CATALOG)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "vm-images" / "catalog.toml"


@dataclass(frozen=True)
class ArchSpec:
    """An architecture: its name for users, its directory, and its tag in file names."""

    name: str
    dir: str
    tag: str


@dataclass(frozen=True)
class Profile:
    """How to boot-test an image: guest kind and size, timeouts (s), verdict patterns."""

    name: str
    guest_type: str
    memory_mb: int
    vcpus: int
    first_output_timeout: float
    idle_timeout: float
    boot_timeout: float
    prompt_grace: float
    patterns: Mapping[str, tuple[str, ...]]
    extra: str | None = None


@dataclass(frozen=True)
class ChecksumEntry:
    """One line of a checksum file: algorithm (hashlib name), file name, lowercase hex."""

    algorithm: str
    name: str
    digest: str


@dataclass(frozen=True)
class ImageRef:
    """A requested image: family, normalised release, architecture, file system or None."""

    family: Family
    release: str
    arch: ArchSpec
    fs: str | None

    @property
    def directory(self) -> str:
        """The release directory relative to the mirror root, ending in '/'."""
        path = self.family.directory.replace("{release}", self.release).replace("{arch_dir}", self.arch.dir)
        return path if path.endswith("/") else path + "/"

    def image_regex(self) -> re.Pattern[str]:
        pattern = self.family.image_name.replace("{release}", re.escape(self.release))
        pattern = pattern.replace("{arch_tag}", re.escape(self.arch.tag))
        return re.compile(pattern)

    def pick(self, entries: Mapping[str, ChecksumEntry]) -> tuple[ChecksumEntry, str]:
        """The checksum entry of the image and its file system.

        Without a file system, the unsuffixed image is preferred (older releases have only
        that one), then the one of `unsuffixed_fs`. Asked for the file system an unsuffixed
        image carries, the suffixed one is preferred and the unsuffixed one accepted.
        """
        regex = self.image_regex()
        found: dict[str | None, ChecksumEntry] = {}
        for name in sorted(entries):
            m = regex.match(name)
            if m:
                fs = m.groupdict().get("fs")
                found.setdefault(fs, entries[name])
        what = f"{self.family.name} {self.release} {self.arch.name}"
        if not found:
            raise CatalogError(
                "catalog.no_image",
                f"the checksum file of {what} lists no image matching {regex.pattern!r}",
            )
        unsuffixed = self.family.unsuffixed_fs
        if self.fs is None:
            order: list[str | None] = [None, unsuffixed]
        elif self.fs == unsuffixed:
            order = [self.fs, None]
        else:
            order = [self.fs]
        for key in order:
            if key in found:
                return found[key], key or unsuffixed
        if self.fs is None and len(found) == 1:
            (key, entry), = found.items()
            return entry, key or unsuffixed
        have = ", ".join(sorted(k or f"{unsuffixed} (unsuffixed)" for k in found))
        if self.fs is None:
            raise CatalogError("catalog.choose_fs", f"{what} has several images ({have}); choose one with --fs")
        raise CatalogError("catalog.no_fs", f"{what} has no {self.fs} image (available: {have})")


@dataclass(frozen=True)
class Family:
    """A family of release images (FreeBSD): where releases live and how images are named."""

    name: str
    majors: tuple[int, ...]
    release_re: str
    release_suffix: str
    directory: str
    checksum_files: tuple[str, ...]
    image_name: str
    unsuffixed_fs: str
    profile: str
    arches: Mapping[str, ArchSpec]
    profile_rules: tuple[tuple[str, str], ...] = ()

    def normalize_release(self, text: str) -> str:
        """'14.1' -> '14.1-RELEASE'; '14.1-release' -> '14.1-RELEASE'; unknown -> CatalogError."""
        m = re.match(self.release_re, text.strip(), re.IGNORECASE)
        majors = "/".join(f"{m_}.x" for m_ in self.majors)
        if not m:
            raise CatalogError("catalog.unknown_release",
                               f"{text!r} is not a {self.name} release (expected e.g. 14.1 or 14.1-RELEASE; known: {majors})")
        version = m.group("version")
        major = int(version.split(".")[0])
        if major not in self.majors:
            raise CatalogError("catalog.unknown_release",
                               f"{self.name} {version} is not in the catalog (known: {majors})")
        suffix = (m.groupdict().get("suffix") or self.release_suffix).upper()
        return f"{version}-{suffix}"

    def ref(self, release: str, arch: str = "amd64", fs: str | None = None) -> ImageRef:
        """The image request for a release name as a user typed it."""
        if arch not in self.arches:
            raise CatalogError("catalog.unknown_arch",
                               f"{self.name} has no architecture {arch!r} (known: {', '.join(sorted(self.arches))})")
        return ImageRef(self, self.normalize_release(release), self.arches[arch], fs)

    def profile_name(self, release: str) -> str:
        for regex, profile in self.profile_rules:
            if re.search(regex, release):
                return profile
        return self.profile

    def match_raw_name(self, filename: str) -> tuple[str, ArchSpec, str] | None:
        """(release, arch, fs) of a decompressed image name this family produces, else None."""
        for arch in self.arches.values():
            # The release is what the image name says, so match with a release wildcard.
            pattern = self.image_name.replace("{arch_tag}", re.escape(arch.tag))
            pattern = pattern.replace("{release}", r"(?P<release>\d+\.\d+-[A-Z0-9]+)")
            # fetch names the decompressed image after the compressed one minus ".xz".
            m = re.match(pattern, filename + ".xz")
            if m:
                return m.group("release"), arch, m.groupdict().get("fs") or self.unsuffixed_fs
        return None


@dataclass(frozen=True)
class Catalog:
    """The whole catalog: default mirror, families, profiles."""

    path: Path
    default_mirror: str
    families: tuple[Family, ...]
    profiles: Mapping[str, Profile] = field(default_factory=dict)

    def family(self, name: str = "freebsd") -> Family:
        for fam in self.families:
            if fam.name == name:
                return fam
        raise CatalogError("catalog.unknown_family", f"no image family {name!r} in {self.path}")

    def profile(self, name: str) -> Profile:
        try:
            return self.profiles[name]
        except KeyError:
            raise CatalogError("catalog.unknown_profile",
                               f"no profile {name!r} in {self.path} (known: {', '.join(sorted(self.profiles))})") from None

    def profile_for_file(self, filename: str) -> Profile | None:
        """The profile of an image file named as `fetch` names them, else None."""
        for fam in self.families:
            got = fam.match_raw_name(filename)
            if got:
                return self.profile(fam.profile_name(got[0]))
        return None


def parse_checksum_file(text: str, *, source: str = "checksum file") -> dict[str, ChecksumEntry]:
    """Entries of a checksum file by file name.

    BSD format ("SHA512 (name) = hex", what FreeBSD publishes) and GNU format ("hex  name")
    are read; blank lines and '#' comments are skipped. A line in neither format, a digest of
    the wrong length for its algorithm, or a file name with a '/' raises ChecksumError.
    """
    entries: dict[str, ChecksumEntry] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _BSD_LINE.match(line)
        if m:
            algorithm = m.group("alg").lower().replace("-", "")
        else:
            m = _GNU_LINE.match(line)
            if not m:
                raise ChecksumError("checksum.syntax", f"{source} line {lineno} is not 'ALG (name) = hex': {line[:80]!r}")
            algorithm = {v: k for k, v in DIGEST_HEX.items()}.get(len(m.group("hex")), "")
        name, digest = m.group("name"), m.group("hex").lower()
        if DIGEST_HEX.get(algorithm) != len(digest):
            raise ChecksumError("checksum.digest",
                                f"{source} line {lineno}: {len(digest)} hex digits is not a {algorithm or 'known'} digest")
        # The name becomes a local file name: a path from the mirror must not escape --dest.
        if PurePosixPath(name).name != name or name in (".", ".."):
            raise ChecksumError("checksum.name", f"{source} line {lineno}: {name!r} is not a plain file name")
        entries[name] = ChecksumEntry(algorithm, name, digest)
    if not entries:
        raise ChecksumError("checksum.empty", f"{source} lists no checksums")
    return entries


# ---------------------------------------------------------------- loading and validation

def _need(table: Mapping[str, object], key: str, kind: type | tuple[type, ...], where: str) -> object:
    if key not in table:
        raise CatalogError("catalog.field", f"{where}: missing {key!r}")
    value = table[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise CatalogError("catalog.field", f"{where}.{key}: {value!r} has the wrong type")
    return value


def _regex(text: str, where: str) -> str:
    try:
        re.compile(text.replace("{release}", "x").replace("{arch_tag}", "x").replace("{arch_dir}", "x"))
    except re.error as err:
        raise CatalogError("catalog.regex", f"{where}: {text!r}: {err}") from None
    return text


def _family(raw: object, i: int) -> Family:
    where = f"family[{i}]"
    if not isinstance(raw, dict):
        raise CatalogError("catalog.field", f"{where}: not a table")
    majors = _need(raw, "majors", list, where)
    if not majors or not all(isinstance(m, int) and not isinstance(m, bool) for m in majors):
        raise CatalogError("catalog.field", f"{where}.majors: expected a non-empty list of integers")
    checksum_files = _need(raw, "checksum_files", list, where)
    if not checksum_files or not all(isinstance(c, str) and c and "/" not in c for c in checksum_files):
        raise CatalogError("catalog.field", f"{where}.checksum_files: expected plain file names")
    arches_raw = _need(raw, "arch", dict, where)
    arches = {}
    for name, spec in arches_raw.items():  # type: ignore[union-attr]
        aw = f"{where}.arch.{name}"
        if not isinstance(spec, dict):
            raise CatalogError("catalog.field", f"{aw}: not a table")
        arches[name] = ArchSpec(name, str(_need(spec, "dir", str, aw)), str(_need(spec, "tag", str, aw)))
    if not arches:
        raise CatalogError("catalog.field", f"{where}.arch: no architecture")
    rules = []
    for j, rule in enumerate(raw.get("profile_rule", [])):
        rw = f"{where}.profile_rule[{j}]"
        if not isinstance(rule, dict):
            raise CatalogError("catalog.field", f"{rw}: not a table")
        rules.append((_regex(str(_need(rule, "release", str, rw)), rw), str(_need(rule, "profile", str, rw))))
    release_re = _regex(str(_need(raw, "release", str, where)), f"{where}.release")
    if "version" not in re.compile(release_re).groupindex:
        raise CatalogError("catalog.field", f"{where}.release: the regex needs a group named 'version'")
    return Family(
        name=str(_need(raw, "name", str, where)),
        majors=tuple(majors),  # type: ignore[arg-type]
        release_re=release_re,
        release_suffix=str(_need(raw, "release_suffix", str, where)),
        directory=str(_need(raw, "directory", str, where)),
        checksum_files=tuple(checksum_files),  # type: ignore[arg-type]
        image_name=_regex(str(_need(raw, "image_name", str, where)), f"{where}.image_name"),
        unsuffixed_fs=str(_need(raw, "unsuffixed_fs", str, where)),
        profile=str(_need(raw, "profile", str, where)),
        arches=MappingProxyType(arches),
        profile_rules=tuple(rules),
    )


def _resolve_profiles(raw: Mapping[str, object]) -> dict[str, Profile]:
    merged: dict[str, dict[str, object]] = {}

    def resolve(name: str, chain: tuple[str, ...]) -> dict[str, object]:
        if name in merged:
            return merged[name]
        if name in chain:
            raise CatalogError("catalog.inherit", f"profile {name!r} inherits itself ({' -> '.join(chain + (name,))})")
        table = raw.get(name)
        if not isinstance(table, dict):
            raise CatalogError("catalog.inherit", f"profile {chain[-1] if chain else name!r} inherits unknown profile {name!r}")
        parent_name = table.get("inherit")
        base: dict[str, object] = {}
        if parent_name is not None:
            base = dict(resolve(str(parent_name), chain + (name,)))
            base["patterns"] = dict(base.get("patterns", {}))  # type: ignore[arg-type]
        for key, value in table.items():
            if key == "patterns":
                if not isinstance(value, dict):
                    raise CatalogError("catalog.field", f"profile.{name}.patterns: not a table")
                base.setdefault("patterns", {})
                base["patterns"].update(value)  # type: ignore[union-attr]
            elif key != "inherit":
                base[key] = value
        merged[name] = base
        return base

    profiles = {}
    for name in raw:
        table = resolve(name, ())
        where = f"profile.{name}"
        patterns = table.get("patterns", {})
        checked: dict[str, tuple[str, ...]] = {}
        for verdict, regexes in patterns.items():  # type: ignore[union-attr]
            if verdict not in VERDICT_KEYS:
                raise CatalogError("catalog.field", f"{where}.patterns.{verdict}: unknown verdict (known: {', '.join(VERDICT_KEYS)})")
            if not isinstance(regexes, list) or not all(isinstance(r, str) for r in regexes):
                raise CatalogError("catalog.field", f"{where}.patterns.{verdict}: expected a list of regexes")
            checked[verdict] = tuple(_regex(r, f"{where}.patterns.{verdict}") for r in regexes)
        if not checked.get("pass"):
            raise CatalogError("catalog.field", f"{where}.patterns.pass: a profile needs at least one pass pattern")
        guest_type = str(_need(table, "guest_type", str, where))
        if guest_type not in GUEST_TYPES:
            raise CatalogError("catalog.field", f"{where}.guest_type: {guest_type!r} (known: {', '.join(GUEST_TYPES)})")
        numbers = {}
        for key in ("first_output_timeout", "idle_timeout", "boot_timeout", "prompt_grace"):
            value = float(_need(table, key, (int, float), where))  # type: ignore[arg-type]
            if value < 0:
                raise CatalogError("catalog.field", f"{where}.{key}: must not be negative")
            numbers[key] = value
        memory = int(_need(table, "memory_mb", int, where))  # type: ignore[call-overload]
        vcpus = int(_need(table, "vcpus", int, where))  # type: ignore[call-overload]
        if memory < 16 or vcpus < 1:
            raise CatalogError("catalog.field", f"{where}: memory_mb >= 16 and vcpus >= 1 needed")
        extra = table.get("extra")
        profiles[name] = Profile(
            name=name, guest_type=guest_type, memory_mb=memory, vcpus=vcpus,
            patterns=MappingProxyType(checked), extra=str(extra) if extra is not None else None,
            **numbers,
        )
    return profiles


def load_catalog(path: str | os.PathLike[str] | None = None) -> Catalog:
    """Read and validate a catalog; CatalogError names the file and the bad field."""
    p = Path(path) if path is not None else default_catalog_path()
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CatalogError("catalog.missing", f"no catalog at {p} (give --catalog or set ${ENV_CATALOG})") from None
    except OSError as err:
        raise CatalogError("catalog.unreadable", f"{p}: {err.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise CatalogError("catalog.syntax", f"{p}: {err}") from None
    if raw.get("schema") != SCHEMA:
        raise CatalogError("catalog.schema", f"{p}: schema {raw.get('schema')!r}, this xentools reads schema {SCHEMA}")
    mirror = raw.get("mirror", {})
    default_mirror = _need(mirror, "default", str, "mirror") if isinstance(mirror, dict) else None
    families_raw = raw.get("family")
    if not isinstance(families_raw, list) or not families_raw:
        raise CatalogError("catalog.field", f"{p}: no [[family]]")
    families = tuple(_family(f, i) for i, f in enumerate(families_raw))
    profiles_raw = raw.get("profile", {})
    if not isinstance(profiles_raw, dict):
        raise CatalogError("catalog.field", f"{p}: [profile] is not a table")
    profiles = _resolve_profiles(profiles_raw)
    for fam in families:
        for name in (fam.profile, *(prof for _, prof in fam.profile_rules)):
            if name not in profiles:
                raise CatalogError("catalog.field", f"family {fam.name}: unknown profile {name!r}")
    return Catalog(path=p, default_mirror=str(default_mirror), families=families, profiles=MappingProxyType(profiles))
