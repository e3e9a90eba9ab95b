"""Tests for kdsweep.core.data: sources, splits, the in-process cache and the whole-batch ops."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kdsweep.core import data, sources
from kdsweep.core.config import DataConfig
from kdsweep.core.data import (
    DataError,
    apply_views,
    batch_indices,
    clear_cache,
    identity_view,
    load_splits,
    num_views,
    resolve_root,
    sample_views,
    to_input,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def one_sentence(message: str) -> bool:
    return message.endswith(".") and ". " not in message and "\n" not in message


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def write_fake_fmnist(folder: Path, n_train: int, n_test: int, compress: bool) -> None:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(
            folder / f"{prefix}-images-idx3-ubyte{suffix}",
            rng.integers(0, 256, (n, 28, 28)),
            compress,
        )
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, n), compress)


def indexed_images(n: int, channels: int | None) -> tuple[np.ndarray, np.ndarray]:
    """8×8 images whose first two pixels spell their index, so splits can be traced back."""
    x = np.zeros((n, 8, 8), dtype=np.uint8)
    x[:, 0, 0] = np.arange(n) % 256
    x[:, 0, 1] = np.arange(n) // 256
    if channels is not None:
        x = np.repeat(x[..., None], channels, axis=-1)
    return x, np.arange(n) % 4


def image_ids(x: torch.Tensor) -> set[int]:
    return set((x[:, 0, 0, 0].long() + 256 * x[:, 0, 0, 1].long()).tolist())


# -- Fashion-MNIST -----------------------------------------------------------------------------


def test_fashion_mnist_from_debian_files_leaves_them_untouched(
    fmnist_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in fmnist_dir.iterdir()}
    monkeypatch.delenv("KDSWEEP_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # the default folder, without the files: Debian's are found
    root = tmp_path / ".cache" / "kdsweep" / "data"
    full = load_splits(DataConfig(dataset="fashion-mnist", val_size=500))
    sub = load_splits(DataConfig(dataset="fashion-mnist", val_size=500, train_subset=2000))
    assert full.in_shape == (1, 28, 28) and full.num_classes == 10
    assert full.classes[0] == "T-shirt/top"
    assert len(full.train_y) + len(full.val_y) == 60000
    assert full.test_x.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(full.test_y), torch.full((10,), 1000))
    assert full.train_x.dtype == torch.uint8 and full.train_y.dtype == torch.int64
    assert full.train_x.is_contiguous() and full.val_x.is_contiguous()
    assert full.mean[0] == pytest.approx(0.286, abs=0.005)
    assert full.std[0] == pytest.approx(0.353, abs=0.005)
    # Same seed and val_size: the subset is a prefix of the full training split.
    assert sub.train_x.shape == (2000, 1, 28, 28)
    assert torch.equal(sub.train_x, full.train_x[:2000]) and torch.equal(sub.val_y, full.val_y)
    after = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in fmnist_dir.iterdir()}
    assert after == before
    assert not root.exists()  # nothing written into the data folder


@pytest.mark.parametrize("layout", ["gz in root", "torchvision raw"])
def test_fashion_mnist_root_files_come_before_debian(tmp_path: Path, layout: str):
    if layout == "gz in root":
        write_fake_fmnist(tmp_path, 200, 50, compress=True)
    else:
        write_fake_fmnist(tmp_path / "FashionMNIST" / "raw", 200, 50, compress=False)
    import torchvision.datasets

    splits = load_splits(DataConfig(dataset="fashion-mnist", root=str(tmp_path), val_size=20))
    assert (len(splits.train_y), len(splits.val_y), len(splits.test_y)) == (180, 20, 50)
    assert splits.in_shape == (1, 28, 28)
    assert splits.classes == tuple(torchvision.datasets.FashionMNIST.classes)


def test_fashion_mnist_missing_names_the_ways_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "not-installed")
    monkeypatch.delenv("KDSWEEP_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # the default folder, where Debian's copy may stand in
    with pytest.raises(DataError) as caught:
        load_splits(DataConfig(dataset="fashion-mnist"))
    message = str(caught.value)
    assert one_sentence(message)
    for hint in ("apt-get install dataset-fashion-mnist", "--data", "KDSWEEP_DATA", "--download"):
        assert hint in message


def test_truncated_idx_file_is_a_data_error(tmp_path: Path):
    write_fake_fmnist(tmp_path, 200, 50, compress=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100]))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_splits(DataConfig(dataset="fashion-mnist", root=str(tmp_path), val_size=20))


# -- CIFAR -------------------------------------------------------------------------------------


def test_missing_cifar_offline_is_one_sentence_with_the_ways_out(tmp_path: Path):
    with pytest.raises(DataError) as caught:
        load_splits(DataConfig(dataset="cifar10", root=str(tmp_path), download=False))
    message = str(caught.value)
    assert one_sentence(message), message
    assert "--data" in message and "KDSWEEP_DATA" in message and "cifar-10-batches-py" in message
    assert str(tmp_path) in message


class FakeCIFAR10:
    """Stands in for torchvision's class: same constructor, .data N×32×32×3, .targets, .classes."""

    base_folder = "cifar-10-batches-py"
    classes = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]

    def __init__(self, root: str, train: bool = True, download: bool = False):
        if download:
            raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
        n = 120 if train else 40
        rng = np.random.default_rng(int(train))
        self.data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        self.targets = list(rng.integers(0, 10, n))
        (Path(root) / self.base_folder).mkdir(parents=True, exist_ok=True)
        (Path(root) / self.base_folder / "data_batch_1").write_bytes(b"fake")


