"""Downloads from a local HTTP server and archive extraction: verified, resumable, atomic,
and refusing unsafe archives with a clear error and no output."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from fake_sources import FileServer, Served, make_tar
from spbench.download import (
    ChecksumError,
    DownloadError,
    UnsafeArchiveError,
    extract_archive,
    fetch,
    parse_checksum,
    verify_file,
)

BODY = bytes(range(256)) * 4000  # ~1 MB
SHA = hashlib.sha256(BODY).hexdigest()


@pytest.fixture
def server():
    srv = FileServer().start()
    yield srv
    srv.stop()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_fetch_verifies_and_renames(server, tmp_path):
    """A good transfer ends as the verified file; a second fetch trusts it without a request."""
    server.files["/a.tar"] = Served(BODY)
    dest = fetch(server.url("/a.tar"), tmp_path / "a.tar", checksum=f"sha256:{SHA}", progress=False)
    assert dest.read_bytes() == BODY
    assert leftovers(tmp_path) == ["a.tar"]
    fetch(server.url("/a.tar"), dest, checksum=f"md5:{hashlib.md5(BODY).hexdigest()}", progress=False)
    assert len(server.requests) == 1


def test_wrong_checksum_is_refused_and_leaves_nothing(server, tmp_path):
    server.files["/a.tar"] = Served(BODY)
    with pytest.raises(ChecksumError, match="sha256 is .* the config expects 0000"):
        fetch(server.url("/a.tar"), tmp_path / "a.tar", checksum="sha256:" + "0" * 64, progress=False)
    assert leftovers(tmp_path) == []


def test_server_side_truncated_file_is_refused(server, tmp_path):
    """A complete transfer of a short file (truncated at the source) fails its checksum."""
    server.files["/a.tar"] = Served(BODY[: len(BODY) // 2])
    with pytest.raises(ChecksumError):
        fetch(server.url("/a.tar"), tmp_path / "a.tar", checksum=f"sha256:{SHA}", progress=False)
    assert leftovers(tmp_path) == []


def test_truncated_transfers_give_up_after_bounded_retries(server, tmp_path):
    """A connection that always breaks without progress ends in a clear error after
    1 + retries requests; nothing appears at the destination."""
    server.files["/a.tar"] = Served(BODY, truncate_at=0)
    with pytest.raises(DownloadError, match="giving up after 3 attempts: .*connection closed after 0 of"):
        fetch(server.url("/a.tar"), tmp_path / "a.tar", checksum=f"sha256:{SHA}", retries=2, backoff=0.01, progress=False)
    assert len(server.requests) == 3
    assert not (tmp_path / "a.tar").exists()


def test_interrupted_download_resumes_with_range(server, tmp_path):
    """An interrupted transfer keeps its .part file; the next fetch asks only for the rest."""
    half = len(BODY) // 2
    server.files["/a.tar"] = Served(BODY, truncate_at=half)
    with pytest.raises(DownloadError):
        fetch(server.url("/a.tar"), tmp_path / "a.tar", checksum=f"sha256:{SHA}", retries=0, progress=False)
    assert leftovers(tmp_path) == ["a.tar.part"]
    assert (tmp_path / "a.tar.part").stat().st_size == half
    server.files["/a.tar"].truncate_at = None
    sent_before = server.bytes_sent
    fetch(server.url("/a.tar"), tmp_path / "a.tar", checksum=f"sha256:{SHA}", retries=0, progress=False)
    assert server.requests[-1] == ("/a.tar", f"bytes={half}-")
    assert server.bytes_sent - sent_before == len(BODY) - half
    assert (tmp_path / "a.tar").read_bytes() == BODY
    assert leftovers(tmp_path) == ["a.tar"]


def test_retries_resume_within_one_fetch(server, tmp_path):
    """Transient failures (503, then broken connections) are retried, each resuming."""
    server.files["/a.tar"] = Served(BODY, truncate_at=300_000, fail_first=1)
    fetch(server.url("/a.tar"), tmp_path / "a.tar", checksum=f"sha256:{SHA}", retries=6, backoff=0.01, progress=False)
    assert (tmp_path / "a.tar").read_bytes() == BODY
    ranges = [r for _, r in server.requests]
    assert ranges[:3] == [None, None, "bytes=300000-"]


def test_server_without_range_restarts_from_zero(server, tmp_path):
    (tmp_path / "a.tar.part").write_bytes(b"junk" * 10)
    server.files["/a.tar"] = Served(BODY, honour_range=False)
    fetch(server.url("/a.tar"), tmp_path / "a.tar", checksum=f"sha256:{SHA}", progress=False)
    assert (tmp_path / "a.tar").read_bytes() == BODY


def test_http_404_is_permanent(server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        fetch(server.url("/nope"), tmp_path / "x", checksum=f"sha256:{SHA}", retries=3, backoff=0.01, progress=False)
    assert len(server.requests) == 1
    assert leftovers(tmp_path) == []


def test_tofu_records_then_checks(server, tmp_path):
    """No published checksum: the first download's sha256 is recorded and enforced later."""
    server.files["/w.pth"] = Served(BODY)
    dest = fetch(server.url("/w.pth"), tmp_path / "w.pth", checksum="tofu", progress=False)
    assert (tmp_path / "w.pth.sha256").read_text().split()[0] == SHA
    verify_file(dest, "tofu")
    dest.write_bytes(BODY[:-1])
    with pytest.raises(ChecksumError):
        verify_file(dest, "tofu")


