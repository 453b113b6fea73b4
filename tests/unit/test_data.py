"""IDX reading, Fashion-MNIST loading errors, and the device partitioners."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from blockdeepnet.data import (
    DEFAULT_DATA_DIR,
    PAPER_DEVICES,
    PAPER_SAMPLES_PER_DEVICE,
    DatasetError,
    DatasetMissingError,
    load_fashion_mnist,
    paper_split,
    partition_iid,
    partition_non_iid,
    read_idx,
    resolve_data_dir,
)

CODES = {np.dtype("u1"): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}


def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode an array as IDX (written here, independently of the reader under test)."""
    be = arr.astype(arr.dtype.newbyteorder(">")) if arr.dtype.itemsize > 1 else arr
    header = bytes([0, 0, CODES[be.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + be.tobytes()


def write(path: Path, data: bytes, gz: bool) -> Path:
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


# --- read_idx ---


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
def test_read_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    got = read_idx(write(tmp_path / "img", idx_bytes(images), gz))
    assert got.dtype == np.uint8 and got.shape == (5, 28, 28)
    assert np.array_equal(got, images)
    got[0, 0, 0] = 1  # writable, owned by the caller


def test_read_idx_other_dtypes(tmp_path: Path) -> None:
    ints = np.array([[1, -2, 70000]], dtype=">i4")
    got = read_idx(write(tmp_path / "i", idx_bytes(ints), gz=True))
    assert got.dtype == np.int32 and got.dtype.isnative
    assert got.tolist() == [[1, -2, 70000]]
    floats = np.array([0.5, -1.25], dtype=">f4")
    assert read_idx(write(tmp_path / "f", idx_bytes(floats), gz=False)).tolist() == [0.5, -1.25]


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
def test_truncated_payload(tmp_path: Path, gz: bool) -> None:
    data = idx_bytes(np.zeros((3, 4), dtype=np.uint8))[:-1]
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(write(tmp_path / "t", data, gz))


def test_truncated_header_and_trailing_bytes(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(write(tmp_path / "h", bytes([0, 0, 8, 3, 0, 0]), gz=False))
    with pytest.raises(DatasetError, match="trailing"):
        read_idx(write(tmp_path / "x", idx_bytes(np.zeros(4, dtype=np.uint8)) + b"\0", gz=False))


def test_truncated_gzip_stream(tmp_path: Path) -> None:
    blob = gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8).reshape(10, 20)))
    (tmp_path / "g.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(tmp_path / "g.gz")


@pytest.mark.parametrize(
    "header", [b"\x01\x00\x08\x01", b"\x00\x00\x07\x01", b"\x00\x00\x08\x00", b"PK\x03\x04"], ids=str
)
def test_bad_magic(tmp_path: Path, header: bytes) -> None:
    with pytest.raises(DatasetError, match="bad magic"):
        read_idx(write(tmp_path / "m", header + struct.pack(">I", 1) + b"\0", gz=False))


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetMissingError):
        read_idx(tmp_path / "nope")


# --- load_fashion_mnist ---


def write_fake_fashion(directory: Path, n_train: int = 6, n_test: int = 4, gz: bool = True) -> None:
    rng = np.random.default_rng(1)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[0, 0, 0] = 255
        labels = (np.arange(n) % 10).astype(np.uint8)
        suffix = ".gz" if gz else ""
        write(directory / f"{prefix}-images-idx3-ubyte{suffix}", idx_bytes(images), gz)
        write(directory / f"{prefix}-labels-idx1-ubyte{suffix}", idx_bytes(labels), gz)


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
def test_load_from_argument(tmp_path: Path, gz: bool) -> None:
    write_fake_fashion(tmp_path, gz=gz)
    ds = load_fashion_mnist(tmp_path)
    assert ds.train_x.shape == (6, 1, 28, 28) and ds.train_x.dtype == np.float32
    assert ds.test_x.shape == (4, 1, 28, 28)
    assert ds.train_y.dtype == np.int64 and ds.train_y.tolist() == [0, 1, 2, 3, 4, 5]
    assert 0.0 <= float(ds.train_x.min()) and float(ds.train_x.max()) == 1.0


def test_env_var_overrides_default_and_argument_overrides_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BDN_DATA_DIR", raising=False)
    assert resolve_data_dir() == DEFAULT_DATA_DIR == Path("/usr/share/datasets/fashion-mnist")
    write_fake_fashion(tmp_path)
    monkeypatch.setenv("BDN_DATA_DIR", str(tmp_path))
    assert resolve_data_dir() == tmp_path
    assert load_fashion_mnist().train_x.shape[0] == 6
    assert resolve_data_dir("/elsewhere") == Path("/elsewhere")


def test_missing_dir_names_the_debian_package_and_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    with pytest.raises(DatasetMissingError) as info:
        load_fashion_mnist(missing)
    message = str(info.value)
    assert "dataset-fashion-mnist" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(missing) in message
    assert isinstance(info.value, DatasetError)


def test_inconsistent_files_are_rejected(tmp_path: Path) -> None:
    write_fake_fashion(tmp_path)
    write(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes(np.zeros(3, dtype=np.uint8)), gz=True)
    with pytest.raises(DatasetError, match="4 images but 3 labels"):
        load_fashion_mnist(tmp_path)
    write(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes(np.full(4, 10, dtype=np.uint8)), gz=True)
    with pytest.raises(DatasetError, match="out of range"):
        load_fashion_mnist(tmp_path)


# --- partitioning ---


def assert_disjoint(shards: list[np.ndarray]) -> None:
    together = np.concatenate(shards)
    assert np.unique(together).size == together.size


def test_partition_iid() -> None:
    shards = partition_iid(1000, 7, 100, np.random.default_rng(0))
    assert len(shards) == 7 and all(s.shape == (100,) and s.dtype == np.int64 for s in shards)
    assert_disjoint(shards)
    assert int(np.concatenate(shards).max()) < 1000
    again = partition_iid(1000, 7, 100, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(shards, again, strict=True))
    other = partition_iid(1000, 7, 100, np.random.default_rng(1))
    assert not np.array_equal(shards[0], other[0])


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((100, 3, 34), ValueError),
        ((100, 0, 10), ValueError),
        ((0, 1, 1), ValueError),
        ((100, 2.0, 5), TypeError),
    ],
)
def test_partition_iid_validates(args: tuple[int, int, int], error: type[Exception]) -> None:
    with pytest.raises(error):
        partition_iid(*args, rng=np.random.default_rng(0))


