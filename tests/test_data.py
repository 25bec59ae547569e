import gzip

import pytest
import torch

from raymeta.data import datasets, load_dataset, make_splits
from raymeta.data.batches import endless_batches, epoch_batches
from raymeta.errors import ConfigError, DataNotFoundError


def test_fashion_mnist_loads_real_files():
    ds = load_dataset("fashion_mnist")
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.train_y).tolist() == [6000] * 10
    assert abs(float(ds.train_x.mean())) < 1e-4 and abs(float(ds.train_x.std()) - 1) < 1e-3


def test_digits_fixed_test_split():
    ds = load_dataset("digits")
    assert len(ds.train_y) + len(ds.test_y) == 1797 and ds.image_size == 8
    assert len(ds.test_y) == 360


def test_splits_disjoint_balanced_and_seeded():
    labels = load_dataset("fashion_mnist").train_y
    sp = make_splits(labels, 10, val_size=5000, meta_per_class=100, seed=3)
    sets = [set(sp.train.tolist()), set(sp.val.tolist()), set(sp.meta.tolist())]
    assert sum(map(len, sets)) == 60000 and len(set.union(*sets)) == 60000
    assert torch.bincount(labels[sp.meta], minlength=10).tolist() == [100] * 10
    again = make_splits(labels, 10, val_size=5000, meta_per_class=100, seed=3)
    other = make_splits(labels, 10, val_size=5000, meta_per_class=100, seed=4)
    assert torch.equal(sp.meta, again.meta) and not torch.equal(sp.meta, other.meta)


def test_meta_set_larger_than_class_is_one_line_error():
    labels = load_dataset("digits").train_y
    with pytest.raises(ConfigError, match=r"meta_per_class=500 is larger than class") as err:
        make_splits(labels, 10, val_size=0, meta_per_class=500, seed=0)
    assert "\n" not in str(err.value)


def _no_local_fashion_mnist(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYMETA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    monkeypatch.setattr(datasets, "_CACHE", {})


def test_missing_fashion_mnist_names_searched_paths_and_the_failed_download(
    monkeypatch, tmp_path, http_folder
):
    import torchvision

    _no_local_fashion_mnist(monkeypatch, tmp_path)
    _, url = http_folder  # an empty folder: every file is a 404
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "mirrors", [f"{url}/"])
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("fashion_mnist")
    msg = str(err.value)
    assert "\n" not in msg and "apt-get install dataset-fashion-mnist" in msg
    for folder in ("data/fashion-mnist", "data", "nowhere", "cache/raymeta/FashionMNIST/raw"):
        assert str(tmp_path / folder) in msg
    assert f"download into {tmp_path / 'cache' / 'raymeta'} failed" in msg and "404" in msg


def test_fashion_mnist_is_downloaded_with_torchvision_into_the_cache(
    monkeypatch, tmp_path, http_folder
):
    """No local copy: torchvision fetches the files (here from a local mirror holding Debian's
    copies, whose MD5 sums replace torchvision's) into <cache>/FashionMNIST/raw, and they load
    exactly like the Debian files."""
    import hashlib

    import torchvision

    src, debian = datasets.DEBIAN_FASHION_MNIST, load_dataset("fashion_mnist")
    _no_local_fashion_mnist(monkeypatch, tmp_path)
    served, url = http_folder
    resources = []
    for stem, _ in datasets._FASHION_FILES.values():
        (served / f"{stem}.gz").symlink_to(src / f"{stem}.gz")
        md5 = hashlib.md5((src / f"{stem}.gz").read_bytes()).hexdigest()
        resources.append((f"{stem}.gz", md5))
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "mirrors", [f"{url}/"])
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "resources", resources)
    ds = load_dataset("fashion_mnist")
    raw = tmp_path / "cache" / "raymeta" / "FashionMNIST" / "raw"
    assert (raw / "train-images-idx3-ubyte").is_file()
    assert torch.equal(ds.train_x, debian.train_x) and torch.equal(ds.test_y, debian.test_y)
    monkeypatch.setattr(datasets, "_CACHE", {})
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "mirrors", [])  # no second download
    assert torch.equal(load_dataset("fashion_mnist").train_x, ds.train_x)


def test_truncated_idx_file_is_reported(monkeypatch, tmp_path):
    src = datasets.DEBIAN_FASHION_MNIST
    for stem, _ in datasets._FASHION_FILES.values():
        data = (src / f"{stem}.gz").read_bytes()
        (tmp_path / f"{stem}.gz").write_bytes(data)
    raw = gzip.decompress((src / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(raw[:5000]))
    monkeypatch.setenv("RAYMETA_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(datasets, "_CACHE", {})
    with pytest.raises(DataNotFoundError, match="truncated") as err:
        load_dataset("fashion_mnist")
    assert "t10k-labels-idx1-ubyte.gz" in str(err.value)


def test_unknown_dataset():
    with pytest.raises(ConfigError, match="unknown dataset 'mnist2'; accepted: fashion_mnist"):
        load_dataset("mnist2")


def test_worker_chunks_make_the_global_batch():
    one = list(epoch_batches(1000, 64, seed=1, epoch=2))
    w0 = list(epoch_batches(1000, 32, seed=1, epoch=2, rank=0, world_size=2))
    w1 = list(epoch_batches(1000, 32, seed=1, epoch=2, rank=1, world_size=2))
    assert len(one) == len(w0) == len(w1) == 15
    for a, b, c in zip(one, w0, w1, strict=True):
        assert torch.equal(a, torch.cat([b, c]))


def test_endless_batches_cycle_through_meta_set():
    stream = endless_batches(100, 30, seed=0)
    seen = torch.cat([next(stream) for _ in range(3)])
    assert len(set(seen.tolist())) == 90
