"""A folder of the user's own images for the training script: torchvision's ``ImageFolder``
layout, one sub-folder a class.

``load_image_folder(folder, options)`` returns an :class:`~datasets.ImageData` whose labels
number the class folders in sorted order. Its images are

* float32 tensors in memory, like the built-in datasets', when they fit (``options.cache``:
  ``"auto"`` caches when the decoded images take at most a quarter of the machine's memory);
* otherwise a :class:`FolderImages`, which decodes the images of a batch when it is asked for
  them: by indexing with a tensor of indices (a tensor comes back) or, for a whole epoch,
  with :meth:`FolderImages.stream`, where ``workers`` processes decode ahead.

Layouts: ``folder/train`` with ``folder/test`` (or, without it, ``folder/val``) beside it; or the
class folders directly in ``folder``, of which a seeded permutation puts 20 % in the test set
(as for the digits). The training images are put in a fixed seeded order, so that
``--train-subset`` and ``--validation-size`` take every class, not the first or last ones.

Every image is read once at the start: its header (grayscale or colour, size), then its pixels
(the normalisation statistics of the training images, and a file that cannot be decoded is
found before training, not in the middle of it). Each problem raises
:class:`~datasets.DatasetError` naming the path; unreadable images stop the run
(``bad_images="stop"``) or are left out with a note on standard error naming each one
(``"skip"``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from datasets import DatasetError, ImageData

__all__ = ["FolderImages", "FolderOptions", "IMAGE_EXTENSIONS", "load_image_folder"]

# What torchvision's ImageFolder reads, less its rarer formats; matched case-insensitively.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm", ".pbm")
# Pillow's modes of one grey value per pixel (with or without alpha); every other mode is colour.
GRAYSCALE_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
TEST_FRACTION = 0.2  # of a single folder's images, as for the digits
SPLIT_SEED = 0


@dataclass(frozen=True)
class FolderOptions:
    """How to read a folder (train.py's options of the same names)."""

    image_size: Optional[int] = None  # resize the shorter side, then crop the centre N x N
    channels: Optional[int] = None  # 1 or 3; None: as the images are (all alike)
    mean: Optional[Sequence[float]] = None  # per channel (or one for all), on pixels in [0, 1]
    std: Optional[Sequence[float]] = None
    bad_images: str = "stop"  # or "skip"
    cache: str = "auto"  # "memory", or "none": decode every batch from the files
    workers: int = 0  # processes that decode (0: this one)
    processes: int = 1  # copies of the data on this machine (torchrun): for cache="auto"


class Geometry(NamedTuple):
    """What every decoded image becomes: ``channels`` x ``height`` x ``width`` bytes."""

    channels: int
    height: int
    width: int
    resize_to: Optional[int]


def load_image_folder(folder: Optional[str], options: FolderOptions) -> ImageData:
    """The images of ``folder`` (see the module docstring), normalised per channel."""
    if folder is None:
        raise DatasetError("--dataset folder needs --data-dir DIR: a folder with one sub-folder "
                           "of images per class")
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"{root}: {'not a folder' if root.exists() else 'no such folder'}; "
                           "expected a folder with one sub-folder of images per class")
    train_files, test_files = _layout(root)
    files = train_files + test_files
    geometry = _geometry(root, files, options)
    keep = options.cache == "memory" or options.cache == "auto" and _fits_in_memory(
        len(files), geometry, options.processes)
    pixels, bad, moments = _read_all(files, len(train_files), geometry, options, keep)
    if bad:
        _report_bad(bad, files, options.bad_images)
    parts = {name: [i for i in part if i not in bad] for name, part in (
        ("training", range(len(train_files))), ("test", range(len(train_files), len(files))))}
    for name, good in parts.items():
        if not good:
            raise DatasetError(f"{root}: every {name} image is unreadable")
    mean, std = _statistics(moments, geometry, options)
    splits = []
    for good in parts.values():
        labels = torch.tensor([files[i][1] for i in good], dtype=torch.int64)
        if keep:
            images: Union[Tensor, FolderImages] = normalise(
                torch.from_numpy(np.stack([pixels[i] for i in good])), mean, std)
        else:
            images = FolderImages([files[i][0] for i in good], geometry, mean, std)
        splits += [images, labels]
    return ImageData(*splits)


LabelledFile = Tuple[Path, int]


def _paths(files: List[LabelledFile]) -> List[Path]:
    return [path for path, _ in files]


