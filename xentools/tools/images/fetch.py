"""Fetch a release image from a mirror: resumable download, digest check, xz decompression.

Owns: the mirror (http(s)://, file:// or a local directory laid out like the FreeBSD
download site), the download of one file into `<name>.part` with HTTP Range resume, the
digest check against the release's checksum file, the streaming xz decompression into
`<name minus .xz>` (temporary file + rename, zero blocks left as holes), and the cache:
a verified image is not downloaded or decompressed again.
Must not: print (progress and notices go through the callables it is given), use anything
but urllib for the network, or ever take a `.part` file for a complete one: a file is
renamed from `.part` only after its digest matched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import http.client
import json
import lzma
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import tenacity

from xentools.core.errors import XentoolsError
from xentools.tools.images.catalog import ChecksumEntry, ImageRef, parse_checksum_file
from xentools.tools.images.errors import (
    CatalogError,
    ChecksumError,
    GuestImageError,
    ImageFormatError,
    MirrorError,
    StorageError,
)

__all__ = ["FetchResult", "Mirror", "decompress_xz", "fetch_image", "file_digest", "read_fetch_record"]

CHUNK = 1 << 20
SPARSE_BLOCK = 64 * 1024
HTTP_TIMEOUT = 30.0
CHECKSUM_FILE_LIMIT = 4 << 20
USER_AGENT = "xentools-image-fetch"
PART_SUFFIX = ".part"
SIDECAR_SUFFIX = ".fetch.json"

_CONTENT_RANGE = re.compile(r"^bytes (?:(?P<first>\d+)-(?P<last>\d+)|\*)/(?P<total>\d+|\*)$")
_ZERO_BLOCK = bytes(SPARSE_BLOCK)


class ProgressBar(Protocol):
    def update(self, n: int) -> None: ...


Progress = Callable[[str, "int | None"], contextlib.AbstractContextManager[ProgressBar]]


class _NoBar:
    def update(self, n: int) -> None:
        pass


@contextlib.contextmanager
def _no_progress(label: str, total: int | None) -> Iterator[ProgressBar]:
    yield _NoBar()


def _storage_error(err: OSError, path: Path | str, what: str) -> StorageError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError("storage.full", f"disk full while {what} {path}; free some space or choose another --dest")
    return StorageError("storage.write", f"cannot write {path} while {what}: {err.strerror or err}")


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


# ------------------------------------------------------------------------------- mirror

class _Body:
    """A response body: `start` is the file offset of its first byte, `total` the file size."""

    def __init__(self, stream: object | None, start: int, total: int | None) -> None:
        self._stream = stream
        self.start = start
        self.total = total

    def read(self, n: int) -> bytes:
        if self._stream is None:
            return b""
        return self._stream.read(n)  # type: ignore[attr-defined,no-any-return]

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()  # type: ignore[attr-defined]
            self._stream = None


@dataclass(frozen=True)
class Mirror:
    """The root of a tree laid out like the FreeBSD download site."""

    root: str  # an http(s) URL ending in '/', or a local directory
    local: bool

    @classmethod
    def parse(cls, text: str) -> Mirror:
        """http(s)://..., file:///dir or a plain directory; anything else is MirrorError."""
        m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", text)
        if m:
            scheme = m.group(1).lower()
            if scheme in ("http", "https"):
                parsed = urllib.parse.urlsplit(text)
                if not parsed.netloc:
                    raise MirrorError("mirror.url", f"{text!r} names no host")
                return cls(text if text.endswith("/") else text + "/", local=False)
            if scheme == "file":
                parsed = urllib.parse.urlsplit(text)
                if parsed.netloc not in ("", "localhost"):
                    raise MirrorError("mirror.url", f"{text!r}: a file:// mirror must be on this machine")
                return cls._local(urllib.request.url2pathname(parsed.path), text)
            raise MirrorError("mirror.url", f"{text!r}: mirrors are http://, https://, file:// or a directory")
        return cls._local(text, text)

    @classmethod
    def _local(cls, path: str, shown: str) -> Mirror:
        if not os.path.isdir(path):
            raise MirrorError("mirror.not_found", f"mirror {shown!r} is not a directory")
        return cls(os.path.abspath(path), local=True)

    def url(self, rel: str) -> str:
        if self.local:
            return os.path.join(self.root, *rel.split("/"))
        return self.root + urllib.parse.quote(rel, safe="/")

    def read_text(self, rel: str) -> str:
        """A small text file (a checksum file); MirrorError rule mirror.not_found when absent."""
        body = self.open_from(rel, 0)
        try:
            data = self._read_body(body, CHECKSUM_FILE_LIMIT + 1, rel)
        finally:
            body.close()
        if len(data) > CHECKSUM_FILE_LIMIT:
            raise MirrorError("mirror.too_large", f"{self.url(rel)} is larger than {CHECKSUM_FILE_LIMIT} bytes")
        return data.decode("utf-8", errors="replace")

    def _read_body(self, body: _Body, limit: int, rel: str) -> bytes:
        try:
            return body.read(limit)
        except (OSError, http.client.HTTPException) as err:
            raise MirrorError("mirror.unreachable", f"reading {self.url(rel)} failed: {err}") from None

    def open_from(self, rel: str, offset: int) -> _Body:
        """The file from byte `offset` on (from 0 when the mirror cannot start there)."""
        if self.local:
            return self._open_local(rel, offset)
        return self._open_http(rel, offset)

    def _open_local(self, rel: str, offset: int) -> _Body:
        path = self.url(rel)
        try:
            f = open(path, "rb")  # noqa: SIM115 - owned by the returned _Body
        except FileNotFoundError:
            raise MirrorError("mirror.not_found", f"{path} does not exist") from None
        except OSError as err:
            raise MirrorError("mirror.unreachable", f"cannot read {path}: {err.strerror}") from None
        size = os.fstat(f.fileno()).st_size
        if offset > size:  # a partial file longer than the original is not a prefix of it
            offset = 0
        f.seek(offset)
        return _Body(f, offset, size)

    def _open_http(self, rel: str, offset: int) -> _Body:
        url = self.url(rel)
        headers = {"User-Agent": USER_AGENT}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=HTTP_TIMEOUT)
        except urllib.error.HTTPError as err:
            content_range = err.headers.get("Content-Range", "") if err.headers else ""
            err.close()
            if err.code == 416 and offset:
                m = _CONTENT_RANGE.match(content_range.strip())
                if m and m.group("total") == str(offset):
                    return _Body(None, offset, offset)  # the partial file is already whole
                return self._open_http(rel, 0)
            if err.code == 404:
                raise MirrorError("mirror.not_found", f"{url}: HTTP 404 Not Found") from None
            raise MirrorError("mirror.http", f"{url}: HTTP {err.code} {err.reason}") from None
        except urllib.error.URLError as err:
            raise MirrorError("mirror.unreachable", f"cannot reach {url}: {err.reason}") from None
        except (OSError, http.client.HTTPException) as err:
            raise MirrorError("mirror.unreachable", f"cannot reach {url}: {err}") from None
        if resp.status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", "").strip())
            if not m or m.group("first") is None or int(m.group("first")) != offset:
                resp.close()  # a range we did not ask for: start over rather than guess
                return self._open_http(rel, 0)
            total = None if m.group("total") == "*" else int(m.group("total"))
            return _Body(resp, offset, total)
        length = resp.headers.get("Content-Length")
        return _Body(resp, 0, int(length) if length and length.isdigit() else None)


