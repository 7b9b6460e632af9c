"""Tests for fedpggan.data: loaders, validation errors, phantom generator, partitioning."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from fedpggan.data import (ImageDataset, open_dataset, open_phantom, partition, partition_summary,
                           partition_table)
from fedpggan.data import medmnist
from fedpggan.errors import FedPGGANError

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_npz(path: Path, n: tuple[int, int, int] = (12, 4, 6), size: int = 8, rgb: bool = False,
              classes: int = 2, seed: int = 0, **override: np.ndarray) -> Path:
    """A tiny MedMNIST-layout npz: every split has labels 0..classes-1 cycling, shape (N,1)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        shape = (count, size, size, 3) if rgb else (count, size, size)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(count) % classes).astype(np.uint8)[:, None]
    arrays.update(override)
    np.savez(path, **arrays)
    return path


def one_line_error(excinfo: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


# ---------------------------------------------------------------- phantom

@pytest.mark.parametrize("size,channels,classes", [(28, 1, 2), (64, 3, 5), (28, 3, 5), (64, 1, 2)])
def test_phantom_shapes_range_and_classes(size, channels, classes):
    ds = open_phantom("train", n=100, image_size=size, num_classes=classes, channels=channels, seed=3)
    assert ds.images.shape == (100, channels, size, size) and ds.images.dtype == torch.float32
    assert ds.labels.dtype == torch.int64 and ds.labels.shape == (100,)
    assert ds.images.min() >= -1 and ds.images.max() <= 1 and ds.images.std() > 0.2
    assert ds.num_classes == classes == len(ds.class_names) and min(ds.class_counts()) >= 100 // classes
    assert (ds.channels, ds.image_size, ds.is_medical, ds.name) == (channels, size, False, "phantom")
    image, label = ds[0]
    assert image.shape == (channels, size, size) and isinstance(label, int)


def test_phantom_deterministic_and_splits_differ():
    a, b = open_phantom("train", 50, seed=1), open_phantom("train", 50, seed=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, open_phantom("train", 50, seed=2).images)
    assert not torch.equal(a.images, open_phantom("test", 50, seed=1).images)
    assert not torch.equal(open_phantom("val", 50).images, open_phantom("test", 50).images)


def test_phantom_defaults_via_open_dataset_are_fast():
    start = time.perf_counter()
    train = open_dataset("phantom")
    assert time.perf_counter() - start < 2.0
    assert len(train) == 2000 and train.images.shape[1:] == (1, 28, 28)
    assert train.class_names == ["no lesion", "lesion"] and train.class_counts() == [1000, 1000]
    assert train.source == "built-in (procedural)"
    assert len(open_dataset("phantom", split="val")) == len(open_dataset("phantom", split="test")) == 400
    assert open_dataset("phantom", image_size=32).image_size == 32


@pytest.fixture
def one_thread():
    """Tiny CPU models run fastest (and steadiest on a busy machine) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_phantom_classes_are_separable_by_a_small_cnn(one_thread):
    torch.manual_seed(0)
    train, test = open_phantom("train", 400), open_phantom("test", 200)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 5, padding=2), torch.nn.ReLU(),
                              torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 2))
    for _ in range(3):
        for idx in torch.randperm(len(train)).split(50):
            net.zero_grad()
            torch.nn.functional.cross_entropy(net(train.images[idx]), train.labels[idx]).backward()
            with torch.no_grad():  # plain SGD: torch.optim's first import alone takes seconds
                for p in net.parameters():
                    p -= 0.5 * p.grad
    with torch.no_grad():
        accuracy = (net(test.images).argmax(1) == test.labels).float().mean().item()
    assert accuracy > 0.9


@pytest.mark.parametrize("kwargs", [{"num_classes": 1}, {"num_classes": 11}, {"channels": 2}, {"n": 1}])
def test_phantom_rejects_bad_arguments(kwargs):
    with pytest.raises(FedPGGANError) as excinfo:
        open_phantom("train", **{"n": 20, **kwargs})
    one_line_error(excinfo, "phantom")


# ---------------------------------------------------------------- npz

def test_npz_round_trip_grayscale(tmp_path):
    path = write_npz(tmp_path / "mine.npz")
    raw = np.load(path)
    ds = open_dataset(str(path))
    assert ds.images.shape == (12, 1, 8, 8) and ds.class_names == ["class_0", "class_1"]
    assert torch.allclose(ds.images[:, 0], torch.from_numpy(raw["train_images"]).float() / 127.5 - 1)
    assert ds.labels.tolist() == raw["train_labels"][:, 0].tolist()
    assert (ds.name, ds.source, ds.is_medical) == (str(path), str(path.resolve()), True)
    assert len(open_dataset(str(path), split="val")) == 4 and len(open_dataset(str(path), split="test")) == 6


def test_npz_rgb_with_flat_labels(tmp_path):
    path = tmp_path / "rgb.npz"
    write_npz(path, rgb=True, classes=3, train_labels=np.arange(12) % 3)
    ds = open_dataset(str(path))
    raw = np.load(path)["train_images"]
    assert ds.channels == 3 and ds.num_classes == 3 and ds.class_counts() == [4, 4, 4]
    assert torch.allclose(ds.images[5, 2], torch.from_numpy(raw[5, :, :, 2]).float() / 127.5 - 1)


def test_npz_known_stem_gets_medmnist_class_names(tmp_path):
    ds = open_dataset(str(write_npz(tmp_path / "breastmnist.npz")))
    assert ds.class_names == ["malignant", "normal, benign"]
    ds64 = open_dataset(str(write_npz(tmp_path / "pneumoniamnist_64.npz")))
    assert ds64.class_names == ["normal", "pneumonia"]


def test_npz_resize_is_smooth_and_in_range(tmp_path):
    flat = np.full((12, 8, 8), 200, dtype=np.uint8)
    path = write_npz(tmp_path / "flat.npz", train_images=flat)
    ds = open_dataset(str(path), image_size=16)
    assert ds.images.shape == (12, 1, 16, 16)
    assert torch.allclose(ds.images, torch.full_like(ds.images, 200 / 127.5 - 1), atol=1e-5)
    small = open_dataset(str(write_npz(tmp_path / "noisy.npz", size=32)), image_size=8)
    assert small.image_size == 8 and small.images.abs().max() <= 1


def _truncated(tmp_path: Path) -> Path:
    path = write_npz(tmp_path / "cut.npz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


BAD_NPZ = {
    "missing file": (lambda p: p / "absent.npz", "no such file or folder"),
    "truncated": (_truncated, "truncated"),
    "wrong keys": (lambda p: (np.savez(p / "keys.npz", x=np.zeros(3)), p / "keys.npz")[1], "train_labels"),
    "negative label": (lambda p: write_npz(p / "neg.npz", train_labels=np.array([[0], [1], [-1]] * 4)),
                       "outside"),
    "label over table": (lambda p: write_npz(p / "breastmnist.npz", classes=3), "outside 0..1"),
    "empty class": (lambda p: write_npz(p / "gap.npz", train_labels=(np.arange(12) % 2 * 2)[:, None]),
                    "class 1 has no train images"),
    "multi-label": (lambda p: write_npz(p / "multi.npz", train_labels=np.zeros((12, 3), np.uint8)),
                    "multi-label"),
    "nan images": (lambda p: write_npz(p / "nan.npz", train_images=np.full((12, 8, 8), np.nan, np.float32)),
                   "NaN"),
    "length mismatch": (lambda p: write_npz(p / "len.npz", train_labels=np.zeros((11, 1), np.uint8)),
                        "must match"),
    "wrong dtype": (lambda p: write_npz(p / "u16.npz", train_images=np.zeros((12, 8, 8), np.uint16)),
                    "dtype uint16"),
    "wrong ndim": (lambda p: write_npz(p / "flat.npz", train_images=np.zeros((12, 64), np.uint8)),
                   "expected (N,H,W)"),
    # a huge id would make numpy allocate terabytes for the class check
    "huge label": (lambda p: write_npz(p / "huge.npz", train_labels=np.array([[0], [2 ** 40]] * 6, np.int64)),
                   "go up to 1099511627776 for 12 images"),
    "infinite label": (lambda p: write_npz(p / "inf.npz", train_labels=np.array([[0.0], [np.inf]] * 6)),
                       "NaN or infinite"),
    "unknown zip version": (lambda p: _zip_version(write_npz(p / "ver.npz")), "unreadable or truncated npz"),
}


def _zip_version(path: Path) -> Path:
    """A damaged header that names a zip version the zipfile module does not know."""
    data = bytearray(path.read_bytes())
    central = data.rfind(b"PK\x01\x02")  # the last central-directory entry: 'version needed' at offset 6
    data[central + 6:central + 8] = (192).to_bytes(2, "little")
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("case", BAD_NPZ)
def test_bad_npz_gives_one_line_error_naming_the_file(tmp_path, case):
    build, needle = BAD_NPZ[case]
    path = build(tmp_path)
    with pytest.raises(FedPGGANError) as excinfo:
        open_dataset(str(path))
    one_line_error(excinfo, path.name, needle)


def test_unknown_spec_and_bad_split(tmp_path):
    with pytest.raises(FedPGGANError) as excinfo:
        open_dataset("nosuchmnist")
    one_line_error(excinfo, "nosuchmnist", "phantom")
    with pytest.raises(FedPGGANError) as excinfo:
        open_dataset(str(tmp_path / "gone.npz"), named_by="--real")
    one_line_error(excinfo, "gone.npz: no such file or folder", "set --real to an .npz file")  # the option it came from
    with pytest.raises(FedPGGANError) as excinfo:
        open_dataset("phantom", split="holdout")
    one_line_error(excinfo, "holdout")


# ---------------------------------------------------------------- MedMNIST names

@pytest.fixture
def no_medmnist_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDMNIST_ROOT", str(tmp_path / "root"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def test_medmnist_name_missing_and_download_failing(no_medmnist_cache, monkeypatch):
    def offline(url, dest):
        raise OSError("network is unreachable")
    monkeypatch.setattr(medmnist, "fetch", offline)
    data_dir = no_medmnist_cache / "data"
    with pytest.raises(FedPGGANError) as excinfo:
        open_dataset("pneumoniamnist", data_dir=str(data_dir))
    one_line_error(excinfo, "pneumoniamnist", str(data_dir), str(no_medmnist_cache / "root"),
                   "network is unreachable", "--data-dir", "phantom")
    assert not data_dir.exists()  # no partial download, nor the folder made for it, left behind


def test_auto_falls_back_to_phantom_only_when_no_file_is_there_and_records_what_it_used(no_medmnist_cache, monkeypatch,
                                                                                       capsys):
    from fedpggan.build import open_training_data, with_resolved_dataset
    from fedpggan.config import RunConfig

    monkeypatch.setattr(medmnist, "fetch", lambda url, dest: (_ for _ in ()).throw(OSError("offline")))
    data_dir = no_medmnist_cache / "data"
    data_dir.mkdir()
    cfg = RunConfig(dataset="auto", data_dir=str(data_dir))
    data = open_training_data(cfg)
    assert data.name == "phantom" and "using 'phantom' instead" in capsys.readouterr().err
    assert with_resolved_dataset(cfg, data).dataset == "phantom"  # a resume never picks other data
    (data_dir / "pneumoniamnist.npz").write_bytes(b"truncated")  # found, but damaged: an error, not phantom
    with pytest.raises(FedPGGANError) as excinfo:
        open_training_data(cfg)
    one_line_error(excinfo, str(data_dir / "pneumoniamnist.npz"))
    write_npz(data_dir / "pneumoniamnist.npz", size=8)
    data = open_training_data(cfg)
    assert with_resolved_dataset(cfg, data).dataset == data.source == str((data_dir / "pneumoniamnist.npz").resolve())


def test_download_with_wrong_md5_is_discarded(no_medmnist_cache, monkeypatch):
    monkeypatch.setattr(medmnist, "fetch", lambda url, dest: Path(dest).write_bytes(b"not the file"))
    data_dir = no_medmnist_cache / "data"
    data_dir.mkdir()  # the user's folder: kept, empty, after the failed download
    with pytest.raises(FedPGGANError) as excinfo:
        open_dataset("breastmnist", data_dir=str(data_dir))
    one_line_error(excinfo, "MD5", "750601b1f35ba3300ea97c75c52ff8f6")
    assert not list(data_dir.iterdir())


def test_medmnist_name_found_in_root_and_size_variant_preferred(no_medmnist_cache, monkeypatch, capsys):
    root = no_medmnist_cache / "root"
    root.mkdir()
    write_npz(root / "breastmnist.npz", size=8)
    write_npz(root / "breastmnist_64.npz", size=64)
    monkeypatch.setattr(medmnist, "fetch", lambda url, dest: pytest.fail("must not download"))
    ds = open_dataset("breastmnist")
    assert ds.image_size == 8 and ds.name == "breastmnist" and ds.class_names[0] == "malignant"
    assert ds.source == str((root / "breastmnist.npz").resolve())
    assert open_dataset("breastmnist", image_size=64).source.endswith("breastmnist_64.npz")
    assert "upsampled" not in capsys.readouterr().err
    assert open_dataset("breastmnist", image_size=32).source.endswith("breastmnist.npz")
    assert "upsampled to 32 px" in capsys.readouterr().err  # the data would be described as 32 px


def test_multi_label_medmnist_name_is_refused():
    with pytest.raises(FedPGGANError) as excinfo:
        open_dataset("chestmnist")
    one_line_error(excinfo, "chestmnist", "multi-label")


# ---------------------------------------------------------------- ImageFolder

def save_images(folder: Path, count: int, size: tuple[int, int] = (10, 10), mode: str = "L", seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{i}.png")


def test_image_folder_grayscale_with_resize(tmp_path):
    save_images(tmp_path / "normal", 3)
    save_images(tmp_path / "tumour", 2, seed=1)
    (tmp_path / "notes.txt").write_text("ignored")
    ds = open_dataset(str(tmp_path), image_size=16)
    assert ds.images.shape == (5, 1, 16, 16) and ds.images.abs().max() <= 1
    assert ds.class_names == ["normal", "tumour"] and ds.class_counts() == [3, 2]
    assert ds.name == str(tmp_path) and ds.is_medical
    assert open_dataset(str(tmp_path)).image_size == 28
    with pytest.raises(FedPGGANError) as excinfo:
        open_dataset(str(tmp_path), split="test")
    one_line_error(excinfo, str(tmp_path), "train/val/test")


def test_image_folder_rgb_with_split_folders(tmp_path):
    for split, count in (("train", 3), ("test", 1)):
        save_images(tmp_path / split / "a", count, mode="RGB")
        save_images(tmp_path / split / "b", count, mode="RGB", seed=2)
    train = open_dataset(str(tmp_path), image_size=10)
    test = open_dataset(str(tmp_path), split="test", image_size=10)
    assert train.channels == 3 and len(train) == 6 and len(test) == 2
    assert test.class_names == train.class_names == ["a", "b"]
    with pytest.raises(FedPGGANError) as excinfo:
        open_dataset(str(tmp_path), split="val")
    one_line_error(excinfo, "'val'")


def test_image_folder_channels_follow_the_train_split(tmp_path):
    """A model trained on one channel count is evaluated on the same, whatever one split holds."""
    save_images(tmp_path / "train" / "a", 2)
    save_images(tmp_path / "train" / "b", 2, seed=1)
    save_images(tmp_path / "test" / "a", 1, mode="RGB")  # a colour image in a grey data set: its luminance
    save_images(tmp_path / "test" / "b", 1, seed=3)
    test = open_dataset(str(tmp_path), split="test", image_size=10)
    with Image.open(tmp_path / "test" / "a" / "0.png") as img:
        expected = torch.tensor(np.asarray(img.convert("L")), dtype=torch.float32) / 127.5 - 1
    assert test.channels == 1 and (test.images[0, 0] - expected).abs().max() <= 1 / 127.5
    rgb = tmp_path / "rgb"
    save_images(rgb / "train" / "a", 2, mode="RGB")
    save_images(rgb / "train" / "b", 2, mode="RGB", seed=1)
    save_images(rgb / "test" / "a", 1)  # grey test images of an RGB data set: three equal channels
    save_images(rgb / "test" / "b", 1, seed=3)
    test = open_dataset(str(rgb), split="test", image_size=10)
    assert test.channels == 3 and torch.equal(test.images[:, 0], test.images[:, 2])


def test_image_folder_read_in_chunks_gives_what_one_read_gives(tmp_path, monkeypatch):
    """Full-size scans are read CHUNK at a time, never all at once; the chunking changes nothing, also
    when a colour image comes after a chunk of grey ones (an RGB data set) or a grey data set's test
    split has a colour image in a later chunk (its luminance)."""
    import fedpggan.data.folder as folder

    save_images(tmp_path / "rgb" / "train" / "a", 3, size=(20, 20))  # grey first ...
    save_images(tmp_path / "rgb" / "train" / "b", 2, size=(20, 20), mode="RGB", seed=1)  # ... then colour
    save_images(tmp_path / "grey" / "train" / "a", 3, size=(20, 20))
    save_images(tmp_path / "grey" / "train" / "b", 1, size=(20, 20), seed=4)
    save_images(tmp_path / "grey" / "test" / "a", 3, size=(20, 20), seed=2)
    save_images(tmp_path / "grey" / "test" / "b", 2, size=(20, 20), mode="RGB", seed=3)
    reads = {}
    for chunk in (2, 1000):
        monkeypatch.setattr(folder, "CHUNK", chunk)
        reads[chunk] = [open_dataset(str(tmp_path / "rgb"), image_size=10).images,
                        open_dataset(str(tmp_path / "grey"), split="test", image_size=10).images]
    assert reads[2][0].shape == (5, 3, 10, 10) and reads[2][1].shape == (5, 1, 10, 10)
    assert all(torch.equal(a, b) for a, b in zip(reads[2], reads[1000]))


def test_hidden_files_and_folders_in_a_class_are_not_read(tmp_path):
    """A .trash folder may hold a withdrawn image; macOS' ._ files are not images at all."""
    save_images(tmp_path / "a", 2)
    save_images(tmp_path / "a" / ".trash", 1)
    save_images(tmp_path / "b", 1, seed=1)
    (tmp_path / "b" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    save_images(tmp_path / "__MACOSX" / "a", 1)
    ds = open_dataset(str(tmp_path), image_size=10)
    assert ds.class_names == ["a", "b"] and ds.class_counts() == [2, 1]


def test_a_class_folder_this_user_cannot_read_says_so_not_that_it_is_empty(tmp_path, monkeypatch):
    """A site container runs as uid 49999: an unreadable folder is a permission to fix, not a missing class."""
    import fedpggan.data.folder as folder

    save_images(tmp_path / "a", 2)
    save_images(tmp_path / "b", 1, seed=1)
    real_access = folder.os.access
    monkeypatch.setattr(folder.os, "access", lambda path, mode: Path(path).name != "b" and real_access(path, mode))
    with pytest.raises(FedPGGANError, match=r"b: not readable by this user \(uid \d+\); give it read access"):
        open_dataset(str(tmp_path), image_size=10)


@pytest.mark.parametrize("case", ["mixed sizes", "not an image", "16-bit", "float", "not square",
                                  "class only in test", "splits named otherwise"])
def test_bad_image_folder(tmp_path, case):
    save_images(tmp_path / "a", 2)
    split = "train"
    if case == "mixed sizes":
        save_images(tmp_path / "b", 2, size=(12, 12))
        needle, named = "12x12", str(tmp_path / "b" / "0.png")
    elif case in ("16-bit", "float"):  # medical exports; converting to 8 bits would clip or zero them silently
        (tmp_path / "b").mkdir()
        pixels = np.full((10, 10), 4000, np.uint16) if case == "16-bit" else np.full((10, 10), 0.5, np.float32)
        Image.fromarray(pixels).save(tmp_path / "b" / "0.tif")
        needle, named = "convert the folder's images to 8-bit PNG", str(tmp_path / "b" / "0.tif")
    elif case == "not square":
        for cls in "ab":
            save_images(tmp_path / cls, 2, size=(12, 10))
        needle, named = "expected square images", str(tmp_path / "a" / "0.png")
    elif case == "class only in test":
        for split_name in ("train", "test"):
            save_images(tmp_path / split_name / "a", 2)
        save_images(tmp_path / "test" / "c", 2)
        split, needle, named = "test", "has no folder under", str(tmp_path / "test" / "c")
    elif case == "splits named otherwise":  # Kaggle's layout: read as classes, every real class would merge
        shutil.rmtree(tmp_path / "a")
        for split_name in ("Training", "Testing"):
            save_images(tmp_path / split_name / "glioma", 2)
            save_images(tmp_path / split_name / "meningioma", 2, seed=1)
        needle, named = "Testing, Training look like data splits", str(tmp_path)
    else:
        (tmp_path / "b").mkdir()
        (tmp_path / "b" / "broken.png").write_bytes(b"not a png")
        needle, named = "not a readable image", str(tmp_path / "b" / "broken.png")
    with pytest.raises(FedPGGANError) as excinfo:
        open_dataset(str(tmp_path), split=split)
    one_line_error(excinfo, needle, named)


# ---------------------------------------------------------------- ImageDataset

def test_subset_and_class_counts_keep_metadata():
    ds = open_phantom("train", 40, num_classes=4)
    sub = ds.subset(np.array([0, 5, 7]))
    assert isinstance(sub, ImageDataset) and len(sub) == 3
    assert torch.equal(sub.images[1], ds.images[5]) and sub.labels.tolist() == ds.labels[[0, 5, 7]].tolist()
    assert (sub.class_names, sub.name, sub.source, sub.is_medical) == (ds.class_names, ds.name, ds.source, False)
    assert sum(sub.class_counts()) == 3 and len(sub.class_counts()) == 4
    assert ds.class_counts() == [10, 10, 10, 10]
    assert ds.subset(ds.labels == 2).class_counts() == [0, 0, 10, 0]


# ---------------------------------------------------------------- partition

LABELS = np.repeat(np.arange(3), [600, 300, 100])


def test_a_run_rebuilding_its_sites_from_changed_data_is_refused():
    """A record moved to another site would be charged at both: a resume and the audit's member sets
    check the sites' records against partition.json."""
    from fedpggan.data.partition import check_same_partition, site_sha256

    data = open_phantom("train", 60, num_classes=2)
    parts = partition(data.labels, 3, seed=0)
    recorded = [{"site": i, "n": len(p), "sha256": h} for i, (p, h) in enumerate(zip(parts, site_sha256(data, parts)))]
    check_same_partition(recorded, data, parts, "restore the data")
    check_same_partition([{"site": r["site"], "n": r["n"]} for r in recorded], data, parts, "restore")  # runs before hashes
    grown = ImageDataset(torch.cat([data.images, data.images[:1]]), torch.cat([data.labels, data.labels[:1]]),
                         data.class_names, data.name, data.is_medical, data.source)  # one record more: the split moves
    with pytest.raises(FedPGGANError, match=r"^partition.json: site \d's records differ from those the run began with .*; restore the data$"):
        check_same_partition(recorded, grown, partition(grown.labels, 3, seed=0), "restore the data")


def skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean L1 distance between each site's label distribution and the global one."""
    overall = np.bincount(labels) / len(labels)
    return float(np.mean([np.abs(np.bincount(labels[p], minlength=3) / len(p) - overall).sum() for p in parts]))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_partition_is_deterministic_disjoint_complete(scheme):
    parts = partition(LABELS, 7, scheme, alpha=0.3, min_per_site=20, seed=4)
    assert len(parts) == 7 and min(map(len, parts)) >= 20
    assert all(p.dtype == np.int64 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))
    again = partition(torch.from_numpy(LABELS), 7, scheme, alpha=0.3, min_per_site=20, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition(LABELS, 7, scheme, alpha=0.3, min_per_site=20, seed=5)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=300), st.integers(1, 8),
       st.sampled_from(["iid", "dirichlet", "quantity"]), st.floats(0.01, 100), st.integers(0, 12),
       st.integers(0, 2**32 - 1))