def _layout(root: Path) -> Tuple[List[LabelledFile], List[LabelledFile]]:
    """The training and test images of ``root``, the training ones in a seeded order."""
    order = torch.Generator().manual_seed(SPLIT_SEED)
    if (root / "train").is_dir():
        test_root = next((root / name for name in ("test", "val") if (root / name).is_dir()), None)
        if test_root is None:
            raise DatasetError(f"{root / 'train'} has no test folder beside it: expected "
                               f"{root / 'test'} or {root / 'val'} (or the class folders directly "
                               f"in {root})")
        if test_root.name == "test" and (root / "val").is_dir():
            _note(f"{root / 'val'} is not used: the test images are {test_root}, and "
                  "--validation-size holds validation images out of the training ones")
        others = [entry.name for entry in sorted(root.iterdir())
                  if entry.name not in ("train", "test", "val") and not entry.name.startswith(".")]
        if others:
            _note(f"{root}: ignored {', '.join(others)}: the images are in {root / 'train'} and "
                  f"{test_root}")
        train_classes, train_files = _classes(root / "train")
        test_classes, test_files = _classes(test_root)
        if train_classes != test_classes:
            missing = sorted(set(train_classes) - set(test_classes))
            extra = sorted(set(test_classes) - set(train_classes))
            raise DatasetError(
                f"{test_root}: its class folders differ from those of {root / 'train'}; expected "
                "the same"
                + (f"; missing from {test_root.name}: {', '.join(missing)}" if missing else "")
                + (f"; only in {test_root.name}: {', '.join(extra)}" if extra else "")
            )
        permutation = torch.randperm(len(train_files), generator=order).tolist()
        return [train_files[i] for i in permutation], test_files
    _, files = _classes(root)
    permutation = torch.randperm(len(files), generator=order).tolist()
    test_size = max(1, round(TEST_FRACTION * len(files)))
    return ([files[i] for i in permutation[test_size:]],
            sorted(files[i] for i in permutation[:test_size]))


def _classes(folder: Path) -> Tuple[List[str], List[LabelledFile]]:
    """The class folders of ``folder`` in sorted order and their images (sorted, sub-folders
    included), labelled with the class's position."""
    entries = sorted(entry for entry in folder.iterdir() if not entry.name.startswith("."))
    classes = [entry for entry in entries if entry.is_dir()]
    loose = [entry for entry in entries if not entry.is_dir()]
    if not classes:
        found = f"found {len(loose)} file(s) but no sub-folder" if loose else "it is empty"
        raise DatasetError(f"{folder}: expected one sub-folder of images per class (torchvision's "
                           f"ImageFolder layout), but {found}")
    if len(classes) < 2:
        raise DatasetError(f"{folder}: expected at least 2 class folders, but found only "
                           f"{classes[0].name}")
    files, ignored = [], list(loose)
    for label, class_folder in enumerate(classes):
        images = []
        for path in sorted(class_folder.rglob("*")):
            if path.is_dir() or any(part.startswith(".") for part in path.relative_to(folder).parts):
                continue
            (images if path.suffix.lower() in IMAGE_EXTENSIONS else ignored).append(path)
        if not images:
            raise DatasetError(f"{class_folder}: a class folder without images; expected files "
                               f"ending in {', '.join(IMAGE_EXTENSIONS)}")
        files += [(path, label) for path in images]
    if ignored:
        _note(f"{folder}: ignored {len(ignored)} file(s) that are not in a class folder or not "
              f"images by their name ({', '.join(IMAGE_EXTENSIONS)}), such as {ignored[0]}")
    return [entry.name for entry in classes], files


def _geometry(root: Path, files: List[LabelledFile], options: FolderOptions) -> Geometry:
    """Channels and size of the decoded images, from the headers (only Pillow's file header is
    read here); a file whose header cannot be read is left for the decoding to report."""
    from PIL import Image

    first: dict = {}  # (kind or size) -> a file with it
    for path, _ in files:
        try:
            with Image.open(path) as image:
                mode, size = image.mode, image.size
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
        first.setdefault("grayscale" if mode in GRAYSCALE_MODES else "colour", (path, mode))
        first.setdefault(size, path)
    kinds = {kind: first[kind] for kind in ("grayscale", "colour") if kind in first}
    sizes = {key: value for key, value in first.items() if isinstance(key, tuple)}
    if options.channels is None and len(kinds) == 2:
        (gray, gray_mode), (colour, colour_mode) = kinds["grayscale"], kinds["colour"]
        raise DatasetError(f"{root}: grayscale and colour images are mixed ({gray} is "
                           f"{gray_mode}, {colour} is {colour_mode}); pass --channels 1 or "
                           "--channels 3 to convert them all")
    if not sizes:
        return Geometry(options.channels or 1, 1, 1, options.image_size)  # all unreadable
    channels = options.channels or (1 if "grayscale" in kinds else 3)
    if options.image_size is not None:
        return Geometry(channels, options.image_size, options.image_size, options.image_size)
    if len(sizes) > 1:
        (size_a, path_a), (size_b, path_b) = list(sizes.items())[:2]
        raise DatasetError(f"{root}: images of different sizes ({path_a} is "
                           f"{size_a[0]}x{size_a[1]}, {path_b} is {size_b[0]}x{size_b[1]}); pass "
                           "--image-size N to resize and crop them all to N x N")
    (width, height), = sizes
    return Geometry(channels, height, width, None)