# ----------------------------------------------------------------------------- download

class _Interrupted(XentoolsError):
    """A download stopped early (the connection dropped or closed): resumed, or MirrorError
    "mirror.interrupted" once the retries are spent."""

    def __init__(self, why: str, have: int, total: int | None) -> None:
        super().__init__(why)
        self.why, self.have, self.total = why, have, total


def _download_once(mirror: Mirror, rel: str, part: Path, progress: Progress, notice: Callable[[str], None]) -> None:
    try:
        fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise _storage_error(err, part, "creating") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StorageError("storage.busy", f"another fetch is downloading {part}") from None
        have = os.fstat(fd).st_size
        try:
            body = mirror.open_from(rel, have)
        except MirrorError as err:
            if err.rule == "mirror.unreachable":
                raise _Interrupted(err.detail, have, None) from None
            raise
        try:
            if body.start != have:
                if have:
                    notice(f"the mirror did not resume at byte {have}; downloading {part.name[:-len(PART_SUFFIX)]} from the start")
                os.ftruncate(fd, 0)
            os.lseek(fd, body.start, os.SEEK_SET)
            pos = body.start
            label = f"downloading {part.name[:-len(PART_SUFFIX)]}" + (f" (resuming at {pos} bytes)" if pos else "")
            with progress(label, body.total) as bar:
                bar.update(pos)
                while True:
                    try:
                        data = body.read(CHUNK)
                    except (OSError, http.client.HTTPException) as err:
                        raise _Interrupted(str(err) or type(err).__name__, pos, body.total) from None
                    if not data:
                        break
                    try:
                        _write_all(fd, data)
                    except OSError as err:
                        raise _storage_error(err, part, "downloading to") from None
                    pos += len(data)
                    bar.update(len(data))
            if body.total is not None and pos < body.total:
                raise _Interrupted("the connection closed early", pos, body.total)
        finally:
            body.close()
    finally:
        os.close(fd)