def test_partition_invariants_hold_for_any_feasible_input(labels, sites, scheme, alpha, min_per_site, seed):
    labels = np.array(labels)
    if sites * max(min_per_site, 1) > len(labels):
        with pytest.raises(FedPGGANError):
            partition(labels, sites, scheme, alpha, min_per_site, seed)
        return
    parts = partition(labels, sites, scheme, alpha, min_per_site, seed)
    assert len(parts) == sites and min(map(len, parts)) >= max(min_per_site, 1)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))


def test_iid_is_balanced():
    parts = partition(LABELS, 6, "iid")
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert skew(LABELS, parts) < 0.15


def test_dirichlet_small_alpha_is_skewed_and_tiny_alpha_still_fills_sites():
    iid = skew(LABELS, partition(LABELS, 8, "iid", seed=0))
    label_skew = skew(LABELS, partition(LABELS, 8, "dirichlet", alpha=0.1, seed=0))
    assert label_skew > 0.5 and label_skew > 4 * iid
    parts = partition(LABELS, 20, "dirichlet", alpha=0.01, min_per_site=40, seed=0)
    assert min(map(len, parts)) >= 40
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))


def test_quantity_sizes_vary_but_labels_stay_mixed():
    parts = partition(LABELS, 10, "quantity", alpha=0.5, min_per_site=10, seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) > 3 * min(sizes) and min(sizes) >= 10
    big = max(parts, key=len)
    assert np.abs(np.bincount(LABELS[big], minlength=3) / len(big) - [0.6, 0.3, 0.1]).sum() < 0.2