def test_cifar_arrays_become_nchw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    splits = load_splits(DataConfig(dataset="cifar10", root=str(tmp_path), val_size=20))
    reference = FakeCIFAR10(str(tmp_path), train=False)
    assert splits.in_shape == (3, 32, 32) and splits.classes[0] == "airplane"
    assert torch.equal(splits.test_x, torch.from_numpy(reference.data).permute(0, 3, 1, 2))
    assert splits.test_x.is_contiguous() and len(splits.train_y) == 100


def test_failed_cifar_download_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    with pytest.raises(DataError) as caught:
        load_splits(DataConfig(dataset="cifar10", root=str(tmp_path), download=True))
    message = str(caught.value)
    assert "failed" in message and "name resolution" in message and "--data" in message


# -- npz ---------------------------------------------------------------------------------------


def test_tiny_npz_uses_its_test_set_and_classes(tiny_npz: Path):
    splits = load_splits(DataConfig(dataset=f"npz:{tiny_npz}", val_size=200))
    assert (len(splits.train_y), len(splits.val_y), len(splits.test_y)) == (1000, 200, 300)
    assert splits.in_shape == (1, 8, 8)
    assert splits.classes == tuple(f"class{i}" for i in range(10))
    assert len(splits.key) == 16 and int(splits.key, 16) >= 0


@pytest.mark.parametrize("channels", [None, 3])
def test_npz_without_test_set_carves_disjoint_deterministic_splits(tmp_path: Path, channels):
    x, y = indexed_images(300, channels)
    path = tmp_path / "indexed.npz"
    np.savez(path, x=x, y=y)
    cfg = DataConfig(dataset=f"npz:{path}", val_size=50, split_seed=3)
    first = load_splits(cfg)
    assert first.in_shape == (channels or 1, 8, 8) and first.num_classes == 4
    train, val, test = (image_ids(s) for s in (first.train_x, first.val_x, first.test_x))
    assert (len(train), len(val), len(test)) == (200, 50, 50)
    assert train | val | test == set(range(300)) and not (train & val or train & test or val & test)
    clear_cache()
    again = load_splits(cfg)
    assert again is not first and again.key == first.key
    assert torch.equal(again.val_x, first.val_x) and torch.equal(again.test_y, first.test_y)
    other = load_splits(DataConfig(dataset=f"npz:{path}", val_size=50, split_seed=4))
    assert image_ids(other.val_x) != val and other.key != first.key


def test_npz_key_follows_the_file(tmp_path: Path):
    x, y = indexed_images(100, None)
    path = tmp_path / "a.npz"
    np.savez(path, x=x, y=y)
    cfg = DataConfig(dataset=f"npz:{path}", val_size=10)
    key = load_splits(cfg).key
    clear_cache()
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert load_splits(cfg).key != key
    assert load_splits(DataConfig(dataset=f"npz:{path}", val_size=11)).key != key