def _download(mirror: Mirror, rel: str, part: Path, *, retries: int, backoff: float,
              progress: Progress, notice: Callable[[str], None]) -> None:
    """Download into `part`, resuming an interrupted download up to `retries` times, the
    n-th time after n * `backoff` seconds."""

    def stopped(state: tenacity.RetryCallState) -> str:
        intr = state.outcome.exception() if state.outcome else None
        assert isinstance(intr, _Interrupted)
        of = f" of {intr.total}" if intr.total is not None else ""
        return f"stopped at {intr.have}{of} bytes ({intr.why})"

    def resuming(state: tenacity.RetryCallState) -> None:
        notice(f"download {stopped(state)}; resuming, attempt {state.attempt_number} of {retries}")

    def give_up(state: tenacity.RetryCallState) -> None:
        raise MirrorError(
            "mirror.interrupted",
            f"download of {mirror.url(rel)} {stopped(state)}; kept {part} for resume: run the same command again",
        )

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(retries + 1),
        wait=tenacity.wait_incrementing(start=backoff, increment=backoff),
        retry=tenacity.retry_if_exception_type(_Interrupted),
        before_sleep=resuming,
        retry_error_callback=give_up,
    )
    retrying(_download_once, mirror, rel, part, progress, notice)


def file_digest(path: Path, algorithm: str, progress: Progress = _no_progress) -> str:
    """Hex digest of a file, read in chunks."""
    h = hashlib.new(algorithm)
    size = path.stat().st_size
    with open(path, "rb") as f, progress(f"verifying {path.name}", size) as bar:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


# --------------------------------------------------------------------------- decompress

class _SparseWriter:
    """Writes a stream to a file, seeking over all-zero blocks so the file keeps holes
    (a release image is mostly empty file system)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = 0
        self._rest = b""

    def write(self, data: bytes) -> None:
        if self._rest:
            data = self._rest + data
        whole = len(data) - len(data) % SPARSE_BLOCK
        view = memoryview(data)
        for off in range(0, whole, SPARSE_BLOCK):
            self._block(view[off:off + SPARSE_BLOCK])
        self._rest = bytes(view[whole:])

    def _block(self, block: memoryview) -> None:
        if block == _ZERO_BLOCK[:len(block)]:
            os.lseek(self.fd, len(block), os.SEEK_CUR)
        else:
            _write_all(self.fd, block)
        self.size += len(block)

    def close(self) -> None:
        if self._rest:
            self._block(memoryview(self._rest))
            self._rest = b""
        # Trailing holes exist only once the size is set.
        os.ftruncate(self.fd, self.size)


def decompress_xz(src: Path, dst: Path, progress: Progress = _no_progress) -> int:
    """Decompress an .xz file (one or more streams) into `dst` through a temporary file and a
    rename; returns the size written. ImageFormatError for a corrupt or truncated stream,
    StorageError when the disk is full (the temporary file is removed)."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise _storage_error(err, tmp, "creating") from None
    ok = False
    try:
        writer = _SparseWriter(fd)
        dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)

        def feed(data: bytes) -> None:
            nonlocal dec
            while True:
                if dec.eof:
                    # After a stream: padding (zero bytes) or the next concatenated stream.
                    data = data.lstrip(b"\0")
                    if not data:
                        return
                    dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
                out = dec.decompress(data, max_length=CHUNK)
                data = b""
                if out:
                    writer.write(out)
                if dec.eof:
                    data = dec.unused_data
                    continue
                if dec.needs_input:
                    return

        try:
            with open(src, "rb") as f, progress(f"decompressing {src.name}", os.fstat(f.fileno()).st_size) as bar:
                while chunk := f.read(CHUNK):
                    feed(chunk)
                    bar.update(len(chunk))
            if not dec.eof:
                raise ImageFormatError("xz.truncated", f"{src} ends in the middle of an xz stream")
            writer.close()
            os.fsync(fd)
        except lzma.LZMAError as err:
            raise ImageFormatError("xz.corrupt", f"{src} is not a valid xz file: {err}") from None
        except GuestImageError:
            raise
        except OSError as err:
            raise _storage_error(err, dst, "decompressing to") from None
        ok = True
    finally:
        os.close(fd)
        if not ok:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    os.replace(tmp, dst)
    return writer.size


# -------------------------------------------------------------------------------- fetch

