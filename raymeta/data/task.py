"""The in-memory splits of one task, shared by every training loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TaskData:
    """A task's splits as tensors on the training device.

    Images: ``x`` are ``(N, C, S, S)`` float, ``y`` ``(N,)`` int64. Text
    (:func:`raymeta.data.text.load_text_task`): ``x`` and ``y`` are ``(N, T)`` int64 character
    windows, ``num_classes`` is the vocabulary size, ``image_size`` the window length and the
    test split equals the validation split (the corpus has no other).
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    meta_x: torch.Tensor
    meta_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    in_channels: int
    image_size: int
    class_names: tuple[str, ...]
    class_counts: list[int] | None = None  # long-tailed tasks: training images per class
