"""Downloads and archives, done safely: resumable fetches, checksums, atomic results.

:func:`fetch` downloads one URL to a file: it writes ``<dest>.part`` and resumes it with an
HTTP ``Range`` request after an interruption, retries transient failures a bounded number of
times with exponential backoff, draws a progress bar on stderr, verifies the checksum, and only
then renames the part file to ``dest`` (atomic on one file system). A failed or interrupted
fetch never leaves a file at ``dest``; a ``.part`` file is kept only to be resumed, and is
removed when its content is known to be wrong (checksum mismatch, a server that ignores Range).

:func:`extract_archive` unpacks a tar archive (any compression) into a new folder: every
member is checked first — no absolute path, no ``..``, no device or pipe, no link whose target
leaves the folder — and the archive is unpacked into a temporary sibling that is renamed into
place only when complete.

Checksums are written ``"<algorithm>:<hex digest>"`` with algorithm ``sha256``, ``sha512`` or
``md5``, as published by the data set's provider. A ``sha256`` digest may be given as a prefix
of at least 8 hex digits: torchvision publishes its weights that way (the file name's suffix).
``"tofu"`` (trust on first use) is for files whose provider publishes no checksum: the first
download's sha256 is recorded next to the file (``<dest>.sha256``), logged with a warning, and
later uses are checked against the record; paste the digest into the config to pin it.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import logging
import os
import sys
import tarfile
import zipfile
import zlib
import time
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path, PurePosixPath

from .fsutil import atomic_directory

__all__ = [
    "DownloadError",
    "ChecksumError",
    "UnsafeArchiveError",
    "DamagedArchiveError",
    "verify_archive",
    "check_content",
    "parse_checksum",
    "file_digest",
    "verify_file",
    "fetch",
    "check_tar_members",
    "extract_archive",
    "raw_filename",
    "is_archive",
    "raw_path",
    "input_path",
]

log = logging.getLogger(__name__)

ALGORITHMS = ("sha256", "sha512", "md5")
TOFU = "tofu"


class DownloadError(RuntimeError):
    """A download failed (after its retries, or at once for a permanent HTTP error)."""


class ChecksumError(DownloadError):
    """A file's digest differs from the one in the config."""


class UnsafeArchiveError(ValueError):
    """An archive member would land outside the target folder (or is a device or pipe)."""


class DamagedArchiveError(DownloadError):
    """A file does not read to its end as what it should be: a truncated or corrupt archive
    (no end-of-archive marker, a bad compression checksum), a broken zip, an HTML page."""


def parse_checksum(checksum: str) -> tuple[str, str]:
    """``"sha256:abc…"`` -> ``("sha256", "abc…")``; ``"tofu"`` -> ``("tofu", "")``."""
    if checksum == TOFU:
        return TOFU, ""
    algo, sep, digest = checksum.partition(":")
    digest = digest.lower()
    if not sep or algo not in ALGORITHMS or not digest or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"checksum must be 'tofu' or '<{'|'.join(ALGORITHMS)}>:<hex digest>', not {checksum!r}")
    full = hashlib.new(algo).digest_size * 2
    if len(digest) != full and not (algo == "sha256" and 8 <= len(digest) < full):
        raise ValueError(f"a {algo} digest has {full} hex digits (a sha256 prefix at least 8), got {len(digest)}")
    return algo, digest


def file_digest(path: str | os.PathLike, algo: str = "sha256", chunk: int = 1 << 22) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def verify_file(path: str | os.PathLike, checksum: str, *, record_to: str | os.PathLike | None = None) -> str:
    """Check ``path`` against ``checksum``; return its sha256. Raises :class:`ChecksumError`.

    For ``tofu`` the digest recorded at ``record_to`` (``<file>.sha256`` by default) is the
    reference when it exists; otherwise the file's digest is recorded there."""
    path = Path(path)
    algo, expected = parse_checksum(checksum)
    sha256 = file_digest(path, "sha256")
    if algo == TOFU:
        record = Path(record_to) if record_to else _sidecar(path)
        if record.exists():
            expected, algo = record.read_text().split()[0], "sha256"
        else:
            log.warning("%s: no published checksum; recorded sha256:%s in %s (pin it in the config)", path, sha256, record)
            tmp = record.with_name(record.name + ".tmp")
            tmp.write_text(f"{sha256}  {path.name}\n")
            os.replace(tmp, record)
            return sha256
    actual = sha256 if algo == "sha256" else file_digest(path, algo)
    if not actual.startswith(expected):
        raise ChecksumError(f"{path}: {algo} is {actual}, the config expects {expected}")
    return sha256