def decode(path: Path, geometry: Geometry) -> np.ndarray:
    """The pixels of ``path``: uint8 ``[C, H, W]``, converted to ``geometry.channels``, the
    shorter side resized to ``geometry.resize_to`` and the centre cropped (if it is set)."""
    from PIL import Image

    with Image.open(path) as image:
        mode = "L" if geometry.channels == 1 else "RGB"
        if image.mode != mode:  # a conversion copies: a sixth of the time of a small PNG
            image = image.convert(mode)
        if geometry.resize_to is not None and image.size != (geometry.resize_to,) * 2:
            size = geometry.resize_to
            scale = size / min(image.size)
            width, height = (max(size, round(side * scale)) for side in image.size)
            image = image.resize((width, height), Image.BILINEAR)
            left, top = (width - size) // 2, (height - size) // 2
            image = image.crop((left, top, left + size, top + size))
        pixels = np.asarray(image, dtype=np.uint8)
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    if pixels.shape != (geometry.channels, geometry.height, geometry.width):
        raise ValueError(f"decoded to {'x'.join(map(str, pixels.shape))} pixels, expected "
                         f"{geometry.channels}x{geometry.height}x{geometry.width}")
    return np.ascontiguousarray(pixels)


class _Decoder(torch.utils.data.Dataset):
    """Decodes the files of one item, a list of indices, with ``combine(paths, geometry)``: a
    batch per item, so that a worker process does a whole batch's work per message."""

    def __init__(self, files: Sequence[Path], geometry: Geometry,
                 combine: Callable[[List[Path], Geometry], object]):
        self.files, self.geometry, self.combine = files, geometry, combine

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, indices: Sequence[int]) -> object:
        return self.combine([self.files[int(i)] for i in indices], self.geometry)


Decoded = Tuple[Optional[np.ndarray], str]  # the pixels, or None and why not


def _decode_or_why(paths: List[Path], geometry: Geometry) -> List[Decoded]:
    results = []
    for path in paths:
        try:
            results.append((decode(path, geometry), ""))
        except Exception as error:  # Pillow raises many kinds for a damaged file: name the file
            results.append((None, f"{type(error).__name__}: {error}"))
    return results


def _stack(paths: List[Path], geometry: Geometry) -> Union[Tensor, str]:
    """The batch's pixels, or why a file could not be decoded: a message, not an exception,
    which a worker process would hand on wrapped in its traceback."""
    pixels = []
    for path in paths:
        try:
            pixels.append(decode(path, geometry))
        except Exception as error:  # the file changed since it was read at the start
            return (f"{path}: cannot read the image any more ({type(error).__name__}: {error}); "
                    "it was readable when the run started")
    return torch.from_numpy(np.stack(pixels))


def _loader(dataset: torch.utils.data.Dataset, items: Sequence, workers: int,
            pin_memory: bool = False) -> Iterator:
    """``dataset[item]`` for each item in order, decoded by ``workers`` processes ahead of the
    caller (0: in this process, when asked)."""
    if workers == 0:
        return (dataset[item] for item in items)
    # A generator of its own: the loader draws its workers' seeds from it, which would
    # otherwise advance torch's global generator, part of a run's state (decoding draws nothing).
    return iter(torch.utils.data.DataLoader(dataset, sampler=items, batch_size=None,
                                            num_workers=workers, pin_memory=pin_memory,
                                            collate_fn=_unchanged, generator=torch.Generator()))


def _unchanged(item: object) -> object:
    """DataLoader's collate function: the item as the dataset gave it (the default one would
    turn the numpy arrays of the first reading into tensors)."""
    return item


class Moments(NamedTuple):
    """Per-channel sums over the training images' pixels in [0, 1], in float64."""

    count: int  # pixels per channel
    total: np.ndarray
    squares: np.ndarray


