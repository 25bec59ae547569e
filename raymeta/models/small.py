"""Small fast networks for 28x28 / 8x8 images on CPU."""

from __future__ import annotations

from torch import nn


class SmallCNN(nn.Module):
    """Two 3x3 conv + ReLU + 2x2 max-pool stages and a 2-layer classifier (about 106k
    parameters on 28x28 inputs). No BatchNorm, so data-parallel runs are exactly equivalent
    to one worker with the summed batch.

    Input ``(B, in_channels, S, S)``; output ``(B, num_classes)`` logits.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * side * side, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Fully connected network ``S*S*C -> 256 -> 128 -> num_classes`` with BatchNorm and ReLU.

    Input ``(B, in_channels, S, S)``; output ``(B, num_classes)`` logits.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size * image_size, 256),
            nn.BatchNorm1d(256),
            nn.ReLU(),
            nn.Linear(256, 128),
            nn.BatchNorm1d(128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x):
        return self.net(x)
