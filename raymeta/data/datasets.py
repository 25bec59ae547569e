"""Datasets loaded whole into memory as normalised float tensors.

On a 2-core machine, in-memory tensors are several times faster than ``DataLoader`` worker
processes for images this small (design.md section 8), and they make batches exactly
reproducible across Ray Train workers.

Sources:

- ``fashion_mnist``: the four IDX files (``.gz`` or uncompressed) that Debian's
  ``dataset-fashion-mnist`` installs under ``/usr/share/datasets/fashion-mnist``. Searched in
  ``$RAYMETA_DATA_DIR/fashion-mnist``, ``$RAYMETA_DATA_DIR``, the Debian path and
  ``~/.cache/raymeta/fashion-mnist``. The files are parsed directly (their gzip differs from the
  one torchvision checksums, so torchvision must not be asked to verify them).
- ``digits``: scikit-learn's bundled 8x8 digits (1797 images); a fixed stratified 20 % test split.
- ``cifar10`` / ``cifar100``: through torchvision with ``download=False`` from
  ``$RAYMETA_DATA_DIR`` or ``~/.cache/raymeta`` (this machine cannot download them).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raymeta.errors import ConfigError, DataNotFoundError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FASHION_FILES = {
    "train_x": ("train-images-idx3-ubyte", 60000),
    "train_y": ("train-labels-idx1-ubyte", 60000),
    "test_x": ("t10k-images-idx3-ubyte", 10000),
    "test_y": ("t10k-labels-idx1-ubyte", 10000),
}


@dataclass(frozen=True)
class Dataset:
    """A classification dataset held in memory.

    Attributes:
        name: registry name (``fashion_mnist``, ``digits``, ``cifar10``, ``cifar100``).
        train_x: ``(N, C, H, W)`` float32, standardised with the training set's mean and std.
        train_y: ``(N,)`` int64 class indices in ``[0, num_classes)``.
        test_x, test_y: the held-out test split, same layout; never used for any decision.
        class_names: ``num_classes`` human-readable names.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])


def _data_dirs(subdir: str) -> list[Path]:
    dirs = []
    env = os.environ.get("RAYMETA_DATA_DIR")
    if env:
        dirs += [Path(env) / subdir, Path(env)]
    if subdir == "fashion-mnist":
        dirs.append(DEBIAN_FASHION_MNIST)
    dirs.append(Path.home() / ".cache" / "raymeta" / subdir)
    return dirs


def _read_idx(path: Path, expected_items: int) -> np.ndarray:
    """Parse one IDX file (Y. LeCun's MNIST format): big-endian magic, dims, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataNotFoundError(f"cannot read {path}: {exc} (reinstall the dataset)") from None
    ndim = raw[3] if len(raw) >= 4 else 0
    header = 4 + 4 * ndim
    if len(raw) < header or raw[2] != 0x08:
        raise DataNotFoundError(f"{path} is not a uint8 IDX file (reinstall the dataset)")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    size = int(np.prod(dims))
    if dims[0] != expected_items or len(raw) - header != size:
        raise DataNotFoundError(
            f"{path} is truncated or wrong: header says {dims}, {len(raw) - header} data bytes, "
            f"expected {expected_items} items (reinstall the dataset)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_fashion_mnist() -> Path:
    searched = _data_dirs("fashion-mnist")
    for d in searched:
        if all(
            (d / f"{stem}.gz").exists() or (d / stem).exists()
            for stem, _ in _FASHION_FILES.values()
        ):
            return d
    raise DataNotFoundError(
        "Fashion-MNIST IDX files not found in "
        + ", ".join(str(d) for d in searched)
        + "; install them with `sudo apt-get install dataset-fashion-mnist` or set RAYMETA_DATA_DIR"
    )


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    train_t = torch.from_numpy(np.array(train, dtype=np.float32))
    test_t = torch.from_numpy(np.array(test, dtype=np.float32))
    mean, std = train_t.mean(), train_t.std()
    return (train_t - mean) / std, (test_t - mean) / std


def _fashion_mnist() -> Dataset:
    root = _find_fashion_mnist()
    arrays = {}
    for key, (stem, n) in _FASHION_FILES.items():
        path = root / f"{stem}.gz" if (root / f"{stem}.gz").exists() else root / stem
        arrays[key] = _read_idx(path, n)
    train_x, test_x = _standardise(arrays["train_x"][:, None], arrays["test_x"][:, None])
    return Dataset(
        "fashion_mnist",
        train_x,
        torch.from_numpy(arrays["train_y"].astype(np.int64)),
        test_x,
        torch.from_numpy(arrays["test_y"].astype(np.int64)),
        FASHION_MNIST_CLASSES,
    )


def _digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images, labels = bunch.images.astype(np.float32)[:, None], bunch.target.astype(np.int64)
    tr_x, te_x, tr_y, te_y = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=0
    )
    train_x, test_x = _standardise(tr_x, te_x)
    return Dataset(
        "digits",
        train_x,
        torch.from_numpy(tr_y),
        test_x,
        torch.from_numpy(te_y),
        tuple(str(c) for c in range(10)),
    )


def _cifar(name: str) -> Dataset:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    searched = _data_dirs("cifar")
    for root in searched:
        try:
            train = cls(str(root), train=True, download=False)
            test = cls(str(root), train=False, download=False)
        except RuntimeError:
            continue
        tr_x = train.data.transpose(0, 3, 1, 2)
        te_x = test.data.transpose(0, 3, 1, 2)
        train_x, test_x = _standardise(tr_x, te_x)
        return Dataset(
            name,
            train_x,
            torch.tensor(train.targets),
            test_x,
            torch.tensor(test.targets),
            tuple(train.classes),
        )
    raise DataNotFoundError(
        f"{name} not found under "
        + ", ".join(str(d) for d in searched)
        + f" (torchvision layout, e.g. {searched[0]}/cifar-10-batches-py); copy the files there "
        "or set RAYMETA_DATA_DIR — this machine cannot download them"
    )


DATASETS = {
    "fashion_mnist": _fashion_mnist,
    "digits": _digits,
    "cifar10": lambda: _cifar("cifar10"),
    "cifar100": lambda: _cifar("cifar100"),
}

_CACHE: dict[str, Dataset] = {}


def load_dataset(name: str) -> Dataset:
    """Load a dataset by name, cached per process.

    Raises:
        ConfigError: ``name`` is not one of :data:`DATASETS`.
        DataNotFoundError: the files are missing or truncated (the message lists the paths searched).
    """
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; accepted: {', '.join(DATASETS)}")
    if name not in _CACHE:
        _CACHE[name] = DATASETS[name]()
    return _CACHE[name]