def test_cache_returns_the_same_object_for_per_batch_settings(tiny_npz: Path):
    base = DataConfig(dataset=f"npz:{tiny_npz}", val_size=100)
    splits = load_splits(base)
    per_batch = DataConfig(
        dataset=f"npz:{tiny_npz}", val_size=100, image_size=32, channels=3, pad=1, flip=False
    )
    assert load_splits(per_batch) is splits
    assert load_splits(DataConfig(dataset=f"npz:{tiny_npz}", val_size=101)) is not splits


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize(
    ("arrays", "problem"),
    [
        ({"x": np.zeros((20, 8, 8), np.uint8)}, "no array 'y'"),
        ({"x": np.zeros((20, 8, 8), np.float32), "y": np.zeros(20, np.int64)}, "uint8"),
        ({"x": np.zeros((20, 8), np.uint8), "y": np.zeros(20, np.int64)}, "N×H×W"),
        ({"x": np.zeros((20, 3, 8, 8), np.uint8), "y": np.zeros(20, np.int64)}, "channels last"),
        ({"x": np.zeros((20, 8, 8), np.uint8), "y": np.zeros(19, np.int64)}, "19 labels"),
        ({"x": np.zeros((20, 8, 8), np.uint8), "y": np.zeros(20, np.float32)}, "integer"),
        ({"x": np.zeros((20, 8, 8), np.uint8), "y": -np.ones(20, np.int64)}, "labels from -1"),
        (
            {
                "x": np.zeros((20, 8, 8), np.uint8),
                "y": np.zeros(20, int),
                "x_test": np.zeros((5, 8, 8), np.uint8),
            },
            "x_test and y_test",
        ),
    ],
)
def test_malformed_npz_names_file_and_problem(tmp_path: Path, arrays, problem: str):
    path = tmp_path / "bad.npz"
    write_npz(path, **arrays)
    with pytest.raises(DataError) as caught:
        load_splits(DataConfig(dataset=f"npz:{path}", val_size=2))
    message = str(caught.value)
    assert str(path) in message and problem in message and one_sentence(message), message


@pytest.mark.parametrize("content", [b"not a zip at all" * 10, b"PK\x03\x04broken"])
def test_corrupt_npz_is_a_data_error(tmp_path: Path, content: bytes):
    path = tmp_path / "corrupt.npz"
    path.write_bytes(content)
    with pytest.raises(DataError) as caught:
        load_splits(DataConfig(dataset=f"npz:{path}", val_size=2))
    message = str(caught.value)
    assert str(path) in message and "numpy.savez" in message and one_sentence(message), message


def test_sizes_the_data_cannot_satisfy(tiny_npz: Path):
    with pytest.raises(DataError, match="at least 1"):
        load_splits(DataConfig(dataset=f"npz:{tiny_npz}", val_size=0))
    with pytest.raises(DataError, match="val_size"):
        load_splits(DataConfig(dataset=f"npz:{tiny_npz}", val_size=1200))
    with pytest.raises(DataError, match="train_subset"):
        load_splits(DataConfig(dataset=f"npz:{tiny_npz}", val_size=200, train_subset=1001))
    assert (
        len(load_splits(DataConfig(dataset=f"npz:{tiny_npz}", val_size=200, test_subset=7)).test_y)
        == 7
    )


def test_unknown_dataset_lists_valid_forms():
    with pytest.raises(DataError) as caught:
        load_splits(DataConfig(dataset="imagenet"))
    message = str(caught.value)
    for form in ("cifar10", "cifar100", "fashion-mnist", "npz:PATH", "folder:PATH"):
        assert form in message


def test_resolve_root_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("KDSWEEP_DATA", str(tmp_path / "env"))
    assert resolve_root(DataConfig(root=str(tmp_path / "cfg"))) == tmp_path / "cfg"
    assert resolve_root(DataConfig()) == tmp_path / "env"
    monkeypatch.delenv("KDSWEEP_DATA")
    assert resolve_root(DataConfig()) == Path.home() / ".cache" / "kdsweep" / "data"


# -- folders -----------------------------------------------------------------------------------


def write_pngs(folder: Path, classes: dict[str, int], mode: str = "L", size: int = 8) -> None:
    rng = np.random.default_rng(len(str(folder)))
    for name, count in classes.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            shape = (size, size) if mode == "L" else (size, size, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
                folder / name / f"{i}.png"
            )


