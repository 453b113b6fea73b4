"""Fashion-MNIST loading (IDX files) and partitioning of a training set across devices.

The data come from Debian's ``dataset-fashion-mnist`` package, which installs the four original gzipped IDX
files. IDX is a tiny big-endian format: a 4-byte magic (two zero bytes, a dtype code, the number of dims), one
big-endian uint32 per dim, then the raw payload. We validate all of it, because a silently truncated download
would otherwise show up much later as a reshape error or, worse, as a model trained on garbage.

Partitioners return lists of index arrays (not copies of the data) so that a simulation can hand each device
its shard cheaply, and they are deterministic given a ``np.random.Generator`` so an experiment is repeatable.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_DATA_DIR",
    "PAPER_DEVICES",
    "PAPER_SAMPLES_PER_DEVICE",
    "Dataset",
    "DatasetError",
    "DatasetMissingError",
    "load_fashion_mnist",
    "paper_split",
    "partition_iid",
    "partition_non_iid",
    "read_idx",
    "resolve_data_dir",
]

DEFAULT_DATA_DIR: Final = Path("/usr/share/datasets/fashion-mnist")
DATA_DIR_ENV: Final = "BDN_DATA_DIR"
DEBIAN_PACKAGE: Final = "dataset-fashion-mnist"

PAPER_DEVICES: Final = 10
PAPER_SAMPLES_PER_DEVICE: Final = 2745

IMAGE_SIDE: Final = 28
NUM_CLASSES: Final = 10

_GZIP_MAGIC: Final = b"\x1f\x8b"
# IDX dtype code -> big-endian NumPy dtype.
_IDX_DTYPES: Final[dict[int, str]] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}

IndexArray = npt.NDArray[np.int64]


class DatasetError(Exception):
    """A dataset file is unreadable or inconsistent (bad magic, truncated, wrong shape, ...)."""


class DatasetMissingError(DatasetError, FileNotFoundError):
    """A dataset file does not exist; the message says how to install it and where we looked."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """Fashion-MNIST in training-ready form.

    Images are float32 ``(N, 1, 28, 28)`` scaled to [0, 1] (the CNN's NCHW layout); labels are int64 in 0..9.
    ``eq=False`` because element-wise array comparison has no single truth value.
    """

    train_x: npt.NDArray[np.float32]
    train_y: npt.NDArray[np.int64]
    test_x: npt.NDArray[np.float32]
    test_y: npt.NDArray[np.int64]


# --- IDX files ---


def _read_bytes(path: Path) -> bytes:
    """Return the (decompressed) file content; gzip is detected by its magic, not by the file name."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise DatasetMissingError(f"IDX file not found: {path}") from exc
    except OSError as exc:
        raise DatasetError(f"cannot read IDX file {path}: {exc}") from exc
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        # EOFError: the gzip stream ends early (truncated download); BadGzipFile is an OSError.
        raise DatasetError(f"{path}: corrupt or truncated gzip stream ({exc})") from exc


def read_idx(path: str | os.PathLike[str]) -> npt.NDArray[Any]:
    """Read a gzipped or plain IDX file into an array of its native dtype and shape.

    Raises ``DatasetError`` for a bad magic number, an unknown dtype code, a truncated header, or a payload
    whose size does not match the dims exactly (too short: "truncated"; too long: "trailing bytes").
    """
    p = Path(path)
    data = _read_bytes(p)
    if len(data) < 4:
        raise DatasetError(f"{p}: truncated IDX header ({len(data)} bytes, need at least 4)")
    if data[0] != 0 or data[1] != 0:
        raise DatasetError(f"{p}: bad magic {data[:4].hex()} (an IDX file starts with two zero bytes)")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise DatasetError(f"{p}: bad magic {data[:4].hex()}: unknown IDX dtype code 0x{code:02x}")
    if ndim == 0:
        raise DatasetError(f"{p}: bad magic {data[:4].hex()}: zero dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DatasetError(f"{p}: truncated IDX header ({len(data)} bytes, {ndim} dims need {header_len})")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    payload = len(data) - header_len
    if payload < expected:
        raise DatasetError(f"{p}: truncated payload: {payload} bytes, dims {dims} need {expected}")
    if payload > expected:
        raise DatasetError(f"{p}: {payload - expected} trailing bytes after the payload for dims {dims}")
    arr = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)
    # Native byte order and a writable array the caller owns (frombuffer views immutable bytes).
    return arr.astype(dtype.newbyteorder("="), copy=True)


# --- Fashion-MNIST ---


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory to load from: the argument, else ``$BDN_DATA_DIR``, else ``DEFAULT_DATA_DIR``."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env)
    return DEFAULT_DATA_DIR


def _find_file(directory: Path, stem: str) -> Path:
    """Prefer the Debian ``.gz`` name, accept an uncompressed copy; otherwise explain how to get the data."""
    for name in (f"{stem}.gz", stem):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    raise DatasetMissingError(
        f"Fashion-MNIST file {stem}.gz not found in {directory} (looked for {directory / (stem + '.gz')}). "
        f"Install the Debian package {DEBIAN_PACKAGE} (sudo apt-get install {DEBIAN_PACKAGE}), "
        f"or point ${DATA_DIR_ENV} / the data_dir argument at a directory holding the IDX files."
    )


def _load_split(
    directory: Path, prefix: str, select: Callable[[int], IndexArray] | None = None
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    images_path = _find_file(directory, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_file(directory, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise DatasetError(
            f"{images_path}: expected uint8 (N, 28, 28) images, got {images.dtype} {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DatasetError(f"{labels_path}: expected uint8 (N,) labels, got {labels.dtype} {labels.shape}")
    if labels.shape[0] != images.shape[0]:
        raise DatasetError(f"{prefix}: {images.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise DatasetError(f"{labels_path}: label {int(labels.max())} out of range 0..{NUM_CLASSES - 1}")
    if select is not None:  # cut before converting: 60,000 float32 images are 188 MB, a device's shard ~9 MB
        idx = select(images.shape[0])
        images, labels = images[idx], labels[idx]
    x = (images.astype(np.float32) / np.float32(255.0)).reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE)
    return x, labels.astype(np.int64)


def load_fashion_mnist(data_dir: str | os.PathLike[str] | None = None) -> Dataset:
    """Load the 60,000 training and 10,000 test images (see ``resolve_data_dir`` for where from)."""
    directory = resolve_data_dir(data_dir)
    train_x, train_y = _load_split(directory, "train")
    test_x, test_y = _load_split(directory, "t10k")
    return Dataset(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)


def load_train_subset(
    select: Callable[[int], IndexArray], data_dir: str | os.PathLike[str] | None = None
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Only the training images ``select(60000)`` picks, converted to float after the cut (a device's shard)."""
    return _load_split(resolve_data_dir(data_dir), "train", select)


def load_test_split(
    data_dir: str | os.PathLike[str] | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    return _load_split(resolve_data_dir(data_dir), "t10k")


# --- partitioning ---


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")


def partition_iid(n_total: int, devices: int, per_device: int, rng: np.random.Generator) -> list[IndexArray]:
    """Disjoint uniformly random shards: ``devices`` sorted int64 index arrays of ``per_device`` each."""
    _check_positive(n_total=n_total, devices=devices, per_device=per_device)
    need = devices * per_device
    if need > n_total:
        raise ValueError(f"{devices} devices x {per_device} samples = {need} > {n_total} available samples")
    chosen = rng.permutation(n_total)[:need].astype(np.int64)
    return [np.sort(shard) for shard in chosen.reshape(devices, per_device)]


def partition_non_iid(
    labels: npt.ArrayLike,
    devices: int,
    classes_per_device: int,
    per_device: int,
    rng: np.random.Generator,
) -> list[IndexArray]:
    """Label-skewed shards: each device holds samples of exactly ``classes_per_device`` (k) classes.

    Classes are dealt to devices by walking one shuffled class order cyclically, k consecutive classes per
    device: the k classes of a device are therefore distinct (k <= #classes), and every class is used by
    either floor or ceil(devices * k / #classes) devices, which keeps the demand on each class balanced.
    A device's ``per_device`` samples are split as evenly as possible over its k classes (so each class
    contributes at least one sample, which is why ``per_device >= k`` is required). Shards are disjoint.
    """
    _check_positive(devices=devices, classes_per_device=classes_per_device, per_device=per_device)
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    classes = np.unique(y)
    k = classes_per_device
    if k > classes.size:
        raise ValueError(f"classes_per_device={k} but the labels contain only {classes.size} classes")
    if per_device < k:
        raise ValueError(
            f"per_device={per_device} < classes_per_device={k}: a device could not hold k classes"
        )

    order = rng.permutation(classes)
    base, extra = divmod(per_device, k)
    # plan[d] = [(class, count), ...]
    plan = [
        [(order[(d * k + j) % classes.size], base + (1 if j < extra else 0)) for j in range(k)]
        for d in range(devices)
    ]
    demand: dict[Any, int] = {}
    for entries in plan:
        for cls, count in entries:
            demand[cls] = demand.get(cls, 0) + count
    pools: dict[Any, IndexArray] = {}
    for cls, need in demand.items():
        members = np.flatnonzero(y == cls).astype(np.int64)
        if need > members.size:
            raise ValueError(
                f"non-IID split impossible: class {cls} must supply {need} samples to its devices "
                f"but has only {members.size} (devices={devices}, k={k}, per_device={per_device})"
            )
        pools[cls] = rng.permutation(members)
    taken: dict[Any, int] = dict.fromkeys(demand, 0)
    shards: list[IndexArray] = []
    for entries in plan:
        parts = []
        for cls, count in entries:
            parts.append(pools[cls][taken[cls] : taken[cls] + count])
            taken[cls] += count
        shards.append(np.sort(np.concatenate(parts)))
    return shards


def paper_split(
    labels: npt.ArrayLike, rng: np.random.Generator, non_iid_k: int | None = None
) -> list[IndexArray]:
    """The paper's setting: 10 devices x 2,745 training samples, IID or with ``non_iid_k`` classes each."""
    y = np.asarray(labels)
    if non_iid_k is None:
        return partition_iid(int(y.shape[0]), PAPER_DEVICES, PAPER_SAMPLES_PER_DEVICE, rng)
    return partition_non_iid(y, PAPER_DEVICES, non_iid_k, PAPER_SAMPLES_PER_DEVICE, rng)
