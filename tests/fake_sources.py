"""Test helpers: a local HTTP file server (with Range, truncation and failure modes) and
generated archives in the real data sets' layouts (folder names, list files, .mat files)."""

from __future__ import annotations

import io
import tarfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np


@dataclass
class Served:
    body: bytes
    truncate_at: int | None = None  # close the connection after this many body bytes (per response)
    fail_first: int = 0  # answer HTTP 503 to this many requests first
    honour_range: bool = True


@dataclass
class FileServer:
    """Serves ``files`` (path -> :class:`Served`) on 127.0.0.1; ``requests`` logs (path, Range)."""

    files: dict[str, Served] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    bytes_sent: int = 0

    def start(self) -> "FileServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                item = server.files.get(self.path)
                if item is None:
                    self.send_error(404)
                    return
                if item.fail_first > 0:
                    item.fail_first -= 1
                    self.send_error(503)
                    return
                body, start, status = item.body, 0, 200
                if rng and item.honour_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                part = body[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(part)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Connection", "close")
                self.end_headers()
                if item.truncate_at is not None:
                    part = part[: item.truncate_at]
                server.bytes_sent += len(part)  # counted first: the client may finish before write returns
                self.wfile.write(part)
                self.close_connection = True

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}{path}"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


# -- images and archives --------------------------------------------------------------------------


def jpeg(seed: int, size=(40, 30), mode="RGB") -> bytes:
    """A small random JPEG (``mode`` 'L' gives a greyscale file)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, "JPEG")
    return buf.getvalue()


def make_tar(entries: dict[str, bytes], path: Path, mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def caltech_entries(n_classes=3, per_class=(26, 27, 30), grey_every=7) -> dict[str, bytes]:
    """``256_ObjectCategories/NNN.name/NNN_XXXX.jpg``, the last class named ``clutter``."""
    entries = {}
    for c in range(n_classes):
        name = "clutter" if c == n_classes - 1 else f"class{c}"
        folder = f"256_ObjectCategories/{c + 1:03d}.{name}"
        for i in range(per_class[c]):
            mode = "L" if i % grey_every == 0 else "RGB"
            entries[f"{folder}/{c + 1:03d}_{i + 1:04d}.jpg"] = jpeg(100 * c + i, mode=mode)
    return entries


def indoor_entries(classes=("bakery", "kitchen"), per_class=5) -> tuple[dict[str, bytes], str, str]:
    """``Images/<class>/<file>.jpg`` and the two official list texts (first 4 train, last 1 test)."""
    entries, train, test = {}, [], []
    for c, name in enumerate(classes):
        for i in range(per_class):
            rel = f"{name}/img_{i}.jpg"
            entries[f"Images/{rel}"] = jpeg(10 * c + i)
            (train if i < per_class - 1 else test).append(rel)
    return entries, "\n".join(train) + "\n", "\n".join(test) + "\n"


def dogs_entries(breeds=("n02085620-Chihuahua", "n02085782-Japanese_spaniel"), per_class=4):
    """``Images/<wnid>-<breed>/<wnid>_<i>.jpg`` and lists.tar's ``train_list.mat`` /
    ``test_list.mat`` (MATLAB cell arrays ``file_list``, ``annotation_list``, 1-based ``labels``)."""
    from scipy.io import savemat

    images, split = {}, {"train": [], "test": []}
    for c, breed in enumerate(breeds):
        wnid = breed.split("-")[0]
        for i in range(per_class):
            rel = f"{breed}/{wnid}_{i}.jpg"
            images[f"Images/{rel}"] = jpeg(50 * c + i)
            split["train" if i < per_class - 1 else "test"].append((rel, c + 1))
    lists = {}
    for name, rows in split.items():
        cells = np.empty((len(rows), 1), dtype=object)
        ann = np.empty((len(rows), 1), dtype=object)
        for j, (rel, _) in enumerate(rows):
            cells[j, 0] = np.array([rel])
            ann[j, 0] = np.array([rel.removesuffix(".jpg")])
        buf = io.BytesIO()
        savemat(buf, {"file_list": cells, "annotation_list": ann,
                      "labels": np.array([[y] for _, y in rows], dtype=np.uint8)})
        lists[f"{name}_list.mat"] = buf.getvalue()
    return images, lists


def places_entries(n_classes=3, per_class=4):
    """``val_256/Places365_val_%08d.jpg`` and filelist_places365-standard.tar's
    ``categories_places365.txt`` (``/a/airfield 0``) and ``places365_val.txt`` (``<file> <label>``)."""
    names = [f"/{chr(97 + c)}/place{c}" for c in range(n_classes)]
    images, rows, i = {}, [], 0
    for k in range(per_class):
        for c in range(n_classes):
            i += 1
            fname = f"Places365_val_{i:08d}.jpg"
            images[f"val_256/{fname}"] = jpeg(7 * i, size=(32, 32))
            rows.append(f"{fname} {c}")
    lists = {
        "categories_places365.txt": "".join(f"{n} {c}\n" for c, n in enumerate(names)).encode(),
        "places365_val.txt": ("\n".join(rows) + "\n").encode(),
        "places365_train_standard.txt": b"/a/place0/00000001.jpg 0\n",
    }
    return images, lists


def imagenet_entries(n_classes=3, per_class=3):
    """Flat ``ILSVRC2012_val_%08d.JPEG`` and the devkit's ``data/meta.mat`` (synsets struct
    array: ILSVRC2012_ID, WNID, words, num_children; one non-leaf synset too) and
    ``data/ILSVRC2012_validation_ground_truth.txt`` (1-based ILSVRC2012_IDs)."""
    from scipy.io import savemat

    # IDs are given in an order that is NOT the sorted-WNID order, to test the mapping.
    wnids = [f"n0{9 - c}000000" for c in range(n_classes)]  # ID 1 -> largest wnid
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    synsets = np.zeros((n_classes + 1, 1), dtype=dtype)
    for c in range(n_classes):
        synsets[c, 0] = (np.array([[c + 1]]), np.array([wnids[c]]), np.array([f"thing {wnids[c]}"]), np.array([[0]]))
    synsets[n_classes, 0] = (np.array([[n_classes + 1]]), np.array(["n00001740"]), np.array(["entity"]), np.array([[5]]))
    buf = io.BytesIO()
    savemat(buf, {"synsets": synsets})
    truth, images = [], {}
    for i in range(n_classes * per_class):
        truth.append(i % n_classes + 1)
        images[f"ILSVRC2012_val_{i + 1:08d}.JPEG"] = jpeg(3 * i, size=(36, 28))
    devkit = {
        "ILSVRC2012_devkit_t12/data/meta.mat": buf.getvalue(),
        "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": "".join(f"{t}\n" for t in truth).encode(),
    }
    return images, devkit, wnids, truth