def test_folder_decodes_pixels_and_carves_a_test_split(tmp_path: Path):
    write_pngs(tmp_path, {"cat": 7, "ant": 5, "bee": 8})
    splits = load_splits(DataConfig(dataset=f"folder:{tmp_path}", val_size=3))
    assert splits.classes == ("ant", "bee", "cat") and splits.in_shape == (1, 8, 8)
    assert (len(splits.train_y), len(splits.val_y), len(splits.test_y)) == (14, 3, 3)
    on_disk = {
        np.asarray(Image.open(p)).tobytes(): ("ant", "bee", "cat").index(p.parent.name)
        for p in tmp_path.glob("*/*.png")
    }
    decoded = {
        x.numpy().tobytes(): int(y)
        for part in ("train", "val", "test")
        for x, y in zip(
            getattr(splits, f"{part}_x")[:, 0], getattr(splits, f"{part}_y"), strict=True
        )
    }
    assert decoded == on_disk


def test_folder_with_train_and_test_and_mixed_modes(tmp_path: Path):
    write_pngs(tmp_path / "train", {"a": 6, "b": 6}, mode="L")
    write_pngs(tmp_path / "train", {"c": 2}, mode="RGB")
    write_pngs(tmp_path / "test", {"a": 2, "c": 3}, mode="L")
    splits = load_splits(DataConfig(dataset=str(tmp_path), val_size=4))  # a plain directory
    assert splits.classes == ("a", "b", "c") and splits.in_shape == (3, 8, 8)
    assert (len(splits.train_y), len(splits.val_y), len(splits.test_y)) == (10, 4, 5)
    assert sorted(splits.test_y.tolist()) == [0, 0, 2, 2, 2]


def test_folder_with_mixed_sizes_names_an_offending_file(tmp_path: Path):
    write_pngs(tmp_path, {"a": 3})
    write_pngs(tmp_path, {"b": 1}, size=9)
    with pytest.raises(DataError) as caught:
        load_splits(DataConfig(dataset=f"folder:{tmp_path}", val_size=1))
    assert str(tmp_path / "b" / "0.png") in str(caught.value) and one_sentence(str(caught.value))


# -- batch ops ---------------------------------------------------------------------------------