@pytest.mark.parametrize("kwargs,needle", [
    ({"num_sites": 0}, "--clients must be >= 1"),
    ({"num_sites": 50, "min_per_site": 10},
     "--clients 50 with --min-per-site 10 needs 500 records; the dataset has 300: lower --clients or --min-per-site"),
    ({"num_sites": 3, "scheme": "pathological"}, "pathological"),
    ({"num_sites": 3, "scheme": "dirichlet", "alpha": 0.0}, "--alpha"),
    ({"num_sites": 3, "scheme": "quantity", "alpha": -1.0}, "--alpha"),
    ({"num_sites": 3, "scheme": "quantity", "alpha": float("inf")}, "--alpha inf: must be a finite number > 0"),
])
def test_partition_errors(kwargs, needle):
    with pytest.raises(FedPGGANError) as excinfo:
        partition(np.arange(300) % 2, **kwargs)
    one_line_error(excinfo, needle)


def test_partition_summary_and_table():
    labels = np.array([0, 0, 1, 1, 1, 0])
    parts = [np.array([0, 2]), np.array([1, 3, 4, 5])]
    summary = partition_summary(labels, parts, ["normal", "pneumonia"])
    assert summary == [{"site": 0, "n": 2, "per_class": {"normal": 1, "pneumonia": 1}},
                       {"site": 1, "n": 4, "per_class": {"normal": 2, "pneumonia": 2}}]
    lines = partition_table(torch.from_numpy(labels), parts, ["normal", "pneumonia"]).splitlines()
    assert len(lines) == 5 and len({len(line) for line in lines}) == 1
    assert lines[0].split() == ["site", "n", "normal", "pneumonia"]
    assert lines[-1].split() == ["total", "6", "3", "3"] and lines[2].split() == ["0", "2", "1", "1"]


