"""A bad download is never trusted, a damaged archive never extracts: each case served from
127.0.0.1 (an HTML error page with status 200, a transfer cut short without Content-Length, a
tar cut at a member boundary, a gzip with a bad CRC, a broken zip), under `tofu` where the
digest would otherwise be recorded."""

from __future__ import annotations

import gzip
import io
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from spbench.download import DamagedArchiveError, DownloadError, extract_archive, fetch, verify_archive


class Server:
    """path -> (body, content type, whether to send Content-Length)."""

    def __init__(self):
        self.files: dict[str, tuple[bytes, str, bool]] = {}
        files = self.files

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # no chunking: without Content-Length the body ends at close

            def log_message(self, *args):
                pass

            def do_GET(self):
                body, ctype, length = files[self.path]
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                if length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture(scope="module")
def server():
    srv = Server()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def _tar(n=4, compress="") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compress}") as tar:
        for i in range(n):
            data = bytes([i]) * 3000
            info = tarfile.TarInfo(f"d/m{i}.bin")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _cut_at_member(raw: bytes, keep: int) -> bytes:
    """The tar cut right after its ``keep``-th member: a valid prefix without an end marker."""
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        member = tar.getmembers()[keep]
    return raw[: member.offset]


def _bad_crc(raw: bytes) -> bytes:
    data = bytearray(gzip.compress(raw, mtime=0))
    data[-8] ^= 0xFF  # the CRC32 of the trailer
    return bytes(data)


def _nothing_recorded(folder: Path):
    assert sorted(p.name for p in folder.iterdir()) == []


def test_html_error_page_with_status_200_is_refused(server, tmp_path):
    server.files["/a.tar"] = (b"<!DOCTYPE html><html><body>Please log in</body></html>", "text/html", True)
    with pytest.raises(DamagedArchiveError, match="HTML page"):
        fetch(server.url("/a.tar"), tmp_path / "a.tar", checksum="tofu", progress=False)
    _nothing_recorded(tmp_path)


def test_html_page_with_a_wrong_content_type_is_refused(server, tmp_path):
    server.files["/w.pth"] = (b"\n  <html><body>404</body></html>", "application/octet-stream", True)
    with pytest.raises(DamagedArchiveError, match="HTML page"):
        fetch(server.url("/w.pth"), tmp_path / "w.pth", checksum="tofu", progress=False)
    _nothing_recorded(tmp_path)


def test_transfer_cut_short_without_content_length_is_refused(server, tmp_path):
    raw = _tar(compress="gz")
    server.files["/cut.tar.gz"] = (raw[: len(raw) * 2 // 3], "application/gzip", False)
    with pytest.raises(DamagedArchiveError):
        fetch(server.url("/cut.tar.gz"), tmp_path / "cut.tar.gz", checksum="tofu", progress=False)
    _nothing_recorded(tmp_path)


def test_tar_cut_at_a_member_boundary_is_refused(server, tmp_path):
    cut = _cut_at_member(_tar(), 2)
    with tarfile.open(fileobj=io.BytesIO(cut)) as tar:  # what made it dangerous: it reads as valid
        assert len(tar.getmembers()) == 2
    server.files["/b.tar"] = (cut, "application/x-tar", False)
    with pytest.raises(DamagedArchiveError, match="end-of-archive marker"):
        fetch(server.url("/b.tar"), tmp_path / "b.tar", checksum="tofu", progress=False)
    _nothing_recorded(tmp_path)
    path = tmp_path / "local.tar"
    path.write_bytes(cut)
    with pytest.raises(DamagedArchiveError, match="end-of-archive marker"):
        extract_archive(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gzip_with_a_bad_crc_is_refused(server, tmp_path):
    bad = _bad_crc(_tar())
    server.files["/c.tar.gz"] = (bad, "application/gzip", True)
    with pytest.raises(DamagedArchiveError):
        fetch(server.url("/c.tar.gz"), tmp_path / "c.tar.gz", checksum="tofu", progress=False)
    _nothing_recorded(tmp_path)
    path = tmp_path / "local.tar.gz"
    path.write_bytes(bad)
    with pytest.raises(DamagedArchiveError):
        extract_archive(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_broken_zip_weights_are_refused(server, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", b"x" * 5000)
    raw = buf.getvalue()
    server.files["/w2.pth"] = (raw[: len(raw) - 30], "application/octet-stream", False)
    with pytest.raises(DamagedArchiveError, match="damaged zip"):
        fetch(server.url("/w2.pth"), tmp_path / "w2.pth", checksum="tofu", progress=False)
    _nothing_recorded(tmp_path)


def test_whole_archives_pass_and_their_digest_is_recorded(server, tmp_path):
    for name, raw, ctype in (("/ok.tar", _tar(), "application/x-tar"),
                             ("/ok.tar.gz", _tar(compress="gz"), "application/gzip")):
        server.files[name] = (raw, ctype, False)
        dest = fetch(server.url(name), tmp_path / name[1:], checksum="tofu", progress=False)
        assert dest.read_bytes() == raw and Path(f"{dest}.sha256").exists()
        assert verify_archive(dest) == 4
        out = extract_archive(dest, tmp_path / f"x{name[1:]}")
        assert len(list((out / "d").iterdir())) == 4


def test_a_download_error_is_a_download_error():
    assert issubclass(DamagedArchiveError, DownloadError)
