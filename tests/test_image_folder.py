"""``--dataset folder``: the user's own images in torchvision's ImageFolder layout.

The tests write small folders of PNGs (three classes) into tmp_path. A study on them trains,
validates, streams from the files exactly as it trains from memory, resumes bit for bit, runs
under torchrun with two processes, and every mistake in a folder ends in a one-line error that
names the path.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _subprocess import script_environment

pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import train  # noqa: E402
from datasets import DatasetError  # noqa: E402
from image_folder import FolderImages, FolderOptions, load_image_folder  # noqa: E402

CLASSES = ["cat", "dog", "fox"]
# 36 training images, batch 8: 4 steps per epoch on the 32 left after 4 validation images.
TINY = ["--dataset", "folder", "--device", "cpu", "--batch-size", "8", "--epochs", "2",
        "--seeds", "0", "--blocks", "1", "1", "--widths", "4", "8", "--no-progress",
        "--methods", "baseline", "mkf-qp", "--validation-size", "4"]


def write_images(folder, count, size=(12, 10), mode="L", seed=0):
    """``count`` PNGs per class in ``folder/CLASS/``, each class a different brightness."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
            pixels = (rng.integers(0, 120, shape) + 60 * label).astype(np.uint8)
            Image.fromarray(pixels).convert(mode).save(folder / name / f"{index:03d}.png")
    return folder


@pytest.fixture
def split_folder(tmp_path):
    """``images/train`` (12 per class) and ``images/test`` (3 per class)."""
    write_images(tmp_path / "images" / "train", 12)
    write_images(tmp_path / "images" / "test", 3, seed=1)
    return tmp_path / "images"


def read(folder, **options):
    return load_image_folder(str(folder), FolderOptions(**options))


def test_labels_follow_the_sorted_class_folders_and_pixels_survive(split_folder):
    data = read(split_folder)
    assert data.train_images.shape == (36, 1, 10, 12) and data.test_images.shape == (9, 1, 10, 12)
    assert data.num_classes == 3 and data.in_channels == 1
    assert data.test_labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # the training images in a seeded order that mixes the classes (a subset takes all of them)
    assert sorted(data.train_labels.tolist()) == [0] * 12 + [1] * 12 + [2] * 12
    assert set(data.train_labels[:9].tolist()) == {0, 1, 2}
    assert torch.equal(data.train_labels, read(split_folder).train_labels)
    # normalised with the training images' statistics (the test image too)
    assert abs(data.train_images.mean().item()) < 1e-5
    assert abs(data.train_images.std().item() - 1) < 1e-3
    raw = torch.from_numpy(np.array(Image.open(split_folder / "test" / "dog" / "001.png")))
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(path))) for path in
                          sorted((split_folder / "train").rglob("*.png"))]).float() / 255
    expected = (raw.float() / 255 - pixels.mean()) / pixels.std()
    torch.testing.assert_close(data.test_images[4, 0], expected)


def test_streamed_images_equal_the_cached_ones_bit_for_bit(split_folder):
    cached, streamed = read(split_folder, cache="memory"), read(split_folder, cache="none")
    assert isinstance(streamed.train_images, FolderImages)
    assert streamed.train_images.shape == cached.train_images.shape
    indices = torch.tensor([5, 0, 33])
    assert torch.equal(streamed.train_images[indices], cached.train_images[indices])
    assert torch.equal(streamed.test_images[2:7].load(), cached.test_images[2:7])
    batches = [torch.arange(0, 16), torch.arange(16, 36)]
    for workers in (0, 2):
        stream = list(streamed.train_images.stream(batches, workers))
        assert all(torch.equal(b, cached.train_images[i]) for b, i in zip(stream, batches))


def test_one_folder_is_split_into_training_and_test_images(tmp_path):
    write_images(tmp_path, 10)
    data = read(tmp_path)
    assert (len(data.train_labels), len(data.test_labels)) == (24, 6)  # 20 % for the test
    train_pixels = {tuple(image.flatten().tolist()) for image in data.train_images}
    assert not train_pixels & {tuple(image.flatten().tolist()) for image in data.test_images}
    assert torch.equal(read(tmp_path).test_images, data.test_images)  # the same split every time


def test_sizes_and_channels_are_converted_when_asked(tmp_path):
    write_images(tmp_path / "train", 2, size=(20, 12), mode="RGB")
    write_images(tmp_path / "val", 1, size=(9, 9), mode="RGB")
    data = read(tmp_path, image_size=8, channels=1, mean=[0.5], std=[0.25])
    assert data.train_images.shape == (6, 1, 8, 8) and data.test_images.shape == (3, 1, 8, 8)
    # the given statistics: a pixel of 0 is (0 - 0.5) / 0.25
    assert data.train_images.min() >= -2 and data.train_images.max() <= 2
    colour = read(tmp_path, image_size=8)
    assert colour.in_channels == 3