# ---------------------------------------------------------------- real MedMNIST files

@pytest.mark.parametrize("name,n_train", [("pneumoniamnist", 4708), ("breastmnist", 546)])
def test_real_medmnist(name, n_train):
    if not (REAL_DATA / f"{name}.npz").is_file():
        pytest.skip(f"{REAL_DATA / name}.npz not available")
    ds = open_dataset(name, data_dir=str(REAL_DATA))
    assert len(ds) == n_train and ds.num_classes == 2 and ds.images.shape[1:] == (1, 28, 28)
    assert ds.is_medical and ds.images.min() >= -1 and ds.images.max() <= 1
    assert min(ds.class_counts()) > 0
    if name == "pneumoniamnist":
        assert ds.class_counts() == [1214, 3494] and ds.class_names == ["normal", "pneumonia"]


def test_a_site_tells_the_coordinator_its_dataset_by_public_name_never_by_path(tmp_path):
    from client.site_round import public_facts

    private = tmp_path / "hiv_cohort_2025.npz"
    write_npz(private)
    benchmark = tmp_path / "pneumoniamnist_64.npz"
    write_npz(benchmark)
    folder = tmp_path / "xrays"
    for split, n in (("train", 2), ("test", 1)):
        for label in ("a", "b"):
            (folder / split / label).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / split / label / f"{i}.png")
    facts = {spec: public_facts("hospital-a", open_dataset(str(spec), "train"))
             for spec in (private, benchmark, folder)}
    assert facts[private]["dataset"] == facts[folder]["dataset"] == "site data"
    assert facts[benchmark]["dataset"] == "pneumoniamnist"
    assert not any(str(tmp_path) in str(v) or "hiv" in str(v) for f in facts.values() for v in f.values())


