"""Artifacts that detect their own damage: a digest of their content is written with them and
checked when they are read.

:func:`save_sealed` stores ``{"content": obj, "sha256": content_digest(obj)}`` with
``torch.save``; :func:`load_sealed` reads it (``weights_only=True``: no code runs) and
recomputes the digest, raising :class:`DamagedArtifactError` — naming the file and how to
make it again — when a bit of a tensor, a key or a value differs. The digest covers every
tensor's bytes, dtype and shape and every other value's text, walked in key order, so it does
not depend on how ``torch.save`` lays the file out.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["DamagedArtifactError", "content_digest", "save_sealed", "load_sealed", "file_sha256"]


class DamagedArtifactError(RuntimeError):
    """An artifact's content does not match the digest recorded when it was written."""


def _feed(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"{")
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            _feed(h, obj[key])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[" if isinstance(obj, list) else b"(")
        for item in obj:
            _feed(h, item)
        h.update(b"]")
    else:
        h.update(f"{type(obj).__name__}:{obj!r}".encode())


def content_digest(obj: Any) -> str:
    """sha256 of ``obj``'s content (tensors by their bytes, dtype and shape)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def save_sealed(path: str | os.PathLike, obj: Any) -> str:
    """``torch.save`` ``obj`` with its content digest to ``path`` (atomically); returns the digest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = content_digest(obj)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save({"content": obj, "sha256": digest}, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest


REBUILD = "remove it and rerun snakemake, which makes it again (and what was made from it)"


def load_sealed(path: str | os.PathLike, *, rebuild: str = REBUILD, with_digest: bool = False) -> Any:
    """The object :func:`save_sealed` wrote, after checking its digest (and the digest, with
    ``with_digest``); ``rebuild`` says how to make the file again in the error."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged zip or pickle stream
        raise DamagedArtifactError(f"{path} cannot be read ({err}); {rebuild}") from err
    if not isinstance(blob, dict) or set(blob) != {"content", "sha256"}:
        raise DamagedArtifactError(f"{path} was not written by spbench's save_sealed (no content digest); {rebuild}")
    if content_digest(blob["content"]) != blob["sha256"]:
        raise DamagedArtifactError(f"{path} is damaged: its content does not match the digest recorded when it "
                                   f"was written; {rebuild}")
    return (blob["content"], blob["sha256"]) if with_digest else blob["content"]


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()
