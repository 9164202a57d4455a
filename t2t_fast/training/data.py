"""Datasets for the training commands: the built-in digits demo, ImageFolder trees and CIFAR folders.

Every dataset yields ``(PIL image, class index)`` through a transform, so the same timm transforms serve
all of them. Unreadable image files are **skipped with a warning and counted**: the dataset returns an
:class:`Unreadable` for them, :func:`collate_skip_unreadable` drops those samples from the batch and passes them
on, and :func:`readable_batches` warns once per file, in the process that trains (loader workers would each warn
again), and counts them (the trainers log the count per epoch and write it to the summary). A training batch in
which every image is unreadable is an error (the ranks of a distributed run must all take the same steps); such
a validation batch is counted and passed over.
"""
import logging
import os
from typing import NamedTuple

import numpy as np
import torch

_logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}


class DataError(ValueError):
    """The data given to a command cannot be used; the message says what to fix."""


class Unreadable(NamedTuple):
    """What a dataset yields for an image file that cannot be read: the file and why."""

    path: str
    reason: str


class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes, shipped inside scikit-learn),
    upscaled bicubically to ``img_size`` RGB images. ``split`` 'train' or 'val' is a fixed, stratified
    80/20 split (the same on every machine)."""

    VAL_FRACTION = 0.2
    SPLIT_SEED = 0

    def __init__(self, split, img_size, transform=None):
        from PIL import Image
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        digits = load_digits()
        index = np.arange(len(digits.target))
        train_idx, val_idx = train_test_split(index, test_size=self.VAL_FRACTION, random_state=self.SPLIT_SEED,
                                              stratify=digits.target)
        chosen = np.sort(train_idx if split == "train" else val_idx)
        pixels = (digits.images[chosen] * (255.0 / 16.0)).round().astype(np.uint8)  # values 0..16 -> 0..255
        self.images = [Image.fromarray(p).resize((img_size, img_size), Image.BICUBIC).convert("RGB")
                       for p in pixels]
        self.targets = digits.target[chosen].tolist()
        self.classes = [str(c) for c in range(10)]
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = self.images[i]
        return (self.transform(image) if self.transform else image), self.targets[i]


def _check_dir(path, what):
    if not os.path.isdir(path):
        raise DataError(f"{what} {path!r} does not exist or is not a directory")


class SafeImageFolder(torch.utils.data.Dataset):
    """An ImageFolder (one sub-folder per class, as torchvision's) whose unreadable files yield
    :class:`Unreadable`. Hidden sub-folders (``.ipynb_checkpoints``, ...) are no classes."""

    def __init__(self, root, transform=None):
        from torchvision.datasets.folder import make_dataset

        _check_dir(root, "image folder")
        self.classes = sorted(entry.name for entry in os.scandir(root)
                              if entry.is_dir() and not entry.name.startswith("."))
        try:
            if not self.classes:
                raise FileNotFoundError(f"no class sub-folder in {root}")
            self.samples = make_dataset(root, {name: i for i, name in enumerate(self.classes)},
                                        is_valid_file=_has_image_extension, allow_empty=False)
        except FileNotFoundError as exc:
            raise DataError(f"{root}: {exc} (expected one sub-folder per class holding "
                            f"{'/'.join(IMG_EXTENSIONS)} files)") from None
        self.targets = [target for _, target in self.samples]
        self.transform = transform
        self.warned = set()  # the unreadable files warned about (by readable_batches, in the main process)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, target = self.samples[i]
        try:
            image = load_rgb(path)
        except unreadable_image_errors() as exc:
            return Unreadable(path, str(exc))
        return (self.transform(image) if self.transform else image), target


# Full-scale value of the single-channel modes PIL's convert("RGB") would clip at 255.
_FULL_SCALE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535}
# Formats whose mode "I" images are 16-bit: PIL reads a PGM of any maxval above 255 onto 0..65535 (and older
# PILs a 16-bit grayscale PNG as "I")
_SIXTEEN_BIT_AS_I = ("PPM", "PNG")


def load_rgb(path):
    """The image file at ``path`` as an 8-bit RGB PIL image.

    16-bit grayscale (PNG, TIFF, PGM) is scaled to 8 bits, where ``convert("RGB")`` alone would clip every value
    above 255 to white. Other 32-bit integer and float images (TIFF) are scaled by the range their values fall in:
    0..255 or 0..65535 (integers), 0..1 or 0..255 (floats), and refused outside them (raises ValueError, as for an
    unreadable file).
    """
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        if image.mode in _FULL_SCALE or image.mode in ("I", "F"):
            image = _to_8bit(image)
        return image.convert("RGB")


def _to_8bit(image):
    from PIL import Image

    pixels = np.asarray(image, dtype=np.float64)
    low, high = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
    full_scale = _FULL_SCALE.get(image.mode)
    if image.mode == "I" and image.format in _SIXTEEN_BIT_AS_I:
        full_scale = 65535
    if full_scale is None:
        ranges = (255, 65535) if image.mode == "I" else (1.0, 255)
        full_scale = next((top for top in ranges if low >= 0 and high <= top), None)
        if full_scale is None:
            kind = "32-bit integer" if image.mode == "I" else "floating-point"
            raise ValueError(f"{kind} image with values {low:g}..{high:g}, outside "
                             f"{' or '.join(f'0..{top:g}' for top in ranges)}: convert it to an 8-bit image first")
    return Image.fromarray(np.rint(pixels * (255.0 / full_scale)).astype(np.uint8), mode="L")


def unreadable_image_errors():
    """What PIL raises for a file it cannot read as an image: truncated or corrupt files, other formats, and images
    past its decompression-bomb size limit."""
    from PIL import Image

    return OSError, ValueError, SyntaxError, Image.DecompressionBombError


def _has_image_extension(path):
    return path.lower().endswith(IMG_EXTENSIONS)


def image_folder_splits(root, train_transform, eval_transform):
    """``root/train`` and ``root/val`` as :class:`SafeImageFolder` datasets with the same classes."""
    _check_dir(root, "data directory")
    missing = [s for s in ("train", "val") if not os.path.isdir(os.path.join(root, s))]
    if missing:
        raise DataError(f"data directory {root!r} needs train/ and val/ sub-folders (ImageFolder layout: "
                        f"split/class/image); missing: {', '.join(missing)}")
    train = SafeImageFolder(os.path.join(root, "train"), train_transform)
    val = SafeImageFolder(os.path.join(root, "val"), eval_transform)
    if train.classes != val.classes:
        raise DataError(f"train/ and val/ of {root!r} hold different classes: {train.classes[:10]} vs "
                        f"{val.classes[:10]}")
    return train, val


def cifar_splits(name, root, train_transform, eval_transform):
    """torchvision CIFAR-10/100 from a folder the user already has (never downloaded here)."""
    from torchvision import datasets

    _check_dir(root, f"{name} directory")
    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    try:
        return (cls(root, train=True, transform=train_transform, download=False),
                cls(root, train=False, transform=eval_transform, download=False))
    except RuntimeError:
        raise DataError(f"{root}: no {name} data found (this command does not download it: expected the extracted "
                        f"python version, e.g. {root}/{cls.base_folder}/)") from None


def collate_skip_unreadable(batch):
    """Default collate of the readable samples -> (images, targets, the :class:`Unreadable` samples); images and
    targets are None where no sample of the batch could be read."""
    kept = [sample for sample in batch if not isinstance(sample, Unreadable)]
    unreadable = [sample for sample in batch if isinstance(sample, Unreadable)]
    if not kept:
        return None, None, unreadable
    images, targets = torch.utils.data.default_collate(kept)
    return images, targets, unreadable


def readable_batches(loader):
    """``(images, targets, number of unreadable samples)`` per batch of a loader that collates with
    :func:`collate_skip_unreadable`, warning about each unreadable file once (per dataset, in this process)."""
    warned = getattr(loader.dataset, "warned", set())  # only datasets with a ``warned`` set yield Unreadable
    for images, targets, unreadable in loader:
        for path, reason in unreadable:
            if path not in warned:
                warned.add(path)
                _logger.warning("skipping unreadable image %s: %s", path, reason)
        yield images, targets, len(unreadable)
