"""The tutorial's two networks, with its exact layer names and shapes.

Parameter names are part of the contract: a ``state_dict`` saved from the tutorial's own
classes must load into these unchanged, so nothing here may be renamed or reordered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvNet(nn.Module):
    """conv(3→32) → pool → conv(32→64) → pool → fc(3136→512) → fc(512→classes).

    Input ``N×3×28×28``, output ``N×num_classes`` logits.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3, padding=1)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.flatten = nn.Flatten(start_dim=1)
        self.fc1 = nn.Linear(64 * 7 * 7, 512)
        self.fc2 = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits for a batch of 28×28 RGB images."""
        x = self.pool1(self.conv1(x))
        x = self.pool2(self.conv2(x))
        logits: torch.Tensor = self.fc2(self.fc1(self.flatten(x)))
        return logits


class FCN(nn.Module):
    """Three valid 3×3 convs down, three 3×3 transposed convs back up, ReLU after each.

    Fully convolutional: input ``N×3×H×W`` (H, W ≥ 7), output ``N×num_class×H×W`` scores.
    The tutorial keeps the ReLU on the last layer, so scores are non-negative.
    """

    def __init__(self, num_class: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels=3, out_channels=32, kernel_size=3)
        self.conv2 = nn.Conv2d(in_channels=32, out_channels=64, kernel_size=3)
        self.conv3 = nn.Conv2d(in_channels=64, out_channels=128, kernel_size=3)
        self.unsample1 = nn.ConvTranspose2d(in_channels=128, out_channels=64, kernel_size=3)
        self.unsample2 = nn.ConvTranspose2d(in_channels=64, out_channels=32, kernel_size=3)
        self.unsample3 = nn.ConvTranspose2d(in_channels=32, out_channels=num_class, kernel_size=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return per-pixel class scores with the input's height and width."""
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        x = F.relu(self.unsample1(x))
        x = F.relu(self.unsample2(x))
        return F.relu(self.unsample3(x))
