"""The paper's input pipeline on top of the uint8 cache (SPEC §4), batch-wise on the device.

:class:`CachedImages` is a view of one split of a prepared task that behaves like the float
tensor the training loop indexes: ``len(view)`` and ``view[idx]`` (an index tensor or a slice)
return a float32 batch [B, 3, crop, crop] on ``device``. Only the selected uint8 rows are read
from the memory-mapped cache and copied to the device; the augmentation runs there, on the
whole batch at once:

- ``train=True`` (training): per image, a random ``crop``×``crop`` window (uniform offset), a
  random horizontal mirror (probability ½) and a random Gaussian blur (probability
  ``blur_p``, σ uniform in ``blur_sigma``; separable kernel truncated at radius ``ceil(2σ)``,
  reflected borders); then scaled to [0, 1] and the training split's per-channel mean
  subtracted (and divided by its std when ``std`` is given).
- ``train=False`` (evaluation, Fisher, source accuracy): the central crop, no randomness.

The random draws come from a CPU ``torch.Generator``, so a seed gives the same batches on any
device. On a CUDA device the batch makes the host wait for nothing: what the draws decide (the
mirrored and blurred images, the blur kernels, built on the CPU) goes over from pinned memory
without blocking (:func:`to_device`), as the uint8 rows do. The paper names "random blur"
without its parameters; the defaults here (p = ½, σ ∈ [0.1, 1.5] pixels at 256×256) are this
suite's choice.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .data import read_split

__all__ = ["CachedImages", "load_task_views", "augment_batch", "gaussian_blur", "to_device"]


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` (a CPU tensor) on ``device``, without blocking on an accelerator. To a CUDA device
    it goes from pinned memory: a copy from pageable memory waits for the device's queue."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device, non_blocking=device.type != "cpu")


def _gaussian_kernels(sigma: Tensor, radius: int) -> Tensor:
    """[B] σ -> [B, 2·radius+1] normalised 1-D kernels, each truncated at its own radius
    ceil(2σ) (zero weights beyond it)."""
    x = torch.arange(-radius, radius + 1, dtype=sigma.dtype, device=sigma.device)
    s = sigma.clamp_min(1e-6)[:, None]
    k = torch.exp(-0.5 * (x[None, :] / s) ** 2) * (x[None, :].abs() <= torch.ceil(2 * s))
    return k / k.sum(dim=1, keepdim=True)


def _blur_batched(x: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur of [B, C, H, W] with one σ per image, reflected borders: one
    grouped convolution per axis (the device path). The kernels are built from ``sigma`` on
    the CPU (reading the radius off a device tensor would wait for the device)."""
    b, c, h, w = x.shape
    sigma = sigma.detach().cpu().to(x.dtype)
    radius = int(math.ceil(2 * float(sigma.max())))
    k = to_device(_gaussian_kernels(sigma, radius).repeat_interleave(c, dim=0), x.device)  # [B·C, K]
    flat = x.reshape(1, b * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=b * c)
    return flat.reshape(b, c, h, w)


def _blur_loop(x: Tensor, sigma: Tensor) -> Tensor:
    """The same blur, image by image with shifted slices (the CPU path: an image stays in the
    cache while its taps are summed, where a grouped convolution streams the batch)."""
    out = torch.empty_like(x)
    for i in range(len(x)):
        radius = int(math.ceil(2 * float(sigma[i])))
        k = _gaussian_kernels(sigma[i : i + 1], radius)[0].tolist()
        h, w = x.shape[2:]
        p = F.pad(x[i : i + 1], (radius, radius, radius, radius), mode="reflect")[0]
        rows = p[:, :, 0:w] * k[0]
        for j in range(1, 2 * radius + 1):
            rows.add_(p[:, :, j : j + w], alpha=k[j])
        res = rows[:, 0:h, :] * k[0]
        for j in range(1, 2 * radius + 1):
            res.add_(rows[:, j : j + h, :], alpha=k[j])
        out[i] = res
    return out


def gaussian_blur(x: Tensor, sigma: Tensor, *, path: str = "auto") -> Tensor:
    """Blur each image of [B, C, H, W] with its own σ (> 0): kernel radius ceil(2σ), reflected
    borders. ``path``: ``batched`` (grouped convolutions), ``loop`` (per image), ``auto``
    (batched on accelerators, loop on the CPU); both compute the same sums."""
    if path == "auto":
        path = "loop" if x.device.type == "cpu" else "batched"
    return _blur_batched(x, sigma) if path == "batched" else _blur_loop(x, sigma)