class _Progress:
    """A progress bar on stderr: redrawn in place on a terminal, a line per 10% otherwise."""

    def __init__(self, name: str, total: int | None, done: int, enabled: bool = True):
        self.name, self.total, self.done, self.enabled = name, total, done, enabled
        self.tty = sys.stderr.isatty()
        self.start, self.start_bytes, self.last_draw, self.last_decile = time.monotonic(), done, 0.0, -1

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty and now - self.last_draw < 0.2:
            return
        decile = int(10 * self.done / self.total) if self.total else -1
        if not self.tty and decile == self.last_decile:
            return
        self.last_draw, self.last_decile = now, decile
        self._draw(now, end="\r" if self.tty else "\n")

    def _draw(self, now: float, end: str) -> None:
        rate = (self.done - self.start_bytes) / max(now - self.start, 1e-9)
        mb = self.done / 1e6
        if self.total:
            frac = self.done / self.total
            bar = "#" * int(30 * frac)
            text = f"{self.name}: [{bar:<30}] {100 * frac:5.1f}% {mb:,.1f}/{self.total / 1e6:,.1f} MB {rate / 1e6:.1f} MB/s"
        else:
            text = f"{self.name}: {mb:,.1f} MB {rate / 1e6:.1f} MB/s"
        print(text, end=end, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            self._draw(time.monotonic(), end="\n")


def _is_transient(err: BaseException) -> bool:
    if isinstance(err, urllib.error.HTTPError):
        return err.code in (408, 425, 429) or err.code >= 500
    return isinstance(err, (urllib.error.URLError, HTTPException, ConnectionError, TimeoutError, _Truncated))


class _Truncated(DownloadError):
    """The connection ended before the announced number of bytes arrived."""


_HTML_SUFFIXES = (".html", ".htm")


def _looks_like_html(head: bytes) -> bool:
    start = head.lstrip()[:15].lower()
    return start.startswith((b"<!doctype html", b"<html"))


def _attempt(url: str, part: Path, *, timeout: float, chunk: int, progress: bool, name: str = "") -> None:
    """One request: append to ``part`` from its current size (Range), to the end of the file.
    An HTML page (by its Content-Type or its first bytes) where ``name`` is not one is refused
    at once: servers answer errors and logins with status 200 too."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "spbench", "Accept-Encoding": "identity"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to send: the part file is complete (or wrong)
            return
        raise
    with response:
        mode = "ab"
        if have and response.status != 206:  # the server ignores Range: start over
            log.warning("%s: the server does not resume (HTTP %d); starting over", url, response.status)
            have, mode = 0, "wb"
        elif have:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {have}-"):
                raise DownloadError(f"{url}: resume at byte {have} answered with Content-Range {content_range!r}")
            log.info("%s: resuming at byte %d", url, have)
        html_expected = name.lower().endswith(_HTML_SUFFIXES)
        if response.headers.get_content_type() == "text/html" and not html_expected:
            raise DamagedArchiveError(f"{url}: the server sent an HTML page (Content-Type text/html), not {name}: "
                                      "an error or login page?")
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None else None
        bar = _Progress(part.name.removesuffix(".part"), have + expected if expected is not None else None, have, progress)
        received = 0
        try:
            with open(part, mode) as out:
                while block := response.read(chunk):
                    if received == 0 and have == 0 and not html_expected and _looks_like_html(block[:64]):
                        raise DamagedArchiveError(f"{url}: the server sent an HTML page, not {name}: an error or "
                                                  "login page?")
                    out.write(block)
                    received += len(block)
                    bar.update(len(block))
        finally:
            bar.close()
        if expected is not None and received != expected:
            raise _Truncated(f"{url}: connection closed after {have + received} of {have + expected} bytes")


def fetch(
    url: str,
    dest: str | os.PathLike,
    *,
    checksum: str,
    retries: int = 5,
    backoff: float = 2.0,
    timeout: float = 60.0,
    chunk: int = 1 << 20,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest``, resumable, verified, atomic. Returns ``dest``.

    Up to ``retries`` further attempts follow a transient failure (connection errors, a
    truncated transfer, HTTP 408/429/5xx), each resuming the part file, after
    ``backoff · 2^i`` seconds. A permanent HTTP error (e.g. 404) fails at once. After the last
    byte the checksum is verified: on a mismatch the part file is deleted and
    :class:`ChecksumError` raised; only a verified file is renamed to ``dest``.
    """
    dest = Path(dest)
    parse_checksum(checksum)  # a malformed checksum fails before any byte is fetched
    if dest.exists():
        verify_file(dest, checksum)
        log.info("%s: already present and verified", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _attempt(url, part, timeout=timeout, chunk=chunk, progress=progress, name=dest.name)
            break
        except DamagedArchiveError:
            part.unlink(missing_ok=True)
            raise
        except Exception as err:  # noqa: BLE001 - sorted into transient and permanent below
            if not _is_transient(err):
                raise DownloadError(f"{url}: {err}") from err
            if attempt == retries:
                raise DownloadError(f"{url}: giving up after {retries + 1} attempts: {err}") from err
            wait = backoff * 2**attempt
            log.warning("%s: %s; retry %d/%d in %.1f s", url, err, attempt + 1, retries, wait)
            time.sleep(wait)
    try:
        # before a first-use digest is recorded, the file must read to its end as what it is
        # (a published checksum proves that by itself; extraction checks archives again)
        if parse_checksum(checksum)[0] == TOFU:
            check_content(part, dest.name)
        verify_file(part, checksum, record_to=_sidecar(dest))
    except (ChecksumError, DamagedArchiveError):
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    log.info("%s: downloaded and verified -> %s", url, dest)
    return dest


# -- archives -------------------------------------------------------------------------------------


def _inside(root: PurePosixPath, target: PurePosixPath) -> bool:
    """Whether the normalised relative path ``root / target`` stays inside ``root`` ('.')."""
    parts: list[str] = []
    for part in (*root.parts, *target.parts):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return False
            parts.pop()
        else:
            parts.append(part)
    return True


def check_tar_members(members) -> None:
    """Refuse the whole archive if any member is unsafe; the error names the member."""
    for m in members:
        name = PurePosixPath(m.name)
        if m.name.startswith(("/", "\\")) or (len(m.name) > 1 and m.name[1] == ":"):
            raise UnsafeArchiveError(f"archive member {m.name!r} has an absolute path")
        if ".." in name.parts:
            raise UnsafeArchiveError(f"archive member {m.name!r} contains '..'")
        if m.isdev():
            raise UnsafeArchiveError(f"archive member {m.name!r} is a device or pipe")
        if m.issym() or m.islnk():
            link = PurePosixPath(m.linkname)
            base = name.parent if m.issym() else PurePosixPath(".")  # hard links name a member
            if m.linkname.startswith("/") or not _inside(base, link):
                kind = "symbolic" if m.issym() else "hard"
                raise UnsafeArchiveError(f"archive member {m.name!r} is a {kind} link to {m.linkname!r}, outside the folder")


def _check_tar_end(tar: tarfile.TarFile, archive) -> None:
    """After the last member: tar's end-of-archive marker (two zero blocks), then the rest of
    the stream read to its end, which checks a compressed archive's checksum (gzip's CRC).
    A tar cut exactly at a member boundary reads as a shorter, valid one without this."""
    try:
        tar.fileobj.seek(tar.offset)
        end = tar.fileobj.read(2 * tarfile.BLOCKSIZE)
        while tar.fileobj.read(1 << 20):
            pass
    except (OSError, EOFError, tarfile.TarError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise DamagedArchiveError(f"{archive}: damaged archive ({err})") from err
    if len(end) < 2 * tarfile.BLOCKSIZE or end.strip(b"\0"):
        raise DamagedArchiveError(f"{archive}: no end-of-archive marker after member {len(tar.getmembers())}: "
                                  "the archive is truncated")


def verify_archive(archive: str | os.PathLike) -> int:
    """Read a tar archive (any compression) to its end: every member's data, the end-of-archive
    marker, the compression's checksum. Returns the member count; :class:`DamagedArchiveError`
    otherwise."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            count = 0
            for member in tar:
                count += 1
                if member.isfile():
                    data = tar.extractfile(member)
                    while data.read(1 << 20):
                        pass
            _check_tar_end(tar, archive)
    except (OSError, EOFError, tarfile.TarError, zlib.error) as err:
        raise DamagedArchiveError(f"{archive}: damaged archive ({err})") from err
    return count


def check_content(path: str | os.PathLike, name: str) -> None:
    """What a downloaded file named ``name`` must be, checked to its end before its digest is
    recorded: a tar archive reads whole (:func:`verify_archive`); a zip (PyTorch's
    ``.pt``/``.pth`` format) has an intact central directory and member CRCs; and no file
    but an HTML one is an HTML page."""
    path = Path(path)
    lower = name.lower()
    with open(path, "rb") as fh:
        head = fh.read(64)
    if not lower.endswith(_HTML_SUFFIXES) and _looks_like_html(head):
        raise DamagedArchiveError(f"{path}: an HTML page, not {name}")
    if lower.endswith(ARCHIVE_SUFFIXES):
        verify_archive(path)
    elif lower.endswith((".zip", ".pt", ".pth")) and head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:
            raise DamagedArchiveError(f"{path}: damaged zip ({err})") from err
        if bad is not None:
            raise DamagedArchiveError(f"{path}: damaged zip member {bad!r}")


def extract_archive(archive: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Unpack the tar ``archive`` into ``out_dir`` (replaced), after checking every member.

    Nothing appears at ``out_dir`` unless the whole archive was checked, unpacked and read to
    its end (end-of-archive marker, compression checksum: :func:`_check_tar_end`)."""
    archive, out_dir = Path(archive), Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:*") as tar:
        try:
            members = tar.getmembers()
        except (OSError, EOFError, tarfile.TarError, zlib.error) as err:
            raise DamagedArchiveError(f"{archive}: damaged archive ({err})") from err
        check_tar_members(members)
        with atomic_directory(out_dir) as tmp:
            # filter='data' repeats the checks above inside tarfile and drops unsafe modes.
            try:
                tar.extractall(tmp, members=members, filter="data")
            except (EOFError, tarfile.TarError, zlib.error, gzip.BadGzipFile, lzma.LZMAError) as err:
                raise DamagedArchiveError(f"{archive}: damaged archive ({err})") from err
            _check_tar_end(tar, archive)
    log.info("%s: %d members -> %s", archive, len(members), out_dir)
    return out_dir


# -- where the workflow keeps raw files -----------------------------------------------------------

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def raw_filename(spec: dict) -> str:
    """The file name of a download spec: ``filename``, else the URL's or manual path's last part."""
    if spec.get("filename"):
        return spec["filename"]
    from urllib.parse import urlparse

    source = urlparse(spec["url"]).path if "url" in spec else spec["manual"]
    return PurePosixPath(source).name or "download"


def is_archive(spec: dict) -> bool:
    """Whether the download is unpacked before use (``extract``, else by its file name)."""
    return spec.get("extract", raw_filename(spec).lower().endswith(ARCHIVE_SUFFIXES))


def raw_path(data_dir: str, name: str, spec: dict) -> str:
    """``{data_dir}/raw/{name}/{filename}``: the verified download (or a link to the manual file)."""
    return f"{data_dir}/raw/{name}/{raw_filename(spec)}"


def input_path(data_dir: str, name: str, spec: dict) -> str:
    """What a task builder reads: the extracted folder ``{data_dir}/extracted/{name}`` of an
    archive, else the raw file itself."""
    return f"{data_dir}/extracted/{name}" if is_archive(spec) else raw_path(data_dir, name, spec)