def _read_all(files: List[LabelledFile], train_count: int, geometry: Geometry,
              options: FolderOptions, keep: bool
              ) -> Tuple[Dict[int, np.ndarray], Dict[int, str], Moments]:
    """Decode every file once: the pixels by index (if ``keep``), the unreadable files by index
    with the reason, and the moments of the first ``train_count`` (the training images). One
    image at a time: no copy of the whole set unless it is kept."""
    decoder = _Decoder(_paths(files), geometry, _decode_or_why)
    chunks = [list(range(start, min(start + 256, len(files))))
              for start in range(0, len(files), 256)]
    pixels: Dict[int, np.ndarray] = {}
    bad: Dict[int, str] = {}
    count, total, squares = 0, np.zeros(geometry.channels), np.zeros(geometry.channels)
    for chunk, results in zip(chunks, _loader(decoder, chunks, options.workers)):
        for index, (image, why) in zip(chunk, results):
            if image is None:
                bad[index] = why
                continue
            if keep:
                pixels[index] = image
            if index < train_count:
                scaled = image.reshape(geometry.channels, -1).astype(np.float64) / 255.0
                count += scaled.shape[1]
                total += scaled.sum(1)
                squares += (scaled * scaled).sum(1)
    return pixels, bad, Moments(count, total, squares)


def _report_bad(bad: Dict[int, str], files: List[LabelledFile], policy: str) -> None:
    indices = sorted(bad)
    if policy == "stop":
        others = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DatasetError(f"{files[indices[0]][0]}: cannot read the image ({bad[indices[0]]})"
                           f"{others}; fix or remove it, or pass --bad-images skip to leave "
                           "unreadable images out")
    for index in indices:
        _note(f"left out {files[index][0]}: cannot read the image ({bad[index]})")


def _statistics(moments: Moments, geometry: Geometry,
                options: FolderOptions) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and standard deviation of pixels in [0, 1], as ``[1, C, 1, 1]``: the
    given ones, or those of the training images."""
    channels = geometry.channels
    if options.mean is not None:
        values = [options.mean, options.std]
        for name, given in zip(("--mean", "--std"), values):
            if len(given) not in (1, channels):
                raise DatasetError(f"{name} needs 1 or {channels} value(s) (the images have "
                                   f"{channels} channel(s)), but got {len(given)}")
    else:
        mean = moments.total / moments.count
        variance = (moments.squares - moments.count * mean * mean) / max(moments.count - 1, 1)
        std = np.sqrt(np.maximum(variance, 0.0))
        if (std == 0).any():
            raise DatasetError("the training images have a channel of one constant value (standard "
                               "deviation 0): they cannot be normalised; pass --mean and --std")
        values = [mean, std]
    return tuple(torch.tensor(np.broadcast_to(np.asarray(v, dtype=np.float64), (channels,)),
                              dtype=torch.float32).reshape(1, -1, 1, 1) for v in values)


def normalise(pixels: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 ``[N, C, H, W]`` to normalised float32, the same operations, in memory or not."""
    return (pixels.float() / 255.0 - mean.to(pixels.device)) / std.to(pixels.device)


def _fits_in_memory(count: int, geometry: Geometry, processes: int) -> bool:
    size = count * geometry.channels * geometry.height * geometry.width * 4  # float32
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return size * processes <= memory // 4


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


class FolderImages:
    """Images decoded from their files when they are asked for; what a tensor of images is to
    the training script, for data that does not fit in memory.

    ``images[indices]`` (an int64 tensor) is a normalised float32 tensor ``[len(indices), C, H,
    W]`` on the device of ``images.to(device)``; ``images[start:stop:step]`` is a
    :class:`FolderImages` of those files, decoded by :meth:`load` or by indexing."""

    def __init__(self, files: Sequence[Path], geometry: Geometry, mean: Tensor, std: Tensor,
                 device: Union[str, torch.device] = "cpu"):
        self.files, self.geometry, self.mean, self.std = list(files), geometry, mean, std
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        return (len(self.files), self.geometry.channels, self.geometry.height, self.geometry.width)

    def to(self, device: Union[str, torch.device]) -> "FolderImages":
        return FolderImages(self.files, self.geometry, self.mean, self.std, device)

    def __getitem__(self, index: Union[slice, Tensor]) -> Union["FolderImages", Tensor]:
        if isinstance(index, slice):
            return FolderImages(self.files[index], self.geometry, self.mean, self.std, self.device)
        return self._finish(self._decoder()[index.cpu().tolist()])

    def load(self) -> Tensor:
        """All the images, decoded."""
        return self[torch.arange(len(self))]

    def stream(self, batches: Sequence[Tensor], workers: int) -> Iterator[Tensor]:
        """``self[indices]`` for every ``indices`` of ``batches`` in turn, decoded by ``workers``
        processes ahead of the caller (0: in this process, when asked)."""
        items = [indices.cpu().tolist() for indices in batches]
        pin = self.device.type == "cuda"
        return (self._finish(pixels) for pixels in _loader(self._decoder(), items, workers, pin))

    def _decoder(self) -> _Decoder:
        return _Decoder(self.files, self.geometry, _stack)

    def _finish(self, pixels: Union[Tensor, str]) -> Tensor:
        if isinstance(pixels, str):
            raise DatasetError(pixels)
        return normalise(pixels.to(self.device, non_blocking=True), self.mean, self.std)
