"""The image catalog: release names, checksum files, picking an image by pattern, profiles."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xentools.tools.images.catalog import load_catalog, parse_checksum_file
from xentools.tools.images.errors import CatalogError, ChecksumError

REPO_CATALOG = Path(__file__).resolve().parents[1] / "vm-images" / "catalog.toml"


def sha512(text: str) -> str:
    return hashlib.sha512(text.encode()).hexdigest()


def listing(names: list[str]) -> str:
    return "".join(f"SHA512 ({n}) = {sha512(n)}\n" for n in names)


# What the Latest/ directories of the three release series list (names only; the set of
# formats is what the FreeBSD site publishes: raw, qcow2, vhd, vmdk, and cloud variants).
LIST_13 = [f"FreeBSD-13.4-RELEASE-amd64.{fmt}.xz" for fmt in ("qcow2", "raw", "vhd", "vmdk")]
LIST_14 = [
    f"FreeBSD-14.1-RELEASE-amd64{fs}.{fmt}.xz"
    for fs in ("", "-ufs", "-zfs") for fmt in ("qcow2", "raw", "vhd", "vmdk")
] + ["FreeBSD-14.1-RELEASE-amd64-BASIC-CI.raw.xz", "FreeBSD-14.1-RELEASE-amd64-BASIC-CLOUDINIT-ufs.raw.xz"]
LIST_15 = [
    f"FreeBSD-15.0-RELEASE-amd64{fs}.{fmt}.xz" for fs in ("-ufs", "-zfs") for fmt in ("qcow2", "raw", "vhd", "vmdk")
] + ["FreeBSD-15.0-RELEASE-amd64-BASIC-CLOUDINIT-zfs.raw.xz"]
LIST_15_ARM = [f"FreeBSD-15.0-RELEASE-arm64-aarch64{fs}.raw.xz" for fs in ("-ufs", "-zfs")]


@pytest.fixture(scope="module")
def catalog():
    return load_catalog(REPO_CATALOG)


def test_repo_catalog_loads_with_the_three_series(catalog):
    fam = catalog.family("freebsd")
    assert fam.majors == (13, 14, 15)
    assert catalog.default_mirror == "https://download.freebsd.org/"
    assert set(fam.arches) == {"amd64", "arm64"}
    assert fam.arches["arm64"].dir == "aarch64"


@pytest.mark.parametrize("text, want", [
    ("14.1", "14.1-RELEASE"),
    ("14.1-RELEASE", "14.1-RELEASE"),
    ("14.1-release", "14.1-RELEASE"),
    (" 13.2 ", "13.2-RELEASE"),
    ("15.0-RC1", "15.0-RC1"),
])
def test_release_names_are_normalised(catalog, text, want):
    assert catalog.family().normalize_release(text) == want


@pytest.mark.parametrize("text", ["12.4", "16.0", "14", "abc", "", "14.1-STABLE", "14.1-RELEASE-p3", "14.1/../x"])
def test_unknown_release_is_refused_with_one_rule(catalog, text):
    with pytest.raises(CatalogError) as err:
        catalog.family().normalize_release(text)
    assert err.value.rule == "catalog.unknown_release"
    assert "\n" not in str(err.value)


def test_release_directory_follows_the_site_layout(catalog):
    fam = catalog.family()
    assert fam.ref("14.1").directory == "releases/VM-IMAGES/14.1-RELEASE/amd64/Latest/"
    assert fam.ref("15.0", "arm64").directory == "releases/VM-IMAGES/15.0-RELEASE/aarch64/Latest/"
    with pytest.raises(CatalogError) as err:
        fam.ref("14.1", "sparc64")
    assert err.value.rule == "catalog.unknown_arch"


@pytest.mark.parametrize("release, names, fs, want_name, want_fs", [
    ("14.1", LIST_14, None, "FreeBSD-14.1-RELEASE-amd64.raw.xz", "ufs"),
    ("14.1", LIST_14, "ufs", "FreeBSD-14.1-RELEASE-amd64-ufs.raw.xz", "ufs"),
    ("14.1", LIST_14, "zfs", "FreeBSD-14.1-RELEASE-amd64-zfs.raw.xz", "zfs"),
    ("13.4", LIST_13, None, "FreeBSD-13.4-RELEASE-amd64.raw.xz", "ufs"),
    ("13.4", LIST_13, "ufs", "FreeBSD-13.4-RELEASE-amd64.raw.xz", "ufs"),
    ("15.0", LIST_15, None, "FreeBSD-15.0-RELEASE-amd64-ufs.raw.xz", "ufs"),
    ("15.0", LIST_15, "zfs", "FreeBSD-15.0-RELEASE-amd64-zfs.raw.xz", "zfs"),
])
def test_image_is_picked_by_pattern_from_the_checksum_file(catalog, release, names, fs, want_name, want_fs):
    entries = parse_checksum_file(listing(names))
    entry, got_fs = catalog.family().ref(release, "amd64", fs).pick(entries)
    assert entry.name == want_name
    assert entry.digest == sha512(want_name)
    assert got_fs == want_fs


def test_arm64_images_are_found_under_their_tag(catalog):
    entries = parse_checksum_file(listing(LIST_15_ARM))
    entry, fs = catalog.family().ref("15.0", "arm64", "zfs").pick(entries)
    assert entry.name == "FreeBSD-15.0-RELEASE-arm64-aarch64-zfs.raw.xz" and fs == "zfs"


def test_a_file_system_the_release_lacks_is_named(catalog):
    entries = parse_checksum_file(listing(LIST_13))
    with pytest.raises(CatalogError) as err:
        catalog.family().ref("13.4", "amd64", "zfs").pick(entries)
    assert err.value.rule == "catalog.no_fs"
    assert "ufs" in str(err.value)


def test_cloud_variants_and_other_releases_never_match(catalog):
    names = ["FreeBSD-14.1-RELEASE-amd64-BASIC-CI.raw.xz", "FreeBSD-14.2-RELEASE-amd64.raw.xz",
             "FreeBSD-14.1-RELEASE-amd64.qcow2.xz", "FreeBSD-14.1-RELEASE-i386.raw.xz"]
    with pytest.raises(CatalogError) as err:
        catalog.family().ref("14.1").pick(parse_checksum_file(listing(names)))
    assert err.value.rule == "catalog.no_image"


def test_only_zfs_is_taken_when_no_fs_is_asked(catalog):
    names = ["FreeBSD-15.0-RELEASE-amd64-zfs.raw.xz"]
    entry, fs = catalog.family().ref("15.0").pick(parse_checksum_file(listing(names)))
    assert fs == "zfs" and entry.name == names[0]


def test_profiles_inherit_and_releases_choose_them(catalog):
    fam = catalog.family()
    assert fam.profile_name("13.4-RELEASE") == "freebsd-13"
    assert fam.profile_name("14.1-RELEASE") == "freebsd"
    p13, base = catalog.profile("freebsd-13"), catalog.profile("default")
    assert p13.memory_mb == 1024 and catalog.profile("freebsd").memory_mb == 2048
    assert p13.patterns == base.patterns and p13.guest_type == "hvm"
    assert catalog.profile("linux-pv").guest_type == "pv"
    assert catalog.profile_for_file("FreeBSD-13.4-RELEASE-amd64.raw").name == "freebsd-13"
    assert catalog.profile_for_file("FreeBSD-14.1-RELEASE-amd64-zfs.raw").name == "freebsd"
    assert catalog.profile_for_file("disk.img") is None
    with pytest.raises(CatalogError) as err:
        catalog.profile("nope")
    assert err.value.rule == "catalog.unknown_profile"


# ------------------------------------------------------------------ checksum file parsing

def test_bsd_and_gnu_formats_are_read():
    d256 = hashlib.sha256(b"a").hexdigest()
    d512 = hashlib.sha512(b"b").hexdigest()
    text = f"# comment\n\nSHA256 (a.raw.xz) = {d256}\n{d512}  b.raw.xz\n{d256.upper()} *c.raw.xz\n"
    entries = parse_checksum_file(text)
    assert entries["a.raw.xz"].algorithm == "sha256" and entries["a.raw.xz"].digest == d256
    assert entries["b.raw.xz"].algorithm == "sha512" and entries["b.raw.xz"].digest == d512
    assert entries["c.raw.xz"].digest == d256


@pytest.mark.parametrize("text, rule", [
    ("this is not a checksum\n", "checksum.syntax"),
    ("SHA512 (x.raw.xz) = abcd\n", "checksum.digest"),
    (f"SHA256 (x.raw.xz) = {'a' * 128}\n", "checksum.digest"),
    (f"SHA512 (../etc/passwd) = {'a' * 128}\n", "checksum.name"),
    (f"SHA512 (dir/x.raw.xz) = {'a' * 128}\n", "checksum.name"),
    ("\n# only a comment\n", "checksum.empty"),
])
def test_bad_checksum_files_are_refused(text, rule):
    with pytest.raises(ChecksumError) as err:
        parse_checksum_file(text, source="CHECKSUM.SHA512")
    assert err.value.rule == rule
    assert "\n" not in str(err.value)


names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,40}", fullmatch=True).filter(lambda n: n not in (".", ".."))


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(names, st.binary(max_size=16), min_size=1, max_size=8), st.sampled_from(["sha256", "sha512"]))
def test_checksum_file_round_trip(files, alg):
    text = "".join(f"{alg.upper()} ({n}) = {hashlib.new(alg, d).hexdigest()}\n" for n, d in files.items())
    entries = parse_checksum_file(text)
    assert {n: (e.algorithm, e.digest) for n, e in entries.items()} == {
        n: (alg, hashlib.new(alg, d).hexdigest()) for n, d in files.items()}


# ---------------------------------------------------------------------- catalog validation

GOOD = REPO_CATALOG.read_text()


@pytest.mark.parametrize("edit, rule", [
    (lambda t: t + "\n[[[", "catalog.syntax"),
    (lambda t: t.replace("schema = 1", "schema = 2"), "catalog.schema"),
    (lambda t: t.replace('majors = [13, 14, 15]', 'majors = "13"'), "catalog.field"),
    (lambda t: t.replace('unsuffixed_fs = "ufs"\n', ""), "catalog.field"),
    (lambda t: t.replace("(?:-(?P<fs>ufs|zfs))?", "(?:-(?P<fs>ufs|zfs)"), "catalog.regex"),
    (lambda t: t.replace("mountroot = ['^mountroot", "rootmount = ['^mountroot"), "catalog.field"),
    (lambda t: t.replace('inherit = "default"\nguest_type = "hvm"', 'inherit = "freebsd-13"\nguest_type = "hvm"'),
     "catalog.inherit"),
    (lambda t: t.replace('profile = "freebsd"\n', 'profile = "missing"\n', 1), "catalog.field"),
    (lambda t: t.replace('guest_type = "pv"', 'guest_type = "kvm"'), "catalog.field"),
])
def test_malformed_catalogs_name_the_rule(tmp_path, edit, rule):
    bad = edit(GOOD)
    assert bad != GOOD
    path = tmp_path / "catalog.toml"
    path.write_text(bad)
    with pytest.raises(CatalogError) as err:
        load_catalog(path)
    assert err.value.rule == rule
    assert "\n" not in str(err.value)


def test_missing_catalog_says_how_to_give_one(tmp_path, monkeypatch):
    with pytest.raises(CatalogError) as err:
        load_catalog(tmp_path / "none.toml")
    assert err.value.rule == "catalog.missing" and "--catalog" in str(err.value)
    monkeypatch.setenv("XENTOOLS_IMAGE_CATALOG", str(REPO_CATALOG))
    assert load_catalog().path == REPO_CATALOG