def test_sites_naming_their_data_differently_are_recorded_as_site_data():
    """run.json's name feeds the datasheet and `evaluate`'s default test data: one site's benchmark name must
    not stand for a hospital's own images beside it."""
    from fedpggan.data.sources import common_public_name

    assert common_public_name(["pneumoniamnist"] * 3) == "pneumoniamnist"
    assert common_public_name(["pneumoniamnist", "pneumoniamnist", "site data"]) == "site data"
    assert common_public_name(["pneumoniamnist", "breastmnist"]) == "site data"


def test_a_deployed_site_missing_its_data_names_the_node_config_key(tmp_path):
    from client.site import load_site_data
    from fedpggan.config import RunConfig

    with pytest.raises(FedPGGANError) as excinfo:
        load_site_data({"site-id": "hospital-a", "data-path": str(tmp_path / "gone.npz")}, RunConfig())
    message = one_line_error(excinfo, "'data-path'", "gone.npz", "fedpggan site check")
    assert "--dataset" not in message


def test_a_simulated_actor_reads_the_data_once_however_many_sites_it_serves(monkeypatch):
    """Actors serve the sites in turn: a per-site cache smaller than the site count reloaded the
    whole data set nearly every round (30 s per site for a folder of 55 000 PNGs)."""
    import client.site as site
    from fedpggan.config import RunConfig

    loads = []
    real = site.open_training_data
    monkeypatch.setattr(site, "open_training_data", lambda cfg: loads.append(cfg.dataset) or real(cfg))
    site._training_data_cached.cache_clear()
    site._partition_cached.cache_clear()
    cfg = RunConfig(dataset="phantom", seed=12345)
    sizes = [[len(site.load_site_data({"partition-id": p, "num-partitions": 6}, cfg)) for p in range(6)] for _ in range(3)]
    assert loads == ["phantom"] and sizes[0] == sizes[2] and sum(sizes[0]) == 2000