@pytest.mark.parametrize(
    "checksum", ["sha256:xyz", "sha1:" + "0" * 40, "sha256:1234", "md5:" + "0" * 31, "sha256" + SHA]
)
def test_malformed_checksums_are_rejected(checksum):
    with pytest.raises(ValueError, match="checksum|digest"):
        parse_checksum(checksum)


def test_sha256_prefix_as_torchvision_publishes(tmp_path):
    (tmp_path / "f").write_bytes(BODY)
    verify_file(tmp_path / "f", f"sha256:{SHA[:8]}")
    with pytest.raises(ChecksumError):
        verify_file(tmp_path / "f", f"sha256:{'f' if SHA[0] != 'f' else 'e'}{SHA[1:8]}")


# -- archives -------------------------------------------------------------------------------------


def _tar_with(tmp_path: Path, *infos: tuple[tarfile.TarInfo, bytes]) -> Path:
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        good = tarfile.TarInfo("data/ok.txt")
        good.size = 2
        tar.addfile(good, io.BytesIO(b"ok"))
        for info, data in infos:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _link(name: str, target: str, kind=tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, b""


@pytest.mark.parametrize(
    "member, message",
    [
        ((tarfile.TarInfo("../escape.txt"), b"x"), "contains '..'"),
        ((tarfile.TarInfo("data/../../escape.txt"), b"x"), "contains '..'"),
        ((tarfile.TarInfo("/tmp/abs.txt"), b"x"), "absolute path"),
        (_link("data/link", "../../outside"), "symbolic link to '../../outside', outside"),
        (_link("data/link", "/etc/passwd"), "symbolic link to '/etc/passwd'"),
        (_link("data/hard", "../x", tarfile.LNKTYPE), "hard link"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink-escape", "symlink-absolute", "hardlink-escape"],
)
def test_unsafe_archives_are_refused_without_output(tmp_path, member, message):
    archive = _tar_with(tmp_path, member)
    out = tmp_path / "out" / "extracted"
    with pytest.raises(UnsafeArchiveError, match=message):
        extract_archive(archive, out)
    assert not out.exists()
    assert list((tmp_path / "out").iterdir()) == []
    assert not (tmp_path.parent / "escape.txt").exists()


def test_internal_symlink_and_gzip_are_extracted(tmp_path):
    archive = tmp_path / "ok.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("data/a.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"a"))
        link, _ = _link("data/sub/b.txt", "../a.txt")
        tar.addfile(link)
    out = extract_archive(archive, tmp_path / "x")
    assert (out / "data" / "sub" / "b.txt").read_text() == "a"


def test_extraction_replaces_an_old_folder(tmp_path):
    archive = make_tar({"d/new.txt": b"n"}, tmp_path / "a.tar")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "stale").write_text("s")
    extract_archive(archive, tmp_path / "x")
    assert sorted(p.name for p in (tmp_path / "x").rglob("*")) == ["d", "new.txt"]