def augment_batch(
    images: Tensor,
    *,
    crop: int,
    train: bool,
    mean: Tensor,
    std: Tensor | None = None,
    generator: torch.Generator | None = None,
    blur_p: float = 0.5,
    blur_sigma: tuple[float, float] = (0.1, 1.5),
) -> Tensor:
    """uint8 [B, H, W, C] (on any device) -> float32 [B, C, crop, crop], augmented as the
    module docstring says. ``mean`` / ``std``: [C] tensors in [0, 1] units."""
    b, h, w, c = images.shape
    dev = images.device
    if crop > min(h, w):
        raise ValueError(f"crop {crop} larger than the {h}x{w} images")
    if train:
        if generator is None:
            raise ValueError("training augmentation needs a generator")
        oy = torch.randint(0, h - crop + 1, (b,), generator=generator).tolist()
        ox = torch.randint(0, w - crop + 1, (b,), generator=generator).tolist()
        flip = torch.rand(b, generator=generator) < 0.5
        blur = torch.rand(b, generator=generator) < blur_p
        sigma = torch.empty(b).uniform_(*blur_sigma, generator=generator)
    else:
        oy, ox = [(h - crop) // 2] * b, [(w - crop) // 2] * b
        flip = blur = torch.zeros(b, dtype=torch.bool)
    # Crops are views: slicing copies crop² pixels per image, where a gather would index each.
    x = torch.stack([images[i, y : y + crop, x0 : x0 + crop] for i, (y, x0) in enumerate(zip(oy, ox))])
    if flip.any():
        sel = to_device(flip.nonzero().squeeze(1), dev)
        x[sel] = x[sel].flip(2)
    # (x/255 − mean)/std in one pass; the blur commutes with it (a normalised kernel keeps
    # constants), so it runs after, on the normalised values.
    scale = 1.0 / (255.0 * (std if std is not None else torch.ones_like(mean)))
    shift = -mean / (std if std is not None else 1.0)
    affine = to_device(torch.stack([shift, scale]).float(), dev).view(2, 1, -1, 1, 1)
    x = torch.addcmul(affine[0], x.permute(0, 3, 1, 2).contiguous().float(), affine[1])
    if blur.any():
        sel = blur.nonzero().squeeze(1)
        on_dev = to_device(sel, dev)
        x[on_dev] = gaussian_blur(x[on_dev], sigma[sel])
    return x


class CachedImages:
    """One split of a prepared task, read lazily from its uint8 cache (module docstring)."""

    def __init__(
        self,
        images: np.ndarray,
        rows: np.ndarray,
        *,
        mean,
        std=None,
        crop: int = 224,
        train: bool = False,
        device: str | torch.device = "cpu",
        generator: torch.Generator | None = None,
        **augment_opts,
    ):
        self.images, self.rows = images, np.asarray(rows, dtype=np.int64)
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32)
        self.crop, self.train, self.device, self.generator = crop, train, torch.device(device), generator
        self.augment_opts = augment_opts
        if train and generator is None:
            raise ValueError("a training view needs a generator")

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), self.images.shape[3], self.crop, self.crop)

    def __getitem__(self, idx) -> Tensor:
        rows = self.rows[idx] if isinstance(idx, slice) else self.rows[torch.as_tensor(idx).cpu().numpy()]
        order = np.argsort(rows, kind="stable")  # read the memory map in file order
        batch = np.empty((len(rows), *self.images.shape[1:]), dtype=np.uint8)
        batch[order] = self.images[rows[order]]
        x = to_device(torch.from_numpy(batch), self.device)
        return augment_batch(x, crop=self.crop, train=self.train, mean=self.mean, std=self.std,
                             generator=self.generator, **self.augment_opts)

    def select(self, indices) -> "CachedImages":
        """The same view restricted to ``indices`` (positions in this view, e.g. a fold's
        training images); no image is read."""
        view = CachedImages.__new__(CachedImages)
        view.__dict__.update(self.__dict__, rows=self.rows[np.asarray(indices, dtype=np.int64)])
        return view

    def central(self) -> "CachedImages":
        """The same images as the evaluation sees them: central crops, no randomness."""
        view = self.select(np.arange(len(self)))
        view.train, view.generator = False, None
        return view

    def take(self, n: int) -> "CachedImages":
        """The same view restricted to its first ``n`` images."""
        return self.select(np.arange(min(n, len(self))))

    def to(self, device) -> "CachedImages":
        self.device = torch.device(device)
        return self


def load_task_views(
    task_dir: str | os.PathLike,
    *,
    crop: int = 224,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
    normalize: str = "mean",
    **augment_opts,
) -> tuple[dict, dict[str, CachedImages], dict[str, Tensor]]:
    """(meta, x, y) of a prepared task like :func:`spbench.data.load_task`, with ``x['train']``
    augmented (needs ``generator``; without one it is the central crop too) and ``x['test']``
    the central crop. ``normalize``: ``mean`` (SPEC §4) or ``mean_std``."""
    task_dir = Path(task_dir)
    meta = json.loads((task_dir / "meta.json").read_text())
    images = np.load(task_dir / "images.npy", mmap_mode="r")
    std = meta.get("std") if normalize == "mean_std" else None
    if normalize == "mean_std" and std is None:
        raise ValueError(f"{task_dir}: meta.json has no std (normalize: mean_std)")
    xs, ys = {}, {}
    for name, part in read_split(task_dir).items():
        train = name == "train" and generator is not None
        xs[name] = CachedImages(images, part["index"], mean=meta["mean"], std=std, crop=crop, train=train,
                                device=device, generator=generator if train else None, **augment_opts)
        ys[name] = torch.tensor(part["label"])
    return meta, xs, ys