def test_view_ids():
    assert num_views(4, True) == 162 and num_views(0, False) == 1 and num_views(2, False) == 25
    s = 9
    v = identity_view(4, True)
    assert (v // s**2, (v // s) % s - 4, v % s - 4) == (0, 0, 0)


def reference_view(image: torch.Tensor, view: int, pad: int) -> torch.Tensor:
    s = 2 * pad + 1
    flip, dy, dx = view // s**2, (view // s) % s - pad, view % s - pad
    h, w = image.shape[-2:]
    crop = F.pad(image, (pad, pad, pad, pad))[:, pad + dy : pad + dy + h, pad + dx : pad + dx + w]
    return torch.flip(crop, dims=[-1]) if flip else crop


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("pad", "flip"), [(2, True), (1, False), (0, True)])
def test_apply_views_matches_per_sample_reference(device: str, pad: int, flip: bool):
    n = num_views(pad, flip)
    x = torch.randint(
        0, 256, (n, 2, 5, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    views = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    out = apply_views(x.to(device), views.to(device), pad)
    assert out.shape == x.shape and out.dtype == torch.uint8 and out.device.type == device
    expected = torch.stack([reference_view(x[i], int(views[i]), pad) for i in range(n)])
    assert torch.equal(out.cpu(), expected)
    same = torch.full((n,), identity_view(pad, flip), device=device)
    assert torch.equal(apply_views(x.to(device), same, pad).cpu(), x)


@pytest.mark.parametrize("device", DEVICES)
def test_sample_views_are_uniform_ids_on_the_generator_device(device: str):
    generator = torch.Generator(device=device).manual_seed(0)
    views = sample_views(8000, 1, True, generator)
    assert views.device.type == device and views.dtype == torch.int64
    counts = torch.bincount(views.cpu(), minlength=18)
    assert len(counts) == 18 and counts.min() > 300  # 444 expected per id


def test_to_input_normalises_resizes_and_widens():
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    native = to_input(x, (0.5,), (0.25,))
    assert torch.allclose(native, (x.float() / 255 - 0.5) / 0.25)
    out = to_input(x, (0.5,), (0.25,), image_size=32, channels=3, channels_last=True)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out[:, 0], out[:, 2])
    resized = F.interpolate(native, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(out[:, :1], resized, atol=1e-5)
    assert to_input(x, (0.5,), (0.25,), dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(DataError):
        to_input(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), (0, 0, 0), (1, 1, 1), channels=1)


def test_batch_indices():
    generator = torch.Generator().manual_seed(0)
    batches = list(batch_indices(10, 4, generator))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    assert not torch.equal(torch.cat(batches), torch.arange(10))
    again = list(batch_indices(10, 4, torch.Generator().manual_seed(0)))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    assert [len(b) for b in batch_indices(10, 4, None, drop_last=True)] == [4, 4]
    in_order = torch.cat(list(batch_indices(10, 3, None, shuffle=False)))
    assert torch.equal(in_order, torch.arange(10))


def test_tiny_npz_is_learnable_by_a_small_mlp(tiny_npz: Path):
    torch.manual_seed(0)
    splits = load_splits(DataConfig(dataset=f"npz:{tiny_npz}", val_size=200))
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        for idx in batch_indices(len(splits.train_y), 32, generator):
            inputs = to_input(splits.train_x[idx], splits.mean, splits.std)
            loss = F.cross_entropy(model(inputs), splits.train_y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        logits = model(to_input(splits.test_x, splits.mean, splits.std))
    accuracy = (logits.argmax(1) == splits.test_y).float().mean().item()
    assert accuracy > 0.6  # chance is 0.1


# -- augmentation and folders that fit the data ---------------------------------------------


def test_digits_like_npz_gets_no_flips_and_no_shifts_by_default(tiny_npz: Path):
    from kdsweep.core.config import ModelConfig, TrainConfig
    from kdsweep.core.train import resolve

    config = resolve(TrainConfig(data=DataConfig(dataset=f"npz:{tiny_npz}", val_size=100),
                                 model=ModelConfig(arch="mlp", hidden=(16,))))
    assert (config.data.pad, config.data.flip) == (0, False)  # 8x8: a shift of 1 is 1/8 of it
    # Given values are kept; named datasets keep today's defaults; larger npz images get
    # shifts of at most side/16 each way, never flips.
    given = resolve(TrainConfig(data=DataConfig(dataset=f"npz:{tiny_npz}", val_size=100, pad=1, flip=True),
                                model=ModelConfig(arch="mlp", hidden=(16,))))
    assert (given.data.pad, given.data.flip) == (1, True)
    assert data.default_augmentation("fashion-mnist", (1, 28, 28)) == (4, True)
    assert data.default_augmentation("cifar10", (3, 32, 32)) == (4, True)
    assert data.default_augmentation("npz:/x.npz", (3, 32, 32)) == (2, False)
    assert data.default_augmentation("folder:/x", (3, 224, 224)) == (4, False)


def test_a_dataset_or_a_missing_folder_as_the_data_folder_is_refused(tmp_path: Path):
    with pytest.raises(DataError, match="is a dataset, not a data folder; pass it as --dataset"):
        data.check_root("npz:/x.npz")
    with pytest.raises(DataError, match="does not exist"):
        data.check_root(str(tmp_path / "nowhere"))
    data.check_root(str(tmp_path / "nowhere"), download=True)  # torchvision creates it
    data.check_root(str(tmp_path))
    # Through load_splits too: never a silent fall-back to Debian's Fashion-MNIST.
    with pytest.raises(DataError, match="does not exist"):
        load_splits(DataConfig(dataset="fashion-mnist", root=str(tmp_path / "nowhere")))


def test_normalisation_statistics_are_the_whole_training_splits(tiny_npz: Path):
    """Every subset of one split (the teacher's and the student's) shares one normalisation."""
    small = load_splits(DataConfig(dataset=f"npz:{tiny_npz}", val_size=100, train_subset=50))
    full = load_splits(DataConfig(dataset=f"npz:{tiny_npz}", val_size=100))
    assert small.mean == full.mean and small.std == full.std
    assert small.train_available == full.train_available == len(full.train_y) == 1100


def test_imagenet_statistics_on_grey_images_made_rgb():
    x = torch.full((2, 1, 4, 4), 255, dtype=torch.uint8)
    out = data.to_input(x, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), channels=3)
    expect = torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225])
    assert out.shape == (2, 3, 4, 4)
    assert torch.allclose(out[0, :, 0, 0], expect)


def test_a_data_folder_the_user_gave_is_never_replaced_by_debians(fmnist_dir: Path, tmp_path: Path):
    """An existing folder holding none of the files is refused (a usage error), not swapped."""
    from kdsweep.core.data import DataFolderError

    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(DataFolderError, match="holds none of Fashion-MNIST's files"):
        load_splits(DataConfig(dataset="fashion-mnist", root=str(root), val_size=500))
    with pytest.raises(DataFolderError, match="holds none of CIFAR-10's files"):
        load_splits(DataConfig(dataset="cifar10", root=str(root), val_size=500))