def test_a_resume_on_other_data_names_the_data_the_run_trained_on(tmp_path):
    """Not the path just given (the wrong data), which the run's options already hold at this point."""
    import dataclasses
    import json
    import re

    import simulation.run as sim
    from conftest import tiny_config
    from fedpggan.runs import RunFolder

    first, other = (write_npz(tmp_path / f"{name}.npz", n=(60, 4, 6), seed=seed) for name, seed in (("a", 0), ("b", 1)))
    cfg, summary = sim.prepare(tiny_config(tmp_path / "run", dataset=str(first), min_per_site=5))
    folder = RunFolder(tmp_path / "run")
    folder.root.mkdir()
    (folder.root / "partition.json").write_text(json.dumps(summary))
    (folder.root / "run.json").write_text(json.dumps({"config": cfg.to_flower()}))
    sim.check_resumable(cfg, folder)  # the same data: nothing to say
    with pytest.raises(FedPGGANError, match=f"the run trained on {re.escape(str(first))}: resume with those data, as they were, or start"):
        sim.check_resumable(dataclasses.replace(cfg, dataset=str(other)), folder)


def test_images_stored_at_another_size_are_resized_with_a_warning(tmp_path, capsys):
    """README: the run trains at --image-size (28 unless set); data of another size must not be shrunk silently."""
    from fedpggan.build import warn_if_resized

    npz = open_dataset(str(write_npz(tmp_path / "scans.npz", n=(4, 2, 2), size=32)), "train", None, 28, 0)
    folder = tmp_path / "xrays" / "train"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / label / "0.png")
    images = open_dataset(str(folder.parent), "train", None, 28, 0)
    assert (npz.stored_size, npz.image_size, images.stored_size, images.image_size) == (32, 28, 64, 28)
    warn_if_resized(npz, 28)
    assert "32x32 images are resized to 28x28 (--image-size 28); pass --image-size 32 to train at the data's own size" \
        in capsys.readouterr().err
    warn_if_resized(open_dataset(str(write_npz(tmp_path / "odd.npz", n=(4, 2, 2), size=30)), "train", None, 28, 0), 28)
    assert "30x30 images are resized to 28x28 (--image-size 28)\n" in capsys.readouterr().err  # 30 px cannot be built
    warn_if_resized(open_dataset(str(write_npz(tmp_path / "own.npz", n=(4, 2, 2), size=32)), "train", None, 32, 0), 32)
    assert capsys.readouterr().err == ""
