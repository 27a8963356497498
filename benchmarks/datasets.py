"""In-memory image classification datasets for the training script.

``load_dataset(name, data_dir=None)`` returns an :class:`ImageData`: normalised float32 images
``Tensor[N, C, H, W]`` and int64 labels ``Tensor[N]`` for a training and a test split.

* ``"digits"``: scikit-learn's 8x8 hand-written digits (1,797 images, 10 classes; installed
  with ``pip install mkfkit[demo]``, nothing is downloaded). The split is fixed: a seeded
  permutation puts 20% of the images in the test set.
* ``"fashion-mnist"``: the four standard IDX files (``train-images-idx3-ubyte`` and so on,
  gzip-compressed or not) in ``data_dir``, by default ``/usr/share/datasets/fashion-mnist``
  where the Debian package ``dataset-fashion-mnist`` puts them.
* ``"cifar100"``: the python-pickle release (``cifar-100-python/train`` and ``.../test``) in
  ``data_dir`` or in ``data_dir/cifar-100-python``. Pickle files can run code when loaded: only
  point this at a copy you trust.

Images are normalised per channel with the mean and standard deviation of the training split.
Anything missing or malformed raises :class:`DatasetError` with the path and what was expected.
A folder of the user's own images (``train.py --dataset folder``) is read by
``image_folder.py``, into the same :class:`ImageData`.
"""

from __future__ import annotations

import gzip
import pickle
import zlib
from pathlib import Path
from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["DATASETS", "FASHION_MNIST_DIR", "DatasetError", "ImageData", "load_dataset"]

DATASETS = ("digits", "fashion-mnist", "cifar100")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


class DatasetError(Exception):
    """A dataset is missing or malformed; the message names the path and what was expected."""


class ImageData(NamedTuple):
    train_images: Tensor  # float32 Tensor[N, C, H, W], normalised
    train_labels: Tensor  # int64 Tensor[N]
    test_images: Tensor  # float32 Tensor[M, C, H, W], normalised like the training images
    test_labels: Tensor  # int64 Tensor[M]

    @property
    def num_classes(self) -> int:
        return int(self.train_labels.max()) + 1

    @property
    def in_channels(self) -> int:
        return self.train_images.shape[1]


def load_dataset(name: str, data_dir: Optional[str] = None) -> ImageData:
    """Load ``name`` (one of :data:`DATASETS`) from ``data_dir`` (see the module docstring)."""
    if name == "digits":
        train, test = _digits()
    elif name == "fashion-mnist":
        train, test = _fashion_mnist(Path(data_dir or FASHION_MNIST_DIR))
    elif name == "cifar100":
        if data_dir is None:
            raise DatasetError("cifar100 needs --data-dir: the folder of the python-pickle release")
        train, test = _cifar100(Path(data_dir))
    else:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    (train_images, train_labels), (test_images, test_labels) = train, test
    mean = train_images.mean(dim=(0, 2, 3), keepdim=True)
    std = train_images.std(dim=(0, 2, 3), keepdim=True)
    return ImageData(
        (train_images - mean) / std, train_labels, (test_images - mean) / std, test_labels
    )


Split = Tuple[Tensor, Tensor]


def _digits() -> Tuple[Split, Split]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetError(
            "the digits dataset needs scikit-learn: pip install 'mkfkit[demo]'"
        ) from None
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    test, train = order[: len(order) // 5], order[len(order) // 5 :]
    return (images[train], labels[train]), (images[test], labels[test])


def _fashion_mnist(folder: Path) -> Tuple[Split, Split]:
    splits = []
    for prefix in ("train", "t10k"):
        images = _read_idx(folder, f"{prefix}-images-idx3-ubyte", ndim=3)
        labels = _read_idx(folder, f"{prefix}-labels-idx1-ubyte", ndim=1)
        if len(images) != len(labels):
            raise DatasetError(
                f"{folder}: {prefix}-images has {len(images)} images but {prefix}-labels has "
                f"{len(labels)} labels; expected the same number"
            )
        _check_labels(labels, 10, f"{folder}/{prefix}-labels-idx1-ubyte")
        splits.append(
            (
                torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1),
                torch.from_numpy(labels.astype(np.int64)),
            )
        )
    return splits[0], splits[1]


def _read_idx(folder: Path, name: str, ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes with ``ndim`` dimensions (``name`` or ``name.gz``)."""
    path = next((p for p in (folder / name, folder / f"{name}.gz") if p.is_file()), None)
    if path is None:
        raise DatasetError(
            f"{folder}: expected {name} or {name}.gz (the standard Fashion-MNIST IDX files), "
            "but found neither. Install them with `apt-get install dataset-fashion-mnist` "
            "or pass --data-dir"
        )
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise DatasetError(f"{path}: cannot read or decompress the file ({error})") from None
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:2] != b"\0\0" or raw[2] != 0x08 or raw[3] != ndim:
        raise DatasetError(
            f"{path}: not an IDX file of unsigned bytes with {ndim} dimension(s) "
            f"(expected the magic number 0x0000080{ndim}, got 0x{raw[:4].hex()})"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != int(np.prod(shape)):
        raise DatasetError(
            f"{path}: the header announces shape {shape} ({int(np.prod(shape))} bytes of data), "
            f"but the file holds {len(raw) - header} bytes after the header"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _cifar100(folder: Path) -> Tuple[Split, Split]:
    if not (folder / "train").is_file() and (folder / "cifar-100-python").is_dir():
        folder = folder / "cifar-100-python"
    splits = []
    for name, size in (("train", 50000), ("test", 10000)):
        path = folder / name
        if not path.is_file():
            raise DatasetError(
                f"{folder}: expected the file `{name}` of the CIFAR-100 python release "
                "(cifar-100-python/train and cifar-100-python/test), but it does not exist"
            )
        try:
            with open(path, "rb") as file:
                content = pickle.load(file, encoding="bytes")
        except Exception as error:  # any unpickling failure means the file is not the release
            raise DatasetError(f"{path}: not a readable python pickle ({error!r})") from None
        data = content.get(b"data") if isinstance(content, dict) else None
        labels = content.get(b"fine_labels") if isinstance(content, dict) else None
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or (
            data.shape[1] != 3 * 32 * 32
        ):
            got = f"shape {data.shape}, dtype {data.dtype}" if isinstance(data, np.ndarray) else (
                type(data).__name__
            )
            raise DatasetError(
                f"{path}: expected a dict whose b'data' is a uint8 array of shape (N, 3072), "
                f"but got {got}"
            )
        if labels is None or len(labels) != len(data):
            raise DatasetError(
                f"{path}: expected b'fine_labels' with one label per image ({len(data)}), but got "
                f"{'none' if labels is None else len(labels)}"
            )
        labels = np.asarray(labels, dtype=np.int64)
        _check_labels(labels, 100, str(path))
        if len(data) != size:
            print(f"note: {path} holds {len(data)} images (the release has {size})")
        images = torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
        splits.append((images, torch.from_numpy(labels)))
    return splits[0], splits[1]


def _check_labels(labels: np.ndarray, num_classes: int, path: str) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(
            f"{path}: expected labels in [0, {num_classes - 1}], but found "
            f"{labels.min()}..{labels.max()}"
        )