def bad(tmp_path, damage):
    """A folder with images in train/ and test/, then ``damage(root)``."""
    write_images(tmp_path / "d" / "train", 2)
    write_images(tmp_path / "d" / "test", 1)
    damage(tmp_path / "d")
    return tmp_path / "d"


def corrupt(root):
    (root / "train" / "dog" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")


def remove(*folders):
    for folder in folders:
        shutil.rmtree(folder)


def replace_by_file(root):
    remove(root)
    root.write_text("")


def loose_files(root):
    remove(*(root / "train").iterdir())
    (root / "train" / "a.png").write_text("")


BAD_FOLDERS = [
    ("missing", remove, "d: no such folder"),
    ("a-file", replace_by_file,
     "d: not a folder; expected a folder with one sub-folder of images per class"),
    ("empty", lambda root: remove(*(root / "train").iterdir()),
     "d/train: expected one sub-folder of images per class (torchvision's ImageFolder "
     "layout), but it is empty"),
    ("loose-files", loose_files,
     "d/train: expected one sub-folder of images per class (torchvision's ImageFolder layout), "
     "but found 1 file(s) but no sub-folder"),
    ("one-class", lambda root: remove(*root.glob("*/[df]*")),
     "d/train: expected at least 2 class folders, but found only cat"),
    ("class-without-images", lambda root: [path.unlink() for path in root.glob("train/fox/*")],
     "d/train/fox: a class folder without images; expected files ending in .png, .jpg"),
    ("no-test-folder", lambda root: remove(root / "test"),
     "d/train has no test folder beside it: expected "),
    ("classes-differ", lambda root: (root / "test" / "fox").rename(root / "test" / "wolf"),
     "d/test: its class folders differ from those of "),
    ("corrupt", corrupt, "d/train/dog/001.png: cannot read the image ("),
    ("gray-and-colour", lambda root: Image.new("RGB", (12, 10)).save(root / "test/cat/000.png"),
     "d: grayscale and colour images are mixed ("),
    ("sizes-differ", lambda root: Image.new("L", (11, 10)).save(root / "test/cat/000.png"),
     "d: images of different sizes ("),
    ("constant", lambda root: [Image.new("L", (12, 10)).save(p) for p in root.rglob("*.png")],
     "the training images have a channel of one constant value"),
]


@pytest.mark.parametrize("damage, message", [case[1:] for case in BAD_FOLDERS],
                         ids=[case[0] for case in BAD_FOLDERS])
def test_a_bad_folder_is_one_error_naming_the_path(tmp_path, damage, message):
    root = bad(tmp_path, damage)
    with pytest.raises(DatasetError) as error:
        read(root)
    text = str(error.value).replace(str(tmp_path) + "/", "")
    assert "\n" not in text and message in text, text


def test_classes_that_differ_are_named(tmp_path):
    root = bad(tmp_path, lambda root: (root / "test" / "fox").rename(root / "test" / "wolf"))
    with pytest.raises(DatasetError, match="missing from test: fox; only in test: wolf"):
        read(root)


def test_unreadable_images_stop_or_are_left_out_each_with_a_note(tmp_path, capsys):
    root = bad(tmp_path, corrupt)
    (root / "test" / "cat" / "000.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"\(and 1 more\); fix or remove it, or pass "
                                           "--bad-images skip"):
        read(root)
    data = read(root, bad_images="skip")
    assert (len(data.train_labels), len(data.test_labels)) == (5, 2)
    notes = capsys.readouterr().err.splitlines()
    assert [line.split(": cannot")[0] for line in notes] == [
        f"note: left out {root}/train/dog/001.png", f"note: left out {root}/test/cat/000.png"]


def test_files_that_are_not_images_are_ignored_with_a_note(tmp_path, capsys):
    root = bad(tmp_path, lambda root: (root / "train" / "cat" / "notes.txt").write_text(""))
    assert len(read(root).train_labels) == 6
    assert capsys.readouterr().err == (
        f"note: {root}/train: ignored 1 file(s) that are not in a class folder or not images by "
        f"their name (.png, .jpg, .jpeg, .bmp, .gif, .tif, .tiff, .webp, .ppm, .pgm, .pbm), such "
        f"as {root}/train/cat/notes.txt\n")


def script(*arguments, cwd, launcher=()):
    return subprocess.run([sys.executable, *launcher, str(BENCHMARKS / "train.py"), *TINY,
                           *arguments], cwd=cwd, env=script_environment(), capture_output=True,
                          text=True, timeout=300)


def test_the_script_ends_a_bad_folder_with_exit_2_and_one_line(tmp_path):
    root = bad(tmp_path, corrupt)
    done = script("--data-dir", str(root), cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"error: {root}/train/dog/001.png: cannot read the image")


FOLDER = ["--dataset", "folder", "--data-dir", "d"]


@pytest.mark.parametrize("arguments, message", [
    (["--dataset", "folder"], "--dataset folder needs --data-dir DIR"),
    ([*FOLDER, "--image-size", "0"], "--image-size must be >= 1, but got 0"),
    ([*FOLDER, "--workers", "-1"], "--workers must be >= 0, but got -1"),
    ([*FOLDER, "--mean", "0.5"], "--mean and --std go together: pass both or neither"),
    ([*FOLDER, "--mean", "0.5", "--std", "0"], "--std must be > 0, but got 0.0"),
    (["--cache", "none"], "--cache applies to --dataset folder only, but got --dataset digits"),
])
def test_folder_options_are_checked(capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(arguments)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and message in error, error


def equal(a, b):
    """Exact equality of nested states (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b) and a.dtype == b.dtype
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b


def final_state(path, *extra):
    return train.load_checkpoint(str(path), train.parse_args(TINY + ["--data-dir", "d", *extra]))


@pytest.mark.slow
def test_a_study_on_a_folder_validates_streams_and_resumes_bit_for_bit(split_folder, tmp_path):
    """Trained from memory in one go, and from the files (two decoding processes), stopped in
    the second epoch of the MKF run and resumed in a fresh process: the same state."""
    folder = ["--data-dir", str(split_folder), "--evaluate", "validation"]
    whole = script(*folder, "--cache", "memory", "--checkpoint", "whole.pt", "--out", "whole",
                   cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    streamed = [*folder, "--cache", "none", "--workers", "2", "--checkpoint", "resumed.pt",
                "--out", "resumed"]
    stopped = script(*streamed, "--stop-after", "14", cwd=tmp_path)
    assert stopped.returncode == 0 and "stopped after 14 steps" in stopped.stdout, stopped.stderr
    middle = final_state(tmp_path / "resumed.pt", *folder[2:])["current"]
    assert (middle["method"], middle["epoch"], middle["batch_in_epoch"]) == ("mkf-qp", 1, 2)
    resumed = script(*streamed, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    first = final_state(tmp_path / "whole.pt", *folder[2:])
    second = final_state(tmp_path / "resumed.pt", *folder[2:])
    assert equal(first["current"], {**second["current"],
                                    "train_seconds": first["current"]["train_seconds"]})
    histories = {key: run["history"] for key, run in first["results"].items()}
    assert histories == {key: run["history"] for key, run in second["results"].items()}
    report = json.loads((tmp_path / "whole" / "train_folder.json").read_text())
    assert report["config"]["evaluate"] == "validation"
    assert [len(run["history"]) for run in report["runs"]] == [2, 2]


@pytest.mark.slow
def test_two_processes_under_torchrun_read_their_shares_and_agree(split_folder, tmp_path):
    done = script("--data-dir", str(split_folder), "--cache", "none", "--workers", "1",
                  "--out", "out", cwd=tmp_path,
                  launcher=["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                            "2"])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads((tmp_path / "out" / "train_folder.json").read_text())
    assert report["config"]["processes"] == 2
    for run in report["runs"]:
        digests = run["process_state_sha256"]
        assert len(digests) == 2 and len(set(digests)) == 1


def test_an_image_that_breaks_during_a_run_is_one_error_naming_it(split_folder):
    streamed = read(split_folder, cache="none")
    index = next(i for i, path in enumerate(streamed.train_images.files) if path.name == "004.png")
    streamed.train_images.files[index].write_bytes(b"")
    for workers in (0, 1):
        with pytest.raises(DatasetError, match=r"004.png: cannot read the image any more \(.*"
                                               r"it was readable when the run started"):
            list(streamed.train_images.stream([torch.tensor([0, index])], workers))


def test_what_lies_beside_train_and_test_is_ignored_with_a_note(tmp_path, capsys):
    root = bad(tmp_path, lambda root: ((root / "val").mkdir(), (root / "notes.txt").write_text("")))
    read(root)
    assert capsys.readouterr().err == (
        f"note: {root}/val is not used: the test images are {root}/test, and --validation-size "
        "holds validation images out of the training ones\n"
        f"note: {root}: ignored notes.txt: the images are in {root}/train and {root}/test\n")


@pytest.mark.slow
def test_bench_folder_times_memory_against_streaming(split_folder, tmp_path):
    command = [sys.executable, str(BENCHMARKS / "bench_folder.py"), "--data-dir", str(split_folder),
               "--batch-size", "8", "--batches", "2", "--rounds", "1", "--widths", "4", "4", "4",
               "--workers", "0", "1", "--json", str(tmp_path / "folder.json")]
    done = subprocess.run(command, env=script_environment(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = json.loads((tmp_path / "folder.json").read_text())["rows"]
    assert [row["variant"] for row in rows] == ["memory", "workers 0", "workers 1"]
    assert rows[0]["wall_vs_memory"] == rows[0]["cpu_vs_memory"] == 1.0
    assert all(row["wall"] > 0 and row["cpu"] > 0 for row in rows)
