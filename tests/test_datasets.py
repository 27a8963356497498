import gzip
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from datasets import DatasetError, load_dataset  # noqa: E402


def write_idx(path, array, compress):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def write_fashion_mnist(folder, compress=True, train=12, test=5):
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    for prefix, n in (("train", train), ("t10k", test)):
        write_idx(
            folder / f"{prefix}-images-idx3-ubyte{suffix}",
            rng.integers(0, 256, (n, 28, 28)),
            compress,
        )
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, compress)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_reads_idx_files(tmp_path, compress):
    write_fashion_mnist(tmp_path, compress)
    data = load_dataset("fashion-mnist", str(tmp_path))
    assert data.train_images.shape == (12, 1, 28, 28) and data.test_images.shape == (5, 1, 28, 28)
    assert data.train_images.dtype == torch.float32 and data.train_labels.dtype == torch.int64
    assert data.train_labels.tolist() == [i % 10 for i in range(12)]
    assert data.num_classes == 10 and data.in_channels == 1
    # normalised with the training split's statistics
    assert abs(data.train_images.mean().item()) < 1e-5
    assert abs(data.train_images.std().item() - 1) < 1e-4


def test_fashion_mnist_pixel_values_survive_the_round_trip(tmp_path):
    write_fashion_mnist(tmp_path)
    raw = np.frombuffer(
        gzip.decompress((tmp_path / "train-images-idx3-ubyte.gz").read_bytes())[16:], np.uint8
    ).reshape(12, 1, 28, 28)
    data = load_dataset("fashion-mnist", str(tmp_path))
    scaled = torch.from_numpy(raw.astype(np.float32) / 255)
    expected = (scaled - scaled.mean()) / scaled.std()
    torch.testing.assert_close(data.train_images, expected)


def test_fashion_mnist_missing_folder_names_path_and_files(tmp_path):
    with pytest.raises(DatasetError, match=r"missing.*expected train-images-idx3-ubyte or "
                       r"train-images-idx3-ubyte\.gz.*dataset-fashion-mnist"):
        load_dataset("fashion-mnist", str(tmp_path / "missing"))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda raw: raw[:100], "cannot read or decompress"),
        (lambda raw: gzip.compress(b"\0\0\x0d\x03" + gzip.decompress(raw)[4:]), "magic number"),
        (lambda raw: gzip.compress(gzip.decompress(raw)[:-7]), r"announces shape \(12, 28, 28\)"),
        (lambda raw: gzip.compress(b"hello"), "not an IDX file"),
    ],
    ids=["truncated-gzip", "wrong-dtype", "short-data", "garbage"],
)
def test_fashion_mnist_corrupt_images(tmp_path, corrupt, message):
    write_fashion_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(DatasetError, match=f"train-images-idx3-ubyte.gz: .*{message}"):
        load_dataset("fashion-mnist", str(tmp_path))


def test_fashion_mnist_label_problems(tmp_path):
    write_fashion_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(4), compress=True)
    with pytest.raises(DatasetError, match="t10k-images has 5 images but t10k-labels has 4"):
        load_dataset("fashion-mnist", str(tmp_path))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 12]), compress=True)
    with pytest.raises(DatasetError, match=r"expected labels in \[0, 9\], but found 0..12"):
        load_dataset("fashion-mnist", str(tmp_path))


def write_cifar100(folder, train=6, test=3, labels_key=b"fine_labels"):
    rng = np.random.default_rng(1)
    release = folder / "cifar-100-python"
    release.mkdir()
    for name, n in (("train", train), ("test", test)):
        content = {
            b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
            labels_key: [int(i) for i in rng.integers(0, 100, n)],
        }
        (release / name).write_bytes(pickle.dumps(content))
    return release


def test_cifar100_reads_the_pickle_release_from_either_folder(tmp_path):
    release = write_cifar100(tmp_path)
    for folder in (tmp_path, release):
        data = load_dataset("cifar100", str(folder))
        assert data.train_images.shape == (6, 3, 32, 32) and data.test_labels.shape == (3,)
    content = pickle.loads((release / "train").read_bytes())
    raw = torch.from_numpy(content[b"data"].reshape(6, 3, 32, 32).astype(np.float32) / 255)
    mean, std = raw.mean((0, 2, 3), keepdim=True), raw.std((0, 2, 3), keepdim=True)
    torch.testing.assert_close(data.train_images, (raw - mean) / std)
    assert data.train_labels.tolist() == content[b"fine_labels"]


def test_cifar100_errors(tmp_path):
    with pytest.raises(DatasetError, match="cifar100 needs --data-dir"):
        load_dataset("cifar100")
    with pytest.raises(DatasetError, match=r"expected the file `train` of the CIFAR-100"):
        load_dataset("cifar100", str(tmp_path))
    release = write_cifar100(tmp_path, labels_key=b"coarse_labels")
    with pytest.raises(DatasetError, match=r"train: expected b'fine_labels' with one label"):
        load_dataset("cifar100", str(tmp_path))
    (release / "train").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match=r"train: not a readable python pickle"):
        load_dataset("cifar100", str(tmp_path))
    (release / "train").write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8)}))
    with pytest.raises(DatasetError, match=r"uint8 array of shape \(N, 3072\), but got shape"):
        load_dataset("cifar100", str(tmp_path))


def test_digits_split_is_fixed_and_normalised():
    pytest.importorskip("sklearn")
    first, second = load_dataset("digits"), load_dataset("digits")
    assert first.train_images.shape == (1438, 1, 8, 8) and first.test_images.shape == (359, 1, 8, 8)
    assert torch.equal(first.test_labels, second.test_labels)
    assert first.num_classes == 10
    assert abs(first.train_images.mean().item()) < 1e-5


def test_unknown_dataset():
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'; expected one of digits"):
        load_dataset("mnist")
