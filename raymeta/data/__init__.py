"""Datasets as in-memory tensors, deterministic splits (train / validation / meta / test)."""

from raymeta.data.datasets import DATASETS, Dataset, load_dataset
from raymeta.data.splits import Splits, make_splits

__all__ = ["DATASETS", "Dataset", "Splits", "load_dataset", "make_splits"]