@dataclass(frozen=True)
class FetchResult:
    """What fetch produced; `downloaded`/`decompressed` are False when the cache served it."""

    raw_path: str
    compressed_path: str | None
    url: str
    algorithm: str
    digest: str
    family: str
    release: str
    arch: str
    fs: str
    profile: str
    raw_size: int
    downloaded: bool
    decompressed: bool

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _read_sidecar(path: Path) -> dict[str, object] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_sidecar(path: Path, result: FetchResult) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(result.to_json(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _storage_error(err, path, "writing") from None


def _checksums(ref: ImageRef, mirror: Mirror) -> tuple[str, dict[str, ChecksumEntry]]:
    for name in ref.family.checksum_files:
        rel = ref.directory + name
        try:
            text = mirror.read_text(rel)
        except MirrorError as err:
            if err.rule == "mirror.not_found":
                continue
            raise
        return rel, parse_checksum_file(text, source=mirror.url(rel))
    raise MirrorError(
        "mirror.no_release",
        f"{ref.family.name} {ref.release} {ref.arch.name} is not on this mirror "
        f"(no {' or '.join(ref.family.checksum_files)} in {mirror.url(ref.directory)})",
    )


def fetch_image(
    ref: ImageRef,
    mirror: Mirror,
    dest: Path,
    *,
    profile: str,
    retries: int = 3,
    backoff: float = 1.0,
    fresh: bool = False,
    keep_compressed: bool = True,
    progress: Progress = _no_progress,
    notice: Callable[[str], None] = lambda _msg: None,
) -> FetchResult:
    """Make `dest/<image>.raw` the verified, decompressed image of `ref`.

    The compressed file is downloaded to `<name>.part` (resumed with HTTP Range, up to
    `retries` times within this call, and by any later call), renamed only once its digest
    matches the checksum file, then decompressed. `fresh` decompresses again even when the
    raw image is cached (a guest may have written to it); it never downloads again a
    compressed file whose digest still matches.
    """
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _storage_error(err, dest, "creating") from None
    checksum_rel, entries = _checksums(ref, mirror)
    entry, fs = ref.pick(entries)
    if not entry.name.endswith(".xz"):
        raise CatalogError("catalog.not_xz", f"the catalog's image_name matched {entry.name!r}; fetch expects an .xz image")
    compressed = dest / entry.name
    raw = dest / entry.name[:-3]
    sidecar = dest / (raw.name + SIDECAR_SUFFIX)
    url = mirror.url(ref.directory + entry.name)

    def result(downloaded: bool, decompressed: bool, raw_size: int) -> FetchResult:
        return FetchResult(
            raw_path=str(raw), compressed_path=str(compressed) if compressed.exists() else None,
            url=url, algorithm=entry.algorithm, digest=entry.digest, family=ref.family.name,
            release=ref.release, arch=ref.arch.name, fs=fs, profile=profile, raw_size=raw_size,
            downloaded=downloaded, decompressed=decompressed,
        )

    old = _read_sidecar(sidecar)
    if (not fresh and old is not None and old.get("digest") == entry.digest and raw.is_file()
            and old.get("raw_size") == raw.stat().st_size):
        notice(f"{raw.name} is cached (its {entry.algorithm} matched {os.path.basename(checksum_rel)})")
        return result(False, False, raw.stat().st_size)

    downloaded = False
    if compressed.is_file():
        if file_digest(compressed, entry.algorithm, progress) != entry.digest:
            notice(f"{compressed.name} does not match the checksum file any more; downloading it again")
            compressed.unlink()
    if not compressed.is_file():
        part = dest / (entry.name + PART_SUFFIX)
        _download(mirror, ref.directory + entry.name, part, retries=retries, backoff=backoff,
                  progress=progress, notice=notice)
        got = file_digest(part, entry.algorithm, progress)
        if got != entry.digest:
            raise ChecksumError(
                "checksum.mismatch",
                f"{entry.name}: {entry.algorithm} {got[:16]}... differs from {entry.digest[:16]}... "
                f"in {mirror.url(checksum_rel)}; kept {part} unused (delete it to download again)",
            )
        os.replace(part, compressed)
        downloaded = True
    with contextlib.suppress(FileNotFoundError):
        sidecar.unlink()  # the raw image is about to change: the old record no longer holds
    size = decompress_xz(compressed, raw, progress)
    if not keep_compressed:
        compressed.unlink()
    res = result(downloaded, True, size)
    _write_sidecar(sidecar, res)
    return res


def read_fetch_record(raw_image: Path) -> dict[str, object] | None:
    """The record fetch wrote next to a raw image (profile, release, digest), if any."""
    return _read_sidecar(raw_image.with_name(raw_image.name + SIDECAR_SUFFIX))