@pytest.mark.parametrize("k", [1, 2, 3, 10])
def test_partition_non_iid_has_exactly_k_classes(k: int) -> None:
    labels = np.random.default_rng(5).integers(0, 10, 20_000)
    shards = partition_non_iid(labels, 10, k, 500, np.random.default_rng(0))
    assert len(shards) == 10
    assert all(s.shape == (500,) for s in shards)
    assert_disjoint(shards)
    for shard in shards:
        classes, counts = np.unique(labels[shard], return_counts=True)
        assert classes.size == k
        assert counts.max() - counts.min() <= 1  # an even split over the device's classes
    # Classes are dealt evenly: each is used by floor or ceil(10 * k / 10) devices.
    usage = np.bincount(np.concatenate([np.unique(labels[s]) for s in shards]), minlength=10)
    assert usage.max() - usage.min() <= 1
    again = partition_non_iid(labels, 10, k, 500, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(shards, again, strict=True))


def test_partition_non_iid_impossible_cases() -> None:
    labels = np.repeat(np.arange(10), 100)
    with pytest.raises(ValueError, match="only 10 classes"):
        partition_non_iid(labels, 2, 11, 50, np.random.default_rng(0))
    with pytest.raises(ValueError, match="per_device"):
        partition_non_iid(labels, 2, 3, 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="impossible"):  # 10 devices on 1 class each need 200 per class
        partition_non_iid(labels, 20, 1, 100, np.random.default_rng(0))
    with pytest.raises(ValueError, match="1-D"):
        partition_non_iid(labels.reshape(10, 100), 2, 1, 10, np.random.default_rng(0))


def test_paper_split() -> None:
    labels = np.arange(60_000) % 10
    assert (PAPER_DEVICES, PAPER_SAMPLES_PER_DEVICE) == (10, 2745)
    iid = paper_split(labels, np.random.default_rng(7))
    assert len(iid) == 10 and all(s.size == 2745 for s in iid)
    assert_disjoint(iid)
    skewed = paper_split(labels, np.random.default_rng(7), non_iid_k=2)
    assert len(skewed) == 10 and all(s.size == 2745 for s in skewed)
    assert_disjoint(skewed)
    assert all(np.unique(labels[s]).size == 2 for s in skewed)


@pytest.mark.integration
def test_real_fashion_mnist() -> None:
    ds = load_fashion_mnist()
    assert ds.train_x.shape == (60_000, 1, 28, 28) and ds.test_x.shape == (10_000, 1, 28, 28)
    assert ds.train_x.dtype == np.float32 and ds.train_y.dtype == np.int64
    assert float(ds.train_x.min()) == 0.0 and float(ds.train_x.max()) == 1.0
    assert np.array_equal(np.bincount(ds.train_y), np.full(10, 6000))
    assert np.array_equal(np.bincount(ds.test_y), np.full(10, 1000))
    shards = paper_split(ds.train_y, np.random.default_rng(7))
    assert_disjoint(shards)
    assert sum(s.size for s in shards) == 27_450
