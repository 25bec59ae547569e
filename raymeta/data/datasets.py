"""Datasets loaded whole into memory as normalised float tensors.

On a 2-core machine, in-memory tensors are several times faster than ``DataLoader`` worker
processes for images this small (docs/design.md section 8), and they make batches exactly
reproducible across Ray Train workers.

Sources:

- ``fashion_mnist``: the four IDX files (``.gz`` or uncompressed), searched in
  ``$RAYMETA_DATA_DIR/fashion-mnist``, ``$RAYMETA_DATA_DIR``, Debian's
  ``/usr/share/datasets/fashion-mnist`` (package ``dataset-fashion-mnist``) and torchvision's
  layout in the download cache (``<cache>/FashionMNIST/raw``, :func:`cache_dir`). If none holds
  them, torchvision downloads them there (checking its own MD5 sums). The files are parsed
  directly: Debian's gzip differs from the one torchvision checksums, so torchvision is never
  asked to verify files it did not download.
- ``digits``: scikit-learn's bundled 8x8 digits (1797 images); a fixed stratified 20 % test split.
- ``cifar10`` / ``cifar100``: through torchvision with ``download=False`` from
  ``$RAYMETA_DATA_DIR/cifar``, ``$RAYMETA_DATA_DIR`` or ``<cache>/cifar``.
"""

from __future__ import annotations

import gzip
import os
import zlib
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


def cache_dir() -> Path:
    """raymeta's download cache: ``$XDG_CACHE_HOME/raymeta``, by default ``~/.cache/raymeta``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "raymeta"


def _env_dirs(subdir: str) -> list[Path]:
    """``$RAYMETA_DATA_DIR/subdir`` and ``$RAYMETA_DATA_DIR`` (empty when the variable is unset)."""
    env = os.environ.get("RAYMETA_DATA_DIR")
    return [Path(env) / subdir, Path(env)] if env else []


def _read_idx(path: Path, expected_items: int) -> np.ndarray:
    """Parse one IDX file (Y. LeCun's MNIST format): big-endian magic, dims, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # missing, truncated or corrupt gzip
        raise DataNotFoundError(
            f"cannot read {path}: {exc} (the file is damaged; restore or reinstall the dataset)"
        ) from None
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


def _has_fashion_mnist(folder: Path) -> bool:
    return all(
        (folder / f"{stem}.gz").exists() or (folder / stem).exists()
        for stem, _ in _FASHION_FILES.values()
    )


def _find_fashion_mnist() -> Path:
    """The first folder holding the four IDX files; downloads them with torchvision if none does.

    Raises:
        DataNotFoundError: not found and the download failed (the message lists the folders
            searched and how to provide the files).
    """
    download_root = cache_dir()
    downloaded = download_root / "FashionMNIST" / "raw"  # torchvision's layout under its root
    searched = [*_env_dirs("fashion-mnist"), DEBIAN_FASHION_MNIST, downloaded]
    found = next((d for d in searched if _has_fashion_mnist(d)), None)
    if found is not None:
        return found
    import torchvision
    from filelock import FileLock

    download_root.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(download_root / "FashionMNIST.lock"):  # one download per machine
            torchvision.datasets.FashionMNIST(str(download_root), train=False, download=True)
    except (RuntimeError, OSError) as exc:
        reason = " ".join(str(exc).split())
        raise DataNotFoundError(
            "Fashion-MNIST IDX files not found in "
            + ", ".join(str(d) for d in searched)
            + f", and the torchvision download into {download_root} failed ({reason}); install "
            "them with `sudo apt-get install dataset-fashion-mnist`, or put the four IDX files "
            "in a folder DIR/fashion-mnist and set RAYMETA_DATA_DIR=DIR"
        ) from None
    return downloaded


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
    searched = [*_env_dirs("cifar"), cache_dir() / "cifar"]
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
        "or set RAYMETA_DATA_DIR (raymeta does not download CIFAR)"
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
